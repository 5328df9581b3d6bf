"""Text-to-image benchmarks scored by their own tools: draw the images in the exact layout the scorer reads.

GenEval, T2I-CompBench++, DPG-Bench and GenAI-Bench score images with detectors and VQA models whose weights
this project does not ship (Mask2Former, UniDet, BLIP, mPLUG, CLIP-FlanT5). So a generation benchmark here
does the model's half: it reads the benchmark's released prompts (``--data``), draws ``images_per_prompt``
images per prompt and writes them exactly where and as the official scorer reads them; the user runs the
scorer (the command is in ``<task>.md`` and the README), and a rerun with the scorer's results (``--scores
FILE``, or found where the scorer writes them by default) summarises them in the benchmark's own way.

**Drawing.** Prompts go through :meth:`Solver.generate_img` with the config's ``generation`` settings
(``cfg_scale``, ``image_top_k``, ``image_size``, ``jacobi_window``, ``seed``; override them on the command
line: ``generation.cfg_scale=5.5``). The draws of all prompts, in order (prompt-major, ``images_per_prompt``
each), are cut into solver calls of ``batch_size``; the call starting at draw ``i`` is seeded with
``generation.seed + i``, so a draw depends only on the prompts, its index, the seed and the batch size.

**Resuming.** Every file is written atomically (a killed run leaves whole files or none), so a rerun skips
the files already on disk and draws only the solver calls that hold a missing one (with the same batch size
it draws exactly the images the first run would have; only the missing files are written). A run records its
settings in ``generation_settings.json``; a rerun with settings that change what is drawn (model, guidance,
top-k, temperature, size, images per prompt) is refused by name: ``--restart`` discards the images (and the
scorer's outputs inside the image folder) and starts over.

**Files** under the output directory: ``images/`` (the scorer's input, see each benchmark's layout),
``<task>.json`` (settings, counts, the layout check, the scorer's summary when found), ``<task>.md`` (the same
as tables, with the scorer's commands) and ``<task>_samples.png`` (the images of the first prompts).

**Layout check.** After drawing, :meth:`GenerationTask.check_layout` verifies that the folder is exactly
what the scorer reads (names, numbering, counts, per-prompt metadata, image format); a user can run it alone:

    python -m unified_mllm.eval.generation_bench check geneval OUTPUT [--data PROMPTS] [--images-per-prompt N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from PIL import Image, ImageDraw, ImageFont

from unified_mllm import io
from unified_mllm.cli import add_debug_argument, one_line_errors
from unified_mllm.config import Config, GenerationConfig
from unified_mllm.eval.tasks import Solver, Task, check_limit, markdown_table
from unified_mllm.progress import progress as progress_bar

IMAGES_DIR = "images"
SETTINGS_FILE = "generation_settings.json"
# Settings that change what is drawn: a resumed run with other values would mix two models' images.
DRAW_SETTINGS = (
    "model",
    "cfg_scale",
    "image_top_k",
    "temperature",
    "top_p",
    "image_size",
    "images_per_prompt",
)
GRID_PROMPTS = 8  # rows of the sample grid
GRID_COLUMNS = 4  # images shown per prompt
TILE = 128
PAD = 4
LINE_HEIGHT = 12
CAPTION_LINES = 2
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"


@dataclass(frozen=True)
class GenPrompt:
    """One prompt of a benchmark: its id in the benchmark's files, the text drawn, its category (for
    ``--limit`` per category and the tables; "" when the benchmark has none) and the benchmark's own record."""

    id: str
    text: str
    category: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ImageFile:
    """One file of the scorer's input: ``path`` (relative to the image folder) holds ``draws`` drawn images
    (several when the benchmark tiles them into one file) of prompt number ``prompt``."""

    prompt: int
    path: str
    draws: int = 1


class LayoutError(ValueError):
    """The image folder is not what the benchmark's scorer reads; the message lists every problem."""


