"""The run harness (unified_mllm.train.harness) with a toy trainer: metric window, loop cadence, checkpoints,
exact resume, settings changes, reuse of a finished run and the command line."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest
import torch

from unified_mllm import io
from unified_mllm.config import Config, ConfigError, WandbConfig
from unified_mllm.train.checkpoint import list_checkpoints, load_checkpoint
from unified_mllm.train.distributed import DistInfo
from unified_mllm.train.harness import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    CheckpointPolicy,
    MetricWindow,
    Run,
    RunState,
    reuse_finished,
    run_cli,
)
from unified_mllm.train.run_log import METRICS_FILE, read_metrics

ONE = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
OFF = WandbConfig(mode="disabled")


def test_metric_window_sums_and_means() -> None:
    window = MetricWindow(torch.device("cpu"))
    for step in range(4):
        window.add(loss=torch.tensor(float(step)), tokens=10.0, per_source=torch.tensor([1.0, float(step)]))
        window.steps += 1
    assert window.reduce() == {"loss": 6.0, "per_source": [4.0, 6.0], "tokens": 40.0}
    assert window.reduce(mean=True) == {"loss": 1.5, "per_source": [1.0, 1.5], "tokens": 10.0}
    assert window.sums["loss"].dtype == torch.float64  # sums are kept in float64 unless asked otherwise
    window.reset()
    assert window.reduce() == {} and window.steps == 0


def _toy_run(directory: Path, total: int, fingerprint: Any = None) -> tuple[list[float], list[int]]:
    """A trainer on the harness: a weight pulled by noise from torch's RNG; returns (weights, logged steps)."""
    harness = Run(
        directory, ONE, CheckpointPolicy(every=2, keep_last=2), "toy.steps", fingerprint=fingerprint
    )
    run, state = harness.resume(total)
    weights: list[float] = list(state.get("weights", []))
    harness.snapshot_config(Config())
    window = MetricWindow(ONE.device)

    def step(run: RunState) -> None:
        weights.append((weights[-1] if weights else 0.0) + float(torch.randn(())))
        window.add(weight=weights[-1])
        window.steps += 1
        run.data_state = run.step + 1

    def log(run: RunState) -> tuple[dict[str, Any], dict[str, float]]:
        record = {"kind": "train", "step": run.step, **window.reduce(mean=True)}
        window.reset()
        return record, {}

    def evaluate(run: RunState) -> dict[str, Any]:
        return {"kind": "eval", "step": run.step, "weight": weights[-1]}

    def checkpoint(run: RunState) -> None:
        harness.save(run, {"weights": weights}, Config())

    with harness.logging(run, name="toy", total=total, wandb=OFF, wandb_config={}, progress=False):
        harness.loop(
            run, total, step, log_every=3, log=log, checkpoint=checkpoint, evaluate=evaluate, eval_every=4
        )
    return weights, [r["step"] for r in read_metrics(directory / METRICS_FILE)]


def test_the_loop_logs_evaluates_checkpoints_and_resumes_exactly(tmp_path: Path) -> None:
    torch.manual_seed(0)
    straight, logged = _toy_run(tmp_path / "straight", 7)
    assert logged == [3, 4, 6, 7]  # train records every 3 steps and at the end, eval records every 4
    assert [s for s, _ in list_checkpoints(tmp_path / "straight" / CHECKPOINT_DIR)] == [6, 7]  # keep_last=2
    assert (tmp_path / "straight" / CONFIG_FILE).is_file()
    state = load_checkpoint(tmp_path / "straight" / CHECKPOINT_DIR / "step-00000007")
    assert (
        state["step"] == 7
        and state["data_state"] == 7
        and state["world_size"] == 1
        and len(state["rng"]) == 1
    )

    torch.manual_seed(0)
    first, _ = _toy_run(tmp_path / "resumed", 4)
    torch.randn(100)  # the RNG moves on; the checkpoint's state brings it back
    resumed, logged = _toy_run(tmp_path / "resumed", 7)
    assert first == straight[:4] and resumed == straight  # bit for bit
    assert logged == [3, 4, 4, 6, 7]  # the first run's records up to its last step stay


def test_a_checkpoint_past_the_total_or_with_other_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    _toy_run(tmp_path, 4, fingerprint={"lr": 1})
    with pytest.raises(ConfigError, match=r"`toy\.steps`: .* already at step 4"):
        _toy_run(tmp_path, 2, fingerprint={"lr": 1})
    weights, _ = _toy_run(tmp_path, 2, fingerprint={"lr": 2})  # other settings: starts over
    assert len(weights) == 2 and "made with other settings: starting over" in capsys.readouterr().out
    assert [s for s, _ in list_checkpoints(tmp_path / CHECKPOINT_DIR)] == [2]


def test_reuse_finished_and_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    record = tmp_path / "summary.json"
    assert reuse_finished(record, {"lr": 1}, (), ONE, "toy") is None
    io.write_json(record, {"fingerprint": {"lr": 1}, "steps": 3})
    assert reuse_finished(record, {"lr": 1}, (), ONE, "toy in here")["steps"] == 3
    assert "reusing the finished toy in here" in capsys.readouterr().out
    seen: list[tuple[int, bool, bool]] = []

    def train(config: Config, args: argparse.Namespace) -> None:
        seen.append((config.train.max_steps, args.no_progress, args.force))
        if config.train.max_steps == 7:
            raise ConfigError("`train.max_steps`: too few")

    run_cli("toy", train, ["train.max_steps=5", "--no-progress"], flags={"--force": "retrain"})
    with pytest.raises(SystemExit, match=r"error: `train\.max_steps`: too few"):
        run_cli("toy", train, ["train.max_steps=7", "--force"], flags={"--force": "retrain"})
    with pytest.raises(SystemExit, match=r"error: `train\.max_steps`: must be >= 1"):  # config checks too
        run_cli("toy", train, ["train.max_steps=0"], flags={"--force": "retrain"})
    assert seen == [(5, True, False), (7, False, True)]
