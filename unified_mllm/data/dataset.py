"""The LM training stream: a seeded mixture of pre-tokenized sources, split over ranks, resumable exactly.

**One global stream.** Draw ``g = 0, 1, 2, ...`` picks a source with probability proportional to its ``ratio``
(a generator seeded by ``(seed, g // 4096)``) and takes that source's next record. Each source is an endless
sequence of epochs; epoch ``e`` visits its shards in a permutation seeded by ``(seed, source, e)`` through
:func:`~unified_mllm.data.images.buffered_shuffle` (``data.shuffle_buffer``). The record becomes a sample of the
source's task (:mod:`unified_mllm.data.samples`) with a generator seeded by ``(seed, source, epoch, index in
epoch)``; a sample longer than ``data.max_seq_len`` is dropped and counted. The samples that remain are the
global items ``j = 0, 1, 2, ...``, which never depend on the world size.

**Ranks deal the items round-robin.** From the start position, item ``j`` goes to rank ``(j - start) %
world_size``; every rank reads every record and builds every sample (cheap: ids only) but decodes only its own
images. :class:`MixtureDataset` yields a rank's samples one by one; :class:`MicroBatches` its collated
micro-batches of ``rows`` samples, or of ``rows`` packed rows with ``data.pack`` (packed globally: ``world_size *
rows`` rows filled first-fit, row ``q`` to rank ``q % world_size``, so every rank consumes the same span).

**Position = a small dict of ints** (``state_dict()``): global draws and items consumed, each source's records
consumed and samples dropped. A rank reports the position at the end of the round its last item comes from, so
ranks that consumed as many samples (or micro-batches) hold the same state; a dataset built with it continues
exactly there, also at another world size.

**Workers.** :class:`MixtureDataset` keeps its position in its own process (``num_workers=0``; a worker raises).
:class:`MicroBatches` works with ``DataLoader(batches, batch_size=None, num_workers=k)``: worker ``w`` builds
micro-batches ``w, w+k, ...`` (the loader returns them in order), each carrying its position as
``batch.data_state``, the value to checkpoint. :func:`batch_stream` is that loader, ready for a trainer.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from unified_mllm.config import Config, DataConfig, VisionConfig
from unified_mllm.data.collate import Batch, Collator, FirstFitRows
from unified_mllm.data.conversation import TokenizedSample, t2i_answer_prefix_ids
from unified_mllm.data.images import RawSample, buffered_shuffle, decode_image, endless_epochs
from unified_mllm.data.pretokenize import CODES_MEMBER, read_manifest, tokenizer_fingerprint
from unified_mllm.data.samples import RecordError, SampleBuilder, TokenizedRecord
from unified_mllm.data.shards import CorruptShardError, list_shards, raw_samples
from unified_mllm.model.grid_positions import CodeCells
from unified_mllm.text import TextTokenizer
from unified_mllm.vision.anyres import anyres_views, feature_index

STATE_VERSION = 1
SPLIT_FIELD = "{split}"
_MIX_BLOCK = 4096
# Generator streams: changing one use (e.g. the buffer size) must not change the others.
_MIX, _SHARDS, _BUFFER, _SAMPLE = range(4)
# A stream that drops this many samples in a row cannot make progress (max_seq_len far too small).
_MAX_CONSECUTIVE_DROPS = 10_000


class DataError(ValueError):
    """Data or a data position that cannot be used as configured; the message names the path or key."""


def _rng(seed: int, stream: int, *extra: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream, *extra])


@dataclass(frozen=True)
class Source:
    """One entry of the mix, resolved: its shards and (from the manifest) its samples per epoch."""

    name: str
    task: str
    ratio: float
    shards: tuple[Path, ...]
    num_samples: int | None = None
    loss_weight: float = 1.0


# ------------------------------------------------------------------------------------------ the stream


def epoch_order(source: Source, index: int, seed: int, buffer: int, epoch: int) -> Iterator[RawSample]:
    """Raw samples of ``source`` (the ``index``-th of the mix) in the order of ``epoch``."""
    order = _rng(seed, _SHARDS, index, epoch).permutation(len(source.shards))
    shards = [source.shards[int(i)] for i in order]
    return buffered_shuffle(raw_samples(shards), buffer, _rng(seed, _BUFFER, index, epoch))


def epoch_length(source: Source) -> int:
    """Samples per epoch: the manifest's count, else counted by reading the shards once."""
    count = source.num_samples
    if count is None:
        count = sum(1 for _ in raw_samples(source.shards))
    if count == 0:
        raise DataError(f"source {source.name!r} has no samples in {[str(s) for s in source.shards]}")
    return count


