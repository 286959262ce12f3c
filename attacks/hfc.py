"""HFC: the Hierarchical Feature Constraint, an add-on that camouflages adversarial features (L∞).

Yao, He, Lin, Ma, Zheng, Zhou, "A Hierarchical Feature Constraint to Camouflage Medical Adversarial Attacks",
MICCAI 2021 (released ``HFC_Attack.py``). An adversarial image x′ is pushed towards a target class t while its
global-average-pooled features f_l(x′) are pulled into the densest mode of the target class's feature distribution
(per-class, per-layer Bayesian Gaussian mixtures, :mod:`robustbench_med.feature_stats`). Minimised over x′::

    ℒ(x′) = base(x′, t) + λ · Σ_l (1/C_l) ‖(f_l(x′) − μ_k*) L_k*‖²

with k* the most likely component of GMM(t, l) at f_l(x′) (chosen without gradient) and ``base`` the cross-entropy
towards t (BIM / MI-FGSM / PGD) or the Carlini–Wagner margin max(max_{j≠t} z_j − z_t + κ, 0) (CW). ``lam=0`` gives
the base attack with exactly the same optimiser, budget and target.

Optimiser (the released code): g ← μ·g + ∇ℒ/‖∇ℒ‖₂ (per sample), x′ ← Π_ε(x′ − α·sign(g)), clipped to [0, 1];
μ = 0 (BIM, PGD, CW) or 0.5 (MI-FGSM; Dong et al., CVPR 2018 use μ = 1 with an L1 normalisation). PGD starts from a
uniform point of the ε-ball (Madry et al., ICLR 2018), the others from x. Default step α = 2ε/steps (the released
schedule: steps = 2·⌊ε/α⌋).

Target: the ``y`` the harness passes when the threat model is targeted; otherwise the flipped label for binary
tasks and, for multi-class tasks, the rule ``target``: ``'likely'`` (default: the most probable wrong class on the
clean input) or ``'next'`` ((y + 1) mod C, as the harness's targeted mode).

Statistics: :meth:`HFCAttack.prepare` (called by the harness with the grid's training split, like
``Defense.prepare``) fits or loads the mixtures of the undefended victim; an unprepared attack with λ > 0 raises a
``ConfigError`` unless ``stats_dataset`` names a registered dataset to fit on.
"""
from __future__ import annotations

import math
from typing import Any, ClassVar, Sequence

import torch

from robustbench_med.attack import Attack
from robustbench_med.attacks.pgd import _view, l2_normalize, project, random_start
from robustbench_med.errors import ConfigError
from robustbench_med.feature_stats import (HIERARCHIES, FeatureStats, base_victim, fit_feature_stats, module_activations,
                                           victim_fingerprint)
from robustbench_med.registry import register_attack
from robustbench_med.tasks import get_task
from robustbench_med.victim import Victim

TARGET_RULES = ("likely", "next")
BASE_LOSSES = ("ce", "cw")


