"""Files that appear whole or not at all, and the check that reuses a finished output instead of redoing it.

Every writer in the package goes through here, so a run killed at any moment never leaves a half-written file
or directory under its final name:

* :func:`atomic_path` / :func:`write_bytes` / :func:`write_text` / :func:`write_json` — a file is written
  under a hidden temporary name beside its target (``.tmp-<name>-<pid>-<random>``), fsynced, renamed over the
  target, and the directory entry fsynced. If the writer raises, the temporary file is removed and the old
  target is left as it was;
* :func:`atomic_directory` (or :func:`begin_directory` + :func:`commit_directory` when several processes fill
  one directory) — the same for a whole directory: every file is fsynced before the rename, and an older
  directory of that name is moved aside and deleted only once the new one is in place;
* :func:`stale_temporaries` — the leftovers of writers killed mid-way, for their owners to delete;
* :func:`finished_output` — a job that writes a JSON record last (a training summary, a split's stats)
  is finished when that record exists; it is reused when the record says it was made with the same settings.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

# How temporary names start (``.tmp-<name>-<pid>-<random>``, ``.old-<name>-...`` for a replaced directory).
TEMPORARY_PREFIXES = (".tmp-", ".old-")


def _temporary_name(path: Path, kind: str = ".tmp-") -> Path:
    """A hidden name beside ``path``, whose parent directory is created."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f"{kind}{path.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Flush ``path``'s contents to the disk."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush ``path``'s directory entries (a rename into it) to the disk; a no-op where directories cannot be
    opened (Windows)."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass  # some file systems refuse fsync on a directory; the rename itself is still atomic
    finally:
        os.close(descriptor)


def fsync_tree(root: str | os.PathLike[str]) -> None:
    """Flush every file under ``root``, then every directory's entries."""
    root = Path(root)
    for path in sorted(root.rglob("*")):
        if path.is_file():
            fsync_file(path)
    for path in sorted(p for p in root.rglob("*") if p.is_dir()):
        fsync_dir(path)
    fsync_dir(root)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path to write ``path``'s contents to; on leaving the block it is fsynced and renamed over
    ``path``. When the block raises, the temporary file is deleted and ``path`` is untouched.

    The temporary name does not end in ``path``'s suffix (a ``*.tar`` glob never sees it): writers that pick
    a format by extension (PIL, matplotlib) must be told the format.
    """
    path = Path(path)
    tmp = _temporary_name(path)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns ``path``."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike[str], data: Any, *, indent: int = 2, sort_keys: bool = False) -> Path:
    """Write ``data`` as JSON (with a final newline) to ``path`` atomically; returns ``path``."""
    return write_text(path, json.dumps(data, indent=indent, sort_keys=sort_keys) + "\n")


def file_digest(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_json(path: str | os.PathLike[str]) -> Any | None:
    """The JSON document in ``path``, or None when it is missing or unreadable (a file cut short)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------------------------------ directories


def begin_directory(path: str | os.PathLike[str]) -> Path:
    """A fresh hidden directory beside ``path`` to fill with ``path``'s files, then hand to
    :func:`commit_directory`. For a directory several processes write parts of: one process begins and
    commits, all write in between."""
    tmp = _temporary_name(Path(path))
    tmp.mkdir()
    return tmp


def commit_directory(tmp: Path, path: str | os.PathLike[str]) -> Path:
    """fsync everything in ``tmp`` and rename it to ``path``, replacing an existing directory there."""
    path = Path(path)
    fsync_tree(tmp)
    if path.exists():
        # A directory cannot be renamed over a non-empty one: move the old one aside first.
        old = _temporary_name(path, ".old-")
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(path)
    fsync_dir(path.parent)
    return path


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary directory to fill with ``path``'s files; on leaving the block it replaces ``path`` whole.
    When the block raises, the temporary directory is deleted and ``path`` is untouched."""
    tmp = begin_directory(path)
    try:
        yield tmp
        commit_directory(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def stale_temporaries(directory: str | os.PathLike[str], name_prefix: str = "") -> list[Path]:
    """Temporary files and directories that writers killed mid-way left in ``directory`` (only those of
    targets whose name starts with ``name_prefix``)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    prefixes = tuple(kind + name_prefix for kind in TEMPORARY_PREFIXES)
    return sorted(p for p in directory.iterdir() if p.name.startswith(prefixes))


def remove_stale_temporaries(directory: str | os.PathLike[str], name_prefix: str = "") -> list[Path]:
    """Delete :func:`stale_temporaries`; returns what was deleted."""
    stale = stale_temporaries(directory, name_prefix)
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return stale


# ----------------------------------------------------------------------------------------------- reuse


def finished_output(
    record_file: str | os.PathLike[str],
    expected: Mapping[str, Any],
    required: Iterable[str] | Callable[[dict[str, Any]], Iterable[str]] = (),
) -> dict[str, Any] | None:
    """The JSON record a finished job wrote last into ``record_file`` when it was made with these settings:
    every key of ``expected`` holds the same value (compared as JSON reads it back: lists, not tuples) and
    every file in ``required`` (names relative to the record's directory, or a function of the record giving
    them) exists. None otherwise: the job is to be done (again)."""
    record = read_json(record_file)
    if not isinstance(record, dict):
        return None
    if any(record.get(key) != json.loads(json.dumps(value)) for key, value in expected.items()):
        return None
    directory = Path(record_file).parent
    names = required(record) if callable(required) else required
    return record if all((directory / name).is_file() for name in names) else None
