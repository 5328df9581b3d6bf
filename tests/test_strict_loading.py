"""Strict loading everywhere: every component that reads weights refuses a missing or an unexpected tensor, and
its error names both keys (one tensor removed and one extra added to an otherwise good checkpoint)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Dinov2Config, Dinov2Model, SiglipConfig, SiglipModel

from tests.helpers import save_random_vq, write_export
from unified_mllm.config import UniTokConfig, VQConfig, get_preset
from unified_mllm.eval.inception import InceptionFeatureExtractor, load_fid_inception
from unified_mllm.model.export import load_safetensors_into, safetensors_files, unique_state_dict
from unified_mllm.model.unified import UnifiedModel
from unified_mllm.train.tokenizer_losses import LPIPS, Dinov2Features, NLayerDiscriminator, load_lpips
from unified_mllm.vision.contrastive import load_contrastive
from unified_mllm.vision.dualtoken import DualToken, tiny_dualtoken_config
from unified_mllm.vision.siglip import build_siglip_tower, load_siglip_pretrained
from unified_mllm.vision.tokenizer_registry import load_visual_tokenizer
from unified_mllm.vision.unitok import UniTok

EXTRA = "bogus.extra.weight"


def corrupt(state: dict[str, torch.Tensor], prefix: str = "") -> tuple[dict[str, torch.Tensor], str, str]:
    """``state`` without one weight and with one tensor no module has; returns (state, removed, added)."""
    removed = next(k for k in sorted(state) if k.endswith("weight") and k.startswith(prefix))
    changed = {k: v.contiguous() for k, v in state.items() if k != removed}
    added = prefix + EXTRA
    changed[added] = torch.zeros(2)
    return changed, removed, added


def corrupt_file(path: Path, prefix: str = "") -> tuple[str, str]:
    state, removed, added = corrupt(load_file(path), prefix)
    save_file(state, path, metadata={"format": "pt"})
    return removed, added


def assert_names_both(load: Callable[[], object], removed: str, added: str, error: type = Exception) -> None:
    with pytest.raises(error) as caught:
        load()
    message = str(caught.value)
    # Loaders may report a key under the module's own names (a prefix stripped); the tail is always there.
    for key in (removed, added):
        tail = key.split(".", 1)[1] if key.startswith(("vision_model.", "model.")) else key
        assert re.search(re.escape(tail), message), f"{key!r} not named in: {message[:2000]}"


# ------------------------------------------------------------------------------------------- the LM export


def test_lm_export(tmp_path: Path, sp_model: Path) -> None:
    export = write_export(tmp_path / "export", sp_model)
    removed, added = corrupt_file(export / "model.safetensors")
    assert_names_both(lambda: UnifiedModel.from_pretrained(export), removed, added)


def test_checkpoint_init_from(tmp_path: Path, sp_model: Path) -> None:
    # checkpoint.init_from goes through load_safetensors_into (train.model_init.load_starting_weights).
    export = write_export(tmp_path / "export", sp_model)
    removed, added = corrupt_file(export / "model.safetensors")
    model = UnifiedModel.from_pretrained(write_export(tmp_path / "good", sp_model))
    files = safetensors_files(export)
    assert_names_both(
        lambda: load_safetensors_into(unique_state_dict(model), files, "init_from"), removed, added
    )


# ---------------------------------------------------------------------------------------- visual tokenizers


@pytest.mark.parametrize("kind", ["vqgan", "unitok", "dualtoken"])
def test_visual_tokenizer(kind: str, tmp_path: Path) -> None:
    if kind == "vqgan":
        directory = save_random_vq(tmp_path / "vq")
    else:
        torch.manual_seed(0)
        model = (
            UniTok.from_config(_unitok_config())
            if kind == "unitok"
            else DualToken.from_config(tiny_dualtoken_config())
        )
        directory = model.save_pretrained(tmp_path / kind)
    directory = Path(directory)
    weights = directory if directory.suffix == ".safetensors" else directory / "model.safetensors"
    removed, added = corrupt_file(weights)
    assert_names_both(lambda: load_visual_tokenizer(directory, config=get_preset("tiny").vq), removed, added)


def _unitok_config() -> VQConfig:
    """The tiny UniTok of tests/test_unitok.py (64 px, 8 x 8 codes, 4 sub-codebooks of 16)."""
    return VQConfig(
        kind="unitok",
        codebook_size=16,
        embed_dim=16,
        l2_normalize_codes=True,
        resolution=64,
        unitok=dataclasses.replace(
            UniTokConfig(),
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
        ),
    )


# ------------------------------------------------------------------------------------------------- SigLIP


def test_siglip_tower(tmp_path: Path) -> None:
    vision = get_preset("tiny").vision
    build_siglip_tower(vision).save_pretrained(tmp_path)
    removed, added = corrupt_file(tmp_path / "model.safetensors")
    assert_names_both(lambda: load_siglip_pretrained(tmp_path, vision), removed, added)


def _tiny_siglip() -> SiglipModel:
    torch.manual_seed(0)
    layers = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    config = SiglipConfig(
        text_config=dict(layers, vocab_size=50), vision_config=dict(layers, image_size=28, patch_size=14)
    )
    return SiglipModel(config)


def test_siglip_tower_from_a_full_siglip_folder_ignores_the_text_tower(tmp_path: Path) -> None:
    # A full SiglipModel folder (text tower, logit scale) is a valid source of the vision tower ...
    _tiny_siglip().save_pretrained(tmp_path)
    load_siglip_pretrained(tmp_path, use_head=True)
    # ... but an extra tensor inside the vision tower is not.
    removed, added = corrupt_file(tmp_path / "model.safetensors", prefix="vision_model.")
    assert_names_both(lambda: load_siglip_pretrained(tmp_path, use_head=True), removed, added)


def test_contrastive_siglip_export(tmp_path: Path) -> None:
    _tiny_siglip().save_pretrained(tmp_path)
    load_contrastive(tmp_path)
    removed, added = corrupt_file(tmp_path / "model.safetensors")
    assert_names_both(lambda: load_contrastive(tmp_path), removed, added, ValueError)


# ----------------------------------------------------------------------------------- losses and metrics


def test_lpips(tmp_path: Path) -> None:
    path = tmp_path / "lpips.safetensors"
    state, removed, added = corrupt(dict(LPIPS().state_dict()))
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    assert_names_both(lambda: load_lpips(path), removed, added)


def test_dinov2_discriminator_features(tmp_path: Path) -> None:
    torch.manual_seed(6)
    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=2, mlp_ratio=2, patch_size=8, image_size=32
    )
    Dinov2Model(config).save_pretrained(tmp_path)
    Dinov2Features.from_pretrained(tmp_path, layers=(0, 2))
    removed, added = corrupt_file(tmp_path / "model.safetensors")
    assert_names_both(
        lambda: Dinov2Features.from_pretrained(tmp_path, layers=(0, 2)), removed, added, ValueError
    )


def test_patchgan_discriminator_resume() -> None:
    # The tokenizer trainer's resume loads each network with torch's strict load_state_dict.
    disc = NLayerDiscriminator(base_channels=8, num_layers=2)
    state, removed, added = corrupt(dict(disc.state_dict()))
    assert_names_both(
        lambda: NLayerDiscriminator(base_channels=8, num_layers=2).load_state_dict(state), removed, added
    )


def test_fid_inception(tmp_path: Path) -> None:
    path = tmp_path / "inception.pth"
    state, removed, added = corrupt(dict(InceptionFeatureExtractor().state_dict()))
    torch.save(state, path)
    assert_names_both(lambda: load_fid_inception(str(path)), removed, added, ValueError)
