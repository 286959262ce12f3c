"""The leaderboard's columns: one :class:`Column` per column, one ordered registry for every rendering.

A column says where its value lives in a display row (:func:`robustbench_med.render.flat_rows`: the row itself, its
``groups`` — fairness-under-attack values — or its ``metrics`` — per-attack extras), its heading, how a value reads
(``fmt``), which tasks it applies to, which way is better (``sort``) and in which renderings it appears (``views``:
``markdown`` — the ranked table —, ``per_attack`` — the Markdown table of every attack —, ``latex``, ``csv``,
``html`` and ``text`` — the terminal table of a summary). Markdown, LaTeX, CSV, the HTML table and the terminal
table all take their columns from :data:`COLUMNS` (in its order; the CSV keeps its published layout,
:data:`CSV_ORDER`, and appends new columns after it).

Per-attribute group columns are generated, not guessed: a :class:`ColumnFamily` names its keys by a template
(``robust_gap_{attr}``) and makes one :class:`Column` per attribute present in the rows (:func:`group_columns`).

Adding a leaderboard column is one ``Column(...)`` in :data:`COLUMNS` (or :func:`register`) plus the summary value it
shows (a summary column that is not a fairness column reaches an entry row's ``metrics``, and so ``source='metrics'``).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from robustbench_med.errors import ConfigError

VIEWS = ("markdown", "per_attack", "latex", "csv", "html", "text")
TABLES = frozenset({"markdown", "latex", "csv", "html", "text"})
SOURCES = ("row", "groups", "metrics")
SORTS = ("desc", "asc", None)


def fixed3(value: Any) -> str:
    """A number with three decimals; ``–`` when missing (None or NaN); text as is; lists comma-joined."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (int, float)):
        return f"{value:.3f}"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value)) or "–"
    return str(value)


def plain(value: Any) -> str:
    """Text as is (numbers with ``str``); ``–`` when missing; lists comma-joined."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value)) or "–"
    return str(value)


def interval(row: Mapping[str, Any]) -> str:
    """``[low, high]`` of the robust metric's 95% interval, three decimals; ``–`` when missing."""
    low, high = row.get("ci_low"), row.get("ci_high")
    if low is None or (isinstance(low, float) and math.isnan(low)):
        return "–"
    return f"[{low:.3f}, {high:.3f}]"


@dataclass(frozen=True)
class Column:
    """One leaderboard column.

    ``key``: the display-row field (``source='row'``) or the key in the row's ``groups`` / ``metrics``; also the CSV
    header. ``heading``: the table heading. ``fmt``: value → text in tables. ``tasks``: the tasks it applies to (None:
    every task). ``sort``: ``'desc'`` when higher is better, ``'asc'`` when lower is better, None when not a score.
    ``kind``: ``'num'`` (right-aligned, sorts numerically) or ``'text'``. ``views``: the renderings showing it.
    ``optional``: shown only when some row has a value. ``text``: a whole-row formatter (for cells made of several
    fields, e.g. the 95% interval), used instead of ``fmt``.
    """

    key: str
    heading: str
    fmt: Callable[[Any], str] = fixed3
    tasks: tuple[str, ...] | None = None
    sort: str | None = None
    kind: str = "num"
    source: str = "row"
    views: frozenset[str] = TABLES
    optional: bool = False
    text: Callable[[Mapping[str, Any]], str] | None = None

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ConfigError(f"column {self.key!r}: source must be one of {SOURCES}, got {self.source!r}")
        if self.sort not in SORTS:
            raise ConfigError(f"column {self.key!r}: sort must be one of {SORTS}, got {self.sort!r}")
        if self.kind not in ("num", "text"):
            raise ConfigError(f"column {self.key!r}: kind must be 'num' or 'text', got {self.kind!r}")
        unknown = set(self.views) - set(VIEWS)
        if unknown:
            raise ConfigError(f"column {self.key!r}: unknown view(s) {sorted(unknown)}; valid views: {list(VIEWS)}")

    def value(self, row: Mapping[str, Any]) -> Any:
        """The raw value of this column in a display row (None when absent)."""
        if self.source == "row":
            return row.get(self.key)
        return (row.get(self.source) or {}).get(self.key)

    def cell(self, row: Mapping[str, Any]) -> str:
        """The text of this column's cell in a table (not escaped)."""
        if self.text is not None:
            return self.text(row)
        if self.key == "robust" and row.get("status") == "invalid":
            return "INVALID"
        return self.fmt(self.value(row))

    def applies(self, rows: Iterable[Mapping[str, Any]]) -> bool:
        """Whether the column belongs in a table of ``rows``: a task it applies to is present, and (optional columns)
        some row holds a number (or, for text columns, a value) for it."""
        rows = list(rows)
        if self.tasks is not None and not any(r.get("task") in self.tasks for r in rows):
            return False
        if not self.optional:
            return True
        return any(_has_value(self.value(r), self.kind) for r in rows)


