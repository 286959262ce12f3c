"""User code: ``--import MODULE``, factory references ``package.module:factory`` in grids, and entry points.

Importing a module executes its code, so robustbench_med imports user code only when told to:

- ``robustbench-med <command> --import mypkg`` (or :func:`allow_imports` / :func:`import_modules` in Python) imports
  ``mypkg`` (which may register victims, attacks and defences with ``register_victim`` & co.) and lets grids name
  factories inside it (``mypkg.models:build``);
- a module the caller has already imported may be named too;
- installed packages may declare entry points in the groups ``robustbench_med.victims``, ``robustbench_med.attacks``
  and ``robustbench_med.defenses`` (``name = "pkg.module:factory"``): installing a package is the explicit act, and
  they are loaded the first time a registry is asked for a name it does not know, or listed.

YAML grids are still read with ``yaml.safe_load``: object tags are refused; a factory is only ever a string.
"""
from __future__ import annotations

import importlib
import os
import re
import sys
import warnings
from importlib import metadata
from typing import Any, Callable

from robustbench_med.errors import ConfigError

ENTRY_POINT_GROUPS = {"victim": "robustbench_med.victims", "attack": "robustbench_med.attacks", "defense": "robustbench_med.defenses"}
FACTORY_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
_trusted: set[str] = set()
_loaded_groups: set[str] = set()


def allow_imports(*modules: str) -> None:
    """Let grids name factories in ``modules`` (and their submodules); importing them executes their code."""
    for m in modules:
        if not re.match(r"^[A-Za-z_][\w.]*$", m):
            raise ConfigError(f"not a module name: {m!r}")
        _trusted.add(m)


def import_modules(modules: list[str] | tuple[str, ...]) -> None:
    """Import ``modules`` (``--import``), which may register components, and trust them for factory references.

    Modules are looked up on ``sys.path`` and in the current directory (as ``python -m`` would)."""
    if modules and os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    for m in modules:
        allow_imports(m)
        try:
            importlib.import_module(m)
        except ImportError as e:
            raise ConfigError(f"--import {m}: cannot import it ({e}); is it installed or on PYTHONPATH?") from None


def is_factory_ref(value: Any) -> bool:
    return isinstance(value, str) and bool(FACTORY_RE.match(value))


def _trusted_module(module: str) -> bool:
    return module in sys.modules or any(module == t or module.startswith(t + ".") for t in _trusted)


def resolve_factory(ref: str) -> Callable[..., Any]:
    """The callable named by ``'package.module:attr'``; its module must be trusted (see the module doc)."""
    if not is_factory_ref(ref):
        raise ConfigError(f"{ref!r} is not a factory reference of the form 'package.module:factory'")
    module, _, attr = ref.partition(":")
    if not _trusted_module(module):
        top = module.split(".")[0]
        raise ConfigError(f"the grid names user code {ref!r}; importing it executes code, so it is only done when asked: "
                          f"pass --import {top} on the command line, or call robustbench_med.allow_imports({top!r})")
    try:
        obj: Any = importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(f"cannot import {module!r} for {ref!r}: {e}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{ref!r}: module {module!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{ref!r} is not callable")
    return obj


def derived_name(ref: str) -> str:
    """A registry name for a factory reference: ``mypkg.models:build_net`` → ``mypkg.build_net``."""
    module, _, attr = ref.partition(":")
    attr = attr.replace("/", ".").replace("\\", ".")
    clean = [re.sub(r"[^a-z0-9_]", "_", s.lower()).strip("_") or "x" for s in (module.split(".")[0], attr.split(".")[-1])]
    if not clean[0][0].isalnum():
        clean[0] = "u" + clean[0]
    return f"{clean[0]}.{clean[1]}"


def load_entry_points(kind: str) -> None:
    """Register the installed entry points of ``kind`` (once per process). A plugin that fails to load is skipped
    with a warning naming it, so one broken package does not break the suite."""
    group = ENTRY_POINT_GROUPS.get(kind)
    if group is None or group in _loaded_groups:
        return
    _loaded_groups.add(group)
    from robustbench_med.registry import registry_for

    registry = registry_for(kind)
    for ep in metadata.entry_points(group=group):
        try:
            obj = ep.load()
        except Exception as e:  # a broken third-party package
            warnings.warn(f"entry point {ep.name!r} ({ep.value}) of group {group} failed to load: {type(e).__name__}: {e}", stacklevel=2)
            continue
        if callable(obj) and not isinstance(obj, type(sys)) and ep.name not in registry:
            registry.add(ep.name, obj, plugin=ep.value, **dict(getattr(obj, "robustbench_med_meta", {}) or {}))
