"""The volume phantom's classifier and landmark heads (issue #20): ``cls3d.phantom`` (max-pooled voxel logit map,
voxel-supervised MIL) and ``unet3d.landmark`` (MONAI 3D UNet heatmaps) — the contract on whole volumes, gradients to
the input, the MIL pooling's invariance to where a lesion lies, heatmap decoding, a tiny training through the
registered trainers, and pgd.linf within budget. No full training (random-init victims)."""
import dataclasses
import json

import pytest
import torch

import robustbench_med as rbm
from robustbench_med import tasks as T
from robustbench_med.attack import check_targets
from robustbench_med.registry import VICTIMS
from robustbench_med.threat import check_budget
from robustbench_med.training import pinned_threads
from robustbench_med.victims import classifier3d as C
from robustbench_med.victims import landmark3d as L
from robustbench_med.weights import load_weights

NAMES = {"cls3d.phantom": "label", "unet3d.landmark": "landmarks"}
OUTPUT = {"cls3d.phantom": (2, 1), "unet3d.landmark": (2, 4, 32, 48, 48)}


@pytest.fixture(autouse=True)
def _one_thread():
    with pinned_threads(1):
        yield


@pytest.fixture(scope="module")
def volumes():
    data = rbm.create_dataset("phantom.volumes", split="test", n=2)
    return data.images(), {f: data.targets(f) for f in set(NAMES.values())}


@pytest.mark.parametrize("name", NAMES)
def test_registered_heads_take_whole_volumes_and_pass_gradients_to_the_input(name, volumes):
    x, targets = volumes
    y = targets[NAMES[name]]
    victim = rbm.create_victim(name, weights=None)
    assert victim.card.input_size == (1, 32, 48, 48) and victim.card.spatial_dims == 3
    assert "sliding_window" not in victim.card.extra  # both run on the whole volume
    check_targets(victim, y)
    out = victim(x)
    assert out.shape == OUTPUT[name] and torch.isfinite(out).all()
    xg = x.clone().requires_grad_(True)
    grad = torch.autograd.grad(victim.objective(xg, y).sum(), xg)[0]
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    scores = victim.evaluate(x, y)
    assert next(iter(scores)) == victim.spec.metric and scores[victim.spec.metric].shape == (2,)


def test_the_classifier_logit_is_the_max_of_its_map_wherever_the_lesion_lies():
    """MIL max pooling: the volume logit is the maximum of the logit map, and a blob moved inside the volume (by an
    even shift: the map has stride 2) gives the same logit and a shifted map. A position-dependent head (a linear layer
    on the flattened map, a position embedding) fails this. A volume larger than the phantom's keeps the receptive
    field (17³) of the blob clear of the borders (map cell i sees input voxels 2i ± 8) — the network is fully convolutional."""
    torch.manual_seed(0)
    net = C.LesionMIL3D().double().eval()
    empty = torch.full((1, 1, 48, 64, 64), 0.6, dtype=torch.float64)

    def with_blob(z0, y0, x0, amp):
        v = empty.clone()
        v[0, 0, z0:z0 + 3, y0:y0 + 4, x0:x0 + 4] += amp
        return v

    with torch.no_grad():
        base = net(empty)[0, 0]
        amp = next(a for a in (4.0, -4.0, 2.0, -2.0) if net(with_blob(16, 16, 16, a))[0, 0] > base + 1e-6)
        a, b = with_blob(16, 16, 16, amp), with_blob(26, 40, 36, amp)
        map_a, map_b = net.voxel_logits(a), net.voxel_logits(b)
        assert torch.equal(net(a)[:, 0], map_a.flatten(1).amax(1))
        assert net(a)[0, 0] > base + 1e-6  # the blob, not the borders, decides the logit
        assert net(a)[0, 0].item() == pytest.approx(net(b)[0, 0].item(), abs=1e-10)
        assert torch.allclose(map_a[0, 4:14, 4:14, 4:14], map_b[0, 9:19, 16:26, 14:24], atol=1e-10)  # shifted by (5, 12, 10)


def test_heatmap_argmax_recovers_the_volume_landmarks(volumes):
    _, targets = volumes
    y = targets["landmarks"]
    assert y.shape == (2, 4, 3)
    grid = y.round()
    hm = T.landmark_heatmaps(grid, (32, 48, 48), L.HEATMAP_SIGMA)
    assert hm.shape == (2, 4, 32, 48, 48) and torch.equal(T.heatmap_argmax(hm), grid)
    victim = rbm.create_victim("unet3d.landmark", weights=None)
    scores = victim.metrics(hm, grid)
    assert scores["sdr@4px"].eq(1).all() and scores["mre_px"].eq(0).all() and victim.loss(hm, grid).abs().max() < 1e-12
    err = (T.heatmap_argmax(T.landmark_heatmaps(y, (32, 48, 48), L.HEATMAP_SIGMA)) - y).norm(dim=-1)
    assert (err <= 3 ** 0.5 / 2 + 1e-5).all()  # sub-voxel landmarks decode to their nearest voxel


@pytest.mark.parametrize("name,module,trainer,tiny", [
    ("cls3d.phantom", C, C.train_classifier3d, dict(n_train=6, n_val=4, steps=2, batch_size=2, n_calibrate=6)),
    ("unet3d.landmark", L, L.train_landmark3d, dict(n_train=4, n_val=2, steps=2, batch_size=2)),
])
def test_the_registered_trainers_train_save_and_load(name, module, trainer, tiny, tmp_path, monkeypatch):
    meta = VICTIMS.get(name).meta
    monkeypatch.setitem(meta, "recipe", dataclasses.replace(meta["recipe"], **tiny))
    path = tmp_path / f"{name}.safetensors"
    trainer(name, path, torch.device("cpu"), False)
    side = json.loads((tmp_path / f"{name}.safetensors.json").read_text())
    victim = rbm.create_victim(name, weights=None)
    assert set(side["val_metric"]) == {victim.spec.metric} and side["train_threads"] == 1
    assert side["trainer_version"] == module.TRAINER_VERSION and side["train_seconds"] >= 0
    assert side["recipe"]["steps"] == 2
    load_weights(victim, path)


@pytest.mark.parametrize("name", NAMES)
def test_pgd_linf_stays_within_budget_on_the_volume_heads(name, volumes):
    x, targets = volumes
    y = targets[NAMES[name]]
    victim = rbm.create_victim(name, weights=None)
    attack = rbm.create_attack("pgd.linf", eps=2 / 255, steps=2, seed=0)
    attack.check_task(victim)
    x_adv = attack(victim, x, y)
    assert x_adv.shape == x.shape and check_budget(x, x_adv, "Linf", 2 / 255).valid
    assert 0 <= float(x_adv.min()) and float(x_adv.max()) <= 1
