"""APPLE: protected-attribute-aware perturbations on the latent embedding of a frozen segmentor.

Xu, Tang, Quan, Yao, Kong, Ding, Ning, Zhou, "APPLE: Adversarial Privacy-aware Perturbations on Latent Embedding for
Unfairness Mitigation", arXiv 2403.05114 (2024); published as "Fair ultrasound diagnosis via adversarial protected
attribute aware perturbations on latent embeddings", npj Digital Medicine 8 (2025). The authors released no code;
this is a re-implementation of the documented form (``shared/reference/methods.md`` §5):

- the segmentor φ(x) = D_s(E_s(x)) stays frozen (its weights never change);
- a small perturber G_p maps the encoder's latent f_o = E_s(x) to f_p = f_o + G_p(f_o), and the decoder sees f_p;
- a discriminator D_p predicts the sensitive attribute a (``sex`` or ``age_group``) from f_p;
- D_p minimises CE(D_p(f_p), a); G_p minimises ``L_seg(D_s(f_p), y) − β·CE(D_p(f_p), a) + λ·‖G_p(f_o)‖²/‖f_o‖²``
  (variant ``'adversarial'``), or ``L_seg + β·CE(D_p(f_p), uniform) + λ·…`` (variant ``'uniform'``: pushes D_p's
  output towards the uniform distribution instead of maximising its loss).

**Which features form "the latent embedding".** The paper perturbs "the latent embedding" between a frozen encoder and
decoder, so that "no fairness-related features can be passed to the decoder". For a skip-connected U-Net the decoder
reads the bottleneck *and* the skip features, so that choice is a design decision here, made explicit by ``latent``:

- ``'bottleneck'`` (default): only the bottleneck, what ``encode`` returns as a tensor or under ``"z"`` of a dict;
  skip features reach ``decode`` unchanged (the literal reading: one latent embedding);
- ``'all'``: every tensor ``encode`` returns (bottleneck and skips), each with its own G_p, and one D_p reading all
  of them (the reading of the stated goal: nothing the decoder sees carries the attribute).

The wrapped victim computes ``decode(perturb(encode(x)))`` and is differentiable end to end, so segmentation attacks
run on it adaptively. :func:`attribute_probe` measures leakage (a fresh classifier on held-out latents).
"""
from __future__ import annotations

import hashlib
import json
import time
from typing import Any, ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from robustbench_med.attack import seeded
from robustbench_med.defense import Defense
from robustbench_med.errors import ConfigError, TaskNotSupportedError, check_choice
from robustbench_med.registry import VICTIMS, register_defense
from robustbench_med.victim import Victim, WrappedVictim

VARIANTS = ("adversarial", "uniform")
LATENTS = ("bottleneck", "all")
CACHE_VERSION = 2  # part of the cache key: bump when the networks or the training loop change
ATTRIBUTES = ("sex", "age_group")


# ---------------------------------------------------------------------------------------------------------------
# latent access


def has_latent(victim: Victim) -> bool:
    """Whether ``victim`` exposes a usable ``encode`` / ``decode`` split."""
    if not (callable(getattr(victim, "encode", None)) and callable(getattr(victim, "decode", None))):
        return False
    return bool(getattr(victim, "has_latent", True))


def latent_parts(latent: Any, which: str = "bottleneck") -> dict[str, torch.Tensor]:
    """The perturbed parts of a latent, by name: ``{"z": latent}`` for a tensor; for a dict, ``{"z": latent["z"]}``
    (``which='bottleneck'``) or every tensor entry (``which='all'``: bottleneck and skip features)."""
    if which not in LATENTS:
        raise ConfigError(f"APPLE latent must be one of {LATENTS}, got {which!r}")
    if isinstance(latent, torch.Tensor):
        return {"z": latent}
    if isinstance(latent, dict) and isinstance(latent.get("z"), torch.Tensor):
        if which == "bottleneck":
            return {"z": latent["z"]}
        return {k: v for k, v in sorted(latent.items()) if isinstance(v, torch.Tensor)}
    keys = sorted(latent) if isinstance(latent, dict) else type(latent).__name__
    raise TaskNotSupportedError(f"APPLE perturbs a tensor latent or a dict latent with a 'z' entry; encode() returned {keys}")


