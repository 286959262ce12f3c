"""DSSAU-Net (Xia, Li, Lan, "DSSAU-Net: U-Shaped Hybrid Network for Pubic Symphysis and Fetal Head Segmentation",
arXiv 2506.03684): a MedFormer (DSSA) encoder, a narrow DSSA decoder and an FPN/PPM fusion head.

Encoder: MedFormer-B-like pyramid (dims 96/192/384/768, depths 2-2-8-2, top-k 1/4/16/full, n_win 8, head dim 32,
MLP ratio 3, drop path 0.2, padding to the regions) with a LayerNorm2d on every stage output. Head (``FPNHEAD``):
pyramid pooling on the H/32 feature (adaptive *max* pooling 1/2/3/6 → Conv1×1 to 64 → upsample → concat with the
input → Conv1×1-BN-ReLU to 64) → decoder DSSA stage at H/32 (full attention); then three times: bilinear ×2
(+ Conv1×1 the first time) + lateral Conv1×1-BN-ReLU of the encoder skip → decoder DSSA stage (64 channels, 2 heads,
depths 8/2/2 at H/16, H/8, H/4) → Conv1×1-BN-ReLU. The four scales are upsampled to H/4, concatenated and fused
(Conv1×1-BN-ReLU 256→64); bilinear ×4 and Conv3×3 give the logits. Published: 256² (code default), 3 channels,
3 classes (background, pubic symphysis, fetal head).

Deviations: the released training computes its Dice term on argmax one-hot predictions (non-differentiable, so only
cross-entropy trains the model); robustbench_med trains with the suite's differentiable per-pixel cross-entropy. The
decoder's unused per-stage LayerNorms of the release (512 parameters) are not built. The forward pass has no
deviation, so there is no separate compat mode; :func:`~.compat.load_released` maps a released ``DSSAU_Net`` state
dict (whose decoder is registered under two names) onto this module.
"""
from __future__ import annotations

from dataclasses import replace
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from robustbench_med.victims.zoo import common as C
from robustbench_med.victims.zoo.biformer import BiFormerBackbone, PyramidConfig, init_transformer_weights, make_stage
from robustbench_med.victims.zoo.medformer import MEDFORMER_B, MEDFORMER_TINY

PAPER = (
    "Xia, Li, Lan, DSSAU-Net: U-Shaped Hybrid Network for Pubic Symphysis and Fetal Head Segmentation, arXiv 2506.03684"
)


