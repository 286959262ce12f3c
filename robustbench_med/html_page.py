"""The self-contained HTML leaderboard page: one file, no external JS, CSS, fonts or CDN.

RobustBench renders its leaderboard from the model zoo's JSON files through a Jinja2 template (Croce et al., NeurIPS
2021 Datasets and Benchmarks; ``shared/reference/anchors.md`` §1); here the page is built from validated entries.

- Safety: the one inline script and the one inline style sheet are pinned by Content-Security-Policy hashes (an
  injected inline handler would not run); plots are PNG data URIs; every name and text is HTML-escaped.
- Layout: one table per dataset × task, all in one box that scrolls by itself (the page never scrolls sideways),
  each with a sticky header row and a sticky model column; numeric columns are as narrow as their longest word, so a
  task without extra columns fits a 1440 px window. Figures sit in a grid of two or three per row by window width.
- Scores are comparable only within a task: each table holds one task, clicking a heading sorts inside every table
  and never ranks a Dice against an SDR. A column is shown for the tasks where some row has a value in it
  (``data-tasks`` on its header cell); the task and the weights hash live in the caption and the detail view.
- Filters (dataset, task, threat model, defence, headline / every attack), a search box and the sort order live in
  the URL fragment, so reloading or sharing the URL restores the view; figures are tagged with what they show and
  follow the filters. Clicking a row opens its entry's manifest (versions, seed, hashes, device, grid, weights sha256).
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
from typing import Any, Iterable

from robustbench_med import render
from robustbench_med.render import (
    RELIABILITY_NOTE,
    _e,
    _html_cell,
    _html_columns,
    display_group_columns,
    display_metric_columns,
    flat_rows,
)

STYLE = """
:root { --line: #dde1e6; --head: #f3f5f8; --muted: #5f6b7a; --accent: #1f5fa8; }
* { box-sizing: border-box; }
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; padding: 1rem .75rem 2rem;
       color: #1d232b; max-width: 2400px; }
h1 { font-size: 1.45rem; margin: 0 0 .3rem; }
h2 { font-size: 1.1rem; margin: 1.5rem 0 .5rem; }
p.lead { margin: 0 0 .3rem; }
p.note { margin: 0 0 .8rem; color: var(--muted); font-size: 12px; }
#toolbar { display: flex; flex-wrap: wrap; align-items: center; gap: .4rem 1rem; padding: .6rem .75rem;
           margin-bottom: .6rem; background: var(--head); border: 1px solid var(--line); border-radius: 6px; font-size: 13px; }
#toolbar label { display: inline-flex; align-items: center; gap: .35rem; }
#toolbar input[type="search"] { width: 13rem; padding: .25rem .4rem; font: inherit; }
#toolbar select { font: inherit; max-width: 11rem; }
#toolbar .count { margin-left: auto; color: var(--muted); }
#toolbar button { font: inherit; padding: .15rem .6rem; cursor: pointer; }
#empty { margin: 1rem; color: var(--muted); }
#leaderboard { overflow: auto; max-height: calc(100vh - 2rem); border: 1px solid var(--line); border-radius: 6px;
               display: flex; flex-direction: column; gap: .9rem; }
table.board { border-collapse: separate; border-spacing: 0; font-size: 12px; width: max-content; min-width: 100%;
              flex: none; }
