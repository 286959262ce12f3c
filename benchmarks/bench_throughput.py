"""Throughput and memory benchmarks, printed as ratios measured side by side in one run.

    python benchmarks/bench_throughput.py [--victim resnet18.phantom] [--weights trained|random] [--n 256] [--batch 64] [--repeats 3]

Victims carry their trained phantom weights by default (trained on first use), because the harness's default protocol
(``attack_only_robust``, AutoAttack's: attack only the samples still classified correctly) does less work on a model
that is right more often; ``--weights random`` times random-init models.

1. PGD (L∞, 10 steps) through the harness (``run_grid``: planning, clean pass, checks, SQLite writes) vs
   ``torchattacks.PGD`` called directly on the same model and batches: overhead ratio = t_torchattacks / t_harness
   (target ≥ 0.95). Printed for the default protocol and for ``attack_only_robust: false`` (every sample attacked,
   like torchattacks), and like for like against torchattacks plus the clean and adversarial forward passes a user
   needs for the two accuracies the harness reports.
2. The same PGD through the Adversarial Robustness Toolbox (``PyTorchClassifier`` + ``ProjectedGradientDescent``), if
   installed (``pip install adversarial-robustness-toolbox``; ``make bench`` does it).
3. An eps sweep of 4 values as one grid group vs 4 separate runs (speed-up; target ≥ 1.5× on CPU): under the default
   protocol the group is a cascade (each larger eps attacks only the survivors of the smaller one); with
   ``attack_only_robust: false`` it is one batch with a per-sample eps tensor (the same batch size, and 4 × the batch
   per forward pass). On a compute-bound model on 2 CPU cores a 4× larger batch costs about 4× the time, so that
   batch only shares the clean pass and set-up there; GPUs gain from the larger batches themselves.
4. One PGD step vs one forward + backward of the model (the physical floor).
5. Peak resident memory of a grid run as n_examples grows (separate processes).
Medians over ``--repeats`` runs; CPU timings on shared machines are noisy (stack.md §1).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

import robustbench_med as rbm  # noqa: E402
from robustbench_med.grid import parse_grid  # noqa: E402
from robustbench_med.runner import run_grid  # noqa: E402
from robustbench_med.tasks import two_class_logits  # noqa: E402

EPS, ALPHA, STEPS = 8 / 255, 2 / 255, 10


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def machine() -> str:
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    return f"{dev}; torch {torch.__version__}; python {platform.python_version()}"


class Logits(torch.nn.Module):
    def __init__(self, victim):
        super().__init__()
        self.victim = victim

    def forward(self, x):
        out = self.victim(x)
        return two_class_logits(out) if self.victim.task == "binary" else out


def grid(victim: str, n: int, batch: int, eps_list, device: str, *, weights: str | None = "auto", only_robust: bool = True) -> dict:
    # the phantom's test split holds 500 slices; a larger n asks the generator for that many (an n beyond the split is an error)
    data = {"name": "phantom.ct", "split": "test", **({"params": {"n": n}} if n > 500 else {})}
    return {"name": "bench", "dataset": data, "n_examples": n, "batch_size": batch, "device": device, "attack_only_robust": only_robust,
            "victims": [{"name": victim, "weights": weights, "target_field": target_field(victim)}],
            "attacks": [{"name": "pgd.linf", "params": {"eps": eps_list, "steps": STEPS, "step_size": ALPHA}}]}


def target_field(victim: str) -> str:
    from robustbench_med.registry import VICTIMS

    return VICTIMS.get(victim).meta["recipe"].target_field


def run_harness(args, device, eps_list, *, batch: int | None = None, only_robust: bool = True) -> None:
    with tempfile.TemporaryDirectory() as d:
        g = grid(args.victim, args.n, batch or args.batch, eps_list, str(device), weights=args.weights_arg, only_robust=only_robust)
        run_grid(parse_grid(g), d, progress=False)


def bench_harness_vs_torchattacks(args, device) -> dict:
    import torchattacks

    ds = rbm.create_dataset("phantom.ct", split="test", n=args.n)
    victim = rbm.create_victim(args.victim, weights=args.weights_arg, device=device)
    x, y = ds.images().to(device), ds.targets(target_field(args.victim)).to(device)
    model = Logits(victim).eval()
    with torch.no_grad():
        clean_acc = float((torch.cat([model(x[i : i + args.batch]).argmax(1) for i in range(0, len(x), args.batch)]) == y).float().mean())

    def direct():
        atk = torchattacks.PGD(model, eps=EPS, alpha=ALPHA, steps=STEPS)
        for i in range(0, len(x), args.batch):
            atk(x[i : i + args.batch], y[i : i + args.batch])

    def direct_evaluated():  # what a torchattacks user must add to get clean and robust accuracy
        atk = torchattacks.PGD(model, eps=EPS, alpha=ALPHA, steps=STEPS)
        for i in range(0, len(x), args.batch):
            xb, yb = x[i : i + args.batch], y[i : i + args.batch]
            with torch.no_grad():
                clean = model(xb).argmax(1) == yb
            adv = atk(xb, yb)
            with torch.no_grad():
                robust = model(adv).argmax(1) == yb
            (clean.float().mean() + robust.float().mean()).item()

    run_harness(args, device, [EPS])  # warm-up (dataset cache, imports)
    t_ta, t_te = median_time(direct, args.repeats), median_time(direct_evaluated, args.repeats)
    t_h = median_time(lambda: run_harness(args, device, [EPS]), args.repeats)
    t_all = median_time(lambda: run_harness(args, device, [EPS], only_robust=False), args.repeats)
    out = {"clean_accuracy": clean_acc, "torchattacks_s": t_ta, "torchattacks_evaluated_s": t_te, "harness_s": t_h,
           "harness_every_sample_s": t_all, "overhead_ratio": t_ta / t_h, "overhead_ratio_every_sample": t_ta / t_all,
           "overhead_ratio_evaluated": t_te / t_all, "images_per_s_harness": args.n / t_h}
    try:
        import numpy as np
        from art.attacks.evasion import ProjectedGradientDescent
        from art.estimators.classification import PyTorchClassifier

        clf = PyTorchClassifier(model=model, loss=torch.nn.CrossEntropyLoss(), input_shape=tuple(victim.card.input_size),
                                nb_classes=2 if victim.task == "binary" else len(victim.card.classes), clip_values=(0.0, 1.0),
                                device_type="gpu" if device.type == "cuda" else "cpu")
        pgd = ProjectedGradientDescent(clf, norm=np.inf, eps=EPS, eps_step=ALPHA, max_iter=STEPS, batch_size=args.batch, verbose=False)
        xn, yn = x.cpu().numpy(), y.cpu().numpy()
        out["art_s"] = median_time(lambda: pgd.generate(xn, yn), args.repeats)
        out["art_over_harness"] = out["art_s"] / t_h
    except ImportError:
        out["art_s"] = None
    return out


def bench_eps_sweep(args, device) -> dict:
    eps_list = [1 / 255, 2 / 255, 4 / 255, 8 / 255]

    def sequential(only_robust: bool):
        for e in eps_list:
            run_harness(args, device, [e], only_robust=only_robust)

    t_cs = median_time(lambda: sequential(True), args.repeats)
    t_c = median_time(lambda: run_harness(args, device, eps_list), args.repeats)  # cascade (default protocol)
    t_s = median_time(lambda: sequential(False), args.repeats)
    t_b = median_time(lambda: run_harness(args, device, eps_list, only_robust=False), args.repeats)  # 4 cells share each batch
    t_b4 = median_time(lambda: run_harness(args, device, eps_list, batch=args.batch * 4, only_robust=False), args.repeats)
    return {"cascade_s": t_c, "sequential_s": t_cs, "speedup": t_cs / t_c,
            "batched_s": t_b, "batched_4x_s": t_b4, "sequential_every_sample_s": t_s,
            "speedup_batched": t_s / t_b, "speedup_batched_4x": t_s / t_b4}


def bench_step_vs_floor(args, device) -> dict:
    victim = rbm.create_victim(args.victim, weights=args.weights_arg, device=device)
    ds = rbm.create_dataset("phantom.ct", split="test", n=args.batch)
    x, y = ds.images().to(device), ds.targets(target_field(args.victim)).to(device)

    def fwd_bwd():
        xr = x.clone().requires_grad_(True)
        torch.autograd.grad(victim.objective(xr, y).sum(), xr)

    atk = rbm.create_attack("pgd.linf", eps=EPS, steps=1, step_size=ALPHA)
    fwd_bwd(), atk(victim, x, y)  # warm-up: the first call of each allocates
    t_floor = median_time(fwd_bwd, args.repeats * 3)
    t_step = median_time(lambda: atk(victim, x, y), args.repeats * 3)
    return {"fwd_bwd_s": t_floor, "pgd_step_s": t_step, "step_over_floor": t_step / t_floor}


def bench_memory(args) -> dict:
    out = {}
    for n in (64, 256, 1024):
        code = ("import resource, tempfile, robustbench_med as r; from robustbench_med.grid import parse_grid; from robustbench_med.runner import run_grid;"
                f"g=parse_grid({grid(args.victim, n, args.batch, [EPS], 'cpu', weights=args.weights_arg)!r});"
                "d=tempfile.mkdtemp(); run_grid(g, d, progress=False);"
                "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        out[n] = int(res.stdout.strip().splitlines()[-1]) / 1024  # MiB
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--victim", default="resnet18.phantom")
    p.add_argument("--weights", choices=("trained", "random"), default="trained",
                   help="the victim's trained phantom weights (trained on first use) or a random initialisation")
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path, help="also write the numbers here")
    args = p.parse_args()
    args.weights_arg = "auto" if args.weights == "trained" else None
    if args.weights == "trained":
        rbm.create_victim(args.victim, train_if_missing=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"machine: {machine()}\nvictim: {args.victim} ({args.weights} weights), n={args.n}, batch={args.batch}, PGD L∞ eps=8/255, {STEPS} steps")
    results = {"machine": machine(), "victim": args.victim, "weights": args.weights, "n": args.n, "batch": args.batch}
    results["pgd"] = r = bench_harness_vs_torchattacks(args, device)
    print(f"[1] PGD (clean accuracy {r['clean_accuracy']:.3f}): torchattacks {r['torchattacks_s']:.2f}s, harness {r['harness_s']:.2f}s "
          f"→ overhead ratio {r['overhead_ratio']:.3f} (target ≥ 0.95); {r['images_per_s_harness']:.1f} img/s")
    print(f"    harness attacking every sample (attack_only_robust: false) {r['harness_every_sample_s']:.2f}s → ratio "
          f"{r['overhead_ratio_every_sample']:.3f}; like for like (torchattacks + the clean and adversarial forward passes that "
          f"give the two accuracies, {r['torchattacks_evaluated_s']:.2f}s) → ratio {r['overhead_ratio_evaluated']:.3f}")
    if r.get("art_s"):
        print(f"[2] ART PGD {r['art_s']:.2f}s → ART / harness time {r['art_over_harness']:.2f}×")
    else:
        print("[2] ART not installed (pip install adversarial-robustness-toolbox) — skipped")
    results["eps_sweep"] = r = bench_eps_sweep(args, device)
    print(f"[3] eps sweep ×4 as one group (cascade) {r['cascade_s']:.2f}s vs 4 runs {r['sequential_s']:.2f}s → speed-up "
          f"{r['speedup']:.2f}× (target ≥ 1.5× on CPU)")
    print(f"    every sample attacked: one batch with per-sample eps {r['batched_s']:.2f}s (same batch size) / {r['batched_4x_s']:.2f}s "
          f"(4× batch) vs 4 runs {r['sequential_every_sample_s']:.2f}s → {r['speedup_batched']:.2f}× / {r['speedup_batched_4x']:.2f}×")
    results["step"] = r = bench_step_vs_floor(args, device)
    print(f"[4] one PGD step {r['pgd_step_s'] * 1e3:.1f} ms vs forward+backward {r['fwd_bwd_s'] * 1e3:.1f} ms → {r['step_over_floor']:.2f}× the floor")
    results["peak_rss_mib"] = r = bench_memory(args)
    print("[5] peak RSS vs n_examples: " + ", ".join(f"n={n}: {v:.0f} MiB" for n, v in r.items()))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
