"""DPG-Bench (ELLA, Hu et al. 2024): dense prompts, scored by mPLUG-large VQA on DSG-style question graphs.

    python -m unified_mllm.eval --task dpg-bench --model EXPORT --data ELLA/dpg_bench/prompts --output OUT

**Prompts**: ``dpg_bench/prompts/`` of github.com/TencentQQGYLab/ELLA, one ``<id>.txt`` per prompt (1065;
the id is the file name's stem, e.g. ``0`` or ``COCOval2014000000010363``); ``--data`` is that folder or
``dpg_bench/`` holding it. The text is drawn as the file holds it (surrounding whitespace stripped).

**Layout** (what ``dpg_bench/compute_dpg_bench.py`` reads): one file per prompt, ``OUT/images/<id>.png``
(the scorer looks the questions up by the name's stem), holding N = 4 images of the prompt tiled 2x2 (ELLA's
README: "generate 4 images per prompt and grid them to 2x2 format"): the scorer crops tiles of side
``--resolution`` in the order top-left, top-right, bottom-left, bottom-right and scores the first
``--pic-num``. With ``--images-per-prompt 1`` the file is the single image (``PIC_NUM=1``); 2 or 3 leave the
other tiles white. The scorer tries every file of the folder (its own results files are written there too).

**Scorer** (in a clone of ELLA, with ``dpg_bench/dpg_bench.csv`` and modelscope's mPLUG
``damo/mplug_visual-question-answering_coco_large_en``; ``RESOLUTION`` = the side of one tile =
``generation.image_size``)::

    PIC_NUM=4 PROCESSES=1 bash dpg_bench/dist_eval.sh OUT/images RESOLUTION

**Summary** of its results file (``OUT/images/dpg-bench_<time>_results.txt`` by default, the newest one, or
``--scores FILE``): ``overall`` = the "DPG-Bench score" line (the mean over images of the per-image score,
x100), the L1 and L2 category scores it prints, and the per-image lines' count and mean (which give the score
when the scorer was stopped before its last line).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from unified_mllm import io
from unified_mllm.eval.generation_bench import (
    GenerationTask,
    GenPrompt,
    ImageFile,
    mean,
    signature_problem,
    stale_temporary_problems,
)
from unified_mllm.eval.tasks import markdown_table, register_task

RESULTS = re.compile(r"dpg-bench_.*_results(_detail)?\.txt")
# The scorer's crops: tile k of a 2x2 grid of side-s tiles, in its order.
TILE_ORDER = ((0, 0), (1, 0), (0, 1), (1, 1))


def _prompts_dir(data: Path) -> Path:
    for folder in (data, data / "prompts", data / "dpg_bench" / "prompts"):
        if folder.is_dir() and any(folder.glob("*.txt")):
            return folder
    raise FileNotFoundError(f"dpg-bench: no <id>.txt prompt files in {data} ({DPGBench.files})")


def _order(stem: str) -> tuple[int, int, str]:
    """Numeric ids in numeric order, then the others by name."""
    return (0, int(stem), "") if stem.isdigit() else (1, 0, stem)


def tile(images: Sequence[Image.Image]) -> Image.Image:
    """1 image: itself; 2-4: a 2x2 grid of them in the scorer's crop order (the missing tiles white)."""
    if len(images) == 1:
        return images[0]
    if not 1 <= len(images) <= 4:
        raise ValueError(f"DPG-Bench tiles 1 to 4 images per prompt, got {len(images)}")
    width, height = images[0].size
    grid = Image.new("RGB", (2 * width, 2 * height), "white")
    for image, (col, row) in zip(images, TILE_ORDER, strict=False):
        grid.paste(image.convert("RGB"), (col * width, row * height))
    return grid


