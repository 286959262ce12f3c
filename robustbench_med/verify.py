"""Re-verification of leaderboard entries and regression checks for a project's CI.

``verify_entry``: RobustBench re-verifies only clean accuracy, in a slow test (``shared/reference/anchors.md`` §1,
§8.7). Here a seeded random sample of an entry's examples is attacked again from the entry's own manifest (grid,
victim, weights, defence, attack parameters, seed). The runner seeds every unit from (grid seed, victim × defence
key, cell, first sample) and batches the cells of an eps sweep together, so the units holding the sampled examples
are recomputed exactly as in the original run (same batch composition, same seeds) and each re-run score is
compared with the stored per-sample score. The stored aggregate is also checked against the re-run subsample with
a sampling-aware bound (binomial variance for 0/1 scores, the sample variance otherwise, with the finite-population
correction; Cochran, *Sampling Techniques*, 1977, §2.6).

``check_regression``: runs the evaluation of a baseline entry (or a directory of entries) on a new or changed model
(``weights=PATH`` for the same registered victim, or another registered victim) and reports a regression when, for
any defence, the headline robust metric or a worst-group robust metric drops, or a robust group gap widens, by more
than the tolerance.
"""
from __future__ import annotations

import hashlib
import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from robustbench_med.entries import (
    defense_key,
    defense_label,
    headline_rows,
    is_worst_case,
    load_entries,
    load_entry,
    validate_entry,
)
from robustbench_med.errors import ConfigError
from robustbench_med.grid import Grid, canonical, parse_grid
from robustbench_med.store import Store

Z99 = 2.5758293035489004
DEFAULT_VERIFY_TOLERANCE = 0.05
DEFAULT_CHECK_TOLERANCE = 0.02


# ---------------------------------------------------------------------------------------------------------------
# the grid that reproduces an entry


def subgrid(entries: list[dict[str, Any]], *, victim: str | None = None, weights: str | None = None,
            device: str | None = None) -> Grid:
    """The entries' grid (from their manifest) restricted to their victim, defences and attack settings.

    Attack settings of the same eps sweep stay together (they share batches, hence seeds). ``victim`` / ``weights``
    evaluate another registered victim or another weights file in place of the entries' own.
    """
    first = entries[0]
    if any(e["manifest"]["config_hash"] != first["manifest"]["config_hash"] or e["victim"] != first["victim"] for e in entries):
        raise ConfigError("entries evaluated together must share a victim and a grid configuration")
    g = first["manifest"]["grid"]
    rows = [r for e in entries for r in e["results"] if not is_worst_case(r) and r["status"] != "skipped"]
    new_name = victim or first["victim"]
    raw = {
        "name": g["name"], "n_examples": g["n_examples"], "batch_size": g["batch_size"], "seed": g["seed"],
        "device": device or "auto", "save_adversarial": False,
        "attack_only_robust": g.get("attack_only_robust", False),  # entries made before the option attacked every sample
        "dataset": {"name": g["dataset"], "split": g["split"], "params": g.get("dataset_params") or {}},
        "victims": [_victim_spec(g, first["victim"], new_name, weights)],
        "attacks": [_attack_spec(a, first["victim"], new_name) for a in g["attacks"] if _needed_attack(a, rows)],
        "defenses": _defense_specs(g["defenses"], rows),
    }
    if not raw["attacks"] or not raw["defenses"]:
        raise ConfigError(f"the manifest of grid {g['name']!r} does not contain the attacks / defences of the entry")
    return parse_grid(raw, source=f"manifest of grid {g['name']!r}")


def _victim_spec(g: dict[str, Any], old: str, new: str, weights: str | None) -> dict[str, Any]:
    """The victim of the manifest's grid, renamed / given other weights for a check."""
    spec = next((dict(v) for v in g["victims"] if v["name"] == old), None)
    if spec is None:
        raise ConfigError(f"the manifest of grid {g['name']!r} has no victim {old!r}")
    if new != old:
        spec["params"] = {}
    spec["name"] = new
    if weights is not None:
        spec["weights"] = str(weights)
    elif new != old:
        spec["weights"] = "auto"
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
        adv = np.min([[rerun[c][i][1] for i in idx] for c in ids], axis=0)
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


