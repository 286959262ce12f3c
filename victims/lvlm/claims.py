"""Small "phantom VQA m+n" runs checking the issue's claims on the trained tiny LVLMs.

Claims (QAVA, Zhang et al., NAACL 2025; compressed projectors, arXiv 2506.00534 — both re-implemented unverified):

1. QAVA, which never sees the evaluation questions, lowers the accuracy on them about as much as question-specific
   PGD lowers the accuracy on its own question, and more than question-specific PGD transferred to the other
   questions of the same image.
2. Under the projector-only attack at equal budget, the compressed-projector models (BLIP-2, InstructBLIP) lose more
   accuracy than the uncompressed-projector model (LLaVA).

``python -m robustbench_med.victims.lvlm.claims [--n 48] [--eps 8/255] [--steps 20]`` prints one row per
victim × attack (trained weights are used from the cache, trained first if missing);
``python -m robustbench_med.victims.lvlm.claims --store runs/projector_study/results.sqlite runs/lvlm/results.sqlite``
prints every claim finished grid stores can check, one line each with Δ, its 95% interval, the samples × training
seeds × attack seeds behind it and a verdict (:func:`claims_with_ci`): the compressed-vs-uncompressed projector
claim at every knowledge level from the seeded projector study (``projector_study`` grid; the 3D one in ``volumes``),
QAVA vs question-specific PGD and unrelated- vs known-type QAVA (``qava_study`` over seeds, ``lvlm`` per victim), F3's
recovery (``f3_study`` over seeds, ``f3`` per victim); a seed-study arm's training seeds are pooled. A difference is
called a *finding* only when its interval excludes 0 and it rests on ≥ 3 training seeds × ≥ 3 attack seeds; with
fewer, the verdict says what these trained models and attack runs did and that it is not a finding. ``--table``
prints the older per-victim accuracy rows of an ``lvlm`` store instead. Numbers are reported as measured; nothing
is tuned towards the claims.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from typing import Any

import pandas as pd
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
    from robustbench_med.leaderboard import summary_wide

    df = summary_wide(store, fairness_boot=0)
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


# ------------------------------------------------------------------------------------- claims with intervals
CLEAN = "clean"
MIN_SEEDS = 3  # training seeds and attack seeds a comparison needs before its verdict can be a finding


@dataclass(frozen=True)
class Claim:
    """One claim checked on a store: the estimate Δ, its 95% interval, the seeds behind it and the verdict."""

    claim: str
    where: str
    condition: str
    delta: float
    ci95_low: float
    ci95_high: float
    n: int
    training_seeds: int
    attack_seeds: int
    verdict: str

    def line(self) -> str:
        return (f"{self.claim} | {self.where} | {self.condition} | Δ {self.delta:+.3f} [{self.ci95_low:+.3f}, "
                f"{self.ci95_high:+.3f}] | n {self.n} × {self.training_seeds} training × "
                f"{f'{self.attack_seeds} attack seeds' if self.attack_seeds else 'no attack'} | "
                f"{self.verdict}")


def verdict(lo: float, hi: float, above: str, below: str, training_seeds: int, attack_seeds: int) -> str:
    """``above`` / ``below`` when the interval excludes 0, else ``no difference shown``; below ``MIN_SEEDS`` training
    or attack seeds (``attack_seeds=0``: a clean comparison, no attack) the comparison describes the trained models
    and attack runs, and is not called a finding."""
    call = above if lo > 0 else below if hi < 0 else "no difference shown"
    if training_seeds < MIN_SEEDS or 0 < attack_seeds < MIN_SEEDS:  # 0 attack seeds: a clean comparison
        return f"{call} (not a finding: {training_seeds} training × {attack_seeds} attack seeds, needs ≥ {MIN_SEEDS} × {MIN_SEEDS})"
    return f"finding: {call}" if call != "no difference shown" else call


def projector_claims(store: Any) -> list[Claim]:
    """Compressed vs uncompressed projector at every knowledge level, from the store's seed studies
    (:mod:`robustbench_med.seed_studies`): Δ drop = drop of the compressed arm − drop of the uncompressed one, with
    the two- or three-level bootstrap interval over test samples, training seeds and attack seeds."""
    from robustbench_med.seed_studies import seed_study_table

    table = seed_study_table(store)
    out = []
    for r in table.itertuples() if len(table) else []:
        if r.condition == "clean" or pd.isna(getattr(r, "drop_delta", float("nan"))):
            continue
        attack_seeds = int(r.attack_seeds) if not pd.isna(getattr(r, "attack_seeds", float("nan"))) else 1
        seeds = min(r.seeds_a, r.seeds_b)
        out.append(Claim(f"{r.arm_a} loses more than {r.arm_b}", r.study, r.condition, r.drop_delta, r.drop_ci95_low,
                         r.drop_ci95_high, r.n, seeds, attack_seeds,
                         verdict(r.drop_ci95_low, r.drop_ci95_high, f"{r.arm_a} loses more", f"{r.arm_b} loses more", seeds, attack_seeds)))
    return out


def _route(defense: str, params: Any, through: str) -> str:
    """``defense[k=v,…][attack_through]``, naming only the parameters that differ from the defence's defaults."""
    from robustbench_med.api import create_defense
    from robustbench_med.errors import RobustBenchMedError

    given = json.loads(params) if isinstance(params, str) and params else (params or {})
    try:
        defaults = create_defense(defense).params()
    except RobustBenchMedError:  # a defence this installation does not know: name every recorded parameter
        defaults = {}
    differ = ",".join(f"{k}={v}" for k, v in sorted(given.items()) if defaults.get(k) != v)
    return f"{defense}{f'[{differ}]' if differ else ''}[{through}]"


