"""Speculative Jacobi decoding: greedy ids equal sequential decoding's, sampled grids follow the exact
distribution of sequential sampling, fewer forwards, clear errors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from unified_mllm.config import get_preset
from unified_mllm.infer.engine import Engine
from unified_mllm.infer.jacobi import decode_grid
from unified_mllm.infer.processors import CFGProcessor, GridConstraint, sampling_processors
from unified_mllm.layout import SpecialTokens, generation_prompt, unconditional_prompt
from unified_mllm.model.unified import UnifiedModel
from unified_mllm.text import TextTokenizer


@pytest.fixture(scope="module")
def model() -> UnifiedModel:
    torch.manual_seed(0)
    return UnifiedModel(get_preset("tiny")).eval()


@pytest.fixture(scope="module")
def small_model() -> UnifiedModel:
    """A narrower LM: the distribution test decodes thousands of rows."""
    config = get_preset("tiny")
    config.lm = dataclasses.replace(
        config.lm, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2, num_kv_heads=2
    )
    torch.manual_seed(1)
    return UnifiedModel(config).eval()


@pytest.fixture(scope="module")
def tokens(sp_tokenizer: TextTokenizer) -> SpecialTokens:
    return sp_tokenizer.special_tokens()


@pytest.mark.parametrize("cfg_scale", [1.0, 2.5])
def test_greedy_grids_equal_sequential_decoding(model, sp_tokenizer, cfg_scale) -> None:
    engine = Engine(model, sp_tokenizer.special_tokens())
    # Prompts of different lengths: left padding, and rows that accept different numbers of drafts.
    conditions = [sp_tokenizer.encode(t) for t in ("a red circle", "two blue squares at the top", "green")]
    kw = {"height": 4, "width": 5, "cfg_scale": cfg_scale, "greedy": True}
    sequential = engine.generate_images(conditions, **kw)
    for window in (1, 2, 7, 40):
        jacobi = engine.generate_images(conditions, jacobi_window=window, **kw)
        assert all(np.array_equal(a, b) for a, b in zip(sequential, jacobi)), window


def test_forwards_shrink_with_the_window(model, sp_tokenizer, tokens) -> None:
    engine = Engine(model, tokens)
    prompts = [generation_prompt(sp_tokenizer.encode("a red circle"), tokens, 4, 4)]
    kw = {
        "sampled_rows": 1,
        "length": 20,
        "processors": [GridConstraint(tokens, size=(4, 4))],
        "greedy": True,
    }
    ids_1, one = decode_grid(engine, prompts, window=1, **kw)
    ids_8, eight = decode_grid(engine, prompts, window=8, **kw)
    assert torch.equal(ids_1, ids_8)
    assert one.forwards == 19 and one.ids_per_forward == 1.0  # window 1 is sequential decoding
    # Row ends are forced, so drafts of them are always accepted: fewer forwards than ids.
    assert eight.forwards < 19 and eight.ids_per_forward > 1.0


def _exact_grid_distribution(
    model: UnifiedModel, prompt: list[int], uncond: list[int], processors: list, length: int
) -> dict[tuple[int, ...], float]:
    """Probability of every grid of ``length`` ids under sequential sampling, by walking the tree of ids with a
    non-zero processed probability (one forward of the conditional and the left-padded unconditional row per
    node)."""
    pad = len(prompt) - len(uncond)
    table: dict[tuple[int, ...], float] = {}

    def walk(grid: list[int], probability: float) -> None:
        if len(grid) == length:
            table[tuple(grid)] = probability
            return
        ids = torch.tensor([prompt + grid, [0] * pad + uncond + grid])
        mask = torch.ones_like(ids)
        mask[1, :pad] = 0
        with torch.no_grad():
            logits = model(ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits
        scores = logits[:, -1].float()
        for processor in processors:
            scores = processor(ids, scores)
        probs = scores[0].softmax(-1)
        for chosen in torch.nonzero(probs).squeeze(1).tolist():
            walk([*grid, chosen], probability * float(probs[chosen]))

    walk([], 1.0)
    return table


@pytest.mark.slow
def test_sampled_grids_follow_the_sequential_distribution(small_model, sp_tokenizer, tokens) -> None:
    """The speculative rule keeps the distribution exact: with the draws confined to two codes per position
    (top-k 2) and sharpened (temperature 0.2), the 16 possible 2x2 grids are sampled with their exact
    probabilities, although the first drafts come from the wrong position's distribution. (Accepting every
    draft, or replacing a rejected one by a draw from p instead of the residual, gives a total variation of
    0.50 and 0.21 here; the rule as implemented 0.02.)"""
    engine = Engine(small_model, tokens)
    condition = sp_tokenizer.encode("a red circle")
    prompt = generation_prompt(condition, tokens, 2, 2)
    uncond = unconditional_prompt(tokens, 2, 2)
    warpers = sampling_processors(
        tokens, image_temperature=0.2, text_temperature=1.0, image_top_k=2, text_top_k=None
    )
    processors = [CFGProcessor(2.0), GridConstraint(tokens, size=(2, 2)), *warpers]
    rows = 4000
    ids, stats = decode_grid(
        engine,
        [prompt] * rows + [uncond] * rows,
        sampled_rows=rows,
        length=6,
        processors=processors,
        window=6,
        generator=torch.Generator().manual_seed(0),
    )
    assert stats.forwards < 5
    exact = _exact_grid_distribution(small_model, prompt, uncond, processors, 6)
    assert len(exact) == 16 and sum(exact.values()) == pytest.approx(1.0, abs=1e-5)  # two codes a position
    grids = [tuple(row) for row in ids.tolist()]
    observed = {grid: grids.count(grid) / rows for grid in set(grids)}
    total_variation = 0.5 * sum(abs(observed.get(g, 0.0) - p) for g, p in exact.items())
    assert total_variation < 0.045, (total_variation, exact, observed)


def test_jacobi_errors(model, sp_tokenizer, tokens) -> None:
    engine = Engine(model, tokens)
    condition = [sp_tokenizer.encode("red")]
    with pytest.raises(ValueError, match="Jacobi window must be >= 1"):
        decode_grid(
            engine,
            [generation_prompt(condition[0], tokens, 2, 2)],
            sampled_rows=1,
            length=6,
            processors=[],
            window=0,
        )
    training = UnifiedModel(get_preset("tiny"))
    with pytest.raises(ValueError, match=r"call model\.eval\(\)"):
        Engine(training, tokens).generate_images(condition, height=2, width=2, jacobi_window=4)
