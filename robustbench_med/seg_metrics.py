"""Per-sample segmentation metrics: Dice, IoU, HD95 and ASSD over the foreground classes, through MONAI.

Inputs are hard class maps ``pred`` and ``target`` [B, *S] (``*S`` = (H, W) for slices, (D, H, W) for volumes) with
``num_classes`` classes, class 0 the background. Per class, the values come from MONAI's metric functions on one-hot
maps (Cardoso et al., "MONAI: An open-source framework for deep learning in healthcare", 2022):
``monai.metrics.compute_dice`` / ``compute_iou`` (``ignore_empty=False``) and ``get_edge_surface_distance``, the
surface-distance core of ``compute_hausdorff_distance(percentile=95)`` and
``compute_average_surface_distance(symmetric=True)`` (one call gives both; tested equal to those two functions).
Distances are Euclidean, in pixels / voxels (unit spacing).

**How a sample's value is formed (our conventions, and where MONAI's metric classes differ).**

1. *Background excluded* (MONAI ``include_background=False``; ``DiceMetric``'s default is ``True``, which adds the
   background's Dice, usually near 1, to the mean).
2. *A class absent from both the prediction and the target is left out* of the sample's mean (its per-class value
   is NaN here); a class absent from the target but predicted scores Dice = IoU = 0. MONAI's default
   ``ignore_empty=True`` instead leaves out every class absent from the *target*, so false-positive classes on a
   sample without them are not penalised: on adversarial inputs (spurious lesions) MONAI's mean is the higher one.
3. *A sample with no foreground class in either map* scores Dice = IoU = 1 (a correct empty prediction). MONAI gives
   every class of such a sample NaN and ``reduction="mean"`` drops the sample; with ``ignore_empty=True`` it also
   drops every sample whose *target* has no foreground, however much the prediction hallucinates.
4. *Mean over a sample's classes, then over samples* (every sample weighs the same, as the harness's per-sample paired
   statistics need); ``DiceMetric(reduction="mean")`` averages the same way (over the samples it keeps), while
   ``reduction="mean_batch"`` followed by a mean over classes weighs every class equally instead.

These conventions are the whole difference between a MONAI ``DiceMetric()`` / ``MeanIoU()`` number and the mean of
``dice_fg`` / ``iou_fg`` on the same predictions: ``tests/test_library_metrics.py`` reproduces MONAI's numbers from
ours by switching exactly these conventions, one at a time. Including the background (1) and leaving out the classes
and samples without ground-truth foreground (2, 3) each tend to raise MONAI's number above ours where predictions
hallucinate structures, as attacked ones do. Measured on ``unet3d.phantom`` (MONAI UNet), 6 ``phantom.volumes`` test
volumes under ``pgd.linf`` 8/255 (5 steps, seed 0): mean ``dice_fg`` 0.696, ``DiceMetric(include_background=False)``
0.722 (one volume's hallucinated class left out), ``DiceMetric()`` 0.764; clean, where no class is hallucinated, 0.895,
0.895 and 0.912.

**Cost** (CPU time, one thread, two foreground classes): HD95 + ASSD add about 6 ms per 64×64 slice (mostly MONAI's
per-call cropping, once per class present in both maps) and about 55 ms per 96×96×96 volume; Dice and IoU through
MONAI cost about 0.2 ms per slice and 10 ms more per volume than the overlap formulas did. They run with the other
per-sample metrics (once per evaluated batch, after an attack or between restarts), never inside an attack's steps:
attack objectives (the task's cross-entropy, the soft-Dice loss) do not involve them.

**Surface distances of empty maps.** MONAI gives ``inf`` (or NaN) when a class is in only one map and NaN when in
neither; a benchmark needs a defined number. Here, per class: present in both → MONAI's value; present in exactly one
map → the image diagonal ``‖spatial shape‖₂`` (:func:`max_distance`, at least the largest distance two pixels of the
image can have: a missed or hallucinated structure is as bad as the farthest miss); absent from both → left out of
the mean. A sample with no foreground class in either map scores 0 (nothing to miss).
"""
from __future__ import annotations

import math
import warnings
from typing import Sequence

import torch
import torch.nn.functional as F

from robustbench_med.errors import ConfigError

HD_PERCENTILE = 95.0


