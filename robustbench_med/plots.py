"""Every figure of robustbench_med, drawn with matplotlib (Agg backend, nothing shown on screen).

What a reader of robustness work expects (Carlini et al., "On Evaluating Adversarial Robustness", 2019, §5.1: plot
accuracy against the perturbation budget; RobustBench, Croce et al., NeurIPS 2021 D&B) and what every figure here
keeps to:

- **facets**: one panel per task × metric × norm: accuracy, Dice, SDR and VQA scores never share an axis;
- **one colour and marker per victim in every figure of a board** (:func:`victim_styles` over all the board's
  victims: a digest of the name picks one of Kelly's 20 colours of maximum contrast × 10 markers; a name whose
  colour an earlier one took moves to the next free colour), line style per defence;
- **a line only along one victim × defence across eps** (from its clean score at eps 0); a panel whose series have
  one budget each is a dot plot (a row per series: under attack with its interval, clean hollow), never a line
  between two unrelated points;
- **95% intervals as bands** (``robust_ci95`` of the entries) or error bars;
- **legends outside the axes** (constrained layout keeps them clear of every panel), labels wrapped, never cut;
- detector studies are plotted as detection AUROC and TPR at 90% TNR (worst over the attacks), not robust accuracy;
- fairness: the robust (and clean) gap between groups with its bootstrap interval, one panel per task × attribute;
- per-sample score histograms (clean vs adversarial) and clean / adversarial / amplified-perturbation example grids.

Functions return a :class:`matplotlib.figure.Figure`; :func:`png_bytes` and :func:`save` turn it into a file.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np

from robustbench_med.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from matplotlib.figure import Figure

# Kelly (1965), "Twenty-two colors of maximum contrast", Color Engineering 3(6), without white and black.
KELLY_COLORS = ("#F3C300", "#875692", "#F38400", "#A1CAF1", "#BE0032", "#C2B280", "#848482", "#008856", "#E68FAC",
                "#0067A5", "#F99379", "#604E97", "#F6A600", "#B3446C", "#DCD300", "#882D17", "#8DB600", "#654522",
                "#E25822", "#2B3D26")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*")
DEFENSE_LINESTYLES = ("-", "--", ":", "-.")
GROUP_COLORS = ("#0067A5", "#E25822", "#008856", "#875692", "#F6A600", "#882D17", "#848482", "#E68FAC")
LABEL_WIDTH = 40  # characters per legend / tick-label line
DETECTOR_METRICS = (("detector_auroc", "detection AUROC"), ("detector_tpr_at_90tnr", "detection TPR at 90% TNR"))
DPI = 100


# ---------------------------------------------------------------------------------------------------------------
# styles and labels


@dataclass(frozen=True)
class Style:
    """How one victim is drawn: its colour and marker."""

    color: str
    marker: str


def _slot(name: str) -> int:
    """A stable slot (colour × marker) for ``name``: a sha1 digest, the same in every process and release."""
    return int(hashlib.sha1(name.encode()).hexdigest(), 16) % (len(KELLY_COLORS) * len(MARKERS))


def _style_of_slot(slot: int) -> Style:
    return Style(KELLY_COLORS[slot % len(KELLY_COLORS)], MARKERS[slot // len(KELLY_COLORS) % len(MARKERS)])


def victim_style(name: str) -> Style:
    """The colour and marker of victim ``name`` (the same in every figure)."""
    return _style_of_slot(_slot(name))


def victim_styles(names: Iterable[str]) -> dict[str, Style]:
    """Styles of the victims of a board or figure: each its own :func:`victim_style`, except that a name whose colour
    an earlier name (in sorted order) took moves to the next colour nobody uses (or, past 20 victims, to the next
    unused colour × marker), so no two victims of one board look alike. Render the figures of one board with the
    styles of all its victims and a victim looks the same in every one of them."""
    n_col = len(KELLY_COLORS)
    size = n_col * len(MARKERS)
    taken: set[int] = set()
    out = {}
    for name in sorted(set(names)):
        slot = _slot(name)
        used = {t % n_col for t in taken}
        if slot % n_col in used and len(used) < n_col:
            col = next((slot + k) % n_col for k in range(n_col) if (slot + k) % n_col not in used)
            slot = slot - slot % n_col + col
        while slot in taken and len(taken) < size:
            slot = (slot + 1) % size
        taken.add(slot)
        out[name] = _style_of_slot(slot)
    return out


def wrap_label(text: str, width: int = LABEL_WIDTH, max_lines: int = 3) -> str:
    """``text`` wrapped at ``width`` characters (at spaces; a longer word is split); lines past ``max_lines``
    are dropped with an ellipsis, so a label never runs off the figure."""
    out: list[str] = []
    for part in str(text).split("\n"):
        out += textwrap.wrap(part, width=width, break_long_words=True, break_on_hyphens=False) or [""]
    if len(out) > max_lines:
        out = out[:max_lines]
        out[-1] = out[-1][: max(0, width - 1)] + "…"
    return "\n".join(out)


def _params(row: dict[str, Any]) -> dict[str, Any]:
    """A row's defence parameters as a dict (summary frames hold them as JSON text)."""
    params = row.get("defense_params") or {}
    if isinstance(params, str):
        params = json.loads(params) if params.strip().startswith("{") else {}
    return params


