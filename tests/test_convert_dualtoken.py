"""``python -m unified_mllm.convert dualtoken``: a tiny DualToken checkpoint written here in the published layout
(``torch.save({'state_dict': RQVAESiglipModel.state_dict()})``: transformers' ``SiglipModel`` under
``siglip_model``, five ``AttnProjection`` s with ``GeGluMlp`` and ``zero_k_bias``, two residual quantizers whose
shared codebook is saved once per depth with a padding row, ``PostQuantResnetBlock`` with ``norm1``/``norm2``/
``nin_shortcut``, the taming ``Decoder``), converted, loaded by our loader, and compared with hand-written
forwards of the published modules."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import SiglipConfig, SiglipModel

from tests.helpers import ref_attn_projection
from unified_mllm.config import load_config
from unified_mllm.convert.__main__ import main
from unified_mllm.convert.common import ConversionError, check_converted
from unified_mllm.convert.dualtoken import convert_file, convert_state, infer_config, to_published
from unified_mllm.vision.dualtoken import DualToken, published_dualtoken_config
from unified_mllm.vision.tokenizer_registry import build_visual_tokenizer, load_visual_tokenizer

REPO = Path(__file__).resolve().parents[1]
TINY = {
    "vision": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 2,
        "image_size": 32,
        "patch_size": 6,
    },
    "text": {
        "vocab_size": 50,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "max_position_embeddings": 8,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
    },
    "embed_dim": 8,
    "n_embed": 16,
    "depth_pix": 3,
    "depth_sem": 2,
    "z": 32,
    "ch": 32,
    "ch_mult": (1, 1, 1, 1),
    "num_res_blocks": 1,
    "attn_resolutions": (4,),
    "resolution": 32,
}
SO400M = {
    "vision": {
        "hidden_size": 1152,
        "intermediate_size": 4304,
        "num_hidden_layers": 27,
        "num_attention_heads": 16,
        "image_size": 384,
        "patch_size": 14,
    },
    "text": {
        "vocab_size": 32000,
        "hidden_size": 1152,
        "intermediate_size": 4304,
        "num_hidden_layers": 27,
        "num_attention_heads": 16,
        "max_position_embeddings": 64,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
    },
    "embed_dim": 32,
    "n_embed": 16384,
    "depth_pix": 8,
    "depth_sem": 8,
    "z": 1024,
    "ch": 128,
    "ch_mult": (1, 1, 4, 4, 8),
    "num_res_blocks": 2,
    "attn_resolutions": (24,),
    "resolution": 384,
}
TAPS = {"pixel_layer": 2, "shortcut_layer": 1, "shortcut_weight": 0.6, "semantic_layer": 3}


def published_shapes(s: dict) -> dict[str, tuple[int, ...]]:
    """Names and shapes of ``RQVAESiglipModel.state_dict()`` (see the module docstring); the SigLIP part is
    transformers' own ``SiglipModel`` (what the published code builds with ``from_pretrained``), on meta."""
    with torch.device("meta"):
        siglip = SiglipModel(SiglipConfig(text_config=s["text"], vision_config=s["vision"]))
    out = {f"siglip_model.{k}": tuple(v.shape) for k, v in siglip.state_dict().items()}

    def lin(name: str, o: int, i: int, bias: bool = True) -> None:
        out[f"{name}.weight"] = (o, i)
        if bias:
            out[f"{name}.bias"] = (o,)

    def conv(name: str, o: int, i: int, k: int) -> None:
        out[f"{name}.weight"], out[f"{name}.bias"] = (o, i, k, k), (o,)

    def norm(name: str, c: int) -> None:
        out[f"{name}.weight"], out[f"{name}.bias"] = (c,), (c,)

    def attn_projection(name: str, i: int, o: int) -> None:  # AttnProjection(in, out, hidden // embed_dim)
        inner = max(i, o)
        norm(f"{name}.norm1", i)
        out[f"{name}.attn.q_bias"] = out[f"{name}.attn.v_bias"] = out[f"{name}.attn.zero_k_bias"] = (inner,)
        lin(f"{name}.attn.qkv", 3 * inner, i, bias=False)
        lin(f"{name}.attn.proj", o, o)
        lin(f"{name}.proj", o, i)
        norm(f"{name}.norm3", i)
        norm(f"{name}.norm2", o)
        norm(f"{name}.mlp.norm", o)  # GeGluMlp(out, 2 * out)
        lin(f"{name}.mlp.w0", 2 * o, o)
        lin(f"{name}.mlp.w1", 2 * o, o)
        lin(f"{name}.mlp.w2", o, 2 * o)

    def resnet_block(name: str, i: int, o: int) -> None:  # taming ResnetBlock, no time embedding
        norm(f"{name}.norm1", i)
        conv(f"{name}.conv1", o, i, 3)
        norm(f"{name}.norm2", o)
        conv(f"{name}.conv2", o, o, 3)
        if i != o:
            conv(f"{name}.nin_shortcut", o, i, 1)

    def attn_block(name: str, c: int) -> None:
        norm(f"{name}.norm", c)
        for part in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{part}", c, c, 1)

    hidden, e = s["vision"]["hidden_size"], s["embed_dim"]
    for name in ("prequant_sem", "prequant_pix"):
        attn_projection(name, hidden, e)
    for quantizer, depth in (("quantizer_sem", s["depth_sem"]), ("quantizer_pix", s["depth_pix"])):
        for d in range(depth):  # ModuleList([codebook0] * depth): the shared module saved once per depth
            out[f"{quantizer}.codebooks.{d}.weight"] = (s["n_embed"] + 1, e)
            out[f"{quantizer}.codebooks.{d}.cluster_size_ema"] = (s["n_embed"],)
            out[f"{quantizer}.codebooks.{d}.embed_ema"] = (s["n_embed"], e)
    for name in ("postquant_sem", "postquant_pix"):
        attn_projection(name, e, hidden)
    norm("post_quant_conv.norm1", hidden)
    conv("post_quant_conv.conv1", s["z"], hidden, 1)
    norm("post_quant_conv.norm2", s["z"])
    conv("post_quant_conv.conv2", s["z"], s["z"], 3)
    conv("post_quant_conv.nin_shortcut", s["z"], hidden, 1)
    levels, ch = len(s["ch_mult"]), s["ch"]
    block_in, side = ch * s["ch_mult"][-1], s["resolution"] >> (levels - 1)
    conv("decoder.conv_in", block_in, s["z"], 3)
    resnet_block("decoder.mid.block_1", block_in, block_in)
    attn_block("decoder.mid.attn_1", block_in)
    resnet_block("decoder.mid.block_2", block_in, block_in)
    for level in reversed(range(levels)):
        block_out = ch * s["ch_mult"][level]
        for b in range(s["num_res_blocks"] + 1):
            resnet_block(f"decoder.up.{level}.block.{b}", block_in, block_out)
            block_in = block_out
            if side in s["attn_resolutions"]:
                attn_block(f"decoder.up.{level}.attn.{b}", block_in)
        if level:
            conv(f"decoder.up.{level}.upsample.conv", block_in, block_in, 3)
            side *= 2
    norm("decoder.norm_out", block_in)
    conv("decoder.conv_out", 3, block_in, 3)
    attn_projection("prequant_shortcut", hidden, e)
    return out


