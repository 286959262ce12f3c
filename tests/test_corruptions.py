"""Corruption threat models (``corruption.*``): identity at severity 0, per-sample determinism independent of the
batch, range, monotone severity, the budget check, the grid / leaderboard / entries path and the corruption metrics."""
import functools
import json
import math

import pandas as pd
import pytest
import torch

import robustbench_med as rbm
from robustbench_med.attacks.corruption import CORRUPTIONS, Corruption, sample_seed
from robustbench_med.corruption_metrics import corruption_by_kind, corruption_summary, write_corruption_tables
from robustbench_med.errors import ConfigError, ThreatModelError
from robustbench_med.grid import parse_grid
from robustbench_med.registry import ATTACKS
from robustbench_med.threat import ThreatModel, check_budget, eps_display

from conftest import make_toy

NAMES = ATTACKS.list("corruption.*")


@pytest.fixture
def no_cache(monkeypatch):
    """Every call computes its corruptions afresh (no cross-call cache), so determinism is tested, not the cache."""
    from robustbench_med.attacks.corruption import CACHE

    CACHE.clear()
    monkeypatch.setenv("ROBUSTBENCH_MED_CORRUPTION_CACHE_MB", "0")
    yield
    CACHE.clear()


@functools.cache
def _phantom(n=12):
    """Phantom CT slices (64×64, the default victims' input)."""
    return rbm.create_dataset("phantom.ct", split="test", n=n).images(list(range(n)))


def _victim():
    from robustbench_med.victim import ModelVictim, VictimCard

    card = VictimCard(name="toy.c64", task="classification", modality="toy", input_size=(1, 64, 64), classes=("a", "b"))
    torch.manual_seed(0)
    return ModelVictim(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64 * 64, 2)), card).eval()


def _run(name, x, severity=3, seed=0, call_seed=None):
    attack = rbm.create_attack(name, severity=severity, seed=seed)
    return attack(_victim(), x, torch.zeros(len(x), dtype=torch.long), seed=call_seed)


def test_every_corruption_is_registered_as_a_corruption_threat():
    assert len(NAMES) == len(CORRUPTIONS) >= 13
    assert {n.split(".", 1)[1] for n in NAMES} == set(CORRUPTIONS)
    for name in NAMES:
        attack = rbm.create_attack(name, severity=2)
        assert attack.knowledge == "none" and ATTACKS.get(name).meta["knowledge"] == "none"
        assert attack.threat.norm == "corruption" and attack.threat.eps == 2
        assert attack.threat.as_dict()["eps_display"] == "2"
    assert set(rbm.list_attacks("corruption.*", knowledge="none")) == set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_severity_zero_is_the_input_bit_for_bit(name):
    x = _phantom()
    assert torch.equal(_run(name, x, severity=0), x)
    mixed = rbm.create_attack(name)(_victim(), x, torch.zeros(len(x), dtype=torch.long), eps=torch.tensor([0.0, 4.0] * 6))
    assert torch.equal(mixed[0::2], x[0::2]) and not torch.equal(mixed[1::2], x[1::2])


@pytest.mark.parametrize("name", NAMES)
def test_outputs_in_range_and_pass_the_budget_check(name):
    x = _phantom()
    for severity in (1, 5):
        x_adv = _run(name, x, severity=severity)
        assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
        assert torch.isfinite(x_adv).all() and x_adv.min() >= 0 and x_adv.max() <= 1
        report = check_budget(x, x_adv, "corruption", severity)
        assert report.valid, report.reason()
        assert report.severity == severity and (report.norms["Linf"] > 0).any()


@pytest.mark.parametrize("name", NAMES)
def test_each_sample_is_corrupted_the_same_in_any_batch(name, no_cache):
    """A sample's corruption depends on the image and the attack seed only: not on its batch, its position in it, or
    the per-unit seed the harness passes to the call."""
    x = _phantom()
    full = _run(name, x, call_seed=1)
    perm = torch.tensor([7, 2, 11, 0, 5])
    sub = _run(name, x[perm], call_seed=12345)
    assert torch.equal(sub, full[perm])
    assert torch.equal(_run(name, x[3:4], call_seed=99), full[3:4])
    if CORRUPTIONS[name.split(".", 1)[1]].name in {"gaussian_noise", "rician_noise", "motion", "bias_field", "spike"}:
        assert not torch.equal(_run(name, x, seed=1), full), "another attack seed draws another corruption"


