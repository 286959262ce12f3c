"""Site shift (issue #19 item 2): acquisition sites of the phantom, the mixed-site split, style augmentation as a
training-time defence, the training hook it uses, and the per-site tables with paired comparisons."""
import json

import numpy as np
import pandas as pd
import pytest
import torch

import robustbench_med as rbm
from robustbench_med.data.phantom import PhantomConfig, generate_sample
from robustbench_med.data.sites import SITES, Site, acquire
from robustbench_med.errors import ConfigError
from robustbench_med.grid import parse_grid
from robustbench_med.victims.site_shift import style_augment


def test_site_a_is_the_default_world_and_keeps_its_hash():
    assert PhantomConfig().config_hash() == PhantomConfig(site=SITES["A"]).config_hash() == PhantomConfig(site=None).config_hash()
    assert PhantomConfig(site=SITES["B"]).config_hash() != PhantomConfig().config_hash()
    ct = rbm.create_dataset("phantom.ct", split="test", n=9)
    mixed = rbm.create_dataset("phantom.sites", split="test", n=9)
    assert mixed.attributes()["site"] == ["A", "B", "C"] * 3
    assert torch.equal(mixed.images([0, 3, 6]), ct.images([0, 3, 6]))  # site A samples are phantom.ct's, byte for byte
    assert not torch.equal(mixed.images([1, 4]), ct.images([1, 4]))
    b = rbm.create_dataset("phantom.site_b", split="test", n=9)
    assert torch.equal(mixed.images([1, 4, 7]), b.images([1, 4, 7]))


@pytest.mark.parametrize("bad,match", [({"gain": 0}, "gain"), ({"resolution": 0.5}, "resolution"), ({"p_female": 1.5}, "p_female"),
                                       ({"age_mix": (0.5, 0.5, 0.5)}, "age_mix"), ({"name": ""}, "name")])
def test_bad_sites_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        Site(**bad)
    with pytest.raises(ConfigError, match=match):
        rbm.create_dataset("phantom.ct", split="test", n=2, site={"name": "X", **bad})


def test_a_site_cannot_combine_with_multiseq():
    with pytest.raises(ValueError, match="site"):
        PhantomConfig(site=SITES["B"], multiseq=True)


def test_sites_differ_as_documented():
    """Field of view, population and acquisition follow the table of robustbench_med.data.sites on 300 patients."""
    n = 300
    body = {}
    for key in "ABC":
        cfg = PhantomConfig(site=SITES[key])
        samples = [generate_sample(i, "test", cfg) for i in range(n)]
        body[key] = np.mean([(s["mask"] > 0).mean() for s in samples])
        females = np.mean([s["sex"] == "F" for s in samples])
        old = np.mean([s["age_group"] == "old" for s in samples])
        assert abs(females - SITES[key].p_female) < 0.08 and abs(old - SITES[key].age_mix[2]) < 0.08
    assert body["B"] / body["A"] == pytest.approx(1 / 1.15 ** 2, rel=0.05)
    assert body["C"] / body["A"] == pytest.approx(1 / 0.90 ** 2, rel=0.05)
    flat = np.full((64, 64), 0.5, dtype=np.float32)
    out = acquire(flat, SITES["B"], np.zeros_like(flat))
    assert np.allclose(out, 0.10 + 0.80 * 0.5 ** 1.3, atol=1e-6)
    edge = np.zeros((64, 64), dtype=np.float32)
    edge[:, 32:] = 1.0
    blurred = acquire(edge, Site("R", resolution=2.0), np.zeros_like(edge))
    assert 0.05 < blurred[0, 31] < 0.95  # the sharp edge is smeared by the resolution loss


