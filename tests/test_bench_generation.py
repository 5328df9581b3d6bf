"""The generation benchmarks (GenEval, T2I-CompBench++, DPG-Bench, GenAI-Bench): images drawn in exactly the
layout each official scorer reads (checked, and broken folders named), resumed image by image with the same
draws, and the scorers' own result files summarised to hand-computed numbers."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from tests.helpers import REPO, write_export
from unified_mllm.config import Config, load_config
from unified_mllm.eval.__main__ import evaluate
from unified_mllm.eval.benchmarks.dpg_bench import dpg_summary
from unified_mllm.eval.benchmarks.genai_bench import genai_summary
from unified_mllm.eval.benchmarks.geneval import geneval_summary
from unified_mllm.eval.generation_bench import SETTINGS_FILE, check_layout, main
from unified_mllm.eval.tasks import get_task

SIZE = 16  # the fake solver's images

GENEVAL_LINES = [
    {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
    {
        "tag": "two_object",
        "include": [{"class": "cow", "count": 1}, {"class": "cat", "count": 1}],
        "prompt": "a photo of a cow and a cat",
    },
    {
        "tag": "counting",
        "include": [{"class": "dog", "count": 2}],
        "exclude": [{"class": "dog", "count": 3}],
        "prompt": "a photo of two dogs",
    },
    {
        "tag": "position",
        "include": [{"class": "cup", "count": 1}, {"class": "car", "count": 1, "position": ["left of", 0]}],
        "prompt": "a photo of a car left of a cup",
    },
]


class FakeSolver:
    """Draws one flat colour per row, a function of (prompt, seed, row): the same call draws the same images."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.calls: list[dict[str, Any]] = []

    def generate(self, *args: Any, **kwargs: Any) -> list[str]:
        raise AssertionError("a generation benchmark asks no question")

    def generate_img(
        self,
        prompts: list[str],
        *,
        cfg: float | None = None,
        image_top_k: int | None = None,
        size: int | None = None,
        seed: int | None = None,
        jacobi_window: int | None = None,
    ) -> list[Image.Image]:
        self.calls.append(
            {"prompts": list(prompts), "seed": seed, "cfg": cfg, "top_k": image_top_k, "size": size}
        )
        return [Image.new("RGB", (size, size), colour(p, seed, row)) for row, p in enumerate(prompts)]


def colour(prompt: str, seed: int | None, row: int) -> tuple[int, int, int]:
    digest = hashlib.sha256(f"{prompt}|{seed}|{row}".encode()).digest()
    return digest[0], digest[1], digest[2]


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory, sp_model: Path) -> Path:
    return write_export(tmp_path_factory.mktemp("export") / "export", sp_model)


@pytest.fixture
def config() -> Config:
    return load_config(
        overrides=[f"generation.image_size={SIZE}", "generation.seed=7", "generation.cfg_scale=5.5"]
    )


def run(task_name: str, config: Config, out: Path, solver: FakeSolver | None = None, **options: Any) -> dict:
    limit = options.pop("limit", None)
    batch_size = options.pop("batch_size", 4)
    task = get_task(task_name, **options)
    solver = solver or FakeSolver(config)
    return task.run(solver, config, limit=limit, batch_size=batch_size, output_dir=out, progress=False)


# ------------------------------------------------------------------------------------------------ fixtures


def geneval_data(root: Path) -> Path:
    path = root / "geneval" / "prompts" / "evaluation_metadata.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps(line) + "\n" for line in GENEVAL_LINES))
    return path


def t2i_data(root: Path) -> Path:
    folder = root / "T2I-CompBench" / "examples" / "dataset"
    folder.mkdir(parents=True)
    # CRLF lines as in the released files; the official reader keeps the text before a tab
    (folder / "color_val.txt").write_bytes(b"a green bench and a blue bowl\r\na red car\tx\r\n")
    (folder / "spatial_val.txt").write_bytes(b"a horse on the right of a car\r\n")
    (folder / "color_train.txt").write_text("not read\n")
    return root / "T2I-CompBench"


