"""Documented prompt templates of the three LVLM families (used for the tiny victims and real checkpoints alike).

* **BLIP-2** (Li et al., "BLIP-2: Bootstrapping Language-Image Pre-training with Frozen Image Encoders and Large
  Language Models", ICML 2023): zero-shot VQA prompt ``"Question: {question} Answer:"``; the 32 (tiny: 8) query
  outputs of the Q-Former are prepended to the text as ``<image>`` placeholders.
* **InstructBLIP** (Dai et al., "InstructBLIP: Towards General-purpose Vision-Language Models with Instruction
  Tuning", NeurIPS 2023): short-answer VQA prompt ``"Question: {question} Short answer:"``; the same text is the
  Q-Former's instruction, so the visual tokens depend on the question.
* **LLaVA-1.5** (Liu et al., "Improved Baselines with Visual Instruction Tuning", CVPR 2024): conversation prompt
  ``"USER: <image>\\n{question}\\nAnswer the question using a single word or phrase. ASSISTANT:"``; the ``<image>``
  placeholder expands to one token per vision patch.

Encoder–decoder (Flan-T5) language models (:data:`ENCODER_DECODER_TEMPLATES`, :func:`template_for`): the prompt, with
the visual tokens in front, is the *encoder* input and the answer is decoded from the decoder's start token. BLIP-2
(Li et al., ICML 2023, §4.2) prompts its FlanT5 models with ``"Question: {question} Short answer:"`` (its OPT models
with ``"... Answer:"``); InstructBLIP keeps its one instruction for both LM kinds. These templates are kept out of
:data:`TEMPLATES`, whose prompts make up the tiny victims' word-level vocabulary (every word is already in it).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PromptTemplate:
    """How a family turns a question into its LM prompt (and Q-Former instruction, if any)."""

    family: str
    prompt: str
    image_prefix: bool  # True: image tokens precede the whole prompt (BLIP); False: ``<image>`` sits inside it
    qformer_instruction: bool = False

    def render(self, question: str) -> str:
        return self.prompt.replace("{question}", question)


TEMPLATES: dict[str, PromptTemplate] = {
    "blip2": PromptTemplate("blip2", "Question: {question} Answer:", image_prefix=True),
    "instructblip": PromptTemplate("instructblip", "Question: {question} Short answer:", image_prefix=True, qformer_instruction=True),
    "llava": PromptTemplate(
        "llava", "USER: <image>\n{question}\nAnswer the question using a single word or phrase. ASSISTANT:", image_prefix=False
    ),
}

ENCODER_DECODER_TEMPLATES: dict[str, PromptTemplate] = {
    "blip2": PromptTemplate("blip2", "Question: {question} Short answer:", image_prefix=True),
    "instructblip": TEMPLATES["instructblip"],
}


def template_for(family: str, encoder_decoder: bool = False) -> PromptTemplate:
    """The prompt template of ``family`` with a decoder-only (default) or an encoder–decoder language model."""
    table = ENCODER_DECODER_TEMPLATES if encoder_decoder else TEMPLATES
    if family not in table:
        kind = "an encoder-decoder" if encoder_decoder else "a decoder-only"
        raise KeyError(f"no prompt template for family {family!r} with {kind} language model")
    return table[family]
