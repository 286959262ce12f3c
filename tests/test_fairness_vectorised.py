"""The vectorised fairness statistics equal straightforward reference implementations, to the bit.

The references below are the per-group / per-row forms the published intervals were computed with; the fast forms in
:mod:`robustbench_med.fairness` must reproduce them exactly (same random stream, same additions in the same order),
so no published number moves. No timing here: speed is measured in ``benchmarks/bench_store.py``.
"""
import json
import math

import numpy as np
import pandas as pd
import pytest

from robustbench_med.errors import ConfigError
from robustbench_med.fairness import (
    binary_labels, bootstrap_group_stats, fairness_columns, group_columns, group_frame, json_frame, metrics_frame,
    replicate_means,
)


def reference_bootstrap(clean, robust, codes, n_groups, n_boot, seed):
    """The per-group paired gather: ``n_boot`` replicates of each group drawn with one ``integers`` call, paired
    clean/robust scores averaged with ``mean(1)`` of the ``(n_boot, n_g, 2)`` gather."""
    rng = np.random.default_rng(seed)
    means = np.empty((n_boot, n_groups, 2))
    pair = np.stack([clean, robust], 1)
    for g in range(n_groups):
        idx = np.flatnonzero(codes == g)
        draw = idx[rng.integers(0, len(idx), size=(n_boot, len(idx)))]
        means[:, g, :] = pair[draw].mean(1)
    gaps = means.max(1) - means.min(1)
    stats = {"clean_gap": gaps[:, 0], "robust_gap": gaps[:, 1], "gap_change": gaps[:, 1] - gaps[:, 0],
             "robust_worst": means[:, :, 1].min(1)}
    return {k: (float(np.quantile(v, 0.025)), float(np.quantile(v, 0.975))) for k, v in stats.items()}


def loop_bootstrap_means(values, codes, n_groups, n_boot, seed):
    """The most literal form: one ``integers`` call and one sequential sum per group and replicate."""
    rng = np.random.default_rng(seed)
    means = np.empty((n_boot, n_groups))
    for g in range(n_groups):
        idx = np.flatnonzero(codes == g)
        for b in range(n_boot):
            total = 0.0
            for i in idx[rng.integers(0, len(idx), size=len(idx))]:
                total += values[i]
            means[b, g] = total / len(idx)
    return means


def _data(seed, n, sizes_p, constant=None):
    rng = np.random.default_rng(seed)
    codes = rng.choice(len(sizes_p), n, p=sizes_p)
    clean = rng.random(n) * math.pi
    robust = clean * rng.random(n) if constant is None else np.full(n, constant)
    return clean, robust, codes


@pytest.mark.parametrize("seed,n,sizes_p,n_boot,constant", [
    (0, 500, [0.05, 0.15, 0.8], 200, None),     # unequal groups
    (1, 37, [0.1, 0.9], 50, None),              # a group of a few samples
    (2, 300, [0.5, 0.5], 1, None),              # one replicate
    (3, 300, [0.3, 0.7], 2, 1 / 3),             # constant, not exactly representable
    (4, 64, [0.2, 0.3, 0.5], 17, 0.25),         # constant, exact
])
def test_bootstrap_group_stats_equals_reference_bit_for_bit(seed, n, sizes_p, n_boot, constant):
    clean, robust, codes = _data(seed, n, sizes_p, constant)
    k = len(sizes_p)
    assert bootstrap_group_stats(clean, robust, codes, k, n_boot, seed) == reference_bootstrap(clean, robust, codes, k, n_boot, seed)


def test_single_sample_groups_and_integer_scores():
    codes = np.array([0, 1, 1, 1, 2, 2])
    clean, robust = np.array([1, 0, 1, 1, 0, 1]), np.array([0, 0, 1, 0, 0, 1])
    assert bootstrap_group_stats(clean, robust, codes, 3, 40, 7) == reference_bootstrap(clean, robust, codes, 3, 40, 7)


def test_an_empty_group_is_a_clear_error():
    with pytest.raises(ConfigError, match="no samples"):
        bootstrap_group_stats(np.ones(4), np.ones(4), np.array([0, 0, 2, 2]), 3, 10, 0)


@pytest.mark.parametrize("n_boot", [1, 2, 9, 100])
def test_replicate_means_are_the_literal_sequential_means(n_boot):
    values, _, codes = _data(5, 90, [0.4, 0.6])
    loop = loop_bootstrap_means(values, codes, 2, n_boot, 11)
    rng = np.random.default_rng(11)
    for g in range(2):
        v = values[codes == g]
        draw = rng.integers(0, len(v), size=(n_boot, len(v)), dtype=np.int32)
        assert np.array_equal(replicate_means(v, draw), loop[:, g])


@pytest.mark.parametrize("dtype", [np.int64, np.int32])
def test_one_draw_of_all_replicates_is_the_stream_of_successive_draws(dtype):
    """``integers(0, n, size=(B, n))`` (int32 or int64) draws what B successive ``integers(0, n, size=n)`` would."""
    for n in (1, 2, 7, 255, 256, 1000, 70_000):
        a, b = np.random.default_rng(n), np.random.default_rng(n)
        block = a.integers(0, n, size=(13, n), dtype=dtype)
        assert np.array_equal(block, np.stack([b.integers(0, n, size=n) for _ in range(13)]))
        assert a.integers(0, 10**6) == b.integers(0, 10**6), "the generators continue in step"


