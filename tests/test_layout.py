"""The token layout: exact spans, round trips (property-based) and clear errors on malformed input."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import TOKENS
from unified_mllm.layout import (
    LayoutError,
    MalformedSpanError,
    PlaceholderMismatchError,
    SpanReader,
    build_image_span,
    expand_image_placeholders,
    feature_mask,
    find_image_spans,
    generation_prompt,
    image_prefix,
    image_span_length,
    parse_image_span,
    split_interleaved,
    unconditional_prompt,
)


def test_span_of_a_2x3_grid_with_features_is_exact() -> None:
    codes = [[0, 1, 2], [3, 4, 15]]
    span = build_image_span(codes, TOKENS, num_features=2)
    assert span == [103, 202, 203, 1000, 1001, 1002, 105, 1003, 1004, 1015, 105, 106, 108, 108, 104]
    assert len(span) == image_span_length(2, 3, 2)
    assert feature_mask(span, TOKENS).sum() == 2


def test_span_without_features_is_lumina_layout() -> None:
    span = build_image_span([[5]], TOKENS)
    assert span == [103, 201, 201, 1005, 105, 104]
    assert parse_image_span(span, TOKENS).num_features == 0


def test_size_tokens_respect_the_unit() -> None:
    chameleon_like = dataclasses.replace(TOKENS, size_unit=2)  # same ids, Chameleon-style unit
    assert chameleon_like.size_token(4) == 202
    assert chameleon_like.size_from_token(203) == 6
    with pytest.raises(LayoutError, match="multiple of 2"):
        chameleon_like.size_token(3)
    with pytest.raises(LayoutError, match="exceeds the largest size token"):
        TOKENS.size_token(8)


def test_code_mapping_rejects_out_of_range_and_non_codes() -> None:
    assert TOKENS.codes_to_ids([[0, 15]]).tolist() == [[1000, 1015]]
    assert TOKENS.ids_to_codes([1003, 1004]).tolist() == [3, 4]
    with pytest.raises(LayoutError, match=r"\[0, 16\)"):
        TOKENS.codes_to_ids([16])
    with pytest.raises(MalformedSpanError, match="105 is not an image code"):
        TOKENS.ids_to_codes([1000, 105])


def test_special_tokens_must_not_overlap() -> None:
    with pytest.raises(LayoutError, match="distinct"):
        dataclasses.replace(TOKENS, separator=103)
    with pytest.raises(LayoutError, match="both image codes and special tokens"):
        dataclasses.replace(TOKENS, code_ids=(1000, 104))


grids = st.tuples(st.integers(1, 7), st.integers(1, 7)).flatmap(
    lambda hw: st.lists(
        st.lists(st.integers(0, 15), min_size=hw[1], max_size=hw[1]), min_size=hw[0], max_size=hw[0]
    )
)


@given(codes=grids, num_features=st.integers(0, 6))
@settings(max_examples=200, deadline=None)
def test_build_parse_round_trip(codes: list[list[int]], num_features: int) -> None:
    span = build_image_span(codes, TOKENS, num_features)
    parsed = parse_image_span(span, TOKENS)
    assert parsed.codes.tolist() == codes
    assert parsed.num_features == num_features
    assert len(span) == image_span_length(len(codes), len(codes[0]), num_features)


def _structural_positions(span: list[int]) -> list[int]:
    return [i for i, t in enumerate(span) if t not in TOKENS.code_ids and t != TOKENS.feature]


@given(codes=grids, num_features=st.integers(0, 3), data=st.data())
@settings(max_examples=200, deadline=None)
def test_any_corrupted_structure_is_rejected(
    codes: list[list[int]], num_features: int, data: st.DataObject
) -> None:
    span = build_image_span(codes, TOKENS, num_features)
    kind = data.draw(st.sampled_from(["truncate", "structural", "code", "extra"]))
    if kind == "truncate":
        bad = span[: data.draw(st.integers(0, len(span) - 1))]
    elif kind == "structural":
        # A structural token (start, sizes, row-end, sep, end) replaced by an image code.
        pos = data.draw(st.sampled_from(_structural_positions(span)))
        if span[pos] == TOKENS.separator:
            pos = len(span) - 1
        bad = [*span[:pos], TOKENS.code_ids[0], *span[pos + 1 :]]
    elif kind == "code":
        pos = data.draw(st.sampled_from([i for i, t in enumerate(span) if t in TOKENS.code_ids]))
        bad = [*span[:pos], data.draw(st.sampled_from([TOKENS.row_end, TOKENS.bos, 7, TOKENS.image_end]))]
        bad += span[pos + 1 :]
    else:
        bad = [*span, TOKENS.code_ids[1]]
    with pytest.raises(MalformedSpanError):
        parse_image_span(bad, TOKENS)


def test_malformed_span_messages_name_the_problem() -> None:
    span = build_image_span([[1, 2], [3, 4]], TOKENS)
    with pytest.raises(MalformedSpanError, match="<row-end> after row 0"):
        parse_image_span([*span[:5], 1009, *span[6:]], TOKENS)
    with pytest.raises(MalformedSpanError, match="row 1, column 1"):
        parse_image_span([*span[:7], TOKENS.bos, *span[8:]], TOKENS)
    with pytest.raises(MalformedSpanError, match="not a resolution token"):
        parse_image_span([103, 1000, 201, 1000, 105, 104], TOKENS)
    with pytest.raises(MalformedSpanError, match="<sep> is not followed by feature slots"):
        parse_image_span([103, 201, 201, 1000, 105, 106, 104], TOKENS)


def test_interleaved_output_splits_into_text_and_images() -> None:
    first, second = build_image_span([[1]], TOKENS), build_image_span([[2, 3]], TOKENS, 1)
    ids = [5, 6, *first, 7, *second]
    assert find_image_spans(ids, TOKENS) == [(2, 2 + len(first)), (3 + len(first), len(ids))]
    pieces = split_interleaved(ids, TOKENS)
    assert pieces[0] == [5, 6] and pieces[2] == [7]
    assert pieces[1].codes.tolist() == [[1]] and pieces[3].codes.tolist() == [[2, 3]]
    with pytest.raises(MalformedSpanError, match="never closed"):
        find_image_spans([5, *first[:-1]], TOKENS)
    with pytest.raises(MalformedSpanError, match="without an open image"):
        find_image_spans([TOKENS.image_end], TOKENS)


def fake_encode(text: str) -> list[int]:
    return [ord(c) for c in text]


def test_placeholders_expand_in_order() -> None:
    a, b = build_image_span([[1]], TOKENS), build_image_span([[2]], TOKENS)
    ids = expand_image_placeholders("x<|image|>y<|image|>", [a, b], fake_encode)
    assert ids == [ord("x"), *a, ord("y"), *b]


@pytest.mark.parametrize("n_images", [0, 1, 3])
def test_placeholder_count_mismatch_is_an_error(n_images: int) -> None:
    spans = [build_image_span([[1]], TOKENS)] * n_images
    with pytest.raises(
        PlaceholderMismatchError, match=f"2 <\\|image\\|> placeholder\\(s\\) but {n_images} image"
    ):
        expand_image_placeholders("<|image|> and <|image|>", spans, fake_encode)


def test_generation_and_unconditional_prompts() -> None:
    assert image_prefix(TOKENS, 3, 2) == [103, 203, 202]
    assert generation_prompt([9, 9], TOKENS, 3, 2) == [100, 9, 9, 107, 103, 203, 202]
    assert unconditional_prompt(TOKENS, 3, 2) == [100, 107, 103, 203, 202]


def test_build_rejects_bad_grids() -> None:
    with pytest.raises(LayoutError, match="non-empty"):
        build_image_span(np.zeros((0, 3), dtype=int), TOKENS)
    with pytest.raises(LayoutError, match="non-empty"):
        build_image_span([1, 2, 3], TOKENS)
    with pytest.raises(LayoutError, match="num_features"):
        build_image_span([[1]], TOKENS, -1)


# ------------------------------------------------------------------------------------ the span reader

# Ids of TOKENS: <image-start> 103, <image-end> 104, <row-end> 105, <sep> 106, feature 108, <size-n> 200 + n,
# codes 1000.. ; 102 is padding, 300 a text id.
S, E, R, P, X = 103, 104, 105, 102, 300


def test_span_reader_reads_cells_and_codes_of_two_packed_spans_and_padding() -> None:
    first = [S, 202, 202, 1000, 1001, R, 1002, 1003, R, 106, 108, E]  # 2 x 2 grid with one feature slot
    second = [S, 201, 203, 1004, 1005, 1006, R, E]  # 1 x 3 grid
    ids = torch.tensor([[X, *first, X, *second], [P, P, P, P, P, X, *second, X, *first[:7]]])
    read = SpanReader(TOKENS)
    cells = read.cells(ids)
    assert cells.shape == (2, 22, 2) and cells.dtype == torch.long
    no = [-1, -1]
    assert cells[0].tolist() == [
        no, no, no, no, [0, 0], [0, 1], no, [1, 0], [1, 1], no, no, no, no,  # text, the 2 x 2 span
        no, no, no, no, [0, 0], [0, 1], [0, 2], no, no,  # text, the 1 x 3 span
    ]  # fmt: skip
    assert cells[1].tolist() == [
        no, no, no, no, no, no, no, no, no, [0, 0], [0, 1], [0, 2], no, no, no,  # padding, text, 1 x 3
        no, no, no, [0, 0], [0, 1], no, [1, 0],  # text, the first span cut after its first code of row 1
    ]  # fmt: skip
    is_code = read.is_code(ids)
    assert is_code.tolist() == (cells >= 0).all(dim=-1).tolist()  # every code here sits in a span
    assert int(is_code.sum()) == 4 + 3 + 3 + 3


def test_span_reader_is_code_and_code_ids_beyond_the_tables() -> None:
    read = SpanReader(TOKENS)
    ids = torch.tensor([[999, 1000, 1015, 1016, 5000, 105, 0]])
    assert read.is_code(ids).tolist() == [[False, True, True, False, False, False, False]]
    assert read.is_code(ids[0]).tolist() == [False, True, True, False, False, False, False]  # any shape
    assert read.code_to_id(torch.tensor([[0, 15], [3, 3]])).tolist() == [[1000, 1015], [1003, 1003]]


def test_span_reader_state_of_open_closed_and_finished_spans() -> None:
    rows = [
        [X, S, 202, 203, 1000, 1001],  # open: offset 4, 2 x 3 named
        [X, S, 201, 201, 1000, R, E, X],  # closed: outside
        [P, P, P, P, X, S, 202],  # just opened: height read, width not yet
        [S, 201, 202, 1000, 1001, R],  # a 1 x 2 grid whose last row is complete
        [P, P, P, S, 201, 201, 1000, R, E, S],  # a second span opened after a closed one
    ]
    longest = max(len(r) for r in rows)
    state = SpanReader(TOKENS).state(torch.tensor([[P] * (longest - len(r)) + r for r in rows]))
    assert state.inside.tolist() == [True, False, True, True, True]
    assert state.offset.tolist() == [4, 0, 1, 5, 0]
    assert state.height.tolist() == [2, -1, 2, 1, -1]
    assert state.width.tolist() == [3, -1, -1, 2, -1]
    assert state.grid_length.tolist() == [8, 0, 0, 3, 0]
    assert state.grid_done.tolist() == [False, False, False, True, False]


def test_span_reader_state_matches_the_processors_view_of_left_padded_rows() -> None:
    prompt = generation_prompt([X], TOKENS, 2, 3)  # ... <image-start> <size-2> <size-3>
    closed = [100, X, 107, *build_image_span([[0, 1, 2], [3, 4, 5]], TOKENS)]
    rows = [[*prompt, 1000, 1001], closed, prompt[:-1]]
    longest = max(len(r) for r in rows)
    read = SpanReader(TOKENS)
    state = read.state(torch.tensor([[P] * (longest - len(r)) + r for r in rows]))
    assert state.inside.tolist() == [True, False, True]
    assert state.offset.tolist() == [4, 0, 1]
    assert state.height.tolist() == [2, -1, 2]
    assert state.width.tolist() == [3, -1, -1]
    assert state.grid_done.tolist() == [False, False, False]
    done = read.state(torch.tensor([[*prompt, 1000, 1001, 1002, R, 1003, 1004, 1005, R]]))
    assert done.grid_done.tolist() == [True]


def test_span_reader_wants_batched_rows() -> None:
    read = SpanReader(TOKENS)
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        read.cells(torch.tensor([S, 201, 201]))
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        read.state(torch.tensor([S, 201, 201]))
