"""``create_*`` / ``list_*`` for victims, attacks, defences and datasets."""
from __future__ import annotations

import os
from typing import Any

import torch

from robustbench_med.errors import ConfigError, WeightsError
from robustbench_med.registry import ATTACKS, DATASETS, DEFENSES, VICTIMS


def list_victims(pattern: str = "*", **meta: Any) -> list[str]:
    """Registered victim names matching ``pattern`` (e.g. ``'*.phantom*'``) and metadata (e.g. ``task='binary'``)."""
    return VICTIMS.list(pattern, **meta)


def list_attacks(pattern: str = "*", **meta: Any) -> list[str]:
    return ATTACKS.list(pattern, **meta)


def list_defenses(pattern: str = "*", **meta: Any) -> list[str]:
    return DEFENSES.list(pattern, **meta)


def list_datasets(pattern: str = "*", **meta: Any) -> list[str]:
    return DATASETS.list(pattern, **meta)


def create_victim(
    name: str,
    *,
    weights: str | os.PathLike[str] | None = "auto",
    train_if_missing: bool = False,
    device: str | torch.device | None = None,
    progress: bool = True,
    **kwargs: Any,
):
    """Build victim ``name`` in eval mode.

    Args:
        weights: ``'auto'`` loads the project-trained weights from the cache (training them first when
            ``train_if_missing``, also when the cached ones are stale: trained with another recipe, data or training
            loop); a path loads that file (safetensors or weights-only torch); ``None`` keeps the
            random initialisation.
        device: where to put the victim (default CPU).
        progress: show a progress bar while training missing weights.
        kwargs: passed to the victim's factory (e.g. a config variant).
    """
    from robustbench_med.weights import load_weights, weights_path
    from robustbench_med.wrap import build_victim, is_user_victim

    entry = VICTIMS.get(name)
    user = is_user_victim(name)
    victim = build_victim(name, **kwargs)
    hint = f"Rebuild it with `robustbench-med train {name} --force`." if entry.meta.get("recipe") else ""
    path = None
    if weights == "auto" and user and not weights_path(name).exists():
        weights = None  # a user factory's own weights (their sha256 is on the card, see robustbench_med.wrap)
    if weights == "auto":
        path = weights_path(name)
        if entry.meta.get("recipe") is None and not path.exists():
            raise WeightsError(f"victim {name!r} needs a weights file: pass weights=PATH")
        if train_if_missing and entry.meta.get("recipe") is not None:
            from robustbench_med.training import train_victim

            train_victim(name, progress=progress, device=device)  # trains when missing or stale (other recipe, data or loop)
        elif not path.exists():
            raise WeightsError(f"no trained weights for {name!r} at {path}. Train them with `robustbench-med train {name}`.")
    elif weights is not None:
        path = weights
    if path is not None:
        digest = load_weights(victim, path, hint=hint)
        victim.card = victim.card.with_weights(str(path), digest)
    if device is not None:
        victim = victim.to(device)
    return victim.eval()


def create_attack(name: str, **params: Any):
    """Build attack ``name`` with its threat-model parameters (validated before any work: a ``norm`` that the name
    fixes or that contradicts the registered norm, and an unknown parameter, raise :class:`ConfigError`)."""
    from robustbench_med.attack import validate_attack_params

    entry = ATTACKS.get(name)
    validate_attack_params(name, params, entry.meta.get("norm"))
    try:
        attack = entry.factory(**params)
    except TypeError as e:
        raise ConfigError(f"attack {name!r}: {e}") from None
    attack.name = name
    return attack


def create_defense(name: str, **params: Any):
    defense = DEFENSES.create(name, **params)
    defense.name = name
    return defense


def create_dataset(name: str, **params: Any):
    """Build dataset ``name`` (e.g. ``create_dataset('phantom.ct', split='test', n=256)``)."""
    return DATASETS.create(name, **params)
