"""The attack interface: ``attack(victim, x, y) -> x_adv``, seeded, with an explicit threat model.

Subclasses implement :meth:`Attack.perturb` only. The base validates the parameters at construction (before any
work), checks the inputs and the task, runs the victim in eval mode (restoring every module's own training flag), seeds all random number generators for the call
and restores them afterwards. It never clips or repairs the result: the harness checks every adversarial batch
against the threat model with :func:`robustbench_med.threat.check_budget`.
"""
from __future__ import annotations

import abc
import hashlib
from contextlib import contextmanager
from typing import Any, Callable, ClassVar, Iterator, Sequence

import torch

from robustbench_med.errors import ConfigError, TaskNotSupportedError
from robustbench_med.tasks import get_task
from robustbench_med.threat import ThreatModel
from robustbench_med.victim import Victim, eval_mode, validate_images


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


class SampleRNG:
    """One random stream per sample: ``seeds[i]`` seeds a generator that only sample ``i``'s draws use.

    An attack that draws its randomness here (random starts, noise) gives every sample the same draws whether it is
    attacked alone, in a batch of 8 or of 256, or in another shard: results do not depend on how the work was split
    (issue #21). Each ``*_like`` call draws one tensor per sample, in sample order, from that sample's stream.
    """

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu") -> None:
        self.seeds = [int(s) for s in seeds]
        self.device = torch.device(device)
        self._gens = [torch.Generator(device=self.device).manual_seed(s) for s in self.seeds]

    def __len__(self) -> int:
        return len(self.seeds)

    def _draw(self, fn: Callable[..., torch.Tensor], like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        if len(like) != len(self._gens):
            raise ValueError(f"{len(self._gens)} sample streams for a batch of {len(like)}")
        if not self._gens:
            return like.new_empty((0, *shape))
        return torch.stack([fn(shape, generator=g, device=self.device, dtype=like.dtype) for g in self._gens]).to(like.device)

    def rand_like(self, x: torch.Tensor) -> torch.Tensor:
        """Uniform [0, 1) of ``x``'s shape, each sample from its own stream."""
        return self._draw(torch.rand, x, tuple(x.shape[1:]))

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        """Standard normal of ``x``'s shape, each sample from its own stream."""
        return self._draw(torch.randn, x, tuple(x.shape[1:]))

    def rand(self, like: torch.Tensor) -> torch.Tensor:
        """One uniform [0, 1) number per sample, shape ``[n]``."""
        return self._draw(torch.rand, like, ()).reshape(len(like))


def sample_seeds(seed: int, n: int) -> list[int]:
    """Per-sample seeds for a direct call ``attack(victim, x, y, seed=s)``: sample ``i`` of the batch gets
    ``derive_seed(s, 'sample', i)`` (the harness passes seeds derived from each sample's index in the dataset)."""
    return [derive_seed(seed, "sample", i) for i in range(n)]


class Attack(abc.ABC):
    """Base class of all attacks.

    Args:
        norm, eps, step_size, steps, restarts, targeted: the threat model (see :class:`ThreatModel`).
        seed: seed of every random choice the attack makes.
        eot: number of samples averaged per gradient (Expectation over Transformation) for randomised victims.

    Class attributes:
        tasks: the victim tasks the attack supports.
        uses_eot: whether the attack queries the attacked model at all. Every attack that does averages each of its
            objective evaluations over ``eot`` passes (:meth:`expectation`); one that does not (noise, corruptions,
            transfer from a surrogate) refuses ``eot > 1`` instead of ignoring it.
        knowledge: ``'white-box'``, ``'black-box'``, ``'transfer'`` or ``'none'``.
        spatial_dims: the inputs the attack works on: 2 (slices, NCHW) and / or 3 (volumes, NCDHW). An attack built on
            2D operations (image corruptions, torchattacks' Square) declares ``{2}`` and refuses volumes in
            :meth:`check_task`.
        supports_eps_batch: whether :meth:`perturb` accepts a different eps per sample (eps sweeps in one batch).
        sample_independent: whether each sample's result depends only on that sample, its eps and its seed: every
            random draw comes from :attr:`rng` (one stream per sample) and nothing couples the samples of a batch
            (no batch-level random choices, no shared step-size schedule, no sub-batch selection). The harness may
            split such an attack's batch to fit memory without changing what it computes; an attack that is not
            (torchattacks' APGD / Square / AutoAttack, the LVLM attacks) always sees whole units.
    """

    tasks: ClassVar[frozenset[str]] = frozenset()
    knowledge: ClassVar[str] = "white-box"
    spatial_dims: ClassVar[frozenset[int]] = frozenset({2, 3})
    supports_eps_batch: ClassVar[bool] = False
    default_norm: ClassVar[str] = "Linf"
    default_steps: ClassVar[int] = 1
    uses_eot: ClassVar[bool] = True
    sample_independent: ClassVar[bool] = False
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
        if eot > 1 and not self.uses_eot:
            raise ConfigError(f"{type(self).__name__} never queries the attacked model ({self.knowledge}), so eot={eot} "
                              "would have nothing to average; leave eot at 1")
        self.seed = int(seed)
        self.eot = eot

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.threat})"

    def check_task(self, victim: Victim) -> None:
        if victim.task not in self.tasks:
            raise TaskNotSupportedError(
                f"{self.name} supports tasks {sorted(self.tasks)}, not {victim.task!r} (victim {victim.card.name})"
            )
        if victim.card.spatial_dims not in self.spatial_dims:
            kind = "volumes (NCDHW)" if victim.card.spatial_dims == 3 else "slices (NCHW)"
            raise TaskNotSupportedError(f"{self.name} works on {' and '.join('volumes' if d == 3 else 'slices' for d in sorted(self.spatial_dims))} "
                                        f"only, not on {kind} (victim {victim.card.name})")

    def __call__(self, victim: Victim, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor | None = None,
                 seed: int | None = None, seeds: Sequence[int] | None = None) -> torch.Tensor:
        """Adversarial examples for ``(x, y)``. ``eps`` optionally gives one radius per sample.

        ``seed`` seeds torch's global generators for the call (batch-level draws); ``seeds`` gives each sample its own
        stream (:attr:`rng`, default: derived from ``seed`` and the sample's position in the batch)."""
        self.check_task(victim)
        validate_images(x, victim.card.input_size)
        check_targets(victim, y, len(x))
        eps_t = self._eps_tensor(x, eps)
        seed = self.seed if seed is None else seed
        seeds = sample_seeds(seed, len(x)) if seeds is None else list(seeds)
        if len(seeds) != len(x):
            raise ConfigError(f"{self.name}: {len(seeds)} per-sample seeds for {len(x)} images")
        self.rng = SampleRNG(seeds, x.device)
        try:
            with eval_mode(victim), seeded(seed, x.device):
                x_adv = self.perturb(victim, x.detach(), y, eps_t)
        finally:
            del self.rng
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

    def violations(self, victim: Victim, x: torch.Tensor, x_adv: torch.Tensor) -> str:
        """What ``x_adv`` breaks of this attack's own threat model beyond the Lp budget and range that
        :func:`~robustbench_med.threat.check_budget` checks (e.g. a sequence-restricted attack that changed another
        sequence); ``''`` when nothing. The harness marks a cell invalid on a non-empty answer."""
        return ""

    def objective(self, victim: Victim, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-sample objective to maximise, averaged over ``eot`` forward passes (EOT for randomised victims)."""
        return self.expectation(lambda z: victim.objective(z, y), x)

    def expectation(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """``fn(x)`` averaged over ``eot`` independent evaluations: Expectation over Transformation (Athalye et al.,
        ICML 2018), so a randomised defence inside ``fn`` is sampled ``eot`` times per gradient. Every objective an
        attack differentiates goes through here (or averages ``eot`` passes itself, as the torchattacks views do)."""
        total = fn(x)
        for _ in range(self.eot - 1):
            total = total + fn(x)
        return total / self.eot


# ---------------------------------------------------------------------------------------------------------------
# validation where parameters and targets enter (one place for every attack; called by ``create_attack`` and the
# runner)

_NAME_NORMS = {"linf": "Linf", "l2": "L2", "l1": "L1"}


def name_norm(name: str) -> str | None:
    """The norm an attack's registry name fixes (``'pgd.linf'`` → ``'Linf'``, ``'cw.l2'`` → ``'L2'``), else None."""
    tag = name.split(".", 1)[-1].lower()
    last = tag.replace("-", "_").split("_")[-1]
    return _NAME_NORMS.get(last)


def validate_attack_params(name: str, params: dict[str, Any], declared_norm: str | None = None) -> None:
    """Reject a ``norm`` parameter that an attack's name already fixes (``pgd.linf``, ``square.linf``,
    ``fgsm.linf``, ``cw.l2`` …) or that contradicts the norm its registry entry declares (``declared_norm``);
    an unknown norm spelling raises :class:`ThreatModelError` as well. Attacks with a free norm (``apgd.ce``,
    ``noise.uniform`` …) take any valid norm."""
    from robustbench_med.errors import ThreatModelError
    from robustbench_med.threat import canonical_norm

    if "norm" not in params:
        return
    given = canonical_norm(params["norm"])
    fixed = name_norm(name)
    if fixed is not None:
        advice = "remove the 'norm' parameter" if given == fixed else f"use an attack named for {given}"
        raise ThreatModelError(f"attack {name!r} fixes the norm {fixed} by its name; norm={params['norm']!r} "
                               f"{'is redundant' if given == fixed else 'contradicts it'} ({advice})")
    if declared_norm is not None and given != canonical_norm(declared_norm):
        raise ThreatModelError(f"attack {name!r} is an {canonical_norm(declared_norm)} attack; norm={params['norm']!r} contradicts it")


def check_targets(victim: Victim, y: Any, n: int | None = None, where: str = "targets") -> None:
    """Raise :class:`ConfigError` unless ``y`` fits ``victim``'s task (see :mod:`robustbench_med.tasks`): one
    integer class index per sample (classification, in range), 0/1 per sample (binary), [n, L] 0/1 (multi-label,
    L = the victim's classes), a [n, H, W] or [n, D, H, W] class map of the input's size (segmentation), finite
    [n, L, 2] pixel or [n, L, 3] voxel coordinates (landmarks); ``n`` samples when given."""
    task, card = get_task(victim.task), victim.card
    if not isinstance(y, torch.Tensor):
        raise ConfigError(f"{where}: must be a torch.Tensor, got {type(y).__name__}")
    if n is not None and (y.dim() == 0 or len(y) != n):
        raise ConfigError(f"{where}: {n} images but {0 if y.dim() == 0 else len(y)} targets")
    dims, shape = task.target_layout(card)
    if dims is None:  # vqa: answers are defined by the LVLM victims
        return
    if y.dim() != dims:
        raise ConfigError(f"{where}: a {task.name} victim ({card.name}) takes targets of shape {shape}, got {list(y.shape)}")
    if task.integer_targets and y.is_floating_point():
        raise ConfigError(f"{where}: {task.name} targets must be integer class indices, got dtype {y.dtype}")
    if y.is_floating_point() and not torch.isfinite(y).all():
        raise ConfigError(f"{where}: targets contain NaN or infinite values")
    if y.numel():
        task.check_values(y, card, where)
