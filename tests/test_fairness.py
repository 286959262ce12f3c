"""Fairness under attack: group metrics checked against Fairlearn, ES-Dice by hand, CI coverage, store round trip."""
import json

import numpy as np
import pandas as pd
import pytest
from fairlearn.metrics import MetricFrame, demographic_parity_difference, equalized_odds_difference
from sklearn.metrics import accuracy_score

from robustbench_med.errors import ConfigError
from robustbench_med.fairness import (
    bootstrap_group_stats, compare_defenses, compare_groups, es_fairmedfm, es_fairseg, expected_calibration_error, fairness_columns,
    fairness_table, group_table, group_table_from_store, plot_group_gaps,
)


def _binary_cell(seed: int, n: int = 300, degenerate: bool = False):
    """Random binary-classifier rows as the runner stores them (predictions as JSON text)."""
    rng = np.random.default_rng(seed)
    sex = rng.choice(["F", "M"], n)
    age = rng.choice(["young", "middle", "old"], n)
    y = rng.integers(0, 2, n)
    if degenerate:
        y[(sex == "F") & (age == "old")] = 1  # a cell without negatives: FPR is 0 by Fairlearn's convention
    clean = np.where(rng.random(n) < 0.8, y, 1 - y)
    adv = np.where(rng.random(n) < 0.5 + 0.2 * (sex == "M"), y, 1 - y)
    rows = pd.DataFrame({
        "clean_score": (clean == y).astype(float), "adv_score": (adv == y).astype(float),
        "clean_correct": (clean == y).astype(int), "adv_correct": (adv == y).astype(int),
        "clean_pred": [json.dumps(int(v)) for v in clean], "adv_pred": [json.dumps(int(v)) for v in adv],
        "metrics": [json.dumps({"accuracy": float(a == t)}) for a, t in zip(adv, y)],
        "eps": 0.03, "linf": 0.03, "l2": 1.0, "valid": 1,
    })
    return rows, pd.DataFrame({"sex": sex, "age_group": age}), y, clean, adv


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_group_metrics_match_fairlearn(seed):
    rows, attrs, y, clean, adv = _binary_cell(seed)
    out = fairness_columns(rows, attrs, "binary", "accuracy", n_boot=50)
    sf = {"sex": attrs.sex, "age_group": attrs.age_group, "sex*age_group": attrs[["sex", "age_group"]]}
    for attr, feature in sf.items():
        for kind, pred in (("clean", clean), ("robust", adv)):
            mf = MetricFrame(metrics=accuracy_score, y_true=y, y_pred=pred, sensitive_features=feature)
            for level, value in mf.by_group.items():
                label = "*".join(level) if isinstance(level, tuple) else level
                assert out[f"{kind}_accuracy[{attr}={label}]"] == pytest.approx(value)
            assert out[f"{kind}_gap_accuracy[{attr}]"] == pytest.approx(mf.difference())
            assert out[f"{kind}_ratio_accuracy[{attr}]"] == pytest.approx(mf.ratio())
            assert out[f"{kind}_worst_group_accuracy[{attr}]"] == pytest.approx(mf.group_min())
            worst = mf.by_group.idxmin()
            assert out[f"{kind}_worst_group[{attr}]"] == ("*".join(worst) if isinstance(worst, tuple) else worst)
            assert out[f"{kind}_dp_difference[{attr}]"] == pytest.approx(demographic_parity_difference(y, pred, sensitive_features=feature))
            assert out[f"{kind}_eo_difference[{attr}]"] == pytest.approx(equalized_odds_difference(y, pred, sensitive_features=feature))
        assert out[f"gap_change_accuracy[{attr}]"] == pytest.approx(out[f"robust_gap_accuracy[{attr}]"] - out[f"clean_gap_accuracy[{attr}]"])
        lo, hi = out[f"robust_gap_accuracy_ci95_low[{attr}]"], out[f"robust_gap_accuracy_ci95_high[{attr}]"]
        assert lo <= hi


def test_degenerate_groups_follow_fairlearn_and_are_named():
    rows, attrs, y, _clean, adv = _binary_cell(3, degenerate=True)
    out = fairness_columns(rows, attrs, "binary", "accuracy", n_boot=20)
    sf = attrs[["sex", "age_group"]]
    assert out["robust_eo_difference[sex*age_group]"] == pytest.approx(equalized_odds_difference(y, adv, sensitive_features=sf))
    assert out["eo_degenerate_groups[sex*age_group]"] == "F*old"
    assert out["eo_degenerate_groups[sex]"] == ""


