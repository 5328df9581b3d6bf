"""GenEval (Ghosh et al. 2023): object-focused text-to-image alignment, scored by a Mask2Former detector.

    python -m unified_mllm.eval --task geneval --model EXPORT --data geneval/prompts/evaluation_metadata.jsonl \\
        --output OUT generation.cfg_scale=5.5

**Prompts**: GenEval's ``prompts/evaluation_metadata.jsonl`` (553 lines, github.com/djghosh13/geneval), one
JSON object a line: ``{"tag", "include": [{"class", "count", "color"?, "position"?}], "exclude"?, "prompt"}``;
``--data`` is that file or a folder holding it (or ``prompts/`` with it). The prompt text is drawn as is.
The papers evaluate GenEval with CFG 5.5 (UniToken); set it with ``generation.cfg_scale=5.5``.

**Layout** (what ``evaluation/evaluate_images.py`` reads; README "The generated format should be")::

    OUT/images/<index:05d>/metadata.jsonl      that prompt's line of evaluation_metadata.jsonl
    OUT/images/<index:05d>/samples/<k:04d>.png k = 0 .. N-1, N = 4 per prompt (GenEval's default)

The evaluator reads every folder whose name is all digits, ``json.load``s its ``metadata.jsonl`` and scores
every ``samples/`` file matching ``\\d+.png`` (GenEval's own generation script pads the sample index to 5
digits, its README to 4: both read the same; we follow the README).

**Scorer** (GenEval's environment: mmdet 2.27, its Mask2Former weights from
``evaluation/download_models.sh``, CLIP ViT-L-14 for colours)::

    python evaluation/evaluate_images.py OUT/images --outfile OUT/results.jsonl --model-path DETECTOR_DIR
    cd evaluation && python summary_scores.py OUT/results.jsonl

**Summary** of ``results.jsonl`` (one line per image: ``filename``, ``tag``, ``prompt``, ``correct``,
``reason``, ``metadata``), read from ``--scores FILE`` or ``OUT/results.jsonl``, as ``summary_scores.py``
computes it: accuracy per tag (single_object, two_object, counting, colors, position, color_attr), ``overall``
= the mean of the tag accuracies (GenEval's score), ``correct_images`` = the fraction of correct images and
``correct_prompts`` = the fraction of prompts with at least one correct image (GenEval's "% correct prompts").
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from unified_mllm import io
from unified_mllm.eval.generation_bench import (
    GenerationTask,
    GenPrompt,
    ImageFile,
    mean,
    read_jsonl,
    signature_problem,
    stale_temporary_problems,
)
from unified_mllm.eval.tasks import markdown_table, register_task

TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
METADATA = "metadata.jsonl"
SAMPLES = "samples"
RESULTS = "results.jsonl"
PROMPTS_FILE = "evaluation_metadata.jsonl"
FOLDER = re.compile(r"\d{5}")
SAMPLE = re.compile(r"(\d{4})\.png")


def find_prompts_file(data: Path) -> Path:
    """``data`` itself, or evaluation_metadata.jsonl in it or in its prompts/ folder."""
    if data.is_file():
        return data
    for candidate in (data / PROMPTS_FILE, data / "prompts" / PROMPTS_FILE):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"geneval: no {PROMPTS_FILE} in {data} or {data / 'prompts'} ({GenEval.files})")


@register_task
class GenEval(GenerationTask):
    """GenEval (see the module docstring)."""

    name = "geneval"
    description = "GenEval: images in the layout of its Mask2Former scorer; summary of its results.jsonl"
    files = "prompts/evaluation_metadata.jsonl of github.com/djghosh13/geneval"
    default_images_per_prompt = 4
    headline = "overall"
    reported = "UniToken 0.63 (CFG 5.5), Janus-Pro-7B 0.80"
    scorer = "GenEval's evaluation/evaluate_images.py (Mask2Former)"

    def load_prompts(self, data: Path) -> list[GenPrompt]:
        path = find_prompts_file(data)
        prompts = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not a JSON line ({exc.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise ValueError(f"{path}:{number}: a GenEval metadata line needs a string 'prompt'")
            if not isinstance(record.get("tag"), str) or not isinstance(record.get("include"), list):
                raise ValueError(
                    f"{path}:{number}: a GenEval metadata line needs 'tag' and an 'include' list"
                )
            index = len(prompts)
            prompts.append(GenPrompt(f"{index:05d}", record["prompt"], record["tag"], {"line": line.strip()}))
        return prompts

    def image_files(self, prompts: Sequence[GenPrompt], images_per_prompt: int) -> list[ImageFile]:
        return [
            ImageFile(i, f"{p.id}/{SAMPLES}/{k:04d}.png")
            for i, p in enumerate(prompts)
            for k in range(images_per_prompt)
        ]

    def prepare(self, images_dir: Path, prompts: Sequence[GenPrompt]) -> None:
        """Each prompt folder's metadata.jsonl: its line of evaluation_metadata.jsonl."""
        for prompt in prompts:
            path = images_dir / prompt.id / METADATA
            text = prompt.meta["line"] + "\n"
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                path.parent.mkdir(parents=True, exist_ok=True)
                io.write_text(path, text)

    def check_layout(
        self,
        images_dir: Path,
        prompts: Sequence[GenPrompt] | None = None,
        images_per_prompt: int | None = None,
        *,
        partial: bool = False,
    ) -> list[str]:
        problems = stale_temporary_problems(images_dir, images_dir)
        stale = set(io.stale_temporaries(images_dir))
        folders: dict[int, Path] = {}
        for entry in sorted(images_dir.iterdir()):
            if entry in stale:
                continue
            if entry.is_dir() and FOLDER.fullmatch(entry.name):
                folders[int(entry.name)] = entry
            else:
                problems.append(f"{entry.name}: not a prompt folder (<index:05d>/); the scorer skips it")
        if not folders:
            return [*problems, f"{images_dir} holds no prompt folder (00000/ ...)"]
        if prompts is not None:
            extra = sorted(i for i in folders if i >= len(prompts))
            problems += [f"{i:05d}/: the prompts file has only {len(prompts)} prompts" for i in extra[:5]]
            expected = range(len(prompts))
        else:
            expected = range(max(folders) + 1)
        absent = [i for i in expected if i not in folders]
        if absent and not partial:
            shown = ", ".join(f"{i:05d}/" for i in absent[:5])
            problems.append(
                f"{len(absent)} prompt folder(s) missing: {shown}{' ...' if len(absent) > 5 else ''}"
            )
        counts: dict[int, int] = {}
        for index, folder in folders.items():
            problems += self._check_folder(folder, images_dir, prompts, index, images_per_prompt, counts)
        if images_per_prompt is None and len(set(counts.values())) > 1:
            spread = ", ".join(
                f"{n} in {sum(c == n for c in counts.values())} folder(s)"
                for n in sorted(set(counts.values()))
            )
            problems.append(f"prompts have different numbers of images ({spread})")
        return problems

    def _check_folder(
        self,
        folder: Path,
        root: Path,
        prompts: Sequence[GenPrompt] | None,
        index: int,
        images_per_prompt: int | None,
        counts: dict[int, int],
    ) -> list[str]:
        name = folder.name
        problems = stale_temporary_problems(folder, root)
        metadata = folder / METADATA
        if not metadata.is_file():
            problems.append(f"{name}/{METADATA} is missing (the scorer reads the prompt's metadata there)")
        else:
            try:
                record = json.loads(metadata.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                record = None
                problems.append(f"{name}/{METADATA} is not one JSON object (the scorer json.load()s it)")
            if record is not None:
                if not isinstance(record, dict) or not {"tag", "prompt", "include"} <= set(record):
                    problems.append(f"{name}/{METADATA} lacks GenEval's 'tag', 'prompt' and 'include'")
                elif (
                    prompts is not None
                    and index < len(prompts)
                    and record != json.loads(prompts[index].meta["line"])
                ):
                    problems.append(f"{name}/{METADATA} is not line {index + 1} of the prompts file")
        stale = set(io.stale_temporaries(folder))
        for entry in sorted(folder.iterdir()):
            if entry.name not in (METADATA, SAMPLES, "grid.png") and entry not in stale:
                problems.append(
                    f"{name}/{entry.name}: unexpected (a prompt folder holds {METADATA} and {SAMPLES}/)"
                )
        samples = folder / SAMPLES
        if not samples.is_dir():
            return [*problems, f"{name}/{SAMPLES}/ is missing"]
        problems += stale_temporary_problems(samples, root)
        stale = set(io.stale_temporaries(samples))
        numbers = []
        for entry in sorted(samples.iterdir()):
            if entry in stale:
                continue
            match = SAMPLE.fullmatch(entry.name)
            if not match or not entry.is_file():
                problems.append(f"{name}/{SAMPLES}/{entry.name}: not an image the scorer reads (<k:04d>.png)")
                continue
            numbers.append(int(match.group(1)))
            if problem := signature_problem(entry, "PNG"):
                problems.append(f"{name}/{SAMPLES}/{problem}")
        counts[index] = len(numbers)
        n = images_per_prompt if images_per_prompt is not None else len(numbers)
        absent = [k for k in range(n) if k not in numbers]
        if absent:
            problems.append(f"{name}/{SAMPLES}/{absent[0]:04d}.png is missing ({len(numbers)} of {n} images)")
        extra = [k for k in numbers if k >= n]
        if extra:
            problems.append(f"{name}/{SAMPLES}/{extra[0]:04d}.png: more than {n} images per prompt")
        return problems

    def default_scores(self, output_dir: Path) -> Path | None:
        path = output_dir / RESULTS
        return path if path.is_file() else None

    def read_scores(self, path: Path, prompts: Sequence[GenPrompt]) -> dict[str, Any]:
        return geneval_summary(read_jsonl(path))

    def scorer_commands(self, output_dir: Path) -> list[str]:
        out = output_dir.resolve()
        return [
            "# in a clone of github.com/djghosh13/geneval, its conda environment (mmdet 2.27),",
            "# after ./evaluation/download_models.sh DETECTOR_DIR/",
            f'python evaluation/evaluate_images.py "{out}/images" --outfile "{out}/{RESULTS}" --model-path DETECTOR_DIR',
            f'cd evaluation && python summary_scores.py "{out}/{RESULTS}"',
        ]

    def format_scores(self, scores: dict[str, Any]) -> str:
        rows = [
            (tag, f"{g['accuracy']:.4f}", f"{g['correct']}/{g['total']}")
            for tag, g in scores["per_tag"].items()
        ]
        rows.append(("**overall** (mean of tags)", f"**{scores['overall']:.4f}**", ""))
        table = markdown_table(("tag", "accuracy", "correct"), rows)
        return (
            table + f"\n{scores['images']} images of {scores['prompts']} prompts: correct images "
            f"{scores['correct_images']:.4f}, prompts with a correct image {scores['correct_prompts']:.4f}\n"
        )


def geneval_summary(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """GenEval's summary_scores.py on the lines of results.jsonl: accuracy per tag (the six in GenEval's order,
    then any other in order of appearance), ``overall`` = their mean, ``correct_images``, ``correct_prompts``
    (a prompt, told apart by its metadata, counts when any of its images is correct)."""
    if not records:
        raise ValueError("GenEval results hold no image")
    for number, record in enumerate(records, 1):
        if "tag" not in record or not isinstance(record.get("correct"), bool):
            raise ValueError(f"GenEval results line {number}: needs 'tag' and a boolean 'correct'")
    seen = list(dict.fromkeys(r["tag"] for r in records))
    tags = [t for t in TAGS if t in seen] + [t for t in seen if t not in TAGS]
    per_tag = {}
    for tag in tags:
        verdicts = [r["correct"] for r in records if r["tag"] == tag]
        per_tag[tag] = {
            "accuracy": sum(verdicts) / len(verdicts),
            "correct": sum(verdicts),
            "total": len(verdicts),
        }
    by_prompt: dict[str, bool] = {}
    for record in records:
        key = record.get("metadata", record.get("prompt", ""))
        key = key if isinstance(key, str) else json.dumps(key, sort_keys=True)
        by_prompt[key] = by_prompt.get(key, False) or record["correct"]
    return {
        "overall": mean([g["accuracy"] for g in per_tag.values()]),
        "correct_images": sum(r["correct"] for r in records) / len(records),
        "correct_prompts": sum(by_prompt.values()) / len(by_prompt),
        "images": len(records),
        "prompts": len(by_prompt),
        "per_tag": per_tag,
    }
