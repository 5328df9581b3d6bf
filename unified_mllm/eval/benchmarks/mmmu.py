"""MMMU, validation split (900 questions, 30 subjects): task ``mmmu``.

**Files** (either form):

* the official release, the Hugging Face dataset MMMU/MMMU: a folder of ``<Subject>/validation-*.parquet``
  (``id, question, options, answer, image_1 .. image_7, question_type, subfield, topic_difficulty, ...``;
  ``options`` is a string holding a Python list, images are ``{"bytes": ...}`` structs), or one such file.
  Reading it needs pyarrow (``pip install 'unified_mllm[bench]'``).
* VLMEvalKit's ``MMMU_DEV_VAL.tsv`` (``index, question, A .., answer, image, split, ...``; ``image`` is one
  base64 image or a list of them written as a Python list); only its ``validation`` rows are asked.

**Images.** Each ``<image k>`` marker of the question and the options becomes an ``<|image|>`` placeholder,
in order (image k again where a marker repeats); images no marker names go before the question, each on its
own line.

**Prompt** (lmms-eval's MMMU task, LLaVA's prompt): multiple choice — the question, ``A. option`` lines, a
blank line, ``Answer with the option's letter from the given choices directly.``; open — the question, a
blank line, ``Answer the question using a single word or phrase.``; greedy, at most 16 new tokens.

**Matching** (MMMU's own rules, as lmms-eval carries them): :func:`parse_multi_choice_response` — the letter
as ``(A)``, then ``A `` (a letter and a space), then ``A.``; failing those, in an answer of more than five
words, the text of an option; several candidates: the one that occurs last; none: a random letter. MMMU draws
that letter from Python's global generator (seeded once, so it depends on the order questions are scored);
here it is drawn from a generator seeded with the question's id, the same on every run and for any
``--limit`` (``random_picks`` counts them). lmms-eval's copy differs from the MMMU repository's first script,
which looks for " A " with a space on both sides and has no "A." pass; ours agreed with lmms-eval's functions
on each of 20 000 generated answers. Open questions: :func:`parse_open_response` (the key phrase after
"is", "so", "therefore", "=", ..., the numbers in it, normalised) and :func:`eval_open`. No LLM judge.

**Metrics**: ``accuracy`` over all questions (MMMU's "Overall"), ``per_discipline`` (6) and ``per_subject``
(30), each the share of its questions answered right (MMMU's instance-level accuracy).
"""

from __future__ import annotations

import ast
import random
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from unified_mllm.eval.benchmark import (
    MC_INSTRUCTION,
    OPTION_LETTERS,
    SHORT_ANSWER,
    Sample,
    UnderstandingTask,
    accuracy_by,
    decode_base64_image,
    find_path,
    image_bytes,
    is_missing,
    options_of,
    read_records,
    require_columns,
)
from unified_mllm.eval.metrics import ratio
from unified_mllm.eval.tasks import register_task
from unified_mllm.layout import IMAGE_PLACEHOLDER

DISCIPLINES = {
    "Art & Design": ["Art", "Art_Theory", "Design", "Music"],
    "Business": ["Accounting", "Economics", "Finance", "Manage", "Marketing"],
    "Science": ["Biology", "Chemistry", "Geography", "Math", "Physics"],
    "Health & Medicine": [
        "Basic_Medical_Science",
        "Clinical_Medicine",
        "Diagnostics_and_Laboratory_Medicine",
        "Pharmacy",
        "Public_Health",
    ],
    "Humanities & Social Science": ["History", "Literature", "Sociology", "Psychology"],
    "Tech & Engineering": [
        "Agriculture",
        "Architecture_and_Engineering",
        "Computer_Science",
        "Electronics",
        "Energy_and_Power",
        "Materials",
        "Mechanical_Engineering",
    ],
}
SUBJECTS = [subject for subjects in DISCIPLINES.values() for subject in subjects]
DISCIPLINE_OF = {subject: discipline for discipline, subjects in DISCIPLINES.items() for subject in subjects}
MULTIPLE_CHOICE, OPEN = "multiple-choice", "open"
IMAGE_MARKER = re.compile(r"<image (\d+)>")
MAX_IMAGES = 7
TSV_NAME = "MMMU_DEV_VAL.tsv"
OTHER = "(other)"


