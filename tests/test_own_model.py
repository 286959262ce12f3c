"""Your own model: wrap() for any nn.Module, timm / MONAI / Hugging Face models, plain state dicts, the training-flag
and BatchNorm guarantees, benchmark() in one call, and user code (--import, factories, entry points) in grids."""
import hashlib
import sys

import pytest
import torch
from torch import nn

import robustbench_med as rbm
from robustbench_med.errors import ConfigError, WeightsError
from robustbench_med.registry import VICTIMS
from robustbench_med.victim import eval_mode
from robustbench_med.wrap import OutputAdapter, state_sha256


class BNNet(nn.Module):
    """A small classifier with BatchNorm and dropout: evaluation must never update its statistics."""

    def __init__(self, classes: int = 3, width: int = 8):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(4),
                                      nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(width, classes)

    def forward(self, z):
        return self.head(self.drop(self.pool(self.features(z)).flatten(1)))


def _trained_bn_net(seed: int = 0) -> BNNet:
    """A BNNet whose running statistics are not the initial ones (a few training-mode passes on random data)."""
    torch.manual_seed(seed)
    net = BNNet()
    with torch.no_grad():
        for _ in range(3):
            net(torch.rand(8, 1, 64, 64))
    return net


def _state_bytes(net: nn.Module) -> dict[str, bytes]:
    return {k: v.detach().cpu().numpy().tobytes() for k, v in net.state_dict().items()}


def _flags(net: nn.Module) -> list[tuple[str, bool]]:
    return [(n, m.training) for n, m in net.named_modules()]


# ------------------------------------------------------------------------------------------------------------
# wrap()


