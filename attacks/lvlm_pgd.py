"""Attacks on the LM output of vision-language victims: question-specific PGD and AutoAttack on first-token logits.

* ``lvlm_pgd.question``: L∞ PGD (Madry et al., ICLR 2018) maximising the LM loss of the reference answer of *one known
  question* per image (the known-question baseline of QAVA, Zhang et al., NAACL 2025; PIP's ``--attack_position llm``
  setting: random sign start, step 2/255 at ε = 8/255, 20 steps). By default the attacked question is the image's
  first evaluation question, so the victim's ``vqa_accuracy_first`` is the attack on its own question and
  ``vqa_accuracy_others`` its transfer to the other questions of the same image.
* ``lvlm_autoattack.first_token``: AutoAttack (Croce & Hein, ICML 2020, through ``torchattacks``) on the next-token
  logits at the end of the prompt, the classifier view F3 (Zhang et al., ACM MM 2025) uses to run AutoAttack on
  LVLMs; the label is the first token of the reference answer (or the clean prediction).

Both reach the LVLM through purification wrappers (:func:`lvlm_core`); the LM-loss attacks go through the victim's
``objective`` with the other questions masked out of the target (``IGNORE``), so EOT and defences apply as usual.
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar

import torch
from torch import nn

from robustbench_med.attack import Attack, SampleRNG
from robustbench_med.attacks.pgd import _view, project, random_start
from robustbench_med.errors import ConfigError, TaskNotSupportedError
from robustbench_med.registry import register_attack
from robustbench_med.victim import Victim
from robustbench_med.victims.lvlm.models import IGNORE, LVLMVictim

VQA = frozenset({"vqa"})
Transform = Callable[[torch.Tensor], torch.Tensor]


def lvlm_core(victim: Victim) -> tuple[LVLMVictim, Transform]:
    """The :class:`LVLMVictim` inside ``victim`` and the input transform in front of it (purification wrappers,
    outermost first, with their gradient mode)."""
    chain = []
    v: Any = victim
    while not isinstance(v, LVLMVictim):
        if not hasattr(v, "victim"):
            raise TaskNotSupportedError(f"{type(v).__name__} does not wrap a vision-language victim (LVLMVictim)")
        if hasattr(v, "purified"):
            chain.append(v.purified)
        v = v.victim

    def transform(x: torch.Tensor) -> torch.Tensor:
        for f in chain:
            x = f(x)
        return x

    return v, transform


def only_questions(y: torch.Tensor, question_ids: torch.Tensor) -> torch.Tensor:
    """``y`` with every answer but those of ``question_ids`` ([B, n], −1 = none) set to ``IGNORE``."""
    keep = torch.zeros_like(y, dtype=torch.bool)
    q = question_ids.to(y.device)
    keep.scatter_(1, q.clamp_min(0), q >= 0)
    return torch.where(keep, y, torch.full_like(y, IGNORE))


def linf_pgd(loss_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, eps: torch.Tensor, steps: int,
             step_size: torch.Tensor, rng: SampleRNG | None = None) -> torch.Tensor:
    """L∞ PGD ascent on a per-sample ``loss_fn`` from a uniform random start drawn from ``rng`` (None: start at
    ``x``; Madry et al., ICLR 2018); the iterate is projected onto the ε-ball around ``x`` and onto [0, 1] after
    every step."""
    x_adv = random_start(x, eps, "Linf", rng) if rng is not None else x.clone()
    alpha = _view(step_size, x)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        grad, = torch.autograd.grad(loss_fn(x_adv).sum(), x_adv)
        x_adv = project(x, x_adv.detach() + alpha * grad.sign(), eps, "Linf")
    return x_adv.detach()


class LVLMAttack(Attack):
    """Common base: task ``vqa``, L∞ budget, PIP's defaults (20 steps, step ε/4), per-sample ε."""

    tasks: ClassVar[frozenset[str]] = VQA
    supports_eps_batch: ClassVar[bool] = True
    default_steps: ClassVar[int] = 20

    def __init__(self, *, random_start: bool = True, **kw: Any) -> None:
        super().__init__(**kw)
        if self.threat.norm != "Linf":
            raise ConfigError(f"{type(self).__name__} is an L∞ attack, not {self.threat.norm}")
        self.random_start = bool(random_start)

    def step_size(self, eps: torch.Tensor) -> torch.Tensor:
        return torch.full_like(eps, self.threat.step_size) if self.threat.step_size is not None else eps / 4

    def run_pgd(self, loss_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return linf_pgd(loss_fn, x, eps, self.threat.steps, self.step_size(eps), self.rng if self.random_start else None)


class QuestionPGD(LVLMAttack):
    """PGD on the LM loss of one known question per image (see the module docstring).

    Args:
        question: ``'first_eval'`` (the image's first evaluation question) or a question id used for every image.
    """

    def __init__(self, *, question: str | int = "first_eval", **kw: Any) -> None:
        super().__init__(**kw)
        if question != "first_eval" and (isinstance(question, bool) or not isinstance(question, int) or question < 0):
            raise ConfigError(f"question must be 'first_eval' or a question id, got {question!r}")
        self.question = question

    def target_questions(self, victim: Victim, y: torch.Tensor) -> torch.Tensor:
        """The attacked question of every image, [B, 1]."""
        core, _ = lvlm_core(victim)
        if self.question == "first_eval":
            return core.evaluation_questions(y)[:, :1]
        return torch.full((len(y), 1), int(self.question), dtype=torch.long, device=y.device)

    def perturb(self, victim: Victim, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        y_known = only_questions(y, self.target_questions(victim, y))
        return self.run_pgd(lambda z: self.objective(victim, z, y_known), x, eps)


class FirstTokenView(nn.Module):
    """First-answer-token logits [b, V] of each input's own question (the classifier torchattacks attacks).

    torchattacks hands its members sub-batches (the samples still robust), so the view identifies every input row by
    its clean image (the nearest, :func:`match_rows`). All images of a batch are
    attacked in one AutoAttack run whatever their questions, instead of one run per question.
    """

    def __init__(self, core: LVLMVictim, transform: Transform, x_clean: torch.Tensor, questions: torch.Tensor,
                 eot: int = 1) -> None:
        super().__init__()
        self.core, self.transform, self.eot = core, transform, eot
        self.x_clean, self.questions = x_clean.detach(), questions

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.questions[match_rows(x, self.x_clean)]
        out = sum(self.core.first_token_logits(self.transform(x), None, q) for _ in range(self.eot))
        return out / self.eot


def match_rows(x: torch.Tensor, x_clean: torch.Tensor) -> torch.Tensor:
    """Index of the clean image each row of ``x`` was perturbed from: the nearest one in L2. (FAB's iterates may
    leave the ε-ball before it projects them back, so no radius is assumed; the final examples are budget-checked by
    the harness.)"""
    return torch.cdist(x.detach().flatten(1).float(), x_clean.flatten(1).float()).argmin(1)


class FirstTokenAutoAttack(Attack):
    """AutoAttack on the first-answer-token logits of each image's first evaluation question (one run per batch).

    Args: ``version`` of AutoAttack (``'standard'``, ``'plus'``, ``'rand'``); ``label``: ``'reference'`` (first token
    of the reference answer) or ``'clean'`` (the clean argmax, F3's "strong" mode); ``n_queries`` of its Square
    member (AutoAttack's default 5000).
    """

    tasks: ClassVar[frozenset[str]] = VQA

    def __init__(self, *, version: str = "standard", label: str = "reference", n_queries: int = 5000, **kw: Any) -> None:
        super().__init__(**kw)
        if version not in ("standard", "plus", "rand"):
            raise ConfigError(f"AutoAttack version must be standard, plus or rand, got {version!r}")
        if label not in ("reference", "clean"):
            raise ConfigError(f"label must be 'reference' or 'clean', got {label!r}")
        if self.threat.norm not in ("Linf", "L2"):
            raise ConfigError(f"AutoAttack supports Linf and L2, not {self.threat.norm}")
        if isinstance(n_queries, bool) or not isinstance(n_queries, int) or n_queries < 1:
            raise ConfigError(f"n_queries must be an integer >= 1, got {n_queries!r}")
        self.version, self.label, self.n_queries = version, label, n_queries

    def perturb(self, victim: Victim, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        import torchattacks

        from robustbench_med.attacks.torchattacks_adapters import set_square_queries

        core, transform = lvlm_core(victim)
        questions = core.evaluation_questions(y)[:, 0].to(x.device)
        view = FirstTokenView(core, transform, x, questions, self.eot).eval()
        if self.label == "reference":
            labels = core.first_token_labels(y, questions)
        else:
            with torch.no_grad():
                labels = view(x).argmax(-1)
        n_classes = int(core.model.get_output_embeddings().weight.shape[0])
        atk = torchattacks.AutoAttack(view, norm=self.threat.norm, eps=float(eps[0]), version=self.version,
                                      n_classes=n_classes, seed=int(torch.initial_seed() % 2**31))
        set_square_queries(atk, self.n_queries)
        return atk(x, labels)


@register_attack("lvlm_pgd.question", norm="Linf", knowledge="white-box", tasks=("vqa",),
                 paper="Madry et al., ICLR 2018; known-question baseline of QAVA (Zhang et al., NAACL 2025)")
def lvlm_pgd_question(**kw: Any) -> QuestionPGD:
    """Question-specific L∞ PGD on the LM loss of the image's first evaluation question."""
    return QuestionPGD(**kw)


@register_attack("lvlm_autoattack.first_token", norm="Linf", knowledge="white-box", tasks=("vqa",),
                 paper="Croce & Hein, ICML 2020; first-token protocol of F3 (Zhang et al., ACM MM 2025)")
def lvlm_autoattack_first_token(**kw: Any) -> FirstTokenAutoAttack:
    """AutoAttack on the first-answer-token logits (torchattacks)."""
    return FirstTokenAutoAttack(**kw)
