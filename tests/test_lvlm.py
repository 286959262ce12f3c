"""Vision-language victims (BLIP-2, InstructBLIP, LLaVA, CLIP zero-shot), VQA scoring and the LVLM attacks."""
import numpy as np
import pytest
import torch

import robustbench_med as rbm
from robustbench_med.data.phantom import ANSWERS, QUESTIONS
from robustbench_med.threat import check_budget
from robustbench_med.training import TrainRecipe, train_victim
from robustbench_med.victims.lvlm import train as lvlm_train
from robustbench_med.victims.lvlm.models import IGNORE, pool_question_ids
from robustbench_med.weights import read_sidecar
from robustbench_med.vqa import exact_match, normalize_answer, official_vqa_accuracy, soft_vqa_accuracy

FAMILIES = ("blip2", "instructblip", "llava")
ATTACKS = ("lvlm_pgd.question", "qava.projector", "qava.hidden", "qava.lm", "projector.whitebox", "projector.projector_only", "projector.transfer")
EPS = 8 / 255


@pytest.fixture(scope="module")
def phantom():
    ds = rbm.create_dataset("phantom.ct", split="test", n=12)
    return ds.images(), ds.targets("vqa")


@pytest.fixture(scope="module", params=FAMILIES)
def random_victim(request):
    torch.manual_seed(0)
    return rbm.create_victim(f"{request.param}.tiny", weights=None)


@pytest.fixture(scope="module")
def trained(trained_lvlm):
    """The registered tiny BLIP-2 trained by its recipe, and test images labelled with its own answers (clean
    accuracy 1, so any drop is the attack's)."""
    victim = trained_lvlm("blip2")
    ds = rbm.create_dataset("phantom.ct", split="test", n=16)
    x = ds.images()
    texts, _ = victim.generate_answers(x, list(range(len(QUESTIONS))))
    own = torch.tensor([[ANSWERS.index(t) if t in ANSWERS else IGNORE for t in row] for row in texts])
    keep = (own >= 0).all(1)
    return victim, x[keep], own[keep]


@pytest.fixture(scope="module")
def claim_data():
    """The "phantom VQA 48+6" slice the claim tests score on (48 test images × 6 unseen evaluation questions)."""
    ds = rbm.create_dataset("phantom.ct", split="test", n=48)
    return ds.images(), ds.targets("vqa")


# ------------------------------------------------------------------------------------------------- scoring
def test_answer_normalisation_and_vqa_accuracies():
    assert normalize_answer("  The Liver. ") == "liver"
    assert normalize_answer("Two") == "2" and normalize_answer("1,000") == "1000" and normalize_answer("3.5") == "3.5"
    assert normalize_answer("a tumour!") == "tumour" and normalize_answer("none") == "none"
    assert exact_match("Yes.", ["no", "yes"]) == 1.0 and exact_match("cyst", "tumour") == 0.0
    assert soft_vqa_accuracy("yes", ["yes", "yes"] + ["no"] * 8) == pytest.approx(2 / 3)
    assert soft_vqa_accuracy("yes", ["yes"] * 4 + ["no"] * 6) == 1.0
    assert official_vqa_accuracy("yes", ["yes"] * 3 + ["no"] * 7) == pytest.approx(0.9)
    with pytest.raises(rbm.ConfigError):
        soft_vqa_accuracy("yes", [])


# ------------------------------------------------------------------------------------------------ victims
def test_registry_cards_and_checkpoint_factories():
    names = rbm.list_victims("*.tiny*")
    for fam in FAMILIES:
        assert {f"{fam}.tiny", f"{fam}.tiny_s1"} <= set(names)
        with pytest.raises(rbm.ConfigError, match="path="):
            rbm.create_victim(f"{fam}.hf", weights=None)
    assert "clip_zs.tiny" in rbm.list_victims()


