"""Leaderboard entries: one validated JSON file per victim × threat model, ``leaderboards/<dataset>/<threat>/<victim>.json``.

RobustBench (Croce et al., "RobustBench: a standardized adversarial robustness benchmark", NeurIPS 2021 Datasets and
Benchmarks) keeps one JSON per model with numbers stored as strings, ``eps`` as ``"8/255"`` and no validator
(``shared/reference/anchors.md`` §1, §8.7). An entry here is checked on write *and* on load (by
:mod:`robustbench_med.entry_schema`: the published JSON Schema ``leaderboards/schema/entry.schema.json``, generated
from the typed entries of :mod:`robustbench_med.entry_types`, then the recomputation checks), and every error names
the field (``results[3].robust: must be a fraction in [0, 1] (not a percentage), got 62.5``):

- numbers are JSON numbers, scores are fractions in [0, 1]; ``eps`` is a number plus a display string that must
  agree with it; the threat key (``Linf-8_255``) is derived from both;
- every result row keeps its per-sample clean and adversarial scores, so the aggregates are *recomputed on load*:
  ``clean``, ``robust`` and ``attack_success_rate`` must equal the means of the stored scores, the 95% interval must
  contain ``robust``, and a worst-case row must be the per-sample minimum of the rows it names;
- reliability flags (masked gradients, black-box beats white-box, randomised outputs, invalid budget; Croce & Hein,
  ICML 2020) are raised at entry level whenever any row carries them, so they cannot be hidden;
- the run manifest (package versions, device, seed, config and data hashes, the grid), the sha256 of the weights,
  the sensitive attributes of each sample, and an ``external`` field for a stronger (adaptive) evaluation.

Entries are built from the wide summary (:func:`robustbench_med.leaderboard.summary_wide`, computed once per cell in
:mod:`robustbench_med.results`). Its fairness columns (``robust_gap_*``, ``worst_group_*``,
``es_dice_*`` and ``name[attr=group]`` / ``name[attr]`` style) are carried through generically in ``groups``.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from robustbench_med.columns import GROUP_PREFIXES, SUMMARY_FIELDS, is_group_column  # noqa: F401 (public names kept)
from robustbench_med.entry_types import (  # noqa: F401  (KIND ... MEAN_TOL: re-exported, public names)
    KIND, MEAN_TOL, RELIABILITY_FLAGS, SCHEMA_VERSION, STATUSES, Entry, External, Manifest, ResultRow, optional_keys,
    required_keys,
)
from robustbench_med.errors import ConfigError
from robustbench_med.results import (  # noqa: F401 (WORST_CASE: public name kept)
    WORST_CASE, WORST_CASE_KEY, group_gaps, is_baseline, is_worst_case_attack, worst_case_cells, worst_case_label, worst_case_scores,
)
from robustbench_med.statistics import attack_success_rate, mean_ci
from robustbench_med.store import Store
from robustbench_med.tasks import task_spec
from robustbench_med.threat import CORRUPTION, eps_display

_KNOWN_COLUMNS = SUMMARY_FIELDS  # shim, kept for one release (columns.SUMMARY_FIELDS)
# key lists of the entry objects, derived from the typed entries (shims, kept for one release)
TOP_REQUIRED, TOP_OPTIONAL = required_keys(Entry), optional_keys(Entry)
ROW_REQUIRED, ROW_OPTIONAL = required_keys(ResultRow), optional_keys(ResultRow)
EXTERNAL_KEYS = required_keys(External)
MANIFEST_REQUIRED = required_keys(Manifest)


# ---------------------------------------------------------------------------------------------------------------
# names and paths


def threat_key(norm: str, eps: float) -> str:
    """Directory name of a threat model, e.g. ``Linf-8_255`` or ``L2-0.5`` (``/`` is not allowed in a path); a
    corruption severity: ``corruption-s3`` (one entry per victim × severity, a row per corruption)."""
    if norm == CORRUPTION:
        return f"{CORRUPTION}-s{eps_display(eps, norm)}"
    return f"{norm}-{eps_display(eps).replace('/', '_')}"


def entry_path(root: str | Path, entry: dict[str, Any]) -> Path:
    """Where ``entry`` lives under the leaderboard ``root``."""
    return Path(root) / entry["dataset"] / entry["threat"]["key"] / f"{entry['victim']}.json"




def defense_label(row: dict[str, Any]) -> str:
    """A readable defence name: ``jpeg.bpda(quality=75)``, with ``[transfer]`` / ``[detach]`` when not adaptive."""
    params = row.get("defense_params") or {}
    label = row["defense"] + (f"({', '.join(f'{k}={v}' for k, v in sorted(params.items()))})" if params else "")
    return label if row.get("attack_through", "adaptive") == "adaptive" else f"{label} [{row['attack_through']}]"


def defense_key(row: dict[str, Any]) -> str:
    """Identity of a row's defence setting (name, parameters, how it is attacked)."""
    return json.dumps([row["defense"], row.get("defense_params") or {}, row.get("attack_through")], sort_keys=True)


