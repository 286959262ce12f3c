"""Detection metrics of adversarial-example detectors: AUROC and TPR at 90% TNR.

Scores follow :meth:`robustbench_med.defense.Detector.score`: higher = more likely adversarial. The negatives are the
detector's scores on clean inputs, the positives its scores on adversarial inputs.

- ``detector_auroc`` = P(s_adv > s_clean) + ½ P(s_adv = s_clean), the area under the ROC curve
  (``sklearn.metrics.roc_auc_score``; it equals the normalised Mann–Whitney U statistic over all (clean, adversarial)
  pairs, Hanley & McNeil, Radiology 1982).
- ``detector_tpr_at_90tnr``: the threshold τ is taken from the clean scores alone, τ = numpy
  ``quantile(clean, 0.9, method='higher')``, the sorted clean score at 0-based rank ⌈0.9·(n−1)⌉, so that
  TNR = P(s_clean ≤ τ) ≥ 0.9 (it can be more: with n = 10 clean scores τ is their maximum and TNR = 1.0); then
  TPR = P(s_adv > τ), a point of sklearn's ``roc_curve`` (the one at the smallest threshold above τ, tested).
  ``roc_curve`` alone does not give it: the usual "TPR at FPR ≤ 0.1" reads the curve's best point with
  FPR ≤ 0.1, whose threshold may lie below τ (e.g. clean 0…9, adversarial 8.5: that point has TPR 1.0, ours 0.0).
  It follows the released HFC code (Yao et al., MICCAI 2021, ``get_TPR_at_TNR``), which thresholds its
  lower-is-adversarial score at numpy ``percentile(clean, 10)`` with linear interpolation; the two thresholds can
  differ by less than the gap between two adjacent clean scores.

:func:`detection_metrics_from_rows` reads the per-sample rows the harness stores for a detector-defended cell
(``metrics`` JSON with ``detector_score`` and ``clean_detector_score``, and the two-sided scores
``detector_score_two_sided`` / ``clean_detector_score_two_sided`` when the detector has a clean reference:
:meth:`robustbench_med.defense.Detector.two_sided`), giving ``detector_auroc`` / ``detector_tpr_at_90tnr`` and their
``_two_sided`` versions.

**Overshoot.** A one-sided AUROC below 0.5 means the adversarial inputs score *below* clean ones: the attack did not
hide among clean inputs, it overshot past them, and a two-sided detector can catch it. :func:`overshoot` calls an
AUROC an overshoot when its 95% upper bound (AUROC + 1.96·SE, the Hanley–McNeil standard error) is below 0.5, so
chance-level values are not labelled; renderers print such an AUROC as ``0.042 (overshoot)``.
"""
from __future__ import annotations

import json
import math
from typing import Any, Iterable, Mapping

import numpy as np

from robustbench_med.errors import ConfigError

TNR_LEVEL = 0.9


def _scores(values: Any, name: str) -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if arr.size == 0:
        raise ConfigError(f"{name} is empty: detection metrics need at least one score of each kind")
    if not np.all(np.isfinite(arr)):
        raise ConfigError(f"{name} contains NaN or infinite scores")
    return arr


def auroc(clean_scores: Any, adv_scores: Any) -> float:
    """Area under the ROC curve, P(s_adv > s_clean) + ½ P(s_adv = s_clean), by ``sklearn.metrics.roc_auc_score``
    (clean = 0, adversarial = 1; equal to the Mann–Whitney U / (n_clean·n_adv), tested)."""
    from sklearn.metrics import roc_auc_score

    neg, pos = _scores(clean_scores, "clean_scores"), _scores(adv_scores, "adv_scores")
    labels = np.concatenate([np.zeros(len(neg)), np.ones(len(pos))])
    return float(roc_auc_score(labels, np.concatenate([neg, pos])))