table.board[hidden] { display: none; }
caption { text-align: left; background: #e8eef6; color: #23405f; font-weight: 600; padding: 5px 8px; }
caption span { position: sticky; left: 8px; }
th, td { border-bottom: 1px solid var(--line); padding: 3px 5px; text-align: left; vertical-align: top; background: #fff; }
td { max-width: 11rem; overflow-wrap: break-word; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.flag { color: #a00; }
thead th { position: sticky; top: 0; z-index: 2; background: var(--head); vertical-align: bottom;
           box-shadow: inset 0 -1px 0 #b9c0c9, 1px 0 0 var(--head); font-size: 11.5px; line-height: 1.25; }
thead th[data-type="num"] { text-align: right; width: 1px; }  /* as narrow as its longest word or number */
thead th button { font: inherit; font-weight: 600; text-align: inherit; background: none; border: none; cursor: pointer;
                  padding: 0; color: inherit; overflow-wrap: normal; }
th[aria-sort="ascending"] button::after { content: "\\00a0\\25B2"; }
th[aria-sort="descending"] button::after { content: "\\00a0\\25BC"; }
tr > :first-child { position: sticky; left: 0; z-index: 1; box-shadow: inset -1px 0 0 var(--line); min-width: 8rem; }
thead tr > :first-child { z-index: 3; }
tbody tr[data-entry] { cursor: pointer; }
tbody tr[data-entry]:hover td { background: #f5f9ff; }
tbody tr[data-entry]:focus-visible td { outline: 2px solid var(--accent); outline-offset: -2px; }
#figures { display: grid; grid-template-columns: repeat(auto-fill, minmax(600px, 1fr)); gap: 1rem; }
figure { margin: 0; border: 1px solid var(--line); border-radius: 6px; padding: .5rem; min-width: 0; }
figcaption { font-size: 13px; font-weight: 600; margin-bottom: .3rem; }
img.plot { display: block; max-width: 100%; height: auto; margin: 0 auto; }
dialog { width: min(880px, 94vw); max-height: 88vh; border: 1px solid var(--line); border-radius: 8px; padding: 1rem 1.25rem; }
dialog::backdrop { background: rgba(20, 28, 38, .35); }
dialog h3 { margin: 0 2rem .5rem 0; font-size: 1.1rem; }
dialog dl { display: grid; grid-template-columns: 10rem 1fr; gap: .2rem 1rem; margin: .3rem 0 .8rem; font-size: 13px; }
dialog h4 { margin: .7rem 0 0; font-size: .95rem; }
dialog dt { color: var(--muted); }
dialog dd { margin: 0; overflow-wrap: anywhere; }
dialog pre { font-size: 11.5px; background: var(--head); padding: .5rem; max-height: 22rem; overflow: auto; }
#detail-close { position: absolute; top: .6rem; right: .8rem; font: inherit; cursor: pointer; }
"""

SCRIPT = """
(function () {
  "use strict";
  var all = function (root, sel) { return Array.prototype.slice.call(root.querySelectorAll(sel)); };
  var tables = all(document, "table.board");
  var heads = all(document, "table.board thead th");
  var rows = all(document, "table.board tr[data-entry]");
  var selects = all(document, "select[data-filter]");
  var search = document.getElementById("search");
  var count = document.getElementById("row-count");
  var figures = all(document, "figure[data-task]");
  var dialog = document.getElementById("detail");
  var state = { key: "", dir: 1, row: "" };
  rows.forEach(function (row, i) { row.setAttribute("data-order", String(i)); });

  function tokens(el, name) { return (el.getAttribute("data-" + name) || "").split(" "); }
  function passes(el) {
    return selects.every(function (s) {
      var name = s.getAttribute("data-filter");
      return !s.value || !el.hasAttribute("data-" + name) || tokens(el, name).indexOf(s.value) >= 0;
    });
  }
  function found(row) {
    var text = row.getAttribute("data-search") || "";
    return search.value.toLowerCase().split(/\\s+/).every(function (w) { return !w || text.indexOf(w) >= 0; });
  }
  function value(row, col, numeric) {
    var cell = row.cells[col];
    var raw = cell.hasAttribute("data-value") ? cell.getAttribute("data-value") : cell.textContent;
    if (!numeric) { return raw.toLowerCase(); }
    var v = parseFloat(raw);
    return isNaN(v) ? null : v;
  }
  function order(a, b) { return a.getAttribute("data-order") - b.getAttribute("data-order"); }
  function sortRows() {
    tables.forEach(function (table) {
      var cells = Array.prototype.slice.call(table.tHead.rows[0].cells);
      var col = cells.map(function (th) { return th.getAttribute("data-key"); }).indexOf(state.key);
      var numeric = col >= 0 && cells[col].getAttribute("data-type") === "num";
      var list = all(table.tBodies[0], "tr[data-entry]");
      list.sort(function (a, b) {
        if (col < 0) { return order(a, b); }
        var x = value(a, col, numeric), y = value(b, col, numeric);
        if (x === null || y === null) { return x === y ? order(a, b) : (x === null ? 1 : -1); }
        if (x < y) { return -state.dir; }
        if (x > y) { return state.dir; }
        return order(a, b);
      });
      list.forEach(function (row) { table.tBodies[0].appendChild(row); });
      cells.forEach(function (th, i) {
        th.setAttribute("aria-sort", i === col ? (state.dir > 0 ? "ascending" : "descending") : "none");
      });
    });
  }
  function writeState() {
    var p = new URLSearchParams();
    selects.forEach(function (s) {
      if (s.value !== (s.getAttribute("data-default") || "")) { p.set(s.getAttribute("data-filter"), s.value); }
    });
    if (search.value) { p.set("q", search.value); }
    if (state.key) { p.set("sort", state.key); p.set("dir", state.dir > 0 ? "asc" : "desc"); }
    if (state.row) { p.set("row", state.row); }
    var hash = p.toString();
    try {
      history.replaceState(null, "", hash ? "#" + hash : location.pathname + location.search);
    } catch (err) {
      location.hash = hash;
    }
  }
  function applyFilters() {
    var shown = 0;
    rows.forEach(function (row) {
      var keep = passes(row) && found(row);
      row.hidden = !keep;
      if (keep) { shown += 1; }
    });
    tables.forEach(function (table) {
      table.hidden = !all(table, "tr[data-entry]").some(function (r) { return !r.hidden; });
    });
    figures.forEach(function (fig) { fig.hidden = !passes(fig); });
    var plots = document.getElementById("plots");
    if (plots) { plots.hidden = !figures.some(function (fig) { return !fig.hidden; }); }
    document.getElementById("empty").hidden = shown > 0;
    count.textContent = String(shown);
    writeState();
  }
  function fill(node, row) {
    all(node, "[data-grid]").forEach(function (slot) {
      var tpl = document.getElementById("grid-" + slot.getAttribute("data-grid"));
      if (tpl) { slot.appendChild(tpl.content.cloneNode(true)); }
    });
    all(node, "[data-row-field]").forEach(function (dd) {
      dd.textContent = row.getAttribute("data-" + dd.getAttribute("data-row-field")) || "\u2013";
    });
    var keys = Array.prototype.map.call(row.closest("table").tHead.rows[0].cells,
                                        function (th) { return th.getAttribute("data-key"); });
    all(node, "[data-row-cell]").forEach(function (dd) {
      var col = keys.indexOf(dd.getAttribute("data-row-cell"));
      dd.textContent = col >= 0 ? row.cells[col].textContent : "\u2013";
    });
  }
  function openDetail(row) {
    var tpl = document.getElementById("entry-" + row.getAttribute("data-entry"));
    if (!tpl) { return; }
    var node = tpl.content.cloneNode(true);
    fill(node, row);
    document.getElementById("detail-body").replaceChildren(node);
    state.row = row.getAttribute("data-order");
    if (!dialog.open) { dialog.showModal(); }
    writeState();
  }
  function readState() {
    var p = new URLSearchParams(location.hash.replace(/^#/, ""));
    selects.forEach(function (s) {
      var v = p.get(s.getAttribute("data-filter"));
      var ok = v !== null && Array.prototype.some.call(s.options, function (o) { return o.value === v; });
      s.value = ok ? v : (s.getAttribute("data-default") || "");
    });
    search.value = p.get("q") || "";
    var known = heads.some(function (th) { return th.getAttribute("data-key") === p.get("sort"); });
    state.key = known ? p.get("sort") : "";
    state.dir = p.get("dir") === "desc" ? -1 : 1;
    sortRows();
    applyFilters();
    var row = /^[0-9]+$/.test(p.get("row") || "") ? rows[Number(p.get("row"))] : null;
    if (row) { openDetail(row); } else if (dialog.open) { dialog.close(); }
  }
  heads.forEach(function (th) {
    var button = th.querySelector("button");
    if (button) {
      button.addEventListener("click", function () {
        var key = th.getAttribute("data-key");
        state.dir = state.key === key ? -state.dir : 1;
        state.key = key;
        sortRows();
        writeState();
      });
    }
  });
  selects.forEach(function (s) { s.addEventListener("change", applyFilters); });
  document.getElementById("reset").addEventListener("click", function () {
    selects.forEach(function (s) { s.value = s.getAttribute("data-default") || ""; });
    search.value = "";
    state.key = "";
    sortRows();
    applyFilters();
  });
  search.addEventListener("input", applyFilters);
  var board = document.getElementById("leaderboard");
  board.addEventListener("click", function (ev) {
    if (ev.target.closest("a, button")) { return; }
    var row = ev.target.closest("tr[data-entry]");
    if (row) { openDetail(row); } else if (dialog.open) { dialog.close(); }
  });
  board.addEventListener("keydown", function (ev) {
    var row = ev.target.closest("tr[data-entry]");
    if (row && ev.key === "Enter") { openDetail(row); }
  });
  document.getElementById("detail-close").addEventListener("click", function () { dialog.close(); });
  dialog.addEventListener("close", function () { state.row = ""; writeState(); });
  window.addEventListener("hashchange", readState);
  readState();
}());
"""


def csp_hash(text: str) -> str:
    """A Content-Security-Policy source expression pinning an inline script or style by its sha256 (CSP Level 2)."""
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def _cell_has_value(cell: str) -> bool:
    """Whether a rendered table cell shows something (not empty, not the ``–`` of a missing number)."""
    text = re.sub(r"<[^>]+>", "", cell).strip()
    return text not in ("", "–")


def _row_entry_key(r: dict[str, Any]) -> tuple[Any, ...]:
    """What tells the entry of a display row apart from the others: dataset, grid, victim, threat, task, weights."""
    return (r["dataset"], r["grid"], r["victim"], r["threat"], r["task"], r["weights_sha256"])


def _entry_index(entries: list[dict[str, Any]]) -> dict[tuple[Any, ...], int]:
    """The position of each entry in ``entries`` by :func:`_row_entry_key` (its rows open its detail view)."""
    return {(e["dataset"], e["grid"], e["victim"], e["threat"]["key"], e["task"], e["weights_sha256"]): i
            for i, e in enumerate(entries)}


def _row_html(r: dict[str, Any], cells: list[str], entry: int) -> str:
    """One table row: its cells plus the attributes the filters, the search box and the detail view read."""
    search = " ".join((r["model"], r["victim"], r["defense"], r["attack"])).lower()
    params = json.dumps(r["attack_params"], sort_keys=True)
    return (f'<tr tabindex="0" data-entry="{entry}" data-dataset="{_e(r["dataset"])}" data-task="{_e(r["task"])}" '
            f'data-threat="{_e(r["threat"])}" data-defense="{_e(r["defense_name"])}" '
            f'data-view="{"headline all" if r["view"] == "headline" else "all"}" data-search="{_e(search)}" '
            f'data-attack-params="{_e(params)}" data-status="{_e(r["status"])}">' + "".join(cells) + "</tr>")


def _head_cell(key: str, heading: str, typ: str, tasks: set[str]) -> str:
    """A sortable header cell naming the tasks its column applies to."""
    return (f'<th scope="col" data-key="{_e(key)}" data-type="{typ}" data-tasks="{_e(" ".join(sorted(tasks)))}" '
            f'aria-sort="none"><button type="button">{_e(heading)}</button></th>')


SHOWN_ELSEWHERE = ("task", "weights_sha256")  # the table's caption names the task; the detail view has the full hash


def _tables(entries: list[dict[str, Any]], rows: list[dict[str, Any]]) -> str:
    """One table per dataset × task, each with the columns that apply to its task and a sticky header, all inside one
    scroll box. A column applies to a task when some row of that task has a value in it (``data-tasks``)."""
    cols = _html_columns(display_group_columns(rows), display_metric_columns(rows))
    index = _entry_index(entries)
    tasks: list[set[str]] = [set() for _ in cols]
    groups: dict[tuple[str, str, str], list[tuple[dict[str, Any], list[str]]]] = {}
    for r in rows:
        cells = [_html_cell(r, k, t) for k, _, t in cols]
        for i, cell in enumerate(cells):
            if _cell_has_value(cell):
                tasks[i].add(r["task"])
        groups.setdefault((r["dataset"], r["task"], r["metric"]), []).append((r, cells))
    out = []
    for (dataset, task, metric), members in groups.items():
        keep = [i for i in range(len(cols)) if task in tasks[i] and cols[i][0] not in SHOWN_ELSEWHERE]
        head = "".join(_head_cell(*cols[i], tasks[i]) for i in keep)
        body = "".join(_row_html(r, [cells[i] for i in keep], index[_row_entry_key(r)]) for r, cells in members)
        out.append(f'<table class="board" data-dataset="{_e(dataset)}" data-task="{_e(task)}"><caption><span>{_e(dataset)} · '
                   f'{_e(task)} ({_e(metric)})</span></caption><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>')
    return f'<div id="leaderboard">{"".join(out)}<p id="empty" hidden>No row matches the search and filters.</p></div>'


def _filter(name: str, label: str, options: Iterable[tuple[str, str]], default: str = "") -> str:
    """A <select> filtering elements whose ``data-<name>`` (a space-separated token list) holds the chosen value."""
    opts = ['<option value="">all</option>'] if not default else []
    opts += [f'<option value="{_e(v)}"{" selected" if v == default else ""}>{_e(text)}</option>'
             for v, text in sorted(set(options))]
    return (f'<label>{_e(label)} <select id="filter-{_e(name)}" data-filter="{_e(name)}" data-default="{_e(default)}">'
            f'{"".join(opts)}</select></label>')


def _toolbar(rows: list[dict[str, Any]]) -> str:
    """Search box, filters and the count of rows shown."""
    return ('<div id="toolbar" role="search"><label>search <input type="search" id="search" '
            'placeholder="model, defence, attack" autocomplete="off"></label>'
            + _filter("dataset", "dataset", ((r["dataset"], r["dataset"]) for r in rows))
            + _filter("task", "task", ((r["task"], r["task"]) for r in rows))
            + _filter("threat", "threat model", ((r["threat"], r["threat_label"]) for r in rows))
            + _filter("defense", "defence", ((r["defense_name"], r["defense_name"]) for r in rows))
            + _filter("view", "rows", [("headline", "headline (worst case)"), ("all", "every attack")], default="headline")
            + '<button type="button" id="reset">reset</button>'
            + f'<span class="count"><span id="row-count">{len(rows)}</span> rows shown</span></div>')


def _dl(items: Iterable[tuple[str, Any]]) -> str:
    """A definition list of escaped (term, value) pairs."""
    return "<dl>" + "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in items) + "</dl>"


def _entry_fields(e: dict[str, Any]) -> list[tuple[str, Any]]:
    """What the entry says about itself: model, data, task, threat model, sample count, seeds, provenance."""
    return [("model", e.get("display_name") or e["victim"]), ("victim", e["victim"]),
            ("dataset", f"{e['dataset']} ({e['split']})"), ("task", f"{e['task']} ({e['metric']})"),
            ("threat model", f"{e['threat']['norm']} {e['threat']['eps_display']}"), ("n", e["n"]),
            ("seeds", ", ".join(map(str, e["seeds"]))), ("success threshold", e["success_threshold"]),
            ("notes", e.get("notes") or "–"), ("created", e["created"]), ("generator", e["generator"])]


def _manifest_fields(e: dict[str, Any]) -> list[tuple[str, Any]]:
    """The run manifest: package versions, seed, config and data hashes, device, the grid in brief, the runs."""
    man, grid = e["manifest"], e["manifest"]["grid"]
    return [("versions", ", ".join(f"{k} {v}" for k, v in sorted(man["versions"].items()))), ("seed", man["seed"]),
            ("config hash", man["config_hash"]), ("data hash", man["data_hash"]),
            ("device", man["device"] + (f" ({man['device_name']})" if man.get("device_name") else "")),
            ("grid", f"{grid.get('name')}: {grid.get('dataset')} / {grid.get('split')}, n={grid.get('n_examples')}, "
                     f"batch {grid.get('batch_size')}"),
            ("runs", ", ".join(r["run_id"] for r in e["runs"]))]


ROW_FIELDS = ('<dl><dt>defence</dt><dd data-row-cell="defense"></dd><dt>attack</dt><dd data-row-cell="attack"></dd>'
              '<dt>attack parameters</dt><dd data-row-field="attack-params"></dd>'
              '<dt>status</dt><dd data-row-field="status"></dd></dl>')


def _entry_detail(i: int, e: dict[str, Any], grid_id: str) -> str:
    """The detail view of one entry, a ``<template>`` the script clones into the dialog: the clicked row (filled in by
    the script from the row), the entry, its weights sha256 and link, its run manifest and its grid configuration."""
    link = e.get("link")
    link_html = (f'<dt>link</dt><dd><a href="{_e(link)}" rel="noopener noreferrer">{_e(link)}</a></dd>'
                 if link and re.match(r"^https?://", link) else "")
    weights = f'<dl><dt>weights sha256</dt><dd><code>{_e(e["weights_sha256"] or "–")}</code></dd>{link_html}</dl>'
    return (f'<template id="entry-{i}"><h3>{_e(e.get("display_name") or e["victim"])}</h3>'
            f"<h4>this row</h4>{ROW_FIELDS}<h4>entry</h4>{_dl(_entry_fields(e))}{weights}"
            f"<h4>run manifest</h4>{_dl(_manifest_fields(e))}"
            f'<details><summary>grid configuration</summary><div data-grid="{grid_id}"></div></details></template>')


def _details(entries: list[dict[str, Any]]) -> str:
    """The dialog, one template per entry and one per distinct grid configuration (shared by many entries)."""
    grids: dict[str, str] = {}
    out = []
    for i, e in enumerate(entries):
        text = json.dumps(e["manifest"]["grid"], indent=1, sort_keys=True, default=str)
        grid_id = grids.setdefault(text, str(len(grids)))
        out.append(_entry_detail(i, e, grid_id))
    out += [f'<template id="grid-{g}"><pre>{_e(text)}</pre></template>' for text, g in grids.items()]
    return ('<dialog id="detail" aria-label="entry details">'
            '<button type="button" id="detail-close" aria-label="close">✕</button><div id="detail-body"></div></dialog>'
            + "".join(out))


def _figures(entries: list[dict[str, Any]]) -> str:
    """The plots of each dataset × task as inline PNG data URIs (nothing is fetched), each figure tagged with the
    dataset, task, threat models and defences it shows so that it follows the filters."""
    by_group: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for e in entries:
        by_group.setdefault((e["dataset"], e["task"], e["metric"]), []).append(e)
    out = []
    for (dataset, task, metric), group in sorted(by_group.items()):
        rows = flat_rows(group, headline_only=False)
        threats, defenses = " ".join(sorted({r["threat"] for r in rows})), " ".join(sorted({r["defense_name"] for r in rows}))
        tags = f'data-dataset="{_e(dataset)}" data-task="{_e(task)}" data-threat="{_e(threats)}" data-defense="{_e(defenses)}"'
        for title, png in (("robust metric vs eps", render.plot_robustness_vs_eps(group)),
                           ("robust group gaps", render.plot_group_gaps(group)),
                           ("per-sample scores, clean vs adversarial", render.plot_score_histograms(group))):
            if png:
                caption = f"{dataset} · {task} ({metric}): {title}"
                out.append(f'<figure {tags}><figcaption>{_e(caption)}</figcaption><img class="plot" alt="{_e(caption)}" '
                           f'src="data:image/png;base64,{base64.b64encode(png).decode()}"></figure>')
    return f'<section id="plots"><h2>Plots</h2><div id="figures">{"".join(out)}</div></section>' if out else ""


def to_html(entries: list[dict[str, Any]], title: str = "robustbench_med leaderboard", plots: bool = True) -> str:
    """A self-contained HTML leaderboard page (see the module docstring)."""
    rows = flat_rows(entries, headline_only=False)
    csp = (f"default-src 'none'; img-src data:; style-src {csp_hash(STYLE)}; script-src {csp_hash(SCRIPT)}; "
           "base-uri 'none'; form-action 'none'")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{_e(csp)}">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><link rel="icon" href="data:,">'
            f"<title>{_e(title)}</title><style>{STYLE}</style></head><body>"
            f'<header><h1>{_e(title)}</h1><p class="lead">{len(entries)} entries; scores are fractions in [0, 1], comparable '
            "only within one dataset × task. Rows: the headline (worst case over attacks per defence) or every attack. "
            "Click a heading to sort within each task, a row for its manifest.</p>"
            f'<p class="note">{_e(RELIABILITY_NOTE)}</p></header>'
            f"<main>{_toolbar(rows)}{_tables(entries, rows)}{_figures(entries) if plots else ''}</main>"
            f"{_details(entries)}<script>{SCRIPT}</script></body></html>\n")
