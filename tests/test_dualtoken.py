"""DualToken on a tiny configuration: code layout, residual quantization, gradients, the frozen teacher, the
semantic distillation loss, files, SigLIP loading, and the published parameter counts on the meta device."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import SiglipConfig, SiglipModel, SiglipTextConfig

from unified_mllm.config import VQConfig
from unified_mllm.vision.dualtoken import (
    DualToken,
    check_dualtoken_config,
    distillation_distance,
    published_dualtoken_config,
    semantic_distillation_loss,
    tiny_dualtoken_config,
)
from unified_mllm.vision.siglip import siglip_hf_config
from unified_mllm.vision.tokenizer_registry import build_visual_tokenizer, load_visual_tokenizer
from unified_mllm.vision.visual_tokenizer import VQCheckpointError

SIDE = 5  # tiny: 32 px / 6 px patches (the last 2 pixel rows and columns are unseen, as at 384 / 14)
PIXEL_DEPTH, SEMANTIC_DEPTH = 3, 2


def tiny(**vq_fields: object) -> DualToken:
    torch.manual_seed(0)
    vq = dataclasses.replace(tiny_dualtoken_config(), **vq_fields)  # type: ignore[arg-type]
    model = DualToken.from_config(vq)
    assert isinstance(model, DualToken)
    return model


def images(count: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.rand(count, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def grads_flow(module: torch.nn.Module) -> bool:
    return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def test_shapes_and_code_layout() -> None:
    model = tiny()
    pixels = images()
    codes = model.encode(pixels)
    assert codes.shape == (2, SIDE, SIDE, PIXEL_DEPTH + SEMANTIC_DEPTH) and codes.dtype == torch.long
    assert model.code_depth == PIXEL_DEPTH + SEMANTIC_DEPTH and model.latent_size == SIDE
    assert model.code_vocab_sizes() == [32] * 5
    model.check_codes(codes)
    assert model.decode(codes).shape == pixels.shape
    out = model.training_forward(pixels)
    assert out.reconstruction.shape == pixels.shape
    assert set(out.quant) == set(model.quantizers()) == {"pixel", "semantic"}
    assert out.quant["pixel"].indices.shape == (2, SIDE, SIDE, PIXEL_DEPTH)
    assert out.quant["semantic"].indices.shape == (2, SIDE, SIDE, SEMANTIC_DEPTH)
    assert set(out.losses) == {"semantic"} and out.losses["semantic"].ndim == 0
    assert model.get_last_layer() is model.decoder.conv_out.weight
    assert model.semantic_embedding(pixels).norm(dim=-1).tolist() == pytest.approx([1.0, 1.0], abs=1e-5)
    assert isinstance(build_visual_tokenizer(tiny_dualtoken_config()), DualToken)
    with pytest.raises(ValueError, match=r"\[B, 3, 32, 32\]"):
        model.encode(images()[:, :, :30, :30])
    with pytest.raises(ValueError, match="batch dimension"):
        model.encode(images()[0])
    with pytest.raises(ValueError, match="5 x 5 grid"):
        model.decode(codes[:, :4, :4])


def test_config_errors_name_the_field() -> None:
    vq = tiny_dualtoken_config()
    vq.dualtoken.decoder_latent_side = 3
    with pytest.raises(ValueError, match="decoder_latent_side"):
        check_dualtoken_config(vq)
    vq = tiny_dualtoken_config()
    vq.dualtoken.semantic_layer = 1
    with pytest.raises(ValueError, match="pixel_layer < semantic_layer"):
        DualToken(vq)
    with pytest.raises(ValueError, match=r"backbone\.image_size"):
        DualToken(dataclasses.replace(tiny_dualtoken_config(), resolution=64))


def test_residual_error_decreases_with_depth() -> None:
    # A few EMA steps with dead codes restarted from the residuals (what the trainer does) fit the codebook.
    model = tiny(dead_code_steps=1)
    pixels, generator = images(4), torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(4):
            out = model.training_forward(pixels)
            model.pixel_quantizer.restart_dead_codes(out.quant["pixel"].latents, generator)
        latent, _ = model.latents(pixels)
        partial = model.pixel_quantizer.partial_sums(model.pixel_quantizer.nearest(latent))  # [B, h, w, D, E]
    errors = [latent.pow(2).mean().item()]
    errors += [(latent - partial[..., d, :]).pow(2).mean().item() for d in range(PIXEL_DEPTH)]
    assert all(later < earlier for earlier, later in itertools.pairwise(errors)), errors


def test_straight_through_gradients_reach_the_backbone() -> None:
    model = tiny()
    pixels = images()
    out = model.training_forward(pixels)
    F.mse_loss(out.reconstruction, pixels).backward()
    for name in ("pre_pixel", "pre_shortcut", "post_pixel", "post_quant_block", "decoder"):
        assert grads_flow(getattr(model, name)), name
    assert grads_flow(model.backbone.embeddings) and grads_flow(model.backbone.encoder.layers[0])
    # Pixel layer 1: nothing deeper, nothing semantic and no codebook (EMA) is reached by reconstruction.
    assert not grads_flow(model.backbone.encoder.layers[1]) and not grads_flow(model.pre_semantic)
    assert model.pixel_quantizer.codebook.embedding.weight.grad is None
    model.zero_grad(set_to_none=True)
    model.training_forward(pixels).losses["semantic"].backward()
    for module in (
        model.pre_semantic,
        model.post_semantic,
        model.backbone.encoder.layers[3],
        model.backbone.head,
    ):
        assert grads_flow(module)
    assert all(p.grad is None for p in model.teacher.parameters())


def test_teacher_is_frozen_unsaved_and_reset() -> None:
    model = tiny()
    teacher_before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    assert all(torch.equal(v, model.backbone.state_dict()[k]) for k, v in teacher_before.items())
    assert not any(p.requires_grad for p in model.teacher.parameters())
    model.train()
    assert model.training and not model.teacher.training
    assert not any(k.startswith("teacher.") for k in model.state_to_save())
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    out = model.training_forward(images())
    (F.mse_loss(out.reconstruction, images()) + out.losses["semantic"] + out.quantizer_loss).backward()
    optimizer.step()
    assert all(torch.equal(v, model.teacher.state_dict()[k]) for k, v in teacher_before.items())
    weight = "encoder.layers.0.mlp.fc1.weight"
    assert not torch.equal(model.backbone.state_dict()[weight], model.teacher.state_dict()[weight])
    model.reset_teacher()
    assert torch.equal(model.backbone.state_dict()[weight], model.teacher.state_dict()[weight])


def test_distillation_by_hand() -> None:
    student = torch.tensor([[[3.0, 4.0], [1.0, 0.0]]])
    teacher = torch.tensor([[[3.0, 4.0], [0.0, 1.0]]])
    # MSE over 4 numbers: (1 + 1) / 4; cosines 1 and 0, mean 0.5.
    assert distillation_distance(student, teacher).item() == pytest.approx(0.5 + 0.5)
    pooled, teacher_pooled = torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 0.0]])
    # MSE 1 / 2, cosine 1.
    loss = semantic_distillation_loss(
        student, teacher, pooled, teacher_pooled, hidden_weight=5.0, pooled_weight=1.0
    )
    assert loss.item() == pytest.approx(5.0 * 1.0 + 1.0 * 0.5)
    assert distillation_distance(student, student).item() == pytest.approx(0.0, abs=1e-6)


def test_semantic_loss_vanishes_when_the_quantized_path_is_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny()
    pixels = images()
    with torch.no_grad():
        reference = model.backbone(pixel_values=pixels).pooler_output
        quantized_embedding = model.semantic_embedding(pixels)
        real_quant = model.semantic_quantizer(model.latents(pixels)[1])
    # The quantized tokens flow into the later layers: the pooled output is not the plain SigLIP one.
    assert (quantized_embedding - F.normalize(reference, dim=-1)).abs().max() > 1e-3
    monkeypatch.setattr(model, "_semantic_path", lambda hidden, train: (hidden, real_quant))
    with torch.no_grad():
        # Without replacement the layer-by-layer pass is transformers' forward, and student == teacher.
        assert torch.allclose(model.semantic_embedding(pixels), F.normalize(reference, dim=-1), atol=1e-5)
        assert model.training_forward(pixels).losses["semantic"].item() == pytest.approx(0.0, abs=1e-5)


def test_decode_uses_only_the_pixel_codes() -> None:
    model = tiny()
    codes = model.encode(images())
    changed = codes.clone()
    changed[..., PIXEL_DEPTH:] = (changed[..., PIXEL_DEPTH:] + 7) % 32
    with torch.no_grad():
        assert torch.equal(model.decode(codes), model.decode(changed))
        changed[..., 0] = (changed[..., 0] + 7) % 32
        assert not torch.equal(model.decode(codes), model.decode(changed))


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    model = tiny()
    model.training_forward(images())  # moves the EMA codebooks and statistics away from their init
    model.save_pretrained(tmp_path / "dt")
    assert not any(k.startswith("teacher.") for k in load_file(str(tmp_path / "dt" / "model.safetensors")))
    loaded = load_visual_tokenizer(tmp_path / "dt")
    assert isinstance(loaded, DualToken)
    assert torch.equal(loaded.encode(images(3, seed=5)), model.encode(images(3, seed=5)))
    weight = "encoder.layers.2.self_attn.q_proj.weight"
    assert torch.equal(loaded.teacher.state_dict()[weight], model.backbone.state_dict()[weight])
    state = model.state_to_save()
    state["pre_pixel.shortcut.weight"] = torch.zeros(3, 3)
    with pytest.raises(VQCheckpointError, match=r"pre_pixel\.shortcut\.weight"):
        loaded.load_generator_state(state)


def test_load_backbone_from_a_transformers_siglip(tmp_path: Path) -> None:
    vq = tiny_dualtoken_config()
    vision = siglip_hf_config(vq.dualtoken.backbone, use_head=True)
    text = SiglipTextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
    )
    torch.manual_seed(3)
    siglip = SiglipModel(SiglipConfig(text_config=text.to_dict(), vision_config=vision.to_dict()))
    siglip.save_pretrained(tmp_path / "siglip")
    model = tiny()
    model.load_backbone(tmp_path / "siglip")
    for key, value in siglip.vision_model.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[key], value), key
        assert torch.equal(model.teacher.state_dict()[key], value), key


def test_published_parameter_counts_on_meta() -> None:
    vq = published_dualtoken_config()
    assert isinstance(vq, VQConfig) and vq.dualtoken.semantic_layer == 26
    model = DualToken.from_config(vq, device="meta")

    def millions(module: torch.nn.Module) -> float:
        return sum(p.numel() for p in module.parameters()) / 1e6

    assert model.latent_size == 27 and model.code_depth == 16
    assert millions(model.backbone) == pytest.approx(428.2, rel=0.01)
    for name in ("pre_pixel", "pre_shortcut", "pre_semantic"):
        assert millions(getattr(model, name)) == pytest.approx(4.03, rel=0.01)
    for name in ("post_pixel", "post_semantic"):
        assert millions(getattr(model, name)) == pytest.approx(9.45, rel=0.01)
    assert millions(model.post_quant_block) == pytest.approx(11.80, rel=0.01)
    assert millions(model.decoder) == pytest.approx(168.45, rel=0.01)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6
    assert trainable == pytest.approx(639.0, rel=0.05)
