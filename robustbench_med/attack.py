"""The attack interface: ``attack(victim, x, y) -> x_adv``, seeded, with an explicit threat model.

Subclasses implement :meth:`Attack.perturb` only. The base validates the parameters at construction (before any
work), checks the inputs and the task, puts the victim in eval mode, seeds all random number generators for the call
and restores them afterwards. It never clips or repairs the result: the harness checks every adversarial batch
against the threat model with :func:`robustbench_med.threat.check_budget`.
"""
from __future__ import annotations

import abc
import hashlib
from contextlib import contextmanager
from typing import Any, ClassVar, Iterator

import torch

from robustbench_med.errors import ConfigError, TaskNotSupportedError
from robustbench_med.threat import ThreatModel
from robustbench_med.victim import Victim, validate_images


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed derived deterministically from ``parts`` (stable across processes and runs)."""
    digest = hashlib.sha256("|".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@contextmanager
def seeded(seed: int, device: torch.device | None = None) -> Iterator[None]:
    """Seed torch's CPU (and CUDA) generators inside the block and restore their state afterwards."""
    devices = [device] if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class Attack(abc.ABC):
    """Base class of all attacks.

    Args:
        norm, eps, step_size, steps, restarts, targeted: the threat model (see :class:`ThreatModel`).
        seed: seed of every random choice the attack makes.
        eot: number of samples averaged per gradient (Expectation over Transformation) for randomised victims.

    Class attributes:
        tasks: the victim tasks the attack supports.
        knowledge: ``'white-box'``, ``'black-box'``, ``'transfer'`` or ``'none'``.
        supports_eps_batch: whether :meth:`perturb` accepts a different eps per sample (eps sweeps in one batch).
    """

    tasks: ClassVar[frozenset[str]] = frozenset()
    knowledge: ClassVar[str] = "white-box"
    supports_eps_batch: ClassVar[bool] = False
    default_norm: ClassVar[str] = "Linf"
    default_steps: ClassVar[int] = 1
    name: str = "attack"

    def __init__(
        self,
        *,
        norm: str | None = None,
        eps: float | str = 8 / 255,
        step_size: float | str | None = None,
        steps: int | None = None,
        restarts: int = 1,
        targeted: bool = False,
        seed: int = 0,
        eot: int = 1,
    ) -> None:
        self.threat = ThreatModel(
            norm=norm or self.default_norm,
            eps=eps,
            step_size=step_size,
            steps=self.default_steps if steps is None else steps,
            restarts=restarts,
            targeted=targeted,
            knowledge=self.knowledge,
        )
        if isinstance(eot, bool) or not isinstance(eot, int) or eot < 1:
            raise ConfigError(f"eot must be an integer >= 1, got {eot!r}")
        self.seed = int(seed)
        self.eot = eot

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.threat})"

    def check_task(self, victim: Victim) -> None:
        if victim.task not in self.tasks:
            raise TaskNotSupportedError(
                f"{self.name} supports tasks {sorted(self.tasks)}, not {victim.task!r} (victim {victim.card.name})"
            )

    def __call__(self, victim: Victim, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor | None = None, seed: int | None = None) -> torch.Tensor:
        """Adversarial examples for ``(x, y)``. ``eps`` optionally gives one radius per sample."""
        self.check_task(victim)
        validate_images(x, victim.card.input_size)
        if len(y) != len(x):
            raise ConfigError(f"{len(x)} images but {len(y)} targets")
        eps_t = self._eps_tensor(x, eps)
        was_training = victim.training
        victim.eval()
        try:
            with seeded(self.seed if seed is None else seed, x.device):
                x_adv = self.perturb(victim, x.detach(), y, eps_t)
        finally:
            victim.train(was_training)
        return x_adv.detach()

    def _eps_tensor(self, x: torch.Tensor, eps: torch.Tensor | None) -> torch.Tensor:
        if eps is None:
            return torch.full((len(x),), self.threat.eps, device=x.device, dtype=x.dtype)
        eps = torch.as_tensor(eps, device=x.device, dtype=x.dtype).expand(len(x))
        if (eps < 0).any():
            raise ConfigError("eps must be >= 0")
        if not self.supports_eps_batch and len(eps) and not torch.all(eps == eps[0]):
            raise ConfigError(f"{self.name} takes one eps per batch, got several")
        return eps

    def prepare(self, victim: Victim, train: Any) -> None:
        """Fit whatever the attack learns from data (e.g. HFC's feature statistics) on ``train`` (a
        ``MedicalDataset`` training split) for ``victim``, mirroring :meth:`Defense.prepare`. The harness calls it
        before attacking ``victim`` or a defence wrapper of it; attacks that learn nothing keep this no-op."""

    @abc.abstractmethod
    def perturb(self, victim: Victim, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Return adversarial examples; ``eps`` holds each sample's radius (all equal unless eps batching)."""

    def objective(self, victim: Victim, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-sample objective to maximise, averaged over ``eot`` forward passes (EOT for randomised victims)."""
        total = victim.objective(x, y)
        for _ in range(self.eot - 1):
            total = total + victim.objective(x, y)
        return total / self.eot