def signature_problem(path: Path, image_format: str) -> str | None:
    """A message when ``path`` is empty or does not start like a ``image_format`` ("PNG" / "JPEG") file."""
    expected = PNG_SIGNATURE if image_format == "PNG" else JPEG_SIGNATURE
    try:
        with path.open("rb") as f:
            head = f.read(len(expected))
    except OSError as exc:
        return f"{path.name} cannot be read ({exc})"
    if head != expected:
        return f"{path.name} is not a {image_format} file"
    return None


def stale_temporary_problems(directory: Path, root: Path) -> list[str]:
    """One message per temporary file a killed writer left in ``directory`` (a scorer would read them)."""
    return [
        f"{p.relative_to(root)} is a temporary file left by a killed run (a rerun of the benchmark removes it)"
        for p in io.stale_temporaries(directory)
    ]


def mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


# ------------------------------------------------------------------------------------------------ the task


class GenerationTask(Task):
    """A text-to-image benchmark scored by its own tool (see the module docstring).

    Subclasses set the class attributes and implement :meth:`load_prompts` (the released prompts),
    :meth:`image_files` (the scorer's file names), :meth:`check_layout`, :meth:`default_scores`,
    :meth:`read_scores` and :meth:`scorer_commands`; :meth:`prepare` (per-prompt files the scorer reads) and
    :meth:`compose` (several draws in one file) are optional.
    """

    files: ClassVar[str] = ""
    """What to download (exact names, where from): shown when --data is missing."""
    default_images_per_prompt: ClassVar[int] = 1
    max_images_per_prompt: ClassVar[int | None] = None
    image_format: ClassVar[str] = "PNG"
    headline: ClassVar[str] = "overall"
    headline_scale: ClassVar[str] = "raw"  # scorer figures are shown as the scorer prints them
    reported: ClassVar[str] = ""
    """The papers' figures for the headline metric (7B class)."""
    scorer: ClassVar[str] = ""
    """The scorer, in words (for the tables)."""

    def __init__(
        self,
        data: str | os.PathLike[str] | None = None,
        images_per_prompt: int | None = None,
        scores: str | os.PathLike[str] | None = None,
        restart: bool = False,
        grid_prompts: int = GRID_PROMPTS,
    ) -> None:
        self.data = Path(data).expanduser() if data is not None else None
        n = self.default_images_per_prompt if images_per_prompt is None else images_per_prompt
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"{self.name}: images_per_prompt must be an integer >= 1, got {n!r}")
        if self.max_images_per_prompt is not None and n > self.max_images_per_prompt:
            raise ValueError(
                f"{self.name}: its scorer reads at most {self.max_images_per_prompt} image(s) per prompt, got "
                f"images_per_prompt={n}"
            )
        if grid_prompts < 0:
            raise ValueError(f"grid_prompts must be >= 0, got {grid_prompts}")
        self.images_per_prompt = n
        self.scores = Path(scores).expanduser() if scores is not None else None
        self.restart = bool(restart)
        self.grid_prompts = grid_prompts
        self._prompts: list[GenPrompt] | None = None

    # ---------------------------------------------------------------------------------- benchmark hooks

    @abstractmethod
    def load_prompts(self, data: Path) -> list[GenPrompt]:
        """Every prompt of the benchmark's released files at ``data`` (the --data argument), in order.

        A file that is not in the released format is a ValueError naming the file and line."""

    @abstractmethod
    def image_files(self, prompts: Sequence[GenPrompt], images_per_prompt: int) -> list[ImageFile]:
        """The files the scorer reads for ``prompts`` (all of them, in drawing order)."""

    @abstractmethod
    def check_layout(
        self,
        images_dir: Path,
        prompts: Sequence[GenPrompt] | None = None,
        images_per_prompt: int | None = None,
        *,
        partial: bool = False,
    ) -> list[str]:
        """Every way ``images_dir`` differs from what the scorer reads ([] when it is exactly that).

        With ``prompts`` the files must be those of these prompts (else only their form is checked); with
        ``images_per_prompt`` each prompt must have that many; ``partial`` allows prompts with no image at all
        (a ``--limit`` run) but not half-drawn ones."""

    @abstractmethod
    def default_scores(self, output_dir: Path) -> Path | None:
        """Where the scorer's results are when run with the documented command, if they are there."""

    @abstractmethod
    def read_scores(self, path: Path, prompts: Sequence[GenPrompt]) -> dict[str, Any]:
        """The scorer's results summarised as the benchmark reports them; holds :attr:`headline` (or None)."""

    @abstractmethod
    def scorer_commands(self, output_dir: Path) -> list[str]:
        """The shell commands that score ``output_dir``'s images with the official tool."""

    def prepare(self, images_dir: Path, prompts: Sequence[GenPrompt]) -> None:
        """Write the per-prompt files the scorer reads besides the images (GenEval's metadata)."""

    def compose(self, images: Sequence[Image.Image]) -> Image.Image:
        """The file holding one :class:`ImageFile`'s draws (default: its one image)."""
        if len(images) != 1:
            raise ValueError(f"{self.name} writes one image per file, got {len(images)}")
        return images[0]

    def select(self, prompts: Sequence[GenPrompt], limit: int | None) -> list[GenPrompt]:
        """The prompts ``--limit`` keeps: the first ``limit`` (benchmarks with categories: of each)."""
        return list(prompts if limit is None else prompts[:limit])

    # ------------------------------------------------------------------------------------------ the run

    def prompts(self) -> list[GenPrompt]:
        """The benchmark's prompts from --data (read once)."""
        if self._prompts is None:
            if self.data is None:
                raise FileNotFoundError(
                    f"{self.name} reads its released prompts: pass --data PATH ({self.files})"
                )
            if not self.data.exists():
                raise FileNotFoundError(f"{self.name}: --data {self.data} does not exist ({self.files})")
            prompts = self.load_prompts(self.data)
            if not prompts:
                raise ValueError(f"{self.name}: {self.data} holds no prompts ({self.files})")
            ids = [p.id for p in prompts]
            if len(set(ids)) != len(ids):
                raise ValueError(f"{self.name}: {self.data} holds a prompt id twice")
            self._prompts = prompts
        return self._prompts

    def check(self, config: Config) -> None:
        """The prompts must read, and a --scores file exist, before any model is loaded."""
        self.prompts()
        if self.scores is not None and not self.scores.exists():
            raise FileNotFoundError(f"{self.name}: --scores {self.scores} does not exist")

    def settings(self, generation: GenerationConfig, model_name: str, batch_size: int) -> dict[str, Any]:
        """What a run draws with (written to generation_settings.json and the results)."""
        return {
            # resolved: the same export named by another path is the same model
            "model": str(Path(model_name).resolve()) if model_name else "",
            "cfg_scale": generation.cfg_scale,
            "image_top_k": generation.image_top_k,
            "temperature": generation.temperature,
            "top_p": generation.top_p,
            "image_size": generation.image_size,
            "images_per_prompt": self.images_per_prompt,
            "seed": generation.seed,
            "jacobi_window": generation.jacobi_window,
            "batch_size": batch_size,
        }

    def _write_outputs(
        self,
        result: dict[str, Any],
        output_dir: Path,
        images_dir: Path,
        prompts: Sequence[GenPrompt],
        files: Sequence[ImageFile],
    ) -> None:
        """The sample grid, ``<task>.json`` and ``<task>.md``; records their paths in ``result["files"]``."""
        paths = {
            "json": output_dir / f"{self.name}.json",
            "markdown": output_dir / f"{self.name}.md",
            "images": images_dir,
        }
        grid = self._grid(images_dir, prompts, files)
        if grid is not None:
            paths["grid"] = output_dir / f"{self.name}_samples.png"
            with io.atomic_path(paths["grid"]) as tmp:
                grid.save(tmp, format="PNG")
        result["files"] = {label: str(path) for label, path in paths.items()}
        io.write_json(paths["json"], result)
        io.write_text(paths["markdown"], self.format_table(result))

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
        """Draw the missing images, check the layout, summarise the scorer's results when present."""
        check_limit(limit, batch_size)
        self.check(config)
        output_dir = Path(output_dir)
        images_dir = output_dir / IMAGES_DIR
        settings = self.settings(config.generation, model_name, batch_size)
        self._claim(output_dir, images_dir, settings)
        all_prompts = self.prompts()
        prompts = self.select(all_prompts, limit)
        files = self.image_files(prompts, self.images_per_prompt)
        # Temporary files of a killed run would be read by the scorers (they list whole folders).
        if images_dir.is_dir():
            for directory in [images_dir, *(p for p in images_dir.rglob("*") if p.is_dir())]:
                io.remove_stale_temporaries(directory)
        self.prepare(images_dir, prompts)
        missing = [j for j, f in enumerate(files) if not (images_dir / f.path).is_file()]
        start = time.perf_counter()
        drawn = self._draw(
            solver, config.generation, prompts, files, missing, images_dir, batch_size, progress
        )
        seconds = time.perf_counter() - start
        problems = self.check_layout(
            images_dir, all_prompts, self.images_per_prompt, partial=limit is not None
        )
        result: dict[str, Any] = {
            "task": self.name,
            "model": model_name,
            "data": str(self.data),
            "limit": limit,
            "settings": settings,
            "prompts": len(prompts),
            "prompts_in_data": len(all_prompts),
            "files": {},
            "image_files": len(files),
            "images": sum(f.draws for f in files),
            "written": len(missing),
            "reused": len(files) - len(missing),
            "drawn": drawn,
            "seconds": round(seconds, 3),
            "images_dir": str(images_dir),
            "layout": {"ok": not problems, "problems": problems},
            "scorer": {"name": self.scorer, "commands": self.scorer_commands(output_dir)},
            "records": [
                {
                    "id": p.id,
                    "prompt": p.text,
                    **({"category": p.category} if p.category else {}),
                    "files": paths,
                }
                for p, paths in zip(prompts, self._paths_by_prompt(prompts, files), strict=True)
            ],
        }
        result.update(self._scores(output_dir, images_dir, all_prompts))
        self._write_outputs(result, output_dir, images_dir, prompts, files)
        if problems:
            print(f"warning: {self.name}: the image folder is not what the scorer reads:", file=sys.stderr)
            for problem in problems[:20]:
                print(f"  {problem}", file=sys.stderr)
        return result

    @staticmethod
    def _paths_by_prompt(prompts: Sequence[GenPrompt], files: Sequence[ImageFile]) -> list[list[str]]:
        paths: list[list[str]] = [[] for _ in prompts]
        for f in files:
            paths[f.prompt].append(f.path)
        return paths

    def _claim(self, output_dir: Path, images_dir: Path, settings: dict[str, Any]) -> None:
        """--restart discards the images; otherwise images drawn with other settings are refused by name."""
        record = output_dir / SETTINGS_FILE
        if self.restart:
            shutil.rmtree(images_dir, ignore_errors=True)
            record.unlink(missing_ok=True)
        previous = io.read_json(record) if record.is_file() else None
        has_images = images_dir.is_dir() and any(images_dir.iterdir())
        if has_images and isinstance(previous, dict):
            changed = [k for k in DRAW_SETTINGS if k in previous and previous[k] != settings[k]]
            if changed:
                what = ", ".join(f"{k} {previous[k]!r} -> {settings[k]!r}" for k in changed)
                raise ValueError(
                    f"{self.name}: {images_dir} holds images drawn with other settings ({what}); pass --restart "
                    "to discard them, or another --output"
                )
        output_dir.mkdir(parents=True, exist_ok=True)
        io.write_json(record, settings)

    def _draw(
        self,
        solver: Solver,
        generation: GenerationConfig,
        prompts: Sequence[GenPrompt],
        files: Sequence[ImageFile],
        missing: Sequence[int],
        images_dir: Path,
        batch_size: int,
        progress: bool,
    ) -> int:
        """Draw the solver calls that hold a draw of a missing file, write those files; returns draws made."""
        if not missing:
            return 0
        # Draw i of the run is the i-th of all draws in file order; the call holding it starts at a multiple
        # of batch_size, so which images a call draws does not depend on what is already on disk.
        first = [0]
        for f in files:
            first.append(first[-1] + f.draws)
        owner: dict[int, tuple[int, int]] = {}
        for j in missing:
            for t in range(files[j].draws):
                owner[first[j] + t] = (j, t)
        calls = sorted({i // batch_size for i in owner})
        texts = [prompts[f.prompt].text for f in files for _ in range(f.draws)]
        pending: dict[int, list[Image.Image | None]] = {}
        drawn = 0
        total = sum(files[j].draws for j in missing)
        with progress_bar(total=total, desc=self.name, unit="img", disable=not progress) as bar:
            for call in calls:
                lo, hi = call * batch_size, min((call + 1) * batch_size, len(texts))
                images = solver.generate_img(
                    texts[lo:hi],
                    cfg=generation.cfg_scale,
                    image_top_k=generation.image_top_k,
                    size=generation.image_size,
                    seed=generation.seed + lo,
                    jacobi_window=generation.jacobi_window,
                )
                if len(images) != hi - lo:
                    raise RuntimeError(f"the solver drew {len(images)} images for {hi - lo} prompts")
                drawn += len(images)
                for i, image in zip(range(lo, hi), images, strict=True):
                    if i not in owner:
                        continue
                    j, t = owner[i]
                    slots = pending.setdefault(j, [None] * files[j].draws)
                    slots[t] = image
                    if all(s is not None for s in slots):
                        self._write(
                            self.compose([s for s in slots if s is not None]), images_dir / files[j].path
                        )
                        del pending[j]
                        bar.update(files[j].draws)
        return drawn

    def _write(self, image: Image.Image, path: Path) -> None:
        """One scorer input file, atomically (a killed run never leaves half an image under the real name)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        options: dict[str, Any] = {"quality": 95} if self.image_format == "JPEG" else {}
        with io.atomic_path(path) as tmp:
            image.convert("RGB").save(tmp, format=self.image_format, **options)

    def _scores(self, output_dir: Path, images_dir: Path, prompts: Sequence[GenPrompt]) -> dict[str, Any]:
        """The scorer's summary when its results are given or at their default place; else a note."""
        path = self.scores if self.scores is not None else self.default_scores(output_dir)
        if path is None or not path.exists():
            return {"headline": self._headline(None), "scores": None, "scores_file": None}
        summary = self.read_scores(path, prompts)
        if "stale" not in summary:
            # Results older than the newest image were computed on other images (a rerun drew some again).
            newest = max(
                (p.stat().st_mtime for p in images_dir.rglob("*") if p.suffix in (".png", ".jpeg")),
                default=0.0,
            )
            summary["stale"] = path.stat().st_mtime < newest
        return {
            "headline": self._headline(summary.get(self.headline)),
            "scores": summary,
            "scores_file": str(path),
        }

    def _headline(self, value: float | None) -> dict[str, Any]:
        return {"metric": self.headline, "value": value, "scale": self.headline_scale}

    # ---------------------------------------------------------------------------------------- the grid

    def _grid(
        self, images_dir: Path, prompts: Sequence[GenPrompt], files: Sequence[ImageFile]
    ) -> Image.Image | None:
        """The first :attr:`grid_prompts` prompts, one row each: the prompt, then up to 4 of its files."""
        shown = prompts[: self.grid_prompts]
        rows = [
            (prompt.text, [images_dir / p for p in paths[:GRID_COLUMNS] if (images_dir / p).is_file()])
            for prompt, paths in zip(shown, self._paths_by_prompt(prompts, files), strict=False)
        ]
        if not rows:
            return None
        return sample_grid(rows)

    # ------------------------------------------------------------------------------------------ tables

    def format_table(self, result: dict[str, Any]) -> str:
        """Settings and counts, the layout check, the scorer's summary (or how to get it) and its commands."""
        model = f" — `{result['model']}`" if result.get("model") else ""
        s = result["settings"]
        out = [
            f"## {self.name}{model}\n\n",
            f"{result['prompts']} of {result['prompts_in_data']} prompts, {s['images_per_prompt']} image(s) each: "
            f"{result['image_files']} file(s) in `{result['images_dir']}` ({result['written']} written now, "
            f"{result['reused']} already there; {result['drawn']} draws in {result['seconds']:.1f} s)\n\n",
            markdown_table(
                ("cfg", "top-k", "temperature", "top-p", "size", "seed", "batch", "jacobi"),
                [
                    (
                        s["cfg_scale"],
                        s["image_top_k"],
                        s["temperature"],
                        s["top_p"],
                        s["image_size"],
                        s["seed"],
                        s["batch_size"],
                        s["jacobi_window"],
                    )
                ],
            ),
        ]
        layout = result["layout"]
        if layout["ok"]:
            out.append(f"\nLayout: OK, exactly the input of {self.scorer}.\n")
        else:
            out.append(f"\nLayout: **{len(layout['problems'])} problem(s)** for {self.scorer}:\n\n")
            out += [f"- {p}\n" for p in layout["problems"][:20]]
        scores = result.get("scores")
        if scores:
            stale = " (**older than some images: rerun the scorer**)" if scores.get("stale") else ""
            out.append(f"\nScores from `{result['scores_file']}`{stale}\n\n")
            out.append(self.format_scores(scores))
        else:
            out.append(
                f"\nNo results of {self.scorer} found: run the commands below, then this command again (or pass "
                "--scores FILE).\n"
            )
        out.append("\nScorer:\n\n```bash\n" + "\n".join(result["scorer"]["commands"]) + "\n```\n")
        return "".join(out)

    @abstractmethod
    def format_scores(self, scores: dict[str, Any]) -> str:
        """:meth:`read_scores`' summary as markdown tables."""


# ------------------------------------------------------------------------------------------------ the grid


def _fit(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int, lines: int) -> list[str]:
    """``text`` in at most ``lines`` lines of ``width`` pixels, the last cut with "..." when it is longer."""
    out: list[str] = []
    words = text.split()
    while words and len(out) < lines:
        line = words.pop(0)
        while words and draw.textlength(f"{line} {words[0]}", font=font) <= width:
            line = f"{line} {words.pop(0)}"
        out.append(line)
    if words or (out and draw.textlength(out[-1], font=font) > width):
        last = out[-1]
        while last and draw.textlength(last + " ...", font=font) > width:
            last = last[:-1]
        out[-1] = last + " ..."
    return out


def sample_grid(rows: Sequence[tuple[str, Sequence[Path]]]) -> Image.Image:
    """One row per prompt: its text over its images (each scaled to a ``TILE`` square); a missing image is
    left blank. The grid is ``GRID_COLUMNS * (TILE + PAD) + PAD`` pixels wide."""
    width = GRID_COLUMNS * (TILE + PAD) + PAD
    row_height = CAPTION_LINES * LINE_HEIGHT + TILE + 2 * PAD
    grid = Image.new("RGB", (width, len(rows) * row_height), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for r, (text, paths) in enumerate(rows):
        y = r * row_height + PAD
        for k, line in enumerate(_fit(draw, text, font, width - 2 * PAD, CAPTION_LINES)):
            draw.text((PAD, y + k * LINE_HEIGHT), line, fill=(0, 0, 0), font=font)
        for c, path in enumerate(paths[:GRID_COLUMNS]):
            with Image.open(path) as image:
                # Small generated images are enlarged without blurring their pixels.
                resample = Image.Resampling.NEAREST if image.width <= TILE else Image.Resampling.BOX
                tile = image.convert("RGB").resize((TILE, TILE), resample)
            x0, y0 = PAD + c * (TILE + PAD), y + CAPTION_LINES * LINE_HEIGHT
            grid.paste(tile, (x0, y0))
            # a thin frame: generated images on white backgrounds would run into each other
            draw.rectangle((x0 - 1, y0 - 1, x0 + TILE, y0 + TILE), outline=(180, 180, 180))
    return grid


# ------------------------------------------------------------------------------------ the layout checker


def find_images_dir(path: Path) -> Path:
    """The image folder of a run: ``path/images`` when ``path`` is a run's output directory, else ``path``."""
    return path / IMAGES_DIR if (path / IMAGES_DIR).is_dir() and (path / SETTINGS_FILE).is_file() else path


def check_layout(
    task_name: str,
    path: str | os.PathLike[str],
    *,
    data: str | os.PathLike[str] | None = None,
    images_per_prompt: int | None = None,
    partial: bool = False,
) -> list[str]:
    """The problems of a generation benchmark's image folder (``path``: the run's output directory or its image
    folder): [] when it is exactly what the benchmark's scorer reads. With ``data`` (the released prompts) the
    files must be those of its prompts; ``images_per_prompt`` fixes how many each prompt has."""
    # The registry's classes derive from this module as imported, not from a copy run as __main__.
    from unified_mllm.eval import generation_bench
    from unified_mllm.eval.tasks import get_task

    task = get_task(task_name, data=data) if data is not None else get_task(task_name)
    if not isinstance(task, generation_bench.GenerationTask):
        raise ValueError(f"{task_name} is not a generation benchmark")
    images_dir = find_images_dir(Path(path).expanduser())
    if not images_dir.is_dir():
        return [f"{images_dir} is not a folder"]
    prompts = task.prompts() if data is not None else None
    return task.check_layout(images_dir, prompts, images_per_prompt, partial=partial)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m unified_mllm.eval.generation_bench check TASK OUTPUT [--data P] [--images-per-prompt N]``."""
    parser = argparse.ArgumentParser(
        prog="python -m unified_mllm.eval.generation_bench",
        description="Check that a generation benchmark's image folder is exactly what its scorer reads.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="check an image folder's layout")
    check.add_argument("task", help="geneval, t2i-compbench, dpg-bench or genai-bench")
    check.add_argument("path", help="the run's output directory (or its images/ folder)")
    check.add_argument(
        "--data", help="the benchmark's released prompts: the files must be those of its prompts"
    )
    check.add_argument("--images-per-prompt", type=int, help="how many images each prompt must have")
    check.add_argument("--partial", action="store_true", help="allow prompts with no image (a --limit run)")
    add_debug_argument(check)
    args = parser.parse_args(argv)
    # exit code 1 like a layout with problems (both: not usable as is); the error line tells them apart
    with one_line_errors((ValueError,), debug=args.debug):
        problems = check_layout(
            args.task,
            args.path,
            data=args.data,
            images_per_prompt=args.images_per_prompt,
            partial=args.partial,
        )
    for problem in problems:
        print(problem)
    print(f"{args.task}: {'OK' if not problems else f'{len(problems)} problem(s)'}: {args.path}")
    return 1 if problems else 0


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file, one a line (blank lines skipped); a bad line is a ValueError naming it."""
    records = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not a JSON line ({exc.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object")
            records.append(record)
    return records


if __name__ == "__main__":
    sys.exit(main())
