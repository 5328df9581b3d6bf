"""The benchmark driver and ShapesBench: metrics on hand-made answers, the task with fake solvers, the files."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageDraw, ImageFont

from unified_mllm.config import Config, load_config, save_config
from unified_mllm.data.shapes import (
    CATEGORIES,
    Scene,
    SceneObject,
    geneval_prompts,
    render,
    scene_for_prompt,
    write_split,
)
from unified_mllm.data.shards import iter_samples
from unified_mllm.eval.__main__ import CONFIG_YAML, evaluate, main
from unified_mllm.eval.judge import score
from unified_mllm.eval.metrics import (
    answers_match,
    geneval_scores,
    normalize_answer,
    pope_metrics,
    vqa_accuracy,
    yes_no,
)
from unified_mllm.eval.shapesbench import (
    CAPTION_LINES,
    GRID_FILE,
    JSON_FILE,
    MARKDOWN_FILE,
    TILE,
    VAL_SEED_OFFSET,
    ShapesBench,
    _wrap,
    grid_shape,
    judge_image,
    sample_grid,
)
from unified_mllm.eval.tasks import TASKS, Solver, Task, UnknownTaskError, get_task, register_task, task_names
from unified_mllm.layout import IMAGE_PLACEHOLDER

NUM_TEST = 4
NUM_VAL = 2
NUM_PROMPTS = 12  # two per GenEval category


# --------------------------------------------------------------------------------------------- metrics


@pytest.mark.parametrize(
    ("text", "normal"),
    [
        ("Three.", "3"),
        ("3", "3"),
        ("twenty", "20"),
        ("The Circle!", "circle"),
        ("  YES ", "yes"),
        ("a large red-circle", "large red circle"),
        ("an  object,  above", "object above"),
        ("", ""),
    ],
)
def test_normalize_answer(text: str, normal: str) -> None:
    assert normalize_answer(text) == normal


def test_answers_match_number_words_and_digits() -> None:
    assert answers_match("There are 3", "there are three")
    assert answers_match("Purple.", "purple")
    assert not answers_match("purple circle", "purple")
    assert not answers_match("4", "three")


def test_vqa_accuracy_per_type_and_overall() -> None:
    types = ["color", "color", "count", "existence", "existence", "shape"]
    answers = ["red", "blue", "three", "yes", "no", "circle"]
    predictions = ["Red.", "green", "3", "yes", "No", "square"]
    result = vqa_accuracy(types, answers, predictions)
    assert result["overall"] == 4 / 6
    assert result["correct"] == 4 and result["total"] == 6
    assert list(result["per_type"]) == ["color", "shape", "count", "existence"]  # the world's order
    assert result["per_type"]["color"] == {"accuracy": 0.5, "correct": 1, "total": 2}
    assert result["per_type"]["shape"] == {"accuracy": 0.0, "correct": 0, "total": 1}
    assert result["per_type"]["count"]["accuracy"] == 1.0
    assert result["macro"] == (0.5 + 0.0 + 1.0 + 1.0) / 4
    with pytest.raises(ValueError, match="align"):
        vqa_accuracy(types, answers, predictions[:-1])
    assert vqa_accuracy([], [], [])["overall"] is None


def test_pope_metrics_on_a_small_confusion_table() -> None:
    answers = ["yes"] * 4 + ["no"] * 4
    # yes-truth: three "yes", one "no"  -> tp 3, fn 1; no-truth: "blue" reads as yes (POPE's rule) -> fp 3, tn 1
    predictions = ["Yes.", "yes", "yes, there is", "No", "yes", "YES", "not at all", "blue"]
    pope = pope_metrics(answers, predictions)
    assert (pope["tp"], pope["fp"], pope["tn"], pope["fn"]) == (3, 3, 1, 1)
    assert pope["accuracy"] == 0.5
    assert pope["precision"] == 0.5
    assert pope["recall"] == 0.75
    assert pope["f1"] == pytest.approx(0.6, abs=1e-12)
    assert pope["yes_ratio"] == 0.75
    assert pope["unclear"] == 3  # "yes, there is", "not at all", "blue"
    assert pope["total"] == 8


def test_pope_edge_cases() -> None:
    silent = pope_metrics(["yes", "no"], ["no", "no"])
    assert (silent["precision"], silent["recall"], silent["f1"], silent["accuracy"]) == (0.0, 0.0, 0.0, 0.5)
    assert yes_no("Not really") == "no" and yes_no("") == "yes"
    with pytest.raises(ValueError, match="yes/no ground truth"):
        pope_metrics(["yes", "red"], ["yes", "yes"])


def test_geneval_scores_mean_of_categories() -> None:
    categories = ["single_object", "counting", "single_object", "counting", "counting", "counting"]
    correct = [True, True, True, False, False, False]
    result = geneval_scores(categories, correct)
    assert result["per_category"]["single_object"] == {"accuracy": 1.0, "correct": 2, "total": 2}
    assert result["per_category"]["counting"] == {"accuracy": 0.25, "correct": 1, "total": 4}
    assert result["overall"] == 0.625  # GenEval: mean of the category accuracies
    assert result["micro"] == 0.5


# ---------------------------------------------------------------------------------------- registry


def test_registry_knows_shapesbench_and_names_unknown_tasks() -> None:
    assert "shapesbench" in task_names()
    assert isinstance(get_task("shapesbench"), ShapesBench)
    with pytest.raises(UnknownTaskError, match=r"unknown task 'mmbench'; available tasks: .*shapesbench"):
        get_task("mmbench")


def test_registry_refuses_a_taken_name_and_a_missing_one() -> None:
    class Clash(Task):
        name = "shapesbench"

        def run(self, solver, config, **kwargs):  # type: ignore[no-untyped-def, override]
            return {}

        def format_table(self, result):  # type: ignore[no-untyped-def]
            return ""

    with pytest.raises(ValueError, match="taken"):
        register_task(Clash)
    Clash.name = ""
    with pytest.raises(ValueError, match="non-empty"):
        register_task(Clash)
    assert TASKS["shapesbench"] is ShapesBench


# ------------------------------------------------------------------------------------- fake solvers


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Config:
    """A 4-scene test split and a 2-scene val split of the default world."""
    root = tmp_path_factory.mktemp("shapes")
    config = load_config(
        [],
        [
            f"data.root={root}",
            f"data.world.num_test={NUM_TEST}",
            f"data.world.num_val={NUM_VAL}",
            "data.world.samples_per_shard=3",
        ],
    )
    write_split(config.data.world, root, "test", progress=False)
    write_split(config.data.world, root, "val", progress=False)
    return config


class FakeSolver:
    """Answers from a lookup table (else ``default_answer``) and draws from a function of the prompt.

    Checks the calling convention and records each call's batch size and settings.
    """

    def __init__(self, config: Config, answers: dict, draw: Any, default_answer: str = "yes") -> None:
        self.config = config
        self.answers = answers
        self.draw = draw
        self.default_answer = default_answer
        self.text_calls: list[dict] = []
        self.image_calls: list[dict] = []

    def generate(
        self,
        images: list,
        qas: list,
        max_gen_len: int = 16,
        temperature: float = 0.0,
        top_k: int | None = None,
        seed: int = 0,
    ) -> list[str]:
        assert len(images) == len(qas) and all(len(row) == 1 for row in images)
        out = []
        for row, turns in zip(images, qas, strict=True):
            ((question, answer),) = turns
            assert question.startswith(IMAGE_PLACEHOLDER) and answer is None
            key = (row[0].tobytes(), question.removeprefix(IMAGE_PLACEHOLDER))
            out.append(self.answers.get(key, self.default_answer))
        self.text_calls.append(
            {"rows": len(qas), "max_gen_len": max_gen_len, "temperature": temperature, "top_k": top_k}
        )
        return out

    def generate_img(
        self,
        prompts: list[str],
        *,
        cfg: float | None = None,
        image_top_k: int | None = None,
        temperature: float | None = None,
        size: int | None = None,
        seed: int | None = None,
        jacobi_window: int | None = None,
    ) -> list[Image.Image]:
        self.image_calls.append(
            {"rows": len(prompts), "cfg": cfg, "top_k": image_top_k, "size": size, "seed": seed}
            | {"jacobi_window": jacobi_window, "temperature": temperature}
        )
        return [self.draw(p) for p in prompts]


def oracle(config: Config) -> FakeSolver:
    """Right about everything: ground-truth answers, and the rendered scene of each prompt's spec."""
    answers = {
        (s.image.convert("RGB").tobytes(), qa["question"]): qa["answer"]
        for split in ("test", "val")
        for s in iter_samples(Path(config.data.root) / split)
        for qa in s.meta["vqa"]
    }
    specs = {
        p["prompt"]: p["spec"]
        for split in ("test", "val")
        for p in geneval_prompts(config.data.world, NUM_PROMPTS, split=split)
    }

    def draw(prompt: str) -> Image.Image:
        return render(scene_for_prompt(specs[prompt], 0, config.data.world))

    return FakeSolver(config, answers, draw)


