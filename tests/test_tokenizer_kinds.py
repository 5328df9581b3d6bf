"""The tokenizer trainer and evaluator on UniTok and DualToken: tiny runs end to end, exact resume, reloads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers import torchrun_tokenizer
from unified_mllm.config import Config, load_config
from unified_mllm.data.shapes import write_split
from unified_mllm.eval import tokenizer as eval_tokenizer
from unified_mllm.train.run_log import METRICS_FILE
from unified_mllm.train.tokenizer import SUMMARY_FILE, train_tokenizer
from unified_mllm.vision.tokenizer_registry import build_visual_tokenizer, load_visual_tokenizer

REPO = Path(__file__).resolve().parents[1]
COMMON = [
    "vq_train.batch_size=4",
    "vq_train.steps=4",
    "vq_train.warmup_steps=1",
    "vq_train.schedule=constant",
    "vq_train.log_every=2",
    "vq_train.eval_every=0",
    "vq_train.eval_images=4",
    "vq_train.checkpoint_every=2",
    "vq_train.restart_every=2",
    "vq_train.shuffle_buffer=16",
    "model.vq.dead_code_steps=1",
    "train.wandb.mode=disabled",
]
# 32 px images, 8 x 8 px per position → 4 x 4 positions; a few thousand parameters per part.
SMALL = {
    "unitok": [
        "model.vq.resolution=32",
        "model.vq.codebook_size=16",
        "model.vq.embed_dim=8",
        "model.vq.unitok.num_codebooks=2",
        "model.vq.unitok.conv_widths=[8]",
        "model.vq.unitok.width=32",
        "model.vq.unitok.encoder_layers=1",
        "model.vq.unitok.decoder_layers=1",
        "model.vq.unitok.num_heads=2",
        "model.vq.unitok.projection_heads=2",
        "model.vq.unitok.clip_dim=16",
        "model.vq.unitok.text_width=16",
        "model.vq.unitok.text_layers=1",
        "model.vq.unitok.text_heads=2",
        "vq_train.gan_weight=0.1",
        "vq_train.disc_start_step=2",
        "vq_train.disc_feature_layers=[0,1]",
    ],
    "dualtoken": [
        "model.vq.resolution=32",
        "model.vq.codebook_size=16",
        "model.vq.embed_dim=8",
        "model.vq.z_channels=32",
        "model.vq.channel_mult=[1,1,1,1]",
        "model.vision.image_size=32",
        "model.vision.hidden_size=32",
        "model.vision.intermediate_size=64",
        "model.vision.num_heads=2",
        "model.vq.dualtoken.pretrained=null",
        "model.vq.dualtoken.pixel_depth=2",
        "model.vq.dualtoken.semantic_depth=2",
        "model.vq.dualtoken.projection_heads=2",
        "model.vq.dualtoken.decoder_latent_side=4",
        "vq_train.gan_weight=0.1",
        "vq_train.disc_start_step=2",
        "vq_train.disc_channels=16",
    ],
}


@pytest.fixture(scope="module")
def world_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small world (32 train, 8 test scenes) and the text tokenizer UniTok's captions need."""
    root = tmp_path_factory.mktemp("world")
    config = load_config(
        [str(REPO / "configs" / "quickstart.yaml")], ["data.world.num_train=32", "data.world.num_test=8"]
    )
    for split in ("train", "test"):
        write_split(config.data.world, root, split, progress=False)
    return root


def _overrides(kind: str, world_root: Path, output: Path, sp_model: Path, *extra: str) -> list[str]:
    return [
        f"output_root={output}",
        f"data.root={world_root}",
        f"tokenizer.path={sp_model}",  # conftest's sentencepiece model: 400 pieces, 9 size tokens
        "tokenizer.vocab_size=400",
        "tokenizer.num_size_tokens=9",
        "vq_train.eval_data=${data.root}/test",
        *COMMON,
        *SMALL[kind],
        *extra,
    ]


def _recipe(kind: str) -> str:
    return str(REPO / "configs" / "tokenizer" / f"{kind}-tiny.yaml")


def _config(kind: str, world_root: Path, output: Path, sp_model: Path, *extra: str) -> Config:
    return load_config([_recipe(kind)], _overrides(kind, world_root, output, sp_model, *extra))


@pytest.mark.parametrize("kind", ["unitok", "dualtoken"])
def test_tiny_run_trains_saves_and_resumes_exactly(
    kind: str, world_root: Path, tmp_path: Path, sp_model: Path
) -> None:
    full = _config(kind, world_root, tmp_path / "full", sp_model)
    summary = train_tokenizer(full, progress=False)
    assert summary["steps"] == 4
    records = [
        json.loads(line) for line in (Path(full.vq_train.output_dir) / METRICS_FILE).read_text().splitlines()
    ]
    last = [r for r in records if r["kind"] == "train"][-1]
    extra = "contrastive" if kind == "unitok" else "semantic"
    assert {extra, "l1", "usage", "perplexity", "g_loss", "d_loss"} <= set(last)
    if kind == "dualtoken":
        assert {"usage_pixel", "usage_semantic"} <= set(last)

    # Stop after step 2 (a checkpoint), then resume to step 4: the same weights as the uninterrupted run
    # (a constant LR, so that the shorter first run does not anneal differently).
    split_dir = tmp_path / "split"
    half = _config(kind, world_root, split_dir, sp_model, "vq_train.steps=2")
    train_tokenizer(half, progress=False)
    (Path(half.vq_train.output_dir) / SUMMARY_FILE).unlink()  # not finished: resume instead of reuse
    resumed = _config(kind, world_root, split_dir, sp_model)
    train_tokenizer(resumed, progress=False)
    a = load_visual_tokenizer(full.vq_train.output_dir)
    b = load_visual_tokenizer(resumed.vq_train.output_dir)
    assert a.kind == kind and a.code_depth == full.model.vq.code_depth
    for (name, x), y in zip(a.state_to_save().items(), b.state_to_save().values()):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=0, msg=lambda m, name=name: f"{name}: {m}")

    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    codes = a.encode(pixels)
    assert codes.shape == (2, 4, 4, full.model.vq.code_depth)
    assert a.decode(codes).shape == (2, 3, 32, 32)


