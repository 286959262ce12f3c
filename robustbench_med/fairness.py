"""Fairness under attack: group metrics of every grid cell, computed from its stored per-sample rows.

No existing benchmark combines adversarial robustness with group fairness (``shared/reference/anchors.md`` §8.1):
robustness suites have no sensitive attributes and fairness suites (MEDFAIR, FairMedFM, Harvard-FairSeg, Fairlearn)
have no attacks. Here every cell (victim × defence × attack × eps) is broken down by sensitive attribute: ``sex``,
``age_group`` and their intersection ``sex*age_group`` (group labels such as ``F*old``), and on multi-site data
(``phantom.sites``) the acquisition ``site`` as well (not intersected). Group arithmetic is Fairlearn's
:class:`~fairlearn.metrics.MetricFrame` (Weerts et al., "Fairlearn: Assessing and Improving Fairness of AI Systems",
JMLR 2023) bit for bit (:class:`GroupMeans`, :func:`group_rates`; tested against it), computed with NumPy masks.

Column names (``<m>`` is the task's primary metric, e.g. ``dice_fg`` or ``accuracy``; ``A`` an attribute, ``g`` one
of its groups; "clean" = the defended model on clean inputs, "robust" = on the cell's adversarial inputs):

====================================================  ================================================================
``n[A=g]``                                            samples in group g
``clean_<m>[A=g]`` / ``robust_<m>[A=g]``              mean score of group g
``clean_gap_<m>[A]`` / ``robust_gap_<m>[A]``          max_g mean − min_g mean (Fairlearn ``difference()``)
``gap_change_<m>[A]``                                 robust_gap − clean_gap (> 0: the attack widens the gap)
``*_ci95_low[A]`` / ``*_ci95_high[A]``                stratified percentile-bootstrap 95% interval (see
                                                      :func:`bootstrap_group_stats`), for the clean and robust gaps,
                                                      the gap change and the worst-group robust metric
``clean_worst_group[A]`` / ``robust_worst_group[A]``  the group with the lowest mean (a label)
``clean_worst_group_<m>[A]`` / ``robust_…``           its mean (Fairlearn ``group_min()``)
``clean_ratio_<m>[A]`` / ``robust_ratio_<m>[A]``      min_g mean / max_g mean (Fairlearn ``ratio()``)
``{clean,robust}_es_dice_fairseg[A]``                 segmentation: Harvard-FairSeg ES-Dice (:func:`es_fairseg`)
``{clean,robust}_es_dice_fairmedfm[A]``               segmentation: FairMedFM ES-Dice (:func:`es_fairmedfm`)
``robust_es_iou_{fairseg,fairmedfm}[A]``              only when the stored metrics hold ``iou_fg``
``{clean,robust}_dp_difference[A]``                   binary classifiers: demographic-parity difference
``{clean,robust}_eo_difference[A]``                   binary classifiers: equalised-odds difference (worst case)
``eo_degenerate_groups[A]``                           groups with no positives or no negatives (their TPR or FPR is
                                                      0 by Fairlearn's convention); empty when none
``{clean,robust}_ece[A=g]``, ``…_ece_gap[A]``         binary classifiers, when probabilities are stored
``notes``                                             what could not be computed and why
====================================================  ================================================================

Thresholds are never tuned on the scored data: binary predictions are the victim's fixed rule (logit > 0), and a
sample counts as correct at the task's fixed ``success_threshold``. (MEDFAIR and FairMedFM pick an F1-optimal threshold
on the evaluated predictions; we do not.)
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from robustbench_med.errors import ConfigError

ATTRIBUTES = ("sex", "age_group", "site")  # ``site``: only in multi-site data (phantom.sites); never intersected
INTERSECTED = ("sex", "age_group")
INTERSECTION = "sex*age_group"
ECE_BINS = 15


# ---------------------------------------------------------------------------------------------------------------
# attributes and group statistics


def group_columns(attrs: pd.DataFrame, attributes: Iterable[str] = ATTRIBUTES) -> dict[str, np.ndarray]:
    """The features to break down by: each attribute present, and the intersection ``sex*age_group`` (``site`` is
    reported alone).

    The intersection label of a sample is its values joined by ``*`` (e.g. ``F*old``). Missing attributes are left
    out; a missing value in a present attribute raises :class:`ConfigError`.
    """
    present = [a for a in attributes if a in attrs.columns]
    out: dict[str, np.ndarray] = {}
    for a in present:
        col = attrs[a]
        if col.isna().any():
            raise ConfigError(f"attribute {a!r} is missing for {int(col.isna().sum())} samples")
        out[a] = col.astype(str).to_numpy()
    crossed = [a for a in present if a in INTERSECTED]
    if len(crossed) >= 2:
        out["*".join(crossed)] = _joined_labels([out[a] for a in crossed])
    return out


def _joined_labels(columns: list[np.ndarray]) -> np.ndarray:
    """``"*".join`` of the columns' values, sample by sample (an object array of str), joining each distinct
    combination once."""
    if len(columns[0]) == 0:
        return np.array([], dtype=object)
    codes, uniques = zip(*(pd.factorize(c) for c in columns))
    dims = tuple(len(u) for u in uniques)
    combo, present = pd.factorize(np.ravel_multi_index(codes, dims))
    names = ["*".join(u[i] for u, i in zip(uniques, np.unravel_index(k, dims))) for k in present]
    return np.array(names, dtype=object)[combo]


def group_gap(values: Any, axis: int | None = None) -> Any:
    """The gap between groups: max − min of the per-group values (Fairlearn's ``MetricFrame.difference()``,
    ``method='between_groups'``). The one implementation of a group gap: ``values`` is a sequence or array of group
    values (``axis``: the group axis of an array of bootstrap replicates) or a pandas object (reduced per column,
    NaN skipped, as pandas reduces)."""
    if isinstance(values, (pd.Series, pd.DataFrame)):
        return values.max() - values.min()
    v = np.asarray(values, dtype=float)
    return v.max(axis=axis) - v.min(axis=axis)


@dataclass(frozen=True)
class GroupMeans:
    """Group means of named per-sample scores, with the interface of a Fairlearn ``MetricFrame`` of column means
    (``by_group``, ``overall``, ``difference()``, ``ratio()``, ``group_min()``) and its values, bit for bit (tested
    against ``fairlearn.metrics.MetricFrame``): each mean is ``numpy.mean`` of the group's scores in sample order, as
    Fairlearn computes it; groups in sorted order. Built with NumPy masks instead of a pandas group-by per metric,
    which made Fairlearn's frame ~70% of summarising a large store."""

    by_group: pd.DataFrame
    overall: pd.Series

    def difference(self) -> pd.Series:
        """max_g − min_g per metric (Fairlearn ``method='between_groups'``)."""
        return group_gap(self.by_group)

    def ratio(self) -> pd.Series:
        """min_g / max_g per metric."""
        return self.by_group.min() / self.by_group.max()

    def group_min(self) -> pd.Series:
        return self.by_group.min()


