"""Tasks: per-sample loss, prediction and score for each kind of victim output.

Every victim declares one task, by name; :func:`get_task` gives the :class:`Task` object that holds everything that
differs between tasks (loss, prediction, metrics, the targets and outputs it takes, whether a sample's outcome is
0/1, how a head reads as class logits, the target of a targeted attack), so the rest of the code asks the task
instead of comparing names. This module says, per task, what the output tensor is, what ``loss`` (per sample,
the quantity attacks maximise), ``predict`` and ``score`` (per sample, higher is better) compute, and when a sample
counts as *correct* (score ≥ ``success_threshold``), which defines the attack success rate.

| task            | output            | target                  | score (per sample)                          |
|-----------------|-------------------|-------------------------|---------------------------------------------|
| classification  | logits [B, C]     | class index [B]         | accuracy (1 if argmax == target)            |
| binary          | logits [B, 1|2]   | {0, 1} [B]              | accuracy (1 if (logit > 0) == target)       |
| multilabel      | logits [B, L]     | {0, 1} [B, L]           | label_accuracy (mean over L of correct)     |
| segmentation    | logits [B, K, *S] | class map [B, *S]       | dice_fg (mean Dice over foreground classes) |
| landmark        | heatmaps [B, L, *S]| (x, y[, z]) px [B, L, d]| sdr@Rpx (fraction within R pixels/voxels) |
| vqa             | LM output         | answers                 | vqa accuracy (defined by the LVLM victims)  |

Secondary per-sample metrics follow the primary one: ``prob_pos`` (binary: the positive-class probability, for
per-group calibration), ``iou_fg`` (segmentation: mean IoU over the foreground classes present, for ES-IoU),
``hd95_px`` / ``assd_px`` (segmentation: the 95th-percentile Hausdorff distance and the average symmetric surface
distance in pixels, lower is better), ``exact_match`` (multi-label), ``mre_px`` (landmarks). Dice and IoU average over
the foreground classes present in the prediction or the target, so a slice with a lesion has one more (harder) class
than one without. The segmentation metrics are computed through MONAI in :mod:`robustbench_med.seg_metrics`, which
states each convention that differs from MONAI's metric classes (e.g. ``DiceMetric``'s defaults) and what an empty
map gives (a class only one map has: the image diagonal as its distance).

``*S`` is the spatial size: ``(H, W)`` for slices, ``(D, H, W)`` for volumes (issue #20); on a volume Dice and IoU are
per volume (over all its voxels), the surface distances are ``hd95_vox`` / ``assd_vox`` (in voxels), landmarks are
``(x, y, z)`` voxel coordinates (x along W, y along H, z along D) and ``sdr@Rpx`` / ``mre_px`` count voxels.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch
import torch.nn.functional as F

from robustbench_med.errors import ConfigError
from robustbench_med.seg_metrics import dice_per_class, iou_per_class, mean_present, surface_distances  # noqa: F401


@dataclass(frozen=True)
class TaskSpec:
    """The metric a task reports and when a sample counts as correct."""

    name: str
    metric: str
    success_threshold: float = 0.5


def task_spec(task: str, sdr_radius: float = 4.0) -> TaskSpec:
    return TaskSpec(task, get_task(task).metric_name(sdr_radius))


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


def landmark_sq_distances(coords: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Squared distance [B, L, *size] of every pixel / voxel to each landmark: ``size`` (H, W) with (x, y)
    coordinates [B, L, 2], or (D, H, W) with (x, y, z) [B, L, 3] (coordinate k runs along spatial axis −1−k)."""
    nd = len(size)
    sq = torch.zeros((), device=coords.device)
    for k in range(nd):  # x along the last axis, y along the one before, z before that
        n = int(size[nd - 1 - k])
        shape = [1] * nd
        shape[nd - 1 - k] = n
        axis = torch.arange(n, device=coords.device, dtype=torch.float32).view(1, 1, *shape)
        sq = sq + (axis - coords[..., k].float().reshape(*coords.shape[:2], *[1] * nd)) ** 2
    return sq


def landmark_heatmaps(coords: torch.Tensor, size: Sequence[int], sigma: float) -> torch.Tensor:
    """Gaussian target heatmaps [B, L, *size] with peak 1 at each landmark (layout of :func:`landmark_sq_distances`)."""
    return torch.exp(-landmark_sq_distances(coords, size) / (2 * sigma**2))


