"""robustbench_med: adversarial robustness and fairness under attack for medical imaging models.

Public API (everything else is internal)::

    create_victim, list_victims, create_attack, list_attacks, create_defense, list_defenses,
    create_dataset, list_datasets, Victim, Attack, Defense, ThreatModel, check_budget, run_grid
"""
from __future__ import annotations

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
from robustbench_med.registry import ATTACKS, DATASETS, DEFENSES, VICTIMS
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

__version__ = "0.1.0"

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
    "check_budget",
    "create_attack",
    "create_dataset",
    "create_defense",
    "create_victim",
    "list_attacks",
    "list_datasets",
    "list_defenses",
    "list_victims",
]
