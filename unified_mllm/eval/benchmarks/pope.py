"""POPE: object hallucination as yes/no questions on COCO val2014 images, in three splits.

    python -m unified_mllm.eval --task pope --model EXPORT --data POPE_DIR     (or POPE.tsv)

**Files.** Either the official release — the POPE repository's ``output/coco/coco_pope_random.json``,
``coco_pope_popular.json`` and ``coco_pope_adversarial.json`` (JSON lines: ``question_id``, ``image``, a COCO
val2014 file name, ``text``, the question, ``label``, yes / no) — with the COCO ``val2014/`` image folder,
laid out as::

    POPE_DIR/
      coco_pope_random.json  coco_pope_popular.json  coco_pope_adversarial.json
      val2014/COCO_val2014_000000xxxxxx.jpg ...

(the image folder may also be ``POPE_DIR/images/`` or ``POPE_DIR/coco/val2014/``, or the images may lie flat
in ``POPE_DIR``; the json files may sit in ``POPE_DIR/output/coco/`` as the repository has them; ``--data``
may name one split's json file, its images beside it) — or VLMEvalKit's ``POPE.tsv`` (base64 images;
``category`` holds the split). A split whose file is missing is left out, and the metrics say which splits
ran.

**Prompt**: LLaVA-1.5's, ``<image><question>\\nAnswer the question using a single word or phrase.``, greedy,
at most 16 new tokens. Questions of the three splits are asked interleaved (random, popular, adversarial,
random, ...), so ``--limit 30`` asks 10 of each.

**Matching**: POPE's own rule (its ``evaluate.py``, which LLaVA's ``eval_pope`` repeats): only the first
sentence of the answer counts (up to the first period); it reads "no" when it has the word "no" or "not", else
"yes" (:func:`unified_mllm.eval.metrics.pope_metrics`; an answer that is neither counts as "yes", and
``unclear`` counts those). No LLM judge is involved.

**Metrics**, per split: accuracy, precision, recall, F1 (of "yes") and the yes-ratio, with the confusion
counts; **headline: the F1 averaged over the three splits** (``f1_average``) — the single "POPE" number papers
report (LLaVA-1.5, VILA-U, UniTok, DualToken). Also the averages of the other figures and the F1 of all
questions pooled (``pooled_f1``, what VLMEvalKit calls Overall).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from itertools import zip_longest
from pathlib import Path
from typing import Any

from unified_mllm.eval.benchmark import Sample, UnderstandingTask, find_path, read_records, require_columns
from unified_mllm.eval.benchmarks.vqa import find_image_dir, short_answer_prompt, tsv_images
from unified_mllm.eval.metrics import pope_metrics
from unified_mllm.eval.tasks import register_task

SPLITS = ("random", "popular", "adversarial")
SPLIT_FIGURES = ("accuracy", "precision", "recall", "f1", "yes_ratio")


def split_file(split: str) -> str:
    """The official file name of a split."""
    return f"coco_pope_{split}.json"


def first_sentence(answer: str) -> str:
    """POPE's reading keeps only what comes before the first period ("No. There is a cat." -> "No")."""
    return answer.split(".", 1)[0]


def read_json_lines(path: Path) -> list[dict[str, Any]]:
    """POPE's ``.json`` files hold one object per line; a file holding one JSON list is read too."""
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is neither JSON lines nor a JSON list: {exc}") from exc
    return data if isinstance(data, list) else [data]


def interleave(groups: Sequence[Sequence[Sample]]) -> list[Sample]:
    """One sample of each group in turn (groups run out at their own length)."""
    return [s for row in zip_longest(*groups) for s in row if s is not None]


