"""robustbench_med: adversarial robustness and fairness under attack for medical imaging models.

Public API (``__all__``: these names and the error classes of :mod:`robustbench_med.errors`; everything else is
internal)::

    create_victim, list_victims, create_attack, list_attacks, create_defense, list_defenses,
    create_dataset, list_datasets, Victim, ModelVictim, VictimCard, Attack, Defense, InputPurifier, ThreatModel,
    check_budget, wrap, build_model, benchmark, check_regression, allow_imports, run_grid, load_grid, summarize,
    summary_wide, build_entries

Public modules besides this one: ``robustbench_med.errors`` (the exceptions) and ``robustbench_med.testing`` (a
pytest helper, ``assert_no_regression``). The package logs to the ``robustbench_med`` logger and never configures
logging (the command line does; see :mod:`robustbench_med.log`).

Your own model: ``rbm.wrap(net, task="classification", mean=..., std=...)`` gives a victim;
``rbm.benchmark(net, task=..., eps="8/255")`` evaluates it and returns a DataFrame (see the README).
"""
from robustbench_med import log as _log  # noqa: F401  (the package logger and its NullHandler)
from robustbench_med.errors import (
    BudgetViolationError,
    ConfigError,
    InputContractError,
    RobustBenchMedError,
    TaskNotSupportedError,
    ThreatModelError,
    UnknownNameError,
    WeightsError,
)
from robustbench_med.threat import ThreatModel, check_budget
from robustbench_med.victim import ModelVictim, Victim, VictimCard
from robustbench_med.attack import Attack
from robustbench_med.defense import Defense, InputPurifier

# Built-in components register on import (order matters: core first).
from robustbench_med import data as _data  # noqa: E402,F401
from robustbench_med import victims as _victims  # noqa: E402,F401
from robustbench_med import attacks as _attacks  # noqa: E402,F401
from robustbench_med import defenses as _defenses  # noqa: E402,F401
from robustbench_med.api import (  # noqa: E402
    create_attack,
    create_dataset,
    create_defense,
    create_victim,
    list_attacks,
    list_datasets,
    list_defenses,
    list_victims,
)

from robustbench_med.plugins import allow_imports  # noqa: E402
from robustbench_med.wrap import build_model, wrap  # noqa: E402

__version__ = "0.1.0"

_LAZY = {"benchmark": "robustbench_med.evaluation", "check_regression": "robustbench_med.gate",
         "run_grid": "robustbench_med.runner", "load_grid": "robustbench_med.grid", "summarize": "robustbench_med.leaderboard",
         "summary_wide": "robustbench_med.leaderboard", "build_entries": "robustbench_med.entries"}


def __getattr__(name: str):
    """Heavier entry points (pandas, scipy, the runner) are imported on first use."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'robustbench_med' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The module's names including the lazily imported entry points (for completion and ``dir()``)."""
    return sorted(set(globals()) | set(_LAZY))

__all__ = [
    "Attack",
    "BudgetViolationError",
    "ConfigError",
    "Defense",
    "InputContractError",
    "InputPurifier",
    "ModelVictim",
    "RobustBenchMedError",
    "TaskNotSupportedError",
    "ThreatModel",
    "ThreatModelError",
    "UnknownNameError",
    "Victim",
    "VictimCard",
    "WeightsError",
    "allow_imports",
    "benchmark",
    "build_entries",
    "build_model",
    "check_budget",
    "check_regression",
    "create_attack",
    "create_dataset",
    "create_defense",
    "create_victim",
    "list_attacks",
    "list_datasets",
    "list_defenses",
    "list_victims",
    "load_grid",
    "run_grid",
    "summarize",
    "summary_wide",
    "wrap",
]
