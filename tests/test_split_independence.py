"""Results that do not depend on how the work was split (issue #21 item 1): units follow from the grid's
``unit_size``, never from the memory cap; every sample draws from its own seeded stream, so an attack declared
``sample_independent`` gives the same adversarial examples whether its batch is whole or split; the same grid at
different batch sizes writes identical stores; an out-of-memory error halves the cap of a splittable call and
stops a coupled one with the fix named.

The victims here evaluate one sample at a time (:class:`PerSample`), so their outputs are exactly batch-invariant
and any difference found is the attack's or the harness's, not floating-point kernels'."""
import json
from contextlib import contextmanager

import pytest
import torch

import robustbench_med as rbm
from robustbench_med.attack import SampleRNG, sample_seeds
from robustbench_med.errors import RobustBenchMedError
from robustbench_med.grid import parse_grid
from robustbench_med.registry import VICTIMS
from robustbench_med.runner import run_grid
from robustbench_med.victim import ModelVictim, VictimCard

from conftest import ToyVictimNet
from rank_helpers import store_contents as _everything, table as _table

SMALL = {"hfc.bim": {"lam": 0.0}, "hfc.cw": {"lam": 0.0}, "hfc.mifgsm": {"lam": 0.0}, "hfc.pgd": {"lam": 0.0}}
NEEDS = {"transfer.pgd": {"surrogate": "loopsurrogate.classification", "surrogate_weights": None}}


class PerSample(torch.nn.Module):
    """``net`` applied to one sample at a time: outputs (and gradients) independent of the batch."""

    def __init__(self, net: torch.nn.Module, fail_above: int | None = None) -> None:
        super().__init__()
        self.net, self.fail_above = net, fail_above

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.fail_above is not None and len(z) > self.fail_above:
            raise RuntimeError(f"CUDA out of memory (simulated: batch of {len(z)} > {self.fail_above})")
        return torch.cat([self.net(z[i : i + 1]) for i in range(len(z))])


def _victim(task: str, name: str, size: int = 16, seed: int = 0, fail_above: int | None = None) -> ModelVictim:
    classes = {"classification": ("a", "b", "c"), "binary": ("absent", "present"), "landmark": ("l0", "l1")}.get(task, ("bg", "fg"))
    card = VictimCard(name=name, task=task, modality="toy", input_size=(1, size, size), classes=classes)
    if task in ("segmentation", "landmark"):
        torch.manual_seed(seed)
        net = torch.nn.Conv2d(1, 2, 3, padding=1)
    else:
        net = ToyVictimNet(len(classes) if task == "classification" else 1, seed=seed)
        if size != 16:
            g = torch.Generator().manual_seed(seed)
            net.w = torch.nn.Parameter(torch.randn(net.w.shape[0], size * size, generator=g) * 0.05)
    return ModelVictim(PerSample(net, fail_above), card).eval()


@contextmanager
def registered(name: str, factory, task: str):
    VICTIMS.add(name, factory, task=task, card=factory().card)
    try:
        yield name
    finally:
        VICTIMS.remove(name)


@pytest.fixture(scope="module", autouse=True)
def loop_surrogate():
    with registered("loopsurrogate.classification", lambda **kw: _victim("classification", "loopsurrogate.classification", seed=1),
                    "classification") as name:
        yield name


SPLITTABLE = [n for n in rbm.list_attacks()  # (any registered surrogate will do to read the declaration)
              if rbm.create_attack(n, **({"surrogate": "cnn.phantom"} if n in NEEDS else {})).sample_independent
              and n != "modality.dropout"]  # multi-channel victims only: split-tested in tests/test_modality.py


def test_the_usual_attacks_are_declared_splittable():
    for name in ("pgd.linf", "pgd.l2", "pgd.dice", "fgsm.linf", "noise.uniform", "hfc.pgd", "transfer.pgd", "corruption.motion"):
        assert name in SPLITTABLE, name
    for name in ("square.linf", "apgd.ce", "autoattack.standard", "cw.l2"):  # batch-level draws or early stopping
        assert name not in SPLITTABLE, name