@register_task
class Pope(UnderstandingTask):
    """POPE's three splits (see the module docstring)."""

    name = "pope"
    description = "POPE (object hallucination on COCO val2014: random / popular / adversarial)"
    files = (
        "coco_pope_random.json, coco_pope_popular.json, coco_pope_adversarial.json from "
        "github.com/RUCAIBox/POPE (output/coco/) and COCO val2014/ images (cocodataset.org) in one folder; "
        "or VLMEvalKit's POPE.tsv"
    )
    data_names = ("pope", "POPE", "POPE.tsv")
    headline = "f1_average"
    reported = "UniTok 83.2, Janus-Pro-7B 87.4 (F1, mean of the splits)"
    max_new_tokens = 16

    def load(self, path: Path) -> list[Sample]:
        if path.is_file():
            if path.suffix.lower() == ".tsv":
                return self._load_tsv(path)
            split = next((s for s in SPLITS if path.name.startswith(f"coco_pope_{s}")), path.stem)
            return self._load_official({split: path}, path.parent)
        files = {}
        for split in SPLITS:
            found = find_path(
                path, [split_file(split), f"output/coco/{split_file(split)}", f"*/{split_file(split)}"]
            )
            if found is not None:
                files[split] = found
        if files:
            return self._load_official(files, path)
        tsv = find_path(path, ["POPE.tsv", "*/POPE.tsv"])
        if tsv is not None:
            return self._load_tsv(tsv)
        raise FileNotFoundError(
            f"{path} holds neither POPE's coco_pope_<split>.json files nor POPE.tsv ({self.files})"
        )

    def _load_official(self, files: dict[str, Path], root: Path) -> list[Sample]:
        rows = {split: read_json_lines(file) for split, file in files.items()}
        for split, file in files.items():
            require_columns(rows[split], ("question_id", "image", "text", "label"), file)
        first_split = next(iter(files))
        image_dir = find_image_dir(
            [root, files[first_split].parent],
            ["val2014", "images/val2014", "coco/val2014", "images", "."],
            rows[first_split][0]["image"],
        )
        groups = [
            [
                Sample(
                    f"{split}-{row['question_id']}",
                    short_answer_prompt(row["text"]),
                    images=(str(image_dir / row["image"]),),
                    answer=str(row["label"]),
                    meta={"split": split},
                )
                for row in split_rows
            ]
            for split, split_rows in rows.items()
        ]
        return interleave(groups)

    def _load_tsv(self, path: Path) -> list[Sample]:
        rows = read_records(path)
        require_columns(rows, ("index", "image", "question", "answer", "category"), path)
        groups: dict[str, list[Sample]] = {}
        for row, image in zip(rows, tsv_images(rows, path), strict=True):
            split = str(row["category"]).strip()
            groups.setdefault(split, []).append(
                Sample(
                    f"{split}-{row['index']}",
                    short_answer_prompt(row["question"]),
                    images=(image,),
                    answer=str(row["answer"]),
                    meta={"split": split},
                )
            )
        order = [s for s in SPLITS if s in groups] + sorted(set(groups) - set(SPLITS))
        return interleave([groups[s] for s in order])

    def score(self, samples: Sequence[Sample], predictions: Sequence[str]) -> dict[str, Any]:
        read = [first_sentence(p) for p in predictions]
        names = list(dict.fromkeys(s.meta["split"] for s in samples))
        names = [s for s in SPLITS if s in names] + [s for s in names if s not in SPLITS]
        per_split = {}
        for split in names:
            pairs = [(s.answer, r) for s, r in zip(samples, read, strict=True) if s.meta["split"] == split]
            per_split[split] = pope_metrics([a for a, _ in pairs], [r for _, r in pairs])
        averages = {
            f"{figure}_average": statistics.fmean(m[figure] for m in per_split.values())
            for figure in SPLIT_FIGURES
        }
        pooled = pope_metrics([s.answer for s in samples], read)
        return {
            "f1_average": averages["f1_average"],
            **{k: v for k, v in averages.items() if k != "f1_average"},
            "pooled_accuracy": pooled["accuracy"],
            "pooled_f1": pooled["f1"],
            "splits": ", ".join(per_split),
            "questions": len(samples),
            "unclear": pooled["unclear"],
            "per_split": per_split,
        }