def dpg_data(root: Path) -> Path:
    folder = root / "ELLA" / "dpg_bench" / "prompts"
    folder.mkdir(parents=True)
    for stem, text in (("10", "a cat"), ("2", "a dog on a mat"), ("COCOval2014000000010363", "a bus")):
        (folder / f"{stem}.txt").write_text(text + "\n")
    return folder.parent


def genai_data(root: Path) -> Path:
    folder = root / "datasets" / "GenAI-Image-1600"
    folder.mkdir(parents=True)
    prompts = {f"{i:05d}": {"prompt": p, "models": {}} for i, p in enumerate(["a cat", "two dogs", "no cat"])}
    (folder / "genai_image.json").write_text(json.dumps(prompts))
    skills = {"attribute": [0], "counting": [1], "negation": [2], "basic": [0], "advanced": [1, 2]}
    (folder / "genai_skills.json").write_text(json.dumps(skills))
    return folder


# ------------------------------------------------------------------------------------------------ GenEval


def test_geneval_driver_on_a_random_export_writes_the_scorers_layout(tmp_path: Path, export: Path) -> None:
    data = geneval_data(tmp_path)
    out = tmp_path / "out"
    result = evaluate(
        "geneval",
        export,
        data=data,
        output=out,
        batch_size=3,
        progress=False,
        options={"images_per_prompt": 2},
    )
    assert result["layout"] == {"ok": True, "problems": []}
    assert (result["prompts"], result["image_files"], result["written"], result["reused"]) == (4, 8, 8, 0)
    assert result["settings"]["image_size"] == 32 and result["scores"] is None
    assert result["records"][1] == {
        "id": "00001",
        "prompt": "a photo of a cow and a cat",
        "category": "two_object",
        "files": ["00001/samples/0000.png", "00001/samples/0001.png"],
    }
    for index, line in enumerate(GENEVAL_LINES):
        folder = out / "images" / f"{index:05d}"
        assert json.loads((folder / "metadata.jsonl").read_text()) == line
        assert sorted(p.name for p in (folder / "samples").iterdir()) == ["0000.png", "0001.png"]
        with Image.open(folder / "samples" / "0001.png") as image:
            assert (image.format, image.size) == ("PNG", (32, 32))
    for label in ("json", "markdown", "grid"):
        assert Path(result["files"][label]).is_file()
    assert json.loads((out / "geneval.json").read_text())["image_files"] == 8
    assert "evaluate_images.py" in (out / "geneval.md").read_text()
    # the checker, on the run's folder or its images/, alone or against the prompts
    assert check_layout("geneval", out) == []
    assert check_layout("geneval", out / "images", data=data, images_per_prompt=2) == []
    assert main(["check", "geneval", str(out)]) == 0
    # the command users run (the module as __main__ checks the registry's classes)
    command = [sys.executable, "-m", "unified_mllm.eval.generation_bench", "check", "geneval", str(out)]
    done = subprocess.run(
        command, capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    assert (done.returncode, done.stdout.strip()) == (0, f"geneval: OK: {out}"), done.stderr


def test_geneval_layout_check_names_what_is_broken(tmp_path: Path, config: Config) -> None:
    data = geneval_data(tmp_path)
    out = tmp_path / "out"
    run("geneval", config, out, data=data)
    images = out / "images"
    assert check_layout("geneval", out, data=data, images_per_prompt=4) == []
    (images / "00001" / "samples" / "0002.png").unlink()
    (images / "00002" / "samples" / "0003.png").rename(images / "00002" / "samples" / "3.png")
    (images / "00003" / "metadata.jsonl").write_text("{not json")
    (images / "00000" / "samples" / "0000.png").write_bytes(b"GIF89a")
    (images / "results.jsonl").write_text("")
    (images / "00000" / "samples" / ".tmp-0001.png-1-abc").write_bytes(b"")
    problems = check_layout("geneval", out, data=data, images_per_prompt=4)
    text = "\n".join(problems)
    assert "00001/samples/0002.png is missing" in text
    assert "00002/samples/3.png: not an image the scorer reads" in text
    assert "00003/metadata.jsonl is not one JSON object" in text
    assert "00000/samples/0000.png is not a PNG file" in text
    assert "results.jsonl: not a prompt folder" in text
    assert "temporary file left by a killed run" in text
    assert main(["check", "geneval", str(out), "--images-per-prompt", "4"]) == 1
    # a folder missing, and another prompts file's metadata
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({**line, "prompt": "x"}) + "\n" for line in GENEVAL_LINES))
    shutil_rmtree(images / "00003")
    problems = check_layout("geneval", out, data=other)
    assert any("1 prompt folder(s) missing: 00003/" in p for p in problems)
    assert any("00001/metadata.jsonl is not line 2 of the prompts file" in p for p in problems)
    assert not any("missing: 00003" in p for p in check_layout("geneval", out, data=data, partial=True))


