"""Fitted defences as bytes between processes, loaded without unpickling arbitrary code.

A fitted defence (:meth:`robustbench_med.defense.Defense.prepared_state`) holds tensors, NumPy arrays, torch modules
and fitted scikit-learn estimators (the detectors' logistic regressions, SVMs, kernel densities with their KD-trees),
so it cannot be a safetensors file. It is written with ``torch.save`` and read with ``torch.load(weights_only=True)``:
PyTorch's restricted unpickler, which builds only the globals it is told are safe. :func:`loads` lists the globals the
bytes name (``torch.serialization.get_unsafe_globals_in_checkpoint``) and allows exactly those that pass
:func:`allowed_global`:

- the NumPy array / scalar / dtype reconstructors, and a few builtin value types (``bytes``, ``set``, ``slice`` …);
- *classes* defined in ``sklearn`` (estimators, their Cython trees and distance metrics) and the ``newObj`` helper
  scikit-learn's Cython classes pickle through (it only calls ``cls.__new__``);
- ``torch.nn`` module classes and ``nn.Module`` subclasses defined in ``robustbench_med``.

Any other global (a function such as ``os.system``, a class from another package) is refused with a
:class:`~robustbench_med.errors.WeightsError` naming it, on load and already on :func:`dumps`, so a defence whose
state would be refused fails where it is fitted, not on another rank.
"""
from __future__ import annotations

import importlib
import io
from typing import Any

import torch

from robustbench_med.errors import WeightsError

SAFE_BUILTINS = frozenset({"bytes", "bytearray", "set", "frozenset", "slice", "complex", "range"})
SAFE_NUMPY = frozenset({f"{m}.multiarray.{f}" for m in ("numpy.core", "numpy._core") for f in ("_reconstruct", "scalar")}
                       | {"numpy.ndarray", "numpy.dtype"})


def _resolve(name: str) -> Any:
    module, _, attr = name.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError):
        return None


def allowed_global(name: str) -> Any | None:
    """The object behind global ``name`` ('module.attr') when it is on the allowlist (module docstring), else None."""
    module, _, attr = name.rpartition(".")
    if module == "builtins":
        return _resolve(name) if attr in SAFE_BUILTINS else None
    if name in SAFE_NUMPY or module == "numpy.dtypes":
        return _resolve(name)
    obj = _resolve(name)
    if obj is None:
        return None
    root = module.split(".")[0]
    if root == "sklearn":
        return obj if isinstance(obj, type) or attr == "newObj" else None
    if isinstance(obj, type) and issubclass(obj, torch.nn.Module) and (module.startswith("torch.nn.") or root == "robustbench_med"):
        return obj
    return None


def _checked_globals(data: bytes) -> list[Any]:
    names = torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(data))
    refused = [n for n in names if allowed_global(n) is None]
    if refused:
        raise WeightsError(f"fitted defence state names globals outside the safe list: {sorted(refused)}; only NumPy "
                          "arrays, scikit-learn classes and torch modules are exchanged (robustbench_med.safe_state)")
    return [allowed_global(n) for n in names] + _numpy_dtype_classes()


def _numpy_dtype_classes() -> list[type]:
    """The classes of NumPy's dtype instances (``Float64DType`` …): the unpickler builds them without naming them."""
    import numpy.dtypes

    return [getattr(numpy.dtypes, n) for n in dir(numpy.dtypes) if n.endswith("DType")]


def dumps(state: Any) -> bytes:
    """``state`` as bytes :func:`loads` accepts (raises WeightsError now if it would not)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    _checked_globals(data)
    return data


def loads(data: bytes, device: torch.device | str | None = None) -> Any:
    """The inverse of :func:`dumps` through ``torch.load(weights_only=True)`` with only the allowed globals."""
    with torch.serialization.safe_globals(_checked_globals(data)):
        return torch.load(io.BytesIO(data), map_location=device, weights_only=True)
