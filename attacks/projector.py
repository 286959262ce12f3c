"""Projector attacks on vision-language victims at three knowledge levels.

An interpretation (unverified, see ``methods.md`` §2) of "The Security Threat of Compressed Projectors in Large
Vision-Language Models" (arXiv 2506.00534, EMNLP 2025): the paper's method is not publicly documented, so these are
generic L∞ PGD attacks (Madry et al., ICLR 2018) at the knowledge levels its title implies, used to compare
*compressed* projectors (BLIP-2 / InstructBLIP Q-Former) with *uncompressed* ones (LLaVA MLP) at equal budget.

* ``projector.whitebox``: the whole model is known; maximise the LM loss of the reference answers of the questions
  in ``questions`` (default ``'disjoint'``: every question of the pool disjoint from the evaluation pool, so the
  attacker knows the model but not the evaluation questions; ``'all'``: every question, the known-question bound).
* ``projector.projector_only``: only the vision encoder and projector are known (the LM is not); maximise the
  distance between the adversarial and clean projector outputs (Q-Former output / projected visual tokens), with
  no instruction for InstructBLIP.
* ``projector.transfer``: craft on a surrogate (by default the same architecture trained with another seed,
  ``<family>.tiny_s1``) with its white-box LM loss (or its projector distance) and apply the result unchanged to
  the victim: no gradient of, or query to, the victim.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch

from robustbench_med.attacks.lvlm_pgd import LVLMAttack, lvlm_core, only_questions
from robustbench_med.errors import ConfigError, check_choice
from robustbench_med.registry import register_attack
from robustbench_med.victim import Victim
from robustbench_med.victims.lvlm.models import LAYERS, POOLS, pool_question_ids

DISTANCES = ("l2", "cosine", "l1")
QUESTION_SETS = ("disjoint", "all", "seen", "unseen")


def feature_distance(adv: torch.Tensor, clean: torch.Tensor, distance: str, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample distance between feature tensors [B, ..., D]: mean squared error (``'l2'``), mean absolute error
    (``'l1'``) or mean (1 − cosine similarity) over the tokens (``'cosine'``). With ``weights`` (0/1 per token, the
    shape of the features without D, e.g. [B, n, L]) the mean runs over the weighted tokens of each row of the last
    token axis, then over the rows (e.g. the hidden states of n questions, each at its own positions)."""
    if distance == "l2":
        per_token = (adv - clean).pow(2).mean(-1)
    elif distance == "l1":
        per_token = (adv - clean).abs().mean(-1)
    elif distance == "cosine":
        per_token = 1 - torch.nn.functional.cosine_similarity(adv, clean, dim=-1)
    else:
        raise ConfigError(f"distance must be one of {DISTANCES}, got {distance!r}")
    if weights is None:
        return per_token.flatten(1).mean(1)
    return ((per_token * weights).sum(-1) / weights.sum(-1).clamp_min(1)).flatten(1).mean(1)


def disjoint_pool(victim: Victim) -> str:
    """The question pool disjoint from ``victim``'s evaluation pool (``'seen'`` when it evaluates on ``'unseen'``)."""
    core, _ = lvlm_core(victim)
    return POOLS[1 - POOLS.index(core.eval_pool)]


def question_matrix(victim: Victim, y: torch.Tensor, questions: str) -> torch.Tensor:
    """Question ids [B, n] of a named set: ``'all'``, ``'seen'``, ``'unseen'`` or ``'disjoint'``."""
    if questions not in QUESTION_SETS:
        raise ConfigError(f"questions must be one of {QUESTION_SETS}, got {questions!r}")
    if questions == "all":
        return torch.arange(y.shape[1], device=y.device).expand(len(y), -1)
    pool = disjoint_pool(victim) if questions == "disjoint" else questions
    return torch.tensor(pool_question_ids(pool), device=y.device).expand(len(y), -1)


