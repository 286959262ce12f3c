"""The APPLE shortcut study: the shortcut phantom (masks independent of sex, sex in the appearance, biased train
annotations), the default world left byte-for-byte unchanged, the probes and summaries, the comparison table, the
packaged grids and the shortcut victims' registration."""
import numpy as np
import pandas as pd
import pytest
import torch

import robustbench_med as rbm
from robustbench_med.cli import _grid_arg
from robustbench_med.cli_publish import PUBLISH_SETS
from robustbench_med.data import phantom as P
from robustbench_med.data.dataset import phantom_config, shortcut_config
from robustbench_med.errors import ConfigError
from robustbench_med.fairness import (append_defense_comparisons, data_attribute_probes, linear_probe,
                                      mask_area_features, split_group_summary)
from robustbench_med.grid import load_grid
from robustbench_med.registry import VICTIMS

# measured before the shortcut option existed (20:31 UTC, commit 8a448c6): the default world's cache key and the
# sha256 of the images and masks of test samples 0-19
DEFAULT_HASH = "d57e5955ecbc"
DEFAULT_BYTES_SHA256 = "6a567c199a25d28b6f1e06e130732ee2d0013ad432cee23f0a9bc2c9ab9c7abc"


def _sha(cols) -> str:
    import hashlib

    return hashlib.sha256(np.stack(cols["image"]).tobytes() + np.stack(cols["mask"]).tobytes()).hexdigest()


def test_default_world_unchanged():
    cfg = phantom_config()
    assert cfg.shortcut is None
    assert cfg.config_hash() == DEFAULT_HASH
    assert _sha(P.generate("test", 20, cfg)) == DEFAULT_BYTES_SHA256


def test_shortcut_config_is_a_different_cache_and_refuses_sex_in_the_anatomy():
    cfg = shortcut_config()
    assert cfg.config_hash() != DEFAULT_HASH
    assert shortcut_config(train_unannotated_f=0.0).config_hash() != cfg.config_hash()
    assert cfg.disparity.sex_independent() and not P.Disparity().sex_independent()
    with pytest.raises(ValueError, match="independent of sex"):
        P.PhantomConfig(shortcut=P.Shortcut())  # the default disparity builds sex into body size
    with pytest.raises(ValueError, match="train_unannotated"):
        P.Shortcut(train_unannotated={"F": 1.5, "M": 0.0})
    with pytest.raises(ConfigError, match="phantom.shortcut"):
        rbm.create_dataset("phantom.shortcut", split="val", n=4, train_unannotated_f=2.0)


@pytest.fixture(scope="module")
def samples():
    cfg = shortcut_config()
    return cfg, P.generate("val", 400, cfg)


def test_masks_independent_of_sex(samples):
    _cfg, cols = samples
    sex = np.array(cols["sex"])
    areas = mask_area_features(np.stack(cols["mask"]))
    assert 150 < (sex == "F").sum() < 250
    for c, name in enumerate(P.MASK_CLASSES[1:5], start=1):  # body, liver, kidneys, spine: relative difference < 3 %
        f, m = areas[sex == "F", c].mean(), areas[sex == "M", c].mean()
        assert abs(f - m) / m < 0.03, (name, f, m)
    lesion = np.array(cols["label"])
    assert abs(lesion[sex == "F"].mean() - lesion[sex == "M"].mean()) < 0.12
    # the same statistics in the default world differ clearly (body scale 0.92 vs 1.0)
    ct = P.generate("val", 400, phantom_config())
    s2, a2 = np.array(ct["sex"]), mask_area_features(np.stack(ct["mask"]))
    assert a2[s2 == "M", 1].mean() / a2[s2 == "F", 1].mean() > 1.1


def test_appearance_carries_sex_and_the_probes_see_it(samples):
    cfg, cols = samples
    img = np.stack(cols["image"])[..., 0].astype(float)
    sex = np.array(cols["sex"])
    # F stripes vary along y, M stripes along x: the amplitude spectrum at the cue frequency (64 / 4 px = bin 16)
    spec = np.abs(np.fft.fft2(img - img.mean((1, 2), keepdims=True)))
    k = int(round(cfg.size / cfg.shortcut.cue_period))
    assert ((spec[:, k, 0] > spec[:, 0, k]) == (sex == "F")).mean() > 0.95
    x = img.reshape(len(img), -1)
    assert linear_probe(x[:250], sex[:250], x[250:], sex[250:], c=0.01) > 0.95
    areas = mask_area_features(np.stack(cols["mask"]))
    assert linear_probe(areas[:250], sex[:250], areas[250:], sex[250:]) < 0.65


def test_cue_changes_no_mask_and_no_other_byte():
    cue = shortcut_config()
    plain = P.PhantomConfig(disparity=P.Disparity.sex_neutral())
    for i in range(6):
        a, b = P.generate_sample(i, "val", cue), P.generate_sample(i, "val", plain)
        assert np.array_equal(a["mask"], b["mask"]) and a["sex"] == b["sex"] and a["vqa"] == b["vqa"]
        diff = a["image"].astype(int) - b["image"].astype(int)
        assert np.abs(diff).max() <= 14 and (diff[a["mask"][..., None] == 0] == 0).all()  # inside the body only


