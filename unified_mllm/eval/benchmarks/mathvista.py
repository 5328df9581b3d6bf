"""MathVista testmini (Lu et al., ICLR 2024): 1000 math questions on figures, multiple choice and free form.

**Files**, any of: the Hugging Face release ``AI4Math/MathVista`` (``testmini-*.parquet``: ``pid``,
``question``, ``decoded_image`` bytes, ``choices``, ``unit``, ``precision``, ``answer``, ``question_type``,
``answer_type``, ``metadata``, ``query``; reading it needs pyarrow); the GitHub release (lupantech/MathVista)
``testmini.json`` with ``query.json`` beside it and the ``images/`` folder; VLMEvalKit's
``MathVista_MINI.tsv`` (``index, image, question, answer, question_type, answer_type, choices, precision,
task, skills, ...``).

**Prompt**: the official ``query`` (the hint — "Hint: Please answer the question requiring an integer answer
and provide the final value, e.g., 1, 2, 3, at the end." and its siblings —, the question with its unit, the
lettered choices) after the image; where a release lacks it (a ``testmini.json`` without ``query.json``, a TSV
whose question is bare) it is built the same way, as MathVista's ``build_query.py`` does zero-shot.

**Matching.** The official pipeline asks GPT-4 (``extract_answer.py``) to pull the answer out of the response,
then normalises it (``normalize_extracted_answer``) and compares (``safe_equal``). We extract by rule instead,
so our accuracy can differ from the paper's, mostly on long free-form responses:

* multiple choice: an explicit letter ("answer is (B)", "Answer: B", "(B)"), else the one option letter or the
  one option text the response names (:func:`match_choice`), else the whole response; then the official
  normalisation: a letter becomes its option, any other text the option nearest in edit distance;
* integer / float: the response itself when it is a number, else the last number in it ("1,000" -> 1000);
  normalised as the official does (integer: ``str(int(float(x)))``; float:
  ``str(round(float(x), precision))``);
* list: the last ``[...]`` in the response, written as Python writes the list;
* then, as ``safe_equal``, the normalised string must equal the answer.

**Metrics**: ``accuracy`` overall (the headline) and per ``task``, ``skill`` (a question counts in each of its
skills), ``question_type``, ``answer_type``, ``grade``, ``context`` and ``source``.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from unified_mllm.eval.benchmark import (
    Sample,
    TsvImages,
    UnderstandingTask,
    find_path,
    is_missing,
    match_choice,
    read_records,
    require_columns,
)
from unified_mllm.eval.tasks import register_task
from unified_mllm.layout import IMAGE_PLACEHOLDER

HINTS = {  # build_query.py's zero-shot hints
    "multi_choice": "Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, "
    "D, at the end.",
    "integer": "Hint: Please answer the question requiring an integer answer and provide the final value, "
    "e.g., 1, 2, 3, at the end.",
    "float1": "Hint: Please answer the question requiring a floating-point number with one decimal place and "
    "provide the final value, e.g., 1.2, 1.3, 1.4, at the end.",
    "float2": "Hint: Please answer the question requiring a floating-point number with two decimal places "
    "and provide the final value, e.g., 1.23, 1.34, 1.45, at the end.",
    "list": "Hint: Please answer the question requiring a Python list as an answer and provide the final "
    "list, e.g., [1, 2, 3], [1.2, 1.3, 1.4], at the end.",
}
# The testmini file inside a release folder, in order of preference.
RELEASE_FILES = (
    "MathVista_MINI.tsv",
    "testmini.json",
    "data/testmini.json",
    "testmini-*.parquet",
    "data/testmini-*.parquet",
)
BREAKDOWNS = ("task", "skills", "question_type", "answer_type", "grade", "context", "source")
# A number, with thousands commas ("1,000") and a sign; "2007-2008" is two numbers, not 2007 and -2008.
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_EXPLICIT_LETTER = (
    # "Answer: B", "the answer is (B)": the word in any case, the letter a capital (not the article "a").
    re.compile(r"(?i:answer\s*(?:is|:)?\s*:?\s*)\(?([A-Z])\)?(?![A-Za-z])"),
    re.compile(r"\(([A-Z])\)"),
)
_LIST = re.compile(r"\[[^\[\]]*\]")


def build_query(
    question: str,
    choices: Sequence[str] | None,
    unit: str | None,
    question_type: str,
    answer_type: str,
    precision: Any,
) -> str:
    """MathVista's zero-shot query: hint, question (with its unit), lettered choices."""
    if question_type == "multi_choice":
        hint = HINTS["multi_choice"]
    elif answer_type == "float":
        hint = HINTS["float2"] if _int_or(precision, 1) == 2 else HINTS["float1"]
    else:
        hint = HINTS.get(answer_type, HINTS["integer"])
    lines = [hint, f"Question: {question}" + (f" (Unit: {unit})" if unit else "")]
    if choices:
        lines += ["Choices:", *(f"({chr(ord('A') + i)}) {c}" for i, c in enumerate(choices))]
    return "\n".join(lines)


