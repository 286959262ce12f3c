"""Leaderboards rendered from validated entries: Markdown, LaTeX, CSV and a self-contained static HTML page.

RobustBench renders its leaderboard with a Jinja2 template and the model zoo's JSON files (Croce et al., NeurIPS
2021 Datasets and Benchmarks; ``shared/reference/anchors.md`` §1). Here everything is rendered from the entries of
:mod:`robustbench_med.entries`. The HTML page has no external JS, CSS, fonts or CDN: its one script and one style sheet
are inline and pinned by a Content-Security-Policy hash (so even an injected inline handler would not run), its
plots (robust metric vs eps, group gaps, per-sample score histograms: :mod:`robustbench_med.plots`) are embedded PNG
data URIs, and every model name and text is HTML-escaped. Columns sort on click; rows filter by task, threat model,
defence and view (headline / all attacks).
"""
from __future__ import annotations

import base64
import csv
import hashlib
import html
import io
import json
import re
from pathlib import Path
from typing import Any, Iterable

from robustbench_med import plots
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
    """(key, heading) of the fairness-under-attack columns shown in tables, per attribute: worst-group robust metric,
    robust gap, gap change from clean to attacked (Δgap > 0: the attack widens the gap) and, for segmentation, the
    robust ES-Dice in both published forms."""
    heading = {"worst_group_robust_": "worst-group robust", "robust_gap_": "robust gap", "gap_change_": "Δgap"}
    es = {"robust_es_dice_fairseg": "ES-Dice FairSeg", "robust_es_dice_fairmedfm": "ES-Dice FairMedFM"}
    found: dict[str, tuple[str, str, int]] = {}
    for r in rows:
        for k, v in r["groups"].items():
            if not isinstance(v, (int, float)):
                continue
            prefix = next((p for p in heading if k.startswith(p)), None)
            if prefix and "[" not in k:
                found[k] = (k[len(prefix):], heading[prefix], list(heading).index(prefix))
            m = re.match(r"^(robust_es_dice_(?:fairseg|fairmedfm))\[([^*\]]+)\]$", k)
            if m:
                found[k] = (m.group(2), es[m.group(1)], 3 + list(es).index(m.group(1)))
    order = sorted(found, key=lambda k: (found[k][0], found[k][2]))
    return [(k, f"{found[k][1]} ({found[k][0]})") for k in order]


METRIC_COLUMNS = [("detector_auroc", "det. AUROC"), ("detector_tpr_at_90tnr", "TPR@90%TNR"),
                  ("detector_auroc_two_sided", "det. AUROC (two-sided)"),
                  ("detector_tpr_at_90tnr_two_sided", "TPR@90%TNR (two-sided)"),
                  ("robust_vqa_accuracy_first", "robust (attacked q)"), ("robust_vqa_accuracy_others", "robust (other q)")]