def test_style_augment_is_seeded_in_range_and_changes_style():
    x = rbm.create_dataset("phantom.ct", split="train", n=32).images()
    y = torch.zeros(len(x))
    a, y_out = style_augment(x, y, torch.Generator().manual_seed(0))
    assert y_out is y and torch.equal(a, style_augment(x, y, torch.Generator().manual_seed(0))[0])
    assert not torch.equal(a, style_augment(x, y, torch.Generator().manual_seed(1))[0])
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    assert (a - x).abs().mean() > 0.02
    # intensity statistics spread out (the point of style augmentation), the anatomy stays where it was
    assert a.mean((1, 2, 3)).std() > x.mean((1, 2, 3)).std()
    body = rbm.create_dataset("phantom.ct", split="train", n=32).targets("mask") > 0
    corr = [np.corrcoef(a[i, 0][body[i]].numpy(), x[i, 0][body[i]].numpy())[0, 1] for i in range(8)]
    assert np.mean(corr) > 0.5


def test_training_records_the_augmentation_and_retrains_when_it_changes(monkeypatch):
    from robustbench_med.registry import VICTIMS
    from robustbench_med.training import TrainRecipe, is_current, train_victim
    from robustbench_med.victim import ModelVictim, VictimCard
    from robustbench_med.victims.basic import SmallCNN
    from robustbench_med.weights import read_sidecar

    card = VictimCard(name="cnn.augtest", task="binary", modality="CT (phantom)", input_size=(1, 64, 64), classes=("no", "yes"))
    calls = []

    def flip(x, y, gen):
        calls.append(len(x))
        return x.flip(-1), y

    VICTIMS.add("cnn.augtest", lambda **kw: ModelVictim(SmallCNN(num_outputs=1, width=4), card), card=card,
                recipe=TrainRecipe(target_field="label", epochs=1, n_train=16, n_val=8, batch_size=8), augment=flip)
    try:
        path = train_victim("cnn.augtest", progress=False)
        assert calls == [8, 8] and read_sidecar(path)["augment"] == "flip"
        assert is_current("cnn.augtest", path)
        monkeypatch.setitem(VICTIMS.get("cnn.augtest").meta, "augment", style_augment)
        assert not is_current("cnn.augtest", path)
        monkeypatch.delitem(VICTIMS.get("cnn.augtest").meta, "augment")
        assert not is_current("cnn.augtest", path)
    finally:
        VICTIMS.remove("cnn.augtest")


@pytest.fixture(scope="module")
def sites_store(tmp_path_factory):
    from robustbench_med.runner import run_grid

    grid = parse_grid({"name": "sites_test", "dataset": {"name": "phantom.sites", "split": "test"}, "n_examples": 24,
                       "batch_size": 24, "victims": [{"name": "unet.phantom", "weights": None},
                                                     {"name": "unet.styleaug", "weights": None}],
                       "attacks": [{"name": "noise.uniform", "params": {"eps": "8/255"}}]})
    return run_grid(grid, tmp_path_factory.mktemp("sites"), progress=False)


