"""Combine result stores into one: the shards of a sharded run, or what is readable of a damaged store.

``robustbench-med merge OUT STORE...`` (:func:`merge_stores`) reads every store (a ``results.sqlite`` file, a run
directory, or a directory holding ``shard-K-of-N/`` stores) and writes ``OUT/results.sqlite``, which renders a
leaderboard like a single run. It refuses, before writing anything:

- stores of different grids (run manifests with different config hashes), different data (data hashes) or
  different code (versions of robustbench_med, torch, torchvision, torchattacks, transformers);
- a victim whose weights (sha256) differ between stores, or a cell described differently;
- a cell planned into different units (another unit_size: its units and seeds would differ);
- duplicate rows that differ (the same (cell, sample) or clean (group, sample) with other values; floats are compared
  to a relative 1e-6, so thread-count rounding between machines is not a conflict; identical duplicates are kept once);
- gaps: a planned (cell, sample) or clean row that no store holds (naming the shards not given), unless
  ``allow_gaps`` — then the merged store is written as it is, and ``robustbench-med run GRID --out OUT`` resumes it
  and computes exactly what is missing.

A damaged input is read table by table, skipping the unreadable stretches (rowid ranges) and reporting them, so
``merge NEW damaged.sqlite --allow-gaps`` followed by ``run --out NEW`` recovers a damaged store without recomputing
what survived. Cell statuses are recomputed: ``skipped`` or ``invalid`` if any store says so, else ``done`` when
every sample is present, else ``pending``. Timings add up; a reliability flag raised in any store stays raised.
"""
from __future__ import annotations

import json
import math
import os
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from robustbench_med.store import CLEAN_COLUMNS, SAMPLE_COLUMNS, Store, StoreError, is_damage, run_lock

VERSION_KEYS = ("robustbench_med", "torch", "torchvision", "torchattacks", "transformers")
CELL_COLUMNS = ("cell_id", "grid", "victim", "task", "metric", "defense", "defense_params", "attack_through", "attack",
                "attack_params", "threat", "dataset", "split", "n_examples", "seed", "weights_sha256", "status", "reason", "extra")
TABLES = {
    "runs": ("run_id", "started", "finished", "grid", "config_hash", "manifest"),
    "cells": CELL_COLUMNS,
    "clean": CLEAN_COLUMNS,
    "samples": SAMPLE_COLUMNS,
    "timings": ("cell_id", "seconds", "samples"),
    "flags": ("group_key", "flag", "value", "detail"),
    "units": ("cell_id", "start", "stop", "position"),
    "meta": ("key", "value"),
}
REL_TOL, ABS_TOL = 1e-6, 1e-9


class MergeError(StoreError):
    """Stores that cannot be merged (another grid, weights or code version; conflicting duplicates; gaps)."""


@dataclass
class StoreContent:
    """Everything readable in one store."""

    path: Path
    tables: dict[str, list[tuple]] = field(default_factory=dict)
    damage: list[str] = field(default_factory=list)

    def rows(self, table: str) -> list[dict[str, Any]]:
        return [dict(zip(TABLES[table], r)) for r in self.tables.get(table, [])]

    @property
    def shard(self) -> str | None:
        return next((r["value"] for r in self.rows("meta") if r["key"] == "shard"), None)


@dataclass
class MergeReport:
    """What :func:`merge_stores` did."""

    out: Path
    inputs: list[Path]
    rows: int
    clean_rows: int
    identical_duplicates: int
    gaps: list[str]
    damage: list[str]
    cells: dict[str, int]

    def text(self) -> str:
        lines = [f"merged {len(self.inputs)} store(s) into {self.out}: {self.rows} sample rows, {self.clean_rows} clean rows, "
                 f"cells {', '.join(f'{k} {v}' for k, v in sorted(self.cells.items()))}"]
        if self.identical_duplicates:
            lines.append(f"  {self.identical_duplicates} identical duplicate rows kept once")
        lines += [f"  damaged input: {d}" for d in self.damage]
        lines += [f"  gap: {g}" for g in self.gaps]
        if self.gaps:
            lines.append(f"  resume with `robustbench-med run GRID --out {self.out.parent}` to compute what is missing")
        return "\n".join(lines)


def store_paths(spec: str | Path) -> list[Path]:
    """The stores a command-line argument names: a file, a run directory's ``results.sqlite``, or its shards."""
    p = Path(spec)
    if p.is_file():
        return [p]
    if p.is_dir():
        found = ([p / "results.sqlite"] if (p / "results.sqlite").is_file() else []) + sorted(p.glob("shard-*-of-*/results.sqlite"))
        if found:
            return found
    raise MergeError(f"no result store at {p} (give results.sqlite files or run directories)")


