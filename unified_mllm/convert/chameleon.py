"""Chameleon-architecture language models -> our export: ``chameleon`` and ``lumina-mgpt``.

    python -m unified_mllm.convert chameleon   SRC DST --chameleon-tokenizer TOKENIZER_DIR
    python -m unified_mllm.convert lumina-mgpt SRC DST --chameleon-tokenizer TOKENIZER_DIR [--image-size 768]

``SRC`` is a Hugging Face directory of a transformers ``ChameleonForConditionalGeneration`` (``facebook/chameleon-7b``)
or of Lumina-mGPT's Chameleon fork (``Alpha-VLLM/Lumina-mGPT-7B-512`` / ``-768``, whose q/k layer norms are stored
per model-parallel shard); ``TOKENIZER_DIR`` is the ``tokenizer/`` folder of the Chameleon release
(``text_tokenizer.json``, ``vqgan.ckpt``, ``vqgan.yaml``), which these checkpoints do not carry. The export is
discrete-only (``model.vision.enabled=false``): these models see images as VQ codes. Our model always carries a
vision branch (stage 1 switches it on), so the export holds one: SigLIP from ``--siglip DIR`` (a ``from_pretrained``
folder such as ``google/siglip-so400m-patch14-384``: the UniToken recipe's starting point) with a fresh projector,
or, without ``--siglip``, a freshly initialised tower and projector (seeded; unused until the branch is switched
on, and the converter says so). The shared pieces
(:func:`lm_config`, :data:`LM_RULES`, :func:`write_converted`) also serve the UniToken converter.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from unified_mllm.config import Config, LMConfig, ModelConfig, load_config, validate
from unified_mllm.convert.common import (
    ConversionError,
    Rule,
    check_converted,
    read_safetensors_dir,
    rename,
    require_files,
)
from unified_mllm.model.export import expand_qk_norm, unique_state_dict, write_inference_export
from unified_mllm.model.unified import UnifiedModel
from unified_mllm.vision.siglip import VisionEncoder, siglip_shapes
from unified_mllm.vision.vqgan import read_vq_config

HELP = "Chameleon-7B / Lumina-mGPT-7B (transformers Chameleon layout) -> export (discrete-only)"
TOKENIZER_FILES = ("text_tokenizer.json", "vqgan.ckpt", "vqgan.yaml")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

LM_RULES = (
    Rule(r"model\.vqmodel\..*", None, "Chameleon's VQ-GAN: read from the tokenizer folder's vqgan.ckpt"),
    Rule(r".*rotary_emb\.inv_freq", None, "RoPE tables are rebuilt from rope_theta"),
    Rule(r"model\.(embed_tokens|norm|layers\.\d+)\.(.*)", r"lm.\1.\2"),
    Rule(r"lm_head\.weight", "lm_head.weight"),
)


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--chameleon-tokenizer",
        required=True,
        metavar="DIR",
        help="Chameleon's tokenizer folder: text_tokenizer.json, vqgan.ckpt, vqgan.yaml",
    )
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=None,
        help="weights' dtype in the export (default: as stored)",
    )

    parser.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="default generation size in pixels (default 512; Lumina-mGPT-7B-768: 768)",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument(
        "--siglip",
        metavar="DIR",
        default=None,
        help="SigLIP folder for the (off) vision branch; default: fresh",
    )


def read_hf_config(src: Path, kind: str) -> dict:
    require_files(src, ["config.json"], kind)
    hf = json.loads((src / "config.json").read_text())
    if hf.get("model_type") != "chameleon":
        raise ConversionError(
            f"{kind}: {src}/config.json says model_type={hf.get('model_type')!r}; a Chameleon-architecture "
            "checkpoint has model_type 'chameleon'"
        )
    return hf


def lm_config(hf: Mapping) -> LMConfig:
    """Our LM config from a (transformers or Lumina-mGPT) Chameleon ``config.json``."""
    rope = hf.get("rope_parameters") or {}
    heads = hf["num_attention_heads"]
    return LMConfig(
        arch="chameleon",
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        max_position_embeddings=hf["max_position_embeddings"],
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        swin_norm=bool(hf.get("swin_norm", False)),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
        # Lumina-mGPT / UniToken train with this residual dropout (their config's `dropout`).
        residual_dropout=float(hf.get("dropout", LMConfig.residual_dropout)),
        attention_dropout=float(hf.get("attention_dropout", 0.0)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def base_config(model: ModelConfig, tokenizer_dir: Path, *, image_size: int) -> Config:
    """The whole config of a converted export: Chameleon's text tokenizer and VQ-GAN, 16 px per code."""
    config = load_config([], ["model.preset=chameleon-7b"], check=False)
    config.model = model
    config.model.vq = read_vq_config(tokenizer_dir / "vqgan.yaml", base=model.vq)  # the codebook's shapes
    config.model.vq.checkpoint = str(tokenizer_dir / "vqgan.ckpt")
    config.tokenizer.kind = "chameleon"
    config.tokenizer.path = str(tokenizer_dir / "text_tokenizer.json")
    config.tokenizer.size_unit = 2  # one <reserved08800+n> step = 2 code rows = 32 px, as in Lumina-mGPT
    config.generation.image_size = image_size
    validate(config)
    return config