def test_attack_and_score_restore_every_modules_training_flag_and_never_touch_batchnorm():
    """The reported bug: the user called net.train() on a sub-module and not the wrapper's .eval(); an attack used to
    leave the whole network in training mode, and score() then updated BatchNorm statistics."""
    net = _trained_bn_net()
    victim = rbm.wrap(net, "classification", input_size=(1, 64, 64))
    net.eval()
    net.features.train()  # a mixed state the user chose: it must come back exactly
    flags, state = _flags(net), _state_bytes(net)
    x = torch.rand(16, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    y = victim.predict(x)
    before = victim.score(x, y)
    x_adv = rbm.create_attack("pgd.linf", eps="8/255", steps=3)(victim, x, y)
    assert _flags(net) == flags and _state_bytes(net) == state
    assert torch.equal(victim.score(x, y), before) and _state_bytes(net) == state
    assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6


def test_eval_mode_restores_flags_even_when_the_block_raises():
    net = _trained_bn_net()
    net.train()
    net.head.eval()
    flags = _flags(net)
    with pytest.raises(RuntimeError), eval_mode(net):
        assert not any(m.training for m in net.modules())
        raise RuntimeError("boom")
    assert _flags(net) == flags


@pytest.mark.parametrize("kind", ["tensor", "dict", "tuple", "named"])
def test_output_adapter_takes_the_logits_of_any_output_kind(kind):
    logits = torch.randn(2, 3)
    out = {"tensor": logits, "dict": {"logits": logits, "aux": torch.zeros(2)}, "tuple": (logits, torch.zeros(2)),
           "named": {"scores": logits}}[kind]
    assert torch.equal(OutputAdapter("scores" if kind == "named" else None)(out), logits)


def test_output_adapter_asks_which_tensor_when_ambiguous():
    with pytest.raises(ConfigError, match="output="):
        OutputAdapter()({"a": torch.zeros(1), "b": torch.zeros(1)})


def test_wrap_infers_channels_and_classes_and_says_what_it_cannot():
    v = rbm.wrap(BNNet(classes=4), "classification", input_size=(1, 64, 64), mean=0.25, std=0.25)
    assert v.card.classes == ("0", "1", "2", "3") and v.card.name == "user.bn_net" and v.card.input_size == (1, 64, 64)
    with pytest.raises(ConfigError, match="image size"):
        rbm.wrap(BNNet(), "classification")  # channels from the first conv, but no image size anywhere
    with pytest.raises(ConfigError, match="channel count"):
        rbm.wrap(nn.Sequential(nn.Flatten(), nn.Linear(64 * 64, 3)), "classification")
    with pytest.raises(ConfigError, match="task='binary'"):
        rbm.wrap(BNNet(classes=1), "classification", input_size=(1, 64, 64))
    with pytest.raises(ConfigError, match="2 class names given"):
        rbm.wrap(BNNet(), "classification", input_size=(1, 64, 64), classes=["a", "b"])
    with pytest.raises(ConfigError, match="forward pass"):
        rbm.wrap(BNNet(), "classification", input_size=(3, 64, 64))
    with pytest.raises(ConfigError, match="supports tasks"):
        rbm.wrap(BNNet(), "vqa", input_size=(1, 64, 64))


def test_wrap_records_the_sha256_of_the_in_memory_state_dict():
    net = _trained_bn_net()
    v = rbm.wrap(net, "classification", input_size=(1, 64, 64))
    assert v.card.weights_sha256 == state_sha256(net) and len(v.card.weights_sha256) == 64
    assert rbm.wrap(_trained_bn_net(seed=1), "classification", input_size=(1, 64, 64)).card.weights_sha256 != v.card.weights_sha256


def test_plain_state_dicts_load_with_their_sha256(tmp_path):
    from safetensors.torch import save_file

    src = _trained_bn_net(seed=3)
    st, pt, ddp = tmp_path / "net.safetensors", tmp_path / "net.pt", tmp_path / "ddp.pth"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(st))
    torch.save(src.state_dict(), pt)
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, ddp)
    x = torch.rand(4, 1, 64, 64)
    ref = rbm.wrap(src, "classification", input_size=(1, 64, 64))
    for path in (st, pt, ddp):
        v = rbm.wrap(BNNet(), "classification", input_size=(1, 64, 64), weights=path)
        assert v.card.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest() and v.card.weights_file == str(path)
        with eval_mode(v), eval_mode(ref):
            assert torch.allclose(v(x), ref(x))
    with pytest.raises(WeightsError, match="does not match"):
        rbm.wrap(BNNet(classes=5), "classification", input_size=(1, 64, 64), weights=st)


def test_a_pickled_object_is_refused_not_unpickled(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"weights": BNNet()}, path)  # a whole module: loading it would run the unpickler on arbitrary classes
    with pytest.raises(WeightsError, match="cannot read"):
        rbm.wrap(BNNet(), "classification", input_size=(1, 64, 64), weights=path)


def test_timm_and_monai_models_by_name():
    timm_v = rbm.wrap("timm:resnet18", "classification", in_chans=1, num_classes=3, input_size=(1, 64, 64))
    assert type(timm_v.net).__name__ == "ResNet" and timm_v.card.classes == ("0", "1", "2")
    monai_v = rbm.wrap("monai:UNet", "segmentation", spatial_dims=2, in_channels=1, out_channels=6, channels=(8, 16),
                       strides=(2,), num_res_units=0, input_size=(1, 64, 64))
    assert monai_v(torch.rand(2, 1, 64, 64)).shape == (2, 6, 64, 64)
    with pytest.raises(ConfigError, match="timm has no model"):
        rbm.wrap("timm:resnet_does_not_exist", "classification", input_size=(1, 64, 64))
    with pytest.raises(ConfigError, match="builder name"):
        rbm.build_model("keras:resnet")


