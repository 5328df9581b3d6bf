"""LoRA adapters on the unified model through peft: add them, initialise them, save, read and merge them.

``train.lora`` (:class:`~unified_mllm.config.LoRAConfig`) names the LM decoder linears to adapt in every layer
(and optionally the projector's linears). peft's ``inject_adapter_in_model`` replaces each of them in place by
a LoRA layer, so the model stays a :class:`~unified_mllm.model.unified.UnifiedModel` whose parameter names
change only inside the adapted layers: the base weight moves to ``<layer>.base_layer.weight`` and the adapter
adds ``<layer>.lora_A.default.weight`` / ``<layer>.lora_B.default.weight``. :func:`base_state_dict` maps the
names back, so the starting weights load from an ordinary export whole or shard by shard.

**Adapter export** (a LoRA run's ``checkpoint.export_dir``), peft's own format, so peft's tools read it too::

    adapter_config.json          peft's LoraConfig; base_model_name_or_path = the base export (absolute path)
    adapter_model.safetensors    base_model.model.<layer>.lora_A.weight / .lora_B.weight, nothing else
    config.yaml                  the LoRA run's resolved config (what was trained; tools read an export's
                                 config from here), while the tokenizers and their config stay in the base

:func:`load_model` turns an adapter export into the merged model (base + scale * B @ A, computed in the base's
stored dtype before any cast), which is what ``InferenceSolver.from_pretrained`` and
``python -m unified_mllm.convert merge-lora`` use; :func:`apply_adapter` keeps the adapters unmerged.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import peft
import torch
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from torch import nn

from unified_mllm.config import Config, LoRAConfig, save_config
from unified_mllm.io import atomic_directory
from unified_mllm.model.export import CONFIG_YAML, ShardRegion, copy_into, held_whole, unique_state_dict
from unified_mllm.model.unified import UnifiedModel

ADAPTER_NAME = "default"  # peft's name for a model's single adapter
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# peft stores an adapter under the names a PeftModel gives its layers: PeftModel.base_model (the LoRA tuner),
# whose .model is ours.
PEFT_PREFIX = "base_model.model."
_ADAPTER_PART = re.compile(r"\.(lora_[AB])\.[^.]+\.")


def enabled(lora: LoRAConfig) -> bool:
    """Whether the config asks for LoRA (a positive rank)."""
    return lora.rank > 0


def target_pattern(model: UnifiedModel, lora: LoRAConfig) -> str:
    """peft's ``target_modules`` regex (matched against whole module names) for ``lora`` on ``model``: the
    named LM linears of every decoder layer, and with ``lora.projector`` each linear layer of the projector."""
    parts = []
    if lora.target_modules:
        names = "|".join(re.escape(name) for name in lora.target_modules)
        parts.append(rf"lm\.layers\.\d+\.(self_attn|mlp)\.({names})")
    if lora.projector:
        linears = [
            name for name, module in model.vision.projector.named_children() if isinstance(module, nn.Linear)
        ]
        parts.append(rf"vision\.projector\.({'|'.join(linears)})")
    return "|".join(parts)


def peft_config(model: UnifiedModel, lora: LoRAConfig, base: str | None = None) -> peft.LoraConfig:
    """peft's LoraConfig for ``lora`` on ``model``; ``base``: the export the adapter applies to."""
    return peft.LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=target_pattern(model, lora),
        bias="none",
        base_model_name_or_path=base,
    )


def inject(model: UnifiedModel, config: peft.LoraConfig) -> None:
    """Replace the targeted linears of ``model`` by peft LoRA layers in place (on the model's device, ``meta``
    included). The global RNG is left as it was: peft's layer construction draws from it, and the trainer's
    dropout masks must not depend on whether LoRA is on; :func:`init_adapter` sets the adapters' values.
    peft raises when the pattern matches no layer; config validation admits only the LM's own layer names."""
    training = model.training  # peft builds its layers in training mode (adapter dropout on)
    with torch.random.fork_rng(devices=[]):
        peft.inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    model.train(training)


def add_adapter(model: UnifiedModel, lora: LoRAConfig, base: str | None = None) -> peft.LoraConfig:
    """:func:`inject` the adapters ``lora`` describes; every non-adapter parameter is frozen (peft's rule).
    Returns peft's config of the adapter."""
    config = peft_config(model, lora, base)
    inject(model, config)
    return config


def injected_config(model: nn.Module) -> peft.LoraConfig:
    """peft's config of the adapter :func:`inject` added to ``model`` (peft keeps it on the model)."""
    configs = getattr(model, "peft_config", None)
    if not configs or ADAPTER_NAME not in configs:
        raise ValueError("the model has no LoRA adapter")
    config = configs[ADAPTER_NAME]
    assert isinstance(config, peft.LoraConfig)
    return config


def is_adapter_name(name: str) -> bool:
    """Whether a parameter name of an injected model belongs to an adapter (``lora_A`` / ``lora_B``)."""
    return _ADAPTER_PART.search(name) is not None


def base_name(name: str) -> str:
    """The base model's name of a non-adapter parameter of an injected model."""
    return name.replace(".base_layer.", ".")


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The live base weights of a (possibly injected) model under the base model's names, adapters left out:
    what an export's tensors load into (``unique_state_dict`` of the model without LoRA)."""
    return {base_name(k): v for k, v in unique_state_dict(model).items() if not is_adapter_name(k)}


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The adapters' parameters of an injected model, by name."""
    return {name: p for name, p in model.named_parameters() if is_adapter_name(name)}


