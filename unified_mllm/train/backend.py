"""The two data-parallel engines behind one small interface: FSDP2 (or one plain process) and DeepSpeed.

The trainer never branches on the backend; it calls :meth:`TrainingBackend.forward`, ``backward``,
``optimizer_step``, ``save`` / ``load`` and ``full_state_dict``:

* :class:`FSDPBackend` — ``train.parallel.backend=fsdp``: FSDP2 across the ranks of a ``torchrun`` job
  (:func:`unified_mllm.train.parallelize.apply_fsdp`), or the bare model in a single process (also
  ``backend=none``). Training state is saved with ``torch.distributed.checkpoint`` (DCP): every rank writes
  its shards and DCP re-shards on load, so a run resumes at another world size (also from 2 ranks to 1).
* :class:`DeepSpeedBackend` — ``backend=deepspeed`` with a ZeRO JSON (``configs/deepspeed/zero2.json``,
  ``zero3.json``). Batch size, accumulation, clipping and precision are filled in from our config, so the
  JSON only says how to shard. DeepSpeed writes its own checkpoint format; it resumes at the same world
  size (DeepSpeed's ``ds_to_universal`` converts it for another one).

Loss scaling: the trainer's loss is already normalised by the *global* number of supervised tokens of the
step; FSDP and DeepSpeed average gradients over ranks and DeepSpeed also divides by the accumulation steps,
so :meth:`TrainingBackend.loss_multiplier` says what to multiply by to undo exactly that.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from unified_mllm.config import Config, ConfigError
from unified_mllm.pickles import UnsafePickleError, check_dcp_metadata
from unified_mllm.train.distributed import DistInfo
from unified_mllm.train.optim import build_optimizer, build_scheduler, param_groups
from unified_mllm.train.parallelize import PRECISIONS, apply_fsdp, prepare_model

# Allocates a model built on `meta` (after sharding: only this rank's shards) and loads its starting weights.
Materialize = Callable[[nn.Module], None]

DCP_DIR = "dcp"
DEEPSPEED_DIR = "deepspeed"
DEEPSPEED_TAG = "state"


class TrainingBackend:
    """One engine: the (possibly wrapped) model, its optimizer and LR scheduler."""

    module: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler

    def forward(self, **batch: Any) -> Any:
        with self.autocast():
            return self.module(**batch)

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def loss_multiplier(self) -> float:
        raise NotImplementedError

    def backward(self, loss: torch.Tensor, *, sync: bool = True) -> None:
        """Backpropagate one micro-batch; ``sync=False`` may skip the gradient reduction (not the last one)."""
        raise NotImplementedError

    def optimizer_step(self, accept: Callable[[torch.Tensor], bool] | None = None) -> torch.Tensor:
        """Clip, step the optimizer (unless ``accept(grad_norm)`` refuses: the divergence guard) and the
        schedule, zero the gradients; returns the gradient norm (a tensor)."""
        raise NotImplementedError

    def save(self, directory: Path) -> None:
        """Write model + optimizer state into ``directory`` (every rank calls it)."""
        raise NotImplementedError

    def load(self, directory: Path) -> None:
        raise NotImplementedError

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's weights on rank 0 (CPU); other ranks get ``{}``. A collective."""
        raise NotImplementedError


