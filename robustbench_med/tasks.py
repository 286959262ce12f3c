"""Tasks: per-sample loss, prediction and score for each kind of victim output.

Every victim declares one task. This module says, per task, what the output tensor is, what ``loss`` (per sample,
the quantity attacks maximise), ``predict`` and ``score`` (per sample, higher is better) compute, and when a sample
counts as *correct* (score ≥ ``success_threshold``), which defines the attack success rate.

| task            | output            | target                  | score (per sample)                          |
|-----------------|-------------------|-------------------------|---------------------------------------------|
| classification  | logits [B, C]     | class index [B]         | accuracy (1 if argmax == target)            |
| binary          | logits [B, 1|2]   | {0, 1} [B]              | accuracy (1 if (logit > 0) == target)       |
| multilabel      | logits [B, L]     | {0, 1} [B, L]           | label_accuracy (mean over L of correct)     |
| segmentation    | logits [B, K, H, W]| class map [B, H, W]    | dice_fg (mean Dice over foreground classes) |
| landmark        | heatmaps [B, L, H, W]| (x, y) px [B, L, 2]  | sdr@Rpx (fraction within R pixels)          |
| vqa             | LM output         | answers                 | vqa accuracy (defined by the LVLM victims)  |

Secondary per-sample metrics follow the primary one: ``prob_pos`` (binary: the positive-class probability, for
per-group calibration), ``iou_fg`` (segmentation: mean IoU over the foreground classes present, for ES-IoU),
``exact_match`` (multi-label), ``mre_px`` (landmarks). Dice and IoU average over the foreground classes present in the
prediction or the target, so a slice with a lesion has one more (harder) class than one without.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

TASKS = ("classification", "binary", "multilabel", "segmentation", "landmark", "vqa")
CLASSIFIER_TASKS = frozenset({"classification", "binary", "multilabel"})
DENSE_TASKS = frozenset({"segmentation", "landmark"})


@dataclass(frozen=True)
class TaskSpec:
    """The metric a task reports and when a sample counts as correct."""

    name: str
    metric: str
    success_threshold: float = 0.5


def task_spec(task: str, sdr_radius: float = 4.0) -> TaskSpec:
    metric = {
        "classification": "accuracy",
        "binary": "accuracy",
        "multilabel": "label_accuracy",
        "segmentation": "dice_fg",
        "landmark": f"sdr@{sdr_radius:g}px",
        "vqa": "vqa_accuracy",
    }[task]
    return TaskSpec(task, metric)


def binary_logit(output: torch.Tensor) -> torch.Tensor:
    """The positive-class logit of a binary head with 1 logit (z) or 2 logits (z1 − z0)."""
    if output.shape[1] == 1:
        return output[:, 0]
    if output.shape[1] == 2:
        return output[:, 1] - output[:, 0]
    raise ValueError(f"a binary head has 1 or 2 logits, got {output.shape[1]}")


def two_class_logits(output: torch.Tensor) -> torch.Tensor:
    """Binary logits as a 2-column tensor whose softmax equals the model's probabilities ([0, z] for 1 logit)."""
    if output.shape[1] == 2:
        return output
    z = binary_logit(output)
    return torch.stack([torch.zeros_like(z), z], dim=1)


def landmark_heatmaps(coords: torch.Tensor, size: tuple[int, int], sigma: float) -> torch.Tensor:
    """Gaussian target heatmaps [B, L, H, W] with peak 1 at each (x, y) landmark."""
    h, w = size
    ys = torch.arange(h, device=coords.device, dtype=torch.float32).view(1, 1, h, 1)
    xs = torch.arange(w, device=coords.device, dtype=torch.float32).view(1, 1, 1, w)
    cx = coords[..., 0].float()[..., None, None]
    cy = coords[..., 1].float()[..., None, None]
    return torch.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * sigma**2))


def heatmap_argmax(heatmaps: torch.Tensor) -> torch.Tensor:
    """(x, y) pixel coordinates [B, L, 2] of each heatmap's maximum."""
    b, n, h, w = heatmaps.shape
    idx = heatmaps.flatten(2).argmax(-1)
    return torch.stack([(idx % w).float(), torch.div(idx, w, rounding_mode="floor").float()], dim=-1)


