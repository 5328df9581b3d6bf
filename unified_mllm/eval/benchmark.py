"""Understanding benchmarks read from their released files: samples in, cached predictions, metrics out.

A benchmark is an :class:`UnderstandingTask` subclass that says how to read its files into :class:`Sample`
objects (:meth:`UnderstandingTask.load`) and how to score the predictions (:meth:`UnderstandingTask.score`);
this base class does the rest the same way for all of them:

* ``--limit N`` keeps the first N *questions* (:attr:`Sample.group`: MMBench's CircularEval asks one question
  several times with its options rotated, and those rows stay together);
* every sample is asked on its own, ``batch_size`` rows per solver call, greedy, at most
  :attr:`UnderstandingTask.max_new_tokens` tokens, behind a progress bar;
* **resumable**: each answer is appended to ``predictions.jsonl`` (flushed and fsynced per batch) with the
  prompt it answered, so a killed run continues where it stopped and a changed prompt is asked again; a cache
  written for another model or other decoding settings is refused by name (``--restart`` discards it);
* a prompt the model cannot hold (more positions than it reads) or an image that does not decode is recorded
  as an error for that sample (an empty answer, scored wrong), counted in the results, and never stops the run;
* files: ``<task>.json`` (every metric, the settings, one record per sample), ``<task>.md`` (the tables) and
  whatever submission file the benchmark's server takes (:meth:`UnderstandingTask.submission`).

Also here, shared by the benchmarks: readers of the released formats (:func:`read_records`: TSV with base64
images as VLMEvalKit and MMBench ship them, JSON, JSONL, Parquet), :func:`decode_base64_image`, and
:func:`match_choice`, the multiple-choice matching rule of the official toolkits.
"""

from __future__ import annotations

import base64
import binascii
import csv
import json
import math
import os
import string
import sys
import time
from abc import abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from unified_mllm import io
from unified_mllm.config import Config
from unified_mllm.eval.tasks import Solver, Task, batched, check_limit, markdown_table, percent
from unified_mllm.layout import IMAGE_PLACEHOLDER
from unified_mllm.progress import progress as progress_bar
from unified_mllm.vision.image import ImageSource, load_image

PREDICTIONS_FILE = "predictions.jsonl"
OPTION_LETTERS = string.ascii_uppercase
PARQUET_HINT = "reading .parquet files needs pyarrow: pip install 'unified_mllm[bench]'"


@dataclass(frozen=True)
class Sample:
    """One question as the model is asked it.

    ``prompt`` holds one ``<|image|>`` placeholder per image, where the image goes; ``answer`` and ``meta`` are
    whatever the task's scorer needs (JSON-able: they go into the records). Samples of one ``group`` are
    kept or dropped together by ``--limit`` (default: the sample is its own group).
    """

    id: str
    prompt: str
    images: tuple[ImageSource, ...] = ()
    answer: Any = None
    meta: dict[str, Any] = field(default_factory=dict)
    group: str = ""

    def __post_init__(self) -> None:
        placeholders = self.prompt.count(IMAGE_PLACEHOLDER)
        if placeholders != len(self.images):
            raise ValueError(
                f"sample {self.id}: the prompt has {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but "
                f"{len(self.images)} image(s)"
            )
        if not self.group:
            object.__setattr__(self, "group", self.id)


# ------------------------------------------------------------------------------------------- file reading


def read_records(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The rows of a released benchmark file as dicts: ``.tsv`` / ``.csv`` (header row; fields may hold
    megabytes of base64), ``.jsonl``, ``.json`` (a list of objects, or an object of objects whose keys become
    ``"id"`` when the rows have none) or ``.parquet`` (needs pyarrow)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"benchmark file not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix in (".tsv", ".csv"):
            csv.field_size_limit(sys.maxsize)  # base64 images are far larger than csv's 128 KiB default
            with path.open(encoding="utf-8", newline="") as f:
                return list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
        if suffix == ".jsonl":
            lines = path.read_text(encoding="utf-8").splitlines()
            return [json.loads(line) for line in lines if line.strip()]
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict):
                return [{"id": key, **row} if "id" not in row else row for key, row in data.items()]
            if isinstance(data, list):
                return data
            raise ValueError(f"{path}: expected a JSON list or object of rows, got {type(data).__name__}")
        if suffix == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError as exc:
                raise ImportError(f"{path}: {PARQUET_HINT}") from exc
            return pq.read_table(path).to_pylist()
    except (UnicodeDecodeError, json.JSONDecodeError, csv.Error) as exc:
        raise ValueError(f"{path} is not a readable {suffix[1:]} file: {exc}") from exc
    raise ValueError(f"{path}: unsupported benchmark file type {suffix!r} (tsv, csv, json, jsonl, parquet)")


