"""Volumes (issue #20): the NCDHW contract, every attack on volumetric victims (runs within budget or refuses clearly),
sliding-window inference differentiated exactly (finite differences), 3D landmarks, and a user's MONAI 3D network
through the own-model path and a grid."""
import pytest
import torch

import robustbench_med as rbm
from robustbench_med import tasks as T
from robustbench_med.attack import check_targets
from robustbench_med.errors import ConfigError, InputContractError, TaskNotSupportedError
from robustbench_med.registry import ATTACKS
from robustbench_med.sliding import SlidingWindow
from robustbench_med.threat import check_budget
from robustbench_med.victim import ModelVictim, VictimCard

SIZE = (1, 8, 12, 12)


class Lin3D(torch.nn.Module):
    def __init__(self, out: int = 1):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(out, 8 * 12 * 12, generator=g) * 0.1)

    def forward(self, z):
        return z.flatten(1) @ self.w.t()


def _seg(window=None):
    torch.manual_seed(0)
    card = VictimCard(name="toy3d.seg", task="segmentation", modality="toy", input_size=SIZE, classes=("a", "b", "c"))
    return ModelVictim(torch.nn.Conv3d(1, 3, 3, padding=1), card, window=window).eval()


def _cls():
    card = VictimCard(name="toy3d.bin", task="binary", modality="toy", input_size=SIZE, classes=("n", "p"))
    return ModelVictim(Lin3D(), card).eval()


def _landmarks():
    torch.manual_seed(0)
    card = VictimCard(name="toy3d.lm", task="landmark", modality="toy", input_size=SIZE, classes=("p", "q"),
                      extra={"sdr_radius": 2.0})
    return ModelVictim(torch.nn.Conv3d(1, 2, 3, padding=1), card).eval()


def _batch(victim):
    x = torch.rand(4, *SIZE, generator=torch.Generator().manual_seed(1))
    out = victim(x)
    if victim.task == "landmark":
        return x, T.heatmap_argmax(out)
    y = out.argmax(1) if victim.task == "segmentation" else (out[:, 0] > 0).long()
    return x, y


def test_the_contract_takes_volumes_and_names_the_layout():
    victim = _seg()
    assert victim.card.spatial_dims == 3 and victim.mean.shape == (1, 1, 1, 1, 1)
    with pytest.raises(InputContractError, match="NCDHW"):
        victim(torch.rand(2, 1, 12, 12))
    with pytest.raises(InputContractError, match=r"\(C, D, H, W\)"):
        victim(torch.rand(2, 1, 8, 12, 13))
    with pytest.raises(ConfigError, match="input_size"):
        VictimCard(name="bad.size", task="binary", modality="toy", input_size=(1, 2, 3, 4, 5))
    with pytest.raises(ConfigError, match=r"\[n, D, H, W\]"):
        check_targets(victim, torch.zeros(4, 12, 12, dtype=torch.long))


def test_volume_dice_is_per_volume_and_landmarks_are_xyz_voxels():
    target = torch.zeros(2, 4, 5, 6, dtype=torch.long)
    target[0, 1:3, 1:3, 1:3] = 1
    pred = target.clone()
    pred[0, 1, 1, 1] = 0  # 7 of 8 voxels found
    logits = torch.nn.functional.one_hot(pred, 2).movedim(-1, 1).float()
    dice = T.get_task("segmentation").metrics(logits, target)["dice_fg"]
    assert dice[0].item() == pytest.approx(2 * 7 / (7 + 8)) and dice[1].item() == 1.0
    coords = torch.tensor([[[1.0, 2.0, 3.0], [4.0, 0.0, 1.0]]])  # (x, y, z)
    hm = T.landmark_heatmaps(coords, (4, 5, 6), sigma=1.0)
    assert hm.shape == (1, 2, 4, 5, 6) and hm[0, 0, 3, 2, 1] == 1.0
    assert torch.equal(T.heatmap_argmax(hm), coords)


ATTACK_PARAMS = {"square.objective": {"n_queries": 20}, "apgd.objective": {"steps": 10}}