def metric_frames(store: Any, metric: str) -> dict[tuple[str, str], tuple[pd.DataFrame, dict[str, int]]]:
    """Per (victim, defence incl. its parameters and attack route): per-sample ``metric`` after each condition
    (samples × condition labels of :func:`~robustbench_med.paired_metrics.condition_scores`, attack seeds averaged),
    and the number of attack seeds behind each condition; computed once per metric and version of an open store."""
    from robustbench_med.store import Store

    if isinstance(store, Store):
        return store.memo(f"metric_frames:{metric}", lambda: _metric_frames(store, metric))
    return _metric_frames(store, metric)


def _metric_frames(store: Any, metric: str) -> dict[tuple[str, str], tuple[pd.DataFrame, dict[str, int]]]:
    from robustbench_med.results import store_frames
    from robustbench_med.paired_metrics import condition_labels

    cells, samples, _ = store_frames(store)
    if cells.empty or samples.empty:
        return {}
    done = cells[cells.status == "done"].copy()
    done["route"] = [_route(d, p, t) for d, p, t in zip(done.defense, done.defense_params, done.attack_through)]
    by_cell = dict(tuple(samples.groupby("cell_id", sort=False)))
    out = {}
    for (victim, route), group in done.groupby(["victim", "route"], sort=False):
        labels = condition_labels(group)
        per: dict[str, dict[Any, pd.Series]] = {}
        for c in group.itertuples():
            rows = by_cell.get(c.cell_id)
            if rows is None:
                continue
            decoded = [json.loads(m) if isinstance(m, str) else {} for m in rows.metrics]
            if any(d.get(metric) is None for d in decoded):
                continue
            label, seed = labels[c.cell_id]
            per.setdefault(label, {})[seed] = pd.Series([d[metric] for d in decoded], index=rows.sample_idx.to_numpy(), dtype=float)
            # the pair's clean pass (computed once per victim × route): the row's clean score for the primary metric
            clean = (rows.clean_score.to_numpy(float) if metric == c.metric
                     else [d[f"clean_{metric}"] for d in decoded] if all(f"clean_{metric}" in d for d in decoded) else None)
            if clean is not None:
                per.setdefault(CLEAN, {})[None] = pd.Series(clean, index=rows.sample_idx.to_numpy(), dtype=float)
        if per:
            out[(victim, route)] = (pd.DataFrame({k: pd.DataFrame(v).mean(axis=1) for k, v in per.items()}),
                                    {k: 0 if k == CLEAN else len(v) for k, v in per.items()})
    return out


