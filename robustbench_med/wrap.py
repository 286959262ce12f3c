"""Your own model as a victim: :func:`wrap` puts any ``nn.Module`` behind the :class:`~robustbench_med.victim.Victim`
interface, and :func:`build_model` builds timm, MONAI and Hugging Face models by name.

The wrapped model receives *normalised* images ``(x − mean) / std`` of the images in [0, 1] the suite attacks (so its
own preprocessing constants go into ``mean`` / ``std``). Its output may be a tensor, a Hugging Face ``ModelOutput``
(``.logits``), a dict or a tuple; :class:`OutputAdapter` picks the task's tensor. Channels and classes are read from
the model and one dummy forward pass where they can be, and anything that cannot be inferred is asked for by name.

Evaluation and attacks always run the model in eval mode and restore every submodule's own training flag afterwards
(:func:`robustbench_med.victim.eval_mode`), so BatchNorm statistics never change during an evaluation.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from robustbench_med import tasks as T
from robustbench_med.errors import ConfigError
from robustbench_med.sliding import SlidingWindow
from robustbench_med.victim import ModelVictim, VictimCard, eval_mode

WRAP_TASKS = T.WRAP_TASKS
BUILDERS = ("timm", "monai", "hf")
DEFAULT_TARGET_FIELD = {"classification": "lesion_type", "binary": "label", "multilabel": "findings",
                        "segmentation": "mask", "landmark": "landmarks"}  # the phantom's fields, per task


class OutputAdapter:
    """Select the task's tensor from a model output.

    Args:
        key: which part of the output to take: a dict key or attribute name (``'logits'``, ``'out'``) or a tuple
            index. ``None`` takes a tensor as is, ``.logits`` of a ``ModelOutput``, the only tensor of a dict (or its
            ``'logits'`` / ``'out'``), and the first element of a tuple or list.
    """

    def __init__(self, key: str | int | None = None) -> None:
        self.key = key

    def __call__(self, out: Any) -> torch.Tensor:
        picked = self._pick(out)
        if not isinstance(picked, torch.Tensor):
            raise ConfigError(f"the model's output {type(out).__name__} has no tensor at {self.key!r}; "
                              "pass output='<key or index>' to wrap() to say which part holds the logits")
        return picked

    def _pick(self, out: Any) -> Any:
        if self.key is not None:
            if isinstance(out, (tuple, list)) and isinstance(self.key, int):
                return out[self.key]
            if isinstance(out, dict) and self.key in out:
                return out[self.key]
            return getattr(out, str(self.key), None)
        if isinstance(out, torch.Tensor):
            return out
        logits = getattr(out, "logits", None)  # transformers ModelOutput (also a dict subclass)
        if isinstance(logits, torch.Tensor):
            return logits
        if isinstance(out, dict):
            tensors = {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}
            for k in ("logits", "out"):
                if k in tensors:
                    return tensors[k]
            if len(tensors) == 1:
                return next(iter(tensors.values()))
            raise ConfigError(f"the model returns a dict with tensors {sorted(tensors)}; pass output='<key>' to wrap()")
        if isinstance(out, (tuple, list)) and out:
            return out[0]
        return out


class UserModelVictim(ModelVictim):
    """A :class:`ModelVictim` around a user's network whose output goes through an :class:`OutputAdapter`.

    Dense outputs (segmentation, landmark heatmaps) smaller than the input are resized (bilinearly, trilinearly on
    volumes) to the input size, as Hugging Face's semantic-segmentation post-processing does (e.g. SegFormer predicts
    at 1/4 resolution). With a ``window`` (:class:`~robustbench_med.sliding.SlidingWindow`) the network runs by
    sliding-window inference over the whole input, and attacks differentiate through it.
    """

    def __init__(self, net: nn.Module, card: VictimCard, mean=None, std=None, feature_layers: Sequence[str] = (),
                 output: str | int | None = None, window: SlidingWindow | None = None):
        super().__init__(net, card, mean, std, feature_layers, window)
        self.adapter = OutputAdapter(output)

    def forward_normalized(self, z: torch.Tensor) -> torch.Tensor:
        return self.window(self._net_output, z) if self.window is not None else self._net_output(z)

    def _net_output(self, z: torch.Tensor) -> torch.Tensor:
        out = self.adapter(self.net(z))
        spatial = tuple(z.shape[2:])
        if T.get_task(self.task).dense and out.dim() == z.dim() and tuple(out.shape[2:]) != spatial:
            out = F.interpolate(out, size=spatial, mode="bilinear" if len(spatial) == 2 else "trilinear", align_corners=False)
        return out


def wrap(model: nn.Module | str, task: str, *, input_size: Sequence[int] | None = None, classes: Sequence[str] | None = None,
         mean: float | Sequence[float] | None = None, std: float | Sequence[float] | None = None, name: str | None = None,
         output: str | int | None = None, feature_layers: Sequence[str] = (), weights: str | os.PathLike[str] | None = None,
         target_field: str | None = None, modality: str = "unspecified", paper: str = "", sdr_radius: float | None = None,
         sliding_window: SlidingWindow | dict[str, Any] | None = None, **model_kwargs: Any) -> UserModelVictim:
    """Wrap ``model`` (an ``nn.Module``, or a builder name such as ``'timm:resnet18'``) as a victim of ``task``.

    Args:
        task: one of :data:`WRAP_TASKS` (VQA models use the LVLM victims in ``victims/lvlm``).
        input_size: ``(C, H, W)``, or ``(C, D, H, W)`` for a volumetric (3D) model. Inferred where possible: C from
            the first convolution or a Hugging Face ``config.num_channels``, H and W from ``config.image_size``;
            otherwise it must be given (always for volumes).
        classes: class (or label, landmark) names; default ``'0'``, ``'1'``, … from the output size.
        mean, std: the model's input normalisation (scalars or per channel), applied inside the victim.
        name: the victim's name in tables and entries (``family.tag``; default ``user.<class name>``).
        output: which part of the output holds the logits (see :class:`OutputAdapter`).
        feature_layers: submodule names whose activations :meth:`features` returns (for detectors, HFC, APPLE).
        weights: a state dict to load first: safetensors, a ``.pt``/``.pth`` read with ``weights_only=True``
            (the module's own keys, or the wrapper's ``net.``-prefixed ones), or a Hugging Face folder
            (``save_pretrained``); its sha256 is recorded on the card and in every manifest and entry.
        target_field: the dataset field holding the targets (default: the phantom's field for ``task``).
        sliding_window: run the model by sliding-window inference (MONAI's), e.g. ``{'roi_size': (32, 32, 32),
            'overlap': 0.5}`` for a 3D segmentor trained on patches; attacks then go through the window blending
            (:mod:`robustbench_med.sliding`). Recorded on the card.
        model_kwargs: arguments of :func:`build_model` when ``model`` is a builder name.

    Without ``weights`` the card records the sha256 of the model's in-memory state dict (serialised as
    safetensors), so every entry still names the exact weights it measured.
    """
    if not T.get_task(task).wrappable:
        raise ConfigError(f"wrap() supports tasks {WRAP_TASKS}, got {task!r} (VQA models use the LVLM victims in victims/lvlm)")
    net = build_model(model, task=task, **model_kwargs) if isinstance(model, str) else model
    if not isinstance(net, nn.Module):
        raise ConfigError(f"wrap() needs a torch.nn.Module or a builder name like 'timm:resnet18', got {type(net).__name__}")
    if model_kwargs and not isinstance(model, str):
        raise ConfigError(f"unexpected arguments {sorted(model_kwargs)} (they are only for builder names like 'timm:resnet18')")
    size = _input_size(net, input_size)
    window = SlidingWindow.parse(sliding_window)
    if window is not None:
        window.check(size[1:])
    card = VictimCard(name=name or default_name(net), task=task, modality=modality, input_size=size, paper=paper,
                      extra={"target_field": target_field or DEFAULT_TARGET_FIELD[task], "wrapped": type(net).__name__,
                             **({"sdr_radius": float(sdr_radius)} if sdr_radius is not None else {})})
    victim = UserModelVictim(net, card, _per_channel(mean, size[0], 0.0), _per_channel(std, size[0], 1.0), feature_layers,
                             output, window)
    victim.to(next(net.parameters(), torch.empty(0)).device)  # the normalisation buffers follow a model already on a GPU
    from robustbench_med.weights import load_weights

    digest = load_weights(victim, weights) if weights is not None else state_sha256(net)
    out = _probe(victim)
    victim.card = replace(victim.card, classes=_classes(task, out, classes, victim.card.spatial_dims), weights_file=None if weights is None else str(weights),
                          weights_sha256=digest, extra={**victim.card.extra, "weights_source": "file" if weights is not None else "in-memory state dict"})
    return victim


def default_name(net: nn.Module) -> str:
    """``user.<class name in snake case>``, a valid registry name."""
    snake = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", type(net).__name__))
    tag = re.sub(r"[^a-z0-9_]", "_", snake.lower()).strip("_") or "model"
    return f"user.{tag}"


def state_sha256(net: nn.Module) -> str:
    """sha256 of ``net``'s state dict serialised as safetensors (what :func:`~robustbench_med.weights.save_weights`
    would write), so in-memory weights are named as exactly as a file."""
    from safetensors.torch import save

    seen: set[int] = set()
    state = {}
    for k, v in net.state_dict().items():  # shared (tied) tensors are serialised once, as safetensors requires
        key = v.data_ptr() if v.numel() else id(v)
        if key in seen:
            continue
        seen.add(key)
        state[k] = v.detach().cpu().contiguous()
    return hashlib.sha256(save(state)).hexdigest()


def build_model(spec: str, *, task: str = "classification", **kwargs: Any) -> nn.Module:
    """Build a model by name, without downloading anything:

    - ``'timm:NAME'``: ``timm.create_model(NAME, pretrained=False, **kwargs)`` (e.g. ``in_chans=1, num_classes=3``);
    - ``'monai:CLASS'``: ``monai.networks.nets.CLASS(**kwargs)`` (e.g. ``UNet`` with ``spatial_dims=2``);
    - ``'hf:FOLDER'``: a Hugging Face model saved with ``save_pretrained`` in a local folder, through
      ``AutoModelForImageClassification`` (classifier tasks) or ``AutoModelForSemanticSegmentation``
      (segmentation), with ``local_files_only=True`` and no remote code.
    """
    kind, _, target = spec.partition(":")
    if kind not in BUILDERS or not target:
        raise ConfigError(f"model {spec!r}: a builder name is one of {[b + ':NAME' for b in BUILDERS]}")
    if kind == "timm":
        import timm

        if not timm.is_model(target):
            close = timm.list_models(f"*{target}*")[:5]
            raise ConfigError(f"timm has no model {target!r}" + (f"; did you mean {close}?" if close else ""))
        return timm.create_model(target, pretrained=False, **kwargs)
    if kind == "monai":
        try:
            from monai.networks import nets
        except ImportError:
            raise ConfigError("MONAI is not installed: pip install 'robustbench_med[monai]'") from None
        cls = getattr(nets, target, None)
        if not isinstance(cls, type):
            raise ConfigError(f"monai.networks.nets has no network {target!r}")
        return cls(**kwargs)
    return _hf_model(Path(target), task, kwargs)


def is_builder(ref: str) -> bool:
    """Whether ``ref`` names a library model (``timm:NAME``, ``monai:CLASS``, ``hf:FOLDER``) rather than user code."""
    return isinstance(ref, str) and ref.partition(":")[0] in BUILDERS and bool(ref.partition(":")[2])


def builder_factory(ref: str, task: str | None):
    """A registry factory building ``ref`` with :func:`build_model` (its keyword arguments are the model's)."""
    def factory(**kwargs: Any) -> nn.Module:
        return build_model(ref, task=task or "classification", **kwargs)

    factory.__qualname__ = f"build_model[{ref}]"
    return factory


def _hf_model(folder: Path, task: str, kwargs: dict[str, Any]) -> nn.Module:
    if not (folder / "config.json").is_file():
        raise ConfigError(f"hf:{folder}: not a Hugging Face model folder (no config.json); save one with save_pretrained")
    import transformers

    auto = transformers.AutoModelForSemanticSegmentation if task == "segmentation" else transformers.AutoModelForImageClassification
    return auto.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False, **kwargs)


