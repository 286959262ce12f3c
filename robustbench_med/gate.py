"""The regression gate: is a candidate model *significantly and materially* less robust (or less fair under attack)
than a baseline, on the same samples?

``check_regression`` evaluates the candidate exactly as the baseline entries were evaluated (their grid, attacks,
defences, examples and seed, from the entries' manifest; :func:`robustbench_med.verify.subgrid`) and compares the two
*per sample*, since both were scored on the same examples:

- scores that are 0/1 per sample (accuracy of classification and binary tasks): the **exact McNemar test** on the
  discordant pairs (McNemar, Psychometrika 1947; one-sided exact binomial test of b = base right / candidate wrong
  against c = base wrong / candidate right);
- continuous scores (Dice, label accuracy, SDR, VQA accuracy): a **paired bootstrap** of the mean difference;
- group metrics per sensitive attribute (robust gap = max − min of the group means, worst-group robust score): a
  **stratified paired bootstrap** (examples resampled within each group, the same resample for both models).

Every compared metric gets its effect (how much worse the candidate is; positive = worse), a 95% percentile
bootstrap interval of it and a one-sided p-value; p-values are Holm-adjusted over all metrics of one check (Holm,
Scand. J. Statist. 1979), so the family-wise false-alarm rate stays at ``alpha``. A metric **regresses** only when its
adjusted p < ``alpha`` *and* its effect exceeds the margin (``margin`` for scores, ``fairness_margin`` for gaps and
worst groups): a significant but immaterial change, or a large but noisy one, does not fail the gate.

Minimum sample size: below :data:`MIN_N` examples the report warns that the test has little power (at n = 100 a
10-point drop of accuracy with 20 discordant pairs reaches p ≈ 0.02 before adjustment); use ≥ 256 examples for a
gate that should catch a 10-point drop across many compared metrics.
"""
from __future__ import annotations

import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from robustbench_med.entries import defense_key, defense_label, headline_rows, load_entries
from robustbench_med.errors import ConfigError
from robustbench_med.fairness import group_gap
from robustbench_med.tasks import ZERO_ONE_TASKS

DEFAULT_MARGIN = 0.05
DEFAULT_ALPHA = 0.05
MIN_N = 100
N_BOOT = 2000


@dataclass
class Delta:
    """One compared metric: baseline and candidate values, how much worse the candidate is (``worse`` > 0: worse),
    its 95% bootstrap interval, the test used and its one-sided p (raw and Holm-adjusted)."""

    where: str
    metric: str
    baseline: float
    new: float
    worse: float
    ci95: tuple[float, float]
    p: float
    test: str
    margin: float
    p_adjusted: float = 1.0
    alpha: float = DEFAULT_ALPHA

    @property
    def significant(self) -> bool:
        return self.p_adjusted < self.alpha

    @property
    def regressed(self) -> bool:
        return self.significant and self.worse > self.margin + 1e-12

    @property
    def verdict(self) -> str:
        if self.regressed:
            return "REGRESSION"
        if self.significant and self.worse > 0:
            return "worse, within margin"
        if self.ci95[1] < 0:
            return "ok (better)"
        return "ok"


