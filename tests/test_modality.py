"""Missing and attacked modalities: the multi-sequence phantom, ``modality.dropout`` / ``modality.pgd``, the DMAF
fusion victim, the runner's threat check and the modality tables (issue #19 item 3)."""
import functools
import itertools
import json

import pandas as pd
import pytest
import torch

import robustbench_med as rbm
from robustbench_med.attacks.modality import ModalityDropout, ModalityPGD
from robustbench_med.data.multiseq import INTENSITY, SEQUENCES
from robustbench_med.errors import ConfigError
from robustbench_med.grid import parse_grid
from robustbench_med.threat import CORRUPTION, check_budget
from robustbench_med.victims.multimodal import SUBSETS, available, modality_dropout
from robustbench_med.wrap import build_victim

ALL_DROPS = ["+".join(SEQUENCES[i] for i in c) for k in (1, 2, 3) for c in itertools.combinations(range(4), k)]


@functools.cache
def _data(n=12):
    ds = rbm.create_dataset("phantom.multiseq", split="test", n=n)
    return ds, ds.images(), ds.targets("mask")


@functools.cache
def _victim(name="dmaf.multiseq"):
    torch.manual_seed(0)
    return build_victim(name).eval()


# ------------------------------------------------------------------------------------------------------ the data
def test_multiseq_phantom_is_the_ct_phantoms_patients_in_four_sequences():
    ds, x, mask = _data()
    ct = rbm.create_dataset("phantom.ct", split="test", n=12)
    assert ds.input_size == (4, 64, 64) and x.shape == (12, 4, 64, 64)
    assert torch.equal(mask, ct.targets("mask")) and ds.attributes() == ct.attributes()
    assert torch.equal(ds.targets("landmarks"), ct.targets("landmarks"))
    assert (x.flatten(2).amax(-1) > 0).all(), "a rendered sequence is all zero (it would read as missing)"
    again = rbm.create_dataset("phantom.multiseq", split="test", n=12, cache_dir=None).images()
    assert torch.equal(again, x)
    assert ds.fingerprint() != ct.fingerprint()


def test_each_sequence_follows_its_contrast_table():
    """Mean intensity per structure on 200 slices follows :data:`INTENSITY`: fat brightest on T1, liver darker than
    kidney after contrast, spine darker on T2 than on T1 (a renderer that mixed up channels fails)."""
    ds = rbm.create_dataset("phantom.multiseq", split="test", n=200)
    x, m = ds.images(), ds.targets("mask")
    mean = {(c, k): float(x[:, c][m == k].mean()) for c in range(4) for k in (2, 3, 4)}
    t1, t1ce, t2 = (SEQUENCES.index(s) for s in ("t1", "t1ce", "t2"))
    assert mean[(t1ce, 3)] > mean[(t1ce, 2)] + 0.1  # kidney enhances
    assert mean[(t2, 3)] > mean[(t2, 2)] + 0.2  # kidney bright on T2, liver dark
    assert mean[(t1, 2)] > mean[(t1, 3)] + 0.1  # liver brighter than kidney on T1
    assert abs(mean[(t1, 4)] - INTENSITY["spine"][t1]) < 0.05 and abs(mean[(t2, 4)] - INTENSITY["spine"][t2]) < 0.05


def test_multiseq_config_refuses_a_shortcut_and_keeps_the_default_hash():
    from robustbench_med.data.phantom import PhantomConfig, Shortcut, Disparity

    assert PhantomConfig().config_hash() == PhantomConfig(multiseq=False).config_hash()
    assert PhantomConfig(multiseq=True).config_hash() != PhantomConfig().config_hash()
    with pytest.raises(ValueError, match="multiseq"):
        PhantomConfig(multiseq=True, shortcut=Shortcut(), disparity=Disparity.sex_neutral())
    with pytest.raises(ValueError, match="multiseq"):
        PhantomConfig(multiseq="yes")


