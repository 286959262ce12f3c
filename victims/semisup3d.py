"""ERANet-style and SWDL-Net-style semi-supervised 3D segmentors on the volume phantom (issue #20, item 2).

Both are trained on ``unet3d.meanteacher``'s data — the first 8 training volumes of ``phantom.volumes`` with their
masks, the other 152 without — with its seed, learning rate, optimiser (AdamW, one-cycle) and number of optimiser
steps (600; ERANet also with its batches of 4 + 4 random 32³ patches, SWDL-Net with 2 + 2), and are used like every
volume victim: sliding-window inference over the whole volume
(:data:`~robustbench_med.victims.volumes.WINDOW`: 32³ windows, overlap 0.5, Gaussian blending), so attacks
differentiate through the window blending. Both declare ``unet3d.fewlabels`` (the same 8 labelled volumes, supervised
only) as their baseline.

| victim | network | semi-supervision |
|---|---|---|
| ``eranet.phantom`` | ``unet3d.meanteacher``'s MONAI 3D UNet | mean teacher + ERA, PCA, CST |
| ``swdlnet.phantom`` | :class:`SWDLNet`: shared 3D CNN encoder, DC and DelPU decoders | cross-decoder consistency + SWDL |

**ERANet** (Li, Yao, Zhong, Zhao, Zhang, Wang, Hong & Chen, "ERANet: Edge Replacement Augmentation for
Semi-Supervised Meniscus Segmentation with Prototype Consistency Alignment and Conditional Self-Training",
arXiv 2502.07331). *Verified from the abstract*: three components — edge replacement augmentation (ERA),
prototype consistency alignment (PCA), conditional self-training (CST) — inside a mean-teacher architecture; ERA
perturbs the segmented structure in an anatomically plausible way, PCA aligns intra-class features for compact,
discriminative representations, CST refines pseudo-labels iteratively to mitigate label noise; 3D MRI (DESS,
FSE/TSE). *Verified from the authors' released code*
(github.com/SiYueLi-MRIandAI/ERANet-SemiSupervised-MeniscusSegmentation: ``dataloaders/oai_meniscus.py``,
``networks/unet_loss.py``, ``utils/losses.py``, ``train-u1.py``, ``eval-unlabel-split.py``, ``cst.py``; studied, not
copied; the released code works on 2D slices):
ERA takes each connected component of the target structure in a *labelled* image, cuts off both ends of it along one
axis — a random fraction U[0, 0.3] of its extent at each end — paints the cut voxels with a random tissue-like
intensity (uniform 100–200 in raw units) and removes them from the structure's label (the dataset returns the
augmented and the original pair; the released training scripts read the original keys, so how the augmented pair
enters training is not shown there); PCA computes per-image class prototypes by soft-mask (softmax) weighted
average pooling of the last decoder feature map, the cosine similarity of every voxel's feature to every prototype,
and an MSE between the segmentation softmax and the (detached) softmax of those similarities, weighted 0.1 with an
``exp(−5 (1 − t)²)`` ramp-up over the first 10 epochs, on unlabelled images; the mean-teacher stage supervises the
unlabelled images with the EMA teacher's arg-max pseudo-labels (CE); CST then splits the unlabelled images by the
*temporal stability* of their pseudo-labels (mean per-class Dice between predictions of successive checkpoints;
below 0.8 against the reference one: unreliable), trains a model on labelled + reliable pseudo-labelled images
(U3), relabels the unreliable ones with it and trains on all of them (U4).
**Inferred / adapted here** (hence "-style"): the phantom has no meniscus, so ERA cuts the *organs* — each
26-connected component of the liver and of the kidneys in a labelled 32³ patch — along z (their long axis), fills
the cut voxels with intensities drawn from the same patch's body (soft-tissue) voxels, and relabels them body; each
labelled patch gets ERA with probability 0.5; lesion voxels are never cut. The PCA weight 0.1 ramps up over the
whole run (as ``unet3d.meanteacher``'s consistency). The feature map for PCA is the input of the MONAI UNet's last
up-sampling layer (32 channels at half resolution), the softmax pooled to it; the similarity softmax has a
temperature 0.1 (the code uses none, which makes its target almost uniform over 6 classes) and an intra-class
compactness term ``Σ_c p_c (1 − cos(f, prototype_c))`` (the abstract's "aligning intra-class features"; not in the
released loss) is added. The mean-teacher stage keeps ``unet3d.meanteacher``'s noise-consistency loss (MSE of
softmaxes, weight 10, same ramp) rather than the code's arg-max CE. CST runs inside the same 600 steps instead of
training fresh U3/U4 networks: teacher predictions (sliding window) of the 152 unlabelled volumes at 40 %, 50 % and
60 % of training give the stability split (Dice threshold 0.8, reference the first); from 60 % the student trains on
labelled patches + pseudo-labelled patches of the reliable volumes (the last snapshot's labels), from 80 % the
unreliable volumes too, relabelled by the student at that point; pseudo-label CE counts only voxels whose
pseudo-label probability is ≥ 0.9 (a voxel-level confidence condition, inferred from "mitigating label noise"; the
released code conditions per volume only). On this phantom the split is lenient: in the registered run all 152
unlabelled volumes were stable (mean per-class Dice ≥ 0.8 between snapshots), so nothing was relabelled and the
self-training stage used the teacher's confident pseudo-labels of every volume.

**SWDL-Net** (Wang, Chen, Mi, Chen, Zhang & Li, "SWDL: Stratum-Wise Difference Learning with Deep Laplacian
Pyramid for Semi-Supervised 3D Intracranial Hemorrhage Segmentation", arXiv 2506.10325). *Verified from the
abstract and the paper's introduction page*: a semi-supervised framework combining a Laplacian pyramid (edge
sharpening) and deep convolutional upsampling (flexible feature mapping) through a difference-learning mechanism;
3D NCCT, 2 % / 5 % labelled. *From a third-party summary of the paper*: a shared CNN encoder, two decoders — deep
transposed-convolution (DC) upsampling and Deep Laplacian Pyramid Upsampling (DelPU) — and the stratum-wise
difference Δ^(s,p) between the two decoders' upsampled features at each stratum s and iteration phase p. *From a
public copy of the authors' code* (github.com/NguyenVanCongThanh/SWDL-BHSD, ``code/networks/SWDL.py``,
``code/BHSD2024/train_SWDL.py``, ``val_3D.py``; the authors' own repository SIAT-CT-LAB/SWDL was not available;
studied, not copied): DelPU = build a Gaussian pyramid of the feature map (blur, trilinear ½), its Laplacian bands,
reconstruct with the bands amplified by μ = 1.5, interpolate ×2, then a 3³ conv + norm + ReLU; the DelPU decoder's
skips (and bottleneck, ``x + x·w``) are gated by ``w = sigmoid`` of the DC decoder's stage features (detached);
each batch is used for T = 3 optimiser steps (phases): from the 2nd on, ``1e-3 · (DC − DelPU)`` stage features of
the previous phase (detached) are added to the encoder's outputs of the same stratum; loss = soft Dice of the DC output
+ CE of the DelPU output on labelled images, deep supervision of DC side outputs (Dice, weights 0.8 / 0.6 / 0.4 /
0.2 / 0.1 from fine to coarse), and an MSE between the two decoders' softmaxes on labelled *and* unlabelled images
(weight 1; the script's ramp is computed but unused); inference = the DC decoder, one pass, no difference term.
**Inferred / adapted here** (hence "-style"): sizes (four strata, widths 8-16-32-64, BatchNorm, 1-2 convs per
block, no dropout, versus five strata, 16-256); DelPU's channel change is a 1³ conv *before* the pyramid
up-sampling instead of a 3³ conv after it (half the cost at the finer scale); a separable 3D Gaussian blur (3³,
σ 1) instead of the code's slice-wise 2D blur, and one pyramid level wherever the map is ≥ 8³ (the code picks
levels by size, which at 32³ patches would leave only the last up-sampling with a pyramid); multi-class losses
(class-weighted CE, the suite's batch soft Dice over the 5 foreground classes); 600 optimiser steps = 200 batches
× 3 phases, each batch 2 labelled + 2 unlabelled random 32³ patches (4 + 4 would double the CPU time: 3 phases of a
two-decoder network per batch); AdamW + one-cycle instead of SGD + poly. On this phantom the DC decoder trained
this way (Dice only, 400 labelled patches in all) finds almost no lesion: no lesion voxel is predicted on the 32
validation volumes (adding the class-weighted CE to the DC output, tried once, gave a pooled lesion Dice of 0.03), so
its foreground Dice comes from the organs.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from robustbench_med.registry import DATASETS, VICTIMS, register_victim
from robustbench_med.training import batch_soft_dice_loss, segmentation_class_weights
from robustbench_med.victim import ModelVictim
from robustbench_med.victims.basic import SEG_CLASSES
from robustbench_med.victims.volumes import (VOLUME_MEAN, VOLUME_STD, WINDOW, VolumeRecipe, _batches, _card,
                                             _consistency, _crop, _ema_copy, _ema_update, monai_unet3d, optimise)

TRAINER_VERSION = 1
BODY, LIVER, KIDNEYS, LESION = 1, 2, 3, 5


# ---------------------------------------------------------------------------------------------------------------
# ERANet-style components
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EraRecipe(VolumeRecipe):
    """``unet3d.meanteacher``'s recipe plus ERANet's three components (module docstring)."""

    n_labelled: int = 8
    consistency: float = 10.0
    era_p: float = 0.5
    era_fraction: float = 0.3
    era_classes: tuple[int, ...] = (LIVER, KIDNEYS)
    prototype: float = 0.1
    temperature: float = 0.1
    snapshots: tuple[float, ...] = (0.4, 0.5, 0.6)
    stability: float = 0.8
    relabel_at: float = 0.8
    confidence: float = 0.9
    pseudo: float = 1.0


def edge_replacement(z: torch.Tensor, y: torch.Tensor, gen: torch.Generator, classes: Sequence[int] = (LIVER, KIDNEYS),
                     fraction: float = 0.3, fill_class: int = BODY, axis: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """ERA on a labelled batch ``z`` [B, 1, D, H, W] / ``y`` [B, D, H, W]: both ends (a random fraction U[0, fraction)
    of the extent along spatial ``axis`` each) of every 26-connected component of each class in ``classes`` are
    painted with intensities drawn from the same volume's ``fill_class`` voxels and relabelled ``fill_class``.
    Every other voxel, and the shapes, are unchanged; a volume without ``fill_class`` voxels is left as it is."""
    from scipy import ndimage

    z, y = z.clone(), y.clone()
    structure = np.ones((3, 3, 3), dtype=bool)
    for b in range(len(z)):
        fill = z[b, 0][y[b] == fill_class]
        if fill.numel() == 0:
            continue
        cut = torch.zeros_like(y[b], dtype=torch.bool)
        for c in classes:
            comps, n = ndimage.label((y[b] == c).cpu().numpy(), structure=structure)
            comps = torch.from_numpy(comps).to(y.device)
            for k in range(1, n + 1):
                comp = comps == k
                other = tuple(d for d in range(3) if d != axis)
                present = comp.any(dim=other[1]).any(dim=other[0]).nonzero().flatten()
                lo, hi = int(present.min()), int(present.max()) + 1
                a, e = (torch.rand(2, generator=gen) * fraction * (hi - lo)).long().tolist()
                pos = torch.arange(y.shape[1 + axis], device=y.device).view([-1 if d == axis else 1 for d in range(3)])
                cut |= comp & ((pos < lo + a) | (pos >= hi - e))
        if cut.any():
            pick = torch.randint(0, fill.numel(), (int(cut.sum()),), generator=gen).to(fill.device)
            z[b, 0][cut] = fill[pick]
            y[b][cut] = fill_class
    return z, y


class FeatureTap:
    """While active, records the student MONAI UNet's last decoder feature map (the input of its last up-sampling
    layer, ``net.model[2]``) and its output logits on every forward."""

    def __init__(self, net: nn.Module):
        self.net, self.features, self.logits, self._hooks = net, None, None, []

    def __enter__(self) -> "FeatureTap":
        self._hooks = [self.net.model[2].register_forward_pre_hook(self._pre), self.net.register_forward_hook(self._post)]
        return self

    def _pre(self, _module, args) -> None:
        self.features = args[0]

    def _post(self, _module, _args, out) -> None:
        self.logits = out

    def __exit__(self, *exc) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


def class_prototypes(feat: torch.Tensor, prob: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per-image class prototypes [B, K, C]: the ``prob``-weighted [B, K, *S] average of ``feat`` [B, C, *S]."""
    w, f = prob.flatten(2), feat.flatten(2)
    return torch.einsum("bkn,bcn->bkc", w, f) / (w.sum(-1).unsqueeze(-1) + eps)


