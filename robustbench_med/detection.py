"""Detection metrics of adversarial-example detectors: AUROC and TPR at 90% TNR.

Scores follow :meth:`robustbench_med.defense.Detector.score`: higher = more likely adversarial. The negatives are the
detector's scores on clean inputs, the positives its scores on adversarial inputs.

- ``detector_auroc`` = P(s_adv > s_clean) + ½ P(s_adv = s_clean), the area under the ROC curve computed exactly as
  the normalised Mann–Whitney U statistic over all (clean, adversarial) pairs (Hanley & McNeil, Radiology 1982).
- ``detector_tpr_at_90tnr``: the threshold τ is taken from the clean scores alone, τ = the smallest clean score with
  at least 90% of the clean scores ≤ τ (numpy ``quantile(…, 0.9, method='higher')``), so TNR = P(s_clean ≤ τ) ≥ 0.9;
  then TPR = P(s_adv > τ). This is the metric the released HFC code (Yao et al., MICCAI 2021, ``get_TPR_at_TNR``)
  computes and prints as "TNR at 90".

:func:`detection_metrics_from_rows` reads the per-sample rows the harness stores for a detector-defended cell
(``metrics`` JSON with ``detector_score`` and ``clean_detector_score``).
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
    """Area under the ROC curve: P(s_adv > s_clean) + ½ P(s_adv = s_clean) (Mann–Whitney U / (n_clean·n_adv))."""
    neg, pos = _scores(clean_scores, "clean_scores"), _scores(adv_scores, "adv_scores")
    allv = np.concatenate([neg, pos])
    order = allv.argsort(kind="mergesort")
    ranks = np.empty(len(allv), dtype=np.float64)
    ranks[order] = np.arange(1, len(allv) + 1)
    _, inv, counts = np.unique(allv, return_inverse=True, return_counts=True)  # average ranks of ties
    sums = np.bincount(inv, weights=ranks)
    ranks = (sums / counts)[inv]
    u = ranks[len(neg):].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(neg) * len(pos)))


def tpr_at_tnr(clean_scores: Any, adv_scores: Any, tnr: float = TNR_LEVEL) -> float:
    """TPR = P(s_adv > τ) with τ = ``quantile(clean, tnr, method='higher')`` (so at least ``tnr`` of clean ≤ τ)."""
    if not (0 < tnr < 1):
        raise ConfigError(f"tnr must lie in (0, 1), got {tnr!r}")
    neg, pos = _scores(clean_scores, "clean_scores"), _scores(adv_scores, "adv_scores")
    tau = np.quantile(neg, tnr, method="higher")
    return float((pos > tau).mean())


def detection_metrics(clean_scores: Any, adv_scores: Any) -> dict[str, float]:
    """``{'detector_auroc': …, 'detector_tpr_at_90tnr': …}`` of a detector's clean vs adversarial scores."""
    return {"detector_auroc": auroc(clean_scores, adv_scores), "detector_tpr_at_90tnr": tpr_at_tnr(clean_scores, adv_scores)}


def detection_metrics_from_rows(rows: Iterable[Mapping[str, Any]], successful_only: bool = True) -> dict[str, float]:
    """Detection metrics of one harness cell from its per-sample rows.

    Negatives: ``clean_detector_score`` of every row. Positives: ``detector_score`` of the adversarial inputs, by
    default only of *successful* adversarial examples (clean correct, adversarial incorrect), the examples a
    detector must catch; ``successful_only=False`` uses every attacked input. NaN metrics when there are none.
    """
    clean, adv = [], []
    for r in rows:
        m = r["metrics"]
        m = json.loads(m) if isinstance(m, str) else m
        if "detector_score" not in m or "clean_detector_score" not in m:
            raise ConfigError("rows carry no detector scores: the cell was not run with a detector defence")
        clean.append(m["clean_detector_score"])
        if not successful_only or (int(r["clean_correct"]) == 1 and int(r["adv_correct"]) == 0):
            adv.append(m["detector_score"])
    if not clean or not adv:
        return {"detector_auroc": math.nan, "detector_tpr_at_90tnr": math.nan}
    return detection_metrics(clean, adv)
