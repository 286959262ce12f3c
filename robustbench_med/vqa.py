"""VQA answer scoring: answer normalisation, exact match and the soft VQA accuracy.

Normalisation follows the official VQA evaluation (Antol et al., "VQA: Visual Question Answering", ICCV 2015;
``vqaEval.py`` / the EvalAI answer processor): lower-case, common contractions restored, punctuation removed (a
period between digits is kept), number words mapped to digits, articles dropped, whitespace collapsed.

* :func:`exact_match`: 1 if the normalised prediction equals any normalised reference.
* :func:`soft_vqa_accuracy`: ``min(1, #references matching / 3)`` (Antol et al., ICCV 2015): an answer given by three
  or more of the (usually ten) annotators scores 1. :func:`official_vqa_accuracy` is the released variant, the same
  quantity averaged over the leave-one-annotator-out subsets.
"""
from __future__ import annotations

import re
from itertools import combinations
from typing import Sequence

from robustbench_med.errors import ConfigError

_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})
_CONTRACTIONS = {"dont": "don't", "doesnt": "doesn't", "isnt": "isn't", "arent": "aren't", "cant": "can't",
                 "wont": "won't", "wasnt": "wasn't", "werent": "weren't", "hasnt": "hasn't", "havent": "haven't",
                 "didnt": "didn't", "couldnt": "couldn't", "shouldnt": "shouldn't", "wouldnt": "wouldn't",
                 "thats": "that's", "whats": "what's", "youre": "you're", "theyre": "they're", "im": "i'm"}
_PUNCT = re.compile(r"[;/\[\]\"{}()=+\\_\-><@`,?!*#%^&$~|:']")
_PERIOD = re.compile(r"(?<!\d)\.(?!\d)")
_COMMA_NUMBER = re.compile(r"(\d),(\d)")


def normalize_answer(text: str, *, keep_none: bool = True) -> str:
    """The VQA-normalised form of an answer (see the module docstring).

    ``keep_none`` leaves the word "none" as is (the VQA processor maps it to "0"; the phantom bank answers "none"
    for "which organ?" of a lesion-free scan, which must not match the count answer "0").
    """
    if not isinstance(text, str):
        raise ConfigError(f"an answer must be a string, got {type(text).__name__}")
    s = _COMMA_NUMBER.sub(r"\1\2", text.replace("\n", " ").replace("\t", " ").strip().lower())
    s = _PERIOD.sub("", _PUNCT.sub(" ", s.replace("'", "")))
    words = []
    for w in s.split():
        w = _CONTRACTIONS.get(w, w)
        if w == "none" and keep_none:
            words.append(w)
        elif w not in _ARTICLES:
            words.append(_NUMBERS.get(w, w))
    return " ".join(words)


def _refs(references: str | Sequence[str]) -> list[str]:
    refs = [references] if isinstance(references, str) else list(references)
    if not refs:
        raise ConfigError("at least one reference answer is needed")
    return [normalize_answer(r) for r in refs]


def exact_match(prediction: str, references: str | Sequence[str]) -> float:
    """1.0 if the normalised ``prediction`` equals one of the normalised ``references``, else 0.0."""
    return float(normalize_answer(prediction) in _refs(references))


def soft_vqa_accuracy(prediction: str, references: str | Sequence[str]) -> float:
    """``min(1, #matching references / 3)`` (Antol et al., ICCV 2015)."""
    pred = normalize_answer(prediction)
    return min(1.0, sum(r == pred for r in _refs(references)) / 3.0)


def official_vqa_accuracy(prediction: str, references: str | Sequence[str]) -> float:
    """The released VQA metric: the soft accuracy averaged over every subset leaving one reference out."""
    pred = normalize_answer(prediction)
    refs = _refs(references)
    if len(refs) == 1:
        return float(refs[0] == pred)
    subsets = list(combinations(refs, len(refs) - 1))
    return sum(min(1.0, sum(r == pred for r in sub) / 3.0) for sub in subsets) / len(subsets)