def _make(name):
    kw = {"surrogate": "cnn.phantom"} if name == "transfer.pgd" else {}
    return rbm.create_attack(name, **kw, **ATTACK_PARAMS.get(name, {}))


@pytest.mark.parametrize("name", rbm.list_attacks())
@pytest.mark.parametrize("kind", ["segmentation", "binary", "landmark"])
def test_every_attack_runs_within_budget_on_volumes_or_refuses_them_clearly(name, kind):
    """On a volumetric segmentor and classifier an attack either refuses at planning time (check_task) or runs: a
    result within its budget and range, robust ≤ clean. HFC needs fitted statistics and transfer a surrogate of the
    volume's size (both refuse clearly otherwise: tested elsewhere)."""
    victim = {"segmentation": _seg, "binary": _cls, "landmark": _landmarks}[kind]()
    attack = _make(name)
    try:
        attack.check_task(victim)
    except TaskNotSupportedError:
        return
    if name.startswith("hfc.") or name in ("transfer.pgd", "modality.dropout"):
        with pytest.raises((ConfigError, TaskNotSupportedError)):
            attack(victim, *_batch(victim))
        return
    x, y = _batch(victim)
    x_adv = attack(victim, x, y)
    assert check_budget(x, x_adv, attack.threat.norm, attack.threat.eps).valid
    if attack.knowledge != "none":
        assert victim.score(x_adv, y).mean() <= victim.score(x, y).mean()


def test_volume_capable_attacks_include_pgd_apgd_and_square():
    seg = _seg()
    for name in ("pgd.linf", "pgd.l2", "apgd.objective", "square.objective", "noise.uniform"):
        _make(name).check_task(seg)
    for name in ("apgd.ce", "square.linf", "autoattack.standard", "corruption.blur"):
        with pytest.raises(TaskNotSupportedError, match="slices only"):
            _make(name).check_task(_cls())
    assert "apgd.objective" in ATTACKS.list("apgd.*")


def test_sliding_window_gradient_matches_finite_differences():
    """The attack differentiates through sliding-window inference (window extraction and Gaussian overlap
    blending): autograd's input gradient of the per-sample loss equals a central finite difference (float64)."""
    window = SlidingWindow((4, 8, 8), overlap=0.5, mode="gaussian", sw_batch_size=3)
    victim = _seg(window).double()
    assert window.windows(SIZE[1:]) == 3 * 2 * 2  # depth 8 by 4 at stride 2; 12 by 8 at stride 4
    x = torch.rand(1, *SIZE, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    y = victim(x).argmax(1)
    y[0, 2:5, 3:8, 3:8] = 2  # a target the model does not predict, so the loss is not flat

    def f(v):
        return victim.objective(v, y).sum()

    xg = x.clone().requires_grad_(True)
    grad = torch.autograd.grad(f(xg), xg)[0]
    h = 1e-6
    for idx in [(0, 0, 0, 0, 0), (0, 0, 3, 5, 6), (0, 0, 4, 8, 3), (0, 0, 7, 11, 11)]:  # corners and overlaps
        xp, xm = x.clone(), x.clone()
        xp[idx] += h
        xm[idx] -= h
        with torch.no_grad():
            fd = (f(xp) - f(xm)) / (2 * h)
        assert grad[idx].item() == pytest.approx(fd.item(), rel=1e-5, abs=1e-9)


def test_sliding_window_settings_are_checked():
    with pytest.raises(ConfigError, match="overlap"):
        SlidingWindow((4, 4, 4), overlap=1.0)
    with pytest.raises(ConfigError, match="mode"):
        SlidingWindow((4, 4, 4), mode="median")
    with pytest.raises(ConfigError, match="unknown"):
        SlidingWindow.parse({"roi_size": (4, 4, 4), "stride": 2})
    with pytest.raises(ConfigError, match="axes"):
        _seg(SlidingWindow((4, 4)))(torch.rand(1, *SIZE))


def test_apgd_objective_checkpoints_follow_the_paper():
    from robustbench_med.attacks.apgd import checkpoints

    # p: 0.22, 0.41, 0.57, 0.70, 0.80, 0.87, 0.93, 0.99 (Croce & Hein, §3.2) of 100 iterations
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]


