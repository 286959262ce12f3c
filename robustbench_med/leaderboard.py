"""Leaderboards from the store: per victim × defence × attack cell, and worst case over attacks.

Columns (names say what they compute):

- ``clean_<metric>``: mean clean primary score over the cell's n samples (accuracy, Dice, SDR …).
- ``robust_<metric>``: mean primary score on the adversarial examples. Only for valid cells: a cell whose attack
  broke its budget is listed as ``invalid`` with no number.
- ``robust_ci95_low`` / ``robust_ci95_high``: Wilson score interval for 0/1 scores, otherwise a seeded percentile
  bootstrap (2,000 resamples) of the mean.
- ``attack_success_rate``: among samples correct on clean input (score ≥ the task threshold), the fraction that
  are incorrect on the adversarial input.
- ``mean_linf`` / ``mean_l2``: mean L∞ / L2 norm of the perturbation actually applied.
- ``robust_gap_<attr>`` / ``worst_group_robust_<attr>`` / ``gap_change_<attr>``: max − min and min of the per-group
  robust metric, and robust gap − clean gap, for ``sex`` and ``age_group`` (fairness under attack; every column of
  :func:`robustbench_med.fairness.fairness_columns`, with bootstrap CIs and the intersection, is included too).
- ``detector_auroc`` / ``detector_tpr_at_90tnr``: for cells behind a detector defence (threshold from clean scores);
  ``_two_sided`` versions from the two-sided scores, and ``detector_auroc_overshoot`` (1 when the one-sided AUROC is
  significantly below 0.5; :mod:`robustbench_med.detection`).
- ``attack_seconds``: wall-clock time spent attacking the cell (batched cells share their batches' time).
- ``flags``: reliability flags: masked gradients (zero input gradients), randomised outputs, black-box beats
  white-box at the same budget (gradient masking), invalid budget.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from robustbench_med.store import Store
from robustbench_med.threat import eps_display

Z95 = 1.959963984540054
GROUP_ATTRS = ("sex", "age_group", "site")
BLACK_BOX_MARGIN = 0.02


def wilson(k: float, n: int) -> tuple[float, float]:
    """Wilson score 95% interval of a binomial proportion k/n (Wilson, JASA 1927)."""
    if n == 0:
        return (math.nan, math.nan)
    p = k / n
    denom = 1 + Z95**2 / n
    centre = (p + Z95**2 / (2 * n)) / denom
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / denom
    low = 0.0 if k == 0 else max(0.0, centre - half)
    high = 1.0 if k == n else min(1.0, centre + half)
    return (low, high)


def bootstrap_ci(values: np.ndarray, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of the mean (Efron & Tibshirani 1993), seeded."""
    if len(values) == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n_boot, len(values)))].mean(1)
    return (float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975)))


def mean_ci(values: np.ndarray) -> tuple[float, float]:
    if len(values) and np.all((values == 0) | (values == 1)):
        return wilson(float(values.sum()), len(values))
    return bootstrap_ci(values)


def _load(store: Store) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """Cells (with their seconds), samples, decoded attributes and flags of an open store (frames read once per
    store version: :func:`robustbench_med.fairness.store_frames`)."""
    from robustbench_med.fairness import store_frames

    cells, samples, attrs = store_frames(store)
    timings = store.timings()
    if not cells.empty:
        cells["seconds"] = [timings.get(c, (float("nan"), 0))[0] for c in cells.cell_id]
    return cells, samples, attrs, store.flags()


def _group_stats(sub: pd.DataFrame, attrs: pd.DataFrame, task: str, metric: str, n_boot: int) -> dict[str, Any]:
    """All fairness-under-attack columns of a cell (:func:`robustbench_med.fairness.fairness_columns`), plus short
    aliases of the headline ones: ``robust_gap_<attr>``, ``worst_group_robust_<attr>``, ``gap_change_<attr>``."""
    from robustbench_med.fairness import fairness_columns

    out: dict[str, Any] = dict(fairness_columns(sub, attrs, task, metric, n_boot=n_boot, seed=0))
    for attr in GROUP_ATTRS:
        for alias, key in (("robust_gap", f"robust_gap_{metric}[{attr}]"), ("worst_group_robust", f"robust_worst_group_{metric}[{attr}]"),
                           ("worst_group", f"robust_worst_group[{attr}]"), ("clean_gap", f"clean_gap_{metric}[{attr}]"),
                           ("gap_change", f"gap_change_{metric}[{attr}]")):
            if key in out:
                out[f"{alias}_{attr}"] = out[key]
    return out


