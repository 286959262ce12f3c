"""Volumetric (3D) victims on the volume phantom (``phantom.volumes``, 1×32×48×48): issue #20.

Segmentors are MONAI's classes, trained the way MONAI users train them — on random 32³ patches — and *used* the
way they are used: by sliding-window inference over the whole volume (windows 32³, overlap 0.5, Gaussian blending;
:mod:`robustbench_med.sliding`), so every attack goes through the window blending.

| victim | network | training |
|---|---|---|
| ``unet3d.phantom`` | MONAI ``UNet`` (3D, channels 16–128, 3 strided levels, 1 residual unit) | 160 labelled volumes |
| ``swinunetr.phantom`` | MONAI ``SwinUNETR`` (feature size 12, depths 1-1-1-1, batch norm) | 160 labelled volumes |
| ``unet3d.fewlabels`` | as ``unet3d.phantom`` | the first 8 volumes only (supervised baseline) |
| ``unet3d.meanteacher`` | as ``unet3d.phantom`` | 8 labelled + 152 unlabelled volumes, mean teacher |

``unet3d.meanteacher`` is the mean-teacher framework (Tarvainen & Valpola, "Mean teachers are better role models",
NeurIPS 2017) that semi-supervised 3D segmentors such as ERANet (arXiv 2502.07331) build on: the student is trained on
the labelled patches (CE + soft Dice) plus a consistency loss — the mean squared difference of the student's and the
teacher's softmax on unlabelled patches, each under its own Gaussian input noise (σ 0.03), weighted
``w · exp(−5 (1 − t)²)`` (t: the training fraction; w = ``consistency``) — and the teacher is the exponential moving
average of the student's weights (decay 0.99). The student is evaluated (as in UA-MT, Yu et al., MICCAI 2019). It
is **not** ERANet (no edge replacement augmentation, prototype consistency or conditional self-training) nor
SWDL-Net: the name claims the mean teacher only. ``unet3d.fewlabels`` has the same labelled volumes, steps and seed,
so the pair asks whether semi-supervision changes robustness.

Other volume victims live beside this file: ``eranet.phantom`` and ``swdlnet.phantom`` (ERANet- and SWDL-Net-style
semi-supervised segmentors on the same 8 + 152 volumes, :mod:`robustbench_med.victims.semisup3d`), ``hyspark.phantom``
(:mod:`robustbench_med.victims.hyspark`), ``cls3d.phantom`` (a lesion-presence classifier; a 3D CNN trained on the
volume label alone stayed at chance on this phantom, whose lesions are ~45 of 73,728 voxels, so it is trained with
voxel-level lesion supervision: :mod:`robustbench_med.victims.classifier3d`), ``unet3d.landmark``
(:mod:`robustbench_med.victims.landmark3d`) and the 3D VLMs (:mod:`robustbench_med.victims.vlm3d`).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from robustbench_med.registry import DATASETS, VICTIMS, register_victim
from robustbench_med.sliding import SlidingWindow
from robustbench_med.training import TrainRecipe, batch_soft_dice_loss, segmentation_class_weights
from robustbench_med.victim import ModelVictim, VictimCard
from robustbench_med.victims.basic import SEG_CLASSES

VOLUME_INPUT = (1, 32, 48, 48)
VOLUME_MEAN, VOLUME_STD = [0.25], [0.25]
PATCH = (32, 32, 32)
WINDOW = SlidingWindow(PATCH, overlap=0.5, mode="gaussian", sw_batch_size=4)
TRAINER_VERSION = 1


@dataclass(frozen=True)
class VolumeRecipe(TrainRecipe):
    """Patch training of a volumetric segmentor: ``steps`` optimiser steps of ``batch_size`` random ``PATCH`` crops of
    the first ``n_labelled`` training volumes (0: all); ``consistency`` > 0 adds the mean teacher on the others."""

    dataset: str = "phantom.volumes"
    target_field: str = "mask"
    n_train: int = 160
    n_val: int = 32
    batch_size: int = 4
    lr: float = 3e-3
    steps: int = 600
    n_labelled: int = 0
    consistency: float = 0.0
    ema_decay: float = 0.99
    noise: float = 0.03


def _crop(x: torch.Tensor, y: torch.Tensor | None, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One random ``PATCH`` crop per volume (offsets drawn from ``gen``)."""
    xs, ys = [], []
    for i in range(len(x)):
        starts = [int(torch.randint(0, n - p + 1, (1,), generator=gen)) for n, p in zip(x.shape[2:], PATCH)]
        box = tuple(slice(s, s + p) for s, p in zip(starts, PATCH))
        xs.append(x[i][(slice(None), *box)])
        if y is not None:
            ys.append(y[i][box])
    return torch.stack(xs), (torch.stack(ys) if y is not None else None)


