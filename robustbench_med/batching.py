"""Batch size that fits the device: found once per victim × device × input size, then remembered.

On a CUDA device the probe runs forward + backward (what an attack step costs) on random inputs, doubling the batch
until it runs out of memory or reaches the limit, then bisecting between the last fit and the first failure. The
result (times a safety factor) is cached in ``<home>/batch_sizes.json``. On the CPU memory is not the constraint
and the requested batch size is used as is.
"""
from __future__ import annotations

import json
from typing import Callable

import torch

from robustbench_med import paths
from robustbench_med.weights import atomic_write_bytes

SAFETY = 0.8


def is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def largest_fitting(fits: Callable[[int], bool], start: int, limit: int) -> int:
    """The largest ``b`` in [1, limit] with ``fits(b)``, assuming monotonicity (doubling, then bisection)."""
    if not fits(1):
        raise RuntimeError("not even a batch of 1 fits on the device")
    lo, hi = 1, None
    b = max(1, min(start, limit))
    while hi is None:
        if fits(b):
            lo = b
            if b >= limit:
                return limit
            b = min(limit, b * 2)
        else:
            hi = b
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def _probe(victim, device: torch.device) -> Callable[[int], bool]:
    c, h, w = victim.card.input_size

    def fits(b: int) -> bool:
        try:
            x = torch.rand(b, c, h, w, device=device, requires_grad=True)
            out = victim(x)
            out.float().sum().backward()
            return True
        except RuntimeError as e:
            if not is_oom(e):
                raise
            return False
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()

    return fits


def adaptive_batch_size(victim, device: torch.device, requested: int, limit: int = 4096) -> int:
    """The batch size to use for ``victim`` on ``device`` (probed and cached on CUDA; ``requested`` on CPU)."""
    if device.type != "cuda":
        return requested
    key = f"{victim.card.name}|{victim.card.weights_sha256}|{torch.cuda.get_device_name(device)}|{victim.card.input_size}"
    cache = paths.home() / "batch_sizes.json"
    table = json.loads(cache.read_text()) if cache.exists() else {}
    if key not in table:
        table[key] = max(1, int(largest_fitting(_probe(victim, device), requested, limit) * SAFETY))
        atomic_write_bytes(cache, json.dumps(table, indent=1).encode())
    return int(table[key])