def prototype_similarity(feat: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
    """Cosine similarity [B, K, N] of every voxel's feature to each of its own image's K prototypes."""
    return torch.einsum("bcn,bkc->bkn", F.normalize(feat.flatten(2), dim=1), F.normalize(protos, dim=-1))


def prototype_losses(feat: torch.Tensor, logits: torch.Tensor, temperature: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """PCA's two terms on one batch: ``align`` = MSE between the segmentation softmax (pooled to the feature grid) and
    the detached softmax of the prototype similarities / ``temperature`` (the released loss: gradient to the
    segmentation only); ``compact`` = mean over voxels of ``Σ_c p_c (1 − cos(f, prototype_c))`` with p detached (zero
    when every voxel's feature is parallel to its class prototype)."""
    prob = F.adaptive_avg_pool3d(logits.softmax(1), feat.shape[2:])
    protos = class_prototypes(feat, prob.detach())
    sim = prototype_similarity(feat, protos)
    align = F.mse_loss(prob.flatten(2), (sim.detach() / temperature).softmax(1))
    compact = (prob.detach().flatten(2) * (1 - sim)).sum(1).mean()
    return align, compact


def stability_split(predictions: Sequence[torch.Tensor], n_classes: int, threshold: float = 0.8,
                    eps: float = 1e-5) -> torch.Tensor:
    """CST's reliable volumes: ``predictions`` are label maps [N, *S] of successive checkpoints; a volume is
    reliable when the mean over classes of the Dice between each later prediction and the first is ≥ ``threshold``
    (a class absent from both counts as agreement)."""
    ref = F.one_hot(predictions[0].long(), n_classes).flatten(1, -2).float()
    reliable = torch.ones(len(ref), dtype=torch.bool)
    for pred in predictions[1:]:
        oh = F.one_hot(pred.long(), n_classes).flatten(1, -2).float()
        dice = (2 * (oh * ref).sum(1) + eps) / (oh.sum(1) + ref.sum(1) + eps)
        reliable &= (dice.mean(-1) >= threshold).cpu()
    return reliable


def pseudo_label_loss(logits: torch.Tensor, labels: torch.Tensor, confidence: torch.Tensor, threshold: float,
                      weights: torch.Tensor | None = None) -> torch.Tensor:
    """Class-weighted CE to pseudo-``labels`` counted only on voxels whose ``confidence`` ≥ ``threshold`` (mean over
    them; zero, with a graph, when there is none)."""
    keep = (confidence >= threshold).float()
    ce = F.cross_entropy(logits, labels.long(), weight=weights, reduction="none")
    return (ce * keep).sum() / keep.sum().clamp_min(1.0)


@torch.no_grad()
def window_predict(net: nn.Module, z: torch.Tensor, batch: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Arg-max labels (uint8) and their probabilities of ``net`` on whole volumes ``z`` by sliding-window inference."""
    was = net.training
    net.eval()
    labels, conf = [], []
    for i in range(0, len(z), batch):
        p = WINDOW(net, z[i:i + batch]).softmax(1)
        c, lab = p.max(1)
        labels.append(lab.to(torch.uint8))
        conf.append(c)
    net.train(was)
    return torch.cat(labels), torch.cat(conf)


def _ramp(step: int, steps: int) -> float:
    return float(np.exp(-5.0 * (1 - step / steps) ** 2))


def train_eranet(name: str, path: Path, device: torch.device, progress: bool) -> None:
    """Train registered ERANet-style victim ``name`` (module docstring) and save its weights and record."""
    from robustbench_med.training import _eval_metric
    from robustbench_med.weights import save_weights
    from robustbench_med.wrap import build_victim

    recipe: EraRecipe = VICTIMS.get(name).meta["recipe"]
    torch.manual_seed(recipe.seed)
    victim = build_victim(name).to(device)
    net, n_classes = victim.net, len(victim.card.classes)
    train = DATASETS.create(recipe.dataset, split="train", n=recipe.n_train)
    val = DATASETS.create(recipe.dataset, split="val", n=recipe.n_val)
    n_lab = recipe.n_labelled
    x, y = train.images().to(device), train.targets(recipe.target_field).to(device)
    z = (x - victim.mean) / victim.std
    zu = z[n_lab:]
    weights = segmentation_class_weights(y[:n_lab], n_classes).to(device)
    gen = torch.Generator().manual_seed(recipe.seed)
    teacher = _ema_copy(net)
    labelled, unlabelled = _batches(n_lab, recipe.batch_size, gen), _batches(len(zu), recipe.batch_size, gen)
    snap_steps = sorted({int(f * recipe.steps) for f in recipe.snapshots})
    cst_start, relabel_step = snap_steps[-1], int(recipe.relabel_at * recipe.steps)
    snapshots: list[torch.Tensor] = []
    state: dict = {"pool": None, "batches": None}
    record: dict = {"era_voxels": 0, "era_patches": 0}

    def set_pool(ids: torch.Tensor, labels: torch.Tensor, conf: torch.Tensor) -> None:
        # pseudo-labels and confidence travel as extra channels so that one _crop cuts image, label and confidence alike
        state["pool"] = torch.cat([zu[ids], labels.unsqueeze(1).float(), conf.unsqueeze(1)], 1)
        state["batches"] = _batches(len(ids), recipe.batch_size, gen)

    def step_loss(step: int) -> torch.Tensor:
        if step in snap_steps:
            labels, conf = window_predict(teacher, zu)
            snapshots.append(labels)
            if step == cst_start:
                reliable = stability_split(snapshots, n_classes, recipe.stability)
                state["reliable"], state["last"] = reliable, (labels, conf)
                ids = reliable.nonzero().flatten()
                if len(ids) == 0:  # nothing stable: fall back to every volume, confidence-gated
                    ids = torch.arange(len(zu))
                set_pool(ids.to(device), labels[ids.to(device)], conf[ids.to(device)])
                record["cst"] = {"reliable": int(reliable.sum()), "unreliable": int((~reliable).sum()),
                                 "confident_voxels_reliable": float((conf[ids.to(device)] >= recipe.confidence).float().mean())}
        if step == relabel_step and "reliable" in state:
            reliable = state["reliable"]
            bad = (~reliable).nonzero().flatten().to(device)
            if len(bad):
                labels, conf = state["last"]
                new_labels, new_conf = window_predict(net, zu[bad])  # the student after the reliable stage relabels (U3 → U4)
                labels, conf = labels.clone(), conf.clone()
                labels[bad], conf[bad] = new_labels, new_conf
                set_pool(torch.arange(len(zu), device=device), labels, conf)
                record["cst"]["relabelled"] = len(bad)
        idx = next(labelled).to(device)
        xb, yb = _crop(z[idx], y[idx], gen)
        use = torch.rand(len(xb), generator=gen) < recipe.era_p
        if use.any():
            xa, ya = edge_replacement(xb[use], yb[use], gen, recipe.era_classes, recipe.era_fraction)
            record["era_voxels"] += int((ya != yb[use]).sum())
            record["era_patches"] += int(use.sum())
            xb, yb = xb.clone(), yb.clone()
            xb[use], yb[use] = xa, ya
        out = net(xb)
        loss = F.cross_entropy(out, yb.long(), weight=weights) + batch_soft_dice_loss(out, yb.long())
        if step < cst_start:  # mean-teacher stage: noise consistency + PCA on the student's unlabelled forward
            with FeatureTap(net) as tap:
                loss = loss + _consistency(net, teacher, zu[next(unlabelled).to(device)], gen, recipe, step)
            align, compact = prototype_losses(tap.features, tap.logits, recipe.temperature)
            loss = loss + recipe.prototype * _ramp(step, recipe.steps) * (align + compact)
        else:  # conditional self-training stage
            pool = state["pool"]
            crop, _ = _crop(pool[next(state["batches"]).to(device)], None, gen)
            xu, lab, conf = crop[:, :1], crop[:, 1].round().long(), crop[:, 2]
            loss = loss + recipe.pseudo * pseudo_label_loss(net(xu), lab, conf, recipe.confidence, weights)
        return loss

    start = time.perf_counter()
    net.train()
    losses = optimise(net.parameters(), recipe.steps, recipe.lr, recipe.weight_decay, step_loss, f"train {name}",
                      progress, lambda: _ema_update(teacher, net, recipe.ema_decay))
    val_metric = _eval_metric(victim, val.images().to(device), val.targets(recipe.target_field).to(device), 8)
    k = min(20, len(losses))
    save_weights(victim, path, {"victim": name, "recipe": asdict(recipe), "train_fingerprint": train.fingerprint(),
                                "val_metric": {victim.spec.metric: val_metric},
                                "train_seconds": round(time.perf_counter() - start, 1),
                                "trainer_version": TRAINER_VERSION, "train_threads": torch.get_num_threads(),
                                "loss_start": sum(losses[:k]) / k, "loss_end": sum(losses[-k:]) / k,
                                "components": record, "torch": torch.__version__})


# ---------------------------------------------------------------------------------------------------------------
# SWDL-Net-style network and training
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SWDLRecipe(VolumeRecipe):
    """Semi-supervised SWDL training (module docstring); ``steps`` counts optimiser steps (``phases`` per batch)."""

    n_labelled: int = 8
    batch_size: int = 2
    consistency: float = 1.0
    phases: int = 3
    difference_scale: float = 1e-3
    deep_supervision: tuple[float, ...] = (0.8, 0.6, 0.4, 0.2)


def _gaussian_kernel(size: int = 3, sigma: float = 1.0) -> torch.Tensor:
    r = torch.arange(size, dtype=torch.float32) - size // 2
    k = torch.exp(-r ** 2 / (2 * sigma ** 2))
    return k / k.sum()


def gaussian_blur3d(x: torch.Tensor, size: int = 3, sigma: float = 1.0) -> torch.Tensor:
    """Separable depthwise 3D Gaussian blur with zero padding (weighted sums of shifted copies: the same as a
    depthwise convolution, and much faster than a grouped conv3d on CPU)."""
    k, p = _gaussian_kernel(size, sigma).tolist(), size // 2
    for d in range(2, 5):
        n = x.shape[d]
        pad = [0, 0] * (4 - d) + [p, p]
        xp = F.pad(x, pad)
        x = sum(w * xp.narrow(d, i, n) for i, w in enumerate(k))
    return x


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="trilinear", align_corners=True)


def laplacian_pyramid(x: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """Laplacian bands ``g_i − blur(up(g_{i+1}))`` of the Gaussian pyramid ``g_{i+1} = down(blur(g_i))`` (trilinear,
    ½ per level), finest first, then the coarsest Gaussian level."""
    gauss = [x]
    for _ in range(levels):
        g = gaussian_blur3d(gauss[-1])
        gauss.append(_resize(g, [max(1, s // 2) for s in g.shape[2:]]))
    bands = [g - gaussian_blur3d(_resize(gauss[i + 1], g.shape[2:])) for i, g in enumerate(gauss[:-1])]
    return bands + [gauss[-1]]


def laplacian_reconstruct(pyramid: Sequence[torch.Tensor], mu: float = 1.0) -> torch.Tensor:
    """Collapse a :func:`laplacian_pyramid` with the bands scaled by ``mu`` (μ = 1: the input exactly; μ > 1 sharpens)."""
    img = pyramid[-1]
    for band in reversed(pyramid[:-1]):
        img = gaussian_blur3d(_resize(img, band.shape[2:])) + mu * band
    return img


class LaplacianUpsample3d(nn.Module):
    """DelPU's up-sampling: collapse the map's Laplacian pyramid with the bands amplified by ``mu``, then trilinear ×2;
    a map smaller than ``min_size`` in some dimension gets plain trilinear ×2."""

    def __init__(self, mu: float = 1.5, levels: int = 1, min_size: int = 8):
        super().__init__()
        self.mu, self.levels, self.min_size = mu, levels, min_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if min(x.shape[2:]) >= self.min_size:
            x = laplacian_reconstruct(laplacian_pyramid(x, self.levels), self.mu)
        return _resize(x, [2 * s for s in x.shape[2:]])


def _conv_block(cin: int, cout: int, n: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(n):
        layers += [nn.Conv3d(cin if i == 0 else cout, cout, 3, padding=1), nn.BatchNorm3d(cout), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class SWDLEncoder(nn.Module):
    def __init__(self, in_ch: int = 1, widths: Sequence[int] = (8, 16, 32, 64), convs: Sequence[int] = (1, 2, 2, 2)):
        super().__init__()
        self.blocks = nn.ModuleList(_conv_block(in_ch if i == 0 else w, w, n) for i, (w, n) in enumerate(zip(widths, convs)))
        self.down = nn.ModuleList(nn.Sequential(nn.Conv3d(widths[i], widths[i + 1], 2, stride=2), nn.BatchNorm3d(widths[i + 1]),
                                                nn.ReLU(inplace=True)) for i in range(len(widths) - 1))

    def forward(self, x: torch.Tensor, en: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Features finest first; ``en`` (finest first, the same shapes) is added to each stratum's output."""
        feats = []
        for i, block in enumerate(self.blocks):
            x = block(x if i == 0 else self.down[i - 1](x))
            if en:
                x = x + en[i]
            feats.append(x)
        return feats


class SWDLDecoder(nn.Module):
    """UNet-style decoder with additive skips; ``laplacian``: DelPU up-sampling (Laplacian pyramid + 3³ conv), else
    transposed 2³ convs (DC). Returns logits and the stage features (bottleneck, then each up-sampled map, coarse
    first); with ``gates`` (another decoder's stage features) the bottleneck and skips are gated by their sigmoid."""

    def __init__(self, widths: Sequence[int] = (8, 16, 32, 64), convs: Sequence[int] = (1, 2, 2), n_classes: int = 6,
                 laplacian: bool = False, mu: float = 1.5):
        super().__init__()
        ups, blocks = [], []
        for i in range(len(widths) - 1, 0, -1):
            cin, cout = widths[i], widths[i - 1]
            # DelPU: the code's 3³ conv after the pyramid up-sampling is a 1³ projection before it here (cost)
            up = ([nn.Conv3d(cin, cout, 1), LaplacianUpsample3d(mu)] if laplacian
                  else [nn.ConvTranspose3d(cin, cout, 2, stride=2)])
            ups.append(nn.Sequential(*up, nn.BatchNorm3d(cout), nn.ReLU(inplace=True)))
            blocks.append(_conv_block(cout, cout, convs[i - 1]))
        self.ups, self.blocks = nn.ModuleList(ups), nn.ModuleList(blocks)
        self.out = nn.Conv3d(widths[0], n_classes, 1)

    def forward(self, feats: Sequence[torch.Tensor], gates: Sequence[torch.Tensor] | None = None):
        x = feats[-1]
        if gates is not None:
            x = x + x * torch.sigmoid(gates[0]).detach()
        stages = [x]
        for k, (up, block) in enumerate(zip(self.ups, self.blocks)):
            u = up(x)
            stages.append(u)
            skip = feats[-2 - k]
            if gates is not None:
                skip = skip * torch.sigmoid(gates[k + 1]).detach()
            x = block(u + skip)
        return self.out(x), stages


class SWDLNet(nn.Module):
    """SWDL-Net-style 3D segmentor: shared encoder, DC decoder (the output at inference) and DelPU decoder, DC side
    outputs for deep supervision. ``forward`` runs encoder + DC decoder only (the authors' inference)."""

    def __init__(self, in_ch: int = 1, n_classes: int = len(SEG_CLASSES), widths: Sequence[int] = (8, 16, 32, 64),
                 mu: float = 1.5):
        super().__init__()
        self.encoder = SWDLEncoder(in_ch, widths)
        self.dc = SWDLDecoder(widths, n_classes=n_classes, laplacian=False)
        self.delpu = SWDLDecoder(widths, n_classes=n_classes, laplacian=True, mu=mu)
        self.side = nn.ModuleList(nn.Conv3d(w, n_classes, 1) for w in reversed(widths))  # bottleneck first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dc(self.encoder(x))[0]

    def forward_train(self, x: torch.Tensor, en: Sequence[torch.Tensor] | None = None, n_side: int | None = None):
        """Both decoders' logits, their stage features (coarse first) and the DC side outputs (at input size) of the
        first ``n_side`` samples (all by default; deep supervision needs the labelled ones only)."""
        feats = self.encoder(x, en)
        out1, st1 = self.dc(feats)
        out2, st2 = self.delpu(feats, st1)
        sides = [F.interpolate(conv(s[:n_side]), size=x.shape[2:], mode="trilinear", align_corners=True)
                 for conv, s in zip(self.side, st1)]
        return out1, out2, st1, st2, sides

    @staticmethod
    def difference(st1: Sequence[torch.Tensor], st2: Sequence[torch.Tensor], scale: float) -> list[torch.Tensor]:
        """The stratum-wise difference ``scale · (DC − DelPU)`` of the stage features, detached, finest first (the
        order the encoder adds it in)."""
        return [scale * (a - b).detach() for a, b in zip(reversed(st1), reversed(st2))]


def swdl_loss(net: SWDLNet, xb: torch.Tensor, yb: torch.Tensor, n_lab: int, en, recipe: SWDLRecipe,
              weights: torch.Tensor):
    """One phase's loss on ``xb`` (the first ``n_lab`` labelled by ``yb``) and the next phase's difference term."""
    out1, out2, st1, st2, sides = net.forward_train(xb, en, n_lab)
    yl = yb.long()
    loss = batch_soft_dice_loss(out1[:n_lab], yl) + F.cross_entropy(out2[:n_lab], yl, weight=weights)
    for w, side in zip(recipe.deep_supervision, reversed(sides)):  # finest first
        loss = loss + w * batch_soft_dice_loss(side[:n_lab], yl)
    loss = loss + recipe.consistency * F.mse_loss(out1.softmax(1), out2.softmax(1))
    return loss, net.difference(st1, st2, recipe.difference_scale)


def train_swdl(name: str, path: Path, device: torch.device, progress: bool) -> None:
    """Train registered SWDL-Net-style victim ``name`` (module docstring) and save its weights and record."""
    from robustbench_med.training import _eval_metric
    from robustbench_med.weights import save_weights
    from robustbench_med.wrap import build_victim

    recipe: SWDLRecipe = VICTIMS.get(name).meta["recipe"]
    torch.manual_seed(recipe.seed)
    victim = build_victim(name).to(device)
    net: SWDLNet = victim.net
    train = DATASETS.create(recipe.dataset, split="train", n=recipe.n_train)
    val = DATASETS.create(recipe.dataset, split="val", n=recipe.n_val)
    n_lab = recipe.n_labelled
    x, y = train.images().to(device), train.targets(recipe.target_field).to(device)
    z = (x - victim.mean) / victim.std
    weights = segmentation_class_weights(y[:n_lab], len(victim.card.classes)).to(device)
    gen = torch.Generator().manual_seed(recipe.seed)
    labelled, unlabelled = _batches(n_lab, recipe.batch_size, gen), _batches(len(z) - n_lab, recipe.batch_size, gen)
    state: dict = {}

    def step_loss(step: int) -> torch.Tensor:
        if step % recipe.phases == 0:  # a new batch: phase 1 without the difference term
            idx = next(labelled).to(device)
            xl, yl = _crop(z[idx], y[idx], gen)
            xu, _ = _crop(z[n_lab:][next(unlabelled).to(device)], None, gen)
            state.update(x=torch.cat([xl, xu]), y=yl, n=len(xl), en=None)
        loss, state["en"] = swdl_loss(net, state["x"], state["y"], state["n"], state["en"], recipe, weights)
        return loss

    start = time.perf_counter()
    net.train()
    losses = optimise(net.parameters(), recipe.steps, recipe.lr, recipe.weight_decay, step_loss, f"train {name}", progress)
    val_metric = _eval_metric(victim, val.images().to(device), val.targets(recipe.target_field).to(device), 8)
    k = min(20, len(losses))
    save_weights(victim, path, {"victim": name, "recipe": asdict(recipe), "train_fingerprint": train.fingerprint(),
                                "val_metric": {victim.spec.metric: val_metric},
                                "train_seconds": round(time.perf_counter() - start, 1),
                                "trainer_version": TRAINER_VERSION, "train_threads": torch.get_num_threads(),
                                "loss_start": sum(losses[:k]) / k, "loss_end": sum(losses[-k:]) / k,
                                "params": sum(p.numel() for p in net.parameters()),
                                "params_inference": sum(p.numel() for m in (net.encoder, net.dc) for p in m.parameters()),
                                "torch": torch.__version__})


# ---------------------------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------------------------

ERANET_PAPER = ("ERANet: Edge Replacement Augmentation for Semi-Supervised Meniscus Segmentation with Prototype "
                "Consistency Alignment and Conditional Self-Training (Li et al., arXiv 2502.07331), on a MONAI 3D UNet")
SWDL_PAPER = ("SWDL: Stratum-Wise Difference Learning with Deep Laplacian Pyramid for Semi-Supervised 3D Intracranial "
              "Hemorrhage Segmentation (Wang et al., arXiv 2506.10325)")

CARDS = {
    "eranet.phantom": _card(
        "eranet.phantom", "segmentation", SEG_CLASSES, ERANET_PAPER,
        "ERANet-style: unet3d.meanteacher's network, data (8 labelled + 152 unlabelled volumes), seed and 600 steps, "
        "plus edge replacement augmentation (ends of liver/kidney components along z replaced by the patch's body "
        "tissue, label → body), prototype consistency alignment on the last decoder features (temperature 0.1, "
        "+ intra-class compactness), and conditional self-training inside the same run (reliable = pseudo-labels "
        "stable across 3 teacher snapshots, Dice ≥ 0.8; unreliable relabelled at 80 %; voxel confidence ≥ 0.9). "
        "Not in it: the paper's 2D/3D meniscus networks, separate U3/U4 networks, its data. Sliding-window inference.",
        baseline="unet3d.fewlabels"),
    "swdlnet.phantom": _card(
        "swdlnet.phantom", "segmentation", SEG_CLASSES, SWDL_PAPER,
        "SWDL-Net-style: shared 3D CNN encoder (widths 8-16-32-64, BatchNorm), a transposed-conv (DC) decoder and a "
        "Laplacian-pyramid-upsampling (DelPU, μ 1.5) decoder gated by the DC stage features, stratum-wise difference "
        "learning (3 phases per batch, 1e-3·(DC − DelPU) fed back into the encoder), cross-decoder softmax MSE on "
        "labelled + unlabelled patches, DC deep supervision; 8 labelled + 152 unlabelled volumes, 600 steps of 2 + 2 "
        "patches; "
        "inference = DC decoder, sliding window. Not in it: the paper's sizes (5 strata, 16-256), slice-wise 2D "
        "blur, DelPU's 3³ conv after the pyramid (a 1³ one before it here), dropout, SGD/poly schedule.",
        baseline="unet3d.fewlabels"),
}

RECIPES = {"eranet.phantom": EraRecipe(), "swdlnet.phantom": SWDLRecipe()}
BUILDERS = {"eranet.phantom": monai_unet3d, "swdlnet.phantom": SWDLNet}
TRAINERS = {"eranet.phantom": train_eranet, "swdlnet.phantom": train_swdl}


def _register(name: str) -> None:
    def factory() -> ModelVictim:
        return ModelVictim(BUILDERS[name](), CARDS[name], VOLUME_MEAN, VOLUME_STD, window=WINDOW)

    factory.__doc__ = f"{name}: {CARDS[name].notes}"
    register_victim(name, card=CARDS[name], recipe=RECIPES[name], trainer=TRAINERS[name],
                    trainer_version=TRAINER_VERSION)(factory)


_register("eranet.phantom")
_register("swdlnet.phantom")