def _paired(a: pd.Series, b: pd.Series, key: str, n_boot: int = 2000) -> tuple[float, float, float, int]:
    """Δ = mean(a − b) over the samples both have, and its paired percentile-bootstrap 95% interval."""
    import zlib

    import numpy as np

    from robustbench_med.paired_metrics import paired_interval

    common = a.dropna().index.intersection(b.dropna().index)
    diff = (a.loc[common] - b.loc[common]).to_numpy(float)
    if not len(diff):
        return float("nan"), float("nan"), float("nan"), 0
    lo, hi = paired_interval(diff, n_boot, np.random.default_rng([0, zlib.crc32(key.encode())]))
    return float(diff.mean()), lo, hi, len(diff)


def _claim(text: str, where: str, condition: str, a: pd.Series, b: pd.Series, seeds: int, above: str, below: str) -> Claim | None:
    delta, lo, hi, n = _paired(a, b, f"{text}|{where}|{condition}")
    if not n:
        return None
    return Claim(text, where, condition, delta, lo, hi, n, 1, seeds, verdict(lo, hi, above, below, 1, seeds))


def _seeded_claim(text: str, where: str, condition: str, pairs: list[tuple[pd.Series, pd.Series]], seeds: int,
                  above: str, below: str, n_boot: int = 2000) -> Claim | None:
    """One claim over several training seeds of one arm: Δ = mean(a − b) per sample and seed, its interval from the
    two-level bootstrap of :mod:`robustbench_med.seed_studies` (test samples shared, training seeds resampled)."""
    import zlib

    import numpy as np

    from robustbench_med.seed_studies import bootstrap_delta

    if len(pairs) == 1:
        return _claim(text, where, condition, *pairs[0], seeds, above, below)
    common = pairs[0][0].index
    for a, b in pairs:
        common = common.intersection(a.dropna().index).intersection(b.dropna().index)
    if not len(common):
        return None
    diff = np.stack([(a.loc[common] - b.loc[common]).to_numpy(float) for a, b in pairs])
    rng = np.random.default_rng([0, zlib.crc32(f"{text}|{where}|{condition}".encode())])
    lo, hi = np.percentile(bootstrap_delta(diff, np.zeros_like(diff), n_boot, rng), [2.5, 97.5])
    return Claim(text, where, condition, float(diff.mean()), float(lo), float(hi), len(common), len(pairs), seeds,
                 verdict(lo, hi, above, below, len(pairs), seeds))


def _arm_of(victim: str) -> str:
    """``study/arm`` for a victim whose card joins a seed study (its training seeds are pooled), else the victim."""
    from robustbench_med.seed_studies import study_membership

    member = study_membership(victim)
    return f"{member[0]}/{member[1]}" if member else victim


class _Pooled:
    """Claims gathered per (claim, seed-study arm or victim, condition): each training seed adds one (a, b) pair."""

    def __init__(self) -> None:
        self.groups: dict[tuple[str, str, str, str, str], tuple[list[tuple[pd.Series, pd.Series]], list[int]]] = {}

    def add(self, text: str, where: str, condition: str, a: pd.Series, b: pd.Series, seeds: int, above: str, below: str) -> None:
        pairs, counts = self.groups.setdefault((text, where, condition, above, below), ([], []))
        pairs.append((a, b))
        counts.append(seeds)

    def claims(self) -> list[Claim]:
        out = [_seeded_claim(text, where, cond, pairs, min(counts), above, below)
               for (text, where, cond, above, below), (pairs, counts) in self.groups.items()]
        return [c for c in out if c is not None]


