"""The site-shift study: per-site scores of site-A models, the drop on unseen sites, and paired comparisons of a
training-time defence with its baseline, each with a 95% bootstrap interval.

Read from a store whose samples carry the ``site`` attribute (``phantom.sites``: sites A, B, C interleaved; see
:mod:`robustbench_med.data.sites`). For each victim × defence, and for its clean pass and every attacked cell:

- ``<site>``: mean primary score of the samples of that site, with its percentile-bootstrap 95% interval (2,000
  resamples, seeded);
- ``drop[A→<site>]``: the in-domain score minus the unseen site's (different patients, so an unpaired bootstrap of
  the difference of means);
- ``gap[<attr>@<site>]``: the sex / age-group gap (max − min of the group means) *within* each site, with a
  stratified bootstrap interval, and ``gap_change[<attr> A→<site>]`` = its change from the training site (unpaired
  bootstrap interval): fairness under shift, as ``gap_change`` is fairness under attack;
- against a **baseline** victim (a victim card's ``extra['baseline']``, e.g. ``unet.styleaug`` → ``unet.phantom``),
  when the grid has it with the same defence: ``Δ[<site>] = victim − baseline`` on the same samples, a **paired**
  bootstrap interval (:func:`robustbench_med.gate.resample_indices`), and a verdict — ``better`` / ``worse`` when the
  interval excludes 0, else ``no difference shown``.

:func:`write_site_tables` writes ``sites.md`` and ``sites.csv`` next to ``leaderboard.md`` (the per-site fairness
columns — sex and age gaps within the leaderboard's ``site`` breakdown — are in the leaderboard itself).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from robustbench_med.fairness import group_gap
from robustbench_med.results import store_frames
from robustbench_med.gate import resample_indices
from robustbench_med.registry import VICTIMS
from robustbench_med.store import Store
from robustbench_med.threat import eps_display

N_BOOT = 2000
CLEAN = "clean"
GROUP_ATTRIBUTES = ("sex", "age_group")  # group gaps are reported within each site
COLUMNS = ["victim", "defense", "condition", "sample_idx", "site", "score"]


def _ci(values: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
    if len(values) == 0:
        return math.nan, math.nan
    means = values[rng.integers(0, len(values), size=(N_BOOT, len(values)))].mean(1)
    return tuple(float(v) for v in np.percentile(means, [2.5, 97.5]))  # type: ignore[return-value]


def _baseline(victim: str) -> str | None:
    try:
        card = VICTIMS.get(victim).meta.get("card")
    except Exception:  # noqa: BLE001 - a user victim of another session's registry: no declared baseline
        return None
    return card.extra.get("baseline") if card is not None else None


def site_scores(store: Store | str | Path) -> pd.DataFrame:
    """One row per (victim, defence, condition, sample): ``condition`` is ``clean`` or an attacked cell's label."""
    cells, samples, attrs = store_frames(store)
    if cells.empty or samples.empty or "site" not in attrs or attrs.site.isna().all():
        return pd.DataFrame()
    groups = [a for a in GROUP_ATTRIBUTES if a in attrs]
    samples = samples.assign(site=attrs.site, **{a: attrs[a] for a in groups}).merge(cells[["cell_id", "victim", "defense", "attack", "attack_params", "threat", "status"]], on="cell_id")
    samples = samples[samples.status == "done"]
    rows = []
    for (victim, defense), pair in samples.groupby(["victim", "defense"], sort=False):
        first = pair[pair.cell_id == pair.cell_id.iloc[0]]
        rows.append(first.assign(condition=CLEAN, score=first.clean_score)[COLUMNS + groups])
        for cell_id, cell in pair.groupby("cell_id", sort=False):
            threat = json.loads(cell.threat.iloc[0])
            label = f"{cell.attack.iloc[0]} {eps_display(threat['eps'], threat.get('norm'))}"
            rows.append(cell.assign(condition=label, score=cell.adv_score)[COLUMNS + groups])
    return pd.concat(rows, ignore_index=True)


