"""Defences: purification range, gradient paths (full / BPDA / detach), randomisation and EOT."""
import pytest
import torch

import robustbench_med as rbm
from robustbench_med.errors import ConfigError
from robustbench_med.threat import check_budget

from conftest import make_toy


@pytest.mark.parametrize("name", rbm.list_defenses())
def test_defended_victim_keeps_contract(name, toy_batch):
    victim, x, y = toy_batch
    defended = rbm.create_defense(name).wrap(victim)
    assert defended.card == victim.card and defended.task == victim.task
    out = defended(x)
    assert out.shape == victim(x).shape
    if hasattr(defended, "defense"):
        p = defended.defense.purify(x)
        assert p.shape == x.shape and p.min() >= 0 and p.max() <= 1


def _input_grad(victim, x, y):
    x = x.clone().requires_grad_(True)
    victim.objective(x, y).sum().backward()
    return x.grad


def test_jpeg_is_attacked_through_bpda_and_detach_masks_gradients(toy_batch):
    victim, x, y = toy_batch
    jpeg = rbm.create_defense("jpeg.bpda", quality=50)
    defended = jpeg.wrap(victim)
    assert defended.gradient_mode == "bpda" and not jpeg.differentiable
    g_bpda = _input_grad(defended, x, y)
    assert g_bpda.abs().sum() > 0
    g_naive = _input_grad(defended.with_gradient_mode("detach"), x, y)
    assert g_naive is None or g_naive.abs().sum() == 0
    assert not torch.allclose(jpeg.purify(x), x, atol=1e-3), "JPEG must actually change the image"


def test_gaussian_defense_is_randomized_and_eot_averages(toy_batch):
    victim, x, y = toy_batch
    defended = rbm.create_defense("gaussian.eot", sigma=0.1).wrap(victim)
    assert not torch.equal(defended(x), defended(x))
    attack = rbm.create_attack("pgd.linf", eps=8 / 255, steps=3, eot=4, seed=0)
    x_adv = attack(defended, x, y)
    assert check_budget(x, x_adv, "Linf", 8 / 255).valid
    assert torch.equal(x_adv, attack(defended, x, y)), "seeded EOT must be deterministic"


@pytest.mark.parametrize("name,params", [("jpeg.bpda", {"quality": 0}), ("jpeg.bpda", {"quality": 101}), ("gaussian.eot", {"sigma": -1})])
def test_bad_defense_parameters(name, params):
    with pytest.raises(ConfigError):
        rbm.create_defense(name, **params)


def test_features_through_defended_victim(toy_batch):
    from victims_helpers import tiny_cnn_victim

    victim = tiny_cnn_victim()
    defended = rbm.create_defense("identity.none").wrap(victim)
    feats = defended.features(torch.rand(2, 1, 64, 64))
    assert set(feats) == {f"victim.{n}" for n in victim.feature_layers}
