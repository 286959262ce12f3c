"""Seed studies with several arms and attack seeds, and condition labels that never overwrite one another."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from robustbench_med import paired_metrics as PM
from robustbench_med import seed_studies as SS


def _study_frames(attack_seed_spread: float) -> dict[tuple[str, str], pd.DataFrame]:
    """The 2D projector study's 4 arms × 3 training seeds; ``qformer8`` loses 0.2 more than the MLP under attack,
    ``pooled8`` as much; each victim ran the attack with 3 attack seeds spread by ``attack_seed_spread``."""
    rng = np.random.default_rng(1)
    base = rng.uniform(0.6, 0.9, 48)
    frames = {}
    for arm, extra_drop in (("mlp64", 0.0), ("pooled8", 0.0), ("qformer8", 0.2), ("qformer32", 0.0)):
        for seed, offset in zip((0, 1, 2), (-0.01, 0.0, 0.01)):
            name = f"projstudy.{arm}" + (f"_s{seed}" if seed else "")
            per_attack = pd.DataFrame({k: base - 0.3 - extra_drop + offset + d
                                       for k, d in zip((0, 1, 2), (-attack_seed_spread, 0.0, attack_seed_spread))})
            frame = pd.DataFrame({"clean": base + offset, "projector.whitebox 4/255": per_attack.mean(axis=1)})
            frame.attrs["attack_seeds"] = {"projector.whitebox 4/255": per_attack}
            frames[(name, "identity.none")] = frame
    return frames


def test_reference_arm_compares_every_arm_with_it(monkeypatch):
    frames = _study_frames(0.02)
    monkeypatch.setattr(SS, "condition_scores", lambda store: frames)
    assert SS.study_membership("projstudy.qformer32_s2") == ("projector2d", "qformer32", 2)
    table = SS.seed_study_table(None)
    assert sorted(set(zip(table.arm_a, table.arm_b))) == [("pooled8", "mlp64"), ("qformer32", "mlp64"), ("qformer8", "mlp64")]
    attacked = table[table.condition == "projector.whitebox 4/255"].set_index("arm_a")
    assert attacked.loc["qformer8", "drop_delta"] == pytest.approx(0.2)
    assert attacked.loc["qformer8", "verdict"] == "mlp64 higher; drop: qformer8 loses more"
    assert attacked.loc["pooled8", "verdict"] == "no difference shown"
    assert attacked.loc["qformer8", "attack_seeds"] == 3
    assert attacked.loc["qformer8", "attack_seed_range_a"] == pytest.approx(0.04)
    text = SS.to_markdown(table)
    assert "## Attack seeds" in text and "| projector2d | identity.none | projector.whitebox 4/255 | 3 | qformer8 | 0.040 |" in text


def test_attack_seeds_widen_the_interval(monkeypatch):
    """The third bootstrap level: a large spread between attack seeds must widen Δ's interval."""
    widths = {}
    for spread in (0.0, 0.3):
        frames = _study_frames(spread)
        monkeypatch.setattr(SS, "condition_scores", lambda store, f=frames: f)
        row = SS.seed_study_table(None).set_index(["arm_a", "condition"]).loc[("pooled8", "projector.whitebox 4/255")]
        widths[spread] = row.ci95_high - row.ci95_low
    assert widths[0.3] > widths[0.0] + 0.05


def test_condition_labels_average_attack_seeds_and_name_other_parameters(monkeypatch):
    """Cells differing only in ``seed`` are one condition (mean per sample); cells differing in another parameter
    get it in their label instead of overwriting each other."""
    threat = json.dumps({"eps": 8 / 255, "norm": "Linf"})
    cells = pd.DataFrame([
        {"cell_id": f"c{i}", "victim": "v", "defense": d, "attack_through": t, "attack": a, "threat": threat,
         "status": "done", "attack_params": json.dumps(p)}
        for i, (a, p, d, t) in enumerate([("qava.hidden", {"eps": 8 / 255, "seed": 0}, "identity.none", "adaptive"),
                                          ("qava.hidden", {"eps": 8 / 255, "seed": 1}, "identity.none", "adaptive"),
                                          ("qava.hidden", {"eps": 8 / 255, "pool": "unrelated"}, "identity.none", "adaptive"),
                                          ("pgd.linf", {"eps": 8 / 255}, "identity.none", "adaptive"),
                                          ("pgd.linf", {"eps": 8 / 255}, "f3.v3", "transfer"),
                                          ("pgd.linf", {"eps": 8 / 255, "eot": 8}, "f3.v3", "adaptive")])])
    scores = {"c0": [0.0, 0.2], "c1": [0.4, 0.6], "c2": [1.0, 1.0], "c3": [0.5, 0.5], "c4": [0.7, 0.7], "c5": [0.3, 0.3]}
    samples = pd.DataFrame([{"cell_id": c, "sample_idx": i, "clean_score": 1.0, "adv_score": v}
                            for c, vals in scores.items() for i, v in enumerate(vals)])
    import robustbench_med.results as RS

    monkeypatch.setattr(RS, "store_frames", lambda store: (cells, samples, pd.DataFrame()))
    frames = PM._condition_scores(None)
    assert set(frames) == {("v", "identity.none"), ("v", "f3.v3[transfer]"), ("v", "f3.v3")}  # routes kept apart
    assert frames[("v", "f3.v3[transfer]")]["pgd.linf 8/255"].tolist() == [0.7, 0.7]
    frame = frames[("v", "identity.none")]
    assert list(frame.columns) == ["clean", "qava.hidden[pool=None] 8/255", "qava.hidden[pool=unrelated] 8/255", "pgd.linf 8/255"]
    assert frame["qava.hidden[pool=None] 8/255"].tolist() == pytest.approx([0.2, 0.4])
    assert frame.attrs["attack_seeds"]["qava.hidden[pool=None] 8/255"].shape == (2, 2)
    assert frame["qava.hidden[pool=unrelated] 8/255"].tolist() == [1.0, 1.0]
