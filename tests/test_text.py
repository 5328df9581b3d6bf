"""Text tokenizer over both backends: special tokens by name, image-code ranges, round trips, errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import write_fake_chameleon_vocab
from unified_mllm.config import TextTokenizerConfig
from unified_mllm.layout import build_image_span, parse_image_span
from unified_mllm.text import (
    CHAMELEON_SPECIAL_NAMES,
    SP_SPECIAL_NAMES,
    TextTokenizer,
    TokenizerError,
    chameleon_code_of_name,
    chameleon_name_of_code,
    main,
)


def test_sentencepiece_round_trip(sp_tokenizer: TextTokenizer) -> None:
    for text in ["Is there a red circle?", "how many squares are above the triangle?", "Zürich 2024 ✓"]:
        assert sp_tokenizer.decode(sp_tokenizer.encode(text)) == text  # byte fallback keeps every char


def test_sentencepiece_special_tokens_by_name(sp_tokenizer: TextTokenizer) -> None:
    special = sp_tokenizer.special_tokens()
    for role, name in SP_SPECIAL_NAMES.items():
        assert getattr(special, role) == sp_tokenizer.token_to_id(name)
    assert special.bos == 1 and special.eos == 2 and special.pad == 3  # sentencepiece control ids
    assert len(special.size_ids) == 9 and special.size_unit == 1
    assert sp_tokenizer.token_to_id("<size-8>") == special.size_ids[8]


def test_sentencepiece_codes_are_appended(sp_tokenizer: TextTokenizer) -> None:
    special = sp_tokenizer.special_tokens()
    pieces = sp_tokenizer.vocab_size - 16
    assert special.code_ids == tuple(range(pieces, pieces + 16))
    assert max(sp_tokenizer.encode("a photo of three large purple circles")) < pieces


def test_bos_eos_and_decoding_skips_structure(sp_tokenizer: TextTokenizer) -> None:
    special = sp_tokenizer.special_tokens()
    ids = sp_tokenizer.encode("a red square", bos=True, eos=True)
    assert ids[0] == special.bos and ids[-1] == special.eos
    span = build_image_span([[0, 15], [3, 4]], special, num_features=2)
    mixed = sp_tokenizer.encode("look") + span + sp_tokenizer.encode(" here")
    assert sp_tokenizer.decode(mixed) == "look here"
    assert parse_image_span(span, special).codes.tolist() == [[0, 15], [3, 4]]


def test_missing_token_name_is_named(sp_tokenizer: TextTokenizer) -> None:
    with pytest.raises(TokenizerError, match="'<nope>' is not in the vocabulary"):
        sp_tokenizer.token_to_id("<nope>")


def test_bad_sentencepiece_files(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="not found"):
        TextTokenizer.load_sentencepiece(tmp_path / "missing.model", 8)
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"\x00not a model")
    with pytest.raises(TokenizerError, match="is not a sentencepiece model"):
        TextTokenizer.load_sentencepiece(garbage, 8)


@pytest.mark.parametrize("code", [0, 7, 10, 123, 8191])
def test_chameleon_image_names_round_trip(code: int) -> None:
    assert chameleon_code_of_name(chameleon_name_of_code(code)) == code


def test_chameleon_backend_resolves_everything_by_name(chameleon_vocab: Path) -> None:
    tokenizer = TextTokenizer.load_chameleon(chameleon_vocab)
    special = tokenizer.special_tokens()
    for role, name in CHAMELEON_SPECIAL_NAMES.items():
        assert getattr(special, role) == tokenizer.token_to_id(name)
    # The fake vocab stores image tokens in shuffled order: code c must map to the entry *named* c.
    for code, token_id in enumerate(special.code_ids):
        assert tokenizer.token_to_id(chameleon_name_of_code(code)) == token_id
    assert special.code_ids != tuple(sorted(special.code_ids))
    assert special.size_unit == 2 and special.size_token(6) == tokenizer.token_to_id("<reserved08803>")
    ids = tokenizer.encode("is there a red circle ?", bos=True)
    assert ids[0] == special.bos and tokenizer.decode(ids) == "is there a red circle ?"


def test_chameleon_codebook_mismatch(chameleon_vocab: Path) -> None:
    cfg = TextTokenizerConfig(kind="chameleon", path=str(chameleon_vocab))
    assert TextTokenizer.from_config(cfg, 12).num_image_codes == 12
    with pytest.raises(TokenizerError, match="has 12 image codes but the VQ codebook has 8192"):
        TextTokenizer.from_config(cfg, 8192)


def test_chameleon_missing_role_is_named(tmp_path: Path) -> None:
    path = write_fake_chameleon_vocab(tmp_path / "t.json")
    text = path.read_text().replace("<sentinel:0>", "<sentinel:9>")
    path.write_text(text)
    with pytest.raises(TokenizerError, match="'<sentinel:0>' is not in the vocabulary"):
        TextTokenizer.load_chameleon(path)


def test_train_cli_writes_and_reuses(
    tmp_path: Path, corpus_lines: list[str], capsys: pytest.CaptureFixture
) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(corpus_lines[:500]))
    model = tmp_path / "tok" / "sp.model"
    args = ["train", "--corpus", str(corpus), f"tokenizer.path={model}", "tokenizer.vocab_size=400",
            "tokenizer.num_size_tokens=9", "model.vq.codebook_size=32"]  # fmt: skip
    main(args)
    assert model.is_file() and "trained sentencepiece" in capsys.readouterr().out
    main(args)
    assert "exists" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"^error: corpus file not found"):
        main([*args, "--force", "--corpus", str(tmp_path / "none.txt")])
    with pytest.raises(SystemExit, match=r"^error: .*tokenizer.vocab_size=280 is too small"):
        main([*args, "--force", "tokenizer.vocab_size=280"])