class WhiteBoxLM(LVLMAttack):
    """PGD on the whole model's LM loss over a named question set (see the module docstring)."""

    def __init__(self, *, questions: str = "disjoint", **kw: Any) -> None:
        super().__init__(**kw)
        check_choice(questions, QUESTION_SETS, "questions")
        self.questions = questions

    def perturb(self, victim: Victim, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        y_known = only_questions(y, question_matrix(victim, y, self.questions))
        return self.run_pgd(lambda z: self.objective(victim, z, y_known), x, eps)


class ProjectorOnly(LVLMAttack):
    """PGD maximising the distance of the projector output from its clean value (LM unknown).

    Args:
        distance: ``'l2'`` (default), ``'cosine'`` or ``'l1'`` (:func:`feature_distance`).
        layer: ``'projector'`` (default), ``'vision'`` or ``'lm_input'``.
    """

    def __init__(self, *, distance: str = "l2", layer: str = "projector", **kw: Any) -> None:
        super().__init__(**kw)
        if distance not in DISTANCES or layer not in LAYERS:
            raise ConfigError(f"distance must be one of {DISTANCES} and layer one of {LAYERS}, got {distance!r}, {layer!r}")
        self.distance, self.layer = distance, layer

    def perturb(self, victim: Victim, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        core, transform = lvlm_core(victim)
        with torch.no_grad():
            clean = self.expectation(lambda w: core.visual_features(transform(w), None, self.layer), x)  # E over the defence
        return self.run_pgd(lambda z: self.expectation(
            lambda w: feature_distance(core.visual_features(transform(w), None, self.layer), clean, self.distance), z), x, eps)


class SurrogateTransfer(LVLMAttack):
    """Craft on a surrogate LVLM, apply to the victim (transfer; the victim is never queried).

    Args:
        surrogate: a registered victim name, a built victim, or ``None`` for ``<family>.tiny_s1`` of the victim's
            family (trained on first use).
        surrogate_loss: ``'lm'`` (white-box LM loss on the surrogate over ``questions``) or ``'projector'``.
        questions: the question set of the LM loss (as in ``projector.whitebox``).
    """

    knowledge: ClassVar[str] = "black-box"
    uses_eot: ClassVar[bool] = False  # the victim (and its randomised defence) is never queried

    def __init__(self, *, surrogate: str | Victim | None = None, surrogate_loss: str = "lm", questions: str = "disjoint", **kw: Any) -> None:
        super().__init__(**kw)
        if surrogate_loss not in ("lm", "projector"):
            raise ConfigError(f"surrogate_loss must be 'lm' or 'projector', got {surrogate_loss!r}")
        check_choice(questions, QUESTION_SETS, "questions")
        self.surrogate, self.surrogate_loss, self.questions = surrogate, surrogate_loss, questions
        self._built: Victim | None = surrogate if isinstance(surrogate, Victim) else None

    def surrogate_for(self, victim: Victim, device: torch.device) -> Victim:
        """The surrogate victim (built and cached on first use)."""
        if self._built is None:
            from robustbench_med.api import create_victim

            name = self.surrogate or f"{lvlm_core(victim)[0].family}.tiny_s1"
            self._built = create_victim(name, train_if_missing=True)
        if self._built.card.input_size != victim.card.input_size:
            raise ConfigError(f"surrogate input {self._built.card.input_size} != victim input {victim.card.input_size}")
        return self._built.to(device).eval()

    def perturb(self, victim: Victim, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        sur = self.surrogate_for(victim, x.device)
        core = lvlm_core(sur)[0]
        if self.surrogate_loss == "projector":
            with torch.no_grad():
                clean = core.visual_features(x, None, "projector")
            return self.run_pgd(lambda z: feature_distance(core.visual_features(z, None, "projector"), clean, "l2"), x, eps)
        y_known = only_questions(y, question_matrix(victim, y, self.questions))
        return self.run_pgd(lambda z: self.objective(sur, z, y_known), x, eps)


@register_attack("projector.whitebox", norm="Linf", knowledge="white-box", tasks=("vqa",),
                 paper="arXiv 2506.00534 (EMNLP 2025), interpreted; Madry et al., ICLR 2018")
def projector_whitebox(**kw: Any) -> WhiteBoxLM:
    """White-box L∞ PGD on the LM loss over the questions disjoint from the evaluation pool."""
    return WhiteBoxLM(**kw)


@register_attack("projector.projector_only", norm="Linf", knowledge="white-box", tasks=("vqa",),
                 paper="arXiv 2506.00534 (EMNLP 2025), interpreted; Madry et al., ICLR 2018")
def projector_projector_only(**kw: Any) -> ProjectorOnly:
    """L∞ PGD on the projector-output distance (vision encoder + projector known, LM unknown)."""
    return ProjectorOnly(**kw)


@register_attack("projector.transfer", norm="Linf", knowledge="black-box", tasks=("vqa",),
                 paper="arXiv 2506.00534 (EMNLP 2025), interpreted; transfer from a seed-1 surrogate")
def projector_transfer(**kw: Any) -> SurrogateTransfer:
    """Transfer of a white-box LM-loss attack crafted on a surrogate trained with another seed."""
    return SurrogateTransfer(**kw)
