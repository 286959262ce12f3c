"""BLIP-2, InstructBLIP and LLaVA behind the :class:`~robustbench_med.victim.Victim` interface (task ``"vqa"``).

The victims wrap the real ``transformers`` classes (``Blip2ForConditionalGeneration``,
``InstructBlipForConditionalGeneration``, ``LlavaForConditionalGeneration``) and their processors, either built
from tiny configurations (:mod:`robustbench_med.victims.lvlm.configs`, trained by the project on the phantom VQA
bank) or loaded with ``from_pretrained`` from a hub name or a local directory.

* BLIP-2 (Li et al., ICML 2023): a Q-Former compresses the vision tokens into a fixed number of query tokens, a
  *compressed* projector.
* InstructBLIP (Dai et al., NeurIPS 2023): the Q-Former also reads the instruction, so the visual tokens depend on
  the question.
* LLaVA (Liu et al., NeurIPS 2023 / CVPR 2024): an MLP maps every vision patch to one LM token, an *uncompressed*
  projector.

Pipeline, shared by the families: the [0, 1] image is replicated to 3 channels, resized to the vision tower's size
and normalised with the processor's mean / std (inside the victim); the vision tower and projector give the visual
tokens; these replace the ``<image>`` placeholders of the family's prompt (:mod:`.templates`) in the LM input
embeddings; the LM then scores the reference answer (teacher forcing) or answers greedily. Sequences are
left-padded with explicit position ids, so scoring and greedy decoding see the same positions as an unpadded
sequence (the equivalence with the models' own ``forward`` is tested).

Encoder–decoder language models (BLIP-2 / InstructBLIP with Flan-T5, ``model.config.use_decoder_only_language_model``
False; the LMs of the QAVA and PIP victims): the visual tokens and the prompt are the *encoder* input (left-padded
with the attention mask only: T5's relative position bias depends on position differences, so left padding leaves
every real token's positions unchanged, and no position ids are passed), and the answer goes to the *decoder*, which
starts from ``decoder_start_token_id`` (T5: the pad token). Teacher forcing feeds the shifted answer to the decoder
(right-padded; the causal mask keeps the padding after EOS from reaching earlier positions), greedy decoding encodes
once and runs the decoder from its start token, and the first-token logits are the decoder's first step. The answer
tokens are the tokenizer's tokens of the answer alone (no special tokens) followed by EOS, as ``labels`` of T5 are.
The equivalence with the models' own ``forward`` and ``generate`` is tested as well.

The harness target ``y`` is ``ds.targets("vqa")``: a long tensor [B, Q] holding the answer id (into
``robustbench_med.data.phantom.ANSWERS``) of every question of the phantom bank; an entry of :data:`IGNORE` (−1)
hides that question from :meth:`LVLMVictim.objective` ("the questions the caller allows").
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import Seq2SeqLMOutput

from robustbench_med.errors import ConfigError, InputContractError
from robustbench_med.victim import Victim, VictimCard
from robustbench_med.victims.lvlm.templates import template_for
from robustbench_med.vqa import normalize_answer

FAMILIES = ("blip2", "instructblip", "llava")
POOLS = ("seen", "unseen")  # phrasings of the six evaluated question types (both have answers)
ATTACK_POOLS = (*POOLS, "unrelated")  # + probe questions of other types, without answers (attack side only)
IGNORE = -1
LAYERS = ("vision", "projector", "lm_input")


def vqa_bank() -> tuple[tuple[Any, ...], tuple[str, ...]]:
    """The phantom question bank and answer vocabulary (``QUESTIONS``, ``ANSWERS``)."""
    from robustbench_med.data.phantom import ANSWERS, QUESTIONS

    return QUESTIONS, ANSWERS


def pool_question_ids(pool: str) -> list[int]:
    """Ids of the questions in ``pool``: the bank's 'seen' / 'unseen' phrasings, or the 'unrelated' probe questions
    (:data:`~robustbench_med.data.phantom.UNRELATED_QUESTIONS`, numbered after the bank)."""
    if pool not in ATTACK_POOLS:
        raise ConfigError(f"question pool must be one of {ATTACK_POOLS}, got {pool!r}")
    bank = vqa_bank()[0]
    if pool == "unrelated":
        return list(range(len(bank), len(bank) + len(unrelated_questions())))
    return [q.id for q in bank if q.pool == pool]


def unrelated_questions() -> tuple[str, ...]:
    """The probe questions of the 'unrelated' pool (no answers; see the phantom module)."""
    from robustbench_med.data.phantom import UNRELATED_QUESTIONS

    return UNRELATED_QUESTIONS


@dataclass
class EncoderDecoderPassOutput(Seq2SeqLMOutput):
    """The output of :meth:`LVLMVictim.lm_pass` for an encoder–decoder LM: T5's ``Seq2SeqLMOutput`` plus
    ``attentions``, the decoder's cross-attentions of each layer ([N, H, 1, S]: from the first decoder step, the one
    that predicts the first answer token, to the S encoder positions), in the place where a decoder-only LM returns
    its self-attentions [N, H, S, S] (row −1 of either is the generating position's attention over the prompt)."""

    attentions: tuple[torch.Tensor, ...] | None = None


def _tied_aliases(module: nn.Module) -> dict[str, str]:
    """Parameter names that alias an earlier-named parameter (tied weights) → that first name."""
    first: dict[int, str] = {}
    alias = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        if id(p) in first:
            alias[name] = first[id(p)]
        else:
            first[id(p)] = name
    return alias


def _drop_tied_aliases(module: nn.Module, state: dict[str, Any], prefix: str, _meta: Any) -> None:
    for alias in _tied_aliases(module):
        state.pop(prefix + alias, None)


def _restore_tied_aliases(module: nn.Module, state: dict[str, Any], prefix: str, *_: Any) -> None:
    for alias, name in _tied_aliases(module).items():
        if prefix + alias not in state and prefix + name in state:
            state[prefix + alias] = state[prefix + name]


def _left_pad(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(list(r), dtype=torch.long)
            mask[i, width - len(r):] = 1
    return ids, mask


def _trim_left(mask: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Drop the leading columns that are padding in every row."""
    used = mask.any(0).nonzero()
    start = int(used[0]) if len(used) else mask.shape[1]
    return tuple(t[:, start:] for t in (mask, *tensors))


class LVLMVictim(Victim):
    """A vision-language model answering phantom VQA questions (see the module docstring).

    Args:
        model: a ``Blip2ForConditionalGeneration``, ``InstructBlipForConditionalGeneration`` or
            ``LlavaForConditionalGeneration`` (eager attention recommended); BLIP-2 and InstructBLIP may have a
            decoder-only (OPT, Vicuna) or an encoder–decoder (Flan-T5) language model, LLaVA a decoder-only one.
        processor: the matching processor (its tokenizer, Q-Former tokenizer and image mean / std are used).
        family: ``'blip2'``, ``'instructblip'`` or ``'llava'`` (selects the prompt template).
        card: the victim card (task ``'vqa'``; ``input_size`` (1 or 3, H, W)).
        n_eval: evaluation questions per image ("phantom VQA m+n": an attack crafted once per image is scored on them).
        eval_pool: the pool they come from; chosen per image, deterministically, from the image's answer vector
            (stratified over question types, so the same image always gets the same questions, clean or attacked).
        eval_questions: a fixed list of question ids for every image instead (overrides ``n_eval``/``eval_pool``).
        eval_seed: seed of the per-image choice.
        max_new_tokens: greedy decoding length (the phantom answers are one word).
    """

    def __init__(
        self,
        model: nn.Module,
        processor: Any,
        family: str,
        card: VictimCard,
        *,
        n_eval: int = 6,
        eval_pool: str = "unseen",
        eval_questions: Sequence[int] | None = None,
        eval_seed: int = 0,
        max_new_tokens: int = 3,
    ) -> None:
        super().__init__(card)
        if family not in FAMILIES:
            raise ConfigError(f"unknown LVLM family {family!r}; choose one of {FAMILIES}")
        if card.task != "vqa" or card.input_size[0] not in (1, 3):
            raise ConfigError("an LVLM victim card needs task 'vqa' and 1 or 3 input channels")
        #: whether the LM is an encoder-decoder (Flan-T5): the prompt goes to its encoder, the answer to its decoder
        self.encoder_decoder = not getattr(model.config, "use_decoder_only_language_model", True)
        if self.encoder_decoder and family == "llava":
            raise ConfigError(f"{card.name}: LLaVA victims need a decoder-only language model")
        self.model = model
        self.processor = processor
        self.family = family
        self.template = template_for(family, self.encoder_decoder)
        self.max_new_tokens = int(max_new_tokens)
        self._set_eval_protocol(n_eval, eval_pool, eval_questions, eval_seed)
        ip = processor.image_processor
        self.register_buffer("pixel_mean", torch.tensor(ip.image_mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(ip.image_std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        vcfg = model.config.vision_config
        self.image_size = int(vcfg.image_size)
        self.image_token_id = int(model.config.image_token_id)
        self.n_visual_tokens = self._count_visual_tokens()
        self.feature_layers = self._feature_layer_names()
        self._build_token_tables()
        if self.encoder_decoder:
            # transformers 5 always ties T5's shared embedding, its encoder / decoder embeddings and its LM head: the
            # state dict names each tied tensor once (safetensors refuses aliases), and loading fills the aliases in
            self.register_state_dict_post_hook(_drop_tied_aliases)
            self.register_load_state_dict_pre_hook(_restore_tied_aliases)

    # ----------------------------------------------------------------------------------------------- set-up
    def _set_eval_protocol(self, n_eval: int, pool: str, questions: Sequence[int] | None, seed: int) -> None:
        bank = vqa_bank()[0]
        if pool not in POOLS:
            raise ConfigError(f"eval_pool must be one of {POOLS} (questions with answers), got {pool!r}")
        if questions is not None:
            questions = tuple(int(q) for q in questions)
            if not questions or any(q < 0 or q >= len(bank) for q in questions):
                raise ConfigError(f"eval_questions must be non-empty ids in [0, {len(bank)}), got {questions}")
        elif not 1 <= int(n_eval) <= len(pool_question_ids(pool)):
            raise ConfigError(f"n_eval must be in [1, {len(pool_question_ids(pool))}], got {n_eval}")
        self.eval_questions, self.n_eval, self.eval_pool, self.eval_seed = questions, int(n_eval), pool, int(seed)

    # -------------------------------------------------------------------------------------------- the family's parts
    @property
    def has_qformer(self) -> bool:
        """Whether a Q-Former (BLIP-2, InstructBLIP) sits between the vision tower and the LM (LLaVA: a linear projector)."""
        return self.family != "llava"

    @property
    def language_model(self) -> nn.Module:
        return self.model if self.family == "llava" else self.model.language_model

    @property
    def vision_tower(self) -> nn.Module:
        return self.model.model.vision_tower if self.family == "llava" else self.model.vision_model

    def _count_visual_tokens(self) -> int:
        cfg = self.model.config
        if self.family == "llava":
            patches = (self.image_size // int(cfg.vision_config.patch_size)) ** 2
            return patches + (1 if cfg.vision_feature_select_strategy == "full" else 0)
        return int(cfg.num_query_tokens)

    def _feature_layer_names(self) -> tuple[str, ...]:
        if self.family == "llava":
            return ("model.model.multi_modal_projector",)
        return ("model.vision_model.post_layernorm", "model.language_projection")

    def _prompt_tokens(self, question: str) -> list[int]:
        ids = list(self.processor.tokenizer(self.template.render(question)).input_ids)
        if self.template.image_prefix:
            return [self.image_token_id] * self.n_visual_tokens + ids
        if ids.count(self.image_token_id) != 1:
            raise ConfigError(f"{self.card.name}: the prompt must contain exactly one image token, got {ids.count(self.image_token_id)}")
        i = ids.index(self.image_token_id)
        return ids[:i] + [self.image_token_id] * self.n_visual_tokens + ids[i + 1:]

    def _answer_tokens(self, answer: str) -> list[int]:
        """The answer's tokens as they follow the prompt (prefix-difference tokenisation), then EOS. Encoder–decoder
        LMs: the answer's own tokens (no special tokens), then EOS: the decoder's targets."""
        tok = self.processor.tokenizer
        if self.encoder_decoder:
            return list(tok(answer, add_special_tokens=False).input_ids) + [tok.eos_token_id]
        prompt = self.template.render(vqa_bank()[0][0].text)
        base, full = tok(prompt).input_ids, tok(f"{prompt} {answer}").input_ids
        suffix = full[len(base):] if full[: len(base)] == base else tok(f" {answer}", add_special_tokens=False).input_ids
        return list(suffix) + [tok.eos_token_id]

    def _build_token_tables(self) -> None:
        questions, answers = vqa_bank()
        tok = self.processor.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.eos_id = tok.eos_token_id
        prompts = [self._prompt_tokens(q.text) for q in questions]
        answer_tokens = [self._answer_tokens(a) for a in answers]
        ids, mask = _left_pad(prompts + [self._prompt_tokens(t) for t in unrelated_questions()], self.pad_id)
        self.register_buffer("_prompt_ids", ids, persistent=False)  # the bank, then the unrelated probe questions
        self.register_buffer("_prompt_mask", mask, persistent=False)
        if self.encoder_decoder:
            self._build_decoder_tables(answer_tokens)
        else:
            self._build_teacher_forcing_tables(prompts, answer_tokens)
        self.answer_len = max(len(a) for a in answer_tokens)
        self.register_buffer("_answer_first", torch.tensor([a[0] for a in answer_tokens]), persistent=False)
        self._answer_norm = [normalize_answer(a) for a in answers]
        if self.template.qformer_instruction:
            qtok = self.processor.qformer_tokenizer
            qpad = qtok.pad_token_id if qtok.pad_token_id is not None else 0
            # one row per question, then the empty instruction (used when no question is given)
            texts = [q.text for q in questions] + list(unrelated_questions())
            qf = [list(qtok(self.template.render(t)).input_ids) for t in texts] + [list(qtok("").input_ids)]
            width = max(len(r) for r in qf)
            qids = torch.tensor([r + [qpad] * (width - len(r)) for r in qf])
            qmask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in qf])
            self.register_buffer("_qf_ids", qids, persistent=False)
            self.register_buffer("_qf_mask", qmask, persistent=False)

    def _build_teacher_forcing_tables(self, prompts: list[list[int]], answer_tokens: list[list[int]]) -> None:
        """Decoder-only LMs: every prompt followed by every answer, left-padded ([Q, A, S]; labels −100 on the prompt)."""
        full = [p + a for p in prompts for a in answer_tokens]
        labels = [[-100] * len(p) + a for p in prompts for a in answer_tokens]
        tf_ids, tf_mask = _left_pad(full, self.pad_id)
        tf_labels = _left_pad(labels, -100)[0]
        shape = (len(prompts), len(answer_tokens), tf_ids.shape[1])
        self.register_buffer("_tf_ids", tf_ids.view(shape), persistent=False)
        self.register_buffer("_tf_mask", tf_mask.view(shape), persistent=False)
        self.register_buffer("_tf_labels", tf_labels.view(shape), persistent=False)

    def _build_decoder_tables(self, answer_tokens: list[list[int]]) -> None:
        """Encoder–decoder LMs: per answer, the decoder labels (answer tokens and EOS, right-padded with −100) and the
        decoder input (the labels shifted right behind ``decoder_start_token_id``, −100 → pad), [A, L] each: what
        T5's ``_shift_right`` makes of ``labels``."""
        start = getattr(self.language_model.config, "decoder_start_token_id", None)
        self.decoder_start_id = int(start if start is not None else self.pad_id)
        width = max(len(a) for a in answer_tokens)
        labels = torch.full((len(answer_tokens), width), -100, dtype=torch.long)
        for i, a in enumerate(answer_tokens):
            labels[i, : len(a)] = torch.tensor(a, dtype=torch.long)
        dec = torch.cat([torch.full((len(labels), 1), self.decoder_start_id, dtype=torch.long), labels[:, :-1]], 1)
        self.register_buffer("_dec_labels", labels, persistent=False)
        self.register_buffer("_dec_ids", dec.masked_fill(dec == -100, self.pad_id), persistent=False)

    # ------------------------------------------------------------------------------------------ questions
    def evaluation_questions(self, y: torch.Tensor) -> torch.Tensor:
        """Question ids [B, n] each image is scored on (fixed, or chosen per image from its answer vector)."""
        y = self._check_target(y)
        if self.eval_questions is not None:
            return torch.tensor(self.eval_questions, device=y.device).expand(len(y), -1).clone()
        bank = vqa_bank()[0]
        pool = pool_question_ids(self.eval_pool)
        types = sorted({bank[q].qtype for q in pool})
        rows = []
        for row in y.detach().cpu().numpy().astype(np.int64):
            key = int.from_bytes(hashlib.sha256(row.tobytes()).digest()[:8], "little")
            rng = np.random.default_rng([self.eval_seed, key])
            order = [types[i] for i in rng.permutation(len(types))]
            left = {t: [q for q in pool if bank[q].qtype == t] for t in types}
            chosen = []
            for i in range(self.n_eval):
                cands = left[order[i % len(order)]]
                chosen.append(cands.pop(int(rng.integers(len(cands)))))
            rows.append(chosen)
        return torch.tensor(rows, dtype=torch.long, device=y.device)

    def _check_target(self, y: torch.Tensor) -> torch.Tensor:
        n_q = len(vqa_bank()[0])
        if not isinstance(y, torch.Tensor) or y.dim() != 2 or y.shape[1] != n_q or y.is_floating_point():
            shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise InputContractError(f"a VQA target is a long tensor [B, {n_q}] of answer ids (ds.targets('vqa')), got {shape}")
        return y.long()

    def _question_matrix(self, question_ids: Any, batch: int, device: torch.device) -> torch.Tensor:
        """Question ids as [B, n]: a [B, n] tensor, a [B] tensor (one per image), or an int / list / tuple used for
        every image; −1 entries mean "no question"."""
        q = torch.as_tensor(question_ids, dtype=torch.long, device=device)
        if q.dim() == 0:
            q = q.view(1, 1).expand(batch, 1)
        elif isinstance(question_ids, (list, tuple)):
            q = q.view(1, -1).expand(batch, -1)
        elif q.dim() == 1:
            q = q.view(-1, 1)
        n_ids = len(vqa_bank()[0]) + len(unrelated_questions())
        if q.dim() != 2 or q.shape[0] != batch or (q >= n_ids).any() or (q < IGNORE).any():
            raise ConfigError(f"question_ids must be ids [B, n] (or a list for all images), got shape {tuple(q.shape)}")
        return q

    # ------------------------------------------------------------------------------------------- vision
    def pixel_values(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] images → the vision tower's normalised 3-channel input (replicate, resize, normalise)."""
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False, antialias=True)
        return ((x - self.pixel_mean) / self.pixel_std).to(self.model.dtype)

    def visual_rows(self, x: torch.Tensor, rows: torch.Tensor, qids: torch.Tensor | None, layer: str) -> torch.Tensor:
        """Visual features of image ``rows[i]`` under question ``qids[i]`` (``None``: no instruction)."""
        if layer not in LAYERS:
            raise ConfigError(f"layer must be one of {LAYERS}, got {layer!r}")
        pv = self.pixel_values(x)
        if self.family == "llava":
            out = self.model.model.get_image_features(pixel_values=pv, return_dict=True)
            feats = out.last_hidden_state if layer == "vision" else torch.stack(list(out.pooler_output))
            return feats[rows]
        if self.family == "blip2" or layer == "vision":
            out = self.model.get_image_features(pv, return_dict=True) if layer != "vision" else None
            if layer == "vision":
                return self.model.vision_model(pixel_values=pv, return_dict=True).last_hidden_state[rows]
            feats = out.qformer_outputs.last_hidden_state if layer == "projector" else out.pooler_output
            return feats[rows]
        embeds = self.model.vision_model(pixel_values=pv, return_dict=True).last_hidden_state[rows]
        query = self._instructblip_qformer(embeds, qids)
        return query if layer == "projector" else self.model.language_projection(query)

    def _instructblip_qformer(self, embeds: torch.Tensor, qids: torch.Tensor | None) -> torch.Tensor:
        """InstructBLIP's instruction-aware Q-Former query output (``get_image_features`` without the vision pass)."""
        n = len(embeds)
        query = self.model.query_tokens.expand(n, -1, -1)
        qmask = torch.ones(query.shape[:2], dtype=torch.long, device=embeds.device)
        if qids is None:
            qids = torch.full((n,), len(self._qf_ids) - 1, dtype=torch.long, device=embeds.device)
        out = self.model.qformer(input_ids=self._qf_ids[qids], attention_mask=torch.cat([qmask, self._qf_mask[qids]], 1),
                                 query_embeds=query, encoder_hidden_states=embeds,
                                 encoder_attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device),
                                 return_dict=True)
        return out.last_hidden_state[:, : query.shape[1]].to(embeds.dtype)

    def visual_features(self, x: torch.Tensor, question_ids: Any = None, layer: str = "projector") -> torch.Tensor:
        """Features [B, T, D] (no question) or [B, n, T, D] (questions [B, n]) at ``layer``:
        ``'vision'`` (vision-tower tokens), ``'projector'`` (Q-Former output / LLaVA projected tokens) or
        ``'lm_input'`` (the visual tokens as the LM receives them)."""
        b = len(x)
        if question_ids is None:
            return self.visual_rows(x, torch.arange(b, device=x.device), None, layer)
        q = self._question_matrix(question_ids, b, x.device).clamp_min(0)
        rows = torch.arange(b, device=x.device).repeat_interleave(q.shape[1])
        feats = self.visual_rows(x, rows, q.flatten(), layer)
        return feats.view(b, q.shape[1], *feats.shape[1:])

    def projector_features(self, x: torch.Tensor, question_ids: Any = None) -> torch.Tensor:
        """The question-conditioned projector output (Q-Former output for BLIP-2 / InstructBLIP, projected visual
        tokens for LLaVA): [B, T, D] without questions, [B, n, T, D] for question ids [B, n]."""
        return self.visual_features(x, question_ids, "projector")

    def forward_normalized(self, z: torch.Tensor) -> torch.Tensor:
        """The victim's raw output: the LM-space visual tokens [B, T, D] with no instruction (the normalisation
        of the vision tower happens in :meth:`pixel_values`, so ``z`` is the [0, 1] image)."""
        return self.visual_features(z, None, "lm_input")

    # -------------------------------------------------------------------------------------------- LM side
    def _prompt_embeds(self, tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The LM input embeddings of ``ids`` with the visual ``tokens`` scattered into the image placeholders."""
        embeds = self.model.get_input_embeddings()(ids)
        slots = (ids == self.image_token_id).unsqueeze(-1)
        return embeds.masked_scatter(slots, tokens.to(embeds.dtype))

    def _lm_forward(self, tokens: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, **kw: Any) -> Any:
        """The LM's output on ``ids`` with the visual ``tokens`` scattered into the image placeholders (decoder-only
        LMs; encoder–decoder LMs: :meth:`_seq2seq_forward`)."""
        embeds = self._prompt_embeds(tokens, ids)
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        return self.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, **kw)

    def _encode(self, tokens: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, **kw: Any) -> Any:
        """Encoder–decoder LMs: the encoder's output on the prompt ``ids`` with the visual ``tokens`` scattered in."""
        return self.language_model.get_encoder()(inputs_embeds=self._prompt_embeds(tokens, ids), attention_mask=mask,
                                                 return_dict=True, **kw)

    def _seq2seq_forward(self, tokens: torch.Tensor | None, ids: torch.Tensor, mask: torch.Tensor, decoder_ids: torch.Tensor,
                         encoder_outputs: Any = None, **kw: Any) -> Any:
        """Encoder–decoder LMs: the LM's output with the prompt (visual ``tokens`` scattered into ``ids``; or the given
        ``encoder_outputs``) in the encoder and ``decoder_ids`` in the decoder; ``logits_to_keep`` is honoured here
        (T5 has no such argument)."""
        keep = kw.pop("logits_to_keep", 0)
        embeds = None if encoder_outputs is not None else self._prompt_embeds(tokens, ids)
        out = self.language_model(inputs_embeds=embeds, encoder_outputs=encoder_outputs, attention_mask=mask,
                                  decoder_input_ids=decoder_ids, use_cache=False, return_dict=True, **kw)
        if keep:
            out.logits = out.logits[:, -keep:]
        return out

    def _decoder_start(self, n: int, device: torch.device) -> torch.Tensor:
        return torch.full((n, 1), self.decoder_start_id, dtype=torch.long, device=device)

    def lm_pass(self, x: torch.Tensor, rows: torch.Tensor, qids: torch.Tensor, **kw: Any) -> tuple[Any, torch.Tensor]:
        """The LM's output for image ``rows[i]`` under question ``qids[i]`` (the prompts' common left padding trimmed),
        and the mask [N, S] of the visual-token positions; ``kw`` go to the LM (``output_attentions``, ``logits_to_keep``…).

        Encoder–decoder LMs: the prompt in the encoder and the decoder's first step (its start token, the position
        that predicts the first answer token) in the decoder; the output is an :class:`EncoderDecoderPassOutput` whose
        ``attentions`` are the decoder's *cross*-attentions of that step to the encoder positions ([N, H, 1, S] per
        decoder layer; the mask marks the visual tokens among the S encoder positions). This is the counterpart of a
        decoder-only LM's attention from the last prompt token to the visual tokens (what F3 reads, ``source='lm'``):
        the attention of the position that generates the answer. The encoder's self-attentions stay available as
        ``encoder_attentions`` (every encoder position attends to the image both ways, none of them generates)."""
        mask, ids = _trim_left(self._prompt_mask[qids], self._prompt_ids[qids])
        tokens = self.visual_rows(x, rows, qids, "lm_input")
        if self.encoder_decoder:
            out = self._seq2seq_forward(tokens, ids, mask, self._decoder_start(len(ids), ids.device), **kw)
            return EncoderDecoderPassOutput(**dict(out.items()), attentions=out.cross_attentions), ids == self.image_token_id
        return self._lm_forward(tokens, ids, mask, **kw), ids == self.image_token_id

    def _lm_logits(self, tokens: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, keep: int) -> torch.Tensor:
        """Logits [N, keep, V] of the last ``keep`` positions, the visual tokens scattered into the placeholders."""
        return self._lm_forward(tokens, ids, mask, logits_to_keep=keep).logits

    def question_states(self, x: torch.Tensor, question_ids: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The LM's last-layer hidden states of each image under each of its questions, at the prompt positions after
        the visual tokens: ``(states [B, n, L, D], weights [B, n, L])`` for question ids [B, n], the weights 1 at those
        positions and 0 elsewhere (padding, the visual tokens, text before them). In a causal LM these are the first
        positions whose state depends on both the image and the question, so they are a question-conditioned
        representation of the image for every family, including those whose projector never reads the question
        (BLIP-2, LLaVA). Used by ``qava.hidden``.

        Encoder–decoder LMs (Flan-T5): the *encoder's* last hidden states (``last_hidden_state``, after its final
        layer norm: what the decoder cross-attends to) at the same positions, the question tokens after the visual
        tokens. The encoder is bidirectional, so every one of its states depends on image and question; these
        positions are kept so the representation is the question's, read in the light of the image."""
        q = self._question_matrix(question_ids, len(x), x.device).clamp_min(0)
        b, n = q.shape
        rows, qids = torch.arange(b, device=x.device).repeat_interleave(n), q.flatten()
        mask, ids = _trim_left(self._prompt_mask[qids], self._prompt_ids[qids])
        if self.encoder_decoder:
            states = self._encode(self.visual_rows(x, rows, qids, "lm_input"), ids, mask).last_hidden_state
        else:
            out = self._lm_forward(self.visual_rows(x, rows, qids, "lm_input"), ids, mask, output_hidden_states=True, logits_to_keep=1)
            states = out.hidden_states[-1]
        image = ids == self.image_token_id
        after = (image.long().cumsum(-1) >= self.n_visual_tokens) & ~image & mask.bool()
        return states.view(b, n, *states.shape[1:]), after.to(states.dtype).view(b, n, -1)

    def _flat(self, x: torch.Tensor, y: torch.Tensor | None, question_ids: Any) -> tuple[torch.Tensor, ...]:
        q = self._question_matrix(question_ids, len(x), x.device)
        valid = q >= 0
        answers = None
        if y is not None and (q >= y.shape[1]).any():
            raise ConfigError("the 'unrelated' probe questions have no reference answers: they cannot enter an LM loss")
        if y is not None:
            answers = self._check_target(y).to(x.device).gather(1, q.clamp_min(0))
            valid = valid & (answers >= 0)
        rows, cols = valid.nonzero(as_tuple=True)
        return q, valid, rows, q[rows, cols], (answers[rows, cols] if answers is not None else None)

    def lm_loss(self, x: torch.Tensor, y: torch.Tensor, question_ids: Any) -> torch.Tensor:
        """Per-image LM loss [B] of the reference answers (teacher forcing, mean token CE incl. EOS), averaged over
        the questions ``question_ids`` ([B, n]; −1 entries and :data:`IGNORE` answers are skipped; 0 if none).
        Encoder–decoder LMs: the visual tokens and prompt in the encoder, the answer teacher-forced in the decoder."""
        q, valid, rows, qids, aids = self._flat(x, y, question_ids)
        out = x.new_zeros(len(x))
        if len(rows) == 0:
            return out + 0 * x.flatten(1).sum(1)
        tokens = self.visual_rows(x, rows, qids, "lm_input")
        if self.encoder_decoder:
            mask, ids = _trim_left(self._prompt_mask[qids], self._prompt_ids[qids])
            target = self._dec_labels[aids]
            logits = self._seq2seq_forward(tokens, ids, mask, self._dec_ids[aids]).logits.float()
            ce = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="none")
            per_seq = ce.sum(1) / (target != -100).sum(1).clamp_min(1)
            return out.index_add(0, rows, per_seq) / valid.sum(1).clamp_min(1)
        mask, ids, labels = _trim_left(self._tf_mask[qids, aids], self._tf_ids[qids, aids], self._tf_labels[qids, aids])
        keep = self.answer_len + 1
        logits = self._lm_logits(tokens, ids, mask, keep)[:, :-1].float()
        target = labels[:, -(keep - 1):]
        ce = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="none")
        per_seq = ce.sum(1) / (target != -100).sum(1).clamp_min(1)
        total = out.index_add(0, rows, per_seq)
        return total / valid.sum(1).clamp_min(1)

    def objective(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """LM loss [B] over the questions the caller allows: every question whose answer in ``target`` is not
        :data:`IGNORE` (a full ``ds.targets('vqa')`` allows all of them: the known-question white-box setting)."""
        y = self._check_target(target).to(x.device)
        allowed = torch.arange(y.shape[1], device=x.device).expand_as(y)
        return self.lm_loss(x, y, torch.where(y >= 0, allowed, torch.full_like(y, IGNORE)))

    def first_token_logits(self, x: torch.Tensor, y: torch.Tensor | None = None, question_ids: Any = None) -> torch.Tensor:
        """Next-token logits at the end of the prompt (the first answer token: the classifier view used to run
        AutoAttack on LVLMs): [B, V] for one question per image, [B, n, V] for [B, n]. Encoder–decoder LMs: the
        logits of the decoder's first step (from its start token).

        ``question_ids=None`` takes each image's first evaluation question, which needs ``y``.
        """
        if question_ids is None:
            if y is None:
                raise ConfigError("first_token_logits needs question_ids or the target y")
            question_ids = self.evaluation_questions(y)[:, 0].to(x.device)
        q = self._question_matrix(question_ids, len(x), x.device)
        squeeze = not isinstance(question_ids, (list, tuple)) and torch.as_tensor(question_ids).dim() <= 1
        b, n = q.shape
        rows, qids = torch.arange(b, device=x.device).repeat_interleave(n), q.clamp_min(0).flatten()
        mask, ids = _trim_left(self._prompt_mask[qids], self._prompt_ids[qids])
        if self.encoder_decoder:  # the decoder's first step
            logits = self._seq2seq_forward(self.visual_rows(x, rows, qids, "lm_input"), ids, mask,
                                           self._decoder_start(len(ids), ids.device)).logits[:, -1].float()
        else:
            logits = self._lm_logits(self.visual_rows(x, rows, qids, "lm_input"), ids, mask, 1)[:, -1].float()
        logits = logits.view(b, n, -1)
        return logits[:, 0] if squeeze else logits

    def first_token_labels(self, y: torch.Tensor, question_ids: Any) -> torch.Tensor:
        """Token id of the first answer token of the reference answers, shaped like ``question_ids``."""
        y = self._check_target(y)
        q = torch.as_tensor(question_ids, dtype=torch.long, device=y.device)
        answers = y.gather(1, q.view(len(y), -1)).view(q.shape)
        return self._answer_first.to(y.device)[answers]

    # ---------------------------------------------------------------------------------------- answering
    @torch.no_grad()
    def generate_answers(self, x: torch.Tensor, question_ids: Any) -> tuple[list[list[str]], torch.Tensor]:
        """Greedy answers (decoded strings, [B][n]; the image placeholder is never generated) and the first-step
        argmax tokens [B, n]."""
        q = self._question_matrix(question_ids, len(x), x.device).clamp_min(0)
        b, n = q.shape
        rows, qids = torch.arange(b, device=x.device).repeat_interleave(n), q.flatten()
        tokens = self.visual_rows(x, rows, qids, "lm_input")
        mask, ids = _trim_left(self._prompt_mask[qids], self._prompt_ids[qids])
        if self.encoder_decoder:
            return self._generate_seq2seq(tokens, ids, mask, b, n)
        done = torch.zeros(len(ids), dtype=torch.bool, device=x.device)
        steps = []
        for _ in range(self.max_new_tokens):
            logits = self._lm_logits(tokens, ids, mask, 1)[:, -1]
            logits[:, self.image_token_id] = float("-inf")  # the placeholder is never an answer token
            nxt = logits.argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, self.pad_id), nxt)
            steps.append(nxt)
            done |= nxt == self.eos_id
            ids, mask = torch.cat([ids, nxt[:, None]], 1), torch.cat([mask, torch.ones_like(nxt)[:, None]], 1)
            if bool(done.all()):
                break
        gen = torch.stack(steps, 1).cpu().tolist()
        texts = [self.processor.tokenizer.decode(_until_eos(g, self.eos_id), skip_special_tokens=True) for g in gen]
        return [texts[i * n:(i + 1) * n] for i in range(b)], steps[0].view(b, n)

    def _generate_seq2seq(self, tokens: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, b: int,
                          n: int) -> tuple[list[list[str]], torch.Tensor]:
        """Greedy decoding of an encoder–decoder LM: encode the prompt once, then run the decoder from its start token
        (the same answers and first-step tokens as :meth:`generate_answers` returns for a decoder-only LM)."""
        enc = self._encode(tokens, ids, mask)
        dec = self._decoder_start(len(ids), ids.device)
        done = torch.zeros(len(ids), dtype=torch.bool, device=ids.device)
        steps = []
        for _ in range(self.max_new_tokens):
            logits = self._seq2seq_forward(None, ids, mask, dec, encoder_outputs=enc, logits_to_keep=1).logits[:, -1]
            logits[:, self.image_token_id] = float("-inf")  # the placeholder is never an answer token
            nxt = logits.argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, self.pad_id), nxt)
            steps.append(nxt)
            done |= nxt == self.eos_id
            dec = torch.cat([dec, nxt[:, None]], 1)
            if bool(done.all()):
                break
        gen = torch.stack(steps, 1).cpu().tolist()
        texts = [self.processor.tokenizer.decode(_until_eos(g, self.eos_id), skip_special_tokens=True) for g in gen]
        return [texts[i * n:(i + 1) * n] for i in range(b)], steps[0].view(b, n)

    @torch.no_grad()
    def correct_answers(self, x: torch.Tensor, y: torch.Tensor, question_ids: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact-match correctness [B, n] of the greedy answers, and of the first-step token, on ``question_ids``."""
        y = self._check_target(y).to(x.device)
        q = self._question_matrix(question_ids, len(x), x.device).clamp_min(0)
        texts, first = self.generate_answers(x, q)
        answers = y.gather(1, q).cpu().tolist()
        em = torch.tensor([[float(normalize_answer(t) == self._answer_norm[a]) for t, a in zip(tr, ar)]
                           for tr, ar in zip(texts, answers)], device=x.device).view(q.shape)
        return em, (first == self._answer_first[y.gather(1, q)]).float()

    def evaluate(self, x: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-image scores on the evaluation questions: ``vqa_accuracy`` (mean exact match, primary),
        ``vqa_accuracy_first`` (the first evaluation question, the one a question-specific attack targets),
        ``vqa_accuracy_others`` (the remaining ones, n > 1) and ``first_token_accuracy``."""
        q = self.evaluation_questions(target).to(x.device)
        em, first = self.correct_answers(x, target, q)
        out = {"vqa_accuracy": em.mean(1), "vqa_accuracy_first": em[:, 0]}
        if q.shape[1] > 1:
            out["vqa_accuracy_others"] = em[:, 1:].mean(1)
        out["first_token_accuracy"] = first.mean(1)
        return out

    def save_pretrained(self, directory: str) -> None:
        """Write the model and its processor (tokenizer included) with ``save_pretrained`` to ``directory``."""
        self.model.save_pretrained(directory)
        self.processor.save_pretrained(directory)


def _until_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos)] if eos in tokens else tokens