# ---------------------------------------------------------------------------------------------------------------
# check (regression test for CI)


@dataclass
class Delta:
    """One compared metric of :func:`check_regression` (``worse`` is positive when the new model is worse)."""

    where: str
    metric: str
    baseline: float
    new: float
    worse: float
    tolerance: float

    @property
    def regressed(self) -> bool:
        return self.worse > self.tolerance + 1e-12


@dataclass
class CheckReport:
    """The outcome of :func:`check_regression`."""

    deltas: list[Delta] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def regressions(self) -> list[Delta]:
        return [d for d in self.deltas if d.regressed]

    @property
    def ok(self) -> bool:
        return not self.problems and not self.regressions and bool(self.deltas)

    def text(self) -> str:
        """A table of what was compared, and the verdict."""
        lines = [f"  {n}" for n in self.notes]
        lines.append(f"  {'where':52s} {'metric':34s} {'baseline':>9s} {'new':>9s} {'worse by':>9s} {'tol':>6s}  result")
        for d in self.deltas:
            lines.append(f"  {d.where[:52]:52s} {d.metric[:34]:34s} {d.baseline:9.4f} {d.new:9.4f} {d.worse:9.4f} "
                         f"{d.tolerance:6.3f}  {'REGRESSION' if d.regressed else 'ok'}")
        lines += [f"  problem: {p}" for p in self.problems]
        verdict = "OK" if self.ok else f"FAILED ({len(self.regressions)} regression(s), {len(self.problems)} problem(s))"
        return "check against baseline\n" + "\n".join(lines) + f"\n  => {verdict}\n"


def check_regression(baseline: str | Path | list[dict[str, Any]], *, victim: str | None = None, weights: str | Path | None = None,
                     tolerance: float = DEFAULT_CHECK_TOLERANCE, fairness_tolerance: float | None = None,
                     device: str | None = None, progress: bool = False) -> CheckReport:
    """Evaluate a new or changed model like ``baseline`` (an entry file, a leaderboard directory or entries).

    ``victim``: the registered victim to evaluate (default: the baseline's; with a directory holding several
    victims it selects the baseline entries). ``weights``: a weights file for it. A regression is a drop of the
    headline robust metric (worst case over attacks) of any defence by more than ``tolerance``, or a drop of a
    worst-group robust metric / a rise of a robust group gap by more than ``fairness_tolerance`` (default:
    ``tolerance``).
    """
    entries = baseline if isinstance(baseline, list) else load_entries(baseline)
    for tol in (tolerance, fairness_tolerance):
        if tol is not None and not 0 <= tol <= 1:
            raise ConfigError(f"tolerances are fractions in [0, 1], got {tol}")
    ftol = tolerance if fairness_tolerance is None else fairness_tolerance
    chosen, new_name = _choose(entries, victim)
    report = CheckReport()
    for group in _by_run(chosen):
        _check_group(group, new_name, weights, tolerance, ftol, device, progress, report)
    if not report.deltas and not report.problems:
        report.problems.append("the baseline has no finished result to compare with")
    return report


def _choose(entries: list[dict[str, Any]], victim: str | None) -> tuple[list[dict[str, Any]], str | None]:
    """The baseline entries to check, and the victim to evaluate in their place (None: their own)."""
    names = sorted({e["victim"] for e in entries})
    if victim is None or victim in names:
        return ([e for e in entries if victim is None or e["victim"] == victim], victim)
    if len(names) == 1:
        return entries, victim
    raise ConfigError(f"the baseline holds entries for {names}; pass one entry file (or a directory of one victim) "
                      f"to compare {victim!r} against")