def _batches(n: int, size: int, gen: torch.Generator):
    """Endless random batches of indices ``< n`` (a fresh permutation per pass)."""
    while True:
        order = torch.randperm(n, generator=gen)
        for i in range(0, n - size + 1 if n >= size else 1, size):
            yield order[i:i + size]


def train_volume_segmentor(name: str, path: Path, device: torch.device, progress: bool) -> None:
    """Train registered volume segmentor ``name`` on patches by its :class:`VolumeRecipe` (mean teacher when
    ``consistency`` > 0) and save its weights with the sidecar ``is_current`` checks."""
    from robustbench_med.training import _eval_metric
    from robustbench_med.weights import save_weights
    from robustbench_med.wrap import build_victim

    recipe: VolumeRecipe = VICTIMS.get(name).meta["recipe"]
    torch.manual_seed(recipe.seed)
    victim = build_victim(name).to(device)
    train = DATASETS.create(recipe.dataset, split="train", n=recipe.n_train)
    val = DATASETS.create(recipe.dataset, split="val", n=recipe.n_val)
    n_lab = recipe.n_labelled or len(train)
    x, y = train.images().to(device), train.targets(recipe.target_field).to(device)
    z = (x - victim.mean) / victim.std
    weights = segmentation_class_weights(y[:n_lab], len(victim.card.classes)).to(device)
    gen = torch.Generator().manual_seed(recipe.seed)
    teacher = _ema_copy(victim.net) if recipe.consistency > 0 else None
    labelled, unlabelled = _batches(n_lab, recipe.batch_size, gen), _batches(len(train) - n_lab or 1, recipe.batch_size, gen)

    def step_loss(step: int) -> torch.Tensor:
        loss = supervised_loss(victim.net, z, y, next(labelled), gen, weights)
        if teacher is not None:
            loss = loss + _consistency(victim.net, teacher, z[n_lab:][next(unlabelled)], gen, recipe, step)
        return loss

    start = time.perf_counter()
    victim.net.train()
    optimise(victim.net.parameters(), recipe.steps, recipe.lr, recipe.weight_decay, step_loss, f"train {name}", progress,
             None if teacher is None else lambda: _ema_update(teacher, victim.net, recipe.ema_decay))
    val_metric = _eval_metric(victim, val.images().to(device), val.targets(recipe.target_field).to(device), 8)
    save_weights(victim, path, {"victim": name, "recipe": asdict(recipe), "train_fingerprint": train.fingerprint(),
                                "val_metric": {victim.spec.metric: val_metric}, "train_seconds": round(time.perf_counter() - start, 1),
                                "trainer_version": TRAINER_VERSION, "train_threads": torch.get_num_threads(),
                                "torch": torch.__version__})


def supervised_loss(net: nn.Module, z: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, gen: torch.Generator,
                    weights: torch.Tensor) -> torch.Tensor:
    """Class-weighted CE + batch soft Dice of ``net`` on one random patch of each volume ``idx`` of ``z`` / ``y``."""
    idx = idx.to(z.device)
    xb, yb = _crop(z[idx], y[idx], gen)
    out = net(xb)
    return F.cross_entropy(out, yb.long(), weight=weights) + batch_soft_dice_loss(out, yb.long())