def shutil_rmtree(path: Path) -> None:
    for p in sorted(path.rglob("*"), reverse=True):
        p.rmdir() if p.is_dir() else p.unlink()
    path.rmdir()


def test_geneval_resume_redraws_only_the_missing_image_with_the_same_draws(
    tmp_path: Path, config: Config
) -> None:
    data = geneval_data(tmp_path)
    out = tmp_path / "out"
    first = FakeSolver(config)
    result = run("geneval", config, out, first, data=data, batch_size=1)
    assert len(first.calls) == 16 and result["drawn"] == 16
    # draw i (prompt-major) is called alone with seed generation.seed + i, and the config's settings
    assert [c["seed"] for c in first.calls] == [7 + i for i in range(16)]
    assert {(c["cfg"], c["top_k"], c["size"]) for c in first.calls} == {(5.5, 2000, SIZE)}
    assert [c["prompts"][0] for c in first.calls[:5]] == ["a photo of a bench"] * 4 + [
        "a photo of a cow and a cat"
    ]
    images = out / "images"
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(images.rglob("*.png"))}
    target = images / "00002" / "samples" / "0001.png"
    target.unlink()
    second = FakeSolver(config)
    result = run("geneval", config, out, second, data=data, batch_size=1)
    assert second.calls == [
        {"prompts": ["a photo of two dogs"], "seed": 7 + 9, "cfg": 5.5, "top_k": 2000, "size": SIZE}
    ]
    assert (result["written"], result["reused"], result["drawn"]) == (1, 15, 1)
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(images.rglob("*.png"))}
    assert after.keys() == before.keys()
    assert [p for p in before if after[p] != before[p]] == [target]
    assert after[target][0] == before[target][0]  # the same image again

    # batched: the call holding the missing draw is drawn again as a whole, only the missing file written
    run("geneval", config, tmp_path / "batched", data=data, batch_size=3)
    target = (
        tmp_path / "batched" / "images" / "00001" / "samples" / "0003.png"
    )  # draw 7: the call of draws 6-8
    expected = target.read_bytes()
    target.unlink()
    third = FakeSolver(config)
    result = run("geneval", config, tmp_path / "batched", third, data=data, batch_size=3)
    assert [(len(c["prompts"]), c["seed"]) for c in third.calls] == [(3, 7 + 6)]
    assert (result["written"], result["drawn"]) == (1, 3)
    assert target.read_bytes() == expected
    # nothing missing: nothing drawn
    fourth = FakeSolver(config)
    assert run("geneval", config, out, fourth, data=data)["drawn"] == 0 and fourth.calls == []