@register_task
class DPGBench(GenerationTask):
    """DPG-Bench (see the module docstring)."""

    name = "dpg-bench"
    description = "DPG-Bench: 2x2-tiled images in its mPLUG scorer's layout; summary of its results file"
    files = "dpg_bench/prompts/ (1065 <id>.txt) and dpg_bench/dpg_bench.csv of github.com/TencentQQGYLab/ELLA"
    default_images_per_prompt = 4
    max_images_per_prompt = 4
    headline = "overall"
    reported = "Janus-Pro-7B 84.19"
    scorer = "DPG-Bench's compute_dpg_bench.py (mPLUG-large VQA)"

    def load_prompts(self, data: Path) -> list[GenPrompt]:
        folder = _prompts_dir(data)
        paths = sorted(folder.glob("*.txt"), key=lambda p: _order(p.stem))
        prompts = []
        for path in paths:
            text = path.read_text(encoding="utf-8").strip()
            if not text:
                raise ValueError(f"dpg-bench: {path} is empty")
            prompts.append(GenPrompt(path.stem, text))
        return prompts

    def image_files(self, prompts: Sequence[GenPrompt], images_per_prompt: int) -> list[ImageFile]:
        return [ImageFile(i, f"{p.id}.png", images_per_prompt) for i, p in enumerate(prompts)]

    def compose(self, images: Sequence[Image.Image]) -> Image.Image:
        return tile(images)

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
        ids = {p.id for p in prompts} if prompts is not None else None
        sizes: dict[tuple[int, int], int] = {}
        found = set()
        for entry in sorted(images_dir.iterdir()):
            if entry in stale or (entry.is_file() and RESULTS.fullmatch(entry.name)):
                continue
            if not entry.is_file() or entry.suffix != ".png" or "." in entry.stem:
                problems.append(
                    f"{entry.name}: not an <id>.png image (the scorer tries every file of the folder)"
                )
                continue
            if ids is not None and entry.stem not in ids:
                problems.append(
                    f"{entry.name}: no prompt {entry.stem}.txt (the scorer finds no questions for it)"
                )
                continue
            found.add(entry.stem)
            if problem := signature_problem(entry, "PNG"):
                problems.append(problem)
                continue
            with Image.open(entry) as image:
                sizes[image.size] = sizes.get(image.size, 0) + 1
                if (images_per_prompt or 0) > 1 and (image.width != image.height or image.width % 2):
                    problems.append(
                        f"{entry.name}: {image.width}x{image.height} is not a 2x2 grid of square tiles"
                    )
        if len(sizes) > 1:
            shown = ", ".join(f"{w}x{h} ({n})" for (w, h), n in sizes.items())
            problems.append(f"images of different sizes ({shown}); the scorer crops one --resolution for all")
        if not found:
            problems.append(f"{images_dir} holds no <id>.png image")
        if ids is not None and not partial:
            absent = sorted(ids - found, key=_order)
            if absent:
                more = " ..." if len(absent) > 5 else ""
                problems.append(f"{len(absent)} prompt(s) without an image: {', '.join(absent[:5])}{more}")
        return problems

    def default_scores(self, output_dir: Path) -> Path | None:
        found = sorted(
            p
            for p in (output_dir / "images").glob("dpg-bench_*_results.txt")
            if not p.name.endswith("_detail.txt")
        )
        return found[-1] if found else None  # the name holds the time: the newest sorts last

    def read_scores(self, path: Path, prompts: Sequence[GenPrompt]) -> dict[str, Any]:
        return dpg_summary(path.read_text(encoding="utf-8"))

    def scorer_commands(self, output_dir: Path) -> list[str]:
        return [
            "# in a clone of github.com/TencentQQGYLab/ELLA (dpg_bench/dpg_bench.csv; modelscope's mPLUG-large)",
            f'PIC_NUM={self.images_per_prompt} PROCESSES=1 bash dpg_bench/dist_eval.sh "{output_dir.resolve()}/images" '
            "RESOLUTION  # RESOLUTION = generation.image_size (one tile's side)",
        ]

    def format_scores(self, scores: dict[str, Any]) -> str:
        head = markdown_table(
            ("metric", "value"),
            [
                (
                    "**DPG-Bench score**",
                    f"**{scores['overall']:.2f}**" if scores["overall"] is not None else "n/a",
                ),
                ("images scored", scores["images"]),
            ],
        )
        rows = [(f"L1 {k}", f"{v:.2f}") for k, v in scores["l1"].items()]
        rows += [(f"L2 {k}", f"{v:.2f}") for k, v in scores["l2"].items()]
        return head + ("\n" + markdown_table(("category", "score"), rows) if rows else "")


def _floats(fields: Sequence[str]) -> list[float] | None:
    try:
        return [float(f) for f in fields]
    except ValueError:
        return None


def dpg_summary(text: str) -> dict[str, Any]:
    """The figures of compute_dpg_bench.py's results file: ``overall`` (its "DPG-Bench score", x100), ``l1`` /
    ``l2`` category scores, and from the per-image lines (``path, score per tile ..., mean``) ``images`` and
    ``per_image_mean`` (x100; the overall score when the last line is missing)."""
    overall = None
    l1: dict[str, float] = {}
    l2: dict[str, float] = {}
    section: dict[str, float] | None = None
    per_image: list[float] = []
    for line in text.splitlines():
        if line.startswith("DPG-Bench score:"):
            overall = float(line.split(":", 1)[1])
        elif line.startswith("L1 category scores:"):
            section = l1
        elif line.startswith("L2 category scores:"):
            section = l2
        elif line.startswith("\t") and section is not None and ":" in line:
            name, value = line.strip().rsplit(":", 1)
            section[name.strip()] = float(value)
        elif line and not line.startswith("\t"):
            section = None if not line.startswith(("L1", "L2")) else section
            fields = line.split(", ")
            # "<image path>, s1, ..., sN, mean": the path itself may hold ", "
            for k in range(1, len(fields) - 1):
                values = _floats(fields[k:])
                if values is not None and fields[k - 1].endswith(".png"):
                    per_image.append(values[-1])
                    break
    image_mean = mean(per_image)
    if overall is None and image_mean is not None:
        overall = 100 * image_mean
    if overall is None:
        raise ValueError("no DPG-Bench score and no per-image line in the results file")
    return {
        "overall": overall,
        "images": len(per_image),
        "per_image_mean": None if image_mean is None else 100 * image_mean,
        "l1": l1,
        "l2": l2,
    }