@dataclass
class CheckReport:
    """The outcome of :func:`check_regression` / :func:`compare_entries`."""

    deltas: list[Delta] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def regressions(self) -> list[Delta]:
        return [d for d in self.deltas if d.regressed]

    @property
    def ok(self) -> bool:
        return not self.problems and not self.regressions and bool(self.deltas)

    def text(self) -> str:
        """A readable table of every compared metric and the verdict."""
        lines = [f"  {n}" for n in self.notes] + [f"  warning: {w}" for w in self.warnings]
        lines.append(f"  {'where':38s} {'metric':34s} {'base':>7s} {'new':>7s} {'worse':>7s} {'95% CI':>17s} "
                     f"{'p(Holm)':>8s} {'margin':>6s}  {'test':9s} result")
        for d in self.deltas:
            ci = f"[{d.ci95[0]:+.3f}, {d.ci95[1]:+.3f}]"
            lines.append(f"  {d.where[:38]:38s} {d.metric[:34]:34s} {d.baseline:7.3f} {d.new:7.3f} {d.worse:+7.3f} {ci:>17s} "
                         f"{d.p_adjusted:8.2g} {d.margin:6.3f}  {d.test:9s} {d.verdict}")
        lines += [f"  problem: {p}" for p in self.problems]
        verdict = "OK" if self.ok else f"FAILED ({len(self.regressions)} regression(s), {len(self.problems)} problem(s))"
        return "check against baseline (worse > 0: the candidate is worse)\n" + "\n".join(lines) + f"\n  => {verdict}\n"

    def junit_xml(self) -> str:
        """The report as JUnit XML (one test case per compared metric), for CI systems that display test results."""
        suite = ET.Element("testsuite", name="robustbench_med.check", tests=str(len(self.deltas) + len(self.problems)),
                           failures=str(len(self.regressions)), errors=str(len(self.problems)))
        for d in self.deltas:
            case = ET.SubElement(suite, "testcase", classname=d.where, name=d.metric)
            text = (f"baseline {d.baseline:.4f}, candidate {d.new:.4f}, worse by {d.worse:+.4f} "
                    f"(95% CI [{d.ci95[0]:+.4f}, {d.ci95[1]:+.4f}]), {d.test} p = {d.p:.3g}, Holm-adjusted {d.p_adjusted:.3g}, "
                    f"margin {d.margin}")
            if d.regressed:
                ET.SubElement(case, "failure", message=f"{d.metric} regressed").text = text
            else:
                ET.SubElement(case, "system-out").text = text
        for i, p in enumerate(self.problems):
            ET.SubElement(ET.SubElement(suite, "testcase", classname="robustbench_med.check", name=f"problem {i + 1}"),
                          "error", message=p)
        ET.SubElement(suite, "system-out").text = "\n".join(self.notes + [f"warning: {w}" for w in self.warnings])
        return ET.tostring(suite, encoding="unicode")


# ---------------------------------------------------------------------------------------------------------------
# paired tests on per-sample scores


def mcnemar_exact(base: np.ndarray, new: np.ndarray) -> float:
    """One-sided exact McNemar p-value that the candidate is worse: P(B ≥ b), B ~ Binomial(b + c, 1/2)."""
    b = int(((base >= 0.5) & (new < 0.5)).sum())
    c = int(((base < 0.5) & (new >= 0.5)).sum())
    from scipy import stats  # on first use: importing scipy.stats costs ~0.3 s, a third of rendering a large store

    return 1.0 if b + c == 0 else float(stats.binomtest(b, b + c, 0.5, alternative="greater").pvalue)


def bootstrap_p(worse: np.ndarray) -> float:
    """One-sided bootstrap p-value that the candidate is worse: the share of resamples in which it is not."""
    return float((1 + np.sum(worse <= 0)) / (len(worse) + 1))


def resample_indices(n: int, n_boot: int, rng: np.random.Generator, strata: np.ndarray | None = None) -> np.ndarray:
    """``[n_boot, n]`` bootstrap indices, resampled within each stratum when ``strata`` is given (group sizes fixed)."""
    if strata is None:
        return rng.integers(0, n, size=(n_boot, n))
    cols = []
    for g in np.unique(strata):
        members = np.flatnonzero(strata == g)
        cols.append(members[rng.integers(0, len(members), size=(n_boot, len(members)))])
    return np.concatenate(cols, axis=1)


def _group_means(scores: np.ndarray, idx: np.ndarray, strata: np.ndarray) -> np.ndarray:
    """``[n_boot, n_groups]`` group means of ``scores`` over resampled ``idx`` (stratified, so groups stay aligned)."""
    groups = strata[idx[0]] if idx.ndim == 2 else strata
    labels = np.unique(strata)
    values = scores[idx]
    return np.stack([values[:, groups == g].mean(1) for g in labels], axis=1)


def score_delta(where: str, metric: str, base: np.ndarray, new: np.ndarray, zero_one: bool, idx: np.ndarray, margin: float) -> Delta:
    """Mean score, baseline vs candidate (a drop is worse): McNemar for 0/1 scores, else a paired bootstrap."""
    boot = base[idx].mean(1) - new[idx].mean(1)
    worse = float(base.mean() - new.mean())
    p = mcnemar_exact(base, new) if zero_one else bootstrap_p(boot)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return Delta(where, metric, float(base.mean()), float(new.mean()), worse, (float(lo), float(hi)), p,
                 "McNemar" if zero_one else "bootstrap", margin)