def dice_per_class(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Dice [B, K−1] of each foreground class; NaN where the class is absent from both maps."""
    inter, denom = _overlaps(pred, target, num_classes)
    return torch.where(denom > 0, 2 * inter / denom.clamp_min(1), torch.full_like(denom, float("nan")))


def iou_per_class(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """IoU (Jaccard) [B, K−1] of each foreground class, |P ∩ T| / |P ∪ T|; NaN where absent from both maps."""
    inter, denom = _overlaps(pred, target, num_classes)
    return torch.where(denom > 0, inter / (denom - inter).clamp_min(1), torch.full_like(denom, float("nan")))


def _overlaps(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per foreground class: |P ∩ T| and |P| + |T| [B, K−1]."""
    p = F.one_hot(pred.long(), num_classes).flatten(1, 2)[..., 1:].float()
    t = F.one_hot(target.long(), num_classes).flatten(1, 2)[..., 1:].float()
    return (p * t).sum(1), p.sum(1) + t.sum(1)


def mean_present(per_class: torch.Tensor) -> torch.Tensor:
    """Mean over the classes present in the prediction or the target (NaN entries); 1 when none is (both empty)."""
    present = ~torch.isnan(per_class)
    mean = torch.nan_to_num(per_class).sum(1) / present.sum(1).clamp_min(1)
    return torch.where(present.any(1), mean, torch.ones_like(mean))


def soft_dice_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample 1 − soft Dice over foreground classes (a differentiable segmentation loss)."""
    prob = output.softmax(1)[:, 1:].flatten(2)
    onehot = F.one_hot(target.long(), output.shape[1]).permute(0, 3, 1, 2)[:, 1:].flatten(2).float()
    inter = (prob * onehot).sum(2)
    denom = prob.sum(2) + onehot.sum(2)
    return 1 - ((2 * inter + 1) / (denom + 1)).mean(1)


def loss_per_sample(task: str, output: torch.Tensor, target: torch.Tensor, heatmap_sigma: float = 2.0) -> torch.Tensor:
    """The per-sample loss attacks maximise (CE, BCE, per-pixel CE, heatmap MSE)."""
    if task == "classification":
        return F.cross_entropy(output, target.long(), reduction="none")
    if task == "binary":
        return F.binary_cross_entropy_with_logits(binary_logit(output), target.float(), reduction="none")
    if task == "multilabel":
        return F.binary_cross_entropy_with_logits(output, target.float(), reduction="none").mean(1)
    if task == "segmentation":
        return F.cross_entropy(output, target.long(), reduction="none").flatten(1).mean(1)
    if task == "landmark":
        hm = landmark_heatmaps(target, output.shape[-2:], heatmap_sigma)
        return (output - hm).pow(2).flatten(1).mean(1)
    raise ValueError(f"no generic loss for task {task!r}")


def predict(task: str, output: torch.Tensor) -> torch.Tensor:
    """Hard predictions: class index, {0,1}, {0,1}^L, class map, or (x, y) landmark coordinates."""
    if task == "classification":
        return output.argmax(1)
    if task == "binary":
        return (binary_logit(output) > 0).long()
    if task == "multilabel":
        return (output > 0).long()
    if task == "segmentation":
        return output.argmax(1)
    if task == "landmark":
        return heatmap_argmax(output)
    raise ValueError(f"no generic prediction for task {task!r}")


def metrics_per_sample(task: str, output: torch.Tensor, target: torch.Tensor, sdr_radius: float = 4.0) -> dict[str, torch.Tensor]:
    """Per-sample metrics; the first key is the task's primary score (higher is better)."""
    pred = predict(task, output)
    if task == "classification":
        return {"accuracy": (pred == target.long()).float()}
    if task == "binary":  # the positive-class probability feeds the per-group calibration error (fairness)
        return {"accuracy": (pred == target.long()).float(), "prob_pos": torch.sigmoid(binary_logit(output).float())}
    if task == "multilabel":
        correct = (pred == target.long()).float()
        return {"label_accuracy": correct.mean(1), "exact_match": correct.min(1).values}
    if task == "segmentation":
        k = output.shape[1]
        return {"dice_fg": mean_present(dice_per_class(pred, target, k)), "iou_fg": mean_present(iou_per_class(pred, target, k))}
    if task == "landmark":
        err = (pred - target.float()).norm(dim=-1)
        return {f"sdr@{sdr_radius:g}px": (err <= sdr_radius).float().mean(1), "mre_px": err.mean(1)}
    raise ValueError(f"no generic metrics for task {task!r}")
