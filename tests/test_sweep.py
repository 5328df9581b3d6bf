"""The decoding sweep (python -m unified_mllm.eval.sweep): grid, cache, choice, files, refusal of the test split."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from unified_mllm.config import Config, load_config, save_config
from unified_mllm.data.shapes import geneval_prompts, render, scene_for_prompt, write_split
from unified_mllm.data.shards import iter_samples
from unified_mllm.eval.__main__ import CONFIG_YAML
from unified_mllm.eval.sweep import SETTING_FILE, choose, main, setting_grid, sweep
from unified_mllm.eval.sweep_report import CHOSEN_FILE, JSON_FILE, MARKDOWN_FILE, PLOT_FILE
from unified_mllm.layout import IMAGE_PLACEHOLDER

NUM_VAL = 2
LIMIT = 6  # val prompts (one per GenEval category) and val scenes per setting
GOOD_CFG = 6.0  # the fake draws the right picture from this guidance scale on


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Config:
    """A 2-scene val split of the default world (and no test split: the sweep never reads it)."""
    root = tmp_path_factory.mktemp("shapes")
    overrides = [f"data.root={root}", f"data.world.num_val={NUM_VAL}", "data.world.samples_per_shard=3"]
    config = load_config([], [*overrides, "generation.cfg_scale=3", "generation.image_top_k=64"])
    write_split(config.data.world, root, "val", progress=False)
    return config


@pytest.fixture
def export_dir(world: Config, tmp_path: Path) -> Path:
    """A directory with only the resolved config an export carries (the fake solver needs no weights)."""
    save_config(world, tmp_path / "export" / CONFIG_YAML)
    return tmp_path / "export"


class GuidedFake:
    """Draws each val prompt's true scene when cfg >= GOOD_CFG (a white image below), answers every val
    question right when greedy and "maybe" when sampling; records every call's settings."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.answers = {
            (s.image.convert("RGB").tobytes(), qa["question"]): qa["answer"]
            for s in iter_samples(Path(config.data.root) / "val")
            for qa in s.meta["vqa"]
        }
        self.specs = {p["prompt"]: p["spec"] for p in geneval_prompts(config.data.world, LIMIT, split="val")}
        self.image_calls: list[dict[str, Any]] = []
        self.text_calls: list[dict[str, Any]] = []

    def generate(
        self,
        images: list,
        qas: list,
        max_gen_len: int = 16,
        temperature: float = 0.0,
        top_k: int | None = None,
        seed: int = 0,
    ) -> list[str]:
        self.text_calls.append({"temperature": temperature, "top_k": top_k})
        if temperature:
            return ["maybe"] * len(qas)
        return [
            self.answers[(row[0].tobytes(), turns[0][0].removeprefix(IMAGE_PLACEHOLDER))]
            for row, turns in zip(images, qas, strict=True)
        ]

    def generate_img(self, prompts: list[str], **settings: Any) -> list[Image.Image]:
        self.image_calls.append(settings)
        world = self.config.data.world
        if settings["cfg"] < GOOD_CFG:
            return [Image.new("RGB", (world.image_size, world.image_size), "white") for _ in prompts]
        return [render(scene_for_prompt(self.specs[p], 0, world)) for p in prompts]


class Refuses:
    """A solver that must not be asked anything (every result is cached)."""

    config = None

    def generate(self, *args: Any, **kwargs: Any) -> list[str]:
        raise AssertionError("a cached setting was asked again")

    generate_img = generate


AXES = {"cfg_scale": [1, GOOD_CFG], "image_top_k": [64, 16], "text_temperature": [0.5, 0]}


def run(export_dir: Path, solver: Any, out: Path, axes: dict = AXES) -> dict[str, Any]:
    return sweep(export_dir, axes=axes, limit=LIMIT, batch_size=4, output=out, solver=solver, progress=False)


