"""HFC (Yao et al., MICCAI 2021): feature statistics, the camouflaged attacks, the detectors and detection metrics."""
import numpy as np
import pytest
import torch

from robustbench_med import paths
from robustbench_med.api import create_attack, create_dataset, create_defense
from robustbench_med.detection import auroc, detection_metrics, detection_metrics_from_rows, overshoot, tpr_at_tnr
from robustbench_med.errors import ConfigError, TaskNotSupportedError
from robustbench_med.feature_stats import conv_modules, fit_feature_stats, global_pool, resolve_layers
from robustbench_med.feature_stats import module_activations as forward_with_features
from robustbench_med.registry import ATTACKS, DEFENSES
from robustbench_med.threat import check_budget
from robustbench_med.victim import ModelVictim, VictimCard
from robustbench_med.victims.basic import PHANTOM_MEAN, PHANTOM_STD, SmallCNN

from conftest import make_toy

EPS = 8 / 255
STATS = {"stats_n": 500, "stats_target_field": "label"}  # fitted by prepare() on `train` (500 phantom images)
DETECTOR_FIT = {"n_ref": 160, "n_fit": 80, "attack_params": {"eps": "8/255", "steps": 5}}
DETECTOR_EXTRA = {"detector.bu": {"passes": 8}, "detector.learned": {"epochs": 6}}


def _cnn(name: str, outputs: int, task: str, classes) -> ModelVictim:
    card = VictimCard(name=name, task=task, modality="CT (phantom)", input_size=(1, 64, 64), classes=classes)
    torch.manual_seed(0)
    return ModelVictim(SmallCNN(num_outputs=outputs, width=8), card, PHANTOM_MEAN, PHANTOM_STD, ("block1", "block2", "block3"))


@pytest.fixture(scope="module")
def train():
    return create_dataset("phantom.ct", split="train", n=1000)


