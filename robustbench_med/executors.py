"""Running a grid on Ray (Moritz et al., "Ray: a distributed framework for emerging AI applications", OSDI 2018): a
local instance or a cluster, with the runner's own shards and ``merge`` — no scheduler of our own.

:func:`run_ray` cuts the grid into ``tasks`` shards (the runner's plan: a unit belongs to shard ``position mod N``)
and submits one Ray task per shard. Ray's queue hands the next shard to whichever worker is free, so more shards
than workers balance the load (default: 4 per worker slot). Each task runs its shard into a scratch store on its
worker and returns the store's bytes; the driver alone writes them under ``OUT/shard-K-of-N/`` as they arrive (one
writer, no shared file system needed) and finally merges them into ``OUT/results.sqlite`` with
:func:`robustbench_med.merge.merge_stores`, which refuses shards computed with different weights, data or code. A
merged Ray run therefore equals a single-process run row for row (tested on a local instance).

Before any task starts, the driver trains missing weights and prepares the grid once
(:meth:`GridRunner.prepare`): it fits every defence, runs the reliability checks and computes the clean passes into a
seed store. Each task starts from the seed store (clean rows and flags already there) and receives the fitted
defences, so no shard fits a defence or computes a clean pass again. Resuming: a shard store already under ``OUT/`` is
sent with its task instead, which resumes it (a finished shard computes nothing). Workers on other machines need the
same weights (a shared ``ROBUSTBENCH_MED_HOME``, or the weights files named in the grid): a worker whose weights
differ from the driver's would find no fitted defence for its victim and fit its own, and merge would then refuse its
store. Victims must be importable on the workers: packaged, plugins, or ``factory: module:function``.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from robustbench_med.errors import ConfigError
from robustbench_med.grid import Grid, load_grid

SHARDS_PER_SLOT = 4
FORWARDED_ENV = ("ROBUSTBENCH_MED_HOME", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HOME", "ROBUSTBENCH_MED_TRAIN_THREADS")


def _shard_task(grid: Grid, shard: str, device: str | None, previous: bytes | None, threads: int,
                prepared: bytes | None = None) -> tuple[str, bytes]:
    """Run one shard of ``grid`` on this worker (resuming ``previous``, a shard store's or the seed store's bytes, with
    the driver's fitted defences ``prepared``) and return its store."""
    import torch

    from robustbench_med.runner import prepared_from_bytes, resolve_device, run_grid, shard_dir
    from robustbench_med.store import Store

    torch.set_num_threads(max(1, threads))
    fitted = prepared_from_bytes(prepared, resolve_device(device or grid.device))
    with tempfile.TemporaryDirectory(prefix="rbm_ray_") as tmp:
        if previous is not None:
            target = shard_dir(tmp, shard) / "results.sqlite"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(previous)
        path = run_grid(grid, tmp, device=device, progress=False, shard=shard, prepared=fitted)
        with Store(path) as store:  # fold the write-ahead log into the file before it is read as bytes
            store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return shard, path.read_bytes()


def run_ray(grid: Grid | str | Path, out_dir: str | Path, *, tasks: int | None = None, address: str | None = None,
            cpus_per_task: int = 1, gpus_per_task: float = 0.0, device: str | None = None, progress: bool = True) -> Path:
    """Run ``grid`` as Ray tasks (one per shard) and merge their stores into ``out_dir/results.sqlite``.

    Args:
        tasks: number of shards (default: 4 × the cluster's CPUs ÷ ``cpus_per_task``).
        address: a running cluster (``'auto'``, ``'ray://host:10001'``); default: start a local instance.
        cpus_per_task, gpus_per_task: Ray resources of each task (a task with GPUs runs on ``cuda``).
        device: the device inside a task (default: ``cuda`` with GPUs, else the grid's).
    """
    try:
        import ray
    except ImportError:
        raise ConfigError("--executor ray needs Ray: pip install 'robustbench_med[ray]' (or pip install ray)") from None
    from tqdm.auto import tqdm

    from robustbench_med.merge import merge_stores
    from robustbench_med.runner import shard_dir, train_missing_weights
    from robustbench_med.weights import atomic_write_bytes

    if not isinstance(grid, Grid):
        grid = load_grid(grid)
    _check_resources(tasks, cpus_per_task, gpus_per_task)
    device = device or ("cuda" if gpus_per_task > 0 else None)
    train_missing_weights(grid, None if device == "cuda" else device)
    seed, fitted = _prepare(grid, device)
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}})
    try:
        n = tasks or max(1, SHARDS_PER_SLOT * int(ray.cluster_resources().get("CPU", 1) // cpus_per_task))
        out = Path(out_dir)
        remote = ray.remote(_shard_task).options(num_cpus=cpus_per_task, num_gpus=gpus_per_task)
        fitted_ref = ray.put(fitted)  # one copy in the object store, shared by every task
        pending = []
        for k in range(1, n + 1):
            existing = shard_dir(out, f"{k}/{n}") / "results.sqlite"
            previous = existing.read_bytes() if existing.exists() else seed
            pending.append(remote.remote(grid, f"{k}/{n}", device, previous, cpus_per_task, fitted_ref))
        with tqdm(total=n, desc=f"{grid.name} on Ray ({n} shards)", disable=None if progress else True) as bar:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                shard, data = ray.get(done[0])
                target = shard_dir(out, shard) / "results.sqlite"
                target.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(target, data)
                bar.update(1)
    finally:
        if started:
            ray.shutdown()
    report = merge_stores(out, [out])
    return report.out


def _prepare(grid: Grid, device: str | None) -> tuple[bytes, bytes]:
    """The driver's preparation of ``grid`` (on the CPU unless the tasks use CUDA): the seed store's bytes (clean rows
    and flags) and the fitted defences' bytes."""
    from robustbench_med.runner import GridRunner, prepared_to_bytes, resolve_device
    from robustbench_med.store import Store

    with tempfile.TemporaryDirectory(prefix="rbm_ray_seed_") as tmp:
        path = Path(tmp) / "results.sqlite"
        with Store(path) as store:
            fitted = GridRunner(grid, store, resolve_device(device or grid.device), progress=False).prepare()
            store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return path.read_bytes(), prepared_to_bytes(fitted)


def _check_resources(tasks: Any, cpus: Any, gpus: Any) -> None:
    if tasks is not None and (isinstance(tasks, bool) or not isinstance(tasks, int) or tasks < 1):
        raise ConfigError(f"--tasks must be a positive integer, got {tasks!r}")
    if isinstance(cpus, bool) or not isinstance(cpus, int) or cpus < 1:
        raise ConfigError(f"--cpus-per-task must be a positive integer, got {cpus!r}")
    if isinstance(gpus, bool) or not isinstance(gpus, (int, float)) or gpus < 0:
        raise ConfigError(f"--gpus-per-task must be a number >= 0, got {gpus!r}")