def _scalar_pairs(row: dict[str, Any]) -> set[tuple[str, str]]:
    """The scalar (not nested, not None) defence parameters of a row as (name, text) pairs."""
    return {(k, str(v)) for k, v in _params(row).items() if v is not None and not isinstance(v, (dict, list))}


def short_defense(row: dict[str, Any], hide: Iterable[tuple[str, str]] = (), max_params: int = 3) -> str:
    """A compact defence name: up to ``max_params`` scalar parameters not in ``hide`` (a detector's nested attack
    settings are left out; more are shown as ``…``), plus ``[transfer]`` / ``[detach]`` when it is not attacked
    adaptively (kept whole: it is what tells two rows of one defence apart)."""
    hidden = set(hide)
    shown = [f"{k}={v}" for k, v in sorted(_scalar_pairs(row)) if (k, v) not in hidden and len(v) <= 16]
    shown = shown[:max_params] + (["…"] if len(shown) > max_params else [])
    label = str(row["defense"]) + (f"({', '.join(shown)})" if shown else "")
    through = row.get("attack_through") or "adaptive"
    return label if through == "adaptive" else f"{label} [{through}]"


def defense_labels(rows: Iterable[dict[str, Any]]) -> dict[str, str]:
    """Readable labels of the defence settings of ``rows``, keyed by :func:`robustbench_med.entries.defense_key`.

    In a defence family (``detector.*``, ``f3.*``, ``apple.*``), a parameter that several settings share with one
    value tells none of them apart and is left out (``detector.kd(bandwidth=scott)``, not
    ``detector.kd(attack=pgd.linf, bandwidth=scott, n_fit=256, …)``); a parameter of one setting only is shown.
    """
    from robustbench_med.entries import defense_key

    settings: dict[str, dict[str, Any]] = {}
    for r in rows:
        settings.setdefault(defense_key(r), r)
    family: dict[str, list[set[tuple[str, str]]]] = {}
    for r in settings.values():
        pairs = _scalar_pairs(r)
        if pairs not in family.setdefault(str(r["defense"]).split(".")[0], []):
            family[str(r["defense"]).split(".")[0]].append(pairs)
    hide: dict[str, set[tuple[str, str]]] = {}
    for fam, sets in family.items():
        values: dict[str, list[str]] = {}
        for pairs in sets:
            for k, v in pairs:
                values.setdefault(k, []).append(v)
        hide[fam] = {(k, v[0]) for k, v in values.items() if len(v) > 1 and len(set(v)) == 1}
    return {k: short_defense(r, hide[str(r["defense"]).split(".")[0]]) for k, r in settings.items()}


