"""Exception hierarchy of robustbench_med.

Every error the suite raises on bad input derives from :class:`RobustBenchMedError`, so callers can catch one
type. The tree::

    RobustBenchMedError
    ├── UnknownNameError (also KeyError)      unknown registry name; lists close names
    ├── ConfigError (also ValueError)         malformed grid spec or bad parameter; names file and field
    │   └── ThreatModelError                  invalid threat model (eps < 0, steps < 1, unknown norm …)
    ├── InputContractError (also ValueError)  tensor violates a victim's input contract (shape, range, NaN)
    ├── TaskNotSupportedError                 an attack or defence asked to work on a task it does not support
    ├── WeightsError                          missing, corrupted, mismatched or unsafe checkpoint
    └── BudgetViolationError                  an adversarial example exceeds its threat model
"""
from __future__ import annotations


class RobustBenchMedError(Exception):
    """Base class of all robustbench_med errors."""


class UnknownNameError(RobustBenchMedError, KeyError):
    """A registry lookup failed; the message lists the closest registered names."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class ConfigError(RobustBenchMedError, ValueError):
    """A configuration (grid YAML, parameters) is malformed."""


class ThreatModelError(ConfigError):
    """A threat model is invalid (negative eps, unknown norm, steps < 1, …)."""


class InputContractError(RobustBenchMedError, ValueError):
    """An input tensor violates the victim input contract: NCHW float in [0, 1], finite, declared size."""


class TaskNotSupportedError(RobustBenchMedError, ValueError):
    """An attack or defence does not support the victim's task."""


class WeightsError(RobustBenchMedError):
    """A weights file is missing, corrupted, mismatched or unsafe to load."""


class BudgetViolationError(RobustBenchMedError):
    """An adversarial example is outside its threat model (norm budget, [0, 1] range, finiteness)."""


def check_choice(value: object, choices: tuple | list | frozenset | set, what: str) -> None:
    """Raise :class:`ConfigError` ``"<what> must be one of <choices>, got <value>"`` unless ``value`` is a choice."""
    if value not in choices:
        raise ConfigError(f"{what} must be one of {tuple(choices)}, got {value!r}")