def tpr_at_tnr(clean_scores: Any, adv_scores: Any, tnr: float = TNR_LEVEL) -> float:
    """TPR = P(s_adv > τ) with τ = ``quantile(clean, tnr, method='higher')`` (so at least ``tnr`` of clean ≤ τ;
    see the module docstring for how it relates to ``sklearn.metrics.roc_curve``)."""
    if not (0 < tnr < 1):
        raise ConfigError(f"tnr must lie in (0, 1), got {tnr!r}")
    neg, pos = _scores(clean_scores, "clean_scores"), _scores(adv_scores, "adv_scores")
    tau = np.quantile(neg, tnr, method="higher")
    return float((pos > tau).mean())


def auroc_se(value: float, n_clean: int, n_adv: int) -> float:
    """Hanley–McNeil (Radiology 1982) standard error of an AUROC ``value`` from ``n_clean`` and ``n_adv`` scores."""
    a = min(max(value, 1e-12), 1 - 1e-12)
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    var = (a * (1 - a) + (n_adv - 1) * (q1 - a * a) + (n_clean - 1) * (q2 - a * a)) / (n_clean * n_adv)
    return math.sqrt(max(var, 0.0))


def overshoot(value: float | None, n_clean: int, n_adv: int) -> bool:
    """Whether a one-sided AUROC lies significantly below 0.5 (AUROC + 1.96·SE < 0.5; see the module docstring)."""
    if value is None or not math.isfinite(value) or n_clean < 1 or n_adv < 1:
        return False
    return value + 1.96 * auroc_se(value, n_clean, n_adv) < 0.5


def detection_metrics(clean_scores: Any, adv_scores: Any) -> dict[str, float]:
    """``{'detector_auroc': …, 'detector_tpr_at_90tnr': …}`` of a detector's clean vs adversarial scores."""
    return {"detector_auroc": auroc(clean_scores, adv_scores), "detector_tpr_at_90tnr": tpr_at_tnr(clean_scores, adv_scores)}


def detection_metrics_from_rows(rows: Iterable[Mapping[str, Any]], successful_only: bool = True) -> dict[str, float]:
    """Detection metrics of one harness cell from its per-sample rows.

    Negatives: ``clean_detector_score`` of every row. Positives: ``detector_score`` of the adversarial inputs, by
    default only of *successful* adversarial examples (clean correct, adversarial incorrect), the examples a
    detector must catch; ``successful_only=False`` uses every attacked input. NaN metrics when there are none.
    The ``_two_sided`` metrics come from the two-sided scores when every row has them; ``detector_auroc_overshoot``
    is 1.0 when the one-sided AUROC is an overshoot (:func:`overshoot`), else 0.0.
    """
    clean: dict[str, list[float]] = {"": [], "_two_sided": []}
    adv: dict[str, list[float]] = {"": [], "_two_sided": []}
    for r in rows:
        m = r["metrics"]
        m = json.loads(m) if isinstance(m, str) else m
        if "detector_score" not in m or "clean_detector_score" not in m:
            raise ConfigError("rows carry no detector scores: the cell was not run with a detector defence")
        hit = not successful_only or (int(r["clean_correct"]) == 1 and int(r["adv_correct"]) == 0)
        for suffix in clean:
            clean[suffix].append(m.get(f"clean_detector_score{suffix}"))
            if hit:
                adv[suffix].append(m.get(f"detector_score{suffix}"))
    if not clean[""] or not adv[""]:
        return {"detector_auroc": math.nan, "detector_tpr_at_90tnr": math.nan}
    out = detection_metrics(clean[""], adv[""])
    out["detector_auroc_overshoot"] = float(overshoot(out["detector_auroc"], len(clean[""]), len(adv[""])))
    if all(v is not None for v in clean["_two_sided"] + adv["_two_sided"]):
        out.update({f"{k}_two_sided": v for k, v in detection_metrics(clean["_two_sided"], adv["_two_sided"]).items()})
    return out
