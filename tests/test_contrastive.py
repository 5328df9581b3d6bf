"""Contrastive SigLIP pre-training: the sigmoid loss, the model, the data stream, training and the CLI."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from unified_mllm.config import ContrastiveConfig, VisionConfig, get_preset, load_config
from unified_mllm.data.shards import Sample, ShardWriter, list_shards
from unified_mllm.text import TextTokenizer
from unified_mllm.train import contrastive as C
from unified_mllm.train.checkpoint import list_checkpoints, load_checkpoint
from unified_mllm.train.harness import CHECKPOINT_DIR, CRASH_ENV, CRASH_EXIT_CODE
from unified_mllm.train.run_log import METRICS_FILE, read_metrics
from unified_mllm.train.schedule import warmup_cosine
from unified_mllm.vision.contrastive import (
    build_contrastive_model,
    embed_images,
    embed_texts,
    load_contrastive,
    text_attention_mask,
    tokenize,
)
from unified_mllm.vision.siglip import load_siglip_pretrained

REPO = Path(__file__).resolve().parents[1]
COLORS = {"red": (220, 30, 30), "green": (30, 160, 60), "blue": (30, 70, 230)}
SHAPES = ("circle", "square")
CELLS = ("top left", "top right", "bottom left", "bottom right")


def small_contrastive(**changes: object) -> ContrastiveConfig:
    base = ContrastiveConfig(
        text_hidden_size=32,
        text_intermediate_size=64,
        text_num_layers=1,
        text_num_heads=2,
        text_max_length=12,
        batch_size=6,
        max_steps=4,
        warmup_steps=1,
        shuffle_buffer=8,
    )
    return dataclasses.replace(base, **changes)


def scene(color: str, shape: str, cell: int) -> Image.Image:
    """A 64 px white image with one coloured circle or square in one quadrant."""
    image = Image.new("RGB", (64, 64), (255, 255, 255))
    x, y = 32 * (cell % 2) + 4, 32 * (cell // 2) + 4
    draw = ImageDraw.Draw(image)
    (draw.ellipse if shape == "circle" else draw.rectangle)((x, y, x + 23, y + 23), fill=COLORS[color])
    return image


def write_world(root: Path, split: str, n: int, seed: int) -> None:
    """Shards in the world's record format (caption + objects), one object per scene."""
    rng = np.random.default_rng(seed)
    with ShardWriter(root / split, f"tiny-{split}", 16) as writer:
        for i in range(n):
            color = list(COLORS)[int(rng.integers(len(COLORS)))]
            shape, cell = SHAPES[int(rng.integers(2))], int(rng.integers(4))
            objects = [{"shape": shape, "color": color, "size": "large", "row": cell // 2, "col": cell % 2}]
            caption = f"a large {color} {shape} in the {CELLS[cell]}"
            writer.write(
                f"{split}-{i:04d}", scene(color, shape, cell), {"caption": caption, "objects": objects}
            )


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("world")
    write_world(root, "train", 40, seed=0)
    write_world(root, "test", 12, seed=1)
    return root


@pytest.fixture
def vision() -> VisionConfig:
    return get_preset("tiny").vision


# -------------------------------------------------------------------------------------------------- loss


def test_sigmoid_loss_matches_hand_computation() -> None:
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # image embeddings
    y = torch.tensor([[0.6, 0.8], [1.0, 0.0]])  # text embeddings
    t_prime, b = torch.tensor(math.log(2.0)), torch.tensor(-1.0)
    # logits_ij = 2 <x_i, y_j> - 1: [[0.2, 1.0], [0.6, -1.0]]; the diagonal pairs are positives.
    logits = {(0, 0): 0.2, (0, 1): 1.0, (1, 0): 0.6, (1, 1): -1.0}

    def log_sigmoid(v: float) -> float:
        return -math.log1p(math.exp(-v))

    total = sum(log_sigmoid((1.0 if i == j else -1.0) * z) for (i, j), z in logits.items())
    expected = -total / 2  # summed over the 4 pairs, divided by the batch size
    got = C.sigmoid_loss(x, y, t_prime, b)
    assert got.item() == pytest.approx(expected, abs=1e-6)
    # By hand: (log(1+e^-0.2) + log(1+e^1) + log(1+e^1) + log(1+e^0.6)) / 2
    #        = (0.59814 + 1.31326 + 1.31326 + 1.03749) / 2 = 2.13108
    assert expected == pytest.approx(2.13108, abs=1e-4)


def test_sigmoid_loss_matches_transformers(vision: VisionConfig) -> None:
    torch.manual_seed(0)
    model = build_contrastive_model(vision, small_contrastive(), vocab_size=50, pad_id=3).eval()
    pixels, ids = torch.rand(3, 3, 64, 64) * 2 - 1, torch.randint(0, 50, (3, 12))
    ids[:, -4:] = 3  # some padding, masked the same way on both sides
    mask = text_attention_mask(ids, pad_id=3)
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, return_loss=True).loss
        ours = C.sigmoid_loss(
            embed_images(model, pixels), embed_texts(model, ids), model.logit_scale, model.logit_bias
        )
    assert ours.item() == pytest.approx(reference.item(), rel=1e-5)


def test_model_starts_at_siglip_temperature_and_bias(vision: VisionConfig) -> None:
    model = build_contrastive_model(vision, small_contrastive(), vocab_size=50, pad_id=3)
    assert model.logit_scale.exp().item() == pytest.approx(10.0, rel=1e-5)
    assert model.logit_bias.item() == -10.0
    assert model.config.text_config.projection_size == vision.hidden_size
    assert model.vision_model.config.vision_use_head


def test_schedule_warms_up_then_decays() -> None:
    # The contrastive trainer's LR factor (warmup_steps=10, max_steps=100, min_lr_ratio=0.1).
    factor = warmup_cosine(warmup_steps=10, total_steps=100, min_ratio=0.1)
    assert factor(0) == pytest.approx(0.1)
    assert factor(9) == pytest.approx(1.0)
    assert factor(10) == pytest.approx(1.0)
    assert factor(55) == pytest.approx(0.55)
    assert factor(100) == pytest.approx(0.1)


# -------------------------------------------------------------------------------------------------- data


def test_text_mask_hides_padding_but_keeps_the_pooled_slot() -> None:
    ids = torch.tensor([[5, 6, 3, 3], [5, 6, 7, 8]])
    assert text_attention_mask(ids, pad_id=3).tolist() == [[1, 1, 0, 1], [1, 1, 1, 1]]


def test_tokenize_pads_and_cuts_to_a_fixed_length(sp_tokenizer: TextTokenizer) -> None:
    ids = tokenize(sp_tokenizer, ["a red circle", "a " * 30], max_length=8)
    pad = sp_tokenizer.special_tokens().pad
    assert ids.shape == (2, 8) and ids.dtype == torch.long
    short = sp_tokenizer.encode("a red circle")
    assert ids[0, : len(short)].tolist() == short and set(ids[0, len(short) :].tolist()) == {pad}
    assert pad not in ids[1].tolist()


def test_caption_batches_stream_past_one_epoch(
    world: Path, sp_tokenizer: TextTokenizer, vision: VisionConfig
) -> None:
    cfg = small_contrastive(batch_size=16)
    batches = C.caption_batches(list_shards(world / "train"), sp_tokenizer, vision, cfg)
    shapes = [
        tuple(p.shape) + tuple(i.shape) + tuple(n.shape) for p, i, n in (next(batches) for _ in range(5))
    ]  # 80 > 40 samples; no hard negatives asked for
    assert shapes == [(16, 3, 64, 64, 16, 12, 0, 12)] * 5


def test_caption_batches_skip_resumes_the_same_stream(
    world: Path, sp_tokenizer: TextTokenizer, vision: VisionConfig
) -> None:
    cfg = small_contrastive(batch_size=16)
    shards = list_shards(world / "train")
    straight = C.caption_batches(shards, sp_tokenizer, vision, cfg)
    expected = [next(straight) for _ in range(5)][3:]  # past the first epoch of 40 samples
    resumed = C.caption_batches(shards, sp_tokenizer, vision, cfg, skip=3)
    for got, want in zip((next(resumed) for _ in range(2)), expected):
        assert all(torch.equal(a, b) for a, b in zip(got, want))


# ---------------------------------------------------------------------------------------------- training


def test_a_few_steps_reduce_the_loss(world: Path, sp_tokenizer: TextTokenizer, vision: VisionConfig) -> None:
    cfg = small_contrastive(batch_size=8, max_steps=12, lr=3e-3, warmup_steps=2)
    torch.manual_seed(0)
    model = build_contrastive_model(vision, cfg, sp_tokenizer.vocab_size, sp_tokenizer.special_tokens().pad)
    fixed = next(C.caption_batches(list_shards(world / "train"), sp_tokenizer, vision, cfg))

    def loss_on_fixed() -> float:
        with torch.no_grad():
            pixels, ids, _ = fixed
            embeds = embed_images(model, pixels), embed_texts(model, ids)
            return C.sigmoid_loss(*embeds, model.logit_scale, model.logit_bias).item()

    before = loss_on_fixed()
    optimizer = C.make_optimizer(model, cfg)
    schedule = C.make_schedule(optimizer, cfg)
    batches = C.caption_batches(list_shards(world / "train"), sp_tokenizer, vision, cfg)
    losses = [C.train_step(model, optimizer, schedule, next(batches), cfg) for _ in range(12)]
    assert len(losses) == 12 and all(math.isfinite(v) for v in losses)
    assert loss_on_fixed() < 0.7 * before


def test_zero_shot_eval_counts_single_object_images(
    world: Path, sp_tokenizer: TextTokenizer, vision: VisionConfig
) -> None:
    from unified_mllm.data.shards import iter_samples

    model = build_contrastive_model(vision, small_contrastive(), sp_tokenizer.vocab_size, 3)
    samples = list(iter_samples(world / "test"))
    samples[0].meta["objects"] = samples[0].meta["objects"] * 2  # a two-object image is left out
    cfg = small_contrastive(prompt_template="a photo of a {color} {shape}")  # one prompt per class
    result = C.zero_shot_eval(model, sp_tokenizer, samples, vision, cfg, list(COLORS), SHAPES)
    assert result["num_images"] == 11
    assert 0.0 <= result["accuracy"] <= min(result["color_accuracy"], result["shape_accuracy"]) <= 1.0
    assert result["chance"] == {"accuracy": 1 / 6, "color": 1 / 3, "shape": 1 / 2}


# --------------------------------------------------------------------------------------------------- CLI


def cli_args(world: Path, sp_model: Path, *extra: str) -> list[str]:
    return [
        "--config",
        str(REPO / "configs/quickstart.yaml"),
        "--no-progress",
        f"data.root={world}",
        f"tokenizer.path={sp_model}",
        "data.world.colors=[red,green,blue]",
        "data.world.shapes=[circle,square]",
        "contrastive.text_hidden_size=32",
        "contrastive.text_intermediate_size=64",
        "contrastive.text_num_layers=1",
        "contrastive.batch_size=8",
        "contrastive.max_steps=3",
        "contrastive.warmup_steps=1",
        "contrastive.shuffle_buffer=8",
        "contrastive.probe_train_scenes=0",  # the probes have their own test
        *extra,
    ]


def test_cli_trains_saves_reuses_and_reports(
    world: Path, sp_model: Path, isolated_output_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    C.main(cli_args(world, sp_model))
    out = capsys.readouterr().out
    assert "trained 3 steps" in out and "zero-shot on test (12 single-object images)" in out
    assert "retrieval on test (12 image-caption pairs" in out
    out_dir = isolated_output_root / "tokenizer" / "siglip-tiny"
    assert {"config.json", "model.safetensors", "config.yaml", "contrastive.json", "eval.json"} <= {
        p.name for p in out_dir.iterdir()
    }
    assert not out_dir.with_name("siglip-tiny.tmp").exists()
    vision = load_config([REPO / "configs/quickstart.yaml"]).model.vision
    tower = load_siglip_pretrained(out_dir, vision)
    assert tower(pixel_values=torch.zeros(1, 3, 64, 64)).last_hidden_state.shape == (1, 64, 128)
    saved = load_contrastive(out_dir)
    assert torch.equal(saved.vision_model.state_dict()["post_layernorm.weight"], tower.post_layernorm.weight)
    evaluation = json.loads((out_dir / "eval.json").read_text())
    assert evaluation["split"] == "test" and evaluation["zero_shot"]["num_images"] == 12
    assert evaluation["retrieval"]["num_pairs"] == 12
    assert_recalls_in_range(evaluation["retrieval"])

    # Same settings: the weights and the report are reused, and the report is printed as before.
    C.main(cli_args(world, sp_model))
    again = capsys.readouterr().out
    assert "reusing the finished checkpoint" in again and "reusing the report" in again
    assert again.splitlines()[-2:] == out.splitlines()[-2:]  # retrieval, zero-shot
    # Only the prompt changes: the weights are reused and the report is scored again.
    C.main(cli_args(world, sp_model, "contrastive.prompt_template=a {shape} that is {color}"))
    changed = capsys.readouterr().out
    assert "reusing the finished checkpoint" in changed and "reusing the report" not in changed
    stored_key = json.loads((out_dir / "eval.json").read_text())["evaluation_key"]
    assert stored_key["evaluation"]["prompt_template"] == "a {shape} that is {color}"
    # A training setting changes: retrained, and scored.
    C.main(cli_args(world, sp_model, "contrastive.max_steps=2"))
    retrained = capsys.readouterr().out
    assert "trained 2 steps" in retrained and "reusing the report" not in retrained


def assert_recalls_in_range(retrieval: dict[str, Any]) -> None:
    for direction in ("image_to_text", "text_to_image"):
        assert set(retrieval[direction]) == {"recall@1", "recall@5"}
        assert 0.0 <= retrieval[direction]["recall@1"] <= retrieval[direction]["recall@5"] <= 1.0


def test_cli_on_user_shards_reports_retrieval_and_no_zero_shot(
    user_shards: Path, sp_model: Path, isolated_output_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A user's captioned shards without the world's ``objects``: retrieval figures, no zero-shot, no NaN."""
    C.main(cli_args(user_shards, sp_model))
    out = capsys.readouterr().out
    assert "trained 3 steps" in out and "retrieval on test (10 image-caption pairs, 10 distinct" in out
    assert "zero-shot" not in out and "nan" not in out
    text = (isolated_output_root / "tokenizer" / "siglip-tiny" / "eval.json").read_text()
    evaluation = json.loads(text)
    assert "zero_shot" not in evaluation and "NaN" not in text
    assert evaluation["retrieval"]["num_pairs"] == evaluation["retrieval"]["distinct_captions"] == 10
    assert_recalls_in_range(evaluation["retrieval"])


def test_evaluation_without_captions_reports_no_retrieval(
    sp_tokenizer: TextTokenizer, vision: VisionConfig
) -> None:
    config = load_config([REPO / "configs/quickstart.yaml"])
    config.contrastive = small_contrastive()
    model = build_contrastive_model(vision, config.contrastive, sp_tokenizer.vocab_size, 3)
    samples = [Sample(f"k{i}", Image.new("RGB", (64, 64)), {"vqa": []}, "shard") for i in range(3)]
    result = C.evaluate_contrastive(model, sp_tokenizer, samples, config)
    assert result == {"split": "test", "retrieval": None}
    assert C.report_lines(result) == ["retrieval on test: no captioned images"]


def test_cli_names_missing_inputs(tmp_path: Path, sp_model: Path) -> None:
    with pytest.raises(SystemExit, match=r"python -m unified_mllm\.data\.shapes"):
        C.main(cli_args(tmp_path / "nowhere", sp_model))
    with pytest.raises(SystemExit, match="sentencepiece model not found"):
        C.main(cli_args(tmp_path, tmp_path / "missing.model"))


def test_a_killed_run_resumes_to_the_uninterrupted_losses_and_weights(
    world: Path, sp_model: Path, tmp_path: Path
) -> None:
    """Killed after step 3 (the harness's crash hook, as a kill would), resumed from the step-2 checkpoint:
    the same loss at every step and the same final weights as a run that was never interrupted."""
    steps = ["contrastive.max_steps=6", "contrastive.checkpoint_every=2", "contrastive.keep_last=5"]
    steps += ["contrastive.log_every=1"]

    def run(out: Path, crash_after: int = 0) -> subprocess.CompletedProcess[str]:
        args = cli_args(world, sp_model, *steps, f"contrastive.output_dir={out}", f"output_root={tmp_path}")
        env = {**os.environ, "OMP_NUM_THREADS": "1", CRASH_ENV: str(crash_after)}
        command = [sys.executable, "-m", "unified_mllm.train.contrastive", *args]
        return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)

    killed = run(tmp_path / "resumed", crash_after=3)
    assert killed.returncode == CRASH_EXIT_CODE, killed.stderr[-2000:]
    assert [s for s, _ in list_checkpoints(tmp_path / "resumed" / CHECKPOINT_DIR)] == [2]
    resumed = run(tmp_path / "resumed")
    assert resumed.returncode == 0 and "resuming from" in resumed.stdout, resumed.stderr[-2000:]
    straight = run(tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-2000:]

    def final(out: Path) -> tuple[list[float], dict[str, torch.Tensor]]:
        state = load_checkpoint(list_checkpoints(out / CHECKPOINT_DIR)[-1][1])
        return state["losses"], load_file(str(out / "model.safetensors"))

    (losses, weights), (want_losses, want_weights) = final(tmp_path / "resumed"), final(tmp_path / "straight")
    assert len(losses) == 6 and losses == want_losses
    assert weights.keys() == want_weights.keys()
    assert all(torch.equal(weights[k], want_weights[k]) for k in weights)
    summary = json.loads((tmp_path / "resumed" / C.SUMMARY_FILE).read_text())
    assert summary["steps"] == 6 and summary["first_loss"] == want_losses[0]
    # The killed run's record of step 3 was dropped on resume, and step 3 logged again.
    logged = read_metrics(tmp_path / "resumed" / METRICS_FILE)
    assert [r["step"] for r in logged] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in logged] == pytest.approx(want_losses, rel=1e-6)


# ------------------------------------------------------------------------------- extra pairs and probes


def test_sigmoid_loss_counts_extra_texts_as_negatives_only() -> None:
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([[0.6, 0.8], [1.0, 0.0], [0.0, 1.0]])  # the third text is a hard negative
    t_prime, b = torch.tensor(math.log(2.0)), torch.tensor(-1.0)
    # logits: [[0.2, 1.0, -1.0], [0.6, -1.0, 1.0]]; only (0, 0) and (1, 1) are positives.
    expected = (
        math.log1p(math.exp(-0.2))
        + math.log1p(math.exp(1.0))
        + math.log1p(math.exp(-1.0))
        + math.log1p(math.exp(0.6))
        + math.log1p(math.exp(1.0))
        + math.log1p(math.exp(1.0))
    ) / 2
    assert C.sigmoid_loss(x, y, t_prime, b).item() == pytest.approx(expected, abs=1e-6)


@pytest.fixture(scope="module")
def real_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A few of the real world's records (full scenes, 1-4 objects)."""
    from unified_mllm.config import WorldConfig
    from unified_mllm.data.shapes import make_sample

    root, world = tmp_path_factory.mktemp("real-world"), WorldConfig()
    for split, n in (("train", 24), ("test", 16)):
        with ShardWriter(root / split, f"w-{split}", 16) as writer:
            for i in range(n):
                image, record = make_sample(world, split, i)
                writer.write(record["key"], image, record)
    return root


def test_caption_batches_add_views_and_one_hard_negative_per_pair(
    real_world: Path, sp_tokenizer: TextTokenizer, vision: VisionConfig
) -> None:
    shards = list_shards(real_world / "train")
    plain = next(C.caption_batches(shards, sp_tokenizer, vision, small_contrastive(batch_size=8)))
    cfg = small_contrastive(batch_size=8, object_views=1.0, hard_negatives=["shape", "color"])
    pixels, ids, negatives = next(C.caption_batches(shards, sp_tokenizer, vision, cfg))
    assert negatives.shape == ids.shape == (8, 12) and pixels.shape == (8, 3, 64, 64)
    assert not torch.equal(negatives, ids)
    # Every pair became an object view: a different picture wherever the scene had more than one object.
    assert not torch.equal(pixels, plain[0])
    # The views draw from their own stream: the same samples, in the same order, as without them.
    again = next(C.caption_batches(shards, sp_tokenizer, vision, small_contrastive(batch_size=8)))
    assert all(torch.equal(a, b) for a, b in zip(plain, again))


def test_prompt_variants_fill_size_and_cell_in_every_way() -> None:
    variants = C.prompt_variants("a {size} {color} {shape} in the {cell}", ["small", "large"], 2)
    assert len(variants) == 8
    assert variants[:2] == [
        "a small {color} {shape} in the top left",
        "a small {color} {shape} in the top right",
    ]
    assert variants[-1] == "a large {color} {shape} in the bottom right"
    assert C.prompt_variants("a photo of a {color} {shape}", [], 0) == ["a photo of a {color} {shape}"]
    with pytest.raises(C.ConfigError, match=r"names \{size\} but the world gives no sizes"):
        C.prompt_variants("a {size} {color} {shape}", [], 3)


def test_zero_shot_scores_a_class_by_its_best_prompt_variant(
    world: Path, sp_tokenizer: TextTokenizer, vision: VisionConfig
) -> None:
    from unified_mllm.data.shards import iter_samples

    model = build_contrastive_model(vision, small_contrastive(), sp_tokenizer.vocab_size, 3)
    cfg = small_contrastive(prompt_template="a {size} {color} {shape} in the {cell}")
    samples = list(iter_samples(world / "test"))
    result = C.zero_shot_eval(
        model, sp_tokenizer, samples, vision, cfg, list(COLORS), SHAPES, sizes=["large"], grid_size=2
    )
    assert result["prompt_variants"] == 4 and result["num_images"] == 12
    assert "best of 4 prompt variants" in C.format_zero_shot(result, "test")


@pytest.mark.slow
def test_the_cli_reports_probes_beside_zero_shot(
    real_world: Path, sp_model: Path, isolated_output_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    C.main(
        [
            *cli_args(
                real_world, sp_model, "contrastive.probe_train_scenes=20", "contrastive.object_views=0.5"
            ),
            "data.world.colors=[red,green,blue,yellow,purple,orange]",
            "data.world.shapes=[circle,square,triangle]",
        ]
    )
    out = capsys.readouterr().out
    assert "linear probes on test, pooled features (fit on 20 train scenes)" in out
    evaluation = json.loads((isolated_output_root / "tokenizer" / "siglip-tiny" / "eval.json").read_text())
    probes = evaluation["probes"]
    assert probes["num_train_scenes"] == 20 and probes["num_test_scenes"] == 16
    assert set(probes["pooled"]) == {"shape", "color", "presence", "cells"}
    assert set(probes["patches"]) == {"shape", "color", "presence"}
    presence = probes["pooled"]["presence"]
    assert presence["num_train"] == 20 and presence["num_samples"] == 16 and 0.0 <= presence["f1"] <= 1.0