def test_restart_and_changed_settings(tmp_path: Path, config: Config) -> None:
    data = geneval_data(tmp_path)
    out = tmp_path / "out"
    run("geneval", config, out, data=data, images_per_prompt=1)
    assert json.loads((out / SETTINGS_FILE).read_text())["cfg_scale"] == 5.5
    other = load_config(overrides=[f"generation.image_size={SIZE}", "generation.cfg_scale=3.0"])
    with pytest.raises(ValueError, match=r"cfg_scale 5.5 -> 3.0.*--restart"):
        run("geneval", other, out, data=data, images_per_prompt=1)
    with pytest.raises(ValueError, match=r"images_per_prompt 1 -> 2"):
        run("geneval", config, out, data=data, images_per_prompt=2)
    stray = out / "images" / "00000" / "samples" / "0007.png"
    stray.write_bytes(b"x")
    solver = FakeSolver(other)
    result = run("geneval", other, out, solver, data=data, images_per_prompt=1, restart=True)
    assert not stray.exists() and result["written"] == 4 and len(solver.calls) == 1
    assert result["layout"]["ok"]


def test_geneval_summary_of_a_results_file_equals_hand_computed_numbers(
    tmp_path: Path, config: Config
) -> None:
    def line(prompt: int, tag: str, correct: bool) -> str:
        meta = json.dumps({"tag": tag, "prompt": f"p{prompt}"})
        return json.dumps({"filename": f"x/{prompt:05d}/samples/0000.png", "tag": tag, "correct": correct} | {
            "prompt": f"p{prompt}", "reason": "", "metadata": meta
        })  # fmt: skip

    rows = [
        (0, "single_object", True), (0, "single_object", True), (1, "single_object", False),
        (2, "two_object", True), (2, "two_object", False), (3, "counting", False),
    ]  # fmt: skip
    text = "\n".join(line(*row) for row in rows) + "\n"
    summary = geneval_summary([json.loads(x) for x in text.splitlines()])
    # tags: 2/3, 1/2, 0/1 -> overall (2/3 + 1/2 + 0) / 3 = 7/18; images 3/6; prompts with a correct image: 0, 2
    assert summary["overall"] == pytest.approx(7 / 18)
    assert summary["per_tag"]["single_object"] == {"accuracy": pytest.approx(2 / 3), "correct": 2, "total": 3}
    assert summary["per_tag"]["counting"]["accuracy"] == 0.0
    assert list(summary["per_tag"]) == ["single_object", "two_object", "counting"]
    assert (summary["correct_images"], summary["correct_prompts"]) == (0.5, 0.5)
    assert (summary["images"], summary["prompts"]) == (6, 4)

    data = geneval_data(tmp_path)
    out = tmp_path / "out"
    run("geneval", config, out, data=data, images_per_prompt=1)
    (out / "results.jsonl").write_text(text)  # the documented --outfile
    result = run("geneval", config, out, data=data, images_per_prompt=1)
    assert result["headline"] == {"metric": "overall", "value": pytest.approx(7 / 18), "scale": "raw"}
    assert result["scores"]["stale"] is False and result["scores_file"] == str(out / "results.jsonl")
    assert "| **overall** (mean of tags) | **0.3889** |" in (out / "geneval.md").read_text()
    # results older than an image are flagged; --scores names another file
    old = out / "old.jsonl"
    old.write_text(text)
    os.utime(old, (1, 1))
    result = run("geneval", config, out, data=data, images_per_prompt=1, scores=old)
    assert result["scores"]["stale"] is True and result["scores_file"] == str(old)
    with pytest.raises(FileNotFoundError, match="--scores"):
        run("geneval", config, out, data=data, scores=tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="boolean 'correct'"):
        geneval_summary([{"tag": "colors", "correct": "yes"}])


def test_missing_or_bad_data_is_named_before_the_model_loads(tmp_path: Path, export: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"evaluation_metadata\.jsonl"):
        evaluate("geneval", export, output=tmp_path / "o", progress=False)
    with pytest.raises(FileNotFoundError, match=r"no evaluation_metadata\.jsonl"):
        evaluate("geneval", export, data=tmp_path, output=tmp_path / "o", progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a cat"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: .*'tag'"):
        evaluate("geneval", export, data=bad, output=tmp_path / "o", progress=False)
    with pytest.raises(ValueError, match="at most 4"):
        get_task("dpg-bench", images_per_prompt=5)
    with pytest.raises(ValueError, match="at most 1"):
        get_task("genai-bench", images_per_prompt=2)