def blank(config: Config) -> FakeSolver:
    """Says "yes" to everything and draws empty white images."""
    size = config.data.world.image_size
    return FakeSolver(config, {}, lambda prompt: Image.new("RGB", (size, size), "white"))


def ground_truth(config: Config) -> list[dict[str, str]]:
    return [qa for s in iter_samples(Path(config.data.root) / "test") for qa in s.meta["vqa"]]


# ------------------------------------------------------------------------------------------ the task


def run_bench(solver: Solver, config: Config, out: Path, batch_size: int = 5, **options: Any) -> dict:
    task = ShapesBench(num_prompts=NUM_PROMPTS, **options)
    return task.run(solver, config, limit=None, batch_size=batch_size, output_dir=out, progress=False)


def test_oracle_solver_scores_everything(world: Config, tmp_path: Path) -> None:
    solver = oracle(world)
    result = run_bench(solver, world, tmp_path)
    vqa, gen = result["understanding"], result["generation"]
    assert vqa["scenes"] == NUM_TEST and vqa["total"] == len(ground_truth(world))
    assert vqa["overall"] == 1.0 and all(t["accuracy"] == 1.0 for t in vqa["per_type"].values())
    assert vqa["pope"]["f1"] == 1.0 and vqa["pope"]["yes_ratio"] == 0.5  # the world balances yes and no
    assert gen["overall"] == 1.0 and gen["total"] == NUM_PROMPTS
    assert gen["cluttered"] == 0 and gen["mean_objects_read"] > 1.0
    assert list(gen["per_category"]) == list(CATEGORIES)
    assert all(c == {"accuracy": 1.0, "correct": 2, "total": 2} for c in gen["per_category"].values())
    # Batches of 5 rows; generation settings come from the config; seeds step by the batch's first index.
    assert [c["rows"] for c in solver.image_calls] == [5, 5, 2]
    g = world.generation
    assert solver.image_calls[1] == {
        "rows": 5,
        "cfg": g.cfg_scale,
        "top_k": g.image_top_k,
        "size": g.image_size,
        "seed": g.seed + 5,
        "jacobi_window": g.jacobi_window,
        "temperature": g.temperature,
    }
    assert all(c["temperature"] == 0.0 and c["max_gen_len"] == 16 for c in solver.text_calls)
    assert sum(c["rows"] for c in solver.text_calls) == vqa["total"]