def _pyplot():
    """matplotlib's pyplot on the headless Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png_bytes(fig: "Figure") -> bytes:
    """The figure as PNG bytes (the figure is closed)."""
    plt = _pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    plt.close(fig)
    return buf.getvalue()


def save(fig: "Figure", path: str | Path) -> Path:
    """Write the figure as PNG to ``path`` (the figure is closed)."""
    path = Path(path)
    path.write_bytes(png_bytes(fig))
    return path


def png_or_none(fig: "Figure | None") -> bytes | None:
    """:func:`png_bytes` of a figure, ``None`` for no figure (nothing to plot)."""
    return None if fig is None else png_bytes(fig)


def save_or_none(fig: "Figure | None", path: str | Path) -> Path | None:
    """:func:`save` of a figure, ``None`` for no figure (nothing to plot)."""
    return None if fig is None else save(fig, path)


# ---------------------------------------------------------------------------------------------------------------
# robustness vs eps


@dataclass
class Series:
    """One victim × defence along eps inside one facet (task × metric × norm)."""

    victim: str
    defense: str
    facet: tuple[str, str, str]  # task, metric label, norm
    points: dict[float, tuple[float, float | None, float | None]] = field(default_factory=dict)  # eps → (y, lo, hi)
    display: dict[float, str] = field(default_factory=dict)  # eps → "8/255"
    clean: float | None = None

    @property
    def label(self) -> str:
        return f"{self.victim} / {self.defense}"


def _put(series: dict[tuple, Series], key: tuple, victim: str, defense: str, facet: tuple[str, str, str], eps: float,
         shown: str, y: float, lo: float | None, hi: float | None, clean: float | None) -> None:
    """Add a point to a series; two points at one eps keep the lower (the worst case for the defender)."""
    s = series.setdefault(key, Series(victim, defense, facet))
    if eps not in s.points or y < s.points[eps][0]:
        s.points[eps] = (y, lo, hi)
        s.display[eps] = shown
    if clean is not None and s.clean is None:
        s.clean = clean


def entry_series(entries: Iterable[dict[str, Any]]) -> list[Series]:
    """Series of the headline rows of entries (robust metric with its 95% interval) and, for detector defences,
    detection AUROC and TPR at 90% TNR (the lowest over the attacks at that budget). A budget where only a baseline
    ran (noise, :func:`robustbench_med.results.is_baseline`) is no point of a robustness curve and is left out."""
    from robustbench_med.entries import defense_key, headline_rows
    from robustbench_med.results import is_baseline

    entries = list(entries)
    labels = defense_labels(r for e in entries for r in e["results"])
    series: dict[tuple, Series] = {}
    for e in entries:
        norm, eps, shown = e["threat"]["norm"], float(e["threat"]["eps"]), e["threat"]["eps_display"]
        for r in headline_rows(e):
            same = [x for x in e["results"] if defense_key(x) == defense_key(r) and x["status"] == "done"]
            det = [x for x in same if "detector_auroc" in (x.get("metrics") or {})]
            defense = labels[defense_key(r)]
            if det:
                for key, name in DETECTOR_METRICS:
                    vals = [float(x["metrics"][key]) for x in det if isinstance(x["metrics"].get(key), (int, float))]
                    if vals:
                        facet = (e["task"], name + " (worst attack)", norm)
                        _put(series, (facet, e["victim"], defense), e["victim"], defense, facet, eps, shown, min(vals), None, None, None)
            elif r["status"] == "done" and r["robust"] is not None and not is_baseline(r.get("knowledge"), norm):
                lo, hi = (r.get("robust_ci95") or [None, None])
                facet = (e["task"], f"robust {e['metric']}", norm)
                _put(series, (facet, e["victim"], defense), e["victim"], defense, facet, eps, shown, float(r["robust"]), lo, hi, r["clean"])
    return list(series.values())


def summary_series(df: "pd.DataFrame") -> list[Series]:
    """Series of a :func:`robustbench_med.leaderboard.summarize` frame: per victim × defence × eps the lowest robust
    metric over the attacks (noise baselines, ``knowledge == 'none'``, left out) with its 95% interval."""
    from robustbench_med.entries import defense_key
    from robustbench_med.threat import eps_display

    if df is None or df.empty or "robust" not in df:
        return []
    data = df[(df.status == "done") & df.robust.notna() & (df.knowledge != "none")]
    records = data.to_dict("records")
    labels = defense_labels(records)
    series: dict[tuple, Series] = {}
    for r in records:
        defense = labels[defense_key(r)]
        facet = (str(r.get("task", "")), f"robust {r.get('metric', 'metric')}", str(r["norm"]))
        lo, hi = r.get("robust_ci95_low"), r.get("robust_ci95_high")
        _put(series, (facet, r["victim"], defense), r["victim"], defense, facet, float(r["eps"]),
             str(r.get("eps_display") or eps_display(float(r["eps"]), r["norm"])), float(r["robust"]),
             None if lo is None or lo != lo else float(lo), None if hi is None or hi != hi else float(hi),
             None if r.get("clean") is None or r["clean"] != r["clean"] else float(r["clean"]))
    return list(series.values())


def robustness_figure(series: Sequence[Series], title: str | None = None,
                      styles: dict[str, Style] | None = None) -> "Figure | None":
    """Robust metric (or detection score) vs eps: one panel per task × metric × norm, one series per victim ×
    defence (colour and marker per victim, line style per defence), CI bands, legends outside the panels."""
    if not series:
        return None
    plt = _pyplot()
    facets = sorted({s.facet for s in series}, key=lambda f: (f[2], f[0], f[1]))
    styles = styles or victim_styles(s.victim for s in series)
    by_facet = {f: sorted((s for s in series if s.facet == f), key=lambda s: (s.victim, s.defense)) for f in facets}
    ncols = 1 if len(facets) == 1 else 2
    nrows = math.ceil(len(facets) / ncols)
    longest = max(min(len(s.label), LABEL_WIDTH) for s in series)
    width = ncols * (4.6 + 0.075 * longest + 0.6)
    need = [_facet_height(by_facet[f]) for f in facets] + [0.0] * (nrows * ncols - len(facets))
    heights = [max(need[i * ncols:(i + 1) * ncols]) for i in range(nrows)]
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, sum(heights) + (0.4 if title else 0)), squeeze=False,
                             layout="constrained", gridspec_kw={"height_ratios": heights})
    for ax, f in zip(axes.flat, facets):
        if _single_budget(by_facet[f]):
            _draw_dots(ax, f, by_facet[f], styles)
        else:
            _draw_facet(ax, f, by_facet[f], styles)
    for ax in list(axes.flat)[len(facets):]:
        fig.delaxes(ax)  # unused grid cell
    if title:
        fig.suptitle(title)
    return fig


def _single_budget(series: list[Series]) -> bool:
    """Whether every series of a panel has one budget (drawn as a dot plot: no eps axis to draw lines along)."""
    return all(len(s.points) == 1 for s in series)


def _facet_height(series: list[Series]) -> float:
    """Inches a panel needs: its legend (line panels) or its labelled rows (dot panels)."""
    if _single_budget(series):
        return max(2.4, 0.19 * sum(wrap_label(_dot_label(s, series), 48, 3).count("\n") + 1 for s in series) + 1.4)
    return max(3.4, 0.17 * sum(_label_lines(s.label) for s in series) + 1.0)


def _dot_label(s: Series, series: list[Series]) -> str:
    """A dot-plot row label; with the budget when the panel's rows have different budgets."""
    if len({e for x in series for e in x.points}) > 1:
        return f"{s.label} @ {next(iter(s.display.values()))}"
    return s.label