def group_frame(values: dict[str, np.ndarray], groups: np.ndarray) -> GroupMeans:
    """The group means of named per-sample scores (:class:`GroupMeans`): ``by_group[k][g] = mean_{i in g}
    values[k][i]``; ``overall[k]`` = mean over all samples; ``difference()`` = max_g − min_g; ``ratio()`` =
    min_g / max_g; ``group_min()`` = min_g."""
    codes, found = pd.factorize(np.asarray(groups, dtype=object))
    levels = sorted(found)
    rank = np.argsort(np.array([levels.index(u) for u in found], dtype=np.intp))  # found[rank[i]] = levels[i]
    masks = [codes == r for r in rank]
    cols = {k: np.asarray(v, dtype=float) for k, v in values.items()}
    means = np.array([[float(np.mean(v[m])) for v in cols.values()] for m in masks], dtype=float).reshape(len(masks), len(cols))
    by = pd.DataFrame(means, index=pd.Index(levels, name="group"), columns=list(cols))
    return GroupMeans(by, pd.Series({k: float(np.mean(v)) for k, v in cols.items()}))


def _level_codes(groups: np.ndarray, levels: list[Any]) -> np.ndarray:
    """The position of every sample's group in ``levels`` (all groups must be among them): one hash pass instead of
    an object comparison per level."""
    codes, uniques = pd.factorize(np.asarray(groups, dtype=object))
    position = {level: i for i, level in enumerate(levels)}
    outside = [u for u in uniques if u not in position]
    if outside:
        raise ConfigError(f"groups {outside} are not among the levels {levels}")
    return np.array([position[u] for u in uniques], dtype=np.intp)[codes] if len(uniques) else codes


def es_fairseg(overall: float, group_means: Iterable[float]) -> float:
    """Equity-scaled performance as in Harvard-FairSeg (Tian et al., ICLR 2024; ``equity_scaled_perf``, α = 1):

    ``ES = overall / (1 + Σ_g |mean_g − overall|)``, with ``overall`` the mean over all samples (not the mean of the
    group means). Equals ``overall`` when every group equals it.
    """
    dev = sum(abs(float(m) - overall) for m in group_means)
    return float(overall / (1.0 + dev))


def es_fairmedfm(overall: float, group_means: Iterable[float]) -> float:
    """Equity-scaled performance as in FairMedFM (Jin et al., NeurIPS 2024 D&B; ``evaluate_seg``'s ``es_dice``):

    ``ES = overall / (1 + σ)``, σ = *population* standard deviation (``numpy.std``, ddof = 0) of the group means.
    FairMedFM defines it for two groups; the same formula is applied here to any number of groups.
    """
    return float(overall / (1.0 + float(np.std(np.asarray(list(group_means), dtype=float)))))


