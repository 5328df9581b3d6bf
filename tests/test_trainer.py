"""The LM trainer end to end on a micro world: one process, FSDP2 and DeepSpeed ZeRO-2 under torchrun (gloo),
killed and resumed to the same loss sequence, resumed at another world size, exported and reloaded."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import STAGE0, make_tokenized_world, overrides
from unified_mllm.config import Config, ConfigError, load_config
from unified_mllm.data.collate import Batch
from unified_mllm.data.conversation import IGNORE_INDEX
from unified_mllm.model.unified import UnifiedModel
from unified_mllm.train.checkpoint import list_checkpoints
from unified_mllm.train.export import SUMMARY_FILE
from unified_mllm.train.harness import CHECKPOINT_DIR, CRASH_ENV, CURVES_FILE
from unified_mllm.train.losses import causal_lm_loss
from unified_mllm.train.run_log import METRICS_FILE, read_metrics
from unified_mllm.train.trainer import Window, source_losses, train

REPO = Path(__file__).resolve().parents[1]
STAGE2 = REPO / "configs" / "train" / "tiny-stage2.yaml"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, sp_model: Path) -> Config:
    """32 tokenized scenes in 4 shards, a random tiny VQ-GAN and the test text tokenizer."""
    return make_tokenized_world(
        tmp_path_factory.mktemp("world"),
        sp_model,
        "data.world.num_train=32",
        "data.world.samples_per_shard=8",
    )


def run_dir_of(config: Config) -> Path:
    return Path(config.checkpoint.dir)


def losses(config: Config) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir_of(config) / METRICS_FILE, "train")}


def torchrun(config_file: Path, args: list[str], *, crash_after: int = 0, nproc: int = 2) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    command += ["-m", "unified_mllm.train", "--config", str(config_file), "--no-progress", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", CRASH_ENV: str(crash_after)}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    expected = 1 if crash_after else 0
    assert (result.returncode != 0) == bool(expected), result.stdout[-3000:] + result.stderr[-3000:]


def exported_weights(config: Config) -> dict[str, torch.Tensor]:
    return load_file(str(Path(config.checkpoint.export_dir) / "model.safetensors"))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.allclose(a[k], b[k], rtol=0, atol=atol)]
    assert not different, different[:5]


# ------------------------------------------------------------------------------------ one process


@pytest.fixture(scope="module")
def single(world: Config, tmp_path_factory: pytest.TempPathFactory) -> Config:
    """A finished single-process stage-0 run (6 steps)."""
    config = load_config([STAGE0], overrides(world, tmp_path_factory.mktemp("single"), "optim.lr=3e-3"))
    torch.manual_seed(0)
    train(config, progress=False)
    return config


def test_single_process_run_trains_checkpoints_and_exports(single: Config) -> None:
    run_dir = run_dir_of(single)
    steps = losses(single)
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]
    assert steps[6] < steps[1] - 0.5  # ln(1024) ≈ 6.9 at the start; the LM learns the format quickly
    assert [s for s, _ in list_checkpoints(run_dir / CHECKPOINT_DIR)] == [2, 4, 6]
    assert (run_dir / CURVES_FILE).is_file() and (run_dir / "config.yaml").is_file()
    export = Path(single.checkpoint.export_dir)
    for name in ("config.json", "model.safetensors", "text.model", "config.yaml", SUMMARY_FILE):
        assert (export / name).is_file(), name
    assert (export / "vq" / "model.safetensors").is_file()
    summary = json.loads((export / SUMMARY_FILE).read_text())
    assert summary["steps"] == 6 and summary["world_size"] == 1


def test_a_run_with_grid_positions_trains_the_code_cells_tables(world: Config, tmp_path: Path) -> None:
    """model.grid_positions through the data pipeline: stage 0 moves the row / column rows of the 8x8 grids'
    cells off zero, never the "no cell" row, and leaves the (frozen) feature slots' embedding at zero."""
    run = overrides(world, tmp_path, "model.grid_positions=32", "train.max_steps=2", "optim.lr=3e-3")
    config = load_config([STAGE0], run)
    train(config, progress=False)
    weights = exported_weights(config)
    for table in ("rows", "cols"):
        moved = weights[f"code_grid_embedding.{table}.weight"].abs().sum(dim=1)
        assert moved[0] == 0 and (moved[1:9] > 0).all() and (moved[9:] == 0).all(), table
    assert (weights["vision.slot_embedding"] == 0).all()


