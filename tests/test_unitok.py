"""UniTok: shapes, the multi-codebook quantizer, files, the projections' attention, the contrastive side, the
DINOv2-feature discriminator, and the published parameter counts (built on the meta device)."""

from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import Dinov2Config, Dinov2Model

from unified_mllm.config import UniTokConfig, VQConfig
from unified_mllm.train.distributed import all_gather_with_grad
from unified_mllm.train.tokenizer_losses import (
    Dinov2Features,
    FeatureDiscriminator,
    discriminator_loss,
    generator_loss,
)
from unified_mllm.vision.tokenizer_registry import load_visual_tokenizer
from unified_mllm.vision.unitok import UniTok, unitok_large_config
from unified_mllm.vision.visual_tokenizer import VQCheckpointError

PAD = 0  # the tiny config's text_pad_id (OpenCLIP's default)


def tiny_vq(**unitok: object) -> VQConfig:
    """64 px, one conv stage (8x downsampling: 8 x 8 codes), 4 sub-codebooks of 16 codes x 4 channels."""
    fields: dict[str, object] = dict(
        num_codebooks=4,
        conv_widths=[16],
        conv_depths=[2],
        conv_expansion=2,
        width=32,
        encoder_layers=1,
        decoder_layers=1,
        num_heads=2,
        projection_heads=2,
        clip_dim=16,
        text_width=32,
        text_layers=1,
        text_heads=2,
        text_vocab_size=64,
        text_context=8,
    )
    fields.update(unitok)
    return VQConfig(
        kind="unitok",
        codebook_size=16,
        embed_dim=16,
        l2_normalize_codes=True,
        resolution=64,
        unitok=UniTokConfig(**fields),  # type: ignore[arg-type]
    )


def tiny_model(seed: int = 0, **unitok: object) -> UniTok:
    torch.manual_seed(seed)
    model = UniTok.from_config(tiny_vq(**unitok))
    assert isinstance(model, UniTok)
    return model


