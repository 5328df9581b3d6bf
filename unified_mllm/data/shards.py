"""Webdataset tar shards: the on-disk format of every dataset this project reads or writes.

A shard is a plain POSIX tar file named ``<prefix>-NNNNNN.tar``. Each *sample* is a group of consecutive
members sharing a key (the file name up to its first dot): ``<key>.png`` (or ``.jpg``) with the image and
``<key>.json`` with its metadata. This is exactly what the ``webdataset`` library reads, so user data in the
same shape plugs into every pipeline here (see the README, "Bring your own data").

Writing goes through :class:`ShardWriter`, which writes each shard to a temporary name and renames it only when
it is complete: a killed run never leaves a truncated shard that looks finished. Reading goes through
:func:`iter_samples`, which turns any corrupt member into a :class:`CorruptShardError` naming the shard and the
key (or skips it and counts it, with ``skip_corrupt=True``).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import webdataset as wds
from PIL import Image

from unified_mllm.io import atomic_path

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")


class CorruptShardError(ValueError):
    """A shard, or one sample in it, that cannot be read; the message names the shard and key."""


@dataclass
class Sample:
    """One sample of a shard: its key, decoded image (RGB unless the file says otherwise) and metadata."""

    key: str
    image: Image.Image
    meta: dict[str, Any]
    shard: str


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    """Append one member (mode 644, no timestamp: the same payloads give the same tar bytes)."""
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(payload), 0o644
    tar.addfile(info, io.BytesIO(payload))


class ShardWriter:
    """Write samples into numbered shards of at most ``samples_per_shard`` samples each.

    Use as a context manager; ``write(key, image, meta)`` appends one sample. Each shard is written under a
    temporary name (:func:`unified_mllm.io.atomic_path`) and renamed into place when it is full or on close, so
    finished shards are always whole. Leaving the ``with`` block because of an exception deletes the partial shard.
    """

    def __init__(
        self, directory: str | Path, prefix: str, samples_per_shard: int, image_format: str = "png"
    ) -> None:
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        if image_format not in ("png", "jpg"):
            raise ValueError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
        self.directory = Path(directory)
        self.prefix = prefix
        self.samples_per_shard = samples_per_shard
        self.image_format = image_format
        self.written: list[Path] = []
        self._tar: tarfile.TarFile | None = None
        self._shard: contextlib.ExitStack | None = None  # the open shard's tar inside its atomic_path
        self._count = 0

    def __enter__(self) -> ShardWriter:
        self.directory.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._finish_shard(exc_type, exc, tb)

    def write(self, key: str, image: Image.Image, meta: dict[str, Any]) -> None:
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must not contain '.' or '/' (webdataset splits on them)")
        if self._tar is None:
            self._open_shard()
        assert self._tar is not None
        buffer = io.BytesIO()
        image.save(buffer, format="PNG" if self.image_format == "png" else "JPEG", quality=95)
        add_member(self._tar, f"{key}.{self.image_format}", buffer.getvalue())
        add_member(self._tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode())
        self._count += 1
        if self._count >= self.samples_per_shard:
            self._finish_shard()

    def _open_shard(self) -> None:
        self._final = self.directory / shard_name(self.prefix, len(self.written))
        # Kept open across write() calls and closed in _finish_shard.
        self._shard = contextlib.ExitStack()
        tmp = self._shard.enter_context(atomic_path(self._final))
        self._tar = self._shard.enter_context(tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT))  # noqa: SIM115
        self._count = 0

    def _finish_shard(self, *exc_info: Any) -> None:
        """Close the open shard: renamed into place, or deleted when ``exc_info`` holds an exception."""
        if self._shard is None:
            return
        self._shard.__exit__(*(exc_info or (None, None, None)))
        if not exc_info or exc_info[0] is None:
            self.written.append(self._final)
        self._tar, self._shard = None, None


def list_shards(path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[Path]:
    """The shards of a dataset: a directory (every ``*.tar`` in it, sorted), a single file, or a glob; a list of
    shard files is taken as given."""
    if not isinstance(path, str | os.PathLike):
        return [Path(p) for p in path]
    path = Path(path).expanduser()
    if path.is_dir():
        shards = sorted(path.glob("*.tar"))
    elif path.is_file():
        shards = [path]
    else:
        shards = sorted(path.parent.glob(path.name))
    if not shards:
        raise FileNotFoundError(f"no webdataset shards (*.tar) found at {path}")
    return shards


@dataclass
class ReadStats:
    """What :func:`iter_samples` saw: samples yielded and corrupt ones skipped (``shard:key`` each)."""

    samples: int = 0
    skipped: list[str] = field(default_factory=list)


def _decode(raw: dict[str, Any], shard: str) -> Sample:
    key = raw.get("__key__", "?")
    image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in raw), None)
    if image_ext is None or "json" not in raw:
        have = sorted(k for k in raw if not k.startswith("__"))
        raise CorruptShardError(f"{shard}: sample {key!r} needs an image and a .json member, has {have}")
    try:
        image = Image.open(io.BytesIO(raw[image_ext]))
        image.load()
    except Exception as exc:
        raise CorruptShardError(f"{shard}: sample {key!r}: unreadable .{image_ext} image ({exc})") from exc
    try:
        meta = json.loads(raw["json"])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptShardError(f"{shard}: sample {key!r}: invalid .json ({exc})") from exc
    if not isinstance(meta, dict):
        raise CorruptShardError(
            f"{shard}: sample {key!r}: .json must hold an object, got {type(meta).__name__}"
        )
    return Sample(key=key, image=image, meta=meta, shard=shard)


def raw_samples(shards: Iterable[Path]) -> Iterator[dict[str, Any]]:
    """Undecoded samples (``__key__``, ``__url__`` and one bytes entry per member) of ``shards``, in order; a
    broken tar becomes a CorruptShardError."""
    for shard in shards:
        try:
            # No node/worker splitting here: callers decide which shards each rank reads (webdataset's default
            # splitter raises under torchrun with more than one process).
            dataset = wds.WebDataset(
                str(shard), shardshuffle=False, empty_check=False, nodesplitter=None, workersplitter=None
            )
            yield from dataset
        except (tarfile.TarError, OSError, ValueError) as exc:
            raise CorruptShardError(f"{shard}: not a readable tar shard ({exc})") from exc


def iter_samples(
    shards: str | Path | Sequence[str | Path], *, skip_corrupt: bool = False, stats: ReadStats | None = None
) -> Iterator[Sample]:
    """Decoded samples of the given shards (a path for :func:`list_shards`, or a list of shard files), in order.

    A corrupt sample raises :class:`CorruptShardError` naming the shard and key; with ``skip_corrupt`` it is
    skipped and recorded in ``stats.skipped`` instead (a corrupt tar header ends that shard).
    """
    stats = stats if stats is not None else ReadStats()
    for shard in list_shards(shards):
        try:
            for raw in raw_samples([shard]):
                try:
                    sample = _decode(raw, str(shard))
                except CorruptShardError:
                    if not skip_corrupt:
                        raise
                    stats.skipped.append(f"{shard}:{raw.get('__key__', '?')}")
                    continue
                stats.samples += 1
                yield sample
        except CorruptShardError:
            # With skip_corrupt, per-sample errors were handled above; only a broken tar gets here.
            if not skip_corrupt:
                raise
            stats.skipped.append(f"{shard}:<tar>")
