"""Two CPU processes through `accelerate launch` write one store without duplicates, equal to a single process."""
import json
import os
import shutil
import sqlite3
import subprocess
import sys

import pytest
import yaml
from rank_helpers import linear_victim, table, tiny_grid

import robustbench_med as rbm
from robustbench_med.distributed import ProcessContext
from robustbench_med.grid import parse_grid
from robustbench_med.runner import run_grid

GRID = {
    "name": "dist", "n_examples": 32, "batch_size": 8, "victims": ["cnn.phantom"],
    "attacks": [{"name": "pgd.linf", "params": {"eps": ["2/255", "8/255"], "steps": 3}}, {"name": "fgsm.linf", "params": {"eps": "4/255"}}],
    "defenses": ["identity.none", {"name": "detector.kd", "params": {"n_ref": 16, "n_fit": 16}}],  # a fitted defence
}


def _rows(db):
    con = sqlite3.connect(db)
    rows = con.execute("SELECT c.defense, c.attack, c.attack_params, s.sample_idx, s.adv_score, s.linf FROM samples s JOIN cells c USING (cell_id) ORDER BY 1,2,3,4").fetchall()
    con.close()
    return rows


def test_units_are_partitioned_between_ranks():
    ranks = [ProcessContext(r, 3, lambda: None, None) for r in range(3)]
    owners = [[c.owns(p) for c in ranks] for p in range(1, 31)]
    assert all(sum(o) == 1 for o in owners)


@pytest.mark.parametrize("shards,world", [(1, 1), (1, 4), (2, 3), (3, 2), (4, 4)])
def test_units_are_partitioned_between_shards_and_ranks(shards, world):
    """Every plan position belongs to exactly one (shard, rank), and consecutive units of a group alternate."""
    from robustbench_med.distributed import unit_position

    ctxs = [ProcessContext(r, world, lambda: None, None, k, shards) for k in range(shards) for r in range(world)]
    positions = [unit_position(["cell-a", "cell-b"], u) for u in range(60)]
    counts = [sum(c.owns(p) for p in positions) for c in ctxs]
    assert all(sum(c.owns(p) for c in ctxs) == 1 for p in positions)
    assert max(counts) - min(counts) <= 1, counts  # balanced within a group
    assert unit_position(["cell-b", "cell-a"], 3) == positions[3], "a group's positions do not depend on cell order"


@pytest.fixture(scope="module", autouse=True)
def linear():
    with linear_victim() as name:
        yield name


TINY = tiny_grid(name="dist4", n_examples=12)  # 6 units per pair: not a multiple of 4, so a shifted rank loses units


def _all_rows(db):
    con = sqlite3.connect(db)
    rows = con.execute("SELECT c.victim, c.defense, c.attack, c.attack_params, c.status, s.* FROM samples s JOIN cells c USING (cell_id) "
                       "ORDER BY 1,2,3,4,6,7").fetchall()
    con.close()
    return rows


def test_four_ranks_with_prefinished_pairs_compute_every_planned_row(tmp_path):
    """Issue #21: ranks that find a victim × defence already finished must not shift who owns the later units.
    identity.none is finished before the launch; of jpeg.bpda only rank 0's units are; ranks 1–3 run while rank 0
    waits at its first barrier, so rank 0 alone later finds jpeg.bpda finished. Every planned row is computed, once,
    equal to a single process; a run that leaves rows missing fails loudly."""
    from robustbench_med.runner import GridRunner, IncompleteRunError
    from robustbench_med.store import Store

    reference = _all_rows(run_grid(parse_grid(TINY), tmp_path / "single", progress=False))
    out = tmp_path / "four"
    run_grid(parse_grid({**TINY, "defenses": ["identity.none"]}), out, progress=False)  # a pre-finished pair
    db = out / "results.sqlite"
    jpeg_only = parse_grid({**TINY, "defenses": [TINY["defenses"][1]]})
    with Store(db) as store, pytest.raises(IncompleteRunError, match="missing"):  # rank 0 alone: ranks 1-3's units missing
        GridRunner(jpeg_only, store, progress=False, context=ProcessContext(0, 4, lambda: None, None)).run()

    def others():
        for rank in (1, 2, 3):
            with Store(db) as st:
                GridRunner(parse_grid(TINY), st, progress=False, context=ProcessContext(rank, 4, lambda: None, None)).run()

    calls = []
    barrier = lambda: calls.append(1) or (others() if len(calls) == 1 else None)  # noqa: E731
    with Store(db) as store:
        GridRunner(parse_grid(TINY), store, progress=False, context=ProcessContext(0, 4, barrier, None)).run()
    assert _all_rows(db) == reference
    con = sqlite3.connect(db)
    n, distinct = con.execute("SELECT COUNT(*), COUNT(DISTINCT cell_id || '-' || sample_idx) FROM samples").fetchone()
    statuses = {r[0] for r in con.execute("SELECT status FROM cells")}
    con.close()
    assert n == distinct == len(reference) == 3 * 3 * 12 and statuses == {"done"}  # the old execution counter left 12 missing


