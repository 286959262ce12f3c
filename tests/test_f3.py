"""F3 purification (defenses/f3.py) and the feature-squeezing baselines (defenses/squeeze.py)."""
from __future__ import annotations

import pytest
import torch

import robustbench_med as rbm
from robustbench_med.api import create_defense
from robustbench_med.defense import PurifiedVictim
from robustbench_med.errors import ConfigError
from robustbench_med.grid import parse_grid
from robustbench_med.runner import run_grid
from robustbench_med.leaderboard import summary_wide

BETA = 32 / 255


@pytest.fixture(scope="module")
def victims():
    """Randomly initialised tiny models (the BLIP vision towers at range 0.02, not transformers' 1e-10: see
    victims/lvlm/configs.py), for the shape, range, seed and gradient-path checks."""
    torch.manual_seed(0)
    return {f: rbm.create_victim(f"{f}.tiny", weights=None) for f in ("blip2", "instructblip", "llava")}


def _batch(n: int = 3, seed: int = 0) -> torch.Tensor:
    x = torch.rand(n, 1, 64, 64, generator=torch.Generator().manual_seed(seed))
    x[:, :, :8] = 0.0  # saturated regions exercise the [0, 1] clip
    x[:, :, -8:] = 1.0
    return x


@pytest.mark.parametrize("name", ["f3.v2", "f3.v3"])
@pytest.mark.parametrize("family", ["blip2", "llava"])
def test_f3_respects_beta_and_unit_range(victims, name, family):
    x = _batch()
    f3 = create_defense(name)
    f3.bind(victims[family])
    p = f3.purify(x)
    assert p.shape == x.shape and p.min() >= 0 and p.max() <= 1
    assert (p - x).abs().max() <= BETA + 1e-6
    assert (p - x).abs().max() >= BETA - 1e-6  # it does move the image (the step is β on the steepest pixels)
    two = create_defense(name, steps=2, beta=8 / 255)
    two.bind(victims[family])
    assert (two.purify(x) - x).abs().max() <= 8 / 255 + 1e-6


def test_f3_v2_moves_every_pixel_by_beta_unless_clipped(victims):
    x = torch.full((2, 1, 64, 64), 0.5) + 0.1 * torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(3))
    f3 = create_defense("f3.v2")
    f3.bind(victims["llava"])
    step = (f3.purify(x) - x).abs()
    assert torch.allclose(step[step > 0], torch.full_like(step[step > 0], BETA), atol=1e-6)
    assert (step > 0).float().mean() > 0.9


def test_f3_same_seed_same_image(victims):
    x = _batch()
    f3 = create_defense("f3.v3")
    f3.bind(victims["blip2"])
    torch.manual_seed(7)
    a = f3.purify(x)
    torch.manual_seed(7)
    b = f3.purify(x)
    torch.manual_seed(8)
    c = f3.purify(x)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)  # the reference noise is random
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(f3.purify(x, generator=g1), f3.purify(x, generator=g2))


@pytest.mark.parametrize("family,source", [("blip2", "lm"), ("blip2", "qformer"), ("instructblip", "lm"),
                                           ("instructblip", "qformer"), ("llava", "lm")])
def test_attention_sources_give_nonzero_gradients(victims, family, source):
    victim = victims[family]
    f3 = create_defense("f3.v3", source=source)
    f3.bind(victim)
    x = _batch(2)
    with torch.no_grad():
        ref = f3.attention((x + 16 / 255).clamp(0, 1))
    x_in = x.clone().requires_grad_(True)
    grad, = torch.autograd.grad(f3.loss(x_in, ref).sum(), x_in)
    assert torch.isfinite(grad).all() and grad.flatten(1).norm(dim=1).min() > 1e-3
    assert (grad.flatten(1) != 0).float().mean(1).min() > 0.5  # a dense gradient on every image


def test_f3_costs_two_lm_forward_passes(victims):
    victim = victims["blip2"]
    calls = []
    hook = victim.model.language_model.register_forward_hook(lambda *_: calls.append(1))
    try:
        for steps, expected in ((1, 2), (2, 3)):
            calls.clear()
            f3 = create_defense("f3.v3", steps=steps)
            f3.bind(victim)
            f3.purify(_batch(2))
            assert len(calls) == expected
    finally:
        hook.remove()


def test_f3_configuration_errors(victims):
    with pytest.raises(ConfigError):
        create_defense("f3.v3", beta=0)
    with pytest.raises(ConfigError):
        create_defense("f3.v3", alpha="x/255")
    with pytest.raises(ConfigError):
        create_defense("f3.v3", steps=0)
    with pytest.raises(ConfigError):
        create_defense("f3.v3", source="vision")
    with pytest.raises(ConfigError):
        create_defense("f3.v3", questions=[99])
    with pytest.raises(rbm.TaskNotSupportedError, match="Q-Former"):
        create_defense("f3.v3", source="qformer").wrap(victims["llava"])
    with pytest.raises(ConfigError):
        create_defense("f3.v3").purify(_batch(1))  # no victim bound
    assert create_defense("f3.v3", alpha="8/255").alpha == pytest.approx(8 / 255)