def test_pixel_gradients_are_nonzero(random_victim, phantom):
    x, y = phantom[0][:2].clone().requires_grad_(True), phantom[1][:2]
    loss = random_victim.objective(x, y)
    assert loss.shape == (2,) and torch.isfinite(loss).all()
    loss.sum().backward()
    assert (x.grad.flatten(1).abs().sum(1) > 0).all()
    x2 = phantom[0][:2].clone().requires_grad_(True)
    feats = random_victim.projector_features(x2, [3, 9])
    assert feats.shape[:3] == (2, 2, random_victim.n_visual_tokens)
    feats.square().sum().backward()
    assert (x2.grad.flatten(1).abs().sum(1) > 0).all()


def test_victim_matches_transformers_forward_through_processor(random_victim, phantom):
    v = random_victim
    q = 7
    x = phantom[0][:2]
    images = [np.repeat((x[i, 0] * 255).round().byte().numpy()[..., None], 3, -1) for i in range(2)]
    prompt = v.template.render(QUESTIONS[q].text)
    batch = v.processor(images=images, text=[prompt, prompt], return_tensors="pt")
    with torch.no_grad():
        ref = v.model(**batch).logits[:, -1]
        mine = v.first_token_logits(torch.stack([torch.as_tensor(im[..., :1]).permute(2, 0, 1) / 255.0 for im in images]),
                                    question_ids=torch.tensor([q, q]))
    assert batch["input_ids"].shape[1] == v._prompt_mask[q].sum()
    assert torch.allclose(ref, mine, atol=1e-4)


def test_save_pretrained_round_trip_from_local_directory(random_victim, phantom, tmp_path):
    fam = random_victim.family
    random_victim.save_pretrained(str(tmp_path))
    assert (tmp_path / "tokenizer.json").exists() and (tmp_path / "model.safetensors").exists()
    loaded = rbm.create_victim(f"{fam}.hf", weights=None, path=str(tmp_path), max_new_tokens=3)
    x, y = phantom
    assert loaded.processor.tokenizer("Is there a lesion?").input_ids == random_victim.processor.tokenizer("Is there a lesion?").input_ids
    assert torch.equal(loaded._tf_ids, random_victim._tf_ids)
    with torch.no_grad():
        assert torch.allclose(loaded.objective(x[:3], y[:3]), random_victim.objective(x[:3], y[:3]), atol=1e-5)
        assert torch.equal(loaded.evaluate(x[:3], y[:3])["vqa_accuracy"], random_victim.evaluate(x[:3], y[:3])["vqa_accuracy"])


def test_evaluation_questions_protocol(random_victim, phantom):
    x, y = phantom
    q = random_victim.evaluation_questions(y)
    unseen = set(pool_question_ids("unseen"))
    assert q.shape == (len(y), 6) and set(q.flatten().tolist()) <= unseen
    assert all(len(set(row)) == 6 and len({QUESTIONS[i].qtype for i in row}) == 6 for row in q.tolist())
    assert torch.equal(q, random_victim.evaluation_questions(y.clone()))  # depends on the answers, never on pixels
    with pytest.raises(rbm.InputContractError):
        random_victim.evaluate(x[:2], y[:2, :5])
    scores = random_victim.evaluate(x[:3], y[:3])
    assert list(scores)[0] == "vqa_accuracy" and all(((s >= 0) & (s <= 1)).all() for s in scores.values())


def test_objective_respects_the_allowed_questions(random_victim, phantom):
    x, y = phantom[0][:2], phantom[1][:2]
    only = torch.full_like(y, IGNORE)
    only[:, 4] = y[:, 4]
    with torch.no_grad():
        assert torch.allclose(random_victim.objective(x, only), random_victim.lm_loss(x, y, torch.tensor([4, 4])), atol=1e-6)
        assert torch.equal(random_victim.objective(x, torch.full_like(y, IGNORE)), torch.zeros(2))


# ------------------------------------------------------------------------------------------------ attacks
@pytest.mark.parametrize("name", ATTACKS)
def test_attacks_respect_budget_range_and_seed(name, phantom):
    torch.manual_seed(0)
    victim = rbm.create_victim("instructblip.tiny", weights=None)
    kw = {"surrogate": rbm.create_victim("instructblip.tiny", weights=None)} if name == "projector.transfer" else {}
    x, y = phantom[0][:3], phantom[1][:3]
    attack = rbm.create_attack(name, eps=EPS, steps=2, **kw)
    x_adv = attack(victim, x, y)
    report = check_budget(x, x_adv, "Linf", EPS)
    assert report.valid, report.reason()
    assert not torch.equal(x_adv, x)
    assert torch.equal(x_adv, attack(victim, x, y))
    assert not torch.equal(x_adv, attack(victim, x, y, seed=1))


