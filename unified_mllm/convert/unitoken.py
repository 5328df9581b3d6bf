"""UniToken's published checkpoints -> our export.

    python -m unified_mllm.convert unitoken SRC DST --chameleon-tokenizer TOKENIZER_DIR [--variant base|anyres]

``SRC`` is one of ``OceanJay/UniToken-{base,AnyRes}-Stage{I,II}``: a Chameleon conditional-generation model whose
LM sits under ``model.*`` / ``lm_head.weight``, with SigLIP's vision transformer (pooling head included) under
``vit.*`` and the projector as ``adapter.0`` (Linear 1152 -> H), GELU, ``adapter.2`` (Linear H -> H); the VQ-GAN was
deleted before saving, so it comes from Chameleon's tokenizer folder like the text tokenizer. The pooling head is
dropped (UniToken projects the last hidden state, after the post-layernorm; ours does the same with
``model.vision.feature_layer=-1``). The SigLIP config is read off the tensor shapes; its head count cannot be, and is
so400m's 16 unless ``--vision-heads`` says otherwise. ``--variant`` picks the base or AnyRes model (default: from
the ``architectures`` of ``config.json``, else from the directory name).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping
from pathlib import Path

import torch

from unified_mllm.config import ModelConfig, ProjectorConfig, VisionConfig, with_unitoken_layouts
from unified_mllm.convert import chameleon
from unified_mllm.convert.common import ConversionError, Rule, count_indices, shape_of

HELP = "UniToken-{base,AnyRes}-Stage{I,II} (Chameleon LM + SigLIP + adapter) -> export"
SO400M_WIDTH, SO400M_HEADS = 1152, 16
T2I_PREFIX_ID = 16853  # inference_solver_*.generate_img appends it and <racm3:break> to the prompt

VISION_RULES = (
    Rule(r"vit\.head\..*", None, "SigLIP's attention-pooling head: UniToken projects the last hidden state"),
    Rule(r"vit\.(embeddings|encoder|post_layernorm)\.(.*)", r"vision.tower.\1.\2"),
    Rule(r"adapter\.([02])\.(weight|bias)", r"vision.projector.\1.\2"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    chameleon.add_common_arguments(parser)
    parser.add_argument("--variant", choices=["base", "anyres"], default=None, help="default: detected")
    parser.add_argument("--vision-heads", type=int, default=None, help="SigLIP attention heads (so400m: 16)")
    parser.add_argument(
        "--t2i-prefix-id",
        type=int,
        default=T2I_PREFIX_ID,
        help=f"id UniToken puts before <racm3:break> in text-to-image prompts (default {T2I_PREFIX_ID})",
    )


def detect_variant(src: Path, hf: Mapping) -> str:
    names = [*hf.get("architectures", []), src.name]
    for name in names:
        if "anyres" in name.lower():
            return "anyres"
        if "base" in name.lower():
            return "base"
    raise ConversionError(
        f"unitoken: cannot tell whether {src} is the base or the AnyRes model (config.json architectures "
        f"{hf.get('architectures')}, directory name {src.name!r}); pass --variant base or --variant anyres"
    )


def vision_config(state: Mapping[str, torch.Tensor], heads: int | None) -> VisionConfig:
    """SigLIP's shapes read from the ``vit.*`` tensors (the published model keeps no vision config)."""
    width, _, patch, _ = shape_of(state, "vit.embeddings.patch_embedding.weight", "unitoken", "UniToken")
    side = math.isqrt(shape_of(state, "vit.embeddings.position_embedding.weight", "unitoken", "UniToken")[0])
    if heads is None:
        if width != SO400M_WIDTH:
            raise ConversionError(
                f"unitoken: the SigLIP tower is {width} wide, not so400m's {SO400M_WIDTH}; pass --vision-heads"
            )
        heads = SO400M_HEADS
    return VisionConfig(
        image_size=side * patch,
        patch_size=patch,
        hidden_size=width,
        intermediate_size=shape_of(state, "vit.encoder.layers.0.mlp.fc1.weight", "unitoken", "UniToken")[0],
        num_layers=count_indices(state, r"vit\.encoder\.layers\.(\d+)\..*"),
        num_heads=heads,
        layer_norm_eps=1e-6,  # SigLIP's
        feature_layer=-1,  # UniToken: last_hidden_state, after the post-layernorm
    )


def model_config(hf: Mapping, state: Mapping[str, torch.Tensor], heads: int | None) -> ModelConfig:
    return ModelConfig(
        lm=chameleon.lm_config(hf),
        vision=vision_config(state, heads),
        projector=ProjectorConfig(depth=2, activation="gelu"),  # adapter.0, GELU, adapter.2
    )


def token_name(tokenizer_json: Path, token_id: int) -> str:
    """The name of ``token_id`` in Chameleon's ``text_tokenizer.json`` (a BPE vocabulary of name -> id)."""
    vocab = json.loads(tokenizer_json.read_text())["model"]["vocab"]
    names = {index: name for name, index in vocab.items()}
    if token_id not in names:
        raise ConversionError(f"unitoken: {tokenizer_json} has no id {token_id} (ids 0..{max(names)})")
    return names[token_id]


def run(args: argparse.Namespace) -> Path:
    src = Path(args.src).expanduser()
    hf = chameleon.read_hf_config(src, "unitoken")
    tokenizer_dir = chameleon.check_tokenizer_dir(args.chameleon_tokenizer, "unitoken")
    variant = args.variant or detect_variant(src, hf)
    # UniToken's solvers end a text-to-image prompt with this id before <racm3:break>: in training every
    # generated image's answer starts with it, so the model goes straight into drawing.
    prefix = token_name(tokenizer_dir / "text_tokenizer.json", args.t2i_prefix_id)
    state = chameleon.read_safetensors_dir(src)  # after the cheap checks: a 7B checkpoint is 14 GB
    model = with_unitoken_layouts(
        model_config(hf, state, args.vision_heads), anyres=variant == "anyres", t2i_answer_prefix=prefix
    )
    config = chameleon.base_config(model, tokenizer_dir, image_size=args.image_size or 512)
    config.generation.cfg_scale = 3.0  # the published "Simple Inference" example
    config.generation.image_top_k = 4000
    rules = (*chameleon.LM_RULES, *VISION_RULES)
    return chameleon.write_converted(state, rules, config, args.dst, f"unitoken checkpoint {src}", args.dtype)
