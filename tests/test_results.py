"""The results layer: one worst case over attacks, one threshold lookup, one baseline rule, one gap; the tidy
summary round-trips to the wide view."""
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import robustbench_med
from robustbench_med import fairness, results as R
from robustbench_med.tasks import task_spec

PACKAGE = Path(robustbench_med.__file__).parent


def _sources() -> dict[str, str]:
    return {str(p.relative_to(PACKAGE)): p.read_text() for p in PACKAGE.rglob("*.py")}


def test_the_worst_case_threshold_baseline_and_gap_rules_have_one_home():
    """grep: the per-sample minimum over attacks, a hard-coded success threshold and the noise-name rule appear only
    in results.py (the entry validator re-checks a stored minimum through results.worst_case_scores)."""
    patterns = {
        "per-sample minimum": re.compile(r'sort_values\(\["sample_idx", "adv_score"\]|\("adv_score", "min"\)|np\.min\(\[.*(adv|rerun)'),
        "hard-coded threshold": re.compile(r"\bthr(eshold)? = 0\.5"),
        "baseline by name": re.compile(r'startswith\("noise\.'),
    }
    for what, pattern in patterns.items():
        where = sorted(f for f, text in _sources().items() if pattern.search(text))
        assert set(where) <= {"results.py"}, f"{what} outside results.py: {where}"
    gap = re.compile(r"\.max\([^)]*\) - [^#\n]*\.min\(|max\([^)]*\) - min\(|np\.ptp\(")
    gap_sites = {f for f, text in _sources().items() if gap.search(text)}
    assert gap_sites <= {"fairness.py", "seed_studies.py"}, f"a group gap computed outside fairness.group_gap: {gap_sites}"
    assert len(gap.findall(_sources()["fairness.py"])) == 2  # the two branches of fairness.group_gap
    assert "ptp" not in _sources()["seed_studies.py"].replace("np.ptp(m.mean(-1), axis=1)", "").replace(
        "np.ptp(_per_seed(a))", "").replace("np.ptp(_per_seed(b))", "")  # ranges over seeds, not group gaps
    assert "def worst_case_samples" in _sources()["results.py"]
    assert "worst_case_scores(" in _sources()["entry_schema.py"]
    entries_src = _sources()["entries.py"]
    builder = entries_src[entries_src.index("def _worst_case_row"):entries_src.index("def worst_case_group_stats")]
    assert "worst_case_scores(" in builder and "np.min" not in builder


def _summary() -> pd.DataFrame:
    base = {"victim": "v", "task": "binary", "metric": "accuracy", "defense": "identity.none", "defense_params": "{}",
            "attack_through": "adaptive", "norm": "Linf", "eps": 8 / 255, "eps_display": "8/255", "status": "done",
            "robust": 0.5, "weights_sha256": None}
    rows = [("c1", "pgd.linf", "white-box"), ("c2", "fgsm.linf", "white-box"), ("c3", "noise.uniform", "none"),
            ("c4", "square.linf", "black-box")]
    out = [{**base, "cell_id": c, "attack": a, "knowledge": k} for c, a, k in rows]
    out.append({**base, "cell_id": "c5", "attack": "pgd.linf", "knowledge": "white-box", "status": "invalid", "robust": np.nan})
    corr = {**base, "norm": "corruption", "eps": 3.0, "eps_display": "3", "knowledge": "none"}
    out += [{**corr, "cell_id": "k1", "attack": "corruption.blur"}, {**corr, "cell_id": "k2", "attack": "corruption.noise"}]
    return pd.DataFrame(out)


def _samples(scores: dict[str, list[float]], clean: float = 1.0) -> pd.DataFrame:
    return pd.DataFrame([{"cell_id": c, "sample_idx": i, "clean_score": clean, "clean_correct": int(clean >= 0.5),
                          "adv_score": v, "adv_correct": int(v >= 0.5), "metrics": "{}"}
                         for c, vals in scores.items() for i, v in enumerate(vals)])


def test_worst_case_cells_skip_baselines_invalid_cells_and_single_attacks():
    found = {wc.key[4]: wc for wc in R.worst_case_cells(_summary())}
    assert found["Linf"].cell_ids == ("c1", "c2", "c4")  # noise baseline and the invalid cell left out
    assert found["corruption"].cell_ids == ("k1", "k2")  # corruptions are never baselines
    assert R.is_baseline("none", "Linf") and R.is_baseline("none", "L2")
    assert not R.is_baseline("none", "corruption") and not R.is_baseline("black-box", "Linf") and not R.is_baseline(None, "Linf")
    one = _summary()[lambda d: d.cell_id.isin(["c1", "c3"])]
    assert list(R.worst_case_cells(one)) == []  # one real attack: no worst case