def optimise(params: Any, steps: int, lr: float, weight_decay: float, step_loss: Any, desc: str, progress: bool,
             after_step: Any = None) -> list[float]:
    """``steps`` AdamW steps with a one-cycle schedule on ``step_loss(step)`` (``after_step()`` after each, e.g. the
    mean teacher's EMA); returns the losses."""
    from robustbench_med.training import _progress

    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    bar, losses = _progress(steps, desc, progress), []
    for step in range(steps):
        loss = step_loss(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if after_step is not None:
            after_step()
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    return losses


def _consistency(student: nn.Module, teacher: nn.Module, zu: torch.Tensor, gen: torch.Generator, recipe: VolumeRecipe,
                 step: int) -> torch.Tensor:
    """The mean teacher's consistency term on one batch of unlabelled patches (module docstring)."""
    xu, _ = _crop(zu, None, gen)
    noise = [torch.randn(xu.shape, generator=gen).to(xu) * recipe.noise / VOLUME_STD[0] for _ in range(2)]
    with torch.no_grad():
        target = teacher(xu + noise[1]).softmax(1)
    ramp = float(torch.exp(torch.tensor(-5.0 * (1 - step / recipe.steps) ** 2)))
    return recipe.consistency * ramp * F.mse_loss(student(xu + noise[0]).softmax(1), target)


def _ema_copy(net: nn.Module) -> nn.Module:
    import copy

    teacher = copy.deepcopy(net)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


@torch.no_grad()
def _ema_update(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.mul_(decay).add_(s.detach(), alpha=1 - decay)
    for t, s in zip(teacher.buffers(), student.buffers()):
        t.copy_(s)


def monai_unet3d(out_ch: int = len(SEG_CLASSES)) -> nn.Module:
    from monai.networks.nets import UNet

    return UNet(spatial_dims=3, in_channels=1, out_channels=out_ch, channels=(16, 32, 64, 128), strides=(2, 2, 2),
                num_res_units=1)


def monai_swinunetr(out_ch: int = len(SEG_CLASSES)) -> nn.Module:
    from monai.networks.nets import SwinUNETR

    # batch norm: instance norm cannot normalise the 1×1×1 bottleneck of a 32³ patch in training
    return SwinUNETR(in_channels=1, out_channels=out_ch, feature_size=12, depths=(1, 1, 1, 1), num_heads=(3, 6, 12, 24),
                     spatial_dims=3, norm_name="batch")


def _card(name: str, task: str, classes: tuple[str, ...], paper: str, notes: str, **extra: Any) -> VictimCard:
    return VictimCard(name=name, task=task, modality="CT (volume phantom)", input_size=VOLUME_INPUT, classes=classes,
                      paper=paper, notes=notes, extra=extra)


CARDS = {
    "unet3d.phantom": _card("unet3d.phantom", "segmentation", SEG_CLASSES, "MONAI UNet (Kerfoot et al., 2018; Cardoso et al., arXiv 2211.02701)",
                            "3D U-Net on 32³ patches, sliding-window inference (overlap 0.5, Gaussian)."),
    "swinunetr.phantom": _card("swinunetr.phantom", "segmentation", SEG_CLASSES, "SwinUNETR (Hatamizadeh et al., BrainLes 2021), MONAI",
                               "Small SwinUNETR (feature size 12, depths 1-1-1-1, batch norm) on 32³ patches, sliding window."),
    "unet3d.fewlabels": _card("unet3d.fewlabels", "segmentation", SEG_CLASSES, "MONAI UNet, supervised on 8 labelled volumes",
                              "unet3d.phantom's network trained on the first 8 training volumes only."),
    "unet3d.meanteacher": _card("unet3d.meanteacher", "segmentation", SEG_CLASSES,
                                "Mean teacher (Tarvainen & Valpola, NeurIPS 2017) on a MONAI 3D UNet",
                                "8 labelled + 152 unlabelled volumes; not ERANet or SWDL-Net (no edge replacement, "
                                "prototype consistency, self-training or Laplacian pyramid).", baseline="unet3d.fewlabels"),
}

RECIPES = {
    "unet3d.phantom": VolumeRecipe(),
    "swinunetr.phantom": VolumeRecipe(steps=400, lr=2e-3),
    "unet3d.fewlabels": VolumeRecipe(n_labelled=8),
    "unet3d.meanteacher": VolumeRecipe(n_labelled=8, consistency=10.0),
}


def _segmentor(name: str, net: nn.Module) -> ModelVictim:
    return ModelVictim(net, CARDS[name], VOLUME_MEAN, VOLUME_STD, window=WINDOW)


def _register_segmentor(name: str, build) -> None:
    def factory() -> ModelVictim:
        return _segmentor(name, build())

    factory.__doc__ = f"{name}: {CARDS[name].notes}"
    register_victim(name, card=CARDS[name], recipe=RECIPES[name], trainer=train_volume_segmentor,
                    trainer_version=TRAINER_VERSION)(factory)


_register_segmentor("unet3d.phantom", monai_unet3d)
_register_segmentor("swinunetr.phantom", monai_swinunetr)
_register_segmentor("unet3d.fewlabels", monai_unet3d)
_register_segmentor("unet3d.meanteacher", monai_unet3d)

