"""Two arms, several training seeds each, the same test samples: ``seed_studies.md`` / ``.csv``.

A victim card joins a study with ``extra['study']`` (the study's name), ``extra['arm']`` (which side it is on) and
``extra['training_seed']``: the 3D projector study (:mod:`robustbench_med.victims.vlm3d`) has arms ``compressed`` and
``uncompressed`` with training seeds 0, 1 and 2. A single pair of trained models says what those two models do; a
claim about the *arms* has to be above the spread between training seeds. For every study with exactly two arms in a
store, every defence and every condition all its victims share (the clean pass, each attack × eps), the table gives:

- each seed's mean primary score over the samples every victim of the study has, each arm's mean over its seeds and
  its **seed range** (largest − smallest seed);
- ``Δ = arm A − arm B`` (arms in sorted order) of the arms' means, and the same for the **drop** (clean − condition);
- a 95% interval from a two-level percentile bootstrap (Davison & Hinkley, *Bootstrap Methods and their Application*,
  1997, §3.8): each of 2,000 resamples draws the test samples with replacement (the same draw for every victim: the
  samples are paired) and, independently in each arm, the training seeds with replacement; so the interval covers both
  the test samples and the training runs;
- a verdict: ``<arm> higher`` when the interval of Δ excludes 0, else ``no difference shown``; with fewer than 3 seeds
  in an arm, ``too few seeds`` (the seed resampling would be degenerate).

Three seeds give a coarse view of the between-run spread; the interval is wide by design rather than falsely narrow.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from robustbench_med.paired_metrics import CLEAN, condition_scores, write_study_table
from robustbench_med.registry import VICTIMS

N_BOOT = 2000
MIN_SEEDS = 3


def study_membership(victim: str) -> tuple[str, str, int] | None:
    """(study, arm, training seed) a registered victim's card declares, else None."""
    if victim not in VICTIMS:
        return None
    card = VICTIMS.get(victim).meta.get("card")
    extra = card.extra if card is not None else {}
    if "study" not in extra or "arm" not in extra:
        return None
    return str(extra["study"]), str(extra["arm"]), int(extra.get("training_seed", 0))


