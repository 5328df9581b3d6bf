"""The open-answer VQA benchmarks: VQAv2, GQA and TextVQA, read from their released files.

    python -m unified_mllm.eval --task vqav2 --model EXPORT --data VQAV2_DIR
    python -m unified_mllm.eval --task gqa --model EXPORT --data GQA_DIR      (or GQA_TestDev_Balanced.tsv)
    python -m unified_mllm.eval --task textvqa --model EXPORT --data TEXTVQA_DIR  (or TextVQA_VAL.tsv)

**Prompts** are LLaVA-1.5's evaluation prompts (the ones UniTok's, VILA-U's and most 7B unified models' tables
use): the image, then ``<question>\\nAnswer the question using a single word or phrase.``; the image
placeholder opens the prompt with nothing between it and the question (as UniToken's own inference examples
write it). Decoding is greedy, at most 16 new tokens (32 for TextVQA, whose answers are copied text).

**vqav2** — a folder with ``v2_OpenEnded_mscoco_val2014_questions.json``,
``v2_mscoco_val2014_annotations.json`` and the COCO ``val2014/`` images (``COCO_val2014_<12-digit id>.jpg``),
or the test-dev questions ``v2_OpenEnded_mscoco_test-dev2015_questions.json`` with ``test2015/``; ``--data``
may also name the questions file itself. Scored with the official VQA accuracy
(:mod:`unified_mllm.eval.vqa_normalize`): the prediction goes through the EvalAI answer processor (as LLaVA
writes its submission), then the official evaluation (normalised prediction, leave-one-out
``min(1, matches / 3)`` over the 10 human answers). Reported: accuracy overall, per answer type (yes/no,
number, other) and per question type. Always written: the results file in the official format,
``[{"question_id", "answer"}]`` with the processed answers. Without the annotations (test-dev, test) **no
score can be computed here**: the results file is the submission for the EvalAI server (VQA challenge,
test-dev phase; the numbers papers report are test-dev), and when the folder also holds the full
``v2_OpenEnded_mscoco_test2015_questions.json`` every test2015 question missing from the run is written with
an empty answer, as LLaVA's converter does, because the server wants them all.

**gqa** — ``testdev_balanced_questions.json`` (the GQA release's ``questions1.2``) and the ``images/`` folder
(``<imageId>.jpg``, beside the questions file or under the ``--data`` folder), or VLMEvalKit's
``GQA_TestDev_Balanced.tsv``. Matching is LLaVA's GQA evaluation (``convert_gqa_for_eval``, then GQA's
``eval.py``): the prediction with trailing periods removed and lower-cased must equal the answer exactly.
Reported, as GQA's ``eval.py`` does over the balanced questions: accuracy, accuracy on binary questions
(structural type verify / logical / compare / choose) and open ones (structural type query), and per
structural and semantic type. GQA's consistency, validity, plausibility, grounding and distribution scores
need the scene graphs and all-questions file and are not computed (papers report accuracy only).

**textvqa** — ``TextVQA_0.5.1_val.json`` and ``train_images/`` (the validation images ship in the train image
archive), or VLMEvalKit's ``TextVQA_VAL.tsv`` (``answer`` holds the 10 answers as a list literal). LLaVA-1.5
evaluates TextVQA **with OCR tokens** in the prompt (its ``llava_textvqa_val_v051_ocr.jsonl``):
``<question>\\nReference OCR token: tok1, tok2, ...\\nAnswer the question using a single word or phrase.`` (no
OCR line for an image without tokens). We follow it when the tokens are at hand: from LLaVA's question file
when it is in the folder (its prompts are used as they are), else from each question's ``ocr_tokens`` field or
TextVQA's Rosetta OCR file ``TextVQA_Rosetta_OCR_v0.2_val.json`` in the folder. Without any of them (and for
the TSV, which has none) the prompt has no OCR line, as VLMEvalKit and current lmms-eval ask it; the metrics
say how many prompts carried tokens (``ocr_prompts``) because the two protocols differ by several points.
Scored with TextVQA's accuracy (the m4c evaluator LLaVA uses, and VLMEvalKit's ``vqa_score``): prediction and
human answers through the EvalAI answer processor, leave-one-out ``min(1, matches / 3)``.

No official scorer of these three uses an LLM judge.
"""

from __future__ import annotations

