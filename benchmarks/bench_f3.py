"""Cost of F3 purification (Zhang et al., ACM MM 2025) relative to one clean answer generation.

    python benchmarks/bench_f3.py [--victims blip2.tiny llava.tiny] [--n 16] [--repeats 5] [--weights auto|none]
                                  [--device cpu|cuda]

For each victim and F3 setting, per image: the purification time (reference pass + attention pass + backward, read
from one eager forward pass each, never through ``generate``) and the time of one greedy answer to one question
(``generate_answers``, ``max_new_tokens`` of the victim), and their ratio. The LM forward passes per purification are
counted with a hook (expected: steps + 1). Medians over ``--repeats``; CPU timings on shared machines are noisy.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

from robustbench_med import create_dataset, create_victim  # noqa: E402
from robustbench_med.api import create_defense  # noqa: E402
from robustbench_med.defenses.f3 import F3Purifier  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def count_lm_forwards(purifier: F3Purifier, x: torch.Tensor) -> int:
    core = purifier.core
    lm = core.model.model.language_model if core.family == "llava" else core.model.language_model
    calls = []
    hook = lm.register_forward_hook(lambda *_: calls.append(1))
    try:
        purifier.purify(x)
    finally:
        hook.remove()
    return len(calls)


def bench_victim(name: str, weights: str | None, x: torch.Tensor, y: torch.Tensor, repeats: int, device: torch.device) -> list[dict]:
    victim = create_victim(name, weights=weights, device=device)
    x, y = x.to(device), y.to(device)
    q = victim.evaluation_questions(y)[:, :1]
    t_gen = median_time(lambda: victim.generate_answers(x, q), repeats, device) / len(x)
    settings = [dict(variant="v3", source="lm"), dict(variant="v2", source="lm")]
    if victim.family != "llava":
        settings.append(dict(variant="v3", source="qformer"))
    rows = []
    for s in settings:
        for questions in ([0], "types"):
            f3 = create_defense(f"f3.{s['variant']}", source=s["source"], questions=questions)
            f3.bind(victim)
            t = median_time(lambda: f3.purify(x), repeats, device) / len(x)
            rows.append({"victim": name, **s, "questions": len(f3.question_ids), "purify_ms": 1e3 * t,
                         "generate_ms": 1e3 * t_gen, "ratio": t / t_gen, "lm_forwards": count_lm_forwards(f3, x)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--victims", nargs="+", default=["blip2.tiny", "llava.tiny"])
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--weights", default="auto", help="'auto' (trained, cached) or 'none' (random init)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = ap.parse_args()
    device = torch.device(args.device)
    weights = None if args.weights == "none" else args.weights
    ds = create_dataset("phantom.ct", split="test")
    idx = list(range(args.n))
    x = ds.images(idx)
    y = ds.targets("vqa", idx)
    rows = [r for v in args.victims for r in bench_victim(v, weights, x, y, args.repeats, device)]
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"F3 cost per image, n={args.n}, repeats={args.repeats}, device={device}, weights={args.weights}, "
          f"threads={torch.get_num_threads()}")
    print(f"{'victim':<18}{'variant':<8}{'source':<9}{'#q':>4}{'purify ms':>11}{'answer ms':>11}{'ratio':>8}{'LM fwd':>8}")
    for r in rows:
        print(f"{r['victim']:<18}{r['variant']:<8}{r['source']:<9}{r['questions']:>4}{r['purify_ms']:>11.2f}"
              f"{r['generate_ms']:>11.2f}{r['ratio']:>8.2f}{r['lm_forwards']:>8}")


if __name__ == "__main__":
    main()
