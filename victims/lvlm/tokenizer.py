"""A word-level tokenizer for the tiny LVLMs, built offline from the phantom VQA bank with ``tokenizers``.

The real checkpoints ship BPE / SentencePiece vocabularies; the project-trained tiny victims instead use a closed
word-level vocabulary (Hugging Face ``tokenizers`` ``WordLevel`` model, Whitespace pre-tokeniser, lower-casing) that
covers every word of the question bank, the answers and the prompt templates of the three families. Building it is
deterministic (the corpus is fixed), so a tiny checkpoint's tokenizer can always be rebuilt; it is also saved with the
checkpoint by ``save_pretrained``.
"""
from __future__ import annotations

from typing import Iterable

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", "<image>")
IMAGE_TOKEN = "<image>"


def vqa_corpus(extra: Iterable[str] = ()) -> list[str]:
    """Every text the tiny LVLMs read or write: questions, answers, the family prompt templates, ``extra``."""
    from robustbench_med.data.phantom import ANSWERS, QUESTIONS
    from robustbench_med.victims.lvlm.templates import TEMPLATES

    lines = [q.text for q in QUESTIONS] + list(ANSWERS)
    lines += [t.prompt.replace("{question}", "") for t in TEMPLATES.values()]
    return lines + list(extra)


def build_word_tokenizer(corpus: Iterable[str] | None = None):
    """A ``PreTrainedTokenizerFast`` over the words of ``corpus`` (default :func:`vqa_corpus`) that prepends ``<s>``.

    Special tokens: ``<pad>`` 0, ``<unk>`` 1, ``<s>`` 2, ``</s>`` 3, ``<image>`` 4 (the image placeholder).
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    wl = Tokenizer(models.WordLevel(unk_token="<unk>"))
    wl.normalizer = normalizers.Lowercase()
    wl.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=list(SPECIAL_TOKENS), min_frequency=1)
    wl.train_from_iterator(sorted(set(corpus if corpus is not None else vqa_corpus())), trainer)
    wl.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=wl, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>", padding_side="left"
    )
