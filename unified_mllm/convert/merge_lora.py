"""A LoRA run's adapter export folded into its base: a full export that loads like any other.

    python -m unified_mllm.convert merge-lora --adapter RUN_EXPORT --output DIR

Reads the adapter export (peft's ``adapter_config.json`` + ``adapter_model.safetensors``; see
:mod:`unified_mllm.model.lora`) and the base export it points at, merges every adapter into its layer in the
base's stored dtype (W + alpha / rank * B @ A) and writes DIR atomically: the merged ``model.safetensors`` and
``config.json``, the base's tokenizers and ``config.yaml``, and ``lora_merge.json`` naming both sources.
``InferenceSolver.from_pretrained`` gives the same model for the adapter export and for DIR.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from safetensors.torch import save_file

from unified_mllm.convert.common import ConversionError
from unified_mllm.io import atomic_directory
from unified_mllm.model import lora
from unified_mllm.model.export import (
    CONFIG_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    export_config_dict,
    read_export_config,
    unique_state_dict,
)

HELP = (
    "a LoRA run's adapter export + its base export -> one merged export (--adapter RUN_EXPORT --output DIR)"
)
# This kind takes named options instead of the positional SRC DST of the other converters.
OWN_ARGUMENTS = True
MERGE_RECORD = "lora_merge.json"
# The base's files that do not describe the merged weights (its training summary, its evaluations).
_NOT_CARRIED = {WEIGHTS_NAME, WEIGHTS_INDEX_NAME, CONFIG_NAME, "train_summary.json", "eval"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", required=True, help="the LoRA run's export (adapter_config.json, ...)")
    parser.add_argument("--output", required=True, help="where the merged export is written (atomically)")


def _carry(src: Path, dst: Path) -> None:
    """Copy a file or directory of the base export into the merged one."""
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copy2(src, dst)


def run(args: argparse.Namespace) -> Path:
    adapter = Path(args.adapter).expanduser().absolute()
    output = Path(args.output).expanduser().absolute()
    if not lora.is_adapter_export(adapter):
        raise ConversionError(f"merge-lora: {adapter} is not an adapter export (no {lora.ADAPTER_CONFIG})")
    try:
        base = lora.base_export(adapter)
        _, stored = read_export_config(base)
        model = lora.load_model(adapter)  # merged in the stored dtype
    except (FileNotFoundError, ValueError) as exc:
        raise ConversionError(f"merge-lora: {exc}") from exc
    if output in (adapter, base.absolute()):
        raise ConversionError(f"merge-lora: --output {output} would overwrite its own input")
    tensors = {k: v.detach().to(stored).contiguous() for k, v in unique_state_dict(model).items()}
    with atomic_directory(output) as tmp:
        for entry in sorted(base.iterdir()):
            if entry.name not in _NOT_CARRIED and not entry.name.startswith("."):
                _carry(entry, tmp / entry.name)
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        config = export_config_dict(model.config, stored)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        record = {"adapter": str(adapter), "base": str(base.absolute())}
        (tmp / MERGE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return output
