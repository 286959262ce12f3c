"""Defences: purification range, gradient paths (full / BPDA / detach), randomisation and EOT."""
import pytest
import torch

import robustbench_med as rbm
from robustbench_med.errors import ConfigError
from robustbench_med.threat import check_budget

from victims_helpers import MaskSplit


class _ToySegNet(torch.nn.Module):
    """A two-class encoder-decoder exposing ``encode`` / ``decode`` (what latent defences such as APPLE need)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc, self.dec = torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Conv2d(4, 2, 1)

    def encode(self, z):
        return {"z": torch.relu(self.enc(z))}

    def decode(self, latent):
        return self.dec(latent["z"])

    def forward(self, z):
        return self.decode(self.encode(z))


class _ToySegData(MaskSplit):
    """Images, masks and sensitive attributes: the train split a harness hands to ``Defense.prepare``."""

    def __init__(self, n: int = 16) -> None:
        x = torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(2))
        super().__init__(x, (x[:, 0] > 0.5).long(), [i % 2 == 1 for i in range(n)])


def _victim_for(name, toy_batch):
    """A toy victim of a task the defence declares (registry ``tasks``; default: any), and its batch."""
    tasks = rbm.registry.DEFENSES.get(name).meta.get("tasks")
    if not tasks or "classification" in tasks:
        return toy_batch
    if "vqa" in tasks:  # a randomly initialised tiny BLIP-2 answering phantom questions
        torch.manual_seed(0)
        ds = rbm.create_dataset("phantom.ct", split="test", n=3)
        return rbm.create_victim("blip2.tiny", weights=None), ds.images(), ds.targets("vqa")
    assert "segmentation" in tasks, f"no toy victim for {name}'s tasks {tasks}"
    from robustbench_med.victim import ModelVictim, VictimCard

    card = VictimCard(name="toy.segmentation", task="segmentation", modality="toy", input_size=(1, 16, 16), classes=("bg", "fg"))
    data = _ToySegData()
    return ModelVictim(_ToySegNet(), card).eval(), data.x, data.m


@pytest.mark.parametrize("name", rbm.list_defenses())
def test_defended_victim_keeps_contract(name, toy_batch):
    victim, x, y = _victim_for(name, toy_batch)
    defense = rbm.create_defense(name)
    if defense.kind == "latent":  # latent defences learn their perturbation: the harness calls prepare before wrap
        defense.prepare(victim, _ToySegData())
    defended = defense.wrap(victim)
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
