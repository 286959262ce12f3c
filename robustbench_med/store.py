"""The result store: one SQLite file holding runs, cells, clean results and per-sample adversarial results.

Rows for one unit of work (a batch of samples for one or several cells) are written in a single transaction, so a
run killed at any point leaves only whole units; the primary keys (cell, sample) make duplicates impossible, and a
restarted run skips the units already present.
"""
from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, started REAL, finished REAL, grid TEXT, config_hash TEXT, manifest TEXT);
CREATE TABLE IF NOT EXISTS cells (
    cell_id TEXT PRIMARY KEY, grid TEXT, victim TEXT, task TEXT, metric TEXT, defense TEXT, defense_params TEXT,
    attack_through TEXT, attack TEXT, attack_params TEXT, threat TEXT, dataset TEXT, split TEXT, n_examples INTEGER,
    seed INTEGER, weights_sha256 TEXT, status TEXT, reason TEXT, extra TEXT);
CREATE TABLE IF NOT EXISTS clean (
    group_key TEXT, sample_idx INTEGER, score REAL, correct INTEGER, pred TEXT, metrics TEXT, attrs TEXT,
    PRIMARY KEY (group_key, sample_idx));
CREATE TABLE IF NOT EXISTS samples (
    cell_id TEXT, sample_idx INTEGER, clean_score REAL, adv_score REAL, clean_correct INTEGER, adv_correct INTEGER,
    clean_pred TEXT, adv_pred TEXT, eps REAL, linf REAL, l2 REAL, valid INTEGER, metrics TEXT, attrs TEXT,
    PRIMARY KEY (cell_id, sample_idx));
CREATE TABLE IF NOT EXISTS timings (
    cell_id TEXT PRIMARY KEY, seconds REAL, samples INTEGER);
CREATE TABLE IF NOT EXISTS flags (
    group_key TEXT, flag TEXT, value INTEGER, detail TEXT, PRIMARY KEY (group_key, flag));