def test_group_frame_equals_mask_reference():
    rng = np.random.default_rng(3)
    groups = rng.choice(np.array(["F*old", "M*young", "F*young", "lonely"], dtype=object), 200, p=[0.5, 0.3, 0.195, 0.005])
    groups[0] = "lonely"
    values = {"clean": rng.random(200), "robust": np.full(200, 0.1)}
    ours = group_frame(values, groups)
    levels = sorted(set(groups))
    for k, v in values.items():
        assert [ours.by_group.loc[level, k] for level in levels] == [float(np.mean(v[groups == level])) for level in levels]
        assert ours.overall[k] == float(np.mean(v))
    assert list(ours.by_group.index) == levels


def test_intersection_labels_equal_the_joined_values():
    rng = np.random.default_rng(4)
    attrs = pd.DataFrame({"sex": rng.choice(["F", "M"], 50), "age_group": rng.choice(["young", "old"], 50), "site": "a"})
    cols = group_columns(attrs)
    assert list(cols["sex*age_group"]) == [f"{s}*{a}" for s, a in zip(attrs.sex, attrs.age_group)]
    assert cols["sex*age_group"].dtype == object and set(cols) == {"sex", "age_group", "site", "sex*age_group"}
    assert len(group_columns(attrs.iloc[:0])["sex*age_group"]) == 0


def test_decoding_each_distinct_text_once_equals_decoding_every_row():
    rows = [json.dumps({"accuracy": 1.0, "prob_pos": 0.7}), json.dumps({"accuracy": 0.0}), None,
            json.dumps({"accuracy": 1.0, "prob_pos": 0.7}), json.dumps({"n": 3, "accuracy": 1.0}), float("nan")]
    samples = pd.DataFrame({"metrics": rows}, index=[10, 11, 12, 13, 14, 15])

    def decode(v):
        return json.loads(v) if isinstance(v, str) else {}

    reference = pd.DataFrame([decode(v) for v in rows], index=samples.index)
    pd.testing.assert_frame_equal(metrics_frame(samples), reference)
    decoded = pd.DataFrame({"metrics": [json.loads(r) if isinstance(r, str) else {} for r in rows]}, index=samples.index)
    pd.testing.assert_frame_equal(metrics_frame(decoded), reference)  # already decoded (unhashable) rows
    texts = pd.Series([json.dumps({"sex": s, "age_group": a}) for s, a in zip("FMFFM", ["old", "young", "old", "old", "mid"])]
                      + [json.dumps({"sex": "M", "age_group": "old", "site": 2})], index=range(5, -1, -1))
    pd.testing.assert_frame_equal(json_frame(texts), pd.DataFrame([json.loads(t) for t in texts], index=texts.index))
    pred, correct = ["1", "0", "1", 1, 0.0, "0"], [1, 1, 0, 0, 1, 1]
    assert binary_labels(pred, correct).tolist() == [1, 0, 0, 0, 0, 0]
    assert binary_labels(pd.Series(pred, dtype=object), correct).tolist() == [1, 0, 0, 0, 0, 0]


def test_non_finite_rows_are_left_out_once_for_every_attribute():
    rng = np.random.default_rng(8)
    n = 120
    y = rng.integers(0, 2, n)
    rows = pd.DataFrame({"clean_score": rng.random(n), "adv_score": rng.random(n), "clean_correct": 1, "adv_correct": 1,
                         "clean_pred": [json.dumps(int(v)) for v in y], "adv_pred": [json.dumps(int(v)) for v in y],
                         "metrics": [json.dumps({"prob_pos": float(p)}) for p in rng.random(n)]})
    rows.loc[[3, 50], "adv_score"] = np.nan
    attrs = pd.DataFrame({"sex": rng.choice(["F", "M"], n), "age_group": rng.choice(["young", "old"], n)})
    out = fairness_columns(rows, attrs, "binary", "accuracy", n_boot=30)
    keep = rows.adv_score.notna().to_numpy()
    same = fairness_columns(rows[keep].reset_index(drop=True), attrs[keep].reset_index(drop=True), "binary", "accuracy", n_boot=30)
    assert out.pop("notes").startswith("2 samples with a non-finite score left out")
    same.pop("notes")
    assert out == same


def reference_group_table(samples, attrs):
    """One pandas group-by per cell and attribute (the per-cell loop the plots were drawn from)."""
    rows = []
    for cell_id, sub in samples.groupby("cell_id", sort=False):
        for attr, g in group_columns(attrs.loc[sub.index]).items():
            frame = pd.DataFrame({"g": g, "clean": sub.clean_score.to_numpy(float), "robust": sub.adv_score.to_numpy(float)})
            for level, s in frame.groupby("g"):
                rows.append({"cell_id": cell_id, "attribute": attr, "group": level, "n": len(s),
                             "clean": float(s.clean.mean()), "robust": float(s.robust.mean())})
    return pd.DataFrame(rows)


def test_group_table_equals_the_per_cell_group_by():
    from robustbench_med.fairness import group_table

    rng = np.random.default_rng(9)
    n = 400
    samples = pd.DataFrame({"cell_id": rng.choice(["z", "a", "m"], n), "clean_score": rng.random(n) / 3,
                            "adv_score": rng.random(n) * math.e}, index=rng.permutation(1000)[:n])
    samples.loc[samples.index[:5], "adv_score"] = np.nan  # skipped by the mean, counted in n
    sex = rng.choice(["M", "F"], n)
    sex[samples.cell_id.to_numpy() == "a"] = "F"  # a cell with one sex only
    attrs = pd.DataFrame({"sex": sex, "age_group": rng.choice(["old", "young", "mid"], n, p=[0.6, 0.39, 0.01])},
                         index=samples.index)
    pd.testing.assert_frame_equal(group_table(samples, attrs), reference_group_table(samples, attrs))
    assert group_table(samples.iloc[:0], attrs.iloc[:0]).empty
