"""Leaderboards rendered from validated entries: Markdown, LaTeX, CSV and a self-contained static HTML page.

RobustBench renders its leaderboard with a Jinja2 template and the model zoo's JSON files (Croce et al., NeurIPS
2021 Datasets and Benchmarks; ``shared/reference/anchors.md`` §1). Here everything is rendered from the entries of
:mod:`robustbench_med.entries`. The HTML page has no external JS, CSS, fonts or CDN: its one script and one style sheet
are inline and pinned by a Content-Security-Policy hash (so even an injected inline handler would not run), its
plots (robust metric vs eps, robust group gaps, per dataset × task) are embedded PNG data URIs, and every model name
and text is HTML-escaped. The page itself is built in :mod:`robustbench_med.html_page`; its cells come from here.
"""
from __future__ import annotations

import csv
import html
import io
import json
import re
from pathlib import Path
from typing import Any, Iterable

from robustbench_med import plots
from robustbench_med.columns import (
    COLUMNS, CSV_ORDER, GROUPS_AFTER, Column, csv_columns, for_rows, group_columns, interval,
)
from robustbench_med.entries import defense_label, headline_rows, is_worst_case

RELIABILITY_NOTE = ("flags: masked_gradients = zero input gradients on the attacked model; randomized = outputs vary "
                    "between passes (attacked with EOT); black_box_beats_white_box = a black-box, transfer or noise attack did "
                    "better than a white-box one (gradient masking); invalid_budget = the attack broke its budget")


# ---------------------------------------------------------------------------------------------------------------
# flat rows shared by every format


def flat_rows(entries: Iterable[dict[str, Any]], headline_only: bool = True) -> list[dict[str, Any]]:
    """One display row per entry × defence (headline) or per entry × result row (all attacks)."""
    rows = []
    for e in entries:
        heads = {id(r) for r in headline_rows(e)}
        for r in e["results"]:
            if r["status"] == "skipped" or (headline_only and id(r) not in heads):
                continue
            rows.append(_flat(e, r, id(r) in heads))
    return sorted(rows, key=lambda r: (r["dataset"], r["norm"], r["eps"], r["task"],
                                       -(r["robust"] if r["robust"] is not None else -1), r["model"]))


def _flat(e: dict[str, Any], r: dict[str, Any], headline: bool) -> dict[str, Any]:
    """The display fields of one result row of an entry."""
    ci = r.get("robust_ci95") or [None, None]
    return {
        "dataset": e["dataset"], "threat": e["threat"]["key"], "threat_label": f"{e['threat']['norm']} {e['threat']['eps_display']}",
        "norm": e["threat"]["norm"], "eps": e["threat"]["eps"], "eps_display": e["threat"]["eps_display"],
        "victim": e["victim"], "model": e.get("display_name") or e["victim"], "link": e.get("link"), "grid": e["grid"],
        "task": e["task"], "metric": e["metric"], "defense": defense_label(r), "defense_name": r["defense"],
        "defense_params": r["defense_params"], "attack_through": r["attack_through"], "attack": _attack_label(r),
        "attack_params": r["attack_params"], "view": "headline" if headline else "attack", "status": r["status"],
        "clean": r["clean"], "robust": r["robust"], "ci_low": ci[0], "ci_high": ci[1], "asr": r["attack_success_rate"],
        "mean_linf": r["mean_linf"], "mean_l2": r["mean_l2"], "n": r["n"], "flags": list(r["flags"]),
        "external": (e["external"] or {}).get("robust"), "weights_sha256": e["weights_sha256"], "groups": r["groups"],
        "metrics": r.get("metrics") or {},
    }


def _attack_label(r: dict[str, Any]) -> str:
    """Attack name with its parameters other than eps (the threat model shows eps)."""
    if is_worst_case(r):
        return r["attack"]
    params = {k: v for k, v in r["attack_params"].items() if k != "eps"}
    return r["attack"] + (f" ({', '.join(f'{k}={v}' for k, v in sorted(params.items()))})" if params else "")