def with_parts(latent: Any, parts: dict[str, torch.Tensor]) -> Any:
    """``latent`` with the entries in ``parts`` replaced (the others, e.g. unperturbed skips, untouched)."""
    return parts["z"] if isinstance(latent, torch.Tensor) else {**latent, **parts}


def main_latent(latent: Any) -> torch.Tensor:
    """The bottleneck of a latent: the tensor itself, or ``latent["z"]``."""
    return latent_parts(latent)["z"]


def relative_norm(parts: dict[str, torch.Tensor], deltas: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-sample perturbation size ``mean_k ‖δ_k‖² / ‖f_k‖²`` over the perturbed parts k (shape [B])."""
    rel = [deltas[k].flatten(1).pow(2).sum(1) / parts[k].flatten(1).pow(2).sum(1).clamp_min(1e-12) for k in parts]
    return torch.stack(rel).mean(0)


# ---------------------------------------------------------------------------------------------------------------
# networks



class Perturber(nn.Module):
    """G_p on one latent tensor: a two-layer residual generator (3×3 convs for [B, C, h, w], an MLP on the last
    dimension for [B, D] or tokens [B, N, D]).

    The last layer starts at zero, so before training f_p = f_o and the wrapped model equals the original.
    """

    def __init__(self, shape: tuple[int, ...], hidden: int) -> None:
        super().__init__()
        if len(shape) == 3:
            c = shape[0]
            self.net = nn.Sequential(nn.Conv2d(c, hidden, 3, padding=1), nn.ReLU(), nn.Conv2d(hidden, c, 3, padding=1))
        elif len(shape) in (1, 2):  # a vector [B, D] or tokens [B, N, D]: an MLP on the last dimension
            self.net = nn.Sequential(nn.Linear(shape[-1], hidden), nn.ReLU(), nn.Linear(hidden, shape[-1]))
        else:
            raise TaskNotSupportedError(f"APPLE supports [B, C, h, w], [B, N, D] or [B, D] latents, got per-sample shape {shape}")
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """The perturbation G_p(z) (same shape as z)."""
        return self.net(z)


class LatentPerturber(nn.Module):
    """G_p over the perturbed parts of a latent: one :class:`Perturber` per part (``'z'`` alone, or bottleneck and
    skips for ``latent='all'``)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], hidden: int, which: str = "bottleneck") -> None:
        super().__init__()
        self.which = which
        self.parts = nn.ModuleDict({k: Perturber(s, hidden) for k, s in shapes.items()})

    def deltas(self, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """G_p(f_o) for every perturbed part."""
        return {k: self.parts[k](parts[k]) for k in self.parts}

    def forward(self, latent: Any) -> Any:
        """The perturbed latent f_o + G_p(f_o) (unperturbed entries passed through)."""
        parts = latent_parts(latent, self.which)
        return with_parts(latent, {k: parts[k] + d for k, d in self.deltas(parts).items()})


class _Branch(nn.Module):
    """Features of one latent part for D_p: two conv + ReLU layers and global average pooling ([B, C, h, w]), or an
    MLP averaged over tokens ([B, N, D]) / applied to vectors ([B, D])."""

    def __init__(self, shape: tuple[int, ...], hidden: int) -> None:
        super().__init__()
        if len(shape) == 3:
            self.net = nn.Sequential(nn.Conv2d(shape[0], hidden, 3, padding=1), nn.ReLU(),
                                     nn.Conv2d(hidden, hidden, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        else:
            self.net = nn.Sequential(nn.Linear(shape[-1], hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.tokens = len(shape) == 2

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.net(z)
        return h.mean(1) if self.tokens else h


class Discriminator(nn.Module):
    """D_p: predicts the sensitive attribute (K classes) from the perturbed latent parts: one :class:`_Branch` per
    part, concatenated, and a linear head. Also the architecture of the fresh leakage probe (:func:`attribute_probe`)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], hidden: int, n_classes: int) -> None:
        super().__init__()
        self.branches = nn.ModuleDict({k: _Branch(s, hidden) for k, s in shapes.items()})
        self.head = nn.Linear(hidden * len(shapes), n_classes)

    def forward(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.head(torch.cat([self.branches[k](parts[k]) for k in self.branches], 1))


# ---------------------------------------------------------------------------------------------------------------
# the wrapped victim


class APPLEVictim(WrappedVictim):
    """``decode(f_o + G_p(f_o))`` with ``f_o = encode(x)``: the frozen segmentor with APPLE's latent perturbation.

    Same card, task, input contract and normalisation as the wrapped victim; gradients flow to the input.
    """

    routes_through_victim = False  # the perturbation acts on latents: objective and metrics follow forward

    def __init__(self, victim: Victim, perturber: LatentPerturber) -> None:
        super().__init__(victim)
        self.perturber = perturber

    def perturbed_latent(self, x: torch.Tensor) -> Any:
        return self.perturber(self.victim.encode(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.victim.decode(self.perturbed_latent(x))


# ---------------------------------------------------------------------------------------------------------------
# the defence


class APPLE(Defense):
    """APPLE latent perturber (Xu et al., arXiv 2403.05114; npj Digit. Med. 2025), trained in :meth:`prepare`.

    Args:
        attribute: the sensitive attribute to hide (``'sex'`` or ``'age_group'``).
        beta: weight β of the adversarial (or uniform-target) term.
        penalty: weight λ of the relative perturbation norm ``mean_b mean_k ‖G_p(f_o)_{b,k}‖² / ‖f_o,{b,k}‖²``.
        hidden: width of each G_p (the perturber size) and of each D_p branch.
        latent: ``'bottleneck'`` (perturb ``encode``'s ``"z"`` only) or ``'all'`` (bottleneck and skip features);
            see the module docstring.
        epochs: adversarial training epochs; ``d_warmup_epochs``: epochs of D_p alone on unperturbed latents first;
            ``d_steps``: D_p updates per G_p update.
        variant: ``'uniform'`` (default: G_p pushes D_p's output to uniform) or ``'adversarial'`` (G_p maximises D_p's
            loss). The default is ``'uniform'`` because maximising D_p's cross-entropy can be met by making D_p
            confidently *wrong*, which keeps the attribute decodable. Measured on a width-8 U-Net trained 8 epochs on
            256 phantom slices at 32×32 (``tests/test_apple.py``), hiding ``age_group`` with ``latent='all'`` (β = 5,
            λ = 0.1, 8 epochs, 5 D_p steps): a fresh probe on held-out val latents reads age at 0.64 unperturbed and
            0.34–0.47 after ``'uniform'`` APPLE (APPLE seeds 0–4), 0.34 / 0.51 / 0.73 after ``'adversarial'`` (seeds
            0–2); Dice 0.377 → 0.387–0.393. Fooling D_p is not removing the attribute: always check leakage with
            :func:`attribute_probe` before reading a fairness effect into APPLE's grid cells. Adversarial training is
            unstable at large β or small λ (the perturbation can outgrow the features and Dice collapse); the
            ``fairness`` grid's comments give the settings measured on the zoo.
        n_train, batch_size, lr, seed: training data size (first n of the train split), batch, Adam step, seed.
        target_field: the segmentation target (default: the victim's training recipe's, else ``'mask'``).
        cache: reuse a perturber trained earlier for the same victim weights, data and parameters.
    """

    kind: ClassVar[str] = "latent"
    differentiable: ClassVar[bool] = True
    randomized: ClassVar[bool] = False

    def __init__(self, attribute: str = "sex", beta: float = 5.0, penalty: float = 0.1, hidden: int = 32, epochs: int = 12,
                 variant: str = "uniform", latent: str = "bottleneck", d_warmup_epochs: int = 1, d_steps: int = 2,
                 n_train: int = 512, batch_size: int = 32, lr: float = 3e-3, seed: int = 0, target_field: str | None = None,
                 cache: bool = True) -> None:
        check_choice(attribute, ATTRIBUTES, "APPLE attribute")
        check_choice(variant, VARIANTS, "APPLE variant")
        check_choice(latent, LATENTS, "APPLE latent")
        for name, v in (("beta", beta), ("penalty", penalty), ("lr", lr)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (name == "lr" and v == 0):
                raise ConfigError(f"APPLE {name} must be a number {'> 0' if name == 'lr' else '>= 0'}, got {v!r}")
        for name, v in (("hidden", hidden), ("epochs", epochs), ("d_steps", d_steps), ("n_train", n_train), ("batch_size", batch_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"APPLE {name} must be an integer >= 1, got {v!r}")
        if isinstance(d_warmup_epochs, bool) or not isinstance(d_warmup_epochs, int) or d_warmup_epochs < 0:
            raise ConfigError(f"APPLE d_warmup_epochs must be an integer >= 0, got {d_warmup_epochs!r}")
        self.attribute, self.beta, self.penalty, self.hidden, self.epochs = attribute, float(beta), float(penalty), hidden, epochs
        self.variant, self.latent, self.d_warmup_epochs, self.d_steps = variant, latent, d_warmup_epochs, d_steps
        self.n_train, self.batch_size = n_train, batch_size
        self.lr, self.seed, self.target_field, self.cache = float(lr), int(seed), target_field, bool(cache)
        self.perturber: LatentPerturber | None = None
        self.discriminator: Discriminator | None = None
        self.levels: tuple[str, ...] = ()
        self.history: dict[str, Any] = {}

    def params(self) -> dict[str, Any]:
        return {"attribute": self.attribute, "beta": self.beta, "penalty": self.penalty, "hidden": self.hidden,
                "epochs": self.epochs, "variant": self.variant, "latent": self.latent, "d_warmup_epochs": self.d_warmup_epochs,
                "d_steps": self.d_steps, "n_train": self.n_train, "batch_size": self.batch_size, "lr": self.lr,
                "seed": self.seed, "target_field": self.target_field}

    # training ---------------------------------------------------------------------------------------------
    def prepare(self, victim: Victim, train: Any) -> None:
        """Train G_p and D_p adversarially on the first ``n_train`` samples of ``train`` with ``victim`` frozen."""
        check_victim(victim)
        x, y, a, levels = training_data(victim, train, self.attribute, self.n_train, self.target_field)
        shapes = part_shapes(victim, x[:1], self.latent)
        with seeded(self.seed, victim.device):
            self.perturber = LatentPerturber(shapes, self.hidden, self.latent).to(victim.device)
            self.discriminator = Discriminator(shapes, self.hidden, len(levels)).to(victim.device)
        self.levels = levels
        if self.cache and self._load_cached(victim, train):
            return
        start = time.perf_counter()
        with frozen(victim), seeded(self.seed, victim.device):
            self.history = self._train(victim, x, y, a)
        self.history["seconds"] = round(time.perf_counter() - start, 2)
        if self.cache:
            self._save_cached(victim, train)

    def _train(self, victim: Victim, x: torch.Tensor, y: torch.Tensor, a: torch.Tensor) -> dict[str, Any]:
        assert self.perturber is not None and self.discriminator is not None
        opt_g = torch.optim.Adam(self.perturber.parameters(), lr=self.lr)
        opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=self.lr)
        gen = torch.Generator().manual_seed(self.seed)
        log: dict[str, list[float]] = {"d_loss": [], "d_acc": [], "seg_loss": [], "rel_norm": []}
        for epoch in range(self.d_warmup_epochs + self.epochs):
            warmup = epoch < self.d_warmup_epochs
            for idx in torch.randperm(len(x), generator=gen).split(self.batch_size):
                idx = idx.to(x.device)
                latent = _encode(victim, x[idx])
                parts = latent_parts(latent, self.latent)
                for _ in range(1 if warmup else self.d_steps):
                    d_loss, d_acc = self._d_step(opt_d, parts, a[idx], perturb=not warmup)
                if warmup:
                    continue
                seg, rel = self._g_step(opt_g, victim, latent, parts, y[idx], a[idx])
                for k, v in (("d_loss", d_loss), ("d_acc", d_acc), ("seg_loss", seg), ("rel_norm", rel)):
                    log[k].append(v)
        tail = max(1, len(log["d_acc"]) // max(1, self.epochs))  # the last epoch's batches
        return {k: float(sum(v[-tail:]) / len(v[-tail:])) if v else float("nan") for k, v in log.items()}

    def _d_step(self, opt: torch.optim.Optimizer, parts: dict[str, torch.Tensor], a: torch.Tensor, perturb: bool) -> tuple[float, float]:
        """D_p minimises CE(D_p(f_p), a) on detached perturbed latents."""
        assert self.perturber is not None and self.discriminator is not None
        if perturb:
            with torch.no_grad():
                parts = {k: parts[k] + d for k, d in self.perturber.deltas(parts).items()}
        logits = self.discriminator(parts)
        loss = F.cross_entropy(logits, a)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item(), (logits.argmax(1) == a).float().mean().item()

    def _g_step(self, opt: torch.optim.Optimizer, victim: Victim, latent: Any, parts: dict[str, torch.Tensor],
                y: torch.Tensor, a: torch.Tensor) -> tuple[float, float]:
        """G_p minimises L_seg − β·CE(D_p(f_p), a) (or + β·CE to uniform) + λ·mean_k ‖δ_k‖²/‖f_o,k‖²."""
        assert self.perturber is not None and self.discriminator is not None
        deltas = self.perturber.deltas(parts)
        perturbed = {k: parts[k] + deltas[k] for k in parts}
        seg = victim.loss(victim.decode(with_parts(latent, perturbed)), y).mean()
        logits = self.discriminator(perturbed)
        if self.variant == "adversarial":
            fair = -F.cross_entropy(logits, a)
        else:
            fair = -logits.log_softmax(1).mean(1).mean()  # CE to the uniform distribution
        rel = relative_norm(parts, deltas).mean()
        loss = seg + self.beta * fair + self.penalty * rel
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return seg.item(), rel.item()

    @torch.no_grad()
    def evaluate_latents(self, victim: Victim, data: Any, n: int = 256) -> dict[str, float]:
        """On the first ``n`` samples of ``data``: ``rel_norm`` = mean_b mean_k ‖G_p(f_o)_{b,k}‖² / ‖f_o,{b,k}‖² and
        ``disc_acc`` = accuracy of D_p predicting the attribute from the perturbed latents."""
        if self.perturber is None or self.discriminator is None:
            raise ConfigError("APPLE must be trained first: call prepare(victim, train_split)")
        x, _y, a, levels = training_data(victim, data, self.attribute, n, self.target_field)
        if set(levels) - set(self.levels):
            raise ConfigError(f"attribute levels {levels} differ from the training levels {self.levels}")
        codes = torch.tensor([self.levels.index(levels[int(i)]) for i in a], device=a.device)
        rel, hits = [], []
        for xb, ab in zip(x.split(64), codes.split(64)):
            parts = latent_parts(_encode(victim, xb), self.latent)
            deltas = self.perturber.deltas(parts)
            rel.append(relative_norm(parts, deltas))
            hits.append(self.discriminator({k: parts[k] + deltas[k] for k in parts}).argmax(1) == ab)
        return {"rel_norm": float(torch.cat(rel).mean()), "disc_acc": float(torch.cat(hits).float().mean())}

    # caching ----------------------------------------------------------------------------------------------
    def _cache_path(self, victim: Victim, train: Any):
        from robustbench_med import paths

        sha = victim.card.weights_sha256
        fingerprint = train.fingerprint() if hasattr(train, "fingerprint") else None
        if not sha or not fingerprint:
            return None
        blob = [CACHE_VERSION, victim.card.name, sha, fingerprint, self.params()]
        key = hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:20]
        return paths.home() / "defenses" / "apple" / f"{victim.card.name}-{key}.safetensors"

    def _modules(self) -> nn.ModuleDict:
        return nn.ModuleDict({"perturber": self.perturber, "discriminator": self.discriminator})

    def _load_cached(self, victim: Victim, train: Any) -> bool:
        from robustbench_med.errors import WeightsError
        from robustbench_med.weights import load_weights, read_sidecar

        path = self._cache_path(victim, train)
        if path is None or not path.exists():
            return False
        try:
            load_weights(self._modules(), path)
        except WeightsError:
            return False
        self.history = {**read_sidecar(path).get("history", {}), "cached": True}
        return True

    def _save_cached(self, victim: Victim, train: Any) -> None:
        from robustbench_med.weights import save_weights

        path = self._cache_path(victim, train)
        if path is not None:
            save_weights(self._modules(), path, {"defense": "apple.latent", "victim": victim.card.name, "params": self.params(),
                                                  "levels": list(self.levels), "history": self.history})

    # wrapping ---------------------------------------------------------------------------------------------
    def wrap(self, victim: Victim) -> APPLEVictim:
        """The victim with the trained perturbation between ``encode`` and ``decode`` (G_p frozen)."""
        check_victim(victim)
        if self.perturber is None:
            raise ConfigError("APPLE must be trained first: call prepare(victim, train_split) before wrap(victim)")
        return APPLEVictim(victim, self.perturber.eval().requires_grad_(False))


# ---------------------------------------------------------------------------------------------------------------
# helpers


def check_victim(victim: Victim) -> None:
    """Raise :class:`TaskNotSupportedError` unless ``victim`` is a segmentor with an ``encode`` / ``decode`` split."""
    if victim.task != "segmentation":
        raise TaskNotSupportedError(f"APPLE works on segmentors, not a {victim.task!r} victim ({victim.card.name})")
    if not has_latent(victim):
        raise TaskNotSupportedError(
            f"APPLE needs a victim exposing encode(x) / decode(latent) (a net with encode/decode methods); "
            f"{victim.card.name} exposes neither")


def _encode(victim: Victim, x: torch.Tensor) -> Any:
    """The frozen encoder's latent (no gradient: the segmentor is not trained)."""
    with torch.no_grad():
        latent = victim.encode(x)
    latent_parts(latent)
    return latent


def part_shapes(victim: Victim, x: torch.Tensor, which: str) -> dict[str, tuple[int, ...]]:
    """Per-sample shapes of the perturbed latent parts of ``victim`` on the batch ``x``."""
    with frozen(victim):
        return {k: tuple(v.shape[1:]) for k, v in latent_parts(_encode(victim, x), which).items()}


class frozen:
    """Context: the victim in eval mode with ``requires_grad`` off for all its parameters (restored on exit)."""

    def __init__(self, victim: Victim) -> None:
        self.victim = victim

    def __enter__(self) -> Victim:
        self.flags = [p.requires_grad for p in self.victim.parameters()]
        self.training = self.victim.training
        self.victim.eval()
        for p in self.victim.parameters():
            p.requires_grad_(False)
        return self.victim

    def __exit__(self, *exc: Any) -> None:
        for p, f in zip(self.victim.parameters(), self.flags):
            p.requires_grad_(f)
        self.victim.train(self.training)


def default_target_field(victim: Victim) -> str:
    """The segmentation target of ``victim``: its recipe's ``target_field``, its card's, else ``'mask'``."""
    name = victim.card.name
    recipe = VICTIMS.get(name).meta.get("recipe") if name in VICTIMS else None
    return getattr(recipe, "target_field", None) or victim.card.extra.get("target_field") or "mask"


def training_data(victim: Victim, train: Any, attribute: str, n: int, target_field: str | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """Images, targets, attribute codes and attribute levels of the first ``n`` samples of ``train``."""
    n = min(n, len(train))
    idx = list(range(n))
    attrs = train.attributes(idx)
    if attribute not in attrs:
        raise ConfigError(f"the training split has no attribute {attribute!r} (has {sorted(attrs)})")
    levels = tuple(sorted(set(attrs[attribute])))
    if len(levels) < 2:
        raise ConfigError(f"APPLE needs at least two {attribute} groups in the training data, got {levels}")
    device = victim.device
    x = train.images(idx).to(device)
    y = train.targets(target_field or default_target_field(victim), idx).to(device)
    a = torch.tensor([levels.index(v) for v in attrs[attribute]], device=device)
    return x, y, a, levels


def attribute_probe(victim: Victim, perturber: LatentPerturber | None, train: Any, test: Any, attribute: str = "sex", *,
                    latent: str | None = None, n_train: int = 512, n_test: int = 256, epochs: int = 8, hidden: int = 32,
                    lr: float = 1e-3, seed: int = 0) -> float:
    """Held-out accuracy of a fresh attribute classifier trained on (perturbed, when ``perturber`` is given) latents.

    A leakage probe in the style of adversarial-debiasing evaluations (Elazar & Goldberg, "Adversarial Removal of
    Demographic Attributes from Text Data", EMNLP 2018: an adversary fooled during training does not mean the
    attribute is gone, so a *new* classifier is trained after the fact). APPLE should lower it towards the
    majority-class rate. The probe is a :class:`Discriminator` trained with Adam on the first ``n_train`` samples of
    ``train`` and scored on the first ``n_test`` of ``test``. It reads the parts named by ``latent``
    (``'bottleneck'`` or ``'all'``; default: the perturber's, else ``'bottleneck'``), perturbed where the perturber
    covers them.
    """
    check_victim(victim)
    which = latent or (perturber.which if perturber is not None else "bottleneck")
    levels = training_data(victim, train, attribute, n_train, None)[3]

    def latents(ds: Any, n: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        x, _y, a, lv = training_data(victim, ds, attribute, n, None)
        if set(lv) - set(levels):
            raise ConfigError(f"{attribute} levels {lv} of the probe's test data are not all in its training data {levels}")
        chunks = []
        for xb in x.split(64):
            latent_ = _encode(victim, xb)
            with torch.no_grad():
                chunks.append(latent_parts(perturber(latent_) if perturber is not None else latent_, which))
        codes = torch.tensor([levels.index(lv[int(i)]) for i in a], device=a.device)
        return {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]}, codes

    with frozen(victim), seeded(seed, victim.device):
        z_tr, a_tr = latents(train, n_train)
        z_te, a_te = latents(test, n_test)
        shapes = {k: tuple(v.shape[1:]) for k, v in z_tr.items()}
        probe = Discriminator(shapes, hidden, len(levels)).to(victim.device)
        opt = torch.optim.Adam(probe.parameters(), lr=lr)
        gen = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            for idx in torch.randperm(len(a_tr), generator=gen).split(32):
                idx = idx.to(a_tr.device)
                loss = F.cross_entropy(probe({k: v[idx] for k, v in z_tr.items()}), a_tr[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        with torch.no_grad():
            hits = [probe({k: v[i : i + 64] for k, v in z_te.items()}).argmax(1) == a_te[i : i + 64] for i in range(0, len(a_te), 64)]
            return float(torch.cat(hits).float().mean())


# ---------------------------------------------------------------------------------------------------------------
# choosing a setting on validation (the rule of the APPLE shortcut study)


def choose_setting(rows: Sequence[dict[str, Any]], max_dice_drop: float = 0.01) -> int:
    """Index of the chosen candidate among :func:`select_setting`'s ``rows`` (one row per candidate × victim, with
    ``candidate``, ``d_dice`` and ``d_gap``). The rule, fixed before any candidate is evaluated: keep the candidates
    whose validation Dice drops by at most ``max_dice_drop`` on *every* victim (``d_dice >= -max_dice_drop``); among
    them take the most negative mean ``d_gap`` over the victims (ties: the earlier candidate); if none qualifies, the
    candidate with the smallest worst-victim Dice drop."""
    if not rows:
        raise ConfigError("choose_setting needs at least one evaluated candidate")
    by_cand: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        by_cand.setdefault(int(r["candidate"]), []).append(r)
    worst = {c: min(r["d_dice"] for r in rs) for c, rs in by_cand.items()}
    mean_gap = {c: sum(r["d_gap"] for r in rs) / len(rs) for c, rs in by_cand.items()}
    ok = [c for c in sorted(by_cand) if worst[c] >= -max_dice_drop]
    if ok:
        return min(ok, key=lambda c: (mean_gap[c], c))
    return max(sorted(by_cand), key=lambda c: (worst[c], -c))


def select_setting(victims: Sequence[Victim], train: Any, val: Any, candidates: Sequence[dict[str, Any]], *,
                   attribute: str = "sex", base: dict[str, Any] | None = None, n_val: int = 256,
                   max_dice_drop: float = 0.01, probe_train: int = 512) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Choose an APPLE setting on a validation split, as the shortcut study did (Xu et al., arXiv 2403.05114, claim:
    a smaller group gap at little Dice cost).

    For every candidate (a dict of :class:`APPLE` parameters over ``base``) and every victim: train APPLE on ``train``
    (its cache is used when present), then measure on the first ``n_val`` samples of ``val`` the change of the mean
    clean primary score (``d_dice``) and of the clean ``attribute`` gap (``d_gap``, max − min of the group means;
    :func:`robustbench_med.fairness.split_group_summary`) against the undefended victim, the held-out accuracy of a
    fresh :func:`attribute_probe` on the perturbed parts (``probe``; trained on ``probe_train`` train latents) and the
    relative perturbation norm (``rel_norm``). :func:`choose_setting` then picks one. Returns (the chosen parameters,
    the rows); every row also carries the candidate's index and parameters, so the full table can be published.
    """
    from robustbench_med.fairness import split_group_summary

    if not candidates:
        raise ConfigError("select_setting needs at least one candidate setting")
    params = [{**(base or {}), **c, "attribute": attribute} for c in candidates]
    rows: list[dict[str, Any]] = []
    for v in victims:
        ref = split_group_summary(v, val, attribute, n_val)
        for i, p in enumerate(params):
            defense = APPLE(**p)
            defense.prepare(v, train)
            got = split_group_summary(defense.wrap(v), val, attribute, n_val)
            probe = attribute_probe(v, defense.perturber, train, val, attribute, n_train=probe_train, n_test=n_val)
            rows.append({"candidate": i, "params": p, "victim": v.card.name, "dice": got["overall"],
                         "d_dice": got["overall"] - ref["overall"], "gap": got["gap"], "d_gap": got["gap"] - ref["gap"],
                         "probe": probe, "rel_norm": defense.evaluate_latents(v, val, n_val)["rel_norm"]})
    return params[choose_setting(rows, max_dice_drop)], rows


@register_defense("apple.latent", kind="latent", tasks=("segmentation",),
                  paper="Xu et al., arXiv 2403.05114 (2024); npj Digit. Med. 8 (2025)")
def apple_latent(**kw: Any) -> APPLE:
    """APPLE: adversarially trained latent perturber hiding a sensitive attribute from a frozen segmentor's decoder."""
    return APPLE(**kw)
