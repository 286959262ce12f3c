"""Invariants of every registered attack: budget, range, robust ≤ clean, determinism; torchattacks equivalence."""
import functools

import pytest
import torch
from torch import nn

import robustbench_med as rbm
from robustbench_med.errors import ConfigError, TaskNotSupportedError
from robustbench_med.registry import ATTACKS
from robustbench_med.threat import check_budget

from conftest import make_toy

FAST = {"square.linf": {"n_queries": 40}, "square.l2": {"n_queries": 40}, "square.objective": {"n_queries": 40},
        "transfer.pgd": {"steps": 5, "surrogate_weights": None}, "cw.l2": {"steps": 10},
        "apgd.ce": {"steps": 5}, "apgd.dlr": {"steps": 5}, "pgd.linf": {"steps": 5}, "pgd.l2": {"steps": 5},
        **{n: {"steps": 5, "stats_target_field": "label"} for n in ATTACKS.list("hfc.*")}}
def _tasks(name):
    """The tasks an attack supports (a transfer attack is built with any registered surrogate to read them)."""
    return ATTACKS.get(name).factory(**({"surrogate": "cnn.phantom"} if name == "transfer.pgd" else {})).tasks


MULTI_CHANNEL_ONLY = {"modality.dropout"}  # refuses a 1-channel victim by design; invariants in tests/test_modality.py
IMAGE_ATTACKS = [n for n in rbm.list_attacks() if _tasks(n) & {"classification", "binary", "multilabel"}
                 and n not in MULTI_CHANNEL_ONLY]


