"""The config tree: every shipped YAML loads, typos and bad values name their key, inheritance, round trips."""

from __future__ import annotations

import dataclasses
import itertools
import re
import subprocess
import sys
from pathlib import Path

import pytest

import unified_mllm.config as config_module
from unified_mllm.config import (
    Config,
    ConfigError,
    LMConfig,
    add_config_arguments,
    config_from_args,
    iter_docs,
    load_config,
    save_config,
    to_yaml,
)

REPO = Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted((REPO / "configs").rglob("*.yaml"))


def test_there_are_config_files() -> None:
    names = {p.relative_to(REPO / "configs").as_posix() for p in CONFIG_FILES}
    assert {"quickstart.yaml", "model/tiny.yaml", "model/chameleon-7b.yaml", "data/shapes.yaml"} <= names


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.relative_to(REPO / "configs").as_posix())
def test_every_shipped_yaml_loads_and_validates(path: Path) -> None:
    config = load_config([path])
    assert isinstance(config, Config)
    assert "${" not in to_yaml(config)  # every interpolation resolves


def _yaml(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_are_the_published_shapes() -> None:
    config = load_config()
    assert (config.model.lm.hidden_size, config.model.lm.num_layers, config.model.lm.vocab_size) == (
        4096,
        32,
        65536,
    )
    assert config.model.vq.codebook_size == 8192 and config.model.vq.downsample_factor == 16
    assert (config.model.vision.image_size, config.model.vision.patch_size) == (384, 14)


def test_output_root_follows_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UMLLM_OUTPUT", str(tmp_path / "out"))
    config = load_config()
    assert config.output_root == str(tmp_path / "out")
    assert config.data.root == f"{tmp_path}/out/data/shapes"
    assert config.checkpoint.dir == f"{tmp_path}/out/runs/run"
    assert load_config(overrides=["run_name=abc"]).checkpoint.dir == f"{tmp_path}/out/runs/abc"


def test_yaml_then_overrides_win_in_order(tmp_path: Path) -> None:
    first = _yaml(tmp_path, "a.yaml", "optim: {lr: 0.001, warmup_steps: 7}\ntrain: {max_steps: 5}\n")
    second = _yaml(tmp_path, "b.yaml", "optim: {lr: 0.002}\n")
    config = load_config([first, second], ["train.max_steps=9", "model.lm.num_layers=3"])
    assert config.optim.lr == 0.002 and config.optim.warmup_steps == 7
    assert config.train.max_steps == 9 and config.model.lm.num_layers == 3


def test_base_files_merge_underneath_and_cycles_fail(tmp_path: Path) -> None:
    _yaml(tmp_path, "base.yaml", "optim: {lr: 0.5, warmup_steps: 3}\n")
    child = _yaml(tmp_path, "child.yaml", "_base_: base.yaml\noptim: {lr: 0.25}\n")
    config = load_config([child])
    assert (config.optim.lr, config.optim.warmup_steps) == (0.25, 3)
    _yaml(tmp_path, "x.yaml", "_base_: y.yaml\n")
    cycle = _yaml(tmp_path, "y.yaml", "_base_: x.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config([cycle])
    with pytest.raises(ConfigError, match=r"config file not found: .*nope\.yaml"):
        load_config([tmp_path / "nope.yaml"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lrr=1", r"unknown config key `optim.lrr`"),
        ("model.lm.hiden_size=8", r"unknown config key `model.lm.hiden_size`"),
        ("train.max_steps=many", r"bad value for `train.max_steps`"),
        ("model.lm.arch=gpt", r"bad value for `model.lm.arch`"),
        ("train.precision=fp8", r"bad value for `train.precision`"),
    ],
)
def test_typos_and_wrong_types_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[override])


def test_yaml_typo_names_file_and_key(tmp_path: Path) -> None:
    path = _yaml(tmp_path, "typo.yaml", "data:\n  world:\n    num_trian: 5\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: unknown config key `data.world.num_trian`"):
        load_config([path])
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config([_yaml(tmp_path, "broken.yaml", "a: [1, 2\n")])
    with pytest.raises(ConfigError, match=r"key\.sub=value"):
        load_config(overrides=["optim.lr"])


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("model.lm.num_heads=5", "model.lm.hidden_size"),
        ("model.lm.num_kv_heads=3", "model.lm.num_kv_heads"),
        ("model.vq.resolution=500", "model.vq.resolution"),
        ("data.world.max_objects=10", "data.world.max_objects"),
        ("train.stage=4", "train.stage"),
        ("generation.cfg_scale=-1", "generation.cfg_scale"),
        ("generation.image_top_k=0", "generation.image_top_k"),
        ("generation.jacobi_window=-1", "generation.jacobi_window"),
        ("data.sources=[{path: /d, loss_weight: 0}]", "data.sources[0].loss_weight"),
        ("optim.betas=[0.9]", "optim.betas"),
        ("model.vision.anyres.grids=[[0,2]]", "model.vision.anyres.grids[0]"),
        ("model.vision.feature_layer=28", "model.vision.feature_layer"),
        ("model.vision.feature_layer=-29", "model.vision.feature_layer"),
        ("model.vision.anyres.pad_color=[255,255]", "model.vision.anyres.pad_color"),
        ("model.vision.anyres.pad_color=[0,0,300]", "model.vision.anyres.pad_color"),
    ],
)
def test_validate_names_the_offending_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"`{key}`")):
        load_config(overrides=[override])
    load_config(overrides=[override], check=False)  # the raw tree still builds without validation


