"""Tiny BLIP-2 / InstructBLIP / LLaVA configurations and processors, and loading of real checkpoints.

The tiny models keep the published architectures (ViT vision tower; Q-Former with learned query tokens, or a
two-layer MLP projector; OPT or Llama decoder) at toy width so the project can train them on the phantom VQA bank
on a CPU in about a minute. The vision tower reads the phantom's 64×64 slices directly (patch 8: 64 patches), so
LLaVA passes 64 visual tokens to its LM while the Q-Former compresses them into 8 query tokens.

The modules that must learn to *select* the few lesion patches among the visual tokens are initialised with a
wider normal than transformers' 0.02: the LM (std 0.1; it attends over LLaVA's 64 visual tokens) and the Q-Former
(std 0.2; its cross-attention pools the patches into the query tokens). With the default, attention stays uniform,
the lesion signal is averaged away and the tiny models settle in the answer priors within their training budget.

Initialisation traps (``stack.md`` §5.6): BLIP-2 / InstructBLIP create ``query_tokens`` as zeros, which makes every
Q-Former cross-attention map uniform and its gradient (almost) zero at random init; the tiny builders draw the query
tokens from N(0, 1) instead. ``Blip2VisionConfig`` / ``InstructBlipVisionConfig`` default to ``initializer_range =
1e-10``, so an untrained BLIP vision tower maps every image to (almost) the same tokens and its pixel gradients are
~1e-11; the tiny configs set the vision towers' range to 0.02 (CLIP's default, which LLaVA's tower already uses).

Encoder–decoder variants (``TinyLVLMConfig(language_model="t5")``; BLIP-2 / InstructBLIP only): the OPT decoder is
replaced by a Flan-T5-style ``T5ForConditionalGeneration`` (``T5Config``: gated-GELU feed-forward, relative position
buckets, ``tie_word_embeddings=False`` as in the Flan-T5 checkpoints, i.e. no rescaling of the decoder output) of the
same width and depth, with ``decoder_start_token_id`` = ``pad_token_id`` = 0 (``<pad>`` of the word-level tokenizer,
T5's convention); the model's ``use_decoder_only_language_model`` is then False. Flan-T5 is the language model of
the QAVA (arXiv 2504.11038) and PIP victims. T5 initialises with its own scheme (``initializer_factor``, no
``initializer_range``). transformers 5 (``T5Config``) always ties a freshly built T5's ``lm_head`` to the shared
input embedding (a real Flan-T5 checkpoint, whose head differs, is loaded untied), so the tiny T5 has one embedding
for encoder, decoder and head, without the rescaling; at random init its greedy answers are therefore the start token
(<pad>, decoded as empty) until it is trained. Trained by the registered recipe (1 thread, quiet machine: 35 s /
45 s), ``blip2.tiny_t5`` / ``instructblip.tiny_t5`` reach a validation VQA accuracy of 0.75 / 0.77 against a
majority-answer baseline of 0.50.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from robustbench_med.errors import ConfigError

MODEL_CLASSES = {
    "blip2": "Blip2ForConditionalGeneration",
    "instructblip": "InstructBlipForConditionalGeneration",
    "llava": "LlavaForConditionalGeneration",
}
LANGUAGE_MODELS = ("opt", "t5")  # of the tiny BLIP-2 / InstructBLIP: decoder-only OPT or encoder-decoder Flan-T5 style
PROCESSOR_CLASSES = {"blip2": "Blip2Processor", "instructblip": "InstructBlipProcessor", "llava": "LlavaProcessor"}


@dataclass(frozen=True)
class TinyLVLMConfig:
    """Width and depth of a tiny LVLM (shared by the vision tower, Q-Former and LM)."""

    hidden: int = 64
    intermediate: int = 128
    heads: int = 4
    vision_layers: int = 2
    qformer_layers: int = 2
    text_layers: int = 2
    image_size: int = 64
    patch_size: int = 8
    num_query_tokens: int = 8
    text_init_range: float = 0.1
    qformer_init_range: float = 0.2
    vision_init_range: float = 0.02
    language_model: str = "opt"  # BLIP-2 / InstructBLIP: 'opt' (decoder-only) or 't5' (encoder-decoder); LLaVA: Llama
    t5_init_factor: float = 1.0


def _transformers_class(name: str) -> Any:
    import transformers

    return getattr(transformers, name)


def tiny_model_config(family: str, vocab_size: int, image_token_id: int, cfg: TinyLVLMConfig) -> Any:
    """The ``transformers`` config object of a tiny model of ``family``."""
    from transformers import Blip2Config, InstructBlipConfig, LlavaConfig

    h, inter, heads = cfg.hidden, cfg.intermediate, cfg.heads
    vision = dict(hidden_size=h, intermediate_size=inter, num_hidden_layers=cfg.vision_layers, num_attention_heads=heads,
                  image_size=cfg.image_size, patch_size=cfg.patch_size, initializer_range=cfg.vision_init_range)
    special = dict(pad_token_id=0, bos_token_id=2, eos_token_id=3, tie_word_embeddings=False, initializer_range=cfg.text_init_range)
    if family == "llava":
        if cfg.language_model != "opt":
            raise ConfigError("tiny LLaVA has a Llama decoder; language_model='t5' is for BLIP-2 / InstructBLIP")
        llama = dict(model_type="llama", vocab_size=vocab_size, hidden_size=h, num_hidden_layers=cfg.text_layers,
                     intermediate_size=inter, num_attention_heads=heads, num_key_value_heads=heads,
                     max_position_embeddings=512, **special)
        return LlavaConfig(vision_config=dict(model_type="clip_vision_model", projection_dim=h, **vision), text_config=llama,
                           image_token_index=image_token_id, vision_feature_layer=-1,
                           vision_feature_select_strategy="default", tie_word_embeddings=False)
    if cfg.language_model not in LANGUAGE_MODELS:
        raise ConfigError(f"language_model must be one of {LANGUAGE_MODELS}, got {cfg.language_model!r}")
    opt = dict(model_type="opt", vocab_size=vocab_size, hidden_size=h, num_hidden_layers=cfg.text_layers, ffn_dim=inter,
               num_attention_heads=heads, word_embed_proj_dim=h, max_position_embeddings=512, **special)
    qformer = dict(hidden_size=h, num_hidden_layers=cfg.qformer_layers, num_attention_heads=heads, intermediate_size=inter,
                   vocab_size=vocab_size, max_position_embeddings=128, pad_token_id=0, cross_attention_frequency=1,
                   initializer_range=cfg.qformer_init_range)
    text = opt
    if cfg.language_model == "t5":
        text = dict(model_type="t5", vocab_size=vocab_size, d_model=h, d_kv=h // heads, d_ff=inter, num_layers=cfg.text_layers,
                    num_decoder_layers=cfg.text_layers, num_heads=heads, feed_forward_proj="gated-gelu", pad_token_id=0,
                    eos_token_id=3, decoder_start_token_id=0, tie_word_embeddings=False, initializer_factor=cfg.t5_init_factor)
    config_cls = Blip2Config if family == "blip2" else InstructBlipConfig
    return config_cls(vision_config=vision, qformer_config=qformer, text_config=text, num_query_tokens=cfg.num_query_tokens,
                      image_token_index=image_token_id, tie_word_embeddings=False)


def tiny_processor(family: str, tokenizer: Any, cfg: TinyLVLMConfig) -> Any:
    """The family's processor over the word-level ``tokenizer`` at the tiny image size."""
    from transformers import BlipImageProcessor, CLIPImageProcessor

    size = {"height": cfg.image_size, "width": cfg.image_size}
    if family == "llava":
        ip = CLIPImageProcessor(size={"shortest_edge": cfg.image_size}, crop_size=size)
        return _transformers_class("LlavaProcessor")(
            image_processor=ip, tokenizer=tokenizer, patch_size=cfg.patch_size, vision_feature_select_strategy="default",
            image_token="<image>", num_additional_image_tokens=1)
    ip = BlipImageProcessor(size=size)
    if family == "blip2":
        return _transformers_class("Blip2Processor")(image_processor=ip, tokenizer=tokenizer, num_query_tokens=cfg.num_query_tokens)
    return _transformers_class("InstructBlipProcessor")(image_processor=ip, tokenizer=tokenizer, qformer_tokenizer=tokenizer,
                                                        num_query_tokens=cfg.num_query_tokens)


