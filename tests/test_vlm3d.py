"""Tiny 3D vision-language models (``vlm3d.*``, issue #20 item 4) and the volume phantom's VQA column.

Registered victims are built at random init (nothing is trained here); learning and attacks are checked on a tiny
configuration trained by the recipe's stages for a few seconds on synthetic volumes whose answers depend on a bright
cube.
"""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy import ndimage

import robustbench_med as rbm
from robustbench_med.data import volumes as V
from robustbench_med.data.phantom import ANSWERS
from robustbench_med.errors import ConfigError, InputContractError
from robustbench_med.registry import VICTIMS
from robustbench_med.threat import check_budget
from robustbench_med.victims import vlm3d as M

NAMES = ("vlm3d.mlp", "vlm3d.mlp_s1", "vlm3d.mlp_s2", "vlm3d.perceiver", "vlm3d.perceiver_s1", "vlm3d.perceiver_s2")
A = {a: i for i, a in enumerate(ANSWERS)}
TINY = dict(input_size=(1, 8, 16, 16), patch=(4, 4, 4), width=32, heads=2, encoder_layers=1, mlp_hidden=64, queries=4,
            perceiver_layers=1, lm_width=32, lm_layers=1, lm_heads=2, lm_inner=64)


def _tiny(projector: str) -> M.VLM3DVictim:
    torch.manual_seed(0)
    cfg = M.VLM3DConfig(projector=projector, **TINY)
    return M.VLM3DVictim(cfg, M._card(f"tiny.{projector}", cfg, "test"))


