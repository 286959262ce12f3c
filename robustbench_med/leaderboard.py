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

Every number is computed once per cell in :mod:`robustbench_med.results` (the worst case over attacks, the task's
success threshold, the baseline rule and the group gaps live there); :func:`summarize` returns it as a tidy long frame
(one row per cell × metric × group), :func:`summary_wide` as the wide frame above. The terminal table
(:func:`to_text`) and ``leaderboard.md`` (:func:`to_markdown`) take their columns from the registry of
:mod:`robustbench_med.columns` (its ``text`` view), like every rendering of :mod:`robustbench_med.render`.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import pandas as pd

from robustbench_med.columns import COLUMNS, SUMMARY_FIELDS, for_rows, is_group_column
from robustbench_med.render import markdown_table
from robustbench_med.results import (  # noqa: F401 (GROUP_ATTRS, BLACK_BOX_MARGIN: public, kept)
    BLACK_BOX_MARGIN, GROUP_ATTRS, flag_black_box, store_frames, summaries, summarize_worst_case, tidy_summary,
    worst_case_cells, worst_case_samples,
)
from robustbench_med.statistics import Z95, attack_success_rate as _asr, bootstrap_ci, mean_ci, wilson  # noqa: F401 (shims)
from robustbench_med.store import Store

log = logging.getLogger(__name__)


def _load(store: Store) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """Cells (with their seconds), samples, decoded attributes and flags of an open store (frames read once per
    store version: :func:`robustbench_med.results.store_frames`)."""
    cells, samples, attrs = store_frames(store)
    timings = store.timings()
    if not cells.empty:
        cells["seconds"] = [timings.get(c, (float("nan"), 0))[0] for c in cells.cell_id]
    return cells, samples, attrs, store.flags()


def summarize(store: Store | str | Path, fairness_boot: int = 200, *, wide: bool = False) -> pd.DataFrame:
    """The summary of a store, computed once per cell (:mod:`robustbench_med.results`), as a tidy long frame.

    Tidy (default): one row per summary row × metric × group (:func:`robustbench_med.results.tidy_summary`: the cell's
    identity, then ``metric``, ``group_attr``, ``group``, ``value``, ``label``, ``ci_low``, ``ci_high``); each metric
    appears once. ``wide=True`` (or :func:`summary_wide`): the wide view, one row per attacked cell (valid, invalid or
    skipped) plus worst-case-over-attacks rows, one column per metric (the columns of the module docstring, the
    fairness columns of :func:`robustbench_med.fairness.fairness_columns` and their short aliases), sorted by victim,
    defence, norm, eps and attack. :func:`robustbench_med.results.wide_from_tidy` turns the tidy frame back into it.

    ``fairness_boot``: bootstrap resamples for the fairness confidence intervals (0 skips the fairness columns).
    """
    df = summary_wide(store, fairness_boot)
    return df if wide else tidy_summary(df)


def summary_wide(store: Store | str | Path, fairness_boot: int = 200) -> pd.DataFrame:
    """The wide view of :func:`summarize` (one row per cell and per worst case over attacks; see there)."""
    own = not isinstance(store, Store)
    st = Store(store) if own else store
    try:
        cells, samples, attrs, flags = _load(st)
    finally:
        if own:
            st.close()
    if cells.empty:
        return pd.DataFrame()
    df = summaries(cells, samples, attrs, flags, fairness_boot)
    return df.sort_values(["victim", "defense", "norm", "eps", "attack"], na_position="last").reset_index(drop=True)


def _worst_case_rows(df: pd.DataFrame, cells: pd.DataFrame, samples: pd.DataFrame, attrs: pd.DataFrame | None = None,
                     n_boot: int = 0) -> pd.DataFrame:
    """Shim, kept for one release: :func:`robustbench_med.results.summarize_worst_case` of every
    :func:`robustbench_med.results.worst_case_cells`."""
    return pd.DataFrame([summarize_worst_case(wc, df, samples, attrs, n_boot).to_row() for wc in worst_case_cells(df)])


