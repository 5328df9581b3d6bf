"""The VQ-GAN trainer (single process, two-process DDP with exact resume) and the evaluation CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import torchrun_tokenizer
from unified_mllm.config import Config, load_config
from unified_mllm.data.shapes import write_split
from unified_mllm.eval import tokenizer as eval_tokenizer
from unified_mllm.train.checkpoint import list_checkpoints, load_checkpoint
from unified_mllm.train.harness import CHECKPOINT_DIR, CURVES_FILE
from unified_mllm.train.run_log import METRICS_FILE
from unified_mllm.train.tokenizer import GRID_FILE, SUMMARY_FILE, train_tokenizer
from unified_mllm.vision.vqgan import VQGAN, VQCheckpointError

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "configs" / "tokenizer" / "vqgan-tiny.yaml")
# A small VQ-GAN (16 px, 2x downsampling → 8 x 8 codes of 64) and a short run: seconds on a CPU.
SMALL = [
    "model.vq.resolution=16",
    "model.vq.channel_mult=[1,2]",
    "model.vq.codebook_size=64",
    "model.vq.embed_dim=8",
    "model.vq.dead_code_steps=2",
    "vq_train.batch_size=4",
    "vq_train.steps=6",
    "vq_train.warmup_steps=2",
    "vq_train.disc_start_step=2",
    "vq_train.gan_weight=0.1",
    "vq_train.disc_channels=16",
    "vq_train.restart_every=2",
    "vq_train.log_every=2",
    "vq_train.eval_every=3",
    "vq_train.eval_images=4",
    "vq_train.checkpoint_every=3",
    "vq_train.keep_last=5",
    "vq_train.shuffle_buffer=16",
    "train.wandb.mode=disabled",
]


@pytest.fixture(scope="module")
def world_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small world: 48 train and 16 test scenes in shards of 16."""
    root = tmp_path_factory.mktemp("world")
    config = load_config([RECIPE], ["data.world.num_train=48", "data.world.num_test=16"])
    for split in ("train", "test"):
        write_split(config.data.world, root, split, progress=False)
    return root


def _overrides(world_root: Path, output_root: Path, *extra: str) -> list[str]:
    return [
        f"output_root={output_root}",
        f"data.root={world_root}",
        "vq_train.eval_data=${data.root}/test",
        *SMALL,
        *extra,
    ]


def _config(world_root: Path, output_root: Path, *extra: str) -> Config:
    return load_config([RECIPE], _overrides(world_root, output_root, *extra))


