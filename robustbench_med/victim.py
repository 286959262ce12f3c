"""The victim interface: every model the suite attacks sits behind :class:`Victim`.

Contract (``shared/reference/anchors.md`` §"fixed input contract"): images are float tensors in [0, 1], NCHW (slices)
or NCDHW (volumes, issue #20), with the channel count and size the card declares (``input_size`` is ``(C, H, W)`` or
``(C, D, H, W)``); normalisation happens *inside* the victim. ``forward`` returns the task's
raw output (see :mod:`robustbench_med.tasks`); ``loss``, ``predict`` and ``score`` are per sample; ``features``
returns named intermediate activations through forward hooks.
"""
from __future__ import annotations

import abc
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any, ClassVar, Iterable, Iterator, Sequence

import torch
from torch import nn

from robustbench_med import tasks as T
from robustbench_med.errors import ConfigError, InputContractError

LAYOUTS = {2: "NCHW", 3: "NCDHW"}


@dataclass(frozen=True)
class VictimCard:
    """Frozen metadata of a registered victim (what it is, what it eats, where its weights come from)."""

    name: str
    task: str
    modality: str
    input_size: tuple[int, ...]  # (C, H, W) for slices, (C, D, H, W) for volumes
    classes: tuple[str, ...] = ()
    paper: str = ""
    weights_file: str | None = None
    weights_sha256: str | None = None
    params: int | None = None
    flops: int | None = None
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        T.get_task(self.task)  # an unknown name raises ConfigError, with the closest task names
        object.__setattr__(self, "input_size", tuple(int(v) for v in self.input_size))
        if len(self.input_size) not in (3, 4):
            raise ConfigError(f"victim {self.name!r}: input_size must be (C, H, W) or (C, D, H, W), got {self.input_size}")
        object.__setattr__(self, "classes", tuple(self.classes))

    @property
    def spatial_dims(self) -> int:
        """2 for slices (NCHW), 3 for volumes (NCDHW)."""
        return len(self.input_size) - 1

    def with_weights(self, path: str, sha256: str) -> "VictimCard":
        return replace(self, weights_file=path, weights_sha256=sha256)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def validate_images(x: torch.Tensor, input_size: Sequence[int] | None = None, *, full: bool = True) -> None:
    """Raise :class:`InputContractError` unless ``x`` is a float NCHW (slices) or NCDHW (volumes) batch (of
    ``input_size``) in [0, 1], finite.

    ``full=False`` checks only shape and dtype (no device synchronisation), for use inside attack loops.
    """
    if not isinstance(x, torch.Tensor):
        raise InputContractError(f"images must be a torch.Tensor, got {type(x).__name__}")
    expected = (1 + len(input_size),) if input_size is not None else (4, 5)
    if x.dim() not in expected:
        layout = " or ".join(LAYOUTS.get(d - 2, f"{d}-D") for d in expected)
        raise InputContractError(f"images must be {layout} ({' or '.join(map(str, expected))} dims), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise InputContractError(f"images must be floating point in [0, 1], got dtype {x.dtype}")
    if input_size is not None and tuple(x.shape[1:]) != tuple(input_size):
        axes = "(C, H, W)" if len(input_size) == 3 else "(C, D, H, W)"
        raise InputContractError(f"images must have {axes} = {tuple(input_size)}, got {tuple(x.shape[1:])}")
    if full and x.numel():
        if not torch.isfinite(x).all():
            raise InputContractError("images contain NaN or infinite values")
        lo, hi = float(x.min()), float(x.max())
        if lo < 0 or hi > 1:
            raise InputContractError(f"images must lie in [0, 1], got range [{lo:.4g}, {hi:.4g}]")


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Run ``module`` in eval mode inside the block and restore *every submodule's own* training flag afterwards.

    ``module.train(flag)`` would set one flag on all submodules; a user's network may mix modes (a frozen,
    eval-mode backbone inside a wrapper left in training mode), so each flag is saved and put back individually.
    In eval mode BatchNorm uses (and never updates) its running statistics and dropout is off.
    """
    flags = training_flags(module)
    module.eval()
    try:
        yield module
    finally:
        restore_training_flags(flags)


def training_flags(module: nn.Module) -> list[tuple[nn.Module, bool]]:
    """Every submodule's own training flag (``module.train(flag)`` would overwrite them all with one value)."""
    return [(m, m.training) for m in module.modules()]


def restore_training_flags(flags: list[tuple[nn.Module, bool]]) -> None:
    for m, flag in flags:
        m.training = flag