def qava_claims(store: Any) -> list[Claim]:
    """Per undefended VQA victim (or seed-study arm, its training seeds pooled) and eps; paired over test images:

    * QAVA (``qava.lm``, questions of the evaluated types, other phrasings) on the unseen evaluation questions vs
      question-specific PGD (``lvlm_pgd.question``) on its own question: Δ = accuracy under QAVA − under PGD;
    * QAVA from unrelated questions (``qava.hidden`` with ``pool: unrelated``) vs from the evaluated types
      (``qava.hidden``): Δ = accuracy(unrelated) − accuracy(known types).

    Attack seeds are averaged per image; an arm with several training seeds gets the two-level interval.
    """
    primary, first = metric_frames(store, "vqa_accuracy"), metric_frames(store, "vqa_accuracy_first")
    pooled = _Pooled()
    for (victim, route), (frame, seeds) in primary.items():
        if not route.startswith("identity.none"):
            continue
        own, own_seeds = first.get((victim, route), (pd.DataFrame(), {}))
        for col in [c for c in frame.columns if c != CLEAN]:
            attack, eps = col.rsplit(" ", 1)
            pgd = f"lvlm_pgd.question {eps}"
            if attack == "qava.lm" and pgd in own.columns:
                pooled.add("QAVA (known types) as strong as PGD on its own question", _arm_of(victim), eps, frame[col],
                           own[pgd], min(seeds[col], own_seeds[pgd]), "QAVA weaker", "QAVA stronger")
            if attack.startswith("qava.hidden[") and "pool=unrelated" in attack:
                known = next((c for c in frame.columns if c.startswith("qava.hidden[") and c.endswith(f" {eps}") and c != col), None)
                if known is not None:
                    pooled.add("QAVA from unrelated questions as strong as from the evaluated types", _arm_of(victim), eps,
                               frame[col], frame[known], min(seeds[col], seeds[known]), "unrelated weaker", "unrelated stronger")
    return pooled.claims()


def f3_claims(store: Any) -> list[Claim]:
    """F3's recovery per victim (or seed-study arm, its training seeds pooled) × F3 setting and attack route
    (non-adaptive ``[transfer]``, ``[adaptive]`` BPDA + EOT) × attack: Δ = accuracy with F3 − without on the same
    test images (the undefended row of the same attack), paired; attack seeds averaged per image."""
    frames, pooled = metric_frames(store, "vqa_accuracy"), _Pooled()
    for (victim, route), (frame, seeds) in frames.items():
        base = frames.get((victim, "identity.none[adaptive]"))
        if not route.startswith("f3.") or base is None:
            continue
        for col in [c for c in frame.columns if c in base[0].columns]:
            pooled.add("F3 recovers accuracy", f"{_arm_of(victim)} {route}", col, frame[col], base[0][col],
                       min(seeds[col], base[1][col]), "F3 recovers", "F3 hurts")
    return pooled.claims()


def claims_with_ci(store: Any) -> list[Claim]:
    """Every claim the store (a :class:`~robustbench_med.store.Store` or a path, opened once) can check (projector
    study, QAVA, F3), each with its interval and verdict."""
    from robustbench_med.store import Store

    if not isinstance(store, Store):
        with Store(store) as st:
            return claims_with_ci(st)
    return projector_claims(store) + qava_claims(store) + f3_claims(store)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=48)
    parser.add_argument("--eps", default="8/255")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--families", default="blip2,instructblip,llava")
    parser.add_argument("--store", nargs="+", help="print every claim these grid stores can check, with its 95%% interval and verdict")
    parser.add_argument("--table", action="store_true", help="with --store: the per-victim accuracy rows instead")
    args = parser.parse_args()
    if args.store:
        for path in args.store:
            if args.table:
                for row in claims_from_store(path):
                    print(json.dumps(row))
                continue
            for claim in claims_with_ci(path):
                print(claim.line())
        return
    for row in run_claims(tuple(args.families.split(",")), args.n, parse_eps(args.eps), args.steps):
        print(json.dumps(row))


if __name__ == "__main__":
    main()
