"""ShapesBench: the embedded benchmark on the synthetic shapes world, understanding and generation.

    python -m unified_mllm.eval --task shapesbench --model EXPORT_DIR [--split val] [--limit N] [--batch-size B] \
        [key=value ...]

**Splits.** The benchmark is the world's test split (the default). ``split="val"`` (``--split val``) measures
the same way on the validation split and an independent set of generation prompts, sampled with seeds
``VAL_SEED_OFFSET`` above test's: what settings are chosen on (:mod:`unified_mllm.eval.sweep`), so that the
test figures stay unseen until the choice is made.

**Understanding.** Every question of the first ``limit`` scenes (all by default) of the world's split
(``data.root/<split>``, written by ``python -m unified_mllm.data.shapes``) is asked on its own, as
``"<|image|>" + question`` with the scene's image, decoded with the config's ``generation.text_temperature``
(0, the default, is greedy) and ``text_top_k``, at most ``max_answer_tokens`` tokens.
Reported (:mod:`unified_mllm.eval.metrics`): exact-match accuracy after normalisation per question type
(color, shape, size, count, existence, spatial) and overall, and POPE's yes/no figures (accuracy, precision,
recall, F1, yes-ratio) on the existence questions, which the world balances (every "yes" question about a
present object has a "no" twin about an absent one, adversarial when it can be).

**Generation.** ``num_prompts`` GenEval-style prompts (``limit`` caps them too) from
:func:`unified_mllm.data.shapes.geneval_prompts` — the six GenEval categories in turn — are drawn with the
config's ``generation`` settings (``cfg_scale``, ``image_top_k``, ``temperature``, ``image_size``, ``seed``,
``jacobi_window``: the export's recorded defaults, or overrides on the command line; the results record them), and the programmatic judge (:func:`unified_mllm.eval.judge.score`) scores each image
against its prompt's spec with GenEval's rules — except that an image the judge reads as more objects than
the grid has cells is wrong (:func:`judge_image`: GenEval's rules only ask for the prompt's objects, and the
judge reads noise as a dozen blobs of every kind). Reported: accuracy per category and overall (GenEval's:
the mean of the categories), the mean number of objects read per image and how many were cluttered. The
batch starting at prompt ``i`` is sampled with seed ``generation.seed + i``, so a run is reproducible for a
given batch size.

**Files** under the output directory: ``shapesbench.json`` (every number, the settings and one record per
question — question, answer, prediction — and per prompt — prompt, verdict, the judge's reading),
``shapesbench.md`` (the tables), ``shapesbench_samples.png`` (the first ``grid_samples`` generated images,
one category per column, framed green when the judge accepts them, red when not, with their prompts written
under them) and ``images/`` (every generated image).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from unified_mllm import io
from unified_mllm.config import Config, GenerationConfig, WorldConfig
from unified_mllm.data.shapes import CATEGORIES, check_world, geneval_prompts
from unified_mllm.data.shards import iter_samples
from unified_mllm.eval.judge import JudgeResult, score
from unified_mllm.eval.metrics import answers_match, geneval_scores, pope_metrics, vqa_accuracy
from unified_mllm.eval.tasks import (
    Solver,
    Task,
    batched,
    check_limit,
    markdown_table,
    percent,
    register_task,
)
from unified_mllm.layout import IMAGE_PLACEHOLDER
from unified_mllm.progress import progress as progress_bar

PARTS = ("understanding", "generation")
SPLITS = ("val", "test")  # the world's evaluation splits (train is what the model saw)
# Added to generation.seed on val: the small prompt space repeats some test prompts in the val set, and the
# same prompt at the same index with the same seed would draw the test image again.
VAL_SEED_OFFSET = 1_000_000
DEFAULT_PROMPTS = 600  # 100 per GenEval category (GenEval itself has 553 prompts)
MAX_ANSWER_TOKENS = 16  # the world's answers are single words; this bounds a rambling model's cost
# The sample grid: fixed tile and caption sizes, so its pixel size depends only on the number of samples.
GRID_SAMPLES = 24
GRID_COLUMNS = len(CATEGORIES)
TILE = 128  # generated images are shown at this side
FRAME = 3  # green / red border: the judge's verdict
PAD = 4
LINE_HEIGHT = 12
CAPTION_LINES = 4  # the prompt wrapped to three lines, then the judge's verdict
CELL_WIDTH = TILE + 2 * PAD
CELL_HEIGHT = TILE + 2 * PAD + CAPTION_LINES * LINE_HEIGHT + PAD
JSON_FILE = "shapesbench.json"
MARKDOWN_FILE = "shapesbench.md"
GRID_FILE = "shapesbench_samples.png"
IMAGES_DIR = "images"


@dataclass(frozen=True)
class Question:
    """One VQA question of a test scene."""

    key: str
    image: Image.Image
    question: str
    answer: str
    type: str


def split_dir(config: Config, split: str = "test") -> Path:
    return Path(config.data.root).expanduser() / split


def load_questions(split_dir: Path, limit: int | None) -> tuple[list[Question], int]:
    """The questions of the first ``limit`` scenes of a split (every scene when None) and the scene count."""
    questions, scenes = [], 0
    for sample in itertools.islice(iter_samples(split_dir), limit):
        scenes += 1
        for qa in sample.meta.get("vqa", []):
            questions.append(
                Question(sample.key, sample.image.convert("RGB"), qa["question"], qa["answer"], qa["type"])
            )
    return questions, scenes


def evaluate_understanding(
    solver: Solver,
    questions: Sequence[Question],
    *,
    batch_size: int,
    seed: int = 0,
    max_answer_tokens: int = MAX_ANSWER_TOKENS,
    temperature: float = 0.0,
    top_k: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Ask every question (one conversation per row, ``batch_size`` rows per call) and score the answers.

    ``temperature`` 0 decodes greedily; ``top_k`` applies only when sampling."""
    predictions: list[str] = []
    start = time.perf_counter()
    steps = math.ceil(len(questions) / batch_size)
    for batch in progress_bar(batched(questions, batch_size), total=steps, desc="VQA", disable=not progress):
        answers = solver.generate(
            [[q.image] for q in batch],
            [[[IMAGE_PLACEHOLDER + q.question, None]] for q in batch],
            max_gen_len=max_answer_tokens,
            temperature=temperature,
            top_k=top_k,
            seed=seed,
        )
        if len(answers) != len(batch):
            raise RuntimeError(f"the solver answered {len(answers)} of {len(batch)} questions")
        predictions.extend(answers)
    seconds = time.perf_counter() - start
    result = vqa_accuracy([q.type for q in questions], [q.answer for q in questions], predictions)
    existence = [i for i, q in enumerate(questions) if q.type == "existence"]
    result["pope"] = pope_metrics(
        [questions[i].answer for i in existence], [predictions[i] for i in existence]
    )
    result["seconds"] = round(seconds, 3)
    result["settings"] = {"temperature": temperature, "top_k": top_k, "max_answer_tokens": max_answer_tokens}
    result["records"] = [
        {
            "key": q.key,
            "type": q.type,
            "question": q.question,
            "answer": q.answer,
            "prediction": p,
            "correct": answers_match(p, q.answer),
        }
        for q, p in zip(questions, predictions, strict=True)
    ]
    return result


