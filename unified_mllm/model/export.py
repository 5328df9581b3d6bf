"""Reading and writing the unified model's weights: our Hugging Face-format export, and published LM checkpoints.

**Export layout** (:func:`write_export` / :func:`read_export_config`), one directory::

    config.json         {"architectures": ["UnifiedModel"], "model_type": "unified_mllm",
                         "unified_mllm": <dataclasses.asdict(ModelConfig)>,
                         "lm": <the transformers config of the LM backbone>, "torch_dtype": "bfloat16", ...}
    model.safetensors   every weight under the model's own names (``lm.*``, ``lm_head.weight``,
                        ``vision.tower.*``, ``vision.projector.*``); a head tied to the embedding is stored once,
                        as ``lm.embed_tokens.weight``

The directory is written atomically: everything goes into a hidden temporary directory beside the target, which
then replaces the target by rename, so a save killed half-way never leaves a half export under the target's
name. Files in an existing target that are not ours (the tokenizer, the resolved YAML the trainer adds) are
carried over into the new directory. The only non-atomic window is between moving the old directory aside
(``.old-<name>-*``) and renaming the new one into place; a kill exactly there leaves the previous export in
that ``.old-*`` directory.

**Published LM checkpoints**: a transformers ``ChameleonForConditionalGeneration`` or ``LlamaForCausalLM``
directory (Lumina-mGPT-7B, Chameleon-7B), renamed by :func:`lm_checkpoint_key`. Lumina-mGPT's own Chameleon fork
stores the q/k layer norms per model-parallel shard where transformers stores them per head
(:func:`expand_qk_norm`).

Weights are copied tensor by tensor from memory-mapped safetensors files into already allocated parameters, so
loading a 7B checkpoint needs no second copy of the model in memory; every shape is checked first, from the file
headers (:class:`CheckpointMismatchError`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from unified_mllm.config import Config, ConfigError, LMConfig, ModelConfig, save_config
from unified_mllm.io import atomic_directory
from unified_mllm.model.backbone import lm_hf_config

CONFIG_NAME = "config.json"
CONFIG_YAML = "config.yaml"  # the whole resolved Config, with tokenizer paths relative to the export
TEXT_TOKENIZER_FILE = "text.model"
VQ_DIR = "vq"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
MODEL_TYPE = "unified_mllm"
ARCHITECTURE = "UnifiedModel"
_OWN_FILES = (CONFIG_NAME, WEIGHTS_NAME)
_MAX_LISTED = 20  # keys listed per kind of mismatch; the rest are counted


class CheckpointMismatchError(ValueError):
    """A checkpoint whose tensors do not fit the model: the message lists missing, unexpected and misshapen keys."""


# ------------------------------------------------------------------------------------------ state dicts


def unique_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` with every shared tensor kept once, under the first name it appears at (a tied
    ``lm_head.weight`` goes). The tensors are the live parameters and buffers, so writing into them loads weights.
    """
    seen: set[int] = set()
    unique = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            unique[name] = tensor
    return unique


def _format_keys(title: str, items: list[str]) -> str:
    listed = "; ".join(items[:_MAX_LISTED])
    more = f"; ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return f"{len(items)} {title}: {listed}{more}"


def check_keys_and_shapes(
    expected: Mapping[str, tuple[int, ...]],
    found: Mapping[str, tuple[int, ...]],
    origin: str,
    *,
    unexpected: Sequence[str] = (),
) -> None:
    """Raise :class:`CheckpointMismatchError` unless ``found`` has exactly ``expected``'s keys and shapes.

    ``expected`` / ``found`` map our parameter names to shapes; ``unexpected`` lists checkpoint keys that
    map to no parameter (reported under the checkpoint's own names).
    """
    missing = sorted(set(expected) - set(found))
    extra = sorted([*unexpected, *(set(found) - set(expected))])
    wrong = [
        f"{key}: checkpoint {tuple(found[key])} vs model {tuple(expected[key])}"
        for key in sorted(set(expected) & set(found))
        if tuple(found[key]) != tuple(expected[key])
    ]
    kinds = (("shape mismatches", wrong), ("missing keys", missing), ("unexpected keys", extra))
    parts = [_format_keys(title, items) for title, items in kinds if items]
    if parts:
        raise CheckpointMismatchError(f"{origin} does not match the model: " + " | ".join(parts))


# ------------------------------------------------------------------------------------- safetensors files


@contextlib.contextmanager
def open_safetensors(path: Path) -> Iterator[Any]:
    """``safe_open(path)``, with a damaged file (truncated, not safetensors) reported by its path."""
    try:
        handle = safe_open(str(path), framework="pt")
    except SafetensorError as exc:
        raise CheckpointMismatchError(
            f"{path} is not a readable safetensors file ({exc}); is it complete?"
        ) from exc
    with handle:
        yield handle


