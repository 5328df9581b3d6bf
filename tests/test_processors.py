"""Logits processors on hand-made logits: CFG combine, the grid constraint in every state, per-modality
temperature / top-k / top-p, batch > 1 with rows in different states, and clear errors on bad settings."""

from __future__ import annotations

import math

import pytest
import torch

from unified_mllm.infer.processors import (
    CFGProcessor,
    GridConstraint,
    ModalityTemperature,
    ModalityTopK,
    ModalityTopP,
    create_logits_processor,
)
from unified_mllm.layout import LayoutError, SpecialTokens, build_image_span, generation_prompt

# A hand-made vocabulary of 32 ids: roles 0..8, resolution tokens 10..17 (<size-n> = n codes), codes 20..27.
TOKENS = SpecialTokens(
    bos=0, eos=1, pad=2, image_start=3, image_end=4, row_end=5, separator=6, end_of_turn=7, feature=8,
    size_ids=tuple(range(10, 18)), size_unit=1, code_ids=tuple(range(20, 28)),
)  # fmt: skip
VOCAB = 32
CODES = set(range(20, 28))
TEXT = [0, 29, 30, 7]  # <bos> two text ids <end-of-turn>


def left_pad(rows: list[list[int]]) -> torch.Tensor:
    longest = max(len(r) for r in rows)
    return torch.tensor([[TOKENS.pad] * (longest - len(r)) + r for r in rows])


def allowed(scores: torch.Tensor) -> list[set[int]]:
    return [set(torch.isfinite(row).nonzero().flatten().tolist()) for row in scores]


# ------------------------------------------------------------------------------------------------ CFG


def test_cfg_combines_each_pair_and_returns_it_for_both_halves() -> None:
    cond = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 4.0]])
    uncond = torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 2.0]])
    out = CFGProcessor(2.0)(torch.zeros(4, 5, dtype=torch.long), torch.cat([cond, uncond]))
    expected = torch.tensor([[2.0, 3.0, 5.0], [-1.0, 0.0, 6.0]])
    assert torch.equal(out, torch.cat([expected, expected]))
    # scale 1 is the conditional branch, scale 0 the unconditional one
    assert torch.equal(CFGProcessor(1.0)(torch.zeros(4, 1), torch.cat([cond, uncond]))[:2], cond)
    assert torch.equal(CFGProcessor(0.0)(torch.zeros(4, 1), torch.cat([cond, uncond]))[2:], uncond)


def test_cfg_rejects_a_negative_scale_and_an_odd_batch() -> None:
    with pytest.raises(ValueError, match="cfg scale must be >= 0"):
        CFGProcessor(-0.5)
    with pytest.raises(ValueError, match="even batch"):
        CFGProcessor(3.0)(torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 4))


# ------------------------------------------------------------------------------------ grid constraint


def test_grid_constraint_allows_exactly_what_the_layout_needs_in_each_row() -> None:
    prompt = generation_prompt([29, 30], TOKENS, 2, 3)
    rows = [
        TEXT,  # text: untouched
        prompt,  # first code of row 0
        [*prompt, 20, 21, 22],  # end of row 0
        [*prompt, 20, 21, 22, 5, 23],  # inside row 1
        [*prompt, 20, 21, 22, 5, 23, 24, 25, 5],  # grid complete: the closing token
        [*TEXT, 3],  # the model opened an image: its height token
        [*TEXT, 3, 12],  # then its width token
    ]
    scores = torch.randn(len(rows), VOCAB)
    out = GridConstraint(TOKENS, size=(2, 4))(left_pad(rows), scores)
    assert allowed(out) == [set(range(VOCAB)), CODES, {5}, CODES, {4}, {12}, {14}]
    kept = torch.isfinite(out)
    assert torch.equal(out[kept], scores[kept])  # allowed scores pass through unchanged


def test_grid_constraint_closes_with_sep_when_spans_carry_features_and_frees_sizes_without_a_request() -> (
    None
):
    grid_done = [*generation_prompt([29], TOKENS, 1, 2), 20, 21, 5]
    rows = left_pad([grid_done, [*TEXT, 3], [*TEXT, 3, 11]])
    out = GridConstraint(TOKENS, with_features=True)(rows, torch.zeros(3, VOCAB))
    positive_sizes = set(range(11, 18))  # <size-0> (zero codes) is never a valid side
    assert allowed(out) == [{6}, positive_sizes, positive_sizes]


def test_grid_constraint_leaves_rows_alone_after_the_span_is_closed() -> None:
    span = build_image_span([[0, 1]], TOKENS, num_features=2)  # ... <row-end> <sep> f f <image-end>
    rows = left_pad([TEXT + span, TEXT + span[:-3]])  # closed / right after <sep>
    out = GridConstraint(TOKENS, with_features=True)(rows, torch.zeros(2, VOCAB))
    assert allowed(out) == [set(range(VOCAB)), set(range(VOCAB))]