def _input_size(net: nn.Module, given: Sequence[int] | None) -> tuple[int, ...]:
    if given is not None:
        size = tuple(int(v) for v in given)
        if len(size) not in (3, 4) or min(size) < 1:
            raise ConfigError(f"input_size must be (C, H, W) or, for volumes, (C, D, H, W) with positive entries, got {tuple(given)}")
        return size
    config = getattr(net, "config", None)
    channels = getattr(config, "num_channels", None) or _first_conv_channels(net)
    image = getattr(config, "image_size", None)
    if channels is None or image is None:
        what = "the channel count (no convolution found)" if channels is None else "the image size"
        shape = "(C, D, H, W)" if any(isinstance(m, nn.Conv3d) for m in net.modules()) else "(C, H, W)"
        raise ConfigError(f"cannot infer {what} of {type(net).__name__}: pass input_size={shape}")
    h, w = (image, image) if isinstance(image, int) else tuple(image)
    return int(channels), int(h), int(w)


def _first_conv_channels(net: nn.Module) -> int | None:
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.Conv1d)):
            return int(m.in_channels)
    return None


def _per_channel(value: float | Sequence[float] | None, channels: int, default: float) -> list[float]:
    if value is None:
        return [default] * channels
    values = [float(value)] * channels if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) != channels:
        raise ConfigError(f"mean/std need 1 or {channels} values (one per channel), got {len(values)}")
    if default == 1.0 and any(v <= 0 for v in values):
        raise ConfigError(f"std values must be > 0, got {values}")
    return values


