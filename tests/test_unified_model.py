"""UnifiedModel: feature scatter, packing, dtypes, the HF-format export and loading published LM checkpoints."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import ChameleonForConditionalGeneration, LlamaForCausalLM

import unified_mllm.model.export as export
from unified_mllm.config import ConfigError, ModelConfig, get_preset
from unified_mllm.data.conversation import IGNORE_INDEX
from unified_mllm.layout import SpecialTokens
from unified_mllm.model.backbone import lm_hf_config
from unified_mllm.model.export import CheckpointMismatchError
from unified_mllm.model.unified import UnifiedModel
from unified_mllm.text import TextTokenizer
from unified_mllm.train.losses import causal_lm_loss
from unified_mllm.vision.siglip import build_siglip_tower

P = 64  # feature slots per view of the tiny preset: (64 px // 8 px)^2


def tiny_config(**lm_changes: object) -> ModelConfig:
    """The tiny preset with two LM layers (speed); ``lm_changes`` edit the LM section."""
    config = get_preset("tiny")
    config.lm = dataclasses.replace(config.lm, num_layers=2, **lm_changes)
    return config


def build(seed: int = 0, **lm_changes: object) -> UnifiedModel:
    torch.manual_seed(seed)
    return UnifiedModel(tiny_config(**lm_changes))


def random_ids(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 1024, shape, generator=torch.Generator().manual_seed(seed))


def random_pixels(views: int, seed: int = 2) -> torch.Tensor:
    return torch.rand(views, 3, 64, 64, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# --------------------------------------------------------------------------------------------- structure


def test_module_paths_are_the_ones_the_trainer_freezes_by() -> None:
    model = build()
    prefixes = {name.split(".")[0] for name, _ in model.named_parameters()}
    assert prefixes == {"lm", "lm_head", "vision"}
    vision = {
        ".".join(name.split(".")[:2]) for name, _ in model.named_parameters() if name.startswith("vision")
    }
    assert vision == {"vision.tower", "vision.projector"}
    assert model.features_per_view == P
    assert not hasattr(model.lm, "vqmodel")


# ------------------------------------------------------------------------------------ feature scatter


def test_embed_writes_features_row_major_and_keeps_other_embeddings(sp_tokenizer: TextTokenizer) -> None:
    model = build().eval()
    ids = random_ids(2, 150)
    mask = torch.zeros(2, 150, dtype=torch.bool)
    mask[0, 3 : 3 + 2 * P] = True  # row 0: one image of two views (base + one tile)
    mask[1, 10 : 10 + P] = True  # row 1: one image, one view
    ids[mask] = SpecialTokens.from_tokenizer(sp_tokenizer).feature  # the placeholder, as the layout writes
    pixels = random_pixels(3)
    with torch.no_grad():
        embeds = model.embed(ids, pixels, mask)
        features = model.vision(pixels)  # [3, P, H]
        tokens = model.lm.embed_tokens(ids)
    assert embeds.shape == (2, 150, 256)
    assert torch.equal(embeds[0, 3 : 3 + P], features[0])
    assert torch.equal(embeds[0, 3 + P : 3 + 2 * P], features[1])
    assert torch.equal(embeds[1, 10 : 10 + P], features[2])
    assert torch.equal(embeds[~mask], tokens[~mask])


def test_gradients_reach_siglip_projector_embeddings_and_head() -> None:
    model = build()
    ids = random_ids(1, 80)
    mask = torch.zeros(1, 80, dtype=torch.bool)
    mask[0, 4 : 4 + P] = True
    labels = ids.masked_fill(mask, IGNORE_INDEX)
    logits = model(ids, pixel_values=random_pixels(1), feature_mask=mask).logits
    causal_lm_loss(logits, labels, 1e-5).loss.backward()
    parts = {
        "vision.tower": model.vision.tower.embeddings.patch_embedding.weight,
        "vision.projector": model.vision.projector[0].weight,
        "lm.embed_tokens": model.lm.embed_tokens.weight,
        "lm_head": model.lm_head.weight,
        "lm.layers": model.lm.layers[0].mlp.down_proj.weight,
    }
    for name, param in parts.items():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_slot_and_feature_count_mismatch_is_a_clear_error() -> None:
    model = build()
    ids = random_ids(1, 140)
    mask = torch.zeros(1, 140, dtype=torch.bool)
    mask[0, :130] = True
    with pytest.raises(
        ValueError, match=r"batch has 130 feature slots but pixel_values give 128 features \(2 views x 64\)"
    ):
        model(ids, pixel_values=random_pixels(2), feature_mask=mask)


def test_pixels_and_mask_must_come_together() -> None:
    model = build().eval()
    ids = random_ids(1, 70)
    mask = torch.zeros(1, 70, dtype=torch.bool)
    with pytest.raises(ValueError, match="without a feature_mask"):
        model(ids, pixel_values=random_pixels(1))
    mask[0, :P] = True
    with pytest.raises(ValueError, match="feature_mask marks 64 feature slots but no pixel_values"):
        model(ids, feature_mask=mask)
    with pytest.raises(ValueError, match="bool tensor shaped like input_ids"):
        model(ids, pixel_values=random_pixels(1), feature_mask=mask.long())
    # An all-False mask without pixels is an ordinary text batch.
    with torch.no_grad():
        plain = model(ids).logits
        masked = model(ids, feature_mask=torch.zeros_like(mask)).logits
    assert torch.equal(plain, masked)


def test_image_code_logits_are_not_masked(sp_tokenizer: TextTokenizer) -> None:
    model = build().eval()
    codes = torch.tensor(SpecialTokens.from_tokenizer(sp_tokenizer).code_ids)
    ids = random_ids(2, 12)
    with torch.no_grad():
        logits = model(ids).logits
        expected = model.lm_head(model.lm(input_ids=ids).last_hidden_state)
    assert logits.shape == (2, 12, 1024)
    assert torch.isfinite(logits[..., codes]).all()
    assert logits[..., codes].min() > -100  # nothing forced to the dtype minimum
    assert torch.equal(logits, expected)  # the head's raw output over the full vocabulary


# -------------------------------------------------------------------------------------------- packing


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_row_equals_separate_samples(attn: str) -> None:
    model = build(attn_implementation=attn).eval()
    a_ids = random_ids(9, seed=3)
    b_ids = random_ids(4 + P + 5, seed=4)
    b_mask = torch.zeros(len(b_ids), dtype=torch.bool)
    b_mask[4 : 4 + P] = True
    pixels = random_pixels(1)

    def labels_of(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        labels = ids.masked_fill(mask, IGNORE_INDEX)
        labels[0] = IGNORE_INDEX  # a sample's first token is never predicted
        return labels

    a_labels = labels_of(a_ids, torch.zeros(9, dtype=torch.bool))
    b_labels = labels_of(b_ids, b_mask)
    packed_ids = torch.cat([a_ids, b_ids])[None]
    packed_mask = torch.cat([torch.zeros(9, dtype=torch.bool), b_mask])[None]
    positions = torch.cat([torch.arange(9), torch.arange(len(b_ids))])[None]
    packed_labels = torch.cat([a_labels, b_labels])[None]

    pad = len(b_ids) - 9  # right-pad sample A to B's length
    sep_ids = torch.stack([torch.cat([a_ids, torch.zeros(pad, dtype=torch.long)]), b_ids])
    sep_mask = torch.stack([torch.zeros(len(b_ids), dtype=torch.bool), b_mask])
    sep_attention = torch.ones_like(sep_ids)
    sep_attention[0, 9:] = 0
    sep_labels = torch.stack([torch.cat([a_labels, torch.full((pad,), IGNORE_INDEX)]), b_labels])

    with torch.no_grad():
        packed = model(packed_ids, position_ids=positions, pixel_values=pixels, feature_mask=packed_mask)
        sep = model(sep_ids, attention_mask=sep_attention, pixel_values=pixels, feature_mask=sep_mask)
        unpacked = model(packed_ids, pixel_values=pixels, feature_mask=packed_mask)  # one causal sequence
    torch.testing.assert_close(packed.logits[0, :9], sep.logits[0, :9], atol=1e-5, rtol=0)
    torch.testing.assert_close(packed.logits[0, 9:], sep.logits[1], atol=1e-5, rtol=0)
    packed_loss = causal_lm_loss(packed.logits, packed_labels, 1e-4).loss
    sep_loss = causal_lm_loss(sep.logits, sep_labels, 1e-4).loss
    assert abs(packed_loss.item() - sep_loss.item()) < 1e-5
    # Control: B attending to A (no block-diagonal mask) changes B's logits, so the test can fail.
    assert (unpacked.logits[0, 9:] - sep.logits[1]).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------- dtypes


def test_bf16_autocast_and_bf16_weights_on_cpu() -> None:
    model = build().eval()
    ids = random_ids(2, 70)
    mask = torch.zeros(2, 70, dtype=torch.bool)
    mask[1, 2 : 2 + P] = True
    pixels = random_pixels(1)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        auto = model(ids, pixel_values=pixels, feature_mask=mask).logits
    assert auto.dtype == torch.bfloat16 and torch.isfinite(auto).all()
    model.to(torch.bfloat16)
    with torch.no_grad():
        half = model(ids, pixel_values=pixels, feature_mask=mask).logits
    assert half.dtype == torch.bfloat16 and torch.isfinite(half).all()
    assert (half.float() - auto.float()).abs().max() < 0.25


def test_llama_arch_builds_and_runs() -> None:
    model = build(arch="llama")
    assert type(model.lm).__name__ == "LlamaModel"
    ids = random_ids(1, 70)
    mask = torch.zeros(1, 70, dtype=torch.bool)
    mask[0, 1 : 1 + P] = True
    logits = model(ids, pixel_values=random_pixels(1), feature_mask=mask).logits
    assert logits.shape == (1, 70, 1024)
    causal_lm_loss(logits, ids.masked_fill(mask, IGNORE_INDEX), 0.0).loss.backward()
    assert model.vision.projector[0].weight.grad.abs().sum() > 0


def test_kv_cache_continuation_matches_full_forward() -> None:
    model = build().eval()
    ids = random_ids(1, 10)
    # The cache goes to transformers under the name it takes (no deprecation warning from the decoder).
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        full = model(ids).logits
        first = model(ids[:, :6], use_cache=True)
        rest = model(ids[:, 6:], past_key_values=first.past_key_values, use_cache=True)
        assert first.past_key_values.get_seq_length() == 10  # the cache grows in place
        # cache_position supplies the positions of the new tokens when position_ids are not given.
        cache = model(ids[:, :6], use_cache=True).past_key_values
        shifted = model(ids[:, 6:], past_key_values=cache, cache_position=torch.arange(2, 6)).logits
    torch.testing.assert_close(rest.logits, full[:, 6:], atol=1e-5, rtol=0)
    assert (shifted - full[:, 6:]).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------- export


def logits_of(model: UnifiedModel) -> torch.Tensor:
    ids = random_ids(2, 70)
    mask = torch.zeros(2, 70, dtype=torch.bool)
    mask[0, 3 : 3 + P] = True
    with torch.no_grad():
        return model(ids, pixel_values=random_pixels(1), feature_mask=mask).logits


def test_export_roundtrip_gives_identical_logits(tmp_path: Path) -> None:
    model = build().eval()
    path = model.save_pretrained(tmp_path / "export")
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    meta = json.loads((path / "config.json").read_text())
    assert meta["architectures"] == ["UnifiedModel"] and meta["model_type"] == "unified_mllm"
    assert meta["torch_dtype"] == "float32"
    assert meta["unified_mllm"] == dataclasses.asdict(model.config)
    assert meta["lm"]["model_type"] == "chameleon" and meta["lm"]["num_hidden_layers"] == 2
    loaded = UnifiedModel.from_pretrained(path)
    assert not loaded.training
    assert loaded.config == model.config
    assert torch.equal(logits_of(loaded), logits_of(model))
    assert torch.equal(loaded.lm.rotary_emb.inv_freq, model.lm.rotary_emb.inv_freq)
    position_ids = loaded.vision.tower.embeddings.position_ids
    assert torch.equal(position_ids, torch.arange(P)[None])


def test_export_of_tied_head_stores_it_once(tmp_path: Path) -> None:
    model = build(tie_word_embeddings=True).eval()
    path = model.save_pretrained(tmp_path / "tied")
    keys = load_file(path / "model.safetensors").keys()
    assert "lm.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    loaded = UnifiedModel.from_pretrained(path)
    assert loaded.lm_head.weight is loaded.lm.embed_tokens.weight
    assert torch.equal(logits_of(loaded), logits_of(model))


def test_export_bf16_keeps_rope_in_fp32(tmp_path: Path) -> None:
    model = build().eval()
    path = model.save_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    assert json.loads((path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded = UnifiedModel.from_pretrained(path)
    assert loaded.lm.embed_tokens.weight.dtype == torch.bfloat16
    assert loaded.lm.rotary_emb.inv_freq.dtype == torch.float32
    assert torch.equal(loaded.lm.rotary_emb.inv_freq, model.lm.rotary_emb.inv_freq)
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight.to(torch.bfloat16))
    assert UnifiedModel.from_pretrained(path, dtype=torch.float32).lm_head.weight.dtype == torch.float32


def test_resave_keeps_other_files_and_a_failed_save_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = build(seed=0).eval(), build(seed=1).eval()
    path = first.save_pretrained(tmp_path / "export")
    (path / "tokenizer.model").write_text("tokenizer")
    (path / "extra").mkdir()
    (path / "extra" / "resolved.yaml").write_text("a: 1")
    second.save_pretrained(path)
    assert (path / "tokenizer.model").read_text() == "tokenizer"
    assert (path / "extra" / "resolved.yaml").read_text() == "a: 1"
    assert torch.equal(logits_of(UnifiedModel.from_pretrained(path)), logits_of(second))

    def killed(tensors: dict, filename: str, metadata: dict) -> None:
        Path(filename).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "save_file", killed)
    with pytest.raises(KeyboardInterrupt):
        first.save_pretrained(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temporary leftovers
    assert torch.equal(logits_of(UnifiedModel.from_pretrained(path)), logits_of(second))
    assert (path / "tokenizer.model").read_text() == "tokenizer"


def test_from_pretrained_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"config\.json not found"):
        UnifiedModel.from_pretrained(tmp_path)
    path = build().save_pretrained(tmp_path / "export")
    meta = json.loads((path / "config.json").read_text())
    meta["unified_mllm"]["lm"]["bogus_width"] = 3
    (path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="bogus_width"):
        UnifiedModel.from_pretrained(path)
    del meta["unified_mllm"]["lm"]["bogus_width"]
    meta["unified_mllm"]["lm"]["intermediate_size"] = 64  # the weights no longer fit the config
    (path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointMismatchError, match=r"lm\.layers\.0\.mlp\.down_proj\.weight"):
        UnifiedModel.from_pretrained(path)
    (path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no model\.safetensors"):
        UnifiedModel.from_pretrained(path)


# ---------------------------------------------------------------------------- published LM checkpoints


def hf_lm(config: ModelConfig, seed: int = 5) -> torch.nn.Module:
    """A transformers causal LM of ``config.lm``'s shapes with random weights, as published checkpoints are."""
    torch.manual_seed(seed)
    hf_config = lm_hf_config(config.lm)
    if config.lm.arch == "chameleon":
        # Name four ids as image tokens: transformers' Chameleon forces their logits to the dtype minimum.
        hf_config.vocabulary_map = {f"IMGIMG{chr(ord('A') + i)}Z": 1000 + i for i in range(4)}
        model = ChameleonForConditionalGeneration(hf_config)
    else:
        model = LlamaForCausalLM(hf_config)
    for param in model.parameters():  # norms start at ones / zeros; randomise them so parity means something
        torch.nn.init.normal_(param, std=0.2)
    return model.eval()