def safetensors_files(directory: str | os.PathLike[str]) -> dict[str, Path]:
    """Which file of ``directory`` holds each tensor: a single ``model.safetensors`` or the shards named by
    ``model.safetensors.index.json``. Raises FileNotFoundError naming the file that is missing."""
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {directory}")
    index = directory / WEIGHTS_INDEX_NAME
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        files = {key: directory / name for key, name in weight_map.items()}
        for path in sorted(set(files.values())):
            if not path.is_file():
                raise FileNotFoundError(f"shard {path.name} named by {index} is missing")
        return files
    single = directory / WEIGHTS_NAME
    if not single.is_file():
        raise FileNotFoundError(
            f"no {WEIGHTS_NAME} (or {WEIGHTS_INDEX_NAME}) in {directory}: only safetensors checkpoints are read"
        )
    with open_safetensors(single) as handle:
        return dict.fromkeys(handle.keys(), single)


def _checkpoint_shapes(files: Mapping[str, Path]) -> dict[str, tuple[int, ...]]:
    """Shape of every tensor, read from the file headers only."""
    shapes = {}
    for path in sorted(set(files.values())):
        with open_safetensors(path) as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if key in files:
                    shapes[key] = tuple(handle.get_slice(key).get_shape())
    return shapes


# Where this process's part of a parameter lies: ``(the part it stores, (start, stop) of every dimension of the
# whole tensor)``, or None for a tensor held whole. The trainer passes one for sharded parameters
# (:func:`unified_mllm.train.model_init.shard_region`): model code knows nothing of sharding (convention 1).
ShardRegion = Callable[[torch.Tensor], "tuple[torch.Tensor, list[tuple[int, int]]] | None"]


def held_whole(target: torch.Tensor) -> None:
    """The default :data:`ShardRegion`: every tensor is held whole."""
    return None


def copy_into(target: torch.Tensor, whole: torch.Tensor, shard: ShardRegion = held_whole) -> None:
    """Copy ``whole`` (the full tensor, e.g. read from a checkpoint) into ``target``; a sharded target (per
    ``shard``) takes only its own region. Values are cast to the target's dtype and device."""
    part = shard(target)
    if part is None:
        target.copy_(whole)
    else:
        local, region = part
        local.copy_(whole[tuple(slice(a, b) for a, b in region)])


# Maps a checkpoint tensor (our name, the tensor as read) to what is copied into the parameter.
Transform = Callable[[str, torch.Tensor], torch.Tensor]


def load_safetensors_into(
    targets: Mapping[str, torch.Tensor],
    files: Mapping[str, Path],
    origin: str,
    *,
    rename: Callable[[str], str | None] = lambda key: key,
    reshape: Callable[[str, tuple[int, ...]], tuple[int, ...]] = lambda key, shape: shape,
    transform: Transform = lambda key, tensor: tensor,
    shard: ShardRegion = held_whole,
) -> None:
    """Copy the checkpoint tensors in ``files`` into ``targets`` (our name → live parameter / buffer).

    ``rename`` maps a checkpoint key to our name (``None``: skip the key); ``reshape`` gives the shape a
    checkpoint tensor has after ``transform`` (for layout conversions; a tensor stored in its target's shape is
    copied as stored). All keys and shapes are checked before any tensor is read; values are cast to each
    target's dtype and device on copy. A target that ``shard`` says is sharded (FSDP2 after ``to_empty``) receives
    only its own region, read as a slice of the file, so no rank reads or holds a whole sharded parameter.
    """
    ours_of = {key: rename(key) for key in files}
    renamed = {ours: key for key, ours in ours_of.items() if ours in targets}
    unexpected = [key for key, ours in ours_of.items() if ours is not None and ours not in targets]
    raw_shapes = _checkpoint_shapes({key: files[key] for key in renamed.values()})
    found = {ours: reshape(ours, raw_shapes[key]) for ours, key in renamed.items()}
    expected = {name: tuple(tensor.shape) for name, tensor in targets.items()}
    check_keys_and_shapes(expected, found, origin, unexpected=unexpected)
    by_file: dict[Path, list[str]] = {}
    for ours, key in renamed.items():
        by_file.setdefault(files[key], []).append(ours)
    with torch.no_grad():
        for path, names in sorted(by_file.items()):
            with open_safetensors(path) as handle:
                for ours in names:
                    target, key = targets[ours], renamed[ours]
                    part = shard(target)
                    if part is None or raw_shapes[key] != tuple(target.shape):
                        # Whole tensors, and layout conversions (which need the whole tensor to convert).
                        copy_into(target, transform(ours, handle.get_tensor(key)), shard)
                    elif all(stop > start for start, stop in part[1]):
                        # A shard stored in the model's layout: read this rank's slice only.
                        part[0].copy_(handle.get_slice(key)[tuple(slice(a, b) for a, b in part[1])])