def _cube_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy 1×8×16×16 volumes, half with a bright 3³ cube; answers: a 'lesion' (1, upper, liver, small, tumour) or none."""
    g = torch.Generator().manual_seed(seed)
    x = (0.3 + 0.05 * torch.randn(n, 1, 8, 16, 16, generator=g)).clamp(0, 1)
    present = torch.arange(n) % 2 == 0
    for i in np.flatnonzero(present.numpy()):
        z, yy, xx = (int(torch.randint(0, s - 2, (1,), generator=g)) for s in (8, 16, 16))
        x[i, 0, z:z + 3, yy:yy + 3, xx:xx + 3] = 0.8
    yes = {"presence": "yes", "count": "1", "location": "upper", "organ": "liver", "size": "small", "type": "tumour"}
    no = {"presence": "no", "count": "0", "location": "none", "organ": "none", "size": "none", "type": "none"}
    rows = [[A[(yes if p else no)[q.qtype]] for q in V.VOLUME_QUESTIONS] for p in present.tolist()]
    return x, torch.tensor(rows)


@pytest.fixture(scope="module")
def trained_tiny():
    """Tiny MLP- and perceiver-projector models trained by the recipe's stages on 64 synthetic volumes (the cube is the
    "lesion"): encoder pre-training (40 + 20 steps), projector alignment (40), projector + LM (80); ~6 s."""
    from dataclasses import replace

    x, y = _cube_data(64, 0)
    z = (x - 0.25) / 0.25
    mask = torch.where(x[:, 0] > 0.6, 5, 1)
    present = (mask == 5).flatten(1).any(1).long()
    out = {}
    for projector in M.PROJECTORS:
        victim = _tiny(projector)
        M.pretrain_encoder(victim.encoder, z, mask, present * 2, present,
                           replace(M.EncoderRecipe(), detector_steps=40, token_steps=20, batch_size=16, least_voxels=4, warmup=5))
        tokens = M.encode_all(victim.encoder, z)
        victim.encoder.requires_grad_(False)
        gen = torch.Generator().manual_seed(0)
        M.align_projector(victim, tokens, y, replace(M.VLM3DRecipe(), batch_size=16, align_steps=40, lr=3e-3), gen)
        victim.train()
        opt = torch.optim.AdamW([p for p in victim.parameters() if p.requires_grad], lr=3e-3)
        for _ in range(80):
            idx = torch.randperm(64, generator=gen)[:16]
            loss = victim.answer_loss_from_tokens(victim.projector(tokens[idx]), y[idx], torch.arange(12).expand(16, -1))
            opt.zero_grad()
            loss.mean().backward()
            opt.step()
        victim.encoder.requires_grad_(True)
        out[projector] = victim.eval()
    return out


# ----------------------------------------------------------------------------------------------- the VQA column
def test_volume_vqa_column_agrees_with_mask_and_labels():
    cols = V.generate("train", 80)
    assert len(V.VOLUME_QUESTIONS) == 12 and {q.qtype for q in V.VOLUME_QUESTIONS} == {
        "presence", "count", "location", "organ", "size", "type"}
    sizes = {"large": [], "small": []}
    for mask, label, kind, n, vqa in zip(cols["mask"], cols["label"], cols["lesion_type"], cols["n_lesions"], cols["vqa"]):
        ans = {q.qtype: ANSWERS[a] for q, a in zip(V.VOLUME_QUESTIONS, vqa)}
        assert len(vqa) == 12 and all(ANSWERS[a] == ans[q.qtype] for q, a in zip(V.VOLUME_QUESTIONS, vqa))
        assert ans["presence"] == ("yes" if label else "no") and ans["count"] == str(n)
        assert ans["type"] == ("none", "cyst", "tumour")[kind]
        if not n:
            assert ans["location"] == ans["organ"] == ans["size"] == "none"
            continue
        regions, count = ndimage.label(mask == 5, structure=np.ones((3, 3, 3)))
        sizes_vox = ndimage.sum(np.ones_like(regions), regions, range(1, count + 1))
        main = regions == 1 + int(np.argmax(sizes_vox))
        assert ans["location"] == ("upper" if np.nonzero(main)[0].mean() < (mask.shape[0] - 1) / 2 else "lower")
        ring = mask[ndimage.binary_dilation(main, structure=np.ones((3, 3, 3))) & ~main]
        assert ans["organ"] == ("liver" if (ring == 2).sum() > (ring == 3).sum() else "kidney")
        if ans["organ"] == "kidney":
            assert ans["size"] == "small"
        else:
            sizes[ans["size"]].append(main.sum())
    assert len(sizes["large"]) >= 5 and len(sizes["small"]) >= 5
    assert np.mean(sizes["large"]) > 1.5 * np.mean(sizes["small"])


def test_vqa_is_an_extra_target_outside_the_fingerprint(tmp_path):
    ds = rbm.create_dataset("phantom.volumes", split="val", n=6, cache_dir=tmp_path)
    assert ds.target_fields == ("mask", "label", "lesion_type", "n_lesions", "landmarks")
    assert ds.extra_target_fields == ("vqa",)
    y = ds.targets("vqa")
    assert y.shape == (6, 12) and y.dtype == torch.int64
    assert y.tolist() == V.generate("val", 6)["vqa"]
    sub = ds.subset([3, 0])
    assert sub.targets("vqa").tolist() == y[[3, 0]].tolist()
    without = type(ds)(ds.hf.remove_columns(["vqa"]), ds.name, ds.split, ds.target_fields, ds.attribute_names)
    assert without.fingerprint() == ds.fingerprint()
    with pytest.raises(ConfigError, match="vqa"):
        without.targets("vqa")


# ------------------------------------------------------------------------------------------------ the victims
def test_registered_victims_cards_recipes_and_token_counts():
    x = torch.rand(2, 1, 32, 48, 48, generator=torch.Generator().manual_seed(0))
    for name in NAMES:
        entry = VICTIMS.get(name)
        recipe = entry.meta["recipe"]
        assert recipe.dataset == "phantom.volumes" and recipe.target_field == "vqa"
        assert entry.meta["trainer"] is M.registry_trainer and entry.meta["trainer_version"] == M.TRAINER_VERSION
        assert recipe.seed == recipe.encoder.seed == (int(name[-1]) if "_s" in name else 0)
        victim = rbm.create_victim(name, weights=None)
        card = victim.card
        compressed = "perceiver" in name
        assert card.task == "vqa" and card.input_size == (1, 32, 48, 48) and card.classes == ANSWERS
        assert card.extra["projector"] == ("compressed" if compressed else "uncompressed")
        assert card.extra["visual_tokens"] == (8 if compressed else 144) == victim.n_visual_tokens
        assert card.extra["encoder_tokens"] == 144 and card.params == sum(p.numel() for p in victim.parameters())
        feats = victim.features(x, ["encoder", "projector"])
        assert feats["encoder"].shape == (2, 144, 64)
        assert victim(x).shape == feats["projector"].shape == (2, card.extra["visual_tokens"], 64)
    lm = {n: sum(p.numel() for p in rbm.create_victim(n, weights=None).lm.parameters()) for n in ("vlm3d.mlp", "vlm3d.perceiver")}
    assert lm["vlm3d.mlp"] == lm["vlm3d.perceiver"], "one LM configuration for both projectors"


@pytest.mark.parametrize("projector", M.PROJECTORS)
def test_objective_is_per_sample_differentiable_and_respects_ignored_questions(projector):
    victim = _tiny(projector).eval()
    x, y = _cube_data(4, 1)
    x = x.requires_grad_(True)
    loss = victim.objective(x, y)
    assert loss.shape == (4,) and torch.isfinite(loss).all() and (loss > 0).all()
    grad = torch.autograd.grad(loss.sum(), x)[0]
    assert grad.shape == x.shape and torch.isfinite(grad).all() and (grad.flatten(1).abs().sum(1) > 0).all()
    only = torch.full_like(y, M.IGNORE)
    only[:, 3] = y[:, 3]
    single = victim.answer_loss(x, y, torch.full((4, 1), 3))
    assert torch.allclose(victim.objective(x, only), single, atol=1e-6)
    assert torch.equal(victim.objective(x, torch.full_like(y, M.IGNORE)), torch.zeros(4))
    with pytest.raises(InputContractError, match=r"\[B, 12\]"):
        victim.objective(x, y[:, :6])
    with pytest.raises(InputContractError, match="NCDHW"):
        victim.objective(torch.rand(2, 1, 16, 16), y[:2])


@pytest.mark.parametrize("projector", M.PROJECTORS)
def test_cached_prefix_equals_one_pass_over_the_whole_sequence(projector):
    """Questions continue a cached ``<s>`` + visual-token prefix; that must equal running the full sequence."""
    victim = _tiny(projector).eval()
    x, y = _cube_data(3, 2)
    q = torch.tensor([[0, 5], [11, 2], [7, 7]])
    with torch.no_grad():
        loss = victim.answer_loss(x, y, q)
        emb, vis = victim.lm.get_input_embeddings(), victim.visual_tokens(x)
        ref = []
        for b in range(3):
            per_q = []
            for qid in q[b].tolist():
                words = victim._question_ids[qid][victim._question_mask[qid].bool()]
                answer = victim._answer_ids[y[b, qid]]
                ids = torch.cat([words, answer.view(1)])
                seq = torch.cat([emb(torch.tensor([victim.bos_id])), vis[b], emb(ids)])[None]
                logits = victim.lm(inputs_embeds=seq).logits[0, -2:]
                per_q.append(torch.nn.functional.cross_entropy(logits, torch.stack([answer, torch.tensor(victim.eos_id)])))
            ref.append(torch.stack(per_q).mean())
    assert torch.allclose(loss, torch.stack(ref), atol=1e-5)


def test_a_tiny_model_learns_above_the_answer_prior_and_evaluate_reports_every_type(trained_tiny):
    x, y = _cube_data(32, 5)  # held out
    prior = M.prior_accuracy(_cube_data(64, 0)[1], y)
    assert abs(prior - 0.5) < 1e-6
    for projector, victim in trained_tiny.items():
        out = victim.evaluate(x, y)
        assert list(out)[0] == "vqa_accuracy" and set(out) == {"vqa_accuracy", "first_token_accuracy"} | {
            f"{t}_accuracy" for t in ("presence", "count", "location", "organ", "size", "type")}
        assert all(v.shape == (32,) and ((v >= 0) & (v <= 1)).all() for v in out.values())
        acc = float(out["vqa_accuracy"].mean())
        assert acc >= prior + 0.35, (projector, acc)
        texts, _ = victim.generate_answers(x[:2], [0, 2])
        assert texts[0][0] in ANSWERS and len(texts) == 2 and len(texts[0]) == 2
        assert torch.equal(victim.score(x, y), out["vqa_accuracy"])


def test_pgd_lowers_the_score_within_budget_and_the_harness_reads_the_vqa_target(trained_tiny):
    from robustbench_med.attack import check_targets
    from robustbench_med.runner import evaluate_batch, target_field_for

    x, y = _cube_data(16, 6)
    eps = 64 / 255  # the cube's contrast is 0.5: smaller budgets leave the tiny models' answers intact
    for projector, victim in trained_tiny.items():
        clean = victim.score(x, y)
        x_adv = rbm.create_attack("pgd.linf", eps=eps, steps=10)(victim, x, y)
        assert check_budget(x, x_adv, "Linf", eps).valid
        assert (victim.objective(x_adv, y) > victim.objective(x, y)).float().mean() >= 0.9
        assert float(victim.score(x_adv, y).mean()) < float(clean.mean()) - 0.2, projector
        metrics, pred = evaluate_batch(victim, x, y)
        assert pred is None and torch.equal(next(iter(metrics.values())), clean)
    real = rbm.create_victim("vlm3d.perceiver", weights=None)
    assert target_field_for(SimpleNamespace(name="vlm3d.perceiver", target_field=None), real) == "vqa"
    check_targets(real, torch.zeros(3, 12, dtype=torch.long), 3)


def test_encoder_pretraining_trains_the_detector_only_in_its_own_phase():
    """Phase 1a moves the convolutional detector; phase 1b (token path) must leave it as it was."""
    from dataclasses import replace

    victim = _tiny("perceiver")
    enc = victim.encoder
    x, _ = _cube_data(8, 3)
    z = (x - 0.25) / 0.25
    mask = (x[:, 0] > 0.6).long() * 5  # the cube is the "lesion"
    kind, count = torch.full((8,), 2), (mask.flatten(1) > 0).any(1).long()
    recipe = replace(M.EncoderRecipe(), batch_size=4, warmup=1, least_voxels=4)
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    M.pretrain_encoder(enc, z, mask, kind, count, replace(recipe, detector_steps=0, token_steps=3))
    after = enc.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(("stem.", "detector.")))
    assert not torch.equal(before["pos"], after["pos"]) and all(p.requires_grad for p in enc.parameters())
    M.pretrain_encoder(enc, z, mask, kind, count, replace(recipe, detector_steps=3, token_steps=0))
    assert not torch.equal(before["stem.0.weight"], enc.state_dict()["stem.0.weight"])


def test_bad_configurations_are_refused():
    with pytest.raises(ConfigError, match="projector"):
        M.VLM3DConfig(projector="qformer")
    with pytest.raises(ConfigError, match="multiple"):
        M.VLM3DConfig(input_size=(1, 30, 48, 48))
    cfg = M.VLM3DConfig(projector="mlp", input_size=(1, 64, 64, 64), patch=(4, 4, 4))
    with pytest.raises(ConfigError, match="positions"):
        M.VLM3DVictim(cfg, M._card("big", cfg, ""))