def _detection_stats(sub: pd.DataFrame) -> dict[str, Any]:
    """Detector AUROC and TPR at 90% TNR when the cell ran behind a detector defence."""
    first = sub["metrics"].iloc[0]
    if not isinstance(first, str) or "clean_detector_score" not in first:
        return {}
    from robustbench_med.detection import detection_metrics_from_rows

    return detection_metrics_from_rows(sub[["metrics", "clean_correct", "adv_correct"]].to_dict("records"))


def summarize(store: Store | str | Path, fairness_boot: int = 200) -> pd.DataFrame:
    """One row per attacked cell (valid, invalid or skipped) plus worst-case-over-attacks rows.

    ``fairness_boot``: bootstrap resamples for the fairness confidence intervals (0 skips the fairness columns).
    """
    own = not isinstance(store, Store)
    st = Store(store) if own else store
    try:
        cells, samples, attrs, flags = _load(st)
    finally:
        if own:
            st.close()
    if cells.empty:
        return pd.DataFrame()
    by_cell = dict(tuple(samples.groupby("cell_id", sort=False)))
    empty = samples.iloc[0:0]
    rows = [_cell_row(c, by_cell.get(c["cell_id"], empty), attrs, flags, fairness_boot) for _, c in cells.iterrows()]
    df = pd.DataFrame(rows)
    df = pd.concat([df, _worst_case_rows(df, cells, samples, attrs, fairness_boot)], ignore_index=True)
    _flag_black_box(df)
    return df.sort_values(["victim", "defense", "norm", "eps", "attack"], na_position="last").reset_index(drop=True)


def _cell_row(cell: pd.Series, sub: pd.DataFrame, all_attrs: pd.DataFrame, flags: dict[str, Any], n_boot: int) -> dict[str, Any]:
    threat = json.loads(cell["threat"]) if isinstance(cell["threat"], str) else {}
    extra = json.loads(cell["extra"]) if isinstance(cell["extra"], str) else {}
    row: dict[str, Any] = {
        "cell_id": cell["cell_id"], "victim": cell["victim"], "task": cell["task"], "metric": cell["metric"],
        "defense": cell["defense"], "defense_params": cell["defense_params"], "attack_through": cell["attack_through"],
        "attack": cell["attack"], "attack_params": cell["attack_params"], "knowledge": extra.get("knowledge"),
        "norm": threat.get("norm"), "eps": threat.get("eps"), "eps_display": eps_display(threat["eps"], threat.get("norm")) if "eps" in threat else "",
        "status": cell["status"], "reason": cell["reason"] or "", "n": int(len(sub)), "weights_sha256": cell["weights_sha256"],
        "attack_seconds": cell.get("seconds"),
        "flags": sorted(k for k, (v, _) in flags.get(extra.get("group_key", ""), {}).items() if v),
    }
    if sub.empty or cell["status"] == "skipped":
        return row
    clean = sub["clean_score"].to_numpy(float)
    row["clean"] = float(clean.mean())
    row["mean_linf"] = float(sub["linf"].mean())
    row["mean_l2"] = float(sub["l2"].mean())
    if cell["status"] == "invalid":
        row["flags"] = row["flags"] + ["invalid_budget"]
        return row
    adv = sub["adv_score"].to_numpy(float)
    lo, hi = mean_ci(adv)
    correct = sub["clean_correct"].to_numpy(int)
    row.update({
        "robust": float(adv.mean()), "robust_ci95_low": lo, "robust_ci95_high": hi,
        "attack_success_rate": _asr(correct, sub["adv_correct"].to_numpy(int)),
    })
    if n_boot:
        row.update(_group_stats(sub, all_attrs.loc[sub.index], cell["task"], cell["metric"], n_boot))
    row.update(_detection_stats(sub))
    row.update(_secondary_means(sub, cell["metric"]))
    return row