def test_writing_a_unit_twice_is_not_an_error(tmp_path):
    """Idempotent writes: the same (cell, sample) written again is kept once, without an IntegrityError."""
    from robustbench_med.store import Store

    row = {"cell_id": "c", "sample_idx": 0, "clean_score": 1.0, "adv_score": 0.0, "clean_correct": 1, "adv_correct": 0,
           "eps": 0.1, "linf": 0.1, "l2": 0.5, "valid": 1, "metrics": {"accuracy": 0.0}, "attrs": {"sex": "F"}}
    with Store(tmp_path / "s.sqlite") as store:
        assert store.write_unit([row, {**row, "sample_idx": 1}]) == 2
        assert store.write_unit([row, {**row, "sample_idx": 1}]) == 0
        assert store.done_samples("c") == {0, 1}


@pytest.mark.skipif(shutil.which("accelerate", path=os.path.dirname(sys.executable)) is None, reason="accelerate CLI not installed")
def test_two_processes_with_accelerate(tmp_path):
    rbm.create_victim("cnn.phantom", train_if_missing=True)
    reference = run_grid(parse_grid(GRID), tmp_path / "single", progress=False)
    grid_path = tmp_path / "grid.yaml"
    grid_path.write_text(yaml.safe_dump(GRID))
    launcher = os.path.join(os.path.dirname(sys.executable), "accelerate")
    # accelerate starts several processes through its `--multi_gpu` path; without GPUs they run on the CPU (gloo)
    cmd = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "-m", "robustbench_med", "run", str(grid_path), "--out", str(tmp_path / "multi"), "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    db = tmp_path / "multi" / "results.sqlite"
    con = sqlite3.connect(db)
    runs = [r[0] for r in con.execute("SELECT run_id FROM runs")]
    con.close()
    assert sum("rank0" in r for r in runs) == 1 and sum("rank1" in r for r in runs) == 1, runs
    work = {r: json.loads(m)["work"] for r, m in table(db, "SELECT run_id, manifest FROM runs")}
    pairs = ["cnn.phantom × identity.none", "cnn.phantom × detector.kd"]
    for what in ("defenses_prepared", "clean_passes"):  # one rank each; the other received the fitted detector (gloo)
        assert sorted(p for w in work.values() for p in w[what]) == sorted(pairs), work
        assert all(len(w[what]) == 1 for w in work.values()), work  # dealt: one pair per rank
    multi, single = _rows(db), _rows(reference)
    assert len(multi) == len(single) == len(set(r[:4] for r in multi))
    assert [r[:4] for r in multi] == [r[:4] for r in single]
    # same per-unit seeds; only thread-count rounding may differ between the runs
    mean = lambda rows: sum(r[4] for r in rows) / len(rows)  # noqa: E731
    assert abs(mean(multi) - mean(single)) <= 0.05
    assert (tmp_path / "multi" / "leaderboard.md").exists()


def test_a_crashed_ranks_units_are_computed_on_resume(tmp_path):
    """Rank 1 of 2 finishes, rank 0 dies before writing anything: a later single-process run fills in exactly rank
    0's units, and the store equals a single-process run (no loss, no duplicates)."""
    from robustbench_med.runner import GridRunner
    from robustbench_med.store import Store

    rbm.create_victim("cnn.phantom", train_if_missing=True)
    reference = _rows(run_grid(parse_grid(GRID), tmp_path / "single", progress=False))
    out = tmp_path / "crashed"
    out.mkdir()
    with Store(out / "results.sqlite") as store:
        GridRunner(parse_grid(GRID), store, progress=False, out_dir=out, context=ProcessContext(1, 2, lambda: None, None)).run()
    half = _rows(out / "results.sqlite")
    assert 0 < len(half) < len(reference) and set(half) <= set(reference)
    resumed = _rows(run_grid(parse_grid(GRID), out, progress=False))
    assert resumed == reference


