"""Shared pieces of the zoo: normalisation layers, conv-BN-act units, cards, recipes, registration and cost measurement.

Parameter counts and FLOPs of the published configurations are measured on the ``meta`` device, which allocates no
memory: :func:`measure_flops` runs one forward pass under :class:`torch.utils.flop_counter.FlopCounterMode` (it
counts matrix multiplications and convolutions, 2 FLOPs per multiply-accumulate; GMACs = FLOPs / 2e9, the unit the
papers call "FLOPs"). Cards record the measured constants; ``tests/test_zoo.py`` re-checks them.

Cards of victims with hard top-k routing carry ``extra['routing']`` = ``'bra'`` or ``'dssa'``: their input gradients
are sparse and piecewise (see :mod:`.routing`), so white-box results on them should be read next to gradient-free and
transfer attacks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from robustbench_med import tasks as T
from robustbench_med.registry import register_victim
from robustbench_med.training import TrainRecipe
from robustbench_med.victim import ModelVictim, VictimCard
from robustbench_med.victims.basic import PHANTOM_INPUT, PHANTOM_MEAN, PHANTOM_STD, SEG_CLASSES

__all__ = ["PHANTOM_MEAN", "PHANTOM_STD", "SEG_CLASSES"]  # re-exported for the model files

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_CLASSES = tuple(f"imagenet_{i:04d}" for i in range(1000))  # by index, in torchvision's IMAGENET1K order
BINARY_CLASSES = ("absent", "present")
LANDMARK_NAMES = ("spine", "liver", "left_kidney", "right_kidney")
SYNAPSE_CLASSES = ("background", "aorta", "gallbladder", "left_kidney", "right_kidney", "liver", "pancreas", "spleen",
                   "stomach")
FHPS_CLASSES = ("background", "pubic_symphysis", "fetal_head")
ISIC2018_CLASSES = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")
TINY_NOTE = "Tiny configuration for the phantom world (1x64x64), trained from scratch with its recipe."


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map (Ba et al., 2016; the ``LayerNorm2d`` of timm/ConvNeXt)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class PointwiseConv(nn.Conv2d):
    """A 1×1 convolution (same parameters as ``nn.Conv2d(cin, cout, 1)``) computed as a per-pixel linear map.

    Numerically the same operation; on the small maps of the tiny configurations the matrix-multiply path is several
    times faster than the oneDNN convolution, especially its backward pass with two threads.
    """

    def __init__(self, cin: int, cout: int, bias: bool = True) -> None:
        super().__init__(cin, cout, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.permute(0, 2, 3, 1), self.weight.flatten(1), self.bias).permute(0, 3, 1, 2)


def conv_bn_act(cin: int, cout: int, k: int = 1, act: type[nn.Module] | None = nn.ReLU,
                norm: bool = True) -> nn.Sequential:
    """Conv k×k (same padding) → BatchNorm → activation (Ioffe & Szegedy, ICML 2015; mmcv's ``ConvModule``).

    Without ``norm`` the conv has a bias and no BatchNorm follows (``ConvModule`` with ``norm_cfg=None``).
    """
    conv = PointwiseConv(cin, cout, bias=not norm) if k == 1 else nn.Conv2d(cin, cout, k, padding=k // 2, bias=not norm)
    layers: list[nn.Module] = [conv]
    if norm:
        layers.append(nn.BatchNorm2d(cout))
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (trainable or not) of ``module``."""
    return sum(p.numel() for p in module.parameters())


def measure_flops(net: nn.Module, input_size: Sequence[int]) -> int:
    """FLOPs of one eval-mode forward pass at ``(1, *input_size)`` counted by ``FlopCounterMode`` (on ``net``'s device;
    build the net under ``torch.device('meta')`` to measure full-size models without allocating them)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, *input_size, device=next(net.parameters()).device)
    counter = FlopCounterMode(display=False)
    was_training = net.training
    net.eval()
    with counter, torch.no_grad():
        net(x)
    net.train(was_training)
    return int(counter.get_total_flops())


def tiny_card(name: str, task: str, paper: str, params: int, flops: int, notes: str, **extra) -> VictimCard:
    """Card of a tiny phantom configuration (input 1×64×64; classes follow the task)."""
    classes = {"binary": BINARY_CLASSES, "segmentation": SEG_CLASSES, "landmark": LANDMARK_NAMES}[task]
    return VictimCard(name=name, task=task, modality="CT (phantom)", input_size=PHANTOM_INPUT, classes=classes,
                      paper=paper, params=params, flops=flops, notes=f"{TINY_NOTE} {notes}", extra=extra)


def full_card(name: str, task: str, modality: str, input_size: tuple[int, int, int], classes: Sequence[str],
              paper: str, params: int, flops: int, notes: str, **extra) -> VictimCard:
    """Card of a published full-size configuration (external weights only: ``create_victim(name, weights=PATH)``)."""
    return VictimCard(name=name, task=task, modality=modality, input_size=input_size, classes=tuple(classes),
                      paper=paper, params=params, flops=flops, notes=notes, extra=extra)


@dataclass(frozen=True)
class ZooRecipe(TrainRecipe):
    """A :class:`TrainRecipe` with an architecture ``revision``: bumped when a tiny configuration's architecture
    changes, so that cached weights trained for the previous architecture (whose sidecar recipe lacks or differs in
    this field) count as stale and are retrained (:func:`robustbench_med.training.is_current` compares recipes)."""

    revision: int = 1


def tiny_recipe(target_field: str, *, n_train: int, epochs: int, lr: float, batch_size: int = 32,
                revision: int = 0) -> TrainRecipe:
    """A phantom recipe (AdamW + one-cycle; :func:`robustbench_med.training.train_victim`), 200 validation images.

    ``revision`` 0 is the original architecture (a plain :class:`TrainRecipe`, so existing caches stay current);
    a later revision returns a :class:`ZooRecipe` recording it.
    """
    fields = dict(dataset="phantom.ct", target_field=target_field, n_train=n_train, n_val=200, epochs=epochs,
                  batch_size=batch_size, lr=lr, weight_decay=1e-4, seed=0)
    return ZooRecipe(**fields, revision=revision) if revision else TrainRecipe(**fields)


class SegmentationLossVictim(ModelVictim):
    """A segmentation victim whose loss is its paper's training loss: ``w_ce · CE + w_dice · (1 − soft Dice)``.

    The weights come from ``card.extra['loss_weights']`` = (w_ce, w_dice), e.g. (0.4, 0.6) for the Synapse recipes
    of BRAU-Net++, MSLAU-Net and MedFormer (after TransUNet, Chen et al., arXiv 2102.04306). This is also the
    objective white-box attacks maximise on these victims.
    """

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        w_ce, w_dice = self.card.extra.get("loss_weights", (1.0, 0.0))
        out = w_ce * T.loss_per_sample("segmentation", output, target)
        return out + w_dice * T.soft_dice_loss(output, target) if w_dice else out


def register_zoo(name: str, card: VictimCard, build: Callable[[], nn.Module], mean: Sequence[float],
                 std: Sequence[float], layers: Sequence[str], recipe: TrainRecipe | None = None,
                 cls: type[ModelVictim] = ModelVictim) -> None:
    """Register victim ``name``: a zero-argument factory wrapping ``build()`` with ``card``, the normalisation inside
    the victim and per-stage feature hooks ``layers`` (module names relative to the net)."""

    def factory() -> ModelVictim:
        return cls(build(), card, list(mean), list(std), tuple(layers))

    factory.__name__ = name.replace(".", "_")
    factory.__doc__ = f"{name}: {card.paper}."
    register_victim(name, card=card, recipe=recipe)(factory)
