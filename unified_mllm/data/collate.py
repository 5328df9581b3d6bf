"""Batching of training samples: right padding, or packing several samples into one row.

**Padding** (``pack=False``): one sample per row, right-padded with ``pad_id`` to the longest sample of the batch
(rounded up to ``pad_to_multiple_of``, never past ``max_seq_len``); ``attention_mask [B, T]`` is 1 on real tokens.

**Packing** (``pack=True``): samples go first-fit into rows of at most ``max_seq_len`` ids. A packed row carries
``position_ids [B, T]`` that restart at 0 at every sample start (and in the padding at its end) and *no*
attention mask: transformers derives a block-diagonal causal mask from the position resets
(``masking_utils.find_packed_sequence_indices``), so no sample attends to another. Labels are never shifted
here: the loss shifts them once, and since each sample ends with its ``<end-of-turn>`` label and the next one
starts with ``IGNORE_INDEX`` (``<bos>``), no target crosses a sample boundary.

Samples are mappings with ``ids``, ``labels``, ``feature_mask`` (1-D numpy arrays), ``pixel_values`` (a tensor
``[n_views, 3, S, S]`` covering the sample's feature slots, or None), optionally ``feature_index`` (``[n_slots,
2]``, which feature of its views each slot takes), ``code_stacks`` (``[n, D]``
for the sample's code positions), ``task``, ``source`` and ``loss_weight`` (default 1); a :class:`Batch` comes out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from unified_mllm.data.conversation import IGNORE_INDEX

Sample = Mapping[str, Any]


@dataclass
class Batch:
    """One collated micro-batch (``B`` rows of ``T`` positions); tensors on the host until :meth:`to`."""

    input_ids: torch.Tensor
    """``[B, T]`` long: the ids, ``pad_id`` on padding."""
    labels: torch.Tensor
    """``[B, T]`` long, unshifted: ``IGNORE_INDEX`` on padding, prompts and code-stack positions."""
    feature_mask: torch.Tensor
    """``[B, T]`` bool: the SigLIP feature slots."""
    num_views: torch.Tensor
    """``[N_images]`` long: views per image (one image per sample with feature slots), in the order of
    ``pixel_values`` (what ``anyres.split_image_features`` takes)."""
    num_samples: int
    """Samples in the batch."""
    num_tokens: int
    """Real (non-padding) ids."""
    padding_fraction: float
    """Share of the ``B x T`` positions that are padding."""
    tasks: list[str]
    """Each sample's task, in row order."""
    attention_mask: torch.Tensor | None = None
    """``[B, T]`` long, 1 on real tokens (padding); None when packing."""
    position_ids: torch.Tensor | None = None
    """``[B, T]`` long, restarting at 0 at every sample start (packing); None when padding."""
    pixel_values: torch.Tensor | None = None
    """``[N_views, 3, S, S]`` float: the SigLIP views of every image in the order of their feature slots (row,
    then position in the row), each image's base view then its tiles; None without feature slots."""
    feature_index: torch.Tensor | None = None
    """``[N_slots, 2]`` long: (view in ``pixel_values``, patch) of every feature slot in row-major order, when a
    sample's slots take a selection of its features (UniToken's AnyRes layout, ``anyres.feature_index``); None
    when every feature fills the next slot (our layout)."""
    code_cells: torch.Tensor | None = None
    """``[B, T, 2]`` long: the grid cell (row, column) of every image code, -1 elsewhere; only with the
    collator's ``code_cells`` (``model.grid_positions``)."""
    code_stacks: torch.Tensor | None = None
    """``[N_positions, D]`` long: for tokenizers with D codes a position (UniTok, DualToken), the codes of every
    code position in the order of ``input_ids``; None otherwise (and then ``code_mask`` / ``code_targets`` too)."""
    code_mask: torch.Tensor | None = None
    """``[B, T]`` bool: the code positions of ``code_stacks``."""
    code_targets: torch.Tensor | None = None
    """``[B, T]`` bool: the code positions whose stack carries a loss (the depth heads predict them)."""
    loss_weights: torch.Tensor | None = None
    """``[B, T]`` float: each position's sample ``loss_weight`` (0 on padding); None when every weight is 1."""
    source_ids: torch.Tensor | None = None
    """``[B, T]`` long: each position's sample ``source`` (-1 on padding); None when the samples carry none."""
    data_state: dict[str, Any] | None = None
    """The data stream's position after this batch (set by the stream; what a trainer checkpoints)."""

    # The fields UnifiedModel.forward takes, by its own argument names.
    MODEL_INPUTS = (
        "input_ids",
        "attention_mask",
        "position_ids",
        "pixel_values",
        "feature_mask",
        "feature_index",
        "code_stacks",
        "code_mask",
        "code_targets",
        "code_cells",
    )

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """The keyword arguments of ``UnifiedModel.forward`` this batch provides (absent ones left out)."""
        return {name: getattr(self, name) for name in self.MODEL_INPUTS if getattr(self, name) is not None}

    def _map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
        changes = {
            f.name: fn(value)
            for f in dataclasses.fields(self)
            if isinstance(value := getattr(self, f.name), torch.Tensor)
        }
        return dataclasses.replace(self, **changes)

    def to(self, device: torch.device | str, non_blocking: bool = True) -> Batch:
        """A copy with every tensor on ``device`` (statistics, tasks and ``data_state`` as they are)."""
        return self._map_tensors(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        """A copy with every tensor in pinned host memory (what ``DataLoader(pin_memory=True)`` calls)."""
        return self._map_tensors(torch.Tensor.pin_memory)


class FirstFitRows:
    """Incremental first-fit packing: :meth:`add` puts an item into the first row with room for it.

    With ``max_rows`` set, an item that fits in no open row and finds no free row is refused (``add`` returns
    False): the caller closes the batch and starts the next one with that item.
    """

    def __init__(self, capacity: int, max_rows: int | None = None) -> None:
        if capacity < 1 or (max_rows is not None and max_rows < 1):
            raise ValueError(f"need capacity >= 1 and max_rows >= 1, got {capacity} and {max_rows}")
        self.capacity, self.max_rows = capacity, max_rows
        self.rows: list[list[int]] = []
        self.used: list[int] = []

    def add(self, item: int, length: int) -> bool:
        """Place ``item`` of ``length`` ids; False when it does not fit (rows full, or longer than a row)."""
        if length > self.capacity:
            return False
        for row, used in enumerate(self.used):
            if used + length <= self.capacity:
                self.rows[row].append(item)
                self.used[row] += length
                return True
        if self.max_rows is not None and len(self.rows) >= self.max_rows:
            return False
        self.rows.append([item])
        self.used.append(length)
        return True


def first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of ``lengths`` packed first-fit into rows of at most ``capacity``, e.g. ``[3, 3, 2], 5`` →
    ``[[0, 2], [1]]``. A length above ``capacity`` is an error."""
    packer = FirstFitRows(capacity)
    for i, length in enumerate(lengths):
        if not packer.add(i, int(length)):
            raise ValueError(f"sample {i} has {length} ids, more than a row of {capacity}")
    return packer.rows


class Collator:
    """Turn samples into a padded (or packed) :class:`Batch`."""

    def __init__(
        self,
        pad_id: int,
        max_seq_len: int,
        pack: bool = False,
        pad_to_multiple_of: int = 1,
        code_cells: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if max_seq_len < 1 or pad_to_multiple_of < 1:
            raise ValueError(
                f"need max_seq_len >= 1 and pad_to_multiple_of >= 1, got {max_seq_len}, {pad_to_multiple_of}"
            )
        self.pad_id, self.max_seq_len = pad_id, max_seq_len
        self.pack, self.pad_to_multiple_of = pack, pad_to_multiple_of
        self.code_cells = code_cells

    def __call__(self, samples: Sequence[Sample]) -> Batch:
        """Pad ``samples`` one per row, or (``pack``) first-fit them into as few rows as they need."""
        if not samples:
            raise ValueError("cannot collate an empty list of samples")
        if self.pack:
            rows = first_fit([len(s["ids"]) for s in samples], self.max_seq_len)
        else:
            rows = [[i] for i in range(len(samples))]
        return self.collate_rows([[samples[i] for i in row] for row in rows])

    def _length(self, longest: int) -> int:
        multiple = self.pad_to_multiple_of
        return min(-(-longest // multiple) * multiple, self.max_seq_len)

    def collate_rows(self, rows: Sequence[Sequence[Sample]]) -> Batch:
        """A batch whose row ``b`` holds the samples of ``rows[b]`` in order (one each when not packing)."""
        if not rows or not all(rows):
            raise ValueError("every row needs at least one sample")
        if not self.pack and any(len(row) != 1 for row in rows):
            raise ValueError("rows of several samples need Collator(pack=True)")
        lengths = [sum(len(s["ids"]) for s in row) for row in rows]
        for b, length in enumerate(lengths):
            if length > self.max_seq_len:
                raise ValueError(f"row {b} holds {length} ids, more than max_seq_len={self.max_seq_len}")
        batch, width = len(rows), self._length(max(lengths))
        ids = np.full((batch, width), self.pad_id, dtype=np.int64)
        labels = np.full((batch, width), IGNORE_INDEX, dtype=np.int64)
        slots = np.zeros((batch, width), dtype=bool)
        positions = np.zeros((batch, width), dtype=np.int64)
        views: list[torch.Tensor] = []
        indices: list[np.ndarray] = []
        any_index = any(s.get("feature_index") is not None for row in rows for s in row)
        stacks: list[np.ndarray] = []
        code_slots = np.zeros((batch, width), dtype=bool)
        weights = np.zeros((batch, width), dtype=np.float32)
        sources = np.full((batch, width), -1, dtype=np.int64)
        for b, row in enumerate(rows):
            start = 0
            for sample in row:
                end = start + len(sample["ids"])
                if not len(sample["labels"]) == len(sample["feature_mask"]) == end - start:
                    raise ValueError(f"row {b}: a sample's ids, labels and feature_mask differ in length")
                ids[b, start:end], labels[b, start:end] = sample["ids"], sample["labels"]
                slots[b, start:end] = sample["feature_mask"]
                positions[b, start:end] = np.arange(end - start)
                weights[b, start:end] = sample.get("loss_weight", 1.0)
                sources[b, start:end] = sample.get("source", -1)
                sample_views = _sample_views(sample, (b, start))
                if any_index and sample_views:
                    indices.append(_sample_feature_index(sample, sum(v.shape[0] for v in views)))
                views += sample_views
                if sample.get("code_stacks") is not None:
                    stacks.append(sample["code_stacks"])
                    code_slots[b, start:end] = sample["code_mask"]
                start = end
            # Padding restarts its positions too: a block of its own, so pad tokens attend to no sample.
            positions[b, start:] = np.arange(width - start)
        input_ids = torch.from_numpy(ids)
        code_mask = code_targets = None
        if stacks:
            # Stacked codes are predicted by the depth heads, not by the LM head: their positions leave the
            # labels and become code_targets (the supervised ones) instead.
            code_mask = torch.from_numpy(code_slots)
            code_targets = torch.from_numpy(code_slots & (labels != IGNORE_INDEX))
            labels[code_slots] = IGNORE_INDEX
        samples = [s for row in rows for s in row]
        num_tokens = int(sum(lengths))
        weighted = any(s.get("loss_weight", 1.0) != 1.0 for s in samples)
        return Batch(
            input_ids=input_ids,
            labels=torch.from_numpy(labels),
            feature_mask=torch.from_numpy(slots),
            num_views=torch.tensor([v.shape[0] for v in views], dtype=torch.long),
            num_samples=len(samples),
            num_tokens=num_tokens,
            padding_fraction=(batch * width - num_tokens) / (batch * width),
            tasks=[str(s.get("task", "")) for s in samples],
            attention_mask=None
            if self.pack
            else torch.from_numpy((np.arange(width) < np.asarray(lengths)[:, None]).astype(np.int64)),
            position_ids=torch.from_numpy(positions) if self.pack else None,
            pixel_values=torch.cat(views) if views else None,
            feature_index=torch.from_numpy(np.concatenate(indices)) if indices else None,
            code_cells=self.code_cells(input_ids) if self.code_cells is not None else None,
            # Row-major like input_ids: the stacks of all code positions in the order they appear in the batch.
            code_stacks=torch.from_numpy(np.concatenate(stacks).astype(np.int64)) if stacks else None,
            code_mask=code_mask,
            code_targets=code_targets,
            loss_weights=torch.from_numpy(weights) if weighted else None,
            source_ids=torch.from_numpy(sources) if all("source" in s for s in samples) else None,
        )


def _sample_feature_index(sample: Sample, views_before: int) -> np.ndarray:
    """The sample's ``feature_index`` ``[n_slots, 2]`` with its views counted from ``views_before`` (the views of
    the batch before it); a sample without one takes its features in order (view, patch) row-major."""
    index = sample.get("feature_index")
    if index is None:
        pixels = sample["pixel_values"]
        count = int(np.asarray(sample["feature_mask"]).sum())
        per_view = count // pixels.shape[0]
        index = np.stack(np.divmod(np.arange(count), per_view), axis=1)
    index = np.asarray(index, dtype=np.int64).copy()
    index[:, 0] += views_before
    return index


def _sample_views(sample: Sample, where: tuple[int, int]) -> list[torch.Tensor]:
    """``[pixel_values]`` of a sample with feature slots, ``[]`` without; a mismatch is an error."""
    pixels = sample.get("pixel_values")
    has_slots = bool(np.asarray(sample["feature_mask"]).any())
    if has_slots != (pixels is not None):
        state = "has feature slots but no" if has_slots else "has no feature slots but has"
        raise ValueError(f"the sample at row {where[0]}, position {where[1]} {state} pixel_values")
    if pixels is None:
        return []
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise ValueError(
            f"pixel_values must be [n_views, 3, S, S], got {tuple(pixels.shape)} at row {where[0]}"
        )
    return [pixels]