def _output_path(out: str | Path) -> Path:
    p = Path(out)
    return p if p.suffix in (".sqlite", ".db") else p / "results.sqlite"


def _read_table(conn: sqlite3.Connection, path: Path, table: str, damage: list[str]) -> list[tuple]:
    """All readable rows of ``table``; unreadable stretches are skipped (by rowid) and reported in ``damage``."""
    cols = ",".join(TABLES[table])
    rows: list[tuple] = []
    last = None
    for _attempt in range(10_000):
        try:
            if last is None:
                cur = conn.execute(f"SELECT rowid, {cols} FROM {table} ORDER BY rowid")
            else:
                cur = conn.execute(f"SELECT rowid, {cols} FROM {table} WHERE rowid > ? ORDER BY rowid", (last,))
            for r in cur:
                rows.append(tuple(r[1:]))
                last = r[0]
            return rows
        except sqlite3.DatabaseError as e:
            if not is_damage(e) and "no such table" in str(e):
                return rows  # an older store without this table
            if not is_damage(e):
                raise
            damage.append(f"{path}: table {table}: unreadable after rowid {last if last is not None else 0} ({e})")
            nxt = _next_readable(conn, table, last or 0)
            if nxt is None:
                return rows
            last = nxt - 1
    return rows


def _next_readable(conn: sqlite3.Connection, table: str, after: int) -> int | None:
    """The first readable rowid beyond a damaged stretch that starts after ``after`` (None: nothing more)."""
    for step in (1, 8, 64, 512, 4096, 32768, 262144, 2097152):
        try:
            r = conn.execute(f"SELECT rowid FROM {table} WHERE rowid > ? ORDER BY rowid LIMIT 1", (after + step,)).fetchone()
        except sqlite3.DatabaseError:
            continue
        return None if r is None else int(r[0])
    return None


def read_store(path: str | Path) -> StoreContent:
    """Everything readable in the store at ``path`` (a damaged file is salvaged; nothing readable raises)."""
    path = Path(path)
    content = StoreContent(path)
    conn = sqlite3.connect(str(path), timeout=60)
    try:
        for table in TABLES:
            content.tables[table] = _read_table(conn, path, table, content.damage)
    except sqlite3.DatabaseError as e:
        raise MergeError(f"cannot read result store {path}: {e}") from None
    finally:
        conn.close()
    if not any(content.tables.values()):
        detail = f" ({content.damage[0]})" if content.damage else ""
        raise MergeError(f"nothing is readable in result store {path}{detail}")
    return content


def _same(a: Any, b: Any) -> bool:
    """Equal values, floats to a relative 1e-6 (also inside JSON text)."""
    if a == b:
        return True
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and not isinstance(b, bool):
        if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
            return True
        return math.isclose(a, b, rel_tol=REL_TOL, abs_tol=ABS_TOL)
    if isinstance(a, str) and isinstance(b, str):
        try:
            return _same_json(json.loads(a), json.loads(b))
        except (ValueError, TypeError):
            return False
    return False


def _same_json(a: Any, b: Any) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_json(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_json(x, y) for x, y in zip(a, b))
    return _same(a, b) if not (isinstance(a, str) and isinstance(b, str)) else a == b


def _manifest_checks(stores: list[StoreContent]) -> None:
    """Same grid configuration, data and code in every store."""
    seen: dict[str, dict[str, Any]] = {"config_hash": {}, "data_hash": {}, **{f"version {k}": {} for k in VERSION_KEYS}}
    for st in stores:
        runs = st.rows("runs")
        if not runs:
            raise MergeError(f"{st.path} has no readable run manifest, so it cannot be checked to hold the same grid")
        for run in runs:
            try:
                man = json.loads(run["manifest"])
            except (TypeError, ValueError):
                raise MergeError(f"{st.path}: run {run['run_id']} has an unreadable manifest") from None
            values = {"config_hash": run["config_hash"], "data_hash": man.get("data_hash"),
                      **{f"version {k}": (man.get("versions") or {}).get(k) for k in VERSION_KEYS}}
            for key, value in values.items():
                seen[key].setdefault(value, str(st.path))
    for key, values in seen.items():
        if len(values) > 1:
            listing = "; ".join(f"{v} in {p}" for v, p in values.items())
            what = {"config_hash": "grid configurations (config hash)", "data_hash": "data (data hash)"}.get(key, f"code ({key})")
            raise MergeError(f"refusing to merge stores of different {what}: {listing}")


