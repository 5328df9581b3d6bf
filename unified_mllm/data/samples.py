"""Training sequences from pre-tokenized records: one builder per task, all through the one conversation template.

A *pre-tokenized record* (written by :mod:`unified_mllm.data.pretokenize`) is the original JSON record of a sample
plus a ``"pretokenized"`` section holding the ids of every text the builders may need, so training never runs
the text tokenizer on data::

    "pretokenized": {
      "version": 1,
      "image_hw": [h, w],              # pixels of the stored image (AnyRes picks its tiles from this)
      "caption": [ids],                # when the record has a "caption" string
      "vqa": [[question ids, answer ids], ...],        # aligned with record["vqa"]
      "t2i": [prompt ids, ...],                         # aligned with record["t2i"]
      "conversations": [[piece ids, ...], ...]          # per turn: the ids of each text piece between
    }                                                   #   <|image|> placeholders (value.split("<|image|>"))

The builders render turns with :func:`~unified_mllm.data.conversation.tokenize_conversation`, whose ``encode`` is
a lookup into those stored ids (:func:`lookup_encoder`): the template exists once, and the texts are those the
inference side encodes, hence the same ids. Tasks:

* **caption**: user ``<|image|>`` + a seeded choice of :data:`CAPTION_INSTRUCTIONS`, assistant = the caption.
* **vqa**: user ``<|image|>`` + question 1, assistant answer 1, user question 2, ... (one image span serves every
  answer): the record's QA pairs in a seeded order, the first ``vqa_max_turns`` of them (all with 0).
* **t2i**: user = the caption or one of the record's prompts (seeded choice), assistant = the image span,
  supervised except its feature slots. With probability ``cfg_dropout`` the user turn is empty, so the ids begin
  with :func:`~unified_mllm.layout.unconditional_prompt`: the unconditional branch of classifier-free guidance.
  With ``model.prompt_style`` unitoken (UniToken's published prompts) the answer opens with the
  ``model.t2i_answer_prefix`` token, and a dropped condition leaves the image span alone (no ``<bos>``, no turn).
* **conversation**: the record's ``conversations`` turns as given, at most one ``<|image|>``.

Understanding prompts put the question straight after the image placeholder, as an inference prompt does. Image
spans carry 0 feature slots without the continuous branch (``with_features`` off), else
:func:`~unified_mllm.vision.anyres.image_feature_block` of the stored image's size. Every random choice comes from
the generator the caller passes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from unified_mllm.config import VisionConfig
from unified_mllm.data.conversation import (
    IGNORE_INDEX,
    ConversationError,
    TokenizedSample,
    Turn,
    tokenize_conversation,
    turns_from_records,
    unconditional_t2i_sample,
)
from unified_mllm.layout import (
    IMAGE_PLACEHOLDER,
    FeatureBlock,
    SpecialTokens,
    build_image_span,
    count_placeholders,
)
from unified_mllm.vision.anyres import image_feature_block

Task = Literal["caption", "vqa", "t2i", "conversation"]
TASKS: tuple[Task, ...] = ("caption", "vqa", "t2i", "conversation")
PRETOKENIZED_KEY = "pretokenized"
PRETOKENIZED_VERSION = 1

# Short, plain instructions: the model should not learn that one fixed string means "caption".
CAPTION_INSTRUCTIONS = (
    "Describe the image.",
    "What is in this picture?",
    "Write a short caption for the image.",
    "Describe this scene briefly.",
)


class RecordError(ValueError):
    """A record that cannot give a sample of the requested task; the message names the record and field."""


@dataclass(frozen=True)
class TokenizedRecord:
    """One pre-tokenized sample: its key, code grid ``codes [h, w]`` (``[h, w, D]`` for tokenizers with D codes
    a position) and JSON record (with ``pretokenized``)."""

    key: str
    codes: np.ndarray
    meta: Mapping[str, Any]

    @property
    def tokens(self) -> Mapping[str, Any]:
        section = self.meta.get(PRETOKENIZED_KEY)
        if not isinstance(section, Mapping):
            raise RecordError(
                f"record {self.key!r} has no {PRETOKENIZED_KEY!r} section: read shards written by "
                "python -m unified_mllm.data.pretokenize"
            )
        return section

    @property
    def image_hw(self) -> tuple[int, int]:
        """``(height, width)`` in pixels of the stored image."""
        height, width = self.tokens["image_hw"]
        return int(height), int(width)


# ------------------------------------------------------------------------------------------ writing side


def _texts(meta: Mapping[str, Any], field: str, inner: str, where: str) -> list[Mapping[str, Any]]:
    entries = meta[field]
    if not isinstance(entries, list) or not all(
        isinstance(e, Mapping) and isinstance(e.get(inner), str) for e in entries
    ):
        raise RecordError(f"{where}: `{field}` must be a list of objects with a `{inner}` string")
    return entries


def encode_record_texts(
    meta: Mapping[str, Any], encode: Callable[[str], list[int]], image_hw: tuple[int, int], where: str
) -> dict[str, Any]:
    """The ``pretokenized`` section of ``meta`` (see the module docstring): ids of every text a builder uses.

    ``where`` names the record in errors (shard and key). Conversations may hold at most one ``<|image|>``:
    each sample stores a single image.
    """
    section: dict[str, Any] = {"version": PRETOKENIZED_VERSION, "image_hw": [int(v) for v in image_hw]}
    if "caption" in meta:
        if not isinstance(meta["caption"], str):
            raise RecordError(f"{where}: `caption` must be a string")
        section["caption"] = encode(meta["caption"])
    if "vqa" in meta:
        entries = _texts(meta, "vqa", "question", where)
        if not all(isinstance(e.get("answer"), str) for e in entries):
            raise RecordError(f"{where}: every `vqa` entry needs an `answer` string")
        section["vqa"] = [[encode(e["question"]), encode(e["answer"])] for e in entries]
    if "t2i" in meta:
        section["t2i"] = [encode(e["prompt"]) for e in _texts(meta, "t2i", "prompt", where)]
    if "conversations" in meta:
        try:
            turns = turns_from_records(meta["conversations"])
        except (ConversationError, AttributeError, TypeError) as exc:
            raise RecordError(f"{where}: bad `conversations`: {exc}") from exc
        images = sum(count_placeholders(t.text) for t in turns)
        if images > 1:
            raise RecordError(
                f"{where}: the conversation has {images} {IMAGE_PLACEHOLDER} placeholders; a sample stores "
                "one image, so at most one is supported"
            )
        section["conversations"] = [
            [encode(piece) if piece else [] for piece in t.text.split(IMAGE_PLACEHOLDER)] for t in turns
        ]
    return section


# ------------------------------------------------------------------------------------------ reading side


def lookup_encoder(pairs: Sequence[tuple[str, Sequence[int]]], where: str) -> Callable[[str], list[int]]:
    """An ``encode`` for :func:`tokenize_conversation` that returns stored ids of known texts (never tokenizes)."""
    table = {text: [int(t) for t in ids] for text, ids in pairs}

    def encode(text: str) -> list[int]:
        try:
            return list(table[text])
        except KeyError:
            raise RecordError(f"{where}: text {text[:60]!r} was not pre-tokenized") from None

    return encode


def _field(record: TokenizedRecord, name: str, task: str) -> Any:
    value = record.tokens.get(name)
    if not value:
        raise RecordError(f"record {record.key!r} has no `{name}`, which task {task!r} needs")
    return value


def _render(
    record: TokenizedRecord,
    turns: Sequence[Turn],
    pairs: Sequence[tuple[str, Sequence[int]]],
    tokens: SpecialTokens,
    num_features: int | FeatureBlock,
    span_prefix: Sequence[int] = (),
    span_only: bool = False,
) -> TokenizedSample:
    """The conversation with the record's image span at its ``<|image|>`` (if any), from stored ids;
    ``span_prefix`` ids go right before the span, ``span_only`` makes the sample the span alone (UniToken's
    unconditional text-to-image form, :func:`unconditional_t2i_sample`)."""
    has_image = any(count_placeholders(t.text) for t in turns)
    stacked = record.codes.ndim == 3  # [h, w, D]: the span holds the first codes, the stacks ride along
    grid = record.codes[..., 0] if stacked else record.codes
    spans = [[*span_prefix, *build_image_span(grid, tokens, num_features)]] if has_image else []
    if span_only:
        sample = unconditional_t2i_sample(spans[0], tokens)
    else:
        sample = tokenize_conversation(turns, spans, lookup_encoder(pairs, repr(record.key)), tokens)
    if stacked:
        depth = record.codes.shape[-1]
        stacks = record.codes.reshape(-1, depth) if has_image else np.zeros((0, depth), dtype=np.int64)
        sample = dataclasses.replace(sample, code_stacks=stacks, code_mask=tokens.is_code(sample.ids))
    return sample


def caption_sample(
    record: TokenizedRecord,
    tokens: SpecialTokens,
    num_features: int | FeatureBlock,
    instruction: tuple[str, Sequence[int]],
) -> TokenizedSample:
    """``<bos> [image] instruction <eot> caption <eot>``; loss on ``caption <eot>``."""
    caption_ids = _field(record, "caption", "caption")
    text, ids = instruction
    turns = [Turn("user", IMAGE_PLACEHOLDER + text), Turn("assistant", str(record.meta["caption"]))]
    return _render(record, turns, [(text, ids), (turns[1].text, caption_ids)], tokens, num_features)


def vqa_sample(
    record: TokenizedRecord,
    tokens: SpecialTokens,
    num_features: int | FeatureBlock,
    rng: np.random.Generator,
    max_turns: int = 0,
) -> TokenizedSample:
    """The image, then the record's QA pairs in a seeded order (the first ``max_turns``; 0: all) as turns."""
    qa_ids = _field(record, "vqa", "vqa")
    order = rng.permutation(len(qa_ids))
    if max_turns:
        order = order[:max_turns]
    turns, pairs = [], []
    for n, i in enumerate(order):
        entry = record.meta["vqa"][int(i)]
        question, answer = str(entry["question"]), str(entry["answer"])
        turns += [
            Turn("user", IMAGE_PLACEHOLDER + question if n == 0 else question),
            Turn("assistant", answer),
        ]
        pairs += [(question, qa_ids[int(i)][0]), (answer, qa_ids[int(i)][1])]
    return _render(record, turns, pairs, tokens, num_features)