def _int_or(value: Any, default: int) -> int:
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return default


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (the official scorer picks the nearest option by it)."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def extract_answer(response: str, question_type: str, answer_type: str, choices: Sequence[str]) -> str:
    """Our rule-based stand-in for the official GPT-4 extraction (module docstring): a letter or the response
    (multiple choice), a number, a list, or the stripped response."""
    text = response.strip()
    if question_type == "multi_choice":
        if text in choices:
            return text
        letters = {chr(ord("A") + i) for i in range(len(choices))}
        for pattern in _EXPLICIT_LETTER:
            hits = [m for m in pattern.findall(text) if m.upper() in letters]
            if hits:
                return hits[-1].upper()
        picked = match_choice(text, {chr(ord("A") + i): c for i, c in enumerate(choices)})
        return picked if picked is not None else text
    if answer_type in ("integer", "float"):
        try:
            float(text)
            return text
        except ValueError:
            numbers = [
                m.group().removeprefix("-") if m.start() and text[m.start() - 1].isalnum() else m.group()
                for m in _NUMBER.finditer(text)
            ]
            return numbers[-1].replace(",", "") if numbers else ""
    if answer_type == "list":
        lists = _LIST.findall(text)
        return lists[-1] if lists else text
    return text


def normalize_extracted(
    extraction: str, choices: Sequence[str], question_type: str, answer_type: str, precision: Any
) -> str | None:
    """MathVista's ``normalize_extracted_answer``: the option text, or the number / list as a string (None
    when it does not parse)."""
    if question_type == "multi_choice":
        extraction = extraction.strip()
        letter = re.findall(r"\(([a-zA-Z])\)", extraction)
        if letter:
            extraction = letter[0].upper()
        letters = [chr(ord("A") + i) for i in range(len(choices))]
        if extraction in letters:
            return choices[letters.index(extraction)]
        if not choices:
            return None
        distances = [edit_distance(extraction, c) for c in choices]
        return choices[distances.index(min(distances))]
    try:
        if answer_type == "integer":
            return str(int(float(extraction)))
        if answer_type == "float":
            return str(round(float(extraction), _int_or(precision, 0)))
    except (TypeError, ValueError):
        return None
    if answer_type == "list":
        try:
            return str(ast.literal_eval(extraction))
        except (ValueError, SyntaxError):
            return extraction
    return extraction


def mathvista_correct(response: str, answer: str, meta: dict[str, Any]) -> tuple[str | None, bool]:
    """The normalised prediction of ``response`` and whether it equals ``answer`` (``safe_equal``)."""
    choices = meta.get("choices") or []
    extraction = extract_answer(response, meta["question_type"], meta["answer_type"], choices)
    prediction = normalize_extracted(
        extraction, choices, meta["question_type"], meta["answer_type"], meta.get("precision")
    )
    if prediction is None:
        return None, False
    if meta["question_type"] != "multi_choice" and meta["answer_type"] == "text":
        return prediction, prediction.strip().lower() == answer.strip().lower()
    return prediction, prediction == answer


def mathvista_scores(
    metas: Sequence[dict[str, Any]], answers: Sequence[str], predictions: Sequence[str]
) -> dict[str, Any]:
    """``accuracy`` and the per-breakdown {accuracy, correct, total} (module docstring)."""
    correct = [mathvista_correct(p, a, m)[1] for p, a, m in zip(predictions, answers, metas, strict=True)]
    out: dict[str, Any] = {
        "accuracy": sum(correct) / len(correct) if correct else None,
        "correct": sum(correct),
        "total": len(correct),
    }
    for key in BREAKDOWNS:
        groups: dict[str, list[bool]] = {}
        for meta, right in zip(metas, correct, strict=True):
            values = meta.get(key)
            for value in values if isinstance(values, list) else [values]:
                if not is_missing(value):
                    groups.setdefault(str(value), []).append(right)
        label = "per_skill" if key == "skills" else f"per_{key}"
        out[label] = {
            name: {"accuracy": sum(v) / len(v), "correct": sum(v), "total": len(v)}
            for name, v in sorted(groups.items())
        }
    return out


def _listish(value: Any) -> list[str]:
    """A list field: a list, a Python list literal (TSV), or nothing."""
    if value is None or (not isinstance(value, list | tuple) and is_missing(value)):
        return []
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return [value]
    return [str(v) for v in value] if isinstance(value, list | tuple) else [str(value)]