def test_blank_solver_scores_nothing_and_yes_everywhere(world: Config, tmp_path: Path) -> None:
    result = run_bench(blank(world), world, tmp_path, batch_size=64)
    gen = result["generation"]
    assert gen["overall"] == 0.0 and gen["micro"] == 0.0
    assert all(r["judge_read"] == [] and not r["correct"] for r in gen["records"])
    assert gen["mean_objects_read"] == 0.0 and gen["cluttered"] == 0
    truth = ground_truth(world)
    vqa = result["understanding"]
    for kind, entry in vqa["per_type"].items():
        answers = [qa["answer"] for qa in truth if qa["type"] == kind]
        assert entry["accuracy"] == answers.count("yes") / len(answers), kind
    assert vqa["per_type"]["existence"]["accuracy"] == 0.5
    pope = vqa["pope"]
    assert (pope["precision"], pope["recall"], pope["yes_ratio"]) == (0.5, 1.0, 1.0)
    assert pope["f1"] == pytest.approx(2 / 3, abs=1e-12)


def test_a_cluttered_image_is_not_a_scene(world: Config) -> None:
    """Twelve circles on a 4x4 layout pass GenEval's "a photo of a circle", but no 3x3 scene holds twelve."""
    circles = [
        SceneObject("circle", "red", "large", r, c) for r in range(4) for c in range(4) if (r + c) % 4 != 3
    ]
    image = render(Scene(tuple(circles), 64, 4))
    spec = {"category": "single_object", "include": [{"shape": "circle", "count": 1}], "exclude": []}
    assert score(image, spec, world).correct
    verdict = judge_image(image, spec, world.data.world)
    assert not verdict.correct and len(verdict.objects) == 12
    assert (
        verdict.reason == "not a scene of the world: the judge reads 12 objects, the 3x3 grid holds at most 9"
    )
    nine = [SceneObject("square", "blue", "small", r, c) for r in range(3) for c in range(3)]
    full = render(Scene(tuple(nine), 64, 3))
    spec = {"category": "single_object", "include": [{"shape": "square", "count": 1}], "exclude": []}
    assert judge_image(full, spec, world.data.world).correct  # a full grid is still a scene


