"""Parameter counts: of built modules (shared by the CLI, tests and training logs) and of model presets.

``python -m unified_mllm.model.stats [preset ...]`` builds each preset of the table in
:mod:`unified_mllm.config` on the ``meta`` device (no memory, no I/O) and prints its parameter counts.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from torch import nn

from unified_mllm.cli import one_line_errors
from unified_mllm.config import ConfigError, ModelConfig, describe_preset, get_preset, list_presets
from unified_mllm.model.backbone import build_lm_backbone, build_lm_head
from unified_mllm.vision.siglip import build_siglip_tower
from unified_mllm.vision.tokenizer_registry import build_visual_tokenizer


def count_parameters(module: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of scalar parameters in ``module`` (meta modules too; tied embeddings counted once)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def format_count(n: int) -> str:
    """A parameter count in the usual short form: ``6.75B``, ``412.96M``, ``3.66M``, ``812.5K``."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f}{suffix}"
    return str(n)


def projector_parameter_count(vision_hidden: int, lm_hidden: int, depth: int) -> int:
    """Parameters of the MLP projector: Linear(vision→LM), then ``depth - 1`` x Linear(LM→LM), with biases."""
    first = vision_hidden * lm_hidden + lm_hidden
    return first + (depth - 1) * (lm_hidden * lm_hidden + lm_hidden)


def parameter_counts(config: ModelConfig) -> dict[str, int]:
    """Parameter counts of each part of ``config``, built on the ``meta`` device (no memory, no I/O).

    Keys: ``lm`` (backbone + head; a tied head is counted once), ``siglip`` (the tower as the model uses it,
    without the pooling head), ``projector``, ``vq`` (the image tokenizer of ``vq.kind``: all its parameters,
    e.g. UniTok's text tower and DualToken's frozen teacher included).
    """
    backbone = build_lm_backbone(config.lm, device="meta")
    head = build_lm_head(config.lm, device="meta", embedding=backbone.get_input_embeddings())
    lm = count_parameters(nn.ModuleDict({"backbone": backbone, "head": head}))
    siglip = count_parameters(build_siglip_tower(config.vision, device="meta"))
    projector = projector_parameter_count(
        config.vision.hidden_size, config.lm.hidden_size, config.projector.depth
    )
    vq = count_parameters(build_visual_tokenizer(config.vq, device="meta"))
    return {"lm": lm, "siglip": siglip, "projector": projector, "vq": vq}


_PART_LABELS = {
    "lm": "LM (backbone + head)",
    "siglip": "SigLIP tower (without pooling head)",
    "projector": "projector",
    "vq": "VQ tokenizer",
}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Print the parameter counts of model presets (built on meta)."
    )
    parser.add_argument(
        "names", nargs="*", help=f"presets to show (default: all of {', '.join(list_presets())})"
    )
    args = parser.parse_args(argv)
    for name in args.names or list_presets():
        with one_line_errors((ConfigError,)):
            config = get_preset(name)
        counts = parameter_counts(config)
        print(f"{name}: {describe_preset(name)}")
        for part, n in [*counts.items(), ("total", sum(counts.values()))]:
            print(f"  {_PART_LABELS.get(part, part):<36}{format_count(n):>9} ({n:,})")


if __name__ == "__main__":
    main()