def init_adapter(model: nn.Module, seed: int, shard: ShardRegion = held_whole) -> None:
    """Give every adapter its starting values, the same whatever the sharding: ``lora_B`` zero (the adapted
    model starts as the base), ``lora_A`` peft's default (Kaiming-uniform with a = sqrt(5), i.e. uniform in
    +-1/sqrt(fan_in)) drawn whole, in name order, from a generator seeded with ``seed``; each rank keeps its
    own region (``shard``). The global RNG is not touched."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(adapter_parameters(model).items()):
            if ".lora_B." in name:
                whole = torch.zeros(param.shape)
            else:
                bound = 1.0 / math.sqrt(param.shape[1])
                whole = torch.empty(param.shape).uniform_(-bound, bound, generator=generator)
            copy_into(param, whole, shard)


# ------------------------------------------------------------------------------------------ adapter export


def adapter_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter tensors of a full state dict of an injected model, under peft's file names."""
    return {
        PEFT_PREFIX + _ADAPTER_PART.sub(r".\1.", name): tensor.detach().contiguous()
        for name, tensor in state.items()
        if is_adapter_name(name)
    }


def write_adapter_export(
    directory: str | os.PathLike[str],
    config: peft.LoraConfig,
    state: Mapping[str, torch.Tensor],
    run_config: Config | None = None,
) -> Path:
    """Write the adapter export (peft's ``adapter_config.json`` + ``adapter_model.safetensors``, and the
    run's resolved ``config.yaml`` when given) atomically; ``state``: the injected model's state dict (its
    adapter tensors are kept, nothing else)."""
    if not config.base_model_name_or_path:
        raise ValueError("an adapter export needs the path of its base export (base_model_name_or_path)")
    tensors = adapter_state(state)
    if not tensors:
        raise ValueError("the state dict holds no LoRA adapter tensors")
    directory = Path(directory).expanduser().absolute()
    with atomic_directory(directory) as tmp:
        config.save_pretrained(str(tmp))
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        if run_config is not None:
            save_config(run_config, tmp / CONFIG_YAML)
    return directory


def is_adapter_export(directory: str | os.PathLike[str]) -> bool:
    """Whether ``directory`` holds an adapter export (peft's ``adapter_config.json``)."""
    return (Path(directory).expanduser() / ADAPTER_CONFIG).is_file()


def read_adapter_config(directory: str | os.PathLike[str]) -> peft.LoraConfig:
    """peft's config of the adapter export in ``directory``; errors name the file and what is wrong."""
    path = Path(directory).expanduser() / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{ADAPTER_CONFIG} not found in adapter export {path.parent}")
    data: dict[str, Any] = json.loads(path.read_text())
    if data.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type is {data.get('peft_type')!r}, only LORA adapters are read")
    config = peft.LoraConfig.from_pretrained(str(path.parent))
    assert isinstance(config, peft.LoraConfig)
    return config


def base_export(directory: str | os.PathLike[str]) -> Path:
    """The export holding the model's weights and tokenizers: ``directory`` itself, or the base export an
    adapter export points at (FileNotFoundError when that is gone)."""
    directory = Path(directory).expanduser()
    if not is_adapter_export(directory):
        return directory
    base = read_adapter_config(directory).base_model_name_or_path
    if not base:
        raise ValueError(f"{directory / ADAPTER_CONFIG}: no base_model_name_or_path (the base export)")
    path = Path(base).expanduser()
    if not path.is_absolute():  # a relative pointer is relative to the adapter export
        path = directory / path
    if not path.is_dir():
        raise FileNotFoundError(f"base export {path} of the adapter export {directory} not found")
    return path


def apply_adapter(model: UnifiedModel, directory: str | os.PathLike[str]) -> None:
    """Inject the adapter of the export in ``directory`` into ``model`` (the base it was trained on) and
    load its weights; the adapters stay separate layers (base + adapter in each forward)."""
    directory = Path(directory).expanduser()
    config = read_adapter_config(directory)
    inject(model, config)
    path = directory / ADAPTER_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{ADAPTER_WEIGHTS} not found in adapter export {directory}")
    stored = load_file(str(path))
    targets = {
        PEFT_PREFIX + _ADAPTER_PART.sub(r".\1.", name): param
        for name, param in adapter_parameters(model).items()
    }
    missing, unexpected = sorted(set(targets) - set(stored)), sorted(set(stored) - set(targets))
    wrong = [k for k in sorted(set(targets) & set(stored)) if stored[k].shape != targets[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(
            f"{path} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"misshapen {wrong[:5]}"
        )
    with torch.no_grad():
        for key, param in targets.items():
            param.copy_(stored[key])


def merge_adapter(model: nn.Module) -> None:
    """Fold every LoRA layer of ``model`` into its base linear (peft's merge: W + scale * B @ A) and put the
    plain linear back, so the model has the base model's layers and names again."""
    for name, module in list(model.named_modules()):
        if not isinstance(module, LoraLayer):
            continue
        module.merge(adapter_names=[ADAPTER_NAME])
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name), leaf, module.get_base_layer())


def load_model(
    directory: str | os.PathLike[str], device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> UnifiedModel:
    """``UnifiedModel.from_pretrained`` for an ordinary export; for an adapter export, its base with the
    adapter merged in the base's stored dtype, then cast to ``dtype`` (so it equals the merged export's
    model loaded with the same ``dtype``)."""
    if not is_adapter_export(directory):
        return UnifiedModel.from_pretrained(directory, device=device, dtype=dtype)
    model = UnifiedModel.from_pretrained(base_export(directory), device=device)
    apply_adapter(model, directory)
    merge_adapter(model)
    if dtype is not None:
        model.to(dtype)
    return model.eval()