def source_records(
    source: Source, index: int, seed: int, buffer: int, position: int
) -> Iterator[tuple[int, int, RawSample]]:
    """``(epoch, index within the epoch, raw sample)`` of an endless source from its global ``position`` on."""
    return endless_epochs(
        lambda epoch: epoch_order(source, index, seed, buffer, epoch),
        lambda: epoch_length(source),
        position,
        DataError(f"source {source.name!r} has no samples in {[str(s) for s in source.shards]}"),
    )


def mixture_draws(ratios: Sequence[float], seed: int, start: int = 0) -> Iterator[int]:
    """The source index of every global draw from ``start`` on, ``P(source i) = ratios[i] / sum(ratios)``."""
    probs = np.asarray(ratios, dtype=np.float64)
    probs = probs / probs.sum()
    block, offset = divmod(start, _MIX_BLOCK)
    while True:
        choices = _rng(seed, _MIX, block).choice(len(probs), size=_MIX_BLOCK, p=probs)
        yield from (int(c) for c in choices[offset:])
        block, offset = block + 1, 0


def read_record(raw: RawSample) -> TokenizedRecord:
    """The pre-tokenized record of a raw sample (JSON + code grid; the image stays undecoded)."""
    where = f"{raw.get('__url__', '?')}: sample {raw.get('__key__', '?')!r}"
    if "json" not in raw or CODES_MEMBER not in raw:
        have = sorted(k for k in raw if not k.startswith("__"))
        raise CorruptShardError(
            f"{where} has members {have}, not a pre-tokenized sample (run python -m unified_mllm.data.pretokenize)"
        )
    try:
        meta = json.loads(raw["json"])
        codes = np.load(io.BytesIO(raw[CODES_MEMBER]), allow_pickle=False)
    except (ValueError, OSError, UnicodeDecodeError) as exc:
        raise CorruptShardError(f"{where}: unreadable record ({exc})") from exc
    if codes.ndim not in (2, 3) or not isinstance(meta, dict):
        raise CorruptShardError(
            f"{where}: codes must be an [h, w] (or [h, w, D]) grid and the record an object"
        )
    return TokenizedRecord(key=str(raw.get("__key__")), codes=codes.astype(np.int64), meta=meta)


@dataclass(frozen=True)
class PlannedSample:
    """A global item before its pixels are read: its ids, where it came from, the stream state after it."""

    index: int
    source: int
    task: str
    key: str
    sample: TokenizedSample
    raw: RawSample
    state: dict[str, Any]
    loss_weight: float = 1.0