@pytest.mark.parametrize(("arch", "shard"), [("chameleon", False), ("chameleon", True), ("llama", False)])
def test_load_pretrained_reproduces_transformers_logits(tmp_path: Path, arch: str, shard: bool) -> None:
    config = tiny_config(arch=arch)
    reference = hf_lm(config)
    reference.save_pretrained(tmp_path / "hf", max_shard_size="300KB" if shard else "10GB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists() == shard
    model = UnifiedModel(config).eval()
    model.load_pretrained(lm=tmp_path / "hf")
    ids = random_ids(2, 16)
    with torch.no_grad():
        ours = model(ids).logits
        theirs = reference(input_ids=ids).logits
    text = torch.ones(1024, dtype=torch.bool)
    if arch == "chameleon":
        text[1000:1004] = False
        assert (theirs[..., ~text] == torch.finfo(theirs.dtype).min).all()  # transformers masks them
        assert torch.isfinite(ours[..., ~text]).all()  # we do not
    torch.testing.assert_close(ours[..., text], theirs[..., text], atol=1e-5, rtol=1e-5)


def test_load_pretrained_wrong_shapes_list_the_keys(tmp_path: Path) -> None:
    hf_lm(tiny_config(intermediate_size=96)).save_pretrained(tmp_path / "hf")
    model = build()
    before = model.lm.layers[0].mlp.up_proj.weight.clone()
    with pytest.raises(CheckpointMismatchError) as info:
        model.load_pretrained(lm=tmp_path / "hf")
    message = str(info.value)
    assert "6 shape mismatches" in message  # gate, up, down of both layers
    for layer in (0, 1):
        for proj, shape in (("gate_proj", "(96, 256)"), ("up_proj", "(96, 256)"), ("down_proj", "(256, 96)")):
            assert f"lm.layers.{layer}.mlp.{proj}.weight: checkpoint {shape}" in message
    assert torch.equal(model.lm.layers[0].mlp.up_proj.weight, before)  # nothing was loaded


def test_load_pretrained_reports_missing_and_unexpected_keys(tmp_path: Path) -> None:
    hf_lm(tiny_config()).save_pretrained(tmp_path / "hf")
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    del tensors["lm_head.weight"]
    tensors["model.extra_norm.weight"] = torch.ones(4)
    save_file(tensors, tmp_path / "hf" / "model.safetensors")
    with pytest.raises(
        CheckpointMismatchError,
        match=r"1 missing keys: lm_head\.weight.*1 unexpected keys: model\.extra_norm",
    ):
        build().load_pretrained(lm=tmp_path / "hf")


def test_load_pretrained_expands_lumina_per_shard_qk_norms(tmp_path: Path) -> None:
    config = tiny_config()
    hf_lm(config).save_pretrained(tmp_path / "hf")
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    row = torch.linspace(0.5, 1.5, 64)  # head_dim = 256 / 4
    for key in [k for k in tensors if "_norm.weight" in k and ".self_attn." in k]:
        tensors[key] = row[None].clone()  # Lumina-mGPT-7B layout: [1, head_dim]
    save_file(tensors, tmp_path / "hf" / "model.safetensors")
    model = build()
    model.load_pretrained(lm=tmp_path / "hf")
    assert torch.equal(model.lm.layers[1].self_attn.k_norm.weight, row.expand(4, 64))


def test_load_pretrained_checks_the_checkpoint_config(tmp_path: Path) -> None:
    hf_lm(tiny_config(rope_theta=500000.0)).save_pretrained(tmp_path / "hf")
    with pytest.raises(ConfigError, match=r"model\.lm\.rope_theta=10000\.0 but .* says 500000\.0"):
        build().load_pretrained(lm=tmp_path / "hf")
    with pytest.raises(ValueError, match="nothing to load"):
        build().load_pretrained()


def test_load_pretrained_siglip_replaces_the_tower(tmp_path: Path) -> None:
    config = tiny_config()
    torch.manual_seed(7)
    tower = build_siglip_tower(config.vision)
    tower.save_pretrained(tmp_path / "siglip")
    model = build()
    head_before = model.lm_head.weight.clone()
    model.load_pretrained(siglip=tmp_path / "siglip")
    for name, tensor in tower.state_dict().items():
        assert torch.equal(model.vision.tower.state_dict()[name], tensor), name
    assert torch.equal(model.lm_head.weight, head_before)  # the LM is untouched
