"""Published LM checkpoints in: UniToken (base, AnyRes), Lumina-mGPT and Chameleon, on tiny random checkpoints
written in each published layout by the tests themselves (transformers' Chameleon and SigLIP classes save the real
layouts; UniToken's keys are those classes' under ``model.*`` / ``vit.*`` plus its ``adapter`` Sequential)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import ChameleonForConditionalGeneration, SiglipVisionConfig, SiglipVisionModel

from tests.helpers import write_chameleon_checkpoint, write_fake_chameleon_vocab
from unified_mllm.config import LMConfig, ModelConfig, VisionConfig, VQConfig
from unified_mllm.convert.__main__ import convert as run_converter
from unified_mllm.convert.__main__ import main as convert_main
from unified_mllm.convert.chameleon import vision_branch
from unified_mllm.convert.common import ConversionError, Rule, rename
from unified_mllm.infer.solver import InferenceSolver
from unified_mllm.layout import build_image_span
from unified_mllm.model.backbone import lm_hf_config
from unified_mllm.vision.vqgan import VQGAN

NUM_CODES = 12
VQ = VQConfig(
    codebook_size=NUM_CODES,
    embed_dim=16,
    z_channels=32,
    base_channels=32,
    channel_mult=[1, 2, 2],
    num_res_blocks=1,
    attn_resolutions=[],
    resolution=32,
)
LM = LMConfig(
    vocab_size=160, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=4,
    max_position_embeddings=512,
)  # fmt: skip
SIGLIP = SiglipVisionConfig(
    hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8,
    vision_use_head=True,
)  # fmt: skip


@pytest.fixture
def tokenizer_dir(tmp_path: Path) -> Path:
    """Chameleon's tokenizer folder at tiny scale: text_tokenizer.json, vqgan.ckpt + vqgan.yaml."""
    folder = tmp_path / "chameleon-tokenizer"
    folder.mkdir()
    write_fake_chameleon_vocab(folder / "text_tokenizer.json", num_codes=NUM_CODES)
    torch.manual_seed(3)
    write_chameleon_checkpoint(folder, VQGAN(VQ))
    return folder


def published_lm(seed: int = 5) -> ChameleonForConditionalGeneration:
    torch.manual_seed(seed)
    model = ChameleonForConditionalGeneration(lm_hf_config(LM))
    for param in model.parameters():  # norms start at ones / zeros; randomise them so parity means something
        nn.init.normal_(param, std=0.2)
    return model.eval()


def lumina_state(lm: ChameleonForConditionalGeneration) -> dict[str, torch.Tensor]:
    """Lumina-mGPT's / UniToken's LM keys: transformers' names, q/k norms stored per model-parallel shard
    ``[1, head_dim]`` (one shard: every head shares the row), no VQ-GAN."""
    state = {}
    for key, tensor in lm.state_dict().items():
        if key.startswith("model.vqmodel."):
            continue
        if key.endswith(("q_norm.weight", "q_norm.bias", "k_norm.weight", "k_norm.bias")):
            tensor = tensor[:1]
        state[key] = tensor.contiguous()
    return state


def share_qk_norm_rows(lm: ChameleonForConditionalGeneration) -> None:
    """Make every head's q/k norm equal its first row: what a per-shard checkpoint means for the reference."""
    with torch.no_grad():
        for name, param in lm.named_parameters():
            if name.endswith(("q_norm.weight", "q_norm.bias", "k_norm.weight", "k_norm.bias")):
                param.copy_(param[:1].expand_as(param))