def test_the_log_has_each_sources_cross_entropy(single: Config) -> None:
    records = read_metrics(run_dir_of(single) / METRICS_FILE, "train")
    # A step of 2 samples may draw one source only: it logs that source alone.
    sources = [[r[k] for k in ("ce/caption", "ce/t2i") if k in r] for r in records]
    assert all(sources) and sum(len(s) == 2 for s in sources) >= 2
    for record, per_source in zip(records, sources):
        # Every weight is 1: the step's ce is the token-weighted mean of its sources' (tokens not logged).
        assert min(per_source) - 1e-5 <= record["ce"] <= max(per_source) + 1e-5  # fp32 sums
        if len(per_source) == 1:
            assert per_source[0] == pytest.approx(record["ce"])


def _batch(labels: torch.Tensor, **fields: torch.Tensor) -> Batch:
    """A padded batch around ``labels`` with the given optional fields (ids and statistics are placeholders)."""
    return Batch(
        input_ids=torch.zeros_like(labels),
        labels=labels,
        feature_mask=torch.zeros_like(labels, dtype=torch.bool),
        num_views=torch.zeros(0, dtype=torch.long),
        num_samples=labels.shape[0],
        num_tokens=labels.numel(),
        padding_fraction=0.0,
        tasks=[""] * labels.shape[0],
        **fields,
    )


def test_source_losses_sum_each_sources_tokens() -> None:
    logits = torch.tensor([[[1.0, 2.0, 0.5], [0.0, 0.0, 0.0], [3.0, 1.0, 2.0]], [[0.0, 1.0, 0.0]] * 3])
    labels = torch.tensor([[IGNORE_INDEX, 1, 2], [IGNORE_INDEX, IGNORE_INDEX, 0]])
    sources = torch.tensor([[0, 0, 2], [1, 1, 1]])  # row 0 packs a sample of source 0, then one of source 2
    parts = causal_lm_loss(logits, labels, 0.0)
    batch = _batch(labels, source_ids=sources)
    sums = source_losses(batch, parts, None, num_sources=3)
    ce0 = math.log(math.exp(1) + math.exp(2) + math.exp(0.5)) - 2.0
    ce2, ce1 = math.log(3.0), math.log(2 + math.e) - 0.0
    torch.testing.assert_close(sums["source_tokens"], torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(sums["source_ce"], torch.tensor([ce0, ce1, ce2], dtype=torch.float64))
    # Depth-head positions count for the source that owns them.
    code = dataclasses.replace(batch, code_targets=torch.tensor([[False, False, False], [False, True, True]]))
    with_codes = source_losses(code, parts, torch.tensor([0.5, 0.25]), num_sources=3)
    torch.testing.assert_close(
        with_codes["source_tokens"], torch.tensor([1.0, 3.0, 1.0], dtype=torch.float64)
    )
    torch.testing.assert_close(with_codes["source_ce"][1], torch.tensor(ce1 + 0.75, dtype=torch.float64))
    assert source_losses(dataclasses.replace(batch, source_ids=None), parts, None, num_sources=3) == {}


def test_window_logs_per_source_means() -> None:
    window = Window(torch.device("cpu"), ("vqa", "t2i"))
    for ce, tokens in (
        (torch.tensor([2.0, 9.0]), torch.tensor([1.0, 3.0])),
        (torch.tensor([4.0, 0.0]), torch.tensor([3.0, 0.0])),
    ):
        window.add(
            ce_sum=float(ce.sum()),
            z_sum=0.0,
            seen_tokens=10.0,
            real_tokens=8.0,
            source_ce=ce,
            source_tokens=tokens,
        )
    window.add(tokens=7.0, grad_norm=1.0)
    window.steps += 1
    out = window.flush()
    assert out["ce"] == pytest.approx(15.0 / 7.0) and out["padding"] == pytest.approx(0.2)
    assert out["ce/vqa"] == pytest.approx(6.0 / 4.0) and out["ce/t2i"] == pytest.approx(9.0 / 3.0)
    assert window.sums == {}


def test_export_reloads_with_the_trained_weights(single: Config, world: Config) -> None:
    model = UnifiedModel.from_pretrained(single.checkpoint.export_dir)
    weights = exported_weights(single)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in weights.items())
    ids = torch.randint(0, single.model.lm.vocab_size, (2, 12))
    first, second = model(ids).logits, UnifiedModel.from_pretrained(single.checkpoint.export_dir)(ids).logits
    assert torch.equal(first, second)
    # Stage 0 freezes the vision tower: its weights are the seeded random init, untouched.
    torch.manual_seed(single.train.seed)
    fresh = UnifiedModel(single.model)
    tower = [k for k in weights if k.startswith("vision.")]
    assert tower and all(torch.equal(fresh.state_dict()[k], weights[k]) for k in tower)