def one_hot_maps(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One-hot [B, K, *S] float maps of hard class maps ``pred`` and ``target`` [B, *S] (MONAI's metric layout)."""
    if pred.shape != target.shape:
        raise ConfigError(f"prediction and target class maps differ in shape: {list(pred.shape)} vs {list(target.shape)}")
    if num_classes < 2:
        raise ConfigError(f"segmentation needs at least 2 classes (background and one foreground), got {num_classes}")
    for name, m in (("prediction", pred), ("target", target)):
        if m.numel() and (int(m.min()) < 0 or int(m.max()) >= num_classes):
            raise ConfigError(f"{name} class indices must lie in [0, {num_classes}), got [{int(m.min())}, {int(m.max())}]")
    p = F.one_hot(pred.long(), num_classes).movedim(-1, 1).float()
    t = F.one_hot(target.long(), num_classes).movedim(-1, 1).float()
    return p, t


def _presence(p: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Whether each foreground class [B, K−1] is in the prediction and in the target."""
    return p[:, 1:].flatten(2).any(2), t[:, 1:].flatten(2).any(2)


def dice_per_class(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Dice [B, K−1] of each foreground class (``monai.metrics.compute_dice``); NaN where the class is absent from
    both maps (convention 2 of the module docstring)."""
    from monai.metrics import compute_dice

    p, t = one_hot_maps(pred, target, num_classes)
    in_p, in_t = _presence(p, t)
    dice = compute_dice(p, t, include_background=False, ignore_empty=False)
    return torch.where(in_p | in_t, dice, torch.full_like(dice, math.nan))


def iou_per_class(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """IoU (Jaccard) [B, K−1] of each foreground class, |P ∩ T| / |P ∪ T| (``monai.metrics.compute_iou``); NaN where
    the class is absent from both maps."""
    from monai.metrics import compute_iou

    p, t = one_hot_maps(pred, target, num_classes)
    in_p, in_t = _presence(p, t)
    iou = compute_iou(p, t, include_background=False, ignore_empty=False)
    return torch.where(in_p | in_t, iou, torch.full_like(iou, math.nan))


def mean_present(per_class: torch.Tensor) -> torch.Tensor:
    """Mean [B] over the classes present in the prediction or the target (the non-NaN entries); 1 when none is (both
    maps empty: a correct empty prediction)."""
    present = ~torch.isnan(per_class)
    mean = torch.nan_to_num(per_class).sum(1) / present.sum(1).clamp_min(1)
    return torch.where(present.any(1), mean, torch.ones_like(mean))


def max_distance(spatial_shape: Sequence[int]) -> float:
    """The image diagonal ‖(H, W)‖₂ or ‖(D, H, W)‖₂ in pixels / voxels: the distance given to a class that only one
    of the two maps has (computed in float32, as the published ``hd95_vox`` values were)."""
    return float(torch.tensor([float(n) for n in spatial_shape]).norm())


def surface_distances_per_class(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """HD95 and ASSD [B, K−1] (float64 on the CPU, holding MONAI's float32 values) of each foreground class, in
    pixels / voxels.

    Where a class is in both maps: MONAI's symmetric surface distances (``get_edge_surface_distance``, Euclidean), HD95
    = max over the two directions of the 95th percentile (``compute_hausdorff_distance(percentile=95)``), ASSD = mean
    of both directions' distances together (``compute_average_surface_distance(symmetric=True)``). In one map only:
    :func:`max_distance`. In neither: NaN. Computed on the CPU, one (sample, class) at a time.
    """
    from monai.metrics.utils import get_edge_surface_distance

    p, t = one_hot_maps(pred.detach().cpu(), target.detach().cpu(), num_classes)
    in_p, in_t = _presence(p, t)
    diag = max_distance(pred.shape[1:])
    hd = torch.full(in_p.shape, math.nan, dtype=torch.float64).masked_fill(in_p ^ in_t, diag)
    assd = hd.clone()
    for b, c in (in_p & in_t).nonzero().tolist():
        with warnings.catch_warnings():  # MONAI 1.5+ deprecation notices raised from inside its own functions
            warnings.simplefilter("ignore", FutureWarning)
            _, dist, _ = get_edge_surface_distance(p[b, c + 1], t[b, c + 1], distance_metric="euclidean", symmetric=True,
                                                   class_index=c + 1, warn_empty=False)
        hd[b, c] = float(torch.stack([torch.quantile(d, HD_PERCENTILE / 100) for d in dist]).max().float())
        assd[b, c] = float(torch.cat(dist).mean().float())
    return hd, assd


def mean_distance(per_class: torch.Tensor) -> torch.Tensor:
    """Mean [B] over the classes present in either map (non-NaN); 0 when none is (nothing to miss)."""
    present = ~torch.isnan(per_class)
    return torch.nan_to_num(per_class).sum(1) / present.sum(1).clamp_min(1)


def surface_distances(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample HD95 and ASSD [B] (float32, on ``pred``'s device): :func:`surface_distances_per_class` averaged over
    the foreground classes present in either map, 0 where none is."""
    hd, assd = surface_distances_per_class(pred, target, num_classes)
    return mean_distance(hd).float().to(pred.device), mean_distance(assd).float().to(pred.device)
