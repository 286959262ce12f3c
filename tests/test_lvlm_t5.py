"""Encoder-decoder (Flan-T5-style) BLIP-2 / InstructBLIP victims: every path of LVLMVictim against the model's own
``forward`` / ``generate`` (teacher-forced loss, first-token logits, greedy answers, encoder states, cross-attention),
and the properties the attacks rely on (the loss and the states depend on the image and the question)."""
import functools

import numpy as np
import pytest
import torch

import robustbench_med as rbm
from robustbench_med.data.phantom import ANSWERS, QUESTIONS
from robustbench_med.threat import check_budget
from robustbench_med.training import TrainRecipe, train_victim
from robustbench_med.victims.lvlm import train as lvlm_train
from robustbench_med.weights import read_sidecar

FAMILIES = ("blip2", "instructblip")
EPS = 8 / 255


@pytest.fixture(scope="module")
def phantom():
    ds = rbm.create_dataset("phantom.ct", split="test", n=6)
    return ds.images(), ds.targets("vqa")


@pytest.fixture(scope="module", params=FAMILIES)
def t5_victim(request):
    torch.manual_seed(0)
    return rbm.create_victim(f"{request.param}.tiny_t5", weights=None)


@pytest.fixture(scope="module", params=FAMILIES)
def t5_talking(request):
    """A random-init T5 victim whose greedy answers vary: at T5's init the tied LM head maps the decoder's residual
    stream back to its input token (the start token, <pad>), so every greedy answer would be empty; an untied random
    head (std 0.1) makes the decoding non-trivial for the comparison with ``generate``."""
    torch.manual_seed(0)
    v = rbm.create_victim(f"{request.param}.tiny_t5", weights=None)
    head = v.model.language_model.lm_head
    head.weight = torch.nn.Parameter(torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(5)) * 0.1)
    return v


def _images(x):
    return [np.repeat((x[i, 0] * 255).round().byte().numpy()[..., None], 3, -1) for i in range(len(x))]


def _as_x(images):
    """The [0, 1] batch the processor's uint8 images stand for (so victim and processor see the same pixels)."""
    return torch.stack([torch.as_tensor(im[..., :1]).permute(2, 0, 1) / 255.0 for im in images])


def _batch(v, images, q):
    """The processor's own inputs (pixels, image placeholders + prompt ids, Q-Former instruction) for question ``q``."""
    prompt = v.template.render(QUESTIONS[q].text)
    return v.processor(images=images, text=[prompt] * len(images), return_tensors="pt")


# ------------------------------------------------------------------------------------------------ set-up
def test_registry_configs_and_templates():
    from robustbench_med.victims.lvlm.configs import TinyLVLMConfig, build_tiny
    from robustbench_med.victims.lvlm.templates import TEMPLATES
    from robustbench_med.victims.lvlm.tokenizer import build_word_tokenizer

    from robustbench_med.registry import VICTIMS

    names = set(rbm.list_victims("*.tiny_t5*"))
    assert names == {f"{f}.{t}" for f in FAMILIES for t in ("tiny_t5", "tiny_t5_s1")}
    assert {VICTIMS.get(n).meta["recipe"].seed for n in names} == {0, 1}
    assert VICTIMS.get("blip2.tiny_t5").meta["trainer"] is VICTIMS.get("blip2.tiny").meta["trainer"]
    torch.manual_seed(0)
    v = rbm.create_victim("blip2.tiny_t5", weights=None)
    cfg = v.model.config
    assert v.encoder_decoder and not cfg.use_decoder_only_language_model
    assert type(v.language_model).__name__ == "T5ForConditionalGeneration" and cfg.text_config.model_type == "t5"
    assert v.decoder_start_id == cfg.text_config.decoder_start_token_id == v.pad_id == 0
    assert v.card.extra["language_model"].startswith("t5") and v.n_visual_tokens == cfg.num_query_tokens
    assert v.template.prompt == "Question: {question} Short answer:"  # BLIP-2's FlanT5 VQA prompt
    tok = build_word_tokenizer()
    assert all(tok.unk_token_id not in tok(v.template.render(q.text)).input_ids for q in QUESTIONS)
    assert "Short answer" not in TEMPLATES["blip2"].prompt  # the OPT victims keep their prompt (and vocabulary)
    assert not rbm.create_victim("blip2.tiny", weights=None).encoder_decoder
    with pytest.raises(rbm.ConfigError, match="Llama"):
        build_tiny("llava", TinyLVLMConfig(language_model="t5"))
    with pytest.raises(rbm.ConfigError, match="language_model"):
        build_tiny("blip2", TinyLVLMConfig(language_model="bart"))


