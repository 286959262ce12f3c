"""Registries, threat models, the input contract, budget checks and safe weights I/O."""
import json

import pytest
import torch

import robustbench_med as rbm
from robustbench_med.errors import ConfigError, InputContractError, ThreatModelError, UnknownNameError, WeightsError
from robustbench_med.registry import Registry
from robustbench_med.threat import ThreatModel, check_budget, eps_display, parse_eps
from robustbench_med.weights import load_weights, save_weights

from conftest import make_toy


@pytest.mark.parametrize("create,name,close", [
    (rbm.create_attack, "pgd.lnf", "pgd.linf"),
    (rbm.create_victim, "cnn.phantm", "cnn.phantom"),
    (rbm.create_defense, "jpeg", "jpeg.bpda"),
])
def test_unknown_names_suggest_close_ones(create, name, close):
    with pytest.raises(UnknownNameError, match=close):
        create(name)


def test_registry_rejects_duplicates_and_bad_names():
    reg = Registry("thing")
    reg.add("a.b", lambda: 1)
    with pytest.raises(ConfigError, match="already registered"):
        reg.add("a.b", lambda: 2)
    with pytest.raises(ConfigError, match="family.tag"):
        reg.add("NoDot", lambda: 3)
    assert reg.list("a.*") == ["a.b"]


def test_list_filters_by_metadata():
    assert "square.linf" in rbm.list_attacks(knowledge="black-box")
    assert "pgd.linf" not in rbm.list_attacks(knowledge="black-box")
    assert all(n.startswith("pgd.") for n in rbm.list_attacks("pgd.*"))


@pytest.mark.parametrize("kwargs,match", [
    ({"eps": -0.1}, "eps"), ({"eps": "a/b"}, "eps"), ({"eps": float("nan")}, "eps"),
    ({"norm": "L7"}, "unknown norm"), ({"steps": 0}, "steps"), ({"restarts": 0}, "restarts"),
    ({"step_size": 0}, "step_size"), ({"knowledge": "grey"}, "knowledge"),
])
def test_invalid_threat_models_raise(kwargs, match):
    with pytest.raises(ThreatModelError, match=match):
        ThreatModel(**kwargs)


@pytest.mark.parametrize("name", ["pgd.linf", "pgd.l2", "fgsm.linf", "apgd.ce", "square.linf", "cw.l2", "noise.uniform"])
def test_attacks_validate_parameters_before_any_work(name):
    with pytest.raises(ThreatModelError):
        rbm.create_attack(name, eps=-1)


def test_eps_parsing_and_display():
    assert parse_eps("8/255") == pytest.approx(8 / 255)
    assert parse_eps(0.5) == 0.5
    assert eps_display(8 / 255) == "8/255"
    assert eps_display(0.5) == "0.5"


@pytest.mark.parametrize("bad,match", [
    (torch.rand(1, 16, 16), "NCHW"),
    (torch.rand(2, 3, 16, 16), r"\(C, H, W\)"),
    (torch.rand(2, 1, 16, 16) * 2, r"\[0, 1\]"),
    (torch.full((2, 1, 16, 16), float("nan")), "NaN"),
    (torch.randint(0, 255, (2, 1, 16, 16)), "floating"),
])
def test_input_contract_errors(bad, match):
    victim = make_toy()
    with pytest.raises(InputContractError, match=match):
        victim.predict(bad)


def test_check_budget_reports_each_violation():
    x = torch.rand(4, 1, 8, 8) * 0.5 + 0.25
    ok = check_budget(x, x + 0.01, "Linf", 0.02)
    assert ok.valid and ok.n_over_budget == 0
    over = check_budget(x, x + 0.05, "Linf", 0.02)
    assert not over.valid and over.n_over_budget == 4
    out = x.clone()
    out[0, 0, 0, 0] = 1.5
    assert check_budget(x, out, "Linf", 2.0).n_out_of_range == 1
    nan = x.clone()
    nan[1, 0, 0, 0] = float("nan")
    assert check_budget(x, nan, "Linf", 1.0).n_non_finite == 1
    per_sample = check_budget(x, x + 0.03, "Linf", torch.tensor([0.01, 0.05, 0.05, 0.05]))
    assert per_sample.n_over_budget == 1


