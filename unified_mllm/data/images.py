"""A resumable, deterministic stream of image batches from webdataset shards, for tokenizer training.

**One global order.** Epoch ``e`` visits the shards in a permutation drawn from ``(seed, e)`` through a shuffle
buffer seeded the same way; epochs follow each other without end. The order depends only on the shards, ``seed``
and ``shuffle_buffer``. Global sample ``i`` (counted from the start of epoch 0) belongs to rank
``i % world_size``; a step takes ``batch_size`` consecutive samples per rank, so the ranks' batches are disjoint
and together cover the stream in order.

**Position = global samples consumed.** Each batch carries the position after it; a stream built with
``position=p`` skips the first ``p`` global samples (undecoded) and continues exactly where the saved run
stopped, also at another world size.

Images are decoded only by the rank that keeps them, converted to RGB (transparency on white), resized and
centre-cropped to ``resolution`` and scaled to [-1, 1] by :mod:`unified_mllm.vision.image`. ``hflip`` (off by
default) mirrors a sample with probability 1/2, decided by ``(seed, epoch, index in the epoch)`` so that a resume
reproduces it; there are no vertical flips, which would draw triangles the world never draws (apex down).

Every rank reads every shard's bytes (simple, exact, and cheap for the tokenizer's datasets); a corrupt sample
raises :class:`~unified_mllm.data.shards.CorruptShardError` naming its shard and key, since skipping it on one
rank would break the global order.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch

from unified_mllm.data.shards import IMAGE_EXTENSIONS, CorruptShardError, list_shards, raw_samples
from unified_mllm.vision.image import ImageLoadError, image_to_tensor, load_image, resize_center_crop

T = TypeVar("T")

RawSample = dict[str, Any]


@dataclass
class ImageBatch:
    """One rank's batch: ``pixels`` ``[B, 3, R, R]`` in [-1, 1], the samples' ``keys``, the global stream
    ``position`` after this step (the value to save for resume), the ``epoch`` of its last sample and the
    samples' ``captions`` (the ``caption`` of their metadata, ``""`` when they have none)."""

    pixels: torch.Tensor
    keys: list[str]
    position: int
    epoch: int
    captions: list[str] = field(default_factory=list)


_STREAMS = {"shards": 0, "buffer": 1, "flip": 2}


def _epoch_rng(seed: int, epoch: int, stream: str, *extra: int) -> np.random.Generator:
    # Separate streams per use: changing the buffer size must not change the shard order.
    return np.random.default_rng([seed, epoch, _STREAMS[stream], *extra])


def decode_image(raw: RawSample) -> Any:
    """The PIL image of a raw sample (RGB); raises CorruptShardError naming the shard and key."""
    where = f"{raw.get('__url__', '?')}: sample {raw.get('__key__', '?')!r}"
    ext = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
    if ext is None:
        have = sorted(k for k in raw if not k.startswith("__"))
        raise CorruptShardError(f"{where} has no image member (has {have})")
    try:
        return load_image(bytes(raw[ext]))
    except ImageLoadError as exc:
        raise CorruptShardError(f"{where}: {exc}") from exc


def buffered_shuffle(items: Iterable[T], buffer: int, rng: np.random.Generator) -> Iterator[T]:
    """Streaming shuffle: fill a pool of ``buffer`` items, then emit a random one per incoming item.

    Memory stays at ``buffer`` items however long the stream; the order depends only on ``rng``'s state.
    """
    pool: list[T] = []
    for item in items:
        pool.append(item)
        if len(pool) >= buffer:
            pick = int(rng.integers(len(pool)))
            pool[pick], pool[-1] = pool[-1], pool[pick]
            yield pool.pop()
    rng.shuffle(pool)
    yield from pool


def endless_epochs(
    order: Callable[[int], Iterable[T]], length: Callable[[], int], position: int, empty: Exception
) -> Iterator[tuple[int, int, T]]:
    """``(epoch, index within the epoch, item)`` of endless epochs (``order(epoch)``, each ``length()`` items)
    from global ``position`` on: whole epochs are skipped by arithmetic, the partial one is read from its start
    (the caller decodes nothing before ``position``). An epoch without items raises ``empty``."""
    epoch, offset = divmod(position, length()) if position else (0, 0)
    while True:
        seen = 0
        for within, item in enumerate(order(epoch)):
            seen += 1
            if within >= offset:
                yield epoch, within, item
        if seen == 0:
            raise empty
        epoch, offset = epoch + 1, 0