def test_worst_case_is_the_per_sample_minimum_scored_at_the_task_threshold(monkeypatch):
    summary = _summary()
    samples = _samples({"c1": [0.9, 0.2, 0.7], "c2": [0.3, 0.8, 0.7], "c4": [0.6, 0.6, 0.1], "c3": [0.0, 0.0, 0.0]})
    wc = next(w for w in R.worst_case_cells(summary) if w.key[4] == "Linf")
    worst = R.worst_case_samples(samples[samples.cell_id.isin(wc.cell_ids)], 0.5)
    assert worst.adv_score.tolist() == [0.3, 0.2, 0.1] and worst.cell_id.tolist() == ["c2", "c1", "c4"]
    assert R.worst_case_scores({"a": [0.9, 0.2], "b": [0.3, 0.8]}).tolist() == [0.3, 0.2]
    row = R.summarize_worst_case(wc, summary, samples, None, 0).to_row()
    assert row["attack"] == "worst-case(3 attacks)" and json.loads(row["attack_params"]) == ["fgsm.linf", "pgd.linf", "square.linf"]
    assert row["robust"] == pytest.approx(0.2) and row["attack_success_rate"] == 1.0 and "attack_seconds" not in row
    assert R.success_threshold("binary") == task_spec("binary").success_threshold
    monkeypatch.setattr(R, "success_threshold", lambda task: 0.25)  # the task's threshold decides success
    assert R.summarize_worst_case(wc, summary, samples, None, 0).to_row()["attack_success_rate"] == pytest.approx(2 / 3)


def test_group_gaps_are_fairlearn_style_differences():
    scores = np.array([1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    attrs = {i: {"sex": s} for i, s in enumerate("FFFMMM")}
    out = R.group_gaps(scores, attrs, 6)
    assert out == {"robust_gap_sex": pytest.approx(1 / 3), "worst_group_robust_sex": pytest.approx(1 / 3), "worst_group_sex": "M"}
    frame = fairness.group_frame({"s": scores}, np.array(list("FFFMMM")))
    assert out["robust_gap_sex"] == float(frame.difference()["s"])


def _wide() -> pd.DataFrame:
    head = {"cell_id": "c1", "victim": "v", "task": "binary", "metric": "accuracy", "defense": "identity.none",
            "defense_params": "{}", "attack_through": "adaptive", "attack": "pgd.linf", "attack_params": "{}",
            "knowledge": "white-box", "norm": "Linf", "eps": 8 / 255, "eps_display": "8/255", "status": "done", "reason": "",
            "n": 4, "weights_sha256": None, "flags": ["randomized"]}
    values = {"clean": 1.0, "robust": 0.5, "robust_ci95_low": 0.1, "robust_ci95_high": 0.9, "attack_success_rate": 0.5,
              "robust_accuracy[sex=F]": 1.0, "robust_accuracy[sex=M]": 0.0, "robust_gap_accuracy[sex]": 1.0,
              "robust_gap_accuracy_ci95_low[sex]": 0.5, "robust_gap_accuracy_ci95_high[sex]": 1.0,
              "robust_worst_group[sex]": "M", "robust_worst_group_accuracy[sex]": 0.0, "detector_auroc": 0.7}
    values.update(R.headline_aliases(values, "accuracy"))
    worst = {**head, "cell_id": "", "attack": "worst-case(2 attacks)", "flags": [], "clean": 1.0, "robust": 0.25,
             "robust_ci95_low": 0.0, "robust_ci95_high": 0.7, "attack_success_rate": 0.75}
    return pd.DataFrame([{**head, **values}, worst])


def test_tidy_summary_has_each_metric_once_and_round_trips_to_the_wide_view():
    wide = _wide()
    assert {"robust_gap_sex", "worst_group_robust_sex", "worst_group_sex"} <= set(wide.columns)
    tidy = R.tidy_summary(wide)
    assert not tidy.duplicated(["row", "metric", "group_attr", "group"]).any()
    assert not set(tidy.metric) & {"robust_gap_sex", "worst_group_robust_sex", "worst_group_sex"}  # aliases are not metrics
    robust = tidy[(tidy.row == 0) & (tidy.metric == "robust")].iloc[0]
    assert (robust.value, robust.ci_low, robust.ci_high, robust.task_metric) == (0.5, 0.1, 0.9, "accuracy")
    gap = tidy[(tidy.metric == "robust_gap_accuracy")].iloc[0]
    assert (gap.group_attr, gap.group, gap.value, gap.ci_low) == ("sex", "", 1.0, 0.5)
    assert tidy[tidy.metric == "robust_accuracy"].group.tolist() == ["F", "M"]
    assert tidy[tidy.metric == "robust_worst_group"].label.tolist() == ["M"]
    back = R.wide_from_tidy(tidy)
    assert set(back.columns) == set(wide.columns)
    pd.testing.assert_frame_equal(back[list(wide.columns)], wide, check_dtype=False)


@pytest.mark.parametrize("name, parsed", [
    ("robust", ("robust", "", "", "value")), ("robust_ci95_high", ("robust", "", "", "ci_high")),
    ("n[sex*age_group=F*old]", ("n", "sex*age_group", "F*old", "value")),
    ("gap_change_accuracy_ci95_low[age_group]", ("gap_change_accuracy", "age_group", "", "ci_low")),
    ("robust_gap_sex", None)])
def test_column_names_parse_and_rebuild(name, parsed):
    assert R.parse_column(name) == parsed
    if parsed:
        assert R.column_name(*parsed) == name


def test_store_reading_moved_out_of_fairness_with_shims():
    for name in ("store_frames", "fairness_table", "compare_defenses", "group_table_from_store"):
        assert getattr(fairness, name) is getattr(R, name)
        assert f"def {name}(" not in (PACKAGE / "fairness.py").read_text()
    with pytest.raises(AttributeError):
        fairness.no_such_function  # noqa: B018