# --------------------------------------------------------------------------- MMMU's answer parsing rules


def parse_multi_choice_response(
    response: str, options: Mapping[str, str], rng: random.Random
) -> tuple[str, bool]:
    """The letter MMMU reads from a multiple-choice answer, and whether it was a random pick.

    The rules of MMMU's ``parse_multi_choice_response`` as lmms-eval runs them: strip ``,.!?;:'`` from the
    ends and pad with spaces; candidates are the letters written ``(A)``; else those followed by a space; else
    those followed by a period; else, for an answer of more than five words, the options whose text it holds
    (case-insensitive). One candidate wins; of several, the one found last in the answer (by ``(A)``, by
    `` A `` or by the option text — the form that found them; the first candidate when none is found that
    way); none: a random letter from ``rng``.
    """
    for char in ",.!?;:'":
        response = response.strip(char)
    response = f" {response} "
    letters = list(options)
    by_bracket = [c for c in letters if f"({c})" in response]
    candidates, by_text = by_bracket, False
    if not candidates:
        candidates = [c for c in letters if f"{c} " in response]
    if not candidates:
        candidates = [c for c in letters if f"{c}." in response]
    if not candidates and len(response.split()) > 5:
        candidates = [c for c in letters if str(options[c]).lower() in response.lower()]
        by_text = bool(candidates)
    if not candidates:
        return rng.choice(letters), True
    if len(candidates) == 1:
        return candidates[0], False
    if by_text:
        positions = [response.lower().rfind(str(options[c]).lower()) for c in candidates]
    elif by_bracket:
        positions = [response.rfind(f"({c})") for c in candidates]
    else:
        positions = [response.rfind(f" {c} ") for c in candidates]
    # The first of the largest positions (numpy's argmax, which MMMU uses).
    return candidates[max(range(len(candidates)), key=lambda i: (positions[i], -i))], False


_NUMBER_WITH_COMMAS = re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b")
_NUMBER_SCIENTIFIC = re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+")
_NUMBER_SIMPLE = re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])")
KEY_INDICATORS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")
TRIVIAL = {":", ",", ".", "!", "?", ";", "'"}


def extract_numbers(text: str) -> list[str]:
    """Numbers with thousands commas, in scientific notation, then plain ones (MMMU's three patterns)."""
    return _NUMBER_WITH_COMMAS.findall(text) + _NUMBER_SCIENTIFIC.findall(text) + _NUMBER_SIMPLE.findall(text)


def is_number(text: str) -> bool:
    try:
        float(text.replace(",", ""))
    except ValueError:
        return False
    return True


def normalize_str(text: str) -> list[str | float]:
    """MMMU's normal form: a number -> itself as a float rounded to 2 places; else lower case, and a single
    character padded with a space on either side (two forms), so it does not match inside words."""
    text = text.strip()
    if is_number(text):
        return [round(float(text.replace(",", "")), 2)]
    text = text.lower()
    return [f" {text}", f"{text} "] if len(text) == 1 else [text]


def key_subresponses(response: str) -> list[str]:
    """The parts of an answer that may hold the answer: per sentence or line, the shortest tail after one of
    the key words ("is", "so", "therefore", ...; "=" in the last part), else the whole answer."""
    response = response.strip().strip(".").lower()
    # MMMU splits at ". " before a capital, on text it has already lower-cased: in effect only at line breaks.
    parts = re.split(r"\.\s(?=[A-Z])|\n", response)
    found = []
    for i, part in enumerate(parts):
        indicators = [*KEY_INDICATORS, "="] if i == len(parts) - 1 else KEY_INDICATORS
        shortest = ""
        for indicator in indicators:
            if indicator in part:
                tail = part.split(indicator)[-1].strip()
                # MMMU's order: an empty tail so far is replaced by any later one, else only by a shorter one
                if not shortest or len(tail) < len(shortest):
                    shortest = tail
        if shortest and shortest.strip() not in TRIVIAL:
            found.append(shortest)
    return found or [response]


