"""Store and leaderboard scale: write 100k per-sample rows and render a leaderboard from them.

    python benchmarks/bench_store.py [--rows 100000] [--cells 50] [--repeats 3]

Prints, as one JSON line, the time to write the rows (in units of 256 rows, one transaction each, as the runner does)
and the time to summarise and render Markdown/CSV/JSON/PNG from the store (fairness columns with 200 bootstrap
resamples per cell, as :func:`robustbench_med.leaderboard.write_leaderboard` does):

- ``leaderboard_s``: the first render in a fresh process (it also imports the report modules, Matplotlib and SciPy
  on first use);
- ``leaderboard_warm_s``: the median of ``--repeats`` further renders, each from a newly opened store (so the store
  is read and decoded again; only the imports are warm), with ``leaderboard_warm_cpu_s`` its process CPU time (less
  sensitive to other load on a shared machine);
- ``summarize_s`` / ``summarize_no_fairness_s`` (and ``_cpu_s``): medians of
  :func:`~robustbench_med.leaderboard.summarize` with and without the fairness columns, measured alternately in the
  same process: their difference is the price of the fairness columns.

Target (issue #18): render ≤ 2 s on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

from robustbench_med.leaderboard import summarize, write_leaderboard
from robustbench_med.store import Store


def fill(store: Store, rows: int, cells: int) -> float:
    """Write ``cells`` binary-classifier cells of ``rows // cells`` samples (random sex / age group per row);
    returns the seconds spent writing the samples."""
    per_cell = rows // cells
    rng = random.Random(0)
    for c in range(cells):
        eps = [1, 2, 4, 8][c % 4] / 255
        store.upsert_cell({"cell_id": f"c{c}", "grid": "bench", "victim": f"v{c // 8}", "task": "binary", "metric": "accuracy",
                           "defense": "identity.none", "defense_params": {}, "attack_through": "adaptive",
                           "attack": ["pgd.linf", "apgd.ce"][c // 4 % 2], "attack_params": {"eps": eps},
                           "threat": {"norm": "Linf", "eps": eps}, "dataset": "phantom.ct", "split": "test",
                           "n_examples": per_cell, "seed": 0, "weights_sha256": "0" * 64, "status": "done", "reason": "",
                           "extra": {"group_key": f"g{c // 8}", "knowledge": "white-box"}})
    t = time.perf_counter()
    for c in range(cells):
        for start in range(0, per_cell, 256):
            batch = []
            for i in range(start, min(per_cell, start + 256)):
                clean = float(rng.random() < 0.9)
                batch.append({"cell_id": f"c{c}", "sample_idx": i, "clean_score": clean, "adv_score": clean * float(rng.random() < 0.4),
                              "clean_correct": int(clean), "adv_correct": 0, "eps": 0.03, "linf": 0.03, "l2": 1.0, "valid": 1,
                              "metrics": {"accuracy": clean}, "attrs": {"sex": rng.choice("FM"), "age_group": rng.choice(["young", "middle", "old"])}})
            store.write_unit(batch)
    return time.perf_counter() - t


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of one call."""
    t, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t, time.process_time() - c


def render(path: Path, out: str) -> None:
    """Summarise and render every report from a newly opened store (nothing decoded is reused)."""
    with Store(path) as st:
        write_leaderboard(st, out)


def summary(path: Path, fairness_boot: int) -> None:
    with Store(path) as st:
        summarize(st, fairness_boot=fairness_boot)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--cells", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "results.sqlite"
        with Store(path) as store:
            t_write = fill(store, args.rows, args.cells)
        t_first, _ = timed(lambda: render(path, d))
        warm = [timed(lambda: render(path, d)) for _ in range(args.repeats)]
        plain, fair = [], []
        for _ in range(args.repeats):  # alternately, so both see the same load
            plain.append(timed(lambda: summary(path, 0)))
            fair.append(timed(lambda: summary(path, 200)))

    def med(runs: list[tuple[float, float]], i: int) -> float:
        return round(statistics.median(r[i] for r in runs), 2)

    print(json.dumps({
        "rows": args.rows // args.cells * args.cells, "write_s": round(t_write, 2), "leaderboard_s": round(t_first, 2),
        "leaderboard_warm_s": med(warm, 0), "leaderboard_warm_cpu_s": med(warm, 1),
        "summarize_s": med(fair, 0), "summarize_no_fairness_s": med(plain, 0),
        "summarize_cpu_s": med(fair, 1), "summarize_no_fairness_cpu_s": med(plain, 1),
    }))


if __name__ == "__main__":
    main()
