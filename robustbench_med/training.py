"""Deterministic training of registered victims on the embedded phantom world (or any registered dataset).

``train_victim(name)`` builds the victim at random init, trains it with its registered :class:`TrainRecipe` under a
fixed seed, and writes ``<home>/weights/<name>.safetensors`` with a sidecar JSON (sha256, recipe, dataset
fingerprint, validation metric, library versions).

Training runs with a fixed number of intra-op CPU threads (``TRAIN_THREADS`` = 2, or the environment variable
``ROBUSTBENCH_MED_TRAIN_THREADS``): the order of floating-point reductions, hence the trained bytes and their
sha256, depends on the thread count, so pinning it makes a fresh training on any machine with the same CPU kind and
library versions reproduce the weights that published leaderboard entries name (another count trains equally good
but different weights, which ``verify`` then reports as "weights differ").
"""
from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from robustbench_med.errors import ConfigError
from robustbench_med.registry import DATASETS, VICTIMS
from robustbench_med.weights import weights_path  # noqa: F401  (re-exported: robustbench_med.training.weights_path)

TRAIN_THREADS = 2
TRAIN_THREADS_ENV = "ROBUSTBENCH_MED_TRAIN_THREADS"


@dataclass(frozen=True)
class TrainRecipe:
    """How a victim is trained: data, target field, optimiser and schedule."""

    dataset: str = "phantom.ct"
    target_field: str = "label"
    n_train: int = 1200
    n_val: int = 200
    epochs: int = 6
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0


TRAINING_VERSION = 2  # recorded in each sidecar; bump when the generic training loop or loss changes


def training_threads() -> int:
    """The intra-op thread count training runs with (``ROBUSTBENCH_MED_TRAIN_THREADS`` or :data:`TRAIN_THREADS`)."""
    raw = os.environ.get(TRAIN_THREADS_ENV, str(TRAIN_THREADS))
    if not raw.isdigit() or int(raw) < 1:
        raise ConfigError(f"{TRAIN_THREADS_ENV} must be a positive integer, got {raw!r}")
    return int(raw)


