"""BRAU-Net++ (Lan et al., "BRAU-Net++: U-Shaped Hybrid CNN-Transformer Network for Medical Image Segmentation",
arXiv 2401.00722): a U-shaped BiFormer with channel–spatial attention skip connections (SCCSA).

Encoder: BiFormer stem and stages 1–3 (skips at H/4, H/8, H/16), then the Conv3×3 s2 downsampling to H/32, which is
the bottleneck. Decoder: PatchExpand, then per level (H/16, H/8, H/4): concat(x, skip) → SCCSA(2C) → Linear 2C→C →
BiFormer blocks (depths 8/2/2, top-k 8/4/2) → PatchExpand; LayerNorm → 4× final patch expand → Conv1×1 to classes.
Published (Synapse): 224², 9 classes, dims 96/192/384/768, encoder depths 2-2-8, top-k 2/4/8, n_win 7, head dim 32,
MLP ratio 3, LePE 5×5, drop path 0.2; a 1-channel input is repeated to 3 channels.

Deviations from the released code (documented in the card):

* the stage-4 encoder blocks are built but never called in the release (11.87M dead parameters); they are not built
  here, so the parameter count is the 50.76M of the forward path;
* the released block replaces its input by ``norm1(x)`` before the residual stream (the computed ``shortcut`` is
  unused) and applies ``norm1`` twice; the standard BiFormer pre-norm block with a raw-input residual is used;
* SCCSA's channel attention has no sigmoid in the release; GAM (Liu et al., 2021), which SCCSA follows, gates with
  a sigmoid, and so does this implementation (``channel_sigmoid=False`` restores the released behaviour);
* square inputs and a construction-time image size are not required.

``release_compat=True`` computes the released forward exactly: SCCSA multiplies by the raw channel attention (no
sigmoid) and every encoder and decoder block is the released one (``x = norm1(x)`` first, ``norm1`` applied again
before the attention, no raw-input residual; :class:`~.biformer.RoutedBlock` with ``input_norm``). The parameters
are the same in both modes, so the released Synapse checkpoint (README, Google Drive) loads into a compat model with
:func:`~.compat.load_released` (its never-called stage-4 encoder blocks are the only keys left out).
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import torch
from torch import nn

from robustbench_med.victims.zoo import common as C
from robustbench_med.victims.zoo.biformer import BiFormerBackbone, PyramidConfig, init_transformer_weights, make_stage
from robustbench_med.victims.zoo.expand import FinalPatchExpand, PatchExpand

PAPER = (
    "Lan et al., BRAU-Net++: U-Shaped Hybrid CNN-Transformer Network for Medical Image Segmentation, arXiv 2401.00722"
)


class SCCSA(nn.Module):
    """Skip-connection channel–spatial attention (GAM-like, Lan et al.): per-pixel channel MLP gate, then a 7×7 spatial
    gate with reduction ``rate``."""

    def __init__(self, dim: int, rate: int = 4, channel_sigmoid: bool = True) -> None:
        super().__init__()
        self.channel_sigmoid = channel_sigmoid
        self.channel_attention = nn.Sequential(
            nn.Linear(dim, dim // rate), nn.ReLU(inplace=True), nn.Linear(dim // rate, dim)
        )
        self.spatial_attention = nn.Sequential(
            nn.Conv2d(dim, dim // rate, 7, padding=3),
            nn.BatchNorm2d(dim // rate),
            nn.ReLU(inplace=True),
            nn.Conv2d(dim // rate, dim, 7, padding=3),
            nn.BatchNorm2d(dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.channel_attention(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = x * (gate.sigmoid() if self.channel_sigmoid else gate)
        return x * self.spatial_attention(x).sigmoid()


class DecoderLevel(nn.Module):
    """One decoder level: concat with the skip → (SCCSA) → Linear 2C→C → routed blocks → (PatchExpand)."""

    def __init__(
        self, blocks: nn.Sequential, dim: int, upsample: nn.Module | None, attention: nn.Module | None
    ) -> None:
        super().__init__()
        self.sccsa = attention if attention is not None else nn.Identity()
        self.concat_linear = nn.Linear(2 * dim, dim)
        self.blocks = blocks
        self.upsample = upsample if upsample is not None else nn.Identity()

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.sccsa(torch.cat([x, skip], 1))
        x = self.concat_linear(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.upsample(self.blocks(x))


class BRAUNetPP(nn.Module):
    """BRAU-Net++ with ``encode`` / ``decode`` halves (see the module docstring for the deviations).

    Args:
        cfg: encoder pyramid (the 4th stage must have depth 0: its downsampling conv is the bottleneck).
        decoder_depths: blocks per decoder level from H/16 to H/4.
        num_classes: output classes.
        channel_sigmoid: sigmoid on SCCSA's channel gate (the default; the release has none).
        release_compat: the released forward (no channel sigmoid, released block norms and residuals).
    """

    def __init__(
        self,
        cfg: PyramidConfig,
        decoder_depths: tuple[int, int, int],
        num_classes: int,
        channel_sigmoid: bool = True,
        release_compat: bool = False,
    ) -> None:
        super().__init__()
        self.release_compat = release_compat
        if release_compat:
            cfg, channel_sigmoid = replace(cfg, block_input_norm=True), False
        self.in_chans = cfg.in_chans
        self.backbone = BiFormerBackbone(cfg)
        dims = cfg.dims
        self.expand = PatchExpand(dims[3])
        levels = []
        for depth, level in zip(decoder_depths, (2, 1, 0)):
            rates = [cfg.drop_path * j / max(depth - 1, 1) for j in range(depth)]
            blocks = make_stage(cfg, dims[level], depth, cfg.topks[level], drop_paths=rates)
            up = PatchExpand(dims[level]) if level > 0 else None
            levels.append(
                DecoderLevel(blocks, dims[level], up, SCCSA(2 * dims[level], channel_sigmoid=channel_sigmoid))
            )
        self.levels = nn.ModuleList(levels)
        self.norm_up = nn.LayerNorm(dims[0])
        self.final_expand = FinalPatchExpand(dims[0])
        self.output = C.PointwiseConv(dims[0], num_classes, bias=False)
        self.apply(init_transformer_weights)

    def encode(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """Bottleneck ``'z'`` (H/32) and skips ``'s1'``–``'s3'`` (stage outputs at H/4, H/8, H/16)."""
        if z.shape[1] == 1 and self.in_chans == 3:
            z = z.repeat(1, 3, 1, 1)
        feats = self.backbone.forward_stages(z)
        return {"z": feats[3], "s1": feats[0], "s2": feats[1], "s3": feats[2]}

    def decode(self, latent: dict[str, torch.Tensor]) -> torch.Tensor:
        x = self.expand(latent["z"])
        for level, skip in zip(self.levels, (latent["s3"], latent["s2"], latent["s1"])):
            x = level(x, skip)
        x = self.norm_up(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.output(self.final_expand(x))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(z))


BRAUNETPP_FULL = PyramidConfig(dims=(96, 192, 384, 768), depths=(2, 2, 8, 0), topks=(2, 4, 8, None), drop_path=0.2)
BRAUNETPP_DECODER = (8, 2, 2)
# Tiny (64² phantom): stage maps 16/8/4, n_win 4, top-k 2/4/8; stage-4 blocks dropped as in the forward path.
BRAUNETPP_TINY = PyramidConfig(dims=(16, 32, 64, 128), depths=(1, 1, 2, 0), topks=(2, 4, 8, None), n_win=4, head_dim=16,
                               full_heads=None, in_chans=1)
BRAUNETPP_TINY_DECODER = (2, 1, 1)
LAYERS = ("backbone.stages.0", "backbone.stages.1", "backbone.stages.2", "backbone.downsample_layers.3", "levels.0",
          "levels.1", "levels.2")
COSTS = {"braunetpp.full": (50_763_648, 35_156_228_352), "braunetpp.tiny": (902_144, 59_506_688)}
FULL_NOTE = ("Published Synapse configuration (224², 9 classes, the 1-channel CT slice repeated to 3 channels, inputs "
             "in [0, 1]); load external weights with weights=PATH. 50.76M parameters = the released forward path (the "
             "release builds 62.63M, of which the 11.87M stage-4 encoder blocks are never called and are not built "
             "here); 17.58 GMACs (FlopCounterMode). Deviations: standard pre-norm block (no double LayerNorm), sigmoid "
             "on SCCSA's channel gate; see the module docstring. BRAUNetPP(..., release_compat=True) computes the released "
             "forward; compat.released_victim('braunetpp.full', PATH) loads the released Synapse checkpoint (README, "
             "Google Drive) into it. "
             "Loss 0.4 CE + 0.6 soft Dice (the Synapse recipe).")
TINY_NOTE = ("BRA encoder (n_win 4, top-k 2/4/8, dims 16/32/64/128, depths 1-1-2, bottleneck = the downsampling conv), "
             "SCCSA skips (r = 4) and BRA decoder (depths 2/1/1) with patch expanding kept; loss 0.4 CE + 0.6 soft "
             "Dice. Measured: val Dice_fg 0.926 (body 0.99, liver 0.95, kidneys 0.95, spine 0.98, lesion 0.72) on 200 "
             "phantom validation images after `robustbench-med train braunetpp.tiny` (trained with the project's phantom loop: class-weighted CE + batch soft Dice; two threads: 44 s).")


def _register() -> None:
    seg = C.SegmentationLossVictim
    card = C.full_card("braunetpp.full", "segmentation", "CT (Synapse multi-organ)", (1, 224, 224), C.SYNAPSE_CLASSES,
                       PAPER, *COSTS["braunetpp.full"], FULL_NOTE, loss_weights=(0.4, 0.6), routing="bra")
    full = partial(BRAUNetPP, BRAUNETPP_FULL, BRAUNETPP_DECODER, len(C.SYNAPSE_CLASSES))
    C.register_zoo("braunetpp.full", card, full, (0.0,), (1.0,), LAYERS, cls=seg)
    card = C.tiny_card("braunetpp.tiny", "segmentation", PAPER, *COSTS["braunetpp.tiny"], TINY_NOTE,
                       loss_weights=(0.4, 0.6), routing="bra")
    tiny = partial(BRAUNetPP, BRAUNETPP_TINY, BRAUNETPP_TINY_DECODER, len(C.SEG_CLASSES))
    C.register_zoo("braunetpp.tiny", card, tiny, C.PHANTOM_MEAN, C.PHANTOM_STD, LAYERS,
                   recipe=C.tiny_recipe("mask", n_train=1000, epochs=8, lr=5e-3), cls=seg)

_register()