def test_qava_never_sees_evaluation_questions(phantom, monkeypatch):
    torch.manual_seed(0)
    victim = rbm.create_victim("instructblip.tiny", weights=None)
    x, y = phantom[0][:4], phantom[1][:4]
    evaluation = victim.evaluation_questions(y)
    seen_targets, seen_questions = [], []
    objective, features, states = victim.objective, victim.visual_features, victim.question_states
    monkeypatch.setattr(victim, "objective", lambda z, t: seen_targets.append(t) or objective(z, t))
    monkeypatch.setattr(victim, "visual_features", lambda z, q=None, layer="projector": seen_questions.append(q) or features(z, q, layer))
    monkeypatch.setattr(victim, "question_states", lambda z, q: seen_questions.append(q) or states(z, q))
    for name in ("qava.lm", "qava.projector", "qava.hidden"):
        attack = rbm.create_attack(name, eps=EPS, steps=2, n_questions=5)
        attack(victim, x, y)
        assert attack.last_questions.shape == (4, 5)
        assert set(attack.last_questions.flatten().tolist()) <= set(pool_question_ids("seen"))
    assert seen_targets and seen_questions
    for t in seen_targets:
        assert (t.gather(1, evaluation) == IGNORE).all()
    for q in seen_questions:
        assert q is not None and not (q[:, :, None] == evaluation[:, None, :]).any()
    with pytest.raises(rbm.ConfigError, match="overlaps"):
        rbm.create_attack("qava.projector", eps=EPS, steps=1, pool="unseen")(victim, x, y)


@pytest.mark.parametrize("family", FAMILIES)
def test_trained_tiny_lvlms_beat_the_majority_answer(family, trained_lvlm):
    """The issue's bar: clean VQA accuracy clearly above the majority-answer baseline (both in the sidecar)."""
    side = read_sidecar(trained_lvlm(family).card.weights_file)
    assert side["val_vqa_accuracy"] > side["val_majority_accuracy"] + 0.15, side


def test_attacks_lower_the_accuracy_of_a_trained_victim(trained):
    victim, x, y = trained
    assert len(x) >= 4
    clean = victim.score(x, y).mean()
    assert clean == 1.0
    for name in ("lvlm_pgd.question", "qava.hidden", "projector.whitebox"):
        x_adv = rbm.create_attack(name, eps=16 / 255, steps=10)(victim, x, y)
        assert check_budget(x, x_adv, "Linf", 16 / 255).valid
        assert victim.score(x_adv, y).mean() < clean - 0.1, name


def test_claim_qava_unseen_as_strong_as_known_question_pgd(trained_lvlm, claim_data):
    """QAVA (never sees the evaluation questions) lowers accuracy on them about as much as question-specific PGD
    lowers it on its own question (first half of the #4 claim; on the phantom the second half, QAVA beating the
    question-specific attack transferred to the other questions, does not hold: see victims/lvlm/claims.py)."""
    victim, (x, y) = trained_lvlm("blip2"), claim_data
    eps = 4 / 255
    clean = victim.evaluate(x, y)["vqa_accuracy"].mean()
    own = victim.evaluate(rbm.create_attack("lvlm_pgd.question", eps=eps, steps=20)(victim, x, y), y)["vqa_accuracy_first"].mean()
    qava = victim.evaluate(rbm.create_attack("qava.lm", eps=eps, steps=20, n_questions=8)(victim, x, y), y)["vqa_accuracy"].mean()
    assert own < clean - 0.25 and qava < clean - 0.25
    assert qava <= own + 0.1


