"""The decoding engine on a random tiny model: token-for-token equal to transformers' ``generate`` under greedy
decoding (left-padded batches, both cache kinds, our processors inside ``generate`` too), batched CFG equal to
separate conditional and unconditional forwards, features in the prompt, seeds, per-row stopping, errors."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import ChameleonForConditionalGeneration

from unified_mllm.config import get_preset
from unified_mllm.infer.engine import Engine
from unified_mllm.infer.processors import GridConstraint, sampling_processors
from unified_mllm.layout import SpecialTokens, build_image_span, generation_prompt, unconditional_prompt
from unified_mllm.model.backbone import lm_hf_config
from unified_mllm.model.unified import UnifiedModel
from unified_mllm.text import TextTokenizer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model() -> UnifiedModel:
    torch.manual_seed(0)
    return UnifiedModel(get_preset("tiny")).eval()


def hf_twin(model: UnifiedModel) -> ChameleonForConditionalGeneration:
    """transformers' Chameleon causal LM holding our LM's weights (its image-token mask is empty: our config
    leaves the vocabulary map empty, so it masks nothing)."""
    hf = ChameleonForConditionalGeneration(lm_hf_config(model.config.lm)).eval()
    missing, unexpected = hf.model.load_state_dict(model.lm.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("vqmodel.") for k in missing)
    hf.lm_head.load_state_dict(model.lm_head.state_dict())
    return hf


@pytest.fixture(scope="module")
def hf_model(model: UnifiedModel) -> ChameleonForConditionalGeneration:
    return hf_twin(model)


@pytest.fixture(scope="module")
def eager_model(model: UnifiedModel) -> UnifiedModel:
    """The same weights with the eager attention kernel (our engine hands it an additive 4D mask too)."""
    config = copy.deepcopy(model.config)
    config.lm.attn_implementation = "eager"
    eager = UnifiedModel(config).eval()
    eager.load_state_dict(model.state_dict())
    assert eager.lm.config._attn_implementation == "eager"
    return eager


@pytest.fixture(scope="module")
def tokens(sp_tokenizer: TextTokenizer) -> SpecialTokens:
    return sp_tokenizer.special_tokens()


def prompts_of(tokenizer: TextTokenizer, *texts: str) -> list[list[int]]:
    return [[tokenizer.special_tokens().bos, *tokenizer.encode(t)] for t in texts]


def hf_greedy(
    hf: ChameleonForConditionalGeneration, prompts: list[list[int]], pad: int, n: int, **kw
) -> list:
    longest = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (longest - len(p)) + p for p in prompts])
    mask = (ids != pad).long()
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=pad, **kw)
    return out[:, longest:].tolist()


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_greedy_text_equals_transformers_generate(request, sp_tokenizer, tokens, attention, cache) -> None:
    subject = request.getfixturevalue("model" if attention == "sdpa" else "eager_model")
    prompts = prompts_of(sp_tokenizer, "how many red circle", "blue", "is there a small green square left")
    result = Engine(subject, tokens, cache=cache).generate(prompts, max_new_tokens=12, stop_ids=())
    assert result.ids == hf_greedy(hf_twin(subject), prompts, tokens.pad, 12)
    assert result.finish == ["length"] * 3


def test_our_processors_inside_transformers_generate_give_our_engines_image(
    model, hf_model, sp_tokenizer
) -> None:
    """The grid constraint is a transformers logits processor: generate() with it draws the same grid."""
    tokens = sp_tokenizer.special_tokens()
    condition = sp_tokenizer.encode("a red circle")
    codes = Engine(model, tokens).generate_images([condition], height=3, width=4, greedy=True)
    constraint = GridConstraint(tokens, size=(3, 4))
    [ids] = hf_greedy(
        hf_model, [generation_prompt(condition, tokens, 3, 4)], tokens.pad, 15, logits_processor=[constraint]
    )
    grid = np.asarray(ids).reshape(3, 5)
    assert (grid[:, 4] == tokens.row_end).all()
    assert np.array_equal(tokens.ids_to_codes(grid[:, :4]), codes[0])


def test_batched_cfg_equals_separate_conditional_and_unconditional_forwards(model, sp_tokenizer) -> None:
    tokens = sp_tokenizer.special_tokens()
    conditions = [sp_tokenizer.encode("a large blue square"), sp_tokenizer.encode("red")]
    seen: list[torch.Tensor] = []

    def record(ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        seen.append(scores.clone())  # after guidance and grammar
        return scores

    scale, height, width = 3.0, 2, 3
    codes = Engine(model, tokens).generate_images(
        conditions, height=height, width=width, cfg_scale=scale, processors=[record], greedy=True
    )
    assert len(seen) == height * (width + 1)
    grids = [np.concatenate([tokens.codes_to_ids(c), np.full((height, 1), tokens.row_end)], 1) for c in codes]
    constraint = GridConstraint(tokens, size=(height, width))
    with torch.no_grad():
        for row, condition in enumerate(conditions):
            drawn = grids[row].ravel().tolist()
            for step in range(len(seen)):
                cond = generation_prompt(condition, tokens, height, width) + drawn[:step]
                uncond = unconditional_prompt(tokens, height, width) + drawn[:step]
                c = model(torch.tensor([cond])).logits[0, -1]
                u = model(torch.tensor([uncond])).logits[0, -1]
                expected = constraint(torch.tensor([cond]), (u + scale * (c - u))[None])[0]
                # same allowed ids, same guided scores (up to float rounding of batched vs single forwards)
                got = seen[step][row]
                assert torch.equal(torch.isfinite(got), torch.isfinite(expected))
                finite = torch.isfinite(expected)
                torch.testing.assert_close(got[finite], expected[finite], atol=2e-4, rtol=1e-4)
                assert torch.equal(seen[step][row], seen[step][row + len(conditions)])  # pair shares scores


def test_prompt_features_prefill_equals_a_full_forward(model, sp_tokenizer) -> None:
    tokens = sp_tokenizer.special_tokens()
    per_view = model.features_per_view
    span = build_image_span(np.arange(16).reshape(4, 4), tokens, num_features=per_view)
    prompt = [tokens.bos, *span, *sp_tokenizer.encode("what shape"), tokens.end_of_turn]
    pixels = torch.rand(1, 3, model.config.vision.image_size, model.config.vision.image_size) * 2 - 1
    result = Engine(model, tokens).generate([prompt], max_new_tokens=5, stop_ids=(), pixel_values=pixels)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(5):  # reference: no cache, the whole sequence every step
            x = torch.tensor([ids])
            logits = model(x, pixel_values=pixels, feature_mask=x == tokens.feature).logits
            ids.append(int(logits[0, -1].argmax()))
    assert result.ids == [ids[len(prompt) :]]


def test_sampling_is_seeded(model, sp_tokenizer) -> None:
    tokens = sp_tokenizer.special_tokens()
    prompts = prompts_of(sp_tokenizer, "a red circle", "two")
    warpers = sampling_processors(
        tokens, image_temperature=1.0, text_temperature=1.5, image_top_k=None, text_top_k=None
    )
    engine = Engine(model, tokens)

    def run(seed: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(seed)
        kw = {"max_new_tokens": 16, "stop_ids": (), "greedy": False}
        return engine.generate(prompts, processors=warpers, generator=generator, **kw).ids

    assert run(0) == run(0)
    assert run(0) != run(1)
    images = [
        engine.generate_images(
            [sp_tokenizer.encode("red")],
            height=2,
            width=2,
            cfg_scale=2.0,
            generator=torch.Generator().manual_seed(s),
            processors=warpers,
        )[0]
        for s in (7, 7, 8)
    ]
    assert np.array_equal(images[0], images[1]) and not np.array_equal(images[0], images[2])


def test_rows_stop_on_their_own(model, sp_tokenizer) -> None:
    tokens = sp_tokenizer.special_tokens()
    prompts = prompts_of(sp_tokenizer, "blue square", "how many objects")
    longest = max(len(p) for p in prompts)

    def stop_row0_at_step3(ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if ids.shape[1] == longest + 3:
            scores = scores.clone()
            scores[0] = -torch.inf
            scores[0, tokens.end_of_turn] = 0.0
        return scores

    engine = Engine(model, tokens)
    result = engine.generate(prompts, max_new_tokens=[10, 7], processors=[stop_row0_at_step3])
    free = engine.generate(prompts, max_new_tokens=10, stop_ids=())
    assert result.finish == ["stop", "length"]
    assert result.ids[0] == [*free.ids[0][:3], tokens.end_of_turn]
    assert result.ids[1] == free.ids[1][:7]  # the other row is not disturbed by row 0 stopping


def test_engine_errors(model, sp_tokenizer) -> None:
    tokens = sp_tokenizer.special_tokens()
    engine = Engine(model, tokens)
    with pytest.raises(ValueError, match="positions"):
        engine.generate([[tokens.bos]], max_new_tokens=model.config.lm.max_position_embeddings)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        engine.generate([[tokens.bos], [tokens.bos]], max_new_tokens=[3])
    with pytest.raises(ValueError, match="cfg scale must be >= 0"):
        engine.generate_images([sp_tokenizer.encode("red")], height=2, width=2, cfg_scale=-1.0)
    with pytest.raises(ValueError, match="cache must be"):
        Engine(model, tokens, cache="paged")  # type: ignore[arg-type]
    model.train()
    try:
        with pytest.raises(ValueError, match=r"model.eval\(\)"):
            engine.generate([[tokens.bos]], max_new_tokens=2)
    finally:
        model.eval()


@pytest.mark.slow
def test_the_speed_benchmark_runs_and_finds_identical_ids() -> None:
    command = [sys.executable, "scripts/bench_generate.py", "--grid", "2", "--batch-sizes", "1", "2"]
    command += ["--text-tokens", "3", "--repeats", "1", "--threads", "1"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    table = [line.split() for line in result.stdout.splitlines()]
    rows = [r for r in table if len(r) > 1 and r[0] in ("image", "text") and r[1].isdigit()]
    assert [(r[0], r[1], r[-1]) for r in rows] == [
        ("image", "1", "True"),
        ("image", "2", "True"),
        ("text", "1", "True"),
        ("text", "2", "True"),
    ]
    jacobi = [r for r in table if len(r) > 1 and r[0] in ("greedy", "sampled") and r[1].isdigit()]
    assert [(r[0], r[1], r[-1]) for r in jacobi] == [
        ("greedy", "1", "True"),
        ("sampled", "1", "(sampled)"),
        ("greedy", "2", "True"),
        ("sampled", "2", "(sampled)"),
    ]
    assert "identical ids in every comparison: True" in result.stdout