def test_a_finished_run_is_reused(single: Config, capsys: pytest.CaptureFixture) -> None:
    capsys.readouterr()
    train(single, progress=False)
    assert "reusing the finished export" in capsys.readouterr().out


def test_a_rule_that_matches_nothing_names_it(world: Config, tmp_path: Path) -> None:
    config = load_config([STAGE0], overrides(world, tmp_path, "optim.param_groups=[{match: visoin}]"))
    with pytest.raises(ConfigError, match="visoin"):
        train(config, progress=False)


def test_the_command_line_reports_bad_data_in_one_line(world: Config, tmp_path: Path) -> None:
    from unified_mllm.train.__main__ import main

    empty = tmp_path / "no-shards"
    empty.mkdir()
    args = ["--config", str(STAGE0), "--no-progress", *overrides(world, tmp_path / "run")]
    with pytest.raises(SystemExit) as info:  # a DataError, not a traceback
        main([*args, f"data.tokenized_root={empty}"])
    assert str(info.value).startswith("error: ") and "\n" not in str(info.value), info.value


# ---------------------------------------------------------------------------------- two processes


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["fsdp", "deepspeed"])
def test_killed_two_process_run_resumes_to_the_same_losses(
    world: Config, tmp_path: Path, backend: str
) -> None:
    """Stage 2 (SigLIP features, residual dropout on) with 2 ranks: a run killed after step 3 resumes from
    its step-2 checkpoint and logs the losses of an uninterrupted run, and ends with the same weights."""
    extra = (f"train.parallel.backend={backend}",)
    straight = load_config([STAGE2], overrides(world, tmp_path / "straight", *extra))
    torchrun(STAGE2, overrides(world, tmp_path / "straight", *extra))
    killed = load_config([STAGE2], overrides(world, tmp_path / "killed", *extra))
    args = overrides(world, tmp_path / "killed", *extra)
    torchrun(STAGE2, args, crash_after=3)
    assert [s for s, _ in list_checkpoints(run_dir_of(killed) / CHECKPOINT_DIR)] == [2]
    torchrun(STAGE2, args)
    reference, resumed = losses(straight), losses(killed)
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-6, abs=1e-6), step
    assert_same_weights(exported_weights(straight), exported_weights(killed), atol=1e-6)


@pytest.mark.slow
def test_resume_at_world_size_one_from_a_two_process_checkpoint(world: Config, tmp_path: Path) -> None:
    """FSDP2's sharded checkpoint (torch.distributed.checkpoint) loads into one plain process; with twice the
    rows per micro-batch the global batches are the same, so the losses continue the 2-rank run's."""
    extra = ("model.lm.residual_dropout=0.0",)
    reference = load_config([STAGE2], overrides(world, tmp_path / "reference", *extra))
    torchrun(STAGE2, overrides(world, tmp_path / "reference", *extra))
    args = overrides(world, tmp_path / "switch", *extra)
    torchrun(STAGE2, args, crash_after=4)
    switched = load_config([STAGE2], [*args, "train.micro_batch_size=4"])
    train(switched, progress=False)
    expected, got = losses(reference), losses(switched)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    for step in (5, 6):
        assert got[step] == pytest.approx(expected[step], rel=1e-4), step
