"""F3: training-free adversarial purification of vision-language models by cross-modal attention ("fighting fire
with fire").

Zhang et al., "Fighting Fire with Fire (F3): A Training-free and Efficient Visual Adversarial Example Purification
Method in LVLMs", ACM Multimedia 2025 (arXiv 2506.01064); re-implemented from the description in ``methods.md`` §3
(``models/LLaVA.py::purify_f3`` of the authors' code, commit 92a00c5).

For an (adversarial) image x_a:

1. reference image x_r = clip_[0,1](x_a + ξ), ξ ~ UniformInteger{−α·255, …, α·255}/255 per pixel (α = 16/255);
2. A(x): the cross-modal attention of the victim on x. ``source='lm'`` (the paper's): attention from the *last prompt
   token* to the visual tokens, every layer and head of the language model (one forward pass with eager attention,
   read from ``output_attentions``, not through ``generate``). ``source='qformer'`` (BLIP-2 / InstructBLIP only): the
   Q-Former cross-attention of the query tokens to the vision patches;
3. ℒ(x) = s · mean (A(x) − A(x_r))², s = 10⁴, with A(x_r) a constant;
4. g = ∇ℒ at x_a and one step of size β (32/255): ``v2`` x_p = x_a − β·sign(g); ``v3`` x_p = x_a − round(255·β·w)
   ·sign(g)/255 with w = clip(u / mean(u), 0, 1), u = (g − min g)/(max g − min g) (min, max, mean per image);
5. x_p ← x_a + clip(x_p − x_a, −β, β), then clip to [0, 1].

Cost: two forward passes (reference, image) and one backward pass per step. ``steps > 1`` repeats steps 2–5 from
the current image with step β/steps against the same reference, projected on the β-ball around x_a.

Questions. The paper purifies each (image, question) pair, and so does the release: ``f3_llava.py`` sets
``model.input_ids`` to the tokenised prompt of the question being answered before it calls ``purify_f3`` (batch size 1,
one fresh ξ per call), so A(x) is the attention under *that* question [verified, ``f3_llava.py`` and
``models/LLaVA.py`` at commit 92a00c5]. Two targets:

- ``target='question'`` (default, the released behaviour): the defended victim (:class:`QuestionF3Victim`) purifies
  inside :meth:`LVLMVictim.visual_rows`, the one place every path of the victim (scores, greedy answers, LM loss,
  first-token logits, hidden states) takes its visual tokens from: image ``rows[i]`` is purified under question
  ``qids[i]`` and only then encoded, so every attack and every score sees question-conditioned F3. Where no question is
  given (``visual_features(x)``, ``forward``) it falls back to the averaged target. Inferred, not in the release: ξ is
  drawn per (image, question) pair from a stream seeded by one draw of the caller's generator (the global RNG by
  default) and the pair itself (the image's bytes, the question id), so a pair's purification does not depend on the
  other pairs of the batch (the release, at batch size 1, has nothing to depend on) and is reproducible under a seed;
  v3's min / max / mean are per pair (the release takes them over its one-pair tensor).
- ``target='averaged'`` (this project's earlier design, kept bit for bit): F3 as an input purifier applied before the
  victim sees any question; ℒ is averaged over a fixed set of purification questions (``questions``: by default one
  question per question type from the *seen* pool; the victims evaluate on the *unseen* pool), one ξ per image from
  the caller's generator.

Gradients. sign and round are piecewise constant, so the purifier's Jacobian is the identity almost everywhere
(masked by the final [0, 1] clip): BPDA's identity backward pass (Athalye et al., ICML 2018) is the true gradient
a.e., and the attack takes the expectation over ξ with EOT. The released "adaptive" evaluation instead attacks
``purify_f3`` after ``image.detach()``, whose only path from the input is x + clip(A − x, −β, β) with A constant:
zero inside the clip, so the attacker sees masked gradients. ``attack_through: detach`` gives the attacker exactly
zero gradient (the harness flags it); ``gradient='released'`` keeps the released float32 path itself, which leaks an
identity gradient on the pixels where A − x rounds just past ±β (measured: ~50–64 % of pixels on the tiny victims,
so the all-zero masking check does not fire on it; meaningful for ``steps=1``).

Evaluations of the release [verified, ``f3_llava.py`` and ``attacks/autoattack.py``]: the label is the *undefended*
model's clean first-token argmax (``model.get_logit(image)``) and every sample is attacked (``strong=True``);
non-adaptive: AutoAttack ``standard`` at 16/255 on the undefended model, then purified; adaptive: the repository's
``rand`` version (APGD-CE then APGD-DLR, 20 iterations, one restart, ``eot_iter=10``) at 8/255 on
``get_logit_with_purify_f3`` (purify under the question, then the first-token logits). The ``f3`` grid has both
(``lvlm_autoattack.first_token`` with ``label: clean`` through ``transfer``; ``lvlm_apgd.first_token``, BPDA + EOT).
"""
from __future__ import annotations

