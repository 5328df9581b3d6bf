"""Fault injection on the tiny preset: a diverging run stops (or skips, when allowed) and never writes a
non-finite checkpoint or export, in every trainer, with a one-line error from the command line."""

from __future__ import annotations

import errno
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import STAGE0, make_tokenized_world, overrides
from unified_mllm.config import Config, ConfigError, load_config, save_config
from unified_mllm.data.shapes import write_split
from unified_mllm.train import contrastive, tokenizer
from unified_mllm.train.checkpoint import list_checkpoints, load_checkpoint
from unified_mllm.train.distributed import DistInfo
from unified_mllm.train.divergence import NAN_ENV, DivergenceError, DivergenceGuard, check_finite
from unified_mllm.train.export import SUMMARY_FILE
from unified_mllm.train.harness import (
    CHECKPOINT_DIR,
    STATE_FILE,
    CheckpointLoadError,
    CheckpointPolicy,
    DiskFullError,
    Run,
    RunLockedError,
    lock_directory,
)
from unified_mllm.train.run_log import METRICS_FILE, read_metrics
from unified_mllm.train.trainer import train

REPO = Path(__file__).resolve().parents[1]
SIX_STEPS = ("train.max_steps=6", "checkpoint.every_steps=2", "checkpoint.keep_last=5", "train.log_every=1")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, sp_model: Path) -> Config:
    return make_tokenized_world(
        tmp_path_factory.mktemp("world"),
        sp_model,
        "data.world.num_train=16",
        "data.world.samples_per_shard=8",
    )


def stage0(world: Config, run_dir: Path, *extra: str) -> Config:
    return load_config([STAGE0], overrides(world, run_dir, *SIX_STEPS, *extra))


def steps_on_disk(config: Config) -> list[int]:
    return [s for s, _ in list_checkpoints(Path(config.checkpoint.dir) / CHECKPOINT_DIR)]


# ------------------------------------------------------------------------------------------------ the guard