def _worst_samples(sub: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """Shim, kept for one release: :func:`robustbench_med.results.worst_case_samples`."""
    return worst_case_samples(sub, threshold)


def _flag_black_box(df: pd.DataFrame) -> None:
    """Shim, kept for one release: :func:`robustbench_med.results.flag_black_box`."""
    flag_black_box(df)


def summary_rows(df: pd.DataFrame) -> list[dict[str, Any]]:
    """Display rows (the fields :mod:`robustbench_med.columns` reads, as :func:`robustbench_med.render.flat_rows`
    makes them from entries) of the done and invalid rows of a wide summary: group values under ``groups``, the
    other numeric summary columns (detector AUROC, VQA per-question accuracy …) under ``metrics``."""
    if df.empty:
        return []
    rows = []
    for _, r in df[df.status.isin(["done", "invalid"])].iterrows():
        row = {k: _missing(r.get(k)) for k in ("victim", "task", "metric", "defense", "attack", "norm", "eps", "eps_display",
                                                "status", "clean", "robust", "n", "mean_linf", "mean_l2")}
        row.update({"model": r["victim"], "asr": _missing(r.get("attack_success_rate")), "ci_low": _missing(r.get("robust_ci95_low")),
                    "ci_high": _missing(r.get("robust_ci95_high")), "flags": list(r["flags"]),
                    "groups": {k: v for k, v in r.items() if is_group_column(k) and _missing(v) is not None},
                    "metrics": {k: v for k, v in r.items() if k not in SUMMARY_FIELDS and not is_group_column(k)
                                and isinstance(_missing(v), (int, float)) and not isinstance(v, bool)}})
        rows.append(row)
    return rows


def _missing(v: Any) -> Any:
    """None for a missing value (None or NaN), else the value."""
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else v


# shims, kept for one release: the terminal table's columns are the registry's ``text`` view (robustbench_med.columns)
DISPLAY = [(c.key, c.heading) for c in COLUMNS if "text" in c.views and c.source == "row"]
DETECTION_DISPLAY = [(c.key, c.heading) for c in COLUMNS if c.source == "metrics" and c.key.startswith("detector_")]
VQA_DISPLAY = [(c.key, c.heading) for c in COLUMNS if c.source == "metrics" and c.tasks == ("vqa",)]


def display_columns(df: pd.DataFrame) -> list[tuple[str, str]]:
    """(key, heading) of the terminal table's columns (the registry's ``text`` view, :mod:`robustbench_med.columns`):
    after the ASR, the detector AUROC and TPR at 90% TNR when a cell ran behind a detector and, for VQA victims, the
    accuracy on each image's first evaluation question and on its other questions; then the group columns."""
    return [(c.key, c.heading) for c in for_rows(summary_rows(df), "text")]


def display_rows(df: pd.DataFrame) -> list[list[str]]:
    """The cells of the terminal table, one list per done or invalid summary row."""
    rows = summary_rows(df)
    columns = for_rows(rows, "text")
    return [[c.cell(r) for c in columns] for r in rows]


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table of a wide summary (the terminal table's columns; pipes in text are
    escaped), through the one Markdown path of :func:`robustbench_med.render.markdown_table`."""
    rows = summary_rows(df)
    lines = markdown_table(for_rows(rows, "text"), rows)
    skipped = df[df.status == "skipped"] if len(df) else df
    if len(skipped):
        lines.append("")
        lines.append(f"Skipped cells ({len(skipped)}): " + "; ".join(f"{r.victim} × {r.attack}: {r.reason}" for _, r in skipped.iterrows()))
    return "\n".join(lines) + "\n"


def to_text(df: pd.DataFrame) -> str:
    """A fixed-width table for the terminal (the registry's ``text`` view)."""
    rows = summary_rows(df)
    columns = for_rows(rows, "text")
    head = [c.heading for c in columns]
    cells = [[c.cell(r) for c in columns] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(head)]
    fmt = "  ".join("{:<" + str(w) + "}" for w in widths)
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in cells]) + "\n"


def plot_robustness(df: pd.DataFrame, path: str | Path) -> Path | None:
    """PNG of :func:`robustbench_med.plots.summary_robustness` at ``path`` (shim, kept for one release)."""
    from robustbench_med import plots

    return plots.save_or_none(plots.summary_robustness(df), path)


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

    df = summary_wide(store)
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
    paths.update(write_example_grids(df, store.path.parent / "adversarial", out))
    return paths


def write_example_grids(df: pd.DataFrame, adversarial: Path, out: Path, n: int = 4) -> dict[str, Path]:
    """``examples_<victim>.png`` (:func:`robustbench_med.plots.example_grid`: clean, adversarial, amplified
    perturbation) for each victim of a run with ``save_adversarial: true``: its first ``n`` samples under the attack
    that left the lowest robust metric at the largest budget (valid cells of real attacks, undefended model first).
    Units saved without their clean inputs (before this was written) are passed over."""
    from safetensors.torch import load_file

    from robustbench_med import plots
    from robustbench_med.results import is_baseline

    if not adversarial.is_dir() or "robust" not in df:
        return {}
    cells = df[(df.status == "done") & (df.cell_id != "") & df.robust.notna()]
    cells = cells[[not is_baseline(k, nm) for k, nm in zip(cells.knowledge, cells.norm)]]
    paths = {}
    for victim, g in cells.groupby("victim", sort=True):
        g = g.assign(undefended=g.defense != "identity.none").sort_values(["undefended", "eps", "robust"], ascending=[True, False, True])
        for r in g.itertuples():
            path = adversarial / r.cell_id / f"{0:06d}.safetensors"
            try:
                batch = load_file(str(path)) if path.is_file() else {}
            except Exception as e:  # a damaged file costs its picture, not the report  # noqa: BLE001
                log.warning("example grid of %s: %s is not readable (%s); passed over", victim, path, e)
                continue
            if "x" not in batch or batch["x"].shape != batch.get("x_adv", batch["x"][:0]).shape:
                continue
            moved = (batch["x_adv"] - batch["x"]).flatten(1).abs().amax(1) > 0  # attacked samples first (AutoAttack's
            pick = [*moved.nonzero().flatten().tolist(), *(~moved).nonzero().flatten().tolist()][:n]  # protocol skips the rest)
            titles = [f"sample {i}" + (f"\n{r.attack} {r.eps_display}" if j == 0 else "") for j, i in enumerate(pick)]
            fig = plots.example_grid(batch["x"][pick], batch["x_adv"][pick], titles=titles)
            fig.suptitle(f"{victim} / {r.defense}", fontsize=10)
            paths[f"examples_{victim}"] = plots.save(fig, out / f"examples_{victim}.png")
            break
    return paths


def plot_group_gap_sweep(store: Store | str | Path, path: Path) -> Path | None:
    """Per-group robust metric vs eps (by sex) for the attack swept over the most eps values
    (:func:`robustbench_med.plots.group_sweep`; shim, kept for one release)."""
    from robustbench_med import plots
    from robustbench_med.fairness import group_table_from_store

    table = group_table_from_store(store)
    if table.empty:
        return None
    sweep = table.groupby("attack")["eps"].nunique().idxmax()
    return plots.save_or_none(plots.group_sweep(table[table.attack == sweep], attribute="sex"), path)
