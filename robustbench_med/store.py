"""The result store: one SQLite file holding runs, cells, clean results and per-sample adversarial results.

Rows for one unit of work (a batch of samples for one or several cells) are written in a single transaction, so a
run killed at any point leaves only whole units. Writes are idempotent: the primary keys (cell, sample) make
duplicates impossible and a row already present is left as it is (``INSERT OR IGNORE``), so a unit computed twice
(a resumed run, a re-run shard) never fails; a restarted run skips the units already present.

The ``units`` table records the plan: which samples each unit of each cell covers and its plan position, from
which ranks and shards derive who owns it (:mod:`robustbench_med.distributed`); the ``meta`` table records which
shard of a grid the store holds. A damaged file (truncated, a block overwritten) raises :class:`StoreError`, one
line naming the file and the two ways out: start over (``run --fresh``) or salvage what is readable
(``robustbench-med merge``, see :mod:`robustbench_med.merge`).
"""
from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from robustbench_med.errors import RobustBenchMedError

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
CREATE TABLE IF NOT EXISTS units (
    cell_id TEXT, start INTEGER, stop INTEGER, position INTEGER, PRIMARY KEY (cell_id, start));
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY, value TEXT);
"""

SAMPLE_COLUMNS = ("cell_id", "sample_idx", "clean_score", "adv_score", "clean_correct", "adv_correct", "clean_pred",
                  "adv_pred", "eps", "linf", "l2", "valid", "metrics", "attrs")
CLEAN_COLUMNS = ("group_key", "sample_idx", "score", "correct", "pred", "metrics", "attrs")
DAMAGE_WORDS = ("malformed", "not a database", "corrupt", "disk image")


class StoreError(RobustBenchMedError):
    """A result store cannot be used: damaged file, held by another run, or written for another shard."""


def dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def is_damage(error: BaseException) -> bool:
    """Whether a ``sqlite3`` error means a damaged file (not a lock, a constraint or a programming error)."""
    if not isinstance(error, sqlite3.DatabaseError) or isinstance(error, sqlite3.IntegrityError):
        return False
    return type(error) is sqlite3.DatabaseError or any(w in str(error).lower() for w in DAMAGE_WORDS)


def damaged_error(path: str | Path, error: BaseException) -> StoreError:
    """The one-line error for a damaged store at ``path``, with both recoveries."""
    path = Path(path)
    return StoreError(
        f"result store {path} is damaged ({error}); start over with `robustbench-med run GRID --out {path.parent} --fresh` "
        f"(the damaged file is kept as {path.name}.damaged-<time>), or salvage what is readable with "
        f"`robustbench-med merge NEW_DIR {path} --allow-gaps` and resume with `robustbench-med run GRID --out NEW_DIR`")


class _GuardedCursor(sqlite3.Cursor):
    """A cursor whose damage errors become :class:`StoreError` naming the file."""

    def _guard(self, fn, *args):
        try:
            return fn(*args)
        except sqlite3.DatabaseError as e:
            if is_damage(e):
                raise damaged_error(self.connection.path, e) from None
            raise

    def execute(self, *args):  # type: ignore[override]
        return self._guard(super().execute, *args)

    def executemany(self, *args):  # type: ignore[override]
        return self._guard(super().executemany, *args)

    def fetchone(self):  # type: ignore[override]
        return self._guard(super().fetchone)

    def fetchmany(self, *args):  # type: ignore[override]
        return self._guard(super().fetchmany, *args)

    def fetchall(self):  # type: ignore[override]
        return self._guard(super().fetchall)

    def __next__(self):
        return self._guard(super().__next__)


class GuardedConnection(sqlite3.Connection):
    """A connection (``sqlite3.connect(..., factory=GuardedConnection)``) that turns damage into :class:`StoreError`;
    still a ``sqlite3.Connection``, so pandas reads through it as usual."""

    path: str = "?"

    def cursor(self, factory=None):  # type: ignore[override]
        return super().cursor(factory or _GuardedCursor)

    def execute(self, sql, parameters=()):  # type: ignore[override]
        return self.cursor().execute(sql, parameters)

    def executemany(self, sql, parameters):  # type: ignore[override]
        return self.cursor().executemany(sql, parameters)

    def executescript(self, script):  # type: ignore[override]
        try:
            return super().executescript(script)
        except sqlite3.DatabaseError as e:
            if is_damage(e):
                raise damaged_error(self.path, e) from None
            raise


def connect(path: str | Path, timeout: float = 60) -> GuardedConnection:
    """A guarded connection to ``path`` (autocommit; transactions are explicit)."""
    try:
        conn = sqlite3.connect(str(path), timeout=timeout, isolation_level=None, factory=GuardedConnection)
    except sqlite3.DatabaseError as e:
        raise (damaged_error(path, e) if is_damage(e) else StoreError(f"cannot open result store {path}: {e}")) from None
    conn.path = str(path)
    return conn


def _set_wal(conn: sqlite3.Connection, timeout: float = 60.0) -> None:
    """Switch ``conn``'s database to write-ahead logging. Several processes opening a new store at once (ranks of one
    run) race for the exclusive lock this takes, and SQLite answers "database is locked" at once instead of calling
    its busy handler, so the switch is retried for up to ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class Store:
    """A SQLite result store at ``path`` (created on first use)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = connect(self.path)
        try:
            _set_wal(self.conn)
            self.conn.execute("PRAGMA synchronous=NORMAL")
            self.conn.executescript(SCHEMA)
        except BaseException:
            self.conn.close()
            raise

    def close(self) -> None:
        self.conn.close()

    def version(self) -> tuple[int, int]:
        """Changes whenever the contents change: ``PRAGMA data_version`` (commits by other connections) and this
        connection's ``total_changes``."""
        return int(self.conn.execute("PRAGMA data_version").fetchone()[0]), self.conn.total_changes

    def memo(self, key: str, build: Callable[[], Any]) -> Any:
        """``build()``, computed once while the store's contents are unchanged (:meth:`version`): reports that read
        the same frames several times (leaderboard, study tables, plots) decode the store once."""
        cache = self.__dict__.setdefault("_memo", {})
        version = self.version()
        if key not in cache or cache[key][0] != version:
            cache[key] = (version, build())
        return cache[key][1]

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def transaction(self):
        return _Transaction(self.conn)

    def check_integrity(self) -> None:
        """Raise :class:`StoreError` unless SQLite's ``quick_check`` finds the file intact (run before a run
        writes more rows into it)."""
        problems = [r[0] for r in self.conn.execute("PRAGMA quick_check").fetchall()]
        if problems != ["ok"]:
            raise damaged_error(self.path, "; ".join(str(p) for p in problems[:3]))

    # meta -------------------------------------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        with self.transaction():
            self.conn.execute("INSERT OR REPLACE INTO meta VALUES (?,?)", (key, value))

    # runs -------------------------------------------------------------------------------------------------
    def start_run(self, run_id: str, grid: str, config_hash: str, manifest: dict[str, Any]) -> None:
        with self.transaction():
            self.conn.execute("INSERT OR REPLACE INTO runs VALUES (?,?,?,?,?,?)", (run_id, time.time(), None, grid, config_hash, dumps(manifest)))

    def finish_run(self, run_id: str, extra: dict[str, Any] | None = None) -> None:
        """Mark a run finished; ``extra`` is added to its manifest (what was only known at the end, e.g. the memory
        caps the victims ran with)."""
        with self.transaction():
            self.conn.execute("UPDATE runs SET finished=? WHERE run_id=?", (time.time(), run_id))
            if extra:
                row = self.conn.execute("SELECT manifest FROM runs WHERE run_id=?", (run_id,)).fetchone()
                if row is not None:
                    self.conn.execute("UPDATE runs SET manifest=? WHERE run_id=?", (dumps({**json.loads(row[0]), **extra}), run_id))

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

    # the plan of units ------------------------------------------------------------------------------------
    def record_units(self, cell_ids: Sequence[str], units: Sequence[tuple[int, int, int]]) -> None:
        """Record the plan of one group of cells: ``units`` as (start, stop, position), the same for every cell of
        the group; replaces an older plan of these cells (e.g. one made with another unit_size)."""
        with self.transaction():
            for cell_id in cell_ids:
                self.conn.execute("DELETE FROM units WHERE cell_id=?", (cell_id,))
                self.conn.executemany("INSERT INTO units VALUES (?,?,?,?)", [(cell_id, a, b, p) for a, b, p in units])

    def units(self, cell_id: str) -> list[tuple[int, int, int]]:
        """The planned units of a cell as (start, stop, position), in sample order (empty: never planned)."""
        return [tuple(r) for r in self.conn.execute("SELECT start, stop, position FROM units WHERE cell_id=? ORDER BY start", (cell_id,))]

    # samples ----------------------------------------------------------------------------------------------
    def done_samples(self, cell_id: str) -> set[int]:
        return {r[0] for r in self.conn.execute("SELECT sample_idx FROM samples WHERE cell_id=?", (cell_id,))}

    def write_unit(self, rows: Sequence[dict[str, Any]], invalid: dict[str, str] | None = None) -> int:
        """Write all rows of one unit (and any invalid-cell marks) atomically; returns the number of new rows (a
        (cell, sample) already present is kept as it is: writing a unit twice is not an error)."""
        with self.transaction():
            cur = self.conn.executemany(
                f"INSERT OR IGNORE INTO samples ({','.join(SAMPLE_COLUMNS)}) VALUES ({','.join('?' * len(SAMPLE_COLUMNS))})",
                [tuple(_cell_value(r.get(c)) for c in SAMPLE_COLUMNS) for r in rows],
            )
            for cell_id, reason in (invalid or {}).items():
                self.conn.execute("UPDATE cells SET status='invalid', reason=? WHERE cell_id=?", (reason, cell_id))
        return max(cur.rowcount, 0)

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

        try:
            return pd.read_sql_query(f"SELECT {','.join(SAMPLE_COLUMNS)} FROM samples", self.conn)
        except Exception as e:  # pandas wraps what the cursor raised in its own DatabaseError
            cause = e.__cause__
            if isinstance(cause, StoreError):
                raise cause from None
            if isinstance(cause, sqlite3.DatabaseError) and is_damage(cause):
                raise damaged_error(self.path, cause) from None
            raise

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