def _has_value(value: Any, kind: str) -> bool:
    if kind == "num":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return value is not None and value != ""


@dataclass(frozen=True)
class ColumnFamily:
    """Columns generated per attribute: ``template`` names the key (``robust_gap_{attr}``), ``heading`` the heading
    (``robust gap ({attr})``); ``attr_pattern`` limits which attributes match (e.g. no intersections)."""

    template: str
    heading: str
    attr_pattern: str = r"[^\[\]]+"
    tasks: tuple[str, ...] | None = None
    sort: str | None = None
    views: frozenset[str] = frozenset({"markdown", "latex", "html", "text"})

    def match(self, key: str) -> str | None:
        """The attribute a group key belongs to under this family, or None."""
        head, tail = self.template.split("{attr}")
        m = re.fullmatch(re.escape(head) + f"({self.attr_pattern})" + re.escape(tail), key)
        return m.group(1) if m else None

    def column(self, attr: str) -> Column:
        """The family's column for one attribute."""
        return Column(self.template.format(attr=attr), self.heading.format(attr=attr), tasks=self.tasks, sort=self.sort,
                      source="groups", views=self.views, optional=True)


def detector_auroc_text(row: Mapping[str, Any]) -> str:
    """The one-sided detector AUROC; one significantly below 0.5 reads ``0.042 (overshoot)``
    (:mod:`robustbench_med.detection`)."""
    metrics = row.get("metrics") or {}
    text = fixed3(metrics.get("detector_auroc"))
    return text + " (overshoot)" if metrics.get("detector_auroc_overshoot") == 1.0 else text


def _flags(value: Any) -> str:
    return ", ".join(value or []) or "–"


