"""Process groups from the ``torchrun`` environment, and the few collectives the trainers need.

``torchrun --nproc_per_node=N`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous variables;
:func:`init_distributed` reads them and opens the default process group — ``nccl`` when the ranks run on CUDA,
``gloo`` on CPU (so multi-process runs and their tests work on any machine). Started plainly (``python -m
...``), with no ``WORLD_SIZE`` or ``WORLD_SIZE=1``, no process group is created and every helper here turns
into the single-process identity (``all_reduce_sum`` returns its input, ``barrier`` returns at once), so the
same training code runs both ways.

Model code never imports this module (design convention 1); entry points (trainers) do.
"""

from __future__ import annotations

import ctypes
import inspect
import logging
import os
import signal
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.distributed.nn as dist_nn
from torch import nn
from torch.nn.parallel import DistributedDataParallel

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: global ``rank`` of ``world_size``, ``local_rank`` on its node, its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that logs, writes files and shows progress bars."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return default if value in (None, "") else int(value)
    except ValueError as exc:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from exc


def pick_device(local_rank: int, device: str | None = None) -> torch.device:
    """``device`` when given (``"cpu"``, ``"cuda"``; a bare ``"cuda"`` means this rank's GPU), else this
    rank's GPU when CUDA is available, else the CPU."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = torch.device(device)
    if resolved.type == "cuda" and resolved.index is None:
        resolved = torch.device("cuda", local_rank)
    return resolved


def init_distributed(device: str | None = None, timeout_s: float = 1800.0) -> DistInfo:
    """Open the default process group when launched by ``torchrun`` with more than one process.

    Idempotent: when a group already exists it is reused. The backend is ``nccl`` for CUDA devices and
    ``gloo`` otherwise; on CUDA the current device is set to ``cuda:LOCAL_RANK`` so collectives and
    ``torch.cuda`` calls land on this rank's GPU.
    """
    rank, world_size = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    if LAUNCHER_ENV in os.environ:
        exit_with_launcher()
    resolved = pick_device(local_rank, device)
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if resolved.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend,
            timeout=timedelta(seconds=timeout_s),
            device_id=resolved if resolved.type == "cuda" else None,
        )
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=resolved)


# Set by torchrun in every worker it starts.
LAUNCHER_ENV = "TORCHELASTIC_RUN_ID"
_PR_SET_PDEATHSIG = 1  # prctl(2)


def exit_with_launcher() -> bool:
    """Ask the kernel to kill this worker when its launcher dies (Linux ``PR_SET_PDEATHSIG``): torchrun starts
    every worker in a session of its own, so killing the launcher's process group would leave them training
    and checkpointing on their own. Returns whether the request took (False off Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    launcher = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != launcher:  # the launcher died before the request: nobody will signal us
        os.kill(os.getpid(), signal.SIGKILL)
    return True


def is_distributed() -> bool:
    """Whether a process group with more than one rank is open."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def barrier() -> None:
    """Wait for every rank (a no-op in a single process)."""
    if is_distributed():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks **in place** and return it (unchanged in a single process)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Average ``tensor`` over ranks in place and return it."""
    if is_distributed():
        all_reduce_sum(tensor).div_(dist.get_world_size())
    return tensor


def all_gather_with_grad(rows: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Every rank's ``rows`` ``[B, D]`` concatenated in rank order, gradients flowing back to each rank's own
    rows (``torch.distributed.nn``), and the index where this rank's rows start; ``(rows, 0)`` in a single
    process. Every rank must pass the same shape."""
    if not is_distributed():
        return rows, 0
    return torch.cat(dist_nn.all_gather(rows.contiguous())), dist.get_rank() * rows.shape[0]


def broadcast(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``tensor`` on every rank with rank ``src``'s values (in place) and return it."""
    if is_distributed():
        dist.broadcast(tensor, src=src)
    return tensor


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s picklable ``obj`` on every rank (the argument is ignored on the other ranks)."""
    if not is_distributed():
        return obj
    holder: list[Any] = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def all_gather_object(obj: T) -> list[T]:
    """Every rank's picklable ``obj``, indexed by rank (``[obj]`` in a single process)."""
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def wrap_ddp(module: nn.Module, info: DistInfo, *, sync_buffers: bool = True) -> nn.Module:
    """``module`` in ``DistributedDataParallel`` when the run is distributed, else ``module`` itself.

    ``sync_buffers=False`` stops DDP from re-broadcasting rank 0's buffers before every forward (they are still
    synchronised once, at wrapping): for modules that keep their buffers identical on every rank themselves.
    """
    if not info.distributed:
        return module
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    options: dict[str, Any] = {}
    if not sync_buffers:
        # Renamed in recent torch versions; the old name still works there but warns.
        parameters = inspect.signature(DistributedDataParallel.__init__).parameters
        name = "forward_sync_buffers" if "forward_sync_buffers" in parameters else "broadcast_buffers"
        options[name] = False
    return DistributedDataParallel(module, device_ids=device_ids, **options)


def shutdown() -> None:
    """Close the default process group if one is open (call at the end of a run, also after errors)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exit_finished_worker() -> None:
    """End a multi-process worker whose run has finished, skipping interpreter finalization (a no-op in a single
    process). Call it last, after :func:`shutdown`, from an entry point's ``__main__`` block, never from library
    code. Why: the gloo group's threads outlive :func:`shutdown` (the device mesh and sharded parameters keep
    references), and while CPython finalizes they may drop references to Python objects; taking the GIL then
    unwinds the thread through a ``noexcept`` destructor and the rank aborts with "terminate called without an
    active exception" (pytorch/pytorch#38228, #117762) — rare, but torchrun then reports a finished run as
    failed. By now every file is written and closed and the group is closed, so the process exits 0 at once.
    """
    if _env_int("WORLD_SIZE", 1) <= 1:
        return
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