def _secondary_means(sub: pd.DataFrame, primary: str) -> dict[str, float]:
    """``robust_<m>`` / ``clean_<m>``: means of the victim's secondary per-sample metrics (e.g. VQA accuracy on the
    attacked question ``vqa_accuracy_first`` and on the others ``vqa_accuracy_others``; MRE of landmarks)."""
    from robustbench_med.fairness import metrics_frame  # decodes each distinct metrics text once

    per = metrics_frame(sub)
    skip = {primary, "detector_score", "clean_detector_score"}
    out = {}
    for key in per.columns:
        if key in skip or not pd.api.types.is_numeric_dtype(per[key]):
            continue
        name = key if key.startswith("clean_") else f"robust_{key}"
        out[name] = float(per[key].mean())
    return out


def _asr(clean_correct: np.ndarray, adv_correct: np.ndarray) -> float:
    """Fraction of clean-correct samples made incorrect; NaN when no sample is correct on clean input."""
    n = int(clean_correct.sum())
    return float(((clean_correct == 1) & (adv_correct == 0)).sum() / n) if n else math.nan


def _worst_case_rows(df: pd.DataFrame, cells: pd.DataFrame, samples: pd.DataFrame, attrs: pd.DataFrame | None = None,
                     n_boot: int = 0) -> pd.DataFrame:
    """Per victim × defence × norm × eps: each sample's minimum score over all valid attacks at that budget, with the
    fairness-under-attack columns of those per-sample minima (``n_boot`` > 0)."""
    valid = df[(df.status == "done") & df.robust.notna()] if "robust" in df else df.iloc[0:0]
    out = []
    for key, g in valid.groupby(["victim", "defense", "defense_params", "attack_through", "norm", "eps"], dropna=False):
        attacks = [a for a in g.attack if not a.startswith("noise.")]
        if len(attacks) < 2:
            continue
        sub = samples[samples.cell_id.isin(g[~g.attack.str.startswith("noise.")].cell_id)]
        per_sample = sub.groupby("sample_idx").agg(adv=("adv_score", "min"), clean=("clean_score", "first"), correct=("clean_correct", "first"))
        adv = per_sample["adv"].to_numpy(float)
        lo, hi = mean_ci(adv)
        first = g.iloc[0]
        correct = per_sample["correct"].to_numpy(int)
        thr = 0.5
        out.append({
            "cell_id": "", "victim": key[0], "task": first.task, "metric": first.metric, "defense": key[1],
            "defense_params": key[2], "attack_through": key[3], "attack": f"worst-case({len(attacks)} attacks)",
            "attack_params": json.dumps(sorted(attacks)), "knowledge": "ensemble", "norm": key[4], "eps": key[5],
            "eps_display": first.eps_display, "status": "done", "reason": "", "n": int(len(per_sample)),
            "weights_sha256": first.weights_sha256, "flags": [], "clean": float(per_sample["clean"].mean()),
            "robust": float(adv.mean()), "robust_ci95_low": lo, "robust_ci95_high": hi,
            "attack_success_rate": _asr(correct, (adv >= thr).astype(int)),
        })
        if n_boot and attrs is not None:
            wc = _worst_samples(sub, thr)
            out[-1].update(_group_stats(wc, attrs.loc[wc.index], first.task, first.metric, n_boot))
    return pd.DataFrame(out)


