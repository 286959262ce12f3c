"""Vision-language victims: BLIP-2, InstructBLIP and LLaVA (phantom VQA) and a CLIP-style zero-shot classifier.

Registered names:

| name | what |
|---|---|
| ``blip2.tiny``, ``instructblip.tiny``, ``llava.tiny`` | tiny models of the real ``transformers`` classes, trained by the project on the phantom VQA bank (``robustbench-med train <name>``) |
| ``blip2.tiny_s1``, ``instructblip.tiny_s1``, ``llava.tiny_s1`` | the same, trained with seed 1: surrogates of the transfer attacks |
| ``blip2.tiny_t5``, ``instructblip.tiny_t5`` (and ``*.tiny_t5_s1``) | the same Q-Former models with an encoder–decoder Flan-T5-style language model (``T5ForConditionalGeneration`` inside the real BLIP-2 / InstructBLIP classes): the LMs of the QAVA (arXiv 2504.11038) and PIP victims |
| ``blip2.hf``, ``instructblip.hf``, ``llava.hf`` | real checkpoints: ``create_victim('llava.hf', weights=None, path=DIR_OR_HUB_NAME)`` |
| ``clip_zs.tiny`` | open_clip CLIP zero-shot lesion-type classifier with per-class prompt ensembles (cosine; not CARZero) |

The VQA victims take keyword arguments of the "phantom VQA m+n" protocol (``n_eval``, ``eval_pool``,
``eval_questions``, ``eval_seed``) and ``max_new_tokens``; see :class:`~robustbench_med.victims.lvlm.models.LVLMVictim`.
"""
from __future__ import annotations

from typing import Any

import torch

from robustbench_med.errors import ConfigError
from robustbench_med.registry import register_victim
from robustbench_med.training import TrainRecipe
from robustbench_med.victim import VictimCard
from robustbench_med.victims.lvlm import clip_zeroshot as _clip_zeroshot  # noqa: F401
from robustbench_med.victims.lvlm.configs import TinyLVLMConfig, build_tiny, load_pretrained
from robustbench_med.victims.lvlm.models import LVLMVictim
from robustbench_med.victims.lvlm.train import TRAINER_VERSION, registry_trainer

PHANTOM_INPUT = (1, 64, 64)
PAPERS = {
    "blip2": "Li et al., BLIP-2, ICML 2023 (Q-Former: compressed projector)",
    "instructblip": "Dai et al., InstructBLIP, NeurIPS 2023 (instruction-aware Q-Former: compressed projector)",
    "llava": "Liu et al., LLaVA-1.5, CVPR 2024 (MLP: uncompressed projector)",
}


def _card(name: str, family: str, visual_tokens: int, input_size: tuple[int, int, int], notes: str) -> VictimCard:
    from robustbench_med.data.phantom import ANSWERS

    return VictimCard(
        name=name, task="vqa", modality="CT (phantom)", input_size=input_size, classes=ANSWERS, paper=PAPERS[family],
        notes=notes,
        extra={"family": family, "projector": "uncompressed" if family == "llava" else "compressed", "visual_tokens": visual_tokens},
    )


T5_PAPERS = {
    "blip2": "Li et al., BLIP-2, ICML 2023 (Q-Former: compressed projector; Flan-T5 encoder-decoder LM, as in QAVA / PIP)",
    "instructblip": "Dai et al., InstructBLIP, NeurIPS 2023 (instruction-aware Q-Former: compressed projector; Flan-T5 "
                    "encoder-decoder LM, as in QAVA / PIP)",
}


def _t5_card(name: str, family: str, visual_tokens: int, notes: str) -> VictimCard:
    from dataclasses import replace

    card = _card(name, family, visual_tokens, PHANTOM_INPUT, notes)
    return replace(card, paper=T5_PAPERS[family], extra={**card.extra, "language_model": "t5 (encoder-decoder)"})