def require_columns(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], path: Path) -> None:
    """Raise a ValueError naming ``path`` and the columns its first row lacks."""
    if not rows:
        raise ValueError(f"{path} holds no rows")
    missing = [c for c in columns if c not in rows[0]]
    if missing:
        raise ValueError(f"{path} lacks the column(s) {missing}; it has {sorted(rows[0])}")


def decode_base64_image(text: str, where: str) -> bytes:
    """The encoded image bytes of a base64 field (as the TSV releases carry images)."""
    try:
        return base64.b64decode(text, validate=False)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"{where}: the image field is not base64 ({exc})") from exc


IMAGE_REFERENCE_MAX = 64  # VLMEvalKit: an image cell this short holds the index of the row that has the image


class TsvImages:
    """The images of a VLMEvalKit-style TSV by row ``index``. An image several rows share is stored once: the
    other rows' cell holds the ``index`` of the row that has it (a cell of at most 64 characters is such a
    reference, VLMEvalKit's rule). Each image is decoded once; rows sharing it share the bytes."""

    def __init__(self, rows: Sequence[Mapping[str, Any]], path: Path, column: str = "image") -> None:
        self.cells = {
            str(row.get("index", "")).strip(): "" if is_missing(row.get(column)) else str(row[column])
            for row in rows
        }
        self.path = path
        self.decoded: dict[str, bytes] = {}

    def owner(self, index: str) -> str:
        """The index of the row holding row ``index``'s image ("" when the row has none)."""
        cell = self.cells[str(index).strip()]
        if len(cell) > IMAGE_REFERENCE_MAX or not cell:
            return str(index).strip() if cell else ""
        owner = cell.strip()
        if len(self.cells.get(owner, "")) <= IMAGE_REFERENCE_MAX:
            raise ValueError(
                f"{self.path}, row {index}: the image cell {cell!r} names no row that holds an image"
            )
        return owner

    def get(self, index: str) -> bytes | None:
        """The encoded image of row ``index`` (None when the row has no image)."""
        owner = self.owner(index)
        if not owner:
            return None
        if owner not in self.decoded:
            self.decoded[owner] = decode_base64_image(self.cells[owner], f"{self.path}, row {owner}")
        return self.decoded[owner]


def image_bytes(cell: Any, where: str) -> bytes:
    """The encoded image of a Parquet cell: raw bytes, or the ``{"bytes": ..., "path": ...}`` struct of Hugging
    Face's Image feature."""
    if isinstance(cell, Mapping):
        cell = cell.get("bytes")
    if isinstance(cell, bytes | bytearray) and cell:
        return bytes(cell)
    raise ValueError(f"{where}: no image bytes in the image cell")


def image_first(text: str) -> str:
    """The image, then the text on the next line: LLaVA's ``<image>\\n`` + question."""
    return f"{IMAGE_PLACEHOLDER}\n{text}"


def accuracy_by(
    keys: Sequence[str], hits: Sequence[bool], *, name: str = "accuracy", order: Sequence[str] = ()
) -> dict[str, dict[str, Any]]:
    """Per key: ``{name: correct / total, "correct", "total"}``; keys in ``order`` first, then the rest sorted
    (as VLMEvalKit's reports list them)."""
    if len(keys) != len(hits):
        raise ValueError(f"got {len(keys)} keys but {len(hits)} verdicts")
    present = set(keys)
    out = {}
    for key in [k for k in order if k in present] + sorted(present - set(order)):
        verdicts = [bool(h) for k, h in zip(keys, hits) if k == key]
        out[key] = {name: sum(verdicts) / len(verdicts), "correct": sum(verdicts), "total": len(verdicts)}
    return out