def landmark_margin(heatmaps: torch.Tensor, coords: torch.Tensor, radius: float, kappa: float = 0.1) -> torch.Tensor:
    """Per-sample mean over landmarks of min(κ, max of the heatmap farther than ``radius`` from the landmark − max
    within it) [B]: positive once the decoded landmark (the arg-max) leaves the SDR radius; capped at κ so that an
    attack maximising it moves on to the landmarks still found (a Carlini–Wagner-style margin on heatmaps)."""
    far = landmark_sq_distances(coords, heatmaps.shape[2:]) > radius**2
    low = torch.finfo(heatmaps.dtype).min
    outside = heatmaps.masked_fill(~far, low).flatten(2).amax(-1)
    inside = heatmaps.masked_fill(far, low).flatten(2).amax(-1)
    return (outside - inside).clamp(max=kappa).mean(1)


def heatmap_argmax(heatmaps: torch.Tensor) -> torch.Tensor:
    """Coordinates [B, L, d] of each heatmap's maximum: (x, y) pixels for [B, L, H, W], (x, y, z) voxels for
    [B, L, D, H, W]."""
    idx = heatmaps.flatten(2).argmax(-1)
    coords = []
    for n in reversed(heatmaps.shape[2:]):  # x (last axis) first
        coords.append((idx % n).float())
        idx = torch.div(idx, n, rounding_mode="floor")
    return torch.stack(coords, dim=-1)


