"""HallusionBench (Guan et al., CVPR 2024): yes/no questions on figures and their edited copies.

**Files.** The official release (tianyi-lab/HallusionBench): ``HallusionBench.json`` (a list of rows with
``category`` VD/VS, ``subcategory``, ``set_id``, ``figure_id``, ``question_id``, ``question``, ``gt_answer``
"1"/"0", ``visual_input`` and ``filename``, the image path such as ``./hallusion_bench/VD/ocr/0_0.png``; rows
with ``visual_input`` "0" have no image and are asked as text) plus the ``hallusion_bench/`` image folder next
to it. Also accepted: VLMEvalKit's ``HallusionBench.tsv`` (``index`` ``VD_ocr_x_<set>_<figure>_<question>``,
``image`` base64 or the index of the row holding it, ``question``, ``answer`` Yes/No, ``category``,
``l2-category``).

**Prompt**: the question as given, after the image (what VLMEvalKit and lmms-eval send; no instruction is
added).

**Matching.** The official scorer asks GPT-4 whether each answer agrees with the reference; we read the answer
the way VLMEvalKit does for its yes/no benchmarks before it calls a judge: punctuation handled as its
``process_punctuation`` does, then "yes" when the words hold "yes" and not "no", "no" for the reverse, else
unknown (wrong). Where VLMEvalKit would then ask an LLM about the unknown ones, we do not. The official scorer
also counts an "unclear" answer to a VS question without its figure (``figure_id`` 0) as right; we count it
wrong, as VLMEvalKit does.

**Metrics** (fractions): ``aAcc`` per question; ``fAcc`` per figure — all questions of one figure right, keyed
by category/subcategory/set/figure (the VS questions asked without their figure are left out, as the official
``get_eval_fig`` does; VLMEvalKit keys by subcategory/set/figure and keeps them); ``qAcc`` per question — the
same question right over every figure of its set, keyed by category/subcategory/set/question; ``overall`` =
the mean of the three (VLMEvalKit's leaderboard figure); the three per category (VD, VS) and per subcategory.

The UniToken paper reports 57.8 without naming the metric. We take it to be **aAcc**, the headline here: the
mean of the three is about 45-50 for the strongest 7B models of its time (GPT-4o about 55), while aAcc near 58
is usual for a LLaVA-class 7B model.
"""

from __future__ import annotations

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
    read_records,
    require_columns,
    show,
)
from unified_mllm.eval.tasks import markdown_table, percent, register_task
from unified_mllm.layout import IMAGE_PLACEHOLDER

# VLMEvalKit's process_punctuation: these marks vanish when spaced or when the text holds a "1,000" number,
# else become a space; a period not inside a number vanishes.
_PUNCTUATION = tuple(';/[]"{}()=+\\_-><@`,?!')
_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")
_LONE_PERIOD = re.compile(r"(?<!\d)\.(?!\d)")
METRICS = ("aAcc", "fAcc", "qAcc")


def strip_punctuation(text: str) -> str:
    """VLMEvalKit's punctuation handling for answer matching (see above)."""
    out = text
    has_number_comma = _DIGIT_COMMA.search(text) is not None
    for mark in _PUNCTUATION:
        spaced = f"{mark} " in text or f" {mark}" in text
        out = out.replace(mark, "" if spaced or has_number_comma else " ")
    return _LONE_PERIOD.sub("", out)


def read_yes_no(prediction: str) -> str:
    """How VLMEvalKit's ``YOrN_Extraction`` reads a free-form answer: "yes", "no" or "unknown"."""
    words = strip_punctuation(prediction.lower()).split()
    if "yes" in words and "no" not in words:
        return "yes"
    if "no" in words and "yes" not in words:
        return "no"
    return "unknown"


def _all_right(groups: dict[tuple[str, ...], list[bool]]) -> float | None:
    return sum(all(v) for v in groups.values()) / len(groups) if groups else None


def hallusion_metrics(metas: Sequence[dict[str, str]], correct: Sequence[bool]) -> dict[str, Any]:
    """aAcc, fAcc, qAcc, overall and the counts of one set of questions (``metas``: category, subcategory,
    set_id, figure_id, question_id of each)."""
    figures: dict[tuple[str, ...], list[bool]] = {}
    questions: dict[tuple[str, ...], list[bool]] = {}
    for meta, right in zip(metas, correct, strict=True):
        base = (meta["category"], meta["subcategory"], meta["set_id"])
        if not (meta["category"] == "VS" and meta["figure_id"] == "0"):  # VS asked without its figure
            figures.setdefault((*base, meta["figure_id"]), []).append(right)
        questions.setdefault((*base, meta["question_id"]), []).append(right)
    values = {
        "aAcc": sum(correct) / len(correct) if correct else None,
        "fAcc": _all_right(figures),
        "qAcc": _all_right(questions),
    }
    known = [v for v in values.values() if v is not None]
    return {
        **values,
        "overall": sum(known) / len(known) if known else None,
        "questions": len(correct),
        "figures": len(figures),
        "question_pairs": len(questions),
    }


def hallusion_scores(
    metas: Sequence[dict[str, str]], answers: Sequence[str], predictions: Sequence[str]
) -> dict[str, Any]:
    """Every metric (module docstring): overall, ``per_category`` and ``per_subcategory``."""
    read = [read_yes_no(p) for p in predictions]
    correct = [r == a for r, a in zip(read, answers, strict=True)]
    out = hallusion_metrics(metas, correct)
    out["unknown_answers"] = read.count("unknown")
    for label, key in (
        ("per_category", lambda m: m["category"]),
        ("per_subcategory", lambda m: f"{m['category']}/{m['subcategory']}"),
    ):
        names = sorted({key(m) for m in metas})
        out[label] = {}
        for name in names:
            rows = [i for i, m in enumerate(metas) if key(m) == name]
            out[label][name] = hallusion_metrics([metas[i] for i in rows], [correct[i] for i in rows])
    return out