@pytest.fixture(scope="module")
def binary_victim(train):
    """A small lesion present/absent CNN (deterministic: seeded init and order). 5 epochs on 1000 phantom images
    reach ~0.89 test accuracy (0.89 on the 64 test images below, 0.89 on 256), clear of the 0.75 floor."""
    victim = _cnn("test.hfc_cnn", 1, "binary", ("absent", "present"))
    x, y = train.images(), train.targets("label")
    epochs, lr = 5, 7e-3
    opt = torch.optim.AdamW(victim.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * ((len(x) + 31) // 32))
    g = torch.Generator().manual_seed(0)
    victim.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 32):
            idx = order[i : i + 32]
            loss = victim.loss(victim(x[idx]), y[idx]).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return victim.eval()


@pytest.fixture(scope="module")
def test_batch(binary_victim):
    ds = create_dataset("phantom.ct", split="test", n=64)
    x, y = ds.images(), ds.targets("label")
    keep = binary_victim.predict(x) == y
    assert keep.float().mean() > 0.75, "the test victim must be trained"
    return x[keep], y[keep]


def test_gmm_fit_is_deterministic_and_cached(binary_victim, train):
    a = fit_feature_stats(binary_victim, train, n=300, target_field="label", n_components=2, seed=3, use_cache=False)
    b = fit_feature_stats(binary_victim, train, n=300, target_field="label", n_components=2, seed=3, use_cache=False)
    cached = fit_feature_stats(binary_victim, train, n=300, target_field="label", n_components=2, seed=3)
    reloaded = fit_feature_stats(binary_victim, train, n=300, target_field="label", n_components=2, seed=3)
    assert a.layers == ("net.block1", "net.block2", "net.block3") and a.n_classes == 2
    for key, m in a.mixtures.items():
        for other in (b, cached, reloaded):
            o = other.mixtures[key]
            assert np.array_equal(m.means, o.means) and np.array_equal(m.precisions_cholesky, o.precisions_cholesky)
            assert np.array_equal(m.weights, o.weights)
        assert m.means.shape == (2, a.meta["channels"][key[1]]) and np.isclose(m.weights.sum(), 1)
    files = list((paths.home() / "feature_stats" / "test.hfc_cnn").iterdir())
    assert {p.suffix for p in files} == {".json", ".npz"}, "statistics are cached as npz + JSON, never pickled"
    assert all(p.with_suffix(".json").exists() for p in files)
    other_seed = fit_feature_stats(binary_victim, train, n=300, target_field="label", n_components=2, seed=4, use_cache=False)
    assert any(not np.array_equal(m.means, other_seed.mixtures[k].means) for k, m in a.mixtures.items())


def test_component_selection_and_term_match_the_gaussian_densities(binary_victim, train):
    """k* = argmax_k log π_k + log N(f; μ_k, (L_k L_kᵀ)⁻¹) and ℒ_HFC,l = ‖(f − μ_k*) L_k*‖² / C_l, checked against
    scipy's Gaussian log-density; the gradient flows through the selected component only."""
    from scipy.stats import multivariate_normal

    stats = fit_feature_stats(binary_victim, train, n=300, target_field="label", n_components=3, seed=0, use_cache=False)
    target = torch.tensor([0, 1] * 8)
    for layer in stats.layers:
        with torch.no_grad():
            f = global_pool(binary_victim.features(train.images(list(range(300, 316))), [layer])[layer]).double()
        f.requires_grad_(True)
        term = stats.layer_term(layer, f, target)
        grad, = torch.autograd.grad(term.sum(), f)
        for i, c in enumerate(target.tolist()):
            m = stats.mixtures[(c, layer)]
            prec = [L @ L.T for L in m.precisions_cholesky]
            logp = [np.log(w) + multivariate_normal(mu, np.linalg.inv(P)).logpdf(f[i].detach().numpy())
                    for w, mu, P in zip(m.weights, m.means, prec)]
            k = int(np.argmax(logp))
            diff = f[i].detach().numpy() - m.means[k]
            assert term[i].item() == pytest.approx(diff @ prec[k] @ diff / f.shape[1], rel=1e-6), (layer, i)
            assert np.allclose(grad[i].numpy(), 2 * prec[k] @ diff / f.shape[1], rtol=1e-6, atol=1e-9), (layer, i)


def test_layer_skipping_by_channel_count(binary_victim, train):
    stats = fit_feature_stats(binary_victim, train, n=200, target_field="label", n_components=1, max_channels=16, use_cache=False)
    assert stats.layers == ("net.block1", "net.block2") and stats.meta["skipped"] == ["net.block3"]


@pytest.mark.parametrize("name", ATTACKS.list("hfc.*"))
def test_hfc_respects_budget_and_range(name, binary_victim, test_batch, train):
    x, y = test_batch[0][:12], test_batch[1][:12]
    eps = torch.linspace(2 / 255, EPS, len(x))
    attack = create_attack(name, eps=EPS, steps=4, **STATS)
    attack.prepare(binary_victim, train)
    x_adv = attack(binary_victim, x, y, eps=eps)
    report = check_budget(x, x_adv, "Linf", eps)
    assert report.valid, report.reason()
    assert not torch.equal(x_adv, x)
    again = attack(binary_victim, x, y, eps=eps)
    assert torch.equal(x_adv, again), "HFC must be deterministic under its seed"


@pytest.mark.parametrize("hierarchy", ["blocks", "conv"])
def test_hfc_features_closer_to_target_than_base(binary_victim, test_batch, train, hierarchy):
    """HFC's pooled features lie closer (in the mixtures' Mahalanobis distance) to the target class than BIM's, with
    the block hierarchy and with every convolution constrained (the release)."""
    x, y = test_batch
    base = create_attack("hfc.bim", eps=EPS, steps=10, lam=0, **STATS)
    hfc = create_attack("hfc.bim", eps=EPS, steps=10, lam=1, hierarchy=hierarchy, **STATS)
    hfc.prepare(binary_victim, train)
    x_base, x_hfc = base(binary_victim, x, y), hfc(binary_victim, x, y)
    stats = hfc.statistics(binary_victim)
    assert list(stats.layers) == resolve_layers(binary_victim, None, hierarchy)
    target = 1 - y
    with torch.no_grad():
        d_base = stats.hfc_term(forward_with_features(binary_victim, x_base, [f"{l}" for l in stats.layers])[1], target)
        d_hfc = stats.hfc_term(forward_with_features(binary_victim, x_hfc, list(stats.layers))[1], target)
        fooled_base = (binary_victim.predict(x_base) != y).float().mean()
        fooled_hfc = (binary_victim.predict(x_hfc) != y).float().mean()
    assert d_hfc.mean() < 0.5 * d_base.mean(), (d_hfc.mean(), d_base.mean())
    assert fooled_base > 0.9 and fooled_hfc > 0.6, (fooled_base, fooled_hfc)


def test_conv_hierarchy_is_every_convolution(binary_victim):
    convs = resolve_layers(binary_victim, None, "conv")
    assert convs == [n for n, m in binary_victim.named_modules() if isinstance(m, torch.nn.Conv2d)] == list(conv_modules(binary_victim))
    assert len(convs) == 6 and resolve_layers(binary_victim, None) == ["net.block1", "net.block2", "net.block3"]
    _, feats = forward_with_features(binary_victim, torch.rand(2, 1, 64, 64), convs + ["net.block2"])
    assert set(feats) == set(convs) | {"net.block2"} and all(f.dim() == 4 for f in feats.values())
    with pytest.raises(ConfigError, match="hierarchy"):
        create_attack("hfc.pgd", hierarchy="every")


def test_select_lambda_follows_its_rule(binary_victim, train):
    """The largest λ whose validation ASR is within the tolerance of the base attack's; the feature term falls with λ."""
    from robustbench_med.attacks.hfc import select_lambda

    val = create_dataset("phantom.ct", split="val", n=40)
    params = {"eps": "8/255", "steps": 5, **STATS}
    lam, rows = select_lambda(binary_victim, train, val, params=params, candidates=(0.1, 30.0), tolerance=0.05, n=40)
    assert [r["lam"] for r in rows] == [0.0, 0.1, 30.0]
    ok = [r["lam"] for r in rows[1:] if r["asr"] >= rows[0]["asr"] - 0.05]
    assert lam == (max(ok) if ok else 0.1)
    assert rows[1]["hfc_term"] < rows[0]["hfc_term"] and rows[2]["hfc_term"] <= rows[1]["hfc_term"] * 1.05
    assert rows[2]["asr"] < rows[0]["asr"], "a 300x stronger constraint must cost some success on 5 steps"
    with pytest.raises(ConfigError):
        select_lambda(binary_victim, train, val, params=params, candidates=(0,))


def test_named_stats_dataset_matches_prepare(binary_victim, train):
    """``stats_dataset`` fits the same mixtures as ``prepare`` on the same split, without a prepare call."""
    prepared = create_attack("hfc.bim", **STATS)
    prepared.prepare(binary_victim, train)
    named = create_attack("hfc.bim", stats_dataset="phantom.ct", stats_split="train", **STATS)
    a, b = prepared.statistics(binary_victim), named.statistics(binary_victim)
    assert a.layers == b.layers and all(np.array_equal(m.means, b.mixtures[k].means) for k, m in a.mixtures.items())
    base = create_attack("hfc.bim", lam=0)
    base.prepare(binary_victim, train)  # λ = 0: the base attack fits nothing and runs unprepared
    assert base._stats == {}


def test_hfc_without_the_constraint_is_its_base_attack(binary_victim, test_batch):
    """λ = 0 gives PGD itself (same start, steps and step size; binary CE towards the flipped label has the same
    gradient sign as the CE away from the label)."""
    x, y = test_batch[0][:16], test_batch[1][:16]
    kw = dict(eps=EPS, steps=5, step_size=2 / 255, seed=4)
    base = create_attack("hfc.pgd", lam=0, **kw)(binary_victim, x, y)
    pgd = create_attack("pgd.linf", **kw)(binary_victim, x, y)
    assert (base == pgd).float().mean() > 0.99


def test_multiclass_target_rules():
    victim = _cnn("test.hfc_cnn3", 3, "classification", ("none", "cyst", "tumour")).eval()
    x = torch.rand(8, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    likely = create_attack("hfc.bim").target_labels(victim, x, y)
    with torch.no_grad():
        logits = victim(x)
    logits[torch.arange(8), y] = -float("inf")
    assert torch.equal(likely, logits.argmax(1)) and not (likely == y).any()
    assert torch.equal(create_attack("hfc.bim", target="next").target_labels(victim, x, y), (y + 1) % 3)
    assert torch.equal(create_attack("hfc.bim", targeted=True).target_labels(victim, x, y), y)


@pytest.fixture(scope="module")
def fitted_detectors(binary_victim, train):
    out = {}
    for name in DEFENSES.list("detector.*"):
        det = create_defense(name, **DETECTOR_FIT, **DETECTOR_EXTRA.get(name, {}))
        det.prepare(binary_victim, train)
        out[name] = det
    return out


def test_detectors_flag_base_attack(fitted_detectors, binary_victim, test_batch):
    x, y = test_batch
    x_adv = create_attack("pgd.linf", eps=EPS, steps=10, seed=5)(binary_victim, x, y)
    fooled = binary_victim.predict(x_adv) != y
    aurocs = {}
    for name, det in fitted_detectors.items():
        defended = det.wrap(binary_victim)
        clean, adv = defended.detect(x), defended.detect(x_adv[fooled])
        assert clean.shape == (len(x),) and torch.isfinite(clean).all()
        aurocs[name] = detection_metrics(clean, adv)["detector_auroc"]
    assert all(a > 0.8 for a in aurocs.values()), aurocs


def test_two_sided_scores_flag_both_tails(fitted_detectors, binary_victim, test_batch):
    x, _ = test_batch
    for name, det in fitted_detectors.items():
        centre, scale = det.clean_reference
        assert np.isfinite(centre) and scale > 0, name
        scores = det.wrap(binary_victim).detection_scores(x)
        assert set(scores) == {"detector_score", "detector_score_two_sided"}, name
        assert torch.allclose(scores["detector_score_two_sided"], (scores["detector_score"] - centre).abs() / scale)
        far = det.two_sided(torch.tensor([centre - 10 * scale, centre, centre + 10 * scale], dtype=torch.float64))
        assert far.tolist() == pytest.approx([10.0, 0.0, 10.0], abs=1e-6), name


def test_overshoot_and_two_sided_metrics_from_rows():
    """Adversarial scores below every clean score: one-sided AUROC 0 (an overshoot), two-sided AUROC 1."""
    rng = np.random.default_rng(0)
    clean, adv = rng.normal(0, 1, 200), rng.normal(-6, 1, 150)
    rows = [{"metrics": {"clean_detector_score": c, "detector_score": a, "clean_detector_score_two_sided": abs(c),
                         "detector_score_two_sided": abs(a)}, "clean_correct": 1, "adv_correct": 0} for c, a in zip(clean, adv)]
    m = detection_metrics_from_rows(rows)
    assert m["detector_auroc"] < 0.01 and m["detector_auroc_overshoot"] == 1.0
    assert m["detector_auroc_two_sided"] > 0.99 and m["detector_tpr_at_90tnr_two_sided"] > 0.95
    assert not overshoot(0.49, 256, 240) and overshoot(0.40, 256, 240) and not overshoot(float("nan"), 10, 10)
    old = [{"metrics": {"clean_detector_score": 0.0, "detector_score": 1.0}, "clean_correct": 1, "adv_correct": 0}]
    assert "detector_auroc_two_sided" not in detection_metrics_from_rows(old)  # stores without two-sided scores
    from robustbench_med.render import _metric_cell

    assert _metric_cell({"metrics": m}, "detector_auroc").endswith("(overshoot)")
    assert "overshoot" not in _metric_cell({"metrics": m}, "detector_auroc_two_sided")


def test_detector_fit_uses_real_noise(binary_victim, train):
    from robustbench_med.defenses.detectors import build_fit_data

    data = build_fit_data(binary_victim, train, "pgd.linf", DETECTOR_FIT["attack_params"], 160, 80, 0)
    delta = (data.x_noise - data.x_clean).abs()
    assert delta.amax() <= EPS + 1e-6 and (delta.flatten(1).amax(1) > EPS / 2).all()
    assert len(data.x_adv) >= 2 and len(data.x_ref) == 160


def test_detection_metrics_formulas():
    clean = [0.0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert auroc(clean, [10, 11]) == 1.0 and auroc(clean, [-1]) == 0.0
    assert auroc([0, 1], [1, 2]) == pytest.approx((1 + 1 + 0.5 + 1) / 4)  # one tie counts ½
    rng = np.random.default_rng(0)  # roc_auc_score equals counting every (clean, adversarial) pair, ties ½
    neg, pos = rng.integers(0, 6, 40).astype(float), rng.integers(2, 9, 30).astype(float)
    pairs = (pos[None] > neg[:, None]).mean() + 0.5 * (pos[None] == neg[:, None]).mean()
    assert auroc(neg, pos) == pytest.approx(pairs, abs=1e-12)
    assert tpr_at_tnr(clean, [8.5, 9.5, 10]) == pytest.approx(2 / 3)  # τ = 9: TNR = 1.0 ≥ 0.9
    m = detection_metrics(torch.tensor(clean), np.array([9.5, 3.5]))
    assert m == {"detector_auroc": pytest.approx(0.7), "detector_tpr_at_90tnr": 0.5}
    rows = [{"metrics": {"detector_score": 5.0, "clean_detector_score": 1.0}, "clean_correct": 1, "adv_correct": 0},
            {"metrics": '{"detector_score": 0.0, "clean_detector_score": 2.0}', "clean_correct": 1, "adv_correct": 1}]
    assert detection_metrics_from_rows(rows)["detector_auroc"] == 1.0
    assert detection_metrics_from_rows(rows, successful_only=False)["detector_auroc"] == 0.5


def test_bad_parameters_raise_clear_errors(binary_victim, train):
    bad_attacks = [("hfc.bim", {"norm": "L2"}), ("hfc.bim", {"lam": -1}), ("hfc.pgd", {"target": "random"}),
                   ("hfc.cw", {"n_components": 0}), ("hfc.mifgsm", {"layers": "net.block1"}), ("hfc.bim", {"restarts": 2}),
                   ("hfc.bim", {"stats_n": 1}), ("hfc.bim", {"reg_covar": 0}), ("hfc.bim", {"stats_target_field": 3})]
    for name, params in bad_attacks:
        with pytest.raises(ConfigError):
            create_attack(name, **params)
    with pytest.raises(ConfigError, match="unknown feature layers"):
        create_attack("hfc.bim", layers=["net.nope"], **STATS).prepare(binary_victim, train)
    with pytest.raises(ConfigError, match="call prepare"):
        create_attack("hfc.bim", **STATS)(binary_victim, torch.rand(2, 1, 64, 64), torch.tensor([0, 1]))
    with pytest.raises(ConfigError, match="stats_dataset"):
        create_attack("hfc.bim", stats_dataset=3)
    with pytest.raises(ConfigError, match="target_field"):
        fit_feature_stats(binary_victim, n=50)
    with pytest.raises(TaskNotSupportedError):
        create_attack("hfc.bim")(make_toy("multilabel"), torch.rand(2, 1, 16, 16), torch.zeros(2, 3))
    with pytest.raises(ConfigError, match="not fitted"):
        create_defense("detector.kd").score(binary_victim, torch.rand(2, 1, 64, 64))
    with pytest.raises(ConfigError, match="n_ref"):
        create_defense("detector.lid", k=20, n_ref=10)
    with pytest.raises(ConfigError, match="L∞"):
        create_defense("detector.svm", attack="pgd.l2", attack_params={"eps": 0.5}, n_ref=8, n_fit=8).prepare(binary_victim, train)
    with pytest.raises(ConfigError, match="n_ref"):
        create_defense("detector.svm", n_ref=len(train), n_fit=2).prepare(binary_victim, train)
    with pytest.raises(TaskNotSupportedError):
        create_defense("detector.bu").prepare(make_toy("multilabel"), train)
    with pytest.raises(ConfigError):
        detection_metrics([], [1.0])


def test_grid_runner_prepares_hfc_and_reports_detection(binary_victim, tmp_path):
    """A grid cell of HFC behind a detector: the runner fits the statistics on the training split (prepare) and
    the leaderboard shows the ASR next to the detector's AUROC and TPR at 90% TNR."""
    from dataclasses import replace

    from robustbench_med.grid import parse_grid
    from robustbench_med.leaderboard import summary_wide, to_text
    from robustbench_med.registry import VICTIMS
    from robustbench_med.runner import run_grid

    name = "testgrid.hfc_cnn"
    VICTIMS.add(name, lambda **kw: binary_victim, task="binary", card=replace(binary_victim.card, name=name))
    try:
        grid = parse_grid({
            "name": "hfc-test", "dataset": {"name": "phantom.ct", "split": "test", "params": {"n": 500}},
            "n_examples": 24, "seed": 0, "victims": [{"name": name, "weights": None, "target_field": "label"}],
            "attacks": [{"name": "pgd.linf", "params": {"eps": "8/255", "steps": 5}},
                        {"name": "hfc.pgd", "params": {"eps": "8/255", "steps": 5, "lam": 1, "stats_target_field": "label"}}],
            "defenses": [{"name": "detector.svm", "params": DETECTOR_FIT}],
        })
        df = summary_wide(run_grid(grid, tmp_path, progress=False), fairness_boot=0)
    finally:
        VICTIMS.remove(name)
    cells = df[df.cell_id != ""].set_index("attack")
    assert set(cells.status) == {"done"}, cells.reason.tolist()
    for attack in ("pgd.linf", "hfc.pgd"):
        for key in ("detector_auroc", "detector_tpr_at_90tnr", "detector_auroc_two_sided", "detector_tpr_at_90tnr_two_sided"):
            assert 0 <= cells.loc[attack, key] <= 1, key
        assert cells.loc[attack, "attack_success_rate"] > 0.5
    head = to_text(df).splitlines()[0]
    assert head.index("ASR") < head.index("det. AUROC") < head.index("TPR@90%TNR") < head.index("det. AUROC (two-sided)")


def test_packaged_hfc_grids_cover_the_paper_setting():
    """The detectors study holds the paper's ε = 1/256 (α = 1/2560, 20 steps) with detectors fitted at that budget,
    and the every-conv hierarchy beside the block one at 8/255."""
    from robustbench_med.cli_publish import PUBLISH_SETS
    from robustbench_med.cli import default_grid_path
    from robustbench_med.grid import load_grid
    from robustbench_med.threat import parse_eps

    assert {"hfc", "hfc_paper"} <= set(PUBLISH_SETS["detectors"])
    paper, main = load_grid(default_grid_path("hfc_paper")), load_grid(default_grid_path("hfc"))
    for a in paper.attacks:
        assert parse_eps(a.params["eps"]) == 1 / 256 and parse_eps(a.params["step_size"]) == 1 / 2560 and a.params["steps"] == 20
    for d in paper.defenses:
        assert parse_eps(d.params["attack_params"]["eps"]) == 1 / 256, d.name
    assert {a.params.get("hierarchy", "blocks") for a in main.attacks if a.name == "hfc.pgd"} == {"blocks", "conv"}
    assert {a.params.get("hierarchy", "blocks") for a in paper.attacks if a.name == "hfc.pgd"} == {"blocks", "conv"}