@pytest.mark.parametrize("name", NAMES)
def test_distortion_grows_with_severity(name):
    """Mean |x_adv − x| over phantom slices is non-decreasing from severity 1 to 5 (the same draws, a larger
    magnitude), and so is 1 − SSIM."""
    from skimage.metrics import structural_similarity

    x = _phantom()
    dist, dssim = [], []
    for severity in range(1, 6):
        x_adv = _run(name, x, severity=severity)
        dist.append(float((x_adv - x).abs().mean()))
        dssim.append(sum(1 - structural_similarity(a[0].numpy(), b[0].numpy(), data_range=1.0) for a, b in zip(x, x_adv)) / len(x))
    assert dist[0] > 0
    assert all(b >= a - 1e-6 for a, b in zip(dist, dist[1:])), dist
    assert dssim[-1] > dssim[0], dssim


def test_cache_returns_what_the_corruption_computes(monkeypatch):
    from robustbench_med.attacks.corruption import CACHE

    x = _phantom()
    CACHE.clear()
    monkeypatch.setenv("ROBUSTBENCH_MED_CORRUPTION_CACHE_MB", "0")
    fresh = _run("corruption.motion", x, severity=2)
    assert not CACHE.items
    monkeypatch.setenv("ROBUSTBENCH_MED_CORRUPTION_CACHE_MB", "64")
    first = _run("corruption.motion", x, severity=2)
    assert len(CACHE.items) == len(x) and CACHE.nbytes == x.numel() * 4
    assert torch.equal(first, fresh) and torch.equal(_run("corruption.motion", x, severity=2), fresh)
    CACHE.clear()


def test_corrupting_leaves_the_thread_count_alone():
    threads = torch.get_num_threads()
    _run("corruption.motion", _phantom(), severity=1)
    assert torch.get_num_threads() == threads


def test_sample_seed_depends_on_the_image_and_the_seed():
    x = _phantom()
    assert sample_seed(0, "motion", x[0]) == sample_seed(0, "motion", x[0].clone())
    assert sample_seed(0, "motion", x[0]) != sample_seed(0, "motion", x[1])
    assert sample_seed(0, "motion", x[0]) != sample_seed(1, "motion", x[0])
    assert sample_seed(0, "motion", x[0]) != sample_seed(0, "spike", x[0])


def test_corruption_threat_model_and_budget_check():
    assert ThreatModel(norm="corruption", eps=3, knowledge="none").eps == 3
    for bad in (2.5, 6, -1):
        with pytest.raises(ThreatModelError):
            ThreatModel(norm="corruption", eps=bad)
    with pytest.raises(ConfigError):
        rbm.create_attack("corruption.blur", severity=7)
    with pytest.raises(ConfigError):
        Corruption("no_such_corruption")
    x = _phantom()
    far = (x + 0.5).clamp(0, 1)  # a huge change: still valid (no eps ball), its size recorded
    report = check_budget(x, far, "corruption", 1)
    assert report.valid and report.n_over_budget == 0 and report.severity == 1
    assert torch.allclose(report.norms["Linf"], (far - x).flatten(1).abs().amax(1))
    assert not check_budget(x, x + 0.5, "corruption", 1).valid  # range still checked
    assert not check_budget(x, torch.full_like(x, float("nan")), "corruption", 1).valid
    assert check_budget(x, x, "corruption", torch.tensor([0.0] * 6 + [2.0] * 6)).severity == 1.0
    assert eps_display(3.0, "corruption") == "3" and eps_display(8 / 255) == "8/255"


def test_corruptions_work_on_the_toy_tasks_and_three_channel_images():
    victim = make_toy("multilabel")
    x = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    for name in NAMES:
        out = rbm.create_attack(name, severity=5)(victim, x, torch.zeros(4, 3, dtype=torch.long))
        assert out.shape == x.shape and 0 <= out.min() and out.max() <= 1
    rgb = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for name in NAMES:
        attack = rbm.create_attack(name, severity=4)
        out = attack.perturb(None, rgb, None, torch.full((2,), 4.0))
        assert out.shape == rgb.shape and torch.isfinite(out).all() and 0 <= out.min() and out.max() <= 1


# -------------------------------------------------------------------------------------------------------------
# metrics