def site_table(store: Store | str | Path, seed: int = 0) -> pd.DataFrame:
    """One row per victim × defence × condition: per-site means and intervals, drops, and the paired comparison with
    the declared baseline (see the module docstring)."""
    scores = site_scores(store)
    if scores.empty:
        return pd.DataFrame()
    sites = sorted(scores.site.unique())
    rng = np.random.default_rng(seed)
    out = []
    for (victim, defense, condition), g in scores.groupby(["victim", "defense", "condition"], sort=False):
        row: dict[str, Any] = {"victim": victim, "defense": defense, "condition": condition, "n": int(len(g))}
        by_site = {s: g[g.site == s].score.to_numpy(float) for s in sites}
        for s, v in by_site.items():
            row[s] = float(v.mean()) if len(v) else math.nan
            row[f"{s}_ci95_low"], row[f"{s}_ci95_high"] = _ci(v, rng)
        if "A" in by_site:
            for s in sites:
                if s != "A" and len(by_site[s]) and len(by_site["A"]):
                    a, b = by_site["A"], by_site[s]
                    boot = a[rng.integers(0, len(a), (N_BOOT, len(a)))].mean(1) - b[rng.integers(0, len(b), (N_BOOT, len(b)))].mean(1)
                    row[f"drop[A→{s}]"] = float(a.mean() - b.mean())
                    row[f"drop[A→{s}]_ci95_low"], row[f"drop[A→{s}]_ci95_high"] = (float(v) for v in np.percentile(boot, [2.5, 97.5]))
        row.update(_versus_baseline(scores, victim, defense, condition, g, sites, rng))
        for attr in (a for a in GROUP_ATTRIBUTES if a in g):
            boots = {}
            for s in sites:
                columns, boots[s] = _gap(g[g.site == s], attr, s, rng)
                row.update(columns)
            for s in (s for s in sites if s != "A" and boots.get(s) is not None and boots.get("A") is not None):
                key = f"gap_change[{attr} A→{s}]"  # different patients at each site: unpaired bootstrap
                lo, hi = np.percentile(boots[s] - boots["A"], [2.5, 97.5])
                row[key] = row[f"gap[{attr}@{s}]"] - row[f"gap[{attr}@A]"]
                row[f"{key}_ci95_low"], row[f"{key}_ci95_high"] = float(lo), float(hi)
        out.append(row)
    return pd.DataFrame(out)


def _gap(sub: pd.DataFrame, attr: str, site: str, rng: np.random.Generator) -> tuple[dict[str, float], np.ndarray | None]:
    """``gap[<attr>@<site>]``: max − min of the group means of ``attr`` within one site, with a stratified bootstrap
    interval (each group resampled within itself); also the bootstrap replicates of the gap."""
    values = [v.score.to_numpy(float) for _, v in sub.groupby(attr) if len(v)]
    if len(values) < 2:
        return {}, None
    boot = np.stack([v[rng.integers(0, len(v), (N_BOOT, len(v)))].mean(1) for v in values], 1)
    gaps = group_gap(boot, axis=1)
    means = np.array([v.mean() for v in values])
    lo, hi = np.percentile(gaps, [2.5, 97.5])
    key = f"gap[{attr}@{site}]"
    return {key: float(group_gap(means)), f"{key}_ci95_low": float(lo), f"{key}_ci95_high": float(hi)}, gaps