def _worst_samples(sub: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """Per sample, the row of the attack with the lowest score (its prediction goes with it), keeping the sample's
    original row index (for its attributes); secondary metrics are not carried (``metrics`` empty)."""
    worst = sub.sort_values(["sample_idx", "adv_score"], kind="stable")
    worst = worst[~worst.sample_idx.duplicated()].copy()
    worst["adv_correct"] = (worst["adv_score"] >= threshold).astype(int)
    worst["metrics"] = "{}"
    return worst


def _flag_black_box(df: pd.DataFrame) -> None:
    """Flag white-box cells beaten by a black-box, transfer or noise attack at the same budget on the same defended
    model (gradient masking); attacks crafted on the undefended model and transferred (``attack_through:
    transfer``) count as transfer attacks against the adaptive ones."""
    if "robust" not in df:
        return
    for _, g in df[df.status == "done"].groupby(["victim", "defense", "defense_params", "norm", "eps"], dropna=False):
        g = g[~g.attack.str.startswith("worst-case")]
        weak = g[g.knowledge.isin(["black-box", "transfer", "none"]) | (g.attack_through == "transfer")]
        if weak.empty:
            continue
        best_weak = weak.robust.min()
        for i, r in g[(g.knowledge == "white-box") & (g.attack_through != "transfer")].iterrows():
            if r.robust > best_weak + BLACK_BOX_MARGIN:
                df.at[i, "flags"] = sorted(set(r["flags"]) | {"black_box_beats_white_box"})


DISPLAY = [("victim", "victim"), ("defense", "defense"), ("attack", "attack"), ("norm", "norm"), ("eps_display", "eps"),
           ("metric", "metric"), ("clean", "clean"), ("robust", "robust"), ("ci", "95% CI"),
           ("attack_success_rate", "ASR"), ("robust_gap_sex", "gap(sex)"), ("worst_group_robust_sex", "worst(sex)"),
           ("gap_change_sex", "Δgap(sex)"), ("robust_gap_age_group", "gap(age)"), ("n", "n"), ("mean_linf", "mean L∞"),
           ("mean_l2", "mean L2"), ("flags", "flags")]
DETECTION_DISPLAY = [("detector_auroc", "det. AUROC"), ("detector_tpr_at_90tnr", "TPR@90%TNR"),
                     ("detector_auroc_two_sided", "det. AUROC (2-sided)"), ("detector_tpr_at_90tnr_two_sided", "TPR@90%TNR (2-sided)")]
VQA_DISPLAY = [("robust_vqa_accuracy_first", "robust (attacked q)"), ("robust_vqa_accuracy_others", "robust (other q)")]


def display_columns(df: pd.DataFrame) -> list[tuple[str, str]]:
    """The displayed columns; after the ASR: the detector AUROC and TPR at 90% TNR when a cell ran behind a detector,
    and for VQA victims the accuracy on each image's first evaluation question (the one question-specific attacks
    target) and on its other questions."""
    extra = [(c, h) for c, h in DETECTION_DISPLAY + VQA_DISPLAY if c in df and not df[c].isna().all()]
    at = [c for c, _ in DISPLAY].index("attack_success_rate") + 1
    return DISPLAY[:at] + extra + DISPLAY[at:]


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.3f}"
    if isinstance(v, list):
        return ", ".join(v)
    return str(v)


