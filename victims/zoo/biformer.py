"""BiFormer (Zhu et al., "BiFormer: Vision Transformer with Bi-Level Routing Attention", CVPR 2023, arXiv 2303.08810).

The routed transformer block and the four-stage pyramid defined here are shared by MedFormer, DSSAU-Net, BRAU-Net,
BRAU-Net++ and HAN, which differ in the attention options (:class:`~.routing.RoutingAttention`) and the heads.

Block (pre-norm): ``x += DWConv3×3(x)`` (conditional position encoding) → ``x += Attn(LN(x))`` → ``x += MLP(LN(x))``,
LayerNorm eps 1e-6, MLP Linear–GELU–Linear, stochastic depth, no layer scale. Pyramid: stem Conv3×3 s2 (C0/2) → BN →
GELU → Conv3×3 s2 (C0) → BN; Conv3×3 s2 + BN between stages; stages at H/4 … H/32. The classifier ends with
BatchNorm2d → global average pool → Linear. Published configurations (224², ImageNet-1k, n_win 7, top-k 1/4/16 and
full attention in stage 4, head dim 32, MLP ratio 3, LePE 5×5): T depths 2-2-8-2 dims 64…512; S depths 4-4-18-4 dims
64…512; B depths 4-4-18-4 dims 96…768. The last stage's full attention keeps the released default of 8 heads.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial

import torch
from torch import nn

from robustbench_med.errors import ConfigError
from robustbench_med.victims.zoo import common as C
from robustbench_med.victims.zoo.routing import RoutingAttention

PAPER = "Zhu et al., BiFormer: Vision Transformer with Bi-Level Routing Attention, CVPR 2023 (arXiv 2303.08810)"


@dataclass(frozen=True)
class PyramidConfig:
    """A routed-transformer pyramid: per-stage dims, depths, top-k (``None`` = full attention), attention options.

    ``heads`` overrides ``dim // head_dim`` per stage; ``full_heads`` is the head count of full-attention stages
    (``None``: ``dim // head_dim``); ``pixel_div``/``pixel_k_min`` switch BRA to DSSA; ``kv_pool`` pools K/V per region.
    ``block_input_norm`` builds the block of the BRAU-Net / BRAU-Net++ releases (see :class:`RoutedBlock`).
    A stage of depth 0 keeps its downsampling layer but has no blocks.
    """

    dims: tuple[int, ...]
    depths: tuple[int, ...]
    topks: tuple[int | None, ...]
    n_win: int = 7
    head_dim: int = 32
    mlp_ratio: float = 3.0
    heads: tuple[int, ...] | None = None
    full_heads: int | None = 8
    pixel_div: int | None = None
    pixel_k_min: int = 1
    kv_pool: int | None = None
    lepe_kernel: int = 5
    drop_path: float = 0.0
    in_chans: int = 3
    block_input_norm: bool = False

    def __post_init__(self) -> None:
        if not len(self.dims) == len(self.depths) == len(self.topks):
            raise ConfigError(
                f"dims, depths and topks must have equal lengths, got {self.dims}, {self.depths}, {self.topks}"
            )


def make_attention(cfg: PyramidConfig, dim: int, topk: int | None, heads: int | None = None) -> RoutingAttention:
    """The attention of one block: full attention with LePE on x when ``topk`` is ``None``, else BRA/DSSA."""
    if topk is None:
        n = cfg.full_heads or dim // cfg.head_dim
        return RoutingAttention(
            dim, n, topk=None, lepe_kernel=cfg.lepe_kernel, scale="head", lepe_on="x", qkv_bias=False
        )
    return RoutingAttention(
        dim,
        heads or dim // cfg.head_dim,
        cfg.n_win,
        topk,
        pixel_div=cfg.pixel_div,
        pixel_k_min=cfg.pixel_k_min,
        kv_pool=cfg.kv_pool,
        lepe_kernel=cfg.lepe_kernel,
    )


class RoutedBlock(nn.Module):
    """BiFormer's pre-norm block on NCHW maps: DWConv position encoding, routed attention, MLP (Zhu et al., 2023).

    ``input_norm=True`` is the block as released with BRAU-Net and BRAU-Net++ (``bra_block.py::Block.forward``): the
    input is first replaced by ``norm1(x)``, so the residual stream starts from the normalised input (the raw-input
    ``shortcut`` the release computes is unused), and ``norm1`` is applied again before the attention:
    ``x = norm1(x)``; ``x += DWConv(x)``; ``x += Attn(norm1(x))``; ``x += MLP(norm2(x))``.
    """

    def __init__(
        self, dim: int, attn: nn.Module, mlp_ratio: float, drop_path: float = 0.0, input_norm: bool = False
    ) -> None:
        super().__init__()
        self.input_norm = input_norm
        hidden = int(mlp_ratio * dim)
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = attn
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop_path = _drop_path(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_norm:
            x = self.norm1(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = x + self.pos_embed(x)
        x = x.permute(0, 2, 3, 1)
        x = x + self.drop_path(self.attn(self.norm1(x)))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x.permute(0, 3, 1, 2)


def _drop_path(rate: float) -> nn.Module:
    """Stochastic depth (Huang et al., ECCV 2016) via timm's ``DropPath``; identity (and no timm import) at rate 0."""
    if rate <= 0:
        return nn.Identity()
    from timm.layers import DropPath

    return DropPath(rate)


def make_stage(
    cfg: PyramidConfig,
    dim: int,
    depth: int,
    topk: int | None,
    heads: int | None = None,
    drop_paths: list[float] | None = None,
) -> nn.Sequential:
    """``depth`` routed blocks of width ``dim`` (an empty ``Sequential`` when ``depth`` is 0)."""
    rates = drop_paths or [0.0] * depth
    return nn.Sequential(
        *[
            RoutedBlock(dim, make_attention(cfg, dim, topk, heads), cfg.mlp_ratio, rates[j], cfg.block_input_norm)
            for j in range(depth)
        ]
    )


def _drop_path_rates(cfg: PyramidConfig) -> list[list[float]]:
    total = sum(cfg.depths)
    rates = [cfg.drop_path * i / max(total - 1, 1) for i in range(total)]
    out, start = [], 0
    for d in cfg.depths:
        out.append(rates[start : start + d])
        start += d
    return out


class BiFormerBackbone(nn.Module):
    """The routed pyramid: ``downsample_layers[i]`` (stem for i = 0) then ``stages[i]`` (Zhu et al., 2023)."""

    def __init__(self, cfg: PyramidConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d0 = cfg.dims[0]
        stem = nn.Sequential(
            nn.Conv2d(cfg.in_chans, d0 // 2, 3, stride=2, padding=1),
            nn.BatchNorm2d(d0 // 2),
            nn.GELU(),
            nn.Conv2d(d0 // 2, d0, 3, stride=2, padding=1),
            nn.BatchNorm2d(d0),
        )
        downs = [
            nn.Sequential(nn.Conv2d(a, b, 3, stride=2, padding=1), nn.BatchNorm2d(b))
            for a, b in zip(cfg.dims, cfg.dims[1:])
        ]
        self.downsample_layers = nn.ModuleList([stem, *downs])
        heads = cfg.heads or (None,) * len(cfg.dims)
        rates = _drop_path_rates(cfg)
        self.stages = nn.ModuleList(
            make_stage(cfg, d, n, k, h, r) for d, n, k, h, r in zip(cfg.dims, cfg.depths, cfg.topks, heads, rates)
        )

    def forward_stages(
        self, x: torch.Tensor, with_inputs: bool = False
    ) -> list[torch.Tensor] | tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-stage outputs (and, with ``with_inputs``, the per-stage inputs = downsampling outputs)."""
        inputs, outputs = [], []
        for down, stage in zip(self.downsample_layers, self.stages):
            x = down(x)
            inputs.append(x)
            x = stage(x)
            outputs.append(x)
        return (inputs, outputs) if with_inputs else outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_stages(x)[-1]


class BiFormer(nn.Module):
    """BiFormer classifier: routed pyramid → BatchNorm2d → global average pool → Linear (Zhu et al., CVPR 2023).

    Deviation from the released code: none in the forward pass; region padding for sizes not divisible by ``n_win``
    follows the legacy ``auto_pad`` (the released classifiers assert divisibility instead).
    """

    def __init__(self, cfg: PyramidConfig, num_classes: int) -> None:
        super().__init__()
        self.backbone = BiFormerBackbone(cfg)
        self.norm = nn.BatchNorm2d(cfg.dims[-1])
        self.head = nn.Linear(cfg.dims[-1], num_classes)
        self.apply(init_transformer_weights)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.backbone(z)).mean((2, 3)))


def init_transformer_weights(m: nn.Module) -> None:
    """Truncated-normal (std 0.02) Linear weights, zero biases, unit LayerNorms (the ViT/BiFormer initialisation)."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


STAGE_LAYERS = tuple(f"backbone.stages.{i}" for i in range(4))

BIFORMER_T = PyramidConfig(dims=(64, 128, 256, 512), depths=(2, 2, 8, 2), topks=(1, 4, 16, None))
BIFORMER_S = replace(BIFORMER_T, depths=(4, 4, 18, 4))
BIFORMER_B = replace(BIFORMER_S, dims=(96, 192, 384, 768))
# Tiny (64² phantom): stage maps 16/8/4/2, n_win 4 (regions 4×4, 2×2, 1×1), top-k 2/4/8, full attention in stage 4.
BIFORMER_TINY = PyramidConfig(dims=(16, 32, 64, 128), depths=(1, 1, 2, 1), topks=(2, 4, 8, None), n_win=4, head_dim=16,
                              full_heads=None, in_chans=1)

# Parameter counts and FLOPs measured once (``common.count_parameters`` / ``common.measure_flops`` on the meta device)
# at each card's input size; ``tests/test_zoo.py`` re-checks them.
COSTS = {
    "biformer.t": (13_142_760, 4_431_803_136),
    "biformer.s": (25_536_232, 8_927_259_136),
    "biformer.b": (56_804_968, 19_517_980_416),
    "biformer.tiny": (372_018, 10_471_936),
}
FULL_NOTE = ("Published ImageNet-1k configuration (224², 1000 classes, labelled by index imagenet_0000 … imagenet_0999 "
             "in torchvision's IMAGENET1K order); load external weights with weights=PATH. Parameters match the "
             "released definition (T 13.14M / S 25.54M / B 56.80M); FLOPs from FlopCounterMode (conv + matmul, 2 per "
             "MAC) at 1×3×224×224: T 2.22 / S 4.46 / B 9.76 GMACs, as in the README. No deviation in the forward pass; "
             "the released ImageNet-1k checkpoints (README; weights under 'model') load with compat.load_released.")
TINY_NOTE = ("BRA kept (n_win 4: regions 4×4, 2×2, 1×1 at stage maps 16/8/4; top-k 2/4/8; LePE 5×5; full attention + "
             "LePE in stage 4); dims 16/32/64/128, depths 1-1-2-1, head dim 16. Lesion present/absent, 2-logit head. "
             "Measured: val accuracy 0.870 (label prevalence 0.53) on 200 phantom validation images after "
             "`robustbench-med train biformer.tiny` (one thread: 21 s of training).")


def _register() -> None:
    for tag, cfg in (("t", BIFORMER_T), ("s", BIFORMER_S), ("b", BIFORMER_B)):
        name = f"biformer.{tag}"
        card = C.full_card(name, "classification", "natural images (ImageNet-1k backbone)", (3, 224, 224),
                           C.IMAGENET_CLASSES, PAPER, *COSTS[name], FULL_NOTE, routing="bra")
        C.register_zoo(name, card, partial(BiFormer, cfg, 1000), C.IMAGENET_MEAN, C.IMAGENET_STD, STAGE_LAYERS)
    card = C.tiny_card("biformer.tiny", "binary", PAPER, *COSTS["biformer.tiny"], TINY_NOTE, routing="bra")
    C.register_zoo("biformer.tiny", card, partial(BiFormer, BIFORMER_TINY, 2), C.PHANTOM_MEAN, C.PHANTOM_STD,
                   STAGE_LAYERS, recipe=C.tiny_recipe("label", n_train=2000, epochs=4, lr=3e-3))


_register()