def bootstrap_group_stats(
    clean: np.ndarray, robust: np.ndarray, codes: np.ndarray, n_groups: int, n_boot: int, seed: int
) -> dict[str, tuple[float, float]]:
    """Stratified percentile-bootstrap 95% intervals (Efron & Tibshirani 1993) of the group statistics.

    Each replicate resamples, with replacement, ``n_g`` samples inside every group g (group sizes stay fixed, so no
    group vanishes) and keeps the clean and robust score of a sample together (paired). Per replicate b:
    ``clean_gap_b = max_g c̄_gb − min_g c̄_gb``, ``robust_gap_b`` likewise, ``gap_change_b = robust_gap_b − clean_gap_b``
    and ``robust_worst_b = min_g r̄_gb``. Interval = the 2.5% and 97.5% quantiles over b.

    All replicates of a group are drawn at once (``Generator.integers(0, n_g, size=(n_boot, n_g))``, the same stream
    as ``n_boot`` successive draws of ``n_g``) and averaged by :func:`replicate_means`; group order and draws are those
    of the straightforward per-group loop, so the intervals are bit-identical to it (tested).
    """
    clean, robust, codes = (np.asarray(a) for a in (clean, robust, codes))
    dtype = np.result_type(clean, robust)
    dtype = dtype if np.issubdtype(dtype, np.floating) else np.dtype(float)  # NumPy averages integers in float64
    rng = np.random.default_rng(seed)
    means = np.empty((n_boot, n_groups, 2))
    for g in range(n_groups):
        idx = np.flatnonzero(codes == g)
        if len(idx) == 0:
            raise ConfigError(f"group {g} of {n_groups} has no samples: a stratified bootstrap needs every group")
        draw = rng.integers(0, len(idx), size=(n_boot, len(idx)), dtype=np.int32)  # the int64 stream, half the bytes
        means[:, g, 0] = replicate_means(clean[idx].astype(dtype, copy=False), draw)
        means[:, g, 1] = replicate_means(robust[idx].astype(dtype, copy=False), draw)
    gaps = group_gap(means, axis=1)
    stats = {"clean_gap": gaps[:, 0], "robust_gap": gaps[:, 1], "gap_change": gaps[:, 1] - gaps[:, 0],
             "robust_worst": means[:, :, 1].min(1)}
    q = np.quantile(np.stack(list(stats.values()), 1), [0.025, 0.975], axis=0)  # column by column, as one call each
    return {k: (float(q[0, j]), float(q[1, j])) for j, k in enumerate(stats)}


def replicate_means(values: np.ndarray, draw: np.ndarray) -> np.ndarray:
    """The mean of every bootstrap replicate, bit-identical to ``np.stack([values, other], 1)[draw].mean(1)[:, 0]``
    for ``draw`` of shape ``(B, n)`` (the paired per-group form :func:`bootstrap_group_stats` used to compute).

    NumPy reduces that gather one sample at a time, in sample order (the reduced axis is not the innermost, so no
    pairwise summation). Here the values are gathered in the transposed layout ``(n, B)`` and summed down axis 0: the
    same additions in the same order, across all replicates at once and contiguously (~40× faster). One replicate
    (B = 1) would be summed pairwise that way, so it is summed with ``cumsum`` (sequential) instead.
    """
    if draw.shape[0] == 1:
        return np.cumsum(values[draw[0]])[-1:] / draw.shape[1]
    return np.take(values, draw.T).sum(0) / draw.shape[1]


# ---------------------------------------------------------------------------------------------------------------
# per-sample columns of a cell


def _json(v: Any) -> Any:
    if isinstance(v, (bytes, str)):
        return json.loads(v)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return v


def _distinct(values: Iterable[Any]) -> tuple[np.ndarray, list[Any]] | None:
    """Codes and distinct values (in order of appearance) of stored JSON cells; ``None`` when a value is unhashable
    (already decoded)."""
    arr = values.to_numpy(dtype=object) if isinstance(values, pd.Series) else np.asarray(list(values), dtype=object)
    try:
        codes, uniques = pd.factorize(arr, use_na_sentinel=False)
    except TypeError:
        return None
    return codes, list(uniques)


def json_frame(values: pd.Series) -> pd.DataFrame:
    """A column of JSON objects (text, or already decoded) as a frame on the column's index, one column per key:
    ``pd.DataFrame([json.loads(v) or {} for v in values])`` to the dtype, but each distinct text decoded once (a
    store's ``metrics`` and ``attrs`` repeat a few texts over 100k rows)."""
    found = _distinct(values)
    if found is None:
        return pd.DataFrame([_json(v) or {} for v in values], index=values.index)
    codes, uniques = found
    frame = pd.DataFrame([_json(v) or {} for v in uniques]).take(codes)
    frame.index = values.index
    return frame


def metrics_frame(samples: pd.DataFrame) -> pd.DataFrame:
    """The ``metrics`` JSON column decoded into a frame on ``samples``' index (:func:`json_frame`)."""
    if "metrics" not in samples:
        return pd.DataFrame(index=samples.index)
    return json_frame(samples["metrics"])


def _ints(values: Iterable[Any]) -> np.ndarray:
    """``[int(json(v)) for v in values]`` as an array, each distinct value decoded once."""
    found = _distinct(values)
    if found is None:
        return np.asarray([int(_json(v)) for v in values])
    codes, uniques = found
    return np.asarray([int(_json(v)) for v in uniques])[codes] if len(uniques) else np.asarray([])


def binary_labels(pred: Iterable[Any], correct: Iterable[Any]) -> np.ndarray:
    """Ground truth of a binary task recovered from a stored prediction and its correctness: ``y = ŷ if correct
    else 1 − ŷ`` (binary accuracy is 1 exactly when ŷ = y)."""
    p = _ints(pred)
    c = np.asarray(correct, dtype=int)
    return np.where(c == 1, p, 1 - p)


# ---------------------------------------------------------------------------------------------------------------
# the entry point


