"""UniTok (``FoundationVision/UniTok``): ``unitok_tokenizer.pth`` -> a visual-tokenizer directory.

    python -m unified_mllm.convert unitok unitok_tokenizer.pth out/unitok-large
    # then: model.vq.checkpoint=out/unitok-large (config.json inside says kind unitok, published layout)

The published weights sit at ``torch.load(path)['trainer']['unitok']`` (UniTok-Large: 1 335 tensors). The shapes
(widths, depths, codebooks, text tower) are read from the tensors; what they do not show — attention heads of
the ViT blocks and of the text tower, the image side — comes from options whose defaults are UniTok-Large's.
The converted tokenizer uses the published block layout (``unitok.mlp_norm=input``,
``unitok.layer_norm_eps=1e-6``).

Tensor surgery: the GeGLU's ``w0`` (gate) and ``w1`` (value) become ``fc1 = cat([w1, w0])``; OpenCLIP's fused
``in_proj_weight/bias`` are split into q/k/v; ``text_projection`` (``[width, dim]``, used as ``x @ P``) is
transposed into a Linear weight. Dropped on purpose: ``encoder.pos_embed`` (constant zeros: UniTok builds its
ViT without position embeddings), ``attn.zero_k_bias`` (constant zeros; ours adds the zero key bias in
forward), ``vocab_usage`` (a running usage statistic for logging). :func:`to_published` maps our state back
(dropped tensors written as zeros).

Codes: the published ``img_to_idx`` returns ``[B, 8, L]``; ours ``[B, h, w, 8]``
(:func:`unified_mllm.vision.unitok.codes_to_published` converts, :meth:`UniTok.img_to_idx` encodes in that order).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from unified_mllm.config import UniTokConfig, VQConfig
from unified_mllm.convert.common import (
    ConversionError,
    Rule,
    count_indices,
    read_torch_checkpoint,
    rename,
    shape_of,
    transform,
)
from unified_mllm.convert.tokenizer_common import (
    Pair,
    drop_zero_buffer,
    fuse_geglu,
    pair_rules,
    split_geglu,
    write_tokenizer,
)
from unified_mllm.vision.unitok import PUBLISHED_LAYER_NORM_EPS

HELP = "UniTok's unitok_tokenizer.pth (['trainer']['unitok']) -> a visual-tokenizer directory (model.vq.checkpoint)"
KIND = "unitok"
INSIDE = ("trainer", "unitok")

_BB = "encoder.patch_embed.backbone."
_TEXT = "text.text_model."
# Inverted MBConv parts of the decoder's up_conv2 / up_conv3 (published) and our decoder.stages.0 / .1.
_MBCONV = [
    ("pre_norm.<p>", "norm.<p>"),
    ("conv1_1x1.<p>", "expand.<p>"),
    ("conv2_kxk.<p>", "depthwise.<p>"),
    ("conv3_1x1.<p>", "project.<p>"),
]

PAIRS: list[Pair] = [
    Pair(_BB + "stem.conv1.<p>", "encoder.stem.first.<p>"),
    Pair(_BB + "stem.norm1.<p>", "encoder.stem.norm.<p>"),
    Pair(_BB + "stem.conv2.<p>", "encoder.stem.conv.<p>"),
    *(Pair(_BB + f"stages.<i>.<j>.{a}", f"encoder.stages.<i>.<j>.{b}") for a, b in _MBCONV),
    Pair(_BB + "stages.<i>.<j>.shortcut.expand.<p>", "encoder.stages.<i>.<j>.shortcut.1.<p>"),
    Pair(_BB + "stages.<i>.<j>.shortcut.<p>", "encoder.stages.<i>.<j>.shortcut.<p>"),
    Pair(_BB + "pool.norm.<p>", "encoder.to_tokens.norm.<p>"),
    Pair(_BB + "pool.proj.<p>", "encoder.to_tokens.conv.<p>"),
    Pair("<tower>.blocks.<i>.norm1.<p>", "<tower>.blocks.<i>.norm1.<p>"),
    Pair("<tower>.blocks.<i>.attn.qkv.<p>", "<tower>.blocks.<i>.attn.qkv.<p>"),
    Pair("<tower>.blocks.<i>.attn.proj.<p>", "<tower>.blocks.<i>.attn.proj.<p>"),
    Pair("<tower>.blocks.<i>.norm2.<p>", "<tower>.blocks.<i>.norm2.<p>"),
    Pair("<tower>.blocks.<i>.mlp.norm.<p>", "<tower>.blocks.<i>.mlp.norm.<p>"),
    Pair("<tower>.blocks.<i>.mlp.fc1.<p>", "<tower>.blocks.<i>.mlp.fc1.<p>"),
    Pair("<tower>.blocks.<i>.mlp.w2.<p>", "<tower>.blocks.<i>.mlp.fc2.<p>"),
    Pair("<tower>.norm.<p>", "<tower>.norm.<p>"),
    Pair("<proj>.<same>.<p>", "<proj>.<same>.<p>"),
    Pair("<proj>.attn.qkv.weight", "<proj>.attn.qkv.weight"),
    Pair("<proj>.attn.q_bias", "<proj>.attn.q_bias"),
    Pair("<proj>.attn.v_bias", "<proj>.attn.v_bias"),
    Pair("<proj>.proj.<p>", "<proj>.shortcut.<p>"),
    Pair("<proj>.mlp.w2.<p>", "<proj>.mlp.fc2.<p>"),
    Pair("quantizer.codebooks.<i>.codebook.weight", "quantize.codebooks.<i>.embedding.weight"),
    Pair("decoder.up_conv1.conv.<p>", "decoder.up.conv.<p>"),
    *(
        Pair(f"decoder.up_conv{n}.<j>.{a}", f"decoder.stages.{n - 2}.<j>.{b}")
        for n in (2, 3)
        for a, b in [
            *_MBCONV,
            ("up.conv.<p>", "up.conv.<p>"),
            ("shortcut.conv.<p>", "shortcut.conv.<p>"),
            ("shortcut.<p>", "shortcut.<p>"),
        ]
    ),
    Pair("decoder.up_conv4.conv1.conv.<p>", "decoder.to_pixels.first.conv.<p>"),
    Pair("decoder.up_conv4.norm1.<p>", "decoder.to_pixels.norm.<p>"),
    Pair("decoder.up_conv4.conv2.<p>", "decoder.to_pixels.conv.<p>"),
    Pair("text_encoder.token_embedding.weight", _TEXT + "embeddings.token_embedding.weight"),
    Pair("text_encoder.positional_embedding", _TEXT + "embeddings.position_embedding.weight"),
    Pair("text_encoder.transformer.resblocks.<i>.ln_1.<p>", _TEXT + "encoder.layers.<i>.layer_norm1.<p>"),
    Pair(
        "text_encoder.transformer.resblocks.<i>.attn.<qkv>_proj.<p>",
        _TEXT + "encoder.layers.<i>.self_attn.<qkv>_proj.<p>",
    ),
    Pair(
        "text_encoder.transformer.resblocks.<i>.attn.out_proj.<p>",
        _TEXT + "encoder.layers.<i>.self_attn.out_proj.<p>",
    ),
    Pair("text_encoder.transformer.resblocks.<i>.ln_2.<p>", _TEXT + "encoder.layers.<i>.layer_norm2.<p>"),
    Pair("text_encoder.transformer.resblocks.<i>.mlp.c_fc.<p>", _TEXT + "encoder.layers.<i>.mlp.fc1.<p>"),
    Pair("text_encoder.transformer.resblocks.<i>.mlp.c_proj.<p>", _TEXT + "encoder.layers.<i>.mlp.fc2.<p>"),
    Pair("text_encoder.ln_final.<p>", _TEXT + "final_layer_norm.<p>"),
    Pair("text_encoder.text_projection", "text.text_projection.weight"),
    Pair("fc_norm.<p>", "clip_head.norm.<p>"),
    Pair("projection.<p>", "clip_head.proj.<p>"),
    Pair("logit_scale", "logit_scale"),
]

_POS_EMBED = r"encoder\.pos_embed"
_ZERO_K_BIAS = r"(quant_proj|post_quant_proj)\.attn\.zero_k_bias"
_VOCAB_USAGE = r"quantizer\.codebooks\.\d+\.vocab_usage"
DROPPED: list[Rule] = [
    Rule(
        _POS_EMBED,
        None,
        "constant zeros: UniTok builds its ViT with pos_embed='none' (position from the convs)",
    ),
    Rule(_ZERO_K_BIAS, None, "constant zero key bias (a buffer); our projection adds zeros in forward"),
    Rule(_VOCAB_USAGE, None, "a running codebook-usage statistic for logging, not used by the model"),
]
RULES: list[Rule] = pair_rules(PAIRS) + DROPPED


def _split_in_proj(match: re.Match[str], fused: torch.Tensor) -> dict[str, torch.Tensor]:
    q, k, v = fused.chunk(3, dim=0)
    prefix, name = match.group(1), match.group(2)
    return {f"{prefix}.q_proj.{name}": q, f"{prefix}.k_proj.{name}": k, f"{prefix}.v_proj.{name}": v}


def convert_state(published: Mapping[str, torch.Tensor], origin: str = KIND) -> dict[str, torch.Tensor]:
    """The published UniTok state dict under our names (every key consumed or dropped by a named rule)."""
    state = dict(published)
    drop_zero_buffer(_POS_EMBED, state, origin)
    drop_zero_buffer(_ZERO_K_BIAS, state, origin)
    state = fuse_geglu(state, origin)
    state = transform(
        state, r"(text_encoder\.transformer\.resblocks\.\d+\.attn)\.in_proj_(weight|bias)", _split_in_proj
    )
    state = transform(state, r"text_encoder\.text_projection", lambda m, t: {m.group(0): t.t().contiguous()})
    return rename(state, RULES, origin)


def to_published(ours: Mapping[str, torch.Tensor], vq: VQConfig) -> dict[str, torch.Tensor]:
    """Our UniTok state (``state_to_save``) -> the published ``['trainer']['unitok']`` state dict. The dropped
    constants come back as zeros (``vocab_usage`` too: the statistic is not kept here)."""
    state = rename(ours, pair_rules(PAIRS, reverse=True), f"{KIND} (to published)")
    state = split_geglu(state, r"(?:encoder|decoder)\.blocks\.\d+|quant_proj|post_quant_proj")

    def fuse_qkv(match: re.Match[str], q: torch.Tensor) -> dict[str, torch.Tensor]:
        prefix, name = match.group(1), match.group(2)
        parts = [q, state[f"{prefix}.k_proj.{name}"], state[f"{prefix}.v_proj.{name}"]]
        return {f"{prefix}.in_proj_{name}": torch.cat(parts)}

    attn = r"(text_encoder\.transformer\.resblocks\.\d+\.attn)"
    state = transform(state, attn + r"\.q_proj\.(weight|bias)", fuse_qkv)
    state = {k: v for k, v in state.items() if not re.fullmatch(attn + r"\.[kv]_proj\.(weight|bias)", k)}
    state["text_encoder.text_projection"] = state["text_encoder.text_projection"].t().contiguous()
    cfg = vq.unitok
    dtype = state["logit_scale"].dtype
    state["encoder.pos_embed"] = torch.zeros(1, 1, cfg.width, dtype=dtype)
    for name in ("quant_proj", "post_quant_proj"):  # the attention runs at the wider of the two widths
        state[f"{name}.attn.zero_k_bias"] = torch.zeros(max(cfg.width, vq.embed_dim), dtype=dtype)
    for k in range(cfg.num_codebooks):
        state[f"quantizer.codebooks.{k}.vocab_usage"] = torch.zeros(vq.codebook_size, dtype=torch.float32)
    return state


def infer_config(
    published: Mapping[str, torch.Tensor],
    *,
    num_heads: int = 16,
    text_heads: int = 12,
    resolution: int = 256,
    text_pad_id: int = 0,
    origin: str = KIND,
) -> VQConfig:
    """The :class:`VQConfig` (kind unitok, published layout) whose shapes are those of ``published``; what the
    tensors do not show comes from the arguments (defaults: UniTok-Large)."""
    width = shape_of(published, "encoder.blocks.0.norm1.weight", origin, "UniTok")[0]
    hidden = shape_of(published, "encoder.blocks.0.mlp.w0.weight", origin, "UniTok")[0]
    stages = count_indices(published, re.escape(_BB) + r"stages\.(\d+)\..*")
    conv_widths = [
        shape_of(published, f"{_BB}stages.{s}.0.conv3_1x1.weight", origin, "UniTok")[0] for s in range(stages)
    ]
    conv_depths = [
        count_indices(published, re.escape(_BB) + rf"stages\.{s}\.(\d+)\..*") for s in range(stages)
    ]
    mid = shape_of(published, f"{_BB}stages.0.0.conv1_1x1.weight", origin, "UniTok")[0]
    num_codebooks = count_indices(published, r"quantizer\.codebooks\.(\d+)\..*")
    codebook_size, chunk = shape_of(published, "quantizer.codebooks.0.codebook.weight", origin, "UniTok")
    text_vocab, text_width = shape_of(published, "text_encoder.token_embedding.weight", origin, "UniTok")
    embed_dim = num_codebooks * chunk
    if shape_of(published, "quant_proj.proj.weight", origin, "UniTok")[0] != embed_dim:
        raise ConversionError(
            f"{origin}: quant_proj width differs from {num_codebooks} codebooks x {chunk} dims"
        )
    unitok = UniTokConfig(
        num_codebooks=num_codebooks,
        conv_widths=conv_widths,
        conv_depths=conv_depths,
        conv_expansion=mid // conv_widths[0],
        width=width,
        encoder_layers=count_indices(published, r"encoder\.blocks\.(\d+)\..*"),
        decoder_layers=count_indices(published, r"decoder\.blocks\.(\d+)\..*"),
        num_heads=num_heads,
        mlp_ratio=hidden / width,
        projection_heads=width // embed_dim,  # the published AttnProjection: encoder width // vocab width
        causal_projection=False,
        clip_dim=shape_of(published, "projection.weight", origin, "UniTok")[0],
        text_width=text_width,
        text_layers=count_indices(published, r"text_encoder\.transformer\.resblocks\.(\d+)\..*"),
        text_heads=text_heads,
        text_vocab_size=text_vocab,
        text_context=shape_of(published, "text_encoder.positional_embedding", origin, "UniTok")[0],
        text_pad_id=text_pad_id,
        mlp_norm="input",
        layer_norm_eps=PUBLISHED_LAYER_NORM_EPS,
    )
    return VQConfig(
        kind="unitok",
        codebook_size=codebook_size,
        embed_dim=embed_dim,
        beta=0.25,
        l2_normalize_codes=True,
        resolution=resolution,
        unitok=unitok,
    )


def convert_file(src: Path, dst: Path, **options: int) -> Path:
    """Read ``src`` (``torch.save`` file), convert, check against the model, write ``dst``."""
    origin = f"{KIND} {src}"
    published = read_torch_checkpoint(src, INSIDE, KIND)
    vq = infer_config(published, origin=origin, **options)
    return write_tokenizer(vq, convert_state(published, origin), dst, origin)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--num-heads", type=int, default=16, help="attention heads of the ViT blocks (UniTok-L: 16)"
    )
    parser.add_argument("--text-heads", type=int, default=12, help="attention heads of the text tower (12)")
    parser.add_argument("--resolution", type=int, default=256, help="image side the tokenizer was trained at")
    parser.add_argument(
        "--text-pad-id", type=int, default=0, help="the text tokenizer's padding id (OpenCLIP: 0)"
    )


def run(args: argparse.Namespace) -> Path:
    return convert_file(
        Path(args.src),
        Path(args.dst),
        num_heads=args.num_heads,
        text_heads=args.text_heads,
        resolution=args.resolution,
        text_pad_id=args.text_pad_id,
    )
