"""The missing-modality study: every subset of sequences, the mean and the worst subset, and single-sequence attacks.

Computed from the leaderboard rows (:func:`robustbench_med.leaderboard.summarize`) of ``modality.dropout`` and
``modality.pgd`` cells (:mod:`robustbench_med.attacks.modality`). For one victim × defence with M sequences, the
incomplete multi-modal segmentation literature (HeMIS, RFNet, mmFormer, DMAF-Net) reports the score on each of the
2^M − 1 non-empty subsets of available sequences and their average; here:

- ``subset[<kept>]``: mean primary score (Dice …) with the sequences of ``<kept>`` available (the complete set is
  the clean score), with its 95% bootstrap interval from the cell;
- ``mean_over_subsets``: the average over every subset run, the complete set included (the literature's
  "average"); ``mean_incomplete``: the same without the complete set;
- ``worst_subset`` / ``worst`` / ``worst_ci95_low`` / ``worst_ci95_high``: the subset with the lowest mean score,
  that score and its interval (a worst over many subsets is biased low on a finite sample: read it with its CI);
- ``subsets``: how many subsets were run (2^M − 1 when the grid lists them all).

``modality.pgd`` cells give, per attacked sequence and eps, the score when the attacker controls that one sequence
(``pgd[<sequence>@<eps>]``), next to ``pgd.linf`` on all sequences when the grid runs it (``pgd[all@<eps>]``).

:func:`write_modality_tables` writes ``modalities.md``, ``modalities.csv`` (one row per victim × defence) and
``modalities_by_subset.csv`` (one row per victim × defence × subset) next to ``leaderboard.md``; given the store, also
each victim against its declared baseline (card ``extra['baseline']``) per subset and for the per-sample mean over
subsets, with paired bootstrap intervals and verdicts (:func:`paired_table`, ``modalities_paired.csv``).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from robustbench_med.registry import VICTIMS

KEYS = ["victim", "defense", "defense_params", "attack_through"]
DROPOUT, SEQUENCE_PGD = "modality.dropout", "modality.pgd"


def sequences_of(victim: str, channels: int | None = None) -> tuple[str, ...]:
    """The sequence names of a registered victim (its card's ``extra['modalities']``), else channel numbers."""
    try:
        card = VICTIMS.get(victim).meta.get("card")
    except Exception:  # noqa: BLE001 - a victim of another process's registry: fall back to numbers
        card = None
    names = tuple(str(m).lower() for m in (card.extra.get("modalities", ()) if card is not None else ()))
    if names:
        return names
    n = channels if channels is not None else (card.input_size[0] if card is not None else 0)
    return tuple(str(i) for i in range(n))


def _names(value: Any, seqs: Sequence[str]) -> list[str]:
    items = value.split("+") if isinstance(value, str) else value if isinstance(value, list) else [value]
    out = []
    for item in items:
        key = str(item).strip().lower()
        out.append(seqs[int(key)] if key.isdigit() and int(key) < len(seqs) else key)
    return out


def _params(row: pd.Series) -> dict[str, Any]:
    p = row["attack_params"]
    return json.loads(p) if isinstance(p, str) and p else (p if isinstance(p, dict) else {})


def dropout_rows(df: pd.DataFrame) -> pd.DataFrame:
    """One row per finished ``modality.dropout`` cell, plus the complete set (the clean score) once per victim ×
    defence: victim, defence, task, metric, kept, dropped, n_kept, score, ci95_low, ci95_high, n."""
    cols = KEYS + ["task", "metric", "kept", "dropped", "n_kept", "score", "ci95_low", "ci95_high", "n"]
    if df.empty or "attack" not in df or "robust" not in df:
        return pd.DataFrame(columns=cols)
    sel = df[(df.attack == DROPOUT) & (df.status == "done") & df.robust.notna()]
    rows = []
    for (key, group) in sel.groupby(KEYS, sort=False, dropna=False):
        seqs = sequences_of(key[0])
        first = group.iloc[0]
        rows.append({**dict(zip(KEYS, key)), "task": first.task, "metric": first.metric, "kept": "+".join(seqs),
                     "dropped": "", "n_kept": len(seqs), "score": float(first.clean), "ci95_low": math.nan,
                     "ci95_high": math.nan, "n": int(first.n)})
        for _, r in group.iterrows():
            dropped = _names(_params(r).get("drop", 0), seqs)
            kept = [s for s in seqs if s not in dropped]
            rows.append({**dict(zip(KEYS, key)), "task": r.task, "metric": r.metric, "kept": "+".join(kept),
                         "dropped": "+".join(dropped), "n_kept": len(kept), "score": float(r.robust),
                         "ci95_low": float(r.robust_ci95_low), "ci95_high": float(r.robust_ci95_high), "n": int(r.n)})
    return pd.DataFrame(rows, columns=cols)


def modality_summary(df: pd.DataFrame) -> pd.DataFrame:
    """One row per victim × defence: clean, mean over subsets, mean over incomplete subsets, the worst subset with its
    interval, and the single-sequence attack scores (see the module docstring)."""
    subsets = dropout_rows(df)
    out = []
    for key, group in subsets.groupby(KEYS, sort=False, dropna=False):
        seqs = sequences_of(key[0])
        complete = group[group.dropped == ""]
        incomplete = group[group.dropped != ""]
        worst = group.loc[group.score.idxmin()]
        row = {**dict(zip(KEYS, key)), "task": group.task.iloc[0], "metric": group.metric.iloc[0],
               "clean": float(complete.score.iloc[0]), "mean_over_subsets": float(group.score.mean()),
               "mean_incomplete": float(incomplete.score.mean()) if len(incomplete) else math.nan,
               "worst_subset": worst.kept, "worst": float(worst.score), "worst_ci95_low": float(worst.ci95_low),
               "worst_ci95_high": float(worst.ci95_high), "subsets": int(len(group)),
               "all_subsets": int(len(group)) == 2 ** len(seqs) - 1, "n": int(group.n.iloc[0])}
        row.update(_attack_scores(df, key, seqs))
        out.append(row)
    return pd.DataFrame(out)


def _attack_scores(df: pd.DataFrame, key: tuple, seqs: Sequence[str]) -> dict[str, float]:
    """``pgd[<sequence>@<eps>]`` for ``modality.pgd`` cells and ``pgd[all@<eps>]`` for ``pgd.linf`` on the same pair."""
    mine = df[(df[KEYS] == pd.Series(dict(zip(KEYS, key)))).all(1) & (df.status == "done") & df.robust.notna()]
    out = {}
    for _, r in mine[mine.attack.isin([SEQUENCE_PGD, "pgd.linf"])].iterrows():
        target = "+".join(_names(_params(r).get("modality", 0), seqs)) if r.attack == SEQUENCE_PGD else "all"
        out[f"pgd[{target}@{r.eps_display}]"] = float(r.robust)
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (float, np.floating)):
        return "–" if math.isnan(v) else f"{v:.3f}"
    return str(v)