def _draw_dots(ax, facet: tuple[str, str, str], series: list[Series], styles: dict[str, Style]) -> None:
    """One panel of single-budget series: a row per series, its score under attack (filled, 95% CI) and clean
    (hollow)."""
    task, metric, norm = facet
    for victim in sorted({s.victim for s in series}):
        st = styles[victim]
        rows = [(y, s, next(iter(s.points.values()))) for y, s in enumerate(series) if s.victim == victim]
        robust = [(y, v, None if lo is None or hi is None else (lo, hi)) for y, _, (v, lo, hi) in rows]
        _interval_dots(ax, robust, color=st.color, marker=st.marker, markersize=5, linewidth=1.2)
        clean = [(y, s.clean, None) for y, s, _ in rows if s.clean is not None]
        _interval_dots(ax, clean, color=st.color, marker=st.marker, markerfacecolor="none", markersize=5)
    ax.set_yticks(range(len(series)), [wrap_label(_dot_label(s, series), 48, 3) for s in series], fontsize=7)
    ax.set_ylim(len(series) - 0.5, -0.5)
    ax.set_xlim(-0.02, 1.02)
    ax.grid(alpha=0.3, axis="x")
    if "AUROC" in metric:
        ax.axvline(0.5, color="#777777", linewidth=0.8, linestyle=(0, (4, 4)), zorder=0)
    budgets = sorted({d for s in series for d in s.display.values()})
    where = f"{norm} {budgets[0]}" if len(budgets) == 1 else norm
    ax.set_title(wrap_label(f"{task}: {metric} at {where}", 60), fontsize=10)
    ax.set_xlabel(wrap_label(f"{metric}: filled = under attack (95% CI), hollow = clean", 60), fontsize=8)


def _label_lines(label: str) -> int:
    return wrap_label(label).count("\n") + 1


def _draw_facet(ax, facet: tuple[str, str, str], series: list[Series], styles: dict[str, Style]) -> None:
    """One panel: eps on an ordinal axis (0 = clean), one line or marker set per series."""
    task, metric, norm = facet
    eps_all = sorted({e for s in series for e in s.points} | ({0.0} if any(s.clean is not None for s in series) else set()))
    pos = {e: i for i, e in enumerate(eps_all)}
    shown = {e: d for s in series for e, d in s.display.items()}
    per_victim: dict[str, list[str]] = {}
    for s in series:
        per_victim.setdefault(s.victim, []).append(s.defense)
    for s in series:
        defs = per_victim[s.victim]
        i = defs.index(s.defense)
        style = styles[s.victim]
        if len(defs) > len(DEFENSE_LINESTYLES):  # many defences of one victim: a marker per defence as well
            style = Style(style.color, MARKERS[i % len(MARKERS)])
        _draw_series(ax, s, pos, style, DEFENSE_LINESTYLES[i % len(DEFENSE_LINESTYLES)])
    if "AUROC" in metric:
        ax.axhline(0.5, color="#777777", linewidth=0.8, linestyle=(0, (4, 4)), zorder=0)
        ax.annotate("chance", (1.0, 0.5), xycoords=("axes fraction", "data"), xytext=(-2, 2), textcoords="offset points",
                    ha="right", va="bottom", fontsize=7, color="#777777")
    ax.set_xticks(range(len(eps_all)), [("0\n(clean)" if e == 0 else shown.get(e, f"{e:g}")) for e in eps_all],
                  rotation=30 if len(eps_all) > 6 else 0, fontsize=8)
    ax.set_xlim(-0.3, len(eps_all) - 0.7)
    ax.set_xlabel("corruption severity" if norm == "corruption" else f"eps ({norm}); ordinal spacing", fontsize=9)
    ax.set_ylabel(metric, fontsize=9)
    ax.set_ylim(-0.03, 1.03)
    ax.set_title(wrap_label(f"{task}: {metric} vs {'severity' if norm == 'corruption' else norm + ' eps'}", 60), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=False)


def _draw_series(ax, s: Series, pos: dict[float, int], style: Style, ls: str) -> None:
    """A line through clean (eps 0) and the adversarial points when there are two budgets or more, with a CI band;
    markers and error bars otherwise."""
    eps = sorted(s.points)
    ys = [s.points[e][0] for e in eps]
    lo = [s.points[e][1] for e in eps]
    hi = [s.points[e][2] for e in eps]
    label = wrap_label(s.label)
    kw = dict(color=style.color, marker=style.marker, markersize=5)
    if len(eps) >= 2:
        xs = ([pos[0.0]] if s.clean is not None else []) + [pos[e] for e in eps]
        ax.plot(xs, ([s.clean] if s.clean is not None else []) + ys, linestyle=ls, linewidth=1.4, label=label, **kw)
        if all(v is not None for v in lo + hi):
            ax.fill_between([pos[e] for e in eps], lo, hi, color=style.color, alpha=0.15, linewidth=0)
    else:
        err = None
        if lo[0] is not None and hi[0] is not None:
            err = [[max(0.0, ys[0] - lo[0])], [max(0.0, hi[0] - ys[0])]]
        ax.errorbar([pos[eps[0]]], ys, yerr=err, linestyle="none", capsize=3, label=label, **kw)
        if s.clean is not None:
            ax.plot([pos[0.0]], [s.clean], linestyle="none", markerfacecolor="none", **kw)