# The registry, in table order (Markdown, LaTeX, HTML, terminal).
COLUMNS: list[Column] = [
    Column("rank", "#", fmt=plain, kind="num", views=frozenset({"markdown"})),
    Column("dataset", "dataset", fmt=plain, kind="text", views=frozenset({"csv"})),
    Column("threat", "threat", fmt=plain, kind="text", views=frozenset({"csv"})),
    Column("victim", "victim", fmt=plain, kind="text", views=frozenset({"csv", "text"})),
    Column("model", "model", fmt=plain, kind="text", views=frozenset({"markdown", "per_attack", "latex", "csv", "html"})),
    Column("grid", "grid", fmt=plain, kind="text", views=frozenset({"csv"})),
    Column("task", "task", fmt=plain, kind="text", views=frozenset({"csv", "html"})),
    Column("threat_label", "threat", fmt=plain, kind="text", views=frozenset({"html"})),
    Column("defense", "defence", fmt=plain, kind="text", views=frozenset({"markdown", "per_attack", "latex", "csv", "html", "text"})),
    Column("defense_name", "defence name", fmt=plain, kind="text", views=frozenset({"csv"})),
    Column("defense_params", "defence parameters", fmt=plain, kind="text", views=frozenset({"csv"})),
    Column("attack_through", "attacked through", fmt=plain, kind="text", views=frozenset({"csv"})),
    Column("attack", "attack", fmt=plain, kind="text", views=frozenset({"markdown", "per_attack", "latex", "csv", "html", "text"})),
    Column("attack_params", "attack parameters", fmt=plain, kind="text", views=frozenset({"csv"})),
    Column("norm", "norm", fmt=plain, kind="text", views=frozenset({"csv", "text"})),
    Column("eps", "eps value", views=frozenset({"csv"})),
    Column("eps_display", "eps", fmt=plain, kind="text", views=frozenset({"csv", "text"})),
    Column("metric", "metric", fmt=plain, kind="text", views=frozenset({"csv", "text"})),
    Column("view", "view", fmt=plain, kind="text", views=frozenset({"csv"})),
    Column("status", "status", fmt=plain, kind="text", views=frozenset({"csv"})),
    Column("clean", "clean", sort="desc", views=frozenset({"markdown", "per_attack", "latex", "csv", "html", "text"})),
    Column("robust", "robust", sort="desc", views=frozenset({"markdown", "per_attack", "latex", "csv", "html", "text"})),
    Column("ci", "95% CI", text=interval, views=frozenset({"markdown", "latex", "html", "text"})),
    Column("ci_low", "95% CI low", views=frozenset({"csv"})),
    Column("ci_high", "95% CI high", views=frozenset({"csv"})),
    Column("asr", "ASR", sort="asc", views=frozenset({"markdown", "per_attack", "latex", "csv", "html", "text"})),
    # per-attack metrics (cells behind a detector; VQA victims)
    Column("detector_auroc", "det. AUROC", source="metrics", sort="desc", optional=True, text=detector_auroc_text,
           views=frozenset({"per_attack", "html", "text"})),
    Column("detector_tpr_at_90tnr", "TPR@90%TNR", source="metrics", sort="desc", optional=True,
           views=frozenset({"per_attack", "html", "text"})),
    Column("detector_auroc_two_sided", "det. AUROC (two-sided)", source="metrics", sort="desc", optional=True,
           views=frozenset({"per_attack", "html", "text"})),
    Column("detector_tpr_at_90tnr_two_sided", "TPR@90%TNR (two-sided)", source="metrics", sort="desc", optional=True,
           views=frozenset({"per_attack", "html", "text"})),
    Column("robust_vqa_accuracy_first", "robust (attacked q)", source="metrics", sort="desc", optional=True, tasks=("vqa",),
           views=frozenset({"per_attack", "html", "text"})),
    Column("robust_vqa_accuracy_others", "robust (other q)", source="metrics", sort="desc", optional=True, tasks=("vqa",),
           views=frozenset({"per_attack", "html", "text"})),
    # the per-attribute group columns (GROUP_FAMILIES) go here, then:
    Column("external", "external", sort="desc", views=frozenset({"markdown", "latex", "csv", "html"})),
    Column("flags", "flags", fmt=_flags, kind="text", views=frozenset({"markdown", "latex", "csv", "html", "text"})),
    Column("n", "n", fmt=plain, views=frozenset({"markdown", "per_attack", "latex", "csv", "html", "text"})),
    Column("mean_linf", "mean L∞", views=frozenset({"csv", "text"})),
    Column("mean_l2", "mean L2", views=frozenset({"csv", "text"})),
    Column("weights_sha256", "weights", fmt=plain, kind="text", views=frozenset({"csv", "html"})),
]
GROUPS_AFTER = "robust_vqa_accuracy_others"  # the group columns follow this column

# Fairness under attack, per attribute (Fairlearn-style max − min gaps; ES-Dice of FairSeg and FairMedFM).
GROUP_FAMILIES: list[ColumnFamily] = [
    ColumnFamily("worst_group_robust_{attr}", "worst-group robust ({attr})", sort="desc"),
    ColumnFamily("robust_gap_{attr}", "robust gap ({attr})", sort="asc"),
    ColumnFamily("gap_change_{attr}", "Δgap ({attr})", sort="asc"),
    ColumnFamily("robust_es_dice_fairseg[{attr}]", "ES-Dice FairSeg ({attr})", attr_pattern=r"[^*\]]+",
                 tasks=("segmentation",), sort="desc"),
    ColumnFamily("robust_es_dice_fairmedfm[{attr}]", "ES-Dice FairMedFM ({attr})", attr_pattern=r"[^*\]]+",
                 tasks=("segmentation",), sort="desc"),
]

# The published CSV layout (leaderboards/*/leaderboard.csv): these keys first, in this order; then any other column
# with the ``csv`` view (registry order); then every group value and every per-attack metric, sorted by key.
CSV_ORDER = ("dataset", "threat", "norm", "eps", "eps_display", "victim", "model", "grid", "task", "metric", "defense",
             "defense_name", "defense_params", "attack_through", "attack", "attack_params", "view", "status", "clean",
             "robust", "ci_low", "ci_high", "asr", "mean_linf", "mean_l2", "n", "external", "flags", "weights_sha256")


