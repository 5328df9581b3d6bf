"""Training utilities: LR schedule values, atomic checkpoints + keep-last-N + RNG, the resumable image stream."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from unified_mllm.config import WorldConfig
from unified_mllm.data.images import ImageStream, load_first_images
from unified_mllm.data.shapes import make_sample
from unified_mllm.data.shards import ShardWriter
from unified_mllm.train import distributed
from unified_mllm.train.checkpoint import (
    STATE_FILE,
    begin_checkpoint_dir,
    capture_rng_state,
    checkpoint_name,
    commit_checkpoint_dir,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    restore_rng_state,
)
from unified_mllm.train.schedule import warmup_cosine, warmup_cosine_factor

# ---------------------------------------------------------------------------------------------- schedule


def test_warmup_cosine_values() -> None:
    f = warmup_cosine(warmup_steps=4, total_steps=12, min_ratio=0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0  # cosine starts at its top
    assert f(8) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the 8 cosine steps
    assert f(12) == pytest.approx(0.1)
    assert f(100) == pytest.approx(0.1)  # held after the end
    assert warmup_cosine_factor(0, warmup_steps=0, total_steps=10) == 1.0
    assert warmup_cosine_factor(5, warmup_steps=0, total_steps=10) == pytest.approx(0.5)
    constant = warmup_cosine(warmup_steps=2, total_steps=10, shape="constant")
    assert [constant(s) for s in (0, 1, 2, 9, 50)] == [0.5, 1.0, 1.0, 1.0, 1.0]


def test_schedule_rejects_bad_settings() -> None:
    with pytest.raises(ValueError):
        warmup_cosine(warmup_steps=-1, total_steps=10)
    with pytest.raises(ValueError):
        warmup_cosine(warmup_steps=0, total_steps=10, min_ratio=1.5)
    with pytest.raises(ValueError):
        warmup_cosine(warmup_steps=0, total_steps=10, shape="linear")  # type: ignore[arg-type]


def test_schedule_drives_lambda_lr() -> None:
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=2.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup_steps=2, total_steps=6))
    seen = []
    for _ in range(6):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [2.0 * warmup_cosine_factor(s, warmup_steps=2, total_steps=6) for s in range(6)]
    assert seen == pytest.approx(expected)


# -------------------------------------------------------------------------------------------- checkpoint


def save_checkpoint(directory: Path, step: int, state: dict, *, keep_last: int | None = None) -> None:
    tmp = begin_checkpoint_dir(directory, step)
    torch.save(state, tmp / STATE_FILE)
    commit_checkpoint_dir(tmp, step, keep_last=keep_last)


def test_checkpoints_atomic_keep_last_and_latest(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path / "absent") is None
    for step in (100, 200, 300, 400):
        save_checkpoint(tmp_path, step, {"step": step, "w": torch.full((3,), float(step))}, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [300, 400]
    latest = latest_checkpoint(tmp_path)
    assert latest is not None and latest.name == checkpoint_name(400) == "step-00000400"
    state = load_checkpoint(latest)
    assert state["step"] == 400 and torch.equal(state["w"], torch.full((3,), 400.0))
    # Saving the same step again replaces it.
    save_checkpoint(tmp_path, 400, {"step": -1})
    assert load_checkpoint(tmp_path / "step-00000400")["step"] == -1


def test_checkpoint_killed_while_saving_leaves_no_finished_dir(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, 1, {"step": 1})

    # A run killed while writing step 2 leaves only its temporary directory: ignored, then pruned.
    (begin_checkpoint_dir(tmp_path, 2) / STATE_FILE).write_bytes(b"half a file")
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1]
    (tmp_path / ".tmp-step-00000003-1-abc").mkdir()
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000001"
    prune_checkpoints(tmp_path, keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001"]


def _draws() -> tuple[float, float, torch.Tensor]:
    return random.random(), float(np.random.rand()), torch.rand(3)


def test_rng_round_trip_through_a_checkpoint(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    _draws()
    save_checkpoint(tmp_path, 5, {"rng": capture_rng_state()})
    expected = _draws()
    _draws()  # move every generator on
    restore_rng_state(load_checkpoint(tmp_path / "step-00000005")["rng"])  # weights_only load
    again = _draws()
    assert again[0] == expected[0] and again[1] == expected[1] and torch.equal(again[2], expected[2])


def test_distributed_helpers_single_process() -> None:
    info = distributed.init_distributed(device="cpu")
    assert (info.rank, info.world_size, info.is_main, info.distributed) == (0, 1, True, False)
    t = torch.tensor([1.0, 2.0])
    assert distributed.all_reduce_sum(t) is t and torch.equal(t, torch.tensor([1.0, 2.0]))
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    assert distributed.all_gather_object(3) == [3]
    distributed.barrier()
    distributed.shutdown()
    distributed.exit_finished_worker()  # a no-op in a single process: the test goes on


@pytest.mark.parametrize("world_size", ["1", "2"])
def test_a_finished_worker_exits_zero_with_its_output_flushed(world_size: str) -> None:
    """A torchrun worker leaves at once with exit status 0 and nothing lost from its buffered streams; a
    single process goes on and finalizes as usual."""
    code = (
        "import sys; from unified_mllm.train import distributed; "
        "sys.stdout.write('saved'); sys.stderr.write('log'); "
        "distributed.exit_finished_worker(); print(' and finalized')"
    )
    env = {**os.environ, "WORLD_SIZE": world_size}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == ("saved and finalized\n" if world_size == "1" else "saved")
    assert result.stderr == "log"


# ------------------------------------------------------------------------------------------ image stream

NUM_SAMPLES = 30


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 world scenes in three shards of 10."""
    directory = tmp_path_factory.mktemp("stream")
    world = WorldConfig()
    with ShardWriter(directory, "shapes-train", samples_per_shard=10) as writer:
        for index in range(NUM_SAMPLES):
            image, record = make_sample(world, "train", index)
            writer.write(record["key"], image, record)
    return directory