def test_grid_order_and_greedy_collapse() -> None:
    axes = {"cfg_scale": [1.0, 3.0], "image_top_k": [16, 64], "temperature": [0.0, 1.0]}
    grid = setting_grid(axes, ("temperature", "image_top_k"))
    # the last axis varies fastest; greedy settings keep the first top-k only (top-k changes no argmax)
    assert grid == [
        {"cfg_scale": c, "image_top_k": k, "temperature": t}
        for c, k, t in [(1, 16, 0), (1, 16, 1), (1, 64, 1), (3, 16, 0), (3, 16, 1), (3, 64, 1)]
    ]
    assert choose([{"overall": 0.2}, {"overall": 0.5}, {"overall": 0.5}]) == 1  # ties: the earlier setting
    with pytest.raises(ValueError, match="no settings were measured"):
        choose([])


def test_sweep_measures_every_setting_and_chooses_the_best(
    world: Config, export_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    solver = GuidedFake(world)
    out = tmp_path / "sweep"
    summary = run(export_dir, solver, out)
    gen, vqa = summary["parts"]["generation"], summary["parts"]["understanding"]
    # 2 x 2 generation settings, temperature left out: the config's value
    assert [r["setting"] for r in gen["rows"]] == [
        {"cfg_scale": c, "image_top_k": k, "temperature": 1.0} for c in (1.0, GOOD_CFG) for k in (64, 16)
    ]
    assert [r["overall"] for r in gen["rows"]] == [0.0, 0.0, 1.0, 1.0]
    assert gen["chosen_index"] == 2 and gen["chosen"] == {
        "cfg_scale": GOOD_CFG,
        "image_top_k": 64,
        "temperature": 1.0,
    }
    assert [r["setting"]["text_temperature"] for r in vqa["rows"]] == [0.5, 0.0]
    assert vqa["rows"][1]["overall"] == 1.0 and vqa["rows"][0]["overall"] == 0.0 and vqa["chosen_index"] == 1
    # each setting reached the solver and is recorded as used, on the val split with its seeds
    assert {(c["cfg"], c["image_top_k"], c["temperature"]) for c in solver.image_calls} == {
        (c, k, 1.0) for c in (1.0, GOOD_CFG) for k in (64, 16)
    }
    assert {(c["temperature"], c["top_k"]) for c in solver.text_calls} == {(0.5, 5), (0.0, 5)}
    for row in gen["rows"]:
        used = row["used"]
        assert (used["cfg_scale"], used["image_top_k"], used["temperature"]) == tuple(row["setting"].values())
        bench = json.loads((Path(row["dir"]) / "shapesbench.json").read_text())
        assert bench["split"] == "val" and bench["generation"]["total"] == LIMIT
    assert vqa["rows"][0]["total"] == sum(
        len(s.meta["vqa"]) for s in iter_samples(Path(world.data.root) / "val")
    )
    # the files: JSON = the summary, markdown with the choice in bold, a PNG plot, chosen.yaml for --config
    data = json.loads((out / JSON_FILE).read_text())
    assert data["chosen"] == {"text_temperature": 0.0, "text_top_k": 5, **gen["chosen"]}
    assert data["parts"]["generation"]["rows"] == json.loads(json.dumps(gen["rows"]))
    table = (out / MARKDOWN_FILE).read_text()
    assert "| **6** | **64** | **1** | **1.000** |" in table and "| 1 | 64 | 1 | 0.000 |" in table
    with Image.open(out / PLOT_FILE) as plot:
        assert plot.format == "PNG" and plot.size == (1200, 400)  # two panels: generation and VQA
    chosen = load_config([export_dir / CONFIG_YAML, out / CHOSEN_FILE]).generation
    assert (chosen.cfg_scale, chosen.image_top_k, chosen.temperature, chosen.text_temperature) == (
        6,
        64,
        1,
        0,
    )
    assert "split" in (out / CHOSEN_FILE).read_text().splitlines()[0]
    printed = capsys.readouterr().out
    assert "Chosen (highest generation overall" in printed and f"plot: {out / PLOT_FILE}" in printed


@pytest.mark.slow
def test_a_rerun_reuses_finished_settings_and_runs_only_new_ones(
    world: Config, export_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "sweep"
    first = run(export_dir, GuidedFake(world), out)
    again = run(export_dir, Refuses(), out)
    assert again["parts"]["generation"]["reused"] == 4 and again["parts"]["understanding"]["reused"] == 2
    assert again["parts"]["generation"]["rows"] == json.loads(
        json.dumps(first["parts"]["generation"]["rows"])
    )
    solver = GuidedFake(world)
    wider = run(export_dir, solver, out, axes={**AXES, "cfg_scale": [1, GOOD_CFG, 10]})
    assert {c["cfg"] for c in solver.image_calls} == {10.0} and not solver.text_calls
    assert wider["parts"]["generation"]["reused"] == 4 and len(wider["parts"]["generation"]["rows"]) == 6
    # another limit is another measurement: the cached result of a setting is not reused
    setting = Path(first["parts"]["generation"]["rows"][0]["dir"]) / SETTING_FILE
    assert json.loads(setting.read_text())["fingerprint"]["limit"] == LIMIT
    with pytest.raises(AssertionError, match="asked again"):
        sweep(
            export_dir, axes=AXES, limit=LIMIT - 1, batch_size=4, output=out, solver=Refuses(), progress=False
        )


def test_the_test_split_and_bad_axes_are_refused(export_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"chooses settings on the val split only, got --split test"):
        sweep(export_dir, split="test", solver=Refuses(), output=tmp_path)
    model = ["--model", str(export_dir), "--output", str(tmp_path)]
    with pytest.raises(
        SystemExit, match=re.escape("error: the sweep chooses settings on the val split only")
    ):
        main([*model, "--split", "test"])
    with pytest.raises(SystemExit, match=re.escape("--top-k takes whole numbers >= 0, got [1.5]")):
        main([*model, "--top-k", "1.5"])
    with pytest.raises(SystemExit, match=re.escape("--cfg takes finite numbers >= 0, got [-1.0]")):
        main([*model, "--cfg", "-1"])
    with pytest.raises(SystemExit, match=r"is not a model export: it has no config\.yaml"):
        main(["--model", str(tmp_path / "nowhere")])
    assert not list(tmp_path.glob("*.json"))  # nothing ran


@pytest.mark.slow
def test_sweep_on_a_tiny_export_with_the_real_solver(
    world: Config, tmp_path: Path, sp_model: Path, capsys: pytest.CaptureFixture
) -> None:
    """A random-weight tiny export through the command line: 2 x 2 settings on 2 prompts, greedy answers."""
    from tests.helpers import write_export

    export = write_export(tmp_path / "export", sp_model)
    out = tmp_path / "sweep"
    args = ["--model", str(export), "--cfg", "1", "3", "--top-k", "16", "64", "--limit", "2"]
    main([*args, "--output", str(out), "--no-progress", f"data.root={world.data.root}"])
    data = json.loads((out / JSON_FILE).read_text())
    rows = data["parts"]["generation"]["rows"]
    assert len(rows) == 4 and len(data["parts"]["understanding"]["rows"]) == 1
    assert data["parts"]["generation"]["chosen_index"] == choose(rows)
    for row in rows:
        bench = json.loads((Path(row["dir"]) / "shapesbench.json").read_text())
        assert bench["generation"]["settings"]["cfg_scale"] == row["setting"]["cfg_scale"]
        with Image.open(Path(row["dir"]) / bench["generation"]["records"][0]["image"]) as image:
            assert image.size == (32, 32)  # the export's recorded generation.image_size
    assert (out / PLOT_FILE).is_file() and "chosen: " in capsys.readouterr().out
