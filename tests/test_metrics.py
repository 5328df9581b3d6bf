"""Image-text retrieval recall@k (unified_mllm.metrics) on hand-made similarity matrices, worked out by hand."""

from __future__ import annotations

import pytest
import torch

from unified_mllm.metrics import retrieval_ranks, retrieval_recall

# Image i belongs with text i. By rows (image -> text) the right text's rank is 0, 1 (0.8 beats 0.7) and 2
# (both wrong texts tie the right one at 0.5, and ties count against the query); by columns (text -> image)
# 0, 0 and 1 (0.6 beats 0.5).
SIMILARITY = torch.tensor(
    [
        [0.9, 0.1, 0.6],
        [0.8, 0.7, 0.2],
        [0.5, 0.5, 0.5],
    ]
)


def test_ranks_count_wrong_candidates_at_least_as_similar() -> None:
    eye = torch.eye(3, dtype=torch.bool)
    assert retrieval_ranks(SIMILARITY, eye).tolist() == [0, 1, 2]
    assert retrieval_ranks(SIMILARITY.t(), eye).tolist() == [0, 0, 1]


def test_recall_both_ways_has_the_hand_computed_values() -> None:
    assert retrieval_recall(SIMILARITY, ks=(1, 2, 5)) == {
        "image_to_text": {"recall@1": 1 / 3, "recall@2": 2 / 3, "recall@5": 1.0},
        "text_to_image": {"recall@1": 2 / 3, "recall@2": 1.0, "recall@5": 1.0},
    }
    assert retrieval_recall(SIMILARITY) == retrieval_recall(SIMILARITY, torch.eye(3, dtype=torch.bool))


def test_ties_do_not_depend_on_the_candidates_order() -> None:
    order = torch.tensor([2, 0, 1])
    eye = torch.eye(3, dtype=torch.bool)
    assert retrieval_ranks(SIMILARITY[:, order], eye[:, order]).tolist() == [0, 1, 2]
    collapsed = torch.zeros(4, 4)  # every similarity equal: nothing is found before all 3 wrong candidates
    assert retrieval_recall(collapsed, ks=(1, 3, 4)) == {
        "image_to_text": {"recall@1": 0.0, "recall@3": 0.0, "recall@4": 1.0},
        "text_to_image": {"recall@1": 0.0, "recall@3": 0.0, "recall@4": 1.0},
    }


def test_several_right_candidates_count_the_best_one() -> None:
    # Texts 0 and 1 are the same caption, so both are right for images 0 and 1. Image 0: its best right text
    # (1, at 0.8) is first; image 1: 0.3 and 0.2 for its right texts, wrong text 2 at 0.4 comes first.
    similarity = torch.tensor([[0.1, 0.8, 0.3], [0.3, 0.2, 0.4], [0.0, 0.5, 0.7]])
    matches = torch.tensor([[True, True, False], [True, True, False], [False, False, True]])
    assert retrieval_ranks(similarity, matches).tolist() == [0, 1, 0]
    # Columns: text 0 is found by image 1 (0.3) against wrong image 2 (0.0): rank 0; text 1 by image 0 (0.8):
    # 0; text 2's right image 2 (0.7) is first: 0.
    assert retrieval_ranks(similarity.t(), matches.t()).tolist() == [0, 0, 0]
    assert retrieval_recall(similarity, matches, ks=(1,)) == {
        "image_to_text": {"recall@1": 2 / 3},
        "text_to_image": {"recall@1": 1.0},
    }


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="right candidate"):
        retrieval_ranks(SIMILARITY, torch.zeros(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="one shape"):
        retrieval_ranks(SIMILARITY, torch.eye(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="square"):
        retrieval_recall(SIMILARITY[:2])
    with pytest.raises(ValueError, match="k >= 1"):
        retrieval_recall(SIMILARITY, ks=(0,))