@dataclass(frozen=True)
class MixturePlan:
    """Everything the global stream depends on; :meth:`iterate` runs it from a position."""

    sources: tuple[Source, ...]
    builder: SampleBuilder
    max_seq_len: int
    seed: int = 0
    shuffle_buffer: int = 1000

    def initial_state(self) -> dict[str, Any]:
        zeros = [0] * len(self.sources)
        return {"version": STATE_VERSION, "draws": 0, "items": 0, "positions": zeros, "dropped": list(zeros)}

    def check_state(self, state: Mapping[str, Any]) -> dict[str, Any]:
        """A validated copy of a saved position (a clear error when it belongs to another mix)."""
        expected = self.initial_state()
        if set(state) != set(expected) or state["version"] != STATE_VERSION:
            raise DataError(
                f"data state must have the keys {sorted(expected)} (version {STATE_VERSION}), got {dict(state)}"
            )
        if len(state["positions"]) != len(self.sources) or len(state["dropped"]) != len(self.sources):
            raise DataError(
                f"the saved data state has {len(state['positions'])} source(s) but `data.sources` has "
                f"{len(self.sources)}: resume with the mix the state was saved with"
            )
        return {k: list(map(int, v)) if isinstance(v, list | tuple) else int(v) for k, v in state.items()}

    def _build(self, index: int, epoch: int, within: int, raw: RawSample) -> tuple[str, TokenizedSample]:
        source = self.sources[index]
        record = read_record(raw)
        try:
            sample = self.builder.build(source.task, record, _rng(self.seed, _SAMPLE, index, epoch, within))
        except (RecordError, ValueError) as exc:
            raise DataError(f"source {source.name!r}, {raw.get('__url__', '?')}: {exc}") from exc
        return record.key, sample

    def iterate(self, state: Mapping[str, Any]) -> Iterator[PlannedSample]:
        """Global items after position ``state``, each with the position after it."""
        state = self.check_state(state)
        draws, items = state["draws"], state["items"]
        positions, dropped = state["positions"], state["dropped"]
        cursors = [
            source_records(s, i, self.seed, self.shuffle_buffer, positions[i])
            for i, s in enumerate(self.sources)
        ]
        in_a_row = 0
        for choice in mixture_draws([s.ratio for s in self.sources], self.seed, draws):
            epoch, within, raw = next(cursors[choice])
            draws, positions[choice] = draws + 1, positions[choice] + 1
            key, sample = self._build(choice, epoch, within, raw)
            if len(sample) > self.max_seq_len:
                dropped[choice] += 1
                in_a_row += 1
                if in_a_row >= _MAX_CONSECUTIVE_DROPS:
                    raise DataError(f"{in_a_row} samples in a row exceed data.max_seq_len={self.max_seq_len}")
                continue
            in_a_row, items = 0, items + 1
            after = {"version": STATE_VERSION, "draws": draws, "items": items}
            after.update(positions=list(positions), dropped=list(dropped))
            source = self.sources[choice]
            yield PlannedSample(items - 1, choice, source.task, key, sample, raw, after, source.loss_weight)


def materialize(planned: PlannedSample, vision: VisionConfig) -> dict[str, Any]:
    """The training item of a planned sample: ids, labels, feature mask, and the image's SigLIP views
    ``pixel_values [n_views, 3, S, S]`` when the sample has feature slots (else None)."""
    pixels = index = None
    if planned.sample.feature_mask.any():
        image = decode_image(planned.raw)
        pixels, _ = anyres_views(image, vision)
        index = feature_index(vision, (image.height, image.width))  # None: every feature in order
    return {
        "ids": planned.sample.ids,
        "labels": planned.sample.labels,
        "feature_mask": planned.sample.feature_mask,
        "code_stacks": planned.sample.code_stacks,
        "code_mask": planned.sample.code_mask,
        "pixel_values": pixels,
        "feature_index": index,
        "task": planned.task,
        "key": planned.key,
        "source": planned.source,
        "loss_weight": planned.loss_weight,
    }


# ----------------------------------------------------------------------------------------- datasets


