"""pytest-benchmark suite: ``python -m pytest benchmarks --benchmark-enable`` (not part of the unit tests).

Measures images/s of PGD (L∞, 10 steps) called through robustbench_med's attack interface and through
``torchattacks.PGD`` directly on the same model and batch, plus one forward+backward (the floor). Compare the
``ops``/``mean`` columns; ``bench_throughput.py`` prints the ratios for the whole harness.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import robustbench_med as rbm  # noqa: E402
from robustbench_med.tasks import two_class_logits  # noqa: E402

B = 32


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    victim = rbm.create_victim("resnet18.phantom", weights=None)
    x = torch.rand(B, *victim.card.input_size)
    y = torch.randint(0, 3, (B,))
    return victim, x, y


def test_pgd_robustbench_med(benchmark, setup):
    victim, x, y = setup
    attack = rbm.create_attack("pgd.linf", eps=8 / 255, step_size=2 / 255, steps=10)
    benchmark(attack, victim, x, y)


def test_pgd_torchattacks(benchmark, setup):
    import torchattacks

    victim, x, y = setup
    benchmark(torchattacks.PGD(victim, eps=8 / 255, alpha=2 / 255, steps=10), x, y)


def test_forward_backward_floor(benchmark, setup):
    victim, x, y = setup

    def step():
        xr = x.clone().requires_grad_(True)
        torch.autograd.grad(victim.objective(xr, y).sum(), xr)

    benchmark(step)


def test_binary_logits_view_overhead(benchmark, setup):
    victim, x, _ = setup
    out = victim(x)[:, :1]
    benchmark(two_class_logits, out)
