"""Training-state checkpoints for exact resume: atomic ``step-XXXXXXXX/`` directories, keep-last-N, RNG state.

A checkpoint (``step-00000500/state.pt``: whatever the trainer puts in it) is written into a hidden temporary
directory (:func:`begin_checkpoint_dir`; any files, e.g. the LM's sharded ``torch.distributed.checkpoint`` ones)
and renamed into place (:func:`commit_checkpoint_dir`) only when every file in it is complete and fsynced, so a
run killed while saving never leaves a ``step-*`` directory that looks finished: :func:`latest_checkpoint` only
ever sees whole ones.

State files are read with ``torch.load(weights_only=True)``: tensors, numbers, strings and containers only,
never arbitrary pickled objects. That is why :func:`capture_rng_state` stores numpy's generator state with its
key array as a tensor.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unified_mllm import io
from unified_mllm.pickles import UnsafePickleError

STATE_FILE = "state.pt"
CHECKPOINT_PREFIX = "step-"
_CHECKPOINT_RE = re.compile(r"^step-(\d{8,})$")


def checkpoint_name(step: int) -> str:
    """``step-00000500`` for step 500 (zero-padded, so names sort like steps)."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def list_checkpoints(directory: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """Finished checkpoints in ``directory`` as ``(step, path)``, oldest first ([] when there is none)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = _CHECKPOINT_RE.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(directory: str | os.PathLike[str]) -> Path | None:
    """The newest finished checkpoint in ``directory``, or None."""
    checkpoints = list_checkpoints(directory)
    return checkpoints[-1][1] if checkpoints else None


def prune_checkpoints(directory: str | os.PathLike[str], keep_last: int) -> list[Path]:
    """Delete all but the ``keep_last`` newest checkpoints (and stale temporary directories); returns the
    deleted paths."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    doomed = [path for _, path in list_checkpoints(directory)[:-keep_last]]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    # Leftovers of a run killed while saving: never a finished checkpoint.
    return doomed + io.remove_stale_temporaries(directory, CHECKPOINT_PREFIX)


def begin_checkpoint_dir(directory: str | os.PathLike[str], step: int) -> Path:
    """A fresh hidden temporary directory in ``directory`` to fill with checkpoint ``step``'s files.

    Multi-rank writers (sharded ``torch.distributed.checkpoint``, DeepSpeed) call this on one rank, share the
    path, let every rank write, wait for all, and then call :func:`commit_checkpoint_dir` on that same rank.
    """
    return io.begin_directory(Path(directory) / checkpoint_name(step))


def commit_checkpoint_dir(tmp: Path, step: int, *, keep_last: int | None = None) -> Path:
    """fsync ``tmp`` and rename it to ``step-XXXXXXXX`` beside it (replacing an older copy of that step);
    then, with ``keep_last``, delete the older checkpoints beyond the newest ``keep_last``."""
    final = io.commit_directory(tmp, tmp.parent / checkpoint_name(step))
    if keep_last is not None:
        prune_checkpoints(tmp.parent, keep_last)
    return final


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The state dict of a checkpoint directory (or of its ``state.pt``), loaded with ``weights_only=True``."""
    path = Path(path)
    file = path / STATE_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no training-state file at {file}")
    try:
        state = torch.load(file, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:  # names a global weights_only refuses: crafted, or not ours
        # torch's message is a page of advice; keep the line that names the refused global.
        lines = [line.strip() for line in str(exc).splitlines() if "global" in line.lower()]
        reason = lines[-1].split(". Please use")[0] if lines else type(exc).__name__
        raise UnsafePickleError(f"{file} is not a training-state file this project wrote: {reason}") from exc
    if not isinstance(state, dict):
        raise ValueError(f"{file} holds a {type(state).__name__}, not a training-state dict")
    return state


# ------------------------------------------------------------------------------------------------ RNG


def capture_rng_state() -> dict[str, Any]:
    """The state of Python's, numpy's and torch's global generators (CPU, and every CUDA device in use).

    numpy's legacy state tuple is stored with its key array as a tensor, so the result survives
    ``torch.load(weights_only=True)``.
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _as_tuple(value: Any) -> Any:
    # weights_only loading turns tuples inside lists back into tuples, but be lenient with lists.
    return tuple(_as_tuple(v) for v in value) if isinstance(value, list | tuple) else value


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`capture_rng_state` captured (CUDA states only when CUDA is in use here)."""
    random.setstate(_as_tuple(state["python"]))
    numpy_state = state["numpy"]
    keys = numpy_state["keys"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
    np.random.set_state(
        (
            numpy_state["kind"],
            keys.astype(np.uint32),
            int(numpy_state["pos"]),
            int(numpy_state["has_gauss"]),
            float(numpy_state["cached_gaussian"]),
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
