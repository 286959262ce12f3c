"""Re-verification of leaderboard entries and regression checks for a project's CI.

``verify_entry``: RobustBench re-verifies only clean accuracy, in a slow test (``shared/reference/anchors.md`` §1,
§8.7). Here a seeded random sample of an entry's examples is attacked again from the entry's own manifest (grid,
victim, weights, defence, attack parameters, seed). Units follow from the grid's unit size (never from the memory
cap); the runner seeds every unit from (grid seed, victim × defence key, cell, first sample), every sample's own
stream from (…, cell, sample index), and batches the cells of an eps sweep together, so the units holding the
sampled examples are recomputed exactly as in the original run (same units, same seeds) and each re-run score is
compared with the stored per-sample score. The stored aggregate is also checked against the re-run subsample with
a sampling-aware bound (binomial variance for 0/1 scores, the sample variance otherwise, with the finite-population
correction; Cochran, *Sampling Techniques*, 1977, §2.6).

The regression gate (``check``) that runs a baseline's evaluation on a candidate model lives in
:mod:`robustbench_med.gate`; it reuses :func:`subgrid`.
"""
from __future__ import annotations

import hashlib
import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from robustbench_med.entries import defense_label, is_worst_case, load_entry, validate_entry
from robustbench_med.errors import ConfigError
from robustbench_med.grid import Grid, canonical, parse_grid
from robustbench_med.results import worst_case_scores
from robustbench_med.store import Store

Z99 = 2.5758293035489004
DEFAULT_VERIFY_TOLERANCE = 0.05


# ---------------------------------------------------------------------------------------------------------------
# the grid that reproduces an entry


def subgrid(entries: list[dict[str, Any]], *, victim: str | None = None, weights: str | None = None,
            device: str | None = None, own_weights: bool = False) -> Grid:
    """The entries' grid (from their manifest) restricted to their victim, defences and attack settings.

    Attack settings of the same eps sweep stay together (they share batches, hence seeds). ``victim`` / ``weights``
    evaluate another registered victim or another weights file in place of the entries' own; ``own_weights``: the
    other victim keeps the weights it was built with (an in-memory candidate model).
    """
    first = entries[0]
    if any(e["manifest"]["config_hash"] != first["manifest"]["config_hash"] or e["victim"] != first["victim"] for e in entries):
        raise ConfigError("entries evaluated together must share a victim and a grid configuration")
    g = first["manifest"]["grid"]
    rows = [r for e in entries for r in e["results"] if not is_worst_case(r) and r["status"] != "skipped"]
    new_name = victim or first["victim"]
    raw = {
        "name": g["name"], "n_examples": g["n_examples"], "batch_size": g["batch_size"],
        "unit_size": g.get("unit_size", g["batch_size"]), "seed": g["seed"],
        "device": device or "auto", "save_adversarial": False,
        "attack_only_robust": g.get("attack_only_robust", False),  # entries made before the option attacked every sample
        "compute": g.get("compute") or {},
        "dataset": {"name": g["dataset"], "split": g["split"], "params": g.get("dataset_params") or {}},
        "victims": [_victim_spec(g, first["victim"], new_name, weights, own_weights)],
        "attacks": [_attack_spec(a, first["victim"], new_name) for a in g["attacks"] if _needed_attack(a, rows)],
        "defenses": _defense_specs(g["defenses"], rows),
    }
    if not raw["attacks"] or not raw["defenses"]:
        raise ConfigError(f"the manifest of grid {g['name']!r} does not contain the attacks / defences of the entry")
    return parse_grid(raw, source=f"manifest of grid {g['name']!r}")


def _victim_spec(g: dict[str, Any], old: str, new: str, weights: str | None, own_weights: bool = False) -> dict[str, Any]:
    """The victim of the manifest's grid, renamed / given other weights for a check (a user victim's factory and
    wrapping stay with the baseline's name)."""
    spec = next((dict(v) for v in g["victims"] if v["name"] == old), None)
    if spec is None:
        raise ConfigError(f"the manifest of grid {g['name']!r} has no victim {old!r}")
    if new != old:
        spec["params"] = {}
        spec.pop("factory", None)
        spec.pop("wrap", None)
    spec = {k: v for k, v in spec.items() if not (k in ("factory", "wrap") and not v)}
    spec["name"] = new
    if weights is not None:
        spec["weights"] = str(weights)
    elif new != old:
        spec["weights"] = None if own_weights else "auto"
    return spec


