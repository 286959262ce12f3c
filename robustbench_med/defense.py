"""The defence interface: a :class:`Defense` wraps a victim and gives a defended victim.

Kinds: ``'purifier'`` (transforms the input before the model), ``'latent'`` (perturbs a segmentor's latent between
``encode`` and ``decode``) and ``'detector'`` (flags adversarial inputs). ``differentiable`` and ``randomized`` tell
the harness how to attack the defended victim adaptively: non-differentiable purifiers are attacked through BPDA
(Athalye et al., "Obfuscated Gradients Give a False Sense of Security", ICML 2018: the purifier's backward pass is
replaced by the identity), randomised ones with EOT (gradients averaged over the defence's randomness).
"""
from __future__ import annotations

import abc
from typing import Any, ClassVar

import torch

from robustbench_med.victim import Victim, WrappedVictim

GRADIENT_MODES = ("full", "bpda", "detach")


class Defense(abc.ABC):
    """Base class of all defences. Subclasses implement :meth:`wrap`."""

    kind: ClassVar[str] = "purifier"
    differentiable: ClassVar[bool] = True
    randomized: ClassVar[bool] = False
    name: str = "defense"
    unshared: ClassVar[tuple[str, ...]] = ()  # attributes that refer to the victim (bound again by wrap), never shared

    def params(self) -> dict[str, Any]:
        """The defence's parameters (recorded with every result)."""
        return {}

    @abc.abstractmethod
    def wrap(self, victim: Victim) -> Victim:
        """A defended victim with the same card, task and input contract as ``victim``."""

    def prepare(self, victim: Victim, train: Any) -> None:
        """Fit whatever the defence learns (detectors, latent perturbers) on ``train`` (a ``MedicalDataset``
        split) for ``victim``. Called by the harness before :meth:`wrap`; defences that learn nothing keep this."""

    def prepared_state(self) -> dict[str, Any]:
        """Everything this (prepared) defence holds but the references to its victim (:attr:`unshared`): what a
        copy of the defence with the same parameters needs, through :meth:`load_prepared`, to act exactly like this
        one without fitting again. The runner fits each defence once, on rank 0, and gives the others this state."""
        return {k: v for k, v in vars(self).items() if k not in self.unshared}

    def load_prepared(self, state: dict[str, Any]) -> None:
        """Take over the fitted state of a prepared copy (see :meth:`prepared_state`) instead of calling prepare."""
        vars(self).update({k: v for k, v in state.items() if k not in self.unshared})

    @property
    def default_gradient_mode(self) -> str:
        return "full" if self.differentiable else "bpda"


class DetectorVictim(WrappedVictim):
    """A victim guarded by an adversarial-example detector: predictions are the victim's, and ``detect(x)`` gives
    a per-sample score (higher = more likely adversarial) that the harness stores with every result."""

    def __init__(self, victim: Victim, detector: "Defense"):
        super().__init__(victim)
        self.detector = detector

    def detect(self, x: torch.Tensor) -> torch.Tensor:
        return self.detector.score(self.victim, x)

    def detection_scores(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``detector_score`` (one-sided) and, when the detector has a clean reference, ``detector_score_two_sided``."""
        s = self.detect(x)
        two = self.detector.two_sided(s)
        return {"detector_score": s} if two is None else {"detector_score": s, "detector_score_two_sided": two}


class Detector(Defense):
    """A reactive defence that scores inputs as adversarial. Implement :meth:`score` (and usually ``prepare``)."""

    kind: ClassVar[str] = "detector"

    clean_reference: tuple[float, float] | None = None  # (centre, scale) of the clean fitting scores, if known

    @abc.abstractmethod
    def score(self, victim: Victim, x: torch.Tensor) -> torch.Tensor:
        """Per-sample detection score of ``x`` for ``victim`` (higher = more likely adversarial)."""

    def two_sided(self, scores: torch.Tensor) -> torch.Tensor | None:
        """The two-sided score |s − m| / d of one-sided ``scores``: distance from the clean distribution in either
        direction, with m the median and d the scaled median absolute deviation (1.4826·MAD) of the detector's scores
        on its clean fitting images (:attr:`clean_reference`). An input scored far *below* clean inputs (an attack
        that overshoots into "more typical than clean") is flagged as surely as one scored far above. ``None`` when
        the detector has no clean reference."""
        if self.clean_reference is None:
            return None
        centre, scale = self.clean_reference
        return (scores - centre).abs() / scale

    def wrap(self, victim: Victim) -> DetectorVictim:
        return DetectorVictim(victim, self)


class InputPurifier(Defense):
    """A defence that transforms the input: ``defended(x) = victim(purify(x))``. Implement :meth:`purify`."""

    kind: ClassVar[str] = "purifier"

    @abc.abstractmethod
    def purify(self, x: torch.Tensor) -> torch.Tensor:
        """The purified batch (same shape, values in [0, 1])."""

    def wrap(self, victim: Victim) -> "PurifiedVictim":
        return PurifiedVictim(victim, self)


class PurifiedVictim(WrappedVictim):
    """``victim ∘ purify`` with a selectable gradient path through the purifier.

    ``gradient_mode``: ``'full'`` differentiates through ``purify``; ``'bpda'`` uses the straight-through estimator
    ``x + (purify(x) − x).detach()``; ``'detach'`` purifies a detached copy, so only a zero gradient reaches the input (the
    naive "adaptive" attack whose gradients are masked).
    """

    def __init__(self, victim: Victim, defense: InputPurifier, gradient_mode: str | None = None):
        super().__init__(victim)
        self.defense = defense
        self.gradient_mode = gradient_mode or defense.default_gradient_mode
        if self.gradient_mode not in GRADIENT_MODES:
            raise ValueError(f"gradient_mode must be one of {GRADIENT_MODES}, got {self.gradient_mode!r}")

    def with_gradient_mode(self, mode: str) -> "PurifiedVictim":
        return PurifiedVictim(self.victim, self.defense, mode)

    def purified(self, x: torch.Tensor) -> torch.Tensor:
        """The purified input, with the gradient path chosen by ``gradient_mode``."""
        return self.through(x, self.defense.purify)

    def through(self, x: torch.Tensor, purify: Any) -> torch.Tensor:
        """``purify(x)`` with the gradient path of ``gradient_mode``: ``'full'`` (autograd through it), ``'bpda'``
        (the identity backward pass) or ``'detach'`` (a zero, not a missing, gradient: every attack runs)."""
        if self.gradient_mode == "full":
            return purify(x)
        if self.gradient_mode == "bpda":
            return x + (purify(x.detach()) - x).detach()
        return purify(x.detach()).detach() + 0 * x

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        return self.purified(x)