# ----------------------------------------------------------------------------------------- T2I-CompBench


def test_t2i_compbench_layout_resume_and_scores(tmp_path: Path, config: Config) -> None:
    data = t2i_data(tmp_path)
    out = tmp_path / "out"
    solver = FakeSolver(config)
    result = run("t2i-compbench", config, out, solver, data=data, images_per_prompt=3)
    color = out / "images" / "color" / "samples"
    assert sorted(p.name for p in color.iterdir()) == [
        "a green bench and a blue bowl_000000.png",
        "a green bench and a blue bowl_000001.png",
        "a green bench and a blue bowl_000002.png",
        "a red car_000003.png",
        "a red car_000004.png",
        "a red car_000005.png",
    ]
    assert sorted(p.name for p in (out / "images" / "spatial" / "samples").iterdir())[-1] == (
        "a horse on the right of a car_000002.png"
    )
    assert result["layout"]["ok"] and result["image_files"] == 9
    assert check_layout("t2i-compbench", out, data=data, images_per_prompt=3) == []
    # --limit 1 keeps the first prompt of each category; resume draws nothing more
    assert run("t2i-compbench", config, out, data=data, images_per_prompt=3, limit=1)["drawn"] == 0

    # broken: a gap in the numbers, a file not named <prompt>_<n:06d>.png, a foreign category
    (color / "a red car_000004.png").rename(color / "a red car_4.png")
    (out / "images" / "colour").mkdir()
    problems = "\n".join(check_layout("t2i-compbench", out, data=data, images_per_prompt=3))
    assert "color/samples/a red car_4.png: not <prompt>_<n:06d>.png" in problems
    assert "color/samples/: images are not numbered 000000..000004 (no 000004)" in problems
    assert "colour: not a category folder" in problems
    (color / "a red car_4.png").rename(color / "a red car_000004.png")
    (out / "images" / "colour").rmdir()
    (color / "a red car_000005.png").rename(color / "a blue car_000005.png")
    problems = "\n".join(check_layout("t2i-compbench", out, images_per_prompt=3))
    assert "color/samples/: images 000003..000005 are not of one prompt" in problems

    # the scorers' vqa_result.json per category: their means, and ours over the categories
    (color / "a blue car_000005.png").rename(color / "a red car_000005.png")
    answers = [{"question_id": i, "answer": f"{v:.4f}"} for i, v in enumerate([1, 0.5, 0, 0.25, 0.25, 1])]
    (out / "images" / "color" / "annotation_blip").mkdir()
    (out / "images" / "color" / "annotation_blip" / "vqa_result.json").write_text(json.dumps(answers))
    spatial = out / "images" / "spatial" / "labels" / "annotation_obj_detection_2d"
    spatial.mkdir(parents=True)
    (spatial / "vqa_result.json").write_text(
        json.dumps([{"question_id": i, "answer": 0.2} for i in range(3)])
    )
    result = run("t2i-compbench", config, out, data=data, images_per_prompt=3)
    scores = result["scores"]
    assert scores["per_category"]["color"]["score"] == pytest.approx(3 / 6)
    assert scores["per_category"]["spatial"] == {
        "score": pytest.approx(0.2), "images": 3, "on_disk": 3, "scorer": "UniDet"
    }  # fmt: skip
    assert result["headline"]["value"] == pytest.approx((0.5 + 0.2) / 2) and scores["categories"] == 2


