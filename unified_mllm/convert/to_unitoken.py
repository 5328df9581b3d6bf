"""Our export -> UniToken's published layout, so a model trained here runs in the seed's own tools.

    python -m unified_mllm.convert to-unitoken EXPORT DST

Writes ``config.json`` (Chameleon's config with the keys UniToken's ``ChameleonXLLMXConfig`` adds) and
``model.safetensors`` with the seed's names: ``model.*`` / ``lm_head.weight`` for the LM, ``vit.*`` for the SigLIP
tower, ``adapter.{0,2}`` for the projector. UniToken's Chameleon fork stores the q/k layer-norm weights per
model-parallel shard and applies each to the heads of its shard; ours are per head, so the export says
``model_parallel_size`` = the head count (one head per shard), which the fork computes exactly as we do. Only
models the seed can express convert: the Chameleon LM, a 2-layer GELU projector, SigLIP features from the last
layer, and none of our additions (code stacks, grid positions, slot embeddings).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from safetensors.torch import save_file

from unified_mllm.convert.common import ConversionError, Rule, rename
from unified_mllm.io import atomic_directory
from unified_mllm.model.backbone import lm_hf_config
from unified_mllm.model.export import read_export_config
from unified_mllm.model.unified import UnifiedModel

HELP = "our export -> UniToken's published layout (model.* / vit.* / adapter.*, config.json)"
RULES = (
    Rule(r"lm\.(.*)", r"model.\1"),
    Rule(r"lm_head\.weight", "lm_head.weight"),
    Rule(r"vision\.tower\.(.*)", r"vit.\1"),
    Rule(r"vision\.projector\.([02])\.(weight|bias)", r"adapter.\1.\2"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--variant", choices=["base", "anyres"], default=None, help="default: from the export"
    )


def run(args: argparse.Namespace) -> Path:
    src = Path(args.src).expanduser()
    model = UnifiedModel.from_pretrained(src)
    config = model.config
    problems = [
        what
        for what, bad in (
            ("the LM is not Chameleon", config.lm.arch != "chameleon"),
            ("the continuous branch is off", not config.vision.enabled),
            (
                "the projector is not 2 GELU layers",
                (config.projector.depth, config.projector.activation) != (2, "gelu"),
            ),
            ("features come from another SigLIP layer than the last", config.vision.feature_layer != -1),
            ("the model has learned grid positions", config.grid_positions > 0),
            ("the tokenizer has code stacks (UniTok / DualToken)", model.code_embedder is not None),
            ("the LM has fewer key/value heads than heads", config.lm.num_kv_heads != config.lm.num_heads),
        )
        if bad
    ]
    if problems:
        raise ConversionError(
            f"to-unitoken: {src} cannot be expressed in UniToken's layout: {'; '.join(problems)}"
        )
    variant = args.variant or ("anyres" if config.vision.anyres.enabled else "base")
    _, dtype = read_export_config(src)
    state = rename({k: v.detach().to(dtype) for k, v in model.state_dict().items()}, RULES, f"export {src}")
    hf = lm_hf_config(config.lm).to_dict()
    hf.update(
        architectures=[
            f"ChameleonXLLMXForConditionalGeneration{'AnyRes' if variant == 'anyres' else 'Base'}"
        ],
        model_parallel_size=config.lm.num_heads,  # one head per shard: the fork's norms are then ours
        z_loss_weight=0.0,
        dropout=config.lm.residual_dropout,
        torch_dtype=str(dtype).removeprefix("torch."),
    )
    with atomic_directory(Path(args.dst).expanduser().absolute()) as tmp:
        save_file(
            {k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"), {"format": "pt"}
        )
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    return Path(args.dst)
