"""Two CPU processes through `accelerate launch` write one store without duplicates, equal to a single process."""
import os
import shutil
import sqlite3
import subprocess
import sys

import pytest
import yaml

import robustbench_med as rbm
from robustbench_med.distributed import ProcessContext
from robustbench_med.grid import parse_grid
from robustbench_med.runner import run_grid

GRID = {
    "name": "dist", "n_examples": 32, "batch_size": 8, "victims": ["cnn.phantom"],
    "attacks": [{"name": "pgd.linf", "params": {"eps": ["2/255", "8/255"], "steps": 3}}, {"name": "fgsm.linf", "params": {"eps": "4/255"}}],
}


def _rows(db):
    con = sqlite3.connect(db)
    rows = con.execute("SELECT c.attack, c.attack_params, s.sample_idx, s.adv_score, s.linf FROM samples s JOIN cells c USING (cell_id) ORDER BY 1,2,3").fetchall()
    con.close()
    return rows


def test_units_are_partitioned_between_ranks():
    ranks = [ProcessContext(r, 3, lambda: None, None) for r in range(3)]
    owners = [[c.owns(p) for c in ranks] for p in range(1, 31)]
    assert all(sum(o) == 1 for o in owners)


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
    multi, single = _rows(db), _rows(reference)
    assert len(multi) == len(single) == len(set((r[0], r[1], r[2]) for r in multi))
    assert [r[:3] for r in multi] == [r[:3] for r in single]
    # same per-unit seeds; only thread-count rounding may differ between the runs
    mean = lambda rows: sum(r[3] for r in rows) / len(rows)  # noqa: E731
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
