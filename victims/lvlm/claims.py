"""Small "phantom VQA m+n" runs checking the issue's claims on the trained tiny LVLMs.

Claims (QAVA, Zhang et al., NAACL 2025; compressed projectors, arXiv 2506.00534 — both re-implemented unverified):

1. QAVA, which never sees the evaluation questions, lowers the accuracy on them about as much as question-specific
   PGD lowers the accuracy on its own question, and more than question-specific PGD transferred to the other
   questions of the same image.
2. Under the projector-only attack at equal budget, the compressed-projector models (BLIP-2, InstructBLIP) lose more
   accuracy than the uncompressed-projector model (LLaVA).

``python -m robustbench_med.victims.lvlm.claims [--n 48] [--eps 8/255] [--steps 20]`` prints one row per
victim × attack (trained weights are used from the cache, trained first if missing);
``python -m robustbench_med.victims.lvlm.claims --store runs/lvlm/results.sqlite`` reads the claims off a finished
``lvlm`` grid instead (per victim and eps, from the leaderboard's per-question columns). Numbers are reported as
measured; nothing is tuned towards the claims.
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

from robustbench_med.threat import check_budget, parse_eps

ATTACKS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("lvlm_pgd.question", {}),
    ("qava.projector", {"n_questions": 8}),
    ("qava.hidden", {"n_questions": 8}),
    ("qava.hidden", {"n_questions": 8, "pool": "unrelated"}),
    ("qava.lm", {"n_questions": 8}),
    ("projector.projector_only", {}),
    ("projector.whitebox", {}),
    ("projector.transfer", {}),
)
KEYS = ("vqa_accuracy", "vqa_accuracy_first", "vqa_accuracy_others", "first_token_accuracy")


def _label(name: str, params: Any) -> str:
    """An attack's row label: its name, with ``@unrelated`` when its questions come from the unrelated pool."""
    return f"{name}@unrelated" if isinstance(params, dict) and params.get("pool") == "unrelated" else name


def _means(scores: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: round(float(scores[k].float().mean()), 4) for k in KEYS if k in scores}


def run_claims(families: tuple[str, ...] = ("blip2", "instructblip", "llava"), n: int = 48, eps: float = 8 / 255,
               steps: int = 20, seed: int = 0) -> list[dict[str, Any]]:
    """Clean and attacked accuracies (means over ``n`` test images × their evaluation questions) per family."""
    import robustbench_med as rbm

    ds = rbm.create_dataset("phantom.ct", split="test", n=n)
    x, y = ds.images(), ds.targets("vqa")
    rows = []
    for fam in families:
        victim = rbm.create_victim(f"{fam}.tiny", train_if_missing=True)
        rows.append({"victim": victim.card.name, "attack": "clean", **_means(victim.evaluate(x, y))})
        for name, params in ATTACKS:
            start = time.perf_counter()
            attack = rbm.create_attack(name, eps=eps, steps=steps, seed=seed, **params)
            try:
                attack.check_task(victim)
            except rbm.TaskNotSupportedError as e:  # qava.projector on a projector that never reads the question
                rows.append({"victim": victim.card.name, "attack": _label(name, params), "skipped": str(e)})
                continue
            x_adv = attack(victim, x, y)
            if not check_budget(x, x_adv, "Linf", eps).valid:
                raise rbm.BudgetViolationError(f"{name} on {fam} left the threat model")
            rows.append({"victim": victim.card.name, "attack": _label(name, params), **_means(victim.evaluate(x_adv, y)),
                         "seconds": round(time.perf_counter() - start, 1)})
    return rows


def claims_from_store(store: Any) -> list[dict[str, Any]]:
    """The two claims per VQA victim and eps, from a store of the ``lvlm`` grid (identity.none cells):

    ``question_own`` / ``question_others``: question PGD's accuracy on its own (first) question / the other evaluation
    questions; ``qava_projector`` / ``qava_hidden`` / ``qava_lm``: QAVA's accuracy on the (unseen) evaluation questions
    (``qava_hidden_unrelated``: qava.hidden from the unrelated pool, of no evaluated type);
    ``projector_only_drop``: clean − robust accuracy under the projector-only attack.
    """
    from robustbench_med.leaderboard import summarize

    df = summarize(store, fairness_boot=0)
    df = df[(df.task == "vqa") & (df.defense == "identity.none") & (df.status == "done")]
    rows = []
    for (victim, eps), g in df.groupby(["victim", "eps"]):
        by = {_label(a, p if isinstance(p, dict) else json.loads(p) if isinstance(p, str) and p else {}): r
              for a, p, r in zip(g.attack, g.attack_params, g.itertuples())}
        if "lvlm_pgd.question" not in by:
            continue
        q = by["lvlm_pgd.question"]
        row = {"victim": victim, "eps": round(float(eps) * 255, 3), "clean": round(float(q.clean), 4),
               "question_own": round(float(q.robust_vqa_accuracy_first), 4), "question_others": round(float(q.robust_vqa_accuracy_others), 4)}
        for name, key in (("qava.projector", "qava_projector"), ("qava.hidden", "qava_hidden"),
                          ("qava.hidden@unrelated", "qava_hidden_unrelated"), ("qava.lm", "qava_lm")):
            if name in by:
                row[key] = round(float(by[name].robust), 4)
        if "projector.projector_only" in by:
            row["projector_only_drop"] = round(float(by["projector.projector_only"].clean - by["projector.projector_only"].robust), 4)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=48)
    parser.add_argument("--eps", default="8/255")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--families", default="blip2,instructblip,llava")
    parser.add_argument("--store", help="read the claims off a finished lvlm grid store instead of running attacks")
    args = parser.parse_args()
    rows = claims_from_store(args.store) if args.store else run_claims(tuple(args.families.split(",")), args.n, parse_eps(args.eps), args.steps)
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
