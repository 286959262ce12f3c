"""One grid run three ways on this machine's CPU, side by side: one process, two processes (``accelerate launch``),
and two shards run at once then merged.

    python benchmarks/bench_processes.py [--grid default] [--n-examples N] [--out runs/bench_processes]

Every run starts from an empty store with the victims' weights already trained (trained once before any timing).
Prints, per way: wall seconds and the speed-up over one process; how often each victim × defence had its defence
fitted and its clean pass computed (summed over all the processes' manifests: one each is the target, issue #21);
and how its rows compare with the one-process store (rows present, identical values, largest |Δ adv_score|: the
processes use fewer threads each, and a model's last bits may depend on the thread count).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import yaml

from robustbench_med.grid import grid_path, load_grid
from robustbench_med.merge import merge_stores
from robustbench_med.runner import resolve_device, train_missing_weights

ROWS = ("SELECT c.victim, c.defense, c.attack, c.attack_params, s.sample_idx, s.adv_score, s.adv_correct, s.linf "
        "FROM samples s JOIN cells c USING (cell_id) ORDER BY 1, 2, 3, 4, 5")


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "robustbench_med", *args]


def timed(cmds: list[list[str]], env: dict[str, str]) -> float:
    """Run ``cmds`` at once; seconds until the last ends (each must succeed)."""
    t0 = time.perf_counter()
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for c in cmds]
    for c, p in zip(cmds, procs):
        _, err = p.communicate()
        if p.returncode:
            sys.exit(f"failed ({p.returncode}): {' '.join(c)}\n{err[-3000:]}")
    return time.perf_counter() - t0


def work_counts(stores: list[Path]) -> tuple[Counter, Counter]:
    """(defence fits, clean passes) per "victim × defence", summed over every run manifest of ``stores``."""
    fits, cleans = Counter(), Counter()
    for db in stores:
        con = sqlite3.connect(db)
        for (manifest,) in con.execute("SELECT manifest FROM runs"):
            work = json.loads(manifest).get("work", {})
            fits.update(work.get("defenses_prepared", []))
            cleans.update(work.get("clean_passes", []))
        con.close()
    return fits, cleans


def rows(db: Path) -> list[tuple]:
    con = sqlite3.connect(db)
    out = con.execute(ROWS).fetchall()
    con.close()
    return out


def compare(ref: list[tuple], other: list[tuple]) -> str:
    keys = lambda rs: [r[:5] for r in rs]  # noqa: E731
    if keys(ref) != keys(other):
        return f"different rows ({len(other)} vs {len(ref)})"
    same = sum(a == b for a, b in zip(ref, other))
    worst = max((abs(a[5] - b[5]) for a, b in zip(ref, other)), default=0.0)
    flips = sum(a[6] != b[6] for a, b in zip(ref, other))
    return f"{len(other)} rows, {same} identical, max |Δ adv_score| {worst:.2e}, {flips} outcome flips"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--grid", default="default")
    p.add_argument("--n-examples", type=int, default=None, help="override the grid's n_examples (a quicker run)")
    p.add_argument("--out", default="runs/bench_processes")
    args = p.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    raw = yaml.safe_load(grid_path(args.grid).read_text())
    if args.n_examples:
        raw["n_examples"] = args.n_examples
    path = out / "grid.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    grid = load_grid(path)
    train_missing_weights(grid, resolve_device("cpu"), progress=False)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("OMP_NUM_THREADS", None)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    half = {**env, "OMP_NUM_THREADS": str(max(1, cores // 2))}
    launcher = str(Path(sys.executable).with_name("accelerate"))
    seconds = {
        "1 process": timed([cli("run", str(path), "--out", str(out / "single"), "--quiet", "--device", "cpu")], env),
        "2 processes (accelerate)": timed([[launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                                            "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "robustbench_med", "run",
                                            str(path), "--out", str(out / "two"), "--quiet", "--device", "cpu"]], env),
    }
    t0 = time.perf_counter()
    timed([cli("run", str(path), "--out", str(out / "sharded"), "--shard", f"{k}/2", "--quiet", "--device", "cpu") for k in (1, 2)], half)
    shards = sorted((out / "sharded").glob("shard-*/results.sqlite"))
    merge_stores(out / "merged" / "results.sqlite", shards)
    seconds["2 shards at once + merge"] = time.perf_counter() - t0
    stores = {"1 process": [out / "single" / "results.sqlite"], "2 processes (accelerate)": [out / "two" / "results.sqlite"],
              "2 shards at once + merge": shards}
    final = {"1 process": stores["1 process"][0], "2 processes (accelerate)": stores["2 processes (accelerate)"][0],
             "2 shards at once + merge": out / "merged" / "results.sqlite"}
    ref = rows(final["1 process"])
    print(f"grid {grid.name}: {len(grid.victims)} victims, n = {grid.n_examples}, unit_size {grid.unit_size}, {cores} cores")
    print(f"{'way':28s} {'seconds':>8s} {'speed-up':>8s}  fits/pair  clean passes/pair  rows vs 1 process")
    for way, secs in seconds.items():
        fits, cleans = work_counts(stores[way])
        span = lambda c: f"{min(c.values())}–{max(c.values())}" if c else "0"  # noqa: E731
        print(f"{way:28s} {secs:8.1f} {seconds['1 process'] / secs:7.2f}×  {span(fits):>9s}  {span(cleans):>17s}  "
              f"{compare(ref, rows(final[way]))}")


if __name__ == "__main__":
    main()