def test_claim_projector_only_hurts_compressed_projectors_more(trained_lvlm, claim_data):
    """At equal budget the projector-only attack costs BLIP-2 and InstructBLIP (Q-Former: compressed) more accuracy
    than LLaVA (MLP: uncompressed) — the #4 claim, measured on the trained tiny models."""
    x, y = claim_data
    drop = {}
    for family in FAMILIES:
        victim = trained_lvlm(family)
        x_adv = rbm.create_attack("projector.projector_only", eps=4 / 255, steps=20)(victim, x, y)
        drop[family] = float(victim.evaluate(x, y)["vqa_accuracy"].mean() - victim.evaluate(x_adv, y)["vqa_accuracy"].mean())
    assert drop["blip2"] > drop["llava"] + 0.05 and drop["instructblip"] > drop["llava"] + 0.05, drop


def test_first_token_autoattack(trained):
    victim, x, y = trained
    x, y = x[:4], y[:4]
    attack = rbm.create_attack("lvlm_autoattack.first_token", eps=16 / 255, n_queries=50)
    x_adv = attack(victim, x, y)
    assert check_budget(x, x_adv, "Linf", 16 / 255).valid
    assert victim.evaluate(x_adv, y)["first_token_accuracy"].mean() < victim.evaluate(x, y)["first_token_accuracy"].mean()


def test_first_token_view_finds_each_inputs_question(random_victim, phantom):
    """torchattacks passes sub-batches: the view must score every row on the question of the image it came from."""
    from robustbench_med.attacks.lvlm_pgd import FirstTokenView

    x = phantom[0][:4]
    q = torch.tensor([0, 7, 13, 20])
    view = FirstTokenView(random_victim, lambda z: z, x, q)
    sub = torch.tensor([2, 0])
    x_sub = (x[sub] + 8 / 255 * torch.randn(x[sub].shape, generator=torch.Generator().manual_seed(0)).sign()).clamp(0, 1)
    with torch.no_grad():
        assert torch.allclose(view(x_sub), random_victim.first_token_logits(x_sub, None, q[sub]), atol=1e-6)


def test_registry_trainer_saves_weights_and_pretrained_directory(monkeypatch, tmp_path):
    from robustbench_med.registry import VICTIMS

    monkeypatch.setenv("ROBUSTBENCH_MED_HOME", str(tmp_path))
    monkeypatch.setitem(VICTIMS.get("llava.tiny").meta, "recipe",
                        TrainRecipe(target_field="vqa", n_train=32, n_val=8, epochs=1, batch_size=16, lr=1e-3))
    monkeypatch.setattr(lvlm_train, "VISION_STEPS", 2)
    path = train_victim("llava.tiny", progress=False)
    side = read_sidecar(path)
    assert {"val_vqa_accuracy", "val_majority_accuracy", "train_seconds"} <= set(side)
    a = rbm.create_victim("llava.tiny")
    b = rbm.create_victim("llava.hf", weights=None, path=str(lvlm_train.hf_dir(path)))
    x = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(a.first_token_logits(x, question_ids=[0, 9]), b.first_token_logits(x, question_ids=[0, 9]), atol=1e-5)


# --------------------------------------------------------------------------------------------- CLIP zero-shot
def test_clip_zero_shot_victim(phantom):
    from robustbench_med.victims.lvlm.clip_zeroshot import CLASS_PROMPTS, captions_for, contrastive_loss

    torch.manual_seed(0)
    victim = rbm.create_victim("clip_zs.tiny", weights=None)
    x = phantom[0][:3].clone().requires_grad_(True)
    logits = victim(x)
    assert logits.shape == (3, 3)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2])).backward()
    assert (x.grad.flatten(1).abs().sum(1) > 0).all()
    emb = victim.class_embeddings()
    assert emb.shape[0] == 3 and torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    ds = rbm.create_dataset("phantom.ct", split="test", n=12)
    caps = [captions_for(ds.targets("vqa")[i], ds.targets("findings")[i], i) for i in range(12)]
    prompts = {p.lower() for ps in CLASS_PROMPTS.values() for p in ps}
    assert not prompts & {c.lower() for c in caps}  # zero-shot prompts are never training captions
    img = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    same = torch.eye(4, dtype=torch.bool)
    assert contrastive_loss(img, img, same, torch.tensor(10.0)) < contrastive_loss(img, img.roll(1, 0), same, torch.tensor(10.0))


