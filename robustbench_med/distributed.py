"""Multi-process / multi-GPU execution through Hugging Face ``accelerate``.

``accelerate launch -m robustbench_med run grid.yaml`` starts several processes; each owns the units whose position
in the (deterministic) plan is congruent to its rank, writes them to the one SQLite store (transactions serialise
the writers; primary keys forbid duplicates), and rank 0 renders the leaderboard after a barrier. A crashed rank's
units are simply missing from the store and are computed on the next run, with any number of processes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class ProcessContext:
    rank: int
    world_size: int
    barrier: Callable[[], None]
    device: torch.device | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, position: int) -> bool:
        return position % self.world_size == self.rank


def _no_barrier() -> None:
    return None


def process_context() -> ProcessContext:
    """Rank, world size, barrier and device from ``accelerate`` when launched with several processes.

    On a machine without GPUs ``accelerate``'s ``PartialState`` reports a single process even under its multi-process
    launcher; the launcher's ``RANK`` / ``WORLD_SIZE`` and a gloo process group (``env://``) are used instead.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return ProcessContext(0, 1, _no_barrier, None)
    from accelerate import PartialState

    state = PartialState()
    if state.num_processes == world:
        return ProcessContext(state.process_index, state.num_processes, state.wait_for_everyone, state.device)
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return ProcessContext(int(os.environ["RANK"]), world, dist.barrier, torch.device("cpu"))
