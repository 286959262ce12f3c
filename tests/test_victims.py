"""Invariants of every registered victim: input contract, non-zero input gradients, determinism, metrics."""
import pytest
import torch

import robustbench_med as rbm
from robustbench_med.registry import VICTIMS

# Full-size published configs and checkpoint loaders are covered by their own test files (parameter counts on the
# meta device, local-directory loading); here every victim that can be built at random init on a CPU is exercised.
# A study's copies trained with another seed (card extra 'training_seed' > 0) have seed 0's architecture: one of them
# is enough here.
SMALL = [n for n in rbm.list_victims() if VICTIMS.get(n).meta.get("recipe") is not None
         and not VICTIMS.get(n).meta["card"].extra.get("training_seed", 0)]


def random_target(victim, b: int) -> torch.Tensor:
    c, *spatial = victim.card.input_size  # (H, W) for slices, (D, H, W) for volumes
    g = torch.Generator().manual_seed(0)
    k = max(2, len(victim.card.classes))
    if victim.task == "classification":
        return torch.randint(0, k, (b,), generator=g)
    if victim.task == "binary":
        return torch.randint(0, 2, (b,), generator=g)
    if victim.task == "multilabel":
        return torch.randint(0, 2, (b, k), generator=g)
    if victim.task == "segmentation":
        return torch.randint(0, k, (b, *spatial), generator=g)
    if victim.task == "landmark":
        return torch.rand(b, len(victim.card.classes), len(spatial), generator=g) * (min(spatial) - 1)
    if victim.task == "vqa" and len(spatial) == 3:
        from robustbench_med.data.volumes import VOLUME_QUESTIONS

        return torch.randint(0, len(victim.card.classes), (b, len(VOLUME_QUESTIONS)), generator=g)
    if victim.task == "vqa":
        from robustbench_med.data.phantom import ANSWERS, QUESTIONS

        return torch.randint(0, len(ANSWERS), (b, len(QUESTIONS)), generator=g)
    raise AssertionError(victim.task)


@pytest.fixture(scope="module", params=SMALL)
def victim(request):
    torch.manual_seed(0)
    return rbm.create_victim(request.param, weights=None)


def test_objective_has_nonzero_input_gradients(victim):
    x = torch.rand(2, *victim.card.input_size, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    y = random_target(victim, 2)
    loss = victim.objective(x, y)
    assert loss.shape == (2,) and torch.isfinite(loss).all()
    loss.sum().backward()
    assert x.grad is not None and (x.grad.flatten(1).abs().sum(1) > 0).all()


def test_outputs_are_deterministic_and_metrics_bounded(victim):
    x = torch.rand(3, *victim.card.input_size, generator=torch.Generator().manual_seed(2))
    y = random_target(victim, 3)
    a, b = victim.evaluate(x, y), victim.evaluate(x, y)
    primary = next(iter(a))
    assert primary == victim.spec.metric
    assert torch.equal(a[primary], b[primary])
    assert ((a[primary] >= 0) & (a[primary] <= 1)).all()


def test_input_contract_is_enforced(victim):
    c, *spatial = victim.card.input_size
    with pytest.raises(rbm.InputContractError):
        victim(torch.rand(2, c + 1, *spatial))
    with pytest.raises(rbm.InputContractError):
        victim.score(torch.full((1, c, *spatial), 2.0), random_target(victim, 1))


def test_card_is_frozen(victim):
    with pytest.raises(Exception):
        victim.card.task = "binary"


def test_missing_and_corrupted_weights_explain_how_to_retrain(tmp_path, monkeypatch):
    monkeypatch.setenv("ROBUSTBENCH_MED_HOME", str(tmp_path))
    with pytest.raises(rbm.WeightsError, match="robustbench-med train cnn.phantom"):
        rbm.create_victim("cnn.phantom")
    from robustbench_med.training import weights_path
    from robustbench_med.weights import save_weights

    path = weights_path("cnn.phantom")
    save_weights(rbm.create_victim("cnn.phantom", weights=None), path)
    rbm.create_victim("cnn.phantom")  # a valid file loads
    blob = bytearray(path.read_bytes())
    blob[100] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(rbm.WeightsError, match="corrupted.*train cnn.phantom --force"):
        rbm.create_victim("cnn.phantom")