def test_clip_zero_shot_with_the_real_minilm_text_tower(phantom):
    """``clip_zs.minilm``: open_clip's CustomTextCLIP with the pretrained all-MiniLM-L6-v2 shipped by a package as its
    frozen text tower (the real weights, not a random init), a trainable projection, gradients reaching the pixels."""
    from pathlib import Path

    from safetensors.torch import load_file

    from robustbench_med.victims.lvlm.clip_zeroshot import minilm_path

    victim = rbm.create_victim("clip_zs.minilm", weights=None)
    text = victim.clip.text
    shipped = load_file(str(Path(minilm_path()) / "model.safetensors"))
    key = next(k for k in shipped if k.endswith("word_embeddings.weight"))
    assert torch.equal(text.transformer.embeddings.word_embeddings.weight, shipped[key])
    assert not any(p.requires_grad for p in text.transformer.parameters())
    assert all(p.requires_grad for p in text.proj.parameters())
    x = phantom[0][:2].clone().requires_grad_(True)
    logits = victim(x)
    assert logits.shape == (2, 3)
    logits.logsumexp(1).sum().backward()
    assert (x.grad.flatten(1).abs().sum(1) > 0).all()


def test_claims_read_off_a_grid_store(tmp_path):
    """``claims --store``: per victim and eps, question PGD on its own / the other questions, QAVA, projector-only."""
    from robustbench_med.grid import parse_grid
    from robustbench_med.runner import run_grid
    from robustbench_med.victims.lvlm.claims import claims_from_store

    attacks = [{"name": n, "params": {"eps": "8/255", "steps": 1}} for n in ("lvlm_pgd.question", "qava.lm", "projector.projector_only")]
    attacks.append({"name": "qava.hidden", "params": {"eps": "8/255", "steps": 1, "n_questions": 2, "pool": "unrelated"}})
    grid = parse_grid({"name": "claims-small", "n_examples": 3, "batch_size": 3, "attacks": attacks,
                       "victims": [{"name": "llava.tiny", "weights": None}]})
    rows = claims_from_store(run_grid(grid, tmp_path, progress=False))
    assert len(rows) == 1 and rows[0]["victim"] == "llava.tiny" and rows[0]["eps"] == 8.0
    assert {"clean", "question_own", "question_others", "qava_lm", "qava_hidden_unrelated", "projector_only_drop"} <= set(rows[0])
    assert all(0 <= rows[0][k] <= 1 for k in ("clean", "question_own", "question_others", "qava_lm"))


# -------------------------------------------------------------------------------- distinct objectives
def _objectives(victim, x, y, monkeypatch):
    """Each registered LVLM attack's objective on ``victim``, as a function of the image: the loss an LVLMAttack hands
    its PGD (captured), and ``pgd.linf``'s EOT objective. Attacks that refuse the victim are left out."""
    from robustbench_med.attacks.lvlm_pgd import LVLMAttack
    from robustbench_med.errors import TaskNotSupportedError

    captured = {}
    monkeypatch.setattr(LVLMAttack, "run_pgd", lambda self, loss_fn, x0, eps: captured.setdefault("fn", loss_fn) is not None and x0)
    out = {}
    for name in rbm.list_attacks():
        if name.startswith(("corruption.", "modality.dropout", "noise.", "transfer.", "projector.transfer", "lvlm_autoattack.")):
            continue  # no objective on the victim (never queried), or AutoAttack's own losses on first-token logits
        attack = rbm.create_attack(name, eps=EPS, steps=1)
        if "vqa" not in attack.tasks:
            continue
        try:
            attack.check_task(victim)
        except TaskNotSupportedError:
            continue
        if isinstance(attack, LVLMAttack):
            captured.clear()
            attack(victim, x, y, seed=0)
            out[name] = captured["fn"]
        else:
            out[name] = lambda z, a=attack: a.objective(victim, z, y)
        out[name].norm = attack.threat.norm
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_no_two_attacks_optimise_the_same_objective(family, phantom, monkeypatch):
    """Every pair of registered attacks with the same threat norm differs in its gradient at a common random point near
    the image (an attack that silently optimised another's objective, as qava.projector did on BLIP-2 and LLaVA, fails
    here; pgd.linf and pgd.l2 share the LM loss but not the threat model)."""
    torch.manual_seed(0)
    victim = rbm.create_victim(f"{family}.tiny", weights=None)
    x, y = phantom[0][:2], phantom[1][:2]
    objectives = _objectives(victim, x, y, monkeypatch)
    assert {"qava.hidden", "qava.lm", "projector.projector_only"} <= set(objectives)
    assert ("qava.projector" in objectives) == (family == "instructblip")
    z = (x + (torch.rand(x.shape, generator=torch.Generator().manual_seed(3)) * 2 - 1) * EPS).clamp(0, 1)
    grads = {}
    for name, fn in objectives.items():
        zz = z.clone().requires_grad_(True)
        grads[name] = torch.autograd.grad(fn(zz).sum(), zz)[0].flatten()
    names = sorted(grads)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if objectives[a].norm != objectives[b].norm:
                continue
            cos = torch.nn.functional.cosine_similarity(grads[a], grads[b], dim=0)
            assert cos < 0.999, f"{a} and {b} optimise the same objective on {family} (gradient cosine {cos:.4f})"


