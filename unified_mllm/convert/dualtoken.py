"""DualToken (``songweii/DualToken``, ``model_config_siglip_384_rvq8``) -> a visual-tokenizer directory.

    python -m unified_mllm.convert dualtoken dualtoken.ckpt out/dualtoken
    # then: model.vq.checkpoint=out/dualtoken (config.json inside says kind dualtoken, published layout)

The weights sit at ``torch.load(path)['state_dict']`` (a Lightning-style checkpoint of ``RQVAESiglipModel``).
Shapes (SigLIP width, depth and MLP, codebooks, residual depths, decoder widths) are read from the tensors; the
layer taps, the shortcut weight, the attention heads and the image side are not in them and come from options
whose defaults are the published config's. The converted tokenizer uses the published module layout
(``dualtoken.mlp_norm=input``, ``mlp_norm_eps=1e-6``, ``post_quant_norm2=true``).

Renames: ``siglip_model.vision_model.*`` -> ``backbone.*``; ``prequant_{pix,shortcut,sem}`` /
``postquant_{pix,sem}`` -> ``pre_{pixel,shortcut,semantic}`` / ``post_{pixel,semantic}`` (their ``proj`` is our
``shortcut``); ``post_quant_conv.{norm1,conv1,norm2,conv2,nin_shortcut}`` -> ``post_quant_block.{norm,conv1,norm2,
conv2,shortcut}``; ``decoder.*`` unchanged. Surgery: the GeGLU ``w0``/``w1`` -> ``fc1 = cat([w1, w0])``; each
residual quantizer's *shared* codebook, saved once per depth (``codebooks.0`` .. ``codebooks.7``, checked equal),
is kept once, without its padding row (``[n + 1, dim]`` -> ``[n, dim]``), and ``cluster_size_ema`` / ``embed_ema``
become ``ema_cluster_size`` / ``ema_embed_sum`` (the same EMA). Dropped: the SigLIP text tower and
``logit_scale`` / ``logit_bias`` (zero-shot scoring; the tokenizer has no text side) and the projections'
constant ``attn.zero_k_bias``. :func:`to_published` maps our state back (the text tower only if given).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from unified_mllm.config import DualTokenConfig, VisionConfig, VQConfig
from unified_mllm.convert.common import (
    ConversionError,
    Rule,
    count_indices,
    read_torch_checkpoint,
    rename,
    shape_of,
)
from unified_mllm.convert.tokenizer_common import (
    Pair,
    drop_zero_buffer,
    fuse_geglu,
    pair_rules,
    split_geglu,
    write_tokenizer,
)
from unified_mllm.vision.dualtoken import published_layout

HELP = "DualToken's checkpoint (['state_dict'], siglip_384_rvq8) -> a visual-tokenizer directory (model.vq.checkpoint)"
KIND = "dualtoken"
INSIDE = ("state_dict",)

PROJECTIONS: dict[str, str] = {
    "prequant_pix": "pre_pixel",
    "prequant_shortcut": "pre_shortcut",
    "prequant_sem": "pre_semantic",
    "postquant_pix": "post_pixel",
    "postquant_sem": "post_semantic",
}
QUANTIZERS: dict[str, str] = {"quantizer_pix": "pixel_quantizer", "quantizer_sem": "semantic_quantizer"}
_VISION = "siglip_model.vision_model."


def _projection_pairs(published: str, ours: str) -> list[Pair]:
    return [
        Pair(f"{published}.<same>.<p>", f"{ours}.<same>.<p>"),
        Pair(f"{published}.attn.qkv.weight", f"{ours}.attn.qkv.weight"),
        Pair(f"{published}.attn.q_bias", f"{ours}.attn.q_bias"),
        Pair(f"{published}.attn.v_bias", f"{ours}.attn.v_bias"),
        Pair(f"{published}.proj.<p>", f"{ours}.shortcut.<p>"),
        Pair(f"{published}.mlp.w2.<p>", f"{ours}.mlp.fc2.<p>"),
    ]


PAIRS: list[Pair] = [
    Pair(_VISION + "<rest>", "backbone.<rest>"),
    *(pair for published, ours in PROJECTIONS.items() for pair in _projection_pairs(published, ours)),
    *(
        pair
        for published, ours in QUANTIZERS.items()
        for pair in (
            Pair(f"{published}.codebook.weight", f"{ours}.codebook.embedding.weight"),
            Pair(f"{published}.codebook.cluster_size_ema", f"{ours}.codebook.ema_cluster_size"),
            Pair(f"{published}.codebook.embed_ema", f"{ours}.codebook.ema_embed_sum"),
        )
    ),
    Pair("post_quant_conv.norm1.<p>", "post_quant_block.norm.<p>"),
    Pair("post_quant_conv.conv1.<p>", "post_quant_block.conv1.<p>"),
    Pair("post_quant_conv.norm2.<p>", "post_quant_block.norm2.<p>"),
    Pair("post_quant_conv.conv2.<p>", "post_quant_block.conv2.<p>"),
    Pair("post_quant_conv.nin_shortcut.<p>", "post_quant_block.shortcut.<p>"),
    Pair("decoder.<rest>", "decoder.<rest>"),
]

_ZERO_K_BIAS = r"(prequant|postquant)_\w+\.attn\.zero_k_bias"
DROPPED: list[Rule] = [
    Rule(
        r"siglip_model\.text_model\..+",
        None,
        "SigLIP text tower (zero-shot scoring): the tokenizer has no text side",
    ),
    Rule(r"siglip_model\.logit_(scale|bias)", None, "SigLIP's contrastive logit scale and bias (text side)"),
    Rule(_ZERO_K_BIAS, None, "constant zero key bias (a buffer); our projection adds zeros in forward"),
]
RULES: list[Rule] = pair_rules(PAIRS) + DROPPED
_CODEBOOK = re.compile(
    r"(quantizer_pix|quantizer_sem)\.codebooks\.(\d+)\.(weight|cluster_size_ema|embed_ema)"
)


def _shared_codebooks(state: dict[str, torch.Tensor], origin: str) -> dict[str, torch.Tensor]:
    """``Q.codebooks.d.X`` (one copy per depth of the one shared codebook) -> ``Q.codebook.X``, the padding
    row of ``weight`` removed; a copy that differs from depth 0's is an error (not a shared codebook)."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        match = _CODEBOOK.fullmatch(key)
        if match is None:
            out[key] = tensor
            continue
        quantizer, depth, name = match.groups()
        first = state.get(f"{quantizer}.codebooks.0.{name}")
        if first is None:
            raise ConversionError(f"{origin}: {key} without {quantizer}.codebooks.0.{name}")
        if depth != "0":
            if not tensor.is_meta and not torch.equal(tensor, first):
                raise ConversionError(
                    f"{origin}: {key} differs from {quantizer}.codebooks.0.{name}: the codebooks are not shared "
                    "(shared_codebook: false is not supported)"
                )
            continue
        if name == "weight":
            tensor = tensor[:-1]  # nn.Embedding(n + 1, padding_idx=n): the last row is the padding entry
        out[f"{quantizer}.codebook.{name}"] = tensor
    return out


