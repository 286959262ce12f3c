"""Corruption robustness per victim: mean corruption score per severity, mCA / mean Dice, relative robustness, mCE.

Computed from the leaderboard rows (:func:`robustbench_med.leaderboard.summarize`) of ``corruption.*`` cells
(:mod:`robustbench_med.attacks.corruption`), following ImageNet-C (Hendrycks & Dietterich, ICLR 2019) and
MedMNIST-C (Di Salvo et al., 2024). For one victim × defence, with ``S_{s,c}`` the mean primary score (accuracy,
Dice, SDR, VQA accuracy …) under corruption ``c`` at severity ``s``, ``E = 1 − S`` its error and ``S_clean`` the
clean score:

- ``score_s<k>``: mean of ``S_{k,c}`` over the corruptions run at severity k (severity 0, when run, is the clean
  score by construction and is reported but never averaged);
- ``mean_corruption_score``: mean over corruptions and severities 1–5 — the mean corruption accuracy (mCA) of a
  classifier, the mean corruption Dice of a segmentor;
- ``relative_robustness``: ``mean_corruption_score / S_clean`` (1 = unaffected); ``relative_robustness_s<k>`` per
  severity;
- ``mCE``: mean over corruptions of ``CE_c = Σ_s E_{s,c} / Σ_s E^base_{s,c}``, normalised by a named *baseline*
  victim of the same task and metric, undefended (ImageNet-C uses AlexNet; here by default the dense CNN / U-Net of
  :data:`DEFAULT_BASELINES`); ``relative_mCE``: mean of ``Σ_s (E_{s,c} − E_clean) / Σ_s (E^base_{s,c} − E^base_clean)``,
  the degradation relative to the baseline's. Both are NaN without the baseline in the table, and a corruption whose
  baseline denominator is ≤ 0 (the baseline unaffected) is left out of the mean.

:func:`write_corruption_tables` writes ``corruptions.md``, ``corruptions.csv`` (one row per victim × defence) and
``corruptions_by_kind.csv`` (one row per victim × defence × corruption) next to ``leaderboard.md``.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from robustbench_med.threat import CORRUPTION, MAX_SEVERITY

PREFIX = "corruption."
DEFAULT_BASELINES: dict[str, str] = {"classification": "resnet18.phantom", "binary": "cnn.phantom",
                                     "segmentation": "unet.phantom", "landmark": "unet.landmark"}
KEYS = ["victim", "defense", "defense_params", "attack_through"]
SEVERITIES = tuple(range(1, MAX_SEVERITY + 1))


def corruption_rows(df: pd.DataFrame) -> pd.DataFrame:
    """One row per finished corruption cell: victim, defence, task, metric, corruption, severity, clean, score, n."""
    cols = KEYS + ["task", "metric", "corruption", "severity", "clean", "score", "n"]
    if df.empty or "robust" not in df or "norm" not in df:
        return pd.DataFrame(columns=cols)
    sel = df[(df.norm == CORRUPTION) & (df.status == "done") & df.robust.notna() & df.attack.str.startswith(PREFIX)]
    out = sel.assign(corruption=sel.attack.str.slice(len(PREFIX)), severity=sel.eps.astype(float).round().astype(int),
                     score=sel.robust.astype(float), clean=sel.clean.astype(float))
    return out[cols].reset_index(drop=True)


def _baseline_name(task: str, baseline: str | Mapping[str, str] | None) -> str | None:
    if baseline is None:
        return DEFAULT_BASELINES.get(task)
    if isinstance(baseline, str):
        return baseline
    return baseline.get(task)


def _ce(errors: pd.DataFrame, base: pd.DataFrame | None, clean_err: float, base_clean_err: float) -> tuple[float, float]:
    """(CE_c, relative CE_c) of one corruption from per-severity errors of the model and of the baseline."""
    if base is None:
        return math.nan, math.nan
    joined = errors.join(base, rsuffix="_base", how="inner")
    if joined.empty:
        return math.nan, math.nan
    den = float(joined["error_base"].sum())
    rel_den = float((joined["error_base"] - base_clean_err).sum())
    ce = float(joined["error"].sum()) / den if den > 0 else math.nan
    rel = float((joined["error"] - clean_err).sum()) / rel_den if rel_den > 0 else math.nan
    return ce, rel


def corruption_by_kind(df: pd.DataFrame, baseline: str | Mapping[str, str] | None = None) -> pd.DataFrame:
    """Per victim × defence × corruption: the score at each severity, their mean over 1–5, relative robustness, and
    CE / relative CE against the baseline victim (``baseline``: a victim name, or task → name; default
    :data:`DEFAULT_BASELINES`)."""
    rows = corruption_rows(df)
    if rows.empty:
        return pd.DataFrame()
    rows = rows.assign(error=1.0 - rows.score)
    undefended = rows[rows.defense == "identity.none"]
    out = []
    for key, g in rows.groupby(KEYS + ["corruption"], dropna=False, sort=True):
        first = g.iloc[0]
        clean = float(g.clean.iloc[0])
        graded = g[g.severity > 0]
        rec: dict[str, Any] = dict(zip(KEYS + ["corruption"], key))
        rec.update({"task": first.task, "metric": first.metric, "n": int(first.n), "clean": clean})
        for s in sorted(g.severity.unique()):
            rec[f"score_s{s}"] = float(g[g.severity == s].score.mean())
        mean = float(graded.score.mean()) if len(graded) else math.nan
        rec["mean_corruption_score"] = mean
        rec["relative_robustness"] = mean / clean if clean > 0 else math.nan
        name = _baseline_name(first.task, baseline)
        base = undefended[(undefended.victim == name) & (undefended.task == first.task) & (undefended.metric == first.metric)
                          & (undefended.corruption == key[-1]) & (undefended.severity > 0)]
        base_err = base.groupby("severity")[["error"]].mean() if len(base) else None
        base_clean = float(1 - base.clean.iloc[0]) if len(base) else math.nan
        per_sev = graded.groupby("severity")[["error"]].mean()
        rec["CE"], rec["relative_CE"] = _ce(per_sev, base_err, 1 - clean, base_clean)
        rec["baseline"] = name if base_err is not None else None
        out.append(rec)
    return pd.DataFrame(out)


def corruption_summary(df: pd.DataFrame, baseline: str | Mapping[str, str] | None = None) -> pd.DataFrame:
    """Per victim × defence: clean score, mean corruption score per severity, mean over corruptions and severities 1–5
    (mCA / mean Dice), relative robustness (overall and per severity), mCE and relative mCE (see the module)."""
    rows = corruption_rows(df)
    if rows.empty:
        return pd.DataFrame()
    kinds = corruption_by_kind(df, baseline)
    out = []
    for key, g in rows.groupby(KEYS, dropna=False, sort=True):
        first = g.iloc[0]
        clean = float(g.clean.iloc[0])
        rec: dict[str, Any] = dict(zip(KEYS, key))
        rec.update({"task": first.task, "metric": first.metric, "n": int(first.n), "clean": clean,
                    "n_corruptions": int(g[g.severity > 0].corruption.nunique())})
        for s in sorted(g.severity.unique()):
            rec[f"score_s{s}"] = float(g[g.severity == s].score.mean())
        graded = g[g.severity > 0]
        mean = float(graded.score.mean()) if len(graded) else math.nan
        rec["mean_corruption_score"] = mean
        rec["relative_robustness"] = mean / clean if clean > 0 else math.nan
        for s in sorted(graded.severity.unique()):
            rec[f"relative_robustness_s{s}"] = rec[f"score_s{s}"] / clean if clean > 0 else math.nan
        k = kinds
        for col, val in zip(KEYS, key):
            k = k[(k[col] == val) | (k[col].isna() & pd.isna(val))]
        rec["mCE"] = float(np.nanmean(k.CE)) if k.CE.notna().any() else math.nan
        rec["relative_mCE"] = float(np.nanmean(k.relative_CE)) if k.relative_CE.notna().any() else math.nan
        rec["baseline"] = next((b for b in k.baseline if isinstance(b, str)), None)
        out.append(rec)
    return pd.DataFrame(out)


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v).replace("|", "\\|")


def _table(df: pd.DataFrame, columns: list[tuple[str, str]]) -> list[str]:
    cols = [(c, h) for c, h in columns if c in df]
    lines = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c, _ in cols) + " |")
    return lines


def to_markdown(summary: pd.DataFrame, by_kind: pd.DataFrame) -> str:
    """``corruptions.md``: the per-victim summary, then the per-corruption table."""
    sev = [(f"score_s{s}", f"sev {s}") for s in range(0, MAX_SEVERITY + 1)]
    head = [("victim", "victim"), ("defense", "defense"), ("metric", "metric"), ("clean", "clean")] + sev + [
        ("mean_corruption_score", "mean (mCA / mDice)"), ("relative_robustness", "relative"), ("mCE", "mCE"),
        ("relative_mCE", "rel. mCE"), ("baseline", "baseline"), ("n_corruptions", "corruptions"), ("n", "n")]
    lines = ["# Corruption robustness", "",
             "Mean score over corruptions per severity; mean over corruptions and severities 1–5 (mCA for classifiers, "
             "mean Dice for segmentors); relative = mean / clean; mCE and relative mCE normalised by the baseline "
             "victim (ImageNet-C, Hendrycks & Dietterich, ICLR 2019).", ""]
    lines += _table(summary, head)
    kind_head = [("victim", "victim"), ("defense", "defense"), ("corruption", "corruption"), ("clean", "clean")] + sev + [
        ("mean_corruption_score", "mean"), ("relative_robustness", "relative"), ("CE", "CE"), ("relative_CE", "rel. CE")]
    lines += ["", "## Per corruption", ""] + _table(by_kind, kind_head)
    return "\n".join(lines) + "\n"


def write_corruption_tables(df: pd.DataFrame, out_dir: str | Path,
                            baseline: str | Mapping[str, str] | None = None) -> dict[str, Path]:
    """Write ``corruptions.md``, ``corruptions.csv`` and ``corruptions_by_kind.csv`` into ``out_dir`` when ``df`` (a
    :func:`~robustbench_med.leaderboard.summarize` frame) holds corruption cells; returns the paths (none otherwise)."""
    summary = corruption_summary(df, baseline)
    if summary.empty:
        return {}
    by_kind = corruption_by_kind(df, baseline)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"corruptions_markdown": out / "corruptions.md", "corruptions_csv": out / "corruptions.csv",
             "corruptions_by_kind_csv": out / "corruptions_by_kind.csv"}
    paths["corruptions_markdown"].write_text(to_markdown(summary, by_kind))
    summary.to_csv(paths["corruptions_csv"], index=False)
    by_kind.to_csv(paths["corruptions_by_kind_csv"], index=False)
    return paths
