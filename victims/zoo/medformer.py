"""MedFormer (Xia, Li, Lan, "MedFormer: Hierarchical Medical Vision Transformer with Content-Aware Dual Sparse
Selection Attention", arXiv 2507.02488): BiFormer's pyramid with Dual Sparse Selection Attention (DSSA).

DSSA is BRA followed by a pixel-level top-k that keeps ``⌊k₁·T/8⌋`` of the ``k₁·T`` gathered tokens per query
(:class:`~.routing.RoutingAttention` with ``pixel_div=8``); stage 4 uses full attention with LePE. Classification:
T/S/B share depths 2-2-8-2, n_win 7, top-k 1/4/16/full, head dim 32, MLP ratio 3, dims 32…256 / 64…512 / 96…768.
Segmentation: the released UPerNet head (pool scales 1/2/3/6, 128 channels, no BatchNorm in the head) on
MedFormer-B with a LayerNorm2d on every stage output; logits are bilinearly resized to the input.

Deviations: the tiny configurations clamp ``k₂ ≥ 4`` (``pixel_k_min``) because at 64² inputs ``k₂`` would reach 1
and zero the Q/K gradients; region padding for sizes not divisible by ``n_win`` follows the legacy BRA (pad after
the LayerNorm) rather than the nchw release (pad after the projection), identical at the published sizes.

DSSA in the tiny configurations still selects: at the 64² phantom size (stage maps 16/8/4, n_win 4, top-k 2/4/8)
each query gathers k₁·T = 32, 16 and 8 tokens in stages 1–3, of which it keeps k₂ = 4, 4 and 4 (the published
⌊k₁·T/8⌋ = 4, 2, 1 with the clamp active in stages 2 and 3); ``tests/test_zoo_compat.py`` checks k₂ < k₁·T for every
DSSA layer of ``medformer.tiny``, ``medformer_seg.tiny`` and ``dssaunet.tiny``.

Released checkpoints: the classification models are ``models/medformer.py`` of the release; the nchw DSSA holds its
projections as 1×1 convolutions, which :func:`~.compat.load_released` reshapes. The README publishes no checkpoint.
"""
from __future__ import annotations

from dataclasses import replace
from functools import partial

import torch
from torch import nn

from robustbench_med.victims.zoo import common as C
from robustbench_med.victims.zoo.biformer import (
    BIFORMER_TINY,
    BiFormer,
    BiFormerBackbone,
    PyramidConfig,
    init_transformer_weights,
)
from robustbench_med.victims.zoo.uper import UPerHead

PAPER = ("Xia, Li, Lan, MedFormer: Hierarchical Medical Vision Transformer with Content-Aware Dual Sparse Selection "
         "Attention, arXiv 2507.02488")

MEDFORMER_T = PyramidConfig(dims=(32, 64, 128, 256), depths=(2, 2, 8, 2), topks=(1, 4, 16, None), pixel_div=8)
MEDFORMER_S = replace(MEDFORMER_T, dims=(64, 128, 256, 512))
MEDFORMER_B = replace(MEDFORMER_T, dims=(96, 192, 384, 768))
MEDFORMER_TINY = replace(BIFORMER_TINY, pixel_div=8, pixel_k_min=4)