def _probe(victim: UserModelVictim) -> torch.Tensor:
    """One dummy forward pass in eval mode (flags restored) on the model's device; clear errors if it fails."""
    x = torch.zeros(1, *victim.card.input_size, device=victim.device)
    try:
        with eval_mode(victim), torch.no_grad():
            return victim(x)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"a forward pass of {type(victim.net).__name__} on a (1, {', '.join(map(str, victim.card.input_size))}) "
                          f"batch failed ({type(e).__name__}: {e}); check input_size and output") from None


def _classes(task: str, out: torch.Tensor, given: Sequence[str] | None, spatial_dims: int = 2) -> tuple[str, ...]:
    """Class names checked against the output shape the task needs."""
    shape, spec = tuple(out.shape), T.get_task(task)
    if not spec.output_ok(shape, spatial_dims):
        hint = " (a single logit is task='binary')" if task == "classification" and shape[1:] == (1,) else ""
        raise ConfigError(f"task {task!r} needs {spec.output_shape}; the model returned shape {shape}{hint}")
    k = spec.output_classes(shape)
    if given is None:
        return spec.default_names(k)
    names = tuple(str(c) for c in given)
    if len(names) != k:
        raise ConfigError(f"{len(names)} class names given, but the model's output has {k} {spec.output_unit}")
    return names


