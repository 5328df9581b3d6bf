"""The preset registry: loading through the config tree, overriding, and the published parameter counts."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from unified_mllm import config as config_module
from unified_mllm.config import (
    ConfigError,
    LMConfig,
    ModelConfig,
    VisionConfig,
    get_preset,
    list_presets,
    load_config,
    register_preset,
)
from unified_mllm.model import stats
from unified_mllm.model.stats import count_parameters, parameter_counts

# Published sizes: Chameleon-7B / -34B (Team Chameleon 2024), SigLIP-so400m vision tower with its pooling
# head (Alabdulmohsin et al. 2023, "Getting ViT in shape": 428M).
PUBLISHED_CHAMELEON_7B = 7.0e9
PUBLISHED_CHAMELEON_34B = 34.0e9
PUBLISHED_SO400M_TOWER = 428e6


def chameleon_lm_count(lm: LMConfig) -> int:
    """Independent arithmetic for a Chameleon LM, untied head (q/k layer norms have weight and bias)."""
    head_dim = lm.hidden_size // lm.num_heads
    q_width, kv_width = lm.num_heads * head_dim, lm.num_kv_heads * head_dim
    attention = 2 * lm.hidden_size * q_width + 2 * lm.hidden_size * kv_width
    qk_norms = 2 * q_width + 2 * kv_width
    mlp = 3 * lm.hidden_size * lm.intermediate_size
    block = attention + qk_norms + mlp + 2 * lm.hidden_size
    embedding_and_head = 2 * lm.vocab_size * lm.hidden_size
    return embedding_and_head + lm.num_layers * block + lm.hidden_size


def siglip_tower_count(vision: VisionConfig, *, with_head: bool) -> int:
    """Independent arithmetic for a SigLIP vision tower (all linear layers and layer norms carry biases)."""
    d, inner, p = vision.hidden_size, vision.intermediate_size, vision.patch_size
    embeddings = 3 * p * p * d + d + (vision.image_size // p) ** 2 * d
    mlp = 2 * d * inner + inner + d
    block = 4 * (d * d + d) + mlp + 2 * 2 * d
    total = embeddings + vision.num_layers * block + 2 * d
    if with_head:  # probe, multi-head attention (in + out projections), layer norm, MLP
        total += d + 4 * (d * d + d) + 2 * d + mlp
    return total


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_loads_and_validates(name: str) -> None:
    config = load_config(overrides=[f"model.preset={name}"])
    assert config.model == get_preset(name)
    assert config.model.preset == name


def test_builtin_presets_are_registered() -> None:
    assert {"tiny", "chameleon-7b", "chameleon-34b"} <= set(list_presets())
    assert list_presets() == sorted(list_presets())


def test_unknown_preset_lists_known_names() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["model.preset=no-such-model"])
    for name in ["no-such-model", *list_presets()]:
        assert name in str(info.value)
    with pytest.raises(ConfigError, match="known presets"):
        get_preset("no-such-model")


def test_yaml_values_override_the_preset(tmp_path: Path) -> None:
    path = tmp_path / "model.yaml"
    path.write_text("model:\n  preset: tiny\n  lm:\n    num_layers: 2\n")
    config = load_config([path])
    tiny = get_preset("tiny")
    assert config.model.lm.num_layers == 2
    assert dataclasses.replace(config.model.lm, num_layers=tiny.lm.num_layers) == tiny.lm
    assert (config.model.vision, config.model.projector, config.model.vq) == (
        tiny.vision,
        tiny.projector,
        tiny.vq,
    )
    # The command line beats both.
    config = load_config([path], ["model.lm.num_layers=3", "model.vision.num_layers=1"])
    assert (config.model.lm.num_layers, config.model.vision.num_layers) == (3, 1)


def test_get_preset_returns_a_fresh_copy() -> None:
    first = get_preset("tiny")
    first.lm.num_layers = 99
    first.vq.channel_mult.append(8)
    second = get_preset("tiny")
    assert second.lm.num_layers == 4
    assert second.vq.channel_mult == [1, 1, 2, 2]


def test_chameleon_7b_is_the_config_default() -> None:
    assert get_preset("chameleon-7b") == dataclasses.replace(ModelConfig(), preset="chameleon-7b")


def test_tiny_shapes_fit_together() -> None:
    tiny = get_preset("tiny")
    config = load_config(overrides=["model.preset=tiny"])
    # One id per sentencepiece piece plus one per VQ code.
    assert tiny.lm.vocab_size == config.tokenizer.vocab_size + tiny.vq.codebook_size == 1024
    assert tiny.vq.downsample_factor == 8
    assert tiny.vq.resolution // tiny.vq.downsample_factor == 8
    assert (tiny.vision.image_size // tiny.vision.patch_size) ** 2 == 64
    assert tiny.lm.residual_dropout == 0.05


def test_register_preset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config_module, "_PRESETS", dict(config_module._PRESETS))
    fixed = ModelConfig(lm=LMConfig(num_layers=3))
    register_preset("fixed", fixed)
    register_preset("made", lambda: ModelConfig(lm=LMConfig(num_layers=5)))
    assert get_preset("fixed").lm.num_layers == 3
    assert get_preset("fixed").preset == "fixed"
    assert fixed.preset is None  # the registered object itself is never handed out
    assert get_preset("made").lm.num_layers == 5
    assert load_config(overrides=["model.preset=made"]).model.lm.num_layers == 5
    with pytest.raises(ValueError, match="already registered"):
        register_preset("tiny", fixed)
    register_preset("tiny", fixed, overwrite=True)
    assert get_preset("tiny").lm.num_layers == 3
    with pytest.raises(ValueError):
        register_preset(" padded", fixed)
    with pytest.raises(TypeError):
        register_preset("bad", 3)  # type: ignore[arg-type]


def test_importing_presets_stays_light() -> None:
    code = "import sys, unified_mllm.config as c; c.get_preset('tiny'); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_published_presets_build_on_meta_without_memory() -> None:
    from unified_mllm.model.backbone import build_lm_backbone, build_lm_head
    from unified_mllm.vision.siglip import build_siglip_tower

    for name in ("chameleon-7b", "chameleon-34b"):
        model = get_preset(name)
        backbone = build_lm_backbone(model.lm, device="meta")
        head = build_lm_head(model.lm, device="meta")
        tower = build_siglip_tower(model.vision, device="meta")
        for module in (backbone, head, tower):
            assert all(p.is_meta for p in module.parameters())
            assert all(b.is_meta for b in module.buffers())


def test_chameleon_7b_counts() -> None:
    model = get_preset("chameleon-7b")
    counts = parameter_counts(model)
    assert counts["lm"] == chameleon_lm_count(model.lm) == 7_013_666_816
    assert counts["lm"] == pytest.approx(PUBLISHED_CHAMELEON_7B, rel=0.02)
    assert counts["projector"] == (1152 * 4096 + 4096) + (4096 * 4096 + 4096)
    # Chameleon's VQ-GAN generator (taming VQModel f16, 8192 x 256 codebook): ~70M; see tests/test_vqgan.py.
    assert counts["vq"] == 68_718_467


def test_chameleon_34b_counts() -> None:
    model = get_preset("chameleon-34b")
    assert model.lm.swin_norm and not get_preset("chameleon-7b").lm.swin_norm
    counts = parameter_counts(model)
    assert counts["lm"] == chameleon_lm_count(model.lm) == 34_294_308_864
    assert counts["lm"] == pytest.approx(PUBLISHED_CHAMELEON_34B, rel=0.03)


def test_siglip_so400m_counts() -> None:
    from unified_mllm.vision.siglip import build_siglip_tower

    vision = get_preset("chameleon-7b").vision
    with_head = count_parameters(build_siglip_tower(vision, device="meta", use_head=True))
    assert with_head == siglip_tower_count(vision, with_head=True) == 428_225_600
    assert with_head == pytest.approx(PUBLISHED_SO400M_TOWER, rel=0.02)
    # The model uses the tower without the attention-pooling head (patch features only).
    assert parameter_counts(get_preset("chameleon-7b"))["siglip"] == siglip_tower_count(
        vision, with_head=False
    )
    assert siglip_tower_count(vision, with_head=False) == 412_987_248


def test_tiny_counts_are_small() -> None:
    model = get_preset("tiny")
    counts = parameter_counts(model)
    assert counts["lm"] == chameleon_lm_count(model.lm) == 3_692_800
    assert counts["lm"] < 10_000_000
    assert counts["siglip"] == siglip_tower_count(model.vision, with_head=False) == 429_696
    assert counts["projector"] == (128 * 256 + 256) + (256 * 256 + 256)
    assert counts["vq"] == 1_077_315


def test_cli_prints_counts(capsys: pytest.CaptureFixture[str]) -> None:
    stats.main(["tiny"])
    out = capsys.readouterr().out
    assert out.startswith("tiny: ")
    assert "3,692,800" in out and "429,696" in out and "1,077,315" in out and "n/a" not in out
    with pytest.raises(SystemExit):
        stats.main(["no-such-model"])
