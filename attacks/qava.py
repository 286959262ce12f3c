"""QAVA-style query-agnostic visual attack (unverified re-implementation).

Zhang et al., "QAVA: Query-Agnostic Visual Attack to Large Vision-Language Models", NAACL 2025 (arXiv 2504.11038).
The paper's loss, attacked feature and hyper-parameters are not publicly documented (``methods.md`` §1); this follows
the reference sketch there and is labelled "QAVA-style (unverified)":

    max_{‖δ‖∞ ≤ ε} (1/N) Σ_{q ∈ Q_r} d(F(x + δ, q), F(x, q))

where Q_r holds N questions sampled (per image, seeded) from a pool *disjoint from the evaluation pool* (the "seen"
pool when the victim evaluates on "unseen"), F is the question-conditioned projector output (Q-Former output for
BLIP-2 / InstructBLIP, projected visual tokens for LLaVA; ``layer`` selects another one) and d a distance
(``'l2'``, ``'cosine'`` or ``'l1'``). ``qava.lm`` maximises the LM loss of the reference answers of Q_r instead.
Optimisation as in PIP (the same authors' earlier code): L∞ PGD, random start, step ε/4, 20 steps.

The attack never sees an evaluation question: the sampled questions are checked against the victim's evaluation
questions of every image and a :class:`~robustbench_med.errors.ConfigError` is raised on any overlap (the sampled
set of the last call is kept in ``last_questions``).
"""
from __future__ import annotations

from typing import Any

import torch

from robustbench_med.attacks.lvlm_pgd import LVLMAttack, lvlm_core, only_questions
from robustbench_med.attacks.projector import DISTANCES, disjoint_pool, feature_distance
from robustbench_med.errors import ConfigError
from robustbench_med.registry import register_attack
from robustbench_med.victim import Victim
from robustbench_med.victims.lvlm.models import LAYERS, POOLS, pool_question_ids


class QAVA(LVLMAttack):
    """Query-agnostic attack (see the module docstring).

    Args:
        loss: ``'projector'`` (feature disruption) or ``'lm'`` (LM loss of the sampled questions' answers).
        n_questions: N, questions sampled per image (at most the pool size).
        pool: ``'auto'`` (the pool disjoint from the victim's evaluation pool), ``'seen'`` or ``'unseen'``.
        distance, layer: the feature distance and the layer of the ``'projector'`` loss.
    """

    def __init__(self, *, loss: str = "projector", n_questions: int = 8, pool: str = "auto", distance: str = "l2",
                 layer: str = "projector", **kw: Any) -> None:
        super().__init__(**kw)
        if loss not in ("projector", "lm"):
            raise ConfigError(f"QAVA loss must be 'projector' or 'lm', got {loss!r}")
        if pool != "auto" and pool not in POOLS:
            raise ConfigError(f"pool must be 'auto' or one of {POOLS}, got {pool!r}")
        if distance not in DISTANCES or layer not in LAYERS:
            raise ConfigError(f"distance must be one of {DISTANCES} and layer one of {LAYERS}")
        if isinstance(n_questions, bool) or not isinstance(n_questions, int) or n_questions < 1:
            raise ConfigError(f"n_questions must be an integer >= 1, got {n_questions!r}")
        self.loss, self.n_questions, self.pool, self.distance, self.layer = loss, n_questions, pool, distance, layer
        self.last_questions: torch.Tensor | None = None

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
        conditioned = core.family == "instructblip" and self.layer != "vision"
        q = questions if conditioned else None  # BLIP-2 / LLaVA projector outputs do not depend on the question

        def features(z: torch.Tensor) -> torch.Tensor:
            return core.visual_features(transform(z), q, self.layer)

        with torch.no_grad():
            clean = self.expectation(features, x)  # the clean reference, averaged over a randomised defence as well
        return self.run_pgd(lambda z: self.expectation(lambda w: feature_distance(features(w), clean, self.distance), z), x, eps)


@register_attack("qava.projector", norm="Linf", knowledge="white-box", tasks=("vqa",),
                 paper="Zhang et al., QAVA, NAACL 2025 (QAVA-style, unverified)")
def qava_projector(**kw: Any) -> QAVA:
    """QAVA-style attack disrupting the question-conditioned projector output over sampled non-evaluation questions."""
    return QAVA(loss="projector", **kw)


@register_attack("qava.lm", norm="Linf", knowledge="white-box", tasks=("vqa",),
                 paper="Zhang et al., QAVA, NAACL 2025 (QAVA-style, unverified)")
def qava_lm(**kw: Any) -> QAVA:
    """QAVA-style attack maximising the LM loss over sampled non-evaluation questions."""
    return QAVA(loss="lm", **kw)