def t2i_sample(
    record: TokenizedRecord,
    tokens: SpecialTokens,
    num_features: int | FeatureBlock,
    rng: np.random.Generator,
    cfg_dropout: float = 0.0,
    prompt_style: str = "native",
    answer_prefix: Sequence[int] = (),
) -> TokenizedSample:
    """``<bos> prompt <eot> [image span] <eot>`` with the prompt dropped (empty) with probability ``cfg_dropout``.

    ``prompt_style`` unitoken (``model.prompt_style``): the answer is ``answer_prefix`` + the span, and a dropped
    prompt leaves the span alone (``[image span] <eot>``, no ``<bos>``): UniToken's unconditional branch."""
    prompts: list[tuple[str, Sequence[int]]] = []
    if record.tokens.get("caption"):
        prompts.append((str(record.meta["caption"]), record.tokens["caption"]))
    for entry, ids in zip(record.meta.get("t2i", []), record.tokens.get("t2i", [])):
        prompts.append((str(entry["prompt"]), ids))
    if not prompts:
        raise RecordError(
            f"record {record.key!r} has neither `caption` nor `t2i` prompts, which task 't2i' needs"
        )
    # Both draws happen on every sample, so the choice stream does not depend on the dropout outcome.
    dropped = bool(rng.random() < cfg_dropout)
    text, ids = prompts[int(rng.integers(len(prompts)))]
    condition = "" if dropped else text
    turns = [Turn("user", condition), Turn("assistant", IMAGE_PLACEHOLDER)]
    if prompt_style == "unitoken":
        prefix = () if dropped else answer_prefix
        return _render(record, turns, [(text, ids)], tokens, num_features, prefix, span_only=dropped)
    return _render(record, turns, [(text, ids)], tokens, num_features)


