"""A volumetric landmark detector on the volume phantom (``phantom.volumes``, 1×32×48×48): issue #20.

``unet3d.landmark`` (task ``landmark``) regresses one Gaussian heatmap per landmark of
:data:`robustbench_med.data.volumes.VOLUME_LANDMARKS` (liver centroid, image-left and image-right kidney centroids,
the spine's axis at the kidneys' mean height) with a MONAI 3D ``UNet`` (channels 16–128, 3 strided levels, 1
residual unit: the segmentors' network with 4 output channels), single-stage heatmap regression (Payer et al., MedIA 2019).
It is *not* CMSL or any other cascaded / multi-scale 3D landmark method (the issue's reference for 3D localisation):
one network, one scale, arg-max decoding. Output: heatmaps
[B, 4, 32, 48, 48] with peak 1 at each landmark; prediction = each heatmap's arg-max, (x, y, z) voxels; scores
``sdr@4px`` (fraction of landmarks within 4 voxels) and ``mre_px`` (mean radial error, voxels) of
:mod:`robustbench_med.tasks`.

**Whole volume, no sliding window.** Unlike the segmentors, the detector sees the whole volume: the landmarks are
organ centroids and a left / right distinction, global quantities a 32³ window (two thirds of the in-plane extent)
cannot resolve — a window holding part of the liver or one kidney has no way to know the centroid or the side, and
blending windows that disagree would smear the heatmaps. The whole volume (32 × 48 × 48) fits the U-Net's three
stride-2 levels exactly.

**Training** (:func:`train_landmark3d`): AdamW, one-cycle, ``steps`` batches of ``batch_size`` whole training
volumes; loss = mean over voxels of (output − target)² · (1 + ``fg_weight`` · target), the target being the task's
Gaussian heatmaps (σ = ``heatmap_sigma`` = 2 voxels): the task's own MSE (the attack objective) with the
neighbourhood of each landmark up-weighted, since the Gaussians cover ~0.05 % of a volume each. The sidecar records
validation ``sdr@4px`` (the task's metric), ``mre_px`` and ``sdr@2px``, wall seconds and the thread count.

**Measured** (one thread on a shared 2-core machine, 600 steps of 4 volumes): 115 s; on the first 64 validation
volumes ``sdr@4px`` 1.000, ``sdr@2px`` 0.984, ``mre_px`` 0.97 voxels (liver 0.83, left kidney 1.00, right kidney 1.00,
spine 1.03). The registered run (2 threads, 43 s on a quiet machine): ``sdr@4px`` 0.984, ``sdr@2px`` 0.914, ``mre_px``
1.35 (0.94 / 1.67 / 1.34 / 1.43). The clean task is easy at a 4-voxel radius; ``mre_px`` and ``sdr@2px`` are the
informative clean numbers. ``pgd.linf`` (10 steps, the task's heatmap-MSE objective, first 16 test volumes, one-thread
weights; clean ``sdr@4px`` 1.0, ``mre_px`` 1.00): 2/255 → 1.0 / 1.08, 8/255 → 0.97 / 1.77, 16/255 → 0.80 / 4.62. The
MSE objective is mostly raised by lifting the background rather than moving the arg-max, so it is a weak attack on
the decoded landmarks; ``pgd.landmark`` (a margin on the heatmaps, :mod:`robustbench_med.attacks.pgd`) moves them.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from robustbench_med import tasks as T
from robustbench_med.data.volumes import VOLUME_LANDMARKS
from robustbench_med.registry import DATASETS, VICTIMS, register_victim
from robustbench_med.training import TrainRecipe
from robustbench_med.victim import ModelVictim, VictimCard
from robustbench_med.victims.volumes import VOLUME_INPUT, VOLUME_MEAN, VOLUME_STD, _batches, monai_unet3d, optimise

LANDMARKS = tuple(VOLUME_LANDMARKS)  # liver, left_kidney, right_kidney, spine: the order of the landmarks column
SDR_RADIUS, HEATMAP_SIGMA = 4.0, 2.0
TRAINER_VERSION = 1


@dataclass(frozen=True)
class LandmarkRecipe(TrainRecipe):
    """Whole-volume heatmap regression: ``steps`` AdamW steps (one-cycle) of ``batch_size`` training volumes."""

    dataset: str = "phantom.volumes"
    target_field: str = "landmarks"
    n_train: int = 400
    n_val: int = 64
    batch_size: int = 4
    lr: float = 3e-3
    steps: int = 600
    fg_weight: float = 20.0


def heatmap_loss(out: torch.Tensor, coords: torch.Tensor, sigma: float, fg_weight: float) -> torch.Tensor:
    """Foreground-weighted heatmap MSE (module docstring): mean of (out − hm)² · (1 + fg_weight · hm)."""
    hm = T.landmark_heatmaps(coords, out.shape[2:], sigma)
    return ((out - hm).pow(2) * (1 + fg_weight * hm)).mean()


@torch.no_grad()
def evaluate_landmarks(victim: ModelVictim, x: torch.Tensor, y: torch.Tensor, batch_size: int = 8) -> dict[str, float]:
    """Mean of the task's per-volume metrics (``sdr@4px``, ``mre_px``) plus ``sdr@2px`` on volumes ``x``."""
    victim.eval()
    pred = torch.cat([T.heatmap_argmax(victim(x[i:i + batch_size])) for i in range(0, len(x), batch_size)]).cpu()
    err = (pred - y.cpu().float()).norm(dim=-1)
    return {victim.spec.metric: float((err <= victim.sdr_radius).float().mean()), "mre_px": float(err.mean()),
            "sdr@2px": float((err <= 2.0).float().mean()),
            "mre_px_per_landmark": [round(float(e), 3) for e in err.mean(0)]}


