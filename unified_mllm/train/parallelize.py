"""Make a built model trainable on many processes: activation checkpointing, ``torch.compile``, FSDP2.

Design convention 1: model code knows nothing about distribution; this module applies it from outside, in
torchtitan's order — activation checkpointing, then compilation, then sharding:

* **activation checkpointing** (``train.parallel.activation_checkpointing``) through transformers' own
  per-layer mechanism (non-reentrant ``torch.utils.checkpoint``), so parameter names stay exactly those of the
  published checkpoints (no wrapper modules). The residual-dropout hooks replay the same masks in the
  recomputation because non-reentrant checkpointing restores the RNG state;
* **compilation** (``train.parallel.compile``): each decoder block and each SigLIP encoder layer is compiled in
  place (``module.compile()``), again without renaming anything;
* **FSDP2**: ``fully_shard`` on every LM block and every SigLIP encoder layer, then on the root (embeddings,
  head, norms, projector), over a 1-D device mesh of all ranks. ``reshard_after_forward`` frees gathered
  parameters between forward and backward (ZeRO-3 style; False keeps them, ZeRO-2 style). In ``bf16`` the
  compute runs in bf16 while the sharded master weights, gradients reductions and optimizer stay fp32
  (``MixedPrecisionPolicy``). FSDP2 runs on CPU with gloo, which is how the multi-process tests run.

DeepSpeed ZeRO-2/3 is the second backend (:mod:`unified_mllm.train.backend`); it does its own sharding and
takes the model after :func:`apply_activation_checkpointing` / :func:`apply_compile` only.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from unified_mllm.config import ParallelConfig
from unified_mllm.train.distributed import DistInfo

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def repeated_blocks(model: nn.Module) -> Iterator[nn.Module]:
    """The model's repeated blocks: LM decoder layers, then SigLIP encoder layers (when there is a tower)."""
    yield from model.lm.layers
    vision = getattr(model, "vision", None)
    if vision is not None:
        yield from vision.tower.encoder.layers


def _checkpointable(model: nn.Module) -> Iterator[nn.Module]:
    yield model.lm
    vision = getattr(model, "vision", None)
    if vision is not None:
        yield vision.tower


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute every block's activations in the backward (transformers' gradient checkpointing)."""
    for module in _checkpointable(model):
        module.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def apply_compile(model: nn.Module) -> None:
    """Compile each repeated block in place (one graph per block kind; names unchanged)."""
    for block in repeated_blocks(model):
        block.compile()


def apply_fsdp(model: nn.Module, parallel: ParallelConfig, precision: str, info: DistInfo) -> DeviceMesh:
    """Shard ``model`` in place with FSDP2 over all ranks; returns the device mesh."""
    mesh = init_device_mesh(info.device.type, (info.world_size,))
    policy = MixedPrecisionPolicy(param_dtype=PRECISIONS[precision], reduce_dtype=torch.float32)
    for block in repeated_blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=parallel.reshard_after_forward)
    # The root keeps its parameters gathered after forward: the backward needs them first anyway.
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    return mesh


def prepare_model(model: nn.Module, parallel: ParallelConfig) -> None:
    """The parts every backend applies before sharding: activation checkpointing, then compilation."""
    if parallel.activation_checkpointing:
        apply_activation_checkpointing(model)
    if parallel.compile:
        apply_compile(model)
