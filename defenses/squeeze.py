"""Feature-squeezing input purifiers: median smoothing and bit-depth reduction.

Xu, Evans & Qi, "Feature Squeezing: Detecting Adversarial Examples in Deep Neural Networks", NDSS 2018. Used here as
purifiers (squeeze, then predict), the baselines of F3 (Zhang et al., ACM MM 2025) at a comparable perturbation.

- Median smoothing selects one input pixel per output pixel, so it is differentiable almost everywhere and is
  attacked through its own gradient.
- Bit-depth reduction rounds, so its gradient is zero almost everywhere: it is attacked through BPDA (Athalye et al.,
  ICML 2018; straight-through identity).
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from robustbench_med.defense import InputPurifier
from robustbench_med.errors import ConfigError
from robustbench_med.registry import register_defense


class MedianSmoothing(InputPurifier):
    """Per-channel k×k median filter (odd ``kernel``), reflect padding at the borders."""

    def __init__(self, kernel: int = 3) -> None:
        if isinstance(kernel, bool) or not isinstance(kernel, int) or kernel < 3 or kernel % 2 == 0:
            raise ConfigError(f"median kernel must be an odd integer >= 3, got {kernel!r}")
        self.kernel = kernel

    def params(self) -> dict[str, Any]:
        return {"kernel": self.kernel}

    def purify(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        r = self.kernel // 2
        padded = F.pad(x, (r, r, r, r), mode="reflect")
        patches = F.unfold(padded.reshape(b * c, 1, h + 2 * r, w + 2 * r), self.kernel)  # [B·C, k², H·W]
        return patches.median(1).values.view(b, c, h, w)


class BitDepth(InputPurifier):
    """Quantises [0, 1] intensities to ``bits`` bits (2^bits levels)."""

    differentiable: ClassVar[bool] = False

    def __init__(self, bits: int = 4) -> None:
        if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
            raise ConfigError(f"bits must be an integer in [1, 8], got {bits!r}")
        self.bits = bits

    def params(self) -> dict[str, Any]:
        return {"bits": self.bits}

    def purify(self, x: torch.Tensor) -> torch.Tensor:
        levels = 2**self.bits - 1
        return torch.round(x.clamp(0, 1) * levels) / levels


@register_defense("squeeze.median", kind="purifier", paper="Xu et al., Feature Squeezing, NDSS 2018")
def squeeze_median(**kw: Any) -> MedianSmoothing:
    """Median smoothing, attacked through its (a.e.) gradient."""
    return MedianSmoothing(**kw)


@register_defense("squeeze.bitdepth", kind="purifier", paper="Xu et al., Feature Squeezing, NDSS 2018; BPDA: Athalye et al., ICML 2018")
def squeeze_bitdepth(**kw: Any) -> BitDepth:
    """Bit-depth reduction, attacked through BPDA."""
    return BitDepth(**kw)