def test_limit_caps_scenes_and_prompts(world: Config, tmp_path: Path) -> None:
    task = ShapesBench(num_prompts=NUM_PROMPTS)
    result = task.run(oracle(world), world, limit=2, batch_size=8, output_dir=tmp_path, progress=False)
    first_two = [qa for s in list(iter_samples(Path(world.data.root) / "test"))[:2] for qa in s.meta["vqa"]]
    assert result["understanding"]["scenes"] == 2 and result["understanding"]["total"] == len(first_two)
    assert result["generation"]["total"] == 2
    with pytest.raises(ValueError, match="limit must be >= 1"):
        task.run(oracle(world), world, limit=0, batch_size=8, output_dir=tmp_path)


def test_outputs_json_markdown_and_grid(world: Config, tmp_path: Path) -> None:
    result = run_bench(oracle(world), world, tmp_path)
    data = json.loads((tmp_path / JSON_FILE).read_text())
    assert {"task", "model", "understanding", "generation", "files"} <= set(data)
    assert {"overall", "per_type", "pope", "records"} <= set(data["understanding"])
    assert {"accuracy", "precision", "recall", "f1", "yes_ratio"} <= set(data["understanding"]["pope"])
    record = data["understanding"]["records"][0]
    assert set(record) == {"key", "type", "question", "answer", "prediction", "correct"}
    record = data["generation"]["records"][0]
    assert {"prompt", "category", "correct", "reason", "judge_read", "image"} <= set(record)
    assert record["judge_read"] and " at row " in record["judge_read"][0]
    assert (tmp_path / record["image"]).is_file() and len(list((tmp_path / "images").glob("*.png"))) == 12
    markdown = (tmp_path / MARKDOWN_FILE).read_text()
    assert "| **overall** | **100.00%** |" in markdown
    assert "| **overall** (mean of categories) | **100.00%** | 12/12 |" in markdown
    assert "| single_object | 100.00% | 2/2 |" in markdown
    assert markdown == ShapesBench().format_table(result)
    with Image.open(tmp_path / GRID_FILE) as grid:
        # 12 samples: 6 columns x 2 rows of 136 x 188 px cells (128 px tile, 4 px pad, 4 caption lines)
        assert grid.size == (6 * 136, 2 * 188)
        assert grid.getpixel((4, 4)) == (30, 160, 60)  # the first sample's frame: the judge accepted it