def conversation_sample(record: TokenizedRecord, tokens: SpecialTokens, num_features: int) -> TokenizedSample:
    """The record's own turns; the image (if a turn names ``<|image|>``) becomes the span at that place."""
    pieces = _field(record, "conversations", "conversation")
    turns = turns_from_records(record.meta["conversations"])
    pairs = [
        (text, ids)
        for turn, turn_ids in zip(turns, pieces)
        for text, ids in zip(turn.text.split(IMAGE_PLACEHOLDER), turn_ids)
        if text
    ]
    sample = _render(record, turns, pairs, tokens, num_features)
    if not (sample.labels != IGNORE_INDEX).any():
        raise RecordError(f"record {record.key!r}: the conversation has no assistant answer to learn")
    return sample


@dataclass(frozen=True)
class SampleBuilder:
    """Builds the sequence of any task from a record (see the module docstring for each task's form).

    ``instructions`` are the caption instructions with their ids (:meth:`encode_instructions`);
    ``with_features`` adds SigLIP feature slots to every image span (off in stage 0).
    """

    tokens: SpecialTokens
    vision: VisionConfig
    with_features: bool
    instructions: tuple[tuple[str, tuple[int, ...]], ...]
    cfg_dropout: float = 0.0
    vqa_max_turns: int = 0
    prompt_style: str = "native"
    """``model.prompt_style``: unitoken builds text-to-image samples as UniToken's solvers prompt them."""
    t2i_answer_prefix: tuple[int, ...] = ()
    """Ids opening a text-to-image answer under ``prompt_style`` unitoken (``model.t2i_answer_prefix``)."""

    @staticmethod
    def encode_instructions(encode: Callable[[str], list[int]]) -> tuple[tuple[str, tuple[int, ...]], ...]:
        """:data:`CAPTION_INSTRUCTIONS` with their ids under ``encode`` (the text tokenizer's)."""
        return tuple((text, tuple(encode(text))) for text in CAPTION_INSTRUCTIONS)

    def feature_block(self, record: TokenizedRecord) -> FeatureBlock:
        """The continuous part of the record's image span: empty without features, else AnyRes's block for its
        size (:func:`~unified_mllm.vision.anyres.image_feature_block`)."""
        return image_feature_block(self.vision, record.image_hw) if self.with_features else FeatureBlock(0)

    def num_features(self, record: TokenizedRecord) -> int:
        """Positions of the continuous part of the record's image span (0 without features; in our layout its
        feature slots, AnyRes's count for its size)."""
        return self.feature_block(record).length

    def build(self, task: str, record: TokenizedRecord, rng: np.random.Generator) -> TokenizedSample:
        """The sample of ``task`` from ``record``; ``rng`` makes every random choice."""
        features = self.feature_block(record)
        if task == "caption":
            pick = int(rng.integers(len(self.instructions)))
            return caption_sample(record, self.tokens, features, self.instructions[pick])
        if task == "vqa":
            return vqa_sample(record, self.tokens, features, rng, self.vqa_max_turns)
        if task == "t2i":
            return t2i_sample(
                record,
                self.tokens,
                features,
                rng,
                self.cfg_dropout,
                self.prompt_style,
                self.t2i_answer_prefix,
            )
        if task == "conversation":
            return conversation_sample(record, self.tokens, features)
        raise RecordError(f"unknown task {task!r}; known tasks: {list(TASKS)}")
