"""APGD on the victim's own objective: Auto-PGD for every task, on slices and on volumes.

Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse parameter-free attacks",
ICML 2020, §3. ``apgd.ce`` / ``apgd.dlr`` (:mod:`.torchattacks_adapters`) run torchattacks' APGD, which needs class
logits and 4-D images; ``apgd.objective`` re-implements the algorithm from the paper on the victim's per-sample
objective (CE / BCE for classifiers, per-pixel CE for segmentors, heatmap MSE for landmark detectors), so segmentors,
landmark detectors and volumetric (NCDHW) victims — attacked through sliding-window inference — get the step-size-free
attack too.

Algorithm (per sample; every quantity is per sample, so eps sweeps run in one batch):

- start at a uniform random point of the ball (each sample from its own stream); step size η⁽⁰⁾ = 2ε;
- ``z = P(x⁽ᵏ⁾ + η · s(∇f))`` with s = sign (L∞) or the unit-L2 direction (L2), then the momentum step
  ``x⁽ᵏ⁺¹⁾ = P(x⁽ᵏ⁾ + α (z − x⁽ᵏ⁾) + (1 − α)(x⁽ᵏ⁾ − x⁽ᵏ⁻¹⁾))`` with α = 0.75 (α = 1 for the first step);
- checkpoints w_j = ⌈p_j N⌉ with p₀ = 0, p₁ = 0.22, p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06);
- at a checkpoint η is halved and the iterate restarts from the best point so far when (1) fewer than ρ = 0.75 of the
  steps since the previous checkpoint increased f, or (2) neither η nor the best value changed since then;
- the point with the highest objective is returned.
"""
from __future__ import annotations

import math
from typing import ClassVar

import torch

from robustbench_med.attack import Attack
from robustbench_med.attacks.pgd import ALL_IMAGE_TASKS, _input_grad, _view, l2_normalize, project, random_start
from robustbench_med.errors import ConfigError
from robustbench_med.registry import register_attack
from robustbench_med.victim import Victim


def checkpoints(n_iter: int) -> list[int]:
    """The iterations w_j = ⌈p_j · n_iter⌉ (j ≥ 1) at which APGD may halve its step size (Croce & Hein, §3.2)."""
    p = [0.0, 0.22]
    while p[-1] < 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    return sorted({math.ceil(round(v * n_iter, 9)) for v in p[1:] if v < 1})


class APGDObjective(Attack):
    """Auto-PGD (Croce & Hein, ICML 2020) maximising the victim's per-sample objective, L∞ or L2.

    Args:
        rho: the fraction of increasing steps below which the step size is halved at a checkpoint (0.75).
        alpha: the momentum weight (0.75).
    """

    tasks: ClassVar[frozenset[str]] = ALL_IMAGE_TASKS - {"vqa"}
    supports_eps_batch: ClassVar[bool] = True
    sample_independent: ClassVar[bool] = True
    default_steps: ClassVar[int] = 50

    def __init__(self, *, rho: float = 0.75, alpha: float = 0.75, **kw) -> None:
        super().__init__(**kw)
        if self.threat.norm not in ("Linf", "L2"):
            raise ConfigError(f"apgd.objective supports norms Linf and L2, not {self.threat.norm}")
        if not 0 < float(rho) <= 1 or not 0 < float(alpha) <= 1:
            raise ConfigError(f"rho and alpha must lie in (0, 1], got {rho!r}, {alpha!r}")
        self.rho, self.alpha = float(rho), float(alpha)

    def _step(self, victim: Victim, x_adv: torch.Tensor, y: torch.Tensor, sign: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(objective, gradient direction) at ``x_adv``."""
        x_adv = x_adv.detach().requires_grad_(True)
        f = self.objective(victim, x_adv, y) * sign
        grad = _input_grad(f.sum(), x_adv)
        return f.detach().float(), grad.sign() if self.threat.norm == "Linf" else l2_normalize(grad)

    def perturb(self, victim: Victim, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        norm, sign, n_iter = self.threat.norm, (-1.0 if self.threat.targeted else 1.0), self.threat.steps
        marks = set(checkpoints(n_iter))
        eta = 2 * eps.clone()
        x_k = random_start(x, eps, norm, self.rng)
        f_k, d_k = self._step(victim, x_k, y, sign)
        best, f_best = x_k.clone(), f_k.clone()
        x_prev, increases, last = x_k.clone(), torch.zeros_like(f_k), 0
        eta_last, f_best_last = eta.clone(), f_best.clone()
        for k in range(n_iter):
            z = project(x, x_k + _view(eta, x) * d_k, eps, norm)
            a = 1.0 if k == 0 else self.alpha
            x_new = project(x, x_k + a * (z - x_k) + (1 - a) * (x_k - x_prev), eps, norm)
            f_new, d_new = self._step(victim, x_new, y, sign)
            increases += (f_new > f_k).float()
            improved = f_new > f_best
            best = torch.where(_view(improved, x), x_new, best)
            f_best = torch.where(improved, f_new, f_best)
            x_prev, x_k, f_k, d_k = x_k, x_new, f_new, d_new
            if k + 1 in marks:
                halve = (increases < self.rho * (k + 1 - last)) | ((eta == eta_last) & (f_best == f_best_last))
                eta_last, f_best_last = eta.clone(), f_best.clone()
                eta = torch.where(halve, eta / 2, eta)
                x_k = torch.where(_view(halve, x), best, x_k)
                if bool(halve.any()):  # restart from the best point: recompute its gradient where it moved
                    f_r, d_r = self._step(victim, x_k, y, sign)
                    f_k, d_k = torch.where(halve, f_r, f_k), torch.where(_view(halve, x), d_r, d_k)
                increases.zero_()
                last = k + 1
        return best.detach()


@register_attack("apgd.objective", knowledge="white-box", paper="Croce & Hein, ICML 2020")
def apgd_objective(**kw) -> APGDObjective:
    """Auto-PGD (Croce & Hein, ICML 2020) on the victim's objective: every image task, slices and volumes."""
    return APGDObjective(**kw)
