"""The controlled 2D projector study: one tiny LLaVA, the projector swapped; claims printed with intervals."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

import robustbench_med as rbm
from robustbench_med.victims.lvlm.projector_study import ARMS, STUDY, study_name


@pytest.fixture(scope="module")
def batch():
    ds = rbm.create_dataset("phantom.ct", split="test", n=2)
    return ds.images(), ds.targets("vqa")


def _build(arm: str, seed: int = 0):
    torch.manual_seed(seed)
    return rbm.create_victim(study_name(arm, seed), weights=None)


def test_arms_differ_only_in_the_projector(batch):
    """Within a training seed every arm starts from the same vision tower and LM; the projector sets the token count."""
    x, y = batch
    reference = {k: t for k, t in _build("mlp64").model.state_dict().items() if "multi_modal_projector" not in k}
    for arm, spec in ARMS.items():
        victim = _build(arm)
        rest = {k: t for k, t in victim.model.state_dict().items() if "multi_modal_projector" not in k}
        assert rest.keys() == reference.keys() and all(torch.equal(rest[k], reference[k]) for k in rest)
        assert victim.n_visual_tokens == spec.tokens == victim.visual_features(x, None, "projector").shape[1]
        card = victim.card.extra
        assert (card["study"], card["arm"], card["reference_arm"]) == (STUDY, arm, "mlp64")
        assert card["projector"] == ("uncompressed" if arm == "mlp64" else "compressed")
        loss = victim.objective(x.clone().requires_grad_(True), y)
        assert torch.isfinite(loss).all()
    other_seed = {k: t for k, t in _build("mlp64", 1).model.state_dict().items() if "vision_tower" in k}
    assert any(not torch.equal(t, reference[k]) for k, t in other_seed.items())  # seeds draw other towers


def test_pooled_projector_averages_patch_blocks():
    from robustbench_med.victims.lvlm.projector_study import PooledMLPProjector

    proj = PooledMLPProjector(4, 4, (2, 4))
    proj.linear_1.weight.data, proj.linear_1.bias.data = torch.eye(4), torch.zeros(4)
    patches = torch.zeros(1, 64, 4)
    patches[0, 0] = 8.0  # top-left patch of the 8×8 grid: only the first pooled token (a 4×2 block) sees it
    hidden = []
    proj.linear_2.register_forward_hook(lambda m, i, o: hidden.append(i[0]))
    proj(patches)
    assert hidden[0].shape == (1, 8, 4)
    assert hidden[0][0, 0].sum() > 0 and torch.all(hidden[0][0, 1:] == 0)


def test_claims_need_seeds_and_an_interval_without_zero(monkeypatch):
    from robustbench_med.victims.lvlm import claims as C

    assert C.verdict(0.01, 0.2, "A", "B", 3, 3) == "finding: A"
    assert C.verdict(-0.2, -0.01, "A", "B", 3, 3) == "finding: B"
    assert C.verdict(-0.2, 0.1, "A", "B", 3, 3) == "no difference shown"
    assert C.verdict(0.01, 0.2, "A", "B", 3, 1).startswith("A (not a finding: 3 training × 1 attack seeds")
    table = pd.DataFrame([
        {"study": STUDY, "condition": "clean", "arm_a": "qformer8", "arm_b": "mlp64", "n": 48, "seeds_a": 3, "seeds_b": 3},
        {"study": STUDY, "condition": "projector.whitebox 4/255", "arm_a": "qformer8", "arm_b": "mlp64", "n": 48,
         "seeds_a": 3, "seeds_b": 3, "drop_delta": 0.1, "drop_ci95_low": 0.02, "drop_ci95_high": 0.2, "attack_seeds": 3}])
    import robustbench_med.seed_studies as SS

    monkeypatch.setattr(SS, "seed_study_table", lambda store: table)
    claims = C.projector_claims(None)
    assert len(claims) == 1 and claims[0].verdict == "finding: qformer8 loses more"
    assert "n 48 × 3 training × 3 attack seeds" in claims[0].line()


def test_qava_claims_pool_an_arms_training_seeds(monkeypatch):
    """The QAVA claims of a seed-study arm pool its training seeds (two-level interval); a lone victim stays per
    victim, and the verdict withholds "finding" below 3 × 3 seeds."""
    from robustbench_med.victims.lvlm import claims as C

    idx = range(40)
    base = pd.Series([0.5 + 0.01 * (i % 7) for i in idx], index=list(idx))
    primary, first = {}, {}
    for seed in (0, 1, 2):
        name = study_name("mlp64", seed)
        frame = pd.DataFrame({"qava.lm 4/255": base - 0.1, "qava.hidden[pool=None] 4/255": base,
                              "qava.hidden[pool=unrelated] 4/255": base + 0.02 * (seed - 1)})
        primary[(name, "identity.none[adaptive]")] = (frame, {c: 3 for c in frame.columns})
        first[(name, "identity.none[adaptive]")] = (pd.DataFrame({"lvlm_pgd.question 4/255": base + 0.2}), {"lvlm_pgd.question 4/255": 3})
    primary[("llava.tiny", "identity.none[adaptive]")] = (pd.DataFrame({"qava.lm 4/255": base}), {"qava.lm 4/255": 1})
    first[("llava.tiny", "identity.none[adaptive]")] = (pd.DataFrame({"lvlm_pgd.question 4/255": base}), {"lvlm_pgd.question 4/255": 1})
    monkeypatch.setattr(C, "metric_frames", lambda store, metric: primary if metric == "vqa_accuracy" else first)
    claims = {("unrelated" if "unrelated" in c.claim else "known", c.where): c for c in C.qava_claims(None)}
    strong = claims[("known", "projector2d/mlp64")]
    assert strong.training_seeds == 3 and strong.attack_seeds == 3 and strong.delta == pytest.approx(-0.3)
    assert strong.verdict == "finding: QAVA stronger"
    unrelated = claims[("unrelated", "projector2d/mlp64")]
    assert unrelated.delta == pytest.approx(0.0) and unrelated.verdict == "no difference shown"
    assert unrelated.ci95_high - unrelated.ci95_low > 0.02  # the seeds' ±0.02 offsets widen the interval
    lone = claims[("known", "llava.tiny")]
    assert lone.training_seeds == 1 and "not a finding" in lone.verdict


def test_f3_claims_pool_seeds_and_name_only_non_default_parameters(monkeypatch):
    from robustbench_med.victims.lvlm import claims as C

    assert C._route("f3.v3", '{"target": "question", "variant": "v3"}', "transfer") == "f3.v3[transfer]"
    assert C._route("f3.v3", '{"target": "averaged"}', "adaptive") == "f3.v3[target=averaged][adaptive]"
    idx = list(range(30))
    frames = {}
    for seed in (0, 1, 2):
        name = study_name("qformer8", seed)
        attacked = pd.Series([0.2] * 30, index=idx)
        frames[(name, "identity.none[adaptive]")] = (pd.DataFrame({"lvlm_pgd.question 8/255": attacked}), {"lvlm_pgd.question 8/255": 3})
        frames[(name, "f3.v3[transfer]")] = (pd.DataFrame({"lvlm_pgd.question 8/255": attacked + 0.3}), {"lvlm_pgd.question 8/255": 3})
    monkeypatch.setattr(C, "metric_frames", lambda store, metric: frames)
    (claim,) = C.f3_claims(None)
    assert claim.where == "projector2d/qformer8 f3.v3[transfer]" and claim.training_seeds == 3
    assert claim.delta == pytest.approx(0.3) and claim.verdict == "finding: F3 recovers"
