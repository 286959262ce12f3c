"""Patch-expanding upsamplers of the Swin-Unet-style decoders (BRAU-Net, BRAU-Net++).

* :class:`PatchExpand` (Cao et al., "Swin-Unet", ECCV-W 2022): Linear C→2C (no bias), rearrange each token's
  channels into a 2×2 block (C/2 each), LayerNorm.
* :class:`FinalPatchExpand` (Swin-Unet): Linear C→16C (no bias), rearrange into 4×4 blocks of C, LayerNorm.
* :class:`InvertedBottleneckExpand`: the inverted bottleneck patch expanding (IBPE) of BRAU-Net's extended version
  (Cai et al., MMM 2025, arXiv 2410.10352). The paper's exact layer list is not available to us; this is a
  **reconstruction** from its description (expand channels with 1×1 convs first, then trade channels for resolution):
  Conv1×1 C→4C + BN + GELU → PixelShuffle ×2 (4C→C) → DWConv3×3 + BN + GELU → Conv1×1 C→C/2 + BN.

All take and return NCHW maps.
"""
from __future__ import annotations

import torch
from torch import nn

from robustbench_med.victims.zoo.common import PointwiseConv


class PatchExpand(nn.Module):
    """×2 upsampling, C → C/2, by a linear expansion and a 2×2 channel-to-space rearrangement (Swin-Unet)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.expand = nn.Linear(dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(dim // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(_depth_to_space(self.expand(x.permute(0, 2, 3, 1)), 2)).permute(0, 3, 1, 2)


class FinalPatchExpand(nn.Module):
    """×4 upsampling at constant width by a linear expansion and a 4×4 rearrangement (Swin-Unet's ``X4`` expand)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.expand = nn.Linear(dim, 16 * dim, bias=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(_depth_to_space(self.expand(x.permute(0, 2, 3, 1)), 4)).permute(0, 3, 1, 2)


class InvertedBottleneckExpand(nn.Module):
    """IBPE (reconstruction, see the module docstring): ×2 upsampling, C → C/2, through a 4C inverted bottleneck."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            PointwiseConv(dim, 4 * dim, bias=False), nn.BatchNorm2d(4 * dim), nn.GELU(),
            nn.PixelShuffle(2),
            nn.Conv2d(dim, dim, 3, padding=1, groups=dim, bias=False), nn.BatchNorm2d(dim), nn.GELU(),
            PointwiseConv(dim, dim // 2, bias=False), nn.BatchNorm2d(dim // 2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _depth_to_space(x: torch.Tensor, r: int) -> torch.Tensor:
    """``(N, H, W, r·r·C)`` with channels ordered (p1, p2, c) → ``(N, r·H, r·W, C)``."""
    n, h, w, c = x.shape
    return x.reshape(n, h, w, r, r, c // (r * r)).permute(0, 1, 3, 2, 4, 5).reshape(n, h * r, w * r, c // (r * r))