def _take(stream: ImageStream, n: int) -> list:
    batches = []
    for batch in stream:
        batches.append(batch)
        if len(batches) == n:
            break
    return batches


def _stream(shards: Path, **kwargs: object) -> ImageStream:
    options = {"resolution": 16, "batch_size": 4, "seed": 7, "shuffle_buffer": 8, **kwargs}
    return ImageStream(shards, **options)  # type: ignore[arg-type]


def test_stream_is_deterministic_and_covers_each_epoch(shards: Path) -> None:
    first = _take(_stream(shards), 15)  # 60 samples: two epochs of 30
    second = _take(_stream(shards), 15)
    assert [b.keys for b in first] == [b.keys for b in second]
    assert all(torch.equal(a.pixels, b.pixels) for a, b in zip(first, second))
    keys = [k for b in first for k in b.keys]
    assert len(set(keys[:30])) == 30 and len(set(keys[30:])) == 30  # each epoch sees every sample once
    assert keys[:30] != keys[30:]  # and reshuffles
    assert [b.epoch for b in first][6:8] == [0, 1]  # the 8th batch (samples 28-31) crosses into epoch 1
    assert first[0].pixels.shape == (4, 3, 16, 16)
    assert first[-1].position == 60
    other_seed = _take(_stream(shards, seed=8), 3)
    assert [b.keys for b in other_seed] != [b.keys for b in first[:3]]


def test_stream_batches_carry_each_samples_caption(shards: Path) -> None:
    world = WorldConfig()
    by_key = {}
    for index in range(NUM_SAMPLES):
        _, record = make_sample(world, "train", index)
        by_key[record["key"]] = record["caption"]
    for batch in _take(_stream(shards), 3):
        assert batch.captions == [by_key[key] for key in batch.keys]


def test_stream_ranks_are_disjoint_and_cover_the_global_batch(shards: Path) -> None:
    single = _take(_stream(shards, batch_size=4), 6)
    ranks = [_take(_stream(shards, batch_size=2, rank=r, world_size=2), 6) for r in range(2)]
    for step in range(6):
        keys0, keys1 = ranks[0][step].keys, ranks[1][step].keys
        assert not set(keys0) & set(keys1)
        assert sorted(keys0 + keys1) == sorted(single[step].keys)
        assert ranks[0][step].position == ranks[1][step].position == single[step].position


@pytest.mark.parametrize("hflip", [False, True])
def test_stream_resumes_exactly(shards: Path, hflip: bool) -> None:
    reference = _take(_stream(shards, hflip=hflip), 12)
    resumed = _take(_stream(shards, hflip=hflip, position=reference[4].position), 7)
    for a, b in zip(reference[5:], resumed):
        assert a.keys == b.keys and a.position == b.position and a.epoch == b.epoch
        assert torch.equal(a.pixels, b.pixels)


def test_stream_resumes_at_another_world_size(shards: Path) -> None:
    reference = _take(_stream(shards, batch_size=4), 10)
    position = reference[3].position
    ranks = [
        _take(_stream(shards, batch_size=2, rank=r, world_size=2, position=position), 6) for r in range(2)
    ]
    for step in range(6):
        assert sorted(ranks[0][step].keys + ranks[1][step].keys) == sorted(reference[4 + step].keys)


def test_hflip_mirrors_some_images(shards: Path) -> None:
    plain = _take(_stream(shards), 5)
    flipped = _take(_stream(shards, hflip=True), 5)
    same = [torch.equal(a, b) for pa, pb in zip(plain, flipped) for a, b in zip(pa.pixels, pb.pixels)]
    mirrored = [
        torch.equal(a.flip(-1), b) for pa, pb in zip(plain, flipped) for a, b in zip(pa.pixels, pb.pixels)
    ]
    assert any(not s for s in same) and all(s or m for s, m in zip(same, mirrored))


def test_load_first_images(shards: Path) -> None:
    pixels, keys = load_first_images(shards, 12, 16)
    assert pixels.shape == (12, 3, 16, 16) and keys[0] == "shapes-train-00000000"
    assert pixels.min() >= -1 and pixels.max() <= 1
