"""The VQ-GAN: parity with transformers' Chameleon encoder, Chameleon/taming checkpoints, our format, images."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import TAMING_YAML, write_chameleon_checkpoint
from unified_mllm.config import VQConfig, get_preset
from unified_mllm.model.stats import count_parameters
from unified_mllm.vision.image import preprocess
from unified_mllm.vision.vqgan import VQGAN, VQCheckpointError, read_vq_config

# Two downsamplings with attention at 16 px: exercises nin_shortcut, down/up attention and resampling.
SMALL = VQConfig(
    codebook_size=64,
    embed_dim=16,
    z_channels=32,
    base_channels=32,
    channel_mult=[1, 2, 2],
    num_res_blocks=1,
    attn_resolutions=[16],
    resolution=32,
)


def taming_vqgan_count(vq: VQConfig) -> int:
    """Independent arithmetic for taming's VQModel generator (encoder, quantizer, decoder, 1x1 convs)."""

    def conv(cin: int, cout: int, k: int) -> int:
        return cin * cout * k * k + cout

    def resblock(cin: int, cout: int) -> int:
        return (
            2 * cin
            + conv(cin, cout, 3)
            + 2 * cout
            + conv(cout, cout, 3)
            + (conv(cin, cout, 1) * (cin != cout))
        )

    def attn(c: int) -> int:
        return 2 * c + 4 * conv(c, c, 1)

    widths = [vq.base_channels * m for m in vq.channel_mult]
    levels, top = len(widths), widths[-1]
    mid = 2 * resblock(top, top) + attn(top)
    encoder = conv(3, vq.base_channels, 3) + mid + 2 * top + conv(top, vq.z_channels, 3)
    decoder = conv(vq.z_channels, top, 3) + mid + 2 * widths[0] + conv(widths[0], 3, 3)
    cin = vq.base_channels
    for i, w in enumerate(widths):
        has_attn = (vq.resolution // 2**i) in vq.attn_resolutions
        encoder += resblock(cin, w) + (vq.num_res_blocks - 1) * resblock(w, w)
        encoder += vq.num_res_blocks * attn(w) * has_attn + conv(w, w, 3) * (i < levels - 1)
        up_in = widths[min(i + 1, levels - 1)]
        decoder += resblock(up_in, w) + vq.num_res_blocks * resblock(w, w)
        decoder += (vq.num_res_blocks + 1) * attn(w) * has_attn + conv(w, w, 3) * (i > 0)
        cin = w
    quantizer = conv(vq.z_channels, vq.embed_dim, 1) + vq.codebook_size * vq.embed_dim
    return encoder + decoder + quantizer + conv(vq.embed_dim, vq.z_channels, 1)


def small_model(vq: VQConfig = SMALL, seed: int = 0) -> VQGAN:
    torch.manual_seed(seed)
    model = VQGAN.from_config(vq).eval()
    with torch.no_grad():  # well-separated codes, so that codes do not hinge on rounding
        model.quantize.embedding.weight.normal_(0.0, 0.05)
    return model


def random_pixels(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_encoder_and_codes_match_transformers_chameleon() -> None:
    from transformers import ChameleonVQVAEConfig
    from transformers.models.chameleon.modeling_chameleon import ChameleonVQVAE

    ours = small_model()
    theirs = ChameleonVQVAE(
        ChameleonVQVAEConfig(
            embed_dim=SMALL.embed_dim,
            num_embeddings=SMALL.codebook_size,
            latent_channels=SMALL.z_channels,
            resolution=SMALL.resolution,
            base_channels=SMALL.base_channels,
            channel_multiplier=SMALL.channel_mult,
            num_res_blocks=SMALL.num_res_blocks,
            attn_resolutions=SMALL.attn_resolutions,
            dropout=0.0,
        )
    ).eval()
    their_keys = set(theirs.state_dict())
    # Same names: every transformers key exists in ours; we only add the decoder side.
    assert their_keys <= set(ours.state_dict())
    assert {k.split(".")[0] for k in set(ours.state_dict()) - their_keys} == {"decoder"}
    theirs.load_state_dict({k: v for k, v in ours.state_dict().items() if k in their_keys})
    pixels = random_pixels(2, 3, 32, 32)
    with torch.no_grad():
        out = theirs.encode(pixels)
        latents = ours.encode_latents(pixels)
        assert torch.allclose(ours.encoder(pixels), out.last_hidden_state, atol=1e-5)
        assert torch.allclose(latents, theirs.quant_conv(out.last_hidden_state), atol=1e-5)
        codes = ours.encode(pixels)
        assert codes.shape == (2, 8, 8) and codes.dtype == torch.long
        assert torch.equal(codes.flatten(), out.image_tokens)
        assert len(codes.unique()) > 3  # a real test, not all one code
        quantized = ours.quantize(latents, dim=1)
        assert torch.allclose(quantized.quantized, out.quantized_last_hidden_state, atol=1e-6)
        # taming's legacy loss and ours have the same value (they differ in gradient only).
        assert quantized.loss.item() == pytest.approx(out.embedding_loss.item(), rel=1e-5)
        # Non-square input: the encoder is convolutional.
        wide = random_pixels(2, 3, 32, 64, seed=3)
        assert torch.equal(ours.encode(wide).flatten(), theirs.encode(wide).image_tokens)


def test_published_vqgan_builds_on_meta_with_the_taming_layout() -> None:
    vq = get_preset("chameleon-7b").vq
    model = VQGAN.from_config(vq, device="meta")
    assert all(p.is_meta for p in model.parameters()) and all(b.is_meta for b in model.buffers())
    assert count_parameters(model) == taming_vqgan_count(vq) == 68_718_467
    assert count_parameters(model) == pytest.approx(70e6, rel=0.03)  # taming VQGAN f16: ~70M
    assert model.latent_size == 32 and vq.downsample_factor == 16
    keys = set(model.state_dict())
    expected = {
        "encoder.down.0.block.1.conv2.weight",
        "encoder.down.2.block.0.nin_shortcut.weight",  # 128 → 256 channels
        "encoder.down.3.downsample.conv.weight",
        "encoder.mid.attn_1.proj_out.weight",
        "quant_conv.weight",
        "quantize.embedding.weight",
        "post_quant_conv.weight",
        "decoder.up.4.block.2.conv1.weight",  # num_res_blocks + 1 blocks; up.4 is the lowest resolution
        "decoder.up.3.block.0.nin_shortcut.weight",  # 512 → 256 channels
        "decoder.up.1.upsample.conv.weight",
        "decoder.conv_out.weight",
    }
    assert expected <= keys
    absent = {"encoder.down.4.downsample.conv.weight", "decoder.up.0.upsample.conv.weight"}
    assert not absent & keys
    assert not any(".attn.0." in k for k in keys)  # attn_resolutions: [] (only the mid blocks attend)
    assert model.quantize.embedding.weight.shape == (8192, 256)
    assert tuple(model.get_last_layer().shape) == (3, 128, 3, 3)


def test_tiny_preset_encode_decode_shapes() -> None:
    vq = get_preset("tiny").vq
    model = small_model(vq)
    assert count_parameters(model) == taming_vqgan_count(vq) == 1_077_315
    pixels = random_pixels(2, 3, 64, 128)
    with torch.no_grad():
        codes = model.encode(pixels)
        assert codes.shape == (2, 8, 16) and codes.dtype == torch.long
        assert model.decode(codes).shape == (2, 3, 64, 128)
        assert model.decode(codes.int()).shape == (2, 3, 64, 128)
    reconstruction, out = model.train()(pixels[:, :, :, :64])
    assert reconstruction.shape == (2, 3, 64, 64) and out.indices.shape == (2, 8, 8)
    (reconstruction.square().mean() + out.loss).backward()
    assert model.encoder.conv_in.weight.grad is not None
    assert model.quantize.embedding.weight.grad is not None
    assert model.get_last_layer() is model.decoder.conv_out.weight


def test_bad_inputs_get_clear_errors() -> None:
    model = small_model()
    with pytest.raises(ValueError, match=r"pixels\[None\]"):
        model.encode(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model.encode(torch.zeros(1, 4, 32, 32))
    with pytest.raises(ValueError, match="multiples of the downsampling factor 4"):
        model.encode(torch.zeros(1, 3, 30, 32))
    with pytest.raises(ValueError, match="float tensor"):
        model.encode(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        model.decode(torch.full((1, 8, 8), 64))
    with pytest.raises(ValueError, match="integer"):
        model.decode(torch.zeros(1, 8, 8))
    with pytest.raises(ValueError, match=r"\[B, h, w\]"):
        model.decode(torch.zeros(8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[h, w\]"):
        model.codes_to_images([np.zeros((1, 8, 8), dtype=np.int64)])
    with pytest.raises(ValueError, match="encode"):
        model.images_to_codes([torch.zeros(3, 32, 32)])
    with pytest.raises(ValueError, match="multiples of 32"):
        VQGAN.from_config(dataclasses.replace(SMALL, base_channels=48))
    with pytest.raises(ValueError, match="kind"):
        VQGAN.from_config(dataclasses.replace(SMALL, kind="unitok"))


def test_images_to_codes_converts_any_image(tmp_path: Path) -> None:
    model = small_model()
    rgba = Image.new("RGBA", (40, 40), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (10, 10, 30, 30))
    on_white = Image.new("RGB", (40, 40), (255, 255, 255))
    on_white.paste((0, 0, 255), (10, 10, 30, 30))
    grey = Image.fromarray(np.arange(37 * 91, dtype=np.uint32).reshape(37, 91).astype(np.uint8), mode="L")
    path = tmp_path / "odd.png"
    Image.new("RGB", (91, 37), (10, 200, 30)).save(path)
    model.train()
    codes = model.images_to_codes([rgba, grey, path, on_white], batch_size=2)
    assert model.training  # the caller's mode is restored
    assert len(codes) == 4
    assert all(c.shape == (8, 8) and c.dtype == np.int64 for c in codes)
    assert np.array_equal(codes[0], codes[3])  # transparency is composited on white
    with torch.no_grad():
        expected = [model.encode(preprocess(pair, 32)).numpy() for pair in ([rgba, grey], [path, on_white])]
    assert np.array_equal(np.stack(codes), np.concatenate(expected))


def test_codes_to_images_in_input_order() -> None:
    model = small_model()
    grids = [np.zeros((8, 8), dtype=np.int64), np.ones((4, 6), dtype=np.int32), torch.full((8, 8), 5)]
    images = model.codes_to_images(grids, batch_size=1)
    assert [image.size for image in images] == [(32, 32), (24, 16), (32, 32)]
    assert all(isinstance(image, Image.Image) and image.mode == "RGB" for image in images)
    with torch.no_grad():
        first = model.decode(torch.zeros(1, 8, 8, dtype=torch.long))[0]
    expected = ((first.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.array_equal(np.asarray(images[0]), expected)
    assert model.codes_to_images([]) == []


def test_chameleon_checkpoint_loads_and_reproduces_codes(tmp_path: Path) -> None:
    model = small_model(seed=5)
    path = write_chameleon_checkpoint(tmp_path, model)
    loaded = VQGAN.from_checkpoint(path)  # vqgan.yaml beside vqgan.ckpt
    assert dataclasses.replace(loaded.config, checkpoint=None) == model.config
    assert loaded.config.checkpoint == str(path)
    pixels = random_pixels(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.encode(pixels), model.encode(pixels))
        codes = model.encode(pixels)
        assert torch.equal(loaded.decode(codes), model.decode(codes))
    # An explicit yaml, a base config whose training fields survive, and EMA statistics restarted.
    base = dataclasses.replace(VQConfig(), beta=0.5, ema_decay=0.99, dead_code_steps=7)
    with_ema = VQGAN.from_checkpoint(path, tmp_path / "vqgan.yaml", config=base)
    assert (with_ema.config.beta, with_ema.config.ema_decay, with_ema.config.codebook_size) == (0.5, 0.99, 64)
    assert torch.equal(with_ema.quantize.ema_embed_sum, model.quantize.embedding.weight)
    assert with_ema.quantize.steps_since_used.tolist() == [0] * 64


class WritesAMarker:
    """A crafted pickle: unpickling it calls ``Path.touch`` on a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def test_lightning_metadata_loads_safely_and_crafted_pickles_are_refused(tmp_path: Path) -> None:
    model = small_model()
    # Lightning-style metadata (an argparse.Namespace of hyper-parameters): read without unpickling it.
    path = write_chameleon_checkpoint(tmp_path, model, hyper_parameters=argparse.Namespace(lr=1e-4))
    loaded = VQGAN.from_checkpoint(path)
    assert torch.equal(loaded.quantize.embedding.weight, model.quantize.embedding.weight)
    # A file naming a callable that no data file needs is refused by default, and nothing runs.
    marker = tmp_path / "marker"
    (tmp_path / "crafted").mkdir()
    crafted = write_chameleon_checkpoint(tmp_path / "crafted", model, callbacks=WritesAMarker(marker))
    with pytest.raises(
        VQCheckpointError,
        match=r"names __builtin__\.getattr, which a data file never needs.*model\.vq\.trust_pickle=true",
    ):
        VQGAN.from_checkpoint(crafted)
    assert not marker.exists()
    # The explicit opt-in unpickles in full (and so runs it).
    with pytest.warns(UserWarning, match="unpickling in full"):
        VQGAN.from_checkpoint(crafted, trust_pickle=True)
    assert marker.exists()


def test_wrong_shapes_list_every_key(tmp_path: Path) -> None:
    other = small_model(dataclasses.replace(SMALL, codebook_size=32, z_channels=64))
    state = dict(other.state_dict())
    del state["decoder.conv_out.bias"]
    state["decoder.extra.weight"] = torch.zeros(1)
    path = tmp_path / "weights.pt"
    torch.save(state, path)
    with pytest.raises(VQCheckpointError) as info:
        VQGAN.from_checkpoint(path, config=SMALL)
    message = str(info.value)
    assert "quantize.embedding.weight: checkpoint [32, 16] vs model [64, 16]" in message
    assert "encoder.conv_out.weight: checkpoint [64, 64, 3, 3] vs model [32, 64, 3, 3]" in message
    assert "quant_conv.weight: checkpoint [16, 64, 1, 1] vs model [16, 32, 1, 1]" in message
    assert "missing keys (1):\n    decoder.conv_out.bias" in message
    assert "unexpected keys (1):\n    decoder.extra.weight" in message
    with pytest.raises(VQCheckpointError, match="no config"):
        VQGAN.from_checkpoint(path)
    with pytest.raises(FileNotFoundError):
        VQGAN.from_checkpoint(tmp_path / "missing.ckpt", config=SMALL)


def test_save_pretrained_round_trip(tmp_path: Path) -> None:
    vq = dataclasses.replace(SMALL, ema_decay=0.9, dead_code_steps=3, l2_normalize_codes=True, beta=0.3)
    model = small_model(vq)
    model.train()(random_pixels(2, 3, 32, 32))  # move the statistics off their initial values
    (tmp_path / "keep.txt").write_text("other files are left alone")
    directory = model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "keep.txt", "model.safetensors"]
    for source in (tmp_path, tmp_path / "model.safetensors"):
        loaded = VQGAN.from_checkpoint(source)
        assert dataclasses.replace(loaded.config, checkpoint=None) == vq
        assert loaded.state_dict().keys() == model.state_dict().keys()
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
    assert read_vq_config(directory / "config.json") == vq
    with pytest.raises(ValueError, match="meta"):
        VQGAN.from_config(SMALL, device="meta").save_pretrained(tmp_path / "meta")


def test_read_vq_config_rejects_bad_files(tmp_path: Path) -> None:
    bad_json = tmp_path / "config.json"
    bad_json.write_text('{"format": "unified_mllm.vqgan", "vq": {"codebook_size": "many"}}')
    with pytest.raises(VQCheckpointError, match="codebook_size"):
        read_vq_config(bad_json)
    bad_json.write_text('{"format": "unified_mllm.vqgan", "vq": {"no_such_field": 1}}')
    with pytest.raises(VQCheckpointError, match="no_such_field"):
        read_vq_config(bad_json)
    kl = tmp_path / "kl.yaml"
    kl.write_text(
        TAMING_YAML.format(**dataclasses.asdict(SMALL)).replace("double_z: false", "double_z: true")
    )
    with pytest.raises(VQCheckpointError, match="double_z"):
        read_vq_config(kl)
    chameleon = tmp_path / "vqgan.yaml"
    chameleon.write_text(TAMING_YAML.format(**dataclasses.asdict(VQConfig())))
    assert read_vq_config(chameleon) == VQConfig()
