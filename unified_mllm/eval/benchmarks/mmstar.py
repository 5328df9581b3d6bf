"""MMStar (1 500 vision-indispensable questions): task ``mmstar``.

**Files** (either form, a file or a folder holding it):

* the official release, the Hugging Face dataset Lin-Chen/MMStar: ``mmstar.parquet`` (``index, question,
  image, answer, category, l2_category, meta_info``; the options are inside the question text, ``...\\nOptions:
  A: text, B: text, C: text, D: text``; the image is encoded bytes). Reading it needs pyarrow
  (``pip install 'unified_mllm[bench]'``).
* VLMEvalKit's ``MMStar.tsv`` (``index, question, A .. D, answer, category, l2-category, image``). When its
  question holds no ``Options:`` part, the options are written into it in the parquet's form, so both files
  give the same prompt.

**Prompt** (lmms-eval's MMStar task, the LLaVA-style evaluation the 7B papers report): the image, the question
with its options as released, then ``\\nAnswer with the option's letter from the given choices directly.``;
greedy, at most 16 new tokens.

**Matching**: VLMEvalKit's exact matching (:func:`unified_mllm.eval.benchmark.match_choice`) on the options
read from the question — MMStar's authors score with VLMEvalKit, whose default then asks ChatGPT about answers
exact matching cannot read; we count those wrong (``unmatched``).

**Metrics**: ``accuracy`` over all questions (VLMEvalKit's "Overall", the MMStar paper's number),
``per_category`` (the six core capabilities), ``per_l2_category`` (18 axes) and ``macro_l2_accuracy``, the
mean of the 18 axis accuracies (what lmms-eval prints as its MMStar "average").
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from unified_mllm.eval.benchmark import (
    MC_INSTRUCTION,
    OPTION_LETTERS,
    Sample,
    TsvImages,
    UnderstandingTask,
    accuracy_by,
    find_path,
    image_bytes,
    image_first,
    match_choice,
    options_of,
    read_records,
    require_columns,
)
from unified_mllm.eval.metrics import ratio
from unified_mllm.eval.tasks import register_task

# The six core capabilities and their axes, in the paper's order.
CATEGORIES = {
    "coarse perception": ["image scene and topic", "image style & quality", "image emotion"],
    "fine-grained perception": ["object counting", "recognition", "localization"],
    "instance reasoning": [
        "single-instance reasoning",
        "cross-instance attribute reasoning",
        "cross-instance relation reasoning",
    ],
    "logical reasoning": ["code & sequence reasoning", "diagram reasoning", "common reasoning"],
    "science & technology": [
        "biology & chemistry & physics",
        "electronics & energy & mechanical eng.",
        "geography & earth science & agriculture",
    ],
    "math": ["geometry", "numeric commonsense and calculation", "statistical reasoning"],
}
OPTIONS_MARK = "Options:"
# lmms-eval's MMStar post_prompt, which (unlike its other tasks') has no final period; and the phrase its
# doc_to_text deletes from a question before adding it.
MMSTAR_INSTRUCTION = MC_INSTRUCTION.removesuffix(".")
YES_NO_PHRASE = " Please answer yes or no."
_OPTION_START = re.compile(r"(?:^|,\s*)([A-Z]):\s*")


def options_in_question(question: str) -> dict[str, str]:
    """The options written into an MMStar question (``Options: A: x, B: y``), {} when it has none.

    A split point counts only when its letters run A, B, C, ... in order, so a ", X: " inside an option's text
    stays part of it."""
    if OPTIONS_MARK not in question:
        return {}
    tail = question.rsplit(OPTIONS_MARK, 1)[1].strip()
    starts = [m for m in _OPTION_START.finditer(tail)]
    kept, expected = [], 0
    for match in starts:
        if match.group(1) == OPTION_LETTERS[expected]:
            kept.append(match)
            expected += 1
    ends = [m.start() for m in kept[1:]] + [len(tail)]
    return {m.group(1): tail[m.end() : end].strip() for m, end in zip(kept, ends)}


def question_with_options(question: str, options: Mapping[str, str]) -> str:
    """A TSV question without its options, written the way the parquet release writes them."""
    listed = ", ".join(f"{letter}: {text}" for letter, text in options.items())
    return f"{question.rstrip()}\n{OPTIONS_MARK} {listed}"


@register_task
class MMStar(UnderstandingTask):
    """MMStar (see the module docstring)."""

    name = "mmstar"
    description = "MMStar"
    files = (
        "mmstar.parquet (https://huggingface.co/datasets/Lin-Chen/MMStar, needs pyarrow) or VLMEvalKit's "
        "MMStar.tsv (https://opencompass.openxlab.space/utils/VLMEval/MMStar.tsv)"
    )
    data_names = ("mmstar.parquet", "**/mmstar.parquet", "MMStar.tsv", "**/MMStar.tsv")
    headline = "accuracy"
    reported = "UniToken 46.1"
    max_new_tokens = 16

    def load(self, path: Path) -> list[Sample]:
        file = path if path.is_file() else find_path(path, self.data_names)
        if file is None:
            raise FileNotFoundError(f"{self.name}: no mmstar.parquet or MMStar.tsv in {path} ({self.files})")
        rows = read_records(file)
        require_columns(rows, ["index", "question", "answer", "image"], file)
        tsv = file.suffix.lower() != ".parquet"
        images = TsvImages(rows, file) if tsv else None
        samples = []
        for row in rows:
            index = str(row["index"]).strip()
            question = str(row["question"]).strip()
            options = options_in_question(question)
            if not options:
                options = options_of(row)
                question = question_with_options(question, options)
            image = images.get(index) if images else image_bytes(row["image"], f"{file}, row {index}")
            samples.append(
                Sample(
                    id=index,
                    prompt=image_first(f"{question.replace(YES_NO_PHRASE, '')}\n{MMSTAR_INSTRUCTION}"),
                    images=(image,),
                    answer=str(row["answer"]).strip(),
                    meta={
                        "category": str(row.get("category") or "").strip(),
                        "l2_category": str(row.get("l2_category", row.get("l2-category")) or "").strip(),
                        "options": options,
                    },
                )
            )
        return samples

    def score(self, samples: Sequence[Sample], predictions: Sequence[str]) -> dict[str, Any]:
        picked = [match_choice(p, s.meta["options"]) for s, p in zip(samples, predictions, strict=True)]
        hits = [letter == s.answer for s, letter in zip(samples, picked)]
        per_l2 = accuracy_by(
            [s.meta["l2_category"] for s in samples], hits, order=[a for v in CATEGORIES.values() for a in v]
        )
        return {
            "accuracy": ratio(sum(hits), len(hits)),
            "macro_l2_accuracy": sum(r["accuracy"] for r in per_l2.values()) / len(per_l2),
            "correct": sum(hits),
            "total": len(hits),
            "unmatched": sum(letter is None for letter in picked),
            "per_category": accuracy_by([s.meta["category"] for s in samples], hits, order=list(CATEGORIES)),
            "per_l2_category": per_l2,
        }