def test_qava_hidden_states_depend_on_image_and_question(phantom):
    torch.manual_seed(0)
    victim = rbm.create_victim("blip2.tiny", weights=None)
    x = phantom[0][:2]
    states, weights = victim.question_states(x, torch.tensor([[0, 5], [0, 5]]))
    assert states.shape[:2] == (2, 2) and weights.shape == states.shape[:3]
    assert ((weights == 0) | (weights == 1)).all() and (weights.sum(-1) > 0).all()
    on = weights[0, 0].bool() & weights[0, 1].bool()
    assert not torch.allclose(states[0, 0][on], states[0, 1][on])  # another question, another state
    assert not torch.allclose(states[0, 0][on], states[1, 0][on])  # another image, another state


def test_unrelated_pool_is_of_other_types_and_answerless(phantom):
    """The 'unrelated' pool: probe questions about the organs (no evaluated lesion type), every word known to the
    tiny LVLMs, numbered after the bank, usable by the feature-loss QAVA variants and refused where answers are needed."""
    from robustbench_med.data.phantom import QUESTIONS, UNRELATED_QUESTIONS
    from robustbench_med.victims.lvlm.tokenizer import build_word_tokenizer

    tok = build_word_tokenizer()
    assert all(tok.unk_token_id not in tok(q).input_ids for q in UNRELATED_QUESTIONS)
    assert not {q.lower() for q in UNRELATED_QUESTIONS} & {q.text.lower() for q in QUESTIONS}
    assert all("lesion" not in q.lower() for q in UNRELATED_QUESTIONS)  # every evaluated type asks about the lesion
    ids = pool_question_ids("unrelated")
    assert ids == list(range(len(QUESTIONS), len(QUESTIONS) + len(UNRELATED_QUESTIONS)))
    with pytest.raises(rbm.ConfigError, match="answers"):
        rbm.create_attack("qava.lm", pool="unrelated")
    with pytest.raises(rbm.ConfigError, match="eval_pool"):
        rbm.create_victim("blip2.tiny", weights=None, eval_pool="unrelated")
    torch.manual_seed(0)
    victim = rbm.create_victim("instructblip.tiny", weights=None)
    x, y = phantom[0][:2], phantom[1][:2]
    attack = rbm.create_attack("qava.hidden", eps=EPS, steps=2, n_questions=4, pool="unrelated")
    x_adv = attack(victim, x, y)
    assert set(attack.last_questions.flatten().tolist()) <= set(ids) and check_budget(x, x_adv, "Linf", EPS).valid
    with pytest.raises(rbm.ConfigError, match="no reference answers"):
        victim.lm_loss(x, y, torch.tensor([[ids[0]], [ids[1]]]))