def robustness_vs_eps(entries: Iterable[dict[str, Any]]) -> "Figure | None":
    """Figure of :func:`robustness_figure` for leaderboard entries (victim styles from all of them)."""
    entries = list(entries)
    return robustness_figure(entry_series(entries), styles=victim_styles(e["victim"] for e in entries))


def summary_robustness(df: "pd.DataFrame") -> "Figure | None":
    """Figure of :func:`robustness_figure` for a :func:`robustbench_med.leaderboard.summarize` frame."""
    return robustness_figure(summary_series(df))


# ---------------------------------------------------------------------------------------------------------------
# group gaps with confidence intervals


@dataclass
class Gap:
    """The gap between groups of one headline row for one attribute: robust and clean, with 95% intervals."""

    victim: str
    label: str
    facet: str  # "task: metric"
    attribute: str
    robust: float
    robust_ci: tuple[float, float] | None
    clean: float | None
    clean_ci: tuple[float, float] | None
    threat: str = ""  # "Linf 8/255"
    order: tuple = ()  # sort key of the row: victim, defence, norm, eps

    def row(self, one_threat: bool) -> str:
        """The row label: victim / defence, with the threat model unless the whole panel has one."""
        return self.label if one_threat else f"{self.label} @ {self.threat}"


def entry_gaps(entries: Iterable[dict[str, Any]], n_boot: int = 1000) -> list[Gap]:
    """Group gaps (max − min group mean of the per-sample scores) of every headline row and attribute. The entry's
    ``robust_gap_<metric>[attr]`` with its stored interval is used; a row without it gets both from a stratified
    bootstrap of its per-sample scores (:func:`robustbench_med.fairness.bootstrap_group_stats`)."""
    from robustbench_med.entries import defense_key, headline_rows
    from robustbench_med.results import is_baseline

    entries = list(entries)
    labels = defense_labels(r for e in entries for r in e["results"])
    out = []
    for e in entries:
        m = e["metric"]
        for r in headline_rows(e):
            if r["status"] != "done" or r["robust"] is None or is_baseline(r.get("knowledge"), e["threat"]["norm"]):
                continue  # no robust gap where only a noise baseline ran
            g = r["groups"]
            attrs = sorted({k[len(f"robust_gap_{m}["):-1] for k in g if k.startswith(f"robust_gap_{m}[")}
                           | {k[len("robust_gap_"):] for k in g if k.startswith("robust_gap_") and "[" not in k
                              and not k.startswith(f"robust_gap_{m}")})
            label = f"{e['victim']} / {labels[defense_key(r)]}"
            threat = f"{e['threat']['norm']} {e['threat']['eps_display']}"
            order = (e["victim"], labels[defense_key(r)], e["threat"]["norm"], float(e["threat"]["eps"]))
            for a in attrs:
                gap = _stored_gap(g, m, a) or _bootstrap_gap(e, r, a, n_boot)
                if gap is not None:
                    out.append(Gap(e["victim"], label, f"{e['task']}: {m}", a, *gap, threat=threat, order=order))
    return out


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v else None


def _stored_gap(g: dict[str, Any], m: str, a: str):
    """Robust and clean gap with intervals from an entry row's ``groups`` (None when the interval is not stored)."""
    robust = _num(g.get(f"robust_gap_{m}[{a}]"))
    lo, hi = _num(g.get(f"robust_gap_{m}_ci95_low[{a}]")), _num(g.get(f"robust_gap_{m}_ci95_high[{a}]"))
    if robust is None or lo is None or hi is None:
        return None
    clean = _num(g.get(f"clean_gap_{m}[{a}]"))
    clo, chi = _num(g.get(f"clean_gap_{m}_ci95_low[{a}]")), _num(g.get(f"clean_gap_{m}_ci95_high[{a}]"))
    return robust, (lo, hi), clean, (clo, chi) if clo is not None and chi is not None else None


def _bootstrap_gap(e: dict[str, Any], r: dict[str, Any], a: str, n_boot: int):
    """Robust and clean gap with stratified bootstrap intervals from the row's per-sample scores."""
    from robustbench_med.fairness import bootstrap_group_stats, group_gap

    labels = (e.get("attributes") or {}).get(a)
    if not labels or "*" in a:
        return None
    clean, adv = np.asarray(r["per_sample"]["clean"], float), np.asarray(r["per_sample"]["adv"], float)
    levels, codes = np.unique(np.asarray(labels, dtype=str), return_inverse=True)
    if len(levels) < 2 or len(codes) != len(adv):
        return None
    means = lambda v: [v[codes == i].mean() for i in range(len(levels))]  # noqa: E731
    ci = bootstrap_group_stats(clean, adv, codes, len(levels), n_boot, seed=0)
    return (float(group_gap(means(adv))), ci["robust_gap"], float(group_gap(means(clean))), ci["clean_gap"])