class FSDPBackend(TrainingBackend):
    """FSDP2 over every rank of the job, or the bare model when there is only one process."""

    def __init__(
        self,
        model: nn.Module,
        resolved: dict[str, Any],
        config: Config,
        info: DistInfo,
        materialize: Materialize | None = None,
    ) -> None:
        parallel, precision = config.train.parallel, config.train.precision
        if precision == "fp16":
            raise ConfigError("`train.precision`: fp16 needs loss scaling; use bf16 (or backend=deepspeed)")
        if parallel.backend == "none" and info.distributed:
            raise ConfigError("`train.parallel.backend`: 'none' runs one process; use fsdp or deepspeed")
        self.info, self.grad_clip = info, config.optim.grad_clip
        self.trust_metadata = config.checkpoint.trust_metadata
        prepare_model(model, parallel)
        self.sharded = info.distributed
        if self.sharded:
            apply_fsdp(model, parallel, precision, info)
        if materialize is not None:  # torchtitan's order: meta -> shard -> allocate the shards -> load
            materialize(model)
        self.dtype = PRECISIONS[precision]
        self.module = model
        self.optimizer = build_optimizer(param_groups(model, resolved, config.optim), config.optim)
        self.scheduler = build_scheduler(self.optimizer, config.optim, config.train.max_steps)
        self._trainable = [p for p in model.parameters() if p.requires_grad]

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        # FSDP2's MixedPrecisionPolicy casts the sharded model; one plain process autocasts instead.
        if self.sharded or self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.info.device.type, dtype=self.dtype)

    def loss_multiplier(self) -> float:
        return float(self.info.world_size)  # FSDP averages gradients over ranks

    def backward(self, loss: torch.Tensor, *, sync: bool = True) -> None:
        if self.sharded:
            # Accumulate unsharded local gradients until the step's last micro-batch, then reduce-scatter once.
            self.module.set_requires_gradient_sync(sync)
        loss.backward()

    def optimizer_step(self, accept: Callable[[torch.Tensor], bool] | None = None) -> torch.Tensor:
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self._trainable, max_norm)
        if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
            norm = norm.full_tensor()
        if accept is None or accept(norm):
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.detach()

    def save(self, directory: Path) -> None:
        self._dcp(dcp.save, directory)

    def load(self, directory: Path) -> None:
        if not self.trust_metadata:
            check_dcp_files(directory / DCP_DIR)
        state = self._dcp(dcp.load, directory)
        set_state_dict(
            self.module, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )

    def _dcp(self, operation: Callable[..., object], directory: Path) -> dict[str, Any]:
        """``dcp.save`` / ``dcp.load`` (in place) of the model and optimizer state under ``directory``."""
        model_state, optim_state = get_state_dict(self.module, self.optimizer)
        state = {"model": model_state, "optim": optim_state}
        with warnings.catch_warnings():
            if not self.sharded:  # one process reads and writes DCP files on purpose; torch warns even so
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            operation(state, checkpoint_id=str(directory / DCP_DIR), no_dist=not self.sharded)
        return state

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(self.module, options=options)
        return state if self.info.is_main else {}


def check_dcp_files(directory: Path) -> None:
    """Before torch reads a DCP checkpoint: its ``.metadata`` through the restricted reader (torch unpickles it
    in full), then every data file it names present and as long as the entries it holds, so a truncated file
    is named (torch would say only "checkpoint file is corrupted")."""
    path = directory / ".metadata"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    try:
        metadata = check_dcp_metadata(path)
    except UnsafePickleError as exc:
        raise UnsafePickleError(
            f"{exc}. Resume only from a run directory you trust: checkpoint.trust_metadata=true skips this check"
        ) from None
    needed: dict[str, int] = {}
    for info in (getattr(metadata, "storage_data", None) or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        file = directory / name
        if not file.is_file():
            raise FileNotFoundError(f"{file} is missing (named by {path})")
        if file.stat().st_size < size:
            raise ValueError(f"{file} is truncated: {file.stat().st_size} bytes, its entries need {size}")


def deepspeed_settings(config: Config, info: DistInfo) -> dict[str, Any]:
    """The DeepSpeed JSON of ``train.parallel.deepspeed_config`` with batch, accumulation, clipping and
    precision taken from our config (values the JSON sets to something else are an error, not a surprise)."""
    path = Path(config.train.parallel.deepspeed_config)
    if not path.is_file():
        raise ConfigError(f"`train.parallel.deepspeed_config`: {path} does not exist")
    settings = json.loads(path.read_text())
    train = config.train
    ours = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum_steps,
        "train_batch_size": train.micro_batch_size * train.grad_accum_steps * info.world_size,
        "gradient_clipping": config.optim.grad_clip,
    }
    for key, value in ours.items():
        if settings.get(key, "auto") not in ("auto", value):
            raise ConfigError(
                f"{path}: `{key}` is {settings[key]!r}, but our config says {value!r}; use auto"
            )
        settings[key] = value
    settings["bf16"] = {"enabled": train.precision == "bf16"}
    settings["fp16"] = {**settings.get("fp16", {}), "enabled": train.precision == "fp16"}
    settings.setdefault("steps_per_print", 1 << 30)  # we log ourselves
    return settings