# Summary columns an entry row holds as schema fields (the rest go to its ``groups`` or ``metrics``).
SUMMARY_FIELDS = frozenset({
    "cell_id", "victim", "task", "metric", "defense", "defense_params", "attack_through", "attack", "attack_params",
    "knowledge", "norm", "eps", "eps_display", "status", "reason", "n", "weights_sha256", "attack_seconds", "flags",
    "clean", "mean_linf", "mean_l2", "robust", "robust_ci95_low", "robust_ci95_high", "attack_success_rate", "notes",
})
GROUP_PREFIXES = ("robust_gap_", "worst_group_", "es_dice_", "clean_gap_", "gap_change_")
_BRACKET = re.compile(r"^[^\[\]]+\[[^\[\]]+\]$")


def is_group_column(name: Any) -> bool:
    """Whether a summary column is a per-group / fairness value (an entry row's ``groups``): a short alias
    (``robust_gap_sex``, ``worst_group_robust_age_group``, ``es_dice_sex`` …) or a bracketed name (``n[sex=F]``,
    ``robust_gap_accuracy[sex]``)."""
    return isinstance(name, str) and (name.startswith(GROUP_PREFIXES) or bool(_BRACKET.match(name)))


def column(key: str) -> Column:
    """The registered column named ``key``."""
    for c in COLUMNS:
        if c.key == key:
            return c
    raise ConfigError(f"no leaderboard column {key!r}; columns: {[c.key for c in COLUMNS]}")


def register(col: Column, after: str | None = None) -> Column:
    """Add a column to the registry (after the column ``after``, else before ``external``); returns it."""
    if any(c.key == col.key and c.source == col.source for c in COLUMNS):
        raise ConfigError(f"leaderboard column {col.key!r} is already registered")
    at = [c.key for c in COLUMNS].index(after) + 1 if after else [c.key for c in COLUMNS].index("external")
    COLUMNS.insert(at, col)
    return col


def unregister(key: str) -> None:
    """Remove a column added with :func:`register`."""
    COLUMNS.remove(column(key))


def group_columns(rows: Iterable[Mapping[str, Any]], view: str = "markdown") -> list[Column]:
    """The generated group columns for ``rows``: one per family × attribute with a number in some row, ordered by
    attribute, then family (worst-group robust, robust gap, Δgap, ES-Dice FairSeg, ES-Dice FairMedFM)."""
    rows = list(rows)
    found: dict[tuple[str, int], Column] = {}
    for r in rows:
        for key, v in (r.get("groups") or {}).items():
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                continue
            for i, fam in enumerate(GROUP_FAMILIES):
                attr = fam.match(key)
                if attr is not None and view in fam.views:
                    found[(attr, i)] = fam.column(attr)
    return [found[k] for k in sorted(found) if found[k].applies(rows)]


def for_rows(rows: Iterable[Mapping[str, Any]], view: str = "html") -> list[Column]:
    """The columns of one rendering (``view``) for ``rows``, in registry order: the registered columns that apply to
    them (their tasks; optional columns only with a value), with the generated group columns after the per-attack
    metrics. The CSV adds no generated columns (it carries every group and metric key itself: :func:`csv_columns`)."""
    if view not in VIEWS:
        raise ConfigError(f"unknown view {view!r}; valid views: {list(VIEWS)}")
    rows = list(rows)
    out: list[Column] = []
    for c in COLUMNS:
        if view in c.views and c.applies(rows):
            out.append(c)
        if c.key == GROUPS_AFTER and view != "csv":
            out += group_columns(rows, view)
    return out


def csv_columns(rows: Iterable[Mapping[str, Any]]) -> list[Column]:
    """The CSV's columns: :data:`CSV_ORDER`, the other registered CSV columns, then every group key and every
    per-attack metric key of the rows (sorted), each once."""
    rows = list(rows)
    registered = [c for c in COLUMNS if "csv" in c.views and c.applies(rows)]
    first = [column(k) for k in CSV_ORDER]
    out = first + [c for c in registered if c.key not in CSV_ORDER]
    taken = {(c.source, c.key) for c in out}
    for source in ("groups", "metrics"):
        keys = sorted({k for r in rows for k, v in (r.get(source) or {}).items()
                       if source == "groups" or isinstance(v, (int, float, str))})
        out += [Column(k, k, source=source, views=frozenset({"csv"})) for k in keys if (source, k) not in taken]
    return out


__all__ = ["SUMMARY_FIELDS", "is_group_column", "Column", "ColumnFamily", "COLUMNS", "GROUP_FAMILIES", "CSV_ORDER", "VIEWS", "column", "register",
           "unregister", "group_columns", "for_rows", "csv_columns", "fixed3", "plain", "interval"]