def display_metric_columns(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(key, heading) of the per-attack metrics some rows carry: detector AUROC and TPR at 90% TNR (cells behind a
    detector), VQA accuracy on the attacked question and on the other questions (LVLM victims)."""
    return [(k, h) for k, h in METRIC_COLUMNS if any(isinstance(r["metrics"].get(k), (int, float)) for r in rows)]


def _f(v: Any) -> str:
    return "–" if v is None else f"{v:.3f}"


def _metric_cell(r: dict[str, Any], key: str) -> str:
    """A per-attack metric; a one-sided detector AUROC significantly below 0.5 reads ``0.042 (overshoot)``."""
    text = _f(r["metrics"].get(key))
    if key == "detector_auroc" and r["metrics"].get("detector_auroc_overshoot") == 1.0:
        text += " (overshoot)"
    return text


def _ci(r: dict[str, Any]) -> str:
    return "–" if r["ci_low"] is None else f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]"


def _sections(rows: list[dict[str, Any]]) -> dict[tuple[str, str, str], list[dict[str, Any]]]:
    """Rows grouped by dataset × threat model × task (scores are only comparable within one)."""
    out: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault((r["dataset"], r["threat_label"], f"{r['task']} ({r['metric']})"), []).append(r)
    return out


def _cells(r: dict[str, Any], groups: list[tuple[str, str]]) -> list[str]:
    """The text cells of one Markdown / LaTeX table row."""
    robust = "INVALID" if r["status"] == "invalid" else _f(r["robust"])
    return ([r["model"], r["defense"], r["attack"], _f(r["clean"]), robust, _ci(r), _f(r["asr"])]
            + [_f(r["groups"].get(k)) for k, _ in groups] + [_f(r["external"]), ", ".join(r["flags"]) or "–", str(r["n"])])


HEAD = ["model", "defence", "attack", "clean", "robust", "95% CI", "ASR"]
TAIL = ["external", "flags", "n"]


# ---------------------------------------------------------------------------------------------------------------
# Markdown and LaTeX


def md_escape(text: str) -> str:
    """Text safe in a GitHub Markdown table cell: no HTML, no pipes, no emphasis or link syntax, one line."""
    text = html.escape(str(text), quote=False).replace("\n", " ").replace("\r", " ")
    return re.sub(r"([\\|`*_\[\]])", r"\\\1", text)


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
        groups = display_group_columns(sec)
        head = ["#"] + HEAD + [h for _, h in groups] + TAIL
        lines += [f"## {md_escape(dataset)} · {md_escape(threat)} · {md_escape(task)}", "",
                  "| " + " | ".join(md_escape(h) for h in head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        for i, r in enumerate(sec, 1):
            lines.append("| " + " | ".join([str(i)] + [md_escape(c) for c in _cells(r, groups)]) + " |")
        lines += [""] + _metric_table(every.get(key, []))
    return "\n".join(lines)


def _metric_table(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown lines of a per-attack table with the metrics of :func:`display_metric_columns` (none if no row has
    them): every attack, not only the headline, since detection and per-question accuracy are per attack."""
    metrics = display_metric_columns(rows)
    if not metrics:
        return []
    head = ["model", "defence", "attack", "clean", "robust", "ASR"] + [h for _, h in metrics] + ["n"]
    lines = ["Per attack:", "", "| " + " | ".join(md_escape(h) for h in head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in sorted((r for r in rows if not r["attack"].startswith("worst-case")), key=lambda r: (r["model"], r["defense"], r["attack"])):
        cells = [r["model"], r["defense"], r["attack"], _f(r["clean"]), _f(r["robust"]), _f(r["asr"])]
        cells += [_metric_cell(r, k) for k, _ in metrics] + [str(r["n"])]
        lines.append("| " + " | ".join(md_escape(c) for c in cells) + " |")
    return lines + [""]


_LATEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
          "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "<": r"\textless{}", ">": r"\textgreater{}", "|": r"\textbar{}"}


def latex_escape(text: str) -> str:
    """Text safe in LaTeX (special characters replaced by their text commands)."""
    return "".join(_LATEX.get(ch, ch) for ch in str(text).replace("\n", " "))


def to_latex(entries: list[dict[str, Any]]) -> str:
    """LaTeX tables (booktabs), one per dataset × threat model × task."""
    out = ["% generated by robustbench_med (robustbench-med publish); needs \\usepackage{booktabs}"]
    for (dataset, threat, task), sec in _sections(flat_rows(entries)).items():
        groups = display_group_columns(sec)
        head = HEAD + [h for _, h in groups] + TAIL
        out += ["\\begin{table}[t]", "\\centering", "\\small", "\\begin{tabular}{lll" + "r" * (len(head) - 3) + "}", "\\toprule",
                " & ".join(latex_escape(h) for h in head) + " \\\\", "\\midrule"]
        out += [" & ".join(latex_escape(c) for c in _cells(r, groups)) + " \\\\" for r in sec]
        out += ["\\bottomrule", "\\end{tabular}",
                f"\\caption{{{latex_escape(dataset)}, {latex_escape(threat)}, {latex_escape(task)}: clean and robust metric "
                "(worst case over attacks per defence) with 95\\% CI, attack success rate and robust group metrics.}", "\\end{table}", ""]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------------------
# CSV


CSV_COLUMNS = ["dataset", "threat", "norm", "eps", "eps_display", "victim", "model", "grid", "task", "metric", "defense",
               "defense_name", "defense_params", "attack_through", "attack", "attack_params", "view", "status", "clean",
               "robust", "ci_low", "ci_high", "asr", "mean_linf", "mean_l2", "n", "external", "flags", "weights_sha256"]


def _csv_safe(value: Any) -> Any:
    """Neutralise spreadsheet formulas in text cells (a leading = + - @ is prefixed with ')."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def to_csv(entries: list[dict[str, Any]]) -> str:
    """Every result row (headline and per-attack) with every group column, one line each."""
    rows = flat_rows(entries, headline_only=False)
    group_keys = sorted({k for r in rows for k in r["groups"]})
    metric_keys = sorted({k for r in rows for k, v in r["metrics"].items() if isinstance(v, (int, float, str))})
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS + group_keys + metric_keys)
    for r in rows:
        values = {**r, "defense_params": json.dumps(r["defense_params"], sort_keys=True),
                  "attack_params": json.dumps(r["attack_params"], sort_keys=True), "flags": ";".join(r["flags"])}
        writer.writerow([_csv_safe(values[c]) for c in CSV_COLUMNS] + [_csv_safe(r["groups"].get(k)) for k in group_keys]
                        + [_csv_safe(r["metrics"].get(k)) for k in metric_keys])
    return buf.getvalue()


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


_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border-bottom: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
th button { font: inherit; font-weight: 600; background: none; border: none; cursor: pointer; padding: 0; }
th[aria-sort="ascending"] button::after { content: " \\25B2"; }
th[aria-sort="descending"] button::after { content: " \\25BC"; }
.flag { color: #a00; }
#filters label { margin-right: 1em; }
img.plot { max-width: 100%; border: 1px solid #eee; }
"""

_SCRIPT = """
(function () {
  "use strict";
  var table = document.getElementById("leaderboard");
  var tbody = table.tBodies[0];
  var heads = Array.prototype.slice.call(table.tHead.rows[0].cells);
  var selects = Array.prototype.slice.call(document.querySelectorAll("select[data-filter]"));
  var count = document.getElementById("row-count");
  var state = { col: -1, dir: 1 };
  Array.prototype.forEach.call(tbody.rows, function (row, i) { row.setAttribute("data-order", String(i)); });
  function key(row, col, numeric) {
    var cell = row.cells[col];
    var raw = cell.hasAttribute("data-value") ? cell.getAttribute("data-value") : cell.textContent;
    if (!numeric) { return raw.toLowerCase(); }
    var v = parseFloat(raw);
    return isNaN(v) ? null : v;
  }
  function sortBy(col) {
    var numeric = heads[col].getAttribute("data-type") === "num";
    state.dir = state.col === col ? -state.dir : 1;
    state.col = col;
    var rows = Array.prototype.slice.call(tbody.rows);
    rows.sort(function (a, b) {
      var x = key(a, col, numeric), y = key(b, col, numeric);
      if (x === null || y === null) {
        if (x === null && y === null) { return a.getAttribute("data-order") - b.getAttribute("data-order"); }
        return x === null ? 1 : -1;
      }
      if (x < y) { return -state.dir; }
      if (x > y) { return state.dir; }
      return a.getAttribute("data-order") - b.getAttribute("data-order");
    });
    rows.forEach(function (row) { tbody.appendChild(row); });
    heads.forEach(function (th, i) {
      th.setAttribute("aria-sort", i === col ? (state.dir > 0 ? "ascending" : "descending") : "none");
    });
  }
  function applyFilters() {
    var shown = 0;
    Array.prototype.forEach.call(tbody.rows, function (row) {
      var keep = selects.every(function (s) {
        var tokens = (row.getAttribute("data-" + s.getAttribute("data-filter")) || "").split(" ");
        return !s.value || tokens.indexOf(s.value) >= 0;
      });
      row.hidden = !keep;
      if (keep) { shown += 1; }
    });
    count.textContent = String(shown);
  }
  heads.forEach(function (th, i) {
    var button = th.querySelector("button");
    if (button) { button.addEventListener("click", function () { sortBy(i); }); }
  });
  selects.forEach(function (s) { s.addEventListener("change", applyFilters); });
  applyFilters();
}());
"""


def _csp_hash(text: str) -> str:
    """A Content-Security-Policy source expression pinning an inline script or style by its sha256."""
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _html_columns(groups: list[tuple[str, str]], metrics: list[tuple[str, str]] = ()) -> list[tuple[str, str, str]]:
    """(row key, heading, type) of the HTML table."""
    cols = [("model", "model", "text"), ("task", "task", "text"), ("threat_label", "threat", "text"),
            ("defense", "defence", "text"), ("attack", "attack", "text"), ("clean", "clean", "num"),
            ("robust", "robust", "num"), ("ci", "95% CI", "num"), ("asr", "ASR", "num")]
    cols += [(f"m:{k}", h, "num") for k, h in metrics]
    cols += [(f"g:{k}", h, "num") for k, h in groups]
    return cols + [("external", "external", "num"), ("flags", "flags", "text"), ("n", "n", "num"), ("weights_sha256", "weights", "text")]


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
    value = r["groups"].get(key[2:]) if key.startswith("g:") else r["metrics"].get(key[2:]) if key.startswith("m:") else r.get(key)
    if typ == "num":
        shown = ("INVALID" if key == "robust" and r["status"] == "invalid" else str(value) if key == "n"
                 else _metric_cell(r, key[2:]) if key.startswith("m:") else _f(value))
        return f'<td class="num" data-value="{_e("" if value is None else value)}">{_e(shown)}</td>'
    return f"<td>{_e(value if value is not None else '')}</td>"


def _filter(name: str, label: str, options: Iterable[tuple[str, str]], default: str = "") -> str:
    """A <select> filtering rows whose ``data-<name>`` (a space-separated token list) holds the chosen value."""
    opts = ['<option value="">all</option>'] if not default else []
    opts += [f'<option value="{_e(v)}"{" selected" if v == default else ""}>{_e(text)}</option>' for v, text in sorted(set(options))]
    return f'<label>{_e(label)} <select id="filter-{_e(name)}" data-filter="{_e(name)}">{"".join(opts)}</select></label>'


def to_html(entries: list[dict[str, Any]], title: str = "robustbench_med leaderboard", plots: bool = True) -> str:
    """A self-contained HTML leaderboard page (see the module docstring)."""
    rows = flat_rows(entries, headline_only=False)
    groups = display_group_columns(rows)
    cols = _html_columns(groups, display_metric_columns(rows))
    head = "".join(f'<th data-type="{typ}" aria-sort="none"><button type="button">{_e(h)}</button></th>' for _, h, typ in cols)
    body = "".join(
        f'<tr data-task="{_e(r["task"])}" data-threat="{_e(r["threat"])}" data-defense="{_e(r["defense_name"])}" '
        f'data-view="{"headline all" if r["view"] == "headline" else "all"}">'
        + "".join(_html_cell(r, k, t) for k, _, t in cols) + "</tr>" for r in rows)
    filters = (_filter("task", "task", ((r["task"], r["task"]) for r in rows))
               + _filter("threat", "threat model", ((r["threat"], r["threat_label"]) for r in rows))
               + _filter("defense", "defence", ((r["defense_name"], r["defense_name"]) for r in rows))
               + _filter("view", "rows", [("headline", "headline (worst case per defence)"), ("all", "every attack")], default="headline"))
    figures = _figures(entries) if plots else ""
    csp = (f"default-src 'none'; img-src data:; style-src {_csp_hash(_STYLE)}; script-src {_csp_hash(_SCRIPT)}; "
           "base-uri 'none'; form-action 'none'")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{_e(csp)}">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><link rel="icon" href="data:,">'
            f"<title>{_e(title)}</title><style>{_STYLE}</style></head><body>"
            f"<h1>{_e(title)}</h1><p>{len(entries)} entries; scores are fractions in [0, 1]. Rows: the headline (worst case "
            "over attacks per defence) or every attack. Click a column heading to sort.</p>"
            f"<p><small>{_e(RELIABILITY_NOTE)}</small></p>"
            f'<div id="filters">{filters} <span><span id="row-count">{len(rows)}</span> rows shown</span></div>'
            f'<table id="leaderboard"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
            f"{figures}<script>{_SCRIPT}</script></body></html>\n")


def _figures(entries: list[dict[str, Any]]) -> str:
    """The plots (:mod:`robustbench_med.plots`) as inline PNG data URIs (nothing is fetched)."""
    out = []
    for title, png in (("Robust metric vs eps", plot_robustness_vs_eps(entries)), ("Robust group gaps", plot_group_gaps(entries)),
                       ("Per-sample scores, clean vs adversarial", plot_score_histograms(entries))):
        if png:
            data = base64.b64encode(png).decode()
            out.append(f'<h2>{_e(title)}</h2><img class="plot" alt="{_e(title)}" src="data:image/png;base64,{data}">')
    return "<section>" + "".join(out) + "</section>" if out else ""


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
