"""Threat models and the budget check every adversarial example must pass.

A :class:`ThreatModel` states what the attacker may do: the norm and radius of the perturbation, the optimiser's
step size, steps and restarts, whether the attack is targeted, and how much it knows (white-box, black-box or none).
:func:`check_budget` verifies an adversarial batch against it (Lp norm ≤ eps + tol, values in [0, 1], finite).

A *corruption* (``norm='corruption'``, :mod:`robustbench_med.attacks.corruption`) is a threat model of its own kind:
a fixed, seeded image corruption (motion, bias field, JPEG …) with no eps ball. Its ``eps`` field carries the
integer *severity* (0–5, 0 = identity; ImageNet-C's five levels, Hendrycks & Dietterich, ICLR 2019), so the grid,
store and leaderboard group corruption cells by severity exactly as they group attacks by eps. Its budget check
records the severity instead of bounding a norm; range [0, 1] and finiteness are still checked and the L∞ / L2 / L1
norms of the change are still computed.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any

import torch

from robustbench_med.errors import ThreatModelError

NORMS = ("Linf", "L2", "L1")
CORRUPTION = "corruption"  # the norm field of a corruption threat model (no eps ball; eps holds the severity)
MAX_SEVERITY = 5
THREAT_NORMS = NORMS + (CORRUPTION,)
KNOWLEDGE = ("white-box", "black-box", "transfer", "none")
BUDGET_TOL = 1e-6
_FRACTION = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*/\s*([0-9]*\.?[0-9]+)\s*$")


def parse_eps(value: Any) -> float:
    """A radius from a number or a fraction string such as ``"8/255"`` (never ``eval``)."""
    if isinstance(value, bool):
        raise ThreatModelError(f"eps must be a number or 'a/b', got {value!r}")
    if isinstance(value, (int, float)):
        eps = float(value)
    elif isinstance(value, str):
        m = _FRACTION.match(value)
        try:
            eps = float(m.group(1)) / float(m.group(2)) if m else float(value)
        except (ValueError, ZeroDivisionError):
            raise ThreatModelError(f"eps must be a number or 'a/b', got {value!r}") from None
    else:
        raise ThreatModelError(f"eps must be a number or 'a/b', got {value!r}")
    if not math.isfinite(eps) or eps < 0:
        raise ThreatModelError(f"eps must be finite and >= 0, got {value!r}")
    return eps


def eps_display(eps: float, norm: str | None = None) -> str:
    """A human form of ``eps``: ``'8/255'`` when it is a whole number of 255ths, else a short decimal; for a
    corruption (``norm='corruption'``) the severity as an integer, ``'3'``."""
    if norm == CORRUPTION:
        return str(int(round(eps)))
    k = eps * 255
    if abs(k - round(k)) < 1e-6 and eps > 0:
        return f"{round(k)}/255"
    return f"{eps:g}"


def canonical_norm(norm: str) -> str:
    """Map spellings such as ``'linf'``, ``'inf'``, ``'l2'`` to ``'Linf'``, ``'L2'``, ``'L1'``."""
    key = str(norm).strip().lower().replace("_", "")
    table = {"linf": "Linf", "inf": "Linf", "l∞": "Linf", "l2": "L2", "2": "L2", "l1": "L1", "1": "L1", CORRUPTION: CORRUPTION}
    if key not in table:
        raise ThreatModelError(f"unknown norm {norm!r}; choose one of {', '.join(THREAT_NORMS)}")
    return table[key]


@dataclass(frozen=True)
class ThreatModel:
    """What the attacker may do. Validated on construction: invalid values raise :class:`ThreatModelError`.

    Attributes:
        norm: ``'Linf'``, ``'L2'``, ``'L1'``, or ``'corruption'`` (a common corruption: no eps ball).
        eps: radius of the perturbation ball (in [0, 1] pixel units); for a corruption, its integer severity 0–5.
        step_size: optimiser step (``None`` for attacks without one).
        steps: optimiser iterations (≥ 1).
        restarts: random restarts (≥ 1).
        targeted: whether the attack aims at a target label.
        knowledge: ``'white-box'`` (gradients), ``'black-box'`` (queries only), ``'transfer'`` (gradients of a
            surrogate model, none of the victim) or ``'none'`` (random noise).
    """

    norm: str = "Linf"
    eps: float = 8 / 255
    step_size: float | None = None
    steps: int = 1
    restarts: int = 1
    targeted: bool = False
    knowledge: str = "white-box"

    def __post_init__(self) -> None:
        object.__setattr__(self, "norm", canonical_norm(self.norm))
        object.__setattr__(self, "eps", parse_eps(self.eps))
        if self.norm == CORRUPTION and (self.eps != int(self.eps) or self.eps > MAX_SEVERITY):
            raise ThreatModelError(f"a corruption's severity must be an integer in 0..{MAX_SEVERITY}, got {self.eps!r}")
        if self.step_size is not None:
            step = parse_eps(self.step_size)
            if step <= 0:
                raise ThreatModelError(f"step_size must be > 0, got {self.step_size!r}")
            object.__setattr__(self, "step_size", step)
        for name in ("steps", "restarts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ThreatModelError(f"{name} must be an integer >= 1, got {value!r}")
        if self.knowledge not in KNOWLEDGE:
            raise ThreatModelError(f"unknown knowledge {self.knowledge!r}; choose one of {', '.join(KNOWLEDGE)}")

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["eps_display"] = eps_display(self.eps, self.norm)
        return d


def lp_norms(delta: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample L∞, L2 and L1 norms of a perturbation batch (float64 for a stable check)."""
    flat = delta.detach().flatten(1).double()
    return {"Linf": flat.abs().amax(1), "L2": flat.norm(p=2, dim=1), "L1": flat.abs().sum(1)}


