"""Batch size that fits the device: found once per attacked model × device × input size × EOT, then remembered.

On a CUDA device the probe runs what one attack step costs on the model the attack sees: ``eot`` forward passes of
its objective (through the defence, and through the language model for an LVLM) kept in one graph, as
:meth:`Attack.expectation` does, then one backward, on copies of a real sample. It doubles the batch until it runs
out of memory or reaches the limit, then bisects between the last fit and the first failure. The result (times a
safety factor) is cached in ``<home>/batch_sizes.json``. The batch size found is only a memory cap: it never changes a
result (the runner splits a unit's call only where the split is exact, and halves the cap again on an out-of-memory
error). On the CPU memory is not the constraint and the requested batch size is used as is.
"""
from __future__ import annotations

import json
from typing import Any, Callable

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


def _repeat(value: Any, b: int) -> Any:
    """A batch of ``b`` copies of a one-sample batch (tensor targets, or lists such as LVLM answers)."""
    if isinstance(value, torch.Tensor):
        return value[:1].expand(b, *value.shape[1:]).clone()
    return list(value[:1]) * b


def _fits(step: Callable[[int], None], device: torch.device) -> Callable[[int], bool]:
    """``fits(b)``: whether ``step(b)`` runs without an out-of-memory error (other errors propagate)."""

    def fits(b: int) -> bool:
        try:
            step(b)
            return True
        except RuntimeError as e:
            if not is_oom(e):
                raise
            return False
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()

    return fits


def probe_objective(view, x: torch.Tensor, y: Any, eot: int = 1) -> Callable[[int], bool]:
    """``fits(b)``: whether ``eot`` passes of ``view.objective`` on ``b`` copies of the sample ``(x[:1], y[:1])``, held
    in one graph, and their backward run without an out-of-memory error (what one EOT attack step needs)."""

    def step(b: int) -> None:
        xb = _repeat(x, b).requires_grad_(True)
        yb = _repeat(y, b)
        sum(view.objective(xb, yb).float().sum() for _ in range(eot)).backward()

    return _fits(step, x.device)


def _probe(victim, device: torch.device) -> Callable[[int], bool]:
    """``fits(b)`` for a forward and backward of ``victim`` on ``b`` random inputs (no sample at hand)."""
    size = victim.card.input_size

    def step(b: int) -> None:
        victim(torch.rand(b, *size, device=device, requires_grad=True)).float().sum().backward()

    return _fits(step, device)


def adaptive_batch_size(victim, device: torch.device, requested: int, limit: int = 4096, *,
                        sample: tuple[torch.Tensor, Any] | None = None, eot: int = 1, tag: str = "") -> int:
    """The batch size to use for ``victim`` (the attacked model: a defended view, an LVLM) on ``device``: probed with
    :func:`probe_objective` on ``sample`` (one input and its target) with ``eot`` passes, or a plain forward and backward
    on random inputs without a sample, and cached on CUDA under ``tag`` (e.g. the defence); ``requested`` on CPU."""
    if device.type != "cuda":
        return requested
    key = (f"{victim.card.name}|{victim.card.weights_sha256}|{torch.cuda.get_device_name(device)}|{victim.card.input_size}"
           f"|{tag}|eot={eot}|{'objective' if sample is not None else 'forward'}")
    cache = paths.home() / "batch_sizes.json"
    table = json.loads(cache.read_text()) if cache.exists() else {}
    if key not in table:
        fits = probe_objective(victim, *sample, eot=eot) if sample is not None else _probe(victim, device)
        table[key] = max(1, int(largest_fitting(fits, requested, limit) * SAFETY))
        atomic_write_bytes(cache, json.dumps(table, indent=1).encode())
    return int(table[key])