def test_the_guard_accepts_finite_steps_skips_the_allowed_bad_ones_then_stops(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    guard = DivergenceGuard(1, tmp_path, "train.max_bad_steps")
    assert guard.accept(1, torch.tensor(2.5), torch.tensor(0.3))
    assert not guard.accept(2, torch.tensor(float("nan")), torch.tensor(0.3))
    assert capsys.readouterr().out == (
        "step 2: the loss is nan and the gradient norm 0.3: update skipped (1 of 1 allowed by `train.max_bad_steps`)\n"
    )
    assert guard.accept(3, 1.0, None)
    with pytest.raises(
        DivergenceError, match=r"^step 4: the loss is 1 and the gradient norm inf .* no checkpoint was"
    ):
        guard.accept(4, torch.tensor(1.0), torch.tensor(float("inf")))


def test_check_finite_names_the_bad_tensors() -> None:
    check_finite({"a": torch.ones(2), "ids": torch.tensor([1, 2])}, "x")
    with pytest.raises(
        DivergenceError, match=r"the export in E: non-finite values in b, c; nothing was written"
    ):
        check_finite(
            {"a": torch.ones(2), "b": torch.tensor([float("nan")]), "c": torch.tensor([float("-inf")])},
            "the export in E",
        )


# --------------------------------------------------------------------------------------------- LM stages


def test_a_nan_step_stops_the_lm_run_and_keeps_the_last_good_checkpoint(
    world: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = stage0(world, tmp_path / "run")
    monkeypatch.setenv(NAN_ENV, "3")
    with pytest.raises(
        DivergenceError, match=r"step 3: the loss is nan .*the last good checkpoint is .*step-00000002"
    ):
        train(config, progress=False)
    assert steps_on_disk(config) == [2]
    assert not (Path(config.checkpoint.export_dir) / SUMMARY_FILE).exists()
    checkpoint = Path(config.checkpoint.dir) / CHECKPOINT_DIR / "step-00000002"
    state = load_checkpoint(checkpoint / STATE_FILE)
    assert state["step"] == 2 and state["bad_steps"] == 0
    # Without the fault the rerun resumes from step 2 and finishes.
    monkeypatch.delenv(NAN_ENV)
    summary = train(config, progress=False)
    assert summary["steps"] == 6 and steps_on_disk(config) == [2, 4, 6]


def test_a_real_divergence_stops_before_any_checkpoint(world: Config, tmp_path: Path) -> None:
    """The issue's run: optim.lr=1e9 made every later loss NaN and exported NaN weights marked finished."""
    config = stage0(world, tmp_path / "run", "optim.lr=1e9", "optim.warmup_steps=0")
    with pytest.raises(DivergenceError, match=r"^step [2-6]: the loss is (nan|inf)"):
        train(config, progress=False)
    assert not (Path(config.checkpoint.export_dir) / SUMMARY_FILE).exists()
    for step in steps_on_disk(config):  # checkpoints of steps before the bad one only, all finite
        state = load_checkpoint(
            Path(config.checkpoint.dir) / CHECKPOINT_DIR / f"step-{step:08d}" / STATE_FILE
        )
        assert state["bad_steps"] == 0


def test_allowed_bad_steps_are_skipped_and_counted(
    world: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = stage0(world, tmp_path / "run", "train.max_bad_steps=1")
    monkeypatch.setenv(NAN_ENV, "3")
    summary = train(config, progress=False)
    assert summary["steps"] == 6
    assert (
        "step 3: the loss is nan and the gradient norm nan: update skipped (1 of 1" in capsys.readouterr().out
    )
    weights = load_file(str(Path(config.checkpoint.export_dir) / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    last = load_checkpoint(Path(config.checkpoint.dir) / CHECKPOINT_DIR / "step-00000006" / STATE_FILE)
    assert last["bad_steps"] == 1


def test_bad_steps_cannot_be_skipped_under_deepspeed(world: Config, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train\.max_bad_steps"):
        stage0(world, tmp_path, "train.max_bad_steps=2", "train.parallel.backend=deepspeed")


@pytest.mark.slow
def test_the_cli_reports_divergence_in_one_line(world: Config, tmp_path: Path) -> None:
    config = stage0(world, tmp_path / "run")
    save_config(config, tmp_path / "run.yaml")
    command = [
        sys.executable,
        "-m",
        "unified_mllm.train",
        "--config",
        str(tmp_path / "run.yaml"),
        "--no-progress",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", NAN_ENV: "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(
            "error: step 1: the loss is nan and the gradient norm nan (on this or another rank): training diverged"
        )
    )


# --------------------------------------------------------------------------------- the other two trainers


def test_a_nan_step_stops_the_tokenizer_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = REPO / "configs" / "tokenizer" / "vqgan-tiny.yaml"
    config = load_config([recipe], ["data.world.num_train=16"])
    write_split(config.data.world, tmp_path / "world", "train", progress=False)
    small = [
        f"output_root={tmp_path}",
        f"data.root={tmp_path / 'world'}",
        "vq_train.eval_data=''",
        "model.vq.resolution=16",
        "model.vq.channel_mult=[1,2]",
        "model.vq.codebook_size=64",
        "model.vq.embed_dim=8",
        "vq_train.batch_size=4",
        "vq_train.steps=4",
        "vq_train.checkpoint_every=1",
        "vq_train.keep_last=5",
        "vq_train.shuffle_buffer=8",
        "vq_train.perceptual=none",
        "train.wandb.mode=disabled",
    ]
    config = load_config([recipe], small)
    monkeypatch.setenv(NAN_ENV, "3")
    with pytest.raises(DivergenceError, match=r"^step 3: the loss is nan.*step-00000002"):
        tokenizer.train_tokenizer(config, progress=False)
    out = Path(config.vq_train.output_dir)
    assert [s for s, _ in list_checkpoints(out / CHECKPOINT_DIR)] == [1, 2]
    assert not (out / tokenizer.SUMMARY_FILE).exists() and not (out / "model.safetensors").exists()


def test_a_nan_step_stops_the_contrastive_run(
    tmp_path: Path, sp_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    extra = [
        f"output_root={tmp_path}",
        f"data.root={tmp_path / 'world'}",
        f"tokenizer.path={sp_model}",
        "data.world.num_train=16",
        "data.world.num_test=4",
        "contrastive.text_hidden_size=32",
        "contrastive.text_intermediate_size=64",
        "contrastive.text_num_layers=1",
        "contrastive.batch_size=8",
        "contrastive.max_steps=4",
        "contrastive.warmup_steps=1",
        "contrastive.shuffle_buffer=8",
        "contrastive.checkpoint_every=1",
        "contrastive.keep_last=5",
        "train.wandb.mode=disabled",
    ]
    config = load_config([REPO / "configs/quickstart.yaml"], extra)
    for split in ("train", "test"):
        write_split(config.data.world, tmp_path / "world", split, progress=False)
    monkeypatch.setenv(NAN_ENV, "2")
    with pytest.raises(DivergenceError, match=r"^step 2: the loss is nan.*step-00000001"):
        contrastive.run_contrastive(config, progress=False)
    out = Path(config.contrastive.output_dir)
    assert [s for s, _ in list_checkpoints(out / CHECKPOINT_DIR)] == [1]
    assert not (out / "model.safetensors").exists() and not (out / contrastive.SUMMARY_FILE).exists()


# ------------------------------------------------------------------------------------------ crafted pickles


class WritesAMarker:
    """A crafted pickle: unpickling it calls ``Path.touch`` on a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("target", ["dcp/.metadata", STATE_FILE])
def test_a_crafted_checkpoint_is_refused_on_resume_and_runs_nothing(
    world: Config, tmp_path: Path, target: str
) -> None:
    config = stage0(world, tmp_path / "run", "train.max_steps=2")
    train(config, progress=False)
    checkpoint = Path(config.checkpoint.dir) / CHECKPOINT_DIR / "step-00000002"
    marker = tmp_path / "marker"
    if target == STATE_FILE:
        torch.save({"step": 2, "payload": WritesAMarker(marker)}, checkpoint / target)
    else:
        (checkpoint / target).write_bytes(pickle.dumps(WritesAMarker(marker)))
    more = stage0(world, tmp_path / "run", "train.max_steps=4")
    with pytest.raises(
        CheckpointLoadError,
        match=rf"{re.escape(str(checkpoint / target))} .*(getattr|names pathlib\.Path\.touch.*trust_metadata=true)",
    ):
        train(more, progress=False)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------- damaged files


def truncate_a_shard(checkpoint: Path) -> Path:
    shard = sorted((checkpoint / "dcp").glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return shard


def losses_by_step(config: Config) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(Path(config.checkpoint.dir) / METRICS_FILE, "train")}


def test_a_damaged_newest_checkpoint_falls_back_to_the_older_one(
    world: Config, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    straight = stage0(world, tmp_path / "straight")
    train(straight, progress=False)
    run = stage0(world, tmp_path / "run", "train.max_steps=4")
    train(run, progress=False)
    shard = truncate_a_shard(Path(run.checkpoint.dir) / CHECKPOINT_DIR / "step-00000004")
    capsys.readouterr()
    # Without fallback: one error naming the file.
    with pytest.raises(
        CheckpointLoadError,
        match=rf"fallback to older checkpoints is off.*{re.escape(str(shard))} is truncated: ",
    ):
        train(stage0(world, tmp_path / "run", "checkpoint.fallback=false"), progress=False)
    resumed = stage0(world, tmp_path / "run")
    summary = train(resumed, progress=False)
    out = capsys.readouterr().out
    assert f"warning: cannot resume from {shard.parent.parent}: ValueError: {shard} is truncated" in out
    assert "step-00000002 (step 2" in out
    assert summary["steps"] == 6
    later = {s: v for s, v in losses_by_step(resumed).items() if s > 2}
    assert later == {s: v for s, v in losses_by_step(straight).items() if s > 2}


def test_a_full_disk_is_one_clear_error_and_loses_nothing(
    world: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC while writing step 4's state file (the way torch's zip writer meets a full disk): a one-line
    error naming the checkpoint and the free space, no partial directory, step 2 intact, and a rerun resumes."""
    config = stage0(world, tmp_path / "run", "train.max_steps=4")
    real_save = torch.save

    def save_until_full(obj: object, path: object, *args: object, **kwargs: object) -> None:
        if isinstance(obj, dict) and obj.get("step") == 4:
            Path(str(path)).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_full)
    with pytest.raises(
        DiskFullError,
        match=r"^checkpoint step-00000004 not written: no space left .* MB free; the "
        r"previous checkpoint took .* MB\); its partial directory was removed and step-00000002 is intact",
    ):
        train(config, progress=False)
    checkpoints = Path(config.checkpoint.dir) / CHECKPOINT_DIR
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000002"]
    monkeypatch.setattr(torch, "save", real_save)
    assert train(config, progress=False)["steps"] == 4
    assert steps_on_disk(config) == [2, 4]


# ------------------------------------------------------------------------------- launchers and run locks


def test_a_run_directory_takes_one_run_at_a_time(tmp_path: Path) -> None:
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    harness = Run(tmp_path / "run", info, CheckpointPolicy(1, 1), "train.max_steps")
    with harness.exclusive():
        holder = rf"pid {os.getpid()} on {re.escape(socket.gethostname())} since "
        with pytest.raises(
            RunLockedError, match=rf"run directory .*run is in use by {holder}.*delete .*\.lock"
        ):
            lock_directory(tmp_path / "run")
    lock_directory(tmp_path / "run").close()  # released when the block ends


def children_of(pid: int) -> list[int]:
    """Every process whose parent is ``pid`` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_workers_die_with_their_launcher_and_a_second_launch_is_refused(
    world: Config, tmp_path: Path
) -> None:
    config = stage0(world, tmp_path / "run", "train.max_steps=100000", "checkpoint.every_steps=100000")
    save_config(config, tmp_path / "run.yaml")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += ["-m", "unified_mllm.train", "--config", str(tmp_path / "run.yaml"), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen(
        command,
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        metrics = Path(config.checkpoint.dir) / "metrics.jsonl"
        deadline = time.monotonic() + 240
        while not (metrics.is_file() and metrics.read_text().strip()) and time.monotonic() < deadline:
            time.sleep(0.5)
        workers = children_of(launcher.pid)
        assert len(workers) == 2 and metrics.is_file(), "the run did not start training"
        second = subprocess.run(
            [
                sys.executable,
                "-m",
                "unified_mllm.train",
                "--config",
                str(tmp_path / "run.yaml"),
                "--no-progress",
            ],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode == 1
        assert re.search(
            r"^error: the run directory .* is in use by pid \d+ on ", second.stderr, re.MULTILINE
        )
        os.killpg(launcher.pid, signal.SIGKILL)  # the launcher's group: torchrun's workers are not in it
        launcher.wait(timeout=30)
        deadline = time.monotonic() + 10
        while any(alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(alive(w) for w in workers)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