def is_worst_case(row: dict[str, Any]) -> bool:
    """Whether a row is the per-sample worst case over several attacks (not one attack)."""
    return is_worst_case_attack(row.get("attack", ""))


def headline_rows(entry: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per defence: the worst case over attacks when there is one, else the strongest valid attack.

    Baselines (:func:`robustbench_med.results.is_baseline`) count only when nothing else ran; an all-invalid defence
    shows its invalid row.
    """
    norm = entry["threat"]["norm"]
    by_def: dict[str, list[dict[str, Any]]] = {}
    for row in entry["results"]:
        if row["status"] != "skipped":
            by_def.setdefault(defense_key(row), []).append(row)
    out = []
    for rows in by_def.values():
        done = [r for r in rows if r["status"] == "done"]
        worst = [r for r in done if is_worst_case(r)]
        real = [r for r in done if not is_baseline(r.get("knowledge"), norm)] or done
        pick = worst[0] if worst else (min(real, key=lambda r: r["robust"]) if real else rows[0])
        out.append(pick)
    return out


# ---------------------------------------------------------------------------------------------------------------
# validation (in robustbench_med.entry_schema: the published JSON Schema, then the recomputation checks)


def validate_entry(entry: Any, source: str = "<entry>") -> dict[str, Any]:
    """Check ``entry`` against the schema and recompute its aggregates; return it or raise :class:`ConfigError`.

    See :func:`robustbench_med.entry_schema.validate_entry` (imported on call: that module builds on the names above).
    """
    from robustbench_med.entry_schema import validate_entry as validate

    return validate(entry, source)


# ---------------------------------------------------------------------------------------------------------------
# reading and writing


def dumps_entry(entry: dict[str, Any]) -> str:
    """Stable, diff-friendly JSON: objects one key per line, lists of scalars on one line; no NaN."""
    return _pretty(entry, 0) + "\n"


def _pretty(value: Any, depth: int) -> str:
    """JSON text of ``value`` at indentation ``depth`` (see :func:`dumps_entry`)."""
    pad, inner = " " * depth, " " * (depth + 1)
    if isinstance(value, dict):
        if not value:
            return "{}"
        items = [f"{inner}{json.dumps(str(k))}: {_pretty(v, depth + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        return "[\n" + ",\n".join(inner + _pretty(v, depth + 1) for v in value) + "\n" + pad + "]"
    return json.dumps(value, allow_nan=False, separators=(", ", ": "))


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and a rename (readers never see half a file); mode 0644."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_entry(entry: dict[str, Any], root: str | Path) -> Path:
    """Validate ``entry`` and write it atomically to ``<root>/<dataset>/<threat>/<victim>.json``."""
    threat = entry.get("threat") if isinstance(entry, dict) and isinstance(entry.get("threat"), dict) else {}
    validate_entry(entry, source=f"entry {entry.get('victim', '?') if isinstance(entry, dict) else '?'} @ {threat.get('key', '?')}")
    return atomic_write_text(entry_path(root, entry), dumps_entry(entry))


def load_entry(path: str | Path) -> dict[str, Any]:
    """Read and validate one entry file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"entry file {path} does not exist")
    try:
        raw = json.loads(path.read_text(), parse_constant=_reject_constant)
    except (json.JSONDecodeError, ValueError) as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from None
    return validate_entry(raw, source=str(path))


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed (use null for a missing number)")


