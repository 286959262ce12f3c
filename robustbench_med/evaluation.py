"""One call for your own model, in the spirit of RobustBench's ``benchmark`` (Croce et al., NeurIPS 2021 D&B):
``benchmark(model, dataset=..., threat='Linf', eps='8/255', attacks='standard')`` returns a DataFrame: one row per
cell, a column subset of the wide summary.

The model (an ``nn.Module``, a builder name such as ``'timm:resnet18'``, or a :class:`~robustbench_med.victim.Victim`)
runs through the same grid harness, store, budget checks, reliability flags and fairness columns as the packaged
grids. Every module's training flag and the model's device are restored afterwards, and the model runs in eval mode
throughout, so its BatchNorm statistics are untouched.
"""
from __future__ import annotations

import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import pandas as pd
from torch import nn

from robustbench_med.errors import ConfigError
from robustbench_med.registry import VICTIMS
from robustbench_med.tasks import get_task
from robustbench_med.victim import Victim, restore_training_flags, training_flags

ATTACK_SUITES = ("standard", "fast")
BENCHMARK_NORMS = ("Linf", "L2")  # the norms every task has a packaged attack suite for
TIDY_COLUMNS = ("victim", "task", "metric", "defense", "attack_through", "attack", "knowledge", "norm", "eps", "eps_display",
                "n", "status", "clean", "robust", "robust_ci95_low", "robust_ci95_high", "attack_success_rate", "mean_linf",
                "mean_l2", "flags")


def attack_suite(suite: str, task: str, norm: str, spatial_dims: int = 2) -> list[dict[str, Any]]:
    """The attacks of a named suite for ``task`` under ``norm`` (eps is added by the caller).

    ``'standard'``: AutoAttack (Croce & Hein, ICML 2020) for classifiers; for dense and multi-label tasks, which
    AutoAttack cannot attack, 20-step PGD on the victim's own loss plus (L∞) the Square Attack on the same objective
    (Andriushchenko et al., ECCV 2020) as a gradient-masking check. On volumes (``spatial_dims`` 3), where
    torchattacks' AutoAttack does not run, every task gets 50-step APGD on the victim's objective plus (L∞) the
    Square Attack on it. ``'fast'``: 10-step PGD only.
    """
    if suite not in ATTACK_SUITES:
        raise ConfigError(f"attack suite must be one of {ATTACK_SUITES} or a list of attacks, got {suite!r}")
    pgd = {"name": "pgd.linf" if norm == "Linf" else "pgd.l2"}
    if suite == "fast":
        return [{**pgd, "params": {"steps": 10}}]
    if spatial_dims == 3:
        apgd = {"name": "apgd.objective", "params": {"steps": 50, **({} if norm == "Linf" else {"norm": "L2"})}}
        return [apgd, *([{"name": "square.objective", "params": {"n_queries": 500}}] if norm == "Linf" else [])]
    if get_task(task).single_label:
        return [{"name": "autoattack.standard", "params": {} if norm == "Linf" else {"norm": "L2"}}]
    out = [{**pgd, "params": {"steps": 20}}]
    if norm == "Linf":
        out.append({"name": "square.objective", "params": {"n_queries": 1000}})
    return out


@contextmanager
def registered(victim: Victim, name: str) -> Iterator[str]:
    """``victim`` registered as ``name`` for the block (the registry's factory returns this very object); its
    modules' training flags and its device are restored afterwards."""
    if name in VICTIMS:
        raise ConfigError(f"victim name {name!r} is already registered; pass name='family.tag' to choose another")
    flags = training_flags(victim)
    device = victim.device
    VICTIMS.add(name, lambda **_: victim, card=victim.card, user=True)
    try:
        yield name
    finally:
        VICTIMS.remove(name)
        victim.to(device)
        restore_training_flags(flags)


def as_user_victim(model: nn.Module | str | Victim, task: str | None, input_size: Sequence[int] | None, name: str | None,
                   **wrap_kwargs: Any) -> Victim:
    """``model`` as a victim: a :class:`Victim` as is (renamed if ``name``), anything else through ``wrap``."""
    from dataclasses import replace

    from robustbench_med.wrap import wrap

    if isinstance(model, Victim):
        if wrap_kwargs or task not in (None, model.task):
            raise ConfigError("model is already a Victim: task and wrap arguments do not apply")
        if name and name != model.card.name:
            model.card = replace(model.card, name=name)
        return model
    if task is None:
        raise ConfigError("say what the model does: task='classification' | 'binary' | 'multilabel' | 'segmentation' | 'landmark'")
    return wrap(model, task, input_size=input_size, name=name, **wrap_kwargs)