# ---------------------------------------------------------------------------------------------------------------
# registered victims, built with their random initialisation (weights are loaded by robustbench_med.api.create_victim)


def as_victim(built: Any, name: str, meta: dict[str, Any]):
    """A factory's result as a victim named ``name``: a :class:`Victim` as is, a plain ``nn.Module`` through
    :func:`robustbench_med.wrap.wrap` with the registration's (or grid's) ``wrap`` arguments."""
    from robustbench_med.victim import Victim

    if isinstance(built, Victim):
        if built.card.name != name:
            built.card = replace(built.card, name=name)
        return built
    if isinstance(built, nn.Module):
        args = dict(meta.get("wrap") or {})
        if "task" not in args:
            raise ConfigError(f"victim {name!r}: its factory returned a {type(built).__name__}, not a Victim; say how to "
                              "evaluate it with 'wrap: {task: ..., mean: ..., std: ...}' in the grid (see robustbench_med.wrap)")
        return wrap(built, name=name, **args)
    raise ConfigError(f"victim {name!r}: its factory returned {type(built).__name__}, not a Victim or an nn.Module")


def is_user_victim(name: str) -> bool:
    """Whether registered victim ``name`` comes from a user (a grid's ``factory: module:function`` or a plugin)."""
    from robustbench_med.registry import VICTIMS

    meta = VICTIMS.get(name).meta
    return "factory_ref" in meta or "plugin" in meta


def build_victim(name: str, **kwargs: Any):
    """Registered victim ``name`` with its random initialisation (no weights loaded), in eval mode. A user factory's
    initialisation is seeded from its name and reference, so every process builds the same model."""
    from robustbench_med.registry import VICTIMS

    entry = VICTIMS.get(name)
    if not is_user_victim(name):
        return as_victim(entry.factory(**kwargs), name, entry.meta).eval()
    from robustbench_med.attack import derive_seed, seeded

    with seeded(derive_seed("init", name, entry.meta.get("factory_ref", entry.meta.get("plugin")))):
        return as_victim(entry.factory(**kwargs), name, entry.meta).eval()
