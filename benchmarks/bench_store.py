"""Store and leaderboard scale: write 100k per-sample rows and render a leaderboard from them.

    python benchmarks/bench_store.py [--rows 100000] [--cells 50]

Prints the time to write the rows (in units of 256 rows, one transaction each, as the runner does) and the time to
summarise and render Markdown/CSV/JSON/PNG from the store. Target: seconds, not minutes.
"""
from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from robustbench_med.leaderboard import write_leaderboard
from robustbench_med.store import Store


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--cells", type=int, default=50)
    args = p.parse_args()
    per_cell = args.rows // args.cells
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as d:
        store = Store(Path(d) / "results.sqlite")
        for c in range(args.cells):
            eps = [1, 2, 4, 8][c % 4] / 255
            store.upsert_cell({"cell_id": f"c{c}", "grid": "bench", "victim": f"v{c // 8}", "task": "binary", "metric": "accuracy",
                               "defense": "identity.none", "defense_params": {}, "attack_through": "adaptive",
                               "attack": ["pgd.linf", "apgd.ce"][c // 4 % 2], "attack_params": {"eps": eps},
                               "threat": {"norm": "Linf", "eps": eps}, "dataset": "phantom.ct", "split": "test",
                               "n_examples": per_cell, "seed": 0, "weights_sha256": "0" * 64, "status": "done", "reason": "",
                               "extra": {"group_key": f"g{c // 8}", "knowledge": "white-box"}})
        t = time.perf_counter()
        for c in range(args.cells):
            for start in range(0, per_cell, 256):
                rows = []
                for i in range(start, min(per_cell, start + 256)):
                    clean = float(rng.random() < 0.9)
                    rows.append({"cell_id": f"c{c}", "sample_idx": i, "clean_score": clean, "adv_score": clean * float(rng.random() < 0.4),
                                 "clean_correct": int(clean), "adv_correct": 0, "eps": 0.03, "linf": 0.03, "l2": 1.0, "valid": 1,
                                 "metrics": {"accuracy": clean}, "attrs": {"sex": rng.choice("FM"), "age_group": rng.choice(["young", "middle", "old"])}})
                store.write_unit(rows)
        t_write = time.perf_counter() - t
        t = time.perf_counter()
        write_leaderboard(store, d)
        t_render = time.perf_counter() - t
        store.close()
    print(json.dumps({"rows": per_cell * args.cells, "write_s": round(t_write, 2), "leaderboard_s": round(t_render, 2)}))


if __name__ == "__main__":
    main()