class ImageStream:
    """Endless per-rank batches of preprocessed images (see the module docstring for the order and resume).

    ``shards``: a directory, glob or file for :func:`~unified_mllm.data.shards.list_shards`, or a list of shard
    files. ``batch_size`` is per rank. ``position`` is the global number of samples already consumed.
    """

    def __init__(
        self,
        shards: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        *,
        resolution: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = 1000,
        position: int = 0,
        hflip: bool = False,
    ) -> None:
        self.shards = list_shards(shards)
        if not self.shards:
            raise ValueError("ImageStream needs at least one shard")
        if resolution < 1 or batch_size < 1 or shuffle_buffer < 1 or position < 0:
            raise ValueError("need resolution, batch_size, shuffle_buffer >= 1 and position >= 0")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.resolution, self.batch_size, self.seed = resolution, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.shuffle_buffer, self.start_position, self.hflip = shuffle_buffer, position, hflip
        self._epoch_length: int | None = None

    def epoch_order(self, epoch: int) -> Iterator[RawSample]:
        """The global sample order of ``epoch`` (raw, undecoded)."""
        order = _epoch_rng(self.seed, epoch, "shards").permutation(len(self.shards))
        shards = [self.shards[int(i)] for i in order]
        return buffered_shuffle(
            raw_samples(shards), self.shuffle_buffer, _epoch_rng(self.seed, epoch, "buffer")
        )

    def epoch_length(self) -> int:
        """Samples per epoch (read once, by counting keys; every epoch holds the same samples)."""
        if self._epoch_length is None:
            self._epoch_length = sum(1 for _ in raw_samples(self.shards))
            if self._epoch_length == 0:
                raise ValueError(f"no samples in {[str(s) for s in self.shards]}")
        return self._epoch_length

    def _tensor(self, raw: RawSample, epoch: int, index: int) -> torch.Tensor:
        pixels = image_to_tensor(resize_center_crop(decode_image(raw), self.resolution))
        # One generator per sample: the decision depends on nothing but (seed, epoch, index).
        if self.hflip and _epoch_rng(self.seed, epoch, "flip", index).integers(2):
            pixels = pixels.flip(-1)
        return pixels

    def __iter__(self) -> Iterator[ImageBatch]:
        pixels: list[torch.Tensor] = []
        keys: list[str] = []
        captions: list[str] = []
        empty = ValueError(f"no samples in {[str(s) for s in self.shards]}")
        samples = endless_epochs(self.epoch_order, self.epoch_length, self.start_position, empty)
        for global_index, (epoch, within, raw) in enumerate(samples, self.start_position):
            if global_index % self.world_size == self.rank:
                pixels.append(self._tensor(raw, epoch, within))
                keys.append(str(raw.get("__key__")))
                captions.append(raw_caption(raw))
            if (global_index + 1 - self.start_position) % (self.batch_size * self.world_size) == 0:
                yield ImageBatch(torch.stack(pixels), keys, global_index + 1, epoch, captions)
                pixels, keys, captions = [], [], []


def raw_caption(raw: RawSample) -> str:
    """The ``caption`` of a raw sample's ``.json`` metadata, ``""`` when it has none (or no metadata)."""
    try:
        meta = json.loads(raw["json"]) if "json" in raw else {}
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptShardError(f"sample {raw.get('__key__')!r}: invalid .json ({exc})") from exc
    caption = meta.get("caption", "") if isinstance(meta, dict) else ""
    return caption if isinstance(caption, str) else ""


def load_first_images(
    shards: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], count: int, resolution: int
) -> tuple[torch.Tensor, list[str]]:
    """The first ``count`` images of ``shards`` in file order, preprocessed: ``([n, 3, R, R] in [-1, 1], keys)``
    with ``n <= count`` (fewer when the shards hold fewer). A fixed set for evaluations and sample grids."""
    paths = list_shards(shards)
    pixels, keys = [], []
    for raw in raw_samples(paths):
        if len(pixels) >= count:
            break
        pixels.append(image_to_tensor(resize_center_crop(decode_image(raw), resolution)))
        keys.append(str(raw.get("__key__")))
    if not pixels:
        raise ValueError(f"no images in {[str(p) for p in paths]}")
    return torch.stack(pixels), keys