# ------------------------------------------------------------------------------------------------- modality.dropout
@pytest.mark.parametrize("drop", ALL_DROPS)
def test_dropout_zeroes_exactly_the_dropped_sequences(drop):
    _, x, mask = _data()
    victim = _victim()
    attack = rbm.create_attack("modality.dropout", drop=drop)
    out = attack(victim, x, mask)
    dropped = [SEQUENCES.index(s) for s in drop.split("+")]
    kept = [c for c in range(4) if c not in dropped]
    assert (out[:, dropped] == 0).all() and torch.equal(out[:, kept], x[:, kept])
    assert attack.threat.norm == CORRUPTION and attack.threat.eps == len(dropped)
    assert check_budget(x, out, attack.threat.norm, attack.threat.eps).valid
    assert attack.violations(victim, x, out) == ""
    assert available(out)[:, kept].all() and not available(out)[:, dropped].any()


def test_dropout_is_split_independent():
    _, x, mask = _data()
    attack = rbm.create_attack("modality.dropout", drop="t1+t2")
    assert attack.sample_independent
    whole = attack(_victim(), x, mask, seeds=list(range(12)))
    assert torch.equal(whole, torch.cat([attack(_victim(), x[a:b], mask[a:b], seeds=list(range(a, b)))
                                         for a, b in ((0, 1), (1, 7), (7, 12))]))


def test_dropout_names_channels_and_lists_alike():
    _, x, mask = _data()
    v = _victim()
    by_name = rbm.create_attack("modality.dropout", drop="T1ce+flair")(v, x, mask)
    assert torch.equal(by_name, rbm.create_attack("modality.dropout", drop=[1, 3])(v, x, mask))
    assert torch.equal(by_name, rbm.create_attack("modality.dropout", drop=["flair", "t1ce"])(v, x, mask))


@pytest.mark.parametrize("drop,match", [("", "empty"), ("t1+t1", "repeated"), ([], "at least one"), (-1, "name or a channel"),
                                        (True, "name or a channel"), (1.5, "name or a channel")])
def test_dropout_refuses_malformed_sequences(drop, match):
    with pytest.raises(ConfigError, match=match):
        rbm.create_attack("modality.dropout", drop=drop)


def test_dropout_refuses_unknown_sequences_all_sequences_and_single_channel_victims():
    from conftest import make_toy

    _, x, mask = _data()
    with pytest.raises(ConfigError, match="no sequence 'dwi'.*t1ce"):
        rbm.create_attack("modality.dropout", drop="dwi")(_victim(), x, mask)
    with pytest.raises(ConfigError, match="leaves .* no sequence"):
        rbm.create_attack("modality.dropout", drop="t1+t1ce+t2+flair")(_victim(), x, mask)
    with pytest.raises(ConfigError, match="channel 4 out of range"):
        rbm.create_attack("modality.dropout", drop=4)(_victim(), x, mask)
    toy = make_toy("classification")
    xt = torch.rand(3, 1, 16, 16)
    with pytest.raises(ConfigError, match="no sequence"):
        rbm.create_attack("modality.dropout")(toy, xt, toy.predict(xt))
    with pytest.raises(ConfigError, match="eot"):
        rbm.create_attack("modality.dropout", eot=2)


def test_violations_catch_an_output_that_breaks_the_threat():
    _, x, mask = _data()
    v = _victim()
    out = rbm.create_attack("modality.dropout", drop="t2")(v, x, mask)
    tampered = out.clone()
    tampered[0, 0] = tampered[0, 0] * 0.5  # a kept sequence changed
    tampered[1, 2, 0, 0] = 0.1  # a dropped sequence not zero
    reason = ModalityDropout(drop="t2").violations(v, x, tampered)
    assert "1 samples changed a kept sequence" in reason and "1 samples have a dropped sequence" in reason


# ------------------------------------------------------------------------------------------------------ modality.pgd
@pytest.mark.parametrize("modality", SEQUENCES)
def test_sequence_pgd_changes_only_its_sequence_within_eps(modality):
    _, x, mask = _data()
    v = _victim()
    attack = rbm.create_attack("modality.pgd", modality=modality, eps="8/255", steps=3)
    out = attack(v, x, mask)
    c = SEQUENCES.index(modality)
    others = [i for i in range(4) if i != c]
    assert torch.equal(out[:, others], x[:, others])
    assert (out[:, c] != x[:, c]).any()
    assert check_budget(x, out, "Linf", 8 / 255).valid and attack.violations(v, x, out) == ""
    assert torch.equal(out, attack(v, x, mask)), "not deterministic"
    with torch.no_grad():  # the attack raised the loss it maximises
        assert v.objective(out, mask).mean() > v.objective(x, mask).mean()