def test_apgd_objective_is_at_least_as_strong_as_pgd_on_a_volume_segmentor():
    victim = _seg(SlidingWindow((4, 8, 8), overlap=0.5))
    x, y = _batch(victim)
    apgd = rbm.create_attack("apgd.objective", eps=4 / 255, steps=20, seed=1)(victim, x, y)
    pgd = rbm.create_attack("pgd.linf", eps=4 / 255, steps=20, seed=1)(victim, x, y)
    loss = lambda v: victim.objective(v, y).mean()  # noqa: E731
    assert check_budget(x, apgd, "Linf", 4 / 255).valid
    assert loss(apgd) >= loss(pgd) - 1e-4 and loss(apgd) > loss(x)


def test_a_users_monai_3d_network_goes_through_wrap_with_a_sliding_window(tmp_path):
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    net = UNet(spatial_dims=3, in_channels=1, out_channels=3, channels=(4, 8), strides=(2,), num_res_units=0)
    with pytest.raises(ConfigError, match=r"\(C, D, H, W\)"):
        rbm.wrap(net, "segmentation")
    victim = rbm.wrap(net, "segmentation", input_size=SIZE, mean=0.25, std=0.25, name="lab.unet3d",
                      sliding_window={"roi_size": (8, 8, 8), "overlap": 0.5})
    assert victim.card.input_size == SIZE and victim.card.classes == ("0", "1", "2")
    assert victim.card.extra["sliding_window"]["roi_size"] == [8, 8, 8]
    x, y = _batch(victim)
    x_adv = rbm.create_attack("pgd.linf", eps=8 / 255, steps=3)(victim, x, y)
    assert check_budget(x, x_adv, "Linf", 8 / 255).valid
    assert victim.score(x_adv, y).mean() < victim.score(x, y).mean()


def test_a_users_monai_3d_network_runs_a_grid_on_the_volume_phantom(tmp_path):
    """The README's own-model path on volumes: ``rbm.benchmark`` with a MONAI 3D U-Net, sliding-window inference and
    the volume phantom; the standard suite on volumes is APGD + Square on the objective (AutoAttack needs 4-D)."""
    from monai.networks.nets import UNet

    from robustbench_med.evaluation import attack_suite
    from robustbench_med.leaderboard import summary_wide

    assert [a["name"] for a in attack_suite("standard", "segmentation", "Linf", 3)] == ["apgd.objective", "square.objective"]
    torch.manual_seed(0)
    net = UNet(spatial_dims=3, in_channels=1, out_channels=6, channels=(4, 8), strides=(2,), num_res_units=0)
    df = rbm.benchmark(net, task="segmentation", dataset="phantom.volumes", eps=["2/255", "8/255"], n=4, batch_size=4,
                       attacks=[{"name": "pgd.linf", "params": {"steps": 2}}], mean=0.25, std=0.25, name="lab.unet3d",
                       sliding_window={"roi_size": (32, 32, 32), "overlap": 0.25}, out=tmp_path / "run")
    done = df[df.status == "done"]
    assert len(done) == 2 and set(done.metric) == {"dice_fg"} and (done.robust <= done.clean + 1e-9).all()
    assert {"robust_gap_sex", "robust_gap_age_group"} <= set(df.columns)
    assert {"robust_hd95_vox", "clean_hd95_vox", "robust_assd_vox", "robust_iou_fg"} <= set(df.columns)  # secondary metrics
    summary = summary_wide(tmp_path / "run" / "results.sqlite", fairness_boot=0)  # the secondary metrics, clean and robust
    cells = summary[summary.status == "done"]
    assert {"clean_hd95_vox", "robust_hd95_vox", "clean_assd_vox", "robust_assd_vox"} <= set(summary.columns)
    assert ((cells.robust_assd_vox > 0) & (cells.robust_hd95_vox > 0) & (cells.clean_assd_vox > 0)).all()
    assert (tmp_path / "run" / "leaderboard.md").exists()