def to_markdown(summary: pd.DataFrame, subsets: pd.DataFrame) -> str:
    """``modalities.md``: the summary per victim, then every subset's score per victim (a column per victim)."""
    if summary.empty:
        return ""
    lines = ["# Missing modalities", "", "Score (the task's primary metric) on every subset of available sequences "
             "(missing ones zero-filled), the mean over subsets and the worst subset with its 95% bootstrap interval; "
             "`pgd[s@eps]`: PGD that may change sequence `s` only (`all`: every sequence).", ""]
    attack_cols = sorted(c for c in summary.columns if c.startswith("pgd["))
    cols = ["victim", "defense", "metric", "clean", "mean_over_subsets", "mean_incomplete", "worst_subset", "worst",
            "worst_ci95_low", "worst_ci95_high", "subsets"] + attack_cols
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c, math.nan)) for c in cols) + " |" for _, r in summary.iterrows()]
    pivot = subsets.assign(column=subsets.victim + " / " + subsets.defense).pivot_table(
        index=["n_kept", "kept"], columns="column", values="score", aggfunc="first", sort=False)
    pivot = pivot.sort_index(level=0, ascending=False, sort_remaining=False)
    lines += ["", "## Every subset (available sequences)", "", "| available | " + " | ".join(pivot.columns) + " |",
              "|" + "---|" * (len(pivot.columns) + 1)]
    lines += ["| " + kept + " | " + " | ".join(_fmt(v) for v in values) + " |" for (_, kept), values in pivot.iterrows()]
    return "\n".join(lines) + "\n"