class HFCAttack(Attack):
    """HFC on top of a BIM-style L∞ optimiser (see the module docstring; Yao et al., MICCAI 2021).

    Args:
        lam: λ, weight of the feature constraint (0 = the base attack).
        layers: feature layers of the undefended victim to constrain (default: the ``hierarchy``).
        hierarchy: ``'blocks'`` (default: the victim's 3–4 block or stage outputs) or ``'conv'`` (every convolution
            module, as the released code constrains every conv feature map of VGG16 / ResNet-50).
        n_components: K, mixture components per class and layer.
        stats_seed: seed of the mixture fit (independent of the attack's per-batch ``seed``).
        stats_dataset, stats_split, stats_n, stats_target_field: the data the statistics are fitted on. By default
            the training split handed to :meth:`prepare` (the harness passes the grid's); ``stats_dataset`` names a
            registered dataset to fit on instead (its ``stats_split``), which also lets the attack run unprepared.
            ``stats_n`` keeps the first n images; labels come from ``stats_target_field`` (default the victim's
            training-recipe field; ``'predicted'``: the victim's own predictions).
        max_channels: layers with more channels are left out of the constraint (512 in the released code).
        reg_covar: covariance regulariser of the mixture fit.
        target: multi-class target rule, ``'likely'`` or ``'next'``.
        kappa: CW confidence κ (CW variant only; the released code uses 100).
        momentum: μ of the gradient accumulation (default 0, or 0.5 for MI-FGSM).
    """

    tasks: ClassVar[frozenset[str]] = frozenset({"binary", "classification"})
    supports_eps_batch: ClassVar[bool] = True
    sample_independent: ClassVar[bool] = True  # per-sample targets, losses, normalised momentum and starts
    default_steps: ClassVar[int] = 20
    base_loss: ClassVar[str] = "ce"
    default_momentum: ClassVar[float] = 0.0
    starts_random: ClassVar[bool] = False

    def __init__(
        self,
        *,
        lam: float = 1.0,
        layers: Sequence[str] | None = None,
        hierarchy: str = "blocks",
        n_components: int = 2,
        stats_seed: int = 0,
        stats_dataset: str | None = None,
        stats_split: str = "train",
        stats_n: int | None = None,
        stats_target_field: str | None = None,
        max_channels: int = 512,
        reg_covar: float = 1e-4,
        target: str = "likely",
        kappa: float = 100.0,
        momentum: float | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(**kw)
        if self.threat.norm != "Linf":
            raise ConfigError(f"HFC is an L∞ attack (released algorithm); got norm {self.threat.norm}")
        if self.threat.restarts != 1:
            raise ConfigError(f"HFC runs a single optimisation (restarts=1), got restarts={self.threat.restarts}")
        self.lam = _nonneg_float(lam, "lam")
        self.kappa = _nonneg_float(kappa, "kappa")
        self.momentum = self.default_momentum if momentum is None else _nonneg_float(momentum, "momentum")
        if hierarchy not in HIERARCHIES:
            raise ConfigError(f"hierarchy must be one of {HIERARCHIES}, got {hierarchy!r}")
        if target not in TARGET_RULES:
            raise ConfigError(f"target must be one of {TARGET_RULES}, got {target!r}")
        if layers is not None and (isinstance(layers, str) or not layers or not all(isinstance(l, str) for l in layers)):
            raise ConfigError(f"layers must be a non-empty list of layer names, got {layers!r}")
        for name, v in (("n_components", n_components), ("max_channels", max_channels)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {v!r}")
        if not isinstance(stats_seed, int) or isinstance(stats_seed, bool):
            raise ConfigError(f"stats_seed must be an integer, got {stats_seed!r}")
        if stats_dataset is not None and not isinstance(stats_dataset, str):
            raise ConfigError(f"stats_dataset must be a registered dataset name or None, got {stats_dataset!r}")
        if not isinstance(stats_split, str):
            raise ConfigError(f"stats_split must be a split name, got {stats_split!r}")
        if stats_target_field is not None and not isinstance(stats_target_field, str):
            raise ConfigError(f"stats_target_field must be a target field name or None, got {stats_target_field!r}")
        if stats_n is not None and (isinstance(stats_n, bool) or not isinstance(stats_n, int) or stats_n < 2):
            raise ConfigError(f"stats_n must be an integer >= 2 or None, got {stats_n!r}")
        if isinstance(reg_covar, bool) or not isinstance(reg_covar, (int, float)) or not math.isfinite(reg_covar) or reg_covar <= 0:
            raise ConfigError(f"reg_covar must be a finite number > 0, got {reg_covar!r}")
        self.target_rule = target
        self.stats_dataset = stats_dataset
        self.stats_kw: dict[str, Any] = {
            "split": stats_split, "n": stats_n, "target_field": stats_target_field,
            "layers": list(layers) if layers is not None else None, "hierarchy": hierarchy, "n_components": n_components, "seed": stats_seed,
            "max_channels": max_channels, "reg_covar": reg_covar,
        }
        self._stats: dict[tuple[str, str], FeatureStats] = {}

    # statistics and targets ---------------------------------------------------------------------------------
    def prepare(self, victim: Victim, train: Any) -> None:
        """Fit (or load from the cache) the feature mixtures of the undefended ``victim`` on ``train`` (or on
        ``stats_dataset`` when one is named). The base attack (``lam=0``) needs none and fits nothing."""
        if self.lam == 0:
            return
        base, _ = base_victim(victim)
        self._stats[_stats_key(base)] = fit_feature_stats(base, self.stats_dataset or train, **self.stats_kw)

    def statistics(self, victim: Victim) -> FeatureStats:
        """The mixtures of the (undefended) victim fitted by :meth:`prepare`, or fitted here on ``stats_dataset``."""
        base, _ = base_victim(victim)
        key = _stats_key(base)
        if key not in self._stats:
            if self.stats_dataset is None:
                raise ConfigError(f"HFC has no feature statistics for victim {base.card.name!r}: call "
                                  "prepare(victim, train) with its training split (the harness does) or pass stats_dataset")
            self._stats[key] = fit_feature_stats(base, self.stats_dataset, **self.stats_kw)
        return self._stats[key]

    def target_labels(self, victim: Victim, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The class each sample is pushed towards (see the module docstring)."""
        if self.threat.targeted:
            return y.long()
        task = get_task(victim.task)
        if self.target_rule == "next" or task.num_classes(victim.card.classes) == 2:  # two classes: the other one
            return task.next_class(y.long(), victim.card.classes)
        with torch.no_grad():
            logits = self.expectation(victim, x).clone()  # the most likely wrong class of a randomised victim
        logits[torch.arange(len(y), device=y.device), y.long()] = -math.inf
        return logits.argmax(1)

    # losses ------------------------------------------------------------------------------------------------
    def base_term(self, victim: Victim, out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Per-sample loss towards target ``t``: CE / BCE, or the CW margin clamp(max_{j≠t} z_j − z_t + κ, 0)."""
        if self.base_loss == "ce":
            return victim.loss(out, t)
        z = get_task(victim.task).class_logits(out)
        z_t = z.gather(1, t.view(-1, 1)).squeeze(1)
        others = z.scatter(1, t.view(-1, 1), -math.inf).amax(1)
        return (others - z_t + self.kappa).clamp_min(0)

    def total_loss(self, victim: Victim, x: torch.Tensor, t: torch.Tensor, stats: FeatureStats | None) -> torch.Tensor:
        """Per-sample ℒ = base + λ·Σ_l ℒ_HFC,l, averaged over ``eot`` forward passes."""
        _, prefix = base_victim(victim)
        names = [prefix + l for l in stats.layers] if stats is not None else []

        def once(z: torch.Tensor) -> torch.Tensor:
            out, feats = module_activations(victim, z, names)
            loss = self.base_term(victim, out, t)
            return loss + self.lam * stats.hfc_term(feats, t, prefix) if stats is not None else loss

        return self.expectation(once, x)

    # optimiser ---------------------------------------------------------------------------------------------
    def _alpha(self, eps: torch.Tensor) -> torch.Tensor:
        if self.threat.step_size is not None:
            return torch.full_like(eps, self.threat.step_size)
        return 2 * eps / self.threat.steps

    def perturb(self, victim: Victim, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        stats = self.statistics(victim) if self.lam > 0 else None
        t = self.target_labels(victim, x, y)
        alpha = _view(self._alpha(eps), x)
        x_adv = random_start(x, eps, "Linf", self.rng) if self.starts_random else x.clone()
        g = torch.zeros_like(x)
        for _ in range(self.threat.steps):
            x_adv.requires_grad_(True)
            loss = self.total_loss(victim, x_adv, t, stats).sum()
            grad, = torch.autograd.grad(loss, x_adv)
            g = self.momentum * g + l2_normalize(grad)
            x_adv = project(x, x_adv.detach() - alpha * g.sign(), eps, "Linf")
        return x_adv.detach()


LAMBDA_CANDIDATES = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)


def select_lambda(victim: Victim, train: Any, val: Any, *, attack: str = "hfc.pgd", params: dict[str, Any] | None = None,
                  candidates: Sequence[float] = LAMBDA_CANDIDATES, tolerance: float = 0.02, n: int = 256,
                  batch_size: int = 128, seed: int = 0) -> tuple[float, list[dict[str, float]]]:
    """λ chosen on a validation split by a rule fixed in advance (no detector is consulted).

    Rule: the **largest** candidate λ whose attack success rate on ``val`` (among the first ``n`` images the victim
    classifies correctly) is at least the base attack's (λ = 0: the same optimiser, budget, start and target) minus
    ``tolerance``. The constraint exists to pull features into the target class's clean distribution, so the attacker
    takes the strongest pull that does not cost success; detectors stay unseen, as the attacker does not know which
    one is deployed. If no candidate qualifies, the smallest is returned. The released code has no rule (``--lamda``
    defaults to 1).

    Returns the chosen λ and one row per λ (0 first): ``lam``, ``asr``, ``hfc_term`` (the mean Σ_l ℒ_HFC,l of the
    adversarial examples under the target class's mixtures: lower = better camouflaged) and ``n_correct``.
    """
    from robustbench_med.api import create_attack
    from robustbench_med.feature_stats import stats_target_field
    from robustbench_med.tasks import predict as task_predict

    if not candidates or any(isinstance(c, bool) or not isinstance(c, (int, float)) or c <= 0 for c in candidates):
        raise ConfigError(f"candidates must be numbers > 0, got {candidates!r}")
    params = {k: v for k, v in (params or {}).items() if k != "lam"}
    base, _ = base_victim(victim)
    field_name = stats_target_field(base, params.get("stats_target_field"))
    x_all, y_all = val.images(list(range(min(n, len(val))))), val.targets(field_name).long()[: min(n, len(val))]
    with torch.no_grad():
        pred = torch.cat([task_predict(victim.task, victim(x_all[i : i + batch_size].to(victim.device))).cpu()
                          for i in range(0, len(x_all), batch_size)])
    keep = (pred.view(-1) == y_all.view(-1)).nonzero().flatten()
    x, y = x_all[keep], y_all[keep]
    probe = create_attack(attack, **params, lam=float(min(candidates)))
    probe.prepare(victim, train)
    stats = probe.statistics(victim)
    rows = []
    for lam in (0.0, *sorted(float(c) for c in candidates)):
        atk = create_attack(attack, **params, lam=lam)
        atk.prepare(victim, train)  # cached statistics: no refit
        fooled, term = 0, 0.0
        for i in range(0, len(x), batch_size):
            xb, yb = x[i : i + batch_size].to(victim.device), y[i : i + batch_size].to(victim.device)
            adv = atk(victim, xb, yb, seed=seed + i)
            with torch.no_grad():
                out, feats = module_activations(victim, adv, list(stats.layers))
                fooled += int((task_predict(victim.task, out).view(-1) != yb.view(-1)).sum())
                term += float(stats.hfc_term(feats, atk.target_labels(victim, xb, yb)).sum())
        rows.append({"lam": lam, "asr": fooled / max(len(x), 1), "hfc_term": term / max(len(x), 1), "n_correct": float(len(x))})
    floor = rows[0]["asr"] - tolerance
    ok = [r["lam"] for r in rows[1:] if r["asr"] >= floor]
    return (max(ok) if ok else min(float(c) for c in candidates)), rows


def _stats_key(base: Victim) -> tuple[str, str]:
    return (base.card.name, victim_fingerprint(base))


def _nonneg_float(v: Any, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise ConfigError(f"{name} must be a finite number >= 0, got {v!r}")
    return float(v)


class HFCBIM(HFCAttack):
    """HFC with the BIM / I-FGSM optimiser (Kurakin et al., ICLR 2017 workshop), cross-entropy towards the target."""


class HFCMIFGSM(HFCAttack):
    """HFC with the MI-FGSM optimiser (Dong et al., CVPR 2018), momentum μ = 0.5 on L2-normalised gradients."""

    default_momentum: ClassVar[float] = 0.5


class HFCPGD(HFCAttack):
    """HFC with PGD (Madry et al., ICLR 2018): BIM steps from a uniform random start in the ε-ball."""

    starts_random: ClassVar[bool] = True


class HFCCW(HFCAttack):
    """HFC with the Carlini–Wagner margin loss (Carlini & Wagner, IEEE S&P 2017) optimised by BIM steps under L∞."""

    base_loss: ClassVar[str] = "cw"


_PAPER = "Yao et al., MICCAI 2021 (HFC)"
register_attack("hfc.bim", norm="Linf", knowledge="white-box", paper=f"{_PAPER}; Kurakin et al. 2017")(HFCBIM)
register_attack("hfc.mifgsm", norm="Linf", knowledge="white-box", paper=f"{_PAPER}; Dong et al., CVPR 2018")(HFCMIFGSM)
register_attack("hfc.pgd", norm="Linf", knowledge="white-box", paper=f"{_PAPER}; Madry et al., ICLR 2018")(HFCPGD)
register_attack("hfc.cw", norm="Linf", knowledge="white-box", paper=f"{_PAPER}; Carlini & Wagner, S&P 2017")(HFCCW)