def convert_state(published: Mapping[str, torch.Tensor], origin: str = KIND) -> dict[str, torch.Tensor]:
    """The published DualToken state dict under our names (every key consumed or dropped by a named rule)."""
    state = dict(published)
    drop_zero_buffer(_ZERO_K_BIAS, state, origin)
    state = fuse_geglu(state, origin)
    state = _shared_codebooks(state, origin)
    return rename(state, RULES, origin)


def to_published(
    ours: Mapping[str, torch.Tensor], vq: VQConfig, text_side: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Our DualToken state (``state_to_save``) -> the published ``['state_dict']``: each shared codebook written
    once per depth with a zero padding row, zero key biases, and ``text_side`` (the SigLIP text tower and
    ``siglip_model.logit_scale/bias``, which the conversion dropped) merged in when given."""
    state = rename(ours, pair_rules(PAIRS, reverse=True), f"{KIND} (to published)")
    state = split_geglu(state, r"(?:pre|post)quant_[a-z]+")
    dt = vq.dualtoken
    for quantizer, depth in (("quantizer_pix", dt.pixel_depth), ("quantizer_sem", dt.semantic_depth)):
        shared = {
            name: state.pop(f"{quantizer}.codebook.{name}")
            for name in ("weight", "cluster_size_ema", "embed_ema")
        }
        weight = shared["weight"]
        shared["weight"] = torch.cat([weight, weight.new_zeros(1, weight.shape[1])])
        for d in range(depth):
            state.update({f"{quantizer}.codebooks.{d}.{name}": t for name, t in shared.items()})
    hidden = dt.backbone.hidden_size
    for name in PROJECTIONS:
        if f"{name}.attn.q_bias" in state:
            state[f"{name}.attn.zero_k_bias"] = torch.zeros(hidden, dtype=state[f"{name}.attn.q_bias"].dtype)
    state.update(text_side or {})
    return state


def infer_config(
    published: Mapping[str, torch.Tensor],
    *,
    resolution: int = 384,
    num_heads: int = 16,
    pixel_layer: int = 6,
    shortcut_layer: int = 4,
    shortcut_weight: float = 0.6,
    semantic_layer: int = 26,
    origin: str = KIND,
) -> VQConfig:
    """The :class:`VQConfig` (kind dualtoken, published layout) whose shapes are those of ``published``;
    the taps, heads and image side come from the arguments (defaults: ``model_config_siglip_384_rvq8``).
    The decoder's base width is its last level's (taming's ``ch_mult[0] = 1``, as published)."""
    hidden, _, patch, _ = shape_of(
        published, _VISION + "embeddings.patch_embedding.weight", origin, "DualToken"
    )
    positions = shape_of(published, _VISION + "embeddings.position_embedding.weight", origin, "DualToken")[0]
    if (resolution // patch) ** 2 != positions:
        raise ConversionError(
            f"{origin}: {positions} position embeddings do not fit {resolution} px with {patch} px patches "
            "(pass --resolution)"
        )
    backbone = VisionConfig(
        image_size=resolution,
        patch_size=patch,
        hidden_size=hidden,
        intermediate_size=shape_of(
            published, _VISION + "encoder.layers.0.mlp.fc1.weight", origin, "DualToken"
        )[0],
        num_layers=count_indices(published, re.escape(_VISION) + r"encoder\.layers\.(\d+)\..*"),
        num_heads=num_heads,
    )
    codebook_rows, embed_dim = shape_of(published, "quantizer_pix.codebooks.0.weight", origin, "DualToken")
    has_shortcut = any(k.startswith("prequant_shortcut.") for k in published)
    levels = count_indices(published, r"decoder\.up\.(\d+)\..*")
    base = shape_of(published, "decoder.conv_out.weight", origin, "DualToken")[1]
    widths = [
        shape_of(published, f"decoder.up.{i}.block.0.conv2.weight", origin, "DualToken")[0]
        for i in range(levels)
    ]
    dualtoken = DualTokenConfig(
        backbone=backbone,
        pixel_layer=pixel_layer,
        shortcut_layer=shortcut_layer if has_shortcut else pixel_layer,
        shortcut_weight=shortcut_weight if has_shortcut else 0.0,
        semantic_layer=semantic_layer,
        pixel_depth=count_indices(published, r"quantizer_pix\.codebooks\.(\d+)\.weight"),
        semantic_depth=count_indices(published, r"quantizer_sem\.codebooks\.(\d+)\.weight"),
        projection_heads=hidden // embed_dim,  # the published AttnProjection: hidden // embed_dim heads
        decoder_latent_side=resolution >> (levels - 1),
    )
    side = resolution
    attn_resolutions = []
    for i in range(levels):
        if f"decoder.up.{i}.attn.0.q.weight" in published:
            attn_resolutions.append(side >> i)
    return VQConfig(
        kind="dualtoken",
        resolution=resolution,
        codebook_size=codebook_rows - 1,
        embed_dim=embed_dim,
        z_channels=shape_of(published, "post_quant_conv.conv1.weight", origin, "DualToken")[0],
        base_channels=base,
        channel_mult=[w // base for w in widths],
        num_res_blocks=count_indices(published, r"decoder\.up\.0\.block\.(\d+)\..*") - 1,
        attn_resolutions=sorted(set(attn_resolutions), reverse=True),
        ema_decay=0.99,
        dualtoken=published_layout(dualtoken),
    )


def convert_file(src: Path, dst: Path, **options: float) -> Path:
    """Read ``src`` (``torch.save`` file), convert, check against the model, write ``dst``."""
    origin = f"{KIND} {src}"
    published = read_torch_checkpoint(src, INSIDE, KIND)
    vq = infer_config(published, origin=origin, **options)  # type: ignore[arg-type]
    return write_tokenizer(vq, convert_state(published, origin), dst, origin)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = DualTokenConfig()
    parser.add_argument("--resolution", type=int, default=384, help="image side (published: 384)")
    parser.add_argument("--num-heads", type=int, default=16, help="SigLIP attention heads (so400m: 16)")
    parser.add_argument("--pixel-layer", type=int, default=defaults.pixel_layer, help="layer_recon (6)")
    parser.add_argument(
        "--shortcut-layer", type=int, default=defaults.shortcut_layer, help="layer_shortcut (4)"
    )
    parser.add_argument(
        "--shortcut-weight", type=float, default=defaults.shortcut_weight, help="weight_shortcut"
    )
    parser.add_argument("--semantic-layer", type=int, default=defaults.semantic_layer, help="layer_sem (26)")


def run(args: argparse.Namespace) -> Path:
    return convert_file(
        Path(args.src),
        Path(args.dst),
        resolution=args.resolution,
        num_heads=args.num_heads,
        pixel_layer=args.pixel_layer,
        shortcut_layer=args.shortcut_layer,
        shortcut_weight=args.shortcut_weight,
        semantic_layer=args.semantic_layer,
    )
