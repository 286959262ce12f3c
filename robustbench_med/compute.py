"""How victims run on the device: the grid's ``compute`` field (issue #21 item 5).

::

    compute: {autocast: bf16, channels_last: true, compile: true}

* ``autocast``: ``bf16`` or ``fp16`` runs the attacks' forward and backward passes under :func:`torch.autocast`
  (mixed precision: matrix products and convolutions in the lower precision, the rest and the adversarial examples in
  float32), usually 1.5–3× faster on GPUs with tensor cores. Evaluation — the clean pass and the scoring of every
  adversarial example — stays in float32 unless ``autocast_eval: true``, so the reported numbers are those of the
  float32 model. A victim opts out with ``card.extra["autocast"] = False``; LVLMs (whose own dtype is set when they
  are built) always do.
* ``channels_last``: the victim's weights in the NHWC memory format (faster convolutions on GPUs).
* ``compile``: :func:`torch.compile` of the victim's forward (``true``: the default backend, or a backend name such
  as ``'aot_eager'``).

Every setting can change the last bits of a result, and mixed precision more, so a grid that sets ``compute`` has
another config hash (a grid without it keeps its hash), and each cell records the settings that applied to its
victim (``extra.compute``). Off by default: the leaderboards are computed in float32.
"""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from robustbench_med.errors import ConfigError
from robustbench_med.tasks import get_task

COMPUTE_KEYS = ("autocast", "autocast_eval", "channels_last", "compile")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def parse_compute(value: Any, where: str = "compute") -> dict[str, Any]:
    """The validated ``compute`` mapping, keeping only settings that differ from the defaults (so ``{}`` = off)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: must be a mapping with keys {list(COMPUTE_KEYS)}, got {value!r}")
    unknown = sorted(set(value) - set(COMPUTE_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys: {list(COMPUTE_KEYS)}")
    out: dict[str, Any] = {}
    autocast = value.get("autocast")
    if autocast is not None:
        if autocast not in AUTOCAST_DTYPES:
            raise ConfigError(f"{where}: autocast must be one of {sorted(AUTOCAST_DTYPES)} or null, got {autocast!r}")
        out["autocast"] = autocast
    for key in ("autocast_eval", "channels_last"):
        flag = value.get(key, False)
        if not isinstance(flag, bool):
            raise ConfigError(f"{where}: {key} must be true or false, got {flag!r}")
        if flag:
            out[key] = True
    if out.get("autocast_eval") and "autocast" not in out:
        raise ConfigError(f"{where}: autocast_eval needs autocast (bf16 or fp16)")
    compile_ = value.get("compile", False)
    if not isinstance(compile_, (bool, str)) or compile_ == "":
        raise ConfigError(f"{where}: compile must be true, false or a torch.compile backend name, got {compile_!r}")
    if isinstance(compile_, str):
        from torch._dynamo import list_backends

        if compile_ not in list_backends(exclude_tags=()):
            raise ConfigError(f"{where}: compile unknown backend {compile_!r}; available: {list_backends(exclude_tags=())}")
    if compile_:
        out["compile"] = compile_
    return out


def effective(compute: dict[str, Any], victim: Any) -> dict[str, Any]:
    """The settings of ``compute`` that apply to ``victim`` (recorded with its cells)."""
    if get_task(victim.task).victim_defined or victim.card.extra.get("autocast", True) is False:
        return {k: v for k, v in compute.items() if k not in ("autocast", "autocast_eval")}
    return dict(compute)


def prepare_victim(victim: Any, compute: dict[str, Any]) -> Any:
    """``victim`` with its weights in channels_last and its forward compiled, as ``compute`` says (in place)."""
    if compute.get("channels_last"):
        victim.to(memory_format=torch.channels_last)
    if compute.get("compile"):
        backend = compute["compile"] if isinstance(compute["compile"], str) else "inductor"
        victim.forward_normalized = torch.compile(victim.forward_normalized, backend=backend)
    return victim


def precision(compute: dict[str, Any], device: torch.device, evaluation: bool = False) -> AbstractContextManager:
    """Mixed precision for the attacks' passes (and evaluation only with ``autocast_eval``), else nothing."""
    if "autocast" not in compute or (evaluation and not compute.get("autocast_eval")):
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES[compute["autocast"]])