def _cell_checks(stores: list[StoreContent]) -> dict[str, dict[str, Any]]:
    """One description per cell and one weights sha256 per victim; returns the cells by id (statuses unmerged)."""
    cells: dict[str, dict[str, Any]] = {}
    weights: dict[str, tuple[Any, Path]] = {}
    for st in stores:
        for c in st.rows("cells"):
            prev = weights.setdefault(c["victim"], (c["weights_sha256"], st.path))
            if prev[0] != c["weights_sha256"]:
                raise MergeError(f"refusing to merge: victim {c['victim']} has weights sha256 {str(prev[0])[:16]}… in {prev[1]} "
                                 f"but {str(c['weights_sha256'])[:16]}… in {st.path}")
            have = cells.get(c["cell_id"])
            if have is None:
                cells[c["cell_id"]] = {**c, "_statuses": [(c["status"], c["reason"])]}
                continue
            differ = [k for k in CELL_COLUMNS if k not in ("status", "reason") and not _same(have[k], c[k])]
            if differ:
                raise MergeError(f"refusing to merge: cell {c['cell_id']} ({c['victim']} / {c['attack']}) is described "
                                 f"differently in {st.path} (fields {differ})")
            have["_statuses"].append((c["status"], c["reason"]))
    return cells


def _unit_checks(stores: list[StoreContent]) -> None:
    """The same unit plan for a cell in every (undamaged) store."""
    plans: dict[str, tuple[tuple, Path]] = {}
    for st in stores:
        mine: dict[str, list[tuple]] = {}
        for u in st.tables.get("units", []):
            mine.setdefault(u[0], []).append(tuple(u[1:]))
        for cell_id, units in mine.items():
            plan = tuple(sorted(units))
            prev = plans.setdefault(cell_id, (plan, st.path))
            if prev[0] != plan and not st.damage:
                raise MergeError(f"refusing to merge: cell {cell_id} was planned into different units in {prev[1]} and "
                                 f"{st.path} (another unit_size: the units and their seeds differ)")


def _union(stores: list[StoreContent], table: str, key_len: int, conflicts: list[str]) -> tuple[dict[tuple, tuple], int]:
    """Rows of ``table`` by primary key; identical duplicates counted, differing ones reported in ``conflicts``."""
    out: dict[tuple, tuple] = {}
    origin: dict[tuple, Path] = {}
    same = 0
    for st in stores:
        for row in st.tables.get(table, []):
            key = tuple(row[:key_len])
            have = out.get(key)
            if have is None:
                out[key], origin[key] = row, st.path
            elif all(_same(a, b) for a, b in zip(have, row)):
                same += 1
            else:
                cols = [TABLES[table][i] for i, (a, b) in enumerate(zip(have, row)) if not _same(a, b)]
                conflicts.append(f"{table} {key}: {cols} differ between {origin[key]} and {st.path}")
    return out, same


def merge_stores(out: str | Path, stores: Sequence[str | Path], *, allow_gaps: bool = False) -> MergeReport:
    """Merge ``stores`` (paths of stores or run directories) into ``out`` (a directory or a ``.sqlite`` path); an
    existing store at ``out`` is merged too. Raises :class:`MergeError` on mismatches, conflicts and (unless
    ``allow_gaps``) gaps; see the module doc."""
    out_path = _output_path(out)
    paths: list[Path] = []
    for s in stores:
        for p in store_paths(s):
            if p.resolve() not in {q.resolve() for q in paths}:
                paths.append(p)
    if out_path.exists() and out_path.resolve() not in {q.resolve() for q in paths}:
        paths.insert(0, out_path)
    if not paths:
        raise MergeError("merge needs at least one store")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with run_lock(out_path):
        contents = [read_store(p) for p in paths]
        _manifest_checks(contents)
        cells = _cell_checks(contents)
        _unit_checks(contents)
        conflicts: list[str] = []
        samples, dup_s = _union(contents, "samples", 2, conflicts)
        clean, dup_c = _union(contents, "clean", 2, conflicts)
        if conflicts:
            more = f" (and {len(conflicts) - 5} more)" if len(conflicts) > 5 else ""
            raise MergeError("refusing to merge: duplicate rows differ: " + "; ".join(conflicts[:5]) + more)
        units, _ = _union(contents, "units", 2, [])
        runs, _ = _union(contents, "runs", 1, [])
        flags = _merge_flags(contents)
        timings = _merge_timings(contents)
        merged_cells, gaps = _statuses_and_gaps(cells, samples, clean, contents)
        if gaps and not allow_gaps:
            shown = "; ".join(gaps[:5]) + (f"; and {len(gaps) - 5} more" if len(gaps) > 5 else "")
            raise MergeError(f"refusing to merge: planned results are missing from every store: {shown}. "
                             "Give the missing stores, or pass --allow-gaps and resume the merged store with run --out")
        _write(out_path, merged_cells, samples, clean, units, runs, flags, timings)
    counts: dict[str, int] = {}
    for c in merged_cells:
        counts[c["status"]] = counts.get(c["status"], 0) + 1
    return MergeReport(out_path, paths, len(samples), len(clean), dup_s + dup_c, gaps,
                       [d for st in contents for d in st.damage], counts)


