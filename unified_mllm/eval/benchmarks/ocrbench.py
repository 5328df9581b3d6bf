"""OCRBench (Liu et al. 2023): 1000 OCR questions in 10 types, scored by answer containment out of 1000.

**Files.** The official release (Yuliang-Liu/MultimodalOCR, OCRBench): ``OCRBench.json`` (a list of rows with
``dataset_name``, ``id``, ``image_path``, ``question``, ``answers`` — a list or one string — and ``type``) and
the ``OCRBench_Images/`` folder the ``image_path`` values are relative to. Also accepted: VLMEvalKit's
``OCRBench.tsv`` (``index, image, question, answer`` — a Python list literal — ``category`` = the type).

**Prompt**: the question as given, after the image (OCRBench's own script, VLMEvalKit and lmms-eval add no
instruction); up to 128 new tokens, as lmms-eval allows.

**Matching** (OCRBench's scorer, as VLMEvalKit reimplements it; no LLM judge): for "Handwritten Mathematical
Expression Recognition" (the HME100k questions) newlines and spaces are removed from answer and prediction,
and the question is right when an answer is contained in the prediction; for every other type an answer,
lower-cased, stripped and with newlines as spaces, must be contained in the likewise lower-cased prediction.
Any one of the reference answers suffices.

**Metrics.** The number right in each of the five score buckets — Text Recognition (the regular, irregular,
artistic, handwriting, digit-string and non-semantic text types together), Scene Text-centric VQA,
Doc-oriented VQA, Key Information Extraction, Handwritten Mathematical Expression Recognition — and their sum,
``final_score`` out of 1000 (the headline: on the full benchmark, the number of questions answered right);
``final_score_norm`` = final_score / 10 and ``accuracy`` = the fraction right (comparable under ``--limit``);
right / total per type.
"""

from __future__ import annotations

import ast
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from unified_mllm.eval.benchmark import (
    Sample,
    TsvImages,
    UnderstandingTask,
    find_path,
    read_records,
    require_columns,
)
from unified_mllm.eval.tasks import register_task
from unified_mllm.layout import IMAGE_PLACEHOLDER

HME = "Handwritten Mathematical Expression Recognition"
TEXT_RECOGNITION_TYPES = (
    "Regular Text Recognition",
    "Irregular Text Recognition",
    "Artistic Text Recognition",
    "Handwriting Recognition",
    "Digit String Recognition",
    "Non-Semantic Text Recognition",
)
OTHER_TYPES = ("Scene Text-centric VQA", "Doc-oriented VQA", "Key Information Extraction", HME)
TYPES = TEXT_RECOGNITION_TYPES + OTHER_TYPES
BUCKETS = ("Text Recognition", *OTHER_TYPES)
FULL_SIZE = 1000


def ocrbench_match(prediction: str, answers: Sequence[str], question_type: str) -> bool:
    """OCRBench's rule (module docstring): is one of ``answers`` contained in ``prediction``?"""
    if question_type == HME:
        predicted = prediction.strip().replace("\n", " ").replace(" ", "")
        return any(a.strip().replace("\n", " ").replace(" ", "") in predicted for a in answers)
    predicted = prediction.lower().strip().replace("\n", " ")
    return any(a.lower().strip().replace("\n", " ") in predicted for a in answers)


def bucket_of(question_type: str) -> str:
    """The score bucket a type counts in (the six recognition types share "Text Recognition")."""
    return "Text Recognition" if question_type in TEXT_RECOGNITION_TYPES else question_type


def ocrbench_scores(
    types: Sequence[str], answers: Sequence[Sequence[str]], predictions: Sequence[str]
) -> dict[str, Any]:
    """Right answers per bucket, ``final_score`` (their sum), ``final_score_norm``, ``accuracy`` and
    ``per_type`` right/total."""
    if not len(types) == len(answers) == len(predictions):
        raise ValueError("types, answers and predictions must align")
    right = [ocrbench_match(p, a, t) for t, a, p in zip(types, answers, predictions, strict=True)]
    per_type = {}
    for name in [t for t in TYPES if t in types] + sorted(set(types) - set(TYPES)):
        rows = [r for t, r in zip(types, right, strict=True) if t == name]
        per_type[name] = {"right": sum(rows), "total": len(rows), "accuracy": sum(rows) / len(rows)}
    buckets = {b: 0 for b in BUCKETS}
    for name, counts in per_type.items():
        buckets[bucket_of(name)] = buckets.get(bucket_of(name), 0) + counts["right"]
    final = sum(right)
    return {
        **buckets,
        "final_score": final,
        "final_score_norm": final / 10,
        "accuracy": final / len(right) if right else None,
        "questions": len(right),
        "per_type": per_type,
    }