@dataclass(frozen=True)
class BudgetReport:
    """Outcome of :func:`check_budget` for one batch."""

    valid: bool
    n: int
    n_over_budget: int
    n_out_of_range: int
    n_non_finite: int
    max_excess: float
    norms: dict[str, torch.Tensor]
    severity: float | None = None  # a corruption's severity (recorded instead of an eps bound); None for Lp norms

    def reason(self) -> str:
        parts = []
        if self.n_over_budget:
            parts.append(f"{self.n_over_budget}/{self.n} samples exceed eps (max excess {self.max_excess:.3g})")
        if self.n_out_of_range:
            parts.append(f"{self.n_out_of_range}/{self.n} samples leave [0, 1]")
        if self.n_non_finite:
            parts.append(f"{self.n_non_finite}/{self.n} samples are not finite")
        return "; ".join(parts) or "valid"


def check_budget(
    x: torch.Tensor, x_adv: torch.Tensor, norm: str, eps: float | torch.Tensor, tol: float = BUDGET_TOL
) -> BudgetReport:
    """Check ``x_adv`` against the threat model: ``‖x_adv − x‖_norm ≤ eps + tol``, values in [0, 1], finite.

    ``eps`` may be a scalar or a per-sample tensor. Nothing is clipped or repaired: the report says what is wrong.
    For ``norm='corruption'`` there is no ball: ``eps`` is the severity, recorded in ``report.severity`` (the mean
    when per sample), and only range and finiteness decide validity; ``report.norms`` holds the L∞ / L2 / L1 sizes of
    the change all the same.
    """
    if x.shape != x_adv.shape:
        return BudgetReport(False, x.shape[0], x.shape[0], 0, 0, math.inf, {})
    norm = canonical_norm(norm)
    finite = torch.isfinite(x_adv).flatten(1).all(1)
    in_range = ((x_adv >= 0) & (x_adv <= 1)).flatten(1).all(1) & finite
    delta = torch.where(torch.isfinite(x_adv), x_adv - x, torch.zeros_like(x))
    norms = lp_norms(delta)
    eps_t = torch.as_tensor(eps, dtype=torch.float64, device=x.device).expand(x.shape[0])
    severity = None
    if norm == CORRUPTION:
        severity = float(eps_t.mean()) if x.shape[0] else float(torch.as_tensor(eps, dtype=torch.float64).mean())
        excess = torch.zeros_like(eps_t)
    else:
        excess = norms[norm] - eps_t
    over = excess > tol
    return BudgetReport(
        valid=bool(finite.all() and in_range.all() and not over.any()),
        n=x.shape[0],
        n_over_budget=int(over.sum()),
        n_out_of_range=int((~in_range & finite).sum()),
        n_non_finite=int((~finite).sum()),
        max_excess=float(excess.max().clamp_min(0)) if x.shape[0] else 0.0,
        norms={k: v.float().cpu() for k, v in norms.items()},
        severity=severity,
    )
