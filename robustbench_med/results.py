"""Results layer: decoded store records and one summary per cell, computed once.

Layers of reporting: pure metrics (:mod:`robustbench_med.statistics`, :mod:`robustbench_med.fairness`,
:mod:`robustbench_med.detection`; no store, no plotting) → **results** (this module: store records decoded into typed
dataclasses and one :class:`CellSummary` per cell) → board (:mod:`robustbench_med.entries`,
:mod:`robustbench_med.columns`, :mod:`robustbench_med.render`, :mod:`robustbench_med.leaderboard`).

This module is the one home of the rules every report shares:

- :func:`is_baseline`: a cell is a *baseline* (not a real attack) when its attack never uses the model (knowledge
  ``'none'``: random noise) under an adversarial threat model (L∞ / L2). Under a ``corruption`` threat every cell is a
  corruption with knowledge ``'none'``; there the worst case over corruptions is the point, so none is a baseline.
- :func:`success_threshold`: the task's threshold above which a per-sample score counts as correct
  (:attr:`robustbench_med.tasks.TaskSpec.success_threshold`).
- :func:`worst_case_cells` / :func:`worst_case_samples`: which cells the worst case over attacks takes its minimum over
  (finished, non-baseline attacks of one victim × defence setting × budget, at least two of them) and the per-sample
  minimum itself (RobustBench's "worst case over attacks", Croce et al., NeurIPS 2021 D&B).
- :func:`group_gaps`: the robust group gap (max − min of the group means, Fairlearn ``MetricFrame.difference()``
  through :class:`robustbench_med.fairness.GroupMeans`) and the worst group of per-sample scores.

Store reading for reports (:func:`store_frames` and the store-level fairness tables) lives here too, so the metric
functions of :mod:`robustbench_med.fairness` never open a store.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import numpy as np
import pandas as pd

from robustbench_med.statistics import attack_success_rate, mean_ci
from robustbench_med.tasks import task_spec
from robustbench_med.threat import CORRUPTION, eps_display

WORST_CASE = "worst-case"
GROUP_ATTRS = ("sex", "age_group", "site")
WORST_CASE_KEY = ("victim", "defense", "defense_params", "attack_through", "norm", "eps")
BASELINE_KNOWLEDGE = "none"
BLACK_BOX_MARGIN = 0.02


# ---------------------------------------------------------------------------------------------------------------
# the shared rules


def is_baseline(knowledge: str | None, norm: str | None) -> bool:
    """Whether a cell is a baseline rather than a real attack: its attack never uses the model (knowledge
    ``'none'``, e.g. ``noise.uniform``) under an adversarial threat model. Corruption cells (norm ``corruption``) are
    never baselines: the worst case over corruptions is what a corruption board reports."""
    return knowledge == BASELINE_KNOWLEDGE and norm != CORRUPTION


def success_threshold(task: str) -> float:
    """The score at or above which a sample counts as correct for ``task`` (the task's declared threshold)."""
    return float(task_spec(task).success_threshold)


def is_worst_case_attack(attack: Any) -> bool:
    """Whether an attack name is a worst case over several attacks (``worst-case(3 attacks)``)."""
    return str(attack).startswith(WORST_CASE)


def worst_case_label(n_attacks: int) -> str:
    """The attack name of a worst case over ``n_attacks`` attacks."""
    return f"{WORST_CASE}({n_attacks} attacks)"


# ---------------------------------------------------------------------------------------------------------------
# store reading


def store_frames(store: Any) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Cells, samples and decoded attributes of a store (a :class:`Store` or a path); read once per version of an
    open :class:`Store` (:meth:`Store.memo`), copies returned."""
    from robustbench_med.store import Store

    def read(st: Store) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
        cells, samples = pd.DataFrame(st.cells()), st.samples_frame()
        from robustbench_med.fairness import json_frame  # decodes each distinct attribute text once

        attrs = json_frame(samples["attrs"]) if len(samples) else pd.DataFrame()
        return cells, samples, attrs

    if isinstance(store, Store):
        return tuple(f.copy() for f in store.memo("store_frames", lambda: read(store)))  # type: ignore[return-value]
    with Store(store) as st:
        return read(st)


def fairness_table(store: Any, *, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """One row per finished cell of a store: the cell's description plus
    :func:`robustbench_med.fairness.fairness_columns`."""
    from robustbench_med.fairness import fairness_columns

    cells, samples, attrs = store_frames(store)
    rows = []
    for _, c in cells[cells.status == "done"].iterrows() if len(cells) else []:
        sub = samples[samples.cell_id == c.cell_id]
        if sub.empty:
            continue
        eps = json.loads(c.threat).get("eps") if isinstance(c.threat, str) else None
        head = {"cell_id": c.cell_id, "victim": c.victim, "defense": c.defense, "attack": c.attack, "eps": eps,
                "n": len(sub), "clean": float(sub.clean_score.mean()), "robust": float(sub.adv_score.mean())}
        rows.append({**head, **fairness_columns(sub, attrs.loc[sub.index], c.task, c.metric, n_boot=n_boot, seed=seed)})
    return pd.DataFrame(rows)


def compare_defenses(store: Any, base: str = "identity.none", other: str = "apple.latent",
                     attributes: Iterable[str] | None = None, *, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """:func:`robustbench_med.fairness.compare_groups` of defence ``other`` against ``base`` for every victim of a
    store: one ``clean`` row per victim, setting of ``other`` and attribute (the defended models on clean inputs), and
    one row per attack setting (same attack and parameters under both defences) and attribute, on the adversarial
    scores. A grid may hold ``other`` with several parameter settings (e.g. two APPLE configurations): each is compared
    on its own and named by the ``defense_params`` column. ``attributes``: default
    :data:`robustbench_med.fairness.ATTRIBUTES`."""
    from robustbench_med.fairness import ATTRIBUTES, INTERSECTION, compare_groups, group_columns

    attributes = ATTRIBUTES if attributes is None else tuple(attributes)
    cells, samples, attrs = store_frames(store)
    if cells.empty:
        return pd.DataFrame()
    done = cells[cells.status == "done"]
    rows = []
    for victim, vc in done.groupby("victim"):
        b_cells = vc[vc.defense == base]
        for d_params, o_cells in vc[vc.defense == other].groupby("defense_params", sort=True, dropna=False):
            pairs = [(b, o) for _, b in b_cells.iterrows() for _, o in o_cells.iterrows()
                     if b.attack == o.attack and b.attack_params == o.attack_params]
            if not pairs:
                continue
            first = samples[samples.cell_id == pairs[0][0].cell_id]
            by_idx = attrs.loc[first.index].set_index(first.sample_idx.to_numpy())
            settings = [("clean", "", None, pairs[0][0].cell_id, pairs[0][1].cell_id, "clean_score")]
            settings += [(b.attack, b.attack_params, json.loads(b.threat).get("eps"), b.cell_id, o.cell_id, "adv_score") for b, o in pairs]
            for attack, params, eps, b_id, o_id, score in settings:
                present = group_columns(by_idx, attributes)  # site only on multi-site data
                for attr in [a for a in list(attributes) + [INTERSECTION] if a in present]:
                    res = compare_groups(samples[samples.cell_id == b_id], samples[samples.cell_id == o_id], by_idx, attr,
                                         score=score, n_boot=n_boot, seed=seed)
                    rows.append({"victim": victim, "defense_params": d_params, "attack": attack, "attack_params": params,
                                 "eps": eps, "attribute": attr, **res})
    return pd.DataFrame(rows)


def group_table_from_store(store: Any) -> pd.DataFrame:
    """:func:`robustbench_med.fairness.group_table` of every finished cell of a store."""
    from robustbench_med.fairness import group_table

    cells, samples, attrs = store_frames(store)
    done = set(cells[cells.status == "done"].cell_id) if len(cells) else set()
    sub = samples[samples.cell_id.isin(done)]
    return group_table(sub, attrs.loc[sub.index], cells)


# ---------------------------------------------------------------------------------------------------------------
# decoded records and summaries


@dataclass(frozen=True)
class CellRecord:
    """One stored cell, decoded: identity, threat model and status (``threat`` / ``extra`` JSON parsed)."""

    cell_id: str
    victim: str
    task: str
    metric: str
    defense: str
    defense_params: Any
    attack_through: str
    attack: str
    attack_params: Any
    knowledge: str | None
    norm: str | None
    eps: float | None
    eps_display: str
    status: str
    reason: str
    weights_sha256: Any
    attack_seconds: Any
    flags: tuple[str, ...]
    group_key: str = ""

    @classmethod
    def from_store(cls, cell: pd.Series, flags: dict[str, Any]) -> "CellRecord":
        """Decode a row of the store's cell table (with a ``seconds`` column) and its group's reliability flags."""
        threat = json.loads(cell["threat"]) if isinstance(cell["threat"], str) else {}
        extra = json.loads(cell["extra"]) if isinstance(cell["extra"], str) else {}
        group_key = extra.get("group_key", "")
        return cls(
            cell_id=cell["cell_id"], victim=cell["victim"], task=cell["task"], metric=cell["metric"], defense=cell["defense"],
            defense_params=cell["defense_params"], attack_through=cell["attack_through"], attack=cell["attack"],
            attack_params=cell["attack_params"], knowledge=extra.get("knowledge"), norm=threat.get("norm"), eps=threat.get("eps"),
            eps_display=eps_display(threat["eps"], threat.get("norm")) if "eps" in threat else "", status=cell["status"],
            reason=cell["reason"] or "", weights_sha256=cell["weights_sha256"], attack_seconds=cell.get("seconds"),
            flags=tuple(sorted(k for k, (v, _) in flags.get(group_key, {}).items() if v)), group_key=group_key)

    @property
    def baseline(self) -> bool:
        return is_baseline(self.knowledge, self.norm)


@dataclass
class CellSummary:
    """The one summary of a cell (or of a worst case over attacks): every number a report shows of it.

    ``clean`` … ``attack_success_rate`` are ``None`` when not measured (skipped cells; invalid cells have no robust
    number). ``groups``: fairness-under-attack columns (:func:`robustbench_med.fairness.fairness_columns` plus the
    short aliases of :func:`headline_aliases`); ``detection``: detector AUROC / TPR columns; ``secondary``: means of
    the victim's secondary per-sample metrics.
    """

    record: CellRecord
    n: int
    flags: list[str]
    clean: float | None = None
    mean_linf: float | None = None
    mean_l2: float | None = None
    robust: float | None = None
    robust_ci95: tuple[float, float] | None = None
    attack_success_rate: float | None = None
    groups: dict[str, Any] = field(default_factory=dict)
    detection: dict[str, Any] = field(default_factory=dict)
    secondary: dict[str, Any] = field(default_factory=dict)
    worst_case: bool = False

    def to_row(self) -> dict[str, Any]:
        """The summary as one row of the wide frame (column order as published; unmeasured numbers left out)."""
        r = self.record
        row: dict[str, Any] = {
            "cell_id": r.cell_id, "victim": r.victim, "task": r.task, "metric": r.metric, "defense": r.defense,
            "defense_params": r.defense_params, "attack_through": r.attack_through, "attack": r.attack,
            "attack_params": r.attack_params, "knowledge": r.knowledge, "norm": r.norm, "eps": r.eps,
            "eps_display": r.eps_display, "status": r.status, "reason": r.reason, "n": self.n, "weights_sha256": r.weights_sha256,
        }
        if not self.worst_case:
            row["attack_seconds"] = r.attack_seconds
        row["flags"] = list(self.flags)
        for key in ("clean", "mean_linf", "mean_l2", "robust"):
            if getattr(self, key) is not None:
                row[key] = getattr(self, key)
        if self.robust_ci95 is not None:
            row["robust_ci95_low"], row["robust_ci95_high"] = self.robust_ci95
        if self.attack_success_rate is not None:
            row["attack_success_rate"] = self.attack_success_rate
        return {**row, **self.groups, **self.detection, **self.secondary}


def headline_aliases(columns: dict[str, Any], metric: str) -> dict[str, Any]:
    """Short names of the headline fairness columns, per attribute: ``robust_gap_<a>``, ``worst_group_robust_<a>``,
    ``worst_group_<a>``, ``clean_gap_<a>``, ``gap_change_<a>`` (the wide view and published entries carry both)."""
    out: dict[str, Any] = {}
    for attr in GROUP_ATTRS:
        for alias, key in ALIASES:
            name = key.format(metric=metric, attr=attr)
            if name in columns:
                out[f"{alias}_{attr}"] = columns[name]
    return out


ALIASES = (("robust_gap", "robust_gap_{metric}[{attr}]"), ("worst_group_robust", "robust_worst_group_{metric}[{attr}]"),
           ("worst_group", "robust_worst_group[{attr}]"), ("clean_gap", "clean_gap_{metric}[{attr}]"),
           ("gap_change", "gap_change_{metric}[{attr}]"))


def group_stats(sub: pd.DataFrame, attrs: pd.DataFrame, task: str, metric: str, n_boot: int) -> dict[str, Any]:
    """All fairness-under-attack columns of a cell (:func:`robustbench_med.fairness.fairness_columns`, seed 0) plus
    their :func:`headline_aliases`."""
    from robustbench_med.fairness import fairness_columns

    out: dict[str, Any] = dict(fairness_columns(sub, attrs, task, metric, n_boot=n_boot, seed=0))
    out.update(headline_aliases(out, metric))
    return out


def group_gaps(scores: np.ndarray, attrs: dict[int, dict[str, Any]], n: int) -> dict[str, Any]:
    """``robust_gap_<a>`` (max − min of the group means), ``worst_group_robust_<a>`` (min) and ``worst_group_<a>``
    (the argmin group) of per-sample scores, for every attribute with at least two groups."""
    from robustbench_med.fairness import group_frame

    out: dict[str, Any] = {}
    for attr in sorted({k for i in range(n) for k in attrs.get(i, {})}):
        labels = np.array([str(attrs.get(i, {}).get(attr)) for i in range(n)], dtype=object)
        frame = group_frame({"score": np.asarray(scores, dtype=float)}, labels)
        by = frame.by_group["score"]
        if len(by) >= 2:
            out[f"robust_gap_{attr}"] = float(frame.difference()["score"])
            out[f"worst_group_robust_{attr}"] = float(frame.group_min()["score"])
            out[f"worst_group_{attr}"] = str(by.idxmin())
    return out


def _detection_stats(sub: pd.DataFrame) -> dict[str, Any]:
    """Detector AUROC and TPR at 90% TNR when the cell ran behind a detector defence."""
    first = sub["metrics"].iloc[0]
    if not isinstance(first, str) or "clean_detector_score" not in first:
        return {}
    from robustbench_med.detection import detection_metrics_from_rows

    return detection_metrics_from_rows(sub[["metrics", "clean_correct", "adv_correct"]].to_dict("records"))


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


def summarize_cell(record: CellRecord, sub: pd.DataFrame, attrs: pd.DataFrame, n_boot: int) -> CellSummary:
    """The summary of one stored cell from its samples (``attrs``: the store's decoded attributes, any index)."""
    out = CellSummary(record, n=int(len(sub)), flags=list(record.flags))
    if sub.empty or record.status == "skipped":
        return out
    out.clean = float(sub["clean_score"].to_numpy(float).mean())
    out.mean_linf, out.mean_l2 = float(sub["linf"].mean()), float(sub["l2"].mean())
    if record.status == "invalid":
        out.flags = out.flags + ["invalid_budget"]
        return out
    adv = sub["adv_score"].to_numpy(float)
    out.robust, out.robust_ci95 = float(adv.mean()), mean_ci(adv)
    out.attack_success_rate = attack_success_rate(sub["clean_correct"].to_numpy(int), sub["adv_correct"].to_numpy(int))
    if n_boot:
        out.groups = group_stats(sub, attrs.loc[sub.index], record.task, record.metric, n_boot)
    out.detection = _detection_stats(sub)
    out.secondary = _secondary_means(sub, record.metric)
    return out


# ---------------------------------------------------------------------------------------------------------------
# the worst case over attacks


@dataclass(frozen=True)
class WorstCase:
    """The cells one worst case over attacks takes its per-sample minimum over: ``key`` =
    (victim, defence, defence params, attack route, norm, eps), ``cell_ids`` sorted, ``attacks`` their attack names."""

    key: tuple
    cell_ids: tuple[str, ...]
    attacks: tuple[str, ...]


def worst_case_cells(summary: pd.DataFrame) -> Iterator[WorstCase]:
    """The worst cases of a wide summary frame: per :data:`WORST_CASE_KEY`, the finished non-baseline single-attack
    cells with a robust number, when there are at least two of them."""
    if "robust" not in summary or summary.empty:
        return
    ok = (summary.status == "done") & summary.robust.notna() & ~summary.attack.map(is_worst_case_attack)
    real = ok & ~pd.Series([is_baseline(k, n) for k, n in zip(summary.knowledge, summary.norm)], index=summary.index, dtype=bool)
    for key, g in summary[real].groupby(list(WORST_CASE_KEY), dropna=False):
        if len(g) >= 2:
            yield WorstCase(key, tuple(sorted(g.cell_id)), tuple(g.attack))


def worst_case_samples(samples: pd.DataFrame, threshold: float | None) -> pd.DataFrame:
    """Per sample (``sample_idx``), the row of the attack with the lowest adversarial score, its prediction with it,
    keeping the sample's original row index (for its attributes); ``adv_correct`` recomputed at ``threshold`` (when
    given); secondary metrics are not carried (``metrics`` empty). Ties go to the first row (stable sort). The one
    per-sample minimum over attacks of the package (:func:`worst_case_scores` is it on score lists)."""
    worst = samples.sort_values(["sample_idx", "adv_score"], kind="stable")
    worst = worst[~worst.sample_idx.duplicated()].copy()
    if threshold is not None:
        worst["adv_correct"] = (worst["adv_score"] >= threshold).astype(int)
    worst["metrics"] = "{}"
    return worst


def worst_case_scores(adv_by_cell: dict[str, Iterable[float]]) -> np.ndarray:
    """Per-sample worst adversarial score over cells, from each cell's scores listed in the same sample order
    (:func:`worst_case_samples`)."""
    stacked = pd.DataFrame([{"cell_id": c, "sample_idx": i, "adv_score": float(v)}
                            for c, scores in adv_by_cell.items() for i, v in enumerate(scores)])
    return worst_case_samples(stacked, None)["adv_score"].to_numpy(float)


def summarize_worst_case(wc: WorstCase, summary: pd.DataFrame, samples: pd.DataFrame, attrs: pd.DataFrame | None,
                         n_boot: int) -> CellSummary:
    """The summary of a worst case over attacks: per-sample minima of its cells' scores, scored at the task's
    threshold, with the fairness columns of those minima (``n_boot`` > 0)."""
    first = summary[summary.cell_id == wc.cell_ids[0]].iloc[0]
    sub = samples[samples.cell_id.isin(wc.cell_ids)]
    threshold = success_threshold(first.task)
    worst = worst_case_samples(sub, threshold).sort_values("sample_idx", kind="stable")
    clean = sub.groupby("sample_idx").agg(clean=("clean_score", "first"), correct=("clean_correct", "first"))
    adv = worst["adv_score"].to_numpy(float)
    record = CellRecord(
        cell_id="", victim=wc.key[0], task=first.task, metric=first.metric, defense=wc.key[1], defense_params=wc.key[2],
        attack_through=wc.key[3], attack=worst_case_label(len(wc.attacks)), attack_params=json.dumps(sorted(wc.attacks)),
        knowledge="ensemble", norm=wc.key[4], eps=wc.key[5], eps_display=first.eps_display, status="done", reason="",
        weights_sha256=first.weights_sha256, attack_seconds=None, flags=())
    out = CellSummary(record, n=int(len(worst)), flags=[], clean=float(clean["clean"].mean()), robust=float(adv.mean()),
                      robust_ci95=mean_ci(adv), worst_case=True,
                      attack_success_rate=attack_success_rate(clean["correct"].to_numpy(int), (adv >= threshold).astype(int)))
    if n_boot and attrs is not None:
        out.groups = group_stats(worst, attrs.loc[worst.index], first.task, first.metric, n_boot)
    return out


# ---------------------------------------------------------------------------------------------------------------
# one summary per cell of a store


def summaries(cells: pd.DataFrame, samples: pd.DataFrame, attrs: pd.DataFrame, flags: dict[str, Any],
              n_boot: int) -> pd.DataFrame:
    """The wide summary frame (unsorted): one row per stored cell, then one per worst case over attacks, with the
    black-box-beats-white-box flag (:func:`flag_black_box`)."""
    by_cell = dict(tuple(samples.groupby("cell_id", sort=False)))
    empty = samples.iloc[0:0]
    rows = [summarize_cell(CellRecord.from_store(c, flags), by_cell.get(c["cell_id"], empty), attrs, n_boot).to_row()
            for _, c in cells.iterrows()]
    df = pd.DataFrame(rows)
    worst = [summarize_worst_case(wc, df, samples, attrs, n_boot).to_row() for wc in worst_case_cells(df)]
    df = pd.concat([df, pd.DataFrame(worst)], ignore_index=True)
    flag_black_box(df)
    return df


def flag_black_box(df: pd.DataFrame) -> None:
    """Flag white-box cells beaten by a black-box, transfer or noise attack at the same budget on the same defended
    model (gradient masking); attacks crafted on the undefended model and transferred (``attack_through:
    transfer``) count as transfer attacks against the adaptive ones."""
    if "robust" not in df:
        return
    for _, g in df[df.status == "done"].groupby(["victim", "defense", "defense_params", "norm", "eps"], dropna=False):
        g = g[~g.attack.map(is_worst_case_attack)]
        weak = g[g.knowledge.isin(["black-box", "transfer", "none"]) | (g.attack_through == "transfer")]
        if weak.empty:
            continue
        best_weak = weak.robust.min()
        for i, r in g[(g.knowledge == "white-box") & (g.attack_through != "transfer")].iterrows():
            if r.robust > best_weak + BLACK_BOX_MARGIN:
                df.at[i, "flags"] = sorted(set(r["flags"]) | {"black_box_beats_white_box"})


# ---------------------------------------------------------------------------------------------------------------
# the tidy (long) view and the wide view

ID_COLUMNS = ("cell_id", "victim", "task", "metric", "defense", "defense_params", "attack_through", "attack", "attack_params",
              "knowledge", "norm", "eps", "eps_display", "status", "reason", "n", "weights_sha256", "flags")
TIDY_VALUE_COLUMNS = ("metric", "group_attr", "group", "value", "label", "ci_low", "ci_high")
_ALIAS_NAMES = {f"{alias}_{attr}" for alias, _ in ALIASES for attr in GROUP_ATTRS}
_CI = re.compile(r"^(?P<m>.+?)_ci95_(?P<side>low|high)(?:\[(?P<inner>[^\]]+)\])?$")
_GROUPED = re.compile(r"^(?P<m>[^\[\]]+)\[(?P<attr>[^=\]]+)(?:=(?P<grp>[^\]]*))?\]$")


def parse_column(name: str) -> tuple[str, str, str, str] | None:
    """(metric, group attribute, group, part) of a wide column name; part is ``value``, ``ci_low`` or ``ci_high``;
    ``None`` for a short alias (:func:`headline_aliases`), which is not a metric of its own.

    ``robust`` → (robust, '', '', value); ``robust_ci95_low`` → (robust, '', '', ci_low);
    ``robust_accuracy[sex=F]`` → (robust_accuracy, sex, F, value); ``robust_gap_accuracy_ci95_high[sex]`` →
    (robust_gap_accuracy, sex, '', ci_high).
    """
    if name in _ALIAS_NAMES:
        return None
    part = "value"
    m = _CI.match(name)
    if m:
        part, name = f"ci_{m['side']}", m["m"] + (f"[{m['inner']}]" if m["inner"] else "")
    g = _GROUPED.match(name)
    if g:
        return (g["m"], g["attr"], g["grp"] or "", part)
    return (name, "", "", part)


def column_name(metric: str, group_attr: str, group: str, part: str = "value") -> str:
    """The wide column name of a tidy (metric, group attribute, group, part): the inverse of :func:`parse_column`."""
    base = metric if part == "value" else f"{metric}_ci95_{part[3:]}"
    if not group_attr:
        return base
    return f"{base}[{group_attr}={group}]" if group else f"{base}[{group_attr}]"


def tidy_summary(wide: pd.DataFrame) -> pd.DataFrame:
    """The long view of a wide summary frame: one row per summary row × metric × group, columns ``row`` (the row of
    the wide view), the cell's identity (:data:`ID_COLUMNS`, its primary metric renamed ``task_metric``), then
    ``metric``, ``group_attr`` / ``group`` (empty for the whole cell; ``group`` empty for an attribute-level statistic
    such as a gap), ``value`` (numbers), ``label`` (text values, e.g. the worst group) and ``ci_low`` / ``ci_high``
    (95% intervals, where computed). Short aliases are left out (each metric appears once); missing values too."""
    columns = ["row", *(("task_metric" if c == "metric" else c) for c in ID_COLUMNS), *TIDY_VALUE_COLUMNS]
    if wide.empty:
        return pd.DataFrame(columns=columns)
    w = wide.reset_index(drop=True).rename(columns={"metric": "task_metric"})
    w.insert(0, "row", np.arange(len(w)))
    ids = [c for c in columns[: len(ID_COLUMNS) + 1] if c in w]
    parsed = {c: parse_column(c) for c in w.columns if c not in ids}
    values = [c for c, p in parsed.items() if p is not None]
    order = {c: i for i, c in enumerate(values)}
    long = w[["row", *values]].astype(object).melt(id_vars="row", var_name="column", value_name="v")
    long = long[[_present(v) for v in long.v]]
    if long.empty:
        return pd.DataFrame(columns=columns)
    parts = pd.DataFrame([parsed[c] for c in long.column], index=long.index, columns=["metric", "group_attr", "group", "part"])
    long = pd.concat([long, parts], axis=1)
    long["order"] = long.column.map(order)
    first = long.groupby(["row", "metric", "group_attr", "group"], sort=False)["order"].min()
    table = long.set_index(["row", "metric", "group_attr", "group", "part"])["v"].unstack("part")
    table = table.reindex(columns=["value", "ci_low", "ci_high"]).join(first).reset_index()
    is_text = table["value"].map(lambda v: isinstance(v, str))
    table["label"] = table["value"].where(is_text, None)
    table["value"] = pd.to_numeric(table["value"].where(~is_text, np.nan))
    for c in ("ci_low", "ci_high"):
        table[c] = pd.to_numeric(table[c])
    table = table.sort_values(["row", "order"], kind="stable").drop(columns="order")
    return w[ids].merge(table, on="row", how="right")[[c for c in columns if c in ids or c in TIDY_VALUE_COLUMNS]].reset_index(drop=True)


def _present(v: Any) -> bool:
    if v is None or isinstance(v, (list, dict)):
        return False
    return not (isinstance(v, float) and math.isnan(v))


def wide_from_tidy(tidy: pd.DataFrame) -> pd.DataFrame:
    """The wide view rebuilt from :func:`tidy_summary` (short aliases restored); columns whose values were all
    missing are absent."""
    ids = [c for c in tidy.columns if c not in TIDY_VALUE_COLUMNS]
    rows = []
    for _, g in tidy.groupby("row", sort=True):
        head = g.iloc[0]
        row = {("metric" if c == "task_metric" else c): head[c] for c in ids if c != "row"}
        for r in g.itertuples(index=False):
            row[column_name(r.metric, r.group_attr, r.group)] = r.label if isinstance(r.label, str) else r.value
            for part in ("ci_low", "ci_high"):
                if _present(getattr(r, part)):
                    row[column_name(r.metric, r.group_attr, r.group, part)] = getattr(r, part)
        row.update(headline_aliases(row, row.get("metric", "")))
        rows.append(row)
    return pd.DataFrame(rows)
