"""Shared fixtures: an isolated output root, a small trained sentencepiece tokenizer, a fake Chameleon vocab,
a user's own shards (no world ground truth)."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from tests.helpers import WORDS, write_fake_chameleon_vocab
from unified_mllm.data.shards import ShardWriter
from unified_mllm.text import TextTokenizer, train_sentencepiece


@pytest.fixture(autouse=True)
def isolated_output_root(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test writes its artifacts under a temporary UMLLM_OUTPUT, never into the tree or ~/.cache."""
    root = tmp_path_factory.mktemp("outputs")
    monkeypatch.setenv("UMLLM_OUTPUT", str(root))
    return root


@pytest.fixture(autouse=True, scope="session")
def one_thread() -> Iterator[None]:
    """One intra-op thread for the whole suite: on 2 shared cores, OpenMP's thread barriers make a 2-thread
    process many times slower whenever anything else runs (torchrun children get OMP_NUM_THREADS=1 anyway)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def corpus_lines() -> list[str]:
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 10))) + "?" for _ in range(3000)]


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory: pytest.TempPathFactory, corpus_lines: list[str]) -> Path:
    path = tmp_path_factory.mktemp("sp") / "text.model"
    return train_sentencepiece(corpus_lines, path, vocab_size=400, num_size_tokens=9)


@pytest.fixture(scope="session")
def sp_tokenizer(sp_model: Path) -> TextTokenizer:
    return TextTokenizer.load_sentencepiece(sp_model, num_image_codes=16)


@pytest.fixture
def chameleon_vocab(tmp_path: Path) -> Path:
    return write_fake_chameleon_vocab(tmp_path / "text_tokenizer.json")


@pytest.fixture(scope="session")
def user_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A user's own data in the documented shard format: ``train`` (16) and ``test`` (10) splits of 64 px
    images whose records carry a caption, a question and a text-to-image prompt, but none of the world's
    ground truth (no ``objects``)."""
    root = tmp_path_factory.mktemp("user_shards")
    rng = random.Random(7)
    for split, count in (("train", 16), ("test", 10)):
        with ShardWriter(root / split, f"mine-{split}", samples_per_shard=6) as writer:
            for i in range(count):
                colour = tuple(rng.randrange(256) for _ in range(3))
                image = Image.new("RGB", (64, 64), colour)
                ImageDraw.Draw(image).rectangle((8 * (i % 6), 10, 8 * (i % 6) + 20, 40), fill=(255, 255, 255))
                caption = " ".join(rng.choice(WORDS) for _ in range(6))
                record = {
                    "caption": caption,
                    "vqa": [{"question": "what is shown?", "answer": caption}],
                    "t2i": [{"prompt": caption}],
                }
                writer.write(f"{split}-{i:04d}", image, record)
    return root