def test_es_dice_both_forms_by_hand():
    # F: 0.8, 0.6 (mean 0.7); M: 0.4 -> overall 0.6
    rows = pd.DataFrame({"clean_score": [0.8, 0.6, 0.4], "adv_score": [0.5, 0.5, 0.2], "metrics": ["{}"] * 3})
    attrs = pd.DataFrame({"sex": ["F", "F", "M"], "age_group": ["old", "old", "old"]})
    out = fairness_columns(rows, attrs, "segmentation", "dice_fg", n_boot=20)
    assert out["clean_es_dice_fairseg[sex]"] == pytest.approx(0.6 / (1 + 0.1 + 0.2))
    assert out["clean_es_dice_fairmedfm[sex]"] == pytest.approx(0.6 / (1 + 0.15))
    # robust: F 0.5, M 0.2, overall 0.4 -> Σ|dev| = 0.1 + 0.2, population std = 0.15
    assert out["robust_es_dice_fairseg[sex]"] == pytest.approx(0.4 / 1.3)
    assert out["robust_es_dice_fairmedfm[sex]"] == pytest.approx(0.4 / 1.15)
    assert "clean_es_dice_fairseg[age_group]" not in out  # one group: no gap, no ES
    assert "Dice only" in out["notes"]
    # three groups: FairMedFM's std is the population std (ddof 0)
    assert es_fairmedfm(0.5, [0.2, 0.5, 0.8]) == pytest.approx(0.5 / (1 + np.std([0.2, 0.5, 0.8])))
    assert es_fairseg(0.5, [0.5, 0.5]) == 0.5


def test_es_iou_from_stored_iou():
    metrics = [json.dumps({"dice_fg": d, "iou_fg": d / (2 - d)}) for d in (0.8, 0.6, 0.4)]
    rows = pd.DataFrame({"clean_score": [0.8, 0.6, 0.4], "adv_score": [0.8, 0.6, 0.4], "metrics": metrics})
    attrs = pd.DataFrame({"sex": ["F", "F", "M"], "age_group": ["old", "young", "old"]})
    out = fairness_columns(rows, attrs, "segmentation", "dice_fg", n_boot=20)
    iou = np.array([0.8, 0.6, 0.4]) / (2 - np.array([0.8, 0.6, 0.4]))
    overall, means = iou.mean(), [iou[:2].mean(), iou[2]]
    assert out["robust_es_iou_fairseg[sex]"] == pytest.approx(es_fairseg(overall, means))
    assert out["robust_es_iou_fairmedfm[sex]"] == pytest.approx(overall / (1 + np.std(means)))


def test_bootstrap_ci_coverage():
    """The stratified percentile CI of a clearly non-zero gap covers the true gap about 95% of the time."""
    rng = np.random.default_rng(0)
    true_gap, hits, reps = 0.2, 0, 200
    codes = np.repeat([0, 1], 120)
    for r in range(reps):
        v = (rng.random(240) < np.where(codes == 0, 0.75, 0.55)).astype(float)
        lo, hi = bootstrap_group_stats(v, v, codes, 2, 300, seed=r)["robust_gap"]
        hits += lo <= true_gap <= hi
    assert 0.88 <= hits / reps <= 0.99
    big = np.repeat([0, 1], 2000)
    v = (rng.random(4000) < np.where(big == 0, 0.75, 0.55)).astype(float)
    lo_big, hi_big = bootstrap_group_stats(v, v, big, 2, 300, seed=0)["robust_gap"]
    assert hi_big - lo_big < (hi - lo) / 2, "the interval must shrink with more samples"


def test_expected_calibration_error_by_hand_and_per_group():
    # conf 0.9, 0.9 (one right) | 0.8 right | 0.6 right -> (2/4)|0.5-0.9| + (1/4)|1-0.8| + (1/4)|1-0.6| = 0.35
    assert expected_calibration_error(np.array([0.9, 0.9, 0.2, 0.6]), np.array([1, 0, 0, 1])) == pytest.approx(0.35)
    rows, attrs, y, _clean, adv = _binary_cell(4)
    prob = np.where(adv == 1, 0.9, 0.1)
    rows["metrics"] = [json.dumps({"accuracy": 1.0, "prob_pos": float(p)}) for p in prob]
    out = fairness_columns(rows, attrs, "binary", "accuracy", n_boot=20)
    f = (attrs.sex == "F").to_numpy()
    assert out["robust_ece[sex=F]"] == pytest.approx(expected_calibration_error(prob[f], y[f]))
    assert out["robust_ece_gap[sex]"] == pytest.approx(abs(out["robust_ece[sex=F]"] - out["robust_ece[sex=M]"]))
    assert "calibration" not in out["notes"] or "clean" in out["notes"]


def test_notes_and_bad_input():
    rows, attrs, *_ = _binary_cell(5, n=60)
    out = fairness_columns(rows, attrs, "classification", "accuracy", n_boot=10)
    assert "binary tasks only" in out["notes"] and not any("dp_difference" in k for k in out)
    no_pred = rows.assign(clean_pred=None, adv_pred=None)
    assert "not stored" in fairness_columns(no_pred, attrs, "binary", "accuracy", n_boot=10)["notes"]
    with pytest.raises(ConfigError):
        fairness_columns(rows, attrs.iloc[:10], "binary", "accuracy")
    with pytest.raises(ConfigError):
        fairness_columns(rows.drop(columns="adv_score"), attrs, "binary", "accuracy")
    assert fairness_columns(rows, attrs, "binary", "accuracy", n_boot=10, seed=1) == fairness_columns(rows, attrs, "binary", "accuracy", n_boot=10, seed=1)