def _bootstrap(a: np.ndarray, b: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Δ of the arms' means under ``n_boot`` resamples of samples (shared) and of each arm's seeds; ``a`` / ``b`` are
    [seeds, samples]."""
    n = a.shape[1]
    out = np.empty(n_boot)
    for k in range(n_boot):
        cols = rng.integers(0, n, n)
        ra = a[rng.integers(0, len(a), len(a))][:, cols].mean()
        rb = b[rng.integers(0, len(b), len(b))][:, cols].mean()
        out[k] = ra - rb
    return out


def _arm_rows(study: str, defense: str, arms: dict[str, dict[int, pd.DataFrame]], n_boot: int,
              seed: int) -> list[dict[str, Any]]:
    """The rows of one study × defence (module docstring); each row's resamples are seeded by ``seed`` and the row's
    own key, so an interval does not depend on the other rows in the store or their order."""
    import zlib

    (name_a, seeds_a), (name_b, seeds_b) = sorted(arms.items())
    frames = [f for seeds in (seeds_a, seeds_b) for f in seeds.values()]
    conditions = [c for c in frames[0].columns if all(c in f.columns for f in frames)]
    samples = frames[0].index
    for f in frames[1:]:
        samples = samples.intersection(f.index)
    rows = []
    for condition in conditions:
        def matrix(seeds: dict[int, pd.DataFrame], col: str) -> np.ndarray:
            return np.stack([seeds[s].loc[samples, col].to_numpy(float) for s in sorted(seeds)])

        a, b = matrix(seeds_a, condition), matrix(seeds_b, condition)
        if np.isnan(a).any() or np.isnan(b).any() or not len(samples):
            continue
        rng = np.random.default_rng([seed, zlib.crc32(f"{study}|{defense}|{condition}".encode())])
        delta = _bootstrap(a, b, n_boot, rng)
        lo, hi = np.percentile(delta, [2.5, 97.5])
        row = {"study": study, "defense": defense, "condition": condition, "n": len(samples),
               "arm_a": name_a, "arm_b": name_b, "seeds_a": len(a), "seeds_b": len(b),
               "per_seed_a": "/".join(f"{v:.3f}" for v in a.mean(1)), "per_seed_b": "/".join(f"{v:.3f}" for v in b.mean(1)),
               "mean_a": float(a.mean()), "mean_b": float(b.mean()),
               "seed_range_a": float(np.ptp(a.mean(1))), "seed_range_b": float(np.ptp(b.mean(1))),
               "delta": float(a.mean() - b.mean()), "ci95_low": float(lo), "ci95_high": float(hi)}
        if condition != CLEAN:
            da, db = matrix(seeds_a, CLEAN) - a, matrix(seeds_b, CLEAN) - b
            dlo, dhi = np.percentile(_bootstrap(da, db, n_boot, rng), [2.5, 97.5])
            row.update(drop_delta=float(da.mean() - db.mean()), drop_ci95_low=float(dlo), drop_ci95_high=float(dhi))
        few = min(len(a), len(b)) < MIN_SEEDS
        row["verdict"] = ("too few seeds" if few else f"{name_a} higher" if lo > 0 else f"{name_b} higher" if hi < 0
                          else "no difference shown")
        rows.append(row)
    return rows


def seed_study_table(store: Any, n_boot: int = N_BOOT, seed: int = 0) -> pd.DataFrame:
    """One row per study × defence × shared condition for every two-arm study in ``store`` (module docstring)."""
    scores = condition_scores(store)
    studies: dict[tuple[str, str], dict[str, dict[int, pd.DataFrame]]] = {}
    for (victim, defense), wide in scores.items():
        member = study_membership(victim)
        if member is not None:
            study, arm, training_seed = member
            studies.setdefault((study, defense), {}).setdefault(arm, {})[training_seed] = wide
    rows = []
    for (study, defense), arms in studies.items():
        if len(arms) == 2 and CLEAN in next(iter(next(iter(arms.values())).values())).columns:
            rows += _arm_rows(study, defense, arms, n_boot, seed)
    return pd.DataFrame(rows)


def _fmt_drop(r: Any) -> str:
    if pd.isna(getattr(r, "drop_delta", np.nan)):
        return "—"
    return f"{r.drop_delta:+.3f} [{r.drop_ci95_low:+.3f}, {r.drop_ci95_high:+.3f}]"


def to_markdown(table: pd.DataFrame) -> str:
    lines = ["# Arms across training seeds (same samples)", "",
             "Per-seed and mean primary score of each arm; Δ = arm A − arm B of the means, and of the drop (clean − "
             "condition); 95% two-level bootstrap intervals over test samples and training seeds.", "",
             "| study | defence | condition | n | arm A | seeds (A) | A | range | arm B | seeds (B) | B | range | Δ | 95% CI "
             "| Δ drop [95% CI] | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r.study} | {r.defense} | {r.condition} | {r.n} | {r.arm_a} | {r.per_seed_a} | {r.mean_a:.3f} | "
              f"{r.seed_range_a:.3f} | {r.arm_b} | {r.per_seed_b} | {r.mean_b:.3f} | {r.seed_range_b:.3f} | "
              f"{r.delta:+.3f} | [{r.ci95_low:+.3f}, {r.ci95_high:+.3f}] | {_fmt_drop(r)} | {r.verdict} |"
              for r in table.itertuples()]
    return "\n".join(lines) + "\n"


def write_seed_study_tables(store: Any, out_dir: str | Path) -> dict[str, Path]:
    """Write ``seed_studies.md`` / ``seed_studies.csv`` when the store holds a two-arm study."""
    return write_study_table(seed_study_table(store), to_markdown, out_dir, "seed_studies")