def test_site_tables_break_scores_down_per_site_with_a_paired_baseline_comparison(sites_store, tmp_path):
    from robustbench_med.leaderboard import summary_wide, write_leaderboard
    from robustbench_med.site_metrics import site_scores, site_table
    from robustbench_med.store import Store

    table = site_table(sites_store)
    clean = table[table.condition == "clean"].set_index("victim")
    assert set(clean.index) == {"unet.phantom", "unet.styleaug"}
    row = clean.loc["unet.styleaug"]
    assert row.baseline == "unet.phantom" and pd.isna(clean.loc["unet.phantom"].get("baseline"))
    with Store(sites_store) as st:
        samples = st.samples_frame()
        cells = pd.DataFrame(st.cells()).set_index("cell_id")
    samples = samples.assign(victim=samples.cell_id.map(cells.victim),
                             site=samples["attrs"].map(lambda a: json.loads(a)["site"]))
    per = samples.drop_duplicates(["victim", "sample_idx"]).pivot(index="sample_idx", columns="victim", values="clean_score")
    site = samples.drop_duplicates("sample_idx").set_index("sample_idx").site
    for s in "ABC":
        idx = site[site == s].index
        assert row[s] == pytest.approx(per.loc[idx, "unet.styleaug"].mean())
        assert row[f"Δ[{s}]"] == pytest.approx((per.loc[idx, "unet.styleaug"] - per.loc[idx, "unet.phantom"]).mean())
        assert row[f"Δ[{s}]_ci95_low"] <= row[f"Δ[{s}]"] <= row[f"Δ[{s}]_ci95_high"]
        assert row[f"{s}_ci95_low"] <= row[s] <= row[f"{s}_ci95_high"]
    assert row["drop[A→B]"] == pytest.approx(row.A - row.B)
    sex = samples.drop_duplicates("sample_idx").set_index("sample_idx")["attrs"].map(lambda a: json.loads(a)["sex"])
    at_b = per.loc[site[site == "B"].index, "unet.styleaug"]
    by_sex = at_b.groupby(sex.loc[at_b.index]).mean()
    assert row["gap[sex@B]"] == pytest.approx(by_sex.max() - by_sex.min())  # fairness within a site
    assert row["gap_change[sex A→B]"] == pytest.approx(row["gap[sex@B]"] - row["gap[sex@A]"])
    assert len(site_scores(sites_store)) == 2 * 2 * 24  # 2 victims × (clean + 1 cell) × 24 samples
    df = summary_wide(sites_store)
    assert "robust_gap_site" in df.columns and df.robust_gap_site.notna().any()
    assert not any("site*" in c or "*site" in c for c in df.columns)  # site is reported alone, never intersected
    paths = write_leaderboard(sites_store, tmp_path)
    text = paths["sites_markdown"].read_text()
    assert "| A | B | C |" in text and "Against the baseline" in text and "unet.styleaug | unet.phantom | clean | B |" in text


def test_site_tables_are_skipped_without_sites(tmp_path):
    from robustbench_med.site_metrics import write_site_tables
    from robustbench_med.runner import run_grid

    grid = parse_grid({"name": "nosite", "n_examples": 4, "batch_size": 4,
                       "victims": [{"name": "unet.phantom", "weights": None}],
                       "attacks": [{"name": "noise.uniform", "params": {"eps": "8/255"}}]})
    assert write_site_tables(run_grid(grid, tmp_path / "run", progress=False), tmp_path) == {}


# ------------------------------------------------------------------------------------------ the vessel phantom
def test_vessel_phantom_is_deterministic_thin_and_hazier_with_age():
    from robustbench_med.data import vessels as V

    a = [V.generate_sample(i, "test") for i in range(60)]
    assert all(np.array_equal(s["image"], V.generate_sample(i, "test")["image"]) for i, s in enumerate(a[:3]))
    frac = np.mean([s["mask"].mean() for s in a])
    assert 0.03 < frac < 0.2
    contrast = {g: [] for g in V.HAZE}
    for s in a:
        img, m = s["image"][..., 0].astype(float) / 255, s["mask"].astype(bool)
        fov = img > 0.1
        contrast[s["age_group"]].append(img[fov & ~m].mean() - img[fov & m].mean())
    assert np.mean(contrast["old"]) < np.mean(contrast["young"])  # vessels darker than background, less so when old
    assert min(np.mean(v) for v in contrast.values()) > 0.02
    with pytest.raises(ConfigError, match="split"):
        rbm.create_dataset("phantom.vessels", split="dev", n=2)


def test_structural_augmentation_pairs_trees_with_their_masks():
    from robustbench_med.victims.site_shift import structure_augment, structure_style_augment

    x = torch.full((16, 1, 64, 64), 0.5)
    y = torch.zeros(16, 64, 64, dtype=torch.long)
    xs, ys = structure_augment(x, y, torch.Generator().manual_seed(0))
    replaced = [i for i in range(16) if not torch.equal(xs[i], x[i])]
    assert 3 <= len(replaced) <= 13 and all(ys[i].sum() > 0 for i in replaced)
    for i in replaced:  # the synthetic vessels are darker than their pseudo background
        if ys[i].sum() > 20:
            assert xs[i, 0][ys[i].bool()].mean() < xs[i, 0][~ys[i].bool()].mean()
    xa, ya = structure_style_augment(x, y, torch.Generator().manual_seed(0))
    assert torch.equal(ya, ys) and xa.min() >= 0 and xa.max() <= 1