def test_list_of_sections_is_typed(tmp_path: Path) -> None:
    path = _yaml(
        tmp_path,
        "mix.yaml",
        "data:\n  sources:\n    - {path: /d/a, task: vqa, ratio: 2}\n    - {path: /d/b}\n",
    )
    config = load_config([path])
    assert [(s.path, s.task, s.ratio) for s in config.data.sources] == [
        ("/d/a", "vqa", 2.0),
        ("/d/b", "caption", 1.0),
    ]
    bad = _yaml(tmp_path, "badmix.yaml", "data:\n  sources:\n    - {path: /d/a, weight: 2}\n")
    with pytest.raises(ConfigError, match="weight"):
        load_config([bad])


def test_save_and_reload_round_trip(tmp_path: Path) -> None:
    config = load_config(
        overrides=["model.lm.num_layers=3", "optim.param_groups=[{match: vision, lr_scale: 0.01}]"]
    )
    path = tmp_path / "run" / "config.yaml"
    save_config(config, path)
    assert not list(path.parent.glob("*.tmp"))
    again = load_config([path])
    assert dataclasses.asdict(again) == dataclasses.asdict(config)


def test_every_field_is_documented() -> None:
    rows = iter_docs()
    assert len(rows) > 80
    undocumented = [key for key, doc, _ in rows if len(doc) < 8]
    assert undocumented == []
    assert ("model.lm.hidden_size", "Width of the residual stream.", 4096) in rows


def test_fields_have_defaults_so_sections_build_bare() -> None:
    assert LMConfig().hidden_size == 4096
    for key, _, default in iter_docs():
        assert default is not dataclasses.MISSING, key


def test_argparse_helpers_accept_overrides_anywhere(tmp_path: Path) -> None:
    import argparse

    path = _yaml(tmp_path, "a.yaml", "train: {max_steps: 11}\n")
    parser = argparse.ArgumentParser()
    parser.add_argument("command")
    add_config_arguments(parser)
    args = parser.parse_intermixed_args(["go", "optim.lr=0.5", "--config", str(path), "train.seed=4"])
    config = config_from_args(args)
    assert (args.command, config.optim.lr, config.train.max_steps, config.train.seed) == ("go", 0.5, 11, 4)


def test_cli_prints_resolved_yaml_and_docs() -> None:
    run = [sys.executable, "-m", "unified_mllm.config"]
    out = subprocess.run([*run, "optim.lr=0.125"], capture_output=True, text=True, check=True).stdout
    assert "lr: 0.125" in out
    docs = subprocess.run([*run, "--docs"], capture_output=True, text=True, check=True).stdout
    assert "model.vq.codebook_size = 8192" in docs
    bad = subprocess.run([*run, "optim.lrr=1"], capture_output=True, text=True)
    assert bad.returncode != 0 and "optim.lrr" in bad.stderr


def test_relative_files_resolve_beside_the_yaml_or_in_the_repo(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "cfg" / "tok").mkdir(parents=True)
    (tmp_path / "cfg" / "tok" / "t.json").write_text("{}")
    (tmp_path / "cfg" / "x.yaml").write_text(
        "tokenizer:\n  path: tok/t.json\nmodel:\n  vq:\n    checkpoint: vq.ckpt\n"
    )
    repo = tmp_path / "repo"
    (repo / "tokenizers" / "chameleon").mkdir(parents=True)
    (repo / "tokenizers" / "chameleon" / "vqgan.ckpt").write_bytes(b"")
    monkeypatch.setattr(config_module, "REPO_ROOT", repo)
    monkeypatch.chdir(tmp_path)  # neither file exists from here
    config = load_config(
        [tmp_path / "cfg" / "x.yaml"], ["model.lm.pretrained=tokenizers/chameleon/vqgan.ckpt"]
    )
    assert config.tokenizer.path == str(tmp_path / "cfg" / "tok" / "t.json")  # beside the YAML
    assert config.model.lm.pretrained == str(repo / "tokenizers" / "chameleon" / "vqgan.ckpt")  # in the repo
    assert config.model.vq.checkpoint == "vq.ckpt"  # found nowhere: left for the loader to name
    (tmp_path / "vq.ckpt").write_bytes(b"")
    assert (
        load_config([tmp_path / "cfg" / "x.yaml"]).model.vq.checkpoint == "vq.ckpt"
    )  # the working dir first


def test_the_longer_recipe_chains_its_stages_from_one_export_to_the_next() -> None:
    stages = [load_config([REPO / "configs" / "train" / f"long-stage{i}.yaml"]) for i in range(5)]
    assert [c.train.max_steps for c in stages] == [2400, 150, 600, 1800, 200]
    assert [c.train.stage for c in stages] == [0, 1, 2, 3, 2]  # the last run: stage 2's mix again
    assert stages[0].checkpoint.init_from is None
    for previous, stage in itertools.pairwise(stages):
        assert stage.checkpoint.init_from == previous.checkpoint.export_dir
    assert [s.name for s in stages[3].data.sources] == ["vqa"]
    assert [s.name for s in stages[4].data.sources] == ["vqa", "caption", "t2i"]
    quickstart = [load_config([REPO / "configs" / "train" / f"tiny-stage{i}.yaml"]) for i in range(3)]
    assert not {c.checkpoint.dir for c in stages} & {c.checkpoint.dir for c in quickstart}