def published_state(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    shared: dict[str, torch.Tensor] = {}
    for key, shape in published_shapes(TINY).items():
        codebook = re.fullmatch(r"(quantizer_\w+)\.codebooks\.\d+\.(\w+)", key)
        if codebook:  # one tensor for every depth (the same module)
            name = f"{codebook.group(1)}.{codebook.group(2)}"
            if name not in shared:
                tensor = torch.randn(shape, generator=gen)
                if codebook.group(2) == "weight":
                    tensor[-1] = 0  # the padding row
                shared[name] = tensor.abs() + 0.5 if codebook.group(2) == "cluster_size_ema" else tensor
            state[key] = shared[name]
        elif key.endswith("zero_k_bias"):
            state[key] = torch.zeros(shape)
        elif "norm" in key:  # LayerNorms and GroupNorms near identity
            state[key] = (1.0 if key.endswith("weight") else 0.0) + 0.1 * torch.randn(shape, generator=gen)
        else:
            state[key] = torch.randn(shape, generator=gen) * 0.2
    return state


def convert_tiny(tmp_path: Path, state: dict | None = None) -> DualToken:
    src = tmp_path / "dualtoken.ckpt"
    torch.save({"state_dict": state or published_state(), "epoch": 3}, src)
    argv = ["dualtoken", str(src), str(tmp_path / "out"), "--resolution", "32", "--num-heads", "2"]
    argv += ["--pixel-layer", "2", "--shortcut-layer", "1", "--semantic-layer", "3"]
    assert main(argv) == 0
    model = load_visual_tokenizer(tmp_path / "out")
    assert isinstance(model, DualToken)
    return model.eval()


def ref_residual_codes(z: torch.Tensor, weight: torch.Tensor, depth: int) -> torch.Tensor:
    """RQBottleneck.quantize: at each depth the nearest code (L2 over ``weight[:-1]``) of what is left."""
    codebook, residual, codes = weight[:-1], z.clone(), []
    for _ in range(depth):
        code = torch.cdist(residual.reshape(-1, z.shape[-1]), codebook).argmin(-1).reshape(z.shape[:-1])
        residual = residual - codebook[code]
        codes.append(code)
    return torch.stack(codes, dim=-1)


def gn(x: torch.Tensor, state: dict, name: str) -> torch.Tensor:
    """Normalize(): GroupNorm(32, eps 1e-6)."""
    return F.group_norm(x, 32, state[f"{name}.weight"], state[f"{name}.bias"], 1e-6)


def conv(x: torch.Tensor, state: dict, name: str) -> torch.Tensor:
    weight = state[f"{name}.weight"]
    return F.conv2d(x, weight, state[f"{name}.bias"], padding=weight.shape[-1] // 2)


def ref_resnet_block(x: torch.Tensor, state: dict, name: str) -> torch.Tensor:
    h = conv(F.silu(gn(x, state, f"{name}.norm1")), state, f"{name}.conv1")
    h = conv(F.silu(gn(h, state, f"{name}.norm2")), state, f"{name}.conv2")
    shortcut = conv(x, state, f"{name}.nin_shortcut") if f"{name}.nin_shortcut.weight" in state else x
    return shortcut + h


def ref_attn_block(x: torch.Tensor, state: dict, name: str) -> torch.Tensor:
    b, c, height, width = x.shape
    h = gn(x, state, f"{name}.norm")
    q, k, v = (conv(h, state, f"{name}.{part}").reshape(b, c, -1) for part in ("q", "k", "v"))
    weights = (q.transpose(1, 2) @ k * c**-0.5).softmax(dim=2)  # [b, hw (query), hw (key)]
    out = (v @ weights.transpose(1, 2)).reshape(b, c, height, width)
    return x + conv(out, state, f"{name}.proj_out")


def ref_decode(pixel_codes: torch.Tensor, state: dict) -> torch.Tensor:
    """RQVAESiglipModel.decode of the summed code vectors: postquant_pix (causal), bilinear resize to the
    decoder latent, post_quant_conv (with norm2), the taming Decoder."""
    codebook = state["quantizer_pix.codebooks.0.weight"][:-1]
    b, height, width, _ = pixel_codes.shape
    z = codebook[pixel_codes].sum(dim=-2).reshape(b, height * width, -1)
    z = ref_attn_projection(z, state, "postquant_pix", causal=True)
    z = z.reshape(b, height, width, -1).permute(0, 3, 1, 2)
    side = TINY["resolution"] >> (len(TINY["ch_mult"]) - 1)
    x = F.interpolate(z, size=(side, side), mode="bilinear")
    p = "post_quant_conv"
    h = conv(F.silu(gn(x, state, f"{p}.norm1")), state, f"{p}.conv1")
    x = conv(x, state, f"{p}.nin_shortcut") + conv(F.silu(gn(h, state, f"{p}.norm2")), state, f"{p}.conv2")
    h = conv(x, state, "decoder.conv_in")
    h = ref_resnet_block(h, state, "decoder.mid.block_1")
    h = ref_attn_block(h, state, "decoder.mid.attn_1")
    h = ref_resnet_block(h, state, "decoder.mid.block_2")
    for level in reversed(range(len(TINY["ch_mult"]))):
        for b_i in range(TINY["num_res_blocks"] + 1):
            h = ref_resnet_block(h, state, f"decoder.up.{level}.block.{b_i}")
            if f"decoder.up.{level}.attn.{b_i}.q.weight" in state:
                h = ref_attn_block(h, state, f"decoder.up.{level}.attn.{b_i}")
        if level:
            h = conv(
                F.interpolate(h, scale_factor=2.0, mode="nearest"), state, f"decoder.up.{level}.upsample.conv"
            )
    return conv(F.silu(gn(h, state, "decoder.norm_out")), state, "decoder.conv_out")


# ----------------------------------------------------------------------------------------------- tests


def test_published_size_converts_under_our_published_presets() -> None:
    shapes = published_shapes(SO400M)
    assert len(shapes) == 1250  # research/published-layouts.md: 1 250 keys in the published code
    meta = {k: torch.empty(v, device="meta") for k, v in shapes.items()}
    converted = convert_state(meta)
    vq = infer_config(meta)
    assert vq.dualtoken == published_dualtoken_config().dualtoken
    preset = load_config([str(REPO / "configs" / "tokenizer" / "dualtoken-so400m.yaml")]).model.vq
    for config in (vq, published_dualtoken_config(), preset):
        model = build_visual_tokenizer(config, device="meta")
        optional = model.optional_state_keys() - set(
            converted
        )  # the preset's dead-code clocks restart at load
        expected = {k: tuple(v.shape) for k, v in model.state_to_save().items() if k not in optional}
        check_converted(converted, expected, "so400m")


def test_convert_loads_and_every_key_is_consumed(tmp_path: Path) -> None:
    state = published_state()
    model = convert_tiny(tmp_path, state)
    dt = model.config.dualtoken
    assert (dt.mlp_norm, dt.mlp_norm_eps, dt.post_quant_norm2) == ("input", 1e-6, True)
    assert (dt.pixel_depth, dt.semantic_depth, dt.projection_heads, dt.decoder_latent_side) == (3, 2, 4, 4)
    assert model.config.attn_resolutions == [4] and model.config.codebook_size == 16
    ours = model.state_to_save()
    codebook = ours["pixel_quantizer.codebook.embedding.weight"]
    assert torch.equal(codebook, state["quantizer_pix.codebooks.0.weight"][:-1])
    assert torch.equal(
        ours["semantic_quantizer.codebook.ema_embed_sum"], state["quantizer_sem.codebooks.0.embed_ema"]
    )
    text = [k for k in state if k.startswith("siglip_model.text_model.") or "logit_" in k]
    backbone = {k[len("siglip_model.vision_model.") :]: v for k, v in state.items() if ".vision_model." in k}
    assert all(torch.equal(ours[f"backbone.{k}"], v) for k, v in backbone.items())
    assert all(torch.equal(ours[k], v) for k, v in state.items() if k.startswith("decoder."))
    dropped = len(text) + 5 + (3 + 2 - 2) * 3  # text side, zero_k_bias, codebook copies beyond depth 0
    assert len(state) - dropped - 5 * 2 == len(ours)  # w0 + w1 -> fc1 in 5 projections
    with torch.no_grad():
        codes = model.encode(torch.rand(2, 3, 32, 32) * 2 - 1)
        assert codes.shape == (2, 5, 5, 5)
        assert model.decode(codes).shape == (2, 3, 32, 32)


def test_post_quant_block_and_projections_equal_the_published_forward(tmp_path: Path) -> None:
    state = published_state(1)
    model = convert_tiny(tmp_path, state)
    x = torch.randn(2, 32, 4, 4)
    with torch.no_grad():
        p = "post_quant_conv"
        h = F.conv2d(
            F.silu(F.group_norm(x, 32, state[f"{p}.norm1.weight"], state[f"{p}.norm1.bias"], 1e-6)),
            state[f"{p}.conv1.weight"],
            state[f"{p}.conv1.bias"],
        )
        h = F.silu(F.group_norm(h, 32, state[f"{p}.norm2.weight"], state[f"{p}.norm2.bias"], 1e-6))
        h = F.conv2d(h, state[f"{p}.conv2.weight"], state[f"{p}.conv2.bias"], padding=1)
        expected = F.conv2d(x, state[f"{p}.nin_shortcut.weight"], state[f"{p}.nin_shortcut.bias"]) + h
        torch.testing.assert_close(model.post_quant_block(x), expected)
        tokens = torch.randn(2, 6, 32) * 0.01  # small variance: a wrong LayerNorm epsilon shows
        for ours, published in (("pre_pixel", "prequant_pix"), ("pre_semantic", "prequant_sem")):
            torch.testing.assert_close(
                getattr(model, ours)(tokens), ref_attn_projection(tokens, state, published, causal=False)
            )
        z = torch.randn(2, 6, 8) * 0.01
        for ours, published in (("post_pixel", "postquant_pix"), ("post_semantic", "postquant_sem")):
            torch.testing.assert_close(
                getattr(model, ours)(z), ref_attn_projection(z, state, published, causal=True)
            )


def test_codes_equal_the_published_encoder(tmp_path: Path) -> None:
    state = published_state(2)
    model = convert_tiny(tmp_path, state)
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        hidden = model.backbone(pixel_values=pixels, output_hidden_states=True).hidden_states
        pix = ref_attn_projection(hidden[2], state, "prequant_pix", causal=False)
        pix = pix + 0.6 * ref_attn_projection(hidden[1], state, "prequant_shortcut", causal=False)
        sem = ref_attn_projection(hidden[3], state, "prequant_sem", causal=False)
        expected_pix = ref_residual_codes(
            pix.reshape(2, 5, 5, 8), state["quantizer_pix.codebooks.0.weight"], 3
        )
        expected_sem = ref_residual_codes(
            sem.reshape(2, 5, 5, 8), state["quantizer_sem.codebooks.0.weight"], 2
        )
        codes = model.encode(pixels)
    assert torch.equal(codes[..., :3], expected_pix) and torch.equal(codes[..., 3:], expected_sem)


def test_back_conversion_round_trips() -> None:
    state = published_state(3)
    vq = infer_config(state, resolution=32, num_heads=2, **TAPS)
    text_side = {k: v for k, v in state.items() if k.startswith("siglip_model.text_model.") or "logit_" in k}
    back = to_published(convert_state(state), vq, text_side)
    assert set(back) == set(state)
    assert all(torch.equal(back[k], v) for k, v in state.items())


def test_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match="not found"):
        convert_file(tmp_path / "missing.ckpt", tmp_path / "out")
    torch.save({"trainer": {"unitok": {}}}, tmp_path / "unitok.pth")  # another kind's file
    with pytest.raises(ConversionError, match="no 'state_dict' at the top level"):
        convert_file(tmp_path / "unitok.pth", tmp_path / "out")
    stray = {**published_state(), "prequant_pix.extra": torch.zeros(1)}
    with pytest.raises(ConversionError, match=re.escape("no conversion rule knows: prequant_pix.extra")):
        convert_state(stray)
    unshared = published_state()
    unshared["quantizer_sem.codebooks.1.weight"] = unshared["quantizer_sem.codebooks.1.weight"] + 1
    with pytest.raises(ConversionError, match="not shared"):
        convert_state(unshared)
    missing = published_state()
    del missing["post_quant_conv.norm2.weight"]
    torch.save({"state_dict": missing}, tmp_path / "short.ckpt")
    with pytest.raises(ConversionError, match=re.escape("post_quant_block.norm2.weight")):
        convert_file(tmp_path / "short.ckpt", tmp_path / "out", resolution=32, num_heads=2, **TAPS)
    with pytest.raises(ConversionError, match="do not fit 384 px"):
        convert_file(tmp_path / "short.ckpt", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_codes_to_pixels_equal_the_published_decoder(tmp_path: Path) -> None:
    state = published_state(4)
    model = convert_tiny(tmp_path, state)
    gen = torch.Generator().manual_seed(4)
    codes = torch.randint(0, TINY["n_embed"], (2, 5, 5, 5), generator=gen)
    with torch.no_grad():
        expected = ref_decode(codes[..., :3], state)  # the semantic codes are not decoded
        decoded = model.decode(codes)
    assert expected.shape == (2, 3, 32, 32) and expected.std() > 0.1
    # float32 through ~20 convolutions and 2 attention blocks: a few 1e-5 of an output of std ~1
    torch.testing.assert_close(decoded, expected, rtol=1e-4, atol=1e-4)
