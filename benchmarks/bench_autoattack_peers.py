"""AutoAttack strength on a small head: ours (``autoattack.standard``) against ART's ``AutoAttack`` on the same samples.

    python benchmarks/bench_autoattack_peers.py [--victim resnet18.phantom] [--n 256] [--eps 2/255] [--peer-on survivors]

Needs ``pip install adversarial-robustness-toolbox`` (``make bench`` installs it). Both ensembles run with their
defaults (ours: APGD-CE, APGD-DLR, FAB-T, Square 5000 queries on a 3-class head; ART: its default attack list) on
the first ``n`` test samples of the phantom, L∞ at ``eps``. Prints robust accuracy of each, the samples only one of
them breaks, and their wall time. Issue #21 item 8: no peer's AutoAttack may find more.

``--peer-on survivors`` runs ART only on the samples ours leaves robust (ART attacks each sample on its own, so its
verdict on a sample does not depend on the others): ART can find more than ours only by breaking one of them, and the
run costs a fraction of ART on all ``n`` (over 35 min at n = 64 on 2 CPU cores).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import robustbench_med as rbm
from robustbench_med.attacks.torchattacks_adapters import LogitsView
from robustbench_med.registry import VICTIMS
from robustbench_med.threat import parse_eps


def art_autoattack(victim, x: torch.Tensor, y: torch.Tensor, eps: float, seed: int) -> torch.Tensor:
    from art.attacks.evasion import AutoAttack
    from art.estimators.classification import PyTorchClassifier

    k = 2 if victim.task == "binary" else len(victim.card.classes)
    clf = PyTorchClassifier(model=LogitsView(victim).eval(), loss=torch.nn.CrossEntropyLoss(), input_shape=tuple(x.shape[1:]),
                            nb_classes=k, clip_values=(0.0, 1.0), device_type="cpu")
    np.random.seed(seed)
    torch.manual_seed(seed)
    attack = AutoAttack(estimator=clf, norm=np.inf, eps=eps, eps_step=eps / 4, batch_size=64)
    return torch.from_numpy(attack.generate(x.numpy(), y.numpy())).float()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--victim", default="resnet18.phantom")
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--eps", default="2/255")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peer-on", choices=("all", "survivors"), default="all",
                   help="ART on every sample, or only on those ours leaves robust")
    args = p.parse_args()
    eps = parse_eps(args.eps)
    victim = rbm.create_victim(args.victim, train_if_missing=True)
    ds = rbm.create_dataset("phantom.ct", split="test")
    idx = list(range(min(args.n, len(ds))))
    x, y = ds.images(idx), ds.targets(VICTIMS.get(args.victim).meta["recipe"].target_field, idx)
    clean = victim.score(x, y).bool()
    print(f"{args.victim}: n = {len(idx)}, clean accuracy {clean.float().mean():.4f}, L∞ eps = {args.eps}")
    results = {}
    t0 = time.perf_counter()
    ours = rbm.create_attack("autoattack.standard", eps=eps)(victim, x, y, seed=args.seed)
    results["robustbench_med autoattack.standard"] = (victim.score(ours, y).bool(), time.perf_counter() - t0)
    robust, sec = results["robustbench_med autoattack.standard"]
    print(f"  ours: robust accuracy {robust.float().mean():.4f} ({int(robust.sum())}/{len(idx)}) in {sec:.1f} s", flush=True)
    t0 = time.perf_counter()
    on = robust if args.peer_on == "survivors" else torch.ones_like(robust)
    try:
        art = x.clone()
        if on.any():
            art[on] = art_autoattack(victim, x[on], y[on], eps, args.seed)
        assert float((art - x).abs().max()) <= eps + 1e-6, "ART example outside the budget"
        # survivors only: the samples ours broke are not attacked by ART and count as broken by both (no claim either way)
        art_robust = victim.score(art, y).bool() & clean & (on | robust)
        results[f"ART AutoAttack ({args.peer_on})"] = (art_robust, time.perf_counter() - t0)
    except ImportError:
        print("ART not installed (pip install adversarial-robustness-toolbox): skipped")
    for name, (robust, sec) in results.items():
        print(f"  {name:38s} robust accuracy {robust.float().mean():.4f} ({int(robust.sum())}/{len(idx)})  {sec:7.1f} s")
    if len(results) == 2:
        (a, _), (b, _) = results.values()
        print(f"  broken only by ours: {int((~a & b).sum())}; broken only by ART: {int((a & ~b).sum())}")


if __name__ == "__main__":
    main()
