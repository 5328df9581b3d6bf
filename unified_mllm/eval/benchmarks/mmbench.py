"""MMBench (dev split, English and Chinese) with CircularEval: tasks ``mmbench-en`` and ``mmbench-cn``.

**Files.** The TSV the MMBench team distributes (the OpenCompass / VLMEvalKit copies ``MMBench_DEV_EN.tsv`` and
``MMBench_DEV_CN.tsv``, or the older ``mmbench_dev_20230712.tsv`` / ``mmbench_dev_cn_20231003.tsv`` that LLaVA's
scripts use): columns ``index, question, hint, A, B, C, D, answer, category, l2-category, image, split`` (and
others, kept as they are). ``image`` is a base64 image, or in VLMEvalKit's copies, for rows that repeat an
image, the ``index`` of the row holding it (a cell of at most 64 characters, VLMEvalKit's rule).

**CircularEval.** A question with k options is asked k times, the options rotated one place each time (pass r
puts option ``(i + r) % k`` under letter i, so the right letter moves too); it counts as right only when every
pass is. The released TSVs already hold the rotated copies as rows of their own, ``index + r * 1e6`` (that is
how VLMEvalKit and LLaVA ask them: every row once); a file with no such rows (a question list of one's own)
gets its rotations made here, with the same indices. Rows of one question share a :attr:`Sample.group`, so
``--limit N`` asks the first N questions with all their rotations.

**Prompt** (LLaVA-1.5's ``model_vqa_mmbench --single-pred-prompt``, which UniToken's evaluation follows): the
image, then ``hint`` (when there is one), the question, one ``A. text`` line per option and the instruction —
``Answer with the option's letter from the given choices directly.`` for EN and LLaVA's ``--lang cn`` string
``请直接回答选项字母。`` for CN; greedy, at most 16 new tokens.

**Matching** (:func:`unified_mllm.eval.benchmark.match_choice`): VLMEvalKit's exact matching (an option letter
standing alone, else the text of exactly one option). Where VLMEvalKit's default then asks ChatGPT to map an
answer that neither rule reads to a letter, we count it wrong (``unmatched`` says how many); the letter
instruction makes such answers rare.

**Metrics**: ``circular_accuracy`` (the papers' MMBench number) overall, per ``category`` (20 abilities) and per
``l2-category`` (6), and ``vanilla_accuracy``: the first pass (the original option order) alone. A test-split
file has no answers: the metrics are then ``None`` and the submission file is what to upload.

**Submission**: ``<task>-submission.xlsx`` (the rows asked, their original columns without ``image`` — as
VLMEvalKit writes its prediction file — plus ``prediction``), what the MMBench evaluation server takes for the
test split; for dev it is the prediction file. Without openpyxl a ``.tsv`` with the same columns is written
instead, and the results say so.


"""

from __future__ import annotations

import csv
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from unified_mllm import io
from unified_mllm.eval.benchmark import (
    MC_INSTRUCTION,
    MC_INSTRUCTION_CN,
    Sample,
    TsvImages,
    UnderstandingTask,
    accuracy_by,
    choice_prompt,
    image_first,
    is_missing,
    match_choice,
    options_of,
    read_records,
    require_columns,
)
from unified_mllm.eval.metrics import ratio
from unified_mllm.eval.tasks import register_task

CIRCULAR_OFFSET = (
    1_000_000  # a rotated copy of question i has index i + r * CIRCULAR_OFFSET (VLMEvalKit's rule)
)
MMBENCH_LETTERS = "ABCD"  # MMBench questions have two to four options


def rotate(options: Mapping[str, str], answer: str | None, turn: int) -> tuple[dict[str, str], str | None]:
    """Pass ``turn`` of CircularEval: the option texts moved ``turn`` places up, and where the answer went."""
    letters, texts = list(options), list(options.values())
    k = len(letters)
    rotated = {letters[i]: texts[(i + turn) % k] for i in range(k)}
    moved = letters[(letters.index(answer) - turn) % k] if answer in options else None
    return rotated, moved


def _text(value: Any) -> str:
    return "" if is_missing(value) else str(value).strip()