# --------------------------------------------------------------------------------- equivalence with transformers
def test_teacher_forced_loss_equals_model_forward(t5_victim, phantom):
    """lm_loss = the model's own seq2seq loss with ``labels`` = answer tokens + EOS (T5 shifts them behind the start
    token); per (image, question), and unchanged when questions of other prompt lengths share the batch (padding)."""
    v, tok = t5_victim, t5_victim.processor.tokenizer
    images = _images(phantom[0][:3])
    x, y = _as_x(images), phantom[1][:3]
    qs = [0, 21, 7]  # prompts of different lengths: the batched call pads
    assert len({int(v._prompt_mask[q].sum()) for q in qs}) > 1
    with torch.no_grad():
        batched = v.lm_loss(x, y, torch.tensor(qs))
        for i, q in enumerate(qs):
            batch = _batch(v, images[i:i + 1], q)
            labels = torch.tensor([tok(ANSWERS[int(y[i, q])], add_special_tokens=False).input_ids + [tok.eos_token_id]])
            ref = v.model(**batch, labels=labels).loss
            mine = v.lm_loss(x[i:i + 1], y[i:i + 1], torch.tensor([q]))
            assert torch.allclose(mine, ref, atol=1e-4), (q, mine, ref)
            assert torch.allclose(batched[i], ref, atol=1e-4)


def test_first_token_logits_equal_model_forward(t5_victim, phantom):
    v = t5_victim
    images = _images(phantom[0][:2])
    x = _as_x(images)
    q = 7
    batch = _batch(v, images, q)
    assert batch["input_ids"].shape[1] == v._prompt_mask[q].sum()
    start = torch.full((2, 1), v.model.config.text_config.decoder_start_token_id)
    with torch.no_grad():
        ref = v.model(**batch, decoder_input_ids=start).logits[:, 0]
        mine = v.first_token_logits(x, question_ids=torch.tensor([q, q]))
        mixed = v.first_token_logits(x, question_ids=torch.tensor([q, 30]))  # padded against a longer prompt
    assert torch.allclose(ref, mine, atol=1e-4)
    assert torch.allclose(mixed[0], mine[0], atol=1e-4) and not torch.allclose(mixed[1], mine[1], atol=1e-4)


def test_greedy_answers_equal_model_generate(t5_talking, phantom):
    v = t5_talking
    tok = v.processor.tokenizer
    images = _images(phantom[0][:3])
    x = _as_x(images)
    qs = [0, 21, 7, 33]
    texts, first = v.generate_answers(x, torch.tensor(qs).expand(3, -1))
    seen = set()
    for j, q in enumerate(qs):
        batch = _batch(v, images, q)
        gen = v.model.generate(**batch, max_new_tokens=v.max_new_tokens, do_sample=False, num_beams=1,
                               suppress_tokens=[v.image_token_id])
        assert (gen[:, 0] == v.decoder_start_id).all()  # generate returns the decoder's start token first
        for i in range(3):
            steps = gen[i, 1:].tolist()
            ref = tok.decode(steps[: steps.index(v.eos_id)] if v.eos_id in steps else steps, skip_special_tokens=True)
            assert texts[i][j] == ref, (i, q, texts[i][j], ref)
            assert int(first[i, j]) == steps[0]
            seen.add(ref)
    assert len(seen) > 1 and any(seen)  # the comparison is not between empty answers


def test_question_states_are_the_encoder_states_and_depend_on_image_and_question(t5_victim, phantom):
    v = t5_victim
    images = _images(phantom[0][:2])
    x = _as_x(images)
    with torch.no_grad():
        states, weights = v.question_states(x, torch.tensor([[0, 5], [0, 5]]))
        ref = v.model(**_batch(v, images, 0), decoder_input_ids=torch.zeros(2, 1, dtype=torch.long)).language_model_outputs
    assert states.shape[:2] == (2, 2) and weights.shape == states.shape[:3]
    assert ((weights == 0) | (weights == 1)).all() and (weights.sum(-1) > 0).all()
    s = int(v._prompt_mask[0].sum())  # question 0 unpadded: the last s positions of its (left-padded) rows
    assert torch.allclose(states[:, 0, -s:], ref.encoder_last_hidden_state, atol=1e-4)
    n_text = s - v.n_visual_tokens
    assert torch.equal(weights[0, 0, -s:], torch.tensor([0.0] * v.n_visual_tokens + [1.0] * n_text))
    # the prompts' last tokens ("short answer :") are the same words for every question: their states still differ
    assert not torch.allclose(states[0, 0, -3:], states[0, 1, -3:], atol=1e-4)  # another question, another state
    assert not torch.allclose(states[0, 0, -3:], states[1, 0, -3:], atol=1e-4)  # another image, another state


def test_lm_loss_depends_on_the_image_and_reaches_the_pixels(t5_victim, phantom):
    v = t5_victim
    x, y = phantom[0][:2].clone().requires_grad_(True), phantom[1][:2]
    q = torch.tensor([4, 4])
    loss = v.lm_loss(x, y[[0, 0]], q)  # the same question and answer for both images
    assert torch.isfinite(loss).all() and not torch.allclose(loss[0], loss[1])
    loss.sum().backward()
    assert (x.grad.flatten(1).abs().sum(1) > 0).all()
    other = y[:1].clone()
    other[0, 4] = (other[0, 4] + 1) % len(ANSWERS)
    with torch.no_grad():
        assert not torch.allclose(v.lm_loss(x[:1], other, q[:1]), loss[:1])
        only = torch.full_like(y, -1)
        only[:, 4] = y[:, 4]
        assert torch.allclose(v.objective(x, only), v.lm_loss(x, y, q), atol=1e-6)