# ---------------------------------------------------------------------------------------------------------------
# one run at a time per store

_HELD: dict[str, int] = {}  # lock files this process holds (re-entrant: run_grid, then GridRunner.run)


def lock_paths(store_path: str | Path) -> tuple[Path, Path]:
    """The lock file of a store and the sidecar naming its holder."""
    path = Path(store_path)
    return path.with_name(path.name + ".lock"), path.with_name(path.name + ".lock.owner")


def lock_holder(store_path: str | Path) -> str:
    """Who holds the store's lock, as written by the holder (``pid … on host …, started …: command``)."""
    _, owner = lock_paths(store_path)
    try:
        info = json.loads(owner.read_text())
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["started"]))
        return f"pid {info['pid']} on {info['host']}, started {started}: {info['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not yet written its name"


class run_lock:
    """Hold the store's run lock for the block, or raise :class:`StoreError` at once naming the holder.

    One run (all ranks of one launch: rank 0 takes the lock) writes a store at a time; a second run does not wait —
    it exits at once saying which process holds the lock, so two shells never interleave work or fight over units.
    The lock is an OS file lock (``filelock``): a killed run releases it with its process. Re-entrant within a
    process.
    """

    def __init__(self, store_path: str | Path) -> None:
        self.store_path = Path(store_path)
        self.lock_path, self.owner_path = lock_paths(self.store_path)
        self.key = str(self.lock_path.resolve())
        self._lock = None

    def __enter__(self) -> "run_lock":
        import os
        import socket
        import sys

        from filelock import FileLock, Timeout

        if self.key in _HELD:
            _HELD[self.key] += 1
            return self
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.lock_path))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise StoreError(f"result store {self.store_path} is in use by another run ({lock_holder(self.store_path)}); "
                             "wait until it finishes or use another --out (a second run on one store exits at once)") from None
        self._lock = lock
        _HELD[self.key] = 1
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "command": " ".join(sys.argv)}
        self.owner_path.write_text(json.dumps(info))
        return self

    def __exit__(self, *exc: Any) -> None:
        _HELD[self.key] -= 1
        if _HELD[self.key] > 0:
            return
        del _HELD[self.key]
        if self._lock is not None:
            self.owner_path.unlink(missing_ok=True)
            self._lock.release()
            self._lock = None