def paired_table(store: Any, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Each victim against its declared baseline (card ``extra['baseline']``) on the same samples: per subset of
    available sequences, and for the per-sample mean over subsets, ``Δ = victim − baseline`` with a paired bootstrap
    95% interval and a verdict (``better`` / ``worse`` when it excludes 0, else ``no difference shown``)."""
    from robustbench_med.results import store_frames
    from robustbench_med.gate import resample_indices

    cells, samples, _ = store_frames(store)
    if cells.empty or samples.empty:
        return pd.DataFrame()
    done = cells[(cells.status == "done") & (cells.attack == DROPOUT)]
    scores: dict[tuple[str, str], pd.DataFrame] = {}
    for (victim, defense), vc in done.groupby(["victim", "defense"]):
        seqs = sequences_of(victim)
        own = samples[samples.cell_id.isin(vc.cell_id)].merge(vc[["cell_id", "attack_params"]], on="cell_id")
        kept = own.attack_params.map(lambda p: "+".join(s for s in seqs if s not in _names(json.loads(p).get("drop", 0), seqs)))
        wide = own.assign(kept=kept).pivot_table(index="sample_idx", columns="kept", values="adv_score", aggfunc="first")
        wide["+".join(seqs)] = own.drop_duplicates("sample_idx").set_index("sample_idx").clean_score
        scores[(victim, defense)] = wide.assign(**{"mean over subsets": wide.mean(1)})
    rng, rows = np.random.default_rng(seed), []
    for (victim, defense), wide in scores.items():
        base = VICTIMS.get(victim).meta["card"].extra.get("baseline") if victim in VICTIMS else None
        if (base, defense) not in scores:
            continue
        other = scores[(base, defense)]
        common = wide.index.intersection(other.index)
        idx = resample_indices(len(common), n_boot, rng)
        for column in [c for c in wide.columns if c in other.columns]:
            diff = (wide.loc[common, column] - other.loc[common, column]).to_numpy(float)
            lo, hi = np.percentile(diff[idx].mean(1), [2.5, 97.5])
            rows.append({"victim": victim, "baseline": base, "defense": defense, "subset": column, "delta": float(diff.mean()),
                         "ci95_low": float(lo), "ci95_high": float(hi),
                         "verdict": "better" if lo > 0 else "worse" if hi < 0 else "no difference shown"})
    return pd.DataFrame(rows)


def _paired_markdown(paired: pd.DataFrame) -> str:
    if paired.empty:
        return ""
    lines = ["", "## Against the baseline (paired, same samples)", "", "| victim | baseline | available | Δ | 95% CI | verdict |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r.victim} | {r.baseline} | {r.subset} | {_fmt(r.delta)} | [{_fmt(r.ci95_low)}, {_fmt(r.ci95_high)}] | "
              f"{r.verdict} |" for _, r in paired.iterrows()]
    return "\n".join(lines) + "\n"


def write_modality_tables(df: pd.DataFrame, out_dir: str | Path, store: Any = None) -> dict[str, Path]:
    """Write ``modalities.md`` / ``.csv`` and ``modalities_by_subset.csv`` when ``df`` holds ``modality.dropout``
    cells (with ``store``, also the paired baseline comparisons, ``modalities_paired.csv``); return their paths."""
    subsets = dropout_rows(df)
    if subsets.empty:
        return {}
    summary = modality_summary(df)
    paired = paired_table(store) if store is not None else pd.DataFrame()
    out = Path(out_dir)
    paths = {"modalities_markdown": out / "modalities.md", "modalities_csv": out / "modalities.csv",
             "modalities_by_subset_csv": out / "modalities_by_subset.csv"}
    paths["modalities_markdown"].write_text(to_markdown(summary, subsets) + _paired_markdown(paired))
    summary.to_csv(paths["modalities_csv"], index=False)
    subsets.to_csv(paths["modalities_by_subset_csv"], index=False)
    if not paired.empty:
        paths["modalities_paired_csv"] = out / "modalities_paired.csv"
        paired.to_csv(paths["modalities_paired_csv"], index=False)
    return paths