def group_gap_figure(gaps: Sequence[Gap], title: str | None = None,
                     styles: dict[str, Style] | None = None) -> "Figure | None":
    """Robust gap (filled, victim colour) and clean gap (hollow, grey) between groups with 95% intervals: one panel
    per task × metric (rows) and attribute (columns) — one task's attributes stacked —, one line per headline row,
    labels wrapped to fit."""
    if not gaps:
        return None
    plt = _pyplot()
    facets = sorted({g.facet for g in gaps})
    attrs = sorted({g.attribute for g in gaps}, key=lambda a: ("*" in a, a))
    one = {f: len({g.threat for g in gaps if g.facet == f}) == 1 for f in facets}
    rows = {f: [lbl for _, lbl in sorted({(g.order, g.row(one[f])) for g in gaps if g.facet == f})] for f in facets}
    styles = styles or victim_styles(g.victim for g in gaps)
    lines = {f: sum(wrap_label(lbl, 44, 3).count("\n") + 1 for lbl in rows[f]) for f in facets}
    # one task: the attributes stacked (a figure that fits half a page's width); several: task rows × attribute columns
    stacked = len(facets) == 1
    cells = [(f, a) for f in facets for a in attrs]
    heights = [lines[f] + 4 for f, _ in cells] if stacked else [lines[f] + 4 for f in facets]
    height = sum(0.2 * (h - 4) + 1.1 for h in heights) + 0.6
    fig, axes = plt.subplots(len(heights), 1 if stacked else len(attrs), squeeze=False, layout="constrained",
                             figsize=(6.6 if stacked else 3.2 * len(attrs) + 3.4, height), gridspec_kw={"height_ratios": heights})
    top = {f: max(max(g.robust, *(g.robust_ci or ()), *(g.clean_ci or ())) for g in gaps if g.facet == f) for f in facets}
    for k, (f, a) in enumerate(cells):
        i, j = (k, 0) if stacked else divmod(k, len(attrs))
        ax = axes[i][j]
        _draw_gaps(ax, rows[f], {g.row(one[f]): g for g in gaps if g.facet == f and g.attribute == a}, styles, j == 0)
        ax.set_xlim(-0.02 * max(0.05, top[f]), max(0.05, 1.05 * top[f]))  # a gap of 0 stays visible
        at = f" at {next(g.threat for g in gaps if g.facet == f)}" if one[f] else ""
        ax.set_title(wrap_label(f"{f}{at}\ngap by {a}", 40 if not stacked else 70), fontsize=9)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color="#333333", marker="o", linestyle="none", label="robust gap (95% CI)"),
               Line2D([], [], color="#999999", marker="o", markerfacecolor="none", linestyle="none", label="clean gap (95% CI)")]
    fig.legend(handles=handles, loc="outside lower center", ncols=2, fontsize=8, frameon=False)
    if title:
        fig.suptitle(title)
    return fig


def _draw_gaps(ax, labels: list[str], gaps: dict[str, Gap], styles: dict[str, Style], ticks: bool) -> None:
    """One dot-and-interval panel: a row per label (top to bottom), one errorbar call per victim and kind."""
    rows = [(y, gaps[lbl]) for y, lbl in enumerate(labels) if lbl in gaps]
    for victim in sorted({g.victim for _, g in rows}):
        mine = [(y, g) for y, g in rows if g.victim == victim]
        st = styles[victim]
        clean = [(y + 0.18, g.clean, g.clean_ci) for y, g in mine if g.clean is not None]
        robust = [(y - 0.12, g.robust, g.robust_ci) for y, g in mine]
        _interval_dots(ax, clean, color="#999999", marker=st.marker, markerfacecolor="none", markersize=4, linewidth=0.8)
        _interval_dots(ax, robust, color=st.color, marker=st.marker, markersize=5, linewidth=1.2)
    ax.set_yticks(range(len(labels)), [wrap_label(lbl, 44, 3) for lbl in labels] if ticks else [""] * len(labels), fontsize=7)
    ax.set_ylim(len(labels) - 0.5, -0.5)
    ax.set_xlabel("max − min group mean", fontsize=8)
    ax.grid(alpha=0.3, axis="x")


def _interval_dots(ax, points: list[tuple[float, float, tuple[float, float] | None]], **kw: Any) -> None:
    """Horizontal dots (y, x, 95% interval or None): those with an interval as one errorbar call, the rest as dots."""
    with_ci = [p for p in points if p[2] is not None]
    if with_ci:
        ys, xs, cis = zip(*with_ci)
        err = [[max(0.0, x - c[0]) for x, c in zip(xs, cis)], [max(0.0, c[1] - x) for x, c in zip(xs, cis)]]
        ax.errorbar(xs, ys, xerr=err, linestyle="none", capsize=2, **kw)
    bare = [p for p in points if p[2] is None]
    if bare:
        ax.plot([p[1] for p in bare], [p[0] for p in bare], linestyle="none", **{k: v for k, v in kw.items() if k != "linewidth"})


def group_gaps(entries: Iterable[dict[str, Any]]) -> "Figure | None":
    """Figure of :func:`group_gap_figure` for leaderboard entries (victim styles from all of them)."""
    entries = list(entries)
    return group_gap_figure(entry_gaps(entries), styles=victim_styles(e["victim"] for e in entries))


