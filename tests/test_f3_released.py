"""F3 as released (issue #16 item 5; Zhang et al., ACM MM 2025): question-conditioned purification
(``target='question'``, :class:`QuestionF3Victim`), the averaged target it replaces as default, and the paper's adaptive
attack on first-token logits, ``lvlm_apgd.first_token`` (APGD-CE + APGD-DLR with EOT)."""
from __future__ import annotations

import json

import pytest
import torch

import robustbench_med as rbm
from robustbench_med.api import create_defense
from robustbench_med.attacks.lvlm_pgd import first_token_loss, first_token_margin, lvlm_core
from robustbench_med.cli import default_grid_path
from robustbench_med.defense import PurifiedVictim
from robustbench_med.defenses.f3 import QuestionF3Victim, pair_noise, uniform_int_noise
from robustbench_med.errors import ConfigError, TaskNotSupportedError
from robustbench_med.grid import load_grid, parse_grid
from robustbench_med.registry import ATTACKS
from robustbench_med.runner import run_grid
from robustbench_med.store import Store
from robustbench_med.threat import check_budget
from robustbench_med.victims.lvlm.models import LVLMVictim

BETA = 32 / 255
EPS = 8 / 255
QUESTIONS = torch.tensor([0, 7, 14, 21])  # presence, count, location, organ (seen pool)


@pytest.fixture(scope="module")
def victims():
    """Randomly initialised tiny models (shape, path and invariance checks need no training)."""
    torch.manual_seed(0)
    return {f: rbm.create_victim(f"{f}.tiny", weights=None) for f in ("blip2", "llava")}


@pytest.fixture(scope="module")
def phantom():
    ds = rbm.create_dataset("phantom.ct", split="test", n=4)
    return ds.images(), ds.targets("vqa")


def _f3(victim, **kw):
    f3 = create_defense("f3.v3", **kw)
    f3.bind(victim)
    return f3


@pytest.mark.parametrize("family", ["blip2", "llava"])
def test_one_image_is_purified_differently_under_different_questions(victims, phantom, family):
    """Same image, same reference noise ξ, three questions: three purified images (the attention target differs)."""
    f3 = _f3(victims[family])
    x = phantom[0][:1].expand(3, -1, -1, -1).clone()
    noise = uniform_int_noise(x[:1], f3.alpha, torch.Generator().manual_seed(1)).expand_as(x).clone()
    p = f3.purify(x, questions=QUESTIONS[:3], noise=noise)
    for i, j in ((0, 1), (0, 2), (1, 2)):
        assert (p[i] != p[j]).float().mean() > 0.01, (i, j)


@pytest.mark.parametrize("family", ["blip2", "llava"])
def test_question_target_with_one_question_is_the_averaged_target_over_that_question(victims, phantom, family):
    """With one question in play the two targets agree (given the same ξ), and a defended victim purifies each
    (image, question) pair of a [B, n] question matrix exactly as F3 on that pair alone would."""
    victim = victims[family]
    x = phantom[0]
    noise = uniform_int_noise(x, 16 / 255, torch.Generator().manual_seed(2))
    for q in (3, 11):
        averaged = _f3(victim, target="averaged", questions=[q])
        question = _f3(victim)
        assert torch.equal(question.purify(x, questions=torch.full((len(x),), q), noise=noise), averaged.purify(x, noise=noise))
    assert not torch.equal(_f3(victim, target="averaged").purify(x, noise=noise),
                           _f3(victim, target="averaged", questions=[3]).purify(x, noise=noise))
    defended = create_defense("f3.v3").wrap(victim)
    pairs = torch.tensor([[3, 11]] * len(x))
    torch.manual_seed(5)
    got = defended.first_token_logits(x, question_ids=pairs)  # [B, 2, V]
    rows, qids = torch.arange(len(x)).repeat_interleave(2), pairs.flatten()
    torch.manual_seed(5)
    xi = pair_noise(x[rows], qids, 16 / 255)  # the draws the defended victim made
    for k, q in enumerate((3, 11)):
        sel = qids == q
        purified = _f3(victim, target="averaged", questions=[q]).purify(x[rows][sel], noise=xi[sel])
        want = victim.first_token_logits(purified, question_ids=torch.full((len(x),), q))
        assert torch.allclose(got[:, k], want, atol=1e-5)


