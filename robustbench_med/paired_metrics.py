"""Each victim against its declared baseline, on the same samples: ``baselines.md`` / ``.csv``.

A victim card may name a **baseline** (``extra['baseline']``): the same architecture and recipe without the one thing
the victim adds — ``unet3d.meanteacher`` → ``unet3d.fewlabels`` (the unlabelled volumes), ``hyspark.phantom`` →
``hybrid3d.scratch`` (masked pre-training), ``unet.styleaug`` → ``unet.phantom`` (style augmentation). When a store
holds both with the same defence, every condition they share (the clean pass, and each attack × eps) gets
``Δ = victim − baseline`` of the mean primary score over the samples both have, a **paired** percentile-bootstrap
95% interval (2,000 resamples of the samples, seeded; :func:`robustbench_med.gate.resample_indices`) and a verdict:
``better`` / ``worse`` when the interval excludes 0, else ``no difference shown``. The interval covers test samples,
not training runs: with one training seed per victim it says what this pair of trained models does.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from robustbench_med.registry import VICTIMS
from robustbench_med.threat import eps_display

N_BOOT = 2000
CLEAN = "clean"


def declared_baseline(victim: str) -> str | None:
    """The baseline a registered victim's card names (``extra['baseline']``), else None."""
    if victim not in VICTIMS:
        return None
    card = VICTIMS.get(victim).meta.get("card")
    return card.extra.get("baseline") if card is not None else None


def condition_scores(store: Any) -> dict[tuple[str, str], pd.DataFrame]:
    """Per (victim, defence): a frame indexed by sample with one column per condition (``clean``, ``<attack> <eps>``);
    computed once per version of an open store (read-only frames: callers must not modify them). A defence attacked
    through another route than ``adaptive`` is its own defence here (``f3.v3[transfer]``).

    Cells of one attack × eps that differ only in the attack's ``seed`` parameter are **attack seeds** of one
    condition: the column holds each sample's mean over them, and ``frame.attrs['attack_seeds'][condition]`` the
    per-seed scores (samples × seeds). Cells that differ in another parameter get it in their label
    (``qava.hidden[pool=unrelated] 8/255``), so no condition overwrites another."""
    from robustbench_med.store import Store

    if isinstance(store, Store):
        return store.memo("condition_scores", lambda: _condition_scores(store))
    return _condition_scores(store)


def _params(raw: Any) -> dict[str, Any]:
    value = json.loads(raw) if isinstance(raw, str) and raw else raw
    return {k: v for k, v in (value or {}).items() if k not in ("eps", "seed")}


def condition_labels(cells: pd.DataFrame) -> dict[str, tuple[str, Any]]:
    """``cell_id`` → (condition label, attack seed) for the cells of one (victim, defence)."""
    base: dict[str, tuple[str, dict[str, Any], Any]] = {}
    for c in cells.itertuples():
        threat = json.loads(c.threat)
        raw = json.loads(c.attack_params) if isinstance(c.attack_params, str) and c.attack_params else {}
        base[c.cell_id] = (f"{c.attack} {eps_display(threat['eps'], threat.get('norm'))}", _params(raw), (raw or {}).get("seed"))
    variants: dict[str, list[dict[str, Any]]] = {}
    for label, params, _ in base.values():
        if params not in variants.setdefault(label, []):
            variants[label].append(params)
    out = {}
    for cell_id, (label, params, seed) in base.items():
        if len(variants[label]) > 1:  # the same attack × eps with other parameters: name what differs
            differ = sorted(k for k in set().union(*variants[label]) if any(v.get(k) != params.get(k) for v in variants[label]))
            tag = ",".join(f"{k}={params.get(k)}" for k in differ)
            attack, eps = label.rsplit(" ", 1)
            label = f"{attack}[{tag}] {eps}"
        out[cell_id] = (label, seed)
    return out


