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
