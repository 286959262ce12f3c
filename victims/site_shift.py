"""A training-time defence against site shift: ``unet.styleaug``, ``unet.phantom`` trained with style augmentation.

Every ``phantom.ct`` victim is a site-A model (:mod:`robustbench_med.data.sites`); the question of domain
generalisation is how it does on sites B and C, which it never saw. DGSSA (domain generalisation for retinal vessel
segmentation through structural and style augmentation, evaluated across DRIVE, CHASEDB, HRF and STARE) trains on
one site with (i) *structural* augmentation — synthetic vessel-like trees rendered into pseudo images — and (ii)
*style* augmentation — PixMix photometric mixing (Hendrycks et al., "PixMix: Dreamlike Pictures Comprehensively
Improve Safety Measures", CVPR 2022) plus uncertainty perturbations of feature statistics (DSU: Li et al.,
"Uncertainty Modeling for Out-of-Distribution Generalization", ICLR 2022).

``unet.styleaug`` applies the **style half only**, at the input (:func:`style_augment`, each training image on its own
draws): a random intensity response (log-gamma U[−0.4, 0.4], gain U[0.75, 1.25], offset U[−0.1, 0.1]); with
p = 0.5 a resolution loss (area down-sampling by U[1, 2], bilinear back up); PixMix-style mixing, k ~ U{0 … 3} rounds
each mixing the image with a mixing picture — a smooth random pattern (uniform noise at 4–16 px, bilinear up) or a
copy of the image under another random intensity response — additively ``(1 − w)·x + w·p`` or multiplicatively
``x^(1−w)·p^w``, w ~ Beta(1, 3); with p = 0.5 a DSU-style perturbation of the image statistics (mean and std of each
image shifted by N(0, 1) × their standard deviation across the batch); Gaussian noise of σ ~ U[0, 0.08]; clipping to
[0, 1]. **Not applied**: DGSSA's structural augmentation (synthetic vessel trees are specific to vessel
segmentation; this victim segments the CT-like phantom) and DSU at feature level (DSU perturbs intermediate feature
statistics; here only the input's). So the name says what it is: style augmentation, not DGSSA. Architecture and
recipe (data, epochs, optimiser, seed) are ``unet.phantom``'s, so the pair differs only by the augmentation.

On the vessel task DGSSA was designed for (``phantom.vessels``, :mod:`robustbench_med.data.vessels`) there are three
segmentors with one architecture and recipe: ``unet.vessels`` (plain), ``unet.vessels_styleaug`` (the style half) and
``unet.vessels_structaug`` (both halves: :func:`structure_augment` first replaces each training pair, with p = 0.5,
by a synthetic vessel tree rendered into a pseudo image with its mask — :func:`robustbench_med.data.vessels.pseudo_pair`
— then the style augmentation runs on the batch). Input-level DSU only, as above.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from robustbench_med.data.vessels import VESSEL_CLASSES, pseudo_pair

from robustbench_med.registry import register_victim
from robustbench_med.training import TrainRecipe
from robustbench_med.victim import ModelVictim, VictimCard
from robustbench_med.victims.basic import PHANTOM_INPUT, PHANTOM_MEAN, PHANTOM_STD, SEG_CLASSES, UNet

RECIPE = TrainRecipe(target_field="mask", epochs=6, lr=3e-3, n_train=600, batch_size=16)  # unet.phantom's


def _u(gen: torch.Generator, n: int, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=gen)


def _response(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A random intensity response per image: ``offset + gain · x^gamma``."""
    n = len(x)
    gamma, gain, offset = (v.view(n, 1, 1, 1) for v in (_u(gen, n, -0.4, 0.4).exp(), _u(gen, n, 0.75, 1.25), _u(gen, n, -0.1, 0.1)))
    return (offset + gain * x.clamp_min(0) ** gamma).clamp(0, 1)


