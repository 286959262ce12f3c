"""Metrics from the field's libraries (issue #18, item 4): detection through scikit-learn, segmentation through MONAI,
and each convention where the project's number differs from a library's default reproduced by switching it."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from robustbench_med import seg_metrics as S
from robustbench_med.detection import auroc, tpr_at_tnr
from robustbench_med.tasks import get_task


# ------------------------------------------------------------------------------------------------------------
# detection: sklearn.metrics


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_is_roc_auc_score_with_ties(seed):
    """AUROC equals ``roc_auc_score`` and the pair count P(adv > clean) + ½ P(adv = clean) on integer scores (many
    ties), for unequal group sizes."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    neg, pos = rng.integers(0, 5, 37).astype(float), rng.integers(1, 7, 23).astype(float)
    labels = np.r_[np.zeros(len(neg)), np.ones(len(pos))]
    pairs = (pos[None] > neg[:, None]).mean() + 0.5 * (pos[None] == neg[:, None]).mean()
    assert auroc(neg, pos) == pytest.approx(roc_auc_score(labels, np.r_[neg, pos]), abs=1e-12)
    assert auroc(neg, pos) == pytest.approx(pairs, abs=1e-12)
    assert auroc(np.ones(4), np.ones(3)) == 0.5  # all tied: chance


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_tpr_at_tnr_is_the_roc_curve_point_just_above_the_clean_threshold(seed):
    """TPR at 90% TNR is the ``roc_curve`` point at the smallest threshold above τ = quantile(clean, 0.9, 'higher'),
    and its FPR is at most 0.1; ties between clean and adversarial scores at τ count as not detected."""
    from sklearn.metrics import roc_curve

    rng = np.random.default_rng(seed)
    neg, pos = rng.integers(0, 12, 30 + seed).astype(float), rng.integers(4, 16, 25).astype(float)
    fpr, tpr, thr = roc_curve(np.r_[np.zeros(len(neg)), np.ones(len(pos))], np.r_[neg, pos], drop_intermediate=False)
    tau = np.quantile(neg, 0.9, method="higher")
    above = thr > tau
    i = np.flatnonzero(above)[-1]  # thresholds decrease: the last one above τ is the smallest
    assert tpr_at_tnr(neg, pos) == pytest.approx(tpr[i], abs=1e-12) and fpr[i] <= 0.1


def test_tpr_at_tnr_differs_from_best_point_with_fpr_at_most_01():
    """The documented difference from reading ``roc_curve`` at FPR ≤ 0.1: τ comes from the clean scores alone."""
    from sklearn.metrics import roc_curve

    clean, adv = np.arange(10.0), np.array([8.5])
    fpr, tpr, _ = roc_curve(np.r_[np.zeros(10), np.ones(1)], np.r_[clean, adv])
    assert tpr[fpr <= 0.1].max() == 1.0 and tpr_at_tnr(clean, adv) == 0.0


# ------------------------------------------------------------------------------------------------------------
# segmentation: MONAI


