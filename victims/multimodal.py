"""Segmentors of the missing-modality study, on ``phantom.multiseq`` (four MRI-like sequences: T1, T1ce, T2, FLAIR;
see :mod:`robustbench_med.data.multiseq`). A missing sequence is an all-zero channel.

- ``unet.multiseq``: the plain early-fusion baseline, a 4-channel U-Net (Ronneberger et al., MICCAI 2015) trained on
  complete inputs only: the model a user would train without thinking of missing sequences.
- ``unet.multiseq_dropout``: the same U-Net and recipe trained with random modality dropout (each training image gets
  one of the 15 non-empty subsets, uniformly; the training protocol of RFNet, Ding et al., ICCV 2021, and mmFormer,
  Zhang et al., MICCAI 2022): separates what the fusion architecture buys from what the training does.
- ``dmaf.multiseq``: per-sequence encoders fused by a **Dynamic Modality-Aware Fusion** module at every scale, after
  DMAF-Net (Lan, Li, Xia & Zhang, "DMAF-Net: An Effective Modality Rebalancing Framework for Incomplete Multi-Modal
  Medical Image Segmentation", arXiv 2506.11691), trained with the same modality dropout.

What is taken from the DMAF-Net paper (its abstract and method overview; the released code, ``violet-42/DMAF-Net``,
was not read): the DMAF module "combines transformer attention with adaptive masking" to suppress missing-modality
interference and "weights modality contributions dynamically through attention maps". Implemented here: at each scale
the modalities are tokens at each pixel; scaled dot-product attention across them (1×1-convolution projections
shared across modalities, a learned embedding per modality) with the missing modalities masked out as keys; each
modality's weight is the softmax, over the *present* modalities, of the attention it receives from the present ones;
the fused feature is the weighted sum of the attended modality features. A missing modality therefore contributes
exactly nothing: the output does not depend on its encoder at all (tested). **Not implemented** (so the name is ``dmaf``, the module, not
``dmafnet``): the Relation Distillation and Prototype Distillation framework and the Dynamic Training Monitoring
strategy (loss reweighting and gradient scaling under imbalanced missing rates); the paper's 3-D BraTS / MyoPS setting
becomes 2-D phantom slices with tiny widths so training takes CPU minutes.

All three normalise by scaling only (mean 0, std 0.25 per channel), so a dropped sequence stays exactly zero inside
the victim too.
"""
from __future__ import annotations

import itertools

import torch
from torch import nn

from robustbench_med.data.multiseq import SEQUENCES
from robustbench_med.registry import register_victim
from robustbench_med.training import TrainRecipe
from robustbench_med.victim import ModelVictim, VictimCard, count_parameters
from robustbench_med.victims.basic import SEG_CLASSES, UNet, conv_block

MULTISEQ_INPUT = (len(SEQUENCES), 64, 64)
MULTISEQ_MEAN, MULTISEQ_STD = [0.0] * len(SEQUENCES), [0.25] * len(SEQUENCES)
RECIPE = TrainRecipe(dataset="phantom.multiseq", target_field="mask", epochs=8, lr=3e-3, n_train=1000, batch_size=16)
SUBSETS = tuple(s for k in range(1, len(SEQUENCES) + 1) for s in itertools.combinations(range(len(SEQUENCES)), k))


def available(x: torch.Tensor) -> torch.Tensor:
    """[B, M] bool: which channels hold an acquired sequence (a missing one is all zero). A sample with none left is
    treated as having all (never happens under ``modality.dropout``, which keeps at least one)."""
    avail = x.detach().flatten(2).abs().amax(-1) > 0
    return avail | ~avail.any(1, keepdim=True)