class Victim(nn.Module, abc.ABC):
    """A model under attack. Subclasses implement :meth:`forward_normalized` only.

    Args:
        card: the frozen metadata card.
        mean, std: per-channel normalisation applied inside the victim (defaults: identity).
    """

    feature_layers: tuple[str, ...] = ()

    def __init__(self, card: VictimCard, mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
        super().__init__()
        self.card = card
        c, ones = card.input_size[0], [1] * card.spatial_dims
        self.register_buffer("mean", torch.tensor(mean if mean is not None else [0.0] * c).view(1, c, *ones), persistent=False)
        self.register_buffer("std", torch.tensor(std if std is not None else [1.0] * c).view(1, c, *ones), persistent=False)
        self.sdr_radius = float(card.extra.get("sdr_radius", 4.0))
        self.heatmap_sigma = float(card.extra.get("heatmap_sigma", 2.0))

    @property
    def task(self) -> str:
        return self.card.task

    @property
    def spec(self) -> T.TaskSpec:
        return T.task_spec(self.task, self.sdr_radius)

    @property
    def device(self) -> torch.device:
        for t in self.parameters():
            return t.device
        return self.mean.device

    @abc.abstractmethod
    def forward_normalized(self, z: torch.Tensor) -> torch.Tensor:
        """The model on a normalised batch ``z = (x − mean) / std``; returns the task's raw output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        validate_images(x, self.card.input_size, full=False)
        return self.forward_normalized((x - self.mean) / self.std)

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-sample loss (the attack objective)."""
        return T.loss_per_sample(self.task, output, target, self.heatmap_sigma)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Hard predictions for a checked batch (in eval mode; every module's training flag is restored)."""
        validate_images(x, self.card.input_size)
        with eval_mode(self):
            return T.predict(self.task, self(x))

    def metrics(self, output: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-sample metrics; the first is the primary score (see :mod:`robustbench_med.tasks`)."""
        return T.metrics_per_sample(self.task, output, target, self.sdr_radius)

    def objective(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-sample attack objective on images ``x`` (default ``loss(forward(x), target)``).

        Victims whose output needs the target to be computed (e.g. VQA: the questions) override this and
        :meth:`evaluate`; attacks and the harness only call these two.
        """
        return self.loss(self(x), target)

    def evaluate(self, x: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-sample metrics of images ``x`` (default ``metrics(forward(x), target)``); first = primary score."""
        return self.metrics(self(x), target)

    @torch.no_grad()
    def score(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-sample primary score (higher is better) for a checked batch (in eval mode; flags restored)."""
        validate_images(x, self.card.input_size)
        with eval_mode(self):
            return next(iter(self.evaluate(x, target).values()))

    def feature_modules(self) -> dict[str, nn.Module]:
        """Named modules whose outputs :meth:`features` can return (default: ``feature_layers``)."""
        modules = dict(self.named_modules())
        return {name: modules[name] for name in self.feature_layers if name in modules}

    def features(self, x: torch.Tensor, layers: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """Named intermediate activations of one forward pass (gradients flow through them)."""
        available = self.feature_modules()
        wanted = list(layers) if layers is not None else list(available)
        missing = [name for name in wanted if name not in available]
        if missing:
            raise KeyError(f"unknown feature layers {missing}; available: {list(available)}")
        out: dict[str, torch.Tensor] = {}
        hooks = [available[n].register_forward_hook(_store(out, n)) for n in wanted]
        try:
            self(x)
        finally:
            for h in hooks:
                h.remove()
        return out


class WrappedVictim(Victim):
    """A victim seen through a defence: the wrapped victim's card, normalisation, loss, metrics and feature layers
    (as ``victim.<name>``). Input-space defences implement the one hook, :meth:`transform` (applied before the
    wrapped victim's forward, objective and evaluation); a defence acting on latents (APPLE) overrides
    :meth:`forward` and sets ``routes_through_victim = False``, so objective and evaluation follow its forward."""

    routes_through_victim: ClassVar[bool] = True

    def __init__(self, victim: Victim) -> None:
        super().__init__(victim.card)
        self.victim = victim
        self.mean, self.std = victim.mean, victim.std
        self.sdr_radius, self.heatmap_sigma = victim.sdr_radius, victim.heatmap_sigma

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """The input as the wrapped victim receives it (default: unchanged)."""
        return x

    def forward_normalized(self, z: torch.Tensor) -> torch.Tensor:
        if self.routes_through_victim and type(self).transform is WrappedVictim.transform:
            return self.victim.forward_normalized(z)
        return self.forward(z * self.std + self.mean)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.victim(self.transform(x))

    def objective(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if not self.routes_through_victim:
            return super().objective(x, target)
        return self.victim.objective(self.transform(x), target)

    def evaluate(self, x: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        if not self.routes_through_victim:
            return super().evaluate(x, target)
        return self.victim.evaluate(self.transform(x), target)

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.victim.loss(output, target)

    def metrics(self, output: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.victim.metrics(output, target)

    def feature_modules(self) -> dict[str, nn.Module]:
        return {f"victim.{k}": m for k, m in self.victim.feature_modules().items()}


def _store(out: dict[str, torch.Tensor], name: str):
    def hook(_module: nn.Module, _inp: Any, output: Any) -> None:
        out[name] = output[0] if isinstance(output, (tuple, list)) else output

    return hook


class ModelVictim(Victim):
    """A victim around a plain ``nn.Module`` ``net`` (the usual case for classifiers and segmentors).

    If ``net`` has ``encode`` / ``decode`` methods, they are exposed so latent-space defences can sit between them.
    With a ``window`` (:class:`robustbench_med.sliding.SlidingWindow`) the net runs by sliding-window inference over
    the whole input, as volumetric segmentors trained on patches are used (attacks differentiate through it); the
    window is recorded on the card (``extra['sliding_window']``).
    """

    def __init__(self, net: nn.Module, card: VictimCard, mean=None, std=None, feature_layers: Sequence[str] = (),
                 window: Any = None):
        if window is not None and card.extra.get("sliding_window") != window.as_dict():
            card = replace(card, extra={**card.extra, "sliding_window": window.as_dict()})
        super().__init__(card, mean, std)
        self.net = net
        self.window = window
        self.feature_layers = tuple(f"net.{n}" if not n.startswith("net.") else n for n in feature_layers)

    def forward_normalized(self, z: torch.Tensor) -> torch.Tensor:
        return self.window(self.net, z) if self.window is not None else self.net(z)

    @property
    def has_latent(self) -> bool:
        return hasattr(self.net, "encode") and hasattr(self.net, "decode")

    def encode(self, x: torch.Tensor) -> Any:
        validate_images(x, self.card.input_size, full=False)
        return self.net.encode((x - self.mean) / self.std)

    def decode(self, latent: Any) -> torch.Tensor:
        return self.net.decode(latent)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