def _yes_no_truth(value: Any) -> str:
    text = str(value).strip().lower()
    truth = {"1": "yes", "0": "no", "yes": "yes", "no": "no"}.get(text)
    if truth is None:
        raise ValueError(f"HallusionBench answers are 1/0 or Yes/No, got {value!r}")
    return truth


@register_task
class HallusionBench(UnderstandingTask):
    name = "hallusionbench"
    description = "HallusionBench: yes/no questions on original and edited figures (aAcc, fAcc, qAcc)"
    files = (
        "HallusionBench.json + hallusion_bench/ images (github.com/tianyi-lab/HallusionBench: the json in "
        "the repo, the images as hallusion_bench.zip from its README's link) or VLMEvalKit's "
        "HallusionBench.tsv (https://opencompass.openxlab.space/utils/VLMEval/HallusionBench.tsv)"
    )
    data_names = (
        "HallusionBench.tsv",
        "HallusionBench/HallusionBench.json",
        "HallusionBench/HallusionBench.tsv",
        "HallusionBench.json",
    )
    max_new_tokens = 128
    headline = "aAcc"
    reported: ClassVar[str] = "UniToken 57.8 (read as aAcc; the paper does not say)"

    def load(self, path: Path) -> list[Sample]:
        if path.is_dir():
            found = find_path(path, ("HallusionBench.json", "HallusionBench.tsv"))
            if found is None:
                raise FileNotFoundError(
                    f"{path} holds neither HallusionBench.json nor HallusionBench.tsv ({self.files})"
                )
            path = found
        return self._load_tsv(path) if path.suffix.lower() == ".tsv" else self._load_json(path)

    def _load_json(self, path: Path) -> list[Sample]:
        rows = read_records(path)
        require_columns(
            rows,
            ("category", "subcategory", "set_id", "figure_id", "question_id", "question", "gt_answer"),
            path,
        )
        samples = []
        for n, row in enumerate(rows):
            meta = {k: str(row[k]) for k in ("category", "subcategory", "set_id", "figure_id", "question_id")}
            filename = row.get("filename")
            has_image = str(row.get("visual_input", "1")) != "0" and not is_missing(filename)
            images = (self._image_path(path.parent, str(filename)),) if has_image else ()
            samples.append(
                Sample(
                    id=f"{n}_{'_'.join(meta.values())}",
                    prompt=(IMAGE_PLACEHOLDER if images else "") + str(row["question"]).strip(),
                    images=images,
                    answer=_yes_no_truth(row["gt_answer"]),
                    meta=meta,
                )
            )
        return samples

    @staticmethod
    def _image_path(root: Path, filename: str) -> Path:
        relative = filename.removeprefix("./")
        for candidate in (root / relative, root / "hallusion_bench" / relative, root / Path(relative).name):
            if candidate.is_file():
                return candidate
        return root / relative  # missing: recorded as that sample's error, named

    def _load_tsv(self, path: Path) -> list[Sample]:
        rows = read_records(path)
        require_columns(rows, ("index", "question", "answer"), path)
        images = TsvImages(rows, path)
        samples = []
        for row in rows:
            index = str(row["index"])
            image = images.get(index)
            parts = index.split("_")
            if len(parts) < 6 and "set_id" not in row:
                raise ValueError(
                    f"{path}: index {index!r} is not VLMEvalKit's <cat>_<sub>_x_<set>_<figure>_<question>"
                )
            meta = {
                "category": str(row.get("category") or parts[0]),
                "subcategory": str(row.get("l2-category") or row.get("subcategory") or parts[1]),
                "set_id": str(row.get("set_id") or parts[3]),
                "figure_id": str(row.get("figure_id") or parts[4]),
                "question_id": str(row.get("question_id") or parts[5]),
            }
            pictures = (image,) if image is not None else ()
            samples.append(
                Sample(
                    id=index,
                    prompt=(IMAGE_PLACEHOLDER if pictures else "") + str(row["question"]).strip(),
                    images=pictures,
                    answer=_yes_no_truth(row["answer"]),
                    meta=meta,
                )
            )
        return samples

    def score(self, samples: Sequence[Sample], predictions: Sequence[str]) -> dict[str, Any]:
        return hallusion_scores([s.meta for s in samples], [str(s.answer) for s in samples], predictions)

    def format_table(self, result: dict[str, Any]) -> str:
        """The three accuracies and their mean as percentages, overall, per category and per subcategory."""
        metrics = result["metrics"]
        model = f" — `{result['model']}`" if result.get("model") else ""
        head = ("split", *METRICS, "overall", "questions")
        rows = [("Overall", *(percent(metrics[k]) for k in (*METRICS, "overall")), metrics["questions"])]
        for table in ("per_category", "per_subcategory"):
            for name, m in metrics[table].items():
                rows.append((name, *(percent(m[k]) for k in (*METRICS, "overall")), m["questions"]))
        return (
            f"## {self.description}{model}\n\n"
            f"{result['questions']} questions, {result['errors']} error(s), "
            f"{show(metrics['unknown_answers'])} answer(s) neither yes nor no\n\n"
            + markdown_table(head, rows)
        )