def display_rows(df: pd.DataFrame) -> list[list[str]]:
    rows, columns = [], display_columns(df)
    for _, r in df[df.status.isin(["done", "invalid"])].iterrows():
        r = r.copy()
        r["ci"] = f"[{r.robust_ci95_low:.3f}, {r.robust_ci95_high:.3f}]" if pd.notna(r.get("robust_ci95_low")) else "–"
        if r.status == "invalid":
            r["robust"] = "INVALID"
        rows.append([_fmt(r.get(col)) for col, _ in columns])
    return rows


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table of the leaderboard (pipes in text are escaped)."""
    head = [h for _, h in display_columns(df)]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for row in display_rows(df):
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |")
    skipped = df[df.status == "skipped"]
    if len(skipped):
        lines.append("")
        lines.append(f"Skipped cells ({len(skipped)}): " + "; ".join(f"{r.victim} × {r.attack}: {r.reason}" for _, r in skipped.iterrows()))
    return "\n".join(lines) + "\n"


def to_text(df: pd.DataFrame) -> str:
    """A fixed-width table for the terminal."""
    head = [h for _, h in display_columns(df)]
    rows = display_rows(df)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    fmt = "  ".join("{:<" + str(w) + "}" for w in widths)
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in rows]) + "\n"


def plot_robustness(df: pd.DataFrame, path: str | Path) -> Path | None:
    """Robust metric vs eps per victim × defence, one panel per norm (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if "robust" not in df:
        return None
    data = df[(df.status == "done") & df.robust.notna() & (df.knowledge != "none")]
    if data.empty:
        return None
    norms = sorted(data.norm.dropna().unique())
    fig, axes = plt.subplots(1, len(norms), figsize=(6 * len(norms), 4.2), squeeze=False)
    for ax, norm in zip(axes[0], norms):
        for (victim, defense), g in data[data.norm == norm].groupby(["victim", "defense"]):
            g = g.groupby("eps").robust.min().sort_index()
            clean = df[(df.victim == victim) & (df.defense == defense)].clean.dropna()
            xs = [0.0] + list(g.index)
            ys = [float(clean.iloc[0]) if len(clean) else float("nan")] + list(g.values)
            ax.plot(xs, ys, marker="o", label=f"{victim} / {defense}")
        ax.set_xlabel(f"eps ({norm})")
        ax.set_ylabel("robust metric (worst case over attacks)")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_leaderboard(store: Store | str | Path, out_dir: str | Path) -> dict[str, Path]:
    """Write ``leaderboard.md``, ``.csv``, ``.json`` and ``robustness_vs_eps.png`` into ``out_dir`` (and, for
    corruption cells, ``corruptions.md`` / ``.csv``: :mod:`robustbench_med.corruption_metrics`; for missing-modality
    cells, ``modalities.md`` / ``.csv``: :mod:`robustbench_med.modality_metrics`; for multi-site data, ``sites.md`` /
    ``.csv``: :mod:`robustbench_med.site_metrics`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    own = not isinstance(store, Store)
    st = Store(store) if own else store  # one open store: every report below decodes it once (Store.memo)
    try:
        return _write_reports(st, out)
    finally:
        if own:
            st.close()


def _write_reports(store: Store, out: Path) -> dict[str, Path]:
    from robustbench_med.corruption_metrics import write_corruption_tables
    from robustbench_med.modality_metrics import write_modality_tables
    from robustbench_med.paired_metrics import write_baseline_tables
    from robustbench_med.seed_studies import write_seed_study_tables
    from robustbench_med.site_metrics import write_site_tables

    df = summarize(store)
    paths = {"markdown": out / "leaderboard.md", "csv": out / "leaderboard.csv", "json": out / "leaderboard.json"}
    paths["markdown"].write_text(to_markdown(df))
    df.assign(flags=df["flags"].map(lambda f: ";".join(f))).to_csv(paths["csv"], index=False)
    records = json.loads(df.to_json(orient="records"))
    paths["json"].write_text(json.dumps({"rows": records, "manifests": store.manifests()}, indent=1, default=str))
    paths.update(write_corruption_tables(df, out))  # corruptions.md / .csv when the store holds corruption cells
    paths.update(write_modality_tables(df, out, store))  # modalities.md / .csv when the store holds modality.dropout cells
    paths.update(write_site_tables(store, out))  # sites.md / .csv when the samples carry a site (phantom.sites)
    paths.update(write_baseline_tables(store, out))  # baselines.md / .csv when a victim and its declared baseline ran
    paths.update(write_seed_study_tables(store, out))  # seed_studies.md / .csv when a two-arm seed study ran
    png = plot_robustness(df, out / "robustness_vs_eps.png")
    if png:
        paths["plot"] = png
    gaps = plot_group_gap_sweep(store, out / "group_gaps_vs_eps.png")
    if gaps:
        paths["group_plot"] = gaps
    return paths


def plot_group_gap_sweep(store: Store | str | Path, path: Path) -> Path | None:
    """Per-group robust metric vs eps (by sex) for the attack swept over the most eps values."""
    from robustbench_med.fairness import group_table_from_store, plot_group_gaps

    table = group_table_from_store(store)
    if table.empty:
        return None
    sweep = table.groupby("attack")["eps"].nunique().idxmax()
    return plot_group_gaps(table[table.attack == sweep], path, attribute="sex")