# ------------------------------------------------------------------------------ published LM checkpoints


def lm_checkpoint_key(key: str) -> str | None:
    """Our name for a key of a transformers Chameleon / Llama causal-LM checkpoint (``None``: not ours).

    ``model.X`` → ``lm.X``, ``lm_head.weight`` stays; the VQ encoder (``model.vqmodel.*``) and RoPE
    ``inv_freq`` buffers saved by old versions are skipped. Anything else keeps its name and is then reported
    as unexpected.
    """
    if key.startswith("model.vqmodel.") or key.endswith("rotary_emb.inv_freq"):
        return None
    if key.startswith("model."):
        return "lm." + key[len("model.") :]
    return key


def _qk_norm_heads(name: str, lm: LMConfig) -> int | None:
    """Rows of a q/k layer-norm parameter in our layout (``None`` for every other parameter)."""
    if lm.arch != "chameleon" or not name.endswith(
        ("q_norm.weight", "q_norm.bias", "k_norm.weight", "k_norm.bias")
    ):
        return None
    return lm.num_heads if ".q_norm." in name else lm.num_kv_heads


def expand_qk_norm(lm: LMConfig) -> tuple[Callable[[str, tuple[int, ...]], tuple[int, ...]], Transform]:
    """``(reshape, transform)`` for :func:`load_safetensors_into` that turn Lumina-mGPT's per-shard q/k norms
    (``[shards, head_dim]``, shards dividing the head count) into transformers' per-head ``[heads, head_dim]``:
    row ``s`` is repeated for each of the ``heads // shards`` heads of shard ``s``. Other tensors pass as is."""

    def reshape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        heads = _qk_norm_heads(name, lm)
        if heads is None or len(shape) != 2 or shape[0] == heads or heads % max(shape[0], 1):
            return shape
        return (heads, shape[1])

    def transform(name: str, tensor: torch.Tensor) -> torch.Tensor:
        heads = _qk_norm_heads(name, lm)
        if heads is None or tensor.ndim != 2 or tensor.shape[0] == heads:
            return tensor
        return tensor.repeat_interleave(heads // tensor.shape[0], dim=0)

    return reshape, transform


def check_lm_checkpoint_config(directory: str | os.PathLike[str], lm: LMConfig) -> None:
    """Raise :class:`ConfigError` when ``directory/config.json`` contradicts ``lm`` in a way weight shapes
    cannot reveal (architecture, head counts, RoPE base, norm epsilon, Swin norm). No config.json: no check."""
    path = Path(directory).expanduser() / CONFIG_NAME
    if not path.is_file():
        return
    hf = json.loads(path.read_text())
    rope = hf.get("rope_parameters") or {}
    found = {
        "arch": hf.get("model_type"),
        "num_heads": hf.get("num_attention_heads"),
        "num_kv_heads": hf.get("num_key_value_heads", hf.get("num_attention_heads")),
        "rope_theta": rope.get("rope_theta", hf.get("rope_theta")),
        "rms_norm_eps": hf.get("rms_norm_eps"),
        "swin_norm": hf.get("swin_norm", False) if lm.arch == "chameleon" else False,
    }
    mismatches = [
        f"model.lm.{key}={getattr(lm, key)!r} but {path} says {value!r}"
        for key, value in found.items()
        if value is not None and value != getattr(lm, key)
    ]
    if mismatches:
        raise ConfigError("LM checkpoint does not match the config: " + "; ".join(mismatches))


# ------------------------------------------------------------------------------------------- our export


def export_config_dict(config: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    """The ``config.json`` of an export (see the module docstring)."""
    return {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "torch_dtype": str(dtype).removeprefix("torch."),  # transformers' spelling: "bfloat16"
        MODEL_TYPE: dataclasses.asdict(config),
        # For readers that only know transformers (and for humans): the LM exactly as transformers builds it.
        "lm": lm_hf_config(config.lm).to_dict(),
    }


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # no copy of large files when both sides are on one file system
    except OSError:
        shutil.copy2(src, dst)


def write_export(
    directory: str | os.PathLike[str],
    config: ModelConfig,
    state_dict: Mapping[str, torch.Tensor],
    *,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write the export of a model with ``config`` and weights ``state_dict`` (our names) atomically.

    ``state_dict`` may be the model's own (tied tensors appear once, see :func:`unique_state_dict`) or a
    gathered full state dict from a sharded trainer; with ``config.lm.tie_word_embeddings`` a separate
    ``lm_head.weight`` is dropped, because the head *is* the embedding. ``dtype`` casts floating tensors
    (e.g. bf16 for an inference export of fp32 master weights); ``None`` keeps their dtype.
    """
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in state_dict.items():
        if id(tensor) in seen or (config.lm.tie_word_embeddings and name == "lm_head.weight"):
            continue
        seen.add(id(tensor))
        tensor = tensor.detach()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        tensors[name] = tensor.contiguous()
    floats = [t.dtype for t in tensors.values() if t.is_floating_point()]
    stored = dtype or (floats[0] if floats else torch.float32)
    config_text = json.dumps(export_config_dict(config, stored), indent=2, sort_keys=False) + "\n"
    directory = Path(directory).expanduser().absolute()
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"cannot export into {directory}: it is a file")
    # The directory appears complete or not at all (atomic_directory; the module docstring names the one window
    # a kill can hit). Entries of an existing export that are not ours are carried over, hard-linked if possible.
    with atomic_directory(directory) as tmp:
        for entry in directory.iterdir() if directory.is_dir() else ():
            if entry.name in _OWN_FILES:
                continue
            if entry.is_dir():
                shutil.copytree(entry, tmp / entry.name, copy_function=_link_or_copy)
            else:
                _link_or_copy(str(entry), str(tmp / entry.name))
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(config_text)
    return directory


def read_export_config(directory: str | os.PathLike[str]) -> tuple[ModelConfig, torch.dtype]:
    """The :class:`ModelConfig` and stored dtype of an export; FileNotFoundError / ConfigError when unusable.

    The config is merged onto the structured defaults, so an unknown or wrongly typed key raises a
    :class:`ConfigError` naming it rather than being silently dropped.
    """
    path = Path(directory).expanduser() / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{CONFIG_NAME} not found in export directory {path.parent}")
    data = json.loads(path.read_text())
    if data.get("model_type") != MODEL_TYPE or not isinstance(data.get(MODEL_TYPE), dict):
        raise ConfigError(
            f"{path}: not a unified_mllm export (model_type={data.get('model_type')!r}, "
            f"expected {MODEL_TYPE!r} with a {MODEL_TYPE!r} section)"
        )
    try:
        merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), data[MODEL_TYPE])
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        raise ConfigError(
            f"{path}: bad `{MODEL_TYPE}` section at `{key}`: {str(exc).splitlines()[0]}"
        ) from exc
    assert isinstance(config, ModelConfig)
    name = data.get("torch_dtype", "float32")
    dtype = getattr(torch, str(name).removeprefix("torch."), None)  # "bfloat16" or "torch.bfloat16"
    if not isinstance(dtype, torch.dtype):
        raise ConfigError(f"`torch_dtype`: {name!r} is not a torch dtype")
    return config, dtype


def _copy_tokenizers(config: Config, export_dir: Path) -> Config:
    """Copy the text and VQ tokenizers into the export; returns the config with paths relative to it.

    A VQ checkpoint given as a file (Chameleon's ``vqgan.ckpt``) travels with its ``.yaml`` beside it."""
    portable = copy.deepcopy(config)
    text = Path(config.tokenizer.path).expanduser()
    if text.is_file():
        shutil.copy2(text, export_dir / TEXT_TOKENIZER_FILE)
        portable.tokenizer.path = TEXT_TOKENIZER_FILE
    vq = config.model.vq.checkpoint
    if vq:
        source, target = Path(vq).expanduser(), export_dir / VQ_DIR
        shutil.rmtree(target, ignore_errors=True)
        if source.is_dir():
            shutil.copytree(source, target, copy_function=_link_or_copy)
        else:
            target.mkdir()
            for path in (source, source.with_suffix(".yaml")):
                if path.is_file():
                    _link_or_copy(str(path), str(target / path.name))
        portable.model.vq.checkpoint = VQ_DIR if source.is_dir() else f"{VQ_DIR}/{source.name}"
    return portable


def write_inference_export(
    directory: str | os.PathLike[str],
    config: Config,
    state_dict: Mapping[str, torch.Tensor],
    *,
    dtype: torch.dtype | None = None,
) -> Path:
    """Everything :meth:`InferenceSolver.from_pretrained` reads: :func:`write_export`'s weights and
    ``config.json``, the text and VQ tokenizers, and the resolved ``config.yaml`` pointing at them."""
    directory = write_export(directory, config.model, state_dict, dtype=dtype)
    save_config(_copy_tokenizers(config, directory), directory / CONFIG_YAML)
    return directory