import hashlib
from typing import Any, ClassVar, Sequence

import torch

from robustbench_med.attack import derive_seed
from robustbench_med.defense import InputPurifier, PurifiedVictim
from robustbench_med.errors import ConfigError, TaskNotSupportedError, check_choice
from robustbench_med.registry import register_defense
from robustbench_med.threat import parse_eps
from robustbench_med.victim import Victim
from robustbench_med.victims.lvlm.models import LVLMVictim, pool_question_ids, vqa_bank

VARIANTS = ("v2", "v3")
SOURCES = ("lm", "qformer")
GRADIENTS = ("bpda", "released")
TARGETS = ("question", "averaged")
QUESTION_SETS = ("types", "seen", "unseen", "all")
PAPER = "Zhang et al., F3, ACM MM 2025 (arXiv 2506.01064)"


def _radius(value: Any, name: str) -> float:
    try:
        r = parse_eps(value)
    except ConfigError as e:  # a ThreatModelError names "eps": name the parameter instead
        raise ConfigError(f"{name}: {e}") from None
    if not 0 < r <= 1:
        raise ConfigError(f"{name} must be in (0, 1], got {value!r}")
    return r


def uniform_int_noise(x: torch.Tensor, alpha: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """ξ ~ UniformInteger{−k, …, k}/255 with k = round(255·α), i.i.d. per pixel (F3's noise)."""
    k = int(round(alpha * 255))
    return torch.randint(-k, k + 1, x.shape, generator=generator, device=x.device).to(x.dtype) / 255


def noisy_reference(x: torch.Tensor, alpha: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """F3's reference image clip_[0,1](x + ξ)."""
    return (x + uniform_int_noise(x, alpha, generator)).clamp(0, 1)


def pair_noise(x: torch.Tensor, questions: torch.Tensor, alpha: float,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """F3's ξ for each (image ``x[i]``, questions ``questions[i]``) pair, from the pair's own stream: seeded by one draw
    of ``generator`` (default: the global CPU RNG) per call and by the pair itself (the image's bytes, its question
    ids), so a pair's ξ does not depend on the other pairs of the batch. Two identical pairs in one call share ξ."""
    device = generator.device if generator is not None else torch.device("cpu")
    base = int(torch.randint(0, 2**62, (1,), generator=generator, device=device))
    images = x.detach().float().cpu()
    keys = questions.view(len(x), -1).tolist()
    out = []
    for image, key in zip(images, keys):
        digest = hashlib.sha256(image.numpy().tobytes()).hexdigest()
        stream = torch.Generator().manual_seed(derive_seed("f3-pair", base, digest, *key))
        out.append(uniform_int_noise(image, alpha, stream))
    return torch.stack(out).to(x.device, x.dtype) if out else torch.zeros_like(x)


def lvlm_of(victim: Victim) -> LVLMVictim:
    """The :class:`LVLMVictim` inside ``victim`` (through wrappers that keep it as ``.victim``)."""
    v: Any = victim
    while not isinstance(v, LVLMVictim):
        if not hasattr(v, "victim"):
            raise TaskNotSupportedError(f"F3 purifies vision-language victims; {type(v).__name__} is not one")
        v = v.victim
    return v


def purification_questions(spec: str | Sequence[int]) -> list[int]:
    """Question ids of a ``questions`` spec: ``'types'`` (first seen-pool question of each type), ``'seen'``,
    ``'unseen'``, ``'all'`` or an explicit list of ids."""
    bank = vqa_bank()[0]
    if isinstance(spec, str):
        if spec not in QUESTION_SETS:
            raise ConfigError(f"questions must be one of {QUESTION_SETS} or a list of ids, got {spec!r}")
        if spec == "all":
            return [q.id for q in bank]
        if spec in ("seen", "unseen"):
            return pool_question_ids(spec)
        first: dict[str, int] = {}
        for q in pool_question_ids("seen"):
            first.setdefault(bank[q].qtype, q)
        return list(first.values())
    ids = [int(q) for q in spec]
    if not ids or any(isinstance(q, bool) or not 0 <= q < len(bank) for q in spec):
        raise ConfigError(f"questions must be non-empty ids in [0, {len(bank)}), got {spec!r}")
    return ids


def lm_attention(core: LVLMVictim, x: torch.Tensor, rows: torch.Tensor, qids: torch.Tensor) -> torch.Tensor:
    """Attention [N, layers, heads, T] from the last prompt token to the T visual tokens for image ``rows[i]`` and
    question ``qids[i]``: one LM forward pass with ``output_attentions`` (eager attention required)."""
    out, slots = core.lm_pass(x, rows, qids, logits_to_keep=1, output_attentions=True)
    if not out.attentions:
        raise ConfigError(f"{core.card.name}: the LM returned no attentions; build the model with attn_implementation='eager'")
    last = torch.stack([a[:, :, -1] for a in out.attentions], 1)  # [N, L, H, S]
    visual = last.permute(0, 3, 1, 2)[slots]  # [N·T, L, H]
    return visual.view(len(slots), -1, *visual.shape[1:]).permute(0, 2, 3, 1).float()


def qformer_attention(core: LVLMVictim, x: torch.Tensor, rows: torch.Tensor, qids: torch.Tensor) -> torch.Tensor:
    """Q-Former cross-attention [N, layers·heads·queries·patches] of the query tokens to the vision patches (read with
    forward hooks on the ``crossattention.attention`` modules during the visual pass)."""
    if not core.has_qformer:
        raise ConfigError("source='qformer' needs a Q-Former model (BLIP-2 / InstructBLIP), not LLaVA")
    maps: list[torch.Tensor] = []
    mods = [m for n, m in core.model.named_modules() if n.endswith("crossattention.attention")]
    hooks = [m.register_forward_hook(lambda _m, _i, o: maps.append(o[1])) for m in mods]
    try:
        core.visual_rows(x, rows, qids, "projector")
    finally:
        for h in hooks:
            h.remove()
    if not maps or any(m is None for m in maps):
        raise ConfigError(f"{core.card.name}: no Q-Former cross-attention maps (eager attention required)")
    flat = torch.cat([m.flatten(1) for m in maps], 1).float()
    return flat if len(flat) == len(rows) else flat[rows]  # BLIP-2's Q-Former sees the image only


def f3_update(x: torch.Tensor, grad: torch.Tensor, beta: float, variant: str) -> torch.Tensor:
    """The F3 step from ``x`` against ``grad`` (descending), before projection (see the module docstring)."""
    sign = grad.sign()
    if variant == "v2":
        return x - beta * sign
    g = grad.flatten(1)
    lo, hi = g.min(1, keepdim=True).values, g.max(1, keepdim=True).values
    u = (g - lo) / (hi - lo).clamp_min(torch.finfo(g.dtype).tiny)
    w = (u / u.mean(1, keepdim=True).clamp_min(torch.finfo(g.dtype).tiny)).clamp(0, 1).view_as(x)
    return x - torch.round(255 * beta * w) * sign / 255


class F3Purifier(InputPurifier):
    """F3 purification through the victim's own cross-modal attention (see the module docstring).

    Args:
        variant: ``'v2'`` (sign step) or ``'v3'`` (per-pixel weighted step, the paper's reported setting).
        alpha: noise level of the reference image (number or ``'16/255'``).
        beta: step size and L∞ radius of the purification (``'32/255'``).
        steps: purification steps (the paper: 1).
        source: ``'lm'`` (LM attention from the last prompt token to the visual tokens) or ``'qformer'``.
        questions: the purification questions of the averaged target (``'types'``, ``'seen'``, ``'unseen'``, ``'all'``
            or ids); with ``target='question'`` only where no question is given.
        loss_scale: s in ℒ (10⁴; only numerics depend on it).
        gradient: ``'bpda'`` (attacks see the identity, the a.e. Jacobian) or ``'released'`` (the authors' code's
            gradient path, attacked through autograd: the naive adaptive evaluation).
        target: ``'question'`` (each (image, question) pair purified under the attention of that question, as released;
            :meth:`wrap` gives a :class:`QuestionF3Victim`) or ``'averaged'`` (one purification per image, ℒ averaged
            over ``questions``; :meth:`wrap` gives a :class:`~robustbench_med.defense.PurifiedVictim`).
    """

    differentiable: ClassVar[bool] = False  # attacked through BPDA, the a.e. gradient (module docstring)
    randomized: ClassVar[bool] = True
    unshared: ClassVar[tuple[str, ...]] = ("core",)  # the bound LVLM (wrap binds the victim it is given)

    def __init__(self, variant: str = "v3", alpha: Any = 16 / 255, beta: Any = 32 / 255, steps: int = 1,
                 source: str = "lm", questions: str | Sequence[int] = "types", loss_scale: float = 1e4,
                 gradient: str = "bpda", target: str = "question") -> None:
        check_choice(variant, VARIANTS, "F3 variant")
        check_choice(source, SOURCES, "F3 attention source")
        check_choice(target, TARGETS, "F3 target")
        check_choice(gradient, GRADIENTS, "F3 gradient")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ConfigError(f"steps must be an integer >= 1, got {steps!r}")
        if isinstance(loss_scale, bool) or not isinstance(loss_scale, (int, float)) or not loss_scale > 0:
            raise ConfigError(f"loss_scale must be a number > 0, got {loss_scale!r}")
        self.variant, self.source, self.steps, self.loss_scale = variant, source, steps, float(loss_scale)
        self.target, self.gradient = target, gradient
        self.alpha, self.beta = _radius(alpha, "alpha"), _radius(beta, "beta")
        self.questions = questions if isinstance(questions, str) else [int(q) for q in questions]
        self.question_ids = purification_questions(questions)
        self.name = f"f3.{variant}"
        self.core: LVLMVictim | None = None

    def params(self) -> dict[str, Any]:
        return {"variant": self.variant, "alpha": self.alpha, "beta": self.beta, "steps": self.steps,
                "source": self.source, "target": self.target, "questions": self.questions,
                "loss_scale": self.loss_scale, "gradient": self.gradient}

    @property
    def default_gradient_mode(self) -> str:
        return "full" if self.gradient == "released" else "bpda"

    def bind(self, victim: Victim) -> None:
        """Attach the victim whose attention guides purification."""
        core = lvlm_of(victim)
        if self.source == "qformer" and not core.has_qformer:
            raise TaskNotSupportedError(f"{core.card.name}: source='qformer' needs a Q-Former model (BLIP-2 / InstructBLIP)")
        self.core = core

    def prepare(self, victim: Victim, train: Any) -> None:
        self.bind(victim)

    def wrap(self, victim: Victim) -> PurifiedVictim:
        """The defended victim: a :class:`QuestionF3Victim` (``target='question'``, which needs the LVLM itself, not a
        wrapper of it) or a :class:`~robustbench_med.defense.PurifiedVictim` (``target='averaged'``)."""
        self.bind(victim)
        if self.target == "averaged":
            return PurifiedVictim(victim, self)
        if not isinstance(victim, LVLMVictim):
            raise TaskNotSupportedError(
                f"F3 with target='question' purifies inside the LVLM, so it wraps the LVLM victim itself, not a "
                f"{type(victim).__name__} around it; use target='averaged' to put F3 in front of another wrapper")
        return QuestionF3Victim(victim, self)

    def question_matrix(self, x: torch.Tensor, questions: Any = None) -> torch.Tensor:
        """Purification question ids [B, n]: ``questions`` ([B] one per image, or [B, n]) or, for ``None``, the fixed
        set ``question_ids`` for every image (the averaged target)."""
        if questions is None:
            return torch.tensor(self.question_ids, device=x.device).expand(len(x), -1)
        q = torch.as_tensor(questions, dtype=torch.long, device=x.device)
        if q.dim() not in (1, 2) or len(q) != len(x) or q.numel() == 0 or (q < 0).any():
            raise ConfigError(f"questions must be question ids [B] or [B, n] for a batch of {len(x)}, got shape {tuple(q.shape)}")
        return q.view(len(x), -1)

    def attention(self, x: torch.Tensor, questions: Any = None) -> torch.Tensor:
        """Cross-modal attention [B, n, ...] of the bound victim on ``x`` under each image's purification questions
        (:meth:`question_matrix`; one forward pass)."""
        if self.core is None:
            raise ConfigError("F3 needs its victim: call wrap(victim) or prepare(victim, train) first")
        q = self.question_matrix(x, questions)
        b, n = q.shape
        rows = torch.arange(b, device=x.device).repeat_interleave(n)
        fn = lm_attention if self.source == "lm" else qformer_attention
        att = fn(self.core, x, rows, q.flatten())
        return att.view(b, n, *att.shape[1:])

    def loss(self, x: torch.Tensor, reference: torch.Tensor, questions: Any = None) -> torch.Tensor:
        """Per-image scaled MSE [B] between the attention on ``x`` and the fixed ``reference`` attention."""
        return self.loss_scale * (self.attention(x, questions) - reference).pow(2).flatten(1).mean(1)

    def purify(self, x: torch.Tensor, generator: torch.Generator | None = None, questions: Any = None,
               noise: torch.Tensor | None = None) -> torch.Tensor:
        """F3-purified batch. ``questions=None``: the averaged target over ``question_ids``, ξ from ``generator``
        (default: the global RNG of ``x``'s device); ``questions`` ([B] or [B, n]): image ``i`` purified under its
        questions, ξ from the pair's own stream (:func:`pair_noise`). ``noise`` gives ξ instead (tests, ablations).
        The step is computed on a detached copy and added as a constant, so the returned tensor's gradient is the a.e.
        Jacobian (identity, masked by the [0, 1] clip)."""
        x_a = x.detach()
        q = None if questions is None else self.question_matrix(x_a, questions)
        if noise is None:
            noise = uniform_int_noise(x_a, self.alpha, generator) if q is None else pair_noise(x_a, q, self.alpha, generator)
        elif noise.shape != x.shape:
            raise ConfigError(f"noise must have the batch's shape {tuple(x.shape)}, got {tuple(noise.shape)}")
        with torch.enable_grad():
            with torch.no_grad():
                reference = self.attention((x_a + noise).clamp(0, 1), q)
            x_p, step = x_a, self.beta / self.steps
            for _ in range(self.steps):
                x_in = x_p.clone().requires_grad_(True)
                grad, = torch.autograd.grad(self.loss(x_in, reference, q).sum(), x_in)
                raw = f3_update(x_p, grad, step, self.variant).detach()
                x_p = (x_a + (raw - x_a).clamp(-self.beta, self.beta)).clamp(0, 1).detach()
        if self.gradient == "released":  # the released code's only path from x: x + clip(A − x, ±β), A constant
            return (x + (raw - x).clamp(-self.beta, self.beta)).clamp(0, 1)
        return (x + (x_p - x_a)).clamp(0, 1)


class QuestionF3Victim(LVLMVictim, PurifiedVictim):
    """An LVLM victim defended by question-conditioned F3 (``target='question'``, the released behaviour; Zhang et
    al., ACM MM 2025): :meth:`visual_rows` purifies image ``rows[i]`` under question ``qids[i]`` before encoding it, so
    scoring, greedy answers, the LM loss, first-token logits and hidden states all see each image purified under the
    question they ask (``qids=None``: the averaged target). It is a :class:`~robustbench_med.defense.PurifiedVictim`
    (``gradient_mode`` ``'full'``, ``'bpda'`` or ``'detach'`` applies to every pair's purification; the harness's
    ``attack_through`` works unchanged) and an :class:`LVLMVictim` whose model, questions and tokens are the wrapped
    victim's (read through to it), so attacks reach it as the LVLM itself."""

    def __init__(self, victim: LVLMVictim, defense: F3Purifier, gradient_mode: str | None = None) -> None:
        if not isinstance(victim, LVLMVictim):
            raise TaskNotSupportedError(f"QuestionF3Victim wraps an LVLMVictim, not {type(victim).__name__}")
        PurifiedVictim.__init__(self, victim, defense, gradient_mode)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)  # nn.Module: this wrapper's parameters, buffers and submodules
        except AttributeError:
            inner = self.__dict__.get("_modules", {}).get("victim")
            if inner is None or name.startswith("__"):
                raise
            return getattr(inner, name)  # the wrapped LVLM's model, processor, token tables, evaluation protocol

    def with_gradient_mode(self, mode: str) -> "QuestionF3Victim":
        return QuestionF3Victim(self.victim, self.defense, mode)

    def purified_pairs(self, x: torch.Tensor, rows: torch.Tensor, qids: torch.Tensor) -> torch.Tensor:
        """Image ``rows[i]`` purified under question ``qids[i]``, [N, C, H, W] (one F3 call for all pairs)."""
        return self.through(x[rows], lambda z: self.defense.purify(z, questions=qids))

    def visual_rows(self, x: torch.Tensor, rows: torch.Tensor, qids: torch.Tensor | None, layer: str) -> torch.Tensor:
        """The wrapped victim's visual features of image ``rows[i]`` after F3 under question ``qids[i]``
        (``None``: the whole batch purified with the averaged target)."""
        if qids is None:
            return self.victim.visual_rows(self.purified(x), rows, None, layer)
        pairs = self.purified_pairs(x, rows, qids)
        return self.victim.visual_rows(pairs, torch.arange(len(rows), device=x.device), qids, layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.victim(self.purified(x))


class NoiseOnly(InputPurifier):
    """F3's reference image as a purifier on its own: clip_[0,1](x + ξ), ξ ~ UniformInteger{−α·255, …, α·255}/255
    (the noise-only ablation of F3, Zhang et al., ACM MM 2025); randomised, attacked with EOT."""

    randomized: ClassVar[bool] = True

    def __init__(self, alpha: Any = 16 / 255) -> None:
        self.alpha = _radius(alpha, "alpha")

    def params(self) -> dict[str, Any]:
        return {"alpha": self.alpha}

    def purify(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return (x + uniform_int_noise(x, self.alpha, generator)).clamp(0, 1)


@register_defense("f3.v3", kind="purifier", tasks=("vqa",), paper=PAPER)
def f3_v3(**kw: Any) -> F3Purifier:
    """F3 with the per-pixel weighted step (v3, the paper's reported setting); attacked through BPDA + EOT."""
    return F3Purifier(variant="v3", **kw)


@register_defense("f3.v2", kind="purifier", tasks=("vqa",), paper=PAPER)
def f3_v2(**kw: Any) -> F3Purifier:
    """F3 with the sign step (v2); attacked through BPDA + EOT."""
    return F3Purifier(variant="v2", **kw)


@register_defense("f3.noise_only", kind="purifier", paper=PAPER + "; EOT: Athalye et al., ICML 2018")
def f3_noise_only(**kw: Any) -> NoiseOnly:
    """F3's uniform integer noise alone (its reference image), attacked with EOT."""
    return NoiseOnly(**kw)
