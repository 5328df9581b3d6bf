"""MME (Fu et al. 2023): 14 yes/no subtasks, two questions per image, scored by acc + acc+ per subtask.

**Files.** The official release ``MME_Benchmark_release_version/`` (from the MME authors, BradyFU/Awesome-
Multimodal-Large-Language-Models, Evaluation branch): one folder per subtask, holding either ``images/`` and
``questions_answers_YN/`` (one ``.txt`` per image, one ``question<TAB>answer`` line per question) or the image
and its ``.txt`` side by side; the folders may sit one level down (``MME_Benchmark/``). Also accepted:
VLMEvalKit's ``MME.tsv`` (columns ``index, image, question, answer, category[, image_path]``, base64 images;
a row whose image field is a short index reuses that row's image, as VLMEvalKit stores MME's second question).

**Prompt** (LLaVA-1.5's, as its ``llava_mme.jsonl`` and lmms-eval's default reproduce it): the question with
its trailing " Please answer yes or no." replaced by a new line "Answer the question using a single word or
phrase."

**Matching** (MME's own ``eval_tool/calculation.py``): the lower-cased answer is "yes" or "no" when it is
exactly that, else "yes" when its first four characters contain "yes", "no" when they contain "no", else
"other" (wrong either way). No LLM judge is involved.

**Metrics.** Per subtask: ``acc`` (per question), ``acc_plus`` (per image: every question of the image right)
and ``score`` = 100 * acc + 100 * acc+ (max 200); ``perception`` = the sum of the 10 perception subtasks'
scores (max 2000, the headline) and ``cognition`` = the sum of the 4 cognition ones (max 800). A subtask that
is absent (``--limit``) adds nothing to its sum.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from unified_mllm.eval.benchmark import (
    SHORT_ANSWER,
    Sample,
    TsvImages,
    UnderstandingTask,
    is_missing,
    read_records,
    require_columns,
)
from unified_mllm.eval.tasks import register_task
from unified_mllm.layout import IMAGE_PLACEHOLDER

PERCEPTION = (
    "existence",
    "count",
    "position",
    "color",
    "posters",
    "celebrity",
    "scene",
    "landmark",
    "artwork",
    "OCR",
)
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
SUBTASKS = PERCEPTION + COGNITION
IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg", ".JPG", ".PNG", ".JPEG")
YES_NO_SUFFIX = re.compile(r"\s*Please answer yes or no\.?\s*$", re.IGNORECASE)
# VLMEvalKit stores an image once: a later row's image field holds the index of the row carrying it (base64
# images are far longer than this).


def _image_named(folder: Path, stem: str) -> Path | None:
    """The image ``stem.jpg`` / ``.png`` / ... in ``folder`` (MME mixes JPEG and PNG), or None."""
    return next((folder / f"{stem}{s}" for s in IMAGE_SUFFIXES if (folder / f"{stem}{s}").is_file()), None)


def mme_prompt(question: str) -> str:
    """LLaVA-1.5's MME prompt: the question without "Please answer yes or no.", then the short-answer line."""
    return f"{IMAGE_PLACEHOLDER}{YES_NO_SUFFIX.sub('', question.strip())}\n{SHORT_ANSWER}"