def fairness_columns(samples: pd.DataFrame, attrs: pd.DataFrame, task: str, metric: str, *, n_boot: int = 1000, seed: int = 0) -> dict[str, float | str]:
    """Fairness-under-attack columns of one cell (see the module docstring for every name and formula).

    Args:
        samples: the cell's per-sample rows (``clean_score``, ``adv_score``, ``clean_correct``, ``adv_correct``,
            ``clean_pred``, ``adv_pred``, ``metrics`` …), one per sample.
        attrs: per-sample attributes on the same index (``sex``, ``age_group``).
        task: the victim's task (``segmentation`` adds ES-Dice, ``binary`` adds DP / EO / calibration).
        metric: the name of the primary score (used in column names).
        n_boot, seed: bootstrap resamples and seed of the confidence intervals.
    """
    if len(samples) != len(attrs):
        raise ConfigError(f"{len(samples)} sample rows but {len(attrs)} attribute rows")
    for col in ("clean_score", "adv_score"):
        if col not in samples:
            raise ConfigError(f"samples lack column {col!r}")
    if n_boot < 1:
        raise ConfigError(f"n_boot must be >= 1, got {n_boot}")
    out: dict[str, float | str] = {}
    notes: list[str] = []
    if samples.empty:
        return {"notes": "no samples"}
    clean = samples["clean_score"].to_numpy(float)
    robust = samples["adv_score"].to_numpy(float)
    finite = np.isfinite(clean) & np.isfinite(robust)
    if not finite.all():
        notes.append(f"{int((~finite).sum())} samples with a non-finite score left out")
    groups = group_columns(attrs)
    if not groups:
        return {"notes": "no sensitive attributes in attrs"}
    extra = metrics_frame(samples)
    if not finite.all():  # row selections made once, not per attribute
        samples, extra, clean, robust = samples[finite], extra[finite], clean[finite], robust[finite]
    for attr, g in groups.items():
        g = g[finite]
        out.update(_attribute_columns(attr, g, clean, robust, metric, n_boot, seed))
        if task == "segmentation":
            out.update(_es_columns(attr, g, clean, robust, extra, metric, notes))
        if task == "binary":
            out.update(_binary_columns(attr, g, samples, extra, notes))
    if task == "segmentation" and "iou_fg" not in extra:
        notes.append("ES-IoU not computed: the stored metrics hold no IoU (Dice only)")
    if task in ("classification", "multilabel"):
        notes.append(f"DP/EO differences not computed: defined for binary tasks only (task {task!r})")
    out["notes"] = "; ".join(dict.fromkeys(notes))
    return out


def _attribute_columns(attr: str, g: np.ndarray, clean: np.ndarray, robust: np.ndarray, metric: str, n_boot: int, seed: int) -> dict[str, float | str]:
    """Per-group means, gaps (max − min), worst group, ratio (min / max) and bootstrap CIs for one attribute."""
    out: dict[str, float | str] = {}
    by = group_frame({"clean": clean, "robust": robust}, g).by_group
    levels = list(by.index)
    codes = _level_codes(g, levels)
    counts = np.bincount(codes, minlength=len(levels))
    means = {k: by[k].to_numpy(float) for k in ("clean", "robust")}  # finite: fairness_columns drops the rest
    for i, level in enumerate(levels):
        out[f"n[{attr}={level}]"] = float(counts[i])
        out[f"clean_{metric}[{attr}={level}]"] = float(means["clean"][i])
        out[f"robust_{metric}[{attr}={level}]"] = float(means["robust"][i])
    if len(levels) < 2:
        return out
    diff = {}
    for k, m in means.items():  # GroupMeans' difference(), ratio(), group_min() on NumPy arrays
        diff[k] = float(group_gap(m))
        out[f"{k}_gap_{metric}[{attr}]"] = diff[k]
        with np.errstate(divide="ignore", invalid="ignore"):
            out[f"{k}_ratio_{metric}[{attr}]"] = float(m.min() / m.max())
        out[f"{k}_worst_group[{attr}]"] = str(levels[int(np.argmin(m))])
        out[f"{k}_worst_group_{metric}[{attr}]"] = float(m.min())
    out[f"gap_change_{metric}[{attr}]"] = diff["robust"] - diff["clean"]
    ci = bootstrap_group_stats(clean, robust, codes, len(levels), n_boot, seed)
    for stat, name in (("clean_gap", f"clean_gap_{metric}"), ("robust_gap", f"robust_gap_{metric}"),
                       ("gap_change", f"gap_change_{metric}"), ("robust_worst", f"robust_worst_group_{metric}")):
        out[f"{name}_ci95_low[{attr}]"], out[f"{name}_ci95_high[{attr}]"] = ci[stat]
    return out


