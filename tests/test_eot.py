"""EOT honoured or refused, over the whole attack registry: an attack built with ``eot = k`` either samples the
randomised defence k times for every pass it makes (counted draws scale by exactly k) or refuses ``eot > 1`` at
construction because it never queries the attacked model. Also: the harness hands ``eot`` only to attacks that use it."""
from typing import ClassVar

import pytest
import torch

import robustbench_med as rbm
from robustbench_med.defense import InputPurifier, PurifiedVictim
from robustbench_med.errors import ConfigError
from robustbench_med.victim import ModelVictim, VictimCard

from conftest import make_toy

EPS = 8 / 255
# the smallest settings that still run every code path of an attack
SMALL = {"square.linf": {"n_queries": 6}, "square.l2": {"n_queries": 6}, "square.objective": {"n_queries": 6},
         "autoattack.standard": {"n_queries": 6}, "lvlm_autoattack.first_token": {"n_queries": 3},
         "hfc.bim": {"lam": 0.0}, "hfc.cw": {"lam": 0.0}, "hfc.mifgsm": {"lam": 0.0}, "hfc.pgd": {"lam": 0.0}}
NEEDS = {"transfer.pgd": {"surrogate": "toysurrogate.classification"}}


class CountingNoise(InputPurifier):
    """A randomised purifier that counts its draws (one per purified batch)."""

    randomized: ClassVar[bool] = True
    name = "test.counting_noise"

    def __init__(self) -> None:
        self.draws = 0

    def params(self) -> dict:
        return {}

    def purify(self, x: torch.Tensor) -> torch.Tensor:
        self.draws += 1
        return (x + 0.01 * torch.randn_like(x)).clamp(0, 1)


def _segmentor(task: str = "segmentation") -> ModelVictim:
    """A 2-channel dense toy: a segmentor (classes bg / fg) or a landmark detector (two heatmaps)."""
    torch.manual_seed(0)
    classes = ("bg", "fg") if task == "segmentation" else ("l0", "l1")
    card = VictimCard(name=f"toy.{task}", task=task, modality="toy", input_size=(1, 16, 16), classes=classes)
    return ModelVictim(torch.nn.Conv2d(1, 2, 3, padding=1), card).eval()


@pytest.fixture(scope="module")
def victims():
    """One victim and batch per task family the registry's attacks need."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    cls = make_toy("classification")
    x = torch.rand(4, 1, 16, 16, generator=g)
    seg = _segmentor()
    ds = rbm.create_dataset("phantom.ct", split="test", n=2)
    vqa = rbm.create_victim("instructblip.tiny", weights=None)
    landmark = _segmentor("landmark")
    return {"classification": (cls, x, cls.predict(x)), "segmentation": (seg, x, (x[:, 0] > 0.5).long()),
            "landmark": (landmark, x, landmark.predict(x)), "vqa": (vqa, ds.images(), ds.targets("vqa"))}


def _family(attack) -> str:
    for task in ("classification", "segmentation", "landmark", "vqa"):
        if task in attack.tasks:
            return task
    raise AssertionError(f"no test victim for tasks {sorted(attack.tasks)}")


def _draws(name: str, eot: int, victims) -> int:
    attack = rbm.create_attack(name, eps=EPS, steps=2, eot=eot, **SMALL.get(name, {}), **NEEDS.get(name, {}))
    victim, x, y = victims[_family(attack)]
    noise = CountingNoise()
    attack(PurifiedVictim(victim, noise, "full"), x, y, seed=0)
    return noise.draws


ATTACKS = [n for n in rbm.list_attacks() if not n.startswith("corruption.")] + ["corruption.gaussian_noise"]


@pytest.mark.parametrize("name", ATTACKS)
def test_every_attack_honours_or_refuses_eot(name, victims):
    try:
        attack = rbm.create_attack(name, eot=3, **NEEDS.get(name, {}))
    except ConfigError as e:
        assert "eot" in str(e) and "never queries" in str(e), str(e)
        assert rbm.create_attack(name, eot=1, **NEEDS.get(name, {})).uses_eot is False
        return
    assert attack.uses_eot
    one, three = _draws(name, 1, victims), _draws(name, 3, victims)
    assert one > 0, "the attack never queried the defended model"
    assert three == 3 * one, f"{name}: {one} draws with eot=1 but {three} with eot=3 (some pass ignores eot)"


def test_harness_gives_eot_only_to_attacks_that_use_it(tmp_path):
    import json

    from robustbench_med.grid import parse_grid
    from robustbench_med.runner import run_grid
    from robustbench_med.store import Store

    grid = parse_grid({"name": "eot_check", "n_examples": 4, "batch_size": 4, "victims": ["cnn.phantom"],
                       "attacks": [{"name": "noise.uniform", "params": {"eps": "8/255"}},
                                   {"name": "pgd.linf", "params": {"eps": "8/255", "steps": 1}}],
                       "defenses": [{"name": "gaussian.eot", "params": {"sigma": 0.05}, "eot": 2}]})
    with Store(run_grid(grid, tmp_path, progress=False)) as store:
        cells = {c["attack"]: c for c in store.cells()}
    noise, pgd = cells["noise.uniform"], cells["pgd.linf"]
    assert noise["status"] == pgd["status"] == "done"
    assert json.loads(noise["extra"])["eot"] == 1 and "eot" not in json.loads(noise["attack_params"])
    assert json.loads(pgd["extra"])["eot"] == 2 and json.loads(pgd["attack_params"])["eot"] == 2