class MedFormerSeg(nn.Module):
    """MedFormer encoder + LayerNorm2d per stage + UPerNet head, with ``encode`` / ``decode`` halves (Xia et al.).

    A 1-channel input is repeated to the encoder's channel count when it expects 3 (Synapse CT slices).
    """

    def __init__(self, cfg: PyramidConfig, num_classes: int, channels: int = 128) -> None:
        super().__init__()
        self.in_chans = cfg.in_chans
        self.backbone = BiFormerBackbone(cfg)
        self.stage_norms = nn.ModuleList(C.LayerNorm2d(d) for d in cfg.dims)
        self.head = UPerHead(cfg.dims, channels, num_classes)
        self.apply(init_transformer_weights)

    def encode(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """Normalised stage features: ``'z'`` (deepest, H/32) and skips ``'s1'``–``'s3'`` (H/4 … H/16)."""
        if z.shape[1] == 1 and self.in_chans == 3:
            z = z.repeat(1, 3, 1, 1)
        feats = [n(f) for n, f in zip(self.stage_norms, self.backbone.forward_stages(z))]
        return {"z": feats[-1], **{f"s{i + 1}": f for i, f in enumerate(feats[:-1])}}

    def decode(self, latent: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits at the input size (4× the finest skip)."""
        feats = [latent["s1"], latent["s2"], latent["s3"], latent["z"]]
        size = (feats[0].shape[-2] * 4, feats[0].shape[-1] * 4)
        return self.head(feats, size)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(z))


STAGE_LAYERS = tuple(f"backbone.stages.{i}" for i in range(4))
COSTS = {
    "medformer.t": (3_201_159, 1_144_436_608),
    "medformer.s": (12_633_351, 4_318_392_064),
    "medformer.b": (28_296_583, 9_521_866_368),
    "medformer.tiny": (372_018, 10_177_024),
    "medformer_seg.full": (31_281_225, 14_731_525_248),
    "medformer_seg.tiny": (530_774, 36_800_512),
}
FULL_NOTE = ("Published classification configuration at 224² with a 7-class ISIC 2018 head (the repository's ISIC2018 "
             "task; ImageNet normalisation); load external weights with weights=PATH. With a 1000-class head the "
             "parameter counts are the reference T 3.46M / S 13.14M / B 29.06M and the FLOPs T 0.57 / S 2.16 / B 4.76 "
             "GMACs (FlopCounterMode, conv + matmul). Deviation: region padding as in legacy BRA (no effect at 224²). "
             "No trained checkpoint is published; compat.load_released maps a state dict of the released "
             "models/medformer.py definition.")
SEG_NOTE = ("Released segmentation configuration: MedFormer-B encoder + LayerNorm2d per stage + UPerNet head (pool "
            "scales 1/2/3/6, 128 channels, no BatchNorm in the head) on Synapse (224², 9 classes, the 1-channel CT "
            "slice repeated to 3 channels, inputs in [0, 1]); load external weights with weights=PATH. No reference "
            "count exists; parameters and FLOPs measured here. No trained checkpoint is published (the release's "
            "mmseg-based model is not key-mapped). Loss 0.4 CE + 0.6 soft Dice (the Synapse recipe).")
TINY_NOTE = ("DSSA kept (BRA routing with n_win 4 and top-k 2/4/8, then pixel top-k ⌊k1·T/8⌋ clamped to ≥ 4, i.e. "
             "4 of 32/16/8 gathered tokens in stages 1-3, so the selection is active everywhere; full "
             "attention + LePE in stage 4); dims 16/32/64/128, depths 1-1-2-1, head dim 16. Lesion present/absent, "
             "2-logit head. Measured: val accuracy 0.885 (label prevalence 0.53) on 200 phantom validation images "
             "after `robustbench-med train medformer.tiny` (one thread: 22 s of training).")
SEG_TINY_NOTE = ("Tiny MedFormer (DSSA) encoder + LayerNorm2d per stage + UPerNet head with 32 channels; loss 0.4 CE + "
                 "0.6 soft Dice. Measured: val Dice_fg 0.756 (body 0.97, liver 0.91, kidneys 0.87, spine 0.89, lesion "
                 "0.16: the weakest lesion segmentor at tiny size) on 200 phantom validation images after "
                 "`robustbench-med train medformer_seg.tiny` (trained with the project's phantom loop: class-weighted CE + batch soft Dice; two threads: 30 s).")


def _register() -> None:
    for tag, cfg in (("t", MEDFORMER_T), ("s", MEDFORMER_S), ("b", MEDFORMER_B)):
        name = f"medformer.{tag}"
        card = C.full_card(name, "classification", "dermoscopy (ISIC 2018)", (3, 224, 224), C.ISIC2018_CLASSES, PAPER,
                           *COSTS[name], FULL_NOTE, routing="dssa")
        C.register_zoo(name, card, partial(BiFormer, cfg, len(C.ISIC2018_CLASSES)), C.IMAGENET_MEAN, C.IMAGENET_STD,
                       STAGE_LAYERS)
    card = C.tiny_card("medformer.tiny", "binary", PAPER, *COSTS["medformer.tiny"], TINY_NOTE, routing="dssa")
    C.register_zoo("medformer.tiny", card, partial(BiFormer, MEDFORMER_TINY, 2), C.PHANTOM_MEAN, C.PHANTOM_STD,
                   STAGE_LAYERS, recipe=C.tiny_recipe("label", n_train=2000, epochs=4, lr=3e-3))
    seg = C.SegmentationLossVictim
    card = C.full_card("medformer_seg.full", "segmentation", "CT (Synapse multi-organ)", (1, 224, 224),
                       C.SYNAPSE_CLASSES, PAPER, *COSTS["medformer_seg.full"], SEG_NOTE, loss_weights=(0.4, 0.6),
                       routing="dssa")
    C.register_zoo("medformer_seg.full", card, partial(MedFormerSeg, MEDFORMER_B, len(C.SYNAPSE_CLASSES)), (0.0,),
                   (1.0,), STAGE_LAYERS, cls=seg)
    card = C.tiny_card("medformer_seg.tiny", "segmentation", PAPER, *COSTS["medformer_seg.tiny"], SEG_TINY_NOTE,
                       loss_weights=(0.4, 0.6), routing="dssa")
    C.register_zoo("medformer_seg.tiny", card, partial(MedFormerSeg, MEDFORMER_TINY, len(C.SEG_CLASSES), 32),
                   C.PHANTOM_MEAN, C.PHANTOM_STD, STAGE_LAYERS,
                   recipe=C.tiny_recipe("mask", n_train=1000, epochs=8, lr=5e-3), cls=seg)

_register()