@pytest.mark.parametrize("name", SPLITTABLE)
def test_a_sample_independent_attack_gives_the_same_examples_whole_or_split(name):
    steps = {} if name.startswith("corruption.") else {"steps": 3}
    attack = rbm.create_attack(name, **steps, **SMALL.get(name, {}), **NEEDS.get(name, {}))
    task = ("landmark" if attack.tasks == {"landmark"} else "classification" if "classification" in attack.tasks
            else "segmentation")
    victim = _victim(task, f"loop.{task}")
    x = torch.rand(6, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    y = (x[:, 0] > 0.5).long() if task == "segmentation" else victim.predict(x)
    seeds = [101, 7, 55, 9, 12, 3]
    whole = attack(victim, x, y, seed=1, seeds=seeds)
    parts = torch.cat([attack(victim, x[a:b], y[a:b], seed=2, seeds=seeds[a:b]) for a, b in ((0, 1), (1, 4), (4, 6))])
    assert torch.equal(whole, parts), f"{name}: splitting the batch changed the adversarial examples"
    if name.startswith(("pgd.", "noise.")):  # a sample's draws follow its seed, not its position
        moved = attack(victim, x.flip(0), y.flip(0), seed=1, seeds=seeds[::-1])
        assert torch.equal(moved.flip(0), whole)
        assert not torch.equal(attack(victim, x, y, seed=1, seeds=[s + 1 for s in seeds]), whole)


def test_sample_streams_are_per_sample():
    x = torch.zeros(3, 1, 4, 4)
    a, b = SampleRNG([1, 2, 3], "cpu").rand_like(x), SampleRNG([2], "cpu").rand_like(x[:1])
    assert torch.equal(a[1], b[0]) and not torch.equal(a[0], a[1])
    assert sample_seeds(5, 3) == sample_seeds(5, 4)[:3]
    with pytest.raises(rbm.ConfigError, match="per-sample seeds"):
        rbm.create_attack("pgd.linf")(_victim("classification", "loop.c"), torch.rand(2, 1, 16, 16), torch.zeros(2, dtype=torch.long), seeds=[1])


# ------------------------------------------------------------------------------------------------------------
# the harness


def _memory(db) -> dict:
    (manifest,), = _table(db, "SELECT manifest FROM runs")
    return json.loads(manifest)["memory"]


LOOP = "loop.phantom"
LOOP_GRID = {
    "name": "split", "n_examples": 12, "unit_size": 6, "attack_only_robust": False,  # every sample attacked: calls of 6
    "victims": [{"name": LOOP, "weights": None, "target_field": "label"}],
    "attacks": [{"name": "pgd.linf", "params": {"eps": ["2/255", "8/255"], "steps": 2, "step_size": "1/255"}},  # 2 cells
                {"name": "noise.uniform", "params": {"eps": ["4/255", "8/255"]}},
                {"name": "pgd.l2", "params": {"eps": 0.5, "steps": 2, "step_size": 0.05}},
                {"name": "square.linf", "params": {"eps": "8/255", "n_queries": 5}}],  # coupled: never split
    "defenses": ["identity.none", {"name": "gaussian.eot", "params": {"sigma": 0.02}, "eot": 2}],  # randomised: never split
}


@pytest.fixture(scope="module")
def loop_victim():
    with registered(LOOP, lambda **kw: _victim("binary", LOOP, size=64), "binary") as name:
        yield name


@pytest.fixture(scope="module")
def loop_reference(loop_victim, tmp_path_factory):
    return run_grid(parse_grid({**LOOP_GRID, "batch_size": 6}), tmp_path_factory.mktemp("ref6"), progress=False)


@pytest.mark.parametrize("batch_size", [2, 5, 64])
def test_the_same_grid_at_any_memory_batch_writes_identical_stores(loop_reference, tmp_path_factory, batch_size):
    ref = loop_reference
    db = run_grid(parse_grid({**LOOP_GRID, "batch_size": batch_size}), tmp_path_factory.mktemp(f"b{batch_size}"), progress=False)
    assert _everything(db) == _everything(ref)
    assert len(_everything(db)["samples"]) == 2 * 12 * 6
    split = _memory(db)[LOOP]["split_calls"]
    assert _memory(db)[LOOP]["unit_size"] == 6 and (split > 0) == (batch_size < 6), split


CNN_GRID = {"name": "cnn_split", "n_examples": 24, "unit_size": 8, "victims": ["cnn.phantom"],
            "attacks": [{"name": "pgd.linf", "params": {"eps": ["2/255", "8/255"], "steps": 2}},
                        {"name": "apgd.ce", "params": {"eps": "8/255", "steps": 2}}]}


@pytest.fixture(scope="module")
def cnn_reference(tmp_path_factory):
    return run_grid(parse_grid({**CNN_GRID, "batch_size": 8}), tmp_path_factory.mktemp("cnn8"), progress=False)


@pytest.mark.parametrize("batch_size", [16, 64, 256])
def test_cnn_grid_at_batch_sizes_16_64_256_is_identical(cnn_reference, tmp_path_factory, batch_size):
    """A real network (batch-variant kernels) at caps no smaller than the unit: every call is the same unit."""
    db = run_grid(parse_grid({**CNN_GRID, "batch_size": batch_size}), tmp_path_factory.mktemp(f"cnn{batch_size}"), progress=False)
    assert _everything(db) == _everything(cnn_reference)


def test_memory_cap_is_not_part_of_the_results_identity():
    base = {k: v for k, v in LOOP_GRID.items() if k != "victims"} | {"victims": ["cnn.phantom"]}
    legacy = {k: v for k, v in base.items() if k != "unit_size"}
    h = lambda **kw: parse_grid({**base, **kw}).config_hash()  # noqa: E731
    assert h(batch_size=2) == h(batch_size=256)
    assert h(unit_size=6) != h(unit_size=12)
    # a grid written before unit_size existed: its units are its batches, and its hash is unchanged
    old = parse_grid({**legacy, "batch_size": 6})
    assert old.unit_size == 6 and old.config_hash() == h(unit_size=6, batch_size=6)
    assert parse_grid(legacy).unit_size == 64


def test_out_of_memory_halves_a_splittable_call_and_stops_a_coupled_one(tmp_path):
    name = "loop.oom"
    grid = {**LOOP_GRID, "victims": [{"name": name, "weights": None, "target_field": "label"}], "defenses": ["identity.none"],
            "batch_size": 12}
    ok = {**grid, "attacks": LOOP_GRID["attacks"][:3]}
    with registered(name, lambda **kw: _victim("binary", name, size=64), "binary"):
        ref = run_grid(parse_grid(ok), tmp_path / "ref", progress=False)
    with registered(name, lambda **kw: _victim("binary", name, size=64, fail_above=2), "binary"):
        db = run_grid(parse_grid(ok), tmp_path / "oom", progress=False)
        assert _memory(db)[name]["memory_batch"] <= 2 and _memory(db)[name]["split_calls"] > 0
        assert _everything(db) == _everything(ref)
        with pytest.raises(RobustBenchMedError, match="unit_size"):
            coupled = {**grid, "attack_only_robust": False, "attacks": [{"name": "apgd.ce", "params": {"eps": "8/255", "steps": 2}}]}
            run_grid(parse_grid(coupled), tmp_path / "coupled", progress=False)
