"""T2I-CompBench++ (Huang et al.): compositional text-to-image generation in 8 categories, each with its scorer.

    python -m unified_mllm.eval --task t2i-compbench --model EXPORT --data T2I-CompBench/examples/dataset \\
        --output OUT

**Prompts**: the validation files of github.com/Karine-Huang/T2I-CompBench, ``examples/dataset/<category>_val.txt``
for the categories color, shape, texture, spatial, 3d_spatial, numeracy, non_spatial, complex (300 prompts
each, one a line; read as the official ``inference_eval.py`` reads them: the text before a tab; blank lines are
skipped). ``--data`` is that folder, the repository (or its ``examples/``) or one ``<category>_val.txt``; a
category whose file is absent is left out. ``--limit N`` keeps the first N prompts of each category.

**Layout** (the official scorers read one folder per category, ``<outpath>/samples/``)::

    OUT/images/<category>/samples/<prompt>_<n:06d>.png   n = prompt index * N + k, N = 10 per prompt

as ``inference_eval.py`` writes them (README: "10 images are generated per prompt"): the scorers take the prompt
from the file name before its one ``_`` and the question id from the 6 digits after it, and 3-in-1 expects
exactly 10 images per prompt, in prompt order. A prompt holding ``_`` or ``/`` cannot be named this way and is
refused.

**Scorers** (run in a clone of the repository, with its weights; ``D`` = ``OUT/images/<category>``, no
trailing slash — the 3-D scorer names its depth folder after D's last component):

- color, shape, texture: BLIP-VQA ``cd BLIPvqa_eval && python BLIP_vqa.py --out_dir=D`` → ``D/annotation_blip/vqa_result.json``
- spatial: UniDet ``cd UniDet_eval && python 2D_spatial_eval.py --outpath=D`` → ``D/labels/annotation_obj_detection_2d/``
- 3d_spatial: UniDet + depth ``python 3D_spatial_eval.py --outpath=D`` → ``D/labels/annotation_obj_detection_3d/``
- numeracy: UniDet ``python numeracy_eval.py --outpath=D`` → ``D/annotation_num/vqa_result.json``
- non_spatial: CLIPScore ``python CLIPScore_eval/CLIP_similarity.py --outpath=D`` → ``D/annotation_clip/``
- complex: BLIP-VQA, UniDet 2-D and CLIPScore with ``--complex=True``, then
  ``cd 3_in_1_eval && python 3_in_1.py --outpath=D --data_path=../examples/dataset`` → ``D/annotation_3_in_1/``

**Summary**: each category's ``vqa_result.json`` (``[{"question_id", "answer"}]``, one per image) is averaged,
as the scorers print it ("score avg"); ``--scores DIR`` points at a folder laid out like ``OUT/images``
(default: ``OUT/images`` itself). ``mean`` (the headline here) is the mean over the categories scored — ours,
not an official figure: the papers report the categories one by one.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from unified_mllm import io
from unified_mllm.eval.generation_bench import (
    GenerationTask,
    GenPrompt,
    ImageFile,
    find_images_dir,
    mean,
    signature_problem,
    stale_temporary_problems,
)
from unified_mllm.eval.tasks import markdown_table, register_task

# category -> (the scorer's results file under the category folder, the scorer)
CATEGORIES = {
    "color": ("annotation_blip/vqa_result.json", "BLIP-VQA"),
    "shape": ("annotation_blip/vqa_result.json", "BLIP-VQA"),
    "texture": ("annotation_blip/vqa_result.json", "BLIP-VQA"),
    "spatial": ("labels/annotation_obj_detection_2d/vqa_result.json", "UniDet"),
    "3d_spatial": ("labels/annotation_obj_detection_3d/vqa_result.json", "UniDet + depth"),
    "numeracy": ("annotation_num/vqa_result.json", "UniDet"),
    "non_spatial": ("annotation_clip/vqa_result.json", "CLIPScore"),
    "complex": ("annotation_3_in_1/vqa_result.json", "3-in-1"),
}
SAMPLES = "samples"
SAMPLE = re.compile(r"([^_/]+)_(\d{6})\.png")
COMPLEX_IMAGES = 10  # 3_in_1.py: num=10 images per prompt, hard-coded
MAX_NAME_BYTES = 255


def _prompt_files(data: Path) -> dict[str, Path]:
    """category -> its <category>_val.txt under ``data`` (a file, the dataset folder or the repository)."""
    if data.is_file():
        category = data.name.removesuffix("_val.txt")
        if category not in CATEGORIES or not data.name.endswith("_val.txt"):
            raise ValueError(
                f"t2i-compbench: {data.name} is not one of {', '.join(f'{c}_val.txt' for c in CATEGORIES)}"
            )
        return {category: data}
    for folder in (data, data / "dataset", data / "examples" / "dataset"):
        found = {c: folder / f"{c}_val.txt" for c in CATEGORIES if (folder / f"{c}_val.txt").is_file()}
        if found:
            return found
    raise FileNotFoundError(f"t2i-compbench: no <category>_val.txt in {data} ({T2ICompBench.files})")


def image_name(prompt: str, number: int) -> str:
    """The official file name of image ``number`` (the category's running count) of ``prompt``."""
    return f"{prompt}_{number:06d}.png"


@register_task
class T2ICompBench(GenerationTask):
    """T2I-CompBench++ (see the module docstring)."""

    name = "t2i-compbench"
    description = (
        "T2I-CompBench++: images in its scorers' layout per category; summary of their vqa_result.json"
    )
    files = "examples/dataset/<category>_val.txt of github.com/Karine-Huang/T2I-CompBench (8 categories)"
    default_images_per_prompt = 10
    headline = "mean"
    reported = "UniToken colour 0.7833, shape 0.5847, texture 0.7315"
    scorer = "T2I-CompBench's BLIP-VQA / UniDet / CLIPScore / 3-in-1 scorers"

    def load_prompts(self, data: Path) -> list[GenPrompt]:
        prompts = []
        for category, path in _prompt_files(data).items():
            lines = [line.split("\t")[0] for line in path.read_text(encoding="utf-8").splitlines()]
            index = 0
            for number, text in enumerate(lines, 1):
                if not text.strip():
                    continue
                if "_" in text or "/" in text:
                    raise ValueError(
                        f"{path}:{number}: the prompt holds '_' or '/', which the scorers' file names cannot carry"
                    )
                if len(image_name(text, 0).encode()) > MAX_NAME_BYTES:
                    raise ValueError(f"{path}:{number}: the prompt is too long for a file name")
                prompts.append(GenPrompt(f"{category}/{index:04d}", text, category))
                index += 1
        return prompts

    def select(self, prompts: Sequence[GenPrompt], limit: int | None) -> list[GenPrompt]:
        if limit is None:
            return list(prompts)
        kept: dict[str, int] = {}
        out = []
        for prompt in prompts:
            if kept.get(prompt.category, 0) < limit:
                kept[prompt.category] = kept.get(prompt.category, 0) + 1
                out.append(prompt)
        return out

    def image_files(self, prompts: Sequence[GenPrompt], images_per_prompt: int) -> list[ImageFile]:
        files = []
        seen: dict[str, int] = {}  # prompts of each category so far: the file numbers run per category
        for i, prompt in enumerate(prompts):
            index = seen.get(prompt.category, 0)
            seen[prompt.category] = index + 1
            for k in range(images_per_prompt):
                name = image_name(prompt.text, index * images_per_prompt + k)
                files.append(ImageFile(i, f"{prompt.category}/{SAMPLES}/{name}"))
        return files

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
        folders = {}
        for entry in sorted(images_dir.iterdir()):
            if entry in stale:
                continue
            if entry.is_dir() and entry.name in CATEGORIES:
                folders[entry.name] = entry
            else:
                problems.append(f"{entry.name}: not a category folder ({', '.join(CATEGORIES)})")
        wanted = list(dict.fromkeys(p.category for p in prompts)) if prompts is not None else list(folders)
        for category in wanted:
            if category not in folders:
                if not partial:
                    problems.append(f"{category}/: missing (the prompts file has this category)")
                continue
            texts = [p.text for p in prompts if p.category == category] if prompts is not None else None
            problems += self._check_category(folders[category], images_dir, texts, images_per_prompt, partial)
        if prompts is not None:
            problems += [f"{c}/: no such category in the prompts given" for c in folders if c not in wanted]
        if not folders:
            problems.append(f"{images_dir} holds no category folder")
        return problems

    def _check_category(
        self,
        folder: Path,
        root: Path,
        texts: Sequence[str] | None,
        images_per_prompt: int | None,
        partial: bool,
    ) -> list[str]:
        category = folder.name
        samples = folder / SAMPLES
        if not samples.is_dir():
            return [f"{category}/{SAMPLES}/ is missing"]
        problems = stale_temporary_problems(samples, root)
        stale = set(io.stale_temporaries(samples))
        by_number: dict[int, str] = {}
        for entry in sorted(samples.iterdir()):
            if entry in stale:
                continue
            match = SAMPLE.fullmatch(entry.name)
            if not match or not entry.is_file():
                problems.append(
                    f"{category}/{SAMPLES}/{entry.name}: not <prompt>_<n:06d>.png with one '_' (the scorers "
                    "parse every file of the folder this way)"
                )
                continue
            number = int(match.group(2))
            if number in by_number:
                problems.append(f"{category}/{SAMPLES}/: image number {number:06d} is used twice")
            by_number[number] = match.group(1)
            if problem := signature_problem(entry, "PNG"):
                problems.append(f"{category}/{SAMPLES}/{problem}")
        count = len(by_number)
        if not count:
            return [*problems, f"{category}/{SAMPLES}/ holds no image"]
        gaps = [n for n in range(count) if n not in by_number]
        if gaps:
            problems.append(
                f"{category}/{SAMPLES}/: images are not numbered 000000..{count - 1:06d} (no {gaps[0]:06d}); the "
                "scorers align results with prompts by these numbers"
            )
            return problems
        n = images_per_prompt
        if n is not None and count % n:
            problems.append(f"{category}/{SAMPLES}/: {count} images is not a multiple of {n} per prompt")
            return problems
        if n is None:  # the run of equal prompts at the start
            n = next((i for i in range(1, count) if by_number[i] != by_number[0]), count)
        if category == "complex" and n != COMPLEX_IMAGES:
            problems.append(
                f"complex/: 3_in_1.py assumes {COMPLEX_IMAGES} images per prompt, the folder has {n}"
            )
        drawn = count // n
        for p in range(drawn):
            names = {by_number[p * n + k] for k in range(n) if p * n + k in by_number}
            if len(names) != 1:
                problems.append(
                    f"{category}/{SAMPLES}/: images {p * n:06d}..{p * n + n - 1:06d} are not of one prompt"
                )
                break
            if texts is not None:
                if p >= len(texts):
                    problems.append(f"{category}/{SAMPLES}/: more images than {len(texts)} prompts x {n}")
                    break
                if names != {texts[p]}:
                    problems.append(
                        f"{category}/{SAMPLES}/{image_name(names.pop(), p * n)}: prompt {p + 1} of "
                        f"{category}_val.txt is {texts[p]!r}"
                    )
                    break
        if texts is not None and drawn < len(texts) and not partial:
            problems.append(f"{category}/{SAMPLES}/: {drawn} of {len(texts)} prompts drawn")
        return problems

    def default_scores(self, output_dir: Path) -> Path | None:
        images = output_dir / "images"
        return images if any((images / c / r).is_file() for c, (r, _) in CATEGORIES.items()) else None

    def read_scores(self, path: Path, prompts: Sequence[GenPrompt]) -> dict[str, Any]:
        root = find_images_dir(path) if path.is_dir() else path
        if not root.is_dir():
            raise ValueError(
                f"t2i-compbench: --scores {path} must be a folder of category folders (OUT/images)"
            )
        per_category: dict[str, dict[str, Any]] = {}
        stale = False
        for category, (relative, scorer) in CATEGORIES.items():
            result = root / category / relative
            if not result.is_file():
                continue
            answers = io.read_json(result)
            if not isinstance(answers, list) or not all(
                isinstance(a, dict) and "answer" in a for a in answers
            ):
                raise ValueError(f"{result}: expected the scorer's list of {{'question_id', 'answer'}}")
            values = [float(a["answer"]) for a in answers]
            samples = root / category / SAMPLES
            images = sum(1 for p in samples.glob("*.png")) if samples.is_dir() else 0
            newest = (
                max((p.stat().st_mtime for p in samples.glob("*.png")), default=0.0)
                if samples.is_dir()
                else 0.0
            )
            stale = stale or result.stat().st_mtime < newest
            per_category[category] = {
                "score": mean(values),
                "images": len(values),
                "on_disk": images,
                "scorer": scorer,
            }
        if not per_category:
            raise ValueError(f"t2i-compbench: no scorer results (vqa_result.json) under {root}")
        return {
            "mean": mean([c["score"] for c in per_category.values() if c["score"] is not None]),
            "categories": len(per_category),
            "stale": stale,
            "per_category": per_category,
        }

    def scorer_commands(self, output_dir: Path) -> list[str]:
        d = f"{output_dir.resolve()}/images"
        present = list(dict.fromkeys(p.category for p in self.prompts())) if self.data else list(CATEGORIES)
        dataset = (
            _prompt_files(self.data)[present[0]].parent.resolve() if self.data else "../examples/dataset"
        )
        blip = [c for c in ("color", "shape", "texture", "complex") if c in present]
        unidet = {
            "spatial": f'python 2D_spatial_eval.py --outpath="{d}/spatial"',
            "complex": f'python 2D_spatial_eval.py --outpath="{d}/complex" --complex=True',
            "3d_spatial": f'python 3D_spatial_eval.py --outpath="{d}/3d_spatial"',
            "numeracy": f'python numeracy_eval.py --outpath="{d}/numeracy"',
        }
        clip = {
            "non_spatial": f'python CLIPScore_eval/CLIP_similarity.py --outpath="{d}/non_spatial"',
            "complex": f'python CLIPScore_eval/CLIP_similarity.py --outpath="{d}/complex" --complex=True',
        }
        lines = [
            "# in a clone of github.com/Karine-Huang/T2I-CompBench with its weights (its README), from its root"
        ]
        if blip:
            lines.append(
                f'(cd BLIPvqa_eval && for c in {" ".join(blip)}; do python BLIP_vqa.py --out_dir="{d}/$c"; done)'
            )
        lines += [f"(cd UniDet_eval && {command})" for c, command in unidet.items() if c in present]
        lines += [command for c, command in clip.items() if c in present]
        if "complex" in present:  # 3-in-1 combines the three scores above
            lines.append(
                f'(cd 3_in_1_eval && python 3_in_1.py --outpath="{d}/complex" --data_path="{dataset}")'
            )
        return lines

    def format_scores(self, scores: dict[str, Any]) -> str:
        rows = [(c, f"{v['score']:.4f}", v["images"], v["scorer"]) for c, v in scores["per_category"].items()]
        rows.append(("**mean** (ours, of the categories scored)", f"**{scores['mean']:.4f}**", "", ""))
        return markdown_table(("category", "score", "images scored", "scorer"), rows)
