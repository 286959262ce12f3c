"""Sliding-window inference, as volumetric segmentors are used, and attacked *through* (issue #20).

A 3D segmentor is trained on patches and applied to a whole volume by sliding a window over it and blending the
overlapping window outputs (MONAI's ``sliding_window_inference``, nnU-Net's predictor). An attack on the network
alone, patch by patch, is not an attack on how the model is used: the blending averages a perturbation's effect over
the windows that see it. :class:`SlidingWindow` makes the victim's ``forward`` the whole sliding-window inference, so
every attack differentiates through the window extraction and the (Gaussian or constant) overlap blending; MONAI's
implementation is differentiable (the finite-difference test in ``tests/test_volumes.py`` checks it).

Reference: MONAI ``monai.inferers.sliding_window_inference`` (Cardoso et al., "MONAI: An open-source framework for
deep learning in healthcare", arXiv 2211.02701); Isensee et al., "nnU-Net", Nature Methods 2021 (Gaussian-weighted
window blending).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping

import torch

from robustbench_med.errors import ConfigError

BLEND_MODES = ("gaussian", "constant")


@dataclass(frozen=True)
class SlidingWindow:
    """How a victim runs on a whole volume: windows of ``roi_size`` (D, H, W) with fractional ``overlap``, blended
    with ``mode`` weights (``'gaussian'``: σ = ``sigma_scale`` × window size, centre-weighted as nnU-Net does;
    ``'constant'``: plain average), ``sw_batch_size`` windows per network call."""

    roi_size: tuple[int, ...]
    overlap: float = 0.5
    mode: str = "gaussian"
    sw_batch_size: int = 4
    sigma_scale: float = 0.125

    def __post_init__(self) -> None:
        roi = tuple(int(v) for v in self.roi_size)
        object.__setattr__(self, "roi_size", roi)
        if len(roi) not in (2, 3) or min(roi) < 1:
            raise ConfigError(f"sliding window: roi_size must be 2 or 3 positive sizes, got {self.roi_size!r}")
        if not 0.0 <= float(self.overlap) < 1.0:
            raise ConfigError(f"sliding window: overlap must lie in [0, 1), got {self.overlap!r}")
        if self.mode not in BLEND_MODES:
            raise ConfigError(f"sliding window: mode must be one of {BLEND_MODES}, got {self.mode!r}")
        if int(self.sw_batch_size) < 1 or not 0 < float(self.sigma_scale):
            raise ConfigError(f"sliding window: sw_batch_size >= 1 and sigma_scale > 0 needed, got {self.sw_batch_size!r}, "
                              f"{self.sigma_scale!r}")

    @classmethod
    def parse(cls, spec: "SlidingWindow | Mapping[str, Any] | None") -> "SlidingWindow | None":
        """A :class:`SlidingWindow` from itself, a mapping of its fields (a grid's ``sliding_window:``) or None."""
        if spec is None or isinstance(spec, SlidingWindow):
            return spec
        if not isinstance(spec, Mapping) or "roi_size" not in spec:
            raise ConfigError(f"sliding window: give a mapping with roi_size (and optionally overlap, mode, sw_batch_size), got {spec!r}")
        unknown = set(spec) - {"roi_size", "overlap", "mode", "sw_batch_size", "sigma_scale"}
        if unknown:
            raise ConfigError(f"sliding window: unknown setting(s) {sorted(unknown)}")
        return cls(**dict(spec))

    def check(self, spatial: tuple[int, ...]) -> None:
        """Raise unless the windows fit a volume of spatial size ``spatial``."""
        if len(spatial) != len(self.roi_size):
            raise ConfigError(f"sliding window: roi_size {self.roi_size} has {len(self.roi_size)} axes, the input {len(spatial)}")

    def __call__(self, net: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor) -> torch.Tensor:
        """``net`` applied window by window to the batch ``z`` and blended back to ``z``'s spatial size."""
        from monai.inferers import sliding_window_inference

        self.check(tuple(z.shape[2:]))
        return sliding_window_inference(z, self.roi_size, int(self.sw_batch_size), net, overlap=float(self.overlap),
                                        mode=self.mode, sigma_scale=float(self.sigma_scale))

    def windows(self, spatial: tuple[int, ...]) -> int:
        """How many windows cover a volume of spatial size ``spatial`` (what one forward pass costs, in network calls
        × ``sw_batch_size``)."""
        n = 1
        for size, roi in zip(spatial, self.roi_size):
            roi = min(roi, size)
            step = max(1, int(roi * (1 - float(self.overlap))))
            n *= 1 + max(0, -(-(size - roi) // step))
        return n

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "roi_size": list(self.roi_size)}
