"""BRAU-Net (Cai et al., "Pubic Symphysis-Fetal Head Segmentation Using Pure Transformer with Bi-level Routing
Attention", arXiv 2310.00289; extended version with inverted bottleneck patch expanding, MMM 2025, arXiv 2410.10352).

A Swin-Unet layout with BiFormer blocks. Encoder: stem (H/4, skip 0) → stage blocks → patch merging (Conv3×3 s2 +
BN, C→2C; the merged maps at H/8 and H/16 are skips 1 and 2) → … → stage-4 blocks with full attention at H/32 (the
bottleneck). Decoder: patch expanding to H/16, then per level concat(x, skip) → Linear 2C→C → BiFormer blocks →
patch expanding; LayerNorm → 4× final patch expand → Conv1×1 (no bias). There is no SCCSA (that is BRAU-Net++).
Published (FH-PS-AoP): 256², 3 classes, C = 96, depths 4-4-8-4, decoder depths 8/4/4, heads 2/4/8/16 (head dim 48),
MLP ratio 4, top-k 4/8/16/full, n_win 8, LePE 5×5, drop path 0.2.

Patch expanding (one decision for every configuration): ``expand='linear'``, the released Swin-Unet patch expanding,
is used by both registered configurations (``braunet.full``, whose 67.22M parameters match the release, and
``braunet.tiny``). The extended paper's inverted bottleneck patch expanding is available as the explicitly named
variant ``expand='ibpe'`` (:class:`~.expand.InvertedBottleneckExpand`, a **reconstruction**: the paper's layer list is
not public and the released code has no IBPE). Until revision 1 of its recipe ``braunet.tiny`` used the IBPE, so
the tiny and full victims were different models.

Deviations from the released code: its patch merging ``view``s a (B, H·W, C) tensor as (B, C, H, W) and the conv
output back as (B, H·W/4, 2C) without permutes, scrambling channels and positions; proper permutes are used here. The
double-LayerNorm block quirk (as in BRAU-Net++) is replaced by the standard BiFormer pre-norm block. The released
``PatchEmbedding`` asserts the construction-time image size; any size divisible by 32 (and padded to the regions) works.

``release_compat=True`` computes the released forward exactly: the patch merging with the release's views
(:class:`ReleasedPatchMerging`) and the released block (:class:`~.biformer.RoutedBlock` with ``input_norm``). The
parameters are the same in both modes; no trained BRAU-Net checkpoint is published (the README links data only), and
:func:`~.compat.load_released` maps a state dict of the released definition onto a compat model.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import torch
from torch import nn

from robustbench_med.errors import ConfigError
from robustbench_med.victims.zoo import common as C
from robustbench_med.victims.zoo.biformer import BiFormerBackbone, PyramidConfig, init_transformer_weights, make_stage
from robustbench_med.victims.zoo.braunetpp import DecoderLevel
from robustbench_med.victims.zoo.expand import FinalPatchExpand, InvertedBottleneckExpand, PatchExpand

PAPER = (
    "Cai et al., Pubic Symphysis-Fetal Head Segmentation Using Pure Transformer with Bi-level Routing Attention, "
    "arXiv 2310.00289; IBPE from the extended version, MMM 2025, arXiv 2410.10352"
)
EXPANDERS = {"linear": PatchExpand, "ibpe": InvertedBottleneckExpand}


class ReleasedPatchMerging(nn.Sequential):
    """Conv3×3 s2 + BN applied as the released ``PatchMerging`` does (Cai et al.; ``bra_encoder_bottleneck.py``).

    The release holds tokens ``(B, H·W, C)``, ``view``s them as ``(B, C, H, W)`` without a permute, convolves, and
    ``view``s the ``(B, 2C, H/2, W/2)`` result as tokens ``(B, H·W/4, 2C)``. On NCHW maps (tokens = the channels-last
    flattening) that is: channels-last memory reinterpreted as NCHW in, NCHW memory reinterpreted as channels-last out.
    The parameters (``0`` conv, ``1`` BN) are those of the backbone's ordinary downsampling layer.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        y = super().forward(x.permute(0, 2, 3, 1).reshape(n, c, h, w))
        n, c2, h2, w2 = y.shape
        return y.reshape(n, h2, w2, c2).permute(0, 3, 1, 2)