# ---------------------------------------------------------------------------------------------------------------
# per-group metric vs eps (from a group table of the store)


def group_sweep(df: "pd.DataFrame", attribute: str = "sex") -> "Figure | None":
    """Per-group metric vs eps (eps 0 = clean), one panel per victim × defence × attack, one series per group.

    ``df`` is a :func:`robustbench_med.fairness.group_table` with cell metadata; ``None`` when there is nothing to plot.
    """
    from robustbench_med.threat import eps_display

    data = df[df.attribute == attribute] if len(df) and "attribute" in df else df
    if data is None or data.empty or "eps" not in data:
        return None
    plt = _pyplot()
    panels = list(data.groupby(["victim", "defense", "attack"], sort=True))
    levels = sorted({str(v) for v in data.group})
    colors = {lv: GROUP_COLORS[i % len(GROUP_COLORS)] for i, lv in enumerate(levels)}
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.2 * rows + 0.5), squeeze=False, layout="constrained")
    for ax, ((victim, defense, attack), p) in zip(axes.flat, panels):
        eps_all = sorted({0.0} | {float(e) for e in p.eps})
        pos = {e: i for i, e in enumerate(eps_all)}
        for level, s in p.groupby("group"):
            s = s.sort_values("eps")
            clean = float(np.average(s.clean, weights=s.n))
            xs = [pos[0.0]] + [pos[float(e)] for e in s.eps]
            style = "-" if len(s) >= 2 else "none"
            ax.plot(xs, [clean] + list(s.robust), marker="o", linestyle=style, color=colors[str(level)], markersize=4)
        ax.set_xticks(range(len(eps_all)), ["0" if e == 0 else eps_display(e) for e in eps_all], fontsize=7,
                      rotation=30 if len(eps_all) > 5 else 0)
        ax.set_title(wrap_label(f"{victim} / {defense} / {attack}", 40, 3), fontsize=8)
        ax.set_xlabel("eps (ordinal; 0 = clean)", fontsize=8)
        ax.set_ylabel(str(p.metric.iloc[0]) if "metric" in p else "metric", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        fig.delaxes(ax)  # unused grid cell
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colors[lv], marker="o", label=f"{attribute}={lv}") for lv in levels]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(6, len(handles)), fontsize=8, frameon=False)
    return fig


# ---------------------------------------------------------------------------------------------------------------
# per-sample score histograms