def _es_columns(attr: str, g: np.ndarray, clean: np.ndarray, robust: np.ndarray, extra: pd.DataFrame, metric: str, notes: list[str]) -> dict[str, float | str]:
    """ES-Dice in both published forms (and ES-IoU from a stored ``iou_fg``) for one attribute."""
    base = "dice" if metric.startswith("dice") else metric
    series = {f"clean_es_{base}": clean, f"robust_es_{base}": robust}
    if "iou_fg" in extra:
        iou = extra["iou_fg"].to_numpy(float)
        if np.isfinite(iou).all():
            series["robust_es_iou"] = iou
        else:
            notes.append("ES-IoU not computed: non-finite stored IoU")
    out: dict[str, float | str] = {}
    mf = group_frame(series, g)
    if len(mf.by_group) < 2:
        return out
    for name in series:
        overall, means = float(mf.overall[name]), mf.by_group[name].to_numpy(float)
        out[f"{name}_fairseg[{attr}]"] = es_fairseg(overall, means)
        out[f"{name}_fairmedfm[{attr}]"] = es_fairmedfm(overall, means)
    return out


def _binary_columns(attr: str, g: np.ndarray, samples: pd.DataFrame, extra: pd.DataFrame, notes: list[str]) -> dict[str, float | str]:
    """Demographic-parity / equalised-odds differences and per-group calibration error of a binary classifier."""
    if samples["clean_pred"].isna().any() or samples["adv_pred"].isna().any():
        notes.append("DP/EO not computed: predictions were not stored")
        return {}
    y = binary_labels(samples["clean_pred"], samples["clean_correct"])
    if not np.array_equal(y, binary_labels(samples["adv_pred"], samples["adv_correct"])):
        raise ConfigError("inconsistent rows: clean and adversarial rows imply different ground truths")
    preds = {k: _ints(samples[col]) for k, col in (("clean", "clean_pred"), ("robust", "adv_pred"))}
    rates = group_rates(y, preds, g)
    out: dict[str, float | str] = {}
    for k in preds:
        out[f"{k}_dp_difference[{attr}]"] = demographic_parity_difference_from(rates, k)
        out[f"{k}_eo_difference[{attr}]"] = equalized_odds_difference_from(rates, k)
    degenerate = sorted({str(v) for v in np.unique(g) if len(np.unique(y[g == v])) < 2})
    out[f"eo_degenerate_groups[{attr}]"] = ",".join(degenerate)
    out.update(_calibration_columns(attr, g, y, extra, notes))
    return out


def group_rates(y: np.ndarray, preds: dict[str, np.ndarray], g: np.ndarray) -> pd.DataFrame:
    """Per group (rows in sorted order), for each named prediction vector k: ``sr_k`` = P(ŷ=1 | g), ``tpr_k`` =
    P(ŷ=1 | y=1, g), ``fpr_k`` = P(ŷ=1 | y=0, g). As in Fairlearn (whose ``MetricFrame`` gives the same frame, tested),
    a group with no positives has TPR 0 and one with no negatives FPR 0."""
    y, g = np.asarray(y), np.asarray(g)
    levels = sorted(pd.unique(g))

    def rate(p: np.ndarray, m: np.ndarray) -> float:
        return float(np.mean(p[m])) if m.any() else 0.0

    cols = {}
    for k, p in preds.items():
        p = np.asarray(p)
        cols[f"sr_{k}"] = [float(np.mean(p[g == v])) for v in levels]
        cols[f"tpr_{k}"] = [rate(p, (g == v) & (y == 1)) for v in levels]
        cols[f"fpr_{k}"] = [rate(p, (g == v) & (y == 0)) for v in levels]
    return pd.DataFrame(cols, index=pd.Index(levels, name="group"))


def demographic_parity_difference_from(rates: pd.DataFrame, k: str) -> float:
    """``DPD = max_g P(ŷ=1 | g) − min_g P(ŷ=1 | g)`` (Fairlearn ``demographic_parity_difference``,
    ``method='between_groups'``; lower is fairer, 0 = parity)."""
    sr = rates[f"sr_{k}"]
    return float(group_gap(sr))


def equalized_odds_difference_from(rates: pd.DataFrame, k: str) -> float:
    """``EOD = max(max_g TPR_g − min_g TPR_g, max_g FPR_g − min_g FPR_g)`` (Fairlearn ``equalized_odds_difference``,
    ``agg='worst_case'``; lower is fairer). Not MEDFAIR's ``EqOdd = 1 − ½(|ΔTPR| + |ΔFPR|)`` (higher is fairer)."""
    tpr, fpr = rates[f"tpr_{k}"], rates[f"fpr_{k}"]
    return float(max(group_gap(tpr), group_gap(fpr)))


def demographic_parity_difference(y: np.ndarray, pred: np.ndarray, g: np.ndarray) -> float:
    """Demographic-parity difference of one prediction vector (see :func:`demographic_parity_difference_from`)."""
    return demographic_parity_difference_from(group_rates(y, {"p": pred}, g), "p")


def equalized_odds_difference(y: np.ndarray, pred: np.ndarray, g: np.ndarray) -> float:
    """Equalised-odds difference of one prediction vector (see :func:`equalized_odds_difference_from`)."""
    return equalized_odds_difference_from(group_rates(y, {"p": pred}, g), "p")