def display_group_columns(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(key, heading) of the fairness-under-attack columns shown in tables (:func:`robustbench_med.columns.group_columns`:
    per attribute, worst-group robust metric, robust gap, gap change from clean to attacked — Δgap > 0: the attack
    widens the gap — and, for segmentation, the robust ES-Dice in both published forms)."""
    return [(c.key, c.heading) for c in group_columns(rows)]


METRIC_COLUMNS = [(c.key, c.heading) for c in COLUMNS if c.source == "metrics"]  # shim, kept for one release


def display_metric_columns(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(key, heading) of the per-attack metrics some rows carry (the registry's ``metrics`` columns: detector AUROC and
    TPR at 90% TNR for cells behind a detector, VQA accuracy on the attacked and on the other questions)."""
    return [(c.key, c.heading) for c in for_rows(rows, "html") if c.source == "metrics"]


def _metric_cell(r: dict[str, Any], key: str) -> str:
    """A per-attack metric as its registered column shows it (``0.042 (overshoot)`` for a one-sided detector AUROC
    significantly below 0.5)."""
    return _metric_column(key).cell(r)


def _metric_column(key: str) -> Column:
    """The registered per-attack metric column ``key`` (a plain number column when not registered)."""
    return next((c for c in COLUMNS if c.source == "metrics" and c.key == key), Column(key, key, source="metrics"))


def _ci(r: dict[str, Any]) -> str:
    return interval(r)


def _sections(rows: list[dict[str, Any]]) -> dict[tuple[str, str, str], list[dict[str, Any]]]:
    """Rows grouped by dataset × threat model × task (scores are only comparable within one)."""
    out: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault((r["dataset"], r["threat_label"], f"{r['task']} ({r['metric']})"), []).append(r)
    return out


HEAD = ["model", "defence", "attack", "clean", "robust", "95% CI", "ASR"]  # shim, kept for one release (columns.COLUMNS)
TAIL = ["external", "flags", "n"]  # shim, kept for one release (columns.COLUMNS)


# ---------------------------------------------------------------------------------------------------------------
# Markdown and LaTeX


def md_escape(text: str) -> str:
    """Text safe in a GitHub Markdown table cell: no HTML, no pipes, no emphasis or link syntax, one line."""
    text = html.escape(str(text), quote=False).replace("\n", " ").replace("\r", " ")
    return re.sub(r"([\\|`*_\[\]])", r"\\\1", text)


def markdown_table(columns: list[Column], rows: Iterable[dict[str, Any]]) -> list[str]:
    """The lines of one GitHub Markdown table: headings and cells of ``columns`` (escaped with :func:`md_escape`)."""
    lines = ["| " + " | ".join(md_escape(c.heading) for c in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    return lines + ["| " + " | ".join(md_escape(c.cell(r)) for c in columns) + " |" for r in rows]


def to_markdown(entries: list[dict[str, Any]]) -> str:
    """A Markdown leaderboard: one table per dataset × threat model × task, ranked by headline robust metric."""
    rows = flat_rows(entries)
    lines = ["# robustbench_med leaderboard", "",
             f"{len(entries)} entries. Scores are fractions in [0, 1]. *robust* is the worst case over the attacks run at "
             "the budget (per defence); *95% CI* is a Wilson interval (0/1 scores) or a percentile bootstrap; *ASR* is the "
             "attack success rate among samples correct on clean input.", "", md_escape(RELIABILITY_NOTE), ""]
    every = _sections(flat_rows(entries, headline_only=False))
    for key, sec in _sections(rows).items():
        dataset, threat, task = key
        ranked = [{**r, "rank": i} for i, r in enumerate(sec, 1)]
        lines += [f"## {md_escape(dataset)} · {md_escape(threat)} · {md_escape(task)}", ""]
        lines += markdown_table(for_rows(ranked, "markdown"), ranked)
        lines += [""] + _metric_table(every.get(key, []))
    return "\n".join(lines)


def _metric_table(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown lines of a per-attack table (the registry's ``per_attack`` columns; none when no row has a per-attack
    metric): every attack, not only the headline, since detection and per-question accuracy are per attack."""
    columns = for_rows(rows, "per_attack")
    if not any(c.source == "metrics" for c in columns):
        return []
    every = sorted((r for r in rows if not is_worst_case(r)), key=lambda r: (r["model"], r["defense"], r["attack"]))
    return ["Per attack:", ""] + markdown_table(columns, every) + [""]


_LATEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
          "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "<": r"\textless{}", ">": r"\textgreater{}", "|": r"\textbar{}"}


def latex_escape(text: str) -> str:
    """Text safe in LaTeX (special characters replaced by their text commands)."""
    return "".join(_LATEX.get(ch, ch) for ch in str(text).replace("\n", " "))


def to_latex(entries: list[dict[str, Any]]) -> str:
    """LaTeX tables (booktabs), one per dataset × threat model × task."""
    out = ["% generated by robustbench_med (robustbench-med publish); needs \\usepackage{booktabs}"]
    for (dataset, threat, task), sec in _sections(flat_rows(entries)).items():
        columns = for_rows(sec, "latex")
        out += ["\\begin{table}[t]", "\\centering", "\\small", "\\begin{tabular}{lll" + "r" * (len(columns) - 3) + "}", "\\toprule",
                " & ".join(latex_escape(c.heading) for c in columns) + " \\\\", "\\midrule"]
        out += [" & ".join(latex_escape(c.cell(r)) for c in columns) + " \\\\" for r in sec]
        out += ["\\bottomrule", "\\end{tabular}",
                f"\\caption{{{latex_escape(dataset)}, {latex_escape(threat)}, {latex_escape(task)}: clean and robust metric "
                "(worst case over attacks per defence) with 95\\% CI, attack success rate and robust group metrics.}", "\\end{table}", ""]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------------------
# CSV


CSV_COLUMNS = list(CSV_ORDER)  # shim, kept for one release (columns.CSV_ORDER)


def _csv_safe(value: Any) -> Any:
    """Neutralise spreadsheet formulas in text cells (a leading = + - @ is prefixed with ')."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def to_csv(entries: list[dict[str, Any]]) -> str:
    """Every result row (headline and per-attack) with every group column, one line each
    (:func:`robustbench_med.columns.csv_columns`)."""
    rows = flat_rows(entries, headline_only=False)
    columns = csv_columns(rows)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([c.key for c in columns])
    for r in rows:
        writer.writerow([_csv_safe(_csv_value(c.value(r))) for c in columns])
    return buf.getvalue()


def _csv_value(value: Any) -> Any:
    """A CSV field: objects as sorted JSON, lists joined with ``;``, anything else as is."""
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    if isinstance(value, list):
        return ";".join(map(str, value))
    return value


# ---------------------------------------------------------------------------------------------------------------
# plots (PNG bytes)


def plot_robustness_vs_eps(entries: list[dict[str, Any]]) -> bytes | None:
    """PNG of :func:`robustbench_med.plots.robustness_vs_eps` (shim, kept for one release)."""
    return plots.png_or_none(plots.robustness_vs_eps(entries))


def plot_group_gaps(entries: list[dict[str, Any]]) -> bytes | None:
    """PNG of :func:`robustbench_med.plots.group_gaps` (shim, kept for one release)."""
    return plots.png_or_none(plots.group_gaps(entries))


def plot_score_histograms(entries: list[dict[str, Any]]) -> bytes | None:
    """PNG of :func:`robustbench_med.plots.score_histograms`."""
    return plots.png_or_none(plots.score_histograms(entries))


# ---------------------------------------------------------------------------------------------------------------
# HTML


def _e(text: Any) -> str:
    """Text escaped for HTML content and attribute values (quotes included)."""
    return html.escape(str(text), quote=True)


def _html_columns(groups: list[tuple[str, str]], metrics: list[tuple[str, str]] = ()) -> list[tuple[str, str, str]]:
    """(row key, heading, type) of the HTML table: the registry's ``html`` row columns (:data:`columns.COLUMNS`, in
    order), with the given per-attack metric (``m:<key>``) and group (``g:<key>``) columns in their place."""
    cols: list[tuple[str, str, str]] = []
    for c in COLUMNS:
        if "html" in c.views and c.source == "row":
            cols.append((c.key, c.heading, c.kind))
        if c.key == GROUPS_AFTER:
            cols += [(f"m:{k}", h, "num") for k, h in metrics] + [(f"g:{k}", h, "num") for k, h in groups]
    return cols


def _html_column(key: str) -> Column:
    """The column behind an HTML table key (``m:`` per-attack metric, ``g:`` group value, else a row field)."""
    if key.startswith("m:"):
        return _metric_column(key[2:])
    if key.startswith("g:"):
        return Column(key[2:], key[2:], source="groups")
    return next((c for c in COLUMNS if c.source == "row" and c.key == key), Column(key, key))


def _html_cell(r: dict[str, Any], key: str, typ: str) -> str:
    """One escaped table cell; numeric cells carry their raw value in ``data-value`` for sorting."""
    if key == "model":
        name = _e(r["model"])
        sub = f"<br><small>{_e(r['victim'])}</small>" if r["model"] != r["victim"] else ""
        link = r.get("link")
        body = f'<a href="{_e(link)}" rel="noopener noreferrer">{name}</a>' if link and re.match(r"^https?://", link) else name
        return f'<td data-value="{_e(r["model"])}">{body}{sub}</td>'
    if key == "ci":
        return f'<td class="num" data-value="{_e("" if r["ci_low"] is None else r["ci_low"])}">{_e(_ci(r))}</td>'
    if key == "flags":
        return f'<td class="flag">{_e(", ".join(r["flags"]))}</td>'
    if key == "weights_sha256":
        sha = r["weights_sha256"] or ""
        return f'<td title="{_e(sha)}"><code>{_e(sha[:12])}</code></td>'
    col = _html_column(key)
    value = col.value(r)
    if typ == "num":
        return f'<td class="num" data-value="{_e("" if value is None else value)}">{_e(col.cell(r))}</td>'
    return f"<td>{_e(value if value is not None else '')}</td>"


def to_html(entries: list[dict[str, Any]], title: str = "robustbench_med leaderboard", plots: bool = True) -> str:
    """Shim, kept for one release: the page lives in :func:`robustbench_med.html_page.to_html`."""
    from robustbench_med.html_page import to_html as page

    return page(entries, title=title, plots=plots)


# ---------------------------------------------------------------------------------------------------------------
# all formats at once


def write_rendered(entries: list[dict[str, Any]], out_dir: str | Path) -> dict[str, Path]:
    """Write ``README.md``, ``leaderboard.tex``, ``leaderboard.csv`` and ``index.html`` into ``out_dir`` (atomically)."""
    from robustbench_med.entries import atomic_write_text

    out = Path(out_dir)
    paths = {"markdown": out / "README.md", "latex": out / "leaderboard.tex", "csv": out / "leaderboard.csv", "html": out / "index.html"}
    texts = {"markdown": to_markdown(entries), "latex": to_latex(entries), "csv": to_csv(entries), "html": to_html(entries)}
    for key, path in paths.items():
        atomic_write_text(path, texts[key])
    return paths