def is_missing(value: Any) -> bool:
    """An empty cell: None, NaN, or a blank / 'nan' string (TSV releases write missing options as 'nan')."""
    if value is None:
        return True
    if isinstance(value, float):
        return math.isnan(value)
    return isinstance(value, str) and value.strip().lower() in ("", "nan", "none")


def find_path(root: Path, names: Sequence[str]) -> Path | None:
    """The first of ``names`` (relative paths, globs allowed) that exists under ``root``, else None."""
    for name in names:
        hits = sorted(root.glob(name))
        if hits:
            return hits[0]
    return None


# ------------------------------------------------------------------------------------ multiple choice


def choice_prompt(question: str, options: Mapping[str, str], *, hint: str = "", instruction: str = "") -> str:
    """LLaVA's multiple-choice prompt (what UniToken's and most 7B papers' evaluations use): the hint, the
    question, one ``A. text`` line per option, then the instruction."""
    lines = [hint.strip()] if hint and hint.strip() else []
    lines.append(question.strip())
    lines += [f"{letter}. {text}" for letter, text in options.items()]
    if instruction:
        lines.append(instruction)
    return "\n".join(lines)


MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
MC_INSTRUCTION_CN = "请直接回答选项字母。"
SHORT_ANSWER = "Answer the question using a single word or phrase."


def match_choice(prediction: str, options: Mapping[str, str]) -> str | None:
    """The option letter a free-form answer picks, by the rule of VLMEvalKit's exact matching, else None.

    1. Punctuation ``.()[],:;!*#{}`` becomes spaces; when exactly one option letter stands as a word of what
       is left, that letter ("(B) cat", "Answer: B." -> B).
    2. Otherwise, when the text of exactly one option occurs in the answer (case-insensitive), that option.

    Where VLMEvalKit then asks an LLM judge to read an answer neither rule settles, we count it unmatched
    (None, scored wrong): greedy answers to the letter instruction are letters, so this rarely matters.
    """
    words = prediction
    for char in ".()[],:;!*#{}":
        words = words.replace(char, " ")
    tokens = set(words.split())
    letters = [letter for letter in options if letter in tokens]
    if len(letters) == 1:
        return letters[0]
    if letters:
        return None
    lowered = prediction.lower()
    texts = [letter for letter, text in options.items() if str(text).strip() and str(text).lower() in lowered]
    return texts[0] if len(texts) == 1 else None


def options_of(row: Mapping[str, Any], letters: str = OPTION_LETTERS) -> dict[str, str]:
    """The options of a TSV row (columns ``A``, ``B``, ...; missing cells end the list)."""
    options = {}
    for letter in letters:
        if letter not in row or is_missing(row[letter]):
            break
        options[letter] = str(row[letter]).strip()
    return options


# ----------------------------------------------------------------------------------- prediction cache