def test_grid_constraint_errors() -> None:
    with pytest.raises(LayoutError, match="exceeds the largest size token"):
        GridConstraint(TOKENS, size=(9, 2))
    broken = torch.tensor([[*TEXT, 3, 29, 30]])  # <image-start> followed by two text ids
    with pytest.raises(ValueError, match="no valid resolution tokens"):
        GridConstraint(TOKENS)(broken, torch.zeros(1, VOCAB))
    with pytest.raises(ValueError, match="fewer than the tokenizer"):
        GridConstraint(TOKENS)(torch.tensor([TEXT]), torch.zeros(1, 16))


# ------------------------------------------------------------------------------------- sampling warpers


def test_temperature_differs_per_modality_and_zero_is_greedy() -> None:
    rows = left_pad([generation_prompt([29], TOKENS, 2, 2), TEXT])  # image row, text row
    scores = torch.tensor([[1.0, 3.0, 2.0, 0.0], [1.0, 3.0, 2.0, 0.0]])
    out = ModalityTemperature(TOKENS, image=0.5, text=2.0)(rows, scores)
    assert torch.equal(out, torch.tensor([[2.0, 6.0, 4.0, 0.0], [0.5, 1.5, 1.0, 0.0]]))
    greedy = ModalityTemperature(TOKENS, image=1.0, text=0.0)(rows, scores)
    assert torch.equal(greedy[0], scores[0])
    assert greedy[1].tolist() == [-math.inf, 3.0, -math.inf, -math.inf]
    with pytest.raises(ValueError, match="text temperature must be >= 0"):
        ModalityTemperature(TOKENS, text=-1.0)


def test_top_k_differs_per_modality() -> None:
    rows = left_pad([TEXT, generation_prompt([29], TOKENS, 2, 2), TEXT])
    scores = torch.tensor([[0.1, 0.4, 0.3, 0.2]] * 3)
    out = ModalityTopK(TOKENS, image=3, text=1)(rows, scores)
    assert allowed(out) == [{1}, {1, 2, 3}, {1}]
    assert torch.equal(ModalityTopK(TOKENS, image=None, text=None)(rows, scores), scores)
    assert allowed(ModalityTopK(TOKENS, image=None, text=2)(rows, scores)) == [{1, 2}, {0, 1, 2, 3}, {1, 2}]
    for bad in (0, -3, 1.5):
        with pytest.raises(ValueError, match="image top-k must be an integer >= 1"):
            ModalityTopK(TOKENS, image=bad)


def test_top_p_keeps_the_smallest_nucleus_per_modality() -> None:
    rows = left_pad([generation_prompt([29], TOKENS, 2, 2), TEXT])
    scores = torch.tensor([[0.2, 0.5, 0.3], [0.2, 0.5, 0.3]]).log()
    out = ModalityTopP(TOKENS, image=0.7, text=1.0)(rows, scores)
    # image row: 0.5 alone is below 0.7, 0.5 + 0.3 reaches it; 0.2 goes
    assert allowed(out) == [{1, 2}, {0, 1, 2}]
    tiny = ModalityTopP(TOKENS, image=0.1, text=0.1)(rows, scores)
    assert allowed(tiny) == [{1}, {1}]  # the best id always stays
    with pytest.raises(ValueError, match=r"text top-p must be in \(0, 1\]"):
        ModalityTopP(TOKENS, text=0.0)


def test_create_logits_processor_orders_guidance_grammar_then_warpers() -> None:
    processors = create_logits_processor(TOKENS, cfg=3.0, image_top_k=2, text_top_k=1, size=(2, 2))
    assert [type(p) for p in processors] == [
        CFGProcessor,
        GridConstraint,
        ModalityTemperature,
        ModalityTopK,
        ModalityTopP,
    ]
    assert type(create_logits_processor(TOKENS, cfg=1.0)[0]) is GridConstraint  # scale 1: nothing to guide
    # [cond; uncond] in the middle of an image: guidance, then only codes, then the two best codes.
    prompt = generation_prompt([29], TOKENS, 2, 2)
    ids = left_pad([prompt, generation_prompt([], TOKENS, 2, 2)])
    cond = torch.zeros(VOCAB)
    cond[[20, 21, 22, 29]] = torch.tensor([4.0, 3.0, 1.0, 9.0])
    out = processors(ids, torch.stack([cond, torch.zeros(VOCAB)]))
    assert allowed(out) == [{20, 21}, {20, 21}]
    assert out[0, 20].item() == 12.0 and out[0, 21].item() == 9.0