@register_task
class MathVista(UnderstandingTask):
    name = "mathvista"
    description = "MathVista testmini: math reasoning on figures (rule-based answer extraction)"
    files = (
        "testmini parquet of huggingface.co/datasets/AI4Math/MathVista (needs pyarrow), or testmini.json + "
        "query.json + images/ of github.com/lupantech/MathVista (data/), or VLMEvalKit's MathVista_MINI.tsv "
        "(https://opencompass.openxlab.space/utils/VLMEval/MathVista_MINI.tsv)"
    )
    data_names = (
        "MathVista_MINI.tsv",
        "MathVista/MathVista_MINI.tsv",
        "MathVista/data/testmini-*.parquet",
        "MathVista/testmini-*.parquet",
        "MathVista/testmini.json",
        "MathVista/data/testmini.json",
    )
    max_new_tokens = 256
    headline = "accuracy"
    reported: ClassVar[str] = "UniToken 38.5 (official scorer: GPT-4 extraction)"

    def load(self, path: Path) -> list[Sample]:
        if path.is_dir():
            found = find_path(path, RELEASE_FILES)
            if found is None:
                raise FileNotFoundError(f"{path} holds no MathVista testmini file ({self.files})")
            path = found
        if path.suffix.lower() == ".tsv":
            return self._load_tsv(path)
        rows = read_records(path)
        queries: dict[str, str] = {}
        if path.suffix.lower() == ".json" and (path.parent / "query.json").is_file():
            queries = json.loads((path.parent / "query.json").read_text(encoding="utf-8"))
        require_columns(rows, ("pid", "question", "answer", "question_type", "answer_type"), path)
        samples = []
        for row in rows:
            pid = str(row["pid"])
            meta = self._meta(row, row.get("metadata") or {})
            query = row.get("query") if not is_missing(row.get("query")) else queries.get(pid)
            if not query:
                query = build_query(
                    str(row["question"]),
                    meta["choices"],
                    None if is_missing(row.get("unit")) else str(row["unit"]),
                    meta["question_type"],
                    meta["answer_type"],
                    meta["precision"],
                )
            samples.append(
                Sample(
                    id=pid,
                    prompt=IMAGE_PLACEHOLDER + str(query),
                    images=(self._image(path.parent, row, pid),),
                    answer=str(row["answer"]),
                    meta=meta,
                )
            )
        return samples

    @staticmethod
    def _image(root: Path, row: dict[str, Any], pid: str) -> bytes | Path:
        decoded = row.get("decoded_image")
        if isinstance(decoded, dict) and decoded.get("bytes"):
            return bytes(decoded["bytes"])
        if isinstance(decoded, bytes | bytearray) and decoded:
            return bytes(decoded)
        relative = str(row.get("image") or f"images/{pid}.jpg")
        for candidate in (root / relative, root.parent / relative, root / "images" / Path(relative).name):
            if candidate.is_file():
                return candidate
        return root / relative  # missing: recorded as that sample's error, named

    @staticmethod
    def _meta(row: dict[str, Any], metadata: dict[str, Any]) -> dict[str, Any]:
        """What scoring needs: the question and answer types, choices, precision and the breakdown labels
        (from ``metadata`` in the official releases, from columns in the TSV)."""
        merged = {**metadata, **{k: row[k] for k in BREAKDOWNS if k in row and not is_missing(row[k])}}
        labels = {
            k: None if is_missing(merged.get(k)) else str(merged[k])
            for k in ("task", "grade", "context", "source")
        }
        return {
            "question_type": str(row["question_type"]),
            "answer_type": str(row["answer_type"]),
            "choices": _listish(row.get("choices")),
            "precision": None if is_missing(row.get("precision")) else row.get("precision"),
            **labels,
            "skills": _listish(merged.get("skills")),
        }

    def _load_tsv(self, path: Path) -> list[Sample]:
        rows = read_records(path)
        require_columns(rows, ("index", "image", "question", "answer", "question_type", "answer_type"), path)
        images = TsvImages(rows, path)
        samples = []
        for row in rows:
            index = str(row["index"])
            image = images.get(index)
            meta = self._meta(row, {})
            question = str(row["question"]).strip()
            # VLMEvalKit's question is the official query; a bare question gets the query built around it.
            query = question if question.startswith("Hint:") else build_query(
                question, meta["choices"], None if is_missing(row.get("unit")) else row.get("unit"),
                meta["question_type"], meta["answer_type"], meta["precision"],
            )  # fmt: skip
            answer = str(row["answer"]).strip()
            letters = [chr(ord("A") + i) for i in range(len(meta["choices"]))]
            if (
                meta["question_type"] == "multi_choice"
                and answer in letters
                and answer not in meta["choices"]
            ):
                answer = meta["choices"][
                    letters.index(answer)
                ]  # a letter answer: the official compares texts
            samples.append(
                Sample(
                    id=index,
                    prompt=IMAGE_PLACEHOLDER + query,
                    images=(image,),
                    answer=answer,
                    meta=meta,
                )
            )
        return samples

    def score(self, samples: Sequence[Sample], predictions: Sequence[str]) -> dict[str, Any]:
        return mathvista_scores([s.meta for s in samples], [str(s.answer) for s in samples], predictions)