@pytest.mark.parametrize("name", ["f3.v2", "f3.v3"])
def test_question_purification_stays_in_the_beta_ball_and_unit_range(victims, phantom, name):
    x = phantom[0].clone()
    x[:, :, :8] = 0.0  # saturated regions exercise the [0, 1] clip
    x[:, :, -8:] = 1.0
    f3 = create_defense(name)
    f3.bind(victims["llava"])
    p = f3.purify(x, questions=QUESTIONS)
    assert p.shape == x.shape and p.min() >= 0 and p.max() <= 1
    assert (p - x).abs().max() <= BETA + 1e-6
    assert (p - x).abs().amax((1, 2, 3)).min() >= BETA - 1e-6  # every pair moves (by β on its steepest pixels)


def _split(fn, x: torch.Tensor, q: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``fn(x, q)`` under ``seed``: whole, split into three calls, and on the reversed batch (put back in order)."""
    torch.manual_seed(seed)
    whole = fn(x, q)
    parts = []
    for lo, hi in ((0, 1), (1, 3), (3, 4)):
        torch.manual_seed(seed)
        parts.append(fn(x[lo:hi], q[lo:hi]))
    torch.manual_seed(seed)
    return whole, torch.cat(parts), fn(x.flip(0), q.flip(0)).flip(0)


def test_question_purification_is_seeded_and_does_not_depend_on_the_batch(victims, phantom):
    """Under a seed: the same images twice, another seed other draws. Each pair draws ξ from its own stream, so the
    draws do not depend on the batch (exactly); the purified images then differ at most by the LM kernels' batch-size
    rounding on near-zero gradients (measured: 1 pixel in 16384 at 2 threads, none at 1)."""
    x = phantom[0]
    f3 = _f3(victims["blip2"])
    torch.manual_seed(7)
    reference = f3.purify(x, questions=QUESTIONS)
    torch.manual_seed(7)
    assert torch.equal(f3.purify(x, questions=QUESTIONS), reference)
    torch.manual_seed(8)
    assert (f3.purify(x, questions=QUESTIONS) != reference).float().mean() > 0.01
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(f3.purify(x, g1, questions=QUESTIONS), f3.purify(x, g2, questions=QUESTIONS))
    whole, split, flipped = _split(lambda z, q: pair_noise(z, q, f3.alpha), x, QUESTIONS, 7)
    assert torch.equal(split, whole) and torch.equal(flipped, whole)
    other = pair_noise(x, QUESTIONS.roll(1), f3.alpha, torch.Generator().manual_seed(0))
    assert (other != pair_noise(x, QUESTIONS, f3.alpha, torch.Generator().manual_seed(0))).float().mean() > 0.5
    whole, split, flipped = _split(lambda z, q: f3.purify(z, questions=q), x, QUESTIONS, 7)
    for other in (split, flipped):
        assert (other != whole).float().mean() < 1e-3


def test_every_path_of_the_victim_is_purified_under_its_own_questions(victims, phantom):
    """Scores, the LM loss, first-token logits and hidden states each purify exactly the (image, question) pairs they
    evaluate; the question-free views fall back to the averaged target."""
    victim = victims["llava"]
    x, y = phantom
    f3 = create_defense("f3.v3")
    defended = f3.wrap(victim)
    calls: list = []
    purify = f3.purify

    def recording(z, generator=None, questions=None, noise=None):
        calls.append(None if questions is None else torch.as_tensor(questions).flatten().tolist())
        return purify(z, generator, questions, noise)

    f3.purify = recording
    evaluation = victim.evaluation_questions(y)
    checks = [
        (lambda: defended.evaluate(x, y), evaluation.flatten().tolist()),
        (lambda: defended.first_token_logits(x, y), evaluation[:, 0].tolist()),
        (lambda: defended.objective(x, torch.where(torch.arange(y.shape[1]) == 9, y, -1)), [9] * len(x)),
        (lambda: defended.question_states(x, torch.tensor([[2, 30]] * len(x))), [2, 30] * len(x)),
        (lambda: defended.visual_features(x), None),
        (lambda: defended(x), None),
    ]
    for run, expected in checks:
        calls.clear()
        run()
        assert calls == [expected]
    core, transform = lvlm_core(defended)
    assert core is defended and torch.equal(transform(x), x)  # attacks reach it as the LVLM itself


def test_gradient_paths_through_the_question_conditioned_victim(victims, phantom):
    """BPDA: a dense gradient; detach: exactly zero; the released path: the identity only where A − x rounds past ±β
    (a subset of the pixels), on every pair."""
    victim = victims["llava"]
    x, y = phantom[0][:2].clone().requires_grad_(True), phantom[1][:2]
    y1 = torch.where(torch.arange(y.shape[1]) == 4, y, -1)  # one question per image
    defended = create_defense("f3.v3").wrap(victim)
    released = create_defense("f3.v3", gradient="released").wrap(victim)
    assert isinstance(defended, QuestionF3Victim) and isinstance(defended, PurifiedVictim) and isinstance(defended, LVLMVictim)
    assert defended.gradient_mode == "bpda" and released.gradient_mode == "full"
    detach = defended.with_gradient_mode("detach")
    assert isinstance(detach, QuestionF3Victim) and detach.gradient_mode == "detach"
    grads = {}
    for key, view in (("bpda", defended), ("detach", detach), ("released", released)):
        torch.manual_seed(0)
        grads[key], = torch.autograd.grad(view.objective(x, y1).sum(), x)
    assert (grads["bpda"] != 0).float().mean() > 0.5
    assert grads["detach"].abs().max() == 0
    torch.manual_seed(0)
    step = (released.defense.purify(x.detach(), questions=torch.full((2,), 4)) - x.detach()).abs()
    leaked = grads["released"] != 0
    assert not leaked[step < BETA - 1e-6].any() and leaked.any()


def test_configuration_errors(victims, phantom):
    x = phantom[0]
    with pytest.raises(ConfigError, match="target"):
        create_defense("f3.v3", target="image")
    f3 = _f3(victims["llava"])
    with pytest.raises(ConfigError, match="questions"):
        f3.purify(x, questions=torch.tensor([0, 1]))  # two ids for four images
    with pytest.raises(ConfigError, match="noise"):
        f3.purify(x, noise=torch.zeros(1, 1, 64, 64))
    wrapped = create_defense("jpeg.bpda").wrap(victims["llava"])
    with pytest.raises(TaskNotSupportedError, match="target='averaged'"):
        create_defense("f3.v3").wrap(wrapped)
    assert isinstance(create_defense("f3.v3", target="averaged").wrap(wrapped), PurifiedVictim)
    assert create_defense("f3.v3").params()["target"] == "question"
    for bad in ({"losses": "ce+ce"}, {"losses": "cw"}, {"losses": ["ce", "dlr"]}, {"label": "target"}, {"rho": 0},
                {"norm": "L2"}):
        with pytest.raises(ConfigError):
            rbm.create_attack("lvlm_apgd.first_token", **bad)


def test_first_token_losses_and_margin_by_hand():
    logits = torch.tensor([[3.0, 1.0, 0.0, -1.0], [3.0, 1.0, 0.0, -1.0]])
    labels = torch.tensor([0, 2])
    assert torch.allclose(first_token_loss(logits, labels, "dlr"), torch.tensor([-2 / 3, 1.0]))
    assert torch.allclose(first_token_margin(logits, labels), torch.tensor([2.0, -3.0]))
    assert torch.allclose(first_token_loss(logits, labels, "ce"), torch.nn.functional.cross_entropy(logits, labels, reduction="none"))


def test_first_token_apgd_is_registered_stays_in_budget_and_breaks_an_undefended_model(victims, phantom):
    meta = ATTACKS.get("lvlm_apgd.first_token").meta
    assert meta["norm"] == "Linf" and meta["knowledge"] == "white-box" and tuple(meta["tasks"]) == ("vqa",)
    attack = rbm.create_attack("lvlm_apgd.first_token", eps=EPS, steps=4, label="clean")
    assert attack.threat.norm == "Linf" and attack.threat.steps == 4 and not attack.sample_independent
    assert rbm.create_attack("lvlm_apgd.first_token").threat.steps == 20  # the release's n_iter
    victim = victims["llava"]
    x, y = phantom
    x_adv = attack(victim, x, y, seed=0)
    assert check_budget(x, x_adv, "Linf", EPS).valid
    assert torch.equal(x_adv, attack(victim, x, y, seed=0))
    q = victim.evaluation_questions(y)[:, 0]
    clean = victim.first_token_logits(x, None, q).argmax(-1)
    assert (victim.first_token_logits(x_adv, None, q).argmax(-1) != clean).float().mean() >= 0.5
    defended = create_defense("f3.v3").wrap(victim)
    assert torch.equal(attack.labels(defended, x, y, q), clean)  # 'clean': the undefended model's argmax, as released


def test_first_token_apgd_samples_question_conditioned_f3_eot_times_per_evaluation(victims, phantom):
    """Every evaluation of the attack purifies every pair ``eot`` times: 2 runs × (steps + 1) × eot F3 calls of B pairs."""
    victim = victims["blip2"]
    x, y = phantom[0][:2], phantom[1][:2]
    counts = {}
    for eot in (1, 3):
        f3 = create_defense("f3.v3")
        defended = f3.wrap(victim)
        sizes: list[int] = []
        purify = f3.purify
        f3.purify = lambda z, *a, _p=purify, **k: sizes.append(len(z)) or _p(z, *a, **k)
        x_adv = rbm.create_attack("lvlm_apgd.first_token", eps=EPS, steps=2, eot=eot)(defended, x, y, seed=0)
        assert check_budget(x, x_adv, "Linf", EPS).valid and set(sizes) == {2}
        counts[eot] = len(sizes)
    assert counts == {1: 2 * 3, 3: 2 * 3 * 3}


def test_packaged_f3_grid_has_the_papers_evaluations():
    grid = load_grid(default_grid_path("f3"))
    f3_rows = [d for d in grid.defenses if d.name.startswith("f3.v")]
    assert {d.params.get("target") for d in f3_rows} == {"question", "averaged"}
    assert any(d.params == {"target": "question"} and d.attack_through == "adaptive" and d.eot == 8 for d in f3_rows)
    specs = {(a.name, json.dumps(a.params, sort_keys=True)): a for a in grid.attacks}
    aa = specs["lvlm_autoattack.first_token", json.dumps({"eps": "16/255", "label": "clean"}, sort_keys=True)]
    assert aa.applies_to("llava.tiny", "f3.v3", "transfer") and not aa.applies_to("llava.tiny", "f3.v3", "adaptive")
    apgd = specs["lvlm_apgd.first_token", json.dumps({"eot": 10, "eps": "8/255", "label": "clean", "steps": 20}, sort_keys=True)]
    assert apgd.applies_to("blip2.tiny", "f3.v3", "adaptive") and not apgd.applies_to("blip2.tiny", "f3.v3", "transfer")
    assert any(a.name == "lvlm_autoattack.first_token" and a.params.get("label") == "clean"
               and a.applies_to("llava.tiny", "identity.none") for a in grid.attacks)


def test_harness_runs_question_conditioned_f3_with_the_first_token_apgd(tmp_path):
    """A small grid: transfer, BPDA + EOT and detach through question-conditioned F3, with the new attack; every cell
    done and within budget, the attack's EOT recorded, masked gradients flagged on detach only."""
    grid = parse_grid({
        "name": "f3-released", "n_examples": 2, "batch_size": 2,
        "victims": [{"name": "llava.tiny", "weights": None}],
        "attacks": [{"name": "lvlm_apgd.first_token", "params": {"eps": "8/255", "steps": 1, "label": "clean"}}],
        "defenses": [{"name": "f3.v3", "attack_through": "transfer"}, {"name": "f3.v3", "attack_through": "adaptive", "eot": 2},
                     {"name": "f3.v3", "attack_through": "detach", "eot": 2}],
    })
    with Store(run_grid(grid, tmp_path, progress=False)) as store:
        cells = {c["attack_through"]: c for c in store.cells()}
        flags = store.flags()
    assert set(cells) == {"transfer", "adaptive", "detach"} and all(c["status"] == "done" for c in cells.values())
    assert json.loads(cells["adaptive"]["extra"])["eot"] == 2 and json.loads(cells["transfer"]["extra"])["eot"] == 1
    assert json.loads(cells["adaptive"]["defense_params"])["target"] == "question"
    masked = {t for t, c in cells.items() if flags[json.loads(c["extra"])["group_key"]]["masked_gradients"][0]}
    assert masked == {"detach"}