@pytest.mark.slow
def test_pgd_through_sliding_window_lowers_dice_monotonically_in_eps_on_the_trained_3d_unet():
    """The registered ``unet3d.phantom`` (MONAI 3D U-Net trained by its recipe on 32³ patches, about a minute on two
    cores) attacked through its sliding-window inference: mean per-volume Dice falls with eps, and well below clean
    at 8/255."""
    victim = rbm.create_victim("unet3d.phantom", train_if_missing=True, progress=False)
    assert victim.card.extra["sliding_window"]["roi_size"] == [32, 32, 32]
    data = rbm.create_dataset("phantom.volumes", split="test", n=6)
    x, y = data.images(), data.targets("mask")
    dice = [victim.score(x, y).mean().item()]
    for eps in (1 / 255, 2 / 255, 4 / 255, 8 / 255):
        x_adv = rbm.create_attack("pgd.linf", eps=eps, steps=5, seed=0)(victim, x, y)
        assert check_budget(x, x_adv, "Linf", eps).valid
        dice.append(victim.score(x_adv, y).mean().item())
    assert dice[0] > 0.8, dice
    assert all(a > b for a, b in zip(dice, dice[1:])), dice
    assert dice[-1] < dice[0] - 0.15, dice  # measured 0.895 → 0.696 at 8/255 (5 steps, 6 volumes)


def test_volume_dice_and_hd95_agree_with_monai_metrics():
    """Per-volume Dice equals MONAI's DiceMetric where every foreground class is present in both maps; hd95_vox is
    MONAI's 95th-percentile Hausdorff distance, with the volume diagonal for a class only one map has."""
    from monai.metrics import DiceMetric, compute_hausdorff_distance

    g = torch.Generator().manual_seed(0)
    target = torch.zeros(2, 8, 12, 12, dtype=torch.long)
    target[:, 2:6, 3:9, 3:9] = 1
    target[:, 3:5, 5:7, 5:7] = 2
    pred = target.clone()
    pred[0, 2:6, 3:9, 8] = 0
    pred[1] = torch.roll(pred[1], 1, dims=1)
    pred[:, 0, 0, :2] = torch.randint(0, 2, (2, 2), generator=g)
    logits = torch.nn.functional.one_hot(pred, 3).movedim(-1, 1).float()
    ours = T.get_task("segmentation").metrics(logits, target)
    oh = lambda m: torch.nn.functional.one_hot(m, 3).movedim(-1, 1).float()  # noqa: E731
    expected = torch.stack([DiceMetric(include_background=False, reduction="mean")(oh(pred[i:i + 1]), oh(target[i:i + 1])).mean()
                            for i in range(2)])
    assert torch.allclose(ours["dice_fg"], expected, atol=1e-6)
    hd = compute_hausdorff_distance(oh(pred), oh(target), include_background=False, percentile=95).mean(1)
    assert torch.allclose(ours["hd95_vox"], hd.float(), atol=1e-5) and (ours["hd95_vox"] > 0).all()
    pred[0][pred[0] == 2] = 1  # class 2 missing from the prediction of volume 0
    ours = T.get_task("segmentation").metrics(torch.nn.functional.one_hot(pred, 3).movedim(-1, 1).float(), target)
    diag = (8 ** 2 + 12 ** 2 + 12 ** 2) ** 0.5
    hd1 = compute_hausdorff_distance(oh(pred[:1]), oh(target[:1]), include_background=False, percentile=95)[0, 0]
    assert ours["hd95_vox"][0].item() == pytest.approx((hd1.item() + diag) / 2, rel=1e-5)