class PublishedUniToken(nn.Module):
    """UniToken's module structure (``ChameleonXLLMXForConditionalGenerationBase``): LM, ``vit``, ``adapter``."""

    def __init__(self) -> None:
        super().__init__()
        self.lm = published_lm()
        share_qk_norm_rows(self.lm)
        torch.manual_seed(6)
        self.vit = SiglipVisionModel(
            SIGLIP
        )  # transformers 5: the vision transformer itself (keys as published)
        for param in self.vit.parameters():
            nn.init.normal_(param, std=0.2)
        self.adapter = nn.Sequential(nn.Linear(48, 64), nn.GELU(), nn.Linear(64, 64))
        self.eval()

    def state(self) -> dict[str, torch.Tensor]:
        vit = {f"vit.{k}": v for k, v in self.vit.state_dict().items()}
        adapter = {f"adapter.{k}": v for k, v in self.adapter.state_dict().items()}
        return {**lumina_state(self.lm), **vit, **adapter}

    @torch.no_grad()
    def logits(self, ids: torch.Tensor, slots: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        """The seed's forward: token embeddings, the adapted SigLIP features written into the feature slots."""
        embeds = self.lm.model.embed_tokens(ids)
        features = self.adapter(self.vit(pixels).last_hidden_state)
        embeds[slots] = features.reshape(-1, features.shape[-1])
        hidden = self.lm.model(inputs_embeds=embeds).last_hidden_state
        return self.lm.lm_head(hidden)  # transformers masks image-token logits in forward(); compare raw


def write_published(folder: Path, state: dict[str, torch.Tensor], architecture: str) -> Path:
    folder.mkdir(parents=True)
    hf = lm_hf_config(LM).to_dict()
    hf.update(architectures=[architecture], model_parallel_size=1, z_loss_weight=1e-5, dropout=0.05)
    (folder / "config.json").write_text(json.dumps(hf))
    save_file(state, str(folder / "model.safetensors"))
    return folder


def convert(kind: str, src: Path, dst: Path, tokenizer_dir: Path, *extra: str) -> Path:
    if kind == "unitoken":  # the tiny vocabulary has no id 16853: name the test's "prefix" token instead
        vocab = json.loads((tokenizer_dir / "text_tokenizer.json").read_text())["model"]["vocab"]
        extra = ("--t2i-prefix-id", str(vocab["?"]), *extra)
    assert (
        run_converter([kind, str(src), str(dst), "--chameleon-tokenizer", str(tokenizer_dir), *extra]) == dst
    )
    return dst


def unitoken_export(tmp_path: Path, tokenizer_dir: Path, name: str = "UniToken-base-StageII") -> Path:
    published = PublishedUniToken()
    src = write_published(tmp_path / name, published.state(), "ChameleonXLLMXForConditionalGenerationBase")
    return convert(
        "unitoken", src, tmp_path / "converted", tokenizer_dir, "--vision-heads", "4", "--image-size", "32"
    )


# ------------------------------------------------------------------------------------------------ UniToken


def test_unitoken_base_logits_equal_the_published_forward(tmp_path: Path, tokenizer_dir: Path) -> None:
    published = PublishedUniToken()
    src = write_published(tmp_path / "UniToken-base-StageII", published.state(), "Whatever")
    dst = convert(
        "unitoken", src, tmp_path / "out", tokenizer_dir, "--vision-heads", "4", "--variant", "base"
    )
    solver = InferenceSolver.from_pretrained(dst)  # the export loads by the documented path
    model, tokens = solver.model.eval(), solver.tokens
    codes = torch.randint(0, NUM_CODES, (8, 8), generator=torch.Generator().manual_seed(0))
    span = build_image_span(codes.numpy(), tokens, num_features=16)  # 32 px / 8 px patches: 16 features
    ids = torch.tensor([[tokens.bos, *span, 70, 71, 72]])
    slots = ids == tokens.feature
    pixels = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        ours = model(ids, pixel_values=pixels, feature_mask=slots).logits
    theirs = published.logits(ids, slots, pixels)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_unitoken_every_published_key_is_accounted_for(tmp_path: Path, tokenizer_dir: Path) -> None:
    state = PublishedUniToken().state()
    assert any(k.startswith("vit.head.") for k in state)  # the pooling head is published, and dropped by rule
    stray = write_published(tmp_path / "stray", {**state, "vit.extra.weight": torch.ones(2)}, "Base")
    with pytest.raises(ConversionError, match=r"1 key\(s\) no conversion rule knows: vit\.extra\.weight"):
        convert("unitoken", stray, tmp_path / "a", tokenizer_dir, "--vision-heads", "4")
    del state["adapter.2.bias"]
    missing = write_published(tmp_path / "missing", state, "Base")
    with pytest.raises(ConversionError, match=r"1 missing keys: vision\.projector\.2\.bias"):
        convert("unitoken", missing, tmp_path / "b", tokenizer_dir, "--vision-heads", "4")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing half-written


def test_unitoken_variant_comes_from_the_checkpoint(tmp_path: Path, tokenizer_dir: Path) -> None:
    state = PublishedUniToken().state()
    anyres = write_published(tmp_path / "x", state, "ChameleonXLLMXForConditionalGenerationAnyRes")
    config = InferenceSolver.from_pretrained(
        convert("unitoken", anyres, tmp_path / "anyres", tokenizer_dir, "--vision-heads", "4")
    ).config.model.vision.anyres
    assert config.enabled and config.pad_color == [0, 0, 0] and config.layout == "unitoken"
    # The seed's candidates as (width, height) px of 384 px tiles -> ours as [rows, cols].
    assert config.grids == [[2, 1], [1, 2], [2, 2], [3, 1], [1, 3]]
    unknown = write_published(tmp_path / "checkpoint", state, "ChameleonForConditionalGeneration")
    with pytest.raises(ConversionError, match="pass --variant base or --variant anyres"):
        convert("unitoken", unknown, tmp_path / "c", tokenizer_dir, "--vision-heads", "4")
    with pytest.raises(ConversionError, match="48 wide, not so400m's 1152; pass --vision-heads"):
        convert("unitoken", anyres, tmp_path / "d", tokenizer_dir)
    with pytest.raises(ConversionError, match=r"text_tokenizer\.json has no id 16853"):
        run_converter(
            ["unitoken", str(anyres), str(tmp_path / "e"), "--chameleon-tokenizer", str(tokenizer_dir)]
        )


def test_seed_simple_inference_example_runs_on_a_converted_checkpoint(
    tmp_path: Path, tokenizer_dir: Path
) -> None:
    # UniToken's README example, in our API (the prompt words exist in the tiny test vocabulary).
    solver = InferenceSolver.from_pretrained(unitoken_export(tmp_path, tokenizer_dir))
    images = solver.generate_img(["a red circle"], cfg=3.0, image_top_k=4000)
    assert len(images) == 1 and images[0].size == (32, 32)
    answer = solver.generate([images[0]], [["<|image|>what is the colour of the circle ?", None]])
    assert isinstance(answer, str)
    again = solver.generate([images[0]], [["<|image|>what is the colour of the circle ?", None]])
    assert answer == again  # greedy


# -------------------------------------------------------------------------------- Lumina-mGPT, Chameleon


@pytest.fixture
def siglip_dir(tmp_path: Path) -> Path:
    """A tiny SigLIP ``from_pretrained`` folder (the LM-only kinds' --siglip)."""
    torch.manual_seed(7)
    SiglipVisionModel(SIGLIP).save_pretrained(tmp_path / "siglip")
    return tmp_path / "siglip"


@pytest.mark.parametrize("kind", ["lumina-mgpt", "chameleon"])
def test_lm_only_checkpoints_give_transformers_logits(
    tmp_path: Path, tokenizer_dir: Path, siglip_dir: Path, kind: str
) -> None:
    reference = published_lm()
    if kind == "lumina-mgpt":  # Lumina-mGPT's fork: per-shard q/k norms, no VQ-GAN in the checkpoint
        share_qk_norm_rows(reference)
        src = write_published(tmp_path / "Lumina-mGPT-7B-512", lumina_state(reference), "ChameleonXLLMX")
    else:  # transformers' save_pretrained: per-head norms, the VQ-GAN under model.vqmodel.*
        reference.save_pretrained(tmp_path / "chameleon-7b")
        src = tmp_path / "chameleon-7b"
    dst = convert(kind, src, tmp_path / "out", tokenizer_dir, "--siglip", str(siglip_dir))
    solver = InferenceSolver.from_pretrained(dst)
    assert not solver.config.model.vision.enabled and solver.config.tokenizer.kind == "chameleon"
    tower = SiglipVisionModel.from_pretrained(
        siglip_dir
    ).state_dict()  # the (off) branch holds SigLIP's tower
    assert all(
        torch.equal(solver.model.vision.tower.state_dict()[k], v) for k, v in tower.items() if "head" not in k
    )
    ids = torch.randint(0, LM.vocab_size, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = solver.model.eval()(ids).logits
        theirs = reference.lm_head(reference.model(input_ids=ids).last_hidden_state)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_bf16_export_on_request(tmp_path: Path, tokenizer_dir: Path, siglip_dir: Path) -> None:
    src = write_published(tmp_path / "lumina", lumina_state(published_lm()), "ChameleonXLLMX")
    dst = convert(
        "lumina-mgpt",
        src,
        tmp_path / "out",
        tokenizer_dir,
        "--dtype",
        "bfloat16",
        "--siglip",
        str(siglip_dir),
    )
    assert {t.dtype for t in load_file(dst / "model.safetensors").values()} == {torch.bfloat16}


def test_without_siglip_the_off_branch_is_fresh_and_seeded(capsys: pytest.CaptureFixture[str]) -> None:
    model = ModelConfig(lm=LM, vision=VisionConfig(image_size=32, patch_size=8, hidden_size=48, intermediate_size=96,
                                                   num_layers=2, num_heads=4))  # fmt: skip
    first, again = vision_branch(model, None), vision_branch(model, None)
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    assert {k.split(".")[1] for k in first} == {"tower", "projector"}
    assert "fresh SigLIP tower and projector (seed 0)" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------- bad sources


def test_wrong_kind_and_incomplete_sources_name_the_problem(
    tmp_path: Path, tokenizer_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match=r"^error: .*lacks config\.json — is it a unitoken checkpoint\?"):
        convert_main(
            ["unitoken", str(empty), str(tmp_path / "o"), "--chameleon-tokenizer", str(tokenizer_dir)]
        )
    llama = write_published(tmp_path / "llama", {}, "LlamaForCausalLM")
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConversionError, match="model_type='llama'"):
        convert("lumina-mgpt", llama, tmp_path / "o", tokenizer_dir)
    taming_yaml = (tokenizer_dir / "vqgan.yaml").read_text()
    (tokenizer_dir / "vqgan.yaml").unlink()
    src = write_published(tmp_path / "lumina", lumina_state(published_lm()), "ChameleonXLLMX")
    with pytest.raises(ConversionError, match=r"lacks vqgan\.yaml"):
        convert("lumina-mgpt", src, tmp_path / "o", tokenizer_dir)
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        (src / "model.safetensors").unlink()
        (tokenizer_dir / "vqgan.yaml").write_text(taming_yaml)
        convert("lumina-mgpt", src, tmp_path / "o", tokenizer_dir)


def test_rename_rules_drop_only_on_purpose() -> None:
    rules = [Rule(r"a\.(\d+)", r"b.\1"), Rule(r"skip\..*", None, "not ours")]
    state = {"a.1": torch.zeros(1), "skip.x": torch.zeros(1)}
    assert list(rename(state, rules, "src")) == ["b.1"]
    with pytest.raises(ConversionError, match=r"two published keys map to b\.1"):
        rename({"a.1": torch.zeros(1), "a.01": torch.zeros(1)}, [Rule(r"a\.0*(\d+)", r"b.\1")], "src")


def test_an_export_converts_back_to_unitokens_layout(
    tmp_path: Path, tokenizer_dir: Path, siglip_dir: Path
) -> None:
    export = unitoken_export(tmp_path, tokenizer_dir)
    back = run_converter(["to-unitoken", str(export), str(tmp_path / "back")])
    hf = json.loads((back / "config.json").read_text())
    assert hf["architectures"] == ["ChameleonXLLMXForConditionalGenerationBase"]
    assert hf["model_parallel_size"] == LM.num_heads and hf["model_type"] == "chameleon"
    # The seed's module structure reads it: everything but SigLIP's pooling head, which ours does not keep.
    reference = PublishedUniToken()
    tensors = load_file(back / "model.safetensors")
    lm = {k: v for k, v in tensors.items() if k.startswith(("model.", "lm_head."))}
    missing, unexpected = reference.lm.load_state_dict(lm, strict=False)
    assert not unexpected and all(k.startswith("model.vqmodel.") for k in missing)
    missing, unexpected = reference.vit.load_state_dict(
        {k.removeprefix("vit."): v for k, v in tensors.items() if k.startswith("vit.")}, strict=False
    )
    assert not unexpected and all(k.startswith("head.") for k in missing)
    reference.adapter.load_state_dict(
        {k.removeprefix("adapter."): v for k, v in tensors.items() if "adapter" in k}
    )
    solver = InferenceSolver.from_pretrained(export)
    tokens, codes = (
        solver.tokens,
        torch.randint(0, NUM_CODES, (8, 8), generator=torch.Generator().manual_seed(4)),
    )
    ids = torch.tensor([[tokens.bos, *build_image_span(codes.numpy(), tokens, num_features=16), 70, 71]])
    pixels = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(5)) * 2 - 1
    with torch.no_grad():
        ours = solver.model.eval()(ids, pixel_values=pixels, feature_mask=ids == tokens.feature).logits
    torch.testing.assert_close(
        reference.logits(ids, ids == tokens.feature, pixels), ours, atol=1e-5, rtol=1e-5
    )
    # An export the seed cannot express is refused with the reasons.
    dst = convert("lumina-mgpt", write_published(tmp_path / "l", lumina_state(published_lm()), "X"), tmp_path / "lm",
                  tokenizer_dir, "--siglip", str(siglip_dir))  # fmt: skip
    with pytest.raises(
        ConversionError, match="cannot be expressed in UniToken's layout: the continuous branch is off"
    ):
        run_converter(["to-unitoken", str(dst), str(tmp_path / "no")])
