"""Random-noise baseline at the same budget as the attacks it accompanies (knowledge: none).

A robustness number is only meaningful next to what random noise of the same norm and radius does; a model that
falls to noise is not "broken by the attack". L∞: uniform per pixel in [−eps, eps]; L2: a uniformly random direction
scaled to the full radius eps.
"""
from __future__ import annotations

from typing import ClassVar

import torch

from robustbench_med.attack import Attack
from robustbench_med.registry import register_attack
from robustbench_med.victim import Victim
from robustbench_med.attacks.pgd import ALL_IMAGE_TASKS, _view, l2_normalize, project


class UniformNoise(Attack):
    """Random perturbation of the threat model's norm and radius (Linf: uniform; L2: on the sphere)."""

    tasks: ClassVar[frozenset[str]] = ALL_IMAGE_TASKS
    knowledge: ClassVar[str] = "none"
    uses_eot: ClassVar[bool] = False
    supports_eps_batch: ClassVar[bool] = True
    sample_independent: ClassVar[bool] = True

    def perturb(self, victim: Victim, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        if self.threat.norm == "Linf":
            delta = (self.rng.rand_like(x) * 2 - 1) * _view(eps, x)
        else:
            delta = l2_normalize(self.rng.randn_like(x)) * _view(eps, x)
        return project(x, x + delta, eps, self.threat.norm)


@register_attack("noise.uniform", knowledge="none", paper="random-noise baseline")
def noise_uniform(**kw) -> UniformNoise:
    """Uniform random noise in the threat model's ball (L∞ by default)."""
    return UniformNoise(**kw)