def pixels(batch: int = 2, height: int = 64, width: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def chunks(x: torch.Tensor, model: UniTok) -> tuple[torch.Tensor, ...]:
    return x.split(model.quantize.chunk_dim, dim=-1)


# ------------------------------------------------------------------------------------------------ shapes


def test_encode_decode_and_training_forward_shapes() -> None:
    model = tiny_model()
    x = pixels()
    codes = model.encode(x)
    assert codes.shape == (2, 8, 8, 4) and codes.dtype == torch.long
    assert int(codes.min()) >= 0 and int(codes.max()) < 16
    assert model.decode(codes).shape == (2, 3, 64, 64)
    out = model.training_forward(x)
    assert out.reconstruction.shape == (2, 3, 64, 64)
    assert out.quant["codes"].indices.shape == (2, 8, 8, 4)
    assert torch.equal(out.quant["codes"].indices, codes)
    assert out.quant["codes"].counts.shape == (4, 16)
    assert out.losses == {}
    assert model.quantizers() == {"codes": model.quantize}
    assert model.get_last_layer().shape == (3, 16, 3, 3)
    # Non-square images keep their aspect: 64 x 32 px -> 8 x 4 codes and back.
    wide = model.encode(pixels(1, 64, 32))
    assert wide.shape == (1, 8, 4, 4) and model.decode(wide).shape == (1, 3, 64, 32)


def test_training_forward_with_text_adds_the_contrastive_loss() -> None:
    model = tiny_model()
    ids = torch.randint(1, 64, (2, 8), generator=torch.Generator().manual_seed(2))
    out = model.training_forward(pixels(), ids)
    assert set(out.losses) == {"contrastive"}
    assert out.losses["contrastive"].ndim == 0 and torch.isfinite(out.losses["contrastive"])
    with pytest.raises(ValueError, match="captions"):
        model.training_forward(pixels(), ids[:1])


def test_bad_inputs_raise_clear_errors() -> None:
    model = tiny_model()
    with pytest.raises(ValueError, match="multiples"):
        model.encode(pixels(1, 60, 64))
    with pytest.raises(ValueError, match=r"\[B, h, w, 4\]"):
        model.decode(torch.zeros(1, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="same"):
        UniTok(tiny_vq(conv_widths=[16, 32], conv_depths=[2]))


def test_straight_through_gradient_reaches_the_encoder() -> None:
    model = tiny_model()
    out = model.training_forward(pixels())
    (out.reconstruction.square().mean() + out.quantizer_loss).backward()
    for param in (
        model.encoder.stem.first.weight,
        model.encoder.blocks[0].attn.qkv.weight,
        model.quant_proj.shortcut.weight,
    ):
        assert param.grad is not None and param.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------- quantizer


def test_codebook_and_commitment_losses_match_a_hand_computation() -> None:
    model = tiny_model()
    z = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(3))
    out = model.quantize(z)
    codebook_terms, commitment_terms = [], []
    for k, (chunk, quantizer) in enumerate(zip(chunks(z, model), model.quantize.codebooks)):
        unit = chunk / chunk.norm(dim=-1, keepdim=True)
        codes = quantizer.embedding.weight / quantizer.embedding.weight.norm(dim=-1, keepdim=True)
        index = (unit @ codes.t()).argmax(dim=-1)
        assert torch.equal(out.indices[..., k], index)
        squared = (unit - codes[index]).square().mean()
        codebook_terms.append(squared)
        commitment_terms.append(squared)
    codebook = torch.stack(codebook_terms).mean()
    commitment = torch.stack(commitment_terms).mean()
    torch.testing.assert_close(out.codebook_loss, codebook)
    torch.testing.assert_close(out.commitment_loss, commitment)
    torch.testing.assert_close(out.loss, codebook + 0.25 * commitment)


def test_code_vectors_are_unit_sub_codes() -> None:
    model = tiny_model()
    out = model.training_forward(pixels(1))
    for chunk in chunks(out.quant["codes"].quantized, model):
        torch.testing.assert_close(chunk.norm(dim=-1), torch.ones(chunk.shape[:-1]))
    looked_up = model.quantize.lookup(model.encode(pixels(1)))
    for chunk in chunks(looked_up, model):
        torch.testing.assert_close(chunk.norm(dim=-1), torch.ones(chunk.shape[:-1]))


def test_encode_is_the_argmax_cosine_of_each_chunk() -> None:
    model = tiny_model()
    x = pixels()
    latents, (height, width) = model.encode_latents(x)
    codes = model.encode(x)
    for k, chunk in enumerate(chunks(latents, model)):
        weight = model.quantize.codebooks[k].embedding.weight
        cosine = F.normalize(chunk, dim=-1) @ F.normalize(weight, dim=-1).t()
        assert torch.equal(codes[..., k], cosine.argmax(dim=-1).reshape(2, height, width))


# ------------------------------------------------------------------------------------------------ files


def test_save_and_load_give_identical_codes_and_pixels(tmp_path: Path) -> None:
    model = tiny_model().eval()
    model.save_pretrained(tmp_path / "unitok")
    loaded = load_visual_tokenizer(tmp_path / "unitok")
    assert isinstance(loaded, UniTok)
    assert dataclasses.asdict(loaded.config.unitok) == dataclasses.asdict(model.config.unitok)
    x = pixels()
    codes = model.encode(x)
    assert torch.equal(loaded.encode(x), codes)
    with torch.no_grad():
        torch.testing.assert_close(loaded.decode(codes), model.decode(codes), rtol=0, atol=0)


def test_a_checkpoint_of_the_wrong_shape_names_the_key(tmp_path: Path) -> None:
    tiny_model().save_pretrained(tmp_path / "saved")
    (tmp_path / "bare").mkdir()
    weights = shutil.copy(tmp_path / "saved" / "model.safetensors", tmp_path / "bare" / "model.safetensors")
    wrong = dataclasses.replace(tiny_vq(), codebook_size=32)
    with pytest.raises(VQCheckpointError, match=r"quantize\.codebooks\.0\.embedding\.weight"):
        UniTok.from_checkpoint(weights, config=wrong)


# -------------------------------------------------------------------------------------- the projections


@pytest.mark.parametrize("causal", [True, False])
def test_causal_projection_hides_later_tokens(causal: bool) -> None:
    model = tiny_model(causal_projection=causal)
    generator = torch.Generator().manual_seed(4)
    for projection, dim in ((model.quant_proj, 32), (model.post_quant_proj, 16)):
        x = torch.randn(1, 6, dim, generator=generator)
        changed = x.clone()
        changed[:, 4:] = torch.randn(1, 2, dim, generator=generator)
        with torch.no_grad():
            early, early_changed = projection(x)[:, :4], projection(changed)[:, :4]
        assert torch.allclose(early, early_changed, atol=1e-6) is causal


# ------------------------------------------------------------------------------------ contrastive side


def test_contrastive_loss_is_symmetric_infonce() -> None:
    model = tiny_model()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(5.0))
    generator = torch.Generator().manual_seed(5)
    images = F.normalize(torch.randn(3, 4, generator=generator), dim=-1)
    texts = F.normalize(torch.randn(3, 4, generator=generator), dim=-1)
    sims = [[5.0 * float(images[i] @ texts[j]) for j in range(3)] for i in range(3)]
    image_to_text = [-sims[i][i] + math.log(sum(math.exp(s) for s in sims[i])) for i in range(3)]
    text_to_image = [-sims[j][j] + math.log(sum(math.exp(sims[i][j]) for i in range(3))) for j in range(3)]
    expected = (sum(image_to_text) / 3 + sum(text_to_image) / 3) / 2
    assert model.contrastive_loss(images, texts).item() == pytest.approx(expected, rel=1e-5)


