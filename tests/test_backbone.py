"""The LM backbone and head from transformers, residual dropout, and the SigLIP tower (tiny shapes, CPU)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import ChameleonConfig, ChameleonModel, LlamaConfig

from unified_mllm.config import ConfigError, LMConfig, VisionConfig, get_preset
from unified_mllm.model.backbone import add_residual_dropout, build_lm_backbone, build_lm_head, lm_hf_config
from unified_mllm.model.stats import count_parameters, format_count
from unified_mllm.vision.siglip import (
    build_siglip_tower,
    features_per_view,
    load_siglip_pretrained,
    num_patches_per_side,
    siglip_hf_config,
)

BATCH, SEQ = 2, 7


@pytest.fixture
def tiny_lm() -> LMConfig:
    return get_preset("tiny").lm


@pytest.fixture
def tiny_vision() -> VisionConfig:
    return get_preset("tiny").vision


def forward_hooks(module: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in module.modules())


@pytest.mark.parametrize("arch", ["chameleon", "llama"])
def test_forward_shapes(tiny_lm: LMConfig, arch: str) -> None:
    lm = dataclasses.replace(tiny_lm, arch=arch)
    torch.manual_seed(0)
    backbone = build_lm_backbone(lm).eval()
    ids = torch.arange(BATCH * SEQ).reshape(BATCH, SEQ) % lm.vocab_size
    with torch.no_grad():
        from_ids = backbone(input_ids=ids).last_hidden_state
        from_embeds = backbone(inputs_embeds=backbone.embed_tokens(ids)).last_hidden_state
        logits = build_lm_head(lm)(from_embeds)
    assert from_ids.shape == (BATCH, SEQ, lm.hidden_size)
    assert logits.shape == (BATCH, SEQ, lm.vocab_size)
    torch.testing.assert_close(from_ids, from_embeds)


def test_chameleon_backbone_has_no_vqmodel_and_has_qk_norm(tiny_lm: LMConfig) -> None:
    backbone = build_lm_backbone(tiny_lm)
    assert isinstance(backbone, ChameleonModel)
    assert not hasattr(backbone, "vqmodel")
    assert not [key for key in backbone.state_dict() if "vqmodel" in key]
    head_dim = tiny_lm.hidden_size // tiny_lm.num_heads
    for layer in backbone.layers:
        assert layer.self_attn.q_norm.weight.shape == (tiny_lm.num_heads, head_dim)
        assert layer.self_attn.k_norm.weight.shape == (tiny_lm.num_kv_heads, head_dim)


def test_llama_backbone_has_no_qk_norm(tiny_lm: LMConfig) -> None:
    backbone = build_lm_backbone(dataclasses.replace(tiny_lm, arch="llama"))
    assert not any(hasattr(layer.self_attn, "q_norm") for layer in backbone.layers)


def test_residual_dropout_train_vs_eval(tiny_lm: LMConfig) -> None:
    torch.manual_seed(0)
    backbone = build_lm_backbone(tiny_lm)
    assert forward_hooks(backbone) == 2 * tiny_lm.num_layers
    x = torch.randn(BATCH, SEQ, tiny_lm.hidden_size)
    with torch.no_grad():
        backbone.train()
        assert not torch.equal(backbone(inputs_embeds=x)[0], backbone(inputs_embeds=x)[0])
        backbone.eval()
        assert torch.equal(backbone(inputs_embeds=x)[0], backbone(inputs_embeds=x)[0])


def test_zero_residual_dropout_adds_no_hooks(tiny_lm: LMConfig) -> None:
    backbone = build_lm_backbone(dataclasses.replace(tiny_lm, residual_dropout=0.0)).train()
    assert forward_hooks(backbone) == 0
    # With no hooks and no attention dropout, training-mode forwards are deterministic.
    x = torch.randn(BATCH, SEQ, tiny_lm.hidden_size)
    with torch.no_grad():
        assert torch.equal(backbone(inputs_embeds=x)[0], backbone(inputs_embeds=x)[0])


def test_residual_dropout_handles_and_swin_norm(tiny_lm: LMConfig) -> None:
    backbone = build_lm_backbone(dataclasses.replace(tiny_lm, residual_dropout=0.0))
    handles = add_residual_dropout(backbone, 0.1)
    assert len(handles) == 2 * tiny_lm.num_layers
    for handle in handles:
        handle.remove()
    assert forward_hooks(backbone) == 0
    with pytest.raises(ValueError):
        add_residual_dropout(backbone, 1.0)
    # Chameleon-34B's Swin-norm blocks normalise each branch before the add: hooks go on the two norms.
    config = lm_hf_config(tiny_lm)
    config.swin_norm = True
    swin = ChameleonModel(config)
    add_residual_dropout(swin, 0.1)
    layer = swin.layers[0]
    assert (
        len(layer.input_layernorm._forward_hooks) == len(layer.post_attention_layernorm._forward_hooks) == 1
    )
    assert not layer.self_attn._forward_hooks


@pytest.mark.parametrize(("arch", "config_cls"), [("chameleon", ChameleonConfig), ("llama", LlamaConfig)])
def test_lm_hf_config_round_trips(tiny_lm: LMConfig, arch: str, config_cls: type) -> None:
    lm = dataclasses.replace(
        tiny_lm, arch=arch, num_kv_heads=2, rope_theta=500000.0, tie_word_embeddings=True
    )
    config = lm_hf_config(lm)
    assert isinstance(config, config_cls)
    reloaded = config_cls.from_dict(config.to_dict())  # what config.json carries
    for hf in (config, reloaded):
        assert hf.num_hidden_layers == lm.num_layers
        assert hf.num_attention_heads == lm.num_heads
        assert hf.num_key_value_heads == lm.num_kv_heads
        assert hf.rope_parameters["rope_theta"] == lm.rope_theta
        assert (hf.vocab_size, hf.hidden_size, hf.intermediate_size) == (1024, 256, 688)
        assert hf.max_position_embeddings == lm.max_position_embeddings
        assert hf.tie_word_embeddings is True
        assert hf.residual_dropout == lm.residual_dropout
    # The RoPE base reaches the built model's frequency table.
    head_dim = lm.hidden_size // lm.num_heads
    inv_freq = build_lm_backbone(lm).rotary_emb.inv_freq
    assert inv_freq[1].item() == pytest.approx(lm.rope_theta ** (-2 / head_dim), rel=1e-6)
    with pytest.raises(ConfigError):
        lm_hf_config(dataclasses.replace(lm, arch="gpt2"))  # type: ignore[arg-type]


def test_meta_backbone_materialises(tiny_lm: LMConfig) -> None:
    backbone = build_lm_backbone(tiny_lm, device="meta")
    assert all(p.is_meta for p in backbone.parameters())
    backbone.to_empty(device="cpu")
    torch.manual_seed(0)
    backbone.init_weights()
    reference = build_lm_backbone(tiny_lm)
    torch.testing.assert_close(backbone.rotary_emb.inv_freq, reference.rotary_emb.inv_freq)
    with torch.no_grad():
        out = backbone.eval()(inputs_embeds=torch.randn(BATCH, SEQ, tiny_lm.hidden_size)).last_hidden_state
    assert torch.isfinite(out).all()
    assert backbone.embed_tokens.weight.std().item() == pytest.approx(tiny_lm.initializer_range, rel=0.05)


def test_tied_head_shares_the_embedding(tiny_lm: LMConfig) -> None:
    tied = dataclasses.replace(tiny_lm, tie_word_embeddings=True)
    backbone = build_lm_backbone(tied)
    head = build_lm_head(tied, embedding=backbone.embed_tokens)
    assert head.weight is backbone.embed_tokens.weight
    assert head.weight.data_ptr() == backbone.embed_tokens.weight.data_ptr()
    both = nn.ModuleDict({"backbone": backbone, "head": head})
    assert count_parameters(both) == count_parameters(backbone)
    untied_head = build_lm_head(tiny_lm, embedding=backbone.embed_tokens)
    assert untied_head.weight.data_ptr() != backbone.embed_tokens.weight.data_ptr()
    with pytest.raises(ValueError, match="cannot tie"):
        build_lm_head(tied, embedding=nn.Embedding(tied.vocab_size + 1, tied.hidden_size))


def test_count_and_format() -> None:
    layer = nn.Linear(10, 4)
    layer.bias.requires_grad_(False)
    assert count_parameters(layer) == 44
    assert count_parameters(layer, trainable_only=True) == 40
    assert [format_count(n) for n in (7_013_666_816, 412_987_248, 3_692_800, 812, 1_500)] == [
        "7.01B",
        "412.99M",
        "3.69M",
        "812",
        "1.50K",
    ]


def test_siglip_tiny_tower_forward(tiny_vision: VisionConfig) -> None:
    tower = build_siglip_tower(tiny_vision).eval()
    assert not hasattr(tower, "head")
    with torch.no_grad():
        out = tower(pixel_values=torch.randn(2, 3, 64, 64))
    assert out.last_hidden_state.shape == (2, features_per_view(tiny_vision), 128) == (2, 64, 128)


def test_features_per_view() -> None:
    so400m = get_preset("chameleon-7b").vision
    assert (num_patches_per_side(so400m), features_per_view(so400m)) == (27, 729)
    assert features_per_view(get_preset("tiny").vision) == 64


def test_siglip_hf_config_fields(tiny_vision: VisionConfig) -> None:
    config = siglip_hf_config(tiny_vision)
    assert (config.image_size, config.patch_size, config.hidden_size) == (64, 8, 128)
    assert (config.intermediate_size, config.num_hidden_layers, config.num_attention_heads) == (512, 2, 4)
    assert config.vision_use_head is False
    assert siglip_hf_config(tiny_vision, use_head=True).vision_use_head is True


def test_siglip_meta_build_then_materialise(tiny_vision: VisionConfig) -> None:
    # A pretrained path is never read by the builder (building does no I/O).
    vision = dataclasses.replace(tiny_vision, pretrained="/nonexistent/siglip")
    tower = build_siglip_tower(vision, device="meta")
    assert all(p.is_meta for p in tower.parameters())
    tower.to_empty(device="cpu")
    tower.init_weights()
    assert torch.equal(tower.embeddings.position_ids, torch.arange(64)[None])
    with torch.no_grad():
        assert torch.isfinite(tower(pixel_values=torch.randn(1, 3, 64, 64)).last_hidden_state).all()


def test_load_siglip_pretrained(tiny_vision: VisionConfig, tmp_path: Path) -> None:
    saved = build_siglip_tower(tiny_vision)
    saved.to(torch.bfloat16).save_pretrained(tmp_path)
    loaded = load_siglip_pretrained(tmp_path, tiny_vision)
    assert loaded.dtype == torch.float32  # fp32 master weights whatever the checkpoint's dtype
    for key, value in saved.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value.float()), key
    with pytest.raises(ConfigError, match=r"model\.vision\.num_layers=3"):
        load_siglip_pretrained(tmp_path, dataclasses.replace(tiny_vision, num_layers=3))
    with pytest.raises(FileNotFoundError):
        load_siglip_pretrained(tmp_path / "missing")


def test_load_siglip_pretrained_refuses_a_tower_with_a_tensor_missing(
    tiny_vision: VisionConfig, tmp_path: Path
) -> None:
    from safetensors.torch import load_file, save_file

    build_siglip_tower(tiny_vision).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["encoder.layers.1.mlp.fc2.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    # transformers would fill the hole with random values and only log it.
    with pytest.raises(
        ConfigError, match=r"lacks 1 tensor\(s\) of the vision tower: encoder\.layers\.1\.mlp\.fc2\.weight"
    ):
        load_siglip_pretrained(tmp_path, tiny_vision)