class MMBenchTask(UnderstandingTask):
    """MMBench's dev split with CircularEval (see the module docstring)."""

    instruction: ClassVar[str] = MC_INSTRUCTION
    headline = "circular_accuracy"
    max_new_tokens = 16

    def __init__(self, data: str | Path | None = None, restart: bool = False) -> None:
        super().__init__(data, restart)
        self._columns: dict[str, dict[str, Any]] = {}  # sample id -> its TSV row without the image

    def load(self, path: Path) -> list[Sample]:
        file = path if path.is_file() else self.find_data(path)
        if file is None:
            raise FileNotFoundError(f"{self.name}: no MMBench TSV in {path} ({self.files})")
        rows = read_records(file)
        require_columns(rows, ["index", "question", "A", "B", "image"], file)
        images = TsvImages(rows, file)
        has_copies = any(int(row["index"]) >= CIRCULAR_OFFSET for row in rows)
        samples = []
        for row in sorted(rows, key=lambda r: (int(r["index"]) % CIRCULAR_OFFSET, int(r["index"]))):
            index = int(row["index"])
            options = options_of(row, MMBENCH_LETTERS)
            answer = _text(row.get("answer")) or None
            turns = [index // CIRCULAR_OFFSET] if has_copies else range(len(options))
            for turn in turns:
                if has_copies:
                    shown, right = options, answer
                else:
                    shown, right = rotate(options, answer, turn)
                samples.append(self._sample(row, index % CIRCULAR_OFFSET, turn, shown, right, images))
        return samples

    def _sample(
        self,
        row: Mapping[str, Any],
        question: int,
        turn: int,
        options: dict[str, str],
        answer: str | None,
        images: TsvImages,
    ) -> Sample:
        index = question + turn * CIRCULAR_OFFSET
        prompt = choice_prompt(
            _text(row["question"]), options, hint=_text(row.get("hint")), instruction=self.instruction
        )
        columns = {k: v for k, v in row.items() if k != "image"}
        columns.update({"index": index, **options, "answer": answer or ""})
        self._columns[str(index)] = columns
        return Sample(
            id=str(index),
            prompt=image_first(prompt),
            images=(images.get(str(row["index"]).strip()),),
            answer=answer,
            meta={
                "question": question,
                "pass": turn,
                "options": options,
                "category": _text(row.get("category")),
                "l2_category": _text(row.get("l2-category", row.get("l2_category"))),
            },
            group=str(question),
        )

    def score(self, samples: Sequence[Sample], predictions: Sequence[str]) -> dict[str, Any]:
        picked = [match_choice(p, s.meta["options"]) for s, p in zip(samples, predictions, strict=True)]
        questions: dict[str, list[tuple[Sample, bool]]] = {}
        for sample, letter in zip(samples, picked):
            questions.setdefault(sample.group, []).append((sample, letter == sample.answer))
        first = [min(rows, key=lambda r: r[0].meta["pass"]) for rows in questions.values()]
        metrics: dict[str, Any] = {
            "circular_accuracy": None,
            "vanilla_accuracy": None,
            "questions": len(questions),
            "prompts": len(samples),
            "unmatched": sum(letter is None for letter in picked),
        }
        if any(s.answer is None for s in samples):
            metrics["note"] = "the file holds no answers (test split): upload the submission file to score it"
            return metrics
        circular = [all(hit for _, hit in rows) for rows in questions.values()]
        vanilla = [hit for _, hit in first]
        metrics["circular_accuracy"] = ratio(sum(circular), len(circular))
        metrics["vanilla_accuracy"] = ratio(sum(vanilla), len(vanilla))
        for key, label in (("category", "per_category"), ("l2_category", "per_l2_category")):
            names = [s.meta[key] or "(none)" for s, _ in first]
            table = accuracy_by(names, circular, name="circular_accuracy")
            for name, row in accuracy_by(names, vanilla, name="vanilla_accuracy").items():
                table[name] = {
                    "circular_accuracy": table[name]["circular_accuracy"],
                    "vanilla_accuracy": row["vanilla_accuracy"],
                    "questions": row["total"],
                }
            metrics[label] = table
        return metrics

    def submission(
        self, samples: Sequence[Sample], predictions: Sequence[str], output_dir: Path
    ) -> dict[str, Path]:
        columns = [self._columns.get(s.id, {}) for s in samples]
        names = list(dict.fromkeys(k for c in columns for k in c))
        rows = [[c.get(k, "") for k in names] + [p] for c, p in zip(columns, predictions)]
        header = [*names, "prediction"]
        return {"submission": write_table(output_dir / f"{self.name}-submission", header, rows)}


def write_table(stem: Path, header: list[str], rows: list[list[Any]]) -> Path:
    """``stem.xlsx`` when openpyxl is importable (what the MMBench server takes), else ``stem.tsv`` whose first
    line says why; returns the path written."""
    try:
        from openpyxl import Workbook
        from openpyxl.cell.cell import ILLEGAL_CHARACTERS_RE
    except ImportError:
        path = stem.with_suffix(".tsv")
        with io.atomic_path(path) as tmp, tmp.open("w", encoding="utf-8", newline="") as f:
            f.write("# openpyxl is not installed, so this is a TSV: convert it to .xlsx to upload it\n")
            writer = csv.writer(f, delimiter="\t")
            writer.writerow(header)
            writer.writerows(rows)
        return path
    clean: Callable[[Any], Any] = lambda v: ILLEGAL_CHARACTERS_RE.sub("", v) if isinstance(v, str) else v  # noqa: E731
    book = Workbook(write_only=True)
    sheet = book.create_sheet()
    sheet.append(header)
    for row in rows:
        sheet.append([clean(v) for v in row])
    path = stem.with_suffix(".xlsx")
    with io.atomic_path(path) as tmp:
        book.save(tmp)
    return path


@register_task
class MMBenchEN(MMBenchTask):
    name = "mmbench-en"
    description = "MMBench dev (English), CircularEval"
    files = (
        "MMBench_DEV_EN.tsv (https://opencompass.openxlab.space/utils/VLMEval/MMBench_DEV_EN.tsv, VLMEvalKit's "
        "copy of the MMBench team's dev split; LLaVA's mmbench_dev_20230712.tsv works too)"
    )
    data_names = (
        "MMBench_DEV_EN.tsv",
        "**/MMBench_DEV_EN.tsv",
        "mmbench_dev_2*.tsv",
        "**/mmbench_dev_2*.tsv",
    )
    reported = "UniToken 71.1, Janus-Pro-7B 79.2, Lumina-mGPT 33.0"


@register_task
class MMBenchCN(MMBenchTask):
    name = "mmbench-cn"
    description = "MMBench dev (Chinese), CircularEval"
    instruction = MC_INSTRUCTION_CN
    files = (
        "MMBench_DEV_CN.tsv (https://opencompass.openxlab.space/utils/VLMEval/MMBench_DEV_CN.tsv, VLMEvalKit's "
        "copy of the MMBench team's dev split; LLaVA's mmbench_dev_cn_20231003.tsv works too)"
    )
    data_names = (
        "MMBench_DEV_CN.tsv",
        "**/MMBench_DEV_CN.tsv",
        "mmbench_dev_cn_*.tsv",
        "**/mmbench_dev_cn_*.tsv",
    )
    reported = "UniToken 62.0"