def _pattern(like: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A smooth random picture (uniform noise at 4–16 px, bilinear up to the image size)."""
    res = int(torch.randint(4, 17, (1,), generator=gen))
    low = torch.rand(1, like.shape[0], res, res, generator=gen)
    return F.interpolate(low, size=like.shape[-2:], mode="bilinear", align_corners=False)[0]


def _pixmix(img: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """PixMix-style mixing of one image [C, H, W] with k ~ U{0..3} mixing pictures."""
    out = img
    for _ in range(int(torch.randint(0, 4, (1,), generator=gen))):
        pic = _pattern(img, gen) if torch.rand(1, generator=gen) < 0.5 else _response(img[None], gen)[0]
        w = float(1 - torch.rand(1, generator=gen) ** (1 / 3))  # Beta(1, 3) by inversion of its CDF 1 − (1 − w)^3
        if torch.rand(1, generator=gen) < 0.5:
            out = (1 - w) * out + w * pic
        else:
            out = out.clamp_min(1e-4) ** (1 - w) * pic.clamp_min(1e-4) ** w
    return out


def _downsample(img: torch.Tensor, factor: float) -> torch.Tensor:
    size = img.shape[-1]
    low = F.interpolate(img[None], size=max(2, round(size / factor)), mode="area")
    return F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)[0]


def _dsu(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """DSU-style statistic perturbation at the input: each image's mean / std moved by N(0, 1) × their batch std."""
    mu, sigma = x.mean((1, 2, 3), keepdim=True), x.std((1, 2, 3), keepdim=True).clamp_min(1e-4)
    s_mu, s_sigma = mu.std(0, keepdim=True), sigma.std(0, keepdim=True)
    eps_mu, eps_sigma = (torch.randn(mu.shape, generator=gen) for _ in range(2))
    return (x - mu) / sigma * (sigma + eps_sigma * s_sigma).clamp_min(1e-3) + mu + eps_mu * s_mu


def style_augment(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The style augmentation of ``unet.styleaug`` (module docstring); all draws from ``gen`` (CPU), images on
    ``x``'s device; targets pass through (style changes no label)."""
    device, x = x.device, x.detach().cpu()
    out = _response(x, gen)
    out = torch.stack([_downsample(img, float(_u(gen, 1, 1.0, 2.0))) if torch.rand(1, generator=gen) < 0.5 else img
                       for img in out])
    out = torch.stack([_pixmix(img, gen) for img in out])
    if len(out) > 1 and torch.rand(1, generator=gen) < 0.5:
        out = _dsu(out, gen)
    out = out + torch.randn(out.shape, generator=gen) * _u(gen, len(out), 0.0, 0.08).view(-1, 1, 1, 1)
    return out.clamp(0, 1).to(device), y


CARD = VictimCard(
    name="unet.styleaug", task="segmentation", modality="CT (phantom), site A", input_size=PHANTOM_INPUT,
    classes=SEG_CLASSES, paper="U-Net (MICCAI 2015) + DGSSA-style style augmentation (PixMix, CVPR 2022; DSU, ICLR 2022)",
    notes="unet.phantom's architecture and recipe trained with style augmentation (intensity response, resolution loss, "
          "PixMix-style mixing, input-level DSU, noise); no structural augmentation.",
    extra={"baseline": "unet.phantom"})


@register_victim("unet.styleaug", card=CARD, recipe=RECIPE, augment=style_augment)
def unet_styleaug() -> ModelVictim:
    """``unet.phantom`` trained with DGSSA-style style augmentation: the training-time defence against site shift."""
    return ModelVictim(UNet(out_ch=len(SEG_CLASSES), width=12), CARD, PHANTOM_MEAN, PHANTOM_STD, ("enc1", "enc2", "enc3", "bottleneck"))


def structure_augment(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """DGSSA-style structural augmentation: each training pair is replaced, with p = 0.5, by a synthetic vessel tree in
    a pseudo image and its mask (:func:`robustbench_med.data.vessels.pseudo_pair`); draws from ``gen``."""
    x, y = x.clone(), y.clone()
    for i in range(len(x)):
        if torch.rand(1, generator=gen) < 0.5:
            rng = np.random.default_rng(int(torch.randint(2**62, (1,), generator=gen)))
            img, mask = pseudo_pair(rng, x.shape[-1])
            x[i] = torch.from_numpy(img).to(x)[None].expand_as(x[i])
            y[i] = torch.from_numpy(mask).to(y)
    return x, y


def structure_style_augment(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Structural then style augmentation (both halves of DGSSA's training-time augmentation, as re-implemented here)."""
    return style_augment(*structure_augment(x, y, gen), gen)


VESSEL_RECIPE = TrainRecipe(dataset="phantom.vessels", target_field="mask", epochs=8, lr=3e-3, n_train=600, batch_size=16)
VESSEL_INPUT, VESSEL_MEAN, VESSEL_STD = (1, 64, 64), [0.4], [0.2]


def _vessel_card(name: str, paper: str, notes: str, **extra) -> VictimCard:
    return VictimCard(name=name, task="segmentation", modality="fundus-like (vessel phantom), site A", input_size=VESSEL_INPUT,
                      classes=VESSEL_CLASSES, paper=paper, notes=notes, extra=extra)


VESSEL_CARDS = {
    "unet.vessels": _vessel_card("unet.vessels", "U-Net (Ronneberger et al., MICCAI 2015)", "Plain training on site A."),
    "unet.vessels_styleaug": _vessel_card(
        "unet.vessels_styleaug", "U-Net + DGSSA-style style augmentation (PixMix, CVPR 2022; DSU, ICLR 2022)",
        "unet.vessels' recipe with style augmentation only.", baseline="unet.vessels"),
    "unet.vessels_structaug": _vessel_card(
        "unet.vessels_structaug", "U-Net + DGSSA-style structural and style augmentation",
        "unet.vessels' recipe with synthetic vessel trees in pseudo images (p = 0.5) then style augmentation; DSU at "
        "the input only.", baseline="unet.vessels"),
}


def _vessel_unet(name: str) -> ModelVictim:
    return ModelVictim(UNet(out_ch=len(VESSEL_CLASSES), width=12), VESSEL_CARDS[name], VESSEL_MEAN, VESSEL_STD,
                       ("enc1", "enc2", "enc3", "bottleneck"))


@register_victim("unet.vessels", card=VESSEL_CARDS["unet.vessels"], recipe=VESSEL_RECIPE)
def unet_vessels() -> ModelVictim:
    """A U-Net segmenting the vessel phantom, trained on site A without augmentation."""
    return _vessel_unet("unet.vessels")


@register_victim("unet.vessels_styleaug", card=VESSEL_CARDS["unet.vessels_styleaug"], recipe=VESSEL_RECIPE, augment=style_augment)
def unet_vessels_styleaug() -> ModelVictim:
    """``unet.vessels`` trained with DGSSA-style style augmentation."""
    return _vessel_unet("unet.vessels_styleaug")


@register_victim("unet.vessels_structaug", card=VESSEL_CARDS["unet.vessels_structaug"], recipe=VESSEL_RECIPE,
                 augment=structure_style_augment)
def unet_vessels_structaug() -> ModelVictim:
    """``unet.vessels`` trained with DGSSA-style structural and style augmentation."""
    return _vessel_unet("unet.vessels_structaug")
