"""HAN / HYATT-Net (Zhou, Huang et al., "Hybrid Attention Network: An efficient approach for anatomy-free landmark
detection" / "HYATT-Net is Grand: A Hybrid Attention Network for Performant Anatomical Landmark Detection",
arXiv 2412.06499): landmark detection by heatmap regression with deep supervision.

Backbone (``HTC``): per stage a patch embedding (Conv k4 s2 p1 + BN; every stage halves the resolution, H/2 … H/32),
**one BiFormer block** with BRA whose K/V are adaptive-average-pooled to 4×4 tokens per region, then one attention
residual module (ARM / CAB): Conv3×3-BN-ReLU → dilated Conv3×3-BN → CBAM (Woo et al., ECCV 2018: channel MLP ratio 16
on avg + max pooling, 7×7 spatial conv on [mean, max]) → + Conv3×3 projection shortcut → ReLU. Neck (FFCM): drop the
first stage, lateral Conv3×3 to 256, top-down nearest upsampling and addition, Conv3×3 on the finest map (H/4).
Heads: a keypoint head at H/4 (Conv3×3-ReLU-Conv1×1), a "distance" head (Deconv 4×4 s2-BN-ReLU → Conv3×3-ReLU-
Conv1×1) at H/2, and a global head at full resolution on [deconv feature; image ↓2 → Conv1×1-BN-ReLU to 32; the H/2
heatmaps] (Conv3×3-ReLU-Conv1×1, bilinear ×2). Training minimises the three heatmap MSEs with weights 1000 (H/4),
3000 (H/2) and 3000 (full). Published (ISBI 2015 cephalometry): 1216×1024 (H×W) RGB input, 19 landmarks, stage
channels 64/128/320/512/1024, n_win 16/16/16/8/8, top-k 1/4/8/16/full, heads 2/4/10/16 (full attention: 8), MLP ratio
8/8/8/4/4, LePE 5×5, padding to the regions.

The victim's output is the full-resolution heatmap of the global head; :class:`DeepSupervisedLandmarkVictim` adds the
H/4 and H/2 terms to :meth:`loss` whenever the output comes from its own forward pass.

**Prediction.** By default (``inference='released'``) the victim predicts as the released detector's ``forward_test``
(``top_down_2head_neck.py``, ``flip_test=True``, ``shift_heatmap=True``, ``post_process='default'``): in eval mode the
flipped image is also run, each head's flipped heatmaps are flipped back (channels of mirrored landmark pairs
swapped, then shifted one pixel right) and averaged with the unflipped ones; every head's heatmaps are decoded (argmax
plus a quarter-pixel step towards the higher neighbour) and mapped to input pixels, and the prediction is the mean of
the three heads' coordinates. The victim's output (what attacks differentiate) is the flip-averaged full-resolution
heatmap. ``inference='full_head'`` (no flip pass; prediction = argmax of the full-resolution heatmap) is the
single-head option and was the behaviour before this change. Training (train mode) runs no flip pass in either mode.
Coordinates of the coarser heads map to input pixels by the inverse of the mapping their training targets use
(pixel centres, ``x_in = (x + 0.5) / s − 0.5``), not mmpose's bounding-box transform, which has no counterpart here.

Deviations from the released code: the neck's unused layers (a ``double_conv`` and the 3×3 output convs of the three
coarser levels, whose results are discarded) and the global head's unused ``w2_conv`` are not built. The released
``heads/__init__.py`` imports modules missing from the repository; nothing of that is needed here. The forward pass
has no deviation, so there is no separate compat mode; no trained HYATT-Net checkpoint is published.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakTensorKeyDictionary

from robustbench_med import tasks as T
from robustbench_med.errors import ConfigError
from robustbench_med.victim import ModelVictim, eval_mode, validate_images
from robustbench_med.victims.zoo import common as C
from robustbench_med.victims.zoo.biformer import PyramidConfig, RoutedBlock, init_transformer_weights, make_attention

PAPER = (
    "Zhou, Huang et al., HYATT-Net is Grand: A Hybrid Attention Network for Performant Anatomical Landmark "
    "Detection (v1: Hybrid Attention Network), arXiv 2412.06499"
)


@dataclass(frozen=True)
class HANConfig:
    """HAN sizes: per-stage dims, n_win, top-k (``None`` = full), heads, MLP ratios; neck width; K/V pooling."""

    dims: tuple[int, ...] = (64, 128, 320, 512, 1024)
    n_wins: tuple[int, ...] = (16, 16, 16, 8, 8)
    topks: tuple[int | None, ...] = (1, 4, 8, 16, None)
    heads: tuple[int, ...] = (2, 4, 10, 16, 8)
    mlp_ratios: tuple[float, ...] = (8, 8, 8, 4, 4)
    neck: int = 256
    kv_pool: int | None = 4
    in_chans: int = 3
    image_feat: int = 32


class CBAM(nn.Module):
    """Convolutional block attention (Woo et al., ECCV 2018): channel gate (shared MLP on avg/max) then spatial gate."""

    def __init__(self, c: int, ratio: int = 16, kernel: int = 7) -> None:
        super().__init__()
        hidden = max(c // ratio, 1)
        self.mlp = nn.Sequential(C.PointwiseConv(c, hidden, bias=False), nn.ReLU(),
                                 C.PointwiseConv(hidden, c, bias=False))
        self.spatial = nn.Conv2d(2, 1, kernel, padding=kernel // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * (self.mlp(x.mean((2, 3), keepdim=True)) + self.mlp(x.amax((2, 3), keepdim=True))).sigmoid()
        return x * self.spatial(torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1)).sigmoid()


class AttentionResidual(nn.Module):
    """ARM / CAB (Zhou et al.): Conv3×3-BN-ReLU → dilated Conv3×3-BN → CBAM, plus a Conv3×3 shortcut, ReLU."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c, c, 3, padding=1, bias=False),
            nn.BatchNorm2d(c),
            nn.ReLU(inplace=True),
            nn.Conv2d(c, c, 3, padding=2, dilation=2, bias=False),
            nn.BatchNorm2d(c),
            CBAM(c),
        )
        self.shortcut = nn.Conv2d(c, c, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


class HANStage(nn.Module):
    """Patch embedding (Conv k4 s2 p1 + BN), one routed BiFormer block, one attention residual module."""

    def __init__(self, cin: int, dim: int, block: RoutedBlock) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Conv2d(cin, dim, 4, stride=2, padding=1), nn.BatchNorm2d(dim))
        self.block = block
        self.arm = AttentionResidual(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.arm(self.block(self.embed(x)))


def _conv_head(cin: int, mid: int, k: int) -> nn.Sequential:
    """Conv3×3-ReLU-Conv1×1 heatmap head (final conv initialised at std 0.001, as released)."""
    head = nn.Sequential(nn.Conv2d(cin, mid, 3, padding=1), nn.ReLU(inplace=True), C.PointwiseConv(mid, k))
    nn.init.normal_(head[2].weight, std=0.001)
    nn.init.zeros_(head[2].bias)
    return head


class HAN(nn.Module):
    """HAN backbone + FFCM neck + three heatmap heads (see the module docstring).

    ``forward`` returns the full-resolution heatmaps; :meth:`forward_all` also returns the H/4 and H/2 heatmaps for
    deep supervision.
    """

    def __init__(self, cfg: HANConfig, num_landmarks: int) -> None:
        super().__init__()
        stages, cin = [], cfg.in_chans
        for dim, n_win, topk, heads, mlp in zip(cfg.dims, cfg.n_wins, cfg.topks, cfg.heads, cfg.mlp_ratios):
            pyr = PyramidConfig(
                dims=(dim,),
                depths=(1,),
                topks=(topk,),
                n_win=n_win,
                mlp_ratio=mlp,
                full_heads=heads,
                kv_pool=cfg.kv_pool,
            )
            stages.append(HANStage(cin, dim, RoutedBlock(dim, make_attention(pyr, dim, topk, heads), mlp)))
            cin = dim
        self.stages = nn.ModuleList(stages)
        self.laterals = nn.ModuleList(nn.Conv2d(d, cfg.neck, 3, padding=1) for d in cfg.dims[1:])
        self.neck_out = nn.Conv2d(cfg.neck, cfg.neck, 3, padding=1)
        self.keypoint_head = _conv_head(cfg.neck, cfg.neck, num_landmarks)
        self.deconv = nn.Sequential(
            nn.ConvTranspose2d(cfg.neck, cfg.neck, 4, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(cfg.neck),
            nn.ReLU(inplace=True),
        )
        self.distance_head = _conv_head(cfg.neck, cfg.neck, num_landmarks)
        self.image_conv = nn.Sequential(
            C.PointwiseConv(cfg.in_chans, cfg.image_feat), nn.BatchNorm2d(cfg.image_feat), nn.ReLU(inplace=True)
        )
        fused = cfg.neck + cfg.image_feat + num_landmarks
        self.global_head = _conv_head(fused, fused, num_landmarks)
        self.apply(init_transformer_weights)

    def neck(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """FFCM: lateral convs on stages 2…, top-down nearest upsampling + add, conv on the finest level (H/4)."""
        lat = [conv(f) for conv, f in zip(self.laterals, feats[1:])]
        for i in range(len(lat) - 1, 0, -1):
            lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[-2:], mode="nearest")
        return self.neck_out(lat[0])

    def forward_all(self, z: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Full-resolution heatmaps and the deep-supervision heatmaps ``[H/4, H/2]``."""
        feats, x = [], z
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        neck = self.neck(feats)
        quarter = self.keypoint_head(neck)
        feat_half = self.deconv(neck)
        half = self.distance_head(feat_half)
        image = self.image_conv(F.interpolate(z, size=feat_half.shape[-2:], mode="nearest"))
        full = self.global_head(torch.cat([feat_half, image, half], 1))
        full = F.interpolate(full, size=z.shape[-2:], mode="bilinear", align_corners=True)
        return full, [quarter, half]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.forward_all(z)[0]


INFERENCE_MODES = ("released", "full_head")


class DeepSupervisedLandmarkVictim(ModelVictim):
    """A landmark victim whose :meth:`loss` adds HAN's deep-supervision terms (Zhou et al., arXiv 2412.06499) and
    whose prediction is the released three-head, flip-tested inference (module docstring).

    ``loss = w_full·MSE(full) + w_quarter·MSE(H/4) + w_half·MSE(H/2)`` with Gaussian targets (``card.extra``:
    ``ds_weights`` = (w_full, w_quarter, w_half), ``ds_sigmas`` = the H/4 and H/2 target sigmas in their own pixels;
    the full-resolution sigma is ``heatmap_sigma``). The side outputs are looked up by the identity of the output
    tensor, so the extra terms (and the three-head prediction) apply to outputs of this victim's forward pass; for any
    other tensor (a transformed or decoded output) the loss is the weighted full-resolution term alone and the
    prediction is that tensor's argmax.

    ``inference``: ``'released'`` (default; ``card.extra['inference']`` overrides it) or ``'full_head'``; settable on
    the instance. ``card.extra['flip_pairs']`` lists the mirrored landmark index pairs swapped by flip testing.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._side_outputs = WeakTensorKeyDictionary()
        self.ds_weights = tuple(float(w) for w in self.card.extra.get("ds_weights", (3000.0, 1000.0, 3000.0)))
        self.ds_sigmas = tuple(float(s) for s in self.card.extra.get("ds_sigmas", (2.0, 2.0)))
        self.flip_pairs = tuple(tuple(int(i) for i in p) for p in self.card.extra.get("flip_pairs", ()))
        self.inference = self.card.extra.get("inference", "released")

    @property
    def inference(self) -> str:
        return self._inference

    @inference.setter
    def inference(self, mode: str) -> None:
        if mode not in INFERENCE_MODES:
            raise ConfigError(f"inference must be one of {INFERENCE_MODES}, got {mode!r}")
        self._inference = mode

    def __getstate__(self) -> dict:
        """Copies and pickles drop the side outputs of past forward passes (they hold autograd graphs)."""
        state = dict(super().__getstate__())
        state["_side_outputs"] = WeakTensorKeyDictionary()
        return state

    def forward_normalized(self, z: torch.Tensor) -> torch.Tensor:
        full, side = self.net.forward_all(z)
        if self.inference == "released" and not self.training:  # flip testing, as the release's forward_test
            full_f, side_f = self.net.forward_all(z.flip(3))
            full = (full + self.flip_back(full_f)) * 0.5
            side = [(a + self.flip_back(b)) * 0.5 for a, b in zip(side, side_f)]
        self._side_outputs[full] = side
        return full

    def flip_back(self, heatmaps: torch.Tensor) -> torch.Tensor:
        """Heatmaps of a horizontally flipped image mapped back: mirrored pairs swapped, flipped, shifted one pixel
        right (mmpose's ``flip_back`` and ``shift_heatmap``; the first column keeps its value)."""
        order = list(range(heatmaps.shape[1]))
        for a, b in self.flip_pairs:
            order[a], order[b] = b, a
        out = heatmaps[:, order].flip(3)
        return torch.cat([out[..., :1], out[..., :-1]], -1)

    def landmarks(self, output: torch.Tensor) -> torch.Tensor:
        """Predicted (x, y) input-pixel coordinates [B, L, 2] of ``output`` (see the module docstring)."""
        side = self._side_outputs.get(output)
        if self.inference != "released" or side is None:
            return T.predict("landmark", output)
        size = output.shape[-2:]
        preds = []
        for hm in (*side, output):
            scale = torch.tensor([hm.shape[-1] / size[-1], hm.shape[-2] / size[-2]], device=hm.device)
            preds.append((decode_heatmaps(hm) + 0.5) / scale - 0.5)
        return torch.stack(preds).mean(0)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        validate_images(x, self.card.input_size)
        with eval_mode(self):
            return self.landmarks(self(x))

    def metrics(self, output: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        err = (self.landmarks(output) - target.float()).norm(dim=-1)
        return {f"sdr@{self.sdr_radius:g}px": (err <= self.sdr_radius).float().mean(1), "mre_px": err.mean(1)}

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        total = self.ds_weights[0] * T.loss_per_sample("landmark", output, target, self.heatmap_sigma)
        side = self._side_outputs.get(output)
        if side is None:
            return total
        size = output.shape[-2:]
        for weight, sigma, hm in zip(self.ds_weights[1:], self.ds_sigmas, side):
            scale = torch.tensor([hm.shape[-1] / size[-1], hm.shape[-2] / size[-2]], device=target.device)
            coords = (target.float() + 0.5) * scale - 0.5
            total = total + weight * T.loss_per_sample("landmark", hm, coords, sigma)
        return total


def decode_heatmaps(heatmaps: torch.Tensor) -> torch.Tensor:
    """mmpose's ``post_process='default'`` decoding: argmax (x, y) [B, L, 2] plus 0.25 px towards the higher
    neighbour along each axis where the argmax is not within one pixel of the border (``1 < x < W − 1``)."""
    h, w = heatmaps.shape[-2:]
    coords = T.heatmap_argmax(heatmaps)
    px, py = coords[..., 0].long(), coords[..., 1].long()
    inner = ((px > 1) & (px < w - 1) & (py > 1) & (py < h - 1)).float()
    flat = heatmaps.flatten(2)

    def at(dx: int, dy: int) -> torch.Tensor:
        idx = ((py + dy).clamp(0, h - 1) * w + (px + dx).clamp(0, w - 1)).unsqueeze(-1)
        return flat.gather(-1, idx).squeeze(-1)

    step = torch.stack([at(1, 0) - at(-1, 0), at(0, 1) - at(0, -1)], -1).sign() * 0.25
    return coords + step * inner.unsqueeze(-1)


HAN_FULL = HANConfig()
# Tiny (64² phantom): four stages 16/32/64/128 (H/2 … H/16), n_win 4/4/2 then full attention, top-k 2/4/2, K/V pooled
# to 4×4 per region, MLP ratio 4, FPN width 32; heatmaps at 16², 32², 64².
HAN_TINY = HANConfig(dims=(16, 32, 64, 128), n_wins=(4, 4, 2, 1), topks=(2, 4, 2, None), heads=(1, 2, 4, 8),
                     mlp_ratios=(4, 4, 4, 4), neck=32, kv_pool=4, in_chans=1, image_feat=8)
ISBI2015_LANDMARKS = (
    "sella",
    "nasion",
    "orbitale",
    "porion",
    "subspinale",
    "supramentale",
    "pogonion",
    "menton",
    "gnathion",
    "gonion",
    "lower_incisal_incision",
    "upper_incisal_incision",
    "upper_lip",
    "lower_lip",
    "subnasale",
    "soft_tissue_pogonion",
    "posterior_nasal_spine",
    "anterior_nasal_spine",
    "articulare",
)
LAYERS = tuple(f"stages.{i}" for i in range(5))
COSTS = {"han.full": (77_242_192, 2_081_227_804_416), "han.tiny": (1_163_840, 183_485_376)}
FULL_NOTE = ("Released ISBI 2015 cephalometry configuration (1216×1024 H×W, 3 channels, ImageNet normalisation, 19 "
             "landmarks; SDR radius 20 px = 2 mm at 0.1 mm/px); load external weights with weights=PATH. No reference "
             "count exists (the release needs mmcv/mmpose 0.x); parameters and FLOPs (1040.6 GMACs at full resolution, "
             "FlopCounterMode) measured here. Prediction as released (flip testing, mean of the three heads' "
             "coordinates; inference='full_head' for the full-resolution argmax alone); unused neck layers are not "
             "built. No trained checkpoint is published (the README links none), and the release (an mmpose 0.x fork) is "
             "not key-mapped.")
TINY_NOTE = ("Hybrid stages (patch embedding, one BRA block with 4×4-pooled K/V, one CBAM attention residual module), "
             "FFCM neck and three deeply supervised heatmap heads (H/4, H/2, full; MSE weights 1000/3000/3000) kept. "
             "Measured: val SDR@4px 1.000, mean radial error 0.80 px on 200 phantom validation images after "
             "`robustbench-med train han.tiny` (one thread: 13 s of training), with the single-head prediction "
             "(inference='full_head'). The default prediction is now the released one (flip testing with the "
             "left/right kidneys mirrored, mean of the three heads' coordinates); training and the weights are "
             "unchanged. Measured with it on the same images: SDR@4px 0.976, mean radial error 1.40 px (the H/4 "
             "head's 4-pixel grid dominates the error at 64²).")
DEEP_SUPERVISION = {"ds_weights": (3000.0, 1000.0, 3000.0)}


def _register() -> None:
    card = C.full_card("han.full", "landmark", "cephalometric X-ray (ISBI 2015)", (3, 1216, 1024), ISBI2015_LANDMARKS,
                       PAPER, *COSTS["han.full"], FULL_NOTE, sdr_radius=20.0, heatmap_sigma=4.0, ds_sigmas=(2.0, 2.0),
                       **DEEP_SUPERVISION, routing="bra")
    C.register_zoo("han.full", card, partial(HAN, HAN_FULL, len(ISBI2015_LANDMARKS)), C.IMAGENET_MEAN, C.IMAGENET_STD,
                   LAYERS, cls=DeepSupervisedLandmarkVictim)
    card = C.tiny_card("han.tiny", "landmark", PAPER, *COSTS["han.tiny"], TINY_NOTE, sdr_radius=4.0, heatmap_sigma=2.0,
                       ds_sigmas=(1.0, 1.0), **DEEP_SUPERVISION, routing="bra", flip_pairs=((2, 3),))
    C.register_zoo("han.tiny", card, partial(HAN, HAN_TINY, len(C.LANDMARK_NAMES)), C.PHANTOM_MEAN, C.PHANTOM_STD,
                   LAYERS[:4], recipe=C.tiny_recipe("landmarks", n_train=256, epochs=4, lr=3e-3),
                   cls=DeepSupervisedLandmarkVictim)


_register()
