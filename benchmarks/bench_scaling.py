"""Scaling of a grid over W workers, simulated from measured per-cell times with the runner's own plan.

    python benchmarks/bench_scaling.py [--grid zoo] [--workers 1 2 4 8 16] [--unit-sizes 128 32 16 8]

Replays the attack seconds of every cell of a published grid (``leaderboards/``, measured on one CPU process) under
the plan the runner uses: units of ``unit_size`` samples per group of cells (``unit_size // k`` for an eps batch of
k cells), each unit owned by the worker :meth:`ProcessContext.owns` names for its plan position
(:func:`unit_position`). A unit's cost is its group's measured seconds times its share of the samples (samples of a
group cost the same on average; a cascade's later samples are cheaper, which this ignores). Two schedules:

* ``barrier``: a barrier after every victim (the runner before issue #21 item 7: rank 0 trained the victim's
  weights while the others waited, victim by victim); the makespan is the sum over victims of the slowest worker.
* ``no barrier``: the runner now (missing weights trained once before any work, one barrier): the slowest worker's
  total.

The speed-up is the one-worker time over the makespan; ``ideal`` is W. Clean passes and defence fitting (done once
per run, split between the processes before the attacks) are not in the published seconds and are left out;
``bench_processes.py`` measures whole runs.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from robustbench_med.api import create_attack
from robustbench_med.distributed import ProcessContext, _no_barrier, unit_position
from robustbench_med.grid import canonical
from robustbench_med.tasks import ZERO_ONE_TASKS

ROOT = Path(__file__).resolve().parents[1] / "leaderboards"


def load_groups(grid: str) -> list[dict]:
    """The grid's groups of cells (victim, defence, attack setting without eps) with their cells and seconds."""
    groups: dict[tuple, dict] = {}
    seen: set[str] = set()
    for path in sorted(ROOT.glob("*/*/*.json")):
        entry = json.loads(path.read_text())
        if entry.get("grid") != grid:
            continue
        for r in entry["results"]:
            if not r.get("cell_id") or r["status"] != "done" or r["cell_id"] in seen or r.get("attack_seconds") is None:
                continue
            seen.add(r["cell_id"])
            params = {k: v for k, v in r["attack_params"].items() if k != "eps"}
            key = (entry["victim"], r["defense"], canonical(r["defense_params"]), r["attack_through"], r["attack"], canonical(params))
            g = groups.setdefault(key, {"victim": entry["victim"], "task": entry["task"], "attack": r["attack"],
                                        "knowledge": r["knowledge"], "n": r["n"], "params": params, "cells": [], "seconds": 0.0})
            g["cells"].append(r["cell_id"])
            g["seconds"] += float(r["attack_seconds"])
    return list(groups.values())


def unit_costs(group: dict, unit_size: int) -> list[tuple[int, float]]:
    """(plan position, seconds) of every unit of ``group`` at ``unit_size`` (the runner's rule)."""
    k, n = len(group["cells"]), group["n"]
    cascade = group["task"] in ZERO_ONE_TASKS and group["knowledge"] != "none"
    batched = not cascade and create_attack(group["attack"], **group["params"]).supports_eps_batch
    chunk = unit_size if cascade else max(1, unit_size // k) if batched else unit_size
    if not cascade and not batched:  # each cell is its own group of one
        per_cell = group["seconds"] / k
        return [(unit_position([c], u), per_cell * (min(n, s + chunk) - s) / n)
                for c in group["cells"] for u, s in enumerate(range(0, n, chunk))]
    return [(unit_position(group["cells"], u), group["seconds"] * (min(n, s + chunk) - s) / n)
            for u, s in enumerate(range(0, n, chunk))]


def makespan(groups: list[dict], unit_size: int, workers: int, barrier: bool) -> float:
    per_victim: dict[str, list[float]] = defaultdict(lambda: [0.0] * workers)
    for g in groups:
        for pos, sec in unit_costs(g, unit_size):
            owner = next(r for r in range(workers) if ProcessContext(r, workers, _no_barrier, None).owns(pos))
            per_victim[g["victim"]][owner] += sec
    if barrier:
        return sum(max(loads) for loads in per_victim.values())
    totals = [sum(loads[r] for loads in per_victim.values()) for r in range(workers)]
    return max(totals)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--grid", default="zoo")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--unit-sizes", type=int, nargs="+", default=[128, 32, 16, 8])
    args = p.parse_args()
    groups = load_groups(args.grid)
    if not groups:
        raise SystemExit(f"no published cells of grid {args.grid!r} under {ROOT}")
    total = sum(g["seconds"] for g in groups)
    print(f"grid {args.grid}: {sum(len(g['cells']) for g in groups)} cells in {len(groups)} groups, "
          f"{len({g['victim'] for g in groups})} victims, {total:.0f} s of attacks on one process")
    print(f"{'unit_size':>9s} {'schedule':>10s} " + " ".join(f"{w:>6d}w" for w in args.workers))
    for unit in args.unit_sizes:
        for barrier in (True, False):
            one = makespan(groups, unit, 1, barrier)
            cells = " ".join(f"{one / makespan(groups, unit, w, barrier):6.2f}×" for w in args.workers)
            print(f"{unit:9d} {'barrier' if barrier else 'no barrier':>10s} {cells}")


if __name__ == "__main__":
    main()