def build_tiny(family: str, cfg: TinyLVLMConfig = TinyLVLMConfig()) -> tuple[Any, Any]:
    """A randomly initialised tiny model of ``family`` (eager attention) and its processor."""
    from robustbench_med.victims.lvlm.tokenizer import IMAGE_TOKEN, build_word_tokenizer

    if family not in MODEL_CLASSES:
        raise ConfigError(f"unknown LVLM family {family!r}; choose one of {tuple(MODEL_CLASSES)}")
    tok = build_word_tokenizer()
    processor = tiny_processor(family, tok, cfg)
    image_token_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    config = tiny_model_config(family, len(processor.tokenizer), image_token_id, cfg)
    model = _transformers_class(MODEL_CLASSES[family])._from_config(config, attn_implementation="eager")
    if family != "llava":
        with torch.no_grad():
            model.query_tokens.normal_(0.0, 1.0)
    return model.eval(), processor


def load_pretrained(family: str, path: str, dtype: torch.dtype | None = None) -> tuple[Any, Any]:
    """A real (or saved tiny) checkpoint of ``family`` and its processor from a hub name or local directory."""
    if family not in MODEL_CLASSES:
        raise ConfigError(f"unknown LVLM family {family!r}; choose one of {tuple(MODEL_CLASSES)}")
    kw: dict[str, Any] = {"attn_implementation": "eager"}
    if dtype is not None:
        kw["dtype"] = dtype
    model = _transformers_class(MODEL_CLASSES[family]).from_pretrained(path, **kw)
    processor = _transformers_class(PROCESSOR_CLASSES[family]).from_pretrained(path)
    return model.eval(), processor