def modality_dropout(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Training augmentation: each image keeps one of the 15 non-empty sequence subsets, drawn uniformly from ``gen``
    (RFNet / mmFormer's protocol); the other channels are zeroed. Targets pass through."""
    pick = torch.randint(len(SUBSETS), (len(x),), generator=gen).tolist()
    keep = torch.zeros(len(x), x.shape[1], dtype=x.dtype, device=x.device)
    for i, s in enumerate(pick):
        keep[i, list(SUBSETS[s])] = 1
    return x * keep[:, :, None, None], y


class DMAFusion(nn.Module):
    """Dynamic modality-aware fusion of M modality feature maps at one scale (see the module docstring).

    Input ``feats`` [B, M, C, H, W] and ``avail`` [B, M]; returns the fused [B, C, H, W] and keeps the last modality
    weights [B, M, H, W] in :attr:`weights` (what the fusion attended to, for inspection)."""

    def __init__(self, channels: int, modalities: int):
        super().__init__()
        self.q, self.k, self.v = (nn.Conv2d(channels, channels, 1) for _ in range(3))
        self.embed = nn.Parameter(torch.zeros(modalities, channels, 1, 1))
        self.out = nn.Conv2d(channels, channels, 1)
        self.weights: torch.Tensor | None = None

    def forward(self, feats: torch.Tensor, avail: torch.Tensor) -> torch.Tensor:
        b, m, c, h, w = feats.shape
        tokens = (feats + self.embed).flatten(0, 1)  # [B·M, C, H, W]
        q, k, v = (p(tokens).view(b, m, c, h, w) for p in (self.q, self.k, self.v))
        logits = torch.einsum("bichw,bjchw->bijhw", q, k) / c ** 0.5  # query i attends to key j, per pixel
        missing = ~avail[:, None, :, None, None]
        attn = logits.masked_fill(missing, float("-inf")).softmax(2)  # missing modalities are masked as keys
        attended = torch.einsum("bijhw,bjchw->bichw", attn, v)
        present = avail.to(attn.dtype)[:, :, None, None, None]
        received = (attn * present).sum(1) / present.sum(1)  # attention each key receives from the present queries
        received = received.masked_fill(~avail[:, :, None, None], float("-inf"))
        weights = received.softmax(1)  # over the present modalities only
        self.weights = weights.detach()
        fused = (weights[:, :, None] * (feats + attended)).sum(1)
        return self.out(fused)


class DMAFUNet(nn.Module):
    """Per-modality U-Net encoders, a :class:`DMAFusion` at each of the four scales, one shared U-Net decoder."""

    def __init__(self, modalities: int = len(SEQUENCES), out_ch: int = len(SEG_CLASSES), width: int = 8):
        super().__init__()
        w = width
        self.modalities = modalities
        self.encoders = nn.ModuleList(nn.ModuleDict({
            "enc1": conv_block(1, w), "enc2": conv_block(w, 2 * w), "enc3": conv_block(2 * w, 4 * w),
            "bottleneck": conv_block(4 * w, 8 * w)}) for _ in range(modalities))
        self.pool = nn.MaxPool2d(2)
        self.fuse = nn.ModuleDict({k: DMAFusion(c, modalities) for k, c in
                                   (("s1", w), ("s2", 2 * w), ("s3", 4 * w), ("z", 8 * w))})
        self.up3, self.dec3 = nn.ConvTranspose2d(8 * w, 4 * w, 2, stride=2), conv_block(8 * w, 4 * w)
        self.up2, self.dec2 = nn.ConvTranspose2d(4 * w, 2 * w, 2, stride=2), conv_block(4 * w, 2 * w)
        self.up1, self.dec1 = nn.ConvTranspose2d(2 * w, w, 2, stride=2), conv_block(2 * w, w)
        self.head = nn.Conv2d(w, out_ch, 1)

    def _encode_one(self, enc: nn.ModuleDict, z: torch.Tensor) -> dict[str, torch.Tensor]:
        s1 = enc["enc1"](z)
        s2 = enc["enc2"](self.pool(s1))
        s3 = enc["enc3"](self.pool(s2))
        return {"s1": s1, "s2": s2, "s3": s3, "z": enc["bottleneck"](self.pool(s3))}

    def encode(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """Fused features of every scale (``'z'`` the bottleneck latent, ``'s1'``–``'s3'`` the skips)."""
        avail = available(z)
        per = [self._encode_one(enc, z[:, i : i + 1]) for i, enc in enumerate(self.encoders)]
        return {k: fuse(torch.stack([p[k] for p in per], 1), avail) for k, fuse in self.fuse.items()}

    decode = UNet.decode  # the U-Net decoder on the fused features (same module names as UNet's)
    forward = UNet.forward


def _card(name: str, paper: str, notes: str, net: nn.Module, baseline: str | None = None) -> VictimCard:
    extra = {"modalities": SEQUENCES, **({"baseline": baseline} if baseline else {})}
    return VictimCard(name=name, task="segmentation", modality="MRI-like, 4 sequences (phantom)", input_size=MULTISEQ_INPUT,
                      classes=SEG_CLASSES, paper=paper, notes=f"{notes} {count_parameters(net):,} parameters.", extra=extra)


UNET_PAPER = "Ronneberger et al., MICCAI 2015 (U-Net), early fusion of the sequences"
UNET_LAYERS = ("enc1", "enc2", "enc3", "bottleneck")


def _unet() -> UNet:
    return UNet(in_ch=len(SEQUENCES), out_ch=len(SEG_CLASSES), width=12)


UNET_CARD = _card("unet.multiseq", UNET_PAPER, "Trained on complete inputs only.", _unet())
UNET_DROPOUT_CARD = _card("unet.multiseq_dropout", UNET_PAPER + "; modality-dropout training (RFNet, ICCV 2021)",
                          "unet.multiseq trained with random modality dropout (one of 15 subsets per image).", _unet(),
                          baseline="unet.multiseq")
DMAF_CARD = _card("dmaf.multiseq", "Lan et al., arXiv 2506.11691 (DMAF-Net): the DMAF fusion module only",
                  "Per-sequence encoders, dynamic modality-aware fusion at 4 scales, modality-dropout training; no "
                  "relation / prototype distillation, no dynamic training monitoring.", DMAFUNet(),
                  baseline="unet.multiseq_dropout")  # the same training, so Δ isolates the fusion architecture


@register_victim("unet.multiseq", card=UNET_CARD, recipe=RECIPE)
def unet_multiseq() -> ModelVictim:
    """A 4-channel U-Net (early fusion) trained on complete multi-sequence inputs: the plain baseline."""
    return ModelVictim(_unet(), UNET_CARD, MULTISEQ_MEAN, MULTISEQ_STD, UNET_LAYERS)


@register_victim("unet.multiseq_dropout", card=UNET_DROPOUT_CARD, recipe=RECIPE, augment=modality_dropout)
def unet_multiseq_dropout() -> ModelVictim:
    """``unet.multiseq``'s U-Net trained with random modality dropout."""
    return ModelVictim(_unet(), UNET_DROPOUT_CARD, MULTISEQ_MEAN, MULTISEQ_STD, UNET_LAYERS)


@register_victim("dmaf.multiseq", card=DMAF_CARD, recipe=RECIPE, augment=modality_dropout)
def dmaf_multiseq() -> ModelVictim:
    """Per-sequence encoders with DMAF-style masked attention fusion (arXiv 2506.11691), modality-dropout training."""
    return ModelVictim(DMAFUNet(), DMAF_CARD, MULTISEQ_MEAN, MULTISEQ_STD, tuple(f"fuse.{k}" for k in ("s1", "s2", "s3", "z")))