def expected_calibration_error(prob_pos: np.ndarray, y: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Binary ECE with ``n_bins`` equal-width confidence bins (Guo et al., ICML 2017):

    confidence ``c_i = max(p_i, 1 − p_i)``, prediction ``ŷ_i = [p_i > 0.5]``,
    ``ECE = Σ_b (|B_b| / n) · |mean_{i∈B_b} 1[ŷ_i = y_i] − mean_{i∈B_b} c_i|``; bins are (k/B, (k+1)/B], first closed.
    """
    p = np.asarray(prob_pos, dtype=float)
    y = np.asarray(y, dtype=int)
    if len(p) == 0:
        return math.nan
    conf = np.maximum(p, 1 - p)
    correct = ((p > 0.5).astype(int) == y).astype(float)
    bins = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    total = 0.0
    for b in np.unique(bins):
        m = bins == b
        total += m.sum() / len(p) * abs(correct[m].mean() - conf[m].mean())
    return float(total)


def _calibration_columns(attr: str, g: np.ndarray, y: np.ndarray, extra: pd.DataFrame, notes: list[str]) -> dict[str, float | str]:
    """Per-group ECE of the stored positive-class probabilities: ``clean_prob_pos`` (clean input) and ``prob_pos``
    (adversarial input) in the ``metrics`` JSON. Absent probabilities are reported in ``notes``."""
    out: dict[str, float | str] = {}
    found = False
    for k, key in (("clean", "clean_prob_pos"), ("robust", "prob_pos")):
        if key not in extra:
            continue
        found = True
        p = extra[key].to_numpy(float)
        eces = {str(level): expected_calibration_error(p[g == level], y[g == level]) for level in np.unique(g)}
        for level, e in eces.items():
            out[f"{k}_ece[{attr}={level}]"] = e
        out[f"{k}_ece_gap[{attr}]"] = float(group_gap(list(eces.values())))
    if not found:
        notes.append("calibration error not computed: the stored metrics hold no probabilities ('prob_pos', 'clean_prob_pos')")
    return out


# ---------------------------------------------------------------------------------------------------------------
# comparisons, whole stores, plots


def compare_groups(
    base: pd.DataFrame, other: pd.DataFrame, attrs: pd.DataFrame, attr: str, *, score: str = "adv_score",
    n_boot: int = 1000, seed: int = 0,
) -> dict[str, float]:
    """Paired comparison of two cells on the same samples (e.g. undefended vs APPLE at one attack and eps).

    Rows are matched on ``sample_idx``; ``attrs`` is indexed by ``sample_idx``. Returns the overall means and gaps
    (max_g − min_g of the group means of ``score``) of both, ``gap_diff = gap_other − gap_base``,
    ``overall_diff = mean_other − mean_base`` and their paired stratified-bootstrap 95% intervals (one resample of the
    sample indices, within groups, serves both cells), and the same resamples' intervals of each cell's own gap
    (``gap_base_ci95_*``, ``gap_other_ci95_*``).
    """
    a = base.set_index("sample_idx")[score]
    b = other.set_index("sample_idx")[score]
    common = a.index.intersection(b.index)
    if len(common) == 0:
        raise ConfigError("the two cells share no samples")
    columns = group_columns(attrs.loc[common])
    if attr not in columns:
        raise ConfigError(f"unknown attribute {attr!r}; have {sorted(columns)}")
    labels = columns[attr]
    va, vb = a.loc[common].to_numpy(float), b.loc[common].to_numpy(float)
    levels = sorted(set(labels))
    codes = np.array([levels.index(v) for v in labels])

    def gap(v: np.ndarray) -> float:
        m = [v[codes == c].mean() for c in range(len(levels))]
        return float(group_gap(m))

    rng = np.random.default_rng(seed)
    reps = np.empty((n_boot, 4))
    draws = [np.flatnonzero(codes == c) for c in range(len(levels))]
    draws = [idx[rng.integers(0, len(idx), size=(n_boot, len(idx)))] for idx in draws]
    for r in range(n_boot):
        ix = np.concatenate([d[r] for d in draws])
        ca = codes[ix]
        ga = [va[ix][ca == c].mean() for c in range(len(levels))]
        gb = [vb[ix][ca == c].mean() for c in range(len(levels))]
        reps[r] = group_gap(gb) - group_gap(ga), vb[ix].mean() - va[ix].mean(), group_gap(ga), group_gap(gb)
    q = np.quantile(reps, [0.025, 0.975], axis=0)
    return {"n": float(len(common)), "overall_base": float(va.mean()), "overall_other": float(vb.mean()),
            "gap_base": gap(va), "gap_other": gap(vb), "gap_diff": gap(vb) - gap(va), "gap_diff_ci95_low": float(q[0, 0]),
            "gap_diff_ci95_high": float(q[1, 0]), "overall_diff": float(vb.mean() - va.mean()),
            "overall_diff_ci95_low": float(q[0, 1]), "overall_diff_ci95_high": float(q[1, 1]),
            "gap_base_ci95_low": float(q[0, 2]), "gap_base_ci95_high": float(q[1, 2]),
            "gap_other_ci95_low": float(q[0, 3]), "gap_other_ci95_high": float(q[1, 3])}


def group_table(samples: pd.DataFrame, attrs: pd.DataFrame, cells: pd.DataFrame | None = None) -> pd.DataFrame:
    """Long-format per-group table for plots: one row per (cell, attribute, group) with ``n``, ``clean`` and
    ``robust`` group means, joined with the cell's ``victim``, ``defense``, ``attack``, ``eps`` when ``cells`` (the
    store's cell table) is given. Rows: cells in order of appearance, attributes as :func:`group_columns` lists them,
    groups sorted; one pass over the samples per attribute."""
    rows: list[tuple[tuple[int, int, int], dict[str, Any]]] = []
    if len(samples):
        cell_codes, cell_ids = pd.factorize(samples["cell_id"])  # cells in order of first appearance
        scores = {k: samples[col].to_numpy(float) for k, col in (("clean", "clean_score"), ("robust", "adv_score"))}
        for a, (attr, g) in enumerate(group_columns(attrs.loc[samples.index]).items()):
            levels = sorted(pd.unique(g))
            key = cell_codes * len(levels) + _level_codes(g, levels)
            order = np.argsort(key, kind="stable")  # each (cell, group) block in sample order
            starts = np.flatnonzero(np.r_[True, np.diff(key[order]) != 0])
            for block in np.split(order, starts[1:]):
                c, lv = divmod(int(key[block[0]]), len(levels))
                means = {k: _series_mean(v[block]) for k, v in scores.items()}
                rows.append(((c, a, lv), {"cell_id": cell_ids[c], "attribute": attr, "group": levels[lv], "n": len(block), **means}))
    df = pd.DataFrame([row for _, row in sorted(rows, key=lambda r: r[0])])
    if cells is not None and len(df):
        meta = cells[["cell_id", "victim", "defense", "attack", "metric", "threat"]].copy()
        meta["eps"] = [json.loads(t).get("eps") if isinstance(t, str) else None for t in meta.threat]
        df = df.merge(meta.drop(columns="threat"), on="cell_id", how="left")
    return df


def _series_mean(v: np.ndarray) -> float:
    """``pandas.Series(v).mean()`` (NaN skipped; pairwise sum of the rest, as pandas sums with NaN set to 0)."""
    missing = np.isnan(v)
    count = len(v) - int(missing.sum())
    return float(np.where(missing, 0.0, v).sum() / count) if count else math.nan


def plot_group_gaps(df: pd.DataFrame, path: str | Path, attribute: str = "sex") -> Path | None:
    """PNG of :func:`robustbench_med.plots.group_sweep` at ``path`` (shim, kept for one release)."""
    from robustbench_med import plots

    return plots.save_or_none(plots.group_sweep(df, attribute), path)


# ---------------------------------------------------------------------------------------------------------------
# attribute probes and per-split group summaries (the APPLE shortcut study)


def mask_area_features(masks: Any, n_classes: int = 6) -> np.ndarray:
    """Per-image pixel count of every mask class (``[n, n_classes]``, float): what a probe on the anatomy reads."""
    m = np.asarray(masks.detach().cpu() if hasattr(masks, "detach") else masks)
    return np.stack([(m == c).reshape(len(m), -1).sum(1) for c in range(n_classes)], 1).astype(float)


def linear_probe(x_train: np.ndarray, y_train: Iterable[Any], x_test: np.ndarray, y_test: Iterable[Any], *,
                 c: float = 1.0) -> float:
    """Held-out accuracy of a standardised L2 logistic regression (scikit-learn, ``C=c``) trained on ``x_train``:
    how well a linear read-out recovers a label (e.g. sex) from features (mask class areas, pixels)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))
    clf.fit(np.asarray(x_train, dtype=float), np.asarray(list(y_train)))
    return float(clf.score(np.asarray(x_test, dtype=float), np.asarray(list(y_test))))