def check_tokenizer_dir(path: str, kind: str) -> Path:
    tokenizer_dir = Path(path).expanduser().absolute()
    require_files(tokenizer_dir, TOKENIZER_FILES, f"{kind} (--chameleon-tokenizer)")
    return tokenizer_dir


def write_converted(
    state: Mapping[str, torch.Tensor],
    rules: Sequence[Rule],
    config: Config,
    dst: str,
    origin: str,
    dtype: str | None,
    extra: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Rename ``state`` by ``rules``, spread per-shard q/k norms to heads, check every key and shape against the
    model ``config`` describes, and write the export (weights, config, tokenizers) to ``dst``."""
    renamed = rename(state, rules, origin)
    _, expand = expand_qk_norm(config.model.lm)
    renamed = {name: expand(name, tensor) for name, tensor in renamed.items()} | dict(extra or {})
    with torch.device("meta"):
        model = UnifiedModel(config.model)
    expected = {name: tuple(t.shape) for name, t in unique_state_dict(model).items()}
    if config.model.lm.tie_word_embeddings:
        renamed.pop("lm_head.weight", None)
    check_converted(renamed, expected, origin)
    return write_inference_export(Path(dst).expanduser(), config, renamed, dtype=DTYPES.get(dtype or ""))


def run(args: argparse.Namespace) -> Path:
    src = Path(args.src).expanduser()
    hf = read_hf_config(src, args.kind)
    tokenizer_dir = check_tokenizer_dir(args.chameleon_tokenizer, args.kind)
    model = ModelConfig(lm=lm_config(hf))
    model.vision.enabled = False
    config = base_config(model, tokenizer_dir, image_size=args.image_size or 512)
    state = read_safetensors_dir(src)
    vision = vision_branch(config.model, args.siglip)
    origin = f"{args.kind} checkpoint {src}"
    return write_converted(state, LM_RULES, config, args.dst, origin, args.dtype, extra=vision)


def vision_branch(model: ModelConfig, siglip: str | None, seed: int = 0) -> dict[str, torch.Tensor]:
    """The ``vision.*`` weights of an export whose checkpoint has none: SigLIP's tower from ``siglip`` (its shapes
    read from the folder) and a fresh projector, or a fresh tower and projector."""
    if siglip is not None:
        model.vision = dataclasses.replace(model.vision, **siglip_shapes(Path(siglip).expanduser()))
    with torch.random.fork_rng(devices=[]):  # seeded, without touching the caller's generator
        torch.manual_seed(seed)
        encoder = VisionEncoder(model.vision, model.lm.hidden_size, model.projector)
    if siglip is not None:
        encoder.load_pretrained_tower(Path(siglip).expanduser())
        print(f"vision branch: SigLIP tower from {siglip}, fresh projector (seed {seed}); off until stage 1")
    else:
        print(
            f"vision branch: fresh SigLIP tower and projector (seed {seed}), off; --siglip DIR starts it from SigLIP"
        )
    return {f"vision.{name}": tensor for name, tensor in encoder.state_dict().items()}