def parse_open_response(response: str) -> list[str | float]:
    """MMMU's reading of an open answer: its key phrases and the numbers in them, normalised, without
    repeats."""
    keys = key_subresponses(response)
    pieces = keys + [n for key in keys for n in extract_numbers(key)]
    normalised = [form for piece in pieces for form in normalize_str(piece)]
    return list(dict.fromkeys(normalised))


def eval_open(gold: str | list[str], parsed: Sequence[str | float]) -> bool:
    """MMMU's ``eval_open``: a parsed string holding a normalised answer string, or a parsed number equal to a
    normalised answer."""
    answers = [form for g in ([gold] if isinstance(gold, str) else gold) for form in normalize_str(str(g))]
    for pred in parsed:
        if isinstance(pred, str):
            if any(isinstance(a, str) and a in pred for a in answers):
                return True
        elif pred in answers:
            return True
    return False


def eval_multi_choice(gold: str | list[str], letter: str) -> bool:
    return letter in gold if isinstance(gold, list) else letter == gold


# ----------------------------------------------------------------------------------------- the task


def parse_answer(value: Any) -> str | list[str]:
    """An answer cell: a string, or a list of accepted answers written as a Python list."""
    text = str(value).strip()
    if text.startswith("[") and text.endswith("]"):
        try:
            parsed = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text
        if isinstance(parsed, list):
            return [str(a) for a in parsed]
    return text


def subject_of(question_id: str) -> str:
    """``validation_Art_Theory_12`` -> ``Art_Theory``."""
    match = re.match(r"^[^_]+_(.+?)_\d+$", question_id)
    return match.group(1) if match else ""


def build_prompt(question: str, options: Mapping[str, str]) -> str:
    """lmms-eval's MMMU prompt (markers still in place)."""
    if options:
        listed = "\n".join(f"{letter}. {text}" for letter, text in options.items())
        return f"{question}\n{listed}\n\n{MC_INSTRUCTION}"
    return f"{question}\n\n{SHORT_ANSWER}"


def place_images(prompt: str, images: Mapping[int, Any], where: str) -> tuple[str, tuple[Any, ...]]:
    """Each ``<image k>`` marker -> a placeholder with image k (in order); unnamed images first."""
    named = [int(k) for k in IMAGE_MARKER.findall(prompt)]
    missing = sorted({k for k in named if k not in images})
    if missing:
        raise ValueError(f"{where}: the question names <image {missing[0]}> but has no such image")
    unnamed = [k for k in sorted(images) if k not in named]
    text = IMAGE_MARKER.sub(IMAGE_PLACEHOLDER, prompt)
    text = "".join(f"{IMAGE_PLACEHOLDER}\n" for _ in unnamed) + text
    return text, tuple(images[k] for k in unnamed + named)


