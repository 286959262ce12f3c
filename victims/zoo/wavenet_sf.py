"""WaveNet-SF (Cheng et al., "WaveNet-SF: A Hybrid Network for Retinal Disease Detection Based on Wavelet Transform
in the Spatial-Frequency Domain", arXiv 2501.11854).

A one-level Haar DWT splits the image into the LL band and the sum of the three detail bands (each at H/2).

* **Low-frequency branch** on LL: a ResNet-50 (7×7 s2 stem + max pool, Bottleneck stages 3-4-6-3) with **MSW-SA**
  after stages 1, 2 and 3 (wavelet levels 4, 3, 2), global average pooling (2048-d). MSW-SA: ``a = [max_c x,
  mean_c x]`` → :class:`~.wavelets.WTConv2d` (2 channels, 3×3) → Conv1×1 2→1 → ``w = σ(·)``; output ``(1 + w) ⊙ x``.
* **High-frequency branch** on the details: Conv7×7 s2 (→32) + BN + LeakyReLU, four **HFFC** blocks (32→64→…→512;
  Conv3×3-BN-LReLU → Conv1×1 to 2C-BN-LReLU → FFE → Conv3×3-BN-LReLU → MaxPool 2), adaptive max pooling (512-d).
  **FFE**: a learned low-pass filter (GAP → Conv1×1 → 8 groups × 9 taps → BN → softmax over the taps, applied as a
  per-sample, per-group 3×3 filter with reflection padding) gives ``low``, ``high = x − low``; SK-style channel
  modulation ``low' = low·a_l + z_l + low``, ``high' = high·a_h + high`` (``a = softmax_c(z)`` of a GAP-MLP-BN
  logit ``z``); attentional fusion ``w = σ(MLP(low' + high'))``, ``out = low'·w + high'·(1 − w) + low' + high'``.
* Concatenate (2560-d) → Linear. Published: OCT-C8 (8 classes), 3 channels; 224² here (the repository's smoke test
  uses 448²).

Deviations: the released FFE's learnable ``lamb_l``/``lamb_h`` are never used in its forward pass and are not built
(1,920 parameters); the per-group low-pass filtering is computed as a grouped convolution instead of ``unfold``
(identical output; the FLOP counter now sees these multiply-adds); the fixed wavelet filters are buffers, not
frozen parameters. None of these changes the forward pass, so there is no separate compat mode: the released
pretrained model (README, Google Drive) loads with :func:`~.compat.load_released`, which maps the released
``FusionModule`` keys, leaves out ``lamb_l``/``lamb_h`` and checks the released fixed filters against the Haar ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from robustbench_med.victims.zoo import common as C
from robustbench_med.victims.zoo.wavelets import WTConv2d, haar_filters, haar_split

PAPER = (
    "Cheng et al., WaveNet-SF: A Hybrid Network for Retinal Disease Detection Based on Wavelet Transform in the "
    "Spatial-Frequency Domain, arXiv 2501.11854"
)
OCT_C8_CLASSES = ("AMD", "CNV", "CSR", "DME", "DR", "DRUSEN", "MH", "NORMAL")


@dataclass(frozen=True)
class WaveNetConfig:
    """Branch sizes. ``low_block`` 'bottleneck' (ResNet-50 stages) or 'basic'; ``low_stem`` 'resnet' (7×7 s2 + max
    pool) or 'conv3' (3×3 s1); ``msw_levels`` after the first stages; ``high_widths`` = HFFC input widths."""

    in_chans: int = 3
    low_block: str = "bottleneck"
    low_stem: str = "resnet"
    low_widths: tuple[int, ...] = (64, 128, 256, 512)
    low_depths: tuple[int, ...] = (3, 4, 6, 3)
    msw_levels: tuple[int, ...] = (4, 3, 2)
    high_stem: int = 32
    high_widths: tuple[int, ...] = (32, 64, 128, 256)


class MSWSA(nn.Module):
    """Multi-scale wavelet spatial attention: a WTConv2d on [max, mean] channel maps gates ``x`` by ``1 + σ(·)``."""

    def __init__(self, levels: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.wtconv = WTConv2d(2, kernel_size, levels)
        self.last_conv = C.PointwiseConv(2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.cat([x.amax(1, keepdim=True), x.mean(1, keepdim=True)], 1)
        return (1 + self.last_conv(self.wtconv(a)).sigmoid()) * x


class LowFrequencyNet(nn.Module):
    """ResNet trunk with MSW-SA after the first stages, global average pooled (He et al., CVPR 2016; Cheng et al.)."""

    def __init__(self, cfg: WaveNetConfig) -> None:
        super().__init__()
        from torchvision.models.resnet import BasicBlock, Bottleneck

        block = Bottleneck if cfg.low_block == "bottleneck" else BasicBlock
        width = cfg.low_widths[0]
        if cfg.low_stem == "resnet":
            self.stem = nn.Sequential(
                nn.Conv2d(cfg.in_chans, width, 7, 2, 3, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, 2, 1),
            )
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(cfg.in_chans, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
            )
        layers, cin = [], width
        for i, (planes, depth) in enumerate(zip(cfg.low_widths, cfg.low_depths)):
            layer, cin = _res_layer(block, cin, planes, depth, 1 if i == 0 else 2)
            layers.append(layer)
        self.layers = nn.ModuleList(layers)
        self.msw = nn.ModuleList(MSWSA(lv) for lv in cfg.msw_levels)
        self.out_dim = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.msw):
                x = self.msw[i](x)
        return x.mean((2, 3))


def _res_layer(block, cin: int, planes: int, depth: int, stride: int) -> tuple[nn.Sequential, int]:
    cout = planes * block.expansion
    down = None
    if stride != 1 or cin != cout:
        down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
    blocks = [block(cin, planes, stride, down)] + [block(cout, planes) for _ in range(depth - 1)]
    return nn.Sequential(*blocks), cout


class BandModulation(nn.Module):
    """SK-style re-weighting of the low and high bands (Li et al., SKNet, CVPR 2019; WaveNet-SF's FFE)."""

    def __init__(self, c: int, r: int = 16) -> None:
        super().__init__()
        self.low = nn.Sequential(
            C.PointwiseConv(c, c // r),
            nn.BatchNorm2d(c // r),
            nn.ReLU(inplace=True),
            C.PointwiseConv(c // r, c),
            nn.BatchNorm2d(c),
        )
        self.high = nn.Sequential(
            C.PointwiseConv(c, c // r),
            nn.BatchNorm2d(c // r),
            nn.ReLU(inplace=True),
            C.PointwiseConv(c // r, c),
            nn.BatchNorm2d(c),
        )

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z_l = self.low(low.mean((2, 3), keepdim=True))
        z_h = self.high(high.mean((2, 3), keepdim=True))
        return low * z_l.softmax(1) + z_l + low, high * z_h.softmax(1) + high


class AttentionalFusion(nn.Module):
    """AFF-style fusion (Dai et al., WACV 2021): ``w = σ(MLP(a + b))``, ``out = a·w + b·(1 − w) + a + b``."""

    def __init__(self, c: int, r: int = 16) -> None:
        super().__init__()
        self.local_att = nn.Sequential(
            C.PointwiseConv(c, c // r),
            nn.BatchNorm2d(c // r),
            nn.ReLU(inplace=True),
            C.PointwiseConv(c // r, c),
            nn.BatchNorm2d(c),
        )

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        w = self.local_att(a + b).sigmoid()
        return a * w + b * (1 - w) + a + b


class FFE(nn.Module):
    """Frequency feature extraction: learned per-sample low-pass split, band modulation and fusion (Cheng et al.)."""

    def __init__(self, c: int, kernel_size: int = 3, groups: int = 8) -> None:
        super().__init__()
        self.k, self.groups = kernel_size, groups
        self.conv = C.PointwiseConv(c, groups * kernel_size**2, bias=False)
        self.bn = nn.BatchNorm2d(groups * kernel_size**2)
        self.modulate = BandModulation(c)
        self.fusion = AttentionalFusion(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = self.low_pass(x)
        return self.fusion(*self.modulate(low, x - low))

    def low_pass(self, x: torch.Tensor) -> torch.Tensor:
        """Each group of channels filtered by its sample's softmax-normalised 3×3 kernel (reflection padding)."""
        n, c, h, w = x.shape
        k = self.k
        taps = self.bn(self.conv(x.mean((2, 3), keepdim=True))).view(n, self.groups, k * k).softmax(-1)
        kernels = taps.repeat_interleave(c // self.groups, dim=1).reshape(n * c, 1, k, k)
        padded = F.pad(x, (k // 2,) * 4, mode="reflect").reshape(1, n * c, h + k - 1, w + k - 1)
        return F.conv2d(padded, kernels, groups=n * c).view(n, c, h, w)


class HFFC(nn.Module):
    """High-frequency feature-capture block: Conv3×3 → Conv1×1 (×2 width) → FFE → Conv3×3 → MaxPool 2 (Cheng et al.)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        act = nn.LeakyReLU(inplace=True)
        self.pre = nn.Sequential(
            nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), act, C.PointwiseConv(c, 2 * c), nn.BatchNorm2d(2 * c), act
        )
        self.ffe = FFE(2 * c)
        self.post = nn.Sequential(nn.Conv2d(2 * c, 2 * c, 3, padding=1), nn.BatchNorm2d(2 * c), act, nn.MaxPool2d(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.post(self.ffe(self.pre(x)))


class HighFrequencyNet(nn.Module):
    """Conv7×7 s2 stem and HFFC blocks, adaptive max pooled (Cheng et al.)."""

    def __init__(self, cfg: WaveNetConfig) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(cfg.in_chans, cfg.high_stem, 7, 2, 3, bias=False),
            nn.BatchNorm2d(cfg.high_stem),
            nn.LeakyReLU(inplace=True),
        )
        self.blocks = nn.Sequential(*[HFFC(c) for c in cfg.high_widths])
        self.out_dim = 2 * cfg.high_widths[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x)).amax((2, 3))


class WaveNetSF(nn.Module):
    """WaveNet-SF classifier: Haar split → low- and high-frequency branches → concat → Linear (Cheng et al.)."""

    def __init__(self, cfg: WaveNetConfig, num_classes: int) -> None:
        super().__init__()
        self.register_buffer("filters", haar_filters(), persistent=False)
        self.low = LowFrequencyNet(cfg)
        self.high = HighFrequencyNet(cfg)
        self.fc = nn.Linear(self.low.out_dim + self.high.out_dim, num_classes)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        ll, details = haar_split(z, self.filters)
        return self.fc(torch.cat([self.low(ll), self.high(details)], 1))


WAVENET_FULL = WaveNetConfig()
# Tiny (64² phantom): low branch 3×3 stem + BasicBlocks 16/32/64/128 with MSW-SA (levels 3/2/1); high branch 7×7 s2
# stem (16) + HFFC 16→32→64→128.
WAVENET_TINY = WaveNetConfig(in_chans=1, low_block="basic", low_stem="conv3", low_widths=(16, 32, 64, 128),
                             low_depths=(1, 1, 1, 1), msw_levels=(3, 2, 1), high_stem=16, high_widths=(16, 32, 64))
LAYERS = tuple(f"low.layers.{i}" for i in range(4)) + tuple(f"high.blocks.{i}" for i in range(3))
COSTS = {"wavenetsf.full": (27_841_767, 3_410_108_844), "wavenetsf.tiny": (590_341, 51_461_376)}
FULL_NOTE = ("Released OCT-C8 configuration (8 classes, 3 channels, ImageNet normalisation) at 224² (the repository's "
             "smoke test uses 448²; 6.60 GMACs there); load external weights with weights=PATH. 27.84M parameters (low "
             "branch 23.51M, high branch 4.31M) as the release; 1.71 GMACs (FlopCounterMode; 1.70 for the release, "
             "whose unfold-based low-pass is not counted). Deviations: see the module docstring (unused FFE weights "
             "dropped; no forward deviation). The released pretrained model (README, Google Drive) loads with "
             "compat.load_released.")
TINY_NOTE = ("Haar split, low-frequency ResNet branch with MSW-SA (wavelet convolutions) and high-frequency HFFC/FFE "
             "branch kept (BasicBlocks instead of Bottlenecks). Lesion present/absent, 2-logit head. Measured: val "
             "accuracy 0.910 (label prevalence 0.53) on 200 phantom validation images after `robustbench-med train "
             "wavenetsf.tiny` (one thread: 22 s of training).")


def _register() -> None:
    card = C.full_card("wavenetsf.full", "classification", "retinal OCT (OCT-C8)", (3, 224, 224), OCT_C8_CLASSES, PAPER,
                       *COSTS["wavenetsf.full"], FULL_NOTE)
    C.register_zoo("wavenetsf.full", card, partial(WaveNetSF, WAVENET_FULL, len(OCT_C8_CLASSES)), C.IMAGENET_MEAN,
                   C.IMAGENET_STD, LAYERS)
    card = C.tiny_card("wavenetsf.tiny", "binary", PAPER, *COSTS["wavenetsf.tiny"], TINY_NOTE)
    C.register_zoo("wavenetsf.tiny", card, partial(WaveNetSF, WAVENET_TINY, 2), C.PHANTOM_MEAN, C.PHANTOM_STD, LAYERS,
                   recipe=C.tiny_recipe("label", n_train=1000, epochs=4, lr=3e-3))


_register()
