"""Webdataset shards: atomic writing, round trips through the webdataset reader, corrupt input named."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unified_mllm.data.shards import CorruptShardError, ReadStats, ShardWriter, iter_samples, list_shards


def _image(value: int) -> Image.Image:
    return Image.fromarray(np.full((4, 6, 3), value, dtype=np.uint8))


def _write(directory: Path, n: int, per_shard: int) -> list[Path]:
    with ShardWriter(directory, "demo", per_shard) as writer:
        for i in range(n):
            writer.write(f"sample{i:04d}", _image(i), {"index": i, "text": f"caption {i}"})
    return writer.written


def test_round_trip_splits_into_numbered_shards(tmp_path: Path) -> None:
    written = _write(tmp_path, 7, per_shard=3)
    assert [p.name for p in written] == ["demo-000000.tar", "demo-000001.tar", "demo-000002.tar"]
    assert list_shards(tmp_path) == written
    samples = list(iter_samples(tmp_path))
    assert [s.meta["index"] for s in samples] == list(range(7))
    assert [s.key for s in samples] == [f"sample{i:04d}" for i in range(7)]
    assert all(np.asarray(s.image)[0, 0, 0] == s.meta["index"] for s in samples)  # PNG is lossless
    assert samples[4].shard.endswith("demo-000001.tar")
    assert not list(tmp_path.glob("*.tmp"))


def test_members_are_image_then_json_per_key(tmp_path: Path) -> None:
    (shard,) = _write(tmp_path, 2, per_shard=10)
    with tarfile.open(shard) as tar:
        assert tar.getnames() == ["sample0000.png", "sample0000.json", "sample0001.png", "sample0001.json"]


def test_failed_write_leaves_no_partial_shard(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), ShardWriter(tmp_path, "demo", 2) as writer:
        for i in range(3):
            writer.write(f"k{i}", _image(i), {"i": i})
        raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo-000000.tar"]  # the full first shard only


def test_bad_keys_and_arguments_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="must not contain"), ShardWriter(tmp_path, "x", 2) as writer:
        writer.write("a.b", _image(0), {})
    with pytest.raises(ValueError, match="samples_per_shard"):
        ShardWriter(tmp_path, "x", 0)
    with pytest.raises(FileNotFoundError, match="no webdataset shards"):
        list_shards(tmp_path / "empty")


def _tar_with(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


def _png() -> bytes:
    buffer = io.BytesIO()
    _image(3).save(buffer, format="PNG")
    return buffer.getvalue()


def test_corrupt_samples_name_shard_and_key(tmp_path: Path) -> None:
    shard = _tar_with(
        tmp_path / "bad.tar",
        {"good.png": _png(), "good.json": b'{"a": 1}', "broken.png": b"garbage", "broken.json": b"{}",
         "nojson.png": _png(), "badjson.png": _png(), "badjson.json": b"{not json"},
    )  # fmt: skip
    with pytest.raises(CorruptShardError, match=r"bad.tar: sample 'broken': unreadable .png"):
        list(iter_samples(shard))
    stats = ReadStats()
    kept = list(iter_samples([shard], skip_corrupt=True, stats=stats))
    assert [s.key for s in kept] == ["good"]
    assert stats.samples == 1
    assert [s.rsplit(":", 1)[1] for s in stats.skipped] == ["broken", "nojson", "badjson"]


def test_truncated_tar_is_reported(tmp_path: Path) -> None:
    (shard,) = _write(tmp_path, 4, per_shard=10)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2 + 7])
    with pytest.raises(CorruptShardError, match=r"demo-000000\.tar"):
        list(iter_samples(shard))
    stats = ReadStats()
    kept = list(iter_samples(shard, skip_corrupt=True, stats=stats))
    assert 0 < len(kept) < 4 and stats.skipped


def test_reading_under_a_multi_process_launcher(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    written = _write(tmp_path, 3, per_shard=2)
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it; each rank reads the shards it is given
    monkeypatch.setenv("RANK", "1")
    assert [s.meta["index"] for s in iter_samples(written)] == [0, 1, 2]