@register_task
class MMMU(UnderstandingTask):
    """MMMU's validation split (see the module docstring)."""

    name = "mmmu"
    description = "MMMU (validation)"
    files = (
        "the MMMU/MMMU dataset folder (https://huggingface.co/datasets/MMMU/MMMU: <Subject>/validation-*.parquet, "
        "needs pyarrow) or VLMEvalKit's MMMU_DEV_VAL.tsv (https://opencompass.openxlab.space/utils/VLMEval/"
        "MMMU_DEV_VAL.tsv)"
    )
    data_names = ("*/validation-*.parquet", "**/MMMU/*/validation-*.parquet", TSV_NAME, f"**/{TSV_NAME}")
    headline = "accuracy"
    reported = "UniToken 32.8, Janus-Pro-7B 41.0"
    max_new_tokens = 16

    @classmethod
    def find_data(cls, root: Path) -> Path | None:
        found = find_path(root, cls.data_names)
        if found is not None and found.suffix == ".parquet":
            return found.parent.parent  # the dataset folder (one subfolder per subject)
        return found

    def load(self, path: Path) -> list[Sample]:
        if path.is_dir():
            parquets = sorted(path.glob("*/validation-*.parquet")) or sorted(
                path.glob("validation-*.parquet")
            )
            if parquets:
                return [s for file in parquets for s in self._load_parquet(file)]
            file = find_path(path, (TSV_NAME, f"**/{TSV_NAME}"))
            if file is None:
                raise FileNotFoundError(
                    f"{self.name}: no validation-*.parquet or {TSV_NAME} in {path} ({self.files})"
                )
            return self._load_tsv(file)
        if path.suffix.lower() == ".parquet":
            return self._load_parquet(path)
        return self._load_tsv(path)

    def _load_parquet(self, file: Path) -> list[Sample]:
        rows = read_records(file)
        require_columns(rows, ["id", "question", "options", "answer", "question_type", "image_1"], file)
        samples = []
        for row in rows:
            qid = str(row["id"])
            where = f"{file}, {qid}"
            images = {
                k: image_bytes(row[f"image_{k}"], where)
                for k in range(1, MAX_IMAGES + 1)
                if row.get(f"image_{k}") is not None
            }
            options = {}
            if row["question_type"] == MULTIPLE_CHOICE:
                listed = ast.literal_eval(str(row["options"]))
                options = {OPTION_LETTERS[i]: str(text) for i, text in enumerate(listed)}
            subject = subject_of(qid) or file.parent.name
            samples.append(
                self._sample(qid, str(row["question"]), options, row["answer"], subject, images, where)
            )
        return samples

    def _load_tsv(self, file: Path) -> list[Sample]:
        rows = read_records(file)
        require_columns(rows, ["index", "question", "answer", "image"], file)
        samples = []
        for row in rows:
            qid = str(row.get("id") or row["index"]).strip()
            split = str(row.get("split") or "").strip().lower()
            if (split and split != "validation") or qid.startswith(("dev_", "test_")):
                continue
            where = f"{file}, row {row['index']}"
            cell = str(row["image"]).strip()
            cells = ast.literal_eval(cell) if cell.startswith("[") else [cell]
            images = {k: decode_base64_image(c, where) for k, c in enumerate(cells, start=1)}
            options = options_of(row)
            kind = str(row.get("question_type") or "").strip()
            if kind == OPEN or (not kind and not options):
                options = {}
            subject = subject_of(qid) or str(row.get("category") or "").strip().replace(" ", "_")
            sample = self._sample(qid, str(row["question"]), options, row["answer"], subject, images, where)
            if sample.meta["discipline"] == OTHER and not is_missing(row.get("l2-category")):
                sample.meta["discipline"] = str(row["l2-category"]).strip()  # a subject MMMU does not list
            samples.append(sample)
        if not samples:
            raise ValueError(f"{file} holds no validation questions")
        return samples

    def _sample(
        self,
        qid: str,
        question: str,
        options: dict[str, str],
        answer: Any,
        subject: str,
        images: Mapping[int, Any],
        where: str,
    ) -> Sample:
        prompt, placed = place_images(build_prompt(question, options), images, where)
        return Sample(
            id=qid,
            prompt=prompt,
            images=placed,
            answer=parse_answer(answer) if not is_missing(answer) else "",
            meta={
                "subject": subject,
                "discipline": DISCIPLINE_OF.get(subject, OTHER),
                "question_type": MULTIPLE_CHOICE if options else OPEN,
                "options": options,
            },
        )

    def score(self, samples: Sequence[Sample], predictions: Sequence[str]) -> dict[str, Any]:
        hits, random_picks = [], 0
        for sample, prediction in zip(samples, predictions, strict=True):
            if sample.meta["question_type"] == MULTIPLE_CHOICE:
                rng = random.Random(f"mmmu:{sample.id}")  # a str seed hashes the same on every run
                letter, guessed = parse_multi_choice_response(prediction, sample.meta["options"], rng)
                random_picks += guessed
                hits.append(eval_multi_choice(sample.answer, letter))
            else:
                hits.append(eval_open(sample.answer, parse_open_response(prediction)))
        return {
            "accuracy": ratio(sum(hits), len(hits)),
            "correct": sum(hits),
            "total": len(hits),
            "multiple_choice": sum(s.meta["question_type"] == MULTIPLE_CHOICE for s in samples),
            "open": sum(s.meta["question_type"] == OPEN for s in samples),
            "random_picks": random_picks,
            "per_discipline": accuracy_by(
                [s.meta["discipline"] for s in samples], hits, order=list(DISCIPLINES)
            ),
            "per_subject": accuracy_by([s.meta["subject"] for s in samples], hits, order=SUBJECTS),
        }