def test_baseline_table_pairs_samples_and_gives_verdicts(monkeypatch):
    """``baselines.md``: Δ = victim − declared baseline on the same samples, paired bootstrap CI, verdict."""
    import numpy as np
    import pandas as pd

    from robustbench_med import paired_metrics as PM

    rng = np.random.default_rng(0)
    base = rng.uniform(0.5, 0.9, 64)
    frames = {("unet3d.meanteacher", "identity.none"): pd.DataFrame({"clean": base + 0.05, "pgd.linf 2/255": base - 0.3}),
              ("unet3d.fewlabels", "identity.none"): pd.DataFrame({"clean": base, "pgd.linf 2/255": base - 0.3 + rng.normal(0, 0.01, 64)}),
              ("unet3d.phantom", "identity.none"): pd.DataFrame({"clean": base})}
    monkeypatch.setattr(PM, "condition_scores", lambda store: frames)
    assert PM.declared_baseline("unet3d.meanteacher") == "unet3d.fewlabels" and PM.declared_baseline("unet3d.phantom") is None
    table = PM.baseline_table(None).set_index("condition")
    assert list(table.victim.unique()) == ["unet3d.meanteacher"] and table.loc["clean", "n"] == 64
    assert table.loc["clean", "delta"] == pytest.approx(0.05) and table.loc["clean", "verdict"] == "better"
    assert table.loc["clean", "ci95_low"] == pytest.approx(0.05) == table.loc["clean", "ci95_high"]  # constant difference
    assert table.loc["pgd.linf 2/255", "verdict"] == "no difference shown"
    assert "| unet3d.meanteacher | unet3d.fewlabels |" in PM.to_markdown(table.reset_index())


def test_seed_study_table_covers_samples_and_training_seeds(monkeypatch):
    """``seed_studies.md``: the 3D projector study's arms over 3 training seeds; a difference smaller than the seed
    spread is not a finding, a consistent one is; fewer than 3 seeds give no verdict."""
    import numpy as np
    import pandas as pd

    from robustbench_med import seed_studies as SS

    rng = np.random.default_rng(0)
    base = rng.uniform(0.5, 0.9, 48)
    frames = {}
    for seed, offset in zip((0, 1, 2), (-0.2, 0.0, 0.2)):
        tag = f"_s{seed}" if seed else ""
        # clean: compressed 0.1 above in every seed; attacked: a 0.05 mean difference under a ±0.2 seed spread
        frames[(f"vlm3d.perceiver{tag}", "identity.none")] = pd.DataFrame({"clean": base + 0.1, "pgd.linf 2/255": base - 0.3 + offset + 0.05})
        frames[(f"vlm3d.mlp{tag}", "identity.none")] = pd.DataFrame({"clean": base, "pgd.linf 2/255": base - 0.3 - offset})
    frames[("unet3d.phantom", "identity.none")] = pd.DataFrame({"clean": base})
    monkeypatch.setattr(SS, "condition_scores", lambda store: frames)
    assert SS.study_membership("vlm3d.perceiver_s2")[1:] == ("compressed", 2) and SS.study_membership("unet3d.phantom") is None
    table = SS.seed_study_table(None).set_index("condition")
    assert list(table.arm_a.unique()) == ["compressed"] and table.loc["clean", "n"] == 48
    assert table.loc["clean", "delta"] == pytest.approx(0.1) and table.loc["clean", "verdict"] == "compressed higher"
    attacked = table.loc["pgd.linf 2/255"]
    assert attacked.delta == pytest.approx(0.05) and attacked.seed_range_a == pytest.approx(0.4)
    assert attacked.verdict == "no difference shown" and attacked.ci95_high - attacked.ci95_low > 0.3
    assert attacked.drop_delta == pytest.approx(0.05)  # clean Δ 0.1 − attacked Δ 0.05
    assert "| 3D projector (compressed vs uncompressed) |" in SS.to_markdown(table.reset_index())
    for key, f in [(k, f) for k, f in frames.items() if "pgd.linf 2/255" in f]:  # another condition in the store
        frames[key] = f.assign(**{"noise.uniform 8/255": f["clean"]})[["clean", "noise.uniform 8/255", "pgd.linf 2/255"]]
    again = SS.seed_study_table(None).set_index("condition").loc["pgd.linf 2/255"]  # leaves this row's interval
    assert (again.ci95_low, again.ci95_high) == (attacked.ci95_low, attacked.ci95_high)
    del frames[("vlm3d.mlp_s2", "identity.none")]
    assert set(SS.seed_study_table(None).verdict) == {"too few seeds"}
