"""Haar wavelet transforms as fixed convolutions and the wavelet depthwise convolution of WaveNet-SF.

* :func:`haar_analysis` / :func:`haar_synthesis`: one level of the orthonormal 2-D Haar DWT and its inverse, as
  stride-2 depthwise (transposed) convolutions with four 2×2 filters per channel, ordered (LL, high-along-rows,
  high-along-columns, HH). The sign convention is PyWavelets' ``'haar'``: the 1-D detail of ``(x0, x1)`` is
  ``(x0 − x1)/√2`` (Lee et al., "PyWavelets", JOSS 2019), so no wavelet package is needed.
* :class:`WTConv2d`: WaveNet-SF's variant of the wavelet convolution (Finder et al., "Wavelet Convolutions for Large
  Receptive Fields", ECCV 2024; Cheng et al., arXiv 2501.11854). The input is Haar-decomposed ``L`` times (each time
  the LL band); a scaled depthwise 3×3 conv processes all four sub-bands of every level. For each depth ``i = L…1``
  the processed bands of levels ``j < i`` are recombined by inverse DWTs (each level's processed LL plus the
  reconstruction from below), a scaled depthwise base conv of the input is added and a BatchNorm applied; the ``L``
  results are summed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def haar_filters(device: torch.device | None = None) -> torch.Tensor:
    """The four 2×2 orthonormal Haar filters ``(4, 1, 2, 2)``: LL, high along rows, high along columns, HH."""
    lo = torch.tensor([1.0, 1.0], device=device) / 2**0.5
    hi = torch.tensor([1.0, -1.0], device=device) / 2**0.5
    bank = [torch.outer(a, b) for a, b in ((lo, lo), (hi, lo), (lo, hi), (hi, hi))]
    return torch.stack(bank)[:, None]


def haar_analysis(x: torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
    """``(N, C, H, W)`` (even H, W) → sub-bands ``(N, C, 4, H/2, W/2)``."""
    n, c, h, w = x.shape
    out = F.conv2d(x, filters.repeat(c, 1, 1, 1), stride=2, groups=c)
    return out.view(n, c, 4, h // 2, w // 2)


def haar_synthesis(bands: torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`haar_analysis`: ``(N, C, 4, h, w)`` → ``(N, C, 2h, 2w)``."""
    n, c, _, h, w = bands.shape
    return F.conv_transpose2d(bands.reshape(n, 4 * c, h, w), filters.repeat(c, 1, 1, 1), stride=2, groups=c)


def haar_split(x: torch.Tensor, filters: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """WaveNet-SF's input split: the LL band and the sum LH + HL + HH of the three detail bands (each H/2)."""
    x = _pad_even(x)
    bands = haar_analysis(x, filters)
    return bands[:, :, 0], bands[:, :, 1:].sum(2)


def _pad_even(x: torch.Tensor) -> torch.Tensor:
    h, w = x.shape[-2:]
    return F.pad(x, (0, w % 2, 0, h % 2)) if (h % 2 or w % 2) else x


class WTConv2d(nn.Module):
    """Wavelet depthwise convolution with ``levels`` Haar levels, as modified by WaveNet-SF (module docstring)."""

    def __init__(self, channels: int, kernel_size: int = 3, levels: int = 1) -> None:
        super().__init__()
        self.levels = levels
        k, c = kernel_size, channels
        self.register_buffer("filters", haar_filters(), persistent=False)
        self.wavelet_convs = nn.ModuleList(
            nn.Conv2d(4 * c, 4 * c, k, padding=k // 2, groups=4 * c, bias=False) for _ in range(levels)
        )
        self.wavelet_scales = nn.ParameterList(nn.Parameter(torch.full((1, 4 * c, 1, 1), 0.1)) for _ in range(levels))
        self.base_convs = nn.ModuleList(nn.Conv2d(c, c, k, padding=k // 2, groups=c) for _ in range(levels))
        self.base_scales = nn.ParameterList(nn.Parameter(torch.ones(1, c, 1, 1)) for _ in range(levels))
        self.bns = nn.ModuleList(nn.BatchNorm2d(c) for _ in range(levels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lows, highs, shapes = self._decompose(x)
        out = 0
        for i in range(self.levels, 0, -1):
            rec = 0
            for j in range(i - 1, -1, -1):
                bands = torch.cat([(lows[j] + rec).unsqueeze(2), highs[j]], 2)
                rec = haar_synthesis(bands, self.filters)[..., : shapes[j][0], : shapes[j][1]]
            base = self.base_convs[i - 1](x) * self.base_scales[i - 1]
            out = out + self.bns[i - 1](base + rec)
        return out

    def _decompose(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], list[tuple[int, int]]]:
        lows, highs, shapes, ll = [], [], [], x
        for conv, scale in zip(self.wavelet_convs, self.wavelet_scales):
            shapes.append(tuple(ll.shape[-2:]))
            bands = haar_analysis(_pad_even(ll), self.filters)
            ll = bands[:, :, 0]
            n, c, _, h, w = bands.shape
            processed = (conv(bands.reshape(n, 4 * c, h, w)) * scale).view(n, c, 4, h, w)
            lows.append(processed[:, :, 0])
            highs.append(processed[:, :, 1:])
        return lows, highs, shapes
