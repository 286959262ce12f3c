"""Test configuration: offline hubs, a private cache home per session, fixed thread count."""
import atexit
import os
import shutil
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
if "ROBUSTBENCH_MED_HOME" not in os.environ:
    _home = tempfile.mkdtemp(prefix="rbm_test_home_")
    os.environ["ROBUSTBENCH_MED_HOME"] = _home
    atexit.register(shutil.rmtree, _home, ignore_errors=True)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


class ToyVictimNet(torch.nn.Module):
    """An input-sensitive linear model (attacks can always move it; see stack.md pitfall 7)."""

    def __init__(self, out: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(torch.randn(out, 1 * 16 * 16, generator=g) * 0.2)

    def forward(self, z):
        return z.flatten(1) @ self.w.t()


def make_toy(task: str = "classification", classes=("a", "b", "c"), seed: int = 0):
    from robustbench_med.victim import ModelVictim, VictimCard

    out = {"classification": len(classes), "binary": 1, "multilabel": 3}[task]
    card = VictimCard(name=f"toy.{task}", task=task, modality="toy", input_size=(1, 16, 16), classes=tuple(classes))
    return ModelVictim(ToyVictimNet(out, seed=seed), card).eval()


@pytest.fixture(scope="session", autouse=True)
def toy_surrogates():
    """``toysurrogate.<task>``: registered toy victims (seed 1) that transfer attacks can craft on."""
    from dataclasses import replace

    from robustbench_med.registry import VICTIMS

    names = []
    for task in ("classification", "binary", "multilabel"):
        name = f"toysurrogate.{task}"
        card = replace(make_toy(task).card, name=name)
        VICTIMS.add(name, lambda _t=task, **kw: make_toy(_t, seed=1), task=task, card=card)
        names.append(name)
    yield names
    for name in names:
        VICTIMS.remove(name)


@pytest.fixture
def toy_batch():
    """A toy classifier with labels equal to its own predictions (clean accuracy 1)."""
    victim = make_toy("classification")
    x = torch.rand(16, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    y = victim.predict(x)
    return victim, x, y


@pytest.fixture(scope="session")
def trained_lvlm():
    """``trained_lvlm(family)``: the registered ``<family>.tiny`` LVLM trained by its own recipe (about 20–25 s on two
    cores, once per test session, in the session's private cache), so claim tests run on the models users get."""
    import robustbench_med as rbm

    cache = {}

    def get(family: str):
        if family not in cache:
            cache[family] = rbm.create_victim(f"{family}.tiny", train_if_missing=True, progress=False)
        return cache[family]

    return get