def test_t2i_compbench_refuses_prompts_its_file_names_cannot_carry(tmp_path: Path, config: Config) -> None:
    folder = tmp_path / "dataset"
    folder.mkdir()
    (folder / "color_val.txt").write_text("a red_car\n")
    with pytest.raises(ValueError, match=r"color_val\.txt:1: the prompt holds '_'"):
        run("t2i-compbench", config, tmp_path / "out", data=folder)
    (folder / "complex_val.txt").write_text("the cat sat on the mat.\n")
    (folder / "color_val.txt").unlink()
    result = run(
        "t2i-compbench", config, tmp_path / "out", data=folder / "complex_val.txt", images_per_prompt=2
    )
    assert result["layout"]["problems"] == [
        "complex/: 3_in_1.py assumes 10 images per prompt, the folder has 2"
    ]
    # the scorer commands of the categories given; 3-in-1 last, reading this dataset folder
    commands = result["scorer"]["commands"]
    assert sum("complex" in c for c in commands) == 4 and not any("numeracy" in c for c in commands)
    assert commands[-1].endswith(f'--data_path="{folder.resolve()}")')


# ------------------------------------------------------------------------------------------------ DPG-Bench


def test_dpg_bench_tiles_four_draws_per_prompt_file(tmp_path: Path, config: Config) -> None:
    data = dpg_data(tmp_path)
    out = tmp_path / "out"
    solver = FakeSolver(config)
    result = run("dpg-bench", config, out, solver, data=data, batch_size=8)
    assert sorted(p.name for p in (out / "images").iterdir()) == [
        "10.png",
        "2.png",
        "COCOval2014000000010363.png",
    ]
    assert result["layout"]["ok"] and result["images"] == 12
    # prompts in numeric order (2, 10, then the named id); file "10.png" holds draws 4..7 of the first call
    assert solver.calls[0]["prompts"][:5] == ["a dog on a mat"] * 4 + ["a cat"]
    with Image.open(out / "images" / "10.png") as image:
        assert image.size == (2 * SIZE, 2 * SIZE)
        # the scorer's crop order: top-left, top-right, bottom-left, bottom-right = draws 0..3 of the prompt
        corners = [image.getpixel((x * SIZE, y * SIZE)) for x, y in ((0, 0), (1, 0), (0, 1), (1, 1))]
    assert corners == [colour("a cat", 7, row) for row in range(4, 8)]
    assert check_layout("dpg-bench", out, data=data, images_per_prompt=4) == []
    # the scorer's own results files are allowed in the folder; anything else is named
    (out / "images" / "dpg-bench_20240101-000000_results.txt").write_text("")
    (out / "images" / "notes.txt").write_text("")
    (out / "images" / "2.png").unlink()
    problems = check_layout("dpg-bench", out, data=data, images_per_prompt=4)
    assert problems == [
        "notes.txt: not an <id>.png image (the scorer tries every file of the folder)",
        "1 prompt(s) without an image: 2",
    ]
    # one image per prompt: the file is the image itself
    result = run("dpg-bench", config, tmp_path / "one", data=data, images_per_prompt=1)
    with Image.open(tmp_path / "one" / "images" / "2.png") as image:
        assert image.size == (SIZE, SIZE)


DPG_RESULTS = """\
/x/images/2.png, 1.0, 0.5, 0.5, 1.0, 0.75
/x/images/10.png, 0.0, 0.5, 0.5, 0.0, 0.25
Model: images
L1 category scores:
\tentity: 62.5
\tattribute: 40.0
L2 category scores:
\tattribute - color: 40.0
\tentity - whole: 62.5
Image path: /x/images
Save results to: /x/images/dpg-bench_20240101-000000_results.txt
DPG-Bench score: 50.0
"""


