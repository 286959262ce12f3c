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

With more than two arms, a card may name the study's **reference arm** (``extra['reference_arm']``; the 2D projector
study, :mod:`robustbench_med.victims.lvlm.projector_study`, compares its three compressed arms with the per-patch MLP):
each other arm is then arm A against it as arm B. When an attack ran with several **attack seeds** (cells that differ
only in the attack's ``seed`` parameter, :func:`~robustbench_med.paired_metrics.condition_scores`), a victim's score
is its mean over them, the bootstrap adds a third level (within each drawn training seed, the attack seeds with
replacement), and a second table gives each arm's largest attack-seed range. The verdict names the drop too
(``; drop: <arm> loses more``) when the interval of Δ drop excludes 0.

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


def _extra(victim: str) -> dict[str, Any]:
    if victim not in VICTIMS:
        return {}
    card = VICTIMS.get(victim).meta.get("card")
    return card.extra if card is not None else {}


def study_membership(victim: str) -> tuple[str, str, int] | None:
    """(study, arm, training seed) a registered victim's card declares, else None."""
    extra = _extra(victim)
    if "study" not in extra or "arm" not in extra:
        return None
    return str(extra["study"]), str(extra["arm"]), int(extra.get("training_seed", 0))


def arm_pairs(arms: list[str], reference: str | None) -> list[tuple[str, str]]:
    """(arm A, arm B) comparisons of a study: the two arms in sorted order, or each arm against ``reference``."""
    if reference is not None and reference in arms and len(arms) > 2:
        return [(a, reference) for a in sorted(arms) if a != reference]
    return [tuple(sorted(arms))] if len(arms) == 2 else []  # type: ignore[list-item]


def bootstrap_delta(a: np.ndarray, b: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Δ of the arms' means under ``n_boot`` resamples of samples (shared) and of each arm's seeds; ``a`` / ``b`` are
    [seeds, samples], or [seeds, attack seeds, samples] (then each drawn seed also draws its attack seeds)."""
    n = a.shape[-1]
    out = np.empty(n_boot)
    for k in range(n_boot):
        cols = rng.integers(0, n, n)
        out[k] = _draw(a, cols, rng) - _draw(b, cols, rng)
    return out


def _draw(m: np.ndarray, cols: np.ndarray, rng: np.random.Generator) -> float:
    rows = m[rng.integers(0, len(m), len(m))]
    if m.ndim == 3:
        rows = rows[np.arange(len(rows))[:, None], rng.integers(0, m.shape[1], (len(rows), m.shape[1]))]
    return float(rows[..., cols].mean())


def _matrix(seeds: dict[int, pd.DataFrame], samples: pd.Index, col: str) -> np.ndarray:
    """Scores [seeds, samples], or [seeds, attack seeds, samples] when every victim ran ``col`` with the same number
    (> 1) of attack seeds."""
    per_attack = [f.attrs.get("attack_seeds", {}).get(col) for f in (seeds[s] for s in sorted(seeds))]
    if all(p is not None for p in per_attack) and len({p.shape[1] for p in per_attack}) == 1:
        return np.stack([p.loc[samples].to_numpy(float).T for p in per_attack])
    return np.stack([seeds[s].loc[samples, col].to_numpy(float) for s in sorted(seeds)])


def _per_seed(m: np.ndarray) -> np.ndarray:
    return m.reshape(len(m), -1).mean(1)


def _attack_seed_range(m: np.ndarray) -> float:
    """The largest range of a training seed's mean score over its attack seeds (0 without attack seeds)."""
    return float(np.ptp(m.mean(-1), axis=1).max()) if m.ndim == 3 else 0.0


def _arm_rows(study: str, defense: str, arm_a: tuple[str, dict[int, pd.DataFrame]], arm_b: tuple[str, dict[int, pd.DataFrame]],
              n_boot: int, seed: int, paired_key: bool = False) -> list[dict[str, Any]]:
    """The rows of arm A vs arm B in one study × defence (module docstring); each row's resamples are seeded by
    ``seed`` and the row's own key, so an interval does not depend on the other rows in the store or their order."""
    import zlib

    (name_a, seeds_a), (name_b, seeds_b) = arm_a, arm_b
    frames = [f for seeds in (seeds_a, seeds_b) for f in seeds.values()]
    conditions = [c for c in frames[0].columns if all(c in f.columns for f in frames)]
    samples = frames[0].index
    for f in frames[1:]:
        samples = samples.intersection(f.index)
    rows = []
    for condition in conditions:
        a, b = _matrix(seeds_a, samples, condition), _matrix(seeds_b, samples, condition)
        if np.isnan(a).any() or np.isnan(b).any() or not len(samples):
            continue
        key = f"{study}|{defense}|{condition}" + (f"|{name_a}|{name_b}" if paired_key else "")
        rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
        delta = bootstrap_delta(a, b, n_boot, rng)
        lo, hi = np.percentile(delta, [2.5, 97.5])
        row = {"study": study, "defense": defense, "condition": condition, "n": len(samples),
               "arm_a": name_a, "arm_b": name_b, "seeds_a": len(a), "seeds_b": len(b),
               "per_seed_a": "/".join(f"{v:.3f}" for v in _per_seed(a)), "per_seed_b": "/".join(f"{v:.3f}" for v in _per_seed(b)),
               "mean_a": float(a.mean()), "mean_b": float(b.mean()),
               "seed_range_a": float(np.ptp(_per_seed(a))), "seed_range_b": float(np.ptp(_per_seed(b))),
               "delta": float(a.mean() - b.mean()), "ci95_low": float(lo), "ci95_high": float(hi)}
        drop_note = ""
        if condition != CLEAN:
            da = _matrix(seeds_a, samples, CLEAN)[(slice(None),) + (None,) * (a.ndim - 2)] - a
            db = _matrix(seeds_b, samples, CLEAN)[(slice(None),) + (None,) * (b.ndim - 2)] - b
            dlo, dhi = np.percentile(bootstrap_delta(da, db, n_boot, rng), [2.5, 97.5])
            row.update(drop_delta=float(da.mean() - db.mean()), drop_ci95_low=float(dlo), drop_ci95_high=float(dhi))
            drop_note = f"; drop: {name_a} loses more" if dlo > 0 else f"; drop: {name_b} loses more" if dhi < 0 else ""
        if a.ndim == 3 or b.ndim == 3:
            row.update(attack_seeds=max(a.shape[1] if a.ndim == 3 else 1, b.shape[1] if b.ndim == 3 else 1),
                       attack_seed_range_a=_attack_seed_range(a), attack_seed_range_b=_attack_seed_range(b))
        few = min(len(a), len(b)) < MIN_SEEDS
        row["verdict"] = ("too few seeds" if few else (f"{name_a} higher" if lo > 0 else f"{name_b} higher" if hi < 0
                                                       else "no difference shown") + drop_note)
        rows.append(row)
    return rows


def seed_study_table(store: Any, n_boot: int = N_BOOT, seed: int = 0) -> pd.DataFrame:
    """One row per study × defence × arm pair × shared condition for every study in ``store`` (module docstring)."""
    scores = condition_scores(store)
    studies: dict[tuple[str, str], dict[str, dict[int, pd.DataFrame]]] = {}
    references: dict[str, str] = {}
    for (victim, defense), wide in scores.items():
        member = study_membership(victim)
        if member is not None:
            study, arm, training_seed = member
            studies.setdefault((study, defense), {}).setdefault(arm, {})[training_seed] = wide
            if "reference_arm" in _extra(victim):
                references[study] = str(_extra(victim)["reference_arm"])
    rows = []
    for (study, defense), arms in studies.items():
        if CLEAN not in next(iter(next(iter(arms.values())).values())).columns:
            continue
        pairs = arm_pairs(list(arms), references.get(study))
        for name_a, name_b in pairs:
            rows += _arm_rows(study, defense, (name_a, arms[name_a]), (name_b, arms[name_b]), n_boot, seed,
                              paired_key=len(arms) > 2)
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
    if "attack_seeds" in table.columns:
        seeded = table[table.attack_seeds.notna()]
        lines += ["", "## Attack seeds", "",
                  "Conditions run with several attack seeds: a victim's score is its mean over them, and the intervals "
                  "above also resample them (three levels). Range: the largest spread of one training seed's mean score "
                  "over its attack seeds.", "",
                  "| study | defence | condition | attack seeds | arm A | range (A) | arm B | range (B) |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r.study} | {r.defense} | {r.condition} | {int(r.attack_seeds)} | {r.arm_a} | "
                  f"{r.attack_seed_range_a:.3f} | {r.arm_b} | {r.attack_seed_range_b:.3f} |" for r in seeded.itertuples()]
    return "\n".join(lines) + "\n"


def write_seed_study_tables(store: Any, out_dir: str | Path) -> dict[str, Path]:
    """Write ``seed_studies.md`` / ``seed_studies.csv`` when the store holds a study."""
    return write_study_table(seed_study_table(store), to_markdown, out_dir, "seed_studies")