def score_histograms(entries: Iterable[dict[str, Any]], max_panels: int = 12, bins: int = 20) -> "Figure | None":
    """Histograms of the per-sample clean and adversarial scores: one panel per victim × defence at its largest
    budget (its headline row; Linf before other norms). Panels take turns over the tasks (so every task shows),
    at most ``max_panels`` (the title says how many were left out). Noise baselines are left out."""
    from robustbench_med.entries import defense_key, headline_rows
    from robustbench_med.results import is_baseline

    entries = list(entries)
    labels = defense_labels(r for e in entries for r in e["results"])
    best: dict[tuple, tuple[dict[str, Any], dict[str, Any]]] = {}
    for e in entries:
        rank = (e["threat"]["norm"] == "Linf", float(e["threat"]["eps"]))
        for r in headline_rows(e):
            if r["status"] != "done" or not r.get("per_sample") or is_baseline(r.get("knowledge"), e["threat"]["norm"]):
                continue  # a noise baseline is no adversarial score
            key = (e["task"], e["metric"], e["victim"], labels[defense_key(r)])
            if key not in best or rank > (best[key][0]["threat"]["norm"] == "Linf", float(best[key][0]["threat"]["eps"])):
                best[key] = (e, r)
    if not best:
        return None
    plt = _pyplot()
    keys = _round_robin(sorted(best))
    shown = keys[:max_panels]
    cols = min(4, len(shown))
    rows = math.ceil(len(shown) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.9 * rows + 0.6), squeeze=False, layout="constrained")
    styles = victim_styles(e["victim"] for e in entries)
    edges = np.linspace(0.0, 1.0, bins + 1)
    for ax, key in zip(axes.flat, shown):
        e, r = best[key]
        ax.hist(np.clip(r["per_sample"]["clean"], 0, 1), bins=edges, histtype="step", color="#555555", linewidth=1.4)
        ax.hist(np.clip(r["per_sample"]["adv"], 0, 1), bins=edges, histtype="stepfilled", color=styles[key[2]].color, alpha=0.45)
        ax.set_title(wrap_label(f"{key[2]} / {key[3]} @ {e['threat']['norm']} {e['threat']['eps_display']}", 40, 3), fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_xlabel(f"per-sample {e['metric']}", fontsize=8)
        ax.set_ylabel("samples", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(shown):]:
        fig.delaxes(ax)  # unused grid cell
    from matplotlib.patches import Patch

    handles = [Patch(facecolor="none", edgecolor="#555555", label="clean"), Patch(facecolor="#999999", alpha=0.45, label="adversarial")]
    fig.legend(handles=handles, loc="outside lower center", ncols=2, fontsize=8, frameon=False)
    if len(keys) > len(shown):
        fig.suptitle(f"per-sample scores: {len(shown)} of {len(keys)} victim × defence, taking turns over the tasks", fontsize=9)
    return fig


def _round_robin(keys: list[tuple]) -> list[tuple]:
    """``keys`` (task first) reordered to take turns over the tasks: t1[0], t2[0], …, t1[1], t2[1], …"""
    by_task: dict[str, list[tuple]] = {}
    for k in keys:
        by_task.setdefault(k[0], []).append(k)
    queues = list(by_task.values())
    return [q[i] for i in range(max(map(len, queues))) for q in queues if i < len(q)]


# ---------------------------------------------------------------------------------------------------------------
# example grids


def _as_images(x: Any, name: str) -> np.ndarray:
    """``x`` (a tensor or array [N, C, H, W], or volumes [N, C, D, H, W]: the middle slice) as float [N, C, H, W]."""
    arr = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
    arr = arr.astype(np.float64)
    if arr.ndim == 5:
        arr = arr[:, :, arr.shape[2] // 2]
    if arr.ndim != 4:
        raise ConfigError(f"example_grid: {name} must be [N, C, H, W] (or [N, C, D, H, W]), got shape {tuple(arr.shape)}")
    return arr


def _show(ax, img: np.ndarray, cmap: str = "gray") -> None:
    """One [C, H, W] image: grey for one channel, RGB for three, the first channel otherwise."""
    if img.shape[0] == 3:
        ax.imshow(np.clip(img.transpose(1, 2, 0), 0, 1))
    else:
        ax.imshow(np.clip(img[0], 0, 1), cmap=cmap, vmin=0, vmax=1)
    ax.set_xticks([])
    ax.set_yticks([])


def example_grid(clean: Any, adv: Any, titles: Sequence[str] | None = None, amplify: float | None = None) -> "Figure":
    """Clean inputs (row 1), adversarial inputs (row 2) and the perturbation ``|adv − clean|`` amplified (row 3).

    Args:
        clean, adv: images [N, C, H, W] in [0, 1] (tensors or arrays; volumes: their middle slice).
        titles: one title per column (e.g. the score before → after the attack).
        amplify: factor on ``|δ|``; default ``1 / max |δ|`` (the largest change shows white). The row label says it.
    """
    c, a = _as_images(clean, "clean"), _as_images(adv, "adv")
    if c.shape != a.shape:
        raise ConfigError(f"example_grid: clean {c.shape} and adv {a.shape} differ in shape")
    if titles is not None and len(titles) != len(c):
        raise ConfigError(f"example_grid: {len(titles)} titles for {len(c)} images")
    delta = np.abs(a - c)
    peak = float(delta.max())
    if amplify is None:
        amplify = 1.0 / peak if peak > 0 else 1.0
    if not amplify > 0:
        raise ConfigError(f"example_grid: amplify must be > 0, got {amplify}")
    plt = _pyplot()
    n = len(c)
    fig, axes = plt.subplots(3, n, figsize=(1.9 * n + 0.9, 6.2), squeeze=False, layout="constrained")
    for i in range(n):
        _show(axes[0][i], c[i])
        _show(axes[1][i], a[i])
        _show(axes[2][i], np.clip(delta[i] * amplify, 0, 1).mean(0, keepdims=True), cmap="magma")
        if titles is not None:
            axes[0][i].set_title(wrap_label(titles[i], 22, 3), fontsize=7)
    for row, text in enumerate(("clean", "adversarial", f"|δ| × {amplify:.3g}\n(max |δ| = {peak:.3g})")):
        axes[row][0].set_ylabel(text, fontsize=8)
    return fig


def attack_examples(victim: str, attack: str, dataset: str = "phantom.ct", n: int = 4, *, weights: Any = "auto",
                    split: str = "test", target_field: str | None = None, seed: int = 0, **attack_params: Any
                    ) -> tuple[Any, Any, list[str]]:
    """Clean and adversarial inputs of the first ``n`` samples of ``dataset`` for ``victim`` under ``attack`` (built
    with ``create_victim`` / ``create_attack`` / ``create_dataset``; ``weights=None`` keeps a random initialisation,
    nothing is trained) and titles with the primary score before → after. Feed them to :func:`example_grid`."""
    import torch

    from robustbench_med.api import create_attack, create_dataset, create_victim
    from robustbench_med.registry import VICTIMS
    from robustbench_med.runner import evaluate_batch

    v = create_victim(victim, weights=weights, progress=False)
    field_name = target_field or getattr(VICTIMS.get(victim).meta.get("recipe"), "target_field", None) \
        or v.card.extra.get("target_field")
    if not field_name:
        raise ConfigError(f"attack_examples: victim {victim!r} names no target field; pass target_field=")
    ds = create_dataset(dataset, split=split, n=n)
    x, y = ds.images(), ds.targets(field_name)
    torch.manual_seed(seed)
    adv = create_attack(attack, **attack_params)(v, x, y).detach()
    before, _ = evaluate_batch(v, x, y)
    after, _ = evaluate_batch(v, adv, y)
    metric = next(iter(before))
    titles = [f"#{i} {metric}\n{float(before[metric][i]):.2f} → {float(after[metric][i]):.2f}" for i in range(len(x))]
    return x, adv, titles