def _contrastive_on_rank(rank: int, world: int, init: str, images: torch.Tensor, texts: torch.Tensor) -> None:
    """One gloo rank: the loss of its share of the pairs and the gradient of DDP's average (loss / world) with
    respect to its own embeddings, saved beside the rendezvous file."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        model = tiny_model().train()
        model.gather_rows = all_gather_with_grad  # what the tokenizer trainer sets under torchrun
        share = images.shape[0] // world
        mine = slice(rank * share, (rank + 1) * share)
        image_rows = images[mine].clone().requires_grad_()
        text_rows = texts[mine].clone().requires_grad_()
        loss = model.contrastive_loss(image_rows, text_rows)
        (loss / world).backward()
        torch.save((loss.detach(), image_rows.grad, text_rows.grad), f"{init}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_contrastive_loss_over_ranks_is_the_global_batch_loss(tmp_path: Path) -> None:
    """Two gloo ranks with 3 pairs each: the mean of their losses is the 6-pair loss, and each rank's gradient
    on its own embeddings is the 6-pair loss's gradient on them (the negatives come from both ranks)."""
    generator = torch.Generator().manual_seed(7)
    images = F.normalize(torch.randn(6, 16, generator=generator), dim=-1)
    texts = F.normalize(torch.randn(6, 16, generator=generator), dim=-1)
    init = str(tmp_path / "rendezvous")
    torch.multiprocessing.spawn(_contrastive_on_rank, args=(2, init, images, texts), nprocs=2)
    ranks = [torch.load(f"{init}.{rank}") for rank in range(2)]
    image_rows, text_rows = images.clone().requires_grad_(), texts.clone().requires_grad_()
    model = tiny_model().train()
    full = model.contrastive_loss(image_rows, text_rows)
    full.backward()
    assert (ranks[0][0] + ranks[1][0]).item() / 2 == pytest.approx(full.item(), rel=1e-5)
    assert ranks[0][0].item() != pytest.approx(ranks[1][0].item(), rel=1e-3)
    torch.testing.assert_close(torch.cat([ranks[0][1], ranks[1][1]]), image_rows.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(torch.cat([ranks[0][2], ranks[1][2]]), text_rows.grad, atol=1e-6, rtol=1e-5)


def test_logit_scale_starts_at_one_over_007_and_is_clamped_at_100() -> None:
    model = tiny_model()
    assert model.logit_scale_value().item() == pytest.approx(1 / 0.07, rel=1e-4)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert model.logit_scale_value().item() == pytest.approx(100.0)
    model.logit_scale_value().backward()
    assert model.logit_scale.grad is not None and model.logit_scale.grad.item() == 0.0
    model.clamp_logit_scale_()
    assert model.logit_scale.item() == pytest.approx(math.log(100.0))
    with torch.no_grad():
        model.logit_scale.fill_(-3.0)
    assert model.logit_scale_value().item() == pytest.approx(1.0)


def test_text_embedding_pools_the_last_non_padding_id() -> None:
    model = tiny_model().eval()
    padded = torch.tensor([[5, 6, 7, PAD, PAD, PAD], [9, 10, 11, 12, 13, 14]])
    with torch.no_grad():
        embedded = model.text_embedding(padded)
        alone = model.text_embedding(padded[:1, :3])
    torch.testing.assert_close(embedded.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(embedded[:1], alone, atol=1e-5, rtol=1e-5)
    assert model.text_embedding(torch.randint(1, 64, (1, 20))).shape == (1, 16)  # cut to text_context


def test_image_embedding_takes_the_discrete_path() -> None:
    model = tiny_model().eval()
    x = pixels()
    with torch.no_grad():
        embedded = model.image_embedding(x)
        straight_through = model.quantize(model.encode_latents(x)[0]).quantized
        expected = F.normalize(model.clip_head(model.post_quantize(straight_through)), dim=-1)
    assert embedded.shape == (2, 16)
    torch.testing.assert_close(embedded, expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------- discriminator


def tiny_dinov2() -> Dinov2Model:
    torch.manual_seed(6)
    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=2, mlp_ratio=2, patch_size=8, image_size=32
    )
    return Dinov2Model(config)


def test_feature_discriminator_shape_frozen_features_and_hinge_loss() -> None:
    features = Dinov2Features(tiny_dinov2(), layers=(0, 2))
    disc = FeatureDiscriminator(features)
    disc.train()
    assert not features.training
    assert {id(p) for p in disc.parameters()} == {id(p) for p in disc.heads.parameters()}
    assert not any(key.startswith("model.") for key in disc.state_dict())
    real, fake = pixels(2, 30, 30), pixels(2, 30, 30, seed=7).requires_grad_(True)
    logits_real, logits_fake = disc(real), disc(fake)
    assert logits_real.shape == (2, 2 * (1 + 4 * 4))  # 30 px -> 32 px: CLS + 4 x 4 patches per layer
    discriminator_loss(logits_real, logits_fake, "hinge").backward(retain_graph=True)
    assert all(p.grad is None for p in features.parameters())
    assert all(p.grad is not None for p in disc.heads.parameters())
    generator_loss(logits_fake, "hinge").backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0  # through the frozen features to the pixels
    assert disc.to(torch.float64).feature_net.model.embeddings.cls_token.dtype == torch.float64


def test_feature_discriminator_takes_any_feature_network() -> None:
    def pixels_as_tokens(images: torch.Tensor) -> list[torch.Tensor]:
        return [images.flatten(2).transpose(1, 2), images[:, :, ::2, ::2].flatten(2).transpose(1, 2)]

    disc = FeatureDiscriminator(pixels_as_tokens, channels=[3, 3], kernel_size=3)
    assert disc(pixels(2, 8, 8)).shape == (2, 64 + 16)
    with pytest.raises(ValueError, match="channels"):
        FeatureDiscriminator(pixels_as_tokens)


def test_dinov2_features_load_from_a_directory(tmp_path: Path) -> None:
    backbone = tiny_dinov2()
    backbone.save_pretrained(tmp_path / "dino")
    loaded = Dinov2Features.from_pretrained(tmp_path / "dino", layers=(1,))
    x = pixels(1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)[0], Dinov2Features(backbone, layers=(1,))(x)[0])
    with pytest.raises(FileNotFoundError):
        Dinov2Features.from_pretrained(tmp_path / "missing")


# ------------------------------------------------------------------------------------ published sizes


def test_published_unitok_large_parameter_counts_on_meta() -> None:
    model = UniTok.from_config(unitok_large_config(), device="meta")
    assert model.latent_size == 16 and model.code_depth == 8

    def millions(module: torch.nn.Module) -> float:
        return sum(p.numel() for p in module.parameters()) / 1e6

    report = {  # research report, section 1.8 (released UniTok-Large)
        "encoder": 332.33,
        "decoder": 352.40,
        "quant_proj": 3.25,
        "post_quant_proj": 7.62,
        "quantize": 0.26,
        "text": 123.65,
        "clip_head": 0.79,
    }
    for name, expected in report.items():
        assert millions(getattr(model, name)) == pytest.approx(expected, rel=0.05), name
    assert millions(model) == pytest.approx(820.30, rel=0.03)