def test_lm_pass_gives_the_first_decoder_steps_cross_attention(t5_victim, phantom):
    """lm_pass returns ``attentions`` = the decoder's cross-attentions from its first step (as the model's own forward
    with ``output_attentions``), which F3's ``source='lm'`` reads as [N, layers, heads, visual tokens]."""
    from robustbench_med.defenses.f3 import lm_attention

    v = t5_victim
    images = _images(phantom[0][:2])
    x = _as_x(images)
    rows, qids = torch.tensor([0, 1]), torch.tensor([3, 3])
    with torch.no_grad():
        out, slots = v.lm_pass(x, rows, qids, logits_to_keep=1, output_attentions=True)
        ref = v.model(**_batch(v, images, 3), decoder_input_ids=torch.zeros(2, 1, dtype=torch.long), output_attentions=True)
    assert len(out.attentions) == v.language_model.config.num_decoder_layers
    assert all(a.shape == (2, v.language_model.config.num_heads, 1, slots.shape[1]) for a in out.attentions)
    for mine, theirs in zip(out.attentions, ref.language_model_outputs.cross_attentions):
        assert torch.allclose(mine, theirs, atol=1e-5)
    assert torch.allclose(out.attentions[0].sum(-1), torch.ones(1), atol=1e-5)
    assert (slots.sum(1) == v.n_visual_tokens).all() and out.logits.shape[1] == 1
    att = lm_attention(v, x, rows, qids)
    assert att.shape == (2, v.language_model.config.num_decoder_layers, v.language_model.config.num_heads, v.n_visual_tokens)
    assert not torch.allclose(att[0], att[1])


# ------------------------------------------------------------------------------------------- round trips, training
def test_save_pretrained_round_trip_from_local_directory(t5_victim, phantom, tmp_path):
    fam = t5_victim.family
    t5_victim.save_pretrained(str(tmp_path))
    loaded = rbm.create_victim(f"{fam}.hf", weights=None, path=str(tmp_path), max_new_tokens=3)
    assert loaded.encoder_decoder and loaded.card.extra["language_model"] == "t5 (encoder-decoder)"
    x, y = phantom
    assert torch.equal(loaded._dec_ids, t5_victim._dec_ids) and torch.equal(loaded._prompt_ids, t5_victim._prompt_ids)
    with torch.no_grad():
        assert torch.allclose(loaded.objective(x[:3], y[:3]), t5_victim.objective(x[:3], y[:3]), atol=1e-5)
        assert torch.equal(loaded.evaluate(x[:3], y[:3])["vqa_accuracy"], t5_victim.evaluate(x[:3], y[:3])["vqa_accuracy"])


def test_registry_trainer_trains_and_saves_a_t5_victim(monkeypatch, tmp_path):
    from robustbench_med.registry import VICTIMS

    monkeypatch.setenv("ROBUSTBENCH_MED_HOME", str(tmp_path))
    monkeypatch.setitem(VICTIMS.get("blip2.tiny_t5").meta, "recipe",
                        TrainRecipe(target_field="vqa", n_train=32, n_val=8, epochs=1, batch_size=16, lr=1e-3))
    monkeypatch.setattr(lvlm_train, "VISION_STEPS", 2)
    monkeypatch.setattr(lvlm_train, "train_lvlm", functools.partial(lvlm_train.train_lvlm, qformer_steps=2, grounding_steps=2))
    path = train_victim("blip2.tiny_t5", progress=False)
    side = read_sidecar(path)
    assert {"val_vqa_accuracy", "val_majority_accuracy", "train_seconds"} <= set(side)
    a = rbm.create_victim("blip2.tiny_t5")
    b = rbm.create_victim("blip2.hf", weights=None, path=str(lvlm_train.hf_dir(path)))
    assert b.encoder_decoder
    x = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(a.first_token_logits(x, question_ids=[0, 9]), b.first_token_logits(x, question_ids=[0, 9]), atol=1e-5)


@pytest.mark.parametrize("name", ("lvlm_pgd.question", "qava.lm", "qava.hidden", "qava.projector", "projector.whitebox"))
def test_attacks_run_on_a_t5_victim(name, phantom):
    torch.manual_seed(0)
    victim = rbm.create_victim("instructblip.tiny_t5", weights=None)
    x, y = phantom[0][:2], phantom[1][:2]
    x_adv = rbm.create_attack(name, eps=EPS, steps=2)(victim, x, y)
    assert check_budget(x, x_adv, "Linf", EPS).valid and not torch.equal(x_adv, x)