def data_attribute_probes(train: Any, test: Any, attribute: str = "sex", n_train: int = 1000,
                          n_test: int = 400) -> dict[str, float]:
    """How much a dataset's ground truth and images say about ``attribute``: held-out accuracy of :func:`linear_probe`
    on the mask class areas (``mask_probe``) and on the raw pixels (``image_probe``, ``C`` = 0.01), trained on the
    first ``n_train`` of ``train`` and scored on the first ``n_test`` of ``test``; ``majority`` = the test split's
    majority-class rate (the chance level)."""
    tr, te = list(range(min(n_train, len(train)))), list(range(min(n_test, len(test))))
    a_tr, a_te = train.attributes(tr)[attribute], test.attributes(te)[attribute]
    mask = linear_probe(mask_area_features(train.targets("mask", tr)), a_tr, mask_area_features(test.targets("mask", te)), a_te)
    image = linear_probe(train.images(tr).flatten(1).numpy(), a_tr, test.images(te).flatten(1).numpy(), a_te, c=0.01)
    majority = max(pd.Series(a_te).value_counts(normalize=True))
    return {"mask_probe": mask, "image_probe": image, "majority": float(majority)}


def split_group_summary(victim: Any, data: Any, attribute: str = "sex", n: int | None = None,
                        target_field: str = "mask", batch_size: int = 64) -> dict[str, Any]:
    """Clean primary score of ``victim`` (e.g. ``dice_fg``) on the first ``n`` samples of ``data``: ``overall`` mean,
    ``groups`` (mean per level of ``attribute``), ``gap`` (max − min of the group means, as in
    :func:`fairness_columns`) and the per-sample ``scores`` and ``labels``."""
    import torch

    from robustbench_med.victim import eval_mode

    idx = list(range(len(data) if n is None else min(n, len(data))))
    labels = np.asarray(data.attributes(idx)[attribute])
    scores = []
    with eval_mode(victim), torch.no_grad():
        for i in range(0, len(idx), batch_size):
            rows = idx[i : i + batch_size]
            x = data.images(rows).to(victim.device)
            y = data.targets(target_field, rows).to(victim.device)
            scores.append(victim.metrics(victim(x), y)[victim.spec.metric].float().cpu())
    s = torch.cat(scores).numpy().astype(float)
    groups = {str(g): float(s[labels == g].mean()) for g in sorted(set(labels))}
    return {"overall": float(s.mean()), "groups": groups, "gap": float(group_gap(list(groups.values()))),
            "scores": s, "labels": labels}


