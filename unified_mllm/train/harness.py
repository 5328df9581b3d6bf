"""The run harness every trainer stands on: run directory, resume, checkpoints, the step loop, logging.

A trainer (the LM stages, the image tokenizers, contrastive SigLIP) supplies what is its own — how to train one
step, what its training state holds, what its log record says — and :class:`Run` does the rest the same way
for all of them (TRAIN.md, "Checkpoints, resume, export"):

* the **run directory**: ``config.yaml``, ``metrics.jsonl``, ``loss_curves.png``, wandb files
  (:mod:`unified_mllm.train.run_log`) and ``checkpoints/step-XXXXXXXX/``;
* **checkpoints** (:mod:`unified_mllm.train.checkpoint`): the state file ``state.pt`` (the trainer's state plus
  the step, data position, time spent and every rank's RNG state, written by rank 0) and ``config.yaml``; a
  sharded model and optimizer go through a :class:`ShardedState` (the LM's backend) that every rank writes its
  part of. **Resume** loads the newest (RNG streams per rank; at another world size rank 0's seeds all);
* the **step loop** (:meth:`Run.loop`): the progress bar, log records, evaluations, checkpoints, and the crash
  hook: with ``UMLLM_CRASH_AFTER_STEP=k`` the process exits abruptly (as a kill would) right after step ``k``;
* **reuse** of a finished run: :func:`unified_mllm.io.finished_output` on the summary a trainer writes last.

Metric sums stay on the device between logs (:class:`MetricWindow`): no host sync except on log, evaluation
and checkpoint steps.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

import torch

from unified_mllm import io
from unified_mllm.cli import add_debug_argument, one_line_errors
from unified_mllm.config import Config, ConfigError, add_config_arguments, config_from_args, save_config
from unified_mllm.pickles import UnsafePickleError
from unified_mllm.train import distributed
from unified_mllm.train.checkpoint import (
    STATE_FILE,
    begin_checkpoint_dir,
    capture_rng_state,
    checkpoint_name,
    commit_checkpoint_dir,
    list_checkpoints,
    load_checkpoint,
    restore_rng_state,
)
from unified_mllm.train.distributed import DistInfo
from unified_mllm.train.divergence import DivergenceError, DivergenceGuard
from unified_mllm.train.run_log import METRICS_FILE, Panel, RunLogger, save_curves

CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.yaml"
CURVES_FILE = "loss_curves.png"
# Tests and fault drills: exit abruptly (as a kill would) right after this step.
CRASH_ENV = "UMLLM_CRASH_AFTER_STEP"
CRASH_EXIT_CODE = 17


class DiskFullError(OSError):
    """A checkpoint could not be written for lack of disk space (the message says how much is free)."""


def disk_full(error: BaseException | None, directory: Path) -> bool:
    """Whether ``error`` (or anything in its chain) is a full disk, or the disk is (nearly) full now."""
    while error is not None:
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return shutil.disk_usage(directory).free < FULL_DISK_BYTES


FULL_DISK_BYTES = 16 << 20  # below this much free space a failed write is taken for a full disk


def _tree_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _megabytes(size: int) -> str:
    return f"{size / 2**20:.1f} MB"


LOCK_FILE = ".lock"


class RunLockedError(RuntimeError):
    """Another process is training in this run directory."""


def lock_directory(directory: Path) -> IO[str]:
    """Take ``directory/.lock`` (created with the directory), writing who holds it; returns the open file that
    holds the lock. Raises :class:`RunLockedError` naming the holder when another process has it."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_FILE
    handle = path.open("a+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise RunLockedError(
            f"the run directory {directory} is in use by {holder}; a second run there would overwrite its "
            f"checkpoints. Wait for it or stop it (the lock goes with that process; if no such process runs, "
            f"the file system ignores locks: delete {path})"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()
    return handle


class CheckpointLoadError(RuntimeError):
    """No checkpoint of a run directory could be loaded; the message names each one and why."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


# The errors of a run that every trainer's command line reports in one line (bad input, a diverged run, a
# damaged or crafted checkpoint, a full disk, a directory in use).
RUN_ERRORS: tuple[type[Exception], ...] = (
    FileNotFoundError,
    ConfigError,
    DivergenceError,
    UnsafePickleError,
    CheckpointLoadError,
    DiskFullError,
    RunLockedError,
)


def reuse_finished(
    record_file: Path, fingerprint: Any, required: Sequence[str], info: DistInfo, what: str
) -> dict[str, Any] | None:
    """The summary a finished run made with ``fingerprint`` wrote last into ``record_file`` (with its
    ``required`` files beside it), announced on rank 0 as ``reusing the finished <what>``; None: train."""
    summary = io.finished_output(record_file, {"fingerprint": fingerprint}, required)
    if summary is not None and info.is_main:
        print(f"reusing the finished {what}")
    return summary


def run_cli(
    description: str,
    train: Callable[[Config, argparse.Namespace], object],
    argv: Sequence[str] | None = None,
    *,
    errors: tuple[type[Exception], ...] = (),
    flags: Mapping[str, str] | None = None,
    prog: str | None = None,
) -> None:
    """A trainer's command line: ``--config`` files and ``key=value`` overrides, ``--no-progress``, the
    trainer's own ``flags`` (``{"--force": help}``, booleans), ``--debug``; :data:`RUN_ERRORS` and ``errors``
    end it with a one-line message (:func:`unified_mllm.cli.one_line_errors`; every failing rank prints its own)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_config_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    for flag, text in (flags or {}).items():
        parser.add_argument(flag, action="store_true", help=text)
    add_debug_argument(parser)
    args = parser.parse_intermixed_args(argv)
    try:
        with one_line_errors((*RUN_ERRORS, *errors), debug=args.debug):
            train(config_from_args(args), args)
    finally:
        distributed.shutdown()


@dataclass
class RunState:
    """Where the loop is: the next step to train, the data position after the last step, time spent so far.

    ``data_state`` is whatever the trainer's data stream resumes from (a dict, a sample count, ...)."""

    step: int = 0
    data_state: Any = None
    elapsed: float = 0.0


class MetricWindow:
    """Sums of named values over the steps since the last log, kept on the device (no host sync until
    :meth:`reduce`). Scalars and vectors alike; every rank must add the same names and sizes."""

    def __init__(self, device: torch.device, dtype: torch.dtype = torch.float64) -> None:
        self.device, self.dtype = device, dtype
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.started = time.perf_counter()

    def add(self, **values: torch.Tensor | float) -> None:
        """Add one step's (or micro-batch's) values to the sums."""
        for name, value in values.items():
            value = torch.as_tensor(value, device=self.device).detach().to(self.dtype)
            self.sums[name] = self.sums[name] + value if name in self.sums else value

    @property
    def seconds(self) -> float:
        """Wall time since the window opened."""
        return time.perf_counter() - self.started

    def reduce(self, *, mean: bool = False) -> dict[str, Any]:
        """The window's sums over all ranks, or with ``mean`` the per-step means averaged over ranks (one
        collective: every rank calls it). Scalars come back as floats, vectors as lists."""
        names = sorted(self.sums)
        if not names:
            return {}
        flat = torch.cat([self.sums[n].reshape(-1) for n in names])
        if mean:
            totals = distributed.all_reduce_mean(flat / max(self.steps, 1)).tolist()
        else:
            totals = distributed.all_reduce_sum(flat).tolist()
        out: dict[str, Any] = {}
        for name in names:
            size = self.sums[name].numel()
            out[name] = totals[:size] if self.sums[name].ndim else totals[0]
            totals = totals[size:]
        return out


class ShardedState(Protocol):
    """What a sharded model and optimizer do at checkpoints: every rank saves and loads its own part."""

    def save(self, directory: Path) -> None: ...

    def load(self, directory: Path) -> None: ...


@dataclass
class CheckpointPolicy:
    """When checkpoints are written (every ``every`` steps and at the end), how many stay on disk, and
    whether a run resumes from the newest one."""

    every: int
    keep_last: int
    resume: bool = True
    fallback: bool = True
    """When the newest checkpoint fails to load, warn and try the next older one (else: stop with the error)."""


@dataclass
class Run:
    """One training run: its directory, checkpoint policy and (optional) sharded state.

    ``total_name`` is the config key of the run's length, named in errors (``train.max_steps``). With a
    ``fingerprint`` (the settings the weights depend on) every checkpoint records it, and checkpoints made
    with other settings are not resumed: the run starts over. ``guard`` is the run's divergence guard
    (``max_bad_steps``, from the config key ``bad_steps_name``); checkpoints carry its count of skipped steps."""

    directory: Path
    info: DistInfo
    policy: CheckpointPolicy
    total_name: str
    sharded: ShardedState | None = None
    fingerprint: Any = None
    max_bad_steps: int = 0
    bad_steps_name: str = "train.max_bad_steps"
    logger: RunLogger | None = field(default=None, init=False)
    guard: DivergenceGuard = field(init=False)

    def __post_init__(self) -> None:
        self.directory = Path(self.directory).expanduser()
        self.guard = DivergenceGuard(
            self.max_bad_steps, self.checkpoints, self.bad_steps_name, is_main=self.info.is_main
        )

    @property
    def checkpoints(self) -> Path:
        return self.directory / CHECKPOINT_DIR

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the run directory's lock for the block (rank 0 holds it; every rank learns whether it got it).

        A second launch on the same directory stops with :class:`RunLockedError` naming the holder instead of
        overwriting its checkpoints. The lock is an ``flock`` on ``.lock``: the kernel drops it when the holder
        exits, however it dies, so it never goes stale on a local file system."""
        handle, refused = None, None
        if self.info.is_main:
            try:
                handle = lock_directory(self.directory)
            except RunLockedError as exc:
                refused = str(exc)
        refused = distributed.broadcast_object(refused)
        if refused is not None:
            raise RunLockedError(refused)
        try:
            yield
        finally:
            if handle is not None:
                handle.close()  # closing the file releases the flock

    def snapshot_config(self, config: Config) -> None:
        """Rank 0: create the run directory and write the resolved config into it."""
        if self.info.is_main:
            self.directory.mkdir(parents=True, exist_ok=True)
            save_config(config, self.directory / CONFIG_FILE)

    # ------------------------------------------------------------------------------------ checkpoints

    def start_over(self) -> None:
        """Rank 0: delete the run's checkpoints (a run with other settings, or one retrained on request)."""
        if self.info.is_main and self.checkpoints.is_dir():
            shutil.rmtree(self.checkpoints)
        distributed.barrier()

    def resume(self, total: int, map_location: str | torch.device = "cpu") -> tuple[RunState, dict[str, Any]]:
        """Load the newest checkpoint that loads (when resuming and there is one): the sharded state in place,
        the RNG streams; returns where to continue and the trainer's state ({} for a fresh run).

        A checkpoint that fails to load (a truncated or corrupted file, a crafted pickle) is named with the
        reason and, with ``policy.fallback``, the next older one is tried; when none loads the run stops with
        :class:`CheckpointLoadError` listing every failure (it never starts over silently)."""
        candidates = (
            [path for _, path in reversed(list_checkpoints(self.checkpoints))] if self.policy.resume else []
        )
        failures = []
        for path in candidates:
            try:
                return self._resume_from(path, total, map_location)
            except (ConfigError, KeyboardInterrupt):
                raise
            except Exception as exc:  # what a damaged file raises varies: torch, pickle, DCP, OS errors
                failures.append(f"{path}: {_first_line(exc)}")
                if not self.policy.fallback:
                    break
                if self.info.is_main:
                    print(
                        f"warning: cannot resume from {failures[-1]}; trying an older checkpoint", flush=True
                    )
        if failures:
            hint = "" if self.policy.fallback else " (fallback to older checkpoints is off)"
            raise CheckpointLoadError(
                f"no checkpoint in {self.checkpoints} could be loaded{hint}: " + "; ".join(failures)
            )
        return RunState(), {}

    def _resume_from(
        self, path: Path, total: int, map_location: str | torch.device
    ) -> tuple[RunState, dict[str, Any]]:
        state = load_checkpoint(path / STATE_FILE, map_location=map_location)
        if self.fingerprint is not None and state.get("fingerprint") != self.fingerprint:
            if self.info.is_main:
                print(f"the checkpoints in {self.checkpoints} were made with other settings: starting over")
            self.start_over()
            return RunState(), {}
        if int(state["step"]) > total:
            raise ConfigError(
                f"`{self.total_name}`: {path} is already at step {state['step']}; ask for at least that"
            )
        if self.sharded is not None:
            self.sharded.load(path)
        rng = state["rng"]
        # At another world size the old ranks' RNG streams cannot be handed over one to one; rank 0's seeds all.
        restore_rng_state(rng[self.info.rank] if len(rng) == self.info.world_size else rng[0])
        if self.info.is_main:
            print(
                f"resuming from {path} (step {state['step']}, "
                f"world size {state['world_size']} -> {self.info.world_size})"
            )
        self.guard.bad_steps = int(state.get("bad_steps", 0))
        run = RunState(int(state["step"]), state.get("data_state"), float(state.get("elapsed_seconds", 0.0)))
        return run, state

    def save(self, run: RunState, state: Mapping[str, Any], config: Config) -> None:
        """Write ``checkpoints/step-XXXXXXXX/`` atomically (a collective): every rank writes its sharded
        part, rank 0 the state file (``state`` plus the run's position and every rank's RNG) and the config,
        then renames the directory into place and prunes to ``keep_last``."""
        tmp = begin_checkpoint_dir(self.checkpoints, run.step) if self.info.is_main else None
        tmp = distributed.broadcast_object(tmp)
        error: BaseException | None = None
        try:
            if self.sharded is not None:
                self.sharded.save(tmp)  # a collective: a failure is raised on every rank
            rng = distributed.all_gather_object(capture_rng_state())
            if self.info.is_main:
                position = {
                    "fingerprint": self.fingerprint,
                    "step": run.step,
                    "data_state": run.data_state,
                    "elapsed_seconds": run.elapsed,
                    "world_size": self.info.world_size,
                    "rng": rng,
                    "bad_steps": self.guard.bad_steps,
                }
                torch.save({**state, **position}, tmp / STATE_FILE)
                save_config(config, tmp / CONFIG_FILE)
        except Exception as exc:
            error = exc
        # Every rank's part is on disk (or some rank failed: then all stop, none waits at a barrier forever).
        if any(distributed.all_gather_object(error is not None)):
            self._abandon(tmp, run.step, error)
        if self.info.is_main:
            commit_checkpoint_dir(tmp, run.step, keep_last=self.policy.keep_last)
        distributed.barrier()

    def _abandon(self, tmp: Path, step: int, error: BaseException | None) -> None:
        """A checkpoint failed on some rank: remove its partial directory (rank 0) and raise — a one-line
        :class:`DiskFullError` when the disk is full (torch's writers report that as an unrelated-looking
        RuntimeError), else the error itself (or a note that another rank failed)."""
        if self.info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        distributed.barrier()
        older = [path for _, path in list_checkpoints(self.checkpoints)]
        kept = f"{older[-1].name} is intact" if older else "no earlier checkpoint exists"
        if error is not None and not disk_full(error, self.checkpoints):
            raise error
        if error is None and not disk_full(None, self.checkpoints):
            raise RuntimeError(f"checkpoint {checkpoint_name(step)} failed on another rank; {kept}")
        took = f"; the previous checkpoint took {_megabytes(_tree_size(older[-1]))}" if older else ""
        raise DiskFullError(
            f"checkpoint {checkpoint_name(step)} not written: no space left on the disk of {self.checkpoints} "
            f"({_megabytes(shutil.disk_usage(self.checkpoints).free)} free{took}); its partial directory was "
            f"removed and {kept}. Free space, then rerun to resume"
        ) from error

    # ------------------------------------------------------------------------------------- logging

    @contextlib.contextmanager
    def logging(self, run: RunState, **settings: Any) -> Iterator[RunLogger]:
        """The run's bar, ``metrics.jsonl`` (records past ``run.step`` dropped) and wandb run (rank 0), open
        for the block (the loop logs through it) and closed after it. ``settings``: the :class:`RunLogger`'s
        ``name``, ``total``, ``wandb``, ``wandb_config`` and ``progress``."""
        self.logger = RunLogger(self.directory, initial=run.step, is_main=self.info.is_main, **settings)
        try:
            yield self.logger
        finally:
            self.logger.close()
            self.logger = None

    def save_curves(self, panels: tuple[Panel, ...], *, log_scale: tuple[str, ...] = ()) -> None:
        """Rank 0: ``loss_curves.png`` from ``metrics.jsonl`` (when anything was logged)."""
        metrics = self.directory / METRICS_FILE
        if self.info.is_main and metrics.is_file():
            save_curves(metrics, self.directory / CURVES_FILE, panels, log_scale=log_scale)

    # ------------------------------------------------------------------------------------- the loop

    def loop(
        self,
        run: RunState,
        total: int,
        train_step: Callable[[RunState], None],
        *,
        log_every: int,
        log: Callable[[RunState], tuple[dict[str, Any], Mapping[str, float]]],
        checkpoint: Callable[[RunState], None],
        evaluate: Callable[[RunState], dict[str, Any]] | None = None,
        eval_every: int = 0,
    ) -> dict[str, dict[str, Any]]:
        """Train from ``run.step`` to ``total``; returns the last record of each kind (``train``, ``eval``).

        ``train_step(run)`` trains step ``run.step`` (0-based) and sets ``run.data_state``; ``log(run)`` gives
        a record (with ``kind`` and ``step``) and the bar's postfix; ``evaluate(run)`` an evaluation record
        (every ``eval_every`` steps); ``checkpoint(run)`` saves (every ``policy.every`` steps and at the end).
        """
        assert self.logger is not None, "loop inside `with run.logging(...)`"
        crash_after = int(os.environ.get(CRASH_ENV, "0") or 0)
        last: dict[str, dict[str, Any]] = {}
        started = time.perf_counter() - run.elapsed
        while run.step < total:
            train_step(run)
            run.step += 1
            run.elapsed = time.perf_counter() - started
            self.logger.bar.update(1)
            if run.step % log_every == 0 or run.step == total:
                last["train"], postfix = log(run)
                self.logger.log(last["train"], postfix)
            if evaluate is not None and eval_every and run.step % eval_every == 0:
                last["eval"] = evaluate(run)
                self.logger.log(last["eval"])
            if run.step % self.policy.every == 0 or run.step == total:
                checkpoint(run)
            if crash_after and run.step == crash_after:
                os._exit(CRASH_EXIT_CODE)
        return last
