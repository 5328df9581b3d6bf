"""The final export of a training run: one self-contained directory that inference loads with one call.

``checkpoint.export_dir`` holds ``config.json`` + ``model.safetensors`` (the unified model in Hugging Face format,
written atomically by :func:`unified_mllm.model.export.write_export`), the text tokenizer (``text.model``), the
VQ tokenizer (``vq/``), the resolved ``config.yaml`` with those paths relative to the export, and
``train_summary.json``, written last: what was trained and the fingerprint of the settings (a finished run with
the same fingerprint is reused). A directory without it is an unfinished export, never mistaken for a finished one.

A LoRA run (``train.lora.rank > 0``) exports its adapter only, in peft's format (``adapter_config.json``, whose
``base_model_name_or_path`` is the ``checkpoint.init_from`` export, and ``adapter_model.safetensors``) and the
resolved ``config.yaml`` (tokenizers stay in the base export), then the summary; :mod:`unified_mllm.model.lora` reads it, ``python -m unified_mllm.convert merge-lora`` merges it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import peft
import torch

from unified_mllm import io
from unified_mllm.config import Config
from unified_mllm.model import lora
from unified_mllm.model.export import write_inference_export

SUMMARY_FILE = "train_summary.json"
# The files a finished export has besides its summary.
EXPORT_FILES = ("model.safetensors", "config.json")
ADAPTER_EXPORT_FILES = (lora.ADAPTER_WEIGHTS, lora.ADAPTER_CONFIG)


def export_files(config: Config) -> tuple[str, ...]:
    """The files a finished export of ``config``'s run has besides its summary (an adapter's with LoRA)."""
    return ADAPTER_EXPORT_FILES if lora.enabled(config.train.lora) else EXPORT_FILES


# Settings that do not change the trained weights: a finished export is reused when only they differ.
_NOT_TRAINING = {
    "checkpoint": ("every_steps", "keep_last", "resume", "export_dir", "dir"),
    "train": ("log_every", "wandb", "device"),
    "data": ("num_workers",),
}


def fingerprint(config: Config) -> dict[str, Any]:
    """The settings the exported weights depend on (the whole config minus logging and bookkeeping)."""
    tree = dataclasses.asdict(config)
    for section, keys in _NOT_TRAINING.items():
        for key in keys:
            tree[section].pop(key, None)
    for key in ("generation", "vq_train", "contrastive", "output_root", "run_name"):
        tree.pop(key, None)
    return json.loads(json.dumps(tree))  # as it reads back from JSON (lists, not tuples)


def export_run(
    state_dict: Mapping[str, torch.Tensor],
    config: Config,
    export_dir: Path,
    summary: dict[str, Any],
    adapter: peft.LoraConfig | None = None,
) -> Path:
    """Write the export of a finished run (rank 0): weights, tokenizers, config, then the summary; with
    ``adapter`` (a LoRA run's peft config) only the adapter tensors of ``state_dict``, in peft's format."""
    if adapter is not None:
        lora.write_adapter_export(export_dir, adapter, state_dict, config)
    else:
        write_inference_export(export_dir, config, state_dict)
    io.write_json(export_dir / SUMMARY_FILE, summary)
    return export_dir
