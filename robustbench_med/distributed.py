"""Multi-process / multi-GPU execution through Hugging Face ``accelerate``, and shards.

``accelerate launch -m robustbench_med run grid.yaml`` starts several processes that write one SQLite store
(transactions serialise the writers; writes are idempotent); rank 0 renders the leaderboard after a barrier.
``run --shard K/N`` runs the K-th of N independent parts of a grid into a store of its own (on any machine), and
``robustbench-med merge`` combines the shards' stores (:mod:`robustbench_med.merge`).

Who computes a unit is derived from the *plan*, never from the order of execution: every unit (one batch of samples
for one group of cells) has a plan position ``p = h + u``, where ``h`` is a stable hash of the group's cell ids and
``u`` the unit's index in the group (:func:`unit_position`). Shard K of N owns the units with ``p % N == K - 1``, and
within a shard, rank r of W owns those with ``(p // N) % W == r`` (:meth:`ProcessContext.owns`), so consecutive
units of a group alternate between shards and ranks. Whether a victim × defence was already finished, skipped or
resumed changes nothing about ownership; the runner checks at the end that every planned (cell, sample) is in the
store and fails loudly if one is missing. A crashed rank's units are simply missing from the store and are computed
on the next run, with any number of processes.

Rank 0 alone trains missing weights (the others wait at a barrier). Then the victim × defence pairs are dealt
between the ranks: each fits the defences of its own pairs (``Defense.prepare``: detectors, latent perturbers), runs
their gradient checks and computes their clean results; the fitted defences of all ranks reach every rank through
:attr:`ProcessContext.gather` (one collective per run), and the clean results are read from the store. Each defence is
thus fitted once and each clean pass computed once per run. The collectives of a launch wait up to
:data:`COLLECTIVE_TIMEOUT` (a default timeout would cut a long training or preparation).

On a CPU, each process of a launch is pinned to its own share of the cores (``torch.set_num_threads`` and, where the
OS allows it, ``os.sched_setaffinity``): ``ROBUSTBENCH_MED_RANK_THREADS`` or ``OMP_NUM_THREADS`` if set, else the
available cores divided by the processes on this machine.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import torch

from robustbench_med.errors import ConfigError

RANK_THREADS_ENV = "ROBUSTBENCH_MED_RANK_THREADS"
COLLECTIVE_TIMEOUT = timedelta(hours=12)
_SHARD = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def _alone(obj: Any) -> list[Any]:
    return [obj]


@dataclass(frozen=True)
class ProcessContext:
    """One process of a run: its rank among ``world_size`` processes on one store, and the shard (0-based
    ``shard`` of ``shards``) of the grid the store holds. ``gather(obj)`` is a collective (every rank calls it) that
    returns every rank's ``obj``, in rank order, on every rank."""

    rank: int
    world_size: int
    barrier: Callable[[], None]
    device: torch.device | None
    shard: int = 0
    shards: int = 1
    gather: Callable[[Any], list[Any]] = _alone

    def __post_init__(self) -> None:
        for name in ("rank", "world_size", "shard", "shards"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{name} must be an integer, got {value!r}")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ConfigError(f"rank must lie in [0, world_size), got rank {self.rank} of {self.world_size}")
        if self.shards < 1 or not 0 <= self.shard < self.shards:
            raise ConfigError(f"shard must lie in 1..{self.shards}, got {self.shard + 1}")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def shard_label(self) -> str:
        """``'K/N'`` (1-based) or ``'all'`` for an unsharded run."""
        return f"{self.shard + 1}/{self.shards}" if self.shards > 1 else "all"

    def shard_owns(self, position: int) -> bool:
        """Whether the unit at plan ``position`` belongs to this shard (any rank)."""
        return position % self.shards == self.shard

    def owns(self, position: int) -> bool:
        """Whether this process computes the unit at plan ``position``."""
        return self.shard_owns(position) and (position // self.shards) % self.world_size == self.rank


def unit_position(cell_ids: list[str] | tuple[str, ...], index: int) -> int:
    """The plan position of unit ``index`` of the group of ``cell_ids``: a stable hash of the group plus the index."""
    from robustbench_med.attack import derive_seed

    return derive_seed("unit-plan", *sorted(cell_ids)) % (1 << 40) + index


def parse_shard(value: str | tuple[int, int] | None) -> tuple[int, int]:
    """``'K/N'`` (1-based K, 1 ≤ K ≤ N) → (K - 1, N); ``None`` → (0, 1)."""
    if value is None:
        return 0, 1
    if isinstance(value, tuple):
        k, n = value
    else:
        m = _SHARD.match(str(value))
        if not m:
            raise ConfigError(f"--shard must be K/N with whole numbers (e.g. 2/4), got {value!r}")
        k, n = int(m.group(1)), int(m.group(2))
    if isinstance(k, bool) or isinstance(n, bool) or not isinstance(k, int) or not isinstance(n, int) or n < 1 or not 1 <= k <= n:
        raise ConfigError(f"--shard K/N needs 1 <= K <= N, got {k}/{n}")
    return k - 1, n


def _no_barrier() -> None:
    return None


def pin_rank_threads(local_rank: int, local_world: int) -> int:
    """Give this process its share of the CPU cores: intra-op threads and, where supported, a disjoint CPU
    affinity set. Returns the thread count."""
    try:
        cores = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = list(range(os.cpu_count() or 1))
    raw = os.environ.get(RANK_THREADS_ENV) or os.environ.get("OMP_NUM_THREADS")
    if raw is not None and (not raw.isdigit() or int(raw) < 1):
        raise ConfigError(f"{RANK_THREADS_ENV} / OMP_NUM_THREADS must be a positive integer, got {raw!r}")
    share = max(1, len(cores) // max(1, local_world))
    threads = int(raw) if raw is not None else share
    if len(cores) >= local_world > 1 and hasattr(os, "sched_setaffinity"):
        mine = cores[local_rank * share : (local_rank + 1) * share] or cores
        try:
            os.sched_setaffinity(0, mine)
        except OSError:
            pass
    torch.set_num_threads(threads)
    return threads


def process_context(shard: str | tuple[int, int] | None = None) -> ProcessContext:
    """Rank, world size, barrier and device from ``accelerate`` when launched with several processes; ``shard``:
    ``'K/N'`` for a sharded run.

    On a machine without GPUs ``accelerate``'s ``PartialState`` reports a single process even under its multi-process
    launcher; the launcher's ``RANK`` / ``WORLD_SIZE`` and a gloo process group (``env://``) are used instead. CPU
    processes of a launch are pinned to their share of the cores (:func:`pin_rank_threads`).
    """
    k, n = parse_shard(shard)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return ProcessContext(0, 1, _no_barrier, None, k, n)
    from accelerate import PartialState

    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
    state = PartialState(timeout=COLLECTIVE_TIMEOUT)
    if state.num_processes == world:
        from accelerate.utils import gather_object

        if state.device.type == "cpu":
            pin_rank_threads(local_rank, local_world)
        return ProcessContext(state.process_index, state.num_processes, state.wait_for_everyone, state.device, k, n,
                              lambda obj: gather_object([obj]))
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=COLLECTIVE_TIMEOUT)
    pin_rank_threads(local_rank, local_world)
    return ProcessContext(int(os.environ["RANK"]), world, dist.barrier, torch.device("cpu"), k, n, _all_gather)


def _all_gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (in rank order) on every rank of the default process group."""
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