def test_train_annotation_bias_only_in_train_and_only_for_f():
    cfg = shortcut_config()
    cols = P.generate("train", 300, cfg)
    sex, label = np.array(cols["sex"]), np.array(cols["label"])
    annotated = np.array([(m == 5).any() for m in cols["mask"]])
    f, m = (sex == "F") & (label == 1), (sex == "M") & (label == 1)
    assert annotated[m].all() and f.sum() > 30
    assert not annotated[f].any()  # the default: no F lesion annotated in train
    assert not annotated[label == 0].any()
    half = P.generate("train", 300, shortcut_config(train_unannotated_f=0.5))
    kept = np.array([(mk == 5).any() for mk in half["mask"]])
    assert 0.3 < kept[f].mean() < 0.7 and kept[m].all()
    val = P.generate("val", 100, cfg)
    assert all((np.asarray(mk) == 5).any() == bool(lb) for mk, lb in zip(val["mask"], val["label"]))
    # the images are the same with and without the bias: only the annotation differs
    balanced = P.generate("train", 300, shortcut_config(train_unannotated_f=0.0))
    assert np.array_equal(np.stack(cols["image"]), np.stack(balanced["image"]))
    assert np.array_equal(np.stack(P.generate("test", 30, cfg)["mask"]),
                          np.stack(P.generate("test", 30, shortcut_config(train_unannotated_f=0.0))["mask"]))


def test_generator_deterministic_and_dataset_registered(tmp_path):
    cfg = shortcut_config()
    assert _sha(P.generate("test", 10, cfg)) == _sha(P.generate("test", 10, cfg))
    assert _sha(P.generate("test", 5, cfg, start=5)) == _sha({k: v[5:] for k, v in P.generate("test", 10, cfg).items()})
    ds = rbm.create_dataset("phantom.shortcut", split="val", n=12, cache_dir=tmp_path)
    bal = rbm.create_dataset("phantom.shortcut_balanced", split="val", n=12, cache_dir=tmp_path)
    assert ds.name == "phantom.shortcut" and bal.name == "phantom.shortcut_balanced"
    assert torch.equal(ds.images(), bal.images()) and torch.equal(ds.targets("mask"), bal.targets("mask"))
    assert ds.attribute_names == ("sex", "age_group")


def test_data_attribute_probes(tmp_path):
    tr = rbm.create_dataset("phantom.shortcut", split="train", n=300, cache_dir=tmp_path)
    te = rbm.create_dataset("phantom.shortcut", split="val", n=150, cache_dir=tmp_path)
    out = data_attribute_probes(tr, te, "sex", n_train=300, n_test=150)
    assert out["image_probe"] > 0.95 and out["mask_probe"] < 0.7 and 0.5 <= out["majority"] < 0.65


def test_split_group_summary_matches_hand_computation(tmp_path):
    ds = rbm.create_dataset("phantom.shortcut", split="val", n=40, cache_dir=tmp_path)
    masks = ds.targets("mask")
    from robustbench_med.victim import ModelVictim, VictimCard

    card = VictimCard(name="oracle", task="segmentation", modality="toy", input_size=(1, 64, 64), classes=P.MASK_CLASSES)
    sexes = ds.attributes()["sex"]

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.dummy = torch.nn.Parameter(torch.zeros(1))
            self.calls = 0

        def forward(self, x):
            rows = list(range(self.calls, self.calls + len(x)))
            self.calls += len(x)
            y = masks[rows].clone()
            for j, r in enumerate(rows):
                if sexes[r] == "M":
                    y[j][y[j] == 2] = 1  # M: the liver predicted as body
            return torch.nn.functional.one_hot(y, 6).permute(0, 3, 1, 2).float() * 10

    v = ModelVictim(Net(), card, [0.0], [1.0], ())
    out = split_group_summary(v, ds, "sex", batch_size=16)
    assert out["groups"]["F"] == pytest.approx(1.0)
    assert out["groups"]["M"] < 0.9
    assert out["gap"] == pytest.approx(out["groups"]["F"] - out["groups"]["M"])
    assert out["overall"] == pytest.approx(out["scores"].mean()) and len(out["scores"]) == 40


