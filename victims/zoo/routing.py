"""Region-routed sparse attention: Bi-Level Routing Attention (BRA) and Dual Sparse Selection Attention (DSSA).

One module, :class:`RoutingAttention`, covers the three attention kinds the zoo needs, selected by options:

* **BRA** (Zhu et al., "BiFormer: Vision Transformer with Bi-Level Routing Attention", CVPR 2023, arXiv 2303.08810).
  The map is cut into ``n_win × n_win`` regions. Region-level routing: the per-region means of Q and K (computed on
  *detached* features, as in the released ``diff_routing=False`` setting) give a region affinity ``A_r = Q_r K_rᵀ``;
  every region keeps its ``topk`` most similar regions. Token-level attention: each query attends to all tokens of
  its routed regions, ``softmax(Q K_gᵀ · scale) V_g``, multi-head, with ``scale = dim**-0.5`` (the full channel
  dimension, not the head dimension, as in the released models). A local context term, a depthwise ``k × k`` conv of
  V (LePE/LCE, ``k = 5`` in the published models), is added before the output projection. ``kv_pool`` adaptively
  average-pools K and V to ``kv_pool²`` tokens per region (the ``ada_avgpool`` mode that HAN/HYATT-Net uses);
  routing still uses the un-pooled region means.
* **DSSA** (Xia, Li, Lan, "MedFormer: Hierarchical Medical Vision Transformer with Content-Aware Dual Sparse
  Selection Attention", arXiv 2507.02488): BRA followed by a pixel-level selection. Every query keeps only its
  ``k₂ = ⌊k₁ · T / pixel_div⌋`` highest scores among the ``k₁ · T`` gathered tokens (``pixel_div = 8`` as released,
  ``T`` = tokens per region) and the softmax runs over those only, with their values gathered per query (the
  released two-gather formulation; equal to masking the other scores to −∞). ``pixel_k_min`` clamps ``k₂`` from
  below: at small maps ``k₂`` can reach 1, where the softmax is constant and Q, K receive no gradient (the tiny
  configurations use a clamp of 4).
* **Full attention with LePE** (``topk=None``; BiFormer's ``AttentionLePE`` used in the last stage): plain
  multi-head self-attention over all tokens with ``scale = head_dim**-0.5``, no bias on the QKV projection, and the
  depthwise LePE conv applied to the (normalised) block input instead of V.

Inputs whose sides are not multiples of ``n_win`` are zero-padded after the block's LayerNorm and cropped afterwards
(the legacy BRA ``auto_pad`` behaviour; padded tokens take part as keys, as released). The published configurations
at their published input sizes need no padding, except HAN's fourth stage (76 rows at 1216 px).

**Gradients.** Routing (and DSSA's pixel selection) is a hard top-k: the selected index sets are piecewise constant
in the input, routing is computed on detached Q/K, and tokens outside the selected regions/pixels receive no gradient
through the attention. Input gradients are therefore sparse and change discontinuously when a routing decision flips.
Gradient-based attacks on these models can be masked; evaluate them with gradient-free (Square) and transfer attacks
alongside white-box ones (the harness flags cells where those win).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from robustbench_med.errors import ConfigError


class RoutingAttention(nn.Module):
    """BRA / DSSA / full attention with LePE on channels-last ``(N, H, W, C)`` tensors (see the module docstring).

    Args:
        dim: channels ``C`` (Q, K and V all have ``C`` channels, as in the published models).
        num_heads: attention heads; ``C`` must be divisible by it.
        n_win: regions per side (``S``); ignored when ``topk`` is ``None``.
        topk: routed regions per query region (clamped to ``S²``); ``None`` for full attention.
        pixel_div: DSSA's divisor, ``k₂ = ⌊k₁·T / pixel_div⌋`` kept tokens per query; ``None`` disables it (BRA).
        pixel_k_min: lower clamp of ``k₂``.
        kv_pool: pool K and V to ``kv_pool²`` tokens per region (``None``: keep all tokens).
        lepe_kernel: kernel of the depthwise local-context conv (0 disables it).
        scale: ``'dim'`` (``C**-0.5``, BRA/DSSA) or ``'head'`` (``(C/heads)**-0.5``, full attention).
        lepe_on: ``'v'`` (BRA/DSSA) or ``'x'`` (the block input, full attention).
        qkv_bias: bias of the QKV projection.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        n_win: int = 7,
        topk: int | None = 4,
        *,
        pixel_div: int | None = None,
        pixel_k_min: int = 1,
        kv_pool: int | None = None,
        lepe_kernel: int = 5,
        scale: str = "dim",
        lepe_on: str = "v",
        qkv_bias: bool = True,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"dim {dim} is not divisible by num_heads {num_heads}")
        if topk is not None and (topk < 1 or n_win < 1):
            raise ConfigError(f"topk and n_win must be >= 1, got topk={topk}, n_win={n_win}")
        if scale not in ("dim", "head") or lepe_on not in ("v", "x"):
            raise ConfigError(f"scale must be 'dim'|'head' and lepe_on 'v'|'x', got {scale!r}, {lepe_on!r}")
        self.dim, self.num_heads, self.n_win, self.topk = dim, num_heads, n_win, topk
        self.pixel_div, self.pixel_k_min, self.kv_pool = pixel_div, pixel_k_min, kv_pool
        self.lepe_on = lepe_on
        self.scale = (dim if scale == "dim" else dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.lepe = nn.Conv2d(dim, dim, lepe_kernel, padding=lepe_kernel // 2, groups=dim) if lepe_kernel else None
        self.proj = nn.Linear(dim, dim)

    def extra_repr(self) -> str:
        kind = "full" if self.topk is None else ("dssa" if self.pixel_div else "bra")
        return (f"{kind}, dim={self.dim}, heads={self.num_heads}, n_win={self.n_win}, topk={self.topk}, "
                f"kv_pool={self.kv_pool}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(N, H, W, C)``; returns the same shape."""
        n, h, w, c = x.shape
        s = 1 if self.topk is None else self.n_win
        pad_b, pad_r = (-h) % s, (-w) % s
        if pad_b or pad_r:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        hp, wp = h + pad_b, w + pad_r
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        rh, rw = hp // s, wp // s
        qr, kr, vr = (_to_regions(t, s, rh, rw) for t in (q, k, v))
        if self.topk is not None:
            idx = self.route(qr, kr)
            if self.kv_pool:
                kr, vr = _pool_regions(kr, rh, rw, self.kv_pool), _pool_regions(vr, rh, rw, self.kv_pool)
            kr, vr = _gather_regions(kr, idx), _gather_regions(vr, idx)
        out = _from_regions(self.attend(qr, kr, vr), s, rh, rw)
        if self.lepe is not None:
            src = v if self.lepe_on == "v" else x
            out = out + self.lepe(src.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        out = self.proj(out)
        return out[:, :h, :w, :] if (pad_b or pad_r) else out

    def route(self, qr: torch.Tensor, kr: torch.Tensor) -> torch.Tensor:
        """Region-level routing: indices ``(N, S², k)`` of the top-k regions by mean-Q · mean-K (detached)."""
        q_mean, k_mean = qr.detach().mean(2), kr.detach().mean(2)
        affinity = q_mean @ k_mean.transpose(-1, -2)
        return affinity.topk(min(self.topk, affinity.shape[-1]), dim=-1).indices

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Token attention per region: ``q (N, S², T, C)`` over gathered ``k, v (N, S², T_kv, C)``."""
        m = self.num_heads
        q, k, v = (t.unflatten(-1, (m, -1)).transpose(2, 3) for t in (q, k, v))
        logits = (q * self.scale) @ k.transpose(-1, -2)
        k2 = self.pixel_k(logits.shape[-1])
        if k2 < logits.shape[-1]:
            out = self.pixel_attend(logits, v, k2)
        else:
            out = logits.softmax(-1) @ v
        return out.transpose(2, 3).flatten(-2)

    def pixel_k(self, total: int) -> int:
        """DSSA's ``k₂ = ⌊total / pixel_div⌋`` clamped to ``[pixel_k_min, total]`` (``total`` without DSSA)."""
        if not self.pixel_div:
            return total
        return min(total, max(self.pixel_k_min, total // self.pixel_div))

    @staticmethod
    def pixel_attend(logits: torch.Tensor, v: torch.Tensor, k2: int) -> torch.Tensor:
        """DSSA's pixel-level selection: softmax over each query's top ``k₂`` scores and the matching values.

        ``logits (…, T, T_kv)``, ``v (…, T_kv, d)`` → ``(…, T, d)``; the same as masking the other scores to −∞.
        """
        scores, idx = logits.topk(k2, dim=-1)
        v_sel = _take(v, idx, item_dims=1)
        return (scores.softmax(-1).unsqueeze(-2) @ v_sel).squeeze(-2)


def _to_regions(t: torch.Tensor, s: int, rh: int, rw: int) -> torch.Tensor:
    """``(N, S·rh, S·rw, C)`` → ``(N, S², rh·rw, C)`` (regions in row-major order)."""
    n, c = t.shape[0], t.shape[-1]
    return t.reshape(n, s, rh, s, rw, c).permute(0, 1, 3, 2, 4, 5).reshape(n, s * s, rh * rw, c)


def _from_regions(t: torch.Tensor, s: int, rh: int, rw: int) -> torch.Tensor:
    """Inverse of :func:`_to_regions`."""
    n, c = t.shape[0], t.shape[-1]
    return t.reshape(n, s, s, rh, rw, c).permute(0, 1, 3, 2, 4, 5).reshape(n, s * rh, s * rw, c)


def _pool_regions(t: torch.Tensor, rh: int, rw: int, size: int) -> torch.Tensor:
    """Adaptive average pooling of every region to ``size × size`` tokens."""
    n, r, _, c = t.shape
    grid = t.reshape(n * r, rh, rw, c).permute(0, 3, 1, 2)
    pooled = F.adaptive_avg_pool2d(grid, size)
    return pooled.flatten(2).transpose(1, 2).reshape(n, r, size * size, c)


def _gather_regions(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Tokens of the routed regions: ``t (N, S², T, C)``, ``idx (N, S², k)`` → ``(N, S², k·T, C)``."""
    return _take(t, idx, item_dims=2).flatten(2, 3)


def _take(src: torch.Tensor, idx: torch.Tensor, item_dims: int) -> torch.Tensor:
    """Batched indexing: ``src (*lead, L, *item)`` with ``idx (*lead, *any)`` in ``[0, L)`` → ``(*lead, *any, *item)``.

    ``item`` has ``item_dims`` dims. Written as one flat index so that the backward pass accumulates into a tensor of
    ``src``'s size (``gather`` on an expanded view would materialise a gradient of the expanded size).
    """
    n_lead = src.dim() - item_dims - 1
    lead, length, item = src.shape[:n_lead], src.shape[n_lead], src.shape[n_lead + 1 :]
    offsets = torch.arange(lead.numel(), device=src.device).view(*lead, *([1] * (idx.dim() - n_lead))) * length
    flat = src.reshape(lead.numel() * length, *item)
    return flat[(idx + offsets).reshape(-1)].view(*idx.shape, *item)