class BRAUNet(nn.Module):
    """BRAU-Net with ``encode`` / ``decode`` halves (see the module docstring).

    Args:
        cfg: encoder pyramid (four stages; stage 4 is the bottleneck).
        decoder_depths: blocks per decoder level from H/16 to H/4.
        num_classes: output classes.
        expand: ``'linear'`` (released) or ``'ibpe'`` (reconstructed IBPE) patch expanding.
        release_compat: the released forward (view-scrambling patch merging, released block norms and residuals).
    """

    def __init__(
        self,
        cfg: PyramidConfig,
        decoder_depths: tuple[int, int, int],
        num_classes: int,
        expand: str = "linear",
        release_compat: bool = False,
    ) -> None:
        super().__init__()
        if expand not in EXPANDERS:
            raise ConfigError(f"expand must be one of {sorted(EXPANDERS)}, got {expand!r}")
        if release_compat and expand != "linear":
            raise ConfigError("release_compat needs expand='linear': the released BRAU-Net has no IBPE")
        self.release_compat = release_compat
        if release_compat:
            cfg = replace(cfg, block_input_norm=True)
        make_up = EXPANDERS[expand]
        self.in_chans = cfg.in_chans
        self.backbone = BiFormerBackbone(cfg)
        if release_compat:
            downs = self.backbone.downsample_layers
            for i in range(1, len(downs)):
                downs[i] = ReleasedPatchMerging(*downs[i])
        dims = cfg.dims
        heads = cfg.heads or (None,) * 4
        self.expand = make_up(dims[3])
        levels = []
        for depth, level in zip(decoder_depths, (2, 1, 0)):
            rates = [cfg.drop_path * j / max(depth - 1, 1) for j in range(depth)]
            blocks = make_stage(cfg, dims[level], depth, cfg.topks[level], heads[level], rates)
            levels.append(DecoderLevel(blocks, dims[level], make_up(dims[level]) if level > 0 else None, None))
        self.levels = nn.ModuleList(levels)
        self.norm_up = nn.LayerNorm(dims[0])
        self.final_expand = FinalPatchExpand(dims[0])
        self.output = C.PointwiseConv(dims[0], num_classes, bias=False)
        self.apply(init_transformer_weights)

    def encode(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """Bottleneck ``'z'`` (stage-4 output, H/32) and skips ``'s1'``–``'s3'`` (stem and merged maps, H/4 … H/16)."""
        if z.shape[1] == 1 and self.in_chans == 3:
            z = z.repeat(1, 3, 1, 1)
        inputs, outputs = self.backbone.forward_stages(z, with_inputs=True)
        return {"z": outputs[3], "s1": inputs[0], "s2": inputs[1], "s3": inputs[2]}

    def decode(self, latent: dict[str, torch.Tensor]) -> torch.Tensor:
        x = self.expand(latent["z"])
        for level, skip in zip(self.levels, (latent["s3"], latent["s2"], latent["s1"])):
            x = level(x, skip)
        x = self.norm_up(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.output(self.final_expand(x))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(z))


BRAUNET_FULL = PyramidConfig(dims=(96, 192, 384, 768), depths=(4, 4, 8, 4), topks=(4, 8, 16, None), n_win=8,
                             mlp_ratio=4.0, heads=(2, 4, 8, 16), drop_path=0.2)
BRAUNET_DECODER = (8, 4, 4)
# Tiny (64² phantom): C = 16, depths 1-1-2-1, decoder 2/1/1, head dim 16, MLP ratio 4, n_win 4, top-k 2/4/8/full,
# linear patch expanding (as released).
BRAUNET_TINY = PyramidConfig(dims=(16, 32, 64, 128), depths=(1, 1, 2, 1), topks=(2, 4, 8, None), n_win=4, head_dim=16,
                             mlp_ratio=4.0, full_heads=None, in_chans=1)
BRAUNET_TINY_DECODER = (2, 1, 1)
LAYERS = tuple(f"backbone.stages.{i}" for i in range(4)) + ("levels.0", "levels.1", "levels.2")
COSTS = {"braunet.full": (67_218_432, 41_157_918_720), "braunet.tiny": (604_160, 23_898_112)}
FULL_NOTE = ("Released FH-PS-AoP configuration (256², 3 channels, 3 classes: background, pubic symphysis, fetal head; "
             "inputs in [0, 1]) with the released linear patch expanding (no IBPE); load external weights with "
             "weights=PATH. 67.22M parameters and 20.58 GMACs (FlopCounterMode) as the release. Deviations: patch "
             "merging with proper permutes (the release scrambles channels and positions), standard pre-norm block; "
             "BRAUNet(..., release_compat=True) computes the released forward. No trained checkpoint is published "
             "(the README links data only); compat.load_released maps a state dict of the released definition. "
             "Loss 0.5 CE + 0.5 soft Dice.")
TINY_NOTE = ("Swin-Unet layout with BRA (n_win 4, top-k 2/4/8, full attention at the bottleneck), C = 16, depths "
             "1-1-2-1, decoder 2/1/1, and the released linear patch expanding (the same decision as braunet.full; "
             "until recipe revision 1 this victim used the reconstructed IBPE, val Dice_fg 0.885); loss 0.5 CE + 0.5 "
             "soft Dice. Measured: val Dice_fg 0.879 on 200 phantom validation images after `robustbench-med train "
             "braunet.tiny` (recipe revision 1; trained with the project's phantom loop: class-weighted CE + batch "
             "soft Dice, two threads).")


def _register() -> None:
    seg = C.SegmentationLossVictim
    card = C.full_card("braunet.full", "segmentation", "transperineal ultrasound (FH-PS-AoP)", (3, 256, 256),
                       C.FHPS_CLASSES, PAPER, *COSTS["braunet.full"], FULL_NOTE, loss_weights=(0.5, 0.5), routing="bra")
    C.register_zoo("braunet.full", card, partial(BRAUNet, BRAUNET_FULL, BRAUNET_DECODER, len(C.FHPS_CLASSES)),
                   (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), LAYERS, cls=seg)
    card = C.tiny_card("braunet.tiny", "segmentation", PAPER, *COSTS["braunet.tiny"], TINY_NOTE,
                       loss_weights=(0.5, 0.5), routing="bra")
    tiny = partial(BRAUNet, BRAUNET_TINY, BRAUNET_TINY_DECODER, len(C.SEG_CLASSES), "linear")
    # revision 1: linear patch expanding (as the release and braunet.full) instead of the reconstructed IBPE
    C.register_zoo("braunet.tiny", card, tiny, C.PHANTOM_MEAN, C.PHANTOM_STD, LAYERS,
                   recipe=C.tiny_recipe("mask", n_train=1000, epochs=4, lr=5e-3, revision=1), cls=seg)

_register()