def test_sequence_pgd_is_split_independent_and_linf_only():
    _, x, mask = _data()
    v = _victim()
    attack = rbm.create_attack("modality.pgd", modality="t2", eps="8/255", steps=2)
    assert attack.sample_independent
    seeds = list(range(100, 112))
    whole = attack(v, x, mask, seeds=seeds)
    parts = torch.cat([attack(v, x[a:b], mask[a:b], seeds=seeds[a:b]) for a, b in ((0, 5), (5, 12))])
    assert torch.allclose(whole, parts, atol=1e-6)
    with pytest.raises(ConfigError, match="Linf attack"):
        rbm.create_attack("modality.pgd", modality=0, norm="L2", eps=0.5)
    with pytest.raises(ConfigError, match="no sequence"):
        rbm.create_attack("modality.pgd", modality="pd")(v, x, mask)
    tampered = whole.clone()
    tampered[:, 0] = (tampered[:, 0] + 0.01).clamp(0, 1)
    assert "changed a sequence outside t2" in ModalityPGD(modality="t2").violations(v, x, tampered)


# ---------------------------------------------------------------------------------------------- the DMAF victim
def test_dmaf_gives_a_missing_sequence_no_weight_and_no_influence():
    """With a sequence missing its fusion weight is exactly 0 at every scale, and scrambling that sequence's encoder
    changes nothing; the plain U-Net has no such guarantee (its prediction does change)."""
    _, x, _ = _data()
    v = _victim()
    xd = rbm.create_attack("modality.dropout", drop="t1ce")(v, x, torch.zeros(len(x), 64, 64, dtype=torch.long))
    with torch.no_grad():
        before = v(xd)
        for fuse in v.net.fuse.values():
            assert (fuse.weights[:, 1] == 0).all() and torch.allclose(fuse.weights.sum(1), torch.ones(1))
        scrambled = build_victim("dmaf.multiseq").eval()
        scrambled.net.load_state_dict(v.net.state_dict())
        for p in scrambled.net.encoders[1].parameters():
            p.add_(torch.randn_like(p))
        assert torch.allclose(scrambled(xd), before, atol=1e-5)
        assert not torch.allclose(scrambled(x), v(x), atol=1e-3)  # the encoder matters when t1ce is present


def test_modality_dropout_training_augmentation_draws_every_subset():
    assert len(SUBSETS) == 15
    x = torch.ones(3000, 4, 2, 2)
    y = torch.zeros(len(x))
    out, y_out = modality_dropout(x, y, torch.Generator().manual_seed(0))
    kept = {tuple(int(c) for c in torch.nonzero(o.flatten(1).amax(1)).flatten()) for o in out}
    assert kept == set(SUBSETS) and y_out is y
    assert torch.equal(modality_dropout(x, y, torch.Generator().manual_seed(0))[0], out)


# ---------------------------------------------------------------------------------------- grid, runner, tables
def _grid(drops, n=8):
    return parse_grid({
        "name": "mod", "dataset": {"name": "phantom.multiseq", "split": "test"}, "n_examples": n, "batch_size": n,
        "victims": [{"name": "dmaf.multiseq", "weights": None}],
        "attacks": [{"name": "modality.dropout", "params": {"drop": drops}},
                    {"name": "modality.pgd", "params": {"modality": ["t1", "flair"], "eps": "2/255", "steps": 2}},
                    {"name": "pgd.linf", "params": {"eps": "2/255", "steps": 2}}],
    })


@pytest.fixture(scope="module")
def modality_store(tmp_path_factory):
    from robustbench_med.runner import run_grid

    return run_grid(_grid(ALL_DROPS), tmp_path_factory.mktemp("modalities"), progress=False)


