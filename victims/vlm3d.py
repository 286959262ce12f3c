"""Tiny 3D vision-language models on the volume phantom's VQA bank (issue #20, item 4: the 3D projector question).

The 2D LVLM study (:mod:`robustbench_med.victims.lvlm`) compares a *compressed* projector (BLIP-2's Q-Former) with an
*uncompressed* one (LLaVA's MLP). These victims repeat it on volumes, in the layout of 3D medical LVLMs such as
M3D-LaMed (Bai et al., arXiv 2404.00578: a 3D ViT, a projector that compresses its tokens, a causal LM): one 3D ViT
vision encoder, one LM configuration and one training recipe, two projectors.

| name | projector | visual tokens the LM reads |
|---|---|---|
| ``vlm3d.mlp``, ``vlm3d.mlp_s1``, ``vlm3d.mlp_s2`` | per-token two-layer MLP (LLaVA-1.5 style): *uncompressed* | 144 (one per 8³ patch) |
| ``vlm3d.perceiver``, ``vlm3d.perceiver_s1``, ``vlm3d.perceiver_s2`` | 8 learned queries, two cross-attention layers (Flamingo's Perceiver Resampler design: queries attend to [patch tokens; queries], then an MLP): *compressed* (18×) | 8 |

``_s1``, ``_s2``: the same model trained with seeds 1 and 2 (encoder pre-training and stage 2 both reseeded), so
the projector comparison can be stated across training runs: the cards declare ``extra['study']``, ``'arm'``
(``compressed`` / ``uncompressed``) and ``'training_seed'``, and :mod:`robustbench_med.seed_studies` writes the
arms' difference with an interval over test volumes *and* training seeds (``seed_studies.md``).

**Model** (:class:`VLM3DConfig`). The [0, 1] volume 1 × 32 × 48 × 48 is normalised ((x − 0.25) / 0.25, as the volume
segmentors) and cut into 8³ patches: 4 × 6 × 6 = 144 tokens of width 64. A token is the sum of the ``Conv3d`` patch
embedding of its patch, a linear read-out of the per-patch maximum and mean of three convolutional detector maps
(two 3³ conv–GELU layers of 16 channels at full resolution, then a 1×1 conv: lesion, cyst, tumour) and a learned 3D
position embedding; two pre-norm transformer blocks (4 heads, MLP 128) and a LayerNorm follow
(:class:`VisionEncoder3D`). The detector branch is this suite's addition to the plain ViT patch embedding: a lesion
fills ~8 % of an 8³ patch, and without it pre-training learned no lesion detection in the CPU budget (measured:
volume-level lesion AUC 0.41–0.57 after 200 steps, ViT alone or with a pooled conv stem). The projector maps the
tokens into the LM's embedding space. The LM is ``transformers``' ``GPT2LMHeadModel`` built from a tiny config (2 layers,
width 64, 4 heads, inner 128, 256 positions, no dropout, initializer range 0.1 as the 2D family's LMs) over a word-level
vocabulary of the volume questions and the answers (:func:`robustbench_med.victims.lvlm.tokenizer.build_word_tokenizer`).
It reads ``<s>``, the visual tokens, the question, and writes the answer (one word) and ``</s>``.

Because the LM is causal and the visual tokens come first, their keys and values do not depend on the question: the
victim runs ``<s>`` + visual tokens once per volume and every question of that volume continues from the cached
prefix (``DynamicCache``; questions left-padded with masked pads, explicit position ids). That is the same
computation as one pass over the whole sequence (tested), only 12 questions cost about one pass over the prefix.

**Victim API** (task ``"vqa"``). The target ``y`` is ``ds.targets("vqa")`` of ``phantom.volumes``: a long tensor
[B, 12], the answer id (into ``robustbench_med.data.phantom.ANSWERS``) of every question of
:data:`robustbench_med.data.volumes.VOLUME_QUESTIONS`; −1 hides a question. :meth:`VLM3DVictim.objective` is the
per-volume mean, over the allowed questions, of the teacher-forced answer cross-entropy (answer token and ``</s>``,
averaged), differentiable in the volume; :meth:`VLM3DVictim.evaluate` answers every question greedily (up to
``max_new_tokens`` = 2 tokens) and returns ``vqa_accuracy`` (fraction of the 12 questions whose decoded answer equals
the reference after VQA normalisation; primary), ``first_token_accuracy`` and one accuracy per question type.
``forward`` returns the LM-space visual tokens [B, T, 64]; ``features`` hooks ``encoder`` and ``projector``.

**Training** (:func:`train_vlm3d`, the registered ``trainer``; 600 training volumes, AdamW, warm-up then cosine
decay, deterministic under the recipe's seed, 2 CPU threads):

1. Encoder pre-training (:func:`pretrain_encoder`), standing in for the pre-trained 3D encoders real 3D LVLMs start
   from (M3D-LaMed's comes from M3D-CLIP). 1a: the detector maps alone, 300 steps of a multiple-instance loss on their
   per-patch maxima (patches with ≥ 8 lesion voxels positive, lesion-free patches negative; cyst / tumour maps from
   volumes with one lesion). 1b: detector frozen, 200 steps in which the tokens predict each patch's anatomy histogram
   and lesion presence through a linear head (discarded). One encoder per seed, shared by both projectors (the
   projector comparison starts from the same encoder) and cached under ``<home>/weights/vlm3d-encoder-<key>``.
2. Encoder frozen (its tokens computed once). 2a (as BLIP-2 trains its Q-Former before connecting the LM): 100 steps
   in which a linear probe (discarded) on the mean and maximum of the projector's output tokens predicts every
   question type's answer. 2b: projector and LM, 300 steps of 32 volumes × 4 distinct questions on the teacher-forced
   answer loss; the first 60 steps ask presence questions only and later a question is a presence question with
   probability 0.25 (the 2D family's grounding phase: without it the tiny LMs settle in the answer priors).

The sidecar records the clean validation ``vqa_accuracy``, the majority-answer baseline (the answer prior), the
encoder's validation lesion AUC and wall / CPU seconds.

**Measured** (2 threads, one CPU). Encoder pre-training 129 s wall / 250 CPU-s on a quiet machine (seed 0; seed 1:
100 s / 196 CPU-s; seed 2: 469 s / 312 CPU-s with the cores shared; validation lesion AUC 0.84 / 0.76 / 0.75); stage
2: 30 s / 59 CPU-s (MLP), 15 s / 30 CPU-s (perceiver) quiet. Clean ``vqa_accuracy`` on the first 64 test volumes:
``vlm3d.mlp`` 0.750, ``vlm3d.mlp_s1`` 0.760, ``vlm3d.perceiver`` 0.745, ``vlm3d.perceiver_s1`` 0.753, against 0.500
for the answer prior (each question's majority training answer). The ``volumes`` grid (first 24 test volumes, prior
0.542, 10-step attacks): clean 0.726 / 0.764 / 0.705 (MLP, seeds 0–2) and 0.722 / 0.729 / 0.719 (perceiver); L∞ PGD
1/255 → 0.483 / 0.656 / 0.552 and 0.396 / 0.458 / 0.556, 2/255 → 0.174 / 0.340 / 0.351 and 0.122 / 0.146 / 0.312,
4/255 ≤ 0.056; transfer PGD from the same arm's next seed at 2/255 → 0.319 / 0.413 / 0.455 and 0.316 / 0.267 /
0.389. The compressed arm scores 0.07–0.10 lower under every attack at 1–2/255, but the seeds of one arm spread by
0.12–0.19, and no difference between the arms is shown (``seed_studies.md``: e.g. PGD 2/255 Δ −0.095, 95% interval
over volumes and seeds [−0.263, +0.060]).

The ``vqa`` column is outside the dataset fingerprint (:class:`~robustbench_med.data.dataset.MedicalDataset`'s extra
targets), so :data:`TRAINER_VERSION` (the registered ``trainer_version``) must be bumped when the volume question bank
or its answers change, or the cached weights would still count as current.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from robustbench_med.errors import ConfigError, InputContractError
from robustbench_med.registry import register_victim
from robustbench_med.training import TrainRecipe
from robustbench_med.victim import Victim, VictimCard, count_parameters, validate_images
from robustbench_med.victims.volumes import _batches
from robustbench_med.vqa import normalize_answer

TRAINER_VERSION = 1  # bump when the loop, the models' initialisation or the volume VQA bank changes
VOLUME_INPUT = (1, 32, 48, 48)
VOLUME_MEAN, VOLUME_STD = [0.25], [0.25]
PROJECTORS = ("mlp", "perceiver")
TRAINING_SEEDS = (0, 1, 2)  # vlm3d.<projector>, vlm3d.<projector>_s1, _s2: one encoder and one stage 2 per seed
STUDY = "3D projector (compressed vs uncompressed)"  # card extra 'study': robustbench_med.seed_studies groups by it
IGNORE = -1
PAPERS = {
    "mlp": "3D LVLM layout of M3D-LaMed (Bai et al., arXiv 2404.00578) with LLaVA-1.5's MLP projector (Liu et al., "
           "CVPR 2024): uncompressed",
    "perceiver": "3D LVLM layout of M3D-LaMed (Bai et al., arXiv 2404.00578) with a learned-query resampler (Flamingo's "
                 "Perceiver Resampler, Alayrac et al., NeurIPS 2022): compressed",
}


@dataclass(frozen=True)
class VLM3DConfig:
    """Sizes of a tiny 3D VLM (encoder, projector, LM); ``projector`` is ``'mlp'`` or ``'perceiver'``."""

    projector: str = "mlp"
    input_size: tuple[int, int, int, int] = VOLUME_INPUT
    patch: tuple[int, int, int] = (8, 8, 8)
    stem: tuple[int, int] = (16, 3)
    width: int = 64
    heads: int = 4
    encoder_layers: int = 2
    mlp_hidden: int = 128
    queries: int = 8
    perceiver_layers: int = 2
    lm_width: int = 64
    lm_layers: int = 2
    lm_heads: int = 4
    lm_inner: int = 128
    lm_init_range: float = 0.1
    lm_positions: int = 256

    def __post_init__(self) -> None:
        if self.projector not in PROJECTORS:
            raise ConfigError(f"projector must be one of {PROJECTORS}, got {self.projector!r}")
        if len(self.input_size) != 4 or len(self.patch) != 3 or any(s % p for s, p in zip(self.input_size[1:], self.patch)):
            raise ConfigError(f"input_size (C, D, H, W) {self.input_size} must be a multiple of the patch {self.patch}")

    @property
    def grid(self) -> tuple[int, int, int]:
        return tuple(s // p for s, p in zip(self.input_size[1:], self.patch))  # type: ignore[return-value]

    @property
    def encoder_tokens(self) -> int:
        return math.prod(self.grid)

    @property
    def visual_tokens(self) -> int:
        return self.encoder_tokens if self.projector == "mlp" else self.queries


@dataclass(frozen=True)
class EncoderRecipe:
    """Stage 1, shared by every vlm3d victim: ``detector_steps`` then ``token_steps`` of ``batch_size`` training volumes
    (seed ``seed``; :func:`pretrain_encoder`)."""

    dataset: str = "phantom.volumes"
    n_train: int = 600
    n_val: int = 32
    detector_steps: int = 300
    token_steps: int = 200
    batch_size: int = 16
    lr: float = 3e-3
    weight_decay: float = 1e-4
    warmup: int = 20
    least_voxels: int = 8
    seed: int = 0


@dataclass(frozen=True)
class VLM3DRecipe(TrainRecipe):
    """Stage 2 of one victim: ``steps`` of ``batch_size`` volumes with ``questions_per_volume`` distinct questions each
    (projector and LM; the ``encoder`` stage-1 recipe is shared)."""

    dataset: str = "phantom.volumes"
    target_field: str = "vqa"
    n_train: int = 600
    n_val: int = 32
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    steps: int = 300
    questions_per_volume: int = 4
    warmup: int = 20
    align_steps: int = 100
    grounding_steps: int = 60
    grounding_mix: float = 0.25
    encoder: EncoderRecipe = field(default_factory=EncoderRecipe)


# ------------------------------------------------------------------------------------------------------ modules
class Block(nn.Module):
    """A pre-norm transformer block: x + Attn(LN(x) → LN(context)), then x + MLP(LN(x)). Self-attention when
    ``context`` is None; cross-attention to ``[context; x]`` (the Perceiver Resampler's keys) otherwise."""

    def __init__(self, width: int, heads: int, hidden: int, cross: bool = False) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.norm_ctx = nn.LayerNorm(width) if cross else None
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(t.shape[0], t.shape[1], self.heads, -1).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm1(x)
        src = h if context is None else torch.cat([self.norm_ctx(context), h], 1)
        k, v = self.kv(src).chunk(2, -1)
        att = F.scaled_dot_product_attention(self._split(self.q(h)), self._split(k), self._split(v))
        x = x + self.out(att.transpose(1, 2).flatten(2))
        return x + self.mlp(self.norm2(x))


class VisionEncoder3D(nn.Module):
    """A small 3D ViT with a convolutional detector branch: [B, C, D, H, W] → tokens [B, P, width] (z, y, x order).

    Each token is the sum of the ``Conv3d`` patch embedding of its ``patch`` (kernel = stride = patch), a linear map of
    the per-patch maximum and mean of ``stem[1]`` detector maps (two 3³ conv–GELU layers of ``stem[0]`` channels at
    full resolution, then a 1×1 conv) and a learned 3D position embedding; then pre-norm transformer blocks and a final
    LayerNorm. The branch is there because a lesion fills ~8 % of an 8³ patch: with the patch embedding alone, dense
    pre-training learned no lesion detection at all in the CPU budget (volume-level AUC 0.41 after 200 steps); a
    max-pooled local detector makes it a linear read-out of the token (module docstring)."""

    def __init__(self, cfg: VLM3DConfig) -> None:
        super().__init__()
        c, (c1, c2) = cfg.input_size[0], cfg.stem
        self.patch = tuple(cfg.patch)
        self.patch_embed = nn.Conv3d(c, cfg.width, kernel_size=cfg.patch, stride=cfg.patch)
        self.stem = nn.Sequential(nn.Conv3d(c, c1, 3, padding=1), nn.GELU(), nn.Conv3d(c1, c1, 3, padding=1), nn.GELU())
        self.detector = nn.Conv3d(c1, c2, 1)
        self.stem_embed = nn.Linear(2 * c2, cfg.width)
        self.pos = nn.Parameter(torch.randn(1, cfg.encoder_tokens, cfg.width) * 0.02)
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads, cfg.mlp_hidden) for _ in range(cfg.encoder_layers))
        self.norm = nn.LayerNorm(cfg.width)

    def tokens(self, z: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        """The tokens of normalised volumes ``z`` given their detector maps [B, stem[1], D, H, W]."""
        pooled = torch.cat([F.max_pool3d(maps, self.patch), F.avg_pool3d(maps, self.patch)], 1).flatten(2).transpose(1, 2)
        x = self.patch_embed(z).flatten(2).transpose(1, 2) + self.stem_embed(pooled) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.tokens(z, self.detector(self.stem(z)))


class MLPProjector(nn.Module):
    """LLaVA-1.5's projector: Linear → GELU → Linear on every token (uncompressed: one LM token per patch)."""

    def __init__(self, cfg: VLM3DConfig) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(cfg.width, cfg.lm_width), nn.GELU(), nn.Linear(cfg.lm_width, cfg.lm_width))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.net(tokens)