def mme_yes_no(prediction: str) -> str:
    """MME's calculation.py reading of an answer: "yes", "no" or "other"."""
    text = prediction.lower()
    if text in ("yes", "no"):
        return text
    head = text[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


def mme_scores(
    subtasks: Sequence[str], images: Sequence[str], answers: Sequence[str], predictions: Sequence[str]
) -> dict[str, Any]:
    """acc, acc+ and score per subtask, the perception and cognition sums (see the module docstring).

    ``images`` names the image of each question (questions of one image share acc+); ``answers`` are
    "yes"/"no" in any case.
    """
    if not len(subtasks) == len(images) == len(answers) == len(predictions):
        raise ValueError("subtasks, images, answers and predictions must align")
    per_subtask: dict[str, dict[str, Any]] = {}
    unmatched = 0
    for name in [s for s in SUBTASKS if s in subtasks] + sorted(set(subtasks) - set(SUBTASKS)):
        rows = [i for i, s in enumerate(subtasks) if s == name]
        right = {i: mme_yes_no(predictions[i]) == answers[i].strip().lower() for i in rows}
        unmatched += sum(mme_yes_no(predictions[i]) == "other" for i in rows)
        by_image: dict[str, list[bool]] = {}
        for i in rows:
            by_image.setdefault(images[i], []).append(right[i])
        acc = sum(right.values()) / len(rows)
        acc_plus = sum(all(v) for v in by_image.values()) / len(by_image)
        per_subtask[name] = {
            "acc": acc,
            "acc_plus": acc_plus,
            "score": 100 * acc + 100 * acc_plus,
            "questions": len(rows),
            "images": len(by_image),
        }
    total = len(answers)
    correct = sum(mme_yes_no(p) == a.strip().lower() for p, a in zip(predictions, answers, strict=True))
    return {
        "perception": sum(per_subtask[s]["score"] for s in PERCEPTION if s in per_subtask),
        "cognition": sum(per_subtask[s]["score"] for s in COGNITION if s in per_subtask),
        "accuracy": correct / total if total else None,
        "other_answers": unmatched,
        "per_subtask": per_subtask,
    }


@register_task
class MME(UnderstandingTask):
    name = "mme"
    description = "MME: perception (10 subtasks) and cognition (4) yes/no questions, acc + acc+"
    files = (
        "MME_Benchmark_release_version/ (the MME authors' release: request it via BradyFU/Awesome-Multimodal-"
        "Large-Language-Models, Evaluation branch) or VLMEvalKit's MME.tsv "
        "(https://opencompass.openxlab.space/utils/VLMEval/MME.tsv)"
    )
    data_names = (
        "MME.tsv",
        "MME_Benchmark_release_version",
        "MME/MME.tsv",
        "MME/MME_Benchmark_release_version",
    )
    max_new_tokens = 16
    headline = "perception"
    headline_scale = "raw"
    reported: ClassVar[str] = "UniTok 1448, Janus-Pro-7B 1567.1 (perception)"

    def load(self, path: Path) -> list[Sample]:
        if path.is_file():
            return self._load_tsv(path)
        tsv = sorted(path.glob("MME*.tsv"))
        if tsv:
            return self._load_tsv(tsv[0])
        return self._load_folder(path)

    def _load_tsv(self, path: Path) -> list[Sample]:
        rows = read_records(path)
        require_columns(rows, ("index", "image", "question", "answer", "category"), path)
        images = TsvImages(rows, path)
        samples = []
        for row in rows:
            index = str(row["index"])
            owner, image = images.owner(index), images.get(index)
            if image is None:
                raise ValueError(f"{path} row {index} has no image")
            # Questions of one image share its acc+: VLMEvalKit keys them by image_path, else by the image.
            key = str(row["image_path"]) if not is_missing(row.get("image_path")) else owner
            samples.append(
                Sample(
                    id=index,
                    prompt=mme_prompt(str(row["question"])),
                    images=(image,),
                    answer=str(row["answer"]).strip(),
                    meta={"subtask": str(row["category"]), "image": f"{row['category']}/{key}"},
                    group=f"{row['category']}/{key}",
                )
            )
        return samples

    def _load_folder(self, root: Path) -> list[Sample]:
        folders = self._subtask_folders(root)
        if not folders:
            raise FileNotFoundError(
                f"{root} holds no MME subtask folders ({', '.join(SUBTASKS)}) and no MME.tsv ({self.files})"
            )
        samples = []
        for subtask, folder in folders.items():
            qa_dir = folder / "questions_answers_YN"
            image_dir = folder / "images" if qa_dir.is_dir() else folder
            qa_dir = qa_dir if qa_dir.is_dir() else folder
            for txt in sorted(qa_dir.glob("*.txt")):
                image = _image_named(image_dir, txt.stem)
                if image is None:
                    raise FileNotFoundError(f"{txt}: no image {txt.stem}.jpg/.png in {image_dir}")
                lines = [line for line in txt.read_text(encoding="utf-8").splitlines() if line.strip()]
                for n, line in enumerate(lines):
                    question, sep, answer = line.rpartition("\t")
                    if not sep:
                        raise ValueError(f"{txt} line {n + 1}: expected 'question<TAB>answer', got {line!r}")
                    samples.append(
                        Sample(
                            id=f"{subtask}/{txt.stem}/{n}",
                            prompt=mme_prompt(question),
                            images=(image,),
                            answer=answer.strip(),
                            meta={"subtask": subtask, "image": f"{subtask}/{image.name}"},
                            group=f"{subtask}/{image.name}",
                        )
                    )
        return samples

    @staticmethod
    def _subtask_folders(root: Path) -> dict[str, Path]:
        """Each subtask's folder: directly under ``root`` or one or two levels down (``MME_Benchmark/``)."""
        found: dict[str, Path] = {}
        for depth in ("", "*/", "*/*/"):
            for name in SUBTASKS:
                if name not in found:
                    hits = sorted(p for p in root.glob(f"{depth}{name}") if p.is_dir())
                    if hits:
                        found[name] = hits[0]
        return {name: found[name] for name in SUBTASKS if name in found}

    def score(self, samples: Sequence[Sample], predictions: Sequence[str]) -> dict[str, Any]:
        return mme_scores(
            [s.meta["subtask"] for s in samples],
            [s.meta["image"] for s in samples],
            [str(s.answer) for s in samples],
            predictions,
        )
