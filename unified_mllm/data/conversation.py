"""Conversation template with answer-only label masking.

A conversation is ``<bos>`` followed by its turns, each rendered as ``message <end-of-turn>`` with no role
prefix (Chameleon / Lumina-mGPT's template; the position of a turn tells the model who speaks). An optional
system turn comes first. ``<|image|>`` placeholders in any turn are replaced, in order, by the image spans
given with the conversation (:func:`unified_mllm.layout.expand_image_placeholders`).

Labels follow the UniToken recipe: only assistant turns are supervised, including their ``<end-of-turn>``
(so the model learns to stop); an image span inside an answer (text-to-image) is supervised except its
feature slots, which carry continuous features and nothing to predict. Everything else is ``IGNORE_INDEX``.
Labels are *not* shifted here; the loss shifts them once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from unified_mllm.config import ModelConfig
from unified_mllm.layout import (
    IMAGE_PLACEHOLDER,
    PlaceholderMismatchError,
    SpecialTokens,
    continuous_mask,
    count_placeholders,
    expand_image_placeholders,
)

IGNORE_INDEX = -100
Role = Literal["system", "user", "assistant"]
# The seed projects' conversation records ({"from": "human"|"gpt", "value": ...}).
_ROLE_ALIASES: dict[str, Role] = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}


class ConversationError(ValueError):
    """A conversation whose turns or images do not fit the template."""


@dataclass(frozen=True)
class Turn:
    role: Role
    text: str


@dataclass(frozen=True)
class TokenizedSample:
    """One training sequence: ``ids``, ``labels`` (IGNORE_INDEX where unsupervised), feature-slot mask, and
    for tokenizers with D codes a position (UniTok, DualToken) ``code_stacks [n, D]``: the codes of each of
    the sequence's ``n`` code positions in order (a position's id is its first code's) with ``code_mask``
    marking those positions."""

    ids: np.ndarray
    labels: np.ndarray
    feature_mask: np.ndarray
    code_stacks: np.ndarray | None = None
    code_mask: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ids)


def turns_from_records(records: Sequence[Mapping[str, str]]) -> list[Turn]:
    """Turns from ``[{"from": "human"|"gpt"|"system", "value": text}, ...]`` (or ``role``/``content``)."""
    turns = []
    for i, record in enumerate(records):
        role = record.get("from", record.get("role"))
        text = record.get("value", record.get("content"))
        if role not in _ROLE_ALIASES or not isinstance(text, str):
            raise ConversationError(
                f"turn {i}: expected a role in {sorted(_ROLE_ALIASES)} and a text, got {record!r}"
            )
        turns.append(Turn(_ROLE_ALIASES[role], text))
    return turns


def turns_from_qas(qas: Sequence[Sequence[str | None]], system: str | None = None) -> list[Turn]:
    """Turns from the seeds' ``[[question, answer], ...]`` form; a final ``None`` answer is left open."""
    turns = [Turn("system", system)] if system else []
    for i, pair in enumerate(qas):
        if len(pair) != 2:
            raise ConversationError(f"qas[{i}] must be [question, answer], got {pair!r}")
        question, answer = pair
        turns.append(Turn("user", str(question)))
        if answer is not None:
            turns.append(Turn("assistant", str(answer)))
        elif i != len(qas) - 1:
            raise ConversationError(f"qas[{i}] has no answer but is not the last turn")
    return turns


def _check_order(turns: Sequence[Turn]) -> None:
    if not turns:
        raise ConversationError("a conversation needs at least one turn")
    body = turns[1:] if turns[0].role == "system" else turns
    for i, turn in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if turn.role != expected:
            raise ConversationError(
                f"turn {i}: expected a {expected} turn, got {turn.role} ({turn.text[:40]!r})"
            )


def tokenize_conversation(
    turns: Sequence[Turn],
    image_spans: Sequence[Sequence[int]],
    encode: Callable[[str], list[int]],
    tokens: SpecialTokens,
) -> TokenizedSample:
    """Render ``turns`` with their ``image_spans`` into ids, answer-only labels and the feature mask.

    A conversation that ends with a user turn is a prompt: the caller continues it (inference).
    """
    _check_order(turns)
    total = sum(count_placeholders(t.text) for t in turns)
    if total != len(image_spans):
        raise PlaceholderMismatchError(
            f"conversation has {total} <|image|> placeholder(s) but {len(image_spans)} image(s) were given"
        )
    ids, supervised = [tokens.bos], [False]
    next_image = 0
    for turn in turns:
        n_images = count_placeholders(turn.text)
        turn_ids = expand_image_placeholders(
            turn.text, image_spans[next_image : next_image + n_images], encode
        )
        next_image += n_images
        turn_ids.append(tokens.end_of_turn)
        ids.extend(turn_ids)
        supervised.extend([turn.role == "assistant"] * len(turn_ids))
    ids_arr = np.asarray(ids, dtype=np.int64)
    slots = ids_arr == tokens.feature
    # The continuous part of a span (its slots, and the row ends of UniToken's AnyRes layout) is never predicted.
    labels = np.where(np.asarray(supervised) & ~continuous_mask(ids_arr, tokens), ids_arr, IGNORE_INDEX)
    return TokenizedSample(ids=ids_arr, labels=labels, feature_mask=slots)


def t2i_answer_prefix_ids(model: ModelConfig, token_to_id: Callable[[str], int]) -> tuple[int, ...]:
    """The ids a text-to-image answer opens with before ``<image-start>``: ``model.t2i_answer_prefix`` looked up
    by name under ``model.prompt_style`` unitoken, none otherwise (our style)."""
    if model.prompt_style != "unitoken" or not model.t2i_answer_prefix:
        return ()
    return (int(token_to_id(model.t2i_answer_prefix)),)


def unconditional_t2i_sample(span: Sequence[int], tokens: SpecialTokens) -> TokenizedSample:
    """A text-to-image sample whose condition was dropped, in UniToken's form (``model.prompt_style``
    unitoken): the image span alone, then ``<end-of-turn>`` (no ``<bos>``, no text), which is how its solvers'
    unconditional CFG branch starts; supervised like an answer (the continuous part excepted)."""
    ids = np.asarray([*span, tokens.end_of_turn], dtype=np.int64)
    labels = np.where(~continuous_mask(ids, tokens), ids, IGNORE_INDEX)
    return TokenizedSample(ids=ids, labels=labels, feature_mask=ids == tokens.feature)


def place_images_implicitly(turns: Sequence[Turn], num_images: int) -> list[Turn]:
    """UniToken's rule for images no ``<|image|>`` places (``model.prompt_style`` unitoken): they go at the
    start of the first user turn, each followed by a space (xllmx ``insert_implicit_media_symbol_in_q1``)."""
    turns = list(turns)
    if num_images == 0 or any(count_placeholders(t.text) for t in turns):
        return turns
    first = next(i for i, t in enumerate(turns) if t.role == "user")
    turns[first] = Turn("user", (IMAGE_PLACEHOLDER + " ") * num_images + turns[first].text)
    return turns