"""

SAMPLE_COLUMNS = ("cell_id", "sample_idx", "clean_score", "adv_score", "clean_correct", "adv_correct", "clean_pred",
                  "adv_pred", "eps", "linf", "l2", "valid", "metrics", "attrs")


def dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


class Store:
    """A SQLite result store at ``path`` (created on first use)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(str(self.path), timeout=60, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.executescript(SCHEMA)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def transaction(self):
        return _Transaction(self.conn)

    # runs -------------------------------------------------------------------------------------------------
    def start_run(self, run_id: str, grid: str, config_hash: str, manifest: dict[str, Any]) -> None:
        with self.transaction():
            self.conn.execute("INSERT OR REPLACE INTO runs VALUES (?,?,?,?,?,?)", (run_id, time.time(), None, grid, config_hash, dumps(manifest)))

    def finish_run(self, run_id: str) -> None:
        with self.transaction():
            self.conn.execute("UPDATE runs SET finished=? WHERE run_id=?", (time.time(), run_id))

    def manifests(self) -> list[dict[str, Any]]:
        rows = self.conn.execute("SELECT run_id, started, finished, grid, config_hash, manifest FROM runs ORDER BY started").fetchall()
        return [{"run_id": r[0], "started": r[1], "finished": r[2], "grid": r[3], "config_hash": r[4], **json.loads(r[5])} for r in rows]

    # cells ------------------------------------------------------------------------------------------------
    def upsert_cell(self, cell: dict[str, Any]) -> None:
        """Insert a cell's description, keeping its status if it already exists."""
        cols = ("cell_id", "grid", "victim", "task", "metric", "defense", "defense_params", "attack_through", "attack",
                "attack_params", "threat", "dataset", "split", "n_examples", "seed", "weights_sha256", "status", "reason", "extra")
        values = [cell.get(c) if not isinstance(cell.get(c), (dict, list)) else dumps(cell[c]) for c in cols]
        with self.transaction():
            self.conn.execute(f"INSERT OR IGNORE INTO cells ({','.join(cols)}) VALUES ({','.join('?' * len(cols))})", values)

    def set_cell_status(self, cell_id: str, status: str, reason: str = "") -> None:
        with self.transaction():
            self.conn.execute("UPDATE cells SET status=?, reason=? WHERE cell_id=?", (status, reason, cell_id))

    def cell_status(self, cell_id: str) -> tuple[str, str] | None:
        row = self.conn.execute("SELECT status, reason FROM cells WHERE cell_id=?", (cell_id,)).fetchone()
        return (row[0], row[1]) if row else None

    def cells(self) -> list[dict[str, Any]]:
        cur = self.conn.execute("SELECT * FROM cells")
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row)) for row in cur.fetchall()]

    # samples ----------------------------------------------------------------------------------------------
    def done_samples(self, cell_id: str) -> set[int]:
        return {r[0] for r in self.conn.execute("SELECT sample_idx FROM samples WHERE cell_id=?", (cell_id,))}

    def write_unit(self, rows: Sequence[dict[str, Any]], invalid: dict[str, str] | None = None) -> None:
        """Write all rows of one unit (and any invalid-cell marks) atomically."""
        with self.transaction():
            self.conn.executemany(
                f"INSERT INTO samples ({','.join(SAMPLE_COLUMNS)}) VALUES ({','.join('?' * len(SAMPLE_COLUMNS))})",
                [tuple(_cell_value(r.get(c)) for c in SAMPLE_COLUMNS) for r in rows],
            )
            for cell_id, reason in (invalid or {}).items():
                self.conn.execute("UPDATE cells SET status='invalid', reason=? WHERE cell_id=?", (reason, cell_id))

    def add_timing(self, cell_id: str, seconds: float, samples: int) -> None:
        """Accumulate attack wall-clock time for a cell (across resumed runs)."""
        with self.transaction():
            self.conn.execute(
                "INSERT INTO timings VALUES (?,?,?) ON CONFLICT(cell_id) DO UPDATE SET seconds=seconds+excluded.seconds, samples=samples+excluded.samples",
                (cell_id, seconds, samples))

    def timings(self) -> dict[str, tuple[float, int]]:
        return {r[0]: (r[1], r[2]) for r in self.conn.execute("SELECT cell_id, seconds, samples FROM timings")}

    def samples(self, cell_ids: Iterable[str] | None = None) -> list[dict[str, Any]]:
        if cell_ids is None:
            cur = self.conn.execute(f"SELECT {','.join(SAMPLE_COLUMNS)} FROM samples ORDER BY cell_id, sample_idx")
            rows = cur.fetchall()
        else:
            ids = list(cell_ids)
            rows = []
            for i in range(0, len(ids), 500):
                chunk = ids[i : i + 500]
                rows += self.conn.execute(
                    f"SELECT {','.join(SAMPLE_COLUMNS)} FROM samples WHERE cell_id IN ({','.join('?' * len(chunk))}) ORDER BY cell_id, sample_idx",
                    chunk).fetchall()
        return [dict(zip(SAMPLE_COLUMNS, r)) for r in rows]

    def samples_frame(self):
        """All per-sample rows as a pandas DataFrame (fast path for leaderboards)."""
        import pandas as pd

        return pd.read_sql_query(f"SELECT {','.join(SAMPLE_COLUMNS)} FROM samples", self.conn)

    # clean results and flags ------------------------------------------------------------------------------
    def clean_rows(self, group_key: str) -> dict[int, dict[str, Any]]:
        cur = self.conn.execute("SELECT sample_idx, score, correct, pred, metrics, attrs FROM clean WHERE group_key=?", (group_key,))
        return {r[0]: {"score": r[1], "correct": r[2], "pred": r[3], "metrics": r[4], "attrs": r[5]} for r in cur.fetchall()}

    def write_clean(self, group_key: str, rows: Sequence[dict[str, Any]]) -> None:
        with self.transaction():
            self.conn.executemany(
                "INSERT OR IGNORE INTO clean VALUES (?,?,?,?,?,?,?)",
                [(group_key, r["sample_idx"], r["score"], r["correct"], _cell_value(r.get("pred")), _cell_value(r.get("metrics")), _cell_value(r.get("attrs"))) for r in rows],
            )

    def set_flag(self, group_key: str, flag: str, value: bool, detail: str = "") -> None:
        with self.transaction():
            self.conn.execute("INSERT OR REPLACE INTO flags VALUES (?,?,?,?)", (group_key, flag, int(value), detail))

    def flags(self) -> dict[str, dict[str, tuple[bool, str]]]:
        out: dict[str, dict[str, tuple[bool, str]]] = {}
        for key, flag, value, detail in self.conn.execute("SELECT group_key, flag, value, detail FROM flags"):
            out.setdefault(key, {})[flag] = (bool(value), detail)
        return out


def _cell_value(value: Any) -> Any:
    if isinstance(value, (dict, list, tuple)):
        return dumps(value)
    return value


class _Transaction:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type, *_: Any) -> None:
        self.conn.execute("ROLLBACK" if exc_type else "COMMIT")
