"""Clean quality of the project-trained tiny victims: the numbers their cards state.

    python benchmarks/zoo_quality.py [NAME ...] [--n 200]

Trains missing weights with each victim's recipe (cached in ``$ROBUSTBENCH_MED_HOME``), then scores ``--n`` phantom
*validation* images: accuracy (with the label prevalence) for classifiers, Dice per foreground class for segmentors,
SDR@4px and mean radial error for landmark detectors, plus the training time recorded in the weights sidecar.
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

import robustbench_med as rbm  # noqa: E402
from robustbench_med.training import recipe_for, weights_path  # noqa: E402
from robustbench_med.weights import read_sidecar  # noqa: E402

TINY = ("biformer.tiny", "medformer.tiny", "wavenetsf.tiny", "braunet.tiny", "braunetpp.tiny", "dssaunet.tiny",
        "mslaunet.tiny", "medformer_seg.tiny", "han.tiny", "cnn.phantom", "resnet18.phantom", "unet.phantom",
        "unet.landmark")


def per_class_dice(pred: torch.Tensor, mask: torch.Tensor, n_classes: int) -> list[float]:
    """Dice of each foreground class over the whole set (2|P∩G| / (|P| + |G|))."""
    out = []
    for c in range(1, n_classes):
        p, g = pred == c, mask == c
        out.append(float(2 * (p & g).sum() / (p.sum() + g.sum()).clamp_min(1)))
    return out


def describe(name: str, n: int) -> str:
    victim = rbm.create_victim(name, train_if_missing=True, progress=False)
    field = recipe_for(name).target_field
    ds = rbm.create_dataset("phantom.ct", split="val", n=n)
    x, y = ds.images(), ds.targets(field)
    with torch.no_grad():
        metrics = {k: float(v.mean()) for k, v in victim.evaluate(x, y).items()}
        pred = victim.predict(x)
    line = f"{name}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items())
    if victim.task == "segmentation":
        dice = per_class_dice(pred, y, len(victim.card.classes))
        line += " (" + ", ".join(f"{c} {d:.2f}" for c, d in zip(victim.card.classes[1:], dice)) + ")"
    elif victim.task in ("binary", "classification"):
        line += f" (label prevalence {float((y > 0).float().mean()):.2f})"
    seconds = read_sidecar(weights_path(name)).get("train_seconds")
    return line + f"; trained in {seconds} s" if seconds is not None else line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", default=list(TINY))
    ap.add_argument("--n", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    for name in args.names:
        print(describe(name, args.n), flush=True)


if __name__ == "__main__":
    main()