class PerceiverProjector(nn.Module):
    """``queries`` learned query tokens (N(0, 1) init) refined by ``perceiver_layers`` cross-attention blocks whose keys
    are [patch tokens; queries] (Flamingo's Perceiver Resampler), a LayerNorm and a linear map into the LM's width:
    ``queries`` LM tokens whatever the number of patches (compressed)."""

    def __init__(self, cfg: VLM3DConfig) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.randn(1, cfg.queries, cfg.width))
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads, cfg.mlp_hidden, cross=True) for _ in range(cfg.perceiver_layers))
        self.norm = nn.LayerNorm(cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.lm_width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.queries.expand(len(tokens), -1, -1)
        for block in self.blocks:
            x = block(x, tokens)
        return self.proj(self.norm(x))


def volume_bank() -> tuple[tuple[Any, ...], tuple[str, ...]]:
    """The volume question bank and the answer vocabulary (``VOLUME_QUESTIONS``, ``ANSWERS``)."""
    from robustbench_med.data.phantom import ANSWERS
    from robustbench_med.data.volumes import VOLUME_QUESTIONS

    return VOLUME_QUESTIONS, ANSWERS


def build_tokenizer() -> Any:
    """The word-level tokenizer over the volume questions and the answers (``<pad>`` 0, ``<unk>`` 1, ``<s>`` 2,
    ``</s>`` 3, ``<image>`` 4, then the words)."""
    from robustbench_med.victims.lvlm.tokenizer import build_word_tokenizer

    questions, answers = volume_bank()
    return build_word_tokenizer([q.text for q in questions] + list(answers))


def build_lm(cfg: VLM3DConfig, vocab_size: int) -> nn.Module:
    """``GPT2LMHeadModel`` from a tiny config (no dropout, untied head, SDPA attention)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=vocab_size, n_positions=cfg.lm_positions, n_embd=cfg.lm_width, n_layer=cfg.lm_layers,
                        n_head=cfg.lm_heads, n_inner=cfg.lm_inner, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        initializer_range=cfg.lm_init_range, bos_token_id=2, eos_token_id=3, pad_token_id=0,
                        tie_word_embeddings=False)
    return GPT2LMHeadModel._from_config(config, attn_implementation="sdpa")


# ------------------------------------------------------------------------------------------------------- victim
class VLM3DVictim(Victim):
    """A tiny 3D VLM answering the volume phantom's questions (module docstring).

    Args:
        cfg: the model sizes and projector.
        card: the victim card (task ``'vqa'``, ``input_size`` = ``cfg.input_size``).
        max_new_tokens: greedy decoding length in :meth:`evaluate` (the answers are one word, then ``</s>``).
    """

    feature_layers = ("encoder", "projector")

    def __init__(self, cfg: VLM3DConfig, card: VictimCard, max_new_tokens: int = 2) -> None:
        if card.task != "vqa" or tuple(card.input_size) != tuple(cfg.input_size):
            raise ConfigError(f"a 3D VLM card needs task 'vqa' and input_size {cfg.input_size}, got {card.task!r}, {card.input_size}")
        super().__init__(card, VOLUME_MEAN, VOLUME_STD)
        self.cfg = cfg
        self.max_new_tokens = int(max_new_tokens)
        self.tokenizer = build_tokenizer()
        self.encoder = VisionEncoder3D(cfg)
        self.projector = MLPProjector(cfg) if cfg.projector == "mlp" else PerceiverProjector(cfg)
        self._build_token_tables()
        longest = 1 + cfg.visual_tokens + self._question_ids.shape[1] + max(self.max_new_tokens, 2)
        if longest > cfg.lm_positions:
            raise ConfigError(f"{card.name}: sequences of {longest} tokens exceed the LM's {cfg.lm_positions} positions")
        self.lm = build_lm(cfg, len(self.tokenizer))

    @property
    def n_visual_tokens(self) -> int:
        return self.cfg.visual_tokens

    def _build_token_tables(self) -> None:
        questions, answers = volume_bank()
        tok = self.tokenizer
        self.bos_id, self.eos_id, self.pad_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
        rows = [tok(q.text, add_special_tokens=False).input_ids for q in questions]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):  # left padding: every question ends at the last column
            ids[i, width - len(r):], mask[i, width - len(r):] = torch.tensor(r), 1
        answer_ids = [tok(a, add_special_tokens=False).input_ids for a in answers]
        if any(len(a) != 1 for a in answer_ids):
            raise ConfigError("every answer must be one token of the word-level vocabulary")
        self.register_buffer("_question_ids", ids, persistent=False)
        self.register_buffer("_question_mask", mask, persistent=False)
        self.register_buffer("_answer_ids", torch.tensor([a[0] for a in answer_ids]), persistent=False)
        self._answer_norm = [normalize_answer(a) for a in answers]
        self.question_types = tuple(q.qtype for q in questions)

    # ------------------------------------------------------------------------------------------- vision side
    def forward_normalized(self, z: torch.Tensor) -> torch.Tensor:
        """The LM-space visual tokens [B, T, lm_width] of a normalised volume batch."""
        return self.projector(self.encoder(z))

    def visual_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] volumes [B, 1, D, H, W] → the visual tokens the LM reads [B, T, lm_width]."""
        return self(x)

    # --------------------------------------------------------------------------------------------- LM side
    def _prefix(self, vis: torch.Tensor) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
        """Keys and values of ``<s>`` + the visual tokens ``vis`` [B, T, D] per LM layer ([B, heads, P, d] each) and
        the prefix length P."""
        bos = self.lm.get_input_embeddings()(torch.full((len(vis), 1), self.bos_id, device=vis.device))
        embeds = torch.cat([bos, vis.to(bos.dtype)], 1)
        pos = torch.arange(embeds.shape[1], device=vis.device).expand(len(vis), -1)
        out = self.lm(inputs_embeds=embeds, position_ids=pos, use_cache=True, logits_to_keep=1)
        return [(layer.keys, layer.values) for layer in out.past_key_values.layers], embeds.shape[1]

    def _continue(self, prefix: list[tuple[torch.Tensor, torch.Tensor]], rows: torch.Tensor, ids: torch.Tensor,
                  mask: torch.Tensor, plen: int) -> tuple[torch.Tensor, Any]:
        """Logits [N, L, V] of text ``ids`` [N, L] (``mask`` 0 on pads) continuing prefix ``rows[i]``, and the cache."""
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=[(k[rows], v[rows]) for k, v in prefix])
        full = torch.cat([torch.ones(len(ids), plen, dtype=mask.dtype, device=ids.device), mask], 1)
        pos = plen + (mask.cumsum(-1) - 1).clamp_min(0)
        out = self.lm(input_ids=ids, attention_mask=full, position_ids=pos, past_key_values=cache, use_cache=True)
        return out.logits, out.past_key_values

    def _check_target(self, y: torch.Tensor) -> torch.Tensor:
        n_q = len(volume_bank()[0])
        if not isinstance(y, torch.Tensor) or y.dim() != 2 or y.shape[1] != n_q or y.is_floating_point():
            shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise InputContractError(f"a volume VQA target is a long tensor [B, {n_q}] of answer ids "
                                     f"(phantom.volumes' targets('vqa')), got {shape}")
        return y.long()

    def _questions(self, question_ids: Any, batch: int, device: torch.device) -> torch.Tensor:
        """Question ids [B, n] (−1: none) from None (every question), a list for every volume, or a [B, n] tensor."""
        n_q = len(volume_bank()[0])
        if question_ids is None:
            return torch.arange(n_q, device=device).expand(batch, -1)
        q = torch.as_tensor(question_ids, dtype=torch.long, device=device)
        if q.dim() == 1:
            q = q.view(1, -1).expand(batch, -1)
        if q.dim() != 2 or q.shape[0] != batch or (q >= n_q).any() or (q < IGNORE).any():
            raise ConfigError(f"question_ids must be ids in [0, {n_q}) (or −1), [B, n] or a list, got shape {tuple(q.shape)}")
        return q

    def answer_loss(self, x: torch.Tensor, y: torch.Tensor, question_ids: Any = None) -> torch.Tensor:
        """Per-volume mean over ``question_ids`` (default: all; −1 entries and −1 answers skipped; 0 if none) of the
        teacher-forced answer loss: the mean cross-entropy of the answer token and ``</s>``. Differentiable in ``x``."""
        y = self._check_target(y).to(x.device)
        q = self._questions(question_ids, len(x), x.device)
        if not bool(((q >= 0) & (y.gather(1, q.clamp_min(0)) >= 0)).any()):
            return 0 * x.flatten(1).sum(1)
        return self.answer_loss_from_tokens(self.visual_tokens(x), y, q)

    def answer_loss_from_tokens(self, vis: torch.Tensor, y: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """:meth:`answer_loss` given the LM-space visual tokens [B, T, D] and question ids [B, n] (training with a
        frozen encoder starts here)."""
        answers = y.gather(1, q.clamp_min(0))
        valid = (q >= 0) & (answers >= 0)
        rows, cols = valid.nonzero(as_tuple=True)
        prefix, plen = self._prefix(vis)
        qids, aids = q[rows, cols], answers[rows, cols]
        answer_tok = self._answer_ids[aids]
        ids = torch.cat([self._question_ids[qids], answer_tok[:, None]], 1)
        mask = torch.cat([self._question_mask[qids], torch.ones_like(answer_tok)[:, None]], 1)
        logits = self._continue(prefix, rows, ids, mask, plen)[0][:, -2:].float()
        target = torch.stack([answer_tok, torch.full_like(answer_tok, self.eos_id)], 1)
        per_q = F.cross_entropy(logits.transpose(1, 2), target, reduction="none").mean(1)
        return vis.new_zeros(len(vis)).index_add(0, rows, per_q.to(vis.dtype)) / valid.sum(1).clamp_min(1)

    def objective(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The attack objective [B]: :meth:`answer_loss` over every question whose answer in ``target`` is not −1."""
        return self.answer_loss(x, target, None)

    @torch.no_grad()
    def generate_answers(self, x: torch.Tensor, question_ids: Any = None) -> tuple[list[list[str]], torch.Tensor]:
        """Greedy answers (decoded strings [B][n], at most ``max_new_tokens`` tokens, stopping at ``</s>``) and the
        first generated token [B, n]."""
        q = self._questions(question_ids, len(x), x.device).clamp_min(0)
        b, n = q.shape
        prefix, plen = self._prefix(self.visual_tokens(x))
        rows, qids = torch.arange(b, device=x.device).repeat_interleave(n), q.flatten()
        ids, mask = self._question_ids[qids], self._question_mask[qids]
        logits, cache = self._continue(prefix, rows, ids, mask, plen)
        pos = plen + mask.sum(1, keepdim=True) - 1
        full = torch.cat([torch.ones(len(ids), plen, dtype=mask.dtype, device=x.device), mask], 1)
        done = torch.zeros(len(ids), dtype=torch.bool, device=x.device)
        steps = []
        for step in range(self.max_new_tokens):
            nxt = torch.where(done, torch.full_like(done, self.pad_id, dtype=torch.long), logits[:, -1].argmax(-1))
            steps.append(nxt)
            done |= nxt == self.eos_id
            if step + 1 == self.max_new_tokens or bool(done.all()):
                break
            pos, full = pos + 1, torch.cat([full, torch.ones_like(full[:, :1])], 1)
            logits = self.lm(input_ids=nxt[:, None], attention_mask=full, position_ids=pos, past_key_values=cache,
                             use_cache=True).logits
        gen = torch.stack(steps, 1).cpu().tolist()
        texts = [self.tokenizer.decode(_until_eos(g, self.eos_id), skip_special_tokens=True) for g in gen]
        return [texts[i * n:(i + 1) * n] for i in range(b)], steps[0].view(b, n)

    def evaluate(self, x: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-volume scores over the 12 questions: ``vqa_accuracy`` (exact match after VQA normalisation, primary),
        ``first_token_accuracy`` and ``<type>_accuracy`` for each question type; questions with answer −1 are left out
        (a volume with none scores 0)."""
        validate_images(x, self.card.input_size, full=False)
        y = self._check_target(target).to(x.device)
        texts, first = self.generate_answers(x, None)
        valid = (y >= 0).float()
        em = torch.tensor([[float(normalize_answer(t) == self._answer_norm[a]) if a >= 0 else 0.0
                            for t, a in zip(tr, ar)] for tr, ar in zip(texts, y.cpu().tolist())], device=x.device)
        first_ok = (first == self._answer_ids[y.clamp_min(0)]).float() * valid
        count = valid.sum(1).clamp_min(1)
        out = {"vqa_accuracy": em.sum(1) / count, "first_token_accuracy": first_ok.sum(1) / count}
        for qtype in dict.fromkeys(self.question_types):
            cols = torch.tensor([t == qtype for t in self.question_types], device=x.device)
            out[f"{qtype}_accuracy"] = em[:, cols].sum(1) / valid[:, cols].sum(1).clamp_min(1)
        return out


def _until_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


# ----------------------------------------------------------------------------------------------------- training
def majority_answers(y_train: torch.Tensor, n_answers: int) -> torch.Tensor:
    """The most frequent training answer of every question [Q] (the answer prior)."""
    return torch.stack([torch.bincount(col, minlength=n_answers).argmax() for col in y_train.long().t()])


def prior_accuracy(y_train: torch.Tensor, y_eval: torch.Tensor) -> float:
    """Accuracy of always giving each question's majority training answer, over every question of ``y_eval``."""
    guess = majority_answers(y_train, len(volume_bank()[1]))
    return float((y_eval.long() == guess[None]).float().mean())


@torch.no_grad()
def vqa_accuracy(victim: VLM3DVictim, x: torch.Tensor, y: torch.Tensor, batch_size: int = 32) -> float:
    """Mean clean ``vqa_accuracy`` of ``victim`` on volumes ``x``."""
    victim.eval()
    return float(torch.cat([victim.evaluate(x[i:i + batch_size], y[i:i + batch_size])["vqa_accuracy"]
                            for i in range(0, len(x), batch_size)]).mean())


def patch_histograms(mask: torch.Tensor, patch: Sequence[int], n_classes: int = 6) -> torch.Tensor:
    """Per-patch class histograms [B, P, K] of volume masks [B, D, H, W] (the encoder pre-training target)."""
    onehot = F.one_hot(mask.long(), n_classes).permute(0, 4, 1, 2, 3).float()
    return F.avg_pool3d(onehot, tuple(patch)).flatten(2).transpose(1, 2)


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 5 %."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.05 + 0.475 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def _lesion_bce(logits: torch.Tensor, lesion_voxels: torch.Tensor, least: int, keep: torch.Tensor | None = None,
                positive: torch.Tensor | None = None) -> torch.Tensor:
    """BCE of per-patch logits [B, P]: positive where ``positive`` (default: every patch) holds ≥ ``least`` lesion
    voxels, negative without lesion voxels, ignored in between and where ``keep`` [B] is False; positives ×10 (about
    one patch in a hundred holds a lesion)."""
    pos = (lesion_voxels >= least) & (positive[:, None] if positive is not None else True)
    weight = ((lesion_voxels == 0) | pos) & (keep[:, None] if keep is not None else True)
    return F.binary_cross_entropy_with_logits(logits, pos.float(), weight=weight.float(), pos_weight=logits.new_tensor(10.0))


def _detector_loss(logits: torch.Tensor, lesion_voxels: torch.Tensor, kind: torch.Tensor, count: torch.Tensor,
                   least: int) -> torch.Tensor:
    """Multiple-instance loss of the detector maps, max-pooled per patch [B, 3, P]: channel 0 lesion, 1 cyst and
    2 tumour (the type channels learn from volumes with one lesion, whose type is known)."""
    single = count == 1
    return (_lesion_bce(logits[:, 0], lesion_voxels, least)
            + _lesion_bce(logits[:, 1], lesion_voxels, least, single | (count == 0), kind == 1)
            + _lesion_bce(logits[:, 2], lesion_voxels, least, single | (count == 0), kind == 2))


def pretrain_encoder(encoder: VisionEncoder3D, z: torch.Tensor, mask: torch.Tensor, kind: torch.Tensor,
                     count: torch.Tensor, recipe: EncoderRecipe, progress: bool = False) -> dict[str, Any]:
    """Stage 1 (module docstring). 1a: the convolutional detector (stem and detector maps) alone, multiple-instance
    BCE of its per-patch maxima (:func:`_detector_loss`), ``detector_steps``. 1b: with the detector frozen, the
    token path (patch embedding, detector read-out, position embedding, transformer) predicts each patch's anatomy
    histogram and lesion presence through a linear head (discarded), ``token_steps``."""
    from robustbench_med.training import _progress

    cells, least = encoder.patch, recipe.least_voxels
    lesion_voxels = torch.cat([patch_histograms(mask[i:i + 64], cells)[..., 5] for i in range(0, len(mask), 64)]) * math.prod(cells)
    gen = torch.Generator().manual_seed(recipe.seed)
    bar = _progress(recipe.detector_steps + recipe.token_steps, "pre-train the vlm3d encoder", progress)
    encoder.train()
    detector = list(encoder.stem.parameters()) + list(encoder.detector.parameters())
    opt = torch.optim.AdamW(detector, lr=recipe.lr, weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: _lr_factor(t, recipe.detector_steps, recipe.warmup))
    batches, det_loss = _batches(len(z), recipe.batch_size, gen), torch.zeros(())
    for _ in range(recipe.detector_steps):
        idx = next(batches).to(z.device)
        logits = F.max_pool3d(encoder.detector(encoder.stem(z[idx])), cells).flatten(2)
        det_loss = _detector_loss(logits, lesion_voxels[idx], kind[idx], count[idx], least)
        opt.zero_grad(set_to_none=True)
        det_loss.backward()
        opt.step()
        sched.step()
        bar.update(1)
    for p in detector:
        p.requires_grad_(False)
    with torch.no_grad():
        maps = torch.cat([encoder.detector(encoder.stem(z[i:i + 16])) for i in range(0, len(z), 16)])
    head = nn.Linear(encoder.norm.normalized_shape[0], 7).to(z.device)
    params = [p for p in encoder.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: _lr_factor(t, recipe.token_steps, recipe.warmup))
    tok_loss = torch.zeros(())
    for _ in range(recipe.token_steps):
        idx = next(batches).to(z.device)
        hist = patch_histograms(mask[idx], cells)
        out = head(encoder.tokens(z[idx], maps[idx]))
        tok_loss = -(hist * out[..., :6].log_softmax(-1)).sum(-1).mean() + _lesion_bce(out[..., 6], lesion_voxels[idx], least)
        opt.zero_grad(set_to_none=True)
        tok_loss.backward()
        opt.step()
        sched.step()
        bar.update(1)
    bar.close()
    for p in detector:
        p.requires_grad_(True)
    return {"detector_loss": round(float(det_loss.detach()), 4), "token_loss": round(float(tok_loss.detach()), 4)}


@torch.no_grad()
def lesion_auc(encoder: VisionEncoder3D, z: torch.Tensor, label: torch.Tensor) -> float:
    """Volume-level ROC AUC of the detector (its largest channel-0 response) for lesion presence."""
    from robustbench_med.victims.classifier3d import roc_auc

    score = torch.cat([encoder.detector(encoder.stem(z[i:i + 16]))[:, 0].flatten(1).amax(1) for i in range(0, len(z), 16)])
    return roc_auc(score.cpu(), label.cpu())


def encoder_key(cfg: VLM3DConfig, recipe: EncoderRecipe, fingerprint: str) -> str:
    """The cache key of a pre-trained encoder: its sizes, its recipe, the training data and :data:`TRAINER_VERSION`."""
    import hashlib
    import json

    fields = {k: v for k, v in asdict(cfg).items() if k in ("input_size", "patch", "stem", "width", "heads",
                                                             "encoder_layers", "mlp_hidden")}
    blob = json.dumps({"v": TRAINER_VERSION, "cfg": fields, "recipe": asdict(recipe), "data": fingerprint}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def pretrained_encoder(cfg: VLM3DConfig, recipe: EncoderRecipe, device: torch.device, progress: bool = False
                       ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The stage-1 encoder state dict shared by every vlm3d victim with these sizes (trained once, then cached under
    ``<home>/weights/vlm3d-encoder-<key>.safetensors``, with a file lock) and its sidecar."""
    from filelock import FileLock
    from safetensors.torch import load_file

    from robustbench_med import paths
    from robustbench_med.api import create_dataset
    from robustbench_med.weights import read_sidecar, save_weights

    train = create_dataset(recipe.dataset, split="train", n=recipe.n_train)
    path = paths.weights_dir() / f"vlm3d-encoder-{encoder_key(cfg, recipe, train.fingerprint())}.safetensors"
    with FileLock(str(path) + ".lock"):
        if not path.exists():
            torch.manual_seed(recipe.seed)
            encoder = VisionEncoder3D(cfg).to(device)
            z = ((train.images() - VOLUME_MEAN[0]) / VOLUME_STD[0]).to(device)
            start, cpu = time.perf_counter(), time.process_time()
            losses = pretrain_encoder(encoder, z, train.targets("mask").to(device), train.targets("lesion_type").to(device),
                                      train.targets("n_lesions").to(device), recipe, progress)
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
            val = create_dataset(recipe.dataset, split="val", n=recipe.n_val)
            auc = lesion_auc(encoder.eval(), ((val.images() - VOLUME_MEAN[0]) / VOLUME_STD[0]).to(device),
                             val.targets("label").to(device))
            save_weights(encoder, path, {"recipe": asdict(recipe), "config": asdict(cfg), "train_fingerprint": train.fingerprint(),
                                         "train_seconds": round(seconds, 1), "train_cpu_seconds": round(cpu, 1),
                                         "val_lesion_auc": round(auc, 4), **losses, "trainer_version": TRAINER_VERSION,
                                         "train_threads": torch.get_num_threads(), "torch": torch.__version__})
    return load_file(str(path)), read_sidecar(path)


@torch.no_grad()
def encode_all(encoder: VisionEncoder3D, z: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Encoder tokens of every normalised volume of ``z`` (stage 2 trains on them: the encoder is frozen)."""
    encoder.eval()
    return torch.cat([encoder(z[i:i + batch_size]) for i in range(0, len(z), batch_size)])


def align_projector(victim: VLM3DVictim, tokens: torch.Tensor, y: torch.Tensor, recipe: VLM3DRecipe,
                    gen: torch.Generator) -> float:
    """Stage 2a, before the LM reads the projector (as BLIP-2 trains its Q-Former alone first): the projector learns,
    from frozen encoder tokens, to carry the answers: a linear probe (discarded) on the mean and the maximum over its
    output tokens predicts the answer of every question type."""
    types = list(dict.fromkeys(victim.question_types))
    first = torch.tensor([victim.question_types.index(t) for t in types], device=tokens.device)
    n_answers = len(volume_bank()[1])
    probe = nn.Linear(2 * victim.cfg.lm_width, len(types) * n_answers).to(tokens.device)
    params = list(victim.projector.parameters()) + list(probe.parameters())
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    batches, loss = _batches(len(tokens), recipe.batch_size, gen), torch.zeros(())
    for _ in range(recipe.align_steps):
        idx = next(batches).to(tokens.device)
        vis = victim.projector(tokens[idx])
        logits = probe(torch.cat([vis.mean(1), vis.amax(1)], -1)).view(len(idx), len(types), n_answers)
        loss = F.cross_entropy(logits.flatten(0, 1), y[idx][:, first].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return round(float(loss.detach()), 4)


def train_vlm3d(victim: VLM3DVictim, recipe: VLM3DRecipe, device: str | torch.device = "cpu",
                progress: bool = False) -> dict[str, Any]:
    """Train ``victim`` in place: load (or first train) the shared stage-1 encoder, freeze it, then train projector and
    LM on the teacher-forced answer loss (module docstring); return the validation metrics, the answer prior and the
    timing."""
    from robustbench_med.api import create_dataset
    from robustbench_med.training import _progress

    device = torch.device(device)
    state, encoder_meta = pretrained_encoder(victim.cfg, recipe.encoder, device, progress)
    victim.encoder.load_state_dict(state)
    victim.to(device)
    train = create_dataset(recipe.dataset, split="train", n=recipe.n_train)
    val = create_dataset(recipe.dataset, split="val", n=recipe.n_val)
    x, y = train.images().to(device), train.targets("vqa").to(device)
    start, cpu = time.perf_counter(), time.process_time()
    tokens = encode_all(victim.encoder, (x - victim.mean) / victim.std)
    victim.encoder.requires_grad_(False)
    gen = torch.Generator().manual_seed(recipe.seed)
    align_loss = align_projector(victim, tokens, y, recipe, gen) if recipe.align_steps else None
    params = [p for p in victim.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: _lr_factor(t, recipe.steps, recipe.warmup))
    n_q = y.shape[1]
    presence = torch.tensor([i for i, t in enumerate(victim.question_types) if t == "presence"])
    batches, loss = _batches(len(x), recipe.batch_size, gen), torch.zeros(())
    bar = _progress(recipe.steps, f"train {victim.card.name}", progress)
    victim.train()
    for step in range(recipe.steps):
        idx = next(batches).to(device)
        q = torch.argsort(torch.rand(len(idx), n_q, generator=gen), 1)[:, :recipe.questions_per_volume]
        mix = 1.0 if step < recipe.grounding_steps else recipe.grounding_mix
        ground = torch.rand(q.shape, generator=gen) < mix
        q = torch.where(ground, presence[torch.randint(0, len(presence), q.shape, generator=gen)], q).to(device)
        loss = victim.answer_loss_from_tokens(victim.projector(tokens[idx]), y[idx], q).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    victim.encoder.requires_grad_(True)
    victim.eval()
    xv, yv = val.images().to(device), val.targets("vqa").to(device)
    return {
        "val_vqa_accuracy": vqa_accuracy(victim, xv, yv),
        "val_prior_accuracy": prior_accuracy(y.cpu(), yv.cpu()),
        "train_seconds": round(seconds, 1),
        "train_cpu_seconds": round(cpu, 1),
        "final_loss": round(float(loss.detach()), 4),
        "align_loss": align_loss,
        "encoder": {k: encoder_meta.get(k) for k in ("sha256", "train_seconds", "train_cpu_seconds", "val_lesion_auc")},
        "train_fingerprint": train.fingerprint(),
    }


def registry_trainer(name: str, path: Path, device: str | torch.device | None, progress: bool) -> None:
    """The registered ``trainer`` of the 3D VLMs: train with the recipe and write weights + sidecar to ``path``."""
    from robustbench_med.victims.lvlm.train import train_and_save

    train_and_save(name, path, train_vlm3d, TRAINER_VERSION, device, progress)


# -------------------------------------------------------------------------------------------------- registration
def _card(name: str, cfg: VLM3DConfig, notes: str, seed: int = 0, params: int | None = None) -> VictimCard:
    from robustbench_med.data.phantom import ANSWERS

    return VictimCard(
        name=name, task="vqa", modality="CT (volume phantom)", input_size=cfg.input_size, classes=ANSWERS,
        paper=PAPERS[cfg.projector], notes=notes, params=params,
        extra={"family": "vlm3d", "projector": "uncompressed" if cfg.projector == "mlp" else "compressed",
               "projector_kind": cfg.projector, "visual_tokens": cfg.visual_tokens, "encoder_tokens": cfg.encoder_tokens,
               "patch": list(cfg.patch), "lm": "GPT2LMHeadModel", "target_field": "vqa",
               "study": STUDY, "arm": "uncompressed" if cfg.projector == "mlp" else "compressed", "training_seed": seed},
    )


NOTES = {
    "mlp": "tiny 3D ViT (8³ patches, 144 tokens) → per-token MLP → GPT-2-style LM (2 layers, width 64); trained on "
           "the volume phantom's VQA bank",
    "perceiver": "tiny 3D ViT (8³ patches, 144 tokens) → 8 learned queries, 2 cross-attention layers (Perceiver "
                 "Resampler design) → GPT-2-style LM (2 layers, width 64); trained on the volume phantom's VQA bank; "
                 "not M3D-LaMed's spatial-pooling perceiver",
}


def _register(projector: str) -> None:
    cfg = VLM3DConfig(projector=projector)
    for seed in TRAINING_SEEDS:
        name = f"vlm3d.{projector}" + (f"_s{seed}" if seed else "")
        note = NOTES[projector] + (f" (training seed {seed})" if seed else "")

        def factory(_name: str = name, _note: str = note, _seed: int = seed, max_new_tokens: int = 2) -> VLM3DVictim:
            victim = VLM3DVictim(cfg, _card(_name, cfg, _note, _seed), max_new_tokens=max_new_tokens)
            victim.card = replace(victim.card, params=count_parameters(victim))
            return victim.eval()

        factory.__doc__ = f"{name}: {note}."
        register_victim(name, card=_card(name, cfg, note, seed), recipe=VLM3DRecipe(seed=seed, encoder=EncoderRecipe(seed=seed)),
                        trainer=registry_trainer,
                        trainer_version=TRAINER_VERSION, task="vqa")(factory)


for _projector in PROJECTORS:
    _register(_projector)