def test_weights_roundtrip_and_corruption(tmp_path):
    victim = make_toy()
    path = tmp_path / "toy.safetensors"
    digest = save_weights(victim, path, {"note": "test"})
    other = make_toy()
    torch.nn.init.zeros_(other.net.w)
    assert load_weights(other, path) == digest
    assert torch.equal(other.net.w, victim.net.w)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="corrupted"):
        load_weights(other, path, hint="retrain it")


def test_weights_refuse_pickles_and_mismatches(tmp_path):
    victim = make_toy()
    evil = tmp_path / "model.pkl"
    evil.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="only .safetensors"):
        load_weights(victim, evil)
    pickled = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(3), "obj": object}, pickled)
    with pytest.raises(WeightsError, match="cannot read"):
        load_weights(victim, pickled)
    small = make_toy(classes=("a", "b"))
    path = tmp_path / "small.safetensors"
    save_weights(small, path)
    with pytest.raises(WeightsError, match="does not match"):
        load_weights(victim, path)


def test_public_api_is_curated():
    assert sorted(rbm.__all__) == sorted(set(rbm.__all__))
    for name in rbm.__all__:
        assert hasattr(rbm, name), name


def test_every_victim_card_is_complete():
    from robustbench_med.registry import VICTIMS

    for name in rbm.list_victims():
        card = VICTIMS.get(name).meta["card"]
        assert card.name == name and card.task and card.modality and len(card.input_size) in (3, 4)
        json.dumps(card.as_dict(), default=str)


def test_cached_weights_from_another_recipe_or_data_are_stale(tmp_path):
    from dataclasses import asdict, replace

    from robustbench_med.training import TRAINING_VERSION, is_current, recipe_for
    from robustbench_med.weights import save_weights

    recipe, path = recipe_for("cnn.phantom"), tmp_path / "w.safetensors"
    module, current = torch.nn.Linear(2, 2), {"training_version": TRAINING_VERSION}
    save_weights(module, path, {"recipe": asdict(recipe), **current})
    assert is_current("cnn.phantom", path)
    save_weights(module, path, {"recipe": asdict(recipe)})  # trained by an older training loop
    assert not is_current("cnn.phantom", path)
    save_weights(module, path, {"recipe": asdict(replace(recipe, epochs=recipe.epochs + 1)), **current})
    assert not is_current("cnn.phantom", path)
    save_weights(module, path, {"recipe": asdict(recipe), "train_fingerprint": "0" * 64, **current})
    assert not is_current("cnn.phantom", path)


def test_training_runs_with_a_pinned_thread_count(tmp_path, monkeypatch):
    """Trained bytes depend on the intra-op thread count; training pins it so published weight hashes reproduce."""
    from robustbench_med import training

    seen = []
    monkeypatch.setenv("ROBUSTBENCH_MED_HOME", str(tmp_path))
    monkeypatch.setattr(training, "_train", lambda name, path, device, progress: seen.append(torch.get_num_threads()) or path)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        training.train_victim("cnn.phantom", force=True)
        monkeypatch.setenv(training.TRAIN_THREADS_ENV, "3")
        training.train_victim("cnn.phantom", force=True)
        assert seen == [training.TRAIN_THREADS, 3] and torch.get_num_threads() == 1, "restored after training"
        monkeypatch.setenv(training.TRAIN_THREADS_ENV, "many")
        with pytest.raises(rbm.ConfigError, match="ROBUSTBENCH_MED_TRAIN_THREADS"):
            training.train_victim("cnn.phantom", force=True)
    finally:
        torch.set_num_threads(before)


def test_segmentation_training_weights_rare_classes_and_uses_batch_dice():
    from robustbench_med.training import batch_soft_dice_loss, segmentation_class_weights

    masks = torch.zeros(2, 10, 10, dtype=torch.long)
    masks[:, :5] = 1
    masks[0, 0, 0] = 2  # 1 pixel of 200
    w = segmentation_class_weights(masks, 3)
    assert w[0] == 1.0 and w[2] > w[1] >= w[0] and w[2] <= 20.0
    perfect = torch.nn.functional.one_hot(masks, 3).permute(0, 3, 1, 2).float() * 50
    assert batch_soft_dice_loss(perfect, masks) < 0.01 < batch_soft_dice_loss(-perfect, masks)