@pytest.mark.slow
def test_two_rank_unitok_run_contrasts_the_global_batch(
    world_root: Path, tmp_path: Path, sp_model: Path
) -> None:
    """UniTok under torchrun (DDP, gloo): the contrastive loss gathers both ranks' embeddings inside the
    forward; the run finishes and logs it."""
    config = _config("unitok", world_root, tmp_path, sp_model)
    torchrun_tokenizer(_overrides("unitok", world_root, tmp_path, sp_model), recipe=_recipe("unitok"))
    out = Path(config.vq_train.output_dir)
    assert json.loads((out / SUMMARY_FILE).read_text())["world_size"] == 2
    records = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]
    assert all(r["contrastive"] > 0 for r in records if r["kind"] == "train")


@pytest.mark.parametrize("kind", ["unitok", "dualtoken"])
def test_evaluation_cli_reports_every_code_slot(
    kind: str, world_root: Path, tmp_path: Path, sp_model: Path
) -> None:
    config = _config(kind, world_root, tmp_path, sp_model, "vq_train.steps=2", "vq_train.gan_weight=0")
    train_tokenizer(config, progress=False)
    out = Path(config.vq_train.output_dir)
    args = [_recipe(kind)]
    overrides = [
        f"output_root={tmp_path}",
        f"data.root={world_root}",
        *SMALL[kind],
        f"tokenizer.path={sp_model}",
        "tokenizer.vocab_size=400",
        "tokenizer.num_size_tokens=9",
    ]
    result = eval_tokenizer.run(
        eval_tokenizer._parser().parse_intermixed_args(
            ["--config", *args, *overrides, "--checkpoint", str(out), "--no-progress", "--device", "cpu"]
        )
    )
    depth = config.model.vq.code_depth
    assert result["num_images"] == 8 and result["code_slots"] == depth
    assert result["codebook_size"] == depth * config.model.vq.codebook_size
    assert 0 < result["codebook_usage"] <= 1 and result["judge"]["scenes"] == 8
    if kind == "unitok":  # its own text tower gives a zero-shot figure (DualToken here has no teacher dir)
        assert 0 <= result["zero_shot"]["accuracy"] <= 1
    else:
        assert result["zero_shot"] is None


def test_unitok_trains_and_evaluates_on_shards_without_objects(
    user_shards: Path, tmp_path: Path, sp_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A user's captioned shards (no world ``objects``): training and its PSNR / SSIM / usage evaluation work,
    and the evaluation CLI reports the reconstruction figures only: no judge, no zero-shot, no NaN."""
    overrides = _overrides(
        "unitok", user_shards, tmp_path, sp_model, "vq_train.steps=2", "vq_train.gan_weight=0"
    )
    config = load_config([_recipe("unitok")], overrides)
    summary = train_tokenizer(config, progress=False)
    final = summary["final_eval"]
    assert summary["steps"] == 2 and 0 < final["psnr"] < 100 and -1 <= final["ssim"] <= 1
    assert 0 < final["usage"] <= 1
    out = Path(config.vq_train.output_dir)
    argv = [
        "--config",
        _recipe("unitok"),
        *overrides,
        "--checkpoint",
        str(out),
        "--no-progress",
        "--device",
        "cpu",
    ]
    capsys.readouterr()
    result = eval_tokenizer.run(eval_tokenizer._parser().parse_intermixed_args(argv))
    assert result["num_images"] == 10 and result["judge"] is None and result["zero_shot"] is None
    assert 0 < result["psnr"] < 100 and 0 < result["codebook_usage"] <= 1
    written = (out / "eval_test.json").read_text()
    assert "NaN" not in written and json.loads(written)["judge"] is None
    printed = capsys.readouterr().out
    assert "| PSNR (dB) |" in printed and "nan" not in printed.lower()
    assert "judge" not in printed and "zero-shot" not in printed


@pytest.mark.parametrize(
    ("recipe", "millions"),
    [("unitok-large", 820.3), ("dualtoken-so400m", 639.5)],  # UniTok-Large in all; DualToken's trainable part
)
def test_published_recipes_build_on_meta_at_the_published_size(recipe: str, millions: float) -> None:
    config = load_config([str(REPO / "configs" / "tokenizer" / f"{recipe}.yaml")])
    tokenizer = build_visual_tokenizer(config.model.vq, device="meta")
    trainable = sum(p.numel() for p in tokenizer.parameters() if p.requires_grad)
    assert abs(trainable / 1e6 - millions) / millions < 0.01
    assert tokenizer.latent_size == {"unitok-large": 16, "dualtoken-so400m": 27}[recipe]
