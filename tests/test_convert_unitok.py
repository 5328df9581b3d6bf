"""``python -m unified_mllm.convert unitok``: a tiny UniTok checkpoint written here in the published layout
(``torch.save({'trainer': {'unitok': state_dict}})`` with the key names and shapes FoundationVision/UniTok's
modules save: timm's ViT around a ViTamin MbConv stem, ``GeGluMlp`` with w0/w1/w2, ``AttnProjection`` with
``proj`` and a ``zero_k_bias`` buffer, ``VectorQuantizerM``, ``ViTaminDecoder``, OpenCLIP's text tower), converted,
loaded by our loader, and compared with hand-written forwards of the published modules."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import ref_attention, ref_attn_projection, ref_geglu
from tests.helpers import ref_layer_norm as ln
from tests.helpers import ref_linear as linear
from unified_mllm.convert.__main__ import main
from unified_mllm.convert.common import ConversionError, check_converted
from unified_mllm.convert.unitok import convert_file, convert_state, infer_config, to_published
from unified_mllm.vision.tokenizer_registry import load_visual_tokenizer
from unified_mllm.vision.unitok import UniTok, codes_from_published, codes_to_published, unitok_large_config

BB = "encoder.patch_embed.backbone."
TINY = {
    "stem": 8,
    "widths": (8, 16),
    "depths": (2, 4),  # the published decoder mirrors them with fixed depths (4, 2)
    "width": 32,
    "encoder_layers": 1,
    "decoder_layers": 1,
    "vocab_size": 16,
    "num_codebooks": 2,
    "vocab_width": 8,
    "clip_dim": 16,
    "text_width": 16,
    "text_layers": 1,
    "text_vocab": 50,
    "text_context": 8,
}
LARGE = {
    "stem": 160,
    "widths": (160, 320),
    "depths": (2, 4),
    "width": 1024,
    "encoder_layers": 31,
    "decoder_layers": 31,
    "vocab_size": 4096,
    "num_codebooks": 8,
    "vocab_width": 64,
    "clip_dim": 768,
    "text_width": 768,
    "text_layers": 12,
    "text_vocab": 49408,
    "text_context": 77,
}
HEADS, TEXT_HEADS, RESOLUTION = 2, 2, 64


def published_shapes(s: dict) -> dict[str, tuple[int, ...]]:
    """Names and shapes of UniTok's ``state_dict()`` as its modules build them (see the module docstring)."""
    out: dict[str, tuple[int, ...]] = {}

    def lin(name: str, o: int, i: int, bias: bool = True) -> None:
        out[f"{name}.weight"] = (o, i)
        if bias:
            out[f"{name}.bias"] = (o,)

    def conv(name: str, o: int, i: int, k: int, groups: int = 1) -> None:
        out[f"{name}.weight"], out[f"{name}.bias"] = (o, i // groups, k, k), (o,)

    def norm(name: str, c: int) -> None:
        out[f"{name}.weight"], out[f"{name}.bias"] = (c,), (c,)

    def geglu(name: str, dim: int, hidden: int) -> None:  # GeGluMlp: norm (input), w0, w1, w2
        norm(f"{name}.norm", dim)
        lin(f"{name}.w0", hidden, dim)
        lin(f"{name}.w1", hidden, dim)
        lin(f"{name}.w2", dim, hidden)

    def timm_block(name: str, dim: int) -> None:  # timm Block with qkv_bias, mlp_ratio 2
        norm(f"{name}.norm1", dim)
        lin(f"{name}.attn.qkv", 3 * dim, dim)
        lin(f"{name}.attn.proj", dim, dim)
        norm(f"{name}.norm2", dim)
        geglu(f"{name}.mlp", dim, 2 * dim)

    def attn_projection(name: str, i: int, o: int) -> None:
        inner = max(i, o)
        norm(f"{name}.norm1", i)
        out[f"{name}.attn.q_bias"] = out[f"{name}.attn.v_bias"] = out[f"{name}.attn.zero_k_bias"] = (inner,)
        lin(f"{name}.attn.qkv", 3 * inner, i, bias=False)
        lin(f"{name}.attn.proj", o, o)
        lin(f"{name}.proj", o, i)
        norm(f"{name}.norm3", i)
        norm(f"{name}.norm2", o)
        geglu(f"{name}.mlp", o, 2 * o)

    width, (e0, e1) = s["width"], s["widths"]
    out["encoder.pos_embed"] = (1, 1, width)
    conv(BB + "stem.conv1", s["stem"], 3, 3)
    norm(BB + "stem.norm1", s["stem"])
    conv(BB + "stem.conv2", s["stem"], s["stem"], 3)
    for stage, (dim, depth) in enumerate(zip(s["widths"], s["depths"])):
        for d in range(depth):
            name = f"{BB}stages.{stage}.{d}"
            in_chs = (s["stem"] if stage == 0 else s["widths"][stage - 1]) if d == 0 else dim
            if d == 0 and in_chs != dim:  # stride 2: Downsample2d(pool, expand)
                conv(f"{name}.shortcut.expand", dim, in_chs, 1)
            norm(f"{name}.pre_norm", in_chs)
            conv(f"{name}.conv1_1x1", 4 * dim, in_chs, 1)
            conv(f"{name}.conv2_kxk", 4 * dim, 4 * dim, 3, groups=4 * dim)
            conv(f"{name}.conv3_1x1", dim, 4 * dim, 1)
    norm(BB + "pool.norm", e1)
    conv(BB + "pool.proj", width, e1, 3)
    for i in range(s["encoder_layers"]):
        timm_block(f"encoder.blocks.{i}", width)
    norm("encoder.norm", width)
    attn_projection("quant_proj", width, s["vocab_width"])
    for k in range(s["num_codebooks"]):
        out[f"quantizer.codebooks.{k}.vocab_usage"] = (s["vocab_size"],)
        out[f"quantizer.codebooks.{k}.codebook.weight"] = (
            s["vocab_size"],
            s["vocab_width"] // s["num_codebooks"],
        )
    attn_projection("post_quant_proj", s["vocab_width"], width)
    for i in range(s["decoder_layers"]):
        timm_block(f"decoder.blocks.{i}", width)
    norm("decoder.norm", width)
    conv("decoder.up_conv1.conv", e1, width, 3)
    for n, (in_first, dim, depth) in {2: (e1, e1, 4), 3: (e1, e0, 2)}.items():
        for d in range(depth):
            name, in_chs = f"decoder.up_conv{n}.{d}", in_first if d == 0 else dim
            if d == 0:  # stride 2: Upsample2d shortcut and an Upsample2d on the expanded channels
                conv(f"{name}.shortcut.conv", dim, in_chs, 3)
            norm(f"{name}.pre_norm", in_chs)
            conv(f"{name}.conv1_1x1", 4 * dim, in_chs, 1)
            if d == 0:
                conv(f"{name}.up.conv", 4 * dim, 4 * dim, 3)
            conv(f"{name}.conv2_kxk", 4 * dim, 4 * dim, 3, groups=4 * dim)
            conv(f"{name}.conv3_1x1", dim, 4 * dim, 1)
    conv("decoder.up_conv4.conv1.conv", e0, e0, 3)
    norm("decoder.up_conv4.norm1", e0)
    conv("decoder.up_conv4.conv2", 3, e0, 3)
    tw = s["text_width"]
    out["text_encoder.text_projection"] = (tw, s["clip_dim"])
    out["text_encoder.token_embedding.weight"] = (s["text_vocab"], tw)
    out["text_encoder.positional_embedding"] = (s["text_context"], tw)
    for i in range(s["text_layers"]):
        name = f"text_encoder.transformer.resblocks.{i}"
        norm(f"{name}.ln_1", tw)
        out[f"{name}.attn.in_proj_weight"], out[f"{name}.attn.in_proj_bias"] = (3 * tw, tw), (3 * tw,)
        lin(f"{name}.attn.out_proj", tw, tw)
        norm(f"{name}.ln_2", tw)
        lin(f"{name}.mlp.c_fc", 4 * tw, tw)
        lin(f"{name}.mlp.c_proj", tw, 4 * tw)
    norm("text_encoder.ln_final", tw)
    norm("fc_norm", width)
    lin("projection", s["clip_dim"], width)
    out["logit_scale"] = ()
    return out


def published_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors in the published layout (zeros where UniTok keeps constant zeros)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in published_shapes(TINY).items():
        if key.endswith("pos_embed") or key.endswith("zero_k_bias"):
            state[key] = torch.zeros(shape)
        elif key.endswith("vocab_usage"):
            state[key] = torch.rand(shape, generator=gen)
        elif ".norm" in key or "norm1" in key or "_norm" in key or "ln_" in key:  # LayerNorms near identity
            state[key] = (1.0 if key.endswith("weight") else 0.0) + 0.1 * torch.randn(shape, generator=gen)
        else:
            state[key] = torch.randn(shape, generator=gen) * 0.2
    state["logit_scale"] = torch.tensor(math.log(1 / 0.07))
    return state


def convert_tiny(tmp_path: Path, state: dict | None = None) -> UniTok:
    src = tmp_path / "unitok_tokenizer.pth"
    torch.save({"trainer": {"unitok": state or published_state()}, "args": {"model": "tiny"}}, src)
    assert (
        main(
            [
                "unitok",
                str(src),
                str(tmp_path / "out"),
                "--num-heads",
                str(HEADS),
                "--text-heads",
                str(TEXT_HEADS),
                "--resolution",
                str(RESOLUTION),
            ]
        )
        == 0
    )
    model = load_visual_tokenizer(tmp_path / "out")
    assert isinstance(model, UniTok)
    return model.eval()


def ref_timm_block(x: torch.Tensor, state: dict, name: str, heads: int) -> torch.Tensor:
    """timm's Block (eps 1e-6 norms) with the GeGluMlp."""
    b, n, c = x.shape
    qkv = linear(ln(x, state, f"{name}.norm1", 1e-6), state, f"{name}.attn.qkv")
    q, k, v = qkv.reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    x = x + linear(ref_attention(q, k, v).transpose(1, 2).reshape(b, n, c), state, f"{name}.attn.proj")
    return x + ref_geglu(ln(x, state, f"{name}.norm2", 1e-6), state, f"{name}.mlp")


def ln2d(x: torch.Tensor, state: dict, name: str) -> torch.Tensor:
    """timm's LayerNorm2d (eps 1e-6): each pixel normalised over the channels."""
    return ln(x.permute(0, 2, 3, 1), state, name, 1e-6).permute(0, 3, 1, 2)


def conv(x: torch.Tensor, state: dict, name: str, stride: int = 1, groups: int = 1) -> torch.Tensor:
    weight = state[f"{name}.weight"]
    return F.conv2d(x, weight, state[f"{name}.bias"], stride, weight.shape[-1] // 2, groups=groups)


def upsample2d(x: torch.Tensor, state: dict, name: str) -> torch.Tensor:
    return conv(F.interpolate(x, scale_factor=2, mode="nearest"), state, f"{name}.conv")


def ref_latents(pixels: torch.Tensor, state: dict) -> torch.Tensor:
    """UniTok's encoder + quant_proj: MbConvStages (stem, MbConvLNBlocks, StridedConv), timm ViT, AttnProjection."""
    x = conv(pixels, state, BB + "stem.conv1", stride=2)
    x = conv(F.gelu(ln2d(x, state, BB + "stem.norm1")), state, BB + "stem.conv2")
    for stage, depth in enumerate(TINY["depths"]):
        for d in range(depth):
            name, stride = f"{BB}stages.{stage}.{d}", 2 if d == 0 else 1
            shortcut = F.avg_pool2d(x, 3, 2, 1, count_include_pad=False) if stride == 2 else x
            if f"{name}.shortcut.expand.weight" in state:
                shortcut = conv(shortcut, state, f"{name}.shortcut.expand")
            h = F.gelu(conv(ln2d(x, state, f"{name}.pre_norm"), state, f"{name}.conv1_1x1"))
            h = F.gelu(conv(h, state, f"{name}.conv2_kxk", stride=stride, groups=h.shape[1]))
            x = conv(h, state, f"{name}.conv3_1x1") + shortcut
    x = conv(ln2d(x, state, BB + "pool.norm"), state, BB + "pool.proj", stride=2)
    tokens = x.flatten(2).transpose(1, 2) + state["encoder.pos_embed"]
    for i in range(TINY["encoder_layers"]):
        tokens = ref_timm_block(tokens, state, f"encoder.blocks.{i}", HEADS)
    return ref_attn_projection(ln(tokens, state, "encoder.norm", 1e-6), state, "quant_proj")


def ref_indices(latents: torch.Tensor, state: dict) -> torch.Tensor:
    """VectorQuantizerM.f_to_idx: per chunk, argmax of normalised features x normalised codebook; ``[B, K, L]``."""
    chunks = latents.split(TINY["vocab_width"] // TINY["num_codebooks"], dim=-1)
    codebooks = [
        F.normalize(state[f"quantizer.codebooks.{k}.codebook.weight"], dim=1) for k in range(len(chunks))
    ]
    return torch.stack(
        [(F.normalize(c, dim=-1) @ cb.T).argmax(-1) for c, cb in zip(chunks, codebooks)], dim=1
    )


def codebooks_from(latents: torch.Tensor, state: dict, seed: int) -> dict[str, torch.Tensor]:
    """``state`` with each sub-codebook drawn from the latent chunks (plus noise): random codebooks put every
    position of a random tiny encoder on the same code, which would make the code comparisons vacuous."""
    gen = torch.Generator().manual_seed(seed)
    state = dict(state)
    chunks = latents.split(TINY["vocab_width"] // TINY["num_codebooks"], dim=-1)
    for k, chunk in enumerate(chunks):
        rows = chunk.reshape(-1, chunk.shape[-1])
        picks = rows[torch.randint(rows.shape[0], (TINY["vocab_size"],), generator=gen)]
        state[f"quantizer.codebooks.{k}.codebook.weight"] = picks + 0.05 * torch.randn(
            picks.shape, generator=gen
        )
    return state


def ref_decode(indices: torch.Tensor, state: dict) -> torch.Tensor:
    """UniTok.idx_to_img before its clamp: idx_to_f (normalised codes), post_quant_proj, ViTaminDecoder."""
    vectors = torch.cat(
        [
            F.normalize(state[f"quantizer.codebooks.{k}.codebook.weight"], dim=1)[indices[:, k]]
            for k in range(indices.shape[1])
        ],
        dim=-1,
    )
    x = ref_attn_projection(vectors, state, "post_quant_proj")
    for i in range(TINY["decoder_layers"]):
        x = ref_timm_block(x, state, f"decoder.blocks.{i}", HEADS)
    x = ln(x, state, "decoder.norm", 1e-6)
    b, n, c = x.shape
    side = int(n**0.5)
    x = upsample2d(x.view(b, side, side, c).permute(0, 3, 1, 2), state, "decoder.up_conv1")
    for n_conv, depth in ((2, 4), (3, 2)):
        for d in range(depth):
            name = f"decoder.up_conv{n_conv}.{d}"
            shortcut = upsample2d(x, state, f"{name}.shortcut") if d == 0 else x
            h = F.gelu(conv(ln2d(x, state, f"{name}.pre_norm"), state, f"{name}.conv1_1x1"))
            h = upsample2d(h, state, f"{name}.up") if d == 0 else h
            h = F.gelu(conv(h, state, f"{name}.conv2_kxk", groups=h.shape[1]))
            x = conv(h, state, f"{name}.conv3_1x1") + shortcut
    x = upsample2d(x, state, "decoder.up_conv4.conv1")
    return conv(F.gelu(ln2d(x, state, "decoder.up_conv4.norm1")), state, "decoder.up_conv4.conv2")


# ----------------------------------------------------------------------------------------------- tests


def test_published_key_set_at_unitok_large_matches_the_measured_count_and_our_preset() -> None:
    shapes = published_shapes(LARGE)
    assert len(shapes) == 1335  # research/published-layouts.md: 1 335 keys in unitok_tokenizer.pth
    meta = {k: torch.empty(v, device="meta") for k, v in shapes.items()}
    vq = infer_config(meta)
    assert vq.unitok == unitok_large_config().unitok and vq.embed_dim == 64 and vq.codebook_size == 4096
    model = UniTok.from_config(unitok_large_config(), device="meta")
    expected = {k: tuple(v.shape) for k, v in model.state_to_save().items()}
    check_converted(convert_state(meta), expected, "unitok-large")  # every key, every shape


def test_convert_loads_and_every_key_is_consumed(tmp_path: Path) -> None:
    state = published_state()
    model = convert_tiny(tmp_path, state)
    cfg = model.config.unitok
    assert (cfg.mlp_norm, cfg.layer_norm_eps, cfg.width, cfg.conv_depths) == ("input", 1e-6, 32, [2, 4])
    ours = model.state_to_save()
    # Dropped: pos_embed, 2 zero_k_bias, 2 vocab_usage; w0 + w1 -> fc1 (4 MLPs, weight and bias);
    # in_proj weight and bias -> q/k/v.
    assert len(state) - 5 - 4 * 2 + 4 * TINY["text_layers"] == len(ours)
    assert torch.equal(
        ours["encoder.blocks.0.mlp.fc1.weight"],
        torch.cat([state["encoder.blocks.0.mlp.w1.weight"], state["encoder.blocks.0.mlp.w0.weight"]]),
    )
    assert torch.equal(ours["text.text_projection.weight"], state["text_encoder.text_projection"].t())
    q = ours["text.text_model.encoder.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(
        q, state["text_encoder.transformer.resblocks.0.attn.in_proj_weight"][: TINY["text_width"]]
    )
    pixels = torch.rand(2, 3, RESOLUTION, RESOLUTION) * 2 - 1
    with torch.no_grad():
        codes = model.encode(pixels)
        assert codes.shape == (2, 4, 4, 2)
        assert model.decode(codes).shape == (2, 3, RESOLUTION, RESOLUTION)


def test_blocks_and_projections_equal_the_published_forward(tmp_path: Path) -> None:
    state = published_state(1)
    model = convert_tiny(tmp_path, state)
    x = torch.randn(2, 5, TINY["width"]) * 0.01  # small variance: LayerNorm eps 1e-5 vs 1e-6 shows
    with torch.no_grad():
        torch.testing.assert_close(
            model.encoder.blocks[0].mlp(x), ref_geglu(x, state, "encoder.blocks.0.mlp")
        )
        torch.testing.assert_close(
            model.encoder.blocks[0](x), ref_timm_block(x, state, "encoder.blocks.0", HEADS)
        )
        torch.testing.assert_close(
            model.decoder.blocks[0](x), ref_timm_block(x, state, "decoder.blocks.0", HEADS)
        )
        torch.testing.assert_close(model.encoder.norm(x), ln(x, state, "encoder.norm", 1e-6))
        torch.testing.assert_close(model.quant_proj(x), ref_attn_projection(x, state, "quant_proj"))
        z = torch.randn(2, 5, TINY["vocab_width"]) * 0.01
        torch.testing.assert_close(model.post_quant_proj(z), ref_attn_projection(z, state, "post_quant_proj"))
        clip = F.linear(
            ln(x.mean(1), state, "fc_norm", 1e-6), state["projection.weight"], state["projection.bias"]
        )
        torch.testing.assert_close(model.clip_head(x), clip)


def test_codes_in_the_published_order_equal_the_published_lookup(tmp_path: Path) -> None:
    pixels = torch.rand(2, 3, RESOLUTION, RESOLUTION) * 2 - 1
    state = published_state(2)
    state = codebooks_from(ref_latents(pixels, state), state, seed=2)
    model = convert_tiny(tmp_path, state)
    with torch.no_grad():
        latents, (h, w) = model.encode_latents(pixels)
        expected = ref_indices(latents, state)  # our latents, the published lookup
        published_order = model.img_to_idx(pixels)
        ours = model.encode(pixels)
    assert published_order.shape == (2, TINY["num_codebooks"], h * w)
    assert min(expected[:, k].unique().numel() for k in range(TINY["num_codebooks"])) >= 4
    assert torch.equal(published_order, expected)
    assert torch.equal(codes_to_published(ours), expected)
    assert torch.equal(codes_from_published(expected, h, w), ours)


def test_text_tower_equals_openclip_forward(tmp_path: Path) -> None:
    state = published_state(3)
    model = convert_tiny(tmp_path, state)
    tw, ctx = TINY["text_width"], TINY["text_context"]
    ids = torch.randint(1, 40, (2, ctx))
    ids[:, -1] = 49  # the end-of-text id is the largest: OpenCLIP pools argmax(ids), ours the last non-pad id
    prefix = "text_encoder.transformer.resblocks.0"
    mha = torch.nn.MultiheadAttention(tw, TEXT_HEADS, batch_first=True)
    mha.load_state_dict(
        {
            "in_proj_weight": state[f"{prefix}.attn.in_proj_weight"],
            "in_proj_bias": state[f"{prefix}.attn.in_proj_bias"],
            "out_proj.weight": state[f"{prefix}.attn.out_proj.weight"],
            "out_proj.bias": state[f"{prefix}.attn.out_proj.bias"],
        }
    )
    mask = torch.full((ctx, ctx), float("-inf")).triu(1)
    with torch.no_grad():
        x = state["text_encoder.token_embedding.weight"][ids] + state["text_encoder.positional_embedding"]
        h = ln(x, state, f"{prefix}.ln_1", 1e-5)
        x = x + mha(h, h, h, attn_mask=mask, need_weights=False)[0]
        h = ln(x, state, f"{prefix}.ln_2", 1e-5)
        x = x + linear(F.gelu(linear(h, state, f"{prefix}.mlp.c_fc")), state, f"{prefix}.mlp.c_proj")
        x = ln(x, state, "text_encoder.ln_final", 1e-5)
        expected = F.normalize(
            x[torch.arange(2), ids.argmax(-1)] @ state["text_encoder.text_projection"], dim=-1
        )
        torch.testing.assert_close(model.text_embedding(ids), expected)


def test_back_conversion_round_trips() -> None:
    state = published_state(4)
    vq = infer_config(state, num_heads=HEADS, text_heads=TEXT_HEADS, resolution=RESOLUTION)
    back = to_published(convert_state(state), vq)
    assert set(back) == set(state)
    for key, value in state.items():
        if key.endswith("vocab_usage"):
            assert not back[key].any()  # the usage statistic is not kept: written back as zeros
        else:
            assert torch.equal(back[key], value), key


def test_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match="not found"):
        convert_file(tmp_path / "missing.pth", tmp_path / "out")
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(ConversionError, match="cannot read"):
        convert_file(tmp_path / "text.pth", tmp_path / "out")
    torch.save({"state_dict": {"x": torch.zeros(1)}}, tmp_path / "dualtoken.ckpt")  # another kind's layout
    with pytest.raises(ConversionError, match="no 'trainer' at the top level"):
        convert_file(tmp_path / "dualtoken.ckpt", tmp_path / "out")
    torch.save({"trainer": {"disc": {}}}, tmp_path / "nested.pth")
    with pytest.raises(ConversionError, match=r"no 'unitok' at \['trainer'\]"):
        convert_file(tmp_path / "nested.pth", tmp_path / "out")
    stray = {**published_state(), "encoder.extra.weight": torch.zeros(2)}
    with pytest.raises(ConversionError, match=re.escape("no conversion rule knows: encoder.extra.weight")):
        convert_state(stray)
    nonzero = published_state()
    nonzero["encoder.pos_embed"] += 1
    with pytest.raises(ConversionError, match=re.escape("non-zero values in ['encoder.pos_embed']")):
        convert_state(nonzero)
    missing = published_state()
    del missing["decoder.norm.bias"]
    torch.save({"trainer": {"unitok": missing}}, tmp_path / "short.pth")
    with pytest.raises(ConversionError, match=re.escape("decoder.norm.bias")):
        convert_file(
            tmp_path / "short.pth",
            tmp_path / "out",
            num_heads=HEADS,
            text_heads=TEXT_HEADS,
            resolution=RESOLUTION,
        )
    with pytest.raises(SystemExit, match=r"^error: "):
        main(["unitok", str(tmp_path / "text.pth"), str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_pixels_to_codes_to_pixels_equal_the_published_model(tmp_path: Path) -> None:
    pixels = torch.rand(2, 3, RESOLUTION, RESOLUTION) * 2 - 1
    state = published_state(5)
    state = codebooks_from(ref_latents(pixels, state), state, seed=5)
    model = convert_tiny(tmp_path, state)
    with torch.no_grad():
        indices = ref_indices(ref_latents(pixels, state), state)
        assert min(indices[:, k].unique().numel() for k in range(TINY["num_codebooks"])) >= 4
        assert torch.equal(model.img_to_idx(pixels), indices)
        side = RESOLUTION // 16
        reconstruction = model.decode(codes_from_published(indices, side, side))
        torch.testing.assert_close(reconstruction, ref_decode(indices, state))
