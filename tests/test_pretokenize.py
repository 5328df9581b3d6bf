"""Pre-tokenization: exact codes and ids per sample, mirrored shards, resume by shard, stale output rebuilt,
corrupt input and mismatched checkpoints named."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import make_tokenized_world, save_random_vq, world_config
from unified_mllm.config import Config
from unified_mllm.data import pretokenize as P
from unified_mllm.data.shapes import write_split
from unified_mllm.data.shards import CorruptShardError, ShardWriter, iter_samples, list_shards
from unified_mllm.text import TextTokenizer
from unified_mllm.vision.vqgan import VQGAN


def tokenized_members(shard: Path) -> dict[str, bytes]:
    with tarfile.open(shard) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, sp_model: Path) -> Config:
    return make_tokenized_world(tmp_path_factory.mktemp("pretok"), sp_model)


def _out_dir(config: Config) -> Path:
    return Path(config.data.tokenized_root) / "train"


def test_output_mirrors_the_input_with_exact_codes_ids_and_pixels(world: Config, sp_model: Path) -> None:
    inputs, outputs = list_shards(Path(world.data.root) / "train"), list_shards(_out_dir(world))
    assert (
        [p.name for p in outputs]
        == [p.name for p in inputs]
        == [f"shapes-train-00000{i}.tar" for i in range(3)]
    )
    tokenizer = TextTokenizer.load_sentencepiece(sp_model, 512)
    vq = VQGAN.from_checkpoint(world.model.vq.checkpoint)
    originals = list(iter_samples(inputs[1]))
    members = tokenized_members(outputs[1])
    assert sorted(members) == sorted(
        f"{s.key}.{ext}" for s in originals for ext in ("png", "codes.npy", "json")
    )
    expected_codes = vq.images_to_codes([s.image for s in originals])
    for sample, codes in zip(originals, expected_codes):
        stored = np.load(io.BytesIO(members[f"{sample.key}.codes.npy"]))
        assert stored.dtype == np.int16 and stored.shape == (8, 8)
        assert np.array_equal(stored, codes)
        record = json.loads(members[f"{sample.key}.json"])
        ids = record.pop("pretokenized")
        assert record == sample.meta  # the input record is kept whole for evaluation
        assert ids["image_hw"] == [64, 64] and ids["caption"] == tokenizer.encode(sample.meta["caption"])
        assert ids["vqa"] == [
            [tokenizer.encode(q["question"]), tokenizer.encode(q["answer"])] for q in sample.meta["vqa"]
        ]
        assert ids["t2i"] == [tokenizer.encode(t["prompt"]) for t in sample.meta["t2i"]]
        pixels = np.asarray(Image.open(io.BytesIO(members[f"{sample.key}.png"])))
        assert np.array_equal(pixels, np.asarray(sample.image))
    manifest = P.read_manifest(_out_dir(world))
    assert manifest is not None and manifest["complete"] and manifest["num_samples"] == 5
    assert [manifest["shards"][p.name]["samples"] for p in outputs] == [2, 2, 1]


def test_a_killed_run_resumes_by_shard(
    tmp_path: Path, world: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "copy"
    shutil.copytree(Path(world.data.root).parent, root)
    config = world_config(root, Path(world.tokenizer.path))
    out = _out_dir(config)
    before = {p.name: p.read_bytes() for p in list_shards(out)}
    # A run killed while writing shard 1 (a stale .tmp), after shard 2 was written but not yet recorded.
    (out / "shapes-train-000001.tar").unlink()
    (out / "shapes-train-000001.tar.tmp").write_bytes(b"partial")
    manifest = P.read_manifest(out)
    assert manifest is not None
    del manifest["shards"]["shapes-train-000002.tar"]
    (out / P.MANIFEST_FILE).write_text(json.dumps({**manifest, "complete": False}))
    calls: list[str] = []
    real = P.tokenize_shard
    monkeypatch.setattr(P, "tokenize_shard", lambda src, *a: calls.append(src.name) or real(src, *a))
    (report,) = P.pretokenize(config, ["train"], device="cpu", progress=False)
    assert calls == ["shapes-train-000001.tar", "shapes-train-000002.tar"]
    assert (report.written, report.reused, report.samples) == (2, 1, 5)
    assert {
        p.name: p.read_bytes() for p in out.iterdir() if p.suffix == ".tar"
    } == before  # deterministic bytes
    assert not list(out.glob("*.tmp"))
    calls.clear()
    assert P.pretokenize(config, ["train"], device="cpu", progress=False)[0].reused == 3 and calls == []


def test_a_changed_vq_checkpoint_rebuilds_instead_of_reusing(tmp_path: Path, world: Config) -> None:
    root = tmp_path / "copy"
    shutil.copytree(Path(world.data.root).parent, root)
    config = world_config(root, Path(world.tokenizer.path))
    old = np.load(
        io.BytesIO(tokenized_members(list_shards(_out_dir(config))[0])["shapes-train-00000000.codes.npy"])
    )
    save_random_vq(root / "vq", seed=1)
    (report,) = P.pretokenize(config, ["train"], device="cpu", progress=False)
    assert (report.written, report.reused) == (3, 0)
    new = np.load(
        io.BytesIO(tokenized_members(list_shards(_out_dir(config))[0])["shapes-train-00000000.codes.npy"])
    )
    assert not np.array_equal(old, new)


def test_corrupt_input_shard_is_named_and_finished_shards_stay(tmp_path: Path, sp_model: Path) -> None:
    config = world_config(tmp_path, sp_model)
    save_random_vq(tmp_path / "vq")
    write_split(config.data.world, config.data.root, "train", progress=False)
    bad = Path(config.data.root) / "train" / "shapes-train-000001.tar"
    bad.write_bytes(bad.read_bytes()[:3000])  # truncated mid-member
    with pytest.raises(CorruptShardError, match=r"shapes-train-000001\.tar"):
        P.pretokenize(config, ["train"], device="cpu", progress=False)
    manifest = P.read_manifest(_out_dir(config))
    assert manifest is not None and list(manifest["shards"]) == ["shapes-train-000000.tar"]
    assert not manifest["complete"] and not list(_out_dir(config).glob("*.tmp"))


def test_mismatched_vq_checkpoint_and_missing_inputs_are_refused(tmp_path: Path, sp_model: Path) -> None:
    config = world_config(tmp_path, sp_model)
    save_random_vq(tmp_path / "vq", resolution=32)
    with pytest.raises(P.PretokenizeError, match=r"resolution=32 but `model\.vq\.resolution` is 64"):
        P.load_vq(config)
    with pytest.raises(P.PretokenizeError, match=r"`model\.vq\.checkpoint` is not set"):
        P.load_vq(world_config(tmp_path, sp_model, "model.vq.checkpoint=null"))
    save_random_vq(tmp_path / "vq")
    with pytest.raises(P.PretokenizeError, match="no splits under"):
        P.pretokenize(config, device="cpu", progress=False)


def test_conversation_records_store_ids_per_piece(tmp_path: Path, sp_model: Path) -> None:
    config = world_config(tmp_path, sp_model)
    save_random_vq(tmp_path / "vq")
    turns = [{"from": "human", "value": "<|image|>what is left?"}, {"from": "gpt", "value": "a red circle"}]
    image = Image.new("RGB", (80, 48), (200, 10, 10))
    with ShardWriter(Path(config.data.root) / "train", "chat", 4) as writer:
        writer.write("c0", image, {"conversations": turns, "id": 7})
    (report,) = P.pretokenize(config, ["train"], device="cpu", progress=False)
    assert report.samples == 1
    record = json.loads(tokenized_members(_out_dir(config) / "chat-000000.tar")["c0.json"])
    tokenizer = TextTokenizer.load_sentencepiece(sp_model, 512)
    assert record["pretokenized"]["conversations"] == [
        [[], tokenizer.encode("what is left?")],
        [tokenizer.encode("a red circle")],
    ]
    assert record["pretokenized"]["image_hw"] == [48, 80] and record["id"] == 7
    with ShardWriter(Path(config.data.root) / "train", "chat", 4) as writer:
        writer.write("c1", image, {"conversations": [{"from": "human", "value": "<|image|><|image|>"}]})
    with pytest.raises(
        CorruptShardError, match=r"chat-000000.tar: sample 'c1': .* 2 <\|image\|> placeholders"
    ):
        P.pretokenize(config, ["train"], device="cpu", progress=False)


def test_cli_prints_a_summary(world: Config, capsys: pytest.CaptureFixture[str]) -> None:
    root = Path(world.data.root).parent
    P.main(
        [
            f"data.root={world.data.root}",
            f"tokenizer.path={world.tokenizer.path}",
            f"model.vq.checkpoint={root / 'vq'}",
            "model.preset=tiny",
            "--split",
            "train",
            "--no-progress",
        ]
    )
    out = capsys.readouterr().out
    assert "train: 5 samples in 3 shard(s) (0 written, 3 reused)" in out
    with pytest.raises(SystemExit, match=r"error: .*model\.vq\.checkpoint` is not set"):
        P.main([f"data.root={world.data.root}", f"tokenizer.path={world.tokenizer.path}", "--split", "train"])