def _merge_flags(contents: list[StoreContent]) -> dict[tuple, tuple]:
    flags: dict[tuple, tuple] = {}
    for st in contents:
        for row in st.tables.get("flags", []):
            key = tuple(row[:2])
            if key not in flags or (row[2] and not flags[key][2]):
                flags[key] = row  # raised anywhere: raised
    return flags


def _merge_timings(contents: list[StoreContent]) -> dict[str, tuple]:
    timings: dict[str, tuple] = {}
    for st in contents:
        for cell_id, seconds, n in st.tables.get("timings", []):
            s0, n0 = timings.get(cell_id, (cell_id, 0.0, 0))[1:]
            timings[cell_id] = (cell_id, s0 + (seconds or 0.0), n0 + (n or 0))
    return timings


def _statuses_and_gaps(cells: dict[str, dict[str, Any]], samples: dict[tuple, tuple], clean: dict[tuple, tuple],
                       contents: list[StoreContent]) -> tuple[list[dict[str, Any]], list[str]]:
    from robustbench_med.runner import _ranges

    present: dict[str, set[int]] = {}
    for cell_id, idx in samples:
        present.setdefault(cell_id, set()).add(idx)
    clean_present: dict[str, set[int]] = {}
    for group_key, idx in clean:
        clean_present.setdefault(group_key, set()).add(idx)
    merged, gaps, groups = [], [], {}
    for cell_id, c in sorted(cells.items()):
        statuses = c.pop("_statuses")
        n = int(c["n_examples"])
        skipped = next(((s, r) for s, r in statuses if s == "skipped"), None)
        invalid = next(((s, r) for s, r in statuses if s == "invalid"), None)
        missing = sorted(set(range(n)) - present.get(cell_id, set()))
        if skipped:
            c["status"], c["reason"] = skipped
        elif invalid:
            c["status"], c["reason"] = invalid
        else:
            c["status"], c["reason"] = ("done", "") if not missing else ("pending", "")
        if c["status"] != "skipped":
            if missing:
                gaps.append(f"{c['victim']} / {c['defense']} / {c['attack']} {c['attack_params']}: {len(missing)} of {n} "
                            f"samples ({_ranges(missing)})")
            try:
                groups[json.loads(c["extra"] or "{}").get("group_key")] = (n, c)
            except ValueError:
                pass
        merged.append(c)
    for group_key, (n, c) in groups.items():
        if group_key is not None and len(clean_present.get(group_key, ())) < n:
            gaps.append(f"{c['victim']} / {c['defense']}: {n - len(clean_present.get(group_key, ()))} of {n} clean rows")
    shards = {st.shard for st in contents}
    parts = {s.split("/")[1] for s in shards if s and "/" in s}
    if gaps and len(parts) == 1 and all(s and "/" in s for s in shards):
        total = int(parts.pop())
        absent = [f"{k}/{total}" for k in range(1, total + 1) if f"{k}/{total}" not in shards]
        if absent:
            gaps.insert(0, f"no store of shard {', '.join(absent)} was given")
    return merged, gaps


def _write(out_path: Path, cells, samples, clean, units, runs, flags, timings) -> None:
    """Write the merged store to a temporary file beside ``out_path`` and move it into place."""
    tmp = out_path.with_name(f".{out_path.name}.merge-{os.getpid()}")
    for suffix in ("", "-wal", "-shm"):
        Path(str(tmp) + suffix).unlink(missing_ok=True)
    store = Store(tmp)
    try:
        with store.transaction() as conn:
            conn.executemany(f"INSERT INTO cells ({','.join(CELL_COLUMNS)}) VALUES ({','.join('?' * len(CELL_COLUMNS))})",
                             [tuple(c[k] for k in CELL_COLUMNS) for c in cells])
            for table, rows in (("samples", samples), ("clean", clean), ("units", units), ("runs", runs),
                                ("flags", flags), ("timings", timings)):
                cols = TABLES[table]
                conn.executemany(f"INSERT INTO {table} ({','.join(cols)}) VALUES ({','.join('?' * len(cols))})", list(rows.values()))
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('shard', 'merged')")
        store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        store.close()
    for suffix in ("-wal", "-shm"):
        Path(str(out_path) + suffix).unlink(missing_ok=True)
        Path(str(tmp) + suffix).unlink(missing_ok=True)
    os.replace(tmp, out_path)