def group_deltas(where: str, metric: str, base: np.ndarray, new: np.ndarray, strata: np.ndarray, attr: str,
                 idx: np.ndarray, margin: float) -> list[Delta]:
    """Robust gap (a rise is worse) and worst-group robust score (a drop is worse) of attribute ``attr``."""
    labels = np.unique(strata)
    if len(labels) < 2:
        return []
    mb, mn = _group_means(base, idx, strata), _group_means(new, idx, strata)
    full = np.arange(len(base))[None, :]
    gb, gn = _group_means(base, full, strata)[0], _group_means(new, full, strata)[0]
    out = []
    for name, stat in ((f"robust_gap[{attr}]", lambda m: group_gap(m, axis=1)), (f"worst_group_{metric}[{attr}]", lambda m: -m.min(1))):
        boot = stat(mn) - stat(mb)
        lo, hi = np.percentile(boot, [2.5, 97.5])
        base_v, new_v = stat(gb[None])[0], stat(gn[None])[0]
        sign = 1.0 if name.startswith("robust_gap") else -1.0  # report the worst-group score itself, not its negative
        out.append(Delta(where, name, sign * float(base_v), sign * float(new_v), float(new_v - base_v),
                         (float(lo), float(hi)), bootstrap_p(boot), "bootstrap", margin))
    return out


def holm(deltas: list[Delta], alpha: float) -> None:
    """Holm–Bonferroni step-down adjustment of the p-values of ``deltas`` (in place)."""
    m = len(deltas)
    running = 0.0
    for rank, d in enumerate(sorted(deltas, key=lambda d: d.p)):
        running = max(running, min(1.0, (m - rank) * d.p))
        d.p_adjusted, d.alpha = running, alpha


# ---------------------------------------------------------------------------------------------------------------
# entries and checks


def compare_entries(base: dict[str, Any], new: dict[str, Any], *, margin: float = DEFAULT_MARGIN,
                    fairness_margin: float | None = None, alpha: float = DEFAULT_ALPHA, n_boot: int = N_BOOT,
                    seed: int = 0, min_n: int = MIN_N) -> CheckReport:
    """Compare two entries of one threat model on their shared samples (headline row of each defence)."""
    report = CheckReport()
    _compare(base, new, _margins(margin, fairness_margin), n_boot, seed, min_n, report)
    holm(report.deltas, _alpha(alpha))
    return report


def _margins(margin: float, fairness_margin: float | None) -> tuple[float, float]:
    for m in (margin, fairness_margin):
        if m is not None and not 0 <= m <= 1:
            raise ConfigError(f"margins are fractions in [0, 1], got {m}")
    return margin, margin if fairness_margin is None else fairness_margin


def _alpha(alpha: float) -> float:
    if not 0 < alpha < 1:
        raise ConfigError(f"alpha must be in (0, 1), got {alpha}")
    return alpha


def _compare(base: dict[str, Any], new: dict[str, Any], margins: tuple[float, float], n_boot: int, seed: int,
             min_n: int, report: CheckReport) -> None:
    """Per-sample deltas of every defence's headline row, baseline vs candidate."""
    key = base["threat"]["key"]
    if base["n"] != new["n"] or base["manifest"]["data_hash"] != new["manifest"]["data_hash"]:
        report.problems.append(f"{key}: the candidate was not evaluated on the baseline's samples (n {new['n']} vs {base['n']}, "
                               f"data {new['manifest']['data_hash']} vs {base['manifest']['data_hash']})")
        return
    if base["n"] < min_n:
        report.warnings.append(f"{key}: n = {base['n']} < {min_n}: the paired tests have little power; a real drop may pass")
    zero_one = base["task"] in ZERO_ONE_TASKS
    rng = np.random.default_rng(seed)
    plain = resample_indices(base["n"], n_boot, rng)
    strata = {a: np.asarray(v) for a, v in sorted(base["attributes"].items())}
    stratified = {a: resample_indices(base["n"], n_boot, rng, s) for a, s in strata.items()}
    theirs = {defense_key(r): r for r in headline_rows(new)}
    for b in headline_rows(base):
        where = f"{key} {defense_label(b)}"
        n = theirs.get(defense_key(b))
        if b["status"] != "done":
            continue
        if n is None or n["status"] != "done":
            report.problems.append(f"{where}: no valid result for the candidate ({'missing' if n is None else n['reason']})")
            continue
        if set(n["flags"]) - set(b["flags"]):
            report.notes.append(f"{where}: new reliability flag(s) {sorted(set(n['flags']) - set(b['flags']))}")
        sb, sn = (np.asarray(r["per_sample"]["adv"], dtype=float) for r in (b, n))
        cb, cn = (np.asarray(r["per_sample"]["clean"], dtype=float) for r in (b, n))
        report.deltas.append(score_delta(where, f"robust {base['metric']}", sb, sn, zero_one, plain, margins[0]))
        report.deltas.append(score_delta(where, f"clean {base['metric']}", cb, cn, zero_one, plain, margins[0]))
        for attr, s in strata.items():
            report.deltas += group_deltas(where, base["metric"], sb, sn, s, attr, stratified[attr], margins[1])


