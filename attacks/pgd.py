"""Projected gradient descent for every task (classification, binary, multi-label, segmentation, landmarks).

Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks", ICLR 2018. Implemented in the project
(not through torchattacks) because it must work on dense outputs (per-pixel CE or soft Dice for segmentation,
heatmap MSE for landmarks) and take one radius per sample, so an eps sweep runs as one batch. For classifiers it
computes the same iterates as ``torchattacks.PGD`` / ``torchattacks.PGDL2`` (tested).
"""
from __future__ import annotations

from typing import ClassVar

import torch

from robustbench_med.attack import Attack, SampleRNG
from robustbench_med.errors import ConfigError
from robustbench_med.registry import register_attack
from robustbench_med.tasks import TASKS, landmark_margin, soft_dice_loss
from robustbench_med.victim import Victim

ALL_IMAGE_TASKS = frozenset(TASKS)


def _view(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.view(-1, *([1] * (like.dim() - 1)))


def l2_normalize(g: torch.Tensor) -> torch.Tensor:
    """Per-sample unit-L2 direction (zero stays zero)."""
    n = g.flatten(1).norm(dim=1).clamp_min(1e-12)
    return g / _view(n, g)


def _input_grad(loss: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """d loss / d x; zero where no gradient reaches the input (e.g. a purifier that detaches it: masked gradients)."""
    if not loss.requires_grad:
        return torch.zeros_like(x)
    grad = torch.autograd.grad(loss, x, allow_unused=True)[0]
    return torch.zeros_like(x) if grad is None else grad


def project(x: torch.Tensor, x_adv: torch.Tensor, eps: torch.Tensor, norm: str) -> torch.Tensor:
    """Project ``x_adv`` onto the ``norm`` ball of per-sample radius ``eps`` around ``x``, then onto [0, 1]."""
    delta = x_adv - x
    if norm == "Linf":
        e = _view(eps, x)
        delta = torch.maximum(torch.minimum(delta, e), -e)
    elif norm == "L2":
        n = delta.flatten(1).norm(dim=1)
        factor = torch.where(n > eps, eps / n.clamp_min(1e-12), torch.ones_like(n))
        delta = delta * _view(factor, x)
    else:
        raise ConfigError(f"PGD supports Linf and L2, not {norm}")
    return (x + delta).clamp(0, 1)


def random_start(x: torch.Tensor, eps: torch.Tensor, norm: str, rng: SampleRNG) -> torch.Tensor:
    """A uniform random point of the ``norm`` ball (L∞: uniform per pixel; L2: uniform direction and radius), each
    sample drawn from its own stream of ``rng`` (so the start does not depend on the batch it is in)."""
    if norm == "Linf":
        delta = (rng.rand_like(x) * 2 - 1) * _view(eps, x)
    else:
        direction = l2_normalize(rng.randn_like(x))
        radius = rng.rand(x) ** (1.0 / x[0].numel()) * eps
        delta = direction * _view(radius, x)
    return (x + delta).clamp(0, 1)


class PGD(Attack):
    """PGD with random start, per-sample eps, restarts (worst case kept per sample) and EOT.

    Args:
        loss: ``'default'`` (the victim's objective: CE / BCE / per-pixel CE / heatmap MSE); the subclasses set
            ``'dice'`` (soft Dice, segmentation) and ``'margin'`` (heatmap margin, landmarks).
        random_start: start from a uniform point of the ball (Madry et al.) instead of ``x``.
        step_size: default ``2.5 · eps / steps`` per sample (Madry et al.).
    """

    tasks: ClassVar[frozenset[str]] = ALL_IMAGE_TASKS
    supports_eps_batch: ClassVar[bool] = True
    sample_independent: ClassVar[bool] = True  # per-sample starts, steps and restart choices
    default_steps: ClassVar[int] = 10

    def __init__(self, *, loss: str = "default", random_start: bool = True, **kw) -> None:
        super().__init__(**kw)
        if loss not in ("default", "dice", "margin") or (loss != "default" and type(self) is PGD):
            raise ConfigError(f"PGD loss must be 'default' (pgd.dice and pgd.landmark set their own), got {loss!r}")
        if self.threat.norm not in ("Linf", "L2"):
            raise ConfigError(f"PGD supports norms Linf and L2, not {self.threat.norm}")
        self.loss_name = loss
        self.random_start = bool(random_start)

    def objective(self, victim: Victim, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.loss_name == "default":
            return super().objective(victim, x, y)
        if self.loss_name == "margin":
            return self.expectation(lambda z: landmark_margin(victim(z), y, victim.sdr_radius), x)
        return self.expectation(lambda z: soft_dice_loss(victim(z), y), x)

    def _alpha(self, eps: torch.Tensor) -> torch.Tensor:
        if self.threat.step_size is not None:
            return torch.full_like(eps, self.threat.step_size)
        return 2.5 * eps / self.threat.steps

    def _run(self, victim: Victim, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        norm, sign = self.threat.norm, (-1.0 if self.threat.targeted else 1.0)
        alpha = _view(self._alpha(eps), x)
        x_adv = self.restrict(x, random_start(x, eps, norm, self.rng) if self.random_start else x.clone())
        for _ in range(self.threat.steps):
            x_adv.requires_grad_(True)
            loss = self.objective(victim, x_adv, y).sum() * sign
            grad = _input_grad(loss, x_adv)
            step = grad.sign() if norm == "Linf" else l2_normalize(grad)
            x_adv = self.restrict(x, project(x, x_adv.detach() + alpha * step, eps, norm))
        return x_adv.detach()

    def restrict(self, x: torch.Tensor, x_adv: torch.Tensor) -> torch.Tensor:
        """Where the attacker may act: all of ``x_adv`` here; a subclass confines it (e.g. to one MRI sequence,
        :class:`robustbench_med.attacks.modality.ModalityPGD`). Called on the start and after every projection."""
        return x_adv

    def perturb(self, victim: Victim, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        best = self._run(victim, x, y, eps)
        if self.threat.restarts == 1:
            return best
        with torch.no_grad():
            best_score = next(iter(victim.evaluate(best, y).values()))
        for _ in range(self.threat.restarts - 1):
            cand = self._run(victim, x, y, eps)
            with torch.no_grad():
                score = next(iter(victim.evaluate(cand, y).values()))
            better = score < best_score
            best = torch.where(_view(better, x), cand, best)
            best_score = torch.minimum(score, best_score)
        return best


@register_attack("pgd.linf", norm="Linf", knowledge="white-box", paper="Madry et al., ICLR 2018")
def pgd_linf(**kw) -> PGD:
    """L∞ PGD (Madry et al., ICLR 2018) for every task."""
    return PGD(norm="Linf", **kw)


@register_attack("pgd.l2", norm="L2", knowledge="white-box", paper="Madry et al., ICLR 2018")
def pgd_l2(**kw) -> PGD:
    """L2 PGD (Madry et al., ICLR 2018) for every task."""
    kw.setdefault("eps", 0.5)
    return PGD(norm="L2", **kw)


class DicePGD(PGD):
    """PGD on segmentors maximising 1 − soft Dice (Milletari et al., V-Net, 3DV 2016) instead of per-pixel CE."""

    tasks: ClassVar[frozenset[str]] = frozenset({"segmentation"})

    def __init__(self, **kw) -> None:
        super().__init__(loss="dice", **kw)


@register_attack("pgd.dice", norm="Linf", knowledge="white-box", paper="Madry et al., ICLR 2018; soft-Dice objective")
def pgd_dice(**kw) -> DicePGD:
    """L∞ PGD on segmentors maximising 1 − soft Dice instead of per-pixel cross-entropy."""
    return DicePGD(**kw)


class LandmarkPGD(PGD):
    """PGD on landmark detectors maximising a heatmap margin (:func:`robustbench_med.tasks.landmark_margin`) instead of
    the heatmap MSE.

    The MSE to the target Gaussians can grow by raising the background without moving any arg-max, so PGD on it barely
    moves decoded landmarks (measured on ``unet3d.landmark``: SDR@4 vox 1.000 → 0.979 at 8/255). The margin is the
    Carlini–Wagner idea (Carlini & Wagner, IEEE S&P 2017) on heatmaps: per landmark, the highest response farther than
    the victim's SDR radius minus the highest response within it, capped at κ = 0.1, averaged over landmarks; it is
    positive exactly when the landmark is decoded outside the radius. Untargeted: no target location is chosen (unlike
    the targeted heatmap attack of Yao et al., "Miss the Point", MICCAI 2020)."""

    tasks: ClassVar[frozenset[str]] = frozenset({"landmark"})

    def __init__(self, **kw) -> None:
        super().__init__(loss="margin", **kw)


@register_attack("pgd.landmark", norm="Linf", knowledge="white-box",
                 paper="Madry et al., ICLR 2018; Carlini & Wagner, S&P 2017 margin on heatmaps")
def pgd_landmark(**kw) -> LandmarkPGD:
    """L∞ PGD on landmark detectors maximising the heatmap margin (the arg-max leaves the SDR radius)."""
    return LandmarkPGD(**kw)
