"""QAVA-style query-agnostic visual attack (unverified re-implementation).

Zhang et al., "QAVA: Query-Agnostic Visual Attack to Large Vision-Language Models", NAACL 2025 (arXiv 2504.11038).

**Verified** (abstract and dataset description, ``methods.md`` §1): the goal is an adversarial image that makes the
model answer *unspecified, unknown* questions wrongly, with effectiveness "comparable to attacks on known target
questions"; the evaluation is VQA v2 "m+n" (m images × n questions each; the release: 32 × 50).
**Inferred, not verified** (the paper's loss, attacked feature, N and step settings are not in any source this project
could read; the authors' code was not reviewable): the form below, from the reference sketch and the same authors'
PIP code (L∞ PGD, random start, step ε/4, 20 steps):

    max_{‖δ‖∞ ≤ ε} (1/N) Σ_{q ∈ Q_r} d(F(x + δ, q), F(x, q))

with Q_r N questions sampled per image (seeded) from a pool *disjoint from the evaluation pool*, d a distance
(``'l2'``, ``'cosine'`` or ``'l1'``) and F a **question-conditioned** representation of the image. Three variants:

- ``qava.projector``: F = the Q-Former output under the instruction q. Only InstructBLIP's Q-Former reads the question;
  on BLIP-2 and LLaVA this F does not depend on q, so the objective would be exactly ``projector.projector_only``'s,
  and the attack refuses those victims (:class:`TaskNotSupportedError`, a skipped cell) instead of posing as QAVA.
- ``qava.hidden`` (every family): F = the LM's last-layer hidden states at the prompt positions after the visual
  tokens (:meth:`LVLMVictim.question_states`): in a causal LM the first states that depend on both image and question.
- ``qava.lm``: the LM loss of the reference answers of Q_r (so it uses the answers to the sampled questions).

The attack never sees an evaluation question: the sampled questions are checked against the victim's evaluation
questions of every image and a :class:`~robustbench_med.errors.ConfigError` is raised on any overlap (the sampled
set of the last call is kept in ``last_questions``). The pools of the phantom's question bank hold other phrasings
of the same question types as the evaluation questions, so with ``pool='auto'`` every variant is a
*known-question-type* attack; ``pool='unrelated'`` draws from probe questions of other types
(:data:`~robustbench_med.data.phantom.UNRELATED_QUESTIONS`), the protocol "QAVA from unrelated questions, scored on
the evaluated types".
"""
from __future__ import annotations

from typing import Any

import torch

from robustbench_med.attacks.lvlm_pgd import LVLMAttack, lvlm_core, only_questions
from robustbench_med.attacks.projector import DISTANCES, disjoint_pool, feature_distance
from robustbench_med.errors import ConfigError, TaskNotSupportedError
from robustbench_med.registry import register_attack
from robustbench_med.victim import Victim
from robustbench_med.victims.lvlm.models import ATTACK_POOLS, LAYERS, pool_question_ids

LOSSES = ("projector", "hidden", "lm")
CONDITIONED = ("instructblip",)  # families whose projector reads the question


