"""Registries: one per component kind, with ``family.tag`` names and "did you mean" errors.

Modelled on timm's ``register_model`` / ``create_model`` / ``list_models`` (see ``shared/reference/style.md``) but
strict: a duplicate name raises instead of warning, and an unknown name lists the close matches.
"""
from __future__ import annotations

import difflib
import fnmatch
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, TypeVar

from robustbench_med.errors import ConfigError, UnknownNameError

T = TypeVar("T")
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_]*(\.[a-z0-9][a-z0-9_\-]*)+$")


@dataclass(frozen=True)
class Entry(Generic[T]):
    """A registered factory and the metadata declared with it."""

    name: str
    factory: Callable[..., T]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def family(self) -> str:
        return self.name.split(".", 1)[0]

    @property
    def tag(self) -> str:
        return self.name.split(".", 1)[1]


class Registry(Generic[T]):
    """A name → factory table for one component kind (victim, attack, defence, dataset)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, **meta: Any) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator registering ``factory`` (a class or function) under ``name`` (``family.tag``)."""

        def deco(factory: Callable[..., T]) -> Callable[..., T]:
            self.add(name, factory, **meta)
            return factory

        return deco

    def add(self, name: str, factory: Callable[..., T], **meta: Any) -> None:
        """Register ``factory`` under ``name``; a malformed or duplicate name raises :class:`ConfigError`."""
        if not NAME_RE.match(name):
            raise ConfigError(f"{self.kind} name {name!r} is not of the form 'family.tag' (lower case, digits, _ -)")
        if name in self._entries:
            raise ConfigError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = Entry(name, factory, dict(meta))

    def remove(self, name: str) -> None:
        """Unregister ``name`` (for temporary registrations, e.g. in tests)."""
        self.get(name)
        del self._entries[name]

    def get(self, name: str) -> Entry[T]:
        """The entry for ``name``; an unknown name raises :class:`UnknownNameError` listing close names (after
        looking in the installed entry points, see :mod:`robustbench_med.plugins`)."""
        if name not in self._entries:
            self._load_plugins()
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(self.unknown_message(name)) from None

    def add_user(self, name: str, factory_ref: str, **meta: Any) -> None:
        """Register the user factory ``factory_ref`` (``'package.module:factory'``, imported only when trusted: see
        :mod:`robustbench_med.plugins`; or a library model ``'timm:NAME'`` / ``'monai:CLASS'`` / ``'hf:FOLDER'``, see
        :func:`robustbench_med.wrap.build_model`) under ``name``; registering the same reference again is a no-op."""
        from robustbench_med.plugins import resolve_factory
        from robustbench_med.wrap import builder_factory, is_builder

        meta = {**meta, "factory_ref": factory_ref}
        if name in self._entries:
            if self._entries[name].meta.get("factory_ref") == factory_ref and self._entries[name].meta == meta:
                return
            raise ConfigError(f"{self.kind} {name!r} is already registered"
                              + (f" as {self._entries[name].meta['factory_ref']!r}" if "factory_ref" in self._entries[name].meta else "")
                              + f"; give {factory_ref!r} another name")
        task = (meta.get("wrap") or {}).get("task")
        self.add(name, builder_factory(factory_ref, task) if is_builder(factory_ref) else resolve_factory(factory_ref), **meta)

    def _load_plugins(self) -> None:
        from robustbench_med.plugins import load_entry_points

        load_entry_points(self.kind)

    def unknown_message(self, name: object) -> str:
        names = sorted(self._entries)
        close = difflib.get_close_matches(str(name), names, n=5, cutoff=0.5)
        if not close:  # also match on the family or tag alone: 'pgd' -> 'pgd.linf', 'pgd.l2'
            close = [n for n in names if str(name) in n.split(".")][:5]
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        return f"unknown {self.kind} {name!r}.{hint} Registered: {', '.join(names)}"

    def create(self, name: str, **kwargs: Any) -> T:
        """Build the component registered as ``name`` with ``kwargs``."""
        return self.get(name).factory(**kwargs)

    def list(self, pattern: str = "*", **meta_filter: Any) -> list[str]:
        """Sorted names matching the shell-style ``pattern`` and, optionally, metadata values."""
        self._load_plugins()
        out = []
        for name, entry in self._entries.items():
            if not fnmatch.fnmatchcase(name, pattern):
                continue
            if any(_meta_mismatch(entry.meta.get(k), v) for k, v in meta_filter.items()):
                continue
            out.append(name)
        return sorted(out)

    def __contains__(self, name: object) -> bool:
        if name not in self._entries and isinstance(name, str):
            self._load_plugins()
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)


def _meta_mismatch(have: Any, want: Any) -> bool:
    if isinstance(have, (set, frozenset, tuple, list)):
        return want not in have
    return have != want


VICTIMS: Registry[Any] = Registry("victim")
ATTACKS: Registry[Any] = Registry("attack")
DEFENSES: Registry[Any] = Registry("defense")
DATASETS: Registry[Any] = Registry("dataset")



def registry_for(kind: str) -> Registry[Any]:
    """The registry of component ``kind`` (``'victim'``, ``'attack'``, ``'defense'``, ``'dataset'``)."""
    return {"victim": VICTIMS, "attack": ATTACKS, "defense": DEFENSES, "dataset": DATASETS}[kind]


register_victim = VICTIMS.register
register_attack = ATTACKS.register
register_defense = DEFENSES.register
register_dataset = DATASETS.register