def judge_image(image: Image.Image, spec: dict[str, Any], world: WorldConfig) -> JudgeResult:
    """The judge's GenEval verdict, except that an image read as more objects than the grid has cells is wrong.

    GenEval's rules only ask that the prompt's objects be present, and the judge reads noise (an untrained
    model's output) as a dozen blobs of every shape and colour, which would pass most single- and two-object
    prompts. No scene of the world holds more than one object per cell, so such a reading is not a scene.
    """
    verdict = score(image, spec, world)
    cells = world.grid_size**2
    if len(verdict.objects) <= cells:
        return verdict
    reason = (
        f"not a scene of the world: the judge reads {len(verdict.objects)} objects, the "
        f"{world.grid_size}x{world.grid_size} grid holds at most {cells}"
    )
    return JudgeResult(correct=False, reason=reason, objects=verdict.objects)


def evaluate_generation(
    solver: Solver,
    prompts: Sequence[dict[str, Any]],
    world: WorldConfig,
    generation: GenerationConfig,
    *,
    batch_size: int,
    progress: bool = True,
) -> tuple[dict[str, Any], list[Image.Image]]:
    """Draw every prompt (``batch_size`` per call), judge each image; returns (scores + records, images)."""
    images: list[Image.Image] = []
    start = time.perf_counter()
    steps = math.ceil(len(prompts) / batch_size)
    for i, batch in enumerate(
        progress_bar(batched(prompts, batch_size), total=steps, desc="T2I", disable=not progress)
    ):
        drawn = solver.generate_img(
            [p["prompt"] for p in batch],
            cfg=generation.cfg_scale,
            image_top_k=generation.image_top_k,
            temperature=generation.temperature,
            size=generation.image_size,
            seed=generation.seed + i * batch_size,
            jacobi_window=generation.jacobi_window,
        )
        if len(drawn) != len(batch):
            raise RuntimeError(f"the solver drew {len(drawn)} images for {len(batch)} prompts")
        images.extend(drawn)
    seconds = time.perf_counter() - start
    verdicts = [judge_image(image, p["spec"], world) for image, p in zip(images, prompts, strict=True)]
    result = geneval_scores([p["category"] for p in prompts], [v.correct for v in verdicts])
    result["cluttered"] = sum(len(v.objects) > world.grid_size**2 for v in verdicts)
    result["mean_objects_read"] = sum(len(v.objects) for v in verdicts) / len(verdicts)
    result["seconds"] = round(seconds, 3)
    settings = ("cfg_scale", "image_top_k", "temperature", "image_size", "seed", "jacobi_window")
    result["settings"] = {name: getattr(generation, name) for name in settings}
    result["records"] = [
        {
            "index": i,
            "category": p["category"],
            "prompt": p["prompt"],
            "spec": p["spec"],
            "correct": v.correct,
            "reason": v.reason,
            # the judge's reading, one phrase per object: 'large red circle at row 0, col 2'
            "judge_read": [f"{o.size} {o.color} {o.shape} at row {o.row}, col {o.col}" for o in v.objects],
            "image": f"{IMAGES_DIR}/{i:05d}.png",
        }
        for i, (p, v) in enumerate(zip(prompts, verdicts, strict=True))
    ]
    return result, images