def _maps(seed: int, shape=(6, 12, 12), k: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Random class maps with every empty-class case: sample 0 predicts nothing, sample 1 has an empty target (so its
    predicted classes are false positives), sample 2 misses class 2 in the prediction, sample 3 has no foreground in
    either map, sample 4 has class 2 in neither map."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, k, shape, generator=g) * (torch.rand(shape, generator=g) < 0.4)
    pred = torch.where(torch.rand(shape, generator=g) < 0.25, torch.randint(0, k, shape, generator=g), target)
    pred[0], target[1] = 0, 0
    pred[2][pred[2] == 2] = 1
    pred[3], target[3] = 0, 0
    pred[4][pred[4] == 2], target[4][target[4] == 2] = 1, 1
    return pred, target


def _onehot(m: torch.Tensor, k: int) -> torch.Tensor:
    return F.one_hot(m, k).movedim(-1, 1).float()


def test_dice_and_iou_through_monai_equal_the_overlap_formulas():
    """Per-class Dice 2|P∩T|/(|P|+|T|) and IoU |P∩T|/|P∪T| (the project's formulas before MONAI computed them, so
    ``dice_fg`` / ``iou_fg`` are unchanged), NaN exactly where a class is in neither map."""
    pred, target = _maps(0)
    p, t = _onehot(pred, 3)[:, 1:].flatten(2), _onehot(target, 3)[:, 1:].flatten(2)
    inter, size = (p * t).sum(2), p.sum(2) + t.sum(2)
    dice, iou = S.dice_per_class(pred, target, 3), S.iou_per_class(pred, target, 3)
    assert torch.equal(torch.isnan(dice), size == 0) and torch.equal(torch.isnan(iou), size == 0)
    ok = size > 0
    assert torch.equal(dice[ok], (2 * inter / size)[ok]) and torch.equal(iou[ok], (inter / (size - inter))[ok])
    assert S.mean_present(dice)[3] == 1.0 and (S.mean_present(dice)[:2] == 0).all()  # empty-empty: 1; misses: 0


@pytest.mark.parametrize("name", ["dice", "iou"])
def test_monai_metric_classes_reproduced_by_switching_each_convention(name):
    """``DiceMetric`` / ``MeanIoU`` give another number than the mean of ours on the same maps; switching our conventions
    (seg_metrics docstring) one at a time reproduces MONAI's exactly: (2) classes absent from the target dropped
    (``ignore_empty=True``), (3) samples left with no class dropped instead of scoring 1, (1) the background
    included (MONAI's default); (4) ``reduction="mean_batch"`` then a mean over classes weighs classes equally."""
    from monai.metrics import DiceMetric, MeanIoU

    metric = S.dice_per_class if name == "dice" else S.iou_per_class
    cls = DiceMetric if name == "dice" else MeanIoU

    def monai(p: torch.Tensor, t: torch.Tensor, include_background: bool, reduction: str = "mean") -> torch.Tensor:
        m = cls(include_background=include_background, reduction=reduction)
        m(p, t)
        return m.aggregate()

    def per_sample(values: torch.Tensor) -> float:  # mean over a sample's non-NaN classes, then over samples kept
        kept = (~torch.isnan(values)).any(1)
        return S.mean_present(values)[kept].mean().item()

    for seed in range(3):
        pred, target = _maps(seed)
        p, t = _onehot(pred, 3), _onehot(target, 3)
        per_class = metric(pred, target, 3)
        ours = S.mean_present(per_class).mean().item()
        fg = monai(p, t, False).item()
        ignore_empty = torch.where(t[:, 1:].flatten(2).any(2), per_class, torch.full_like(per_class, math.nan))  # (2)
        only_2 = S.mean_present(ignore_empty).mean().item()  # empty samples still score 1
        assert abs(ours - fg) > 1e-3 and abs(only_2 - fg) > 1e-3
        assert per_sample(ignore_empty) == pytest.approx(fg, abs=1e-6)  # (2) and (3)
        bg = metric((pred == 0).long(), (target == 0).long(), 2)  # background read as the one class of a 2-class map
        bg = torch.where(t[:, :1].flatten(2).any(2), bg, torch.full_like(bg, math.nan))
        with_bg = torch.cat([bg, ignore_empty], 1)
        assert abs(monai(p, t, True).item() - fg) > 1e-3
        assert per_sample(with_bg) == pytest.approx(monai(p, t, True).item(), abs=1e-6)  # (1), (2) and (3)
        by_class = torch.nanmean(ignore_empty, 0)  # (4): per class over samples, then over classes
        assert torch.allclose(by_class, monai(p, t, False, "mean_batch"), atol=1e-6)
        assert abs(by_class.mean().item() - fg) > 1e-4


def test_hd95_and_assd_are_monai_values_where_both_maps_have_the_class():
    """HD95 / ASSD equal ``compute_hausdorff_distance(percentile=95)`` / ``compute_average_surface_distance(
    symmetric=True)`` wherever the class is in both maps (one MONAI surface-distance call gives both), for slices and
    volumes."""
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

    for shape in ((6, 12, 12), (6, 5, 8, 9)):
        pred, target = _maps(1, shape)
        p, t = _onehot(pred, 3), _onehot(target, 3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hd_ref = compute_hausdorff_distance(p, t, include_background=False, percentile=95).double()
            asd_ref = compute_average_surface_distance(p, t, include_background=False, symmetric=True).double()
        hd, assd = S.surface_distances_per_class(pred, target, 3)
        both = p[:, 1:].flatten(2).any(2) & t[:, 1:].flatten(2).any(2)
        assert both.sum() >= 4 and torch.equal(hd[both], hd_ref[both]) and torch.equal(assd[both], asd_ref[both])
        bound = S.max_distance(shape[1:])  # NaN (a class in neither map) compares False: counted as within
        assert not (hd > bound).any() and not (assd > bound).any() and (assd[both] >= 0).all()


def test_surface_distances_of_empty_maps_are_defined():
    """Where MONAI gives inf (class in one map only) or NaN (in neither), a class in one map scores the image diagonal,
    a class in neither is left out of the sample's mean, and a sample with no foreground anywhere scores 0."""
    from monai.metrics import compute_hausdorff_distance

    target = torch.zeros(3, 8, 10, dtype=torch.long)
    target[:, 2:5, 2:6] = 1
    pred = target.clone()
    pred[0, 2:5, 6] = 1  # sample 0: class 1 one column too wide, class 2 in neither map
    pred[1] = 0  # sample 1: class 1 missed
    pred[1, 0, 0] = 2  # ... and class 2 hallucinated
    target[2], pred[2] = 0, 0  # sample 2: nothing anywhere
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = compute_hausdorff_distance(_onehot(pred, 3), _onehot(target, 3), percentile=95)
    assert not torch.isfinite(ref[1]).any() and torch.isnan(ref[2]).all()  # what MONAI gives
    hd, assd = S.surface_distances_per_class(pred, target, 3)
    diag = S.max_distance((8, 10))
    assert diag == pytest.approx(math.hypot(8, 10))
    assert hd[0, 0].item() == pytest.approx(1.0) and math.isnan(hd[0, 1])
    assert hd[1].tolist() == [diag, diag] and assd[1].tolist() == [diag, diag] and torch.isnan(hd[2]).all()
    hd95, mean_assd = S.surface_distances(pred, target, 3)
    assert hd95.tolist() == pytest.approx([1.0, diag, 0.0]) and mean_assd[1].item() == pytest.approx(diag)
    assert mean_assd[0].item() == pytest.approx(4 / 22)  # 3 of 12 and 1 of 10 edge pixels lie 1 px off the other surface


def test_segmentation_task_reports_surface_distances_and_keeps_its_loss():
    """The segmentation task reports HD95 and ASSD after Dice / IoU, in pixels for slices and voxels for volumes; the
    attack loss (per-pixel cross-entropy) does not involve them."""
    task = get_task("segmentation")
    for shape, unit in (((2, 12, 12), "px"), ((2, 5, 8, 9), "vox")):
        pred, target = _maps(2, (shape[0] + 3, *shape[1:]))
        logits = _onehot(pred, 3) * 4.0
        m = task.metrics(logits, target)
        assert list(m) == ["dice_fg", "iou_fg", f"hd95_{unit}", f"assd_{unit}"]
        hd, assd = S.surface_distances(pred, target, 3)
        assert torch.equal(m[f"hd95_{unit}"], hd) and torch.equal(m[f"assd_{unit}"], assd)
        logits.requires_grad_(True)
        loss = task.loss(logits, target)
        expected = F.cross_entropy(logits, target, reduction="none").flatten(1).mean(1)
        assert torch.equal(loss, expected) and loss.grad_fn is not None


def test_bad_class_maps_raise_clear_errors():
    from robustbench_med.errors import ConfigError

    maps = torch.zeros(2, 4, 4, dtype=torch.long)
    with pytest.raises(ConfigError, match="class indices"):
        S.dice_per_class(maps, maps + 3, 3)
    with pytest.raises(ConfigError, match="differ in shape"):
        S.surface_distances(maps, maps[:, :3], 3)
    with pytest.raises(ConfigError, match="at least 2 classes"):
        S.iou_per_class(maps, maps, 1)