import ast
import json
import statistics
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from unified_mllm import io
from unified_mllm.eval.benchmark import (
    SHORT_ANSWER,
    Sample,
    TsvImages,
    UnderstandingTask,
    find_path,
    read_records,
    require_columns,
)
from unified_mllm.eval.tasks import register_task
from unified_mllm.eval.vqa_normalize import evalai_normalize, textvqa_accuracy, vqa_accuracy
from unified_mllm.layout import IMAGE_PLACEHOLDER

VQA_ANSWER_TYPES = ("yes/no", "number", "other")
GQA_OPEN_STRUCTURAL = "query"  # GQA's eval.py: a "query" question is open, every other structural type binary
OCR_LINE = "Reference OCR token: "


# ------------------------------------------------------------------------------------------ file helpers


def load_json(path: Path) -> Any:
    """A JSON file, or a ValueError naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not a readable json file: {exc}") from exc


def tsv_images(rows: Sequence[Mapping[str, Any]], path: Path) -> list[bytes | None]:
    """The encoded image of each row of a VLMEvalKit TSV (shared images decoded once: :class:`TsvImages`)."""
    images = TsvImages(rows, path)
    return [images.get(str(row.get("index", ""))) for row in rows]


def find_image_dir(bases: Sequence[Path], folders: Sequence[str], probe: str) -> Path:
    """The first ``base / folder`` holding the file ``probe`` (the first question's image), else a
    FileNotFoundError listing where it looked."""
    tried = []
    for base in dict.fromkeys(bases):
        for folder in folders:
            directory = base / folder
            if (directory / probe).is_file():
                return directory
            tried.append(str(directory))
    raise FileNotFoundError(f"image {probe} not found; looked in {', '.join(tried)}")


def short_answer_prompt(question: str) -> str:
    """LLaVA-1.5's prompt for a short-answer question, after the image."""
    return f"{IMAGE_PLACEHOLDER}{question.strip()}\n{SHORT_ANSWER}"


def answer_list(cell: Any) -> list[str]:
    """The human answers of a TSV cell: a list literal ("['a', 'b']"), or one answer."""
    if isinstance(cell, list):
        return [str(a) for a in cell]
    text = str(cell).strip()
    if text.startswith("["):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = None
        if isinstance(value, list):
            return [str(a) for a in value]
    return [text]


def mean(values: Sequence[float]) -> float | None:
    """The mean, or None for no values."""
    return statistics.fmean(values) if values else None


def grouped(
    keys: Sequence[str], scores: Sequence[float], order: Sequence[str] = ()
) -> dict[str, dict[str, Any]]:
    """``{key: {"accuracy", "questions"}}``: the known keys in ``order``, then the others sorted."""
    members: dict[str, list[float]] = defaultdict(list)
    for key, score in zip(keys, scores, strict=True):
        members[key].append(score)
    names = [k for k in order if k in members] + sorted(set(members) - set(order))
    return {k: {"accuracy": mean(members[k]), "questions": len(members[k])} for k in names}


def locate(path: Path, names: Sequence[str], what: str, files: str) -> Path:
    """``path`` itself when it is a file, else the first of ``names`` under it; a FileNotFoundError says what
    was expected."""
    if path.is_file():
        return path
    found = find_path(path, names)
    if found is None or not found.is_file():
        raise FileNotFoundError(f"{path} holds no {what} (looked for {', '.join(names)}); download: {files}")
    return found


# ----------------------------------------------------------------------------------------------- VQAv2


@register_task
class VQAv2(UnderstandingTask):
    """VQAv2 open-ended (see the module docstring)."""

    name = "vqav2"
    description = "VQAv2 (open-ended VQA on COCO images)"
    files = (
        "VQAv2 from visualqa.org/download.html: v2_OpenEnded_mscoco_val2014_questions.json and "
        "v2_mscoco_val2014_annotations.json (or v2_OpenEnded_mscoco_test-dev2015_questions.json for the "
        "EvalAI server), with COCO's val2014/ (or test2015/) images from cocodataset.org, in one folder"
    )
    data_names = ("vqav2", "VQAv2", "vqa_v2")
    headline = "accuracy"
    reported = "UniTok 76.8 (test-dev)"
    max_new_tokens = 16
    QUESTION_FILES = (
        "v2_OpenEnded_mscoco_val2014_questions.json",
        "v2_OpenEnded_mscoco_test-dev2015_questions.json",
        "v2_OpenEnded_mscoco_test2015_questions.json",
        "v2_OpenEnded_mscoco_*_questions.json",
        "*/v2_OpenEnded_mscoco_*_questions.json",
    )
    FULL_TEST = "v2_OpenEnded_mscoco_test2015_questions.json"
    # Set by load() for submission(): the questions' subset name and the full test2015 file to pad from.
    _subtype: str = "val2014"
    _pad_from: Path | None = None

    def load(self, path: Path) -> list[Sample]:
        questions_file = locate(path, self.QUESTION_FILES, "VQAv2 questions file", self.files)
        data = load_json(questions_file)
        if not isinstance(data, dict) or not isinstance(data.get("questions"), list) or not data["questions"]:
            raise ValueError(f"{questions_file} is not a VQAv2 questions file (no 'questions' list)")
        questions = data["questions"]
        subtype = str(data.get("data_subtype") or questions_file.stem.split("_")[-2])
        folder = questions_file.parent
        annotations_file = folder / f"v2_mscoco_{subtype}_annotations.json"
        annotations = {}
        if annotations_file.is_file():
            for row in load_json(annotations_file).get("annotations", []):
                annotations[row["question_id"]] = row
        # The test-dev questions are a subset of test2015 and share its image folder and file names.
        image_set = "test2015" if subtype.startswith("test") else subtype
        first = questions[0]
        image_dir = find_image_dir(
            [folder, path if path.is_dir() else folder],
            [image_set, f"images/{image_set}", "images", "."],
            f"COCO_{image_set}_{first['image_id']:012d}.jpg",
        )
        self._subtype = subtype
        full_test = folder / self.FULL_TEST
        self._pad_from = full_test if subtype == "test-dev2015" and full_test.is_file() else None
        samples = []
        for q in questions:
            note = annotations.get(q["question_id"])
            if annotations and note is None:
                raise ValueError(f"{annotations_file} has no annotation for question {q['question_id']}")
            meta: dict[str, Any] = {"question_id": q["question_id"]}
            if note is not None:
                meta.update(answer_type=note["answer_type"], question_type=note["question_type"])
            samples.append(
                Sample(
                    str(q["question_id"]),
                    short_answer_prompt(q["question"]),
                    images=(str(image_dir / f"COCO_{image_set}_{q['image_id']:012d}.jpg"),),
                    answer=[a["answer"] for a in note["answers"]] if note is not None else None,
                    meta=meta,
                )
            )
        return samples

    def score(self, samples: Sequence[Sample], predictions: Sequence[str]) -> dict[str, Any]:
        if any(s.answer is None for s in samples):
            return {
                "accuracy": None,
                "questions": len(samples),
                "note": "no annotations (test-dev / test): no score here; submit the results file to the "
                "VQA challenge on EvalAI",
            }
        scores = [
            vqa_accuracy(evalai_normalize(p), s.answer) for s, p in zip(samples, predictions, strict=True)
        ]
        return {
            "accuracy": mean(scores),
            "questions": len(samples),
            "per_answer_type": grouped([s.meta["answer_type"] for s in samples], scores, VQA_ANSWER_TYPES),
            "per_question_type": grouped([s.meta["question_type"] for s in samples], scores),
        }

    def submission(
        self, samples: Sequence[Sample], predictions: Sequence[str], output_dir: Path
    ) -> dict[str, Path]:
        results = [
            {"question_id": s.meta["question_id"], "answer": evalai_normalize(p)}
            for s, p in zip(samples, predictions, strict=True)
        ]
        if self._pad_from is not None:
            answered = {r["question_id"] for r in results}
            results += [
                {"question_id": q["question_id"], "answer": ""}
                for q in load_json(self._pad_from)["questions"]
                if q["question_id"] not in answered
            ]
        path = output_dir / f"v2_OpenEnded_mscoco_{self._subtype}_results.json"
        io.write_json(path, results)
        return {"results": path}


# ------------------------------------------------------------------------------------------------- GQA


def gqa_normalize(prediction: str) -> str:
    """LLaVA's reading of a GQA answer (``convert_gqa_for_eval``): trailing periods removed, lower-cased."""
    return prediction.rstrip(".").lower()


def gqa_correct(prediction: str, answer: str | Sequence[str]) -> bool:
    """Exact match of the read prediction with the answer (or with any of a TSV cell's list of answers)."""
    answers = [answer] if isinstance(answer, str) else answer
    return gqa_normalize(prediction) in [str(a).strip().lower() for a in answers]


@register_task
class GQA(UnderstandingTask):
    """GQA test-dev balanced (see the module docstring)."""

    name = "gqa"
    description = "GQA test-dev balanced (compositional questions on Visual Genome images)"
    files = (
        "GQA from cs.stanford.edu/people/dorarad/gqa/download.html: testdev_balanced_questions.json "
        "(questions1.2) and the images/ folder, in one folder; or VLMEvalKit's GQA_TestDev_Balanced.tsv"
    )
    data_names = ("gqa", "GQA", "GQA_TestDev_Balanced.tsv")
    headline = "accuracy"
    reported = "UniTok 61.1"
    max_new_tokens = 16
    QUESTION_FILES = (
        "testdev_balanced_questions.json",
        "*/testdev_balanced_questions.json",
        "*/*/testdev_balanced_questions.json",
        "GQA_TestDev_Balanced.tsv",
        "*_balanced_questions.json",
    )

    def load(self, path: Path) -> list[Sample]:
        source = locate(path, self.QUESTION_FILES, "GQA questions file", self.files)
        if source.suffix.lower() == ".tsv":
            return self._load_tsv(source)
        questions = load_json(source)
        if not isinstance(questions, dict) or not questions:
            raise ValueError(f"{source} is not a GQA questions file (an object of questions by id)")
        # eval.py scores accuracy over the balanced questions only (all of testdev_balanced).
        balanced = {qid: q for qid, q in questions.items() if q.get("isBalanced", True)}
        first = next(iter(balanced.values()))
        image_dir = find_image_dir(
            [source.parent, source.parent.parent, path if path.is_dir() else source.parent],
            ["images", "allImages/images", "data/images", "."],
            f"{first['imageId']}.jpg",
        )
        samples = []
        for qid, q in balanced.items():
            types = q.get("types") or {}
            structural = types.get("structural", "")
            samples.append(
                Sample(
                    str(qid),
                    short_answer_prompt(q["question"]),
                    images=(str(image_dir / f"{q['imageId']}.jpg"),),
                    answer=q["answer"],
                    meta={"structural": structural, "semantic": types.get("semantic", "")},
                )
            )
        return samples

    def _load_tsv(self, path: Path) -> list[Sample]:
        rows = read_records(path)
        require_columns(rows, ("index", "image", "question", "answer"), path)
        samples = []
        for row, image in zip(rows, tsv_images(rows, path), strict=True):
            # VLMEvalKit's cell may hold a list literal of accepted answers; a single answer stays a string.
            answers = answer_list(row["answer"])
            answer = answers[0] if len(answers) == 1 else answers
            samples.append(
                Sample(
                    str(row["index"]), short_answer_prompt(row["question"]), images=(image,), answer=answer
                )
            )
        return samples

    def score(self, samples: Sequence[Sample], predictions: Sequence[str]) -> dict[str, Any]:
        scores = [float(gqa_correct(p, s.answer)) for s, p in zip(samples, predictions, strict=True)]
        metrics: dict[str, Any] = {"accuracy": mean(scores), "questions": len(samples)}
        structural = [s.meta.get("structural", "") for s in samples]
        if all(structural):  # the TSV carries no question types
            is_open = [t == GQA_OPEN_STRUCTURAL for t in structural]
            metrics["accuracy_binary"] = mean([x for x, o in zip(scores, is_open, strict=True) if not o])
            metrics["accuracy_open"] = mean([x for x, o in zip(scores, is_open, strict=True) if o])
            metrics["per_structural_type"] = grouped(structural, scores)
            metrics["per_semantic_type"] = grouped([s.meta["semantic"] for s in samples], scores)
        return metrics


# --------------------------------------------------------------------------------------------- TextVQA


def textvqa_prompt(question: str, ocr_tokens: Sequence[str]) -> str:
    """LLaVA-1.5's TextVQA prompt: the question, the OCR line when there are tokens, the short-answer line."""
    ocr = f"\n{OCR_LINE}{', '.join(ocr_tokens)}" if ocr_tokens else ""
    return f"{IMAGE_PLACEHOLDER}{question.strip()}{ocr}\n{SHORT_ANSWER}"


@register_task
class TextVQA(UnderstandingTask):
    """TextVQA validation (see the module docstring)."""

    name = "textvqa"
    description = "TextVQA val (questions that need reading text in the image)"
    files = (
        "TextVQA from textvqa.org/dataset: TextVQA_0.5.1_val.json and the train_images/ folder "
        "(train_val_images archive), optionally TextVQA_Rosetta_OCR_v0.2_val.json (OCR tokens, as LLaVA-1.5 "
        "prompts) or LLaVA's llava_textvqa_val_v051_ocr.jsonl, in one folder; or VLMEvalKit's TextVQA_VAL.tsv"
    )
    data_names = ("textvqa", "TextVQA", "TextVQA_VAL.tsv")
    headline = "accuracy"
    reported = "UniTok 51.6"
    max_new_tokens = 32
    QUESTION_FILES = (
        "TextVQA_0.5.1_val.json",
        "*/TextVQA_0.5.1_val.json",
        "TextVQA_VAL.tsv",
        "TextVQA_*.json",
    )
    OCR_FILES = ("TextVQA_Rosetta_OCR_v0.2_val.json", "*/TextVQA_Rosetta_OCR_v0.2_val.json")
    LLAVA_FILES = ("llava_textvqa_val_v051_ocr.jsonl", "*/llava_textvqa_val_v051_ocr.jsonl")

    def load(self, path: Path) -> list[Sample]:
        source = locate(path, self.QUESTION_FILES, "TextVQA annotations", self.files)
        if source.suffix.lower() == ".tsv":
            return self._load_tsv(source)
        data = load_json(source)
        rows = data.get("data") if isinstance(data, dict) else data
        if not isinstance(rows, list) or not rows:
            raise ValueError(f"{source} is not a TextVQA annotation file (no 'data' list)")
        roots = [source.parent, path if path.is_dir() else source.parent]
        prompt_of = self._prompts(roots, rows)
        image_dir = find_image_dir(
            roots,
            ["train_images", "train_val_images/train_images", "images", "."],
            f"{rows[0]['image_id']}.jpg",
        )
        return [
            Sample(
                str(row["question_id"]),
                prompt_of(row),
                images=(str(image_dir / f"{row['image_id']}.jpg"),),
                answer=list(row["answers"]),
            )
            for row in rows
        ]

    def _prompts(
        self, roots: Sequence[Path], rows: Sequence[dict[str, Any]]
    ) -> Callable[[dict[str, Any]], str]:
        """How each question is asked: LLaVA's own prompt when its question file is here, else the question
        with the OCR tokens of the row or of the Rosetta OCR file, else the question alone."""
        for root in roots:
            llava = find_path(root, self.LLAVA_FILES)
            if llava is not None:
                texts = {int(r["question_id"]): str(r["text"]) for r in read_records(llava)}
                missing = [r["question_id"] for r in rows if int(r["question_id"]) not in texts]
                if missing:
                    raise ValueError(f"{llava} has no prompt for question(s) {missing[:5]}")
                return lambda row: IMAGE_PLACEHOLDER + texts[int(row["question_id"])]
        tokens: dict[str, list[str]] = {}
        if not any("ocr_tokens" in r for r in rows):
            for root in roots:
                ocr = find_path(root, self.OCR_FILES)
                if ocr is not None:
                    entries = load_json(ocr)
                    entries = entries.get("data", []) if isinstance(entries, dict) else entries
                    tokens = {e["image_id"]: list(e["ocr_tokens"]) for e in entries if "image_id" in e}
                    break
        return lambda row: textvqa_prompt(
            row["question"], row.get("ocr_tokens") or tokens.get(row["image_id"], [])
        )

    def _load_tsv(self, path: Path) -> list[Sample]:
        rows = read_records(path)
        require_columns(rows, ("index", "image", "question", "answer"), path)
        return [
            Sample(
                str(row["index"]),
                textvqa_prompt(row["question"], []),
                images=(image,),
                answer=answer_list(row["answer"]),
            )
            for row, image in zip(rows, tsv_images(rows, path), strict=True)
        ]

    def score(self, samples: Sequence[Sample], predictions: Sequence[str]) -> dict[str, Any]:
        scores = [textvqa_accuracy(p, s.answer) for s, p in zip(samples, predictions, strict=True)]
        return {
            "accuracy": mean(scores),
            "questions": len(samples),
            "ocr_prompts": sum(OCR_LINE in s.prompt for s in samples),
        }