# ------------------------------------------------------------------------------------------- the grid


def grid_shape(n: int, columns: int = GRID_COLUMNS) -> tuple[int, int]:
    """(columns, rows) of a grid of ``n`` >= 1 samples."""
    columns = max(1, min(columns, n))
    return columns, math.ceil(n / columns)


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int, lines: int) -> list[str]:
    """``text`` broken into at most ``lines`` lines that fit ``width`` pixels (" ..." marks a cut)."""

    def fits(line: str) -> bool:
        return draw.textlength(line, font=font) <= width

    out: list[str] = []
    for word in text.split():
        if out and fits(f"{out[-1]} {word}"):
            out[-1] = f"{out[-1]} {word}"
            continue
        while word:  # a word wider than the tile is cut rather than drawn into the neighbouring tile
            piece = word
            while len(piece) > 1 and not fits(piece):
                piece = piece[:-1]
            out.append(piece)
            word = word[len(piece) :]
    if len(out) > lines:
        last = out[lines - 1]
        while last and not fits(last + " ..."):
            last = last[:-1]
        out = [*out[: lines - 1], last + " ..."]
    return out


def sample_grid(
    images: Sequence[Image.Image], captions: Sequence[str], verdicts: Sequence[bool]
) -> Image.Image:
    """Images in a grid of :data:`GRID_COLUMNS` columns, each framed by its verdict, its caption under it.

    The grid is ``columns * CELL_WIDTH`` x ``rows * CELL_HEIGHT`` pixels (see :func:`grid_shape`).
    """
    if not images or not len(images) == len(captions) == len(verdicts):
        raise ValueError(
            f"need >= 1 aligned images, captions, verdicts, got {len(images)}, {len(captions)}, {len(verdicts)}"
        )
    columns, rows = grid_shape(len(images))
    grid = Image.new("RGB", (columns * CELL_WIDTH, rows * CELL_HEIGHT), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for i, (image, caption, ok) in enumerate(zip(images, captions, verdicts, strict=True)):
        x, y = (i % columns) * CELL_WIDTH + PAD, (i // columns) * CELL_HEIGHT + PAD
        color = (30, 160, 60) if ok else (220, 30, 30)
        draw.rectangle((x, y, x + TILE - 1, y + TILE - 1), fill=color)
        inner = TILE - 2 * FRAME
        # Small generated images are enlarged without blurring their pixels; large ones are box-filtered.
        resample = Image.Resampling.NEAREST if image.width <= inner else Image.Resampling.BOX
        grid.paste(image.convert("RGB").resize((inner, inner), resample), (x + FRAME, y + FRAME))
        lines = _wrap(draw, caption, font, TILE, CAPTION_LINES - 1)
        for k, line in enumerate(lines):
            draw.text((x, y + TILE + PAD + k * LINE_HEIGHT), line, fill=(0, 0, 0), font=font)
        verdict = "judge: " + ("ok" if ok else "wrong")
        draw.text((x, y + TILE + PAD + len(lines) * LINE_HEIGHT), verdict, fill=color, font=font)
    return grid


# ------------------------------------------------------------------------------------------- the task


def _accuracy_table(label: str, groups: dict[str, Any], overall: str, totals: dict[str, Any]) -> str:
    """Accuracy and correct/total per group, then the ``overall`` row."""
    rows = [(name, percent(g["accuracy"]), f"{g['correct']}/{g['total']}") for name, g in groups.items()]
    rows.append((overall, f"**{percent(totals['overall'])}**", f"{totals['correct']}/{totals['total']}"))
    return markdown_table((label, "accuracy", "correct"), rows)


@register_task
class ShapesBench(Task):
    """The embedded benchmark (see the module docstring)."""

    name = "shapesbench"
    description = "VQA accuracy + POPE-style F1 and GenEval-style accuracy on the synthetic shapes world"

    def __init__(
        self,
        num_prompts: int = DEFAULT_PROMPTS,
        prompt_seed: int = 0,
        grid_samples: int = GRID_SAMPLES,
        parts: Sequence[str] = PARTS,
        max_answer_tokens: int = MAX_ANSWER_TOKENS,
        split: str = "test",
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"ShapesBench runs on the world's {' or '.join(SPLITS)} split, got {split!r}")
        unknown = sorted(set(parts) - set(PARTS))
        if unknown or not parts:
            raise ValueError(
                f"ShapesBench parts must be a non-empty subset of {list(PARTS)}, got {list(parts)}"
            )
        if num_prompts < 1 or grid_samples < 0 or max_answer_tokens < 1:
            raise ValueError(
                "need num_prompts >= 1, grid_samples >= 0 and max_answer_tokens >= 1, got "
                f"{num_prompts}, {grid_samples}, {max_answer_tokens}"
            )
        self.num_prompts = num_prompts
        self.prompt_seed = prompt_seed
        self.grid_samples = grid_samples
        self.parts = tuple(p for p in PARTS if p in parts)
        self.max_answer_tokens = max_answer_tokens
        self.split = split

    def check(self, config: Config) -> None:
        """The world must be valid, and the split present when understanding is measured."""
        world = check_world(config.data.world)
        if "generation" in self.parts and world.grid_size < 2:
            raise ValueError("ShapesBench generation needs data.world.grid_size >= 2 (counting and position)")
        split = split_dir(config, self.split)
        if "understanding" in self.parts and not (split.is_dir() and any(split.glob("*.tar"))):
            raise FileNotFoundError(
                f"ShapesBench reads the world's {self.split} split from {split}, which has no shards (*.tar); "
                f"write it with `python -m unified_mllm.data.shapes --splits {self.split}` and the same config, "
                "or point data.root=... at the world's data"
            )

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
        """Measure the parts, write the files (see the module docstring) and return every number."""
        check_limit(limit, batch_size)
        self.check(config)
        output_dir = Path(output_dir)
        split = split_dir(config, self.split)
        result: dict[str, Any] = {
            "task": self.name,
            "model": model_name,
            "split": self.split,
            "limit": limit,
            "batch_size": batch_size,
        }
        result["world"] = {"seed": config.data.world.seed, "split": str(split)}
        generation = config.generation
        if self.split == "val":
            generation = dataclasses.replace(generation, seed=generation.seed + VAL_SEED_OFFSET)
        if "understanding" in self.parts:
            questions, scenes = load_questions(split, limit)
            if not questions:
                raise ValueError(f"the {self.split} split at {split} holds no VQA questions")
            result["understanding"] = evaluate_understanding(
                solver,
                questions,
                batch_size=batch_size,
                seed=generation.seed,
                max_answer_tokens=self.max_answer_tokens,
                temperature=generation.text_temperature,
                top_k=generation.text_top_k,
                progress=progress,
            )
            result["understanding"]["scenes"] = scenes
        files = {"json": output_dir / JSON_FILE, "markdown": output_dir / MARKDOWN_FILE}
        if "generation" in self.parts:
            count = min(self.num_prompts, limit) if limit is not None else self.num_prompts
            prompts = geneval_prompts(config.data.world, count, seed=self.prompt_seed, split=self.split)
            result["generation"], images = evaluate_generation(
                solver,
                prompts,
                config.data.world,
                generation,
                batch_size=batch_size,
                progress=progress,
            )
            result["generation"]["prompt_seed"] = self.prompt_seed
            files.update(self._write_images(images, result["generation"]["records"], output_dir))
        result["files"] = {label: str(path) for label, path in files.items()}
        output_dir.mkdir(parents=True, exist_ok=True)
        io.write_json(files["json"], result)
        io.write_text(files["markdown"], self.format_table(result))
        return result

    def _write_images(self, images: Sequence[Image.Image], records: Sequence[dict], output_dir: Path) -> dict:
        """Every generated image under images/, and the sample grid; returns the files written."""
        (output_dir / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
        for image, record in zip(images, records, strict=True):
            image.save(output_dir / record["image"])
        files: dict[str, Path] = {"images": output_dir / IMAGES_DIR}
        shown = min(self.grid_samples, len(images))
        if shown:
            grid = sample_grid(
                images[:shown],
                [r["prompt"] for r in records[:shown]],
                [r["correct"] for r in records[:shown]],
            )
            files["grid"] = output_dir / GRID_FILE
            with io.atomic_path(files["grid"]) as tmp:
                grid.save(tmp, format="PNG")
        return files

    def ablated(self) -> ShapesBench:
        """The same benchmark without its generation part (an ablation changes only what the model reads)."""
        return ShapesBench(
            num_prompts=self.num_prompts,
            prompt_seed=self.prompt_seed,
            grid_samples=self.grid_samples,
            parts=("understanding",),
            max_answer_tokens=self.max_answer_tokens,
            split=self.split,
        )

    def understanding_row(self, result: dict[str, Any]) -> dict[str, float | None]:
        """VQA accuracy per question type, overall, and POPE's F1 (the issue-19 ablation table's columns)."""
        vqa = result["understanding"]
        row = {t: g["accuracy"] for t, g in vqa["per_type"].items()}
        return {**row, "overall": vqa["overall"], "pope_f1": vqa["pope"]["f1"]}

    def format_table(self, result: dict[str, Any]) -> str:
        """Understanding, POPE and generation tables in markdown."""
        model = f" — `{result['model']}`" if result.get("model") else ""
        split = result.get("split", "test")
        out = [f"## ShapesBench{model}" + ("" if split == "test" else f" ({split} split)") + "\n"]
        vqa = result.get("understanding")
        if vqa:
            temperature = vqa.get("settings", {}).get("temperature", 0.0)
            decoding = (
                "greedy"
                if not temperature
                else f"temperature {temperature}, top-k {vqa['settings']['top_k']}"
            )
            out.append(
                f"\nUnderstanding: {vqa['total']} questions on {vqa['scenes']} {split} scenes, exact match "
                f"({decoding}; {vqa['seconds']:.1f} s)\n\n"
            )
            out.append(_accuracy_table("question type", vqa["per_type"], "**overall**", vqa))
            pope = vqa["pope"]
            out.append(f"\nPOPE-style yes/no on the {pope['total']} existence questions\n\n")
            header = ("accuracy", "precision", "recall", "F1", "yes-ratio", "unclear answers")
            cells = [percent(pope[k]) for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")]
            out.append(markdown_table(header, [(*cells, pope["unclear"])]))
        gen = result.get("generation")
        if gen:
            settings = gen["settings"]
            out.append(
                f"\nGeneration: {gen['total']} GenEval-style {split} prompts, judged (cfg {settings['cfg_scale']}, "
                f"top-k {settings['image_top_k']}, temperature {settings.get('temperature', 'n/a')}, "
                f"{settings['image_size']} px, seed {settings['seed']}; {gen['seconds']:.1f} s)\n\n"
            )
            out.append(
                _accuracy_table("category", gen["per_category"], "**overall** (mean of categories)", gen)
            )
            out.append(
                f"\n{gen['mean_objects_read']:.2f} objects read per image; {gen['cluttered']} image(s) read as more "
                "objects than the grid has cells (judged wrong: not a scene of the world)\n"
            )
        return "".join(out)
