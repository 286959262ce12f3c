"""Attacks on the LM output of vision-language victims: question-specific PGD and AutoAttack on first-token logits.

* ``lvlm_pgd.question``: L∞ PGD (Madry et al., ICLR 2018) maximising the LM loss of the reference answer of *one known
  question* per image (the known-question baseline of QAVA, Zhang et al., NAACL 2025; PIP's ``--attack_position llm``
  setting: random sign start, step 2/255 at ε = 8/255, 20 steps). By default the attacked question is the image's
  first evaluation question, so the victim's ``vqa_accuracy_first`` is the attack on its own question and
  ``vqa_accuracy_others`` its transfer to the other questions of the same image.
* ``lvlm_autoattack.first_token``: AutoAttack (Croce & Hein, ICML 2020, through ``torchattacks``) on the next-token
  logits at the end of the prompt, the classifier view F3 (Zhang et al., ACM MM 2025) uses to run AutoAttack on
  LVLMs; the label is the first token of the reference answer (or the clean prediction).
* ``lvlm_apgd.first_token``: APGD-CE then APGD-DLR (Croce & Hein, ICML 2020) on the same first-token logits, every
  gradient averaged over ``eot`` draws of a randomised defence: the adaptive evaluation of F3's release (its AutoAttack
  ``rand`` version: APGD-CE + APGD-DLR, 20 iterations, one restart, ``eot_iter=10``), attacked here through BPDA.

All reach the LVLM through purification wrappers (:func:`lvlm_core`); the LM-loss attacks go through the victim's
``objective`` with the other questions masked out of the target (``IGNORE``), so EOT and defences apply as usual. A
defence that acts inside the LVLM (question-conditioned F3, ``defenses/f3.py``) is itself an :class:`LVLMVictim`, so
:func:`lvlm_core` stops at it and every logit, loss and feature the attacks read is the defended one.
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar

import torch
from torch import nn

from robustbench_med.attack import Attack, SampleRNG
from robustbench_med.attacks.apgd import checkpoints
from robustbench_med.attacks.pgd import _input_grad, _view, project, random_start
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


FIRST_TOKEN_LOSSES = ("ce", "dlr")
FIRST_TOKEN_LABELS = ("reference", "clean")


def first_token_loss(logits: torch.Tensor, labels: torch.Tensor, loss: str) -> torch.Tensor:
    """Per-sample CE, or DLR (Croce & Hein, ICML 2020, eq. 4: −(z_y − max_{i≠y} z_i) / (z_π1 − z_π3 + 10⁻¹²)), of
    logits [B, V] against token ids [B]."""
    if loss == "ce":
        return nn.functional.cross_entropy(logits.float(), labels, reduction="none")
    top = logits.float().topk(3, dim=1)
    z_y = logits.float().gather(1, labels[:, None])[:, 0]
    other = torch.where(top.indices[:, 0] == labels, top.values[:, 1], top.values[:, 0])
    return -(z_y - other) / (top.values[:, 0] - top.values[:, 2] + 1e-12)


def first_token_margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """z_y − max_{i≠y} z_i per sample (negative: the first token is no longer the label)."""
    top = logits.float().topk(2, dim=1)
    z_y = logits.float().gather(1, labels[:, None])[:, 0]
    return z_y - torch.where(top.indices[:, 0] == labels, top.values[:, 1], top.values[:, 0])


def undefended_lvlm(victim: Victim) -> LVLMVictim:
    """The LVLM under every wrapper of ``victim``, defences included (what F3's release takes its clean label from)."""
    v: Any = victim
    while hasattr(v, "victim"):
        v = v.victim
    if not isinstance(v, LVLMVictim):
        raise TaskNotSupportedError(f"{type(v).__name__} does not wrap a vision-language victim (LVLMVictim)")
    return v


class FirstTokenAPGD(Attack):
    """APGD (Croce & Hein, ICML 2020) on the first-answer-token logits of each image's first evaluation question: one
    run per loss of ``losses`` (default APGD-CE, then APGD-DLR: F3's adaptive evaluation, the release's AutoAttack
    ``rand`` version), every gradient the mean of ``eot`` gradients over draws of a randomised defence (the release's
    ``eot_iter``). Every image is attacked (the release's ``strong`` mode); per image the result is the highest-loss
    point of the run whose EOT-averaged label margin there is the lowest (AutoAttack runs DLR only on the images CE left
    unbroken and keeps the first run that breaks an image; here DLR runs on every image, so an image's result never
    depends on the others'). The step-size schedule is :mod:`.apgd`'s; at a
    restart the iterate returns to the best point with the gradient stored there (fra31's ``grad_best``), so every run
    makes exactly ``steps + 1`` EOT evaluations.

    Args:
        losses: the APGD runs in order, joined by ``+``: ``'ce+dlr'`` (default), ``'ce'``, ``'dlr'`` or ``'dlr+ce'``
            (a string, as a list in a grid YAML would expand into cells).
        label: ``'reference'`` (first token of the reference answer) or ``'clean'`` (the clean argmax of the
            *undefended* LVLM, as F3's release: ``model.get_logit(image)``; for an attack on the undefended model the
            same label as ``lvlm_autoattack.first_token``'s ``'clean'``).
        rho: the fraction of increasing steps below which a checkpoint halves the step size (0.75).
    """

    tasks: ClassVar[frozenset[str]] = VQA
    supports_eps_batch: ClassVar[bool] = True
    default_steps: ClassVar[int] = 20  # the release's n_iter

    def __init__(self, *, losses: str = "ce+dlr", label: str = "reference", rho: float = 0.75, **kw: Any) -> None:
        super().__init__(**kw)
        if self.threat.norm != "Linf":
            raise ConfigError(f"lvlm_apgd.first_token is an L∞ attack, not {self.threat.norm}")
        chosen = tuple(losses.split("+")) if isinstance(losses, str) else ()
        if not chosen or any(l not in FIRST_TOKEN_LOSSES for l in chosen) or len(set(chosen)) != len(chosen):
            raise ConfigError(f"losses must be distinct names from {FIRST_TOKEN_LOSSES} joined by '+' (e.g. 'ce+dlr'), "
                              f"got {losses!r}")
        if label not in FIRST_TOKEN_LABELS:
            raise ConfigError(f"label must be one of {FIRST_TOKEN_LABELS}, got {label!r}")
        if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not 0 < rho <= 1:
            raise ConfigError(f"rho must lie in (0, 1], got {rho!r}")
        self.losses, self.label, self.rho = chosen, label, float(rho)
        self._labels: torch.Tensor | None = None

    def labels(self, victim: Victim, x: torch.Tensor, y: torch.Tensor, questions: torch.Tensor) -> torch.Tensor:
        """The first-token label of every image (``label``)."""
        core, _ = lvlm_core(victim)
        if self.label == "reference":
            return core.first_token_labels(y, questions).to(x.device)
        with torch.no_grad():
            return undefended_lvlm(victim).first_token_logits(x, None, questions).argmax(-1)

    def objective(self, victim: Victim, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The first loss of ``losses`` on the first-token logits [B], averaged over ``eot`` passes (labels: those of
        the running call, or outside a call the reference answers' first tokens)."""
        core, transform = lvlm_core(victim)
        questions = core.evaluation_questions(y)[:, 0].to(x.device)
        labels = self._labels if self._labels is not None else core.first_token_labels(y, questions).to(x.device)
        return self.expectation(
            lambda z: first_token_loss(core.first_token_logits(transform(z), None, questions), labels, self.losses[0]), x)

    def evaluate(self, logits_fn: Transform, z: torch.Tensor, labels: torch.Tensor, loss: str) -> tuple[torch.Tensor, ...]:
        """(loss, sign of its gradient, label margin) at ``z``, each the mean over ``eot`` draws (one backward pass per
        draw)."""
        z = z.detach().requires_grad_(True)
        f, grad, logits_sum = torch.zeros(len(z), device=z.device), torch.zeros_like(z), None
        for _ in range(self.eot):
            logits = logits_fn(z)
            value = first_token_loss(logits, labels, loss)
            grad += _input_grad(value.sum(), z)
            f += value.detach()
            logits_sum = logits.detach().float() if logits_sum is None else logits_sum + logits.detach().float()
        return f / self.eot, grad.sign(), first_token_margin(logits_sum / self.eot, labels)

    def run_apgd(self, logits_fn: Transform, x: torch.Tensor, labels: torch.Tensor, eps: torch.Tensor,
                 loss: str) -> tuple[torch.Tensor, torch.Tensor]:
        """One APGD run maximising ``loss`` from a uniform random start: (highest-loss point, label margin there)."""
        marks = set(checkpoints(self.threat.steps))
        eta = 2 * eps.clone()
        x_k = random_start(x, eps, "Linf", self.rng)
        f_k, d_k, m_k = self.evaluate(logits_fn, x_k, labels, loss)
        best, f_best, d_best, m_best = x_k.clone(), f_k.clone(), d_k.clone(), m_k.clone()
        x_prev, increases, last = x_k.clone(), torch.zeros_like(f_k), 0
        eta_last, f_best_last = eta.clone(), f_best.clone()
        for k in range(self.threat.steps):
            z = project(x, x_k + _view(eta, x) * d_k, eps, "Linf")
            a = 1.0 if k == 0 else 0.75
            x_new = project(x, x_k + a * (z - x_k) + (1 - a) * (x_k - x_prev), eps, "Linf")
            f_new, d_new, m_new = self.evaluate(logits_fn, x_new, labels, loss)
            increases += (f_new > f_k).float()
            up = f_new > f_best
            best, d_best = torch.where(_view(up, x), x_new, best), torch.where(_view(up, x), d_new, d_best)
            f_best, m_best = torch.where(up, f_new, f_best), torch.where(up, m_new, m_best)
            x_prev, x_k, f_k, d_k = x_k, x_new, f_new, d_new
            if k + 1 in marks:
                halve = (increases < self.rho * (k + 1 - last)) | ((eta == eta_last) & (f_best == f_best_last))
                eta_last, f_best_last = eta.clone(), f_best.clone()
                eta = torch.where(halve, eta / 2, eta)
                x_k, d_k = torch.where(_view(halve, x), best, x_k), torch.where(_view(halve, x), d_best, d_k)
                f_k = torch.where(halve, f_best, f_k)
                increases.zero_()
                last = k + 1
        return best.detach(), m_best

    def perturb(self, victim: Victim, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        core, transform = lvlm_core(victim)
        questions = core.evaluation_questions(y)[:, 0].to(x.device)
        labels = self.labels(victim, x, y, questions)

        def logits_fn(z: torch.Tensor) -> torch.Tensor:
            return core.first_token_logits(transform(z), None, questions)

        self._labels = labels
        try:
            result, margin = self.run_apgd(logits_fn, x, labels, eps, self.losses[0])
            for loss in self.losses[1:]:
                x_l, m_l = self.run_apgd(logits_fn, x, labels, eps, loss)
                better = m_l < margin
                result, margin = torch.where(_view(better, x), x_l, result), torch.where(better, m_l, margin)
        finally:
            self._labels = None
        return result


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


@register_attack("lvlm_apgd.first_token", norm="Linf", knowledge="white-box", tasks=("vqa",),
                 paper="Croce & Hein, ICML 2020; adaptive protocol of F3 (Zhang et al., ACM MM 2025)")
def lvlm_apgd_first_token(**kw: Any) -> FirstTokenAPGD:
    """APGD-CE then APGD-DLR on the first-answer-token logits, EOT over a randomised defence (F3's adaptive protocol)."""
    return FirstTokenAPGD(**kw)