def benchmark(model: nn.Module | str | Victim, *, dataset: str = "phantom.ct", split: str = "test", task: str | None = None,
              threat: str = "Linf", eps: float | str | Sequence[float | str] = "8/255",
              attacks: str | Sequence[str | dict[str, Any]] = "standard", defenses: Sequence[str | dict[str, Any]] | None = None,
              n: int = 128, batch_size: int = 64, unit_size: int = 64, seed: int = 0, out: str | Path | None = None,
              publish: str | Path | None = None, device: str | None = None, name: str | None = None,
              target_field: str | None = None, dataset_params: dict[str, Any] | None = None, progress: bool = False,
              **wrap_kwargs: Any) -> pd.DataFrame:
    """Evaluate ``model`` under attack and return one row per victim × defence × attack × eps.

    Args:
        model: an ``nn.Module`` (wrapped with :func:`robustbench_med.wrap.wrap`; pass ``task`` and, as needed,
            ``mean``/``std``/``classes``/``output``), a builder name (``'timm:resnet18'``, ``'monai:UNet'``,
            ``'hf:FOLDER'``) with its arguments, or a ready :class:`Victim`.
        dataset, split, dataset_params: the evaluation data (default: the embedded phantom's test split).
        threat, eps: the norm (``'Linf'`` or ``'L2'``) and one or several budgets (``'8/255'``, ``0.5``).
        attacks: ``'standard'`` / ``'fast'`` (see :func:`attack_suite`) or a list of attack names or grid entries.
        defenses: defence names or grid entries (default: none, ``identity.none``).
        n, seed: examples evaluated, seed of every random choice.
        unit_size, batch_size: samples per unit (how the work is cut; part of the results' identity) and the memory
            cap per call (never changes a result); see :mod:`robustbench_med.grid`.
        out: a run directory: the result store (resumable) and the leaderboard tables and plots are kept there.
        publish: a leaderboard root: validated JSON entries are written there (for ``check`` / CI baselines).
        target_field: the dataset field with the targets (default: the phantom's field for the task).

    Returns:
        A DataFrame with the columns of :data:`TIDY_COLUMNS` and one ``robust_gap_<attribute>`` column per patient
        attribute (max − min of the group robust scores), sorted by defence, attack and eps.
    """
    from robustbench_med.api import create_dataset
    from robustbench_med.grid import parse_grid
    from robustbench_med.leaderboard import summary_wide, write_leaderboard
    from robustbench_med.runner import run_grid

    if threat not in BENCHMARK_NORMS:
        raise ConfigError(f"threat must be one of {BENCHMARK_NORMS}, got {threat!r}")
    params = dict(dataset_params or {})
    probe = create_dataset(dataset, split=split, **params)
    size = tuple(probe.images([0]).shape[1:])
    if isinstance(model, Victim):
        victim = as_user_victim(model, task, None, name, **wrap_kwargs)  # wrap arguments are refused for a Victim
    else:
        victim = as_user_victim(model, task, wrap_kwargs.pop("input_size", size), name, target_field=target_field, **wrap_kwargs)
    if tuple(victim.card.input_size) != size:
        raise ConfigError(f"the model takes {victim.card.input_size} images; dataset {dataset!r} has {size}")
    eps_list = list(eps) if isinstance(eps, (list, tuple)) else [eps]
    specs = (attack_suite(attacks, victim.task, threat, victim.card.spatial_dims) if isinstance(attacks, str)
             else [_attack_entry(a) for a in attacks])
    for spec in specs:
        spec["params"] = {"eps": eps_list, **spec.get("params", {})}
    raw = {"name": "benchmark", "dataset": {"name": dataset, "split": split, "params": params}, "n_examples": n,
           "unit_size": unit_size, "batch_size": batch_size, "seed": seed, "attacks": specs, "defenses": list(defenses or ["identity.none"])}
    with registered(victim, victim.card.name) as vname:
        raw["victims"] = [{"name": vname, "weights": None,
                           **({"target_field": target_field} if target_field else {})}]
        grid = parse_grid(raw, source="benchmark()")
        with tempfile.TemporaryDirectory(prefix="rbm_benchmark_") as tmp:
            run_dir = Path(out) if out is not None else Path(tmp)
            store = run_grid(grid, run_dir, device=device, progress=progress)
            table = summary_wide(store)
            if out is not None:
                write_leaderboard(store, run_dir)
            if publish is not None:
                from robustbench_med.entries import build_entries, write_entry

                for entry in build_entries(store):
                    write_entry(entry, publish)
    return tidy(table)


def _attack_entry(a: str | dict[str, Any]) -> dict[str, Any]:
    if isinstance(a, str):
        return {"name": a, "params": {}}
    if isinstance(a, dict) and "name" in a:
        return {**a, "params": dict(a.get("params") or {})}
    raise ConfigError(f"an attack is a name or a mapping with 'name' (and 'params'), got {a!r}")


def tidy(summary: pd.DataFrame) -> pd.DataFrame:
    """The documented columns of a :func:`~robustbench_med.leaderboard.summary_wide` table (one row per cell and per
    worst case), each metric once: :data:`TIDY_COLUMNS`, the robust gap per attribute, and the victim's secondary
    per-sample metrics, clean and attacked (``robust_iou_fg``, ``clean_hd95_px``, ``robust_mre_px``, ...)."""
    from robustbench_med.columns import is_group_column

    gaps = sorted(c for c in summary.columns if c.startswith("robust_gap_") and "[" not in c and "ci95" not in c)
    secondary = sorted(c for c in summary.columns if c.startswith(("robust_", "clean_")) and c not in TIDY_COLUMNS
                       and not is_group_column(c) and "ci95" not in c and not c.startswith("robust_worst_group"))
    cols = [c for c in TIDY_COLUMNS if c in summary.columns] + gaps + secondary
    return summary[cols].sort_values(["defense", "attack", "eps"], kind="stable").reset_index(drop=True)