def test_compare_groups_is_paired():
    rows, attrs, *_ = _binary_cell(6, n=200)
    rows["sample_idx"] = range(len(rows))
    same = compare_groups(rows, rows, attrs, "sex", n_boot=100)
    assert same["gap_diff"] == 0 and same["gap_diff_ci95_low"] == 0 and same["gap_diff_ci95_high"] == 0
    fairer = rows.assign(adv_score=rows.adv_score.mean())  # every sample equal: no gap
    diff = compare_groups(rows, fairer, attrs, "sex", n_boot=100)
    assert diff["gap_other"] == pytest.approx(0) and diff["gap_diff"] == pytest.approx(-diff["gap_base"])


def test_store_round_trip_table_and_plot(tmp_path):
    from robustbench_med.store import Store

    with Store(tmp_path / "r.sqlite") as st:
        for k, (eps, defense) in enumerate(((2 / 255, "identity.none"), (8 / 255, "identity.none"), (2 / 255, "apple.latent"))):
            rows, attrs, *_ = _binary_cell(10 + k % 2, n=80)
            if defense == "apple.latent":
                rows["adv_score"] = rows.adv_score.mean()  # a perfectly fair defended cell
            cell_id = f"c{k}"
            st.upsert_cell({"cell_id": cell_id, "grid": "g", "victim": "cnn.phantom", "task": "binary", "metric": "accuracy",
                            "defense": defense, "attack": "pgd.linf", "attack_params": {"eps": eps},
                            "threat": {"eps": eps, "norm": "Linf"}, "status": "done"})
            st.write_unit([{**r, "cell_id": cell_id, "sample_idx": i, "attrs": a} for i, (r, a) in
                           enumerate(zip(rows.to_dict("records"), attrs.to_dict("records")))])
        table = fairness_table(st, n_boot=20)
        long = group_table_from_store(st)
        comparison = compare_defenses(st, n_boot=50)
    assert len(table) == 3 and "robust_gap_accuracy[sex]" in table and set(table.eps) == {2 / 255, 8 / 255}
    adv = comparison[comparison.attack == "pgd.linf"].set_index("attribute")
    assert set(comparison.attack) == {"clean", "pgd.linf"} and len(adv) == 3
    assert adv.loc["sex", "gap_other"] == pytest.approx(0) and adv.loc["sex", "gap_diff"] == pytest.approx(-adv.loc["sex", "gap_base"])
    assert (long.groupby(["cell_id", "attribute"]).n.sum() == 80).all()
    assert set(long.attribute) == {"sex", "age_group", "sex*age_group"}
    png = plot_group_gaps(long, tmp_path / "gaps.png")
    assert png is not None and png.stat().st_size > 1000
    assert plot_group_gaps(group_table(pd.DataFrame(columns=["cell_id"]), pd.DataFrame()), tmp_path / "none.png") is None


@pytest.mark.parametrize("seed", [0, 1])
def test_group_means_and_rates_equal_fairlearns_metric_frame_bit_for_bit(seed):
    from robustbench_med.fairness import group_frame, group_rates

    rng = np.random.default_rng(seed)
    n = 301
    groups = rng.choice(["old", "middle", "young", "F*old"], n)
    values = {"clean": rng.random(n), "robust": rng.random(n) * (rng.random(n) < 0.5)}

    def column_mean(_t, _p, *, v):
        return float(np.mean(np.asarray(v, dtype=float)))

    mf = MetricFrame(metrics={k: column_mean for k in values}, y_true=np.zeros(n), y_pred=np.zeros(n),
                     sensitive_features=pd.Series(groups, name="group"),
                     sample_params={k: {"v": v} for k, v in values.items()})
    ours = group_frame(values, groups)
    assert ours.by_group.equals(mf.by_group.astype(float)) and list(ours.by_group.index) == list(mf.by_group.index)
    for method in ("difference", "ratio", "group_min"):
        assert getattr(ours, method)().equals(getattr(mf, method)().astype(float))
    assert ours.overall.equals(mf.overall.astype(float))
    y = rng.integers(0, 2, n)
    y[groups == "young"] = 1  # a group without negatives: FPR 0 as in Fairlearn
    preds = {"clean": rng.integers(0, 2, n)}

    def rate(kind):
        def fn(t, _p, *, pred):
            m = np.asarray(t) == (1 if kind == "tpr" else 0)
            return float(np.mean(np.asarray(pred)[m])) if m.any() else 0.0
        return fn

    ref = MetricFrame(metrics={"sr_clean": lambda t, p, *, pred: float(np.mean(pred)), "tpr_clean": rate("tpr"),
                               "fpr_clean": rate("fpr")}, y_true=y, y_pred=np.zeros(n),
                      sensitive_features=pd.Series(groups, name="group"),
                      sample_params={k: {"pred": preds["clean"]} for k in ("sr_clean", "tpr_clean", "fpr_clean")})
    assert group_rates(y, preds, groups).equals(ref.by_group.astype(float))