def _frame(rows):
    base = dict(defense="identity.none", defense_params="{}", attack_through="adaptive", task="classification",
                metric="accuracy", norm="corruption", status="done", n=10)
    return pd.DataFrame([{**base, **r} for r in rows])


def test_corruption_metrics_by_hand():
    rows = []
    scores = {"b": {("blur", 1): 0.8, ("blur", 2): 0.6, ("jpeg", 1): 0.7, ("jpeg", 2): 0.5},
              "m": {("blur", 1): 0.9, ("blur", 2): 0.8, ("jpeg", 1): 0.85, ("jpeg", 2): 0.65}}
    clean = {"b": 0.9, "m": 0.95}
    for victim, table in scores.items():
        for (kind, sev), s in table.items():
            rows.append(dict(victim=victim, attack=f"corruption.{kind}", eps=float(sev), clean=clean[victim], robust=s))
        rows.append(dict(victim=victim, attack="corruption.blur", eps=0.0, clean=clean[victim], robust=clean[victim]))
    rows.append(dict(victim="m", attack="pgd.linf", norm="Linf", eps=8 / 255, clean=0.95, robust=0.1))  # not a corruption
    summary = corruption_summary(_frame(rows), baseline="b").set_index("victim")
    m = summary.loc["m"]
    assert m.score_s0 == pytest.approx(0.95) and m.score_s1 == pytest.approx(0.875) and m.score_s2 == pytest.approx(0.725)
    assert m.mean_corruption_score == pytest.approx(0.8) and m.relative_robustness == pytest.approx(0.8 / 0.95)
    ce_blur = (0.1 + 0.2) / (0.2 + 0.4)
    ce_jpeg = (0.15 + 0.35) / (0.3 + 0.5)
    assert m.mCE == pytest.approx((ce_blur + ce_jpeg) / 2)
    rel_blur = ((0.1 - 0.05) + (0.2 - 0.05)) / ((0.2 - 0.1) + (0.4 - 0.1))
    rel_jpeg = ((0.15 - 0.05) + (0.35 - 0.05)) / ((0.3 - 0.1) + (0.5 - 0.1))
    assert m.relative_mCE == pytest.approx((rel_blur + rel_jpeg) / 2)
    assert summary.loc["b"].mCE == pytest.approx(1.0) and summary.loc["b"].relative_mCE == pytest.approx(1.0)
    assert m.n_corruptions == 2 and m.baseline == "b"
    kinds = corruption_by_kind(_frame(rows), baseline="b")
    assert len(kinds) == 4 and set(kinds.corruption) == {"blur", "jpeg"}
    no_base = corruption_summary(_frame(rows), baseline="absent.victim")
    assert no_base.mCE.isna().all() and no_base.mean_corruption_score.notna().all()


# -------------------------------------------------------------------------------------------------------------
# the grid, the leaderboard and the entries, on a trained default victim


@pytest.fixture(scope="session")
def trained_cnn():
    return rbm.create_victim("cnn.phantom", train_if_missing=True, progress=False)


def _corruption_grid(severities, n=32, batch_size=32, kinds=None, name="corr"):
    return parse_grid({
        "name": name, "n_examples": n, "batch_size": batch_size, "victims": ["cnn.phantom"],
        "attacks": [{"name": f"corruption.{k}", "params": {"severity": list(severities)}} for k in (kinds or CORRUPTIONS)],
    })


@pytest.fixture(scope="session")
def corruption_store(trained_cnn, tmp_path_factory):
    from robustbench_med.runner import run_grid

    out = tmp_path_factory.mktemp("corruptions")
    return run_grid(_corruption_grid([0, 1, 5]), out, progress=False)


