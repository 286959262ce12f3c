"""UPerNet decoder head (Xiao et al., "Unified Perceptual Parsing for Scene Understanding", ECCV 2018).

A pyramid pooling module (Zhao et al., PSPNet, CVPR 2017) on the deepest feature, a top-down FPN (Lin et al., CVPR
2017) over the four stage features, fusion of all levels at the finest resolution, dropout and a 1×1 classifier;
logits are bilinearly resized to the input. This is the segmentation head MedFormer's release uses (pool scales
1/2/3/6, 128 channels, conv-BN-ReLU units).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from robustbench_med.victims.zoo.common import PointwiseConv, conv_bn_act


class PyramidPooling(nn.Module):
    """PSP module: average-pool to each scale, 1×1 conv-BN-ReLU, upsample, concatenate with the input (Zhao et al.)."""

    def __init__(self, cin: int, channels: int, scales: tuple[int, ...] = (1, 2, 3, 6), norm: bool = True) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), conv_bn_act(cin, channels, 1, norm=norm)) for s in scales
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        outs = [F.interpolate(b(x), size=size, mode="bilinear", align_corners=False) for b in self.branches]
        return torch.cat([x, *outs], 1)


class UPerHead(nn.Module):
    """UPerNet head over ``len(in_channels)`` stage features (Xiao et al., ECCV 2018).

    ``norm=False`` reproduces MedFormer's released head (mmseg ``ConvModule`` with ``norm_cfg=None``: biased convs and
    ReLU, no BatchNorm).
    """

    def __init__(
        self, in_channels: tuple[int, ...], channels: int, num_classes: int, dropout: float = 0.1, norm: bool = False
    ) -> None:
        super().__init__()
        scales = (1, 2, 3, 6)
        self.ppm = PyramidPooling(in_channels[-1], channels, scales, norm)
        self.bottleneck = conv_bn_act(in_channels[-1] + len(scales) * channels, channels, 3, norm=norm)
        self.lateral_convs = nn.ModuleList(conv_bn_act(c, channels, 1, norm=norm) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(conv_bn_act(channels, channels, 3, norm=norm) for _ in in_channels[:-1])
        self.fpn_bottleneck = conv_bn_act(len(in_channels) * channels, channels, 3, norm=norm)
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = PointwiseConv(channels, num_classes)

    def forward(self, feats: list[torch.Tensor], out_size: tuple[int, int]) -> torch.Tensor:
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats)]
        laterals.append(self.bottleneck(self.ppm(feats[-1])))
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(lat) for conv, lat in zip(self.fpn_convs, laterals)] + [laterals[-1]]
        outs = [outs[0]] + [_resize(o, outs[0].shape[-2:]) for o in outs[1:]]
        logits = self.conv_seg(self.dropout(self.fpn_bottleneck(torch.cat(outs, 1))))
        return _resize(logits, out_size)


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