class PredictionCache:
    """``predictions.jsonl``: a settings line, then one ``{"id", "prompt", "prediction"[, "error"]}`` per answer.

    Appends are flushed and fsynced per batch; a last line cut short by a kill is ignored on reading.
    """

    def __init__(self, path: Path, settings: dict[str, Any], *, restart: bool = False) -> None:
        self.path = path
        self.settings = settings
        self.entries: dict[str, dict[str, Any]] = {}
        if restart:
            path.unlink(missing_ok=True)
        if path.is_file():
            self._read()
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._append([{"settings": settings}])

    def _read(self) -> None:
        lines = self.path.read_text(encoding="utf-8").splitlines()
        try:
            stored = json.loads(lines[0])["settings"] if lines else None
        except (ValueError, KeyError, TypeError):
            stored = None
        if stored != self.settings:
            differ = sorted(
                k
                for k in set(self.settings) | set(stored or {})
                if (stored or {}).get(k) != self.settings.get(k)
            )
            raise ValueError(
                f"{self.path} holds predictions made with other settings ({', '.join(differ) or 'unreadable'} "
                "differ); pass --restart to discard them, or choose another --output"
            )
        for line in lines[1:]:
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a line cut short by a kill: asked again
            self.entries[entry["id"]] = entry

    def get(self, sample: Sample) -> dict[str, Any] | None:
        """The cached answer of ``sample`` when it was asked with the same prompt."""
        entry = self.entries.get(sample.id)
        return entry if entry is not None and entry.get("prompt") == sample.prompt else None

    def add(self, entries: Sequence[dict[str, Any]]) -> None:
        for entry in entries:
            self.entries[entry["id"]] = entry
        self._append(entries)

    def _append(self, entries: Sequence[dict[str, Any]]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.writelines(json.dumps(e, ensure_ascii=False) + "\n" for e in entries)
            f.flush()
            os.fsync(f.fileno())


# ------------------------------------------------------------------------------------------------ the task


class UnderstandingTask(Task):
    """A benchmark read from its released files (see the module docstring).

    Subclasses set ``name``, ``description``, ``files`` (what to download and where from: shown when the data
    is missing), ``data_names`` (where its files sit under a ``--data`` root, for ``--task all-understanding``),
    ``headline`` (the metric key of the papers' tables) and implement :meth:`load` and :meth:`score`.
    """

    files: ClassVar[str] = ""
    data_names: ClassVar[tuple[str, ...]] = ()
    max_new_tokens: ClassVar[int] = 16
    headline: ClassVar[str] = "accuracy"
    headline_scale: ClassVar[str] = "percent"  # "percent" (a 0-1 fraction shown as %) or "raw" (a score)
    reported: ClassVar[str] = ""
    """The papers' figures for the headline metric (7B class), for the summary table: "UniToken 71.1, ..."."""

    def __init__(self, data: str | os.PathLike[str] | None = None, restart: bool = False) -> None:
        self.data = Path(data).expanduser() if data is not None else None
        self.restart = restart  # discard cached predictions

    @classmethod
    def find_data(cls, root: Path) -> Path | None:
        """This benchmark's files under a ``--data`` root holding several benchmarks, or None."""
        return find_path(root, cls.data_names)

    def check(self, config: Config) -> None:
        if self.data is None:
            raise FileNotFoundError(f"{self.name} reads its released files: pass --data PATH ({self.files})")
        if not self.data.exists():
            raise FileNotFoundError(f"{self.name}: --data {self.data} does not exist ({self.files})")

    @abstractmethod
    def load(self, path: Path) -> list[Sample]:
        """Every sample of the benchmark's files at ``path`` (the ``--data`` argument), in a stable order."""

    @abstractmethod
    def score(self, samples: Sequence[Sample], predictions: Sequence[str]) -> dict[str, Any]:
        """Every metric of the predictions (aligned with ``samples``); must hold :attr:`headline`."""

    def submission(
        self, samples: Sequence[Sample], predictions: Sequence[str], output_dir: Path
    ) -> dict[str, Path]:
        """Write the benchmark's submission file(s) where its server takes one; returns label -> path."""
        return {}

    def run(
        self,
        solver: Solver,
        config: Config,
        *,
        limit: int | None,
        batch_size: int,
        output_dir: Path,
        progress: bool = True,
        model_name: str = "",
    ) -> dict[str, Any]:
        check_limit(limit, batch_size)
        self.check(config)
        assert self.data is not None
        samples = limit_groups(self.load(self.data), limit)
        if not samples:
            raise ValueError(f"{self.name}: {self.data} holds no samples")
        output_dir = Path(output_dir)
        settings = {
            "task": self.name,
            "model": model_name,
            "max_new_tokens": self.max_new_tokens,
            "seed": config.generation.seed,
        }
        cache = PredictionCache(output_dir / PREDICTIONS_FILE, settings, restart=self.restart)
        todo = [s for s in samples if cache.get(s) is None]
        start = time.perf_counter()
        steps = math.ceil(len(todo) / batch_size)
        bar = progress_bar(batched(todo, batch_size), total=steps, desc=self.name, disable=not progress)
        for batch in bar:
            cache.add(list(self._ask(solver, batch, config.generation.seed)))
        entries = [cache.get(s) for s in samples]
        predictions = [e["prediction"] if e else "" for e in entries]
        errors = {s.id: e["error"] for s, e in zip(samples, entries) if e and e.get("error")}
        metrics = self.score(samples, predictions)
        result: dict[str, Any] = {
            "task": self.name,
            "model": model_name,
            "data": str(self.data),
            "limit": limit,
            "samples": len(samples),
            "questions": len({s.group for s in samples}),
            "asked": len(todo),
            "seconds": round(time.perf_counter() - start, 3),
            "errors": len(errors),
            "headline": {
                "metric": self.headline,
                "value": metrics[self.headline],
                "scale": self.headline_scale,
            },
            "metrics": metrics,
            "error_examples": dict(list(errors.items())[:5]),
            "records": [
                {"id": s.id, "answer": s.answer, "prediction": p, **({"meta": s.meta} if s.meta else {})}
                for s, p in zip(samples, predictions)
            ],
        }
        files = {
            "json": output_dir / f"{self.name}.json",
            "markdown": output_dir / f"{self.name}.md",
            "predictions": cache.path,
        }
        files.update(self.submission(samples, predictions, output_dir))
        result["files"] = {label: str(path) for label, path in files.items()}
        io.write_json(files["json"], result)
        io.write_text(files["markdown"], self.format_table(result))
        return result

    def _ask(self, solver: Solver, batch: Sequence[Sample], seed: int) -> Iterator[dict[str, Any]]:
        """The cache entries of one batch; when the batch fails on a prompt that does not fit or an image that
        does not decode (ValueErrors), each sample is asked alone, so a bad sample costs only its own answer."""
        try:
            answers = self._generate(solver, batch, seed)
        except ValueError as exc:  # ImageLoadError is a ValueError too
            if len(batch) == 1:
                yield {"id": batch[0].id, "prompt": batch[0].prompt, "prediction": "", "error": str(exc)}
                return
            for sample in batch:
                yield from self._ask(solver, [sample], seed)
            return
        for sample, answer in zip(batch, answers, strict=True):
            yield {"id": sample.id, "prompt": sample.prompt, "prediction": answer}

    def _generate(self, solver: Solver, batch: Sequence[Sample], seed: int) -> list[str]:
        images = [[load_image(i) for i in s.images] for s in batch]
        answers = solver.generate(
            images,
            [[[s.prompt, None]] for s in batch],
            max_gen_len=self.max_new_tokens,
            temperature=0.0,
            seed=seed,
        )
        if len(answers) != len(batch):
            raise RuntimeError(f"the solver answered {len(answers)} of {len(batch)} questions")
        return [a.strip() for a in answers]

    def understanding_row(self, result: dict[str, Any]) -> dict[str, float | None]:
        """The headline metric, then the scalar metrics beside it."""
        head = result["headline"]["metric"]
        scalars = {
            k: v
            for k, v in result["metrics"].items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }
        return {head: result["headline"]["value"], **{k: v for k, v in scalars.items() if k != head}}

    def format_table(self, result: dict[str, Any]) -> str:
        """A heading with the sample counts, then one table of the scalar metrics and one per breakdown."""
        model = f" — `{result['model']}`" if result.get("model") else ""
        out = [
            f"## {self.description or self.name}{model}\n\n",
            f"{result['questions']} questions ({result['samples']} prompts), {result['errors']} error(s)\n\n",
        ]
        scalars = {k: v for k, v in result["metrics"].items() if not isinstance(v, dict)}
        out.append(markdown_table(("metric", "value"), [(k, show(v, k)) for k, v in scalars.items()]))
        for key, value in result["metrics"].items():
            if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
                columns = list(dict.fromkeys(c for v in value.values() for c in v))
                rows = [(name, *(show(row.get(c), c) for c in columns)) for name, row in value.items()]
                out.append(f"\n{key}\n\n" + markdown_table((key, *columns), rows))
        return "".join(out)


def show(value: Any, key: str = "") -> str:
    """A metric as shown in tables: fractions named like rates as percentages, other numbers as they are."""
    if isinstance(value, bool) or value is None or not isinstance(value, int | float):
        return "n/a" if value is None else str(value)
    if isinstance(value, float) and any(word in key.lower() for word in RATE_WORDS):
        return percent(value)
    return f"{value:.4g}" if isinstance(value, float) else str(value)


RATE_WORDS = ("acc", "precision", "recall", "f1", "ratio", "rate")


def limit_groups(samples: Sequence[Sample], limit: int | None) -> list[Sample]:
    """The samples of the first ``limit`` groups (all when None), in order."""
    if limit is None:
        return list(samples)
    kept: set[str] = set()
    out = []
    for sample in samples:
        if sample.group not in kept:
            if len(kept) == limit:
                continue
            kept.add(sample.group)
        out.append(sample)
    return out