class QAVA(LVLMAttack):
    """Query-agnostic attack (see the module docstring).

    Args:
        loss: ``'projector'`` (the question-conditioned Q-Former output; InstructBLIP only), ``'hidden'`` (the LM's
            hidden states at the question's positions; every family) or ``'lm'`` (LM loss of the sampled questions'
            answers).
        n_questions: N, questions sampled per image (at most the pool size).
        pool: ``'auto'`` (the phrasing pool disjoint from the victim's evaluation pool: the evaluated question *types*
            in other words), ``'seen'``, ``'unseen'`` or ``'unrelated'`` (probe questions about the organs, of no
            evaluated type: the truly query-agnostic protocol; feature losses only, as they have no answers).
        distance: the feature distance of the ``'projector'`` and ``'hidden'`` losses.
        layer: the layer of the ``'projector'`` loss: ``'projector'`` or ``'lm_input'`` (``'vision'`` never sees the
            question).
    """

    def __init__(self, *, loss: str = "projector", n_questions: int = 8, pool: str = "auto", distance: str = "l2",
                 layer: str = "projector", **kw: Any) -> None:
        super().__init__(**kw)
        if loss not in LOSSES:
            raise ConfigError(f"QAVA loss must be one of {LOSSES}, got {loss!r}")
        if pool != "auto" and pool not in ATTACK_POOLS:
            raise ConfigError(f"pool must be 'auto' or one of {ATTACK_POOLS}, got {pool!r}")
        if pool == "unrelated" and loss == "lm":
            raise ConfigError("qava.lm needs the answers of its questions; the 'unrelated' pool has none "
                              "(use qava.hidden or qava.projector with pool='unrelated')")
        if distance not in DISTANCES or layer not in LAYERS:
            raise ConfigError(f"distance must be one of {DISTANCES} and layer one of {LAYERS}")
        if loss == "projector" and layer == "vision":
            raise ConfigError("qava.projector at layer 'vision' would not see the question (the objective of "
                              "projector.projector_only); use layer 'projector' or 'lm_input', or qava.hidden")
        if isinstance(n_questions, bool) or not isinstance(n_questions, int) or n_questions < 1:
            raise ConfigError(f"n_questions must be an integer >= 1, got {n_questions!r}")
        self.loss, self.n_questions, self.pool, self.distance, self.layer = loss, n_questions, pool, distance, layer
        self.last_questions: torch.Tensor | None = None

    def check_task(self, victim: Victim) -> None:
        super().check_task(victim)
        if self.loss == "projector":
            family = lvlm_core(victim)[0].family
            if family not in CONDITIONED:
                raise TaskNotSupportedError(
                    f"qava.projector needs a projector that reads the question ({', '.join(CONDITIONED)}); {family}'s "
                    "does not, so its objective would be projector.projector_only's: use qava.hidden")

    def sample_questions(self, victim: Victim, y: torch.Tensor) -> torch.Tensor:
        """N questions per image [B, N] from the attack pool, checked disjoint from the evaluation questions."""
        core, _ = lvlm_core(victim)
        pool = disjoint_pool(victim) if self.pool == "auto" else self.pool
        ids = torch.tensor(pool_question_ids(pool), device=y.device)
        if self.n_questions > len(ids):
            raise ConfigError(f"n_questions={self.n_questions} exceeds the {pool!r} pool ({len(ids)} questions)")
        pick = torch.stack([torch.randperm(len(ids))[: self.n_questions] for _ in range(len(y))]).to(y.device)
        sampled = ids[pick]
        evaluation = core.evaluation_questions(y).to(y.device)
        if (sampled[:, :, None] == evaluation[:, None, :]).any():
            raise ConfigError(f"QAVA pool {pool!r} overlaps the victim's evaluation questions; QAVA must not see them")
        return sampled

    def perturb(self, victim: Victim, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        questions = self.sample_questions(victim, y)
        self.last_questions = questions.detach().cpu()
        if self.loss == "lm":
            y_known = only_questions(y, questions)
            return self.run_pgd(lambda z: self.objective(victim, z, y_known), x, eps)
        core, transform = lvlm_core(victim)

        def features(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
            if self.loss == "projector":
                return core.visual_features(transform(z), questions, self.layer), None
            return core.question_states(transform(z), questions)  # states and their 0/1 position weights

        def distance(z: torch.Tensor) -> torch.Tensor:
            feats, weights = features(z)
            return feature_distance(feats, clean, self.distance, weights)

        with torch.no_grad():
            clean = self.expectation(lambda w: features(w)[0], x)  # the clean reference, over a randomised defence too
        return self.run_pgd(lambda z: self.expectation(distance, z), x, eps)


_PAPER = "Zhang et al., QAVA, NAACL 2025 (QAVA-style, unverified)"


@register_attack("qava.projector", norm="Linf", knowledge="white-box", tasks=("vqa",), paper=_PAPER)
def qava_projector(**kw: Any) -> QAVA:
    """QAVA-style attack disrupting the question-conditioned Q-Former output over sampled non-evaluation questions
    (InstructBLIP; other families refuse it)."""
    return QAVA(loss="projector", **kw)


@register_attack("qava.hidden", norm="Linf", knowledge="white-box", tasks=("vqa",), paper=_PAPER)
def qava_hidden(**kw: Any) -> QAVA:
    """QAVA-style attack disrupting the LM's question-conditioned hidden states over sampled non-evaluation questions
    (every family)."""
    return QAVA(loss="hidden", **kw)


@register_attack("qava.lm", norm="Linf", knowledge="white-box", tasks=("vqa",), paper=_PAPER)
def qava_lm(**kw: Any) -> QAVA:
    """QAVA-style attack maximising the LM loss over sampled non-evaluation questions."""
    return QAVA(loss="lm", **kw)