def test_val_split_reads_val_scenes_its_own_prompts_and_the_decoding_settings(
    world: Config, tmp_path: Path
) -> None:
    solver = oracle(world)
    config = load_config(
        [],
        [
            f"data.root={world.data.root}",
            f"data.world.num_val={NUM_VAL}",
            "data.world.samples_per_shard=3",
            "generation.temperature=0.7",
            "generation.text_temperature=0.5",
            "generation.text_top_k=3",
        ],
    )
    result = run_bench(solver, config, tmp_path, split="val")
    val = [qa for s in iter_samples(Path(world.data.root) / "val") for qa in s.meta["vqa"]]
    vqa, gen = result["understanding"], result["generation"]
    assert result["split"] == "val" and vqa["scenes"] == NUM_VAL
    assert [r["question"] for r in vqa["records"]] == [qa["question"] for qa in val]
    assert all(r["key"].startswith("shapes-val-") for r in vqa["records"])
    test_prompts = [p["prompt"] for p in geneval_prompts(world.data.world, NUM_PROMPTS)]
    val_prompts = [r["prompt"] for r in gen["records"]]
    assert val_prompts == [p["prompt"] for p in geneval_prompts(world.data.world, NUM_PROMPTS, split="val")]
    assert val_prompts != test_prompts and gen["overall"] == 1.0
    # seeds step from generation.seed + VAL_SEED_OFFSET: a prompt that is also a test prompt is drawn anew
    assert [c["seed"] for c in solver.image_calls] == [
        VAL_SEED_OFFSET,
        VAL_SEED_OFFSET + 5,
        VAL_SEED_OFFSET + 10,
    ]
    # the config's decoding settings reach the solver and the results
    assert {c["temperature"] for c in solver.image_calls} == {0.7} and gen["settings"]["temperature"] == 0.7
    assert {(c["temperature"], c["top_k"]) for c in solver.text_calls} == {(0.5, 3)}
    assert vqa["settings"] == {"temperature": 0.5, "top_k": 3, "max_answer_tokens": 16}
    table = (tmp_path / MARKDOWN_FILE).read_text()
    assert "## ShapesBench (val split)" in table and f"{NUM_VAL} val scenes" in table
    assert f"temperature 0.7, {config.generation.image_size} px" in table
    with pytest.raises(ValueError, match="val or test split, got 'train'"):
        ShapesBench(split="train")


def test_parts_can_be_chosen(world: Config, tmp_path: Path) -> None:
    result = run_bench(oracle(world), world, tmp_path, parts=["generation"], grid_samples=0)
    assert "understanding" not in result and not (tmp_path / GRID_FILE).exists()
    fresh = tmp_path / "not" / "yet"
    result = run_bench(oracle(world), world, fresh, parts=["understanding"])
    assert "generation" not in result and json.loads((fresh / JSON_FILE).read_text())["understanding"]
    assert "Generation" not in (fresh / MARKDOWN_FILE).read_text()
    with pytest.raises(ValueError, match="parts"):
        ShapesBench(parts=["speed"])


def test_grid_layout_and_caption_wrapping() -> None:
    assert grid_shape(1) == (1, 1) and grid_shape(6) == (6, 1) and grid_shape(7) == (6, 2)
    image = Image.new("RGB", (16, 16), "blue")
    long = "a photo of " + "an extraordinarilylongwordthatcannotfitinonetile " * 4
    grid = sample_grid([image, image], ["a photo of a circle", long], [True, False])
    assert grid.size == (2 * 136, 188)
    assert grid.getpixel((136 + 4, 4)) == (220, 30, 30)  # rejected: red frame
    assert grid.getpixel((4 + 64, 4 + 64)) == (0, 0, 255)  # the image itself, enlarged inside the frame
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    lines = _wrap(draw, long, font, TILE, CAPTION_LINES - 1)
    assert len(lines) == CAPTION_LINES - 1 and lines[-1].endswith(" ...")
    assert all(draw.textlength(line, font=font) <= TILE for line in lines)
    with pytest.raises(ValueError, match="aligned"):
        sample_grid([image], ["a", "b"], [True])


# ------------------------------------------------------------------------------------------ the driver


@pytest.fixture
def export_dir(world: Config, tmp_path: Path) -> Path:
    """A directory with only the resolved config an export carries (the fake solvers need no weights)."""
    path = tmp_path / "export"
    save_config(world, path / CONFIG_YAML)
    return path


