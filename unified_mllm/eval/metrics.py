"""Benchmark metrics on answers and judge verdicts: VQA exact match, POPE's yes/no figures, GenEval accuracy.

* **Answer normalisation** (:func:`normalize_answer`), applied to the prediction and the ground truth alike:
  lower-case; punctuation becomes a space; number words become digits ("three" and "3" are the same answer);
  the articles "a", "an", "the" are dropped (as the VQA benchmark's own normalisation does); runs of spaces
  collapse. A prediction is right when its normal form equals the answer's.
* **VQA accuracy** (:func:`vqa_accuracy`): per question type and ``overall`` over all questions (each question
  weighs the same); ``macro`` is the mean of the per-type accuracies.
* **POPE** (:func:`pope_metrics`) over yes/no questions whose right answer is "yes" (positive) or "no": a
  prediction counts as "no" when its normal form contains the word "no" or "not", else as "yes" — POPE's own
  rule, so an answer that is neither is a "yes" (``unclear`` counts them). Accuracy, precision, recall, F1 of
  the "yes" class and the yes-ratio (the fraction of "yes" predictions). A ratio with a zero denominator is 0.
* **GenEval accuracy** (:func:`geneval_scores`): per category and ``overall`` as GenEval reports it, the mean of
  the per-category accuracies; ``micro`` weighs every prompt the same.

Accuracies of empty groups are ``None`` (JSON null), never NaN.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from typing import Any

from unified_mllm.data.shapes import CATEGORIES, VQA_TYPES

_NUMBER_WORDS = (  # noqa: SIM905 - a list literal would take one line per word
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty"
).split()
NUMBER_DIGITS: dict[str, str] = {word: str(i) for i, word in enumerate(_NUMBER_WORDS)}
ARTICLES = frozenset({"a", "an", "the"})
_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")
NEGATIONS = frozenset({"no", "not"})


def normalize_answer(text: str) -> str:
    """The comparable form of an answer: "Three." -> "3", "The Circle!" -> "circle", " Yes " -> "yes"."""
    words = _PUNCTUATION.sub(" ", text.lower()).split()
    return " ".join(NUMBER_DIGITS.get(w, w) for w in words if w not in ARTICLES)


def answers_match(prediction: str, answer: str) -> bool:
    """Exact match after :func:`normalize_answer` on both sides."""
    return normalize_answer(prediction) == normalize_answer(answer)


def ratio(numerator: int, denominator: int) -> float | None:
    """``numerator / denominator``, or None for an empty group."""
    return numerator / denominator if denominator else None


def _ordered(keys: set[str], canonical: Sequence[str]) -> list[str]:
    """Known keys in their canonical order, then any others sorted (user data may bring new types)."""
    return [k for k in canonical if k in keys] + sorted(keys - set(canonical))


def _grouped_accuracy(
    groups: Sequence[str], correct: Sequence[bool], canonical: Sequence[str], *, macro_overall: bool, per: str
) -> dict[str, Any]:
    """``overall`` (the mean of the group accuracies when ``macro_overall``, else over all items), the other of
    the two (``micro`` / ``macro``), the totals, and per group {accuracy, correct, total} under ``per``."""
    if len(groups) != len(correct):
        raise ValueError(f"got {len(groups)} group labels but {len(correct)} verdicts")
    per_group = {}
    for group in _ordered(set(groups), canonical):
        hits = sum(bool(c) for g, c in zip(groups, correct, strict=True) if g == group)
        total = sum(g == group for g in groups)
        per_group[group] = {"accuracy": ratio(hits, total), "correct": hits, "total": total}
    accuracies = [g["accuracy"] for g in per_group.values()]
    hits = sum(bool(c) for c in correct)
    micro = ratio(hits, len(correct))
    macro = sum(accuracies) / len(accuracies) if accuracies else None
    head = {"overall": macro, "micro": micro} if macro_overall else {"overall": micro, "macro": macro}
    return {**head, "correct": hits, "total": len(correct), per: per_group}


def vqa_accuracy(types: Sequence[str], answers: Sequence[str], predictions: Sequence[str]) -> dict[str, Any]:
    """Exact-match accuracy per question type (``per_type``) and ``overall`` (every question weighs the same)."""
    if not len(types) == len(answers) == len(predictions):
        raise ValueError(
            f"types, answers and predictions must align, got {len(types)}, {len(answers)}, {len(predictions)}"
        )
    correct = [answers_match(p, a) for p, a in zip(predictions, answers, strict=True)]
    return _grouped_accuracy(types, correct, VQA_TYPES, macro_overall=False, per="per_type")


def yes_no(prediction: str) -> str:
    """POPE's reading of a free-form answer: "no" when it says "no" or "not", else "yes"."""
    return "no" if NEGATIONS & set(normalize_answer(prediction).split()) else "yes"


def pope_metrics(answers: Sequence[str], predictions: Sequence[str]) -> dict[str, Any]:
    """POPE's figures for yes/no questions: accuracy, precision, recall, F1 (of "yes"), yes-ratio.

    ``answers`` are the right answers ("yes"/"no", any case or punctuation); ``predictions`` the model's
    free-form answers, read by :func:`yes_no`. Also returned: the confusion counts ``tp, fp, tn, fn``, the
    number of questions and ``unclear`` (predictions that were neither exactly "yes" nor "no").
    """
    if len(answers) != len(predictions):
        raise ValueError(f"got {len(answers)} answers but {len(predictions)} predictions")
    truth = [normalize_answer(a) for a in answers]
    bad = sorted({a for a in truth if a not in ("yes", "no")})
    if bad:
        raise ValueError(f"POPE needs yes/no ground truth, got answers {bad[:5]}")
    read = [yes_no(p) for p in predictions]
    pairs = Counter(zip(truth, read, strict=True))  # (truth, read) -> count
    tp, fp, tn, fn = (pairs[t, r] for t, r in (("yes", "yes"), ("no", "yes"), ("no", "no"), ("yes", "no")))
    precision, recall = ratio(tp, tp + fp) or 0.0, ratio(tp, tp + fn) or 0.0
    return {
        "accuracy": ratio(tp + tn, len(truth)),
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_ratio": ratio(tp + fp, len(truth)),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "total": len(truth),
        "unclear": sum(normalize_answer(p) not in ("yes", "no") for p in predictions),
    }


def geneval_scores(categories: Sequence[str], correct: Sequence[bool]) -> dict[str, Any]:
    """GenEval's aggregation of judge verdicts: accuracy ``per_category``, ``overall`` = their mean, ``micro``."""
    return _grouped_accuracy(categories, correct, CATEGORIES, macro_overall=True, per="per_category")
