"""AI2D (science diagrams), test split: task ``ai2d``.

**Files** (either form, a file or a folder holding it):

* VLMEvalKit's ``AI2D_TEST.tsv`` (``index, question, A .. D, answer, image``, images base64): the form most
  papers' numbers come from (3 088 questions), and the one tested most here.
* the official release folder (AllenAI's ``ai2d-all.zip`` unzipped: ``ai2d/questions/<image>.json`` —
  ``{"imageName", "questions": {text: {"answerTexts", "correctAnswer", "questionId", "abcLabel"}}}`` — and
  ``ai2d/images/<image>``), restricted to the test split by ``ai2d_test_ids.csv`` (AllenAI's list of test
  image ids, one per line) when that file is in the folder or its parent. Without the list every question is
  asked and the results say ``split: all``. The release's diagrams are used as they are: VLMEvalKit's TSV masks
  nothing either (its AI2D_TEST), so both forms ask the same questions of the same images.

**Prompt** (lmms-eval's AI2D task, LLaVA's multiple-choice form): the image, the question, ``A. text`` ..
``D. text``, ``Answer with the option's letter from the given choices directly.``; greedy, at most 16 new
tokens.

**Matching**: VLMEvalKit's exact matching (:func:`unified_mllm.eval.benchmark.match_choice`); where VLMEvalKit
would then ask ChatGPT about an answer exact matching cannot read, we count it wrong (``unmatched``).

**Metrics**: ``accuracy`` over all questions, and ``per_category`` when the file has a ``category`` column.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from unified_mllm.eval.benchmark import (
    MC_INSTRUCTION,
    OPTION_LETTERS,
    Sample,
    TsvImages,
    UnderstandingTask,
    accuracy_by,
    choice_prompt,
    find_path,
    image_first,
    match_choice,
    options_of,
    read_records,
    require_columns,
)
from unified_mllm.eval.metrics import ratio
from unified_mllm.eval.tasks import register_task

TSV_NAME = "AI2D_TEST.tsv"
TEST_IDS = "ai2d_test_ids.csv"


def release_root(path: Path) -> Path | None:
    """The folder holding ``questions/`` and ``images/`` of the official release at or just under ``path``."""
    for root in (path, path / "ai2d"):
        if (root / "questions").is_dir() and (root / "images").is_dir():
            return root
    return None


def read_test_ids(root: Path) -> set[str] | None:
    """The test image ids (``"1017"``) from ``ai2d_test_ids.csv`` in ``root`` or its parent, else None."""
    for folder in (root, root.parent):
        if (folder / TEST_IDS).is_file():
            lines = (folder / TEST_IDS).read_text(encoding="utf-8").split()
            return {line.strip().split(",")[0].removesuffix(".png") for line in lines if line.strip()}
    return None


@register_task
class AI2D(UnderstandingTask):
    """AI2D's test split (see the module docstring)."""

    name = "ai2d"
    description = "AI2D (test)"
    files = (
        "VLMEvalKit's AI2D_TEST.tsv (https://opencompass.openxlab.space/utils/VLMEval/AI2D_TEST.tsv), or the "
        "official ai2d/ folder (https://ai2-public-datasets.s3.amazonaws.com/diagrams/ai2d-all.zip, unzipped) "
        "with ai2d_test_ids.csv (https://s3-us-east-2.amazonaws.com/prior-datasets/ai2d_test_ids.csv) in it or "
        "beside it"
    )
    data_names = (TSV_NAME, f"**/{TSV_NAME}", "ai2d/questions")
    headline = "accuracy"
    reported = "UniToken 68.7"
    max_new_tokens = 16

    def __init__(self, data: str | Path | None = None, restart: bool = False) -> None:
        super().__init__(data, restart)
        self.split = "test"

    @classmethod
    def find_data(cls, root: Path) -> Path | None:
        found = find_path(root, cls.data_names[:2])
        if found is not None:
            return found
        return release_root(root) or release_root(root / "ai2d")

    def load(self, path: Path) -> list[Sample]:
        if path.is_dir() and (root := release_root(path)) is not None:
            return self._load_release(root)
        file = path if path.is_file() else find_path(path, self.data_names[:2])
        if file is None:
            raise FileNotFoundError(f"{self.name}: no {TSV_NAME} or ai2d/questions/ in {path} ({self.files})")
        rows = read_records(file)
        require_columns(rows, ["index", "question", "A", "B", "answer", "image"], file)
        images = TsvImages(rows, file)
        return [
            self._sample(
                str(row["index"]).strip(),
                str(row["question"]),
                options_of(row),
                str(row["answer"]).strip(),
                str(row.get("category") or "").strip(),
                images.get(str(row["index"]).strip()),
            )
            for row in rows
        ]

    def _load_release(self, root: Path) -> list[Sample]:
        test_ids = read_test_ids(root)
        self.split = "test" if test_ids is not None else "all"
        samples = []
        for file in sorted((root / "questions").glob("*.json"), key=lambda p: (len(p.name), p.name)):
            data = json.loads(file.read_text(encoding="utf-8"))
            image_name = str(data.get("imageName") or file.name.removesuffix(".json"))
            if test_ids is not None and image_name.removesuffix(".png") not in test_ids:
                continue
            for question, q in data.get("questions", {}).items():
                texts = [str(t) for t in q["answerTexts"]]
                options = dict(zip(OPTION_LETTERS, texts))
                answer = OPTION_LETTERS[int(q["correctAnswer"])]
                qid = str(q.get("questionId") or f"{image_name}-{len(samples)}")
                samples.append(self._sample(qid, question, options, answer, "", root / "images" / image_name))
        return samples

    def _sample(
        self, qid: str, question: str, options: dict[str, str], answer: str, category: str, image: Any
    ) -> Sample:
        return Sample(
            id=qid,
            prompt=image_first(choice_prompt(question, options, instruction=MC_INSTRUCTION)),
            images=(image,),
            answer=answer,
            meta={"options": options, **({"category": category} if category else {})},
        )

    def score(self, samples: Sequence[Sample], predictions: Sequence[str]) -> dict[str, Any]:
        picked = [match_choice(p, s.meta["options"]) for s, p in zip(samples, predictions, strict=True)]
        hits = [letter == s.answer for s, letter in zip(samples, picked)]
        metrics: dict[str, Any] = {
            "accuracy": ratio(sum(hits), len(hits)),
            "correct": sum(hits),
            "total": len(hits),
            "unmatched": sum(letter is None for letter in picked),
            "split": self.split,
        }
        if any("category" in s.meta for s in samples):
            categories = [s.meta.get("category", "(none)") for s in samples]
            metrics["per_category"] = accuracy_by(categories, hits)
        return metrics
