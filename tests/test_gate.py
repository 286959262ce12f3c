"""The regression gate: exact McNemar, paired and stratified bootstrap, Holm adjustment, and the claim that matters
on trained models — a retrain of the same recipe with another seed passes, a checkpoint ≥ 10 points less robust
fails (n = 256 phantom samples, PGD at 1/255, where the trained cnn.phantom keeps 0.66 robust accuracy; its
one-epoch checkpoint predicts the majority class, 0.50, and the seed-1 retrain reaches 0.75)."""
from dataclasses import replace

import numpy as np
import pytest

import robustbench_med as rbm
from robustbench_med.gate import (
    Delta,
    bootstrap_p,
    check_regression,
    group_deltas,
    holm,
    mcnemar_exact,
    resample_indices,
    score_delta,
)
from robustbench_med.registry import VICTIMS


def test_mcnemar_exact_counts_only_discordant_pairs():
    base = np.array([1] * 10 + [0] * 5 + [1] * 85)
    new = np.array([0] * 10 + [1] * 5 + [1] * 85)
    # b = 10 base-right/new-wrong, c = 5 the reverse: P(Binomial(15, 1/2) >= 10)
    from scipy.stats import binom

    assert mcnemar_exact(base, new) == pytest.approx(binom.sf(9, 15, 0.5))
    assert mcnemar_exact(base, base) == 1.0
    assert mcnemar_exact(new, base) > 0.5, "one-sided: a better candidate is not 'worse'"


def test_bootstrap_p_and_holm():
    assert bootstrap_p(np.full(999, 0.1)) == pytest.approx(1 / 1000)
    assert bootstrap_p(np.zeros(999)) == 1.0
    ds = [Delta("w", f"m{i}", 0, 0, 0, (0, 0), p, "t", 0.05) for i, p in enumerate([0.01, 0.04, 0.03, 0.5])]
    holm(ds, 0.05)
    assert [round(d.p_adjusted, 4) for d in ds] == [0.04, 0.09, 0.09, 0.5]  # 4·0.01, max(3·0.03, ·), 2·0.04, 0.5


def test_stratified_resampling_keeps_group_sizes():
    strata = np.array(["F"] * 30 + ["M"] * 70)
    idx = resample_indices(100, 50, np.random.default_rng(0), strata)
    assert idx.shape == (50, 100) and (strata[idx] == strata[np.sort(idx[0])][None, :].repeat(50, 0)).mean() > 0
    assert ((strata[idx] == "F").sum(1) == 30).all()


def test_a_real_drop_is_significant_and_noise_is_not():
    rng = np.random.default_rng(0)
    n = 256
    base = (rng.random(n) < 0.6).astype(float)
    idx = resample_indices(n, 2000, rng)
    worse = base.copy()
    worse[np.flatnonzero(base)[:40]] = 0  # 40 of 256 robust samples broken: −15.6 points
    d = score_delta("w", "robust accuracy", base, worse, True, idx, 0.05)
    assert d.worse == pytest.approx(40 / n) and d.p < 1e-6 and d.ci95[0] > 0.05
    flips = base.copy()
    on, off = np.flatnonzero(base)[:6], np.flatnonzero(base == 0)[:6]
    flips[on], flips[off] = 0, 1  # 6 lost and 6 gained: no change on average
    assert score_delta("w", "robust accuracy", base, flips, True, idx, 0.05).p > 0.5
    dice = rng.random(n)
    d = score_delta("w", "robust dice_fg", dice, dice - 0.08, False, idx, 0.05)
    assert d.test == "bootstrap" and d.p < 0.001 and d.worse == pytest.approx(0.08)
    strata = np.array(["F", "M"] * (n // 2))
    sidx = resample_indices(n, 2000, rng, strata)
    hurt = base.copy()
    hurt[(strata == "F") & (base == 1)] = 0  # every robust F example broken: the sex gap widens, F is the worst group
    gap, worst = group_deltas("w", "accuracy", base, hurt, strata, "sex", sidx, 0.05)
    assert gap.metric == "robust_gap[sex]" and gap.worse > 0.4 and gap.p < 0.001
    assert worst.metric == "worst_group_accuracy[sex]" and worst.new == 0 and worst.worse > 0.4


@pytest.fixture(scope="module")
def seeded_cnns():
    """cnn.phantom as registered (seed 0), a retrain of the same recipe with seed 1, and an early checkpoint of it
    (one epoch), trained in the test session's cache."""
    entry = VICTIMS.get("cnn.phantom")
    recipe = entry.meta["recipe"]
    names = {"cnn.phantom": recipe, "cnn.gate_seed1": replace(recipe, seed=1), "cnn.gate_epoch1": replace(recipe, epochs=1)}
    for name, r in names.items():
        if name not in VICTIMS:
            VICTIMS.add(name, entry.factory, **{**entry.meta, "recipe": r, "card": replace(entry.meta["card"], name=name)})
    for name in names:
        rbm.create_victim(name, train_if_missing=True, progress=False)
    yield list(names)
    for name in list(names)[1:]:
        VICTIMS.remove(name)


@pytest.fixture(scope="module")
def baseline(seeded_cnns, tmp_path_factory):
    from robustbench_med.entries import build_entries
    from robustbench_med.grid import parse_grid
    from robustbench_med.runner import run_grid

    grid = parse_grid({"name": "gate", "dataset": {"name": "phantom.ct", "split": "test"}, "n_examples": 256,
                       "batch_size": 128, "seed": 0, "victims": ["cnn.phantom"],
                       "attacks": [{"name": "pgd.linf", "params": {"eps": "1/255", "steps": 5}}]})
    return build_entries(run_grid(grid, tmp_path_factory.mktemp("gate"), progress=False))


def test_a_retrain_with_another_seed_passes(baseline):
    report = check_regression(baseline, victim="cnn.gate_seed1")
    assert report.ok, report.text()
    assert not report.warnings and {d.metric for d in report.deltas} >= {"robust accuracy", "clean accuracy", "robust_gap[sex]"}
    metrics = [(d.where, d.metric) for d in report.deltas]
    assert len(metrics) == len(set(metrics)), "each metric is listed once"


def test_a_checkpoint_ten_points_less_robust_fails(baseline):
    report = check_regression(baseline, victim="cnn.gate_epoch1")
    robust = next(d for d in report.deltas if d.metric == "robust accuracy")
    assert robust.worse >= 0.10, f"precondition: the early checkpoint must be >= 10 points less robust\n{report.text()}"
    assert not report.ok and robust.regressed, report.text()