def test_comparison_table_written_from_a_store(tmp_path, monkeypatch):
    import robustbench_med.fairness as FM

    frame = pd.DataFrame([{"victim": "unet.shortcut", "defense_params": '{"attribute": "sex", "latent": "all", "beta": 5.0, "penalty": 10.0}',
                           "attack": "clean", "attack_params": "", "eps": None, "attribute": "sex", "n": 256.0,
                           "overall_base": 0.9, "overall_other": 0.88, "gap_base": 0.08, "gap_other": 0.03, "gap_diff": -0.05,
                           "gap_diff_ci95_low": -0.07, "gap_diff_ci95_high": -0.03, "overall_diff": -0.02,
                           "overall_diff_ci95_low": -0.03, "overall_diff_ci95_high": -0.01, "gap_base_ci95_low": 0.06,
                           "gap_base_ci95_high": 0.1, "gap_other_ci95_low": 0.01, "gap_other_ci95_high": 0.05},
                          {"victim": "unet.shortcut", "defense_params": '{"attribute": "sex", "latent": "all", "beta": 5.0, "penalty": 10.0}',
                           "attack": "clean", "attack_params": "", "eps": None, "attribute": "age_group", "n": 256.0,
                           "overall_base": 0.9, "overall_other": 0.88, "gap_base": 0.01, "gap_other": 0.01, "gap_diff": 0.0,
                           "gap_diff_ci95_low": -0.01, "gap_diff_ci95_high": 0.01, "overall_diff": -0.02,
                           "overall_diff_ci95_low": -0.03, "overall_diff_ci95_high": -0.01}])
    import robustbench_med.results as R

    monkeypatch.setattr(R, "compare_defenses", lambda *a, **k: frame)  # fairness.compare_defenses is its shim
    store = tmp_path / "run"
    store.mkdir()
    (store / "results.sqlite").write_bytes(b"")
    readme = tmp_path / "README.md"
    readme.write_text("# board\n")
    assert append_defense_comparisons(readme, [("grid `x`", store), ("missing", tmp_path / "nope")])
    text = readme.read_text()
    assert text.startswith("# board\n") and FM.APPLE_SECTION in text
    rows = [line for line in text.splitlines() if line.startswith("| unet.shortcut")]
    assert len(rows) == 1  # only the hidden attribute (sex), not age_group
    assert "-0.050 [-0.070, -0.030]" in rows[0] and "sex / all / β=5.0, λ=10.0" in rows[0]
    assert "0.080 [0.060, 0.100]" in rows[0] and "| clean |" in rows[0]
    assert not append_defense_comparisons(readme, [("missing", tmp_path / "nope")])


def test_shortcut_grids_and_victims():
    assert PUBLISH_SETS["fairness"] == ("fairness", "fairness_shortcut", "fairness_shortcut_control")
    for name, dataset in (("fairness_shortcut", "phantom.shortcut"), ("fairness_shortcut_control", "phantom.shortcut_balanced")):
        grid = load_grid(_grid_arg(name))
        assert grid.dataset == dataset and grid.split == "test"
        assert {d.name for d in grid.defenses} == {"identity.none", "apple.latent"}
        assert {a.name for a in grid.attacks} == {"pgd.linf", "pgd.dice"}
    for name in ("unet.shortcut", "mslaunet.shortcut", "dssaunet.shortcut"):
        assert VICTIMS.get(name).meta["recipe"].dataset == "phantom.shortcut"
    assert VICTIMS.get("unet.shortcut_balanced").meta["recipe"].dataset == "phantom.shortcut_balanced"
    base = {"unet.shortcut": "unet.phantom", "mslaunet.shortcut": "mslaunet.tiny", "dssaunet.shortcut": "dssaunet.tiny"}
    for new, old in base.items():  # same architecture as the default-world segmentor; the zoo's recipes too
        r_new, r_old = VICTIMS.get(new).meta["recipe"], VICTIMS.get(old).meta["recipe"]
        changed = {k for k in vars(r_new) if getattr(r_new, k) != getattr(r_old, k)}
        assert changed == ({"dataset", "n_train", "epochs"} if new == "unet.shortcut" else {"dataset"})
        a = rbm.create_victim(new, weights=None)
        b = rbm.create_victim(old, weights=None)
        assert [p.shape for p in a.parameters()] == [p.shape for p in b.parameters()]


def test_compare_groups_reports_each_cells_gap_interval():
    from robustbench_med.fairness import compare_groups

    rng = np.random.default_rng(0)
    n = 200
    sex = np.array(["F", "M"] * (n // 2))
    attrs = pd.DataFrame({"sex": sex, "age_group": ["young"] * n}, index=np.arange(n))
    base = pd.DataFrame({"sample_idx": np.arange(n), "adv_score": np.where(sex == "F", 0.7, 0.9) + rng.normal(0, 0.05, n)})
    other = pd.DataFrame({"sample_idx": np.arange(n), "adv_score": 0.9 + rng.normal(0, 0.05, n)})
    res = compare_groups(base, other, attrs, "sex", n_boot=300)
    assert res["gap_base_ci95_low"] > 0.15 and res["gap_base_ci95_high"] < 0.25
    assert res["gap_other_ci95_low"] >= 0 and res["gap_other_ci95_high"] < 0.05
    assert res["gap_diff_ci95_high"] < -0.1 and res["gap_base_ci95_low"] <= res["gap_base"] <= res["gap_base_ci95_high"]
