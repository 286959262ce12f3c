"""A pytest helper for model repositories: one test guards robustness and fairness under attack.

Commit a baseline entry (``robustbench-med publish``, :func:`robustbench_med.evaluation.benchmark` with ``publish=``,
or :func:`robustbench_med.entries.build_entries`) and write::

    from robustbench_med.testing import assert_no_regression

    def test_robustness_does_not_regress():
        assert_no_regression(baseline="leaderboards/", weights="weights/model.safetensors")

The helper runs the baseline's evaluation (its grid, attacks, defences, examples and seed, from the entry's
manifest) on the candidate and fails with the comparison table when a metric is *significantly* worse (paired exact
McNemar or bootstrap tests on the shared samples, Holm-adjusted) *and* worse by more than the margin — see
:mod:`robustbench_med.gate` (RobustBench-style evaluation, Croce et al., NeurIPS 2021).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from robustbench_med.gate import DEFAULT_ALPHA, DEFAULT_MARGIN, MIN_N, CheckReport, check_regression


def assert_no_regression(baseline: str | Path | list[dict[str, Any]], *, victim: str | None = None,
                         weights: str | Path | None = None, model: Any = None, margin: float = DEFAULT_MARGIN,
                         fairness_margin: float | None = None, alpha: float = DEFAULT_ALPHA, min_n: int = MIN_N,
                         device: str | None = None) -> CheckReport:
    """Raise ``AssertionError`` (with the comparison table) if the candidate regresses against ``baseline``.

    Args:
        baseline: an entry file, a leaderboard directory, or loaded entries.
        victim: the registered victim to evaluate (default: the baseline's own).
        weights: a weights file for it (default: its registered weights).
        model: an ``nn.Module`` or victim object to evaluate instead of a registered victim.
        margin: the smallest drop of a score that counts (a fraction, e.g. 0.05 = 5 points).
        fairness_margin: the same for group gaps and worst-group scores (default: ``margin``).
        alpha: family-wise significance level of the Holm-adjusted paired tests.
        min_n: below this many examples the report warns that the tests have little power.
        device: where to run (default: CUDA when available, else CPU).

    Returns:
        The :class:`~robustbench_med.gate.CheckReport` when there is no regression.
    """
    __tracebackhide__ = True  # pytest shows the assertion, not this frame
    report = check_regression(baseline, victim=victim, weights=weights, model=model, margin=margin,
                              fairness_margin=fairness_margin, alpha=alpha, min_n=min_n, device=device)
    if not report.ok:
        raise AssertionError("robustness or fairness under attack regressed:\n" + report.text())
    return report