def _toy(task):
    victim = make_toy(task)
    victim.feature_layers = ("net",)  # the linear map's output: the toy's one feature layer (HFC statistics)
    x = torch.rand(12, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    out = victim(x)
    y = out.argmax(1) if task == "classification" else (out > 0).long().squeeze(1) if task == "binary" else (out > 0).long()
    return victim, x, y


@functools.cache
def _toy_train(task):
    """A 64-image training split for attacks that learn from data (``prepare``), labelled by the toy's predictions."""
    from robustbench_med.data.loaders import build_dataset

    victim, _, _ = _toy(task)
    x = torch.rand(64, 1, 16, 16, generator=torch.Generator().manual_seed(11))
    x = (x * 255).round() / 255
    out = victim(x)
    label = out.argmax(1) if task == "classification" else (out > 0).long().squeeze(1) if task == "binary" else (out > 0).long()
    images = list((x.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy())
    return build_dataset(images, {"label": label.tolist()}, {}, f"toy.{task}", "train")


def _prepared(name, task, **kw):
    """The attack with whatever it learns from data fitted on the toy training split (as the harness does)."""
    victim, x, y = _toy(task)
    attack = rbm.create_attack(name, **kw, **_params(name, task))
    attack.prepare(victim, _toy_train(task))
    return victim, x, y, attack


def _supported(name, task):
    return task in _tasks(name) and not (name == "apgd.dlr" and task == "binary")


def _required(name, task):
    """Parameters an attack cannot run without (a transfer attack's surrogate: the seed-1 toy of the same task)."""
    return {"surrogate": f"toysurrogate.{task}"} if name == "transfer.pgd" else {}


def _params(name, task):
    return {**FAST.get(name, {}), **_required(name, task)}


CASES = [(n, t) for n in IMAGE_ATTACKS for t in ("classification", "binary", "multilabel") if _supported(n, t)]


@pytest.mark.parametrize("name,task", CASES)
def test_attack_respects_budget_and_range(name, task):
    victim, x, y, attack = _prepared(name, task)
    x_adv = attack(victim, x, y)
    report = check_budget(x, x_adv, attack.threat.norm, attack.threat.eps)
    assert report.valid, report.reason()
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype


@pytest.mark.parametrize("name,task", CASES)
def test_robust_not_above_clean_and_deterministic(name, task):
    victim, x, y, attack = _prepared(name, task, seed=7)
    a, b = attack(victim, x, y), attack(victim, x, y)
    assert torch.equal(a, b), "same seed must give identical adversarial examples"
    clean = victim.score(x, y).mean()
    robust = victim.score(a, y).mean()
    if attack.knowledge == "none":
        assert robust <= clean + 0.25  # noise may help a little by chance, never a lot
    else:
        assert robust <= clean


@pytest.mark.parametrize("name", ["pgd.linf", "fgsm.linf", "apgd.ce", "autoattack.standard"])
def test_white_box_attacks_break_an_undefended_linear_model(name):
    victim, x, y = _toy("classification")
    attack = rbm.create_attack(name, eps=0.1, **FAST.get(name, {}))
    assert victim.score(attack(victim, x, y), y).mean() < 0.5


def test_native_pgd_matches_torchattacks_pgd():
    import torchattacks

    victim, x, y = _toy("classification")
    ours = rbm.create_attack("pgd.linf", eps=4 / 255, step_size=1 / 255, steps=7, random_start=False)(victim, x, y)
    ref = torchattacks.PGD(victim, eps=4 / 255, alpha=1 / 255, steps=7, random_start=False)(x, y)
    assert torch.allclose(ours, ref, atol=1e-6)


def test_native_pgd_l2_matches_torchattacks_pgdl2():
    import torchattacks

    victim, x, y = _toy("classification")
    ours = rbm.create_attack("pgd.l2", eps=0.5, step_size=0.1, steps=5, random_start=False)(victim, x, y)
    ref = torchattacks.PGDL2(victim, eps=0.5, alpha=0.1, steps=5, random_start=False)(x, y)
    assert torch.allclose(ours, ref, atol=1e-5)


def test_per_sample_eps_batch_equals_separate_runs_without_random_start():
    victim, x, y = _toy("classification")
    attack = rbm.create_attack("pgd.linf", steps=5, random_start=False)
    eps = torch.tensor([2 / 255] * 6 + [8 / 255] * 6)
    batched = attack(victim, x, y, eps=eps)
    lo = rbm.create_attack("pgd.linf", eps=2 / 255, steps=5, random_start=False)(victim, x[:6], y[:6])
    hi = rbm.create_attack("pgd.linf", eps=8 / 255, steps=5, random_start=False)(victim, x[6:], y[6:])
    assert torch.allclose(batched, torch.cat([lo, hi]), atol=1e-6)
    assert check_budget(x, batched, "Linf", eps).valid


def test_restarts_keep_the_worst_case_per_sample():
    victim, x, y = _toy("classification")
    one = rbm.create_attack("pgd.linf", eps=2 / 255, steps=3, seed=1)(victim, x, y)
    many = rbm.create_attack("pgd.linf", eps=2 / 255, steps=3, seed=1, restarts=4)(victim, x, y)
    assert victim.score(many, y).sum() <= victim.score(one, y).sum()


def test_binary_single_logit_head_works_with_autoattack():
    victim, x, y = _toy("binary")
    attack = rbm.create_attack("autoattack.standard", eps=0.1)
    x_adv = attack(victim, x, y)
    assert attack.variant == "binary"
    assert victim.score(x_adv, y).mean() < victim.score(x, y).mean()


def test_dlr_on_binary_head_is_a_clear_error():
    victim, x, y = _toy("binary")
    with pytest.raises(TaskNotSupportedError, match="3 classes"):
        rbm.create_attack("apgd.dlr")(victim, x, y)


def test_torchattacks_adapters_reject_dense_tasks():
    from robustbench_med.victim import ModelVictim, VictimCard

    card = VictimCard(name="toy.seg", task="segmentation", modality="toy", input_size=(1, 16, 16), classes=("bg", "fg"))
    seg = ModelVictim(torch.nn.Conv2d(1, 2, 3, padding=1), card).eval()
    x, y = torch.rand(2, 1, 16, 16), torch.zeros(2, 16, 16, dtype=torch.long)
    with pytest.raises(TaskNotSupportedError):
        rbm.create_attack("fgsm.linf")(seg, x, y)
    x_adv = rbm.create_attack("pgd.dice", steps=2)(seg, x, y)
    assert check_budget(x, x_adv, "Linf", 8 / 255).valid


def test_eps_batch_refused_by_single_eps_attacks():
    victim, x, y = _toy("classification")
    with pytest.raises(ConfigError, match="one eps"):
        rbm.create_attack("fgsm.linf")(victim, x, y, eps=torch.linspace(0, 0.1, len(x)))


def _toy_segmentor():
    from robustbench_med.victim import ModelVictim, VictimCard

    torch.manual_seed(0)
    card = VictimCard(name="toy.seg", task="segmentation", modality="toy", input_size=(1, 16, 16), classes=("bg", "fg"))
    seg = ModelVictim(torch.nn.Conv2d(1, 2, 3, padding=1), card).eval()
    x = torch.rand(6, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    return seg, x, seg.predict(x)


def test_square_objective_raises_a_dense_objective_within_budget():
    seg, x, y = _toy_segmentor()
    attack = rbm.create_attack("square.objective", eps=4 / 255, n_queries=60, seed=3)
    x_adv = attack(seg, x, y)
    assert check_budget(x, x_adv, "Linf", 4 / 255).valid
    assert (seg.objective(x_adv, y) > seg.objective(x, y)).all()
    assert torch.equal(x_adv, attack(seg, x, y))


def test_square_fraction_schedule_halves_at_the_rescaled_breakpoints():
    from robustbench_med.attacks.square import square_fraction

    assert square_fraction(0.4, 0, 1000) == 0.4
    assert square_fraction(0.4, 2, 1000) == 0.2  # 20 of 10,000 scaled: past the breakpoint 10
    assert square_fraction(0.4, 999, 1000) == 0.4 / 2 ** 9  # 9,990: past all nine breakpoints


def test_transfer_from_an_identical_surrogate_equals_white_box_pgd():
    from robustbench_med.registry import VICTIMS

    victim, x, y = _toy("classification")
    VICTIMS.add("toysame.classification", lambda **kw: make_toy("classification"), task="classification")
    try:
        kw = dict(eps=4 / 255, steps=5, seed=2)
        transferred = rbm.create_attack("transfer.pgd", surrogate="toysame.classification", surrogate_weights=None, **kw)
        assert transferred.knowledge == "transfer"
        assert torch.equal(transferred(victim, x, y), rbm.create_attack("pgd.linf", **kw)(victim, x, y))
    finally:
        VICTIMS.remove("toysame.classification")


def test_transfer_rejects_a_surrogate_of_another_task_and_unknown_names():
    victim, x, y = _toy("classification")
    attack = rbm.create_attack("transfer.pgd", surrogate="toysurrogate.binary", surrogate_weights=None, steps=2)
    with pytest.raises(TaskNotSupportedError, match="surrogate"):
        attack(victim, x, y)
    with pytest.raises(rbm.UnknownNameError, match="Did you mean"):
        rbm.create_attack("transfer.pgd", surrogate="cnn.phantm")


def test_black_box_or_transfer_beating_white_box_is_flagged():
    import pandas as pd

    from robustbench_med.leaderboard import _flag_black_box

    base = dict(victim="v", defense="identity.none", defense_params="{}", attack_through="adaptive", norm="Linf",
                eps=8 / 255, status="done", flags=[])
    df = pd.DataFrame([{**base, "attack": "pgd.linf", "knowledge": "white-box", "robust": 0.60},
                       {**base, "attack": "transfer.pgd", "knowledge": "transfer", "robust": 0.40},
                       {**base, "attack": "pgd.linf", "knowledge": "white-box", "robust": 0.30, "victim": "w"},
                       {**base, "attack": "square.objective", "knowledge": "black-box", "robust": 0.31, "victim": "w"}])
    df["flags"] = [[] for _ in range(len(df))]
    _flag_black_box(df)
    assert df.loc[0, "flags"] == ["black_box_beats_white_box"]
    assert df.loc[2, "flags"] == []  # within the margin: not flagged


def test_attack_transferred_through_a_defence_beating_the_adaptive_one_is_flagged():
    """A PGD crafted on the undefended model and transferred through the defence (``attack_through: transfer``) that
    does better than the adaptive (BPDA/EOT) attack on the same defended model flags the adaptive cell."""
    import pandas as pd

    from robustbench_med.leaderboard import _flag_black_box

    base = dict(victim="v", defense="f3.v3", defense_params="{}", norm="Linf", eps=8 / 255, status="done", knowledge="white-box")
    df = pd.DataFrame([{**base, "attack": "pgd.linf", "attack_through": "adaptive", "robust": 0.50},
                       {**base, "attack": "pgd.linf", "attack_through": "transfer", "robust": 0.30},
                       {**base, "attack": "pgd.linf", "attack_through": "adaptive", "robust": 0.50, "defense_params": '{"beta": 1}'}])
    df["flags"] = [[] for _ in range(len(df))]
    _flag_black_box(df)
    assert df.loc[0, "flags"] == ["black_box_beats_white_box"]
    assert df.loc[1, "flags"] == [] and df.loc[2, "flags"] == []  # the transferred cell itself; another defence setting


@pytest.mark.parametrize("task", ["classification", "binary"])
def test_small_head_autoattack_has_a_fab_member_and_is_at_least_as_strong_as_apgd_ce(task):
    """Issue #21 item 8: 2- and 3-class heads get FAB (targeted on 3 classes) in APGD-T's place, and the ensemble
    (each member on the survivors of the previous ones) never leaves more samples robust than its first member."""
    import torchattacks

    from robustbench_med.attacks.torchattacks_adapters import LogitsView

    victim, x, y = _toy(task)
    attack = rbm.create_attack("autoattack.standard", eps=2 / 255, n_queries=20)
    members = attack.build(LogitsView(victim), victim, 2 / 255).attacks
    fab = [m for m in members if isinstance(m, torchattacks.FAB)]
    assert len(fab) == 1 and fab[0].multi_targeted == (task == "classification")
    ensemble = victim.score(attack(victim, x, y, seed=3), y)
    apgd = victim.score(rbm.create_attack("apgd.ce", eps=2 / 255, steps=100)(victim, x, y, seed=3), y)
    assert ensemble.sum() <= apgd.sum()


def _victim_of(task):
    from robustbench_med.victim import ModelVictim, VictimCard

    if task in ("classification", "binary", "multilabel"):
        return make_toy(task)
    k = 2 if task == "segmentation" else 3
    card = VictimCard(name=f"toy.{task}", task=task, modality="toy", input_size=(1, 16, 16),
                      classes=tuple(f"c{i}" for i in range(k)))
    return ModelVictim(torch.nn.Conv2d(1, k, 3, padding=1), card).eval()


@pytest.mark.parametrize("name", rbm.list_attacks())
@pytest.mark.parametrize("task", ["classification", "binary", "multilabel", "segmentation", "landmark"])
def test_planning_a_cell_works_for_every_attack_on_every_task(name, task):
    """What the runner does when it plans a cell — ``check_task`` and the recorded ``variant_for`` — either works or
    says the task is not supported; it never fails otherwise (a segmentor in a grid with AutoAttack must not crash
    the run). The default grid plans AutoAttack on its segmentors and landmark detector."""
    attack = ATTACKS.get(name).factory(**({"surrogate": "cnn.phantom"} if name == "transfer.pgd" else {}))
    victim = _victim_of(task)
    try:
        attack.check_task(victim)
    except TaskNotSupportedError:
        pass
    if hasattr(attack, "variant_for"):
        assert isinstance(attack.variant_for(victim), str)


def test_landmark_margin_is_positive_exactly_when_the_landmark_is_decoded_outside_the_radius():
    from robustbench_med.tasks import heatmap_argmax, landmark_margin

    g = torch.Generator().manual_seed(0)
    for size in ((20, 24), (8, 12, 10)):
        hm = torch.rand(16, 3, *size, generator=g)
        coords = torch.stack([torch.randint(0, n, (16, 3), generator=g) for n in reversed(size)], -1).float()
        for b in range(16):  # half the heatmaps peak at their landmark
            if b % 2 == 0:
                for k in range(3):
                    hm[(b, k, *reversed(coords[b, k].long().tolist()))] = 2.0
        missed = (heatmap_argmax(hm) - coords).norm(dim=-1) > 3.0
        per_landmark = torch.stack([landmark_margin(hm[:, k:k + 1], coords[:, k:k + 1], 3.0, kappa=float("inf"))
                                    for k in range(3)], 1)
        assert torch.equal(per_landmark > 0, missed) and missed.any() and (~missed).any()
        assert landmark_margin(hm, coords, 3.0).max() <= 0.1  # capped at kappa


def test_pgd_landmark_moves_decoded_landmarks_within_budget():
    """A blur 'detector' that finds a faint bump: the heatmap margin moves the arg-max out of the SDR radius."""
    net = nn.Conv2d(1, 1, 5, padding=2, bias=False)
    with torch.no_grad():
        net.weight.fill_(1 / 25)
    victim = rbm.wrap(net, "landmark", input_size=(1, 24, 24), sdr_radius=2.0)
    g = torch.Generator().manual_seed(0)
    coords = torch.randint(4, 20, (6, 1, 2), generator=g).float()
    from robustbench_med.tasks import landmark_heatmaps

    x = 0.5 + 0.05 * landmark_heatmaps(coords, (24, 24), 2.0)
    clean = victim.evaluate(x, coords)["sdr@2px"]
    attack = rbm.create_attack("pgd.landmark", eps=8 / 255, steps=20)
    x_adv = attack(victim, x, coords)
    assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert clean.mean() == 1.0 and victim.evaluate(x_adv, coords)["sdr@2px"].mean() == 0.0
    with pytest.raises(TaskNotSupportedError):
        attack.check_task(rbm.wrap(nn.Conv2d(1, 3, 1), "segmentation", input_size=(1, 8, 8)))
