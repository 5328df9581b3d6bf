"""Conversation template: exact ids, answer-only labels, images, and errors that name the problem."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import TOKENS
from unified_mllm.data.conversation import (
    IGNORE_INDEX,
    ConversationError,
    Turn,
    tokenize_conversation,
    turns_from_qas,
    turns_from_records,
)
from unified_mllm.layout import PlaceholderMismatchError, build_image_span, generation_prompt


def encode(text: str) -> list[int]:
    return [ord(c) for c in text]  # one id per character keeps expected values readable


def test_understanding_sample_is_exact() -> None:
    span = build_image_span([[1, 2]], TOKENS, num_features=1)
    turns = [Turn("user", "<|image|>Q"), Turn("assistant", "A")]
    sample = tokenize_conversation(turns, [span], encode, TOKENS)
    assert sample.ids.tolist() == [100, *span, ord("Q"), 107, ord("A"), 107]
    expected = [IGNORE_INDEX] * (1 + len(span) + 2) + [ord("A"), 107]
    assert sample.labels.tolist() == expected
    assert sample.feature_mask.sum() == 1 and sample.ids[sample.feature_mask].tolist() == [TOKENS.feature]


def test_multi_turn_with_system_supervises_every_answer_only() -> None:
    turns = [Turn("system", "S"), *turns_from_qas([["q1", "a1"], ["q2", "a2"]])]
    sample = tokenize_conversation(turns, [], encode, TOKENS)
    supervised = "".join(chr(t) if t < 100 else "|" for t in sample.labels[sample.labels != IGNORE_INDEX])
    assert supervised == "a1|a2|"  # each answer with its end-of-turn, nothing else


def test_generation_answer_supervises_span_but_not_feature_slots() -> None:
    span = build_image_span([[3, 4], [5, 6]], TOKENS, num_features=3)
    sample = tokenize_conversation(
        [Turn("user", "p"), Turn("assistant", "<|image|>")], [span], encode, TOKENS
    )
    labels = sample.labels[3:]  # after <bos> p <eot>
    assert (labels[sample.feature_mask[3:]] == IGNORE_INDEX).all()
    kept = labels[~sample.feature_mask[3:]]
    assert kept.tolist() == [t for t in span if t != TOKENS.feature] + [TOKENS.end_of_turn]


def test_generation_prompt_matches_the_template() -> None:
    sample = tokenize_conversation([Turn("user", "red")], [], encode, TOKENS)
    prompt = generation_prompt(encode("red"), TOKENS, 2, 2)
    assert prompt[: len(sample)] == sample.ids.tolist()


def test_records_in_seed_format() -> None:
    records = [{"from": "human", "value": "<|image|>hi"}, {"from": "gpt", "value": "yo"}]
    assert turns_from_records(records) == [Turn("user", "<|image|>hi"), Turn("assistant", "yo")]
    with pytest.raises(ConversationError, match="turn 0"):
        turns_from_records([{"from": "robot", "value": "x"}])


def test_open_last_answer_is_a_prompt() -> None:
    turns = turns_from_qas([["q", None]])
    sample = tokenize_conversation(turns, [], encode, TOKENS)
    assert (sample.labels == IGNORE_INDEX).all() and sample.ids[-1] == TOKENS.end_of_turn
    with pytest.raises(ConversationError, match="not the last turn"):
        turns_from_qas([["q", None], ["q2", "a"]])


def test_images_and_placeholders_must_match() -> None:
    span = build_image_span([[1]], TOKENS)
    with pytest.raises(PlaceholderMismatchError, match="2 <\\|image\\|> placeholder\\(s\\) but 1 image"):
        tokenize_conversation([Turn("user", "<|image|><|image|>")], [span], encode, TOKENS)
    with pytest.raises(PlaceholderMismatchError, match="0 <\\|image\\|> placeholder\\(s\\) but 1 image"):
        tokenize_conversation([Turn("user", "no image here")], [span], encode, TOKENS)


def test_images_are_consumed_across_turns_in_order() -> None:
    a, b = build_image_span([[1]], TOKENS), build_image_span([[2]], TOKENS)
    turns = [Turn("user", "<|image|>"), Turn("assistant", "x"), Turn("user", "<|image|>")]
    ids = tokenize_conversation(turns, [a, b], encode, TOKENS).ids.tolist()
    assert ids.index(TOKENS.code_ids[1]) < ids.index(TOKENS.code_ids[2])


def test_turn_order_is_checked() -> None:
    with pytest.raises(ConversationError, match="expected a user turn"):
        tokenize_conversation([Turn("assistant", "x")], [], encode, TOKENS)
    with pytest.raises(ConversationError, match="at least one turn"):
        tokenize_conversation([], [], encode, TOKENS)
    assert np.array_equal(
        tokenize_conversation([Turn("user", "a")], [], encode, TOKENS).ids, [100, ord("a"), 107]
    )