def test_driver_runs_a_task_with_overrides(
    world: Config, export_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    solver = oracle(world)
    result = evaluate(
        "shapesbench",
        export_dir,
        limit=1,
        batch_size=4,
        overrides=["generation.cfg_scale=5.5", "generation.jacobi_window=16"],
        solver=solver,
        progress=False,
    )
    out = export_dir / "eval" / "shapesbench"
    assert result["files"]["json"] == str(out / JSON_FILE) and (out / GRID_FILE).is_file()
    assert result["model"] == str(export_dir)
    assert solver.image_calls[0]["cfg"] == 5.5  # the overrides reached the decoding settings
    assert (
        solver.image_calls[0]["jacobi_window"] == 16
        and result["generation"]["settings"]["jacobi_window"] == 16
    )
    printed = capsys.readouterr().out
    assert "| question type | accuracy | correct |" in printed and f"grid: {out / GRID_FILE}" in printed


def test_driver_bad_inputs_name_the_problem(
    world: Config, export_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(SystemExit, match=re.escape(f"model export directory not found: {missing}")):
        main(["--task", "shapesbench", "--model", str(missing)])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match=r"has no config\.yaml"):
        main(["--task", "shapesbench", "--model", str(tmp_path / "empty")])
    with pytest.raises(SystemExit, match=r"unknown task 'nope'; available tasks: .*shapesbench"):
        main(["--task", "nope", "--model", str(export_dir)])
    elsewhere = tmp_path / "no-data"
    with pytest.raises(
        SystemExit, match=re.escape(f"test split from {elsewhere / 'test'}, which has no shards")
    ):
        main(["--task", "shapesbench", "--model", str(export_dir), f"data.root={elsewhere}"])
    with pytest.raises(SystemExit, match="unknown config key"):
        main(["--task", "shapesbench", "--model", str(export_dir), "generation.nonsense=1"])
    with pytest.raises(SystemExit) as exc:
        main(["--task", "shapesbench", "--model", str(export_dir), "--limit", "0"])
    assert exc.value.code == 2 and "--limit: must be an integer >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        evaluate("shapesbench", export_dir, batch_size=0, solver=blank(world))


# ------------------------------------------------------------------------------- the real solver


@pytest.mark.slow
def test_shapesbench_on_a_tiny_export_with_the_real_solver(
    tmp_path_factory: pytest.TempPathFactory, sp_model: Path, capsys: pytest.CaptureFixture
) -> None:
    """Train a 2-step stage-0 model, export it, and run the driver's whole path with the InferenceSolver."""
    from tests.helpers import STAGE0, make_tokenized_world, overrides
    from unified_mllm.model import export
    from unified_mllm.train.trainer import train

    assert export.CONFIG_YAML == CONFIG_YAML  # the driver names the file without importing the trainer
    root = tmp_path_factory.mktemp("e2e")
    world = make_tokenized_world(root, sp_model, "data.world.num_train=8", "data.world.num_test=2")
    write_split(world.data.world, world.data.root, "test", progress=False)
    config = load_config(
        [STAGE0], overrides(world, root / "run", "train.max_steps=2", "data.max_seq_len=256")
    )
    train(config, progress=False)
    export_dir = config.checkpoint.export_dir
    main(
        [
            "--task",
            "shapesbench",
            "--model",
            export_dir,
            "--limit",
            "2",
            "--batch-size",
            "8",
            "--no-progress",
            "--ablate",
            "all",
        ]
    )
    out = Path(config.checkpoint.export_dir) / "eval" / "shapesbench"
    data = json.loads((out / JSON_FILE).read_text())
    # --ablate all: the understanding part again with each branch removed, as a table beside the normal run.
    rows = json.loads((out / "ablation.json").read_text())
    assert list(rows) == ["as trained", "SigLIP features zeroed", "VQ codes random"]
    assert rows["as trained"]["overall"] == pytest.approx(data["understanding"]["overall"])
    for kind in ("features", "codes"):
        ablated = json.loads((out / f"ablate-{kind}" / JSON_FILE).read_text())
        assert (
            "generation" not in ablated
            and ablated["understanding"]["total"] == data["understanding"]["total"]
        )
    assert "| VQ codes random |" in (out / "ablation.md").read_text()
    questions = [qa for s in iter_samples(Path(world.data.root) / "test") for qa in s.meta["vqa"]]
    vqa, gen = data["understanding"], data["generation"]
    assert vqa["total"] == len(questions) and vqa["scenes"] == 2
    assert [r["question"] for r in vqa["records"]] == [qa["question"] for qa in questions]
    assert all(isinstance(r["prediction"], str) for r in vqa["records"])
    assert 0.0 <= vqa["overall"] <= 1.0 and 0.0 <= vqa["pope"]["f1"] <= 1.0
    assert gen["total"] == 2 and gen["settings"]["image_size"] == 64
    for record in gen["records"]:
        with Image.open(out / record["image"]) as image:
            assert image.size == (64, 64)  # the requested size, from the export's generation settings
    with Image.open(out / GRID_FILE) as grid:
        assert grid.size == (2 * 136, 188)
    assert f"json: {out / JSON_FILE}" in capsys.readouterr().out
