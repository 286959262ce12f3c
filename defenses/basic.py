"""Baseline input purifiers: identity, JPEG re-encoding and Gaussian noise.

- JPEG (Dziugaite et al., "A study of the effect of JPG compression on adversarial images", 2016; Guo et al.,
  ICLR 2018) is not differentiable: attacks go through it with BPDA (Athalye et al., ICML 2018).
- Gaussian noise (randomised smoothing without certification; Cohen et al., ICML 2019; Lecuyer et al., S&P 2019) is
  randomised: attacks average gradients over its noise with EOT (Athalye et al., ICML 2018).
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch

from robustbench_med.defense import InputPurifier
from robustbench_med.errors import ConfigError
from robustbench_med.registry import register_defense


class Identity(InputPurifier):
    """No defence (the undefended victim)."""

    def purify(self, x: torch.Tensor) -> torch.Tensor:
        return x


class JPEG(InputPurifier):
    """JPEG re-encoding at ``quality`` (1–100) of each image, through torchvision's libjpeg codec."""

    differentiable: ClassVar[bool] = False

    def __init__(self, quality: int = 75) -> None:
        if not isinstance(quality, int) or not 1 <= quality <= 100:
            raise ConfigError(f"JPEG quality must be an integer in [1, 100], got {quality!r}")
        self.quality = quality

    def params(self) -> dict[str, Any]:
        return {"quality": self.quality}

    def purify(self, x: torch.Tensor) -> torch.Tensor:
        from torchvision.io import decode_jpeg, encode_jpeg

        u8 = (x.detach().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
        decoded = [decode_jpeg(encode_jpeg(img, quality=self.quality)) for img in u8]
        return torch.stack(decoded).to(device=x.device, dtype=x.dtype) / 255.0


class GaussianNoise(InputPurifier):
    """Adds N(0, sigma²) noise to the input and clips to [0, 1]; a fresh draw at every forward pass."""

    randomized: ClassVar[bool] = True

    def __init__(self, sigma: float = 0.05) -> None:
        if not isinstance(sigma, (int, float)) or sigma < 0:
            raise ConfigError(f"sigma must be a number >= 0, got {sigma!r}")
        self.sigma = float(sigma)

    def params(self) -> dict[str, Any]:
        return {"sigma": self.sigma}

    def purify(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self.sigma * torch.randn_like(x)).clamp(0, 1)


@register_defense("identity.none", kind="purifier", paper="no defence")
def identity(**kw) -> Identity:
    """The undefended victim."""
    return Identity(**kw)


@register_defense("jpeg.bpda", kind="purifier", paper="Guo et al., ICLR 2018; BPDA: Athalye et al., ICML 2018")
def jpeg(**kw) -> JPEG:
    """JPEG re-encoding, attacked through BPDA."""
    return JPEG(**kw)


@register_defense("gaussian.eot", kind="purifier", paper="Cohen et al., ICML 2019; EOT: Athalye et al., ICML 2018")
def gaussian(**kw) -> GaussianNoise:
    """Gaussian input noise, attacked with EOT."""
    return GaussianNoise(**kw)