def entry_files(root: str | Path) -> list[Path]:
    """Entry files under a leaderboard directory (``<root>/<dataset>/<threat>/*.json``), sorted."""
    return sorted(p for p in Path(root).glob("*/*/*.json") if p.is_file())


def load_entries(path: str | Path) -> list[dict[str, Any]]:
    """All entries of a leaderboard directory (each checked to sit where its content says), or one entry file."""
    path = Path(path)
    if path.is_file():
        return [load_entry(path)]
    if not path.is_dir():
        raise ConfigError(f"{path} is neither an entry file nor a leaderboard directory")
    files = entry_files(path)
    if not files:
        raise ConfigError(f"no entries under {path} (expected <dataset>/<threat>/<victim>.json files)")
    entries = []
    for f in files:
        entry = load_entry(f)
        expected = entry_path(path, entry)
        if expected.resolve() != f.resolve():
            raise ConfigError(f"{f}: field 'dataset/threat.key/victim': the entry belongs at {expected}")
        entries.append(entry)
    return entries


# ---------------------------------------------------------------------------------------------------------------
# building entries from a result store


def build_entries(store: Store | str | Path, *, display_names: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Entries (validated) for every victim × threat model of a finished result store.

    Raises :class:`ConfigError` when a cell is unfinished, when one victim × threat appears in two grids, or when a
    store holds runs of one grid with different configurations.
    """
    from robustbench_med.leaderboard import summary_wide

    own = not isinstance(store, Store)
    st = Store(store) if own else store
    try:
        df = summary_wide(st)
        cells = {c["cell_id"]: c for c in st.cells()}
        manifests, flags, samples = st.manifests(), st.flags(), st.samples_frame()
    finally:
        if own:
            st.close()
    if df.empty:
        raise ConfigError(f"result store {getattr(st, 'path', store)} holds no results")
    pending = df[df.status == "pending"]
    if len(pending):
        r = pending.iloc[0]
        raise ConfigError(f"cell {r['cell_id']} ({r['victim']} × {r['defense']} × {r['attack']}) is unfinished: "
                          "re-run the grid to complete it")
    per_sample, attrs = _sample_arrays(samples)
    groups = _group_rows(df, cells)
    components = _worst_case_components(df)
    entries = [_entry(key, rows, cells, manifests, flags, per_sample, attrs, display_names or {}, components)
               for key, rows in groups.items()]
    return [validate_entry(e, source=f"entry {e['victim']} @ {e['threat']['key']}") for e in entries if e is not None]


def _sample_arrays(samples: pd.DataFrame) -> tuple[dict[str, pd.DataFrame], dict[int, dict[str, Any]]]:
    """Per-cell sample frames sorted by index, and each example's attributes."""
    by_cell = {cid: g.sort_values("sample_idx") for cid, g in samples.groupby("cell_id", sort=False)}
    attrs: dict[int, dict[str, Any]] = {}
    for idx, raw in zip(samples["sample_idx"], samples["attrs"]):
        if idx not in attrs:
            attrs[int(idx)] = json.loads(raw) if isinstance(raw, str) else {}
    return by_cell, attrs


def _group_rows(df: pd.DataFrame, cells: dict[str, dict[str, Any]]) -> dict[tuple, list[pd.Series]]:
    """Summary rows per (dataset, victim, threat); worst-case rows follow their first component's cell."""
    groups: dict[tuple, list[pd.Series]] = {}
    grid_of: dict[tuple, str] = {}
    for _, row in df.iterrows():
        if is_worst_case(row):
            continue
        cell = cells[row["cell_id"]]
        key = (cell["dataset"], row["victim"], threat_key(row["norm"], float(row["eps"])))
        if grid_of.setdefault(key, cell["grid"]) != cell["grid"]:
            raise ConfigError(f"victim {row['victim']} × threat {key[2]} on {key[0]} appears in grids {grid_of[key]!r} and "
                              f"{cell['grid']!r}; publish them into separate leaderboards or drop one")
        groups.setdefault(key, []).append(row)
    components = _worst_case_components(df)
    for _, row in df.iterrows():
        if is_worst_case(row):
            comps = components.get(_worst_case_key(row), [])
            if len(comps) >= 2:
                key = (cells[comps[0]]["dataset"], row["victim"], threat_key(row["norm"], float(row["eps"])))
                groups.setdefault(key, []).append(row)
    return groups


def _worst_case_key(row: pd.Series) -> tuple:
    """The identity of a worst case: victim, defence setting, norm and eps (as :func:`results.worst_case_cells`)."""
    return (row["victim"], row["defense"], row["defense_params"], row["attack_through"], row["norm"], float(row["eps"]))


def _worst_case_components(df: pd.DataFrame) -> dict[tuple, list[str]]:
    """Cell ids each worst-case row of a summary takes the minimum over (:func:`results.worst_case_cells`)."""
    return {_worst_case_key(pd.Series(dict(zip(WORST_CASE_KEY, wc.key)))): list(wc.cell_ids) for wc in worst_case_cells(df)}


def _components(df: pd.DataFrame, wc: pd.Series) -> list[str]:
    """Cell ids a worst-case row takes the minimum over (the finished, non-baseline cells at its budget)."""
    return _worst_case_components(df).get(_worst_case_key(wc), [])


def _entry(key, rows, cells, manifests, flags, per_sample, attrs, names, components) -> dict[str, Any] | None:
    """One entry (not yet validated) from the summary rows of one dataset × victim × threat."""
    dataset, victim, tkey = key
    real = [r for r in rows if not is_worst_case(r)]
    cell0 = cells[real[0]["cell_id"]]
    grid = cell0["grid"]
    measured = [r for r in real if r["status"] != "skipped"]
    if not measured:
        return None
    n = int(measured[0]["n"])
    result_rows = [_result_row(r, cells, flags, per_sample, n) for r in real]
    by_id = {r["cell_id"]: r for r in result_rows}
    threshold = task_spec(real[0]["task"]).success_threshold
    for wc in (r for r in rows if is_worst_case(r)):
        result_rows.append(_worst_case_row(wc, by_id, attrs, n, threshold, components[_worst_case_key(wc)]))
    shas = sorted({str(r["weights_sha256"]) for r in real if isinstance(r["weights_sha256"], str)})
    if len(shas) > 1:
        raise ConfigError(f"victim {victim} has results for several weights ({', '.join(s[:12] for s in shas)}) in one store; "
                          "run each set of weights into its own directory")
    manifest, runs = _manifest(manifests, grid)
    entry = {
        "schema": KIND, "schema_version": SCHEMA_VERSION, "dataset": dataset, "split": cell0["split"], "grid": grid,
        "victim": victim, "task": real[0]["task"], "metric": real[0]["metric"],
        "threat": {"norm": real[0]["norm"], "eps": float(real[0]["eps"]), "eps_display": eps_display(float(real[0]["eps"]), real[0]["norm"]), "key": tkey},
        "n": n, "seeds": sorted({int(cells[r["cell_id"]]["seed"]) for r in real}), "success_threshold": threshold,
        "weights_sha256": shas[0] if shas else None,
        "attributes": _attribute_lists(attrs, n),
        "results": result_rows,
        "reliability": _reliability(result_rows),
        "external": None, "manifest": manifest, "runs": runs,
        "created": datetime.fromtimestamp(max(r["finished"] or r["started"] for r in runs), timezone.utc).isoformat(timespec="seconds"),
        "generator": f"robustbench_med {_version()}",
    }
    if victim in names:
        entry["display_name"] = names[victim]
    return entry


def _result_row(r: pd.Series, cells, flags, per_sample, n: int) -> dict[str, Any]:
    """One stored cell as an entry row (per-sample scores for finished cells; no robust number when invalid)."""
    cell = cells[r["cell_id"]]
    extra = json.loads(cell["extra"]) if isinstance(cell.get("extra"), str) else {}
    row = {
        "cell_id": r["cell_id"], "defense": r["defense"], "defense_params": _json_obj(r["defense_params"]),
        "attack_through": r["attack_through"], "attack": r["attack"], "attack_params": _json_obj(r["attack_params"]),
        "knowledge": _opt_str(r.get("knowledge")), "status": r["status"], "reason": str(r["reason"] or ""), "n": int(r["n"]),
        "clean": _num(r.get("clean")), "robust": _num(r.get("robust")), "robust_ci95": None,
        "attack_success_rate": _num(r.get("attack_success_rate")), "mean_linf": _num(r.get("mean_linf")),
        "mean_l2": _num(r.get("mean_l2")), "attack_seconds": _num(r.get("attack_seconds")),
        "groups": _groups(r), "flags": sorted(r["flags"]), "per_sample": None,
    }
    if extra.get("compute"):
        row["compute"] = extra["compute"]
    details = {k: d for k, (v, d) in flags.get(extra.get("group_key", ""), {}).items() if v}
    if details:
        row["flag_details"] = details
    metrics = _extra_metrics(r)
    if metrics:
        row["metrics"] = metrics
    if isinstance(r.get("notes"), str) and r.get("notes"):
        row["notes"] = r["notes"]
    if r["status"] == "skipped":
        row.update({"n": 0, "clean": None, "robust": None, "attack_success_rate": None})
    elif r["status"] == "done":
        sub = per_sample[r["cell_id"]]
        if list(sub.sample_idx) != list(range(n)):
            raise ConfigError(f"cell {r['cell_id']}: stored samples are not 0..{n - 1}; re-run the grid to complete it")
        row["robust_ci95"] = [_num(r["robust_ci95_low"]), _num(r["robust_ci95_high"])]
        row["per_sample"] = {"clean": [float(v) for v in sub.clean_score], "adv": [float(v) for v in sub.adv_score]}
    else:  # invalid: no robust number is published
        row.update({"robust": None, "attack_success_rate": None})
    return row


def _worst_case_row(wc: pd.Series, by_id: dict[str, dict[str, Any]], attrs, n: int, threshold: float,
                    comps: list[str]) -> dict[str, Any]:
    """The per-sample minimum over the cells ``comps`` (:func:`results.worst_case_cells`) of one defence, taken by
    :func:`results.worst_case_scores` from the rows' stored per-sample scores, scored at the task's ``threshold``."""
    first = by_id[comps[0]]
    adv = worst_case_scores({c: by_id[c]["per_sample"]["adv"] for c in comps})
    clean = np.asarray(first["per_sample"]["clean"], dtype=float)
    lo, hi = mean_ci(adv)
    flags = sorted({f for c in comps for f in by_id[c]["flags"]})
    groups = _groups(wc) or worst_case_group_stats(adv, attrs, n)
    return {
        "cell_id": None, "defense": wc["defense"], "defense_params": _json_obj(wc["defense_params"]), "attack_through": wc["attack_through"],
        "attack": worst_case_label(len(comps)), "attack_params": {}, "knowledge": "ensemble", "components": comps,
        "status": "done", "reason": "", "n": n, "clean": float(clean.mean()), "robust": float(adv.mean()), "robust_ci95": [lo, hi],
        "attack_success_rate": _num(attack_success_rate(clean >= threshold, adv >= threshold)), "mean_linf": None, "mean_l2": None,
        "attack_seconds": _sum_or_none(by_id[c]["attack_seconds"] for c in comps), "groups": groups, "flags": flags,
        "per_sample": {"clean": [float(v) for v in clean], "adv": [float(v) for v in adv]},
    }


def worst_case_group_stats(adv: np.ndarray, attrs: dict[int, dict[str, Any]], n: int) -> dict[str, Any]:
    """Shim, kept for one release: :func:`robustbench_med.results.group_gaps`."""
    return group_gaps(adv, attrs, n)


def _attribute_lists(attrs: dict[int, dict[str, Any]], n: int) -> dict[str, list[str]]:
    """Attribute values per example, as lists of strings of length n."""
    names = sorted({k for i in range(n) for k in attrs.get(i, {})})
    return {a: [str(attrs.get(i, {}).get(a, "")) for i in range(n)] for a in names}


def _reliability(rows: list[dict[str, Any]]) -> dict[str, bool]:
    """Entry-level reliability flags: the four named ones, plus any other flag a row carries."""
    present = {f for r in rows for f in r["flags"]}
    return {**{f: f in present for f in RELIABILITY_FLAGS}, **{f: True for f in sorted(present - set(RELIABILITY_FLAGS))}}


def _manifest(manifests: list[dict[str, Any]], grid: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The latest manifest of ``grid`` in the store and the list of its runs (one configuration only)."""
    mine = [m for m in manifests if isinstance(m.get("grid"), dict) and m["grid"].get("name") == grid]
    if not mine:
        raise ConfigError(f"the store has no run manifest for grid {grid!r}")
    hashes = sorted({m["config_hash"] for m in mine})
    if len(hashes) > 1:
        raise ConfigError(f"the store holds runs of grid {grid!r} with different configurations ({', '.join(hashes)}); "
                          "run a changed grid into a fresh directory")
    runs = [{"run_id": m["run_id"], "started": float(m["started"]), "finished": _num(m.get("finished")),
             "config_hash": m["config_hash"]} for m in mine]
    latest = {k: v for k, v in mine[-1].items() if k not in ("run_id", "started", "finished")}
    return json.loads(json.dumps(latest, default=str)), runs


def _groups(r: pd.Series) -> dict[str, Any]:
    """The summary row's fairness / per-group columns (missing values dropped)."""
    out = {}
    for key, value in r.items():
        if isinstance(key, str) and is_group_column(key):
            v = _scalar(value)
            if v is not None:
                out[key] = v
    return out


def _extra_metrics(r: pd.Series) -> dict[str, Any]:
    """Numeric or text summary columns the schema does not name (carried so nothing is lost)."""
    out = {}
    for key, value in r.items():
        if isinstance(key, str) and key not in _KNOWN_COLUMNS and not is_group_column(key) and not key.startswith("_"):
            v = _scalar(value)
            if v is not None:
                out[key] = v
    return out


def _scalar(value: Any) -> float | str | None:
    if isinstance(value, (bool, np.bool_)) or value is None:
        return None
    if isinstance(value, (int, float, np.integer, np.floating)):
        return float(value) if math.isfinite(float(value)) else None
    return value if isinstance(value, str) else None


def _num(value: Any) -> float | None:
    if value is None or isinstance(value, (bool, np.bool_)):
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _sum_or_none(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(sum(vals)) if vals else None


def _opt_str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _json_obj(value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return value
    if isinstance(value, str) and value:
        parsed = json.loads(value)
        return parsed if isinstance(parsed, dict) else {}
    return {}


def _version() -> str:
    """The installed robustbench_med version."""
    from importlib import metadata

    try:
        return metadata.version("robustbench_med")
    except metadata.PackageNotFoundError:
        return "unknown"
