"""Every visual tokenizer kind behind one name: build a random one or load trained weights of any kind.

The kinds' modules (:mod:`~unified_mllm.vision.vqgan`, :mod:`~unified_mllm.vision.unitok`,
:mod:`~unified_mllm.vision.dualtoken`) each build on the shared interface in
:mod:`~unified_mllm.vision.visual_tokenizer`; this module sits above all of them, so the interface never has to
import its own implementations.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from unified_mllm.config import VQConfig
from unified_mllm.vision.dualtoken import DualToken
from unified_mllm.vision.unitok import UniTok
from unified_mllm.vision.visual_tokenizer import (
    VisualTokenizer,
    read_tokenizer_config,
    resolve_checkpoint_paths,
)
from unified_mllm.vision.vqgan import VQGAN

TOKENIZER_CLASSES: dict[str, type[VisualTokenizer]] = {
    "vqgan": VQGAN,
    "unitok": UniTok,
    "dualtoken": DualToken,
}


def tokenizer_class(kind: str) -> type[VisualTokenizer]:
    """The class for ``model.vq.kind``."""
    if kind not in TOKENIZER_CLASSES:
        valid = ", ".join(repr(k) for k in TOKENIZER_CLASSES)
        raise ValueError(f"unknown visual tokenizer kind {kind!r}; valid: {valid}")
    return TOKENIZER_CLASSES[kind]


def build_visual_tokenizer(vq: VQConfig, device: str | torch.device | None = None) -> VisualTokenizer:
    """A randomly initialised tokenizer of ``vq.kind`` (no I/O; ``device="meta"`` allocates nothing)."""
    return tokenizer_class(vq.kind).from_config(vq, device=device)


def load_visual_tokenizer(
    path: str | os.PathLike[str], *, config: VQConfig | None = None, device: str | torch.device = "cpu"
) -> VisualTokenizer:
    """Trained weights of any kind: the kind comes from the ``config.json`` beside them (else ``config``;
    Chameleon's ``vqgan.ckpt`` + ``vqgan.yaml`` go to :meth:`VQGAN.from_checkpoint`)."""
    _, config_path = resolve_checkpoint_paths(Path(path))
    if config_path is not None and config_path.suffix == ".json":
        kind = read_tokenizer_config(config_path).kind
    elif config is not None:
        kind = config.kind
    else:
        kind = "vqgan"  # a taming checkpoint with its yaml, or an error from VQGAN naming what is missing
    return tokenizer_class(kind).from_checkpoint(path, config=config, device=device)