def _tiny(name: str, family: str, notes: str, language_model: str = "opt", **kw: Any) -> LVLMVictim:
    cfg = TinyLVLMConfig(language_model=language_model)
    model, processor = build_tiny(family, cfg)
    tokens = (cfg.image_size // cfg.patch_size) ** 2 if family == "llava" else cfg.num_query_tokens
    if language_model == "t5":
        return LVLMVictim(model, processor, family, _t5_card(name, family, tokens, notes), **kw)
    return LVLMVictim(model, processor, family, _card(name, family, tokens, PHANTOM_INPUT, notes), **kw)


def _pretrained(name: str, family: str, path: str | None, input_size=PHANTOM_INPUT, dtype: torch.dtype | str | None = None,
                max_new_tokens: int = 10, **kw: Any) -> LVLMVictim:
    if not path:
        raise ConfigError(f"{name} loads a real checkpoint: pass path=<hub name or local directory>")
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    model, processor = load_pretrained(family, str(path), dtype)
    victim = LVLMVictim(model, processor, family, _card(name, family, 0, tuple(input_size), f"checkpoint {path}"),
                        max_new_tokens=max_new_tokens, **kw)
    victim.card = _card(name, family, victim.n_visual_tokens, tuple(input_size), f"checkpoint {path}")
    if victim.encoder_decoder:
        from dataclasses import replace

        lm = f"{victim.language_model.config.model_type} (encoder-decoder)"
        victim.card = replace(victim.card, extra={**victim.card.extra, "language_model": lm})
    return victim


def _register_tiny(family: str, name: str, seed: int, note: str, doc: str, card: VictimCard, **model_kw: Any) -> None:
    """One tiny trained victim of ``family`` (the phantom VQA recipe with training seed ``seed``)."""
    recipe = TrainRecipe(dataset="phantom.ct", target_field="vqa", n_train=1200, n_val=300, epochs=6, batch_size=32,
                         lr=2e-3, seed=seed)

    def tiny_factory(**kw: Any) -> LVLMVictim:
        return _tiny(name, family, note, **model_kw, **kw)

    tiny_factory.__doc__ = doc
    register_victim(name, card=card, recipe=recipe, trainer=registry_trainer, trainer_version=TRAINER_VERSION,
                    task="vqa")(tiny_factory)


def _register_family(family: str) -> None:
    for tag, seed, note in (("tiny", 0, "tiny model trained on the phantom VQA bank"),
                            ("tiny_s1", 1, "seed-1 copy of the tiny model (transfer-attack surrogate)")):
        name = f"{family}.{tag}"
        _register_tiny(family, name, seed, note, f"Tiny {family} ({PAPERS[family]}); {note}.",
                       _card(name, family, 0, PHANTOM_INPUT, note))

    def hf_factory(path: str | None = None, **kw: Any) -> LVLMVictim:
        return _pretrained(f"{family}.hf", family, path, **kw)

    hf_factory.__doc__ = f"A real {family} checkpoint ({PAPERS[family]}) from a hub name or local directory (path=...)."
    register_victim(f"{family}.hf", card=_card(f"{family}.hf", family, 0, PHANTOM_INPUT, "real checkpoint"), recipe=None,
                    task="vqa")(hf_factory)


def _register_t5(family: str) -> None:
    """``<family>.tiny_t5`` / ``<family>.tiny_t5_s1``: the tiny Q-Former model with a Flan-T5-style encoder-decoder LM,
    trained by the same recipe and trainer as ``<family>.tiny`` (seed 0 / 1)."""
    for tag, seed, note in (("tiny_t5", 0, "tiny model with an encoder-decoder (Flan-T5-style) LM trained on the phantom VQA bank"),
                            ("tiny_t5_s1", 1, "seed-1 copy of the tiny encoder-decoder model (transfer-attack surrogate)")):
        name = f"{family}.{tag}"
        _register_tiny(family, name, seed, note, f"Tiny {family} with a Flan-T5-style LM ({T5_PAPERS[family]}); {note}.",
                       _t5_card(name, family, 0, note), language_model="t5")


for _family in ("blip2", "instructblip", "llava"):
    _register_family(_family)
for _family in ("blip2", "instructblip"):
    _register_t5(_family)