def test_grid_runs_every_subset_and_writes_the_modality_tables(modality_store, tmp_path):
    from robustbench_med.leaderboard import summary_wide, write_leaderboard
    from robustbench_med.modality_metrics import dropout_rows, modality_summary

    df = summary_wide(modality_store)
    cells = df[df.attack == "modality.dropout"]
    assert len(cells) == 14 and (cells.status == "done").all() and (cells.n == 8).all()
    assert sorted(cells.eps.astype(int).value_counts().to_dict().items()) == [(1, 4), (2, 6), (3, 4)]
    subsets = dropout_rows(df)
    assert len(subsets) == 15 and set(subsets.n_kept) == {1, 2, 3, 4}
    summary = modality_summary(df).iloc[0]
    assert summary.all_subsets and summary.subsets == 15
    scores = subsets.set_index("kept").score
    assert summary.worst == scores.min() and summary.worst_subset == scores.idxmin()
    assert summary.mean_over_subsets == pytest.approx(scores.mean())
    assert summary.worst_ci95_low <= summary.worst <= summary.worst_ci95_high
    assert {"pgd[t1@2/255]", "pgd[flair@2/255]", "pgd[all@2/255]"} <= set(summary.index)
    paths = write_leaderboard(modality_store, tmp_path)
    text = paths["modalities_markdown"].read_text()
    assert "t1ce+t2+flair" in text and "worst_subset" in text
    assert len(pd.read_csv(paths["modalities_by_subset_csv"])) == 15


def test_runner_marks_a_cell_that_breaks_its_threat_invalid(tmp_path, monkeypatch):
    from robustbench_med.runner import run_grid
    from robustbench_med.store import Store

    def leaky(self, victim, x, y, eps):
        out = x.clone()
        out[:, self._dropped(victim)] = 0
        out[:, 0] = out[:, 0] * 0.9  # also dims a kept sequence: not what the threat model allows
        return out

    monkeypatch.setattr(ModalityDropout, "perturb", leaky)
    with Store(run_grid(_grid(["t2"], n=4), tmp_path, progress=False)) as store:
        cells = {c["attack"]: c for c in store.cells()}
        assert cells["modality.dropout"]["status"] == "invalid"
        assert "threat violated" in cells["modality.dropout"]["reason"]
        assert cells["modality.pgd"]["status"] == "done"
        params = json.loads(cells["modality.dropout"]["attack_params"])
        assert params["drop"] == "t2"


def test_publish_writes_the_study_tables_of_a_grid(modality_store, tmp_path):
    from robustbench_med.cli_publish import PUBLISH_SETS, _write_study_tables

    _write_study_tables(modality_store, tmp_path / "modalities")
    assert (tmp_path / "modalities" / "modalities.md").exists() and not (tmp_path / "modalities" / "sites.md").exists()
    assert {"modalities", "sites", "sites_vessels"} <= set(PUBLISH_SETS["shift"])


def test_paired_comparison_with_the_declared_baseline(tmp_path):
    from robustbench_med.modality_metrics import paired_table
    from robustbench_med.runner import run_grid
    from robustbench_med.store import Store

    grid = parse_grid({"name": "mod_pair", "dataset": {"name": "phantom.multiseq", "split": "test"}, "n_examples": 6,
                       "batch_size": 6, "victims": [{"name": "dmaf.multiseq", "weights": None},
                                                    {"name": "unet.multiseq_dropout", "weights": None}],
                       "attacks": [{"name": "modality.dropout", "params": {"drop": ["t1", "t2+flair"]}}]})
    store = run_grid(grid, tmp_path, progress=False)
    paired = paired_table(store).set_index("subset")
    assert set(paired.victim) == {"dmaf.multiseq"} and set(paired.baseline) == {"unet.multiseq_dropout"}
    assert set(paired.index) == {"t1ce+t2+flair", "t1+t1ce", "t1+t1ce+t2+flair", "mean over subsets"}
    with Store(store) as st:
        samples = st.samples_frame().merge(pd.DataFrame(st.cells())[["cell_id", "victim", "attack_params"]], on="cell_id")
    t1 = samples[samples.attack_params.map(lambda p: json.loads(p)["drop"] == "t1")].pivot(index="sample_idx", columns="victim", values="adv_score")
    assert paired.loc["t1ce+t2+flair", "delta"] == pytest.approx((t1["dmaf.multiseq"] - t1["unet.multiseq_dropout"]).mean())
    assert all(paired.ci95_low <= paired.delta + 1e-12) and all(paired.delta <= paired.ci95_high + 1e-12)