def _by_run(entries: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Baseline entries grouped by victim and grid configuration (one evaluation run each)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for e in entries:
        groups.setdefault((e["victim"], e["manifest"]["config_hash"]), []).append(e)
    return list(groups.values())


def _check_group(group, new_name, weights, tol, ftol, device, progress, report: CheckReport) -> None:
    """Run one group's evaluation on the new model and compare it entry by entry."""
    from robustbench_med.entries import build_entries
    from robustbench_med.runner import run_grid

    grid = subgrid(group, victim=new_name, weights=None if weights is None else str(weights), device=device)
    label = f"{grid.victims[0].name}" + (f" (weights {weights})" if weights else "")
    report.notes.append(f"baseline {group[0]['victim']} ({len(group)} entr{'y' if len(group) == 1 else 'ies'}, grid {grid.name!r}) "
                        f"vs {label}: n = {grid.n_examples}, {len(grid.attacks)} attack settings, {len(grid.defenses)} defences")
    with tempfile.TemporaryDirectory(prefix="rbm_check_") as tmp:
        new = {(e["dataset"], e["threat"]["key"]): e for e in build_entries(run_grid(grid, tmp, device=device, progress=progress))}
    for base in group:
        other = new.get((base["dataset"], base["threat"]["key"]))
        if other is None:
            report.problems.append(f"{base['dataset']} {base['threat']['key']}: the new model produced no result")
            continue
        if other["task"] != base["task"] or other["metric"] != base["metric"]:
            report.problems.append(f"{base['threat']['key']}: the new model's task {other['task']} ({other['metric']}) is not "
                                   f"the baseline's {base['task']} ({base['metric']}); the numbers are not comparable")
            continue
        if other["weights_sha256"] == base["weights_sha256"] and other["victim"] == base["victim"]:
            report.notes.append(f"{base['threat']['key']}: the evaluated weights are the baseline's own "
                                f"(sha256 {str(base['weights_sha256'])[:12]}…)")
        _compare_entries(base, other, tol, ftol, report)


def compare_entries(base: dict[str, Any], new: dict[str, Any], *, tolerance: float = DEFAULT_CHECK_TOLERANCE,
                    fairness_tolerance: float | None = None) -> CheckReport:
    """Compare two entries of one threat model defence by defence (headline rows; see :func:`check_regression`)."""
    report = CheckReport()
    _compare_entries(base, new, tolerance, tolerance if fairness_tolerance is None else fairness_tolerance, report)
    return report


def _compare_entries(base: dict[str, Any], new: dict[str, Any], tol: float, ftol: float, report: CheckReport) -> None:
    """Headline robust metric and group metrics of each defence, baseline vs new."""
    theirs = {defense_key(r): r for r in headline_rows(new)}
    for b in headline_rows(base):
        where = f"{base['threat']['key']} {defense_label(b)}"
        n = theirs.get(defense_key(b))
        if b["status"] != "done":
            continue
        if n is None or n["status"] != "done":
            report.problems.append(f"{where}: no valid result for the new model ({'missing' if n is None else n['reason']})")
            continue
        if set(n["flags"]) - set(b["flags"]):
            report.notes.append(f"{where}: new reliability flag(s) {sorted(set(n['flags']) - set(b['flags']))}")
        report.deltas.append(Delta(where, f"robust {base['metric']}", b["robust"], n["robust"], b["robust"] - n["robust"], tol))
        report.deltas += list(_group_deltas(where, b["groups"], n["groups"], ftol))


def _group_deltas(where: str, base: dict[str, Any], new: dict[str, Any], ftol: float) -> Iterable[Delta]:
    """Worst-group robust metrics (a drop is worse) and robust gaps (a rise is worse)."""
    for key, bv in sorted(base.items()):
        nv = new.get(key)
        if not isinstance(bv, (int, float)) or not isinstance(nv, (int, float)) or "ci95" in key:
            continue
        if key.startswith(("worst_group_robust_", "robust_worst_group_")):
            yield Delta(where, key, float(bv), float(nv), float(bv) - float(nv), ftol)
        elif key.startswith("robust_gap_"):
            yield Delta(where, key, float(bv), float(nv), float(nv) - float(bv), ftol)
