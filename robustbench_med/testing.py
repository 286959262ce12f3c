"""A pytest helper for model repositories: one test guards robustness and fairness under attack.

Commit a baseline entry (``robustbench-med publish`` or :func:`robustbench_med.entries.build_entries`) and write::

    from robustbench_med.testing import assert_no_regression

    def test_robustness_does_not_regress():
        assert_no_regression(baseline="leaderboards/phantom.ct/Linf-8_255/cnn.phantom.json",
                             weights="weights/cnn.safetensors", tolerance=0.02)

The helper runs the baseline's evaluation (its grid, attacks, defences, examples and seed, from the entry's
manifest) on the given model and fails with the full comparison table when the headline robust metric, a
worst-group robust metric or a robust group gap gets worse by more than the tolerance (see
:func:`robustbench_med.verify.check_regression`; RobustBench-style evaluation, Croce et al., NeurIPS 2021).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from robustbench_med.verify import DEFAULT_CHECK_TOLERANCE, CheckReport, check_regression


def assert_no_regression(baseline: str | Path | list[dict[str, Any]], *, victim: str | None = None,
                         weights: str | Path | None = None, tolerance: float = DEFAULT_CHECK_TOLERANCE,
                         fairness_tolerance: float | None = None, device: str | None = None) -> CheckReport:
    """Raise ``AssertionError`` (with the comparison table) if the model regresses against ``baseline``.

    Args:
        baseline: an entry file, a leaderboard directory, or loaded entries.
        victim: the registered victim to evaluate (default: the baseline's own).
        weights: a weights file for it (default: its registered weights).
        tolerance: allowed drop of the headline robust metric (a fraction, e.g. 0.02).
        fairness_tolerance: allowed drop of a worst-group robust metric or rise of a robust gap (default: tolerance).
        device: where to run (default: CUDA when available, else CPU).

    Returns:
        The :class:`~robustbench_med.verify.CheckReport` when there is no regression.
    """
    __tracebackhide__ = True  # pytest shows the assertion, not this frame
    report = check_regression(baseline, victim=victim, weights=weights, tolerance=tolerance,
                              fairness_tolerance=fairness_tolerance, device=device)
    if not report.ok:
        raise AssertionError("robustness or fairness under attack regressed:\n" + report.text())
    return report