def check_regression(baseline: str | Path | list[dict[str, Any]], *, victim: str | None = None, weights: str | Path | None = None,
                     model: Any = None, margin: float = DEFAULT_MARGIN, fairness_margin: float | None = None,
                     alpha: float = DEFAULT_ALPHA, min_n: int = MIN_N, n_boot: int = N_BOOT, seed: int = 0,
                     device: str | None = None, progress: bool = False) -> CheckReport:
    """Evaluate a candidate like ``baseline`` (an entry file, a leaderboard directory, or loaded entries) and compare.

    The candidate is the baseline's own victim with other ``weights``, another registered ``victim`` (with optional
    ``weights``), or ``model`` (an ``nn.Module`` wrapped like the baseline's victim, or a
    :class:`~robustbench_med.victim.Victim`). See the module doc for the tests and the decision rule.
    """
    entries = baseline if isinstance(baseline, list) else load_entries(baseline)
    margins = _margins(margin, fairness_margin)
    _alpha(alpha)
    if model is not None and victim is not None:
        raise ConfigError("give either victim= (a registered name) or model= (an object), not both")
    chosen, new_name = _choose(entries, victim)
    report = CheckReport()
    for group in _by_run(chosen):
        _check_group(group, new_name, weights, model, margins, n_boot, seed, min_n, device, progress, report)
    holm(report.deltas, alpha)
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


def _check_group(group, new_name, weights, model, margins, n_boot, seed, min_n, device, progress, report: CheckReport) -> None:
    """Run one group's evaluation on the candidate and compare it entry by entry."""
    from contextlib import nullcontext

    from robustbench_med.entries import build_entries
    from robustbench_med.runner import run_grid
    from robustbench_med.verify import subgrid

    context = nullcontext(new_name)
    if model is not None:
        context = _registered_candidate(model, group[0])
    with context as name:
        grid = subgrid(group, victim=name, weights=None if weights is None else str(weights), device=device,
                       own_weights=model is not None)
        label = grid.victims[0].name + (f" (weights {weights})" if weights else "")
        report.notes.append(f"baseline {group[0]['victim']} ({len(group)} entr{'y' if len(group) == 1 else 'ies'}, grid {grid.name!r}) "
                            f"vs {label}: n = {grid.n_examples}, {len(grid.attacks)} attack settings, {len(grid.defenses)} defences")
        with tempfile.TemporaryDirectory(prefix="rbm_check_") as tmp:
            new = {(e["dataset"], e["threat"]["key"]): e for e in build_entries(run_grid(grid, tmp, device=device, progress=progress))}
    for base in group:
        other = new.get((base["dataset"], base["threat"]["key"]))
        if other is None:
            report.problems.append(f"{base['dataset']} {base['threat']['key']}: the candidate produced no result")
            continue
        if other["task"] != base["task"] or other["metric"] != base["metric"]:
            report.problems.append(f"{base['threat']['key']}: the candidate's task {other['task']} ({other['metric']}) is not "
                                   f"the baseline's {base['task']} ({base['metric']}); the numbers are not comparable")
            continue
        if other["weights_sha256"] == base["weights_sha256"]:
            report.notes.append(f"{base['threat']['key']}: the evaluated weights are the baseline's own "
                                f"(sha256 {str(base['weights_sha256'])[:12]}…)")
        _compare(base, other, margins, n_boot, seed, min_n, report)


def _registered_candidate(model: Any, base: dict[str, Any]):
    """``model`` registered for the check under a name of its own (wrapped like the baseline's victim if needed)."""
    from robustbench_med.evaluation import as_user_victim, registered
    from robustbench_med.registry import VICTIMS

    if not hasattr(model, "card"):
        spec = next((v for v in base["manifest"]["grid"]["victims"] if v["name"] == base["victim"]), {})
        args = dict(spec.get("wrap") or {})
        task = args.pop("task", base["task"])
        entry = VICTIMS.get(base["victim"]) if base["victim"] in VICTIMS else None
        card = entry.meta.get("card") if entry is not None else None
        if card is not None:
            args.setdefault("input_size", card.input_size)
            args.setdefault("classes", card.classes)
        model = as_user_victim(model, task, args.pop("input_size", None), None, **args)
    return registered(model, "candidate." + model.card.name.split(".", 1)[1].replace(".", "_"))


def write_junit(report: CheckReport, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('<?xml version="1.0" encoding="utf-8"?>\n' + report.junit_xml() + "\n")
    return path