@pytest.fixture(scope="module")
def trained(world_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Config:
    """A finished single-process run."""
    config = _config(world_root, tmp_path_factory.mktemp("single"))
    train_tokenizer(config, progress=False)
    return config


def test_recipe_config_loads() -> None:
    config = load_config([RECIPE])
    assert config.model.vq.codebook_size == 512 and config.model.vq.resolution == 64
    assert config.vq_train.output_dir.endswith("tokenizer/vqgan-quickstart")
    assert config.vq_train.train_data.endswith("data/shapes/train")
    chameleon = load_config([str(REPO / "configs" / "tokenizer" / "vqgan-chameleon.yaml")])
    assert chameleon.model.vq.codebook_size == 8192 and chameleon.model.vq.resolution == 512


def test_single_process_run_writes_a_loadable_tokenizer(
    trained: Config, capsys: pytest.CaptureFixture
) -> None:
    out = Path(trained.vq_train.output_dir)
    for name in (
        "model.safetensors",
        "config.json",
        "config.yaml",
        SUMMARY_FILE,
        METRICS_FILE,
        CURVES_FILE,
        GRID_FILE,
    ):
        assert (out / name).is_file(), name
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["steps"] == 6 and summary["samples_seen"] == 24 and summary["world_size"] == 1
    records = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [2, 4, 6]
    assert {"l1", "l2", "codebook", "commitment", "usage", "perplexity", "lr", "sec_per_step"} <= set(
        train[0]
    )
    assert {"g_loss", "d_loss", "gan_weight"} <= set(train[-1])  # the discriminator started at step 2
    assert [r["step"] for r in records if r["kind"] == "eval"] == [3, 6]
    assert [s for s, _ in list_checkpoints(out / CHECKPOINT_DIR)] == [3, 6]
    assert (out / CHECKPOINT_DIR / "step-00000003" / "config.yaml").is_file()  # the resolved config beside it
    vqgan = VQGAN.from_checkpoint(out)
    codes = vqgan.encode(torch.zeros(2, 3, 16, 16))
    assert codes.shape == (2, 8, 8) and int(codes.max()) < 64
    # Re-running the finished run reuses it.
    capsys.readouterr()
    again = train_tokenizer(trained, progress=False)
    assert again == summary and "reusing the finished tokenizer" in capsys.readouterr().out


@pytest.mark.slow
def test_more_steps_resume_to_the_uninterrupted_weights(world_root: Path, tmp_path: Path) -> None:
    """Finish 3 steps, then ask for 6: the run resumes from step 3 and matches a straight 6-step run
    (a constant LR, so the schedule does not depend on the total)."""
    constant = ("vq_train.schedule=constant", "vq_train.warmup_steps=0")
    straight = _config(world_root, tmp_path / "a", *constant)
    train_tokenizer(straight, progress=False)
    short = _config(world_root, tmp_path / "b", *constant, "vq_train.steps=3")
    train_tokenizer(short, progress=False)
    extended = _config(world_root, tmp_path / "b", *constant)
    summary = train_tokenizer(extended, progress=False)
    assert summary["steps"] == 6
    _assert_same_weights(Path(straight.vq_train.output_dir), Path(extended.vq_train.output_dir))


def _assert_same_weights(a: Path, b: Path) -> None:
    first, second = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert first.keys() == second.keys()
    different = [k for k in first if not torch.equal(first[k], second[k])]
    assert not different, different[:5]
    disc_a = load_checkpoint(list_checkpoints(a / CHECKPOINT_DIR)[-1][1])["discriminator"]
    disc_b = load_checkpoint(list_checkpoints(b / CHECKPOINT_DIR)[-1][1])["discriminator"]
    assert all(torch.equal(disc_a[k], disc_b[k]) for k in disc_a)


@pytest.mark.slow
def test_two_process_ddp_run_resumes_exactly(world_root: Path, tmp_path: Path) -> None:
    """Two ranks (gloo): an uninterrupted 6-step run, and a run killed after its step-3 checkpoint (its
    directory holds nothing but that checkpoint) that resumes: same final generator and discriminator."""
    extra = ("model.vq.ema_decay=0.99", "vq_train.disc_norm=batch")
    torchrun_tokenizer(_overrides(world_root, tmp_path / "a", *extra), recipe=RECIPE)
    out_a = Path(_config(world_root, tmp_path / "a").vq_train.output_dir)
    summary = json.loads((out_a / SUMMARY_FILE).read_text())
    assert summary["world_size"] == 2 and summary["samples_seen"] == 6 * 4 * 2
    out_b = Path(_config(world_root, tmp_path / "b").vq_train.output_dir)
    shutil.copytree(out_a / CHECKPOINT_DIR / "step-00000003", out_b / CHECKPOINT_DIR / "step-00000003")
    torchrun_tokenizer(_overrides(world_root, tmp_path / "b", *extra), recipe=RECIPE)
    assert json.loads((out_b / SUMMARY_FILE).read_text())["steps"] == 6
    _assert_same_weights(out_a, out_b)


def test_eval_cli_on_the_trained_tokenizer(trained: Config, world_root: Path) -> None:
    out = Path(trained.vq_train.output_dir)
    argv = ["--config", RECIPE, *_overrides(world_root, out.parents[2]), "--checkpoint", str(out)]
    result = eval_tokenizer.run(
        eval_tokenizer._parser().parse_intermixed_args([*argv, "--limit", "10", "--no-progress"])
    )
    written = json.loads((out / "eval_test.json").read_text())
    assert written["num_images"] == result["num_images"] == 10
    assert 0 < written["psnr"] < 100 and -1 <= written["ssim"] <= 1
    assert 0 < written["codebook_usage"] <= 1 and 1 <= written["perplexity"] <= 64
    judge = written["judge"]
    assert 0 <= judge["object_accuracy"] <= 1 and 0 <= judge["scene_accuracy"] <= 1
    assert judge["scenes"] == 10 and judge["objects"] >= 10
    assert 0 <= judge["originals"]["object_accuracy"] <= 1
    assert "| PSNR (dB) |" in (out / "eval_test.md").read_text()


def test_eval_cli_reports_a_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="error"):
        eval_tokenizer.main(["--config", RECIPE, "--checkpoint", str(tmp_path / "absent"), "--no-progress"])


def test_fine_tuning_starts_from_trained_weights(trained: Config, world_root: Path, tmp_path: Path) -> None:
    """vq_train.init_from loads a trained tokenizer before the first step: zero steps of LR leave it intact."""
    source = Path(trained.vq_train.output_dir)
    config = _config(
        world_root,
        tmp_path,
        f"vq_train.init_from={source}",
        "vq_train.steps=1",
        "vq_train.lr=1e-12",
        "vq_train.disc_start_step=5",
        "model.vq.dead_code_steps=0",
    )
    train_tokenizer(config, progress=False)
    before = load_file(str(source / "model.safetensors"))
    after = load_file(str(Path(config.vq_train.output_dir) / "model.safetensors"))
    weights = [k for k in before if not k.startswith("quantize.") and before[k].is_floating_point()]
    assert weights and all(torch.allclose(before[k], after[k], atol=1e-6) for k in weights)


def test_fine_tuning_from_another_architecture_names_the_keys(
    trained: Config, world_root: Path, tmp_path: Path
) -> None:
    config = _config(
        world_root, tmp_path, f"vq_train.init_from={trained.vq_train.output_dir}", "model.vq.embed_dim=16"
    )
    with pytest.raises(VQCheckpointError, match="quant_conv"):
        train_tokenizer(config, progress=False)