def test_gradient_paths(victims):
    """BPDA passes the identity (the a.e. Jacobian of F3); the harness's naive path (detach) passes exactly zero; the
    released code's path passes the identity only where A − x rounds past ±β, zero elsewhere (averaged target, one
    purification per image; the question-conditioned paths: tests/test_f3_released.py)."""
    x = _batch(2).requires_grad_(True)
    y = torch.zeros(2, 36, dtype=torch.long)
    defended = create_defense("f3.v3", target="averaged").wrap(victims["llava"])
    released = create_defense("f3.v3", target="averaged", gradient="released").wrap(victims["llava"])
    assert isinstance(defended, PurifiedVictim) and defended.gradient_mode == "bpda" and released.gradient_mode == "full"
    grads = {}
    for key, view in (("bpda", defended), ("detach", defended.with_gradient_mode("detach")), ("released", released)):
        torch.manual_seed(0)
        grads[key], = torch.autograd.grad(view.objective(x, y).sum(), x)
    assert (grads["bpda"].flatten(1) != 0).float().mean() > 0.5
    assert grads["detach"].abs().max() == 0
    torch.manual_seed(0)
    clean_step = (released.defense.purify(x.detach()) - x.detach()).abs()
    leaked = grads["released"] != 0
    assert not leaked[clean_step < 32 / 255 - 1e-6].any()  # inside the clip: no gradient at all
    assert leaked.float().mean() < (grads["bpda"] != 0).float().mean()


def test_squeezers():
    x = _batch(2)
    med = create_defense("squeeze.median", kernel=3).purify(x)
    ref = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect").unfold(2, 3, 1).unfold(3, 3, 1)
    assert torch.allclose(med, ref.flatten(-2).median(-1).values)
    bits = create_defense("squeeze.bitdepth", bits=2).purify(x)
    assert set(torch.unique(bits * 3).round().tolist()) <= {0.0, 1.0, 2.0, 3.0}
    assert (bits - x).abs().max() <= 0.5 / 3 + 1e-6
    noise = create_defense("f3.noise_only", alpha="16/255")
    p = noise.purify(x)
    assert (p - x).abs().max() <= 16 / 255 + 1e-6 and p.min() >= 0 and p.max() <= 1
    assert torch.allclose((p - x)[(p > 0) & (p < 1)] * 255, ((p - x)[(p > 0) & (p < 1)] * 255).round(), atol=1e-3)
    with pytest.raises(ConfigError):
        create_defense("squeeze.median", kernel=2)
    with pytest.raises(ConfigError):
        create_defense("squeeze.bitdepth", bits=9)


def test_purification_recovers_accuracy_lost_to_a_non_adaptive_attack(trained_lvlm):
    """Trained tiny BLIP-2: question PGD on the undefended victim, then F3; F3 must win back part of the loss, more
    than its noise alone."""
    victim = trained_lvlm("blip2")
    ds = rbm.create_dataset("phantom.ct", split="test")
    idx = list(range(24))
    x, y = ds.images(idx), ds.targets("vqa", idx)
    x_adv = rbm.create_attack("lvlm_pgd.question", eps="8/255", steps=10)(victim, x, y, seed=0)
    f3, noise = create_defense("f3.v3"), create_defense("f3.noise_only")
    f3.bind(victim)

    def accuracy(z: torch.Tensor) -> float:
        return float(victim.evaluate(z, y)["vqa_accuracy"].mean())

    torch.manual_seed(0)
    clean, adv, purified, noised = accuracy(x), accuracy(x_adv), accuracy(f3.purify(x_adv)), accuracy(noise.purify(x_adv))
    assert adv <= clean - 0.3
    assert purified >= adv + 0.15 and purified > noised


def test_masked_gradient_flag_fires_on_naive_adaptive_not_on_bpda_eot(tmp_path):
    grid = parse_grid({
        "name": "f3-small", "n_examples": 4, "batch_size": 4,
        "victims": [{"name": "llava.tiny", "weights": None}],
        "attacks": [{"name": "lvlm_pgd.question", "params": {"eps": "8/255", "steps": 2}}],
        "defenses": [{"name": "f3.v3", "attack_through": "detach", "eot": 2},
                     {"name": "f3.v3", "attack_through": "adaptive", "eot": 2},
                     {"name": "f3.v3", "attack_through": "transfer"}],
    })
    df = summary_wide(run_grid(grid, tmp_path, progress=False))
    flags = {row.attack_through: row.flags for row in df.itertuples()}
    assert "masked_gradients" in flags["detach"]
    assert "masked_gradients" not in flags["adaptive"]
    assert "masked_gradients" not in flags["transfer"]  # the undefended victim is attacked


def test_defence_that_does_not_support_a_victim_skips_its_cells(tmp_path):
    """F3 with the Q-Former attention source on LLaVA: the pair's cells are recorded as skipped (with the reason),
    the rest of the grid runs."""
    grid = parse_grid({
        "name": "f3-skip", "n_examples": 2, "batch_size": 2,
        "victims": [{"name": "llava.tiny", "weights": None}],
        "attacks": [{"name": "noise.uniform", "params": {"eps": "8/255"}}],
        "defenses": ["identity.none", {"name": "f3.v3", "params": {"source": "qformer"}}],
    })
    df = summary_wide(run_grid(grid, tmp_path, progress=False), fairness_boot=0)
    by_defense = {row.defense: row for row in df.itertuples()}
    assert by_defense["identity.none"].status == "done"
    assert by_defense["f3.v3"].status == "skipped" and "Q-Former" in by_defense["f3.v3"].reason
