"""SEED-Bench, image dimensions 1-9 (SEED-Bench-1's "SEED-I" figure): task ``seed-bench``.

**Files** (either form, a file or a folder holding it):

* the official release: ``SEED-Bench.json`` (``{"questions": [{question_id, question, choice_a .. choice_d,
  answer, data_id, data_type, question_type_id}], "question_type": {name: id}}``) with the image folder
  ``SEED-Bench-image/`` beside it (the image of a question is ``SEED-Bench-image/<data_id>``). The video
  dimensions 10-12 (``data_type`` video) are skipped.
* VLMEvalKit's ``SEEDBench_IMG.tsv`` (``index, question, A .. D, answer, category, image``; ``category`` is the
  dimension's name, the image base64).

**Prompt** (LLaVA-1.5's ``llava-seed-bench.jsonl``, the form UniToken's evaluation uses): the image, the
question, ``A. text`` .. ``D. text``, ``Answer with the option's letter from the given choices directly.``;
greedy, at most 16 new tokens.

**Matching**: VLMEvalKit's exact matching (:func:`unified_mllm.eval.benchmark.match_choice`). SEED-Bench's own
evaluation ranks the four options by the model's likelihood instead of reading a generated answer; LLaVA (and
every generative-model table) reads the answer, and its script compares the answer with the letter exactly —
our rule takes that and also "(B)", "B. cat" or the option's text; an answer it cannot read counts wrong.
``exact_letter_accuracy`` is LLaVA's strict figure, for comparison.

**Metrics**: ``accuracy`` over all image questions (micro, as SEED-Bench's script reports SEED-I) and
``per_dimension`` for the nine image dimensions, by name.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from unified_mllm.eval.benchmark import (
    MC_INSTRUCTION,
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

# SEED-Bench's image dimensions, by question_type_id (the names its SEED-Bench.json and VLMEvalKit use).
DIMENSIONS = {
    1: "Scene Understanding",
    2: "Instance Identity",
    3: "Instance Attributes",
    4: "Instance Location",
    5: "Instances Counting",
    6: "Spatial Relation",
    7: "Instance Interaction",
    8: "Visual Reasoning",
    9: "Text Understanding",
}
IMAGE_FOLDER = "SEED-Bench-image"
JSON_NAME = "SEED-Bench.json"
TSV_NAME = "SEEDBench_IMG.tsv"


def _find_image(folder: Path, data_id: str) -> Path:
    """``folder/data_id``; releases differ on whether ``data_id`` carries the extension, so also try .jpg/.png."""
    path = folder / data_id
    if path.is_file() or path.suffix:
        return path
    for suffix in (".jpg", ".png", ".jpeg"):
        if (folder / f"{data_id}{suffix}").is_file():
            return folder / f"{data_id}{suffix}"
    return path


@register_task
class SEEDBench(UnderstandingTask):
    """SEED-Bench-1's image questions (see the module docstring)."""

    name = "seed-bench"
    description = "SEED-Bench (image dimensions 1-9)"
    files = (
        "SEED-Bench.json + SEED-Bench-image/ (https://huggingface.co/datasets/AILab-CVC/SEED-Bench: "
        "SEED-Bench.json and SEED-Bench-image.zip, unzipped beside it), or VLMEvalKit's SEEDBench_IMG.tsv "
        "(https://opencompass.openxlab.space/utils/VLMEval/SEEDBench_IMG.tsv)"
    )
    data_names = (JSON_NAME, f"**/{JSON_NAME}", TSV_NAME, f"**/{TSV_NAME}")
    headline = "accuracy"
    reported = "UniToken 69.9, Janus-Pro-7B 72.1"
    max_new_tokens = 16

    def load(self, path: Path) -> list[Sample]:
        file = path if path.is_file() else find_path(path, self.data_names)
        if file is None:
            raise FileNotFoundError(
                f"{self.name}: neither {JSON_NAME} nor {TSV_NAME} in {path} ({self.files})"
            )
        if file.suffix.lower() == ".json":
            return self._load_json(file)
        rows = read_records(file)
        require_columns(rows, ["index", "question", "A", "B", "answer", "image"], file)
        images = TsvImages(rows, file)
        return [
            self._sample(
                str(row["index"]).strip(),
                str(row["question"]),
                options_of(row, "ABCD"),
                str(row["answer"]).strip(),
                str(row.get("category") or "").strip(),
                images.get(str(row["index"]).strip()),
            )
            for row in rows
        ]

    def _load_json(self, file: Path) -> list[Sample]:
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
            questions, names = data["questions"], data.get("question_type") or {}
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{file} is not SEED-Bench's JSON ({{'questions': [...]}}): {exc}") from exc
        dimensions = {**DIMENSIONS, **{int(v): k for k, v in names.items()}}
        folder = file.parent / IMAGE_FOLDER
        samples = []
        for q in questions:
            dimension = int(q["question_type_id"])
            if q.get("data_type", "image") != "image" or dimension not in DIMENSIONS:
                continue  # the video dimensions
            options = {letter: str(q[f"choice_{letter.lower()}"]) for letter in "ABCD"}
            image = _find_image(folder, str(q["data_id"]))
            samples.append(
                self._sample(
                    str(q["question_id"]), q["question"], options, q["answer"], dimensions[dimension], image
                )
            )
        if not samples:
            raise ValueError(f"{file} holds no image questions (dimensions 1-9)")
        return samples

    def _sample(
        self, qid: str, question: str, options: dict[str, str], answer: str, dimension: str, image: Any
    ) -> Sample:
        prompt = choice_prompt(question, options, instruction=MC_INSTRUCTION)
        return Sample(
            id=qid,
            prompt=image_first(prompt),
            images=(image,),
            answer=answer.strip(),
            meta={"dimension": dimension, "options": options},
        )

    def score(self, samples: Sequence[Sample], predictions: Sequence[str]) -> dict[str, Any]:
        picked = [match_choice(p, s.meta["options"]) for s, p in zip(samples, predictions, strict=True)]
        hits = [letter == s.answer for s, letter in zip(samples, picked)]
        dimensions = [s.meta["dimension"] for s in samples]
        return {
            "accuracy": ratio(sum(hits), len(hits)),
            "correct": sum(hits),
            "total": len(hits),
            "unmatched": sum(letter is None for letter in picked),
            # LLaVA's convert_seed_for_submission counts an answer right only when it is the letter itself
            "exact_letter_accuracy": ratio(
                sum(p.strip() == s.answer for s, p in zip(samples, predictions)), len(hits)
            ),
            "per_dimension": accuracy_by(dimensions, hits, order=list(DIMENSIONS.values())),
        }
