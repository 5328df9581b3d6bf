"""Continuous batching: many conversations decoded together, joining and leaving between engine steps.

:class:`ContinuousBatcher` keeps one batch of *active* rows, each an answer being written, over one KV cache.
Every :meth:`ContinuousBatcher.step` is one forward for all of them (the ids they picked last time), then
admits waiting rows, then picks one id per row:

* **join**: the waiting rows are prefilled together (:meth:`~unified_mllm.infer.decoding.Decoder.prefill`, their
  images' features scattered as :class:`~unified_mllm.infer.solver.InferenceSolver` does), and their batch and
  cache are merged into the active ones: both are right-aligned at the longer of the two lengths (left padding
  that the additive key bias blocks), then stacked row-wise. Positions count real ids only, so a row reads
  exactly as it would alone.
* **leave**: rows that finished (a stop id, their budget, a stop string the caller saw, a cancelled request)
  are dropped from the batch and the cache; columns that only the departed rows used are trimmed, so the
  batch's width follows the longest *active* row, not the history of the batch.

Greedy rows take the arg-max of the grid-constrained scores; sampled rows apply their own warpers and draw
from their own seeded generator, so a row's ids do not depend on which other rows share its steps. When a row
completes the grid of an image it opened inside its answer, it leaves, the picture is decoded and its span
closed the way training wrote it (the solver's own code), and the row joins again with its whole sequence.

Code-stack tokenizers (UniTok, DualToken) are not batched here: their depth heads sample stacks for all rows
with one policy; the constructor refuses such a model.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicLayer

from unified_mllm.infer.decoding import Cache, DecodeBatch
from unified_mllm.infer.processors import (
    GridConstraint,
    Processor,
    check_non_negative,
    check_top_k,
    next_id_probabilities,
    sampling_processors,
)
from unified_mllm.infer.solver import Answer, InferenceSolver, Pair, answers_feature_index
from unified_mllm.vision.image import ImageSource

GROW = 64  # columns added when the batch runs out of room: a reallocation every 64 steps, not every step


@dataclass(frozen=True)
class Sampling:
    """How one row picks its ids. ``temperature`` 0 (with the export's image temperature 0) is greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int | None = None
    """Text top-k when sampling (None: the export's ``generation.text_top_k``)."""
    seed: int | None = None
    """Seed of the row's generator (None: the export's ``generation.seed``)."""
    stop_ids: tuple[int, ...] | None = None
    """Ids that end the answer (None: end-of-turn and eos; empty: run the whole budget)."""


@dataclass(eq=False)
class Row:
    """One answer being decoded: the solver's answer state plus what the batcher tracks."""

    answer: Answer
    greedy: bool
    warpers: list[Processor]
    generator: torch.Generator
    stop_ids: tuple[int, ...]
    key: Any = None
    """The caller's handle (the server's request and choice)."""
    run: list[int] = field(default_factory=list)
    """Ids written since the row last (re)joined."""
    written: int = 0
    """Ids written in all."""
    finish: str | None = None
    """None while running; then ``"stop"``, ``"length"`` or ``"cancelled"``."""
    cancelled: bool = False


class LiveBatch(DecodeBatch):
    """A :class:`DecodeBatch` whose rows come and go: built from tensors, grown on demand by :meth:`extend`."""

    def __init__(
        self, ids: torch.Tensor, mask: torch.Tensor, length: int, pad: int, dtype: torch.dtype
    ) -> None:
        # Not DecodeBatch.__init__: the rows are already laid out (merged from prefilled batches).
        self.ids, self.mask, self.length, self.pad = ids, mask, length, pad
        self.blocked = torch.finfo(dtype).min
        self.key_bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
        self.key_bias = self.key_bias.masked_fill(mask == 0, self.blocked)[:, None, None, :]
        self.padded = bool((mask[:, :length] == 0).any())
        self.positions = mask[:, :length].sum(dim=1, keepdim=True) - 1

    def extend(self, new_ids: torch.Tensor) -> None:
        if self.length + new_ids.shape[1] > self.capacity:
            grow = self.length + new_ids.shape[1] - self.capacity + GROW
            self.ids = F.pad(self.ids, (0, grow), value=self.pad)
            self.mask = F.pad(self.mask, (0, grow), value=0)
            self.key_bias = F.pad(self.key_bias, (0, grow), value=self.blocked)
        super().extend(new_ids)

    def keep(self, rows: torch.Tensor, start: int) -> None:
        """Keep ``rows`` (indices) and the columns from ``start`` on."""
        self.ids = self.ids[rows, start:]
        self.mask = self.mask[rows, start:]
        self.key_bias = self.key_bias[rows, ..., start:]
        self.positions = self.positions[rows]
        self.length -= start
        self.padded = bool((self.mask[:, : self.length] == 0).any())


def _right_aligned(
    batch: DecodeBatch, length: int, width: int, pad: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch``'s ids and mask with its first ``batch.length`` columns moved to end at column ``length`` of
    ``width`` columns (left padding before)."""
    offset = length - batch.length
    ids = batch.ids.new_full((batch.ids.shape[0], width), pad)
    mask = torch.zeros_like(ids)
    ids[:, offset:length] = batch.ids[:, : batch.length]
    mask[:, offset:length] = batch.mask[:, : batch.length]
    return ids, mask


class _RoomyLayer(DynamicLayer):
    """A dynamic cache layer that writes each step into spare columns of a buffer instead of concatenating
    (transformers' ``DynamicLayer`` copies the whole cache at every step: at 32 rows, most of a step's time).
    ``keys`` / ``values`` are views of the buffer's first ``length`` columns."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.lazy_initialization(keys, values)
        self.buffers = (keys, values)
        self.keys, self.values = keys, values

    @classmethod
    def room_for(cls, like: torch.Tensor, rows: int, length: int) -> _RoomyLayer:
        """An uninitialised layer of ``rows`` x ``length`` columns with room to grow: the caller fills every
        one of the ``length`` columns (padding with zeros: a blocked key still multiplies its value by 0, and
        stale memory may hold NaN); the spare columns are written by :meth:`update` before they are read."""
        shape = (rows, like.shape[1], length + GROW, like.shape[3])
        buffers = [like.new_empty(shape) for _ in range(2)]
        layer = cls(*buffers)
        layer.keys, layer.values = (b[:, :, :length] for b in buffers)
        return layer

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        length, count = self.keys.shape[-2], key_states.shape[-2]
        if length + count > self.buffers[0].shape[-2]:
            self.buffers = tuple(F.pad(old, (0, 0, 0, count + GROW)) for old in (self.keys, self.values))  # type: ignore[assignment]
        keys, values = self.buffers
        keys[:, :, length : length + count] = key_states
        values[:, :, length : length + count] = value_states
        self.keys, self.values = keys[:, :, : length + count], values[:, :, : length + count]
        return self.keys, self.values


def _roomy(cache: Cache) -> None:
    """Give ``cache`` (a prefilled ``DynamicCache``) layers that grow in place."""
    layers = []
    for layer in _cache_layers(cache):
        roomy = _RoomyLayer.room_for(layer.keys, layer.keys.shape[0], layer.keys.shape[2])
        roomy.keys.copy_(layer.keys)
        roomy.values.copy_(layer.values)
        layers.append(roomy)
    cache.layers = layers


def _cache_layers(cache: Cache) -> list[Any]:
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError("continuous batching needs a transformers cache with per-layer keys and values")
    return list(layers)


def _merge_caches(active: Cache, joining: Cache, active_len: int, joining_len: int) -> None:
    """Stack ``joining``'s rows under ``active``'s (one copy into a new buffer), both right-aligned at the
    longer length."""
    length = max(active_len, joining_len)
    merged = []
    for mine, theirs in zip(_cache_layers(active), _cache_layers(joining)):
        rows = mine.keys.shape[0]
        layer = _RoomyLayer.room_for(mine.keys, rows + theirs.keys.shape[0], length)
        for name in ("keys", "values"):
            target = getattr(layer, name)
            target[:rows, :, : length - active_len] = 0
            target[:rows, :, length - active_len :] = getattr(mine, name)
            target[rows:, :, : length - joining_len] = 0
            target[rows:, :, length - joining_len :] = getattr(theirs, name)
        merged.append(layer)
    active.layers = merged


def _keep_cache(cache: Cache, rows: torch.Tensor, start: int) -> None:
    """Keep ``rows`` and the columns from ``start`` on (one copy into a new buffer)."""
    kept = []
    for layer in _cache_layers(cache):
        length = layer.keys.shape[2] - start
        roomy = _RoomyLayer.room_for(layer.keys, rows.numel(), length)
        torch.index_select(layer.keys[:, :, start:], 0, rows, out=roomy.keys)
        torch.index_select(layer.values[:, :, start:], 0, rows, out=roomy.values)
        kept.append(roomy)
    cache.layers = kept


class ContinuousBatcher:
    """Decode many answers of one :class:`InferenceSolver` together (module docstring). Not thread-safe: one
    thread owns it (the server's engine worker) and calls :meth:`submit`, :meth:`cancel` and :meth:`step`."""

    def __init__(self, solver: InferenceSolver, max_batch: int = 32) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if solver.model.code_heads is not None:
            raise ValueError(
                "continuous batching supports VQ-GAN exports; this export's code-stack tokenizer "
                f"({solver.config.model.vq.kind}) samples stacks with one policy for the whole batch"
            )
        self.solver = solver
        self.engine = solver.engine
        self.tokens = solver.tokens
        self.max_batch = max_batch
        self.grid = GridConstraint(self.tokens, size=solver.grid_size(), with_features=solver.with_features)
        self.waiting: deque[Row] = deque()
        self.rows: list[Row] = []
        self._batch: LiveBatch | None = None
        self._cache: Cache | None = None
        self._logits: torch.Tensor | None = (
            None  # [R, V] next-id logits of the active rows (None: forward due)
        )
        self._warpers: dict[tuple[float, float, int | None], list[Processor]] = {}

    # ------------------------------------------------------------------------------------------ requests

    def prepare(self, images: Sequence[ImageSource], qas: Sequence[Pair], max_new_tokens: int) -> Answer:
        """The prompt of one conversation as :meth:`InferenceSolver.generate` renders it (its images read and
        VQ-encoded); ValueError for a conversation the solver refuses. Safe to call from another thread."""
        if isinstance(max_new_tokens, bool) or int(max_new_tokens) != max_new_tokens or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        with torch.inference_mode():
            return self.solver.prepare_answers([list(images)], [list(qas)], int(max_new_tokens))[0]

    def submit(self, answer: Answer, sampling: Sampling = Sampling(), key: Any = None) -> Row:
        """Queue a prepared answer (each call needs its own :meth:`prepare` result); it joins at a step."""
        gen = self.solver.config.generation
        temperature = check_non_negative("temperature", sampling.temperature)
        if not 0 < sampling.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {sampling.top_p}")
        top_k = check_top_k("top_k", gen.text_top_k if sampling.top_k is None else sampling.top_k)
        setting = (temperature, float(sampling.top_p), top_k)
        if setting not in self._warpers:
            self._warpers[setting] = sampling_processors(
                self.tokens,
                image_temperature=gen.temperature,
                text_temperature=temperature,
                image_top_k=gen.image_top_k,
                text_top_k=top_k,
                top_p=sampling.top_p,
            )
        stop_ids = (
            (self.tokens.end_of_turn, self.tokens.eos) if sampling.stop_ids is None else sampling.stop_ids
        )
        row = Row(
            answer=answer,
            greedy=temperature == 0 and gen.temperature == 0,
            warpers=self._warpers[setting],
            generator=self.solver.seeded_generator(sampling.seed),
            stop_ids=tuple(stop_ids),
            key=key,
        )
        self.waiting.append(row)
        return row

    def cancel(self, row: Row) -> None:
        """End ``row`` before the next step (a stop string, a timeout, a client gone)."""
        row.cancelled = True
        if row.finish is None:
            row.finish = "cancelled"

    @property
    def busy(self) -> bool:
        return bool(self.rows or self.waiting)

    def text(self, row: Row) -> str:
        """The answer so far as :meth:`InferenceSolver.generate` writes it (a drawn picture as ``<|image|>``),
        without the stop id or the codes of an image still being drawn."""
        ids = row.run
        if ids and ids[-1] in row.stop_ids:
            ids = ids[:-1]
        if self.tokens.image_start in ids:
            ids = ids[: ids.index(self.tokens.image_start)]
        done = "".join(p if isinstance(p, str) else "<|image|>" for p in row.answer.pieces)
        return done + self.solver.tokenizer.decode(ids)

    # ---------------------------------------------------------------------------------------- decoding

    @torch.inference_mode()
    def step(self) -> list[Row]:
        """One forward for the active rows, the waiting rows joined, one id picked per row. Returns the rows
        that wrote an id (``row.run[-1]``); those that finished have ``row.finish`` set and left the batch."""
        self._leave([i for i, row in enumerate(self.rows) if row.cancelled])
        self.waiting = deque(r for r in self.waiting if not r.cancelled)
        if self.rows and self._logits is None:
            assert self._batch is not None and self._cache is not None
            self._logits = self.engine.step(self._batch, self._cache).logits[:, -1]
        self._join()
        if not self.rows:
            return []
        assert self._batch is not None and self._logits is not None
        picked = self._pick()
        self._batch.extend(picked[:, None])
        grid_done = self.engine.spans.state(self._batch.view()).grid_done.tolist()
        leaving, stepped = [], list(self.rows)
        for index, (row, new) in enumerate(zip(self.rows, picked.tolist())):
            row.run.append(new)
            row.answer.ids.append(new)
            row.answer.budget -= 1
            row.written += 1
            if new in row.stop_ids:
                row.finish = "stop"
            elif grid_done[index]:
                self._close_image(row)
            elif row.answer.budget < 1:
                row.finish = "length"
            if row.finish is not None or grid_done[index]:
                leaving.append(index)
        self._leave(leaving)
        self._logits = None
        return stepped

    def _pick(self) -> torch.Tensor:
        """``[R]`` the next id of every active row. Sampled rows sharing a setting run their warpers together
        (each warper treats rows independently); each row then draws from its own generator."""
        assert self._batch is not None and self._logits is not None
        view = self._batch.view()
        scores = self.grid(view, self._logits)
        picked = scores.argmax(dim=-1)
        groups: dict[int, list[int]] = {}
        for index, row in enumerate(self.rows):
            if not row.greedy:
                groups.setdefault(id(row.warpers), []).append(index)
        for indices in groups.values():
            rows = torch.tensor(indices, device=scores.device)
            mine, ids = scores[rows], view[rows]
            for warper in self.rows[indices[0]].warpers:
                mine = warper(ids, mine)
            probabilities = next_id_probabilities(mine)
            for offset, index in enumerate(indices):
                drawn = torch.multinomial(
                    probabilities[offset : offset + 1], 1, generator=self.rows[index].generator
                )
                picked[index] = drawn[0, 0]
        return picked

    def _close_image(self, row: Row) -> None:
        """The row completed a picture's grid: decode it, close its span and queue the row to join again."""
        answer = row.answer
        self.solver.close_image(answer, row.run)
        answer.budget = min(answer.budget, self.solver.room_after(answer.ids))
        row.run = []
        if answer.budget < 1:
            row.finish = "length"
        else:
            self.waiting.appendleft(row)

    def _join(self) -> None:
        """Prefill as many waiting rows as the batch has room for, together, and merge them in."""
        room = self.max_batch - len(self.rows)
        if room < 1 or not self.waiting:
            return
        joining = [self.waiting.popleft() for _ in range(min(room, len(self.waiting)))]
        answers = [row.answer for row in joining]
        views = [v for a in answers for v in a.views]
        batch = self.engine.new_batch([a.ids for a in answers], 1)
        cache = self.engine.new_cache(batch.capacity, fixed_length=False)
        logits = self.engine.prefill(
            batch,
            cache,
            torch.cat(views) if views else None,
            None,
            answers_feature_index(answers, self.solver.model.features_per_view),
        ).logits[:, -1]
        dtype = batch.key_bias.dtype
        if self._batch is None or self._cache is None or self._logits is None:
            self._batch = LiveBatch(batch.ids, batch.mask, batch.length, self.tokens.pad, dtype)
            self._cache, self._logits = cache, logits
            _roomy(cache)
        else:
            length = max(self._batch.length, batch.length)
            width = length + GROW
            pad = self.tokens.pad
            old_ids, old_mask = _right_aligned(self._batch, length, width, pad)
            new_ids, new_mask = _right_aligned(batch, length, width, pad)
            _merge_caches(self._cache, cache, self._batch.length, batch.length)
            ids, mask = torch.cat([old_ids, new_ids]), torch.cat([old_mask, new_mask])
            self._batch = LiveBatch(ids, mask, length, pad, dtype)
            self._logits = torch.cat([self._logits, logits])
        self.rows += joining

    def _leave(self, indices: list[int]) -> None:
        """Drop the rows at ``indices`` from the batch and cache, and the columns no remaining row uses."""
        if not indices:
            return
        gone = set(indices)
        self.rows = [row for i, row in enumerate(self.rows) if i not in gone]
        if not self.rows:
            self._batch = self._cache = self._logits = None
            return
        assert self._batch is not None and self._cache is not None
        device = self._batch.ids.device
        kept = torch.tensor([i for i in range(len(gone) + len(self.rows)) if i not in gone], device=device)
        used = self._batch.mask[kept, : self._batch.length].any(dim=0)
        start = int(used.nonzero()[0, 0])
        self._batch.keep(kept, start)
        _keep_cache(self._cache, kept, start)
        if self._logits is not None:
            self._logits = self._logits[kept]