def tiny_vit_folder(path, labels: int = 2):
    """A Hugging Face ViT classifier with a tiny random config, saved with save_pretrained (as a user would)."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=64, patch_size=16, num_channels=1, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=64, num_labels=labels)
    model = ViTForImageClassification(cfg).eval()
    model.save_pretrained(path)
    return model


def test_hugging_face_model_output_and_save_pretrained_folder(tmp_path):
    model = tiny_vit_folder(tmp_path / "vit")
    v = rbm.wrap(model, "binary")  # channels and size from the config; ModelOutput.logits taken
    assert v.card.input_size == (1, 64, 64) and v.predict(torch.rand(3, 1, 64, 64)).shape == (3,)
    by_name = rbm.wrap(f"hf:{tmp_path / 'vit'}", "binary", weights=tmp_path / "vit")
    assert by_name.card.weights_sha256 == hashlib.sha256((tmp_path / "vit" / "model.safetensors").read_bytes()).hexdigest()
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.allclose(v(x), by_name(x), atol=1e-6)


# ------------------------------------------------------------------------------------------------------------
# benchmark()


def test_benchmark_a_whole_grid_leaves_batchnorm_and_every_flag_byte_identical():
    net = _trained_bn_net()
    net.train()
    net.head.eval()
    flags, state = _flags(net), _state_bytes(net)
    df = rbm.benchmark(net, task="classification", eps=["2/255", "8/255"], n=16, batch_size=16, mean=0.25, std=0.25,
                       attacks=["pgd.linf", "fgsm.linf", {"name": "square.linf", "params": {"n_queries": 20}}],
                       defenses=["identity.none", "jpeg.bpda", {"name": "gaussian.eot", "params": {"sigma": 0.05}, "eot": 2}])
    assert _flags(net) == flags and _state_bytes(net) == state
    assert "user.bn_net" not in VICTIMS, "the temporary registration is removed"
    assert set(df.defense) == {"identity.none", "jpeg.bpda", "gaussian.eot"} and {"robust_gap_sex", "robust_gap_age_group"} <= set(df.columns)
    done = df[df.status == "done"]
    assert len(done) >= 18 and (done.robust <= done.clean + 1e-9).all()
    assert list(df.columns[:4]) == ["victim", "task", "metric", "defense"]


def test_benchmark_writes_a_store_leaderboard_and_entries_when_asked(tmp_path):
    df = rbm.benchmark(_trained_bn_net(), task="classification", eps="4/255", attacks="fast", n=16, batch_size=16,
                       out=tmp_path / "run", publish=tmp_path / "board", name="mylab.bnnet")
    assert (tmp_path / "run" / "results.sqlite").exists() and (tmp_path / "run" / "leaderboard.md").exists()
    from robustbench_med.entries import load_entry

    entry = load_entry(tmp_path / "board" / "phantom.ct" / "Linf-4_255" / "mylab.bnnet.json")
    assert entry["weights_sha256"] and df.victim.unique().tolist() == ["mylab.bnnet"]
    with pytest.raises(ConfigError, match="takes"):
        rbm.benchmark(_trained_bn_net(), task="classification", input_size=(1, 32, 32), n=4)


def test_benchmark_rejects_what_it_cannot_run():
    with pytest.raises(ConfigError, match="say what the model does"):
        rbm.benchmark(BNNet(), n=4)
    with pytest.raises(ConfigError, match="threat"):
        rbm.benchmark(BNNet(), task="classification", threat="L1", n=4)
    with pytest.raises(ConfigError, match="attack suite"):
        rbm.benchmark(BNNet(), task="classification", attacks="strongest", n=4)


def test_packaged_suites_fit_every_task():
    from robustbench_med.evaluation import attack_suite

    for task in ("classification", "binary", "multilabel", "segmentation", "landmark"):
        for norm in ("Linf", "L2"):
            for suite in ("standard", "fast"):
                for spec in attack_suite(suite, task, norm):
                    attack = rbm.create_attack(spec["name"], **spec["params"])
                    assert task in attack.tasks and attack.threat.norm == norm, (task, norm, spec)


# ------------------------------------------------------------------------------------------------------------
# user code: --import, factories in grids, entry points


USER_MODULE = '''
import torch
from torch import nn


class TinyNet(nn.Module):
    def __init__(self, width=4, classes=3):
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.head = nn.Linear(width, classes)

    def forward(self, z):
        return self.head(torch.relu(self.bn(self.conv(z))).mean((2, 3)))


def build(width=4):
    return TinyNet(width)


def my_fgsm(**params):
    """A user attack factory (here: the project's FGSM under the user's own name)."""
    import robustbench_med as rbm

    return rbm.create_attack("fgsm.linf", **params)
'''


@pytest.fixture
def user_package(tmp_path, monkeypatch):
    """A package the project does not know, on sys.path (as if installed); removed from sys.modules afterwards."""
    pkg = tmp_path / "site" / "labmodels"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    yield tmp_path / "site"
    for m in [m for m in sys.modules if m.startswith("labmodels")]:
        del sys.modules[m]
    for name in [n for n in VICTIMS.list("labmodels.*")]:
        VICTIMS.remove(name)


def test_a_grid_naming_user_code_is_refused_until_imports_are_allowed(user_package, monkeypatch):
    from robustbench_med import plugins
    from robustbench_med.grid import parse_grid

    monkeypatch.setattr(plugins, "_trusted", set())
    raw = {"name": "u", "victims": [{"factory": "labmodels.nets:build", "wrap": {"task": "classification", "input_size": [1, 64, 64]}}],
           "attacks": ["pgd.linf"]}
    with pytest.raises(ConfigError, match="--import labmodels"):
        parse_grid(raw)
    assert "labmodels.nets" not in sys.modules, "nothing was imported"
    rbm.allow_imports("labmodels")
    grid = parse_grid(raw)
    assert grid.victims[0].name == "labmodels.build" and grid.victims[0].factory == "labmodels.nets:build"
    victim = rbm.create_victim("labmodels.build")
    assert victim.card.task == "classification" and victim.card.weights_sha256
    with pytest.raises(ConfigError, match="wrap"):
        parse_grid({**raw, "victims": [{"factory": "labmodels.nets:build", "wrap": {"task": "classification", "colour": 1}}]})
    from robustbench_med.registry import ATTACKS
    from robustbench_med.runner import run_grid

    g = parse_grid({**raw, "n_examples": 8, "batch_size": 8,
                    "attacks": [{"name": "labmodels.fgsm", "factory": "labmodels.nets:my_fgsm", "params": {"eps": "2/255"}}]})
    assert g.attacks[0].name == "labmodels.fgsm"
    try:
        from robustbench_med.leaderboard import summary_wide

        table = summary_wide(run_grid(g, user_package.parent / "run", progress=False))
        assert table[table.attack == "labmodels.fgsm"].status.tolist() == ["done"]
    finally:
        ATTACKS.remove("labmodels.fgsm")


def test_entry_points_register_third_party_victims(tmp_path, monkeypatch):
    from robustbench_med import plugins

    site = tmp_path / "ep"
    (site / "plugvictims").mkdir(parents=True)
    (site / "plugvictims" / "__init__.py").write_text(
        "import robustbench_med as rbm\nfrom torch import nn\n"
        "def tiny():\n    return rbm.wrap(nn.Sequential(nn.Conv2d(1, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()), "
        "'classification', input_size=(1, 64, 64))\n")
    dist = site / "plugvictims-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: plugvictims\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[robustbench_med.victims]\nplug.tiny = plugvictims:tiny\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(plugins, "_loaded_groups", set())
    try:
        assert "plug.tiny" in rbm.list_victims()
        v = rbm.create_victim("plug.tiny")
        assert v.card.name == "plug.tiny" and v.card.task == "classification"
    finally:
        if "plug.tiny" in VICTIMS:
            VICTIMS.remove("plug.tiny")
        sys.modules.pop("plugvictims", None)