def test_grid_severity_zero_equals_clean_and_five_is_not_better_than_one(corruption_store):
    from robustbench_med.leaderboard import summary_wide

    df = summary_wide(corruption_store, fairness_boot=0)
    cells = df[df.attack.str.startswith("corruption.")]
    assert len(cells) == 3 * len(CORRUPTIONS) and (cells.status == "done").all() and (cells.n == 32).all()
    assert (cells.norm == "corruption").all() and set(cells.eps_display) == {"0", "1", "5"}
    zero = cells[cells.eps == 0]
    assert (zero.robust == zero.clean).all() and (zero.mean_linf == 0).all()
    import sqlite3

    con = sqlite3.connect(corruption_store)
    rows = con.execute("SELECT s.clean_score, s.adv_score, s.clean_pred, s.adv_pred, s.linf FROM samples s JOIN cells c "
                       "USING (cell_id) WHERE s.eps = 0").fetchall()
    con.close()
    assert len(rows) == 32 * len(CORRUPTIONS)
    assert all(r[0] == r[1] and r[2] == r[3] and r[4] == 0 for r in rows), "severity 0 must reproduce the clean results"
    summary = corruption_summary(df).iloc[0]
    assert summary.score_s0 == pytest.approx(summary.clean)
    assert summary.score_s5 <= summary.score_s1, "severity 5 must not beat severity 1 on average"
    assert 0 <= summary.mean_corruption_score <= 1 and summary.baseline == "cnn.phantom" and summary.mCE == pytest.approx(1.0)


def test_grid_writes_corruption_tables_and_entries(corruption_store, tmp_path):
    from robustbench_med.entries import build_entries, entry_path, threat_key
    from robustbench_med.leaderboard import write_leaderboard

    paths = write_leaderboard(corruption_store, tmp_path)
    for key in ("markdown", "corruptions_markdown", "corruptions_csv", "corruptions_by_kind_csv"):
        assert paths[key].exists() and paths[key].stat().st_size > 0
    md = paths["corruptions_markdown"].read_text()
    assert "mean (mCA / mDice)" in md and "cnn.phantom" in md and "motion" in md
    assert "| corruption |" in paths["markdown"].read_text()
    by_kind = pd.read_csv(paths["corruptions_by_kind_csv"])
    assert set(by_kind.corruption) == set(CORRUPTIONS)
    entries = build_entries(corruption_store)
    keys = {e["threat"]["key"] for e in entries}
    assert keys == {"corruption-s0", "corruption-s1", "corruption-s5"} == {threat_key("corruption", s) for s in (0, 1, 5)}
    for e in entries:
        assert e["threat"]["norm"] == "corruption" and e["threat"]["eps_display"] == str(int(e["threat"]["eps"]))
        attacks = {r["attack"] for r in e["results"] if r["cell_id"]}
        assert attacks == set(ATTACKS.list("corruption.*"))
        assert entry_path("lb", e).parts[-2] == e["threat"]["key"]
        json.dumps(e)


def test_harness_corruptions_do_not_depend_on_batch_size(trained_cnn, tmp_path, no_cache):
    """The corrupted images (seen through the per-sample perturbation norms the store keeps) are the same whatever
    the batch size, i.e. whatever other samples share a unit and whatever per-unit seed the harness passes."""
    import sqlite3

    from robustbench_med.runner import run_grid

    def norms(bs, sub):
        store = run_grid(_corruption_grid([2], n=20, batch_size=bs, kinds=["motion", "rician_noise"]), tmp_path / sub, progress=False)
        con = sqlite3.connect(store)
        rows = con.execute("SELECT c.attack, s.sample_idx, s.linf, s.l2 FROM samples s JOIN cells c USING (cell_id) ORDER BY 1, 2").fetchall()
        con.close()
        return rows

    a, b = norms(20, "a"), norms(7, "b")
    assert len(a) == 40 and a == b
    assert all(math.isfinite(r[2]) and r[2] > 0 for r in a)


def test_packaged_corruptions_grid_covers_every_corruption_and_default_victim():
    from importlib import resources

    from robustbench_med.grid import load_grid

    grid = load_grid(str(resources.files("robustbench_med") / "grids" / "corruptions.yaml"))
    default = load_grid(str(resources.files("robustbench_med") / "grids" / "default.yaml"))
    assert {v.name for v in grid.victims} == {v.name for v in default.victims}
    cells = {(a.name, a.params["severity"]) for a in grid.attacks}
    assert cells == {(n, s) for n in NAMES for s in range(1, 6)}
    assert [d.name for d in grid.defenses] == ["identity.none"]


def test_write_corruption_tables_is_a_no_op_without_corruption_cells(tmp_path):
    df = _frame([dict(victim="m", attack="pgd.linf", norm="Linf", eps=8 / 255, clean=0.9, robust=0.2)])
    assert write_corruption_tables(df, tmp_path) == {}
    assert not (tmp_path / "corruptions.md").exists()