def hd95_per_volume(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """95th-percentile Hausdorff distance [B] in voxels (shim, kept for one release: the HD95 of
    :func:`robustbench_med.seg_metrics.surface_distances`, which holds the MONAI call and the empty-map conventions)."""
    return surface_distances(pred, target, num_classes)[0]


def soft_dice_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample 1 − soft Dice over foreground classes (a differentiable segmentation loss)."""
    prob = output.softmax(1)[:, 1:].flatten(2)
    onehot = F.one_hot(target.long(), output.shape[1]).movedim(-1, 1)[:, 1:].flatten(2).float()
    inter = (prob * onehot).sum(2)
    denom = prob.sum(2) + onehot.sum(2)
    return 1 - ((2 * inter + 1) / (denom + 1)).mean(1)


def loss_per_sample(task: str, output: torch.Tensor, target: torch.Tensor, heatmap_sigma: float = 2.0) -> torch.Tensor:
    """The per-sample loss attacks maximise (CE, BCE, per-pixel CE, heatmap MSE)."""
    return get_task(task).loss(output, target, heatmap_sigma)


def predict(task: str, output: torch.Tensor) -> torch.Tensor:
    """Hard predictions: class index, {0,1}, {0,1}^L, class map, or (x, y) landmark coordinates."""
    return get_task(task).predict(output)


def metrics_per_sample(task: str, output: torch.Tensor, target: torch.Tensor, sdr_radius: float = 4.0) -> dict[str, torch.Tensor]:
    """Per-sample metrics; the first key is the task's primary score (higher is better)."""
    return get_task(task).metrics(output, target, sdr_radius)


# --------------------------------------------------------------------------------------------------------------
# the task registry: one object per task holds everything that differs between tasks


class Task:
    """What one kind of victim output means: loss, prediction, per-sample metrics, the targets it takes and how its
    head reads as class logits. Look tasks up with :func:`get_task`; code elsewhere asks a task object instead of
    comparing task names. Subclasses override what their task defines; the rest raises (e.g. VQA has no generic loss:
    the LVLM victims define it)."""

    name: ClassVar[str]
    metric: ClassVar[str]
    target_shape: ClassVar[str] = ""  # e.g. "[n, H, W]"; empty: targets defined by the victims (VQA)
    target_dims: ClassVar[int | None] = None
    integer_targets: ClassVar[bool] = False  # class indices (not probabilities or coordinates)
    zero_one: ClassVar[bool] = False  # a sample's score is 0 or 1 (robust or not): cascades, exact binomial tests
    classifier: ClassVar[bool] = False  # one prediction per image over classes (binary, multi-class, multi-label)
    dense: ClassVar[bool] = False  # outputs are maps [B, K, H, W] of the input's size
    single_label: ClassVar[bool] = False  # one class per image, read from [B, C] class logits (binary, multi-class)
    wrappable: ClassVar[bool] = True  # a user's plain model of this task can be wrapped (wrap())
    victim_defined: ClassVar[bool] = False  # answers, loss and scores come from the victim's own evaluate() (VQA)
    output_shape: ClassVar[str] = ""  # what the model returns, for error messages
    output_unit: ClassVar[str] = "classes"  # what the output's channels are

    def metric_name(self, sdr_radius: float = 4.0) -> str:
        return self.metric

    def loss(self, output: torch.Tensor, target: torch.Tensor, heatmap_sigma: float = 2.0) -> torch.Tensor:
        raise ValueError(f"no generic loss for task {self.name!r}")

    def predict(self, output: torch.Tensor) -> torch.Tensor:
        raise ValueError(f"no generic prediction for task {self.name!r}")

    def metrics(self, output: torch.Tensor, target: torch.Tensor, sdr_radius: float = 4.0) -> dict[str, torch.Tensor]:
        raise ValueError(f"no generic metrics for task {self.name!r}")

    def num_classes(self, classes: Sequence[str]) -> int:
        """How many classes the head distinguishes (the columns of :meth:`class_logits` for single-label tasks;
        segmentation classes, labels or landmarks otherwise): the victim's ``classes``, or 2 for a binary head."""
        return len(classes)

    def class_logits(self, output: torch.Tensor) -> torch.Tensor:
        """The head as [B, C] logits whose softmax is the model's class distribution (classifiers only)."""
        raise ValueError(f"a {self.name} victim has no class logits")

    def check_values(self, y: torch.Tensor, card: Any, where: str) -> None:
        """Task-specific checks of well-shaped, finite targets ``y`` for a victim with ``card`` (see check_targets)."""

    def next_class(self, y: torch.Tensor, classes: Sequence[str]) -> torch.Tensor:
        """The target class of a targeted attack: the other class (binary) or the next one (multi-class)."""
        raise ConfigError(f"targeted attacks need a binary or multi-class classifier, not a {self.name} victim")

    def output_ok(self, shape: tuple[int, ...], spatial_dims: int = 2) -> bool:
        """Whether a model output of ``shape`` fits the task (checked when a user's model is wrapped) for inputs with
        ``spatial_dims`` spatial axes (2: slices, 3: volumes)."""
        return len(shape) == (2 + spatial_dims if self.dense else 2)

    def target_layout(self, card: Any) -> tuple[int | None, str]:
        """How many dimensions the targets of a victim with ``card`` have, and their shape in words (the class map
        follows the input's spatial size; landmarks carry one coordinate per spatial axis)."""
        return self.target_dims, self.target_shape

    def output_classes(self, shape: tuple[int, ...]) -> int:
        """How many classes (or landmarks) an output of ``shape`` has."""
        return shape[1]

    def default_names(self, k: int) -> tuple[str, ...]:
        return tuple(str(i) for i in range(k))


class Classification(Task):
    name, metric, target_shape, target_dims = "classification", "accuracy", "[n]", 1
    integer_targets = zero_one = classifier = single_label = True
    output_shape = "[B, C] logits with C >= 2"

    def output_ok(self, shape, spatial_dims=2):
        return len(shape) == 2 and shape[1] >= 2

    def next_class(self, y, classes):
        return (y + 1) % len(classes)

    def loss(self, output, target, heatmap_sigma=2.0):
        return F.cross_entropy(output, target.long(), reduction="none")

    def predict(self, output):
        return output.argmax(1)

    def metrics(self, output, target, sdr_radius=4.0):
        return {"accuracy": (self.predict(output) == target.long()).float()}

    def class_logits(self, output):
        return output

    def check_values(self, y, card, where):
        lo, hi = float(y.min()), float(y.max())
        if card.classes and (lo < 0 or hi >= len(card.classes)):
            raise ConfigError(f"{where}: class indices must lie in [0, {len(card.classes)}) for {card.name}, got [{lo:g}, {hi:g}]")


class Binary(Task):
    name, metric, target_shape, target_dims = "binary", "accuracy", "[n]", 1
    integer_targets = zero_one = classifier = single_label = True
    output_shape = "[B, 1] or [B, 2] logits"

    def output_ok(self, shape, spatial_dims=2):
        return len(shape) == 2 and shape[1] in (1, 2)

    def output_classes(self, shape):
        return 2

    def default_names(self, k):
        return ("negative", "positive")

    def next_class(self, y, classes):
        return 1 - y

    def loss(self, output, target, heatmap_sigma=2.0):
        return F.binary_cross_entropy_with_logits(binary_logit(output), target.float(), reduction="none")

    def predict(self, output):
        return (binary_logit(output) > 0).long()

    def metrics(self, output, target, sdr_radius=4.0):  # the positive-class probability feeds per-group calibration
        return {"accuracy": (self.predict(output) == target.long()).float(), "prob_pos": torch.sigmoid(binary_logit(output).float())}

    def num_classes(self, classes):
        return 2

    def class_logits(self, output):
        return two_class_logits(output)

    def check_values(self, y, card, where):
        _check_zero_one(self.name, y, where)


class Multilabel(Task):
    name, metric, target_shape, target_dims = "multilabel", "label_accuracy", "[n, L]", 2
    classifier = True
    output_shape, output_unit = "[B, L] logits", "labels"

    def loss(self, output, target, heatmap_sigma=2.0):
        return F.binary_cross_entropy_with_logits(output, target.float(), reduction="none").mean(1)

    def predict(self, output):
        return (output > 0).long()

    def metrics(self, output, target, sdr_radius=4.0):
        correct = (self.predict(output) == target.long()).float()
        return {"label_accuracy": correct.mean(1), "exact_match": correct.min(1).values}

    def check_values(self, y, card, where):
        _check_zero_one(self.name, y, where)
        if card.classes and y.shape[1] != len(card.classes):
            raise ConfigError(f"{where}: {card.name} has {len(card.classes)} labels, targets have {y.shape[1]}")


class Segmentation(Task):
    name, metric, target_shape, target_dims = "segmentation", "dice_fg", "[n, H, W]", 3
    integer_targets = dense = True
    output_shape = "[B, K, H, W] (slices) or [B, K, D, H, W] (volumes) logits"

    def target_layout(self, card):
        return 1 + card.spatial_dims, "[n, H, W]" if card.spatial_dims == 2 else "[n, D, H, W]"

    def loss(self, output, target, heatmap_sigma=2.0):
        return F.cross_entropy(output, target.long(), reduction="none").flatten(1).mean(1)

    def predict(self, output):
        return output.argmax(1)

    def metrics(self, output, target, sdr_radius=4.0):
        pred, k = self.predict(output), output.shape[1]
        out = {"dice_fg": mean_present(dice_per_class(pred, target, k)), "iou_fg": mean_present(iou_per_class(pred, target, k))}
        unit = "vox" if output.dim() == 5 else "px"  # the surface distances clinicians read next to Dice (lower is better)
        out[f"hd95_{unit}"], out[f"assd_{unit}"] = surface_distances(pred, target, k)
        return out

    def check_values(self, y, card, where):
        if tuple(y.shape[1:]) != tuple(card.input_size[1:]):
            raise ConfigError(f"{where}: class maps must be {list(card.input_size[1:])} like the input, got {list(y.shape[1:])}")
        if float(y.min()) < 0:
            raise ConfigError(f"{where}: class indices must be >= 0, got {float(y.min()):g}")


class Landmark(Task):
    name, metric, target_shape, target_dims = "landmark", "sdr", "[n, L, 2]", 3
    dense = True
    output_shape, output_unit = "[B, L, H, W] (slices) or [B, L, D, H, W] (volumes) heatmaps", "landmarks"

    def target_layout(self, card):
        return 3, "[n, L, 2]" if card.spatial_dims == 2 else "[n, L, 3] (x, y, z voxels)"

    def metric_name(self, sdr_radius=4.0):
        return f"sdr@{sdr_radius:g}px"

    def loss(self, output, target, heatmap_sigma=2.0):
        hm = landmark_heatmaps(target, output.shape[2:], heatmap_sigma)
        return (output - hm).pow(2).flatten(1).mean(1)

    def predict(self, output):
        return heatmap_argmax(output)

    def metrics(self, output, target, sdr_radius=4.0):
        err = (self.predict(output) - target.float()).norm(dim=-1)
        return {self.metric_name(sdr_radius): (err <= sdr_radius).float().mean(1), "mre_px": err.mean(1)}

    def check_values(self, y, card, where):
        if y.shape[-1] != card.spatial_dims:
            shape = self.target_layout(card)[1]
            raise ConfigError(f"{where}: a landmark victim ({card.name}) takes targets of shape {shape}, got {list(y.shape)}")


class VQA(Task):
    """Visual question answering: answers, loss and scores are defined by the LVLM victims (victims/lvlm)."""

    name, metric = "vqa", "vqa_accuracy"
    wrappable, victim_defined = False, True


def _check_zero_one(task: str, y: torch.Tensor, where: str) -> None:
    if not bool(((y == 0) | (y == 1)).all()):
        raise ConfigError(f"{where}: {task} targets must be 0 or 1, got values in [{float(y.min()):g}, {float(y.max()):g}]")


_TASKS: dict[str, Task] = {t.name: t for t in (Classification(), Binary(), Multilabel(), Segmentation(), Landmark(), VQA())}
TASKS = tuple(_TASKS)
ZERO_ONE_TASKS = frozenset(n for n, t in _TASKS.items() if t.zero_one)
CLASSIFIER_TASKS = frozenset(n for n, t in _TASKS.items() if t.classifier)
DENSE_TASKS = frozenset(n for n, t in _TASKS.items() if t.dense)
WRAP_TASKS = tuple(n for n, t in _TASKS.items() if t.wrappable)


def get_task(name: str) -> Task:
    """The :class:`Task` named ``name``; an unknown name raises :class:`ConfigError` with the closest names."""
    task = _TASKS.get(name) if isinstance(name, str) else None
    if task is None:
        close = difflib.get_close_matches(str(name), TASKS, n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ConfigError(f"unknown task {name!r}{hint} (tasks: {', '.join(TASKS)})")
    return task
