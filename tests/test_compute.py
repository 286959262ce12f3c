"""The grid's ``compute`` field (issue #21 item 5): mixed precision for the attacks, float32 evaluation by default,
channels_last and torch.compile, validated at the boundary, recorded per cell and part of the config hash."""
import json
from types import SimpleNamespace

import pytest
import torch
from rank_helpers import table

import robustbench_med as rbm
from robustbench_med.compute import effective, parse_compute, prepare_victim
from robustbench_med.entries import build_entries, dumps_entry, validate_entry
from robustbench_med.grid import parse_grid
from robustbench_med.registry import VICTIMS
from robustbench_med.runner import run_grid

NAME = "convrec.phantom"
CALLS: list[tuple[bool, torch.dtype]] = []  # (gradients enabled, dtype of the head's output) per forward pass


class _ConvNet(torch.nn.Module):
    """A small seeded conv classifier (binary) on the phantom's 1×64×64 images that records each pass's precision."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv2d(1, 4, 5, stride=2)
        self.head = torch.nn.Linear(4, 1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, z):
        out = self.head(torch.relu(self.conv(z)).mean((2, 3)))
        CALLS.append((torch.is_grad_enabled(), out.dtype))
        return out


def _make(**_kw):
    from robustbench_med.victim import ModelVictim, VictimCard

    card = VictimCard(name=NAME, task="binary", modality="CT", input_size=(1, 64, 64), classes=("absent", "present"))
    return ModelVictim(_ConvNet(), card).eval()


@pytest.fixture(autouse=True)
def victim():
    VICTIMS.add(NAME, _make, task="binary", card=_make().card)
    yield
    VICTIMS.remove(NAME)


def _grid(**compute):
    return parse_grid({"name": "compute", "n_examples": 8, "unit_size": 4, "attack_only_robust": False,
                       "victims": [{"name": NAME, "weights": None, "target_field": "label"}],
                       "attacks": [{"name": "pgd.linf", "params": {"eps": "8/255", "steps": 3}}],
                       **({"compute": compute} if compute else {})})


def _rows(db):
    return table(db, "SELECT c.attack, s.sample_idx, s.clean_score, s.adv_score, s.linf, s.valid FROM samples s JOIN cells c USING (cell_id) ORDER BY 1, 2")


@pytest.mark.parametrize("value,match", [
    ({"autocast": "fp8"}, "autocast must be one of"),
    ({"precision": "bf16"}, "unknown key"),
    ({"channels_last": "yes"}, "channels_last must be true or false"),
    ({"autocast_eval": True}, "needs autocast"),
    ({"compile": "no-such-backend"}, "unknown backend"),
    ({"compile": 3}, "compile must be"),
    ("bf16", "must be a mapping"),
])
def test_compute_settings_are_validated_at_the_boundary(value, match):
    with pytest.raises(rbm.ConfigError, match=match):
        parse_grid({"name": "c", "victims": [NAME], "attacks": ["noise.uniform"], "compute": value})


def test_compute_is_part_of_the_identity_only_when_set():
    plain = _grid().config_hash()
    assert _grid(autocast=None, channels_last=False, compile=False).config_hash() == plain
    assert len({plain, _grid(autocast="bf16").config_hash(), _grid(channels_last=True).config_hash()}) == 3


def test_mixed_precision_attacks_with_float32_evaluation(tmp_path):
    """autocast: bf16 runs the attack's passes in bfloat16; the clean pass and the scoring stay in float32 (clean
    rows equal the float32 run's bit for bit), unless autocast_eval. Budgets hold; cells record the setting."""
    reference = _rows(run_grid(_grid(), tmp_path / "fp32", progress=False))
    CALLS.clear()
    db = run_grid(_grid(autocast="bf16"), tmp_path / "bf16", progress=False)
    assert (True, torch.bfloat16) in CALLS
    assert {dtype for grad, dtype in CALLS if not grad} == {torch.float32}
    rows = _rows(db)
    assert [r[:3] for r in rows] == [r[:3] for r in reference]  # same samples, same float32 clean scores
    assert all(r[5] == 1 and r[4] <= 8 / 255 + 1e-6 for r in rows)
    (extra,), = table(db, "SELECT extra FROM cells")
    assert json.loads(extra)["compute"] == {"autocast": "bf16"}
    (entry,) = build_entries(db)  # published rows say how they were computed, and the schema checks it
    assert {r["attack"]: r.get("compute") for r in entry["results"]}["pgd.linf"] == {"autocast": "bf16"}
    validate_entry(json.loads(dumps_entry(entry)))
    broken = json.loads(dumps_entry(entry))
    next(r for r in broken["results"] if r["attack"] == "pgd.linf")["compute"] = {"autocast": "bf16", "channels_last": False}
    with pytest.raises(rbm.ConfigError, match="compute"):
        validate_entry(broken)
    CALLS.clear()
    run_grid(_grid(autocast="bf16", autocast_eval=True), tmp_path / "bf16eval", progress=False)
    assert (False, torch.bfloat16) in CALLS


def test_channels_last_and_compile_change_no_result(tmp_path):
    """channels_last weights and a compiled forward (the 'eager' dynamo backend: traced, no C compiler needed) give
    the float32 results to rounding; the forward really goes through dynamo."""
    from torch._dynamo.utils import counters

    victim = prepare_victim(_make(), {"channels_last": True})
    assert victim.net.conv.weight.is_contiguous(memory_format=torch.channels_last)
    reference = _rows(run_grid(_grid(), tmp_path / "plain", progress=False))
    before = sum(counters["stats"].values()) + sum(counters["frames"].values())
    rows = _rows(run_grid(_grid(channels_last=True, compile="eager"), tmp_path / "compiled", progress=False))
    assert sum(counters["stats"].values()) + sum(counters["frames"].values()) > before
    assert [r[:2] for r in rows] == [r[:2] for r in reference]
    assert max(abs(a[3] - b[3]) + abs(a[2] - b[2]) for a, b in zip(rows, reference)) < 1e-5


def test_lvlms_and_opted_out_victims_never_autocast():
    compute = parse_compute({"autocast": "fp16", "autocast_eval": True, "channels_last": True})
    lvlm = SimpleNamespace(task="vqa", card=SimpleNamespace(extra={}))
    opted_out = SimpleNamespace(task="classification", card=SimpleNamespace(extra={"autocast": False}))
    plain = SimpleNamespace(task="classification", card=SimpleNamespace(extra={}))
    assert effective(compute, lvlm) == effective(compute, opted_out) == {"channels_last": True}
    assert effective(compute, plain) == compute