def _versus_baseline(scores: pd.DataFrame, victim: str, defense: str, condition: str, g: pd.DataFrame,
                     sites: list[str], rng: np.random.Generator) -> dict[str, Any]:
    base_name = _baseline(victim)
    base = scores[(scores.victim == base_name) & (scores.defense == defense) & (scores.condition == condition)]
    if base_name is None or base.empty:
        return {}
    row: dict[str, Any] = {"baseline": base_name}
    joined = g.merge(base[["sample_idx", "score"]], on="sample_idx", suffixes=("", "_base"))
    for s in sites:
        sub = joined[joined.site == s]
        if sub.empty:
            continue
        diff = sub.score.to_numpy(float) - sub.score_base.to_numpy(float)
        boot = diff[resample_indices(len(diff), N_BOOT, rng)].mean(1)
        lo, hi = (float(v) for v in np.percentile(boot, [2.5, 97.5]))
        row[f"Δ[{s}]"], row[f"Δ[{s}]_ci95_low"], row[f"Δ[{s}]_ci95_high"] = float(diff.mean()), lo, hi
        row[f"verdict[{s}]"] = "better" if lo > 0 else "worse" if hi < 0 else "no difference shown"
    return row


def _fmt(v: Any) -> str:
    if isinstance(v, (float, np.floating)):
        return "–" if math.isnan(v) else f"{v:.3f}"
    return str(v)


def to_markdown(table: pd.DataFrame) -> str:
    """``sites.md``: per-site scores with intervals, the drops from site A, and the paired baseline comparisons."""
    if table.empty:
        return ""
    sites = [c for c in table.columns if len(c) == 1 and c.isupper()]
    lines = ["# Site shift", "", "Mean primary score per acquisition site with its 95% bootstrap interval (site A: the "
             "training site); drop = A − site (unpaired); Δ = victim − its declared baseline on the same samples "
             "(paired bootstrap).", ""]
    head = ["victim", "defense", "condition"] + sites + [c for c in table.columns if c.startswith("drop[") and not c.endswith(("_low", "_high"))]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in table.iterrows():
        cells = [str(r.victim), str(r.defense), str(r.condition)]
        cells += [f"{_fmt(r[s])} [{_fmt(r[f'{s}_ci95_low'])}, {_fmt(r[f'{s}_ci95_high'])}]" for s in sites]
        cells += [f"{_fmt(r[c])} [{_fmt(r[f'{c}_ci95_low'])}, {_fmt(r[f'{c}_ci95_high'])}]" for c in head[3 + len(sites):]]
        lines.append("| " + " | ".join(cells) + " |")
    gap_cols = [c for c in table.columns if c.startswith(("gap[", "gap_change[")) and not c.endswith(("_low", "_high"))]
    if gap_cols:
        lines += ["", "## Group gaps within each site (max − min of the group means, stratified bootstrap 95% CI) and "
                  "their change from site A", "",
                  "| victim | defense | condition | " + " | ".join(gap_cols) + " |", "|" + "---|" * (3 + len(gap_cols))]
        for _, r in table.iterrows():
            lines.append(f"| {r.victim} | {r.defense} | {r.condition} | " + " | ".join(
                f"{_fmt(r[c])} [{_fmt(r[f'{c}_ci95_low'])}, {_fmt(r[f'{c}_ci95_high'])}]" for c in gap_cols) + " |")
    if "baseline" in table and table.baseline.notna().any():
        lines += ["", "## Against the baseline (paired)", "", "| victim | baseline | condition | site | Δ | 95% CI | verdict |",
                  "|---|---|---|---|---|---|---|"]
        for _, r in table[table.baseline.notna()].iterrows():
            for s in sites:
                if f"Δ[{s}]" in r and not pd.isna(r[f"Δ[{s}]"]):
                    lines.append(f"| {r.victim} | {r.baseline} | {r.condition} | {s} | {_fmt(r[f'Δ[{s}]'])} | "
                                 f"[{_fmt(r[f'Δ[{s}]_ci95_low'])}, {_fmt(r[f'Δ[{s}]_ci95_high'])}] | {r[f'verdict[{s}]']} |")
    return "\n".join(lines) + "\n"


def write_site_tables(store: Store | str | Path, out_dir: str | Path) -> dict[str, Path]:
    """Write ``sites.md`` / ``sites.csv`` when the store's samples carry a ``site``; return their paths."""
    from robustbench_med.paired_metrics import write_study_table

    return write_study_table(site_table(store), to_markdown, out_dir, "sites")