def _condition_scores(store: Any) -> dict[tuple[str, str], pd.DataFrame]:
    from robustbench_med.results import store_frames

    cells, samples, _ = store_frames(store)
    if cells.empty or samples.empty:
        return {}
    done = cells[cells.status == "done"].copy()
    done["route"] = [d if t in ("adaptive", None) else f"{d}[{t}]" for d, t in zip(done.defense, done.attack_through)]
    samples = samples.merge(done[["cell_id", "victim", "route"]], on="cell_id")
    out = {}
    for (victim, defense), pair in samples.groupby(["victim", "route"], sort=False):
        labels = condition_labels(done[done.cell_id.isin(pair.cell_id.unique())])
        columns = {CLEAN: pair.drop_duplicates("sample_idx").set_index("sample_idx").clean_score}
        seeds: dict[str, dict[Any, pd.Series]] = {}
        for cell_id, cell in pair.groupby("cell_id", sort=False):
            label, seed = labels[cell_id]
            seeds.setdefault(label, {})[seed] = cell.set_index("sample_idx").adv_score
        for label, by_seed in seeds.items():
            columns[label] = next(iter(by_seed.values())) if len(by_seed) == 1 else pd.DataFrame(by_seed).mean(axis=1)
        frame = pd.DataFrame(columns)
        frame.attrs["attack_seeds"] = {label: pd.DataFrame(by_seed) for label, by_seed in seeds.items() if len(by_seed) > 1}
        out[(victim, defense)] = frame
    return out


def paired_interval(diff: np.ndarray, n_boot: int, rng: np.random.Generator) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the mean of paired differences ``diff`` (samples resampled)."""
    from robustbench_med.gate import resample_indices

    lo, hi = np.percentile(diff[resample_indices(len(diff), n_boot, rng)].mean(1), [2.5, 97.5])
    return float(lo), float(hi)


def baseline_table(store: Any, n_boot: int = N_BOOT, seed: int = 0) -> pd.DataFrame:
    """One row per victim × defence × shared condition with a declared baseline in the store (module docstring)."""
    scores, rng, rows = condition_scores(store), np.random.default_rng(seed), []
    for (victim, defense), wide in scores.items():
        base = declared_baseline(victim)
        if (base, defense) not in scores:
            continue
        other = scores[(base, defense)]
        for condition in [c for c in wide.columns if c in other.columns]:
            a, b = wide[condition].dropna(), other[condition].dropna()
            common = a.index.intersection(b.index)
            if not len(common):
                continue
            diff = (a.loc[common] - b.loc[common]).to_numpy(float)
            lo, hi = paired_interval(diff, n_boot, rng)
            rows.append({"victim": victim, "baseline": base, "defense": defense, "condition": condition, "n": len(common),
                         "victim_score": float(a.loc[common].mean()), "baseline_score": float(b.loc[common].mean()),
                         "delta": float(diff.mean()), "ci95_low": float(lo), "ci95_high": float(hi),
                         "verdict": "better" if lo > 0 else "worse" if hi < 0 else "no difference shown"})
    return pd.DataFrame(rows)


def to_markdown(table: pd.DataFrame) -> str:
    lines = ["# Against the declared baseline (paired, same samples)", "",
             "Δ = victim − baseline of the mean primary score; 95% paired bootstrap interval over test samples (one "
             "training seed per victim).", "",
             "| victim | baseline | defence | condition | n | victim | baseline | Δ | 95% CI | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r.victim} | {r.baseline} | {r.defense} | {r.condition} | {r.n} | {r.victim_score:.3f} | "
              f"{r.baseline_score:.3f} | {r.delta:+.3f} | [{r.ci95_low:+.3f}, {r.ci95_high:+.3f}] | {r.verdict} |"
              for r in table.itertuples()]
    return "\n".join(lines) + "\n"


def write_baseline_tables(store: Any, out_dir: str | Path) -> dict[str, Path]:
    """Write ``baselines.md`` / ``baselines.csv`` when the store holds a victim and its declared baseline."""
    return write_study_table(baseline_table(store), to_markdown, out_dir, "baselines")


def write_study_table(table: pd.DataFrame, render: Any, out_dir: str | Path, stem: str) -> dict[str, Path]:
    """``<stem>.md`` (``render(table)``) and ``<stem>.csv`` in ``out_dir`` unless ``table`` is empty; their paths under
    the keys ``<stem>_markdown`` / ``<stem>_csv``."""
    if table.empty:
        return {}
    out = Path(out_dir)
    paths = {f"{stem}_markdown": out / f"{stem}.md", f"{stem}_csv": out / f"{stem}.csv"}
    paths[f"{stem}_markdown"].write_text(render(table))
    table.to_csv(paths[f"{stem}_csv"], index=False)
    return paths