def test_task_metrics_dice_iou_and_binary_probability():
    """Per-sample metrics: Dice and IoU average over the foreground classes present (IoU = Dice / (2 − Dice) for one
    class), an empty prediction of an empty target scores 1 (and distance 0), HD95 / ASSD in pixels follow, and binary
    heads also report P(positive)."""
    from robustbench_med.tasks import metrics_per_sample

    target = torch.zeros(2, 4, 4, dtype=torch.long)
    target[0, :2, :2] = 1  # 4 pixels of class 1 in image 0; image 1 is all background
    logits = torch.zeros(2, 3, 4, 4)
    logits[0, 1, :2, :] = 5.0  # predicts 8 pixels of class 1 (4 right); image 1 predicts background
    logits[1, 0] = 5.0
    m = metrics_per_sample("segmentation", logits, target)
    assert list(m) == ["dice_fg", "iou_fg", "hd95_px", "assd_px"]
    assert torch.allclose(m["dice_fg"], torch.tensor([2 * 4 / 12, 1.0])) and torch.allclose(m["iou_fg"], torch.tensor([4 / 8, 1.0]))
    # the prediction reaches 2 columns past the target: HD95 2 px; its 8 edge pixels lie 0, 0, 1, 2 (twice) and the
    # target's 4 edge pixels 0 px from the other surface, so ASSD = 6 / 12; nothing to miss in image 1: 0
    assert m["hd95_px"].tolist() == [2.0, 0.0] and m["assd_px"].tolist() == [0.5, 0.0]
    b = metrics_per_sample("binary", torch.tensor([[2.0], [-1.0]]), torch.tensor([1, 1]))
    assert list(b) == ["accuracy", "prob_pos"] and torch.equal(b["accuracy"], torch.tensor([1.0, 0.0]))
    assert torch.allclose(b["prob_pos"], torch.sigmoid(torch.tensor([2.0, -1.0])))


# ------------------------------------------------------------------------------------------------------------
# the task registry (issue #21 item 2): what differs between tasks lives in one object per task


def test_an_unknown_task_name_suggests_the_closest():
    from robustbench_med.tasks import get_task
    from robustbench_med.victim import VictimCard

    with pytest.raises(rbm.ConfigError, match="did you mean 'segmentation'"):
        get_task("segmentaton")
    with pytest.raises(rbm.ConfigError, match="did you mean 'landmark'"):
        VictimCard(name="x.y", task="landmarks", modality="CT", input_size=(1, 8, 8))
    with pytest.raises(rbm.ConfigError, match="wrap\\(\\) supports tasks"):
        rbm.wrap(torch.nn.Conv2d(1, 1, 1), task="vqa", input_size=(1, 8, 8))


@pytest.mark.parametrize("name", ["classification", "binary", "multilabel", "segmentation", "landmark"])
def test_every_image_task_is_self_consistent(name):
    """Loss per sample, predictions, a primary score in [0, 1] (0/1 for zero-one tasks) that is higher for a perfect
    output, and the class-logit view of single-label heads (softmax = the model's probabilities)."""
    from robustbench_med.tasks import get_task

    task, g = get_task(name), torch.Generator().manual_seed(0)
    out = {"classification": torch.randn(6, 3, generator=g), "binary": torch.randn(6, 1, generator=g),
           "multilabel": torch.randn(6, 4, generator=g), "segmentation": torch.randn(6, 3, 8, 8, generator=g),
           "landmark": torch.randn(6, 2, 8, 8, generator=g)}[name]
    y = {"classification": torch.tensor([0, 1, 2, 0, 1, 2]), "binary": torch.tensor([0, 1, 0, 1, 1, 0]),
         "multilabel": (torch.rand(6, 4, generator=g) > 0.5).long(), "segmentation": torch.randint(0, 3, (6, 8, 8), generator=g),
         "landmark": torch.randint(0, 8, (6, 2, 2), generator=g)}[name]
    assert task.loss(out, y).shape == (6,) and len(task.predict(out)) == 6
    score = next(iter(task.metrics(out, y).values()))
    assert score.shape == (6,) and bool(((score >= 0) & (score <= 1)).all())
    if task.zero_one:
        assert set(score.tolist()) <= {0.0, 1.0}
    if task.single_label:
        logits = task.class_logits(out)
        assert logits.shape == (6, task.num_classes(("a", "b", "c")))
        assert torch.equal(task.predict(out), logits.argmax(1))
        assert bool((task.next_class(y, ("a", "b", "c")) != y).all())
    else:
        with pytest.raises(rbm.ConfigError, match="targeted attacks need"):
            task.next_class(y, ())
    assert task.output_ok(tuple(out.shape)) and not task.output_ok(tuple(out.shape[:1]))