def _open_store(path, barrier, results) -> None:
    from robustbench_med.store import Store

    barrier.wait()
    try:
        with Store(path):
            results.put("ok")
    except Exception as e:  # noqa: BLE001 - reported to the parent
        results.put(f"{type(e).__name__}: {e}")


def test_ranks_opening_a_new_store_at_once_all_succeed(tmp_path):
    """Ranks open a new store together after the start barrier; switching it to WAL takes an exclusive lock that SQLite
    refuses at once ("database is locked") instead of waiting. Measured before the retry: 4 of 30 rounds of 4
    processes failed."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    for i in range(20):
        barrier, results = ctx.Barrier(4), ctx.Queue()
        procs = [ctx.Process(target=_open_store, args=(tmp_path / f"r{i}" / "results.sqlite", barrier, results)) for _ in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        outcomes = [results.get(timeout=5) for _ in procs]
        assert outcomes == ["ok"] * 4, (i, outcomes)


class _MeanShift:
    """A learning purifier for the counting test: ``prepare`` fits the mean training image (and counts the fit);
    ``purify`` moves each input 1% towards it. An unfitted copy cannot purify, so a rank that neither fitted nor
    received the fitted state fails."""

    fits: list = []

    @staticmethod
    def make(**_kw):
        from robustbench_med.defense import InputPurifier

        class MeanShift(InputPurifier):
            name = "meanshift.learned"

            def __init__(self):
                self.mean = None

            def prepare(self, victim, train):
                _MeanShift.fits.append(victim.card.name)
                self.mean = train.images(list(range(16))).mean(0, keepdim=True)

            def purify(self, x):
                if self.mean is None:
                    raise RuntimeError("meanshift.learned used without being fitted")
                return (0.99 * x + 0.01 * self.mean.to(x.device)).clamp(0, 1)

        return MeanShift()


def test_two_ranks_fit_each_defence_and_compute_each_clean_pass_once(tmp_path, monkeypatch):
    """Issue #21: under 2 processes each defence is prepared once and each clean pass computed once (the pairs are
    dealt between the ranks); the fitted defences reach the other rank through the context's collective and the clean
    rows are read from the store. Counted on the
    calls themselves (the clean passes' seeds, a fitting defence) and in the manifests; the store equals one
    process's. The ranks are threads sharing one collective."""
    import threading

    from robustbench_med.registry import DEFENSES
    from robustbench_med.runner import GridRunner
    from robustbench_med.store import Store

    DEFENSES.add("meanshift.learned", _MeanShift.make, kind="purifier", paper="test")
    try:
        grid = parse_grid({**TINY, "name": "count", "defenses": ["identity.none", "meanshift.learned", "squeeze.bitdepth"]})
        reference = _all_rows(run_grid(grid, tmp_path / "single", progress=False))
        _MeanShift.fits.clear()
        clean_calls = []
        from robustbench_med import runner as runner_mod

        real_derive = runner_mod.derive_seed

        def derive(*parts):
            seed = real_derive(*parts)
            if "clean" in parts:
                clean_calls.append(parts)
            return seed

        monkeypatch.setattr(runner_mod, "derive_seed", derive)
        gate, slots, errors = threading.Barrier(2), [None, None], []

        def gatherer(r):
            def gather(obj):
                slots[r] = obj
                gate.wait()
                return list(slots)
            return gather

        db = tmp_path / "two" / "results.sqlite"
        db.parent.mkdir()

        def rank(r):
            try:
                with Store(db) as store:
                    GridRunner(grid, store, progress=False, context=ProcessContext(r, 2, gate.wait, None, gather=gatherer(r))).run()
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)
                gate.abort()

        threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
    finally:
        DEFENSES.remove("meanshift.learned")
    assert _MeanShift.fits == ["linear.phantom"]  # one fit, not one per rank
    assert len(clean_calls) == 3 * 3  # 3 pairs × 3 clean units of 4, computed by one rank only
    assert _all_rows(db) == reference
    work = [json.loads(m)["work"] for (m,) in table(db, "SELECT manifest FROM runs ORDER BY run_id")]
    assert sorted(w for run in work for w in run["defenses_prepared"]) == sorted(f"linear.phantom × {d}" for d in ("identity.none", "meanshift.learned", "squeeze.bitdepth"))
    assert sum(len(run["clean_passes"]) for run in work) == 3
