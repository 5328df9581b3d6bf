"""The trainer's model at step 0: built on ``meta``, sharded, then materialised and loaded shard by shard.

torchtitan's order (design convention 6): build on ``meta`` -> parallelise (FSDP2 ``fully_shard`` or
DeepSpeed) -> ``to_empty`` on the device -> load. Each rank then allocates only its shards and reads only their
slices of the safetensors files (:func:`unified_mllm.model.export.load_safetensors_into`), so a 7B run never
holds a whole copy of the model per rank.

Weights start from, in order, ``checkpoint.init_from`` (our export: every weight), ``model.lm.pretrained`` (the
LM and its head) and ``model.vision.pretrained`` (the SigLIP tower); a later source overwrites an earlier one.
The step-0 values must be exactly those of a model built on CPU under ``torch.manual_seed(train.seed)`` and
then loaded, and so must the CPU generator's state afterwards (training draws its dropout masks from it on CPU):

* when the checkpoints cover every parameter and buffer (found from the file headers, no tensor read), the
  model is built on ``meta`` with the CPU build's random draws replayed on scratch tensors
  (:func:`unified_mllm.model.meta_init.build_meta_model`), and loaded shard by shard after sharding;
* otherwise some weights keep their random initial values (stage 0; a stage 1 from a published LM and SigLIP
  with a fresh projector), and those values exist only through the CPU build: the model is built on CPU as
  before and loaded there, then sharded. A follow-up can remove this case by initialising each uncovered part
  on its own from a per-part seed (this changes the random values, so the README figures would be re-measured).

With ``train.lora.rank > 0`` the LoRA adapters are added right after the build (on ``meta`` or on CPU, before
any sharding, so FSDP2 shards them with their blocks); the export's weights load into the base layers under
their base names (:func:`unified_mllm.model.lora.base_state_dict`) and the adapters take their starting values
from their own generator (:func:`unified_mllm.model.lora.init_adapter`), whole and then sliced per rank, so
they are the same at every world size and the CPU generator's state is what it would be without LoRA.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from unified_mllm.config import Config
from unified_mllm.model import lora
from unified_mllm.model.export import (
    copy_into,
    lm_checkpoint_key,
    load_safetensors_into,
    safetensors_files,
    unique_state_dict,
)
from unified_mllm.model.meta_init import build_meta_model
from unified_mllm.model.unified import UnifiedModel
from unified_mllm.vision.siglip import load_siglip_pretrained

TOWER_PREFIX = "vision.tower."


def shard_region(target: torch.Tensor) -> tuple[torch.Tensor, list[tuple[int, int]]] | None:
    """The :data:`~unified_mllm.model.export.ShardRegion` of FSDP2: a sharded DTensor's local shard and the
    ``(start, stop)`` of every dimension of the whole tensor it covers; None for a whole tensor."""
    if not isinstance(target, DTensor):
        return None
    shape, offset = compute_local_shape_and_global_offset(target.shape, target.device_mesh, target.placements)
    return target.to_local(), [(start, start + size) for start, size in zip(offset, shape)]


def checkpoint_names(config: Config, names: set[str]) -> set[str]:
    """Which of the model's weight ``names`` the configured checkpoints provide (file headers only)."""
    provided: set[str] = set()
    if config.checkpoint.init_from:
        provided |= set(safetensors_files(Path(config.checkpoint.init_from).expanduser()))
    if config.model.lm.pretrained:
        provided |= {lm_checkpoint_key(key) or "" for key in safetensors_files(config.model.lm.pretrained)}
    if config.model.vision.pretrained:
        # The tower is loaded strictly: every tower weight comes from the SigLIP checkpoint.
        provided |= {name for name in names if name.startswith(TOWER_PREFIX)}
    return names & provided


def build_model(config: Config) -> tuple[UnifiedModel, bool]:
    """The step-0 model and whether it is still on ``meta`` (then :func:`materialize` it once sharded).

    A model that is not on ``meta`` is on CPU with its starting weights loaded. Either way the CPU generator
    is left as ``torch.manual_seed(train.seed)`` followed by a CPU build leaves it.
    """
    # Plain meta construction draws nothing, so the coverage check leaves the generator untouched.
    names = set(unique_state_dict(UnifiedModel(config.model, device="meta")))
    covered = checkpoint_names(config, names) == names
    torch.manual_seed(config.train.seed)  # identical random init (and draws) on every rank
    if covered:
        model = build_meta_model(config.model)
        add_lora(model, config)
        return model, True
    model = UnifiedModel(config.model, device="cpu")
    load_starting_weights(model, config)
    if add_lora(model, config):
        lora.init_adapter(model, config.train.seed)
    return model, False


def add_lora(model: UnifiedModel, config: Config) -> bool:
    """Add the adapters ``train.lora`` asks for (none at rank 0); returns whether it added any."""
    if not lora.enabled(config.train.lora):
        return False
    assert config.checkpoint.init_from is not None  # validate() requires the base export with LoRA
    base = str(Path(config.checkpoint.init_from).expanduser().absolute())
    lora.add_adapter(model, config.train.lora, base)
    return True


def materialize(model: nn.Module, device: torch.device, config: Config) -> None:
    """Allocate a meta-built (possibly sharded) model on ``device`` and load its starting weights: each rank
    allocates and reads only its own shards."""
    assert isinstance(model, UnifiedModel)
    model.to_empty(device=device)
    model.tie_weights()
    model.init_non_persistent_buffers()
    load_starting_weights(model, config)
    if lora.enabled(config.train.lora):
        lora.init_adapter(model, config.train.seed, shard_region)


def load_starting_weights(model: UnifiedModel, config: Config) -> None:
    """Read ``checkpoint.init_from``, then the published LM, then SigLIP into ``model`` (whole or sharded)."""
    if config.checkpoint.init_from:
        init = Path(config.checkpoint.init_from).expanduser()
        # The base weights under their base names (the same as unique_state_dict without LoRA adapters).
        load_safetensors_into(
            lora.base_state_dict(model), safetensors_files(init), f"export {init}", shard=shard_region
        )
    if config.model.lm.pretrained:
        model.load_pretrained(lm=config.model.lm.pretrained, shard=shard_region)
    if config.model.vision.pretrained:
        load_tower(model, config.model.vision.pretrained)


def load_tower(model: UnifiedModel, path: str) -> None:
    """The SigLIP checkpoint at ``path`` into ``model.vision.tower`` (each rank keeps its shards only).

    transformers reads the tower whole (in fp32, as the tower is built); it is a small part of the model.
    """
    loaded = load_siglip_pretrained(path, model.config.vision, dtype=torch.float32).state_dict()
    targets = model.vision.tower.state_dict(keep_vars=True)
    missing, unexpected = sorted(set(targets) - set(loaded)), sorted(set(loaded) - set(targets))
    if missing or unexpected:
        raise KeyError(f"SigLIP checkpoint {path}: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        for name, target in targets.items():
            copy_into(target, loaded[name], shard_region)