def _answer_list(value: Any) -> list[str]:
    """The reference answers: a list, a Python list literal (VLMEvalKit's TSV) or one string."""
    if isinstance(value, list | tuple):
        return [str(v) for v in value]
    text = str(value)
    if text.startswith("[") and text.endswith("]"):
        try:
            parsed = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            parsed = None
        if isinstance(parsed, list | tuple):
            return [str(v) for v in parsed]
    return [text]


@register_task
class OCRBench(UnderstandingTask):
    name = "ocrbench"
    description = (
        "OCRBench: text recognition, scene/document VQA, key information, handwritten math (of 1000)"
    )
    files = (
        "OCRBench.json + OCRBench_Images/ (github.com/Yuliang-Liu/MultimodalOCR, OCRBench: the images from "
        "its README's download link) or VLMEvalKit's OCRBench.tsv "
        "(https://opencompass.openxlab.space/utils/VLMEval/OCRBench.tsv)"
    )
    data_names = (
        "OCRBench.tsv",
        "OCRBench/OCRBench.json",
        "OCRBench/json_files/OCRBench.json",
        "OCRBench/OCRBench.tsv",
        "OCRBench.json",
    )
    max_new_tokens = 128
    headline = "final_score"
    headline_scale = "raw"
    reported: ClassVar[str] = "UniToken 757"

    def load(self, path: Path) -> list[Sample]:
        if path.is_dir():
            found = find_path(path, ("OCRBench.json", "json_files/OCRBench.json", "OCRBench.tsv"))
            if found is None:
                raise FileNotFoundError(f"{path} holds neither OCRBench.json nor OCRBench.tsv ({self.files})")
            path = found
        return self._load_tsv(path) if path.suffix.lower() == ".tsv" else self._load_json(path)

    def _load_json(self, path: Path) -> list[Sample]:
        rows = read_records(path)
        require_columns(rows, ("image_path", "question", "answers", "type"), path)
        samples = []
        for n, row in enumerate(rows):
            samples.append(
                Sample(
                    # The release's ids repeat across its source datasets: the position keeps them apart.
                    id=f"{n}_{row.get('dataset_name', '')}_{row.get('id', '')}",
                    prompt=IMAGE_PLACEHOLDER + str(row["question"]).strip(),
                    images=(self._image_path(path.parent, str(row["image_path"])),),
                    answer=_answer_list(row["answers"]),
                    meta={"type": str(row["type"]), "dataset": str(row.get("dataset_name", ""))},
                )
            )
        return samples

    @staticmethod
    def _image_path(root: Path, relative: str) -> Path:
        """``OCRBench_Images/<image_path>`` beside the json, or beside the folder holding it (the GitHub
        release keeps the json in ``json_files/``)."""
        relative = relative.removeprefix("./")
        candidates = [root / "OCRBench_Images" / relative, root.parent / "OCRBench_Images" / relative]
        found = next((c for c in [*candidates, root / relative] if c.is_file()), None)
        return found or candidates[0]  # missing: recorded as that sample's error, named

    def _load_tsv(self, path: Path) -> list[Sample]:
        rows = read_records(path)
        require_columns(rows, ("index", "image", "question", "answer", "category"), path)
        images = TsvImages(rows, path)
        samples = []
        for row in rows:
            index = str(row["index"])
            image = images.get(index)
            if image is None:
                raise ValueError(f"{path} row {index} has no image")
            samples.append(
                Sample(
                    id=index,
                    prompt=IMAGE_PLACEHOLDER + str(row["question"]).strip(),
                    images=(image,),
                    answer=_answer_list(row["answer"]),
                    meta={"type": str(row["category"])},
                )
            )
        return samples

    def score(self, samples: Sequence[Sample], predictions: Sequence[str]) -> dict[str, Any]:
        return ocrbench_scores(
            [s.meta["type"] for s in samples], [list(s.answer) for s in samples], predictions
        )