class DeepSpeedBackend(TrainingBackend):
    """DeepSpeed ZeRO (stage from the JSON) around the model, our AdamW groups and our LR schedule."""

    def __init__(
        self,
        model: nn.Module,
        resolved: dict[str, Any],
        config: Config,
        info: DistInfo,
        materialize: Materialize | None = None,
    ) -> None:
        if info.device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed picks an accelerator
        import deepspeed  # optional dependency: imported only for this backend

        prepare_model(model, config.train.parallel)
        if materialize is not None:
            # deepspeed.initialize partitions materialised parameters (ZeRO-3 without zero.Init included), so
            # every rank allocates the whole model here before DeepSpeed shards it.
            materialize(model)
        self.info, self.grad_accum = info, config.train.grad_accum_steps
        settings = deepspeed_settings(config, info)
        self.zero_stage = int(settings.get("zero_optimization", {}).get("stage", 0))
        optimizer = build_optimizer(param_groups(model, resolved, config.optim), config.optim)
        scheduler = build_scheduler(optimizer, config.optim, config.train.max_steps)
        engine, ds_optimizer, _, ds_scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=settings
        )
        self.engine, self.module = engine, engine
        self.optimizer, self.scheduler = ds_optimizer, ds_scheduler

    def loss_multiplier(self) -> float:
        # DeepSpeed averages over ranks and divides by the accumulation steps inside backward.
        return float(self.info.world_size * self.grad_accum)

    def backward(self, loss: torch.Tensor, *, sync: bool = True) -> None:
        # DeepSpeed counts micro-steps itself: step() after every backward updates only at the boundary.
        self.engine.backward(loss)
        self.engine.step()

    def optimizer_step(self, accept: Callable[[torch.Tensor], bool] | None = None) -> torch.Tensor:
        # The last backward's engine.step() was the accumulation boundary: the update is already done, so the
        # guard can only stop the run here (train.max_bad_steps must be 0 with this backend).
        norm = self.engine.get_global_grad_norm()
        norm = torch.as_tensor(0.0 if norm is None else float(norm))
        if accept is not None:
            accept(norm)
        return norm

    def save(self, directory: Path) -> None:
        self.engine.save_checkpoint(str(directory / DEEPSPEED_DIR), tag=DEEPSPEED_TAG)

    def load(self, directory: Path) -> None:
        path, _ = self.engine.load_checkpoint(
            str(directory / DEEPSPEED_DIR), tag=DEEPSPEED_TAG, load_lr_scheduler_states=True
        )
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {directory / DEEPSPEED_DIR}")

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        import deepspeed

        module = self.engine.module
        # ZeRO-3 partitions the parameters: gather them for the copy (below stage 3 they are whole everywhere).
        gathered = contextlib.nullcontext()
        if self.zero_stage >= 3:
            gathered = deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
        with gathered:
            state = {k: v.detach().float().cpu() for k, v in module.state_dict().items()}
        return state if self.info.is_main else {}


def build_backend(
    model: nn.Module,
    resolved: dict[str, Any],
    config: Config,
    info: DistInfo,
    *,
    materialize: Materialize | None = None,
) -> TrainingBackend:
    """The engine ``train.parallel.backend`` names, around ``model``: on ``info.device``, or on ``meta`` with
    ``materialize`` to call once the engine has sharded it (before the optimizer takes its parameters)."""
    if config.train.parallel.backend == "deepspeed":
        return DeepSpeedBackend(model, resolved, config, info, materialize)
    return FSDPBackend(model, resolved, config, info, materialize)