def _sweep_key(name: str, params: dict[str, Any]) -> str:
    return name + canonical({k: v for k, v in params.items() if k != "eps"})


def _needed_attack(spec: dict[str, Any], rows: list[dict[str, Any]]) -> bool:
    """Whether a grid attack setting belongs to the eps sweep of any entry row (the harness may add ``eot``)."""
    mine = _sweep_key(spec["name"], spec["params"])
    for r in rows:
        params = dict(r["attack_params"])
        if _sweep_key(r["attack"], params) == mine:
            return True
        params.pop("eot", None)
        if "eot" not in spec["params"] and _sweep_key(r["attack"], params) == mine:
            return True
    return False


def _attack_spec(spec: dict[str, Any], old: str, new: str) -> dict[str, Any]:
    """A grid attack setting, with its victim restriction following a renamed victim."""
    only = [new if v == old else v for v in spec.get("victims") or []]
    return {"name": spec["name"], "params": spec["params"], "victims": only, "defenses": list(spec.get("defenses") or [])}


def _defense_specs(specs: list[dict[str, Any]], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The manifest's defence settings that produced the entry rows (matched on their recorded parameters)."""
    from robustbench_med.api import create_defense

    wanted = {(r["defense"], r["attack_through"], canonical(r["defense_params"])) for r in rows}
    out = []
    for d in specs:
        params = create_defense(d["name"], **(d.get("params") or {})).params()
        if (d["name"], d.get("attack_through", "adaptive"), canonical(params)) in wanted:
            out.append({k: v for k, v in d.items() if v is not None})
    return out


# ---------------------------------------------------------------------------------------------------------------
# verify


class _SelectiveStore(Store):
    """A scratch store that reports every sample as done except the selected (cell, sample) pairs, so the runner
    recomputes exactly the units that hold a selected sample (and writes rows only for the selected ones)."""

    def __init__(self, path: Path, selected: dict[str, set[int]], n: int) -> None:
        super().__init__(path)
        self.selected = selected
        self.everything = set(range(n))

    def done_samples(self, cell_id: str) -> set[int]:
        return (self.everything - self.selected.get(cell_id, set())) | super().done_samples(cell_id)


@dataclass
class Comparison:
    """One re-run row of a verification: stored vs re-run scores on the sampled examples."""

    defense: str
    attack: str
    stored_full: float
    stored_sub: float
    rerun_sub: float
    mean_abs_diff: float
    clean_abs_diff: float
    bound: float
    ok: bool


@dataclass
class VerifyReport:
    """The outcome of :func:`verify_entry`: what was compared, and any problem found."""

    entry: str
    samples: list[int]
    tolerance: float
    header: list[str] = field(default_factory=list)
    comparisons: list[Comparison] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and bool(self.comparisons) and all(c.ok for c in self.comparisons)

    def text(self) -> str:
        """A table of what was compared, and the verdict."""
        lines = [f"verify {self.entry}", *(f"  {h}" for h in self.header)]
        if self.comparisons:
            lines.append(f"  {'defence':28s} {'attack':44s} {'stored(all)':>11s} {'stored(sub)':>11s} {'re-run(sub)':>11s} "
                         f"{'|Δ| adv':>8s} {'|Δ| clean':>9s} {'bound':>7s}  result")
            for c in self.comparisons:
                lines.append(f"  {c.defense[:28]:28s} {c.attack[:44]:44s} {c.stored_full:11.4f} {c.stored_sub:11.4f} {c.rerun_sub:11.4f} "
                             f"{c.mean_abs_diff:8.4f} {c.clean_abs_diff:9.4f} {c.bound:7.4f}  {'ok' if c.ok else 'MISMATCH'}")
        lines += [f"  problem: {p}" for p in self.problems]
        lines.append(f"  => {'VERIFIED' if self.ok else 'NOT VERIFIED'}")
        return "\n".join(lines) + "\n"


def sample_indices(n: int, k: int, seed: int) -> list[int]:
    """``k`` distinct example indices out of ``n``, drawn with a seeded generator (sorted)."""
    if k < 1:
        raise ConfigError(f"the number of samples to re-run must be >= 1, got {k}")
    rng = np.random.default_rng(seed)
    return sorted(int(i) for i in rng.choice(n, size=min(k, n), replace=False))


def verify_entry(entry: dict[str, Any] | str | Path, *, n_samples: int = 16, seed: int = 0,
                 tolerance: float = DEFAULT_VERIFY_TOLERANCE, device: str | None = None, progress: bool = False,
                 weights: str | Path | None = None) -> VerifyReport:
    """Re-run a seeded sample of ``entry``'s examples and compare with the stored numbers (see the module doc).

    A row passes when the mean absolute per-sample difference of its adversarial and clean scores is at most
    ``tolerance`` (for 0/1 scores: the fraction of flipped outcomes) and the stored full-set robust metric lies
    within ``tolerance + 2.58·SE`` of the re-run subsample mean (99%, finite-population corrected). ``weights``: a
    local copy of the entry's weights file (its sha256 must equal the entry's), in place of the manifest's source.
    """
    name = str(entry) if not isinstance(entry, dict) else f"{entry.get('victim')} @ {entry.get('threat', {}).get('key')}"
    entry = load_entry(entry) if not isinstance(entry, dict) else validate_entry(entry)
    if not 0 <= tolerance <= 1:
        raise ConfigError(f"tolerance must be a fraction in [0, 1], got {tolerance}")
    grid = subgrid([entry], device=device, weights=None if weights is None else str(weights))
    idx = sample_indices(entry["n"], n_samples, seed)
    report = VerifyReport(name, idx, tolerance)
    report.header.append(f"grid {grid.name!r}, victim {entry['victim']}, defences {len(grid.defenses)}, n = {entry['n']}; "
                         f"re-running {len(idx)} examples (seed {seed}): {idx}")
    report.problems += _precheck(grid, entry, report.header)
    if report.problems:
        return report
    rows = [r for r in entry["results"] if r["status"] == "done" and not is_worst_case(r)]
    if not rows:
        report.problems.append("the entry has no finished result to verify")
        return report
    with tempfile.TemporaryDirectory(prefix="rbm_verify_") as tmp:
        store = _SelectiveStore(Path(tmp) / "verify.sqlite", {r["cell_id"]: set(idx) for r in rows}, entry["n"])
        try:
            _run(grid, store, device, progress, Path(tmp))
            rerun = _rerun_scores(store, idx)
            cells = {c["cell_id"]: c for c in store.cells()}
            flags = store.flags()
        finally:
            store.close()
    report.header.append(f"tolerance {tolerance}: per-sample mean |re-run − stored| ≤ tol, and |stored(all) − re-run(sub)| ≤ "
                         "tol + 2.58·SE (SE: binomial or sample variance, finite-population corrected)")
    report.problems += _flag_problems(entry, cells, flags)
    report.comparisons += _compare_rows(entry, rerun, idx, tolerance, report.problems)
    return report


def _precheck(grid: Grid, entry: dict[str, Any], header: list[str]) -> list[str]:
    """Same weights and same data as the entry, before anything is attacked."""
    from robustbench_med.api import create_dataset, create_victim

    problems = []
    v = grid.victims[0]
    victim = create_victim(v.name, weights=v.weights, train_if_missing=True, **v.params)
    sha = victim.card.weights_sha256
    if entry["weights_sha256"] is None:
        header.append("weights: the entry records no sha256 (random initialisation); identity not checked")
    elif sha != entry["weights_sha256"]:
        problems.append(f"weights differ: sha256 {str(sha)[:12]}… here, {entry['weights_sha256'][:12]}… in the entry "
                        "(project-trained weights reproduce byte for byte only with the same thread count, see "
                        "ROBUSTBENCH_MED_TRAIN_THREADS, CPU kind and library versions; otherwise pass the entry's weights file with --weights)")
    else:
        header.append(f"weights sha256 {sha[:12]}… matches")
    ds = create_dataset(grid.dataset, split=grid.split, **grid.dataset_params)
    n = min(grid.n_examples, len(ds))
    data_hash = hashlib.sha256(ds.images(list(range(n))).numpy().tobytes()).hexdigest()[:16]
    if n != entry["n"] or data_hash != entry["manifest"]["data_hash"]:
        problems.append(f"data differ: n = {n}, hash {data_hash} here; "
                        f"n = {entry['n']}, hash {entry['manifest']['data_hash']} in the entry")
    else:
        header.append(f"data hash {data_hash} matches")
    return problems


def _run(grid: Grid, store: Store, device: str | None, progress: bool, out: Path) -> None:
    """Run ``grid`` into ``store`` with the harness (resuming whatever the store reports as done)."""
    from robustbench_med.runner import GridRunner, resolve_device

    GridRunner(grid, store, resolve_device(device or grid.device), progress, out).run()


def _rerun_scores(store: Store, idx: list[int]) -> dict[str, dict[int, tuple[float, float]]]:
    """Re-run (clean, adversarial) scores of the sampled examples, per cell."""
    wanted = set(idx)
    out: dict[str, dict[int, tuple[float, float]]] = {}
    for row in store.samples():
        if row["sample_idx"] in wanted:
            out.setdefault(row["cell_id"], {})[row["sample_idx"]] = (float(row["clean_score"]), float(row["adv_score"]))
    return out


def _flag_problems(entry: dict[str, Any], cells: dict[str, dict[str, Any]], flags: dict[str, Any]) -> list[str]:
    """Reliability flags and budget validity of the re-run against the entry's."""
    problems = []
    for row in entry["results"]:
        cell = cells.get(row["cell_id"]) if row["cell_id"] else None
        if cell is None:
            continue
        if cell["status"] == "invalid" and row["status"] == "done":
            problems.append(f"{defense_label(row)} × {row['attack']}: the re-run broke the budget ({cell['reason']})")
        group = flags.get(json.loads(cell["extra"]).get("group_key", ""), {})
        for flag in ("masked_gradients", "randomized"):
            now = bool(group.get(flag, (False, ""))[0])
            if now != (flag in row["flags"]):
                problems.append(f"{defense_label(row)} × {row['attack']}: flag {flag!r} is {now} on re-run but "
                                f"{flag in row['flags']} in the entry")
    return sorted(set(problems))


def _compare_rows(entry: dict[str, Any], rerun: dict[str, dict[int, tuple[float, float]]], idx: list[int],
                  tol: float, problems: list[str]) -> list[Comparison]:
    """A comparison per finished row (a worst-case row from the re-run scores of its components)."""
    by_id = {r["cell_id"]: r for r in entry["results"] if r["cell_id"]}
    out = []
    for row in entry["results"]:
        if row["status"] != "done":
            continue
        ids = row["components"] if is_worst_case(row) else [row["cell_id"]]
        missing = [c for c in ids if len(rerun.get(c, {})) != len(idx)]
        if missing:
            problems.append(f"{defense_label(row)} × {row['attack']}: cell(s) {missing} were not reproduced by the manifest's grid")
            continue
        adv = worst_case_scores({c: [rerun[c][i][1] for i in idx] for c in ids})
        clean = np.asarray([rerun[ids[0]][i][0] for i in idx])
        out.append(_comparison(row, adv, clean, idx, tol, by_id))
    return out


def _comparison(row: dict[str, Any], adv: np.ndarray, clean: np.ndarray, idx: list[int], tol: float, by_id) -> Comparison:
    """Stored vs re-run scores of one row on the sampled examples, and the sampling-aware bound."""
    stored = np.asarray(row["per_sample"]["adv"], dtype=float)
    stored_clean = np.asarray(row["per_sample"]["clean"], dtype=float)
    n, m = len(stored), len(idx)
    se = math.sqrt(stored.var() / m * ((n - m) / (n - 1) if n > 1 else 0.0))
    bound = tol + Z99 * se
    mad = float(np.abs(adv - stored[idx]).mean())
    cmad = float(np.abs(clean - stored_clean[idx]).mean())
    ok = mad <= tol + 1e-12 and cmad <= tol + 1e-12 and abs(float(adv.mean()) - row["robust"]) <= bound + 1e-12
    params = " ".join(f"{k}={v}" for k, v in sorted(row["attack_params"].items()))
    attack = row["attack"] if is_worst_case(row) else f"{row['attack']} {params}"
    return Comparison(defense_label(row), attack, row["robust"], float(stored[idx].mean()), float(adv.mean()), mad, cmad, bound, ok)