def fit_landmarks(victim: ModelVictim, recipe: LandmarkRecipe, device: torch.device, progress: bool = False,
                  desc: str = "train unet3d.landmark") -> dict:
    """Train ``victim.net`` by ``recipe``; returns validation metrics, the training fingerprint and wall seconds."""
    torch.manual_seed(recipe.seed)
    train = DATASETS.create(recipe.dataset, split="train", n=recipe.n_train)
    val = DATASETS.create(recipe.dataset, split="val", n=recipe.n_val)
    victim = victim.to(device)
    z = (train.images().to(device) - victim.mean) / victim.std
    y = train.targets(recipe.target_field).to(device).float()
    gen = torch.Generator().manual_seed(recipe.seed)
    batches = _batches(len(z), recipe.batch_size, gen)

    def step_loss(_step: int) -> torch.Tensor:
        idx = next(batches).to(device)
        return heatmap_loss(victim.net(z[idx]), y[idx], victim.heatmap_sigma, recipe.fg_weight)

    start = time.perf_counter()
    victim.net.train()
    losses = optimise(victim.net.parameters(), recipe.steps, recipe.lr, recipe.weight_decay, step_loss, desc, progress)
    seconds = round(time.perf_counter() - start, 1)
    metrics = evaluate_landmarks(victim, val.images().to(device), val.targets(recipe.target_field).to(device))
    return {"val": metrics, "fingerprint": train.fingerprint(), "train_seconds": seconds,
            "final_loss": round(sum(losses[-20:]) / max(1, len(losses[-20:])), 5)}


def train_landmark3d(name: str, path: Path, device: torch.device, progress: bool) -> None:
    """The registered trainer: train ``name`` by its :class:`LandmarkRecipe` and save weights + sidecar."""
    from robustbench_med.weights import save_weights
    from robustbench_med.wrap import build_victim

    recipe: LandmarkRecipe = VICTIMS.get(name).meta["recipe"]
    torch.manual_seed(recipe.seed)
    victim = build_victim(name)
    out = fit_landmarks(victim, recipe, device, progress, f"train {name}")
    val = out["val"]
    metric = victim.spec.metric
    save_weights(victim, path, {"victim": name, "recipe": asdict(recipe), "train_fingerprint": out["fingerprint"],
                                "val_metric": {metric: val[metric]}, "val_mre_px": round(val["mre_px"], 4),
                                "val_sdr@2px": round(val["sdr@2px"], 4), "val_mre_px_per_landmark": val["mre_px_per_landmark"],
                                "final_loss": out["final_loss"], "train_seconds": out["train_seconds"],
                                "trainer_version": TRAINER_VERSION, "train_threads": torch.get_num_threads(),
                                "torch": torch.__version__})


CARD = VictimCard(
    name="unet3d.landmark", task="landmark", modality="CT (volume phantom)", input_size=VOLUME_INPUT, classes=LANDMARKS,
    paper="Heatmap regression (Payer et al., MedIA 2019) with a MONAI 3D UNet (Kerfoot et al., 2018)",
    notes="4 Gaussian heatmaps (σ 2 voxels; liver, left / right kidney, spine) regressed on whole volumes (no sliding "
          "window: the landmarks are global); arg-max decoding, SDR within 4 voxels.",
    extra={"sdr_radius": SDR_RADIUS, "heatmap_sigma": HEATMAP_SIGMA})
RECIPE = LandmarkRecipe()


@register_victim("unet3d.landmark", card=CARD, recipe=RECIPE, trainer=train_landmark3d, trainer_version=TRAINER_VERSION)
def unet3d_landmark() -> ModelVictim:
    """unet3d.landmark: 3D landmark heatmaps (liver, kidneys, spine) from a MONAI 3D UNet on the whole volume."""
    return ModelVictim(monai_unet3d(len(LANDMARKS)), CARD, VOLUME_MEAN, VOLUME_STD)
