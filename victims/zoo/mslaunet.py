"""MSLAU-Net (Lan et al., "MSLAU-Net: A Hybrid CNN-Transformer Network for Medical Image Segmentation",
arXiv 2505.18823): multi-scale linear attention (MSLA) in a UniFormer-style encoder and a top-down feature
aggregation (SETR-MLA-like) decoder.

Encoder: patch embeds Conv k=s=4, 2, 2, 2 (+ LayerNorm); stages 1–2 are LFE blocks (UniFormer's CBlock:
``x += DW3×3(x)``; ``x += Conv1×1(DW5×5(Conv1×1(BN x)))``; ``x += CMLP(BN x)``), stages 3–4 are GFE blocks
(``x += DW3×3(x)``; ``x += MSLA(LN x)``; ``x += MLP(LN x)``). MSLA splits the channels into four groups, applies a
depthwise conv with kernel 3/5/7/9 plus residual and ReLU to each, runs one **shared** linear attention on every
group (K softmaxed over features, Q over tokens, ``Q (Kᵀ V)``), scales each group by a learnable weight and fuses with
a Conv1×1. Decoder: stage 2/3/4 features are lifted to H/4 by Conv1×1-BN-ReLU + bilinear ×2 chains, accumulated
top-down (``a = f1 + p2``, ``b = a + p3``, ``c = b + p4``), each of the four maps passes two Conv3×3-BN-ReLU, is
upsampled ×2, concatenated and classified by a Conv3×3; logits are resized to the input. Published (Synapse): 224²,
9 classes, dims 64/128/256/512, depths 4-8-11-5, heads = dim/64, MLP ratio 4; a 1-channel input is repeated to 3.

Deviations from the released code: ``MSLA`` views the (B, N, C) tokens as (B, C, H, W) and back without permutes, and
``LinearAttention`` merges (B, heads, N, d) into (B, N, C) without moving the head axis, both scrambling channels and
positions; the intended permutes are used here. The encoder's unused classification norm and head are not built.
Non-square inputs are supported.

``release_compat=True`` computes the released forward exactly: :class:`MSLA` reinterprets the channels-last tokens as
an NCHW map and its NCHW output as tokens (the release's ``view``/``reshape``), and :class:`LinearAttention` merges
its heads without moving the head axis. The parameters are the same in both modes; the published ``best.pth`` (README,
Google Drive) is an encoder checkpoint (``load_from`` loads it into the encoder with ``strict=False``), and
:func:`~.compat.load_released` maps a released ``MSLAU_net`` state dict (encoder + decoder) onto a compat model.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from robustbench_med.victims.zoo import common as C
from robustbench_med.victims.zoo.biformer import init_transformer_weights
from robustbench_med.victims.zoo.common import conv_bn_act

PAPER = "Lan et al., MSLAU-Net: A Hybrid CNN-Transformer Network for Medical Image Segmentation, arXiv 2505.18823"


@dataclass(frozen=True)
class MSLAConfig:
    """MSLAU-Net sizes: stage dims, depths (stages 1–2 LFE, 3–4 GFE), head dim of the linear attention, MLP ratio."""

    dims: tuple[int, int, int, int] = (64, 128, 256, 512)
    depths: tuple[int, int, int, int] = (4, 8, 11, 5)
    head_dim: int = 64
    mlp_ratio: float = 4.0
    in_chans: int = 3


class LinearAttention(nn.Module):
    """MSLAU-Net's linear attention: softmax(K) over features, softmax(Q) over tokens, ``Q (Kᵀ V)`` per head.

    ``released_views``: merge the heads as the release does, ``(B, heads, N, d).reshape(B, N, C)`` without moving the
    head axis (the intended merge is ``transpose(1, 2)`` first).
    """

    def __init__(self, dim: int, num_heads: int, released_views: bool = False) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.released_views = released_views
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (B, N, C) → (B, N, C)."""
        q, k, v = (t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        context = k.softmax(-1).transpose(-1, -2) @ v
        out = q.softmax(-2) @ context
        if self.released_views:
            return self.proj(out.reshape(x.shape))
        return self.proj(out.transpose(1, 2).flatten(2))


class MSLA(nn.Module):
    """Multi-scale linear attention (Lan et al.): depthwise-conv branches 3/5/7/9 sharing one linear attention.

    ``released_views``: the released forward, which receives tokens ``(B, N, C)`` and ``view``s them as
    ``(B, C, H, W)`` without a permute, and ``reshape``s the ``(B, C, H, W)`` result back to ``(B, N, C)``; on an NCHW
    map that is the channels-last flattening reinterpreted as NCHW in, and NCHW reinterpreted as channels-last out. The
    shared linear attention then also merges its heads as released.
    """

    def __init__(
        self, dim: int, num_heads: int, kernels: tuple[int, ...] = (3, 5, 7, 9), released_views: bool = False
    ) -> None:
        super().__init__()
        g = dim // len(kernels)
        self.released_views = released_views
        self.dw_convs = nn.ModuleList(nn.Conv2d(g, g, k, padding=k // 2, groups=g) for k in kernels)
        self.linear_attention = LinearAttention(g, num_heads, released_views)
        self.final_conv = C.PointwiseConv(dim, dim)
        self.scale_weights = nn.Parameter(torch.ones(len(kernels)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (B, C, H, W) → (B, C, H, W)."""
        n, c, h, w = x.shape
        if self.released_views:
            x = x.permute(0, 2, 3, 1).reshape(n, c, h, w)
        outs = []
        for i, (conv, part) in enumerate(zip(self.dw_convs, x.chunk(len(self.dw_convs), 1))):
            part = F.relu(conv(part) + part)
            tokens = self.linear_attention(part.flatten(2).transpose(1, 2))
            outs.append(tokens.transpose(1, 2).reshape(part.shape) * self.scale_weights[i])
        out = self.final_conv(torch.cat(outs, 1))
        return out.reshape(n, h, w, c).permute(0, 3, 1, 2) if self.released_views else out


class LFE(nn.Module):
    """Local feature extraction (UniFormer's CBlock, Li et al., ICLR 2022): DW position conv, 1×1–DW5×5–1×1, CMLP."""

    def __init__(self, dim: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.BatchNorm2d(dim)
        self.conv1, self.attn, self.conv2 = (
            C.PointwiseConv(dim, dim),
            nn.Conv2d(dim, dim, 5, padding=2, groups=dim),
            C.PointwiseConv(dim, dim),
        )
        self.norm2 = nn.BatchNorm2d(dim)
        self.mlp = nn.Sequential(C.PointwiseConv(dim, hidden), nn.GELU(), C.PointwiseConv(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_embed(x)
        x = x + self.conv2(self.attn(self.conv1(self.norm1(x))))
        return x + self.mlp(self.norm2(x))


class GFE(nn.Module):
    """Global feature extraction block (Lan et al.): DW position conv, MSLA and MLP with pre-LayerNorms."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, released_views: bool = False) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = MSLA(dim, num_heads, released_views=released_views)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_embed(x)
        x = x + self.attn(self.norm1(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
        return x + self.mlp(self.norm2(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)


class PatchEmbed(nn.Module):
    """Non-overlapping patch embedding: Conv k = s = ``patch`` followed by LayerNorm over channels."""

    def __init__(self, cin: int, cout: int, patch: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(cin, cout, patch, stride=patch)
        self.norm = nn.LayerNorm(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class MLADecoder(nn.Module):
    """Top-down multi-level aggregation and the MLA head (Lan et al.; after SETR-MLA, Zheng et al., CVPR 2021)."""

    def __init__(self, dims: tuple[int, int, int, int], num_classes: int) -> None:
        super().__init__()
        mla = dims[0]
        self.lifts = nn.ModuleList(_lift((*dims[1 : i + 2][::-1], mla)) for i in range(3))
        self.smooth = nn.ModuleList(conv_bn_act(mla, mla, 3) for _ in range(4))
        self.heads = nn.ModuleList(conv_bn_act(mla, mla, 3) for _ in range(4))
        self.seg = nn.Conv2d(4 * mla, num_classes, 3, padding=1)

    def forward(self, feats: list[torch.Tensor], out_size: tuple[int, int]) -> torch.Tensor:
        maps, acc = [feats[0]], feats[0]
        for lift, f in zip(self.lifts, feats[1:]):
            acc = acc + lift(f)
            maps.append(acc)
        outs = [head(smooth(m)) for head, smooth, m in zip(self.heads, self.smooth, maps)]
        outs = [F.interpolate(o, scale_factor=2, mode="bilinear", align_corners=True) for o in outs]
        return F.interpolate(self.seg(torch.cat(outs, 1)), size=out_size, mode="bilinear", align_corners=True)


def _lift(widths: tuple[int, ...]) -> nn.Sequential:
    """Conv1×1-BN-ReLU + bilinear ×2 for each consecutive pair of ``widths`` (lifts a deep feature to H/4)."""
    layers: list[nn.Module] = []
    for cin, cout in zip(widths, widths[1:]):
        layers += [conv_bn_act(cin, cout, 1), nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)]
    return nn.Sequential(*layers)


class MSLAUNet(nn.Module):
    """MSLAU-Net with ``encode`` / ``decode`` halves (see the module docstring; ``release_compat``: the released
    views in MSLA and the linear attention)."""

    def __init__(self, cfg: MSLAConfig, num_classes: int, release_compat: bool = False) -> None:
        super().__init__()
        self.release_compat = release_compat
        self.in_chans = cfg.in_chans
        d = cfg.dims
        self.patch_embeds = nn.ModuleList(
            [PatchEmbed(cfg.in_chans, d[0], 4), *(PatchEmbed(a, b, 2) for a, b in zip(d, d[1:]))]
        )
        self.stages = nn.ModuleList(
            [
                nn.Sequential(*[LFE(d[0], cfg.mlp_ratio) for _ in range(cfg.depths[0])]),
                nn.Sequential(*[LFE(d[1], cfg.mlp_ratio) for _ in range(cfg.depths[1])]),
                nn.Sequential(*[GFE(d[2], d[2] // cfg.head_dim, cfg.mlp_ratio, release_compat)
                                for _ in range(cfg.depths[2])]),
                nn.Sequential(*[GFE(d[3], d[3] // cfg.head_dim, cfg.mlp_ratio, release_compat)
                                for _ in range(cfg.depths[3])]),
            ]
        )
        self.decoder = MLADecoder(d, num_classes)
        self.apply(init_transformer_weights)

    def encode(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """Stage features: ``'z'`` (H/32) and skips ``'s1'``–``'s3'`` (H/4 … H/16)."""
        if z.shape[1] == 1 and self.in_chans == 3:
            z = z.repeat(1, 3, 1, 1)
        feats = []
        for embed, stage in zip(self.patch_embeds, self.stages):
            z = stage(embed(z))
            feats.append(z)
        return {"z": feats[3], "s1": feats[0], "s2": feats[1], "s3": feats[2]}

    def decode(self, latent: dict[str, torch.Tensor]) -> torch.Tensor:
        feats = [latent["s1"], latent["s2"], latent["s3"], latent["z"]]
        return self.decoder(feats, (feats[0].shape[-2] * 4, feats[0].shape[-1] * 4))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(z))


MSLAUNET_FULL = MSLAConfig()
# Tiny (64² phantom): dims 16/32/64/128, depths 1-1-2-1 (LFE, LFE, GFE, GFE), linear-attention heads = dim / 32.
MSLAUNET_TINY = MSLAConfig(dims=(16, 32, 64, 128), depths=(1, 1, 2, 1), head_dim=32, in_chans=1)
LAYERS = tuple(f"stages.{i}" for i in range(4))
COSTS = {"mslaunet.full": (21_895_241, 10_033_895_424), "mslaunet.tiny": (338_642, 25_135_104)}
FULL_NOTE = ("Published Synapse configuration (224², 9 classes, the 1-channel CT slice repeated to 3 channels, inputs "
             "in [0, 1]); load external weights with weights=PATH. 21.90M parameters and 5.02 GMACs (FlopCounterMode) "
             "as the release (minus its unused encoder norm and head, 1,537 parameters). Deviation: MSLA and the "
             "linear attention use the intended permutes (the release scrambles channels and positions); "
             "MSLAUNet(..., release_compat=True) computes the released forward and compat.load_released loads a "
             "released state dict into it (the published best.pth is an encoder checkpoint). Loss 0.4 CE + 0.6 soft "
             "Dice (the Synapse recipe).")
TINY_NOTE = ("LFE stages, GFE stages with multi-scale linear attention (kernels 3/5/7/9, one shared linear attention) "
             "and the top-down MLA decoder kept; dims 16/32/64/128, depths 1-1-2-1; loss 0.4 CE + 0.6 soft Dice. "
             "Measured: val Dice_fg 0.885 (body 0.98, liver 0.93, kidneys 0.92, spine 0.94, lesion 0.60) on 200 "
             "phantom validation images after `robustbench-med train mslaunet.tiny` (trained with the project's phantom loop: class-weighted CE + batch soft Dice; two threads: 15 s).")


def _register() -> None:
    seg = C.SegmentationLossVictim
    card = C.full_card("mslaunet.full", "segmentation", "CT (Synapse multi-organ)", (1, 224, 224), C.SYNAPSE_CLASSES,
                       PAPER, *COSTS["mslaunet.full"], FULL_NOTE, loss_weights=(0.4, 0.6))
    C.register_zoo("mslaunet.full", card, partial(MSLAUNet, MSLAUNET_FULL, len(C.SYNAPSE_CLASSES)), (0.0,), (1.0,),
                   LAYERS, cls=seg)
    card = C.tiny_card("mslaunet.tiny", "segmentation", PAPER, *COSTS["mslaunet.tiny"], TINY_NOTE,
                       loss_weights=(0.4, 0.6))
    C.register_zoo("mslaunet.tiny", card, partial(MSLAUNet, MSLAUNET_TINY, len(C.SEG_CLASSES)), C.PHANTOM_MEAN,
                   C.PHANTOM_STD, LAYERS, recipe=C.tiny_recipe("mask", n_train=1000, epochs=4, lr=5e-3), cls=seg)

_register()