APPLE_SECTION = "## APPLE vs undefended: paired comparisons"


def _setting_label(params: Any) -> str:
    """A short label of an APPLE setting from a ``defense_params`` JSON string (attribute, latent, β, λ)."""
    try:
        p = json.loads(params) if isinstance(params, str) else dict(params or {})
    except (TypeError, ValueError):
        return str(params)
    return f"{p.get('attribute', '?')} / {p.get('latent', '?')} / β={p.get('beta', '?')}, λ={p.get('penalty', '?')}"


def defense_comparison_markdown(store: Any, title: str, *, base: str = "identity.none", other: str = "apple.latent",
                                n_boot: int = 1000, seed: int = 0) -> str:
    """A Markdown table of :func:`compare_defenses` for the attribute each APPLE setting hides (clean inputs and every
    attack): the undefended and defended overall score and group gap, and the paired changes with their stratified
    bootstrap 95% intervals. Empty when the store holds no pair of ``base`` and ``other`` cells."""
    from robustbench_med.results import compare_defenses

    df = compare_defenses(store, base, other, n_boot=n_boot, seed=seed)
    if df.empty:
        return ""
    hidden = [json.loads(p).get("attribute") if isinstance(p, str) else None for p in df.defense_params]
    df = df[[a == h for a, h in zip(df.attribute, hidden)]]
    lines = [f"### {title}", "",
             "| model | APPLE (attribute / latent / β, λ) | input | n | Dice none | Dice APPLE | ΔDice [95% CI] | "
             "gap none [95% CI] | gap APPLE [95% CI] | Δgap [95% CI] |", "|---|---|---|---|---|---|---|---|---|---|"]
    for _, r in df.iterrows():
        what = "clean" if r.attack == "clean" else f"{r.attack} (eps {r.eps * 255:.3g}/255)"
        lines.append(
            f"| {r.victim} | {_setting_label(r.defense_params)} | {what} | {int(r.n)} | {r.overall_base:.3f} | "
            f"{r.overall_other:.3f} | {r.overall_diff:+.3f} [{r.overall_diff_ci95_low:+.3f}, {r.overall_diff_ci95_high:+.3f}] | "
            f"{r.gap_base:.3f} [{r.gap_base_ci95_low:.3f}, {r.gap_base_ci95_high:.3f}] | "
            f"{r.gap_other:.3f} [{r.gap_other_ci95_low:.3f}, {r.gap_other_ci95_high:.3f}] | "
            f"{r.gap_diff:+.3f} [{r.gap_diff_ci95_low:+.3f}, {r.gap_diff_ci95_high:+.3f}] |")
    return "\n".join(lines) + "\n"


def append_defense_comparisons(readme: str | Path, stores: Iterable[tuple[str, Any]]) -> bool:
    """Append :data:`APPLE_SECTION` with one :func:`defense_comparison_markdown` table per ``(title, store path)``
    (stores that do not exist or hold no APPLE pair are left out) to a rendered ``README.md``. Returns whether
    anything was appended."""
    from robustbench_med.entries import atomic_write_text

    tables = [t for title, path in stores if Path(path, "results.sqlite").exists()
              and (t := defense_comparison_markdown(Path(path, "results.sqlite"), title))]
    readme = Path(readme)
    if not tables or not readme.exists():
        return False
    intro = ("Paired comparisons of each APPLE setting with the undefended model on the same samples "
             "(`robustbench_med.fairness.compare_defenses`): Dice = mean `dice_fg`; gap = max − min of the group means "
             "of the attribute APPLE hides; Δ = APPLE − none, with a stratified paired bootstrap 95% interval "
             "(1,000 resamples within groups). A Δgap interval below 0 means APPLE narrowed the gap.")
    atomic_write_text(readme, readme.read_text().rstrip("\n") + "\n\n" + "\n\n".join([APPLE_SECTION, intro, *tables]))
    return True


_MOVED = ("store_frames", "fairness_table", "compare_defenses", "group_table_from_store")


def __getattr__(name: str) -> Any:
    """Shims, kept for one release: the store-reading functions moved to :mod:`robustbench_med.results`."""
    if name in _MOVED:
        from robustbench_med import results

        return getattr(results, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__: list[str] = [
    "fairness_columns", "fairness_table", "group_table", "group_table_from_store", "plot_group_gaps", "compare_groups",
    "compare_defenses",
    "es_fairseg", "es_fairmedfm", "demographic_parity_difference", "equalized_odds_difference",
    "expected_calibration_error", "bootstrap_group_stats", "group_columns", "linear_probe", "mask_area_features",
    "data_attribute_probes", "split_group_summary", "defense_comparison_markdown", "append_defense_comparisons",
]