class _RankStream(IterableDataset):
    """What both datasets share: the plan, this rank, the position."""

    def __init__(
        self,
        plan: MixturePlan,
        *,
        vision: VisionConfig,
        rank: int = 0,
        world_size: int = 1,
        state: Mapping[str, Any] | None = None,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.plan, self.vision, self.rank, self.world_size = plan, vision, rank, world_size
        self._state = plan.check_state(state) if state is not None else plan.initial_state()

    def state_dict(self) -> dict[str, Any]:
        """The position after the last sample (or micro-batch) this object yielded, as plain ints."""
        return {k: list(v) if isinstance(v, list) else v for k, v in self._state.items()}

    @property
    def dropped(self) -> dict[str, int]:
        """Samples dropped for exceeding ``max_seq_len`` so far, per source name."""
        return {s.name: n for s, n in zip(self.plan.sources, self._state["dropped"])}


class MixtureDataset(_RankStream):
    """This rank's samples, one dict at a time (see :func:`materialize`); position via :meth:`state_dict`.

    Iterating again continues from the current position. Use with ``DataLoader(num_workers=0)``: worker
    processes would each hold their own position (use :class:`MicroBatches` there).
    """

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if get_worker_info() is not None:
            raise RuntimeError(
                "MixtureDataset keeps its position in this process: use DataLoader(num_workers=0), or "
                "MicroBatches (build_batches), whose batches carry their position, with worker processes"
            )
        origin, held = self._state["items"], None
        for planned in self.plan.iterate(self._state):
            slot = (planned.index - origin) % self.world_size
            if slot == self.rank:
                held = planned
            if slot == self.world_size - 1:  # the round is over: every rank's position is the same
                self._state = planned.state
                assert held is not None
                yield materialize(held, self.vision)


class MicroBatches(_RankStream):
    """This rank's collated micro-batches of ``rows`` rows (see the module docstring), each with its position
    in ``batch.data_state``. Use ``DataLoader(micro_batches, batch_size=None, num_workers=k)``."""

    def __init__(
        self,
        plan: MixturePlan,
        collator: Collator,
        *,
        rows: int,
        vision: VisionConfig,
        rank: int = 0,
        world_size: int = 1,
        state: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(plan, vision=vision, rank=rank, world_size=world_size, state=state)
        if rows < 1:
            raise ValueError(f"rows must be >= 1, got {rows}")
        if collator.max_seq_len < plan.max_seq_len:
            raise ValueError(
                f"the collator's max_seq_len {collator.max_seq_len} is below the stream's {plan.max_seq_len}"
            )
        self.collator, self.rows = collator, rows

    def global_batches(
        self, state: Mapping[str, Any]
    ) -> Iterator[tuple[list[list[PlannedSample]], dict[str, Any]]]:
        """Every rank's rows of each global micro-batch and the position after it (no pixels read)."""
        capacity = self.world_size * self.rows
        if not self.collator.pack:
            stream = self.plan.iterate(state)
            while len(group := list(islice(stream, capacity))) == capacity:
                yield [[p] for p in group], group[-1].state
            return
        packer, members = FirstFitRows(self.plan.max_seq_len, capacity), []
        for planned in self.plan.iterate(state):
            if not packer.add(len(members), len(planned.sample)):
                # Closed before this sample, so the position is the previous sample's; this one starts the next.
                yield [[members[i] for i in row] for row in packer.rows], members[-1].state
                packer, members = FirstFitRows(self.plan.max_seq_len, capacity), []
                packer.add(0, len(planned.sample))
            members.append(planned)

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for number, (rows, state) in enumerate(self.global_batches(self._state)):
            if number % workers != worker:
                continue
            mine = rows[self.rank :: self.world_size]
            batch = self.collator.collate_rows([[materialize(p, self.vision) for p in row] for row in mine])
            batch.data_state = state
            self._state = state
            yield batch


# ------------------------------------------------------------------------------------------- building


def _manifest_samples(directory: Path, where: str, fingerprint: str, tokenizer_path: str) -> dict[str, int]:
    """Samples per shard of a finished pre-tokenization made with the tokenizer of ``fingerprint``."""
    manifest = read_manifest(directory)
    run = "python -m unified_mllm.data.pretokenize"
    if manifest is None:
        raise DataError(f"{where}: {directory} has no pre-tokenization manifest; run {run}")
    if not manifest.get("complete"):
        raise DataError(f"{where}: the pre-tokenization of {directory} is unfinished; re-run {run}")
    if manifest["fingerprint"].get("tokenizer") != fingerprint:
        raise DataError(
            f"{where}: {directory} was pre-tokenized with another text tokenizer than {tokenizer_path}; "
            f"re-run {run}"
        )
    return {name: int(entry["samples"]) for name, entry in manifest["shards"].items()}


def source_names(data: DataConfig) -> list[str]:
    """The label of each entry of ``data.sources`` in logs: its ``name``, else ``<task>:<index>``."""
    return [entry.name or f"{entry.task}:{i}" for i, entry in enumerate(data.sources)]


def resolve_sources(config: Config, split: str, fingerprint: str) -> tuple[Source, ...]:
    """The sources of ``data.sources`` for ``split`` (``{split}`` in a path is replaced by it), each checked
    against its pre-tokenization manifest: finished, and made with the tokenizer of ``fingerprint``."""
    if not config.data.sources:
        raise DataError("`data.sources` is empty: add a mix, e.g. --config configs/data/mix-stage1.yaml")
    sources = []
    for i, (entry, name) in enumerate(zip(config.data.sources, source_names(config.data))):
        try:
            shards = tuple(list_shards(entry.path.replace(SPLIT_FIELD, split)))
        except FileNotFoundError as exc:
            raise DataError(
                f"`data.sources[{i}].path`: {exc} (pre-tokenize it: python -m unified_mllm.data.pretokenize "
                f"--split {split})"
            ) from exc
        counts = _manifest_samples(
            shards[0].parent, f"`data.sources[{i}]`", fingerprint, config.tokenizer.path
        )
        # Tar files the manifest does not list (put there by hand) leave the epoch to be counted by reading.
        total = sum(counts[s.name] for s in shards) if all(s.name in counts for s in shards) else None
        sources.append(Source(name, entry.task, entry.ratio, shards, total, entry.loss_weight))
    return tuple(sources)


def build_plan(
    config: Config, *, split: str = "train", with_features: bool, tokenizer: TextTokenizer | None = None
) -> MixturePlan:
    """The global stream of ``config.data`` for ``split``; ``tokenizer`` (loaded from ``config.tokenizer`` when
    not given) supplies the special ids and the caption instructions' ids."""
    if tokenizer is None:
        tokenizer = TextTokenizer.from_config(config.tokenizer, config.model.vq.codebook_size)
    fingerprint = tokenizer_fingerprint(config.tokenizer, tokenizer.num_image_codes)
    data = config.data
    builder = SampleBuilder(
        tokens=tokenizer.special_tokens(),
        vision=config.model.vision,
        with_features=with_features,
        instructions=SampleBuilder.encode_instructions(tokenizer.encode),
        cfg_dropout=data.cfg_dropout,
        vqa_max_turns=data.vqa_max_turns,
        prompt_style=config.model.prompt_style,
        t2i_answer_prefix=t2i_answer_prefix_ids(config.model, tokenizer.token_to_id),
    )
    return MixturePlan(
        resolve_sources(config, split, fingerprint),
        builder,
        data.max_seq_len,
        config.train.seed,
        data.shuffle_buffer,
    )


def build_dataset(
    config: Config,
    *,
    split: str = "train",
    rank: int = 0,
    world_size: int = 1,
    with_features: bool,
    state: Mapping[str, Any] | None = None,
    tokenizer: TextTokenizer | None = None,
) -> MixtureDataset:
    """This rank's sample stream of the mix in ``config.data`` (``with_features``: SigLIP slots and pixels)."""
    plan = build_plan(config, split=split, with_features=with_features, tokenizer=tokenizer)
    return MixtureDataset(plan, vision=config.model.vision, rank=rank, world_size=world_size, state=state)


def build_batches(
    config: Config,
    *,
    split: str = "train",
    rank: int = 0,
    world_size: int = 1,
    with_features: bool,
    state: Mapping[str, Any] | None = None,
    rows: int | None = None,
    tokenizer: TextTokenizer | None = None,
) -> MicroBatches:
    """This rank's micro-batches (``rows``, default ``train.micro_batch_size``; padded or packed per
    ``data.pack``), for ``DataLoader(..., batch_size=None, num_workers=data.num_workers)``."""
    plan = build_plan(config, split=split, with_features=with_features, tokenizer=tokenizer)
    tokens = plan.builder.tokens
    collator = Collator(
        tokens.pad,
        config.data.max_seq_len,
        config.data.pack,
        config.data.pad_to_multiple_of,
        code_cells=CodeCells(tokens) if config.model.grid_positions > 0 else None,
    )
    return MicroBatches(
        plan,
        collator,
        rows=rows or config.train.micro_batch_size,
        vision=config.model.vision,
        rank=rank,
        world_size=world_size,
        state=state,
    )


def batch_stream(
    config: Config,
    *,
    split: str = "train",
    rank: int = 0,
    world_size: int = 1,
    with_features: bool,
    state: Mapping[str, Any] | None = None,
    tokenizer: TextTokenizer | None = None,
) -> Iterator[Batch]:
    """The endless iterator of this rank's micro-batches, built by ``data.num_workers`` loader processes.

    Checkpoint ``batch.data_state`` of the last micro-batch consumed and pass it back as ``state``.
    """
    batches = build_batches(
        config,
        split=split,
        rank=rank,
        world_size=world_size,
        with_features=with_features,
        state=state,
        tokenizer=tokenizer,
    )
    workers = config.data.num_workers
    # Pinned host memory makes the copies to a GPU asynchronous; the loader re-yields batches in order.
    loader = DataLoader(
        batches,
        batch_size=None,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0,
        # The loader draws its workers' base seed from this generator, not from the global one: a resumed
        # run restores the global RNG, and an extra draw from it would shift every later dropout mask.
        generator=torch.Generator().manual_seed(config.train.seed),
    )
    return iter(loader)