@contextmanager
def pinned_threads(n: int):
    """Run the block with ``n`` intra-op threads, then restore the previous count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def training_device(device: str | torch.device | None) -> torch.device:
    """The device to train on: ``device`` as given (``train --device``, ``run --device``), or CUDA when available for
    ``None`` / ``'auto'``; an unknown or unavailable device raises :class:`ConfigError` before any work."""
    if device is None or (isinstance(device, str) and device.strip().lower() == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"unknown device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but CUDA is not available here")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"device {device!r} asked for, but only {torch.cuda.device_count()} CUDA device(s) exist")
    return dev




def recipe_for(name: str) -> TrainRecipe:
    recipe = VICTIMS.get(name).meta.get("recipe")
    if recipe is None:
        raise ValueError(f"victim {name!r} has no training recipe (it loads external weights only)")
    return recipe


def _eval_metric(victim, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
    victim.eval()
    scores = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            out = victim(x[i : i + batch_size])
            scores.append(next(iter(victim.metrics(out, y[i : i + batch_size]).values())))
    return float(torch.cat(scores).mean())


def train_victim(name: str, *, force: bool = False, device: str | torch.device | None = None, progress: bool = True) -> Path:
    """Train victim ``name`` with its recipe and cache the weights; skip if cached and not ``force``.

    A file lock makes concurrent callers (several processes of one run) train once and share the result. Cached
    weights trained with another recipe or on other data (e.g. after the phantom generator changed) are stale and
    are retrained.
    """
    from filelock import FileLock

    path = weights_path(name)
    device = training_device(device)  # honoured (train --device, run --device); checked before any work
    with FileLock(str(path) + ".lock"):
        if path.exists() and not force and is_current(name, path):
            return path
        with pinned_threads(training_threads()):
            return _train(name, path, device, progress)


def is_current(name: str, path: Path) -> bool:
    """Whether cached weights at ``path`` were trained with ``name``'s current recipe on the current data.

    Compares the generic training loop's version, the name of the registry's training-time ``augment`` (or, for
    victims with their own ``trainer``, the registry's ``trainer_version``) and, when the sidecar records them, the recipe and the training split's fingerprint (sha256
    of its bytes).
    """
    from robustbench_med.weights import read_sidecar

    meta, recipe = read_sidecar(path), recipe_for(name)
    entry_meta = VICTIMS.get(name).meta
    if entry_meta.get("trainer") is None and meta.get("training_version", 1) != TRAINING_VERSION:
        return False
    if entry_meta.get("trainer") is not None and meta.get("trainer_version", 1) != entry_meta.get("trainer_version", 1):
        return False  # a victim with its own training loop whose loop (or model initialisation) changed
    if "recipe" in meta and meta["recipe"] != json.loads(json.dumps(asdict(recipe))):
        return False
    augment = entry_meta.get("augment")
    if meta.get("augment") != (None if augment is None else augment.__name__):
        return False  # trained with another (or without the) training-time augmentation
    if "train_fingerprint" not in meta:
        return True
    return meta["train_fingerprint"] == DATASETS.create(recipe.dataset, split="train", n=recipe.n_train).fingerprint()


def _train(name: str, path: Path, device: str | torch.device | None, progress: bool) -> Path:
    from robustbench_med.weights import save_weights
    from robustbench_med.wrap import build_victim

    recipe = recipe_for(name)
    device = training_device(device)
    trainer = VICTIMS.get(name).meta.get("trainer")
    if trainer is not None:  # victims with their own loop (e.g. LVLMs trained on VQA) save to `path` themselves
        trainer(name, path, device, progress)
        return path
    torch.manual_seed(recipe.seed)
    victim = build_victim(name).to(device)
    train = DATASETS.create(recipe.dataset, split="train", n=recipe.n_train)
    val = DATASETS.create(recipe.dataset, split="val", n=recipe.n_val)
    x, y = train.images().to(device), train.targets(recipe.target_field).to(device)
    xv, yv = val.images().to(device), val.targets(recipe.target_field).to(device)
    opt = torch.optim.AdamW(victim.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    steps = recipe.epochs * ((len(x) + recipe.batch_size - 1) // recipe.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=steps)
    gen = torch.Generator().manual_seed(recipe.seed)
    augment = VICTIMS.get(name).meta.get("augment")  # (x, y, gen) -> (x, y), e.g. modality dropout; draws from `gen`
    weights = segmentation_class_weights(y, victim(x[:1]).shape[1]).to(device) if victim.task == "segmentation" else None
    start = time.perf_counter()
    bar = _progress(steps, f"train {name}", progress)
    for _epoch in range(recipe.epochs):
        victim.train()
        order = torch.randperm(len(x), generator=gen).to(device)
        for i in range(0, len(x), recipe.batch_size):
            idx = order[i : i + recipe.batch_size]
            xb, yb = (x[idx], y[idx]) if augment is None else augment(x[idx], y[idx], gen)
            loss = _train_loss(victim, xb, yb, weights)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    val_metric = _eval_metric(victim, xv, yv, 64)
    meta: dict[str, Any] = {
        "victim": name,
        "recipe": asdict(recipe),
        "train_fingerprint": train.fingerprint(),
        "val_metric": {victim.spec.metric: val_metric},
        "train_seconds": round(time.perf_counter() - start, 1),
        "training_version": TRAINING_VERSION,
        **({"augment": augment.__name__} if augment is not None else {}),
        "train_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    save_weights(victim, path, meta)
    return path


def segmentation_class_weights(masks: torch.Tensor, n_classes: int, cap: float = 20.0) -> torch.Tensor:
    """Cross-entropy class weights w_c = min(√(f_max / f_c), cap) from the training masks' class frequencies f_c.

    Square-root inverse-frequency balancing (a softer form of median-frequency balancing, Eigen & Fergus, ICCV 2015):
    on the phantom the lesion class covers ~0.4% of the pixels and is never predicted without it.
    """
    freq = torch.bincount(masks.flatten().long(), minlength=n_classes).double()
    freq = freq / freq.sum()
    weights = (freq.max() / freq.clamp_min(1e-12)).sqrt().clamp(max=cap)
    return weights.float()


def batch_soft_dice_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 − soft Dice over foreground classes with the sums taken over the whole batch ("batch Dice", as in nnU-Net,
    Isensee et al., Nature Methods 2021): a lesion-free image does not push the lesion probability to zero alone."""
    prob = output.softmax(1)[:, 1:]
    onehot = F.one_hot(target.long(), output.shape[1]).movedim(-1, 1)[:, 1:].float()
    axes = (0, *range(2, output.dim()))  # batch and every spatial axis (slices or volumes)
    inter = (prob * onehot).sum(axes)
    denom = prob.sum(axes) + onehot.sum(axes)
    return 1 - ((2 * inter + 1) / (denom + 1)).mean()


def _train_loss(victim, x: torch.Tensor, y: torch.Tensor, class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """The victim's loss; segmentors train with class-weighted CE + batch soft Dice instead (see
    :func:`segmentation_class_weights`), so small structures such as lesions are learnt. Attacks still maximise each
    victim's own loss."""
    out = victim(x)
    if victim.task == "segmentation":
        return F.cross_entropy(out, y.long(), weight=class_weights) + batch_soft_dice_loss(out, y)
    return victim.loss(out, y).mean()


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=None if enabled else True, leave=False)
