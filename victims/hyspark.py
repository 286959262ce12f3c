"""A HySparK-style hybrid CNN–transformer segmentor on the volume phantom, and its from-scratch control (issue #20).

HySparK (Tang, Xu, Yao, Fu, Quan, Zhu, Liu & Zhou, "HySparK: Hybrid Sparse Masking for Large Scale Medical Image
Pre-Training", MICCAI 2024, arXiv 2408.05815) pre-trains a hybrid encoder — CNN stages at high resolution, vision
transformer blocks at the lowest one — by *sparse* masked image modelling on unlabelled CT, then fine-tunes it for
segmentation. The pair of victims here asks whether that pre-training changes robustness:

| victim | encoder initialisation | fine-tuning |
|---|---|---|
| ``hyspark.phantom`` | masked pre-training on the 160 training volumes' 32³ patches, **no labels** | 160 labelled volumes |
| ``hybrid3d.scratch`` | random (same seed) | the same recipe, the same batches |

**Network** (:class:`HybridSegmenter`, 32³ patches, used by sliding-window inference as the other volume victims):
encoder (:class:`HybridEncoder`) = full-resolution stem (conv 3³, 1→8) → stage 1 at 1/2 (2³ strided conv to 16
channels, one residual block of two 3³ convs) → stage 2 at 1/4 (32 channels, the same) → 2³ strided "patch embedding"
to 96-d tokens at 1/8 (a 32³ patch is 4³ = 64 tokens, each an 8³-voxel cube) + fixed 3D sin-cos position embedding →
2 pre-norm transformer blocks (4 heads, MLP ×4) → layer norm. Every norm in the CNN part is a per-voxel layer norm
over channels, GELU activations. Segmentation decoder (:class:`SegDecoder`, UNet-style): transposed 2³ convs up
1/8 → 1/4 → 1/2 → 1, each concatenated with the encoder feature map of that scale (skip) and fused by a 3³ conv
(1³ at full resolution, where a 3³ conv would double the network's cost), then a 1³ head to the 6 classes.
Reconstruction decoder (:class:`ReconDecoder`, pre-training only, discarded after it as HySparK's is): the hierarchy
1/8, 1/4, 1/2 "densified" — masked positions filled with a learnt mask token per scale, projected (1³ at the
bottom, 3³ above) — summed into a light upsampling decoder and a final transposed conv to one channel at full
resolution. Sizes (:func:`parameter_counts`): encoder 323,456 parameters (223,872 of them in the two transformer
blocks and the final norm), segmentation decoder 99,222, reconstruction decoder 117,121; a fine-tuning step costs
about what a step of ``unet3d.phantom``'s MONAI UNet does (1.05×, measured interleaved on 2 threads), a
pre-training step 0.8×.

**Pre-training** (:func:`pretrain`): each 32³ patch's 64 token cubes are masked at random, ``mask_ratio`` 0.6 (26
visible); the mask is drawn at the token grid and expanded *bottom-up* to every CNN resolution, so the CNN and the
transformer hide the same cubes. The CNN branch is "sparse" by masked dense convolution: the input is zeroed on
masked cubes and every conv and norm output is multiplied by the mask again, so masked positions stay exactly zero
at every stage and a visible position's features are a function of visible voxels only (what a submanifold sparse
convolution computes; no "mask pattern vanishing"); the transformer receives the visible tokens only (gathered, as
MAE's encoder), and its outputs are scattered back into the grid. The decoder reconstructs every voxel; the loss is
the mean squared error over the **masked** cubes only, against per-cube normalised targets (each 8³ cube of the
normalised input minus its mean, divided by its standard deviation). 300 steps of 4 patches (each a random
32³ crop of a random training volume, a fresh mask each time), AdamW (lr 2e-3, weight decay 0.04 as the authors'
script), one-cycle schedule.
**Fine-tuning** (:func:`train_hybrid`): the (pre-trained or random) encoder plus a fresh segmentation decoder,
trained end to end, without any mask, exactly as :func:`~robustbench_med.victims.volumes.train_volume_segmentor`
trains the MONAI networks (random 32³ patches, class-weighted CE + batch soft Dice, AdamW, one-cycle); both victims
draw identical patches from the same seed (500 steps of 4, lr 3e-3), so they differ by the encoder's
initialisation only (the control therefore also has 300 fewer gradient steps in all).

**What is verified and what is not.** *From the paper's abstract* (arXiv 2408.05815; the body was not available
to read here): a hybrid CNN–transformer encoder; a "bottom-up 3D hybrid masking strategy on the encoder to keep
consistency masking"; sparse convolution for the top CNNs and only the unmasked patches encoded by the bottom vision
transformers; "a simple hierarchical decoder with skip-connections" for dense multi-scale feature reconstruction;
pre-training on a collection of large-scale 3D medical data sets. *From the authors' released code*
(github.com/FengheTan9/HySparK: ``hyspark.py``, ``models/encoder.py``, ``models/network/hyspark_model.py``,
``utils/arg_util.py``; studied, not copied): the random mask is drawn at the encoder's lowest grid (one token per
16³ voxels of a 96³ patch) and repeated up to each CNN resolution (that is the "bottom-up" masking); sparse
convolution is emulated by multiplying every conv (and pooling) output by the mask, norms are computed on visible
positions only; the ViT gathers the visible tokens and puts a mask token back at the others after its blocks; the
decoder input of each scale is "densified" (masked positions filled with a learnt per-scale mask token, then a
projection, 1³ at the bottom and 3³ above; from SparK, Tian et al., ICLR 2023); the loss is the MSE on masked patches
only against per-patch normalised targets; mask ratio 0.6 (model default; the script's default is 0.75, and the
released checkpoint's name says mask75); fixed 3D sin-cos position embedding; MedNeXt blocks with per-voxel channel
layer norm, channels 32–384, 3 ViT blocks at 1/16; AdamW with weight decay 0.04; fine-tuning loads the encoder into
a network with a fresh UNet-style decoder (the pre-training decoder is dropped). *Third-party summaries only*: 13
public CT data sets, transfer to BTCV and MSD. **Inferred / simplified here** (hence "-style"): all sizes (32³
patches, channels 8–32, plain residual 3³ conv blocks, 2 ViT blocks of width 96 at 1/8, so a mask unit is an 8³
cube); per-voxel layer norm everywhere in the CNN (no batch norm, so no masked batch statistics are needed); 300
pre-training steps on the 160 phantom training volumes (the script: 100 epochs of large CT collections); our own
light reconstruction and segmentation decoders (not SparK's LightDecoder or the paper's MedNeXt fusion blocks); the
fine-tuning schedule is this suite's, with one learning rate for encoder and decoder (the paper's downstream
schedule is not reproduced).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from robustbench_med.registry import DATASETS, VICTIMS, register_victim
from robustbench_med.training import segmentation_class_weights
from robustbench_med.victim import ModelVictim, VictimCard
from robustbench_med.victims.basic import SEG_CLASSES
from robustbench_med.victims.volumes import (VOLUME_INPUT, VOLUME_MEAN, VOLUME_STD, WINDOW, VolumeRecipe, _batches,
                                             _crop, optimise, supervised_loss)

TRAINER_VERSION = 1
WIDTHS = (8, 16, 32)  # full resolution, 1/2, 1/4
DIM, DEPTH, HEADS = 96, 2, 4  # transformer at 1/8
UNIT = 8  # voxels per mask unit (= one token) along each axis: the encoder's total downsampling

Remask = Callable[[torch.Tensor], torch.Tensor]


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def expand_mask(keep: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """The token-grid mask ``keep`` (B, 1, g, g, g; True = visible) repeated up to spatial ``size`` (a multiple),
    as a float mask: HySparK's bottom-up masking, one mask for every resolution."""
    factors = [s // g for s, g in zip(size, keep.shape[2:])]
    m = keep.to(torch.float32)
    for axis, f in enumerate(factors):
        m = m.repeat_interleave(f, dim=2 + axis)
    return m


def _remasker(keep: torch.Tensor | None) -> Remask:
    if keep is None:
        return _identity
    return lambda t: t * expand_mask(keep, t.shape[2:]).to(t.dtype)


class ChannelNorm(nn.Module):
    """Layer norm over the channels of each voxel (channels-first; ConvNeXt / MedNeXt style). Per-voxel statistics
    need no masked variant: a visible voxel's output never depends on another voxel."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.movedim(1, -1), (x.shape[1],), self.weight, self.bias, self.eps)
        return y.movedim(-1, 1)


class ConvNorm(nn.Module):
    """conv → (re-mask) → channel norm → (re-mask) → GELU (GELU(0) = 0, so masked positions stay zero)."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, act: bool = True):
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, kernel, stride=stride, padding=(kernel - 1) // 2 if stride == 1 else 0)
        self.norm = ChannelNorm(cout)
        self.act = act

    def forward(self, x: torch.Tensor, sp: Remask = _identity) -> torch.Tensor:
        x = sp(self.norm(sp(self.conv(x))))
        return F.gelu(x) if self.act else x


class ResBlock(nn.Module):
    """Two 3³ conv–norm units with an identity shortcut, GELU after the sum."""

    def __init__(self, channels: int):
        super().__init__()
        self.a = ConvNorm(channels, channels)
        self.b = ConvNorm(channels, channels, act=False)

    def forward(self, x: torch.Tensor, sp: Remask = _identity) -> torch.Tensor:
        return F.gelu(x + self.b(self.a(x, sp), sp))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-2, -1) / math.sqrt(d // self.heads)).softmax(-1)
        return self.proj((att @ v).transpose(1, 2).reshape(b, n, d))


class TransformerBlock(nn.Module):
    """Pre-norm ViT block: x + MHSA(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def sincos_position_embedding(grid: Sequence[int], dim: int) -> torch.Tensor:
    """Fixed 3D sin-cos position embedding, [g_d·g_h·g_w, dim] (dim / 6 frequencies per axis, as HySparK's ViT)."""
    if dim % 6:
        raise ValueError(f"the 3D sin-cos position embedding needs a dimension divisible by 6, got {dim}")
    n = dim // 6
    omega = 1.0 / 10000 ** (torch.arange(n, dtype=torch.float32) / n)
    axes = torch.meshgrid(*[torch.arange(g, dtype=torch.float32) for g in grid], indexing="ij")
    parts = []
    for a in axes:
        ang = a.flatten()[:, None] * omega[None]
        parts += [ang.sin(), ang.cos()]
    return torch.cat(parts, 1)


class HybridEncoder(nn.Module):
    """CNN stages at full, 1/2 and 1/4 resolution, transformer blocks on 1/8-resolution tokens (module docstring).

    ``forward(z, keep)`` returns the feature maps ``[f0 (1), f1 (1/2), f2 (1/4), tokens (1/8)]``. With ``keep``
    (B, 1, g, g, g) bool, True = visible, every CNN feature is re-masked after each conv and norm (masked dense =
    sparse convolution) and the transformer sees the visible tokens only; masked positions of every output are 0.
    """

    def __init__(self, in_ch: int = 1, widths: Sequence[int] = WIDTHS, dim: int = DIM, depth: int = DEPTH,
                 heads: int = HEADS, mlp_ratio: float = 4.0):
        super().__init__()
        w0, w1, w2 = widths
        self.widths, self.dim = tuple(widths), dim
        self.stem = ConvNorm(in_ch, w0)
        self.down1, self.block1 = ConvNorm(w0, w1, 2, 2), ResBlock(w1)
        self.down2, self.block2 = ConvNorm(w1, w2, 2, 2), ResBlock(w2)
        self.embed = nn.Conv3d(w2, dim, 2, stride=2)
        self.blocks = nn.ModuleList([TransformerBlock(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, z: torch.Tensor, keep: torch.Tensor | None = None) -> list[torch.Tensor]:
        sp = _remasker(keep)
        f0 = self.stem(sp(z), sp)
        f1 = self.block1(self.down1(f0, sp), sp)
        f2 = self.block2(self.down2(f1, sp), sp)
        return [f0, f1, f2, self.transform(sp(self.embed(f2)), keep)]

    def transform(self, t: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """The transformer on the token map ``t`` (B, dim, g, g, g): all tokens, or with ``keep`` only the visible
        ones (the same number per sample), scattered back into a zero grid."""
        b, d, *grid = t.shape
        x = t.flatten(2).transpose(1, 2) + sincos_position_embedding(grid, d).to(t)
        if keep is None:
            return self._blocks(x).transpose(1, 2).reshape(b, d, *grid)
        vis = keep.flatten(1)
        counts = vis.sum(1)
        if not bool((counts == counts[0]).all()):
            raise ValueError("every sample must keep the same number of tokens")
        idx = vis.to(torch.int64).argsort(dim=1, descending=True, stable=True)[:, : int(counts[0])]
        idx = idx.sort(1).values.unsqueeze(-1).expand(-1, -1, d)
        y = self._blocks(torch.gather(x, 1, idx))
        out = torch.zeros_like(x).scatter(1, idx, y)
        return out.transpose(1, 2).reshape(b, d, *grid)

    def _blocks(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


class SegDecoder(nn.Module):
    """UNet-style decoder: transposed-conv upsampling, concatenation with the encoder's skip features, 3³ fusion."""

    def __init__(self, widths: Sequence[int] = WIDTHS, dim: int = DIM, n_classes: int = len(SEG_CLASSES)):
        super().__init__()
        w0, w1, w2 = widths
        self.up3, self.fuse3 = nn.ConvTranspose3d(dim, w2, 2, stride=2), ConvNorm(2 * w2, w2)
        self.up2, self.fuse2 = nn.ConvTranspose3d(w2, w1, 2, stride=2), ConvNorm(2 * w1, w1)
        self.up1, self.fuse1 = nn.ConvTranspose3d(w1, w0, 2, stride=2), ConvNorm(2 * w0, w0, 1)  # 1³: full resolution is costly
        self.head = nn.Conv3d(w0, n_classes, 1)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        f0, f1, f2, t = feats
        d = self.fuse3(torch.cat([self.up3(t), f2], 1))
        d = self.fuse2(torch.cat([self.up2(d), f1], 1))
        d = self.fuse1(torch.cat([self.up1(d), f0], 1))
        return self.head(d)


class HybridSegmenter(nn.Module):
    """Encoder + segmentation decoder: normalised volume patch → class logits at full resolution."""

    def __init__(self, in_ch: int = 1, n_classes: int = len(SEG_CLASSES), widths: Sequence[int] = WIDTHS,
                 dim: int = DIM, depth: int = DEPTH, heads: int = HEADS):
        super().__init__()
        self.encoder = HybridEncoder(in_ch, widths, dim, depth, heads)
        self.decoder = SegDecoder(widths, dim, n_classes)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(z))


class ReconDecoder(nn.Module):
    """Pre-training decoder: densify each scale (mask token at masked positions, then a projection), sum into a
    light hierarchical decoder, reconstruct one channel at full resolution."""

    def __init__(self, widths: Sequence[int] = WIDTHS, dim: int = DIM, out_ch: int = 1):
        super().__init__()
        _, w1, w2 = widths
        chans = (dim, w2, w1)  # bottom (1/8) to top (1/2)
        self.mask_tokens = nn.ParameterList([nn.Parameter(torch.randn(1, c, 1, 1, 1) * 0.02) for c in chans])
        self.projs = nn.ModuleList([nn.Conv3d(c, c, 1 if i == 0 else 3, padding=0 if i == 0 else 1) for i, c in enumerate(chans)])
        self.ups = nn.ModuleList([nn.ConvTranspose3d(dim, w2, 2, stride=2), nn.ConvTranspose3d(w2, w1, 2, stride=2)])
        self.blocks = nn.ModuleList([ConvNorm(dim, dim, 1), ConvNorm(w2, w2), ConvNorm(w1, w1)])
        self.out = nn.ConvTranspose3d(w1, out_ch, 2, stride=2)

    @classmethod
    def for_encoder(cls, encoder: HybridEncoder, out_ch: int = 1) -> "ReconDecoder":
        return cls(encoder.widths, encoder.dim, out_ch)

    def forward(self, feats: Sequence[torch.Tensor], keep: torch.Tensor) -> torch.Tensor:
        _, f1, f2, t = feats
        dense = []
        for f, token, proj in zip((t, f2, f1), self.mask_tokens, self.projs):
            visible = expand_mask(keep, f.shape[2:]).to(f.dtype)
            dense.append(proj(f * visible + token * (1 - visible)))
        d = self.blocks[0](dense[0])
        d = self.blocks[1](self.ups[0](d) + dense[1])
        d = self.blocks[2](self.ups[1](d) + dense[2])
        return self.out(d)


def random_keep(b: int, grid: Sequence[int], mask_ratio: float, gen: torch.Generator) -> torch.Tensor:
    """A random visible-token mask (B, 1, *grid), True = visible, the same count per sample: round(L (1 − ratio))."""
    n = int(torch.tensor(grid).prod())
    keep_n = max(1, round(n * (1 - mask_ratio)))
    order = torch.rand(b, n, generator=gen).argsort(1)
    keep = torch.zeros(b, n, dtype=torch.bool).scatter(1, order[:, :keep_n], True)
    return keep.view(b, 1, *grid)


def patchify(x: torch.Tensor, unit: int = UNIT) -> torch.Tensor:
    """(B, C, D, H, W) → (B, L, C·unit³): the voxels of each ``unit``³ cube, cubes in token-grid (row-major) order."""
    b, c, *size = x.shape
    g = [s // unit for s in size]
    x = x.reshape(b, c, g[0], unit, g[1], unit, g[2], unit)
    return x.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, g[0] * g[1] * g[2], -1)


def masked_patch_loss(pred: torch.Tensor, z: torch.Tensor, keep: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """MSE between the reconstruction ``pred`` and the per-cube normalised input ``z``, averaged over the masked
    (not visible) cubes only."""
    target = patchify(z)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + eps).sqrt()
    per_cube = (patchify(pred) - target).pow(2).mean(-1)
    hidden = (~keep.flatten(1)).to(per_cube.dtype)
    return (per_cube * hidden).sum() / hidden.sum().clamp_min(1)


def mim_loss(encoder: HybridEncoder, decoder: ReconDecoder, z: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The sparse masked-image-modelling loss of one batch of patches ``z`` under the mask ``keep``."""
    return masked_patch_loss(decoder(encoder(z, keep), keep), z, keep)


@dataclass(frozen=True)
class HybridRecipe(VolumeRecipe):
    """:class:`VolumeRecipe` fine-tuning, preceded by ``pretrain_steps`` steps of sparse masked pre-training on
    unlabelled patches of all training volumes (0: from scratch)."""

    steps: int = 500
    pretrain_steps: int = 0
    pretrain_batch_size: int = 4
    pretrain_lr: float = 2e-3
    pretrain_weight_decay: float = 0.04
    mask_ratio: float = 0.6


def pretrain(encoder: HybridEncoder, z: torch.Tensor, recipe: HybridRecipe, gen: torch.Generator,
             z_val: torch.Tensor | None = None, progress: bool = False) -> dict:
    """Sparse masked pre-training of ``encoder`` on random patches of the normalised volumes ``z`` (no labels);
    returns the loss record (first / last 20 steps' mean; the masked loss on fixed patches of ``z_val`` before and
    after, and that of predicting each cube's mean)."""
    device = z.device
    decoder = ReconDecoder.for_encoder(encoder, z.shape[1]).to(device)
    fixed = _fixed_val_batch(z_val, recipe, device) if z_val is not None else None
    record: dict = {"steps": recipe.pretrain_steps, "mask_ratio": recipe.mask_ratio}
    if fixed is not None:
        record["val_loss_init"] = _val_loss(encoder, decoder, *fixed)
        zv, kv = fixed
        record["val_loss_cube_mean"] = float(masked_patch_loss(torch.zeros_like(zv), zv, kv))
    start, batches = time.perf_counter(), _batches(len(z), recipe.pretrain_batch_size, gen)

    def step_loss(_step: int) -> torch.Tensor:
        xb, _ = _crop(z[next(batches).to(device)], None, gen)
        keep = random_keep(len(xb), [s // UNIT for s in xb.shape[2:]], recipe.mask_ratio, gen).to(device)
        return mim_loss(encoder, decoder, xb, keep)

    encoder.train()
    decoder.train()
    losses = optimise(list(encoder.parameters()) + list(decoder.parameters()), recipe.pretrain_steps, recipe.pretrain_lr,
                      recipe.pretrain_weight_decay, step_loss, "pre-train (masked)", progress)
    k = min(20, len(losses))
    record.update(loss_start=sum(losses[:k]) / k, loss_end=sum(losses[-k:]) / k, seconds=round(time.perf_counter() - start, 1))
    if fixed is not None:
        record["val_loss_end"] = _val_loss(encoder, decoder, *fixed)
    return record


def _fixed_val_batch(z_val: torch.Tensor, recipe: HybridRecipe, device) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(recipe.seed + 12345)
    zv, _ = _crop(z_val, None, gen)
    keep = random_keep(len(zv), [s // UNIT for s in zv.shape[2:]], recipe.mask_ratio, gen)
    return zv.to(device), keep.to(device)


@torch.no_grad()
def _val_loss(encoder: HybridEncoder, decoder: ReconDecoder, zv: torch.Tensor, keep: torch.Tensor) -> float:
    encoder.eval()
    decoder.eval()
    out = [mim_loss(encoder, decoder, zv[i:i + 8], keep[i:i + 8]) * len(zv[i:i + 8]) for i in range(0, len(zv), 8)]
    return float(sum(out) / len(zv))


def train_hybrid(name: str, path: Path, device: torch.device, progress: bool) -> None:
    """Train registered hybrid victim ``name``: masked pre-training of its encoder when the recipe asks for it, then
    supervised fine-tuning of encoder + segmentation decoder; save the weights with both stages' record."""
    from robustbench_med.training import _eval_metric
    from robustbench_med.weights import save_weights
    from robustbench_med.wrap import build_victim

    recipe: HybridRecipe = VICTIMS.get(name).meta["recipe"]
    torch.manual_seed(recipe.seed)
    victim = build_victim(name).to(device)
    train = DATASETS.create(recipe.dataset, split="train", n=recipe.n_train)
    val = DATASETS.create(recipe.dataset, split="val", n=recipe.n_val)
    x, y = train.images().to(device), train.targets(recipe.target_field).to(device)
    xv, yv = val.images().to(device), val.targets(recipe.target_field).to(device)
    z, zv = (x - victim.mean) / victim.std, (xv - victim.mean) / victim.std
    start = time.perf_counter()
    pre = None
    if recipe.pretrain_steps > 0:  # labels unused: images of all training volumes
        pre = pretrain(victim.net.encoder, z, recipe, torch.Generator().manual_seed(recipe.seed + 1), zv, progress)
    ft_start = time.perf_counter()
    n_lab = recipe.n_labelled or len(train)
    weights = segmentation_class_weights(y[:n_lab], len(victim.card.classes)).to(device)
    gen = torch.Generator().manual_seed(recipe.seed)  # the same patches for the pre-trained and the scratch victim
    batches = _batches(n_lab, recipe.batch_size, gen)
    victim.net.train()
    losses = optimise(victim.net.parameters(), recipe.steps, recipe.lr, recipe.weight_decay,
                      lambda _step: supervised_loss(victim.net, z, y, next(batches), gen, weights), f"train {name}", progress)
    k = min(20, len(losses))
    finetune = {"steps": recipe.steps, "loss_start": sum(losses[:k]) / k, "loss_end": sum(losses[-k:]) / k,
                "seconds": round(time.perf_counter() - ft_start, 1)}
    val_metric = _eval_metric(victim, xv, yv, 8)
    save_weights(victim, path, {"victim": name, "recipe": asdict(recipe), "train_fingerprint": train.fingerprint(),
                                "val_metric": {victim.spec.metric: val_metric}, "pretrain": pre, "finetune": finetune,
                                "train_seconds": round(time.perf_counter() - start, 1), "trainer_version": TRAINER_VERSION,
                                "train_threads": torch.get_num_threads(), "params": parameter_counts(),
                                "torch": torch.__version__})


def parameter_counts() -> dict[str, int]:
    """Parameters of the encoder, segmentation decoder and reconstruction decoder (built on the meta device: no
    memory, no draw from the global generator)."""
    with torch.device("meta"):
        net = HybridSegmenter()
        rec = ReconDecoder.for_encoder(net.encoder)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return {"encoder": count(net.encoder), "seg_decoder": count(net.decoder), "recon_decoder": count(rec)}


PAPER = ("HySparK: Hybrid Sparse Masking for Large Scale Medical Image Pre-Training (Tang et al., MICCAI 2024, "
         "arXiv 2408.05815)")
SIMPLIFIED = ("Simplified: 32³ patches, CNN stages 8/16/32 channels at 1, 1/2, 1/4, 2 transformer blocks (dim 96) on 8³-voxel "
              "tokens at 1/8; sparse convolution emulated by re-masking; pre-trained on the 160 phantom training volumes "
              "only (a few hundred steps); own light decoders.")


def _card(name: str, paper: str, notes: str, **extra) -> VictimCard:
    return VictimCard(name=name, task="segmentation", modality="CT (volume phantom)", input_size=VOLUME_INPUT,
                      classes=SEG_CLASSES, paper=paper, notes=notes, extra=extra)


CARDS = {
    "hyspark.phantom": _card(
        "hyspark.phantom", PAPER,
        "HySparK-style hybrid CNN–transformer encoder pre-trained by sparse masked image modelling (mask ratio 0.6 of "
        "8³ cubes, no labels), then fine-tuned with a UNet-style decoder on 32³ patches; sliding-window inference. "
        + SIMPLIFIED, baseline="hybrid3d.scratch", pretraining="sparse masked image modelling (HySparK-style)"),
    "hybrid3d.scratch": _card(
        "hybrid3d.scratch", "Control for hyspark.phantom: the same hybrid CNN–transformer, no pre-training (this suite)",
        "hyspark.phantom's architecture and fine-tuning recipe (same seed, same patches) from random initialisation; "
        "sliding-window inference.", pretraining=None),
}

RECIPES = {
    "hyspark.phantom": HybridRecipe(pretrain_steps=300),
    "hybrid3d.scratch": HybridRecipe(),
}


def _register(name: str) -> None:
    def factory() -> ModelVictim:
        return ModelVictim(HybridSegmenter(), CARDS[name], VOLUME_MEAN, VOLUME_STD, window=WINDOW)

    factory.__doc__ = f"{name}: {CARDS[name].notes}"
    register_victim(name, card=CARDS[name], recipe=RECIPES[name], trainer=train_hybrid,
                    trainer_version=TRAINER_VERSION)(factory)


_register("hyspark.phantom")
_register("hybrid3d.scratch")