def test_dpg_bench_summary_of_its_results_file(tmp_path: Path, config: Config) -> None:
    summary = dpg_summary(DPG_RESULTS)
    assert summary == {
        "overall": 50.0,
        "images": 2,
        "per_image_mean": 50.0,
        "l1": {"entity": 62.5, "attribute": 40.0},
        "l2": {"attribute - color": 40.0, "entity - whole": 62.5},
    }
    # stopped before its last line: the per-image mean x 100
    assert dpg_summary(DPG_RESULTS.split("Model:")[0])["overall"] == pytest.approx(50.0)
    data = dpg_data(tmp_path)
    out = tmp_path / "out"
    run("dpg-bench", config, out, data=data, images_per_prompt=1)
    (out / "images" / "dpg-bench_20240101-000000_results.txt").write_text(
        DPG_RESULTS.replace("50.0\n", "10.0\n")
    )
    (out / "images" / "dpg-bench_20240102-000000_results.txt").write_text(DPG_RESULTS)
    (out / "images" / "dpg-bench_20240102-000000_results_detail.txt").write_text("detail")
    result = run("dpg-bench", config, out, data=data, images_per_prompt=1)
    assert result["headline"]["value"] == 50.0  # the newest results file
    assert result["layout"]["ok"]
    assert "| **DPG-Bench score** | **50.00** |" in (out / "dpg-bench.md").read_text()


# ---------------------------------------------------------------------------------------------- GenAI-Bench


def test_genai_bench_layout_and_vqascore_summary(tmp_path: Path, config: Config) -> None:
    data = genai_data(tmp_path)
    out = tmp_path / "out"
    result = run("genai-bench", config, out, data=data)
    assert sorted(p.name for p in (out / "images").iterdir()) == ["00000.jpeg", "00001.jpeg", "00002.jpeg"]
    with Image.open(out / "images" / "00001.jpeg") as image:
        assert image.format == "JPEG"
    assert result["layout"]["ok"]
    assert check_layout("genai-bench", out, data=data / "genai_image.json") == []
    (out / "images" / "00001.jpeg").rename(out / "images" / "00001.png")
    assert check_layout("genai-bench", out, data=data) == [
        "00001.png: not an <id>.jpeg image (the scorer reads <id>.jpeg only)",
        "1 prompt(s) without an image: 00001.jpeg (the scorer stops at the first)",
    ]
    (out / "images" / "00001.png").rename(out / "images" / "00001.jpeg")

    # the scorer's tensor, one row per prompt in id order: 0.9, 0.6, 0.3
    results = out / "genai_bench_results" / "images"
    results.mkdir(parents=True)
    torch.save(torch.tensor([[0.9], [0.6], [0.3]]), results / "clip-flant5-xxl_1600_prompts.pt")
    result = run("genai-bench", config, out, data=data)
    scores = result["scores"]
    assert scores["per_skill"]["attribute"] == {"score": pytest.approx(0.9), "prompts": 1}
    assert scores["advanced"] == pytest.approx(0.45) and scores["basic"] == pytest.approx(0.9)
    assert scores["overall"] == pytest.approx(0.6) and scores["prompts"] == 3
    assert list(scores["per_skill"]) == ["attribute", "basic", "counting", "negation", "advanced"]
    assert result["headline"]["value"] == pytest.approx(0.45)
    # {id: score} JSON, no skills file: every prompt
    assert genai_summary({"00000": 1.0, "00002": 0.5}, ["00000", "00001", "00002"], None)["overall"] == 0.75
    with pytest.raises(ValueError, match="2 prompts, the prompts file 3"):
        genai_summary([0.1, 0.2], ["00000", "00001", "00002"], None)


# ---------------------------------------------------------------------------------- the driver, end to end


def test_the_other_benchmarks_through_the_driver_on_a_random_export(tmp_path: Path, export: Path) -> None:
    cases = [
        ("t2i-compbench", t2i_data(tmp_path), {"images_per_prompt": 1}, 3),
        ("dpg-bench", dpg_data(tmp_path), {"images_per_prompt": 2}, 2),
        ("genai-bench", genai_data(tmp_path), {}, 2),
    ]
    for name, data, options, files in cases:
        out = tmp_path / name
        result = evaluate(
            name, export, data=data, output=out, limit=2, batch_size=4, progress=False, options=options
        )
        assert result["layout"]["ok"], result["layout"]
        assert result["image_files"] == result["written"] == files
        assert result["drawn"] == result["images"]
        assert Path(result["files"]["grid"]).is_file() and Path(result["files"]["markdown"]).is_file()
        assert check_layout(name, out, partial=True) == []
