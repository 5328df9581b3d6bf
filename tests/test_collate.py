"""The collator: exact padded and packed tensors, position resets, label / feature-mask alignment, pixel order."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from transformers.masking_utils import find_packed_sequence_indices

from tests.helpers import TOKENS
from unified_mllm.data.collate import Collator, FirstFitRows, first_fit
from unified_mllm.data.conversation import IGNORE_INDEX, Turn, tokenize_conversation
from unified_mllm.layout import build_image_span

X = IGNORE_INDEX


def sample(
    ids: list[int], labels: list[int], slots: list[int], views: int = 0, fill: float = 0.0
) -> dict[str, Any]:
    pixels = torch.full((views, 3, 2, 2), fill) if views else None
    return {
        "ids": np.array(ids),
        "labels": np.array(labels),
        "feature_mask": np.array(slots, dtype=bool),
        "pixel_values": pixels,
        "task": f"t{ids[0]}",
    }


A = sample([1, 2, 3], [X, 2, 3], [0, 0, 0])
B = sample([4, 5, 6, 7, 8], [X, X, 6, 7, 8], [0, 1, 1, 0, 0], views=1, fill=1.0)
C = sample([9, 10], [X, 10], [0, 1], views=2, fill=2.0)


def test_padding_is_exact() -> None:
    batch = Collator(pad_id=0, max_seq_len=8)([A, B])
    assert batch.input_ids.tolist() == [[1, 2, 3, 0, 0], [4, 5, 6, 7, 8]]
    assert batch.labels.tolist() == [[X, 2, 3, X, X], [X, X, 6, 7, 8]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch.feature_mask.tolist() == [[False] * 5, [False, True, True, False, False]]
    assert batch.position_ids is None and batch.input_ids.dtype == batch.labels.dtype == torch.long
    assert batch.pixel_values.shape == (1, 3, 2, 2) and batch.num_views.tolist() == [1]
    assert (batch.num_samples, batch.num_tokens, batch.padding_fraction) == (2, 8, 0.2)
    assert batch.tasks == ["t1", "t4"]


def test_padding_rounds_up_to_a_multiple_but_not_past_max_seq_len() -> None:
    assert Collator(0, 16, pad_to_multiple_of=4)([A, B]).input_ids.shape == (2, 8)
    assert Collator(0, 6, pad_to_multiple_of=4)([A, B]).input_ids.shape == (2, 6)
    assert Collator(0, 16, pad_to_multiple_of=4)([A]).input_ids.tolist() == [[1, 2, 3, 0]]
    assert Collator(0, 8)([A, C]).pixel_values.shape == (2, 3, 2, 2)


def test_packing_first_fit_with_position_resets() -> None:
    batch = Collator(pad_id=0, max_seq_len=6, pack=True, pad_to_multiple_of=3)([A, B, C])
    # First fit: A (3) opens row 0, B (5) does not fit beside it and opens row 1, C (2) joins row 0.
    assert batch.input_ids.tolist() == [[1, 2, 3, 9, 10, 0], [4, 5, 6, 7, 8, 0]]
    assert batch.labels.tolist() == [[X, 2, 3, X, 10, X], [X, X, 6, 7, 8, X]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 0]]
    assert batch.attention_mask is None and batch.tasks == ["t1", "t9", "t4"]
    # transformers reads the resets as separate sequences: a block-diagonal causal mask, padding on its own.
    blocks = find_packed_sequence_indices(batch.position_ids)
    assert blocks.tolist() == [[0, 0, 0, 1, 1, 2], [0, 0, 0, 0, 0, 1]]
    assert (batch.num_tokens, batch.padding_fraction) == (10, 2 / 12)


def test_pixels_follow_the_feature_slots_row_then_position() -> None:
    batch = Collator(0, 6, pack=True)([A, B, C])
    # Row 0 holds C's slot (2 views), row 1 holds B's slots (1 view): C's views come first.
    assert batch.pixel_values[:, 0, 0, 0].tolist() == [2.0, 2.0, 1.0]
    assert batch.num_views.tolist() == [2, 1]
    flat = batch.feature_mask.flatten().nonzero().flatten().tolist()
    assert flat == [4, 6, 7]  # rows of 5: C's slot in row 0, then B's two in row 1
    padded = Collator(0, 8)([B, A, C])
    assert padded.pixel_values[:, 0, 0, 0].tolist() == [1.0, 2.0, 2.0]


def test_labels_and_feature_mask_stay_aligned_with_ids() -> None:
    span = build_image_span([[0, 1], [2, 3]], TOKENS, num_features=3)
    made = tokenize_conversation(
        [Turn("user", "p"), Turn("assistant", "<|image|>")], [span], lambda t: [ord(c) for c in t], TOKENS
    )
    item = {
        "ids": made.ids,
        "labels": made.labels,
        "feature_mask": made.feature_mask,
        "pixel_values": torch.zeros(1, 3, 2, 2),
    }
    for collator in (Collator(TOKENS.pad, 64, pad_to_multiple_of=8), Collator(TOKENS.pad, 64, pack=True)):
        batch = collator([A, item])
        ids, labels, slots = batch.input_ids, batch.labels, batch.feature_mask
        assert (ids[slots] == TOKENS.feature).all() and int(slots.sum()) == 3
        assert (labels[slots] == X).all()
        supervised = labels != X
        assert torch.equal(labels[supervised], ids[supervised])  # unshifted: a label is its own position's id


def test_loss_weights_follow_each_sample() -> None:
    assert Collator(0, 8)([A, B]).loss_weights is None  # every weight 1: no tensor
    heavy = {**C, "loss_weight": 3.0}
    batch = Collator(pad_id=0, max_seq_len=6, pack=True)([A, B, heavy])
    assert batch.input_ids.tolist() == [[1, 2, 3, 9, 10], [4, 5, 6, 7, 8]]
    assert batch.loss_weights.tolist() == [[1, 1, 1, 3, 3], [1, 1, 1, 1, 1]]
    padded = Collator(pad_id=0, max_seq_len=6)([heavy, A])
    assert padded.loss_weights.tolist() == [[3, 3, 0], [1, 1, 1]]
    assert batch.loss_weights.dtype == torch.float32


def test_first_fit_rows() -> None:
    assert first_fit([3, 3, 2], 5) == [[0, 2], [1]]
    assert first_fit([4, 1, 1, 4], 5) == [[0, 1], [2, 3]]
    rows = FirstFitRows(capacity=5, max_rows=1)
    assert rows.add(0, 3) and rows.add(1, 2) and not rows.add(2, 1) and rows.rows == [[0, 1]]
    with pytest.raises(ValueError, match="sample 1 has 7 ids, more than a row of 5"):
        first_fit([1, 7], 5)


def test_bad_batches_are_named() -> None:
    with pytest.raises(ValueError, match="row 1 holds 5 ids, more than max_seq_len=4"):
        Collator(0, 4)([A, B])
    no_pixels = {**B, "pixel_values": None}
    with pytest.raises(ValueError, match="row 0, position 3 has feature slots but no pixel_values"):
        Collator(0, 8, pack=True)([A, no_pixels])
    with pytest.raises(ValueError, match="empty list"):
        Collator(0, 8)([])
    with pytest.raises(ValueError, match="need Collator\\(pack=True\\)"):
        Collator(0, 8).collate_rows([[A, C]])