class MaxPyramidPooling(nn.Module):
    """DSSAU-Net's PPM: adaptive max pooling to 1/2/3/6, Conv1×1 (biased), upsample, concat, Conv1×1-BN-ReLU."""

    def __init__(self, cin: int, channels: int, scales: tuple[int, ...] = (1, 2, 3, 6)) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Sequential(nn.AdaptiveMaxPool2d(s), C.PointwiseConv(cin, channels)) for s in scales
        )
        self.fuse = _cbr_biased(cin + len(scales) * channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [_up(b(x), x.shape[-2:]) for b in self.branches]
        return self.fuse(torch.cat([*outs, x], 1))


class DSSAUNet(nn.Module):
    """DSSAU-Net with ``encode`` / ``decode`` halves (see the module docstring).

    Args:
        cfg: encoder pyramid; ``width``: decoder/head channels; ``decoder_depths``: decoder stages at H/4 … H/32.
    """

    def __init__(
        self, cfg: PyramidConfig, num_classes: int, width: int = 64, decoder_depths: tuple[int, ...] = (2, 2, 8, 2)
    ) -> None:
        super().__init__()
        self.in_chans = cfg.in_chans
        self.backbone = BiFormerBackbone(cfg)
        self.stage_norms = nn.ModuleList(C.LayerNorm2d(d) for d in cfg.dims)
        dec = replace(cfg, dims=(width,) * 4, depths=tuple(decoder_depths), heads=None)
        self.decoder = nn.ModuleList(make_stage(dec, width, n, k) for n, k in zip(decoder_depths, cfg.topks))
        self.ppm = MaxPyramidPooling(cfg.dims[3], width)
        self.conv_x1 = C.PointwiseConv(width, width)
        self.laterals = nn.ModuleList(_cbr_biased(cfg.dims[i], width) for i in (2, 1, 0))
        self.post = nn.ModuleList(_cbr_biased(width, width) for _ in range(3))
        self.fuse_all = _cbr_biased(4 * width, width)
        self.cls_seg = nn.Conv2d(width, num_classes, 3, padding=1)
        self.apply(init_transformer_weights)

    def encode(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """Normalised stage features: ``'z'`` (H/32) and skips ``'s1'``–``'s3'`` (H/4 … H/16)."""
        if z.shape[1] == 1 and self.in_chans == 3:
            z = z.repeat(1, 3, 1, 1)
        f = [n(x) for n, x in zip(self.stage_norms, self.backbone.forward_stages(z))]
        return {"z": f[3], "s1": f[0], "s2": f[1], "s3": f[2]}

    def decode(self, latent: dict[str, torch.Tensor]) -> torch.Tensor:
        x1 = self.decoder[3](self.ppm(latent["z"]))
        scales, x = [x1], x1
        for i, skip in enumerate((latent["s3"], latent["s2"], latent["s1"])):
            up = _up(x, (x.shape[-2] * 2, x.shape[-1] * 2))
            up = self.conv_x1(up) if i == 0 else up
            x = self.post[i](self.decoder[2 - i](up + self.laterals[i](skip)))
            scales.append(x)
        size = scales[-1].shape[-2:]
        x = self.fuse_all(torch.cat([_up(s, size) for s in scales], 1))
        return self.cls_seg(_up(x, (size[0] * 4, size[1] * 4)))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(z))


def _cbr_biased(cin: int, cout: int) -> nn.Sequential:
    """Conv1×1 (with bias, as released) → BN → ReLU."""
    return nn.Sequential(C.PointwiseConv(cin, cout), nn.BatchNorm2d(cout), nn.ReLU())


def _up(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


DSSAUNET_FULL = replace(MEDFORMER_B, n_win=8, drop_path=0.2)
# Tiny (64² phantom): the tiny MedFormer encoder (DSSA, k₂ ≥ 4), decoder width 32 with one block per stage.
DSSAUNET_TINY = MEDFORMER_TINY
LAYERS = tuple(f"backbone.stages.{i}" for i in range(4)) + tuple(f"decoder.{i}" for i in range(4))
COSTS = {"dssaunet.full": (29_250_115, 14_150_631_424), "dssaunet.tiny": (458_006, 36_522_496)}
FULL_NOTE = ("Released IUGC 2024 configuration (256² code default, 3 channels, 3 classes: background, pubic symphysis, "
             "fetal head; inputs in [0, 1]); load external weights with weights=PATH. 29.25M parameters and 7.08 GMACs "
             "(30.78 at 512²; FlopCounterMode) as the release. Deviation: loss 0.5 CE + 0.5 *soft* Dice (the release's "
             "Dice term uses argmax predictions and does not train). No forward deviation; the published pretrain.pth "
             "is an encoder checkpoint (loaded by the release with strict=False), and compat.load_released maps a "
             "state dict of the released DSSAU_Net.")
TINY_NOTE = ("Tiny MedFormer encoder (DSSA), max-pooling PPM, DSSA decoder stages of width 32 (one block each) and the "
             "FPN fusion head kept; loss 0.5 CE + 0.5 soft Dice. Measured: val Dice_fg 0.895 (body 0.98, liver 0.93, "
             "kidneys 0.92, spine 0.94, lesion 0.68) on 200 phantom validation images after `robustbench-med train "
             "dssaunet.tiny` (trained with the project's phantom loop: class-weighted CE + batch soft Dice; two threads: 18 s).")


def _register() -> None:
    seg = C.SegmentationLossVictim
    card = C.full_card("dssaunet.full", "segmentation", "transperineal ultrasound (IUGC 2024)", (3, 256, 256),
                       C.FHPS_CLASSES, PAPER, *COSTS["dssaunet.full"], FULL_NOTE, loss_weights=(0.5, 0.5),
                       routing="dssa")
    C.register_zoo("dssaunet.full", card, partial(DSSAUNet, DSSAUNET_FULL, len(C.FHPS_CLASSES)), (0.0, 0.0, 0.0),
                   (1.0, 1.0, 1.0), LAYERS, cls=seg)
    card = C.tiny_card("dssaunet.tiny", "segmentation", PAPER, *COSTS["dssaunet.tiny"], TINY_NOTE,
                       loss_weights=(0.5, 0.5), routing="dssa")
    C.register_zoo("dssaunet.tiny", card, partial(DSSAUNet, DSSAUNET_TINY, len(C.SEG_CLASSES), 32, (1, 1, 1, 1)),
                   C.PHANTOM_MEAN, C.PHANTOM_STD, LAYERS,
                   recipe=C.tiny_recipe("mask", n_train=800, epochs=4, lr=5e-3), cls=seg)

_register()
