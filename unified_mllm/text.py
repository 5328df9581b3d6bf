"""Text tokenizer: one wrapper over two backends, with every special token reachable by name.

* ``sentencepiece`` — a model trained by :func:`train_sentencepiece` (``python -m unified_mllm.text train``)
  on a text corpus (the embedded world's in seconds). Our structural tokens and the resolution tokens
  ``<size-0> … <size-N>`` are user-defined pieces of that model; the image codes are *appended* after its
  vocabulary, so ids ``[n_pieces, n_pieces + num_image_codes)`` are VQ codes 0…K-1.
* ``chameleon`` — Chameleon's ``text_tokenizer.json`` read with Hugging Face ``tokenizers``. Its 65 536
  entries already hold the 8192 image codes under names ``IMGIMG<digits as letters A-J><one char>``,
  which is how Chameleon itself maps names to VQ indices; the structural tokens are reserved entries.

Both expose the same API; :meth:`TextTokenizer.special_tokens` hands the resolved ids to ``layout.py``.
"""

from __future__ import annotations

import argparse
import io
import itertools
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from unified_mllm.cli import one_line_errors
from unified_mllm.config import ConfigError, TextTokenizerConfig, add_config_arguments, config_from_args
from unified_mllm.io import write_bytes
from unified_mllm.layout import SpecialTokens

# Names of the structural tokens in a trained sentencepiece model (user-defined pieces).
SP_SPECIAL_NAMES = {
    "bos": "<s>",
    "eos": "</s>",
    "pad": "<pad>",
    "image_start": "<image-start>",
    "image_end": "<image-end>",
    "row_end": "<row-end>",
    "separator": "<sep>",
    "end_of_turn": "<eot>",
    "feature": "<image-feature>",
}
SP_CONTROL_IDS = {"unk": 0, "bos": 1, "eos": 2, "pad": 3}

# Chameleon / Lumina-mGPT names (see DESIGN.md, "How data flows").
CHAMELEON_SPECIAL_NAMES = {
    "bos": "<s>",
    "eos": "</s>",
    "pad": "<pad>",
    "image_start": "<racm3:break>",
    "image_end": "<eoss>",
    "row_end": "<reserved08799>",
    "separator": "<sentinel:0>",
    "end_of_turn": "<reserved08706>",
    "feature": "<reserved08707>",
}
CHAMELEON_SIZE_UNIT = 2  # one resolution step = 32 px = two rows of 16x-downsampled codes
CHAMELEON_MAX_SIZE_STEPS = 128
CHAMELEON_IMAGE_PREFIX = "IMGIMG"


def sp_size_token_name(step: int) -> str:
    return f"<size-{step}>"


def chameleon_size_token_name(step: int) -> str:
    return f"<reserved{8800 + step:05d}>"


def chameleon_code_of_name(name: str) -> int:
    """VQ index of a Chameleon image-token name: letters A-J stand for digits, the last char is padding."""
    digits = name[len(CHAMELEON_IMAGE_PREFIX) : -1]
    return int("".join(str(ord(ch) - ord("A")) if "A" <= ch <= "J" else ch for ch in digits))


def chameleon_name_of_code(code: int) -> str:
    """Inverse of :func:`chameleon_code_of_name` (padding char ``Z``), used to build test vocabularies."""
    return CHAMELEON_IMAGE_PREFIX + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"


class TokenizerError(ValueError):
    """A tokenizer file that cannot be used, or a token name it does not have."""


class TextTokenizer:
    """Encode/decode text and look up special tokens by name, over either backend."""

    def __init__(
        self,
        *,
        kind: str,
        backend: object,
        vocab: dict[str, int],
        special_names: dict[str, str],
        size_names: list[str],
        size_unit: int,
        image_codes: list[int],
        vocab_size: int,
        source: str,
    ) -> None:
        self.kind = kind
        self._backend = backend
        self._vocab = vocab
        self._special_names = dict(special_names)
        self._size_names = list(size_names)
        self.size_unit = size_unit  # code rows/columns per resolution-token step
        self._image_codes = list(image_codes)
        self.vocab_size = vocab_size
        self.source = source
        self._special_tokens = SpecialTokens.from_tokenizer(self)
        special = self._special_tokens
        self._non_text_ids = {*special.named_ids().values(), *special.size_ids, *self._image_codes}

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: TextTokenizerConfig, num_image_codes: int) -> TextTokenizer:
        """Load the tokenizer file named by ``config`` (codes appended for sentencepiece)."""
        if config.kind == "sentencepiece":
            return cls.load_sentencepiece(config.path, num_image_codes, size_unit=config.size_unit)
        tokenizer = cls.load_chameleon(config.path)
        if tokenizer.num_image_codes != num_image_codes:
            raise TokenizerError(
                f"{config.path} has {tokenizer.num_image_codes} image codes but the VQ codebook has {num_image_codes}"
            )
        return tokenizer

    @classmethod
    def load_sentencepiece(cls, path: str | Path, num_image_codes: int, size_unit: int = 1) -> TextTokenizer:
        import sentencepiece as spm

        path = Path(path)
        if not path.is_file():
            raise TokenizerError(
                f"sentencepiece model not found: {path} (train one: python -m unified_mllm.text train)"
            )
        processor = spm.SentencePieceProcessor()
        try:
            processor.Load(str(path))
        except (OSError, RuntimeError) as exc:
            raise TokenizerError(f"{path} is not a sentencepiece model ({exc})") from exc
        pieces = processor.GetPieceSize()
        vocab = {processor.IdToPiece(i): i for i in range(pieces)}
        size_names = list(itertools.takewhile(vocab.__contains__, map(sp_size_token_name, itertools.count())))
        return cls(
            kind="sentencepiece",
            backend=processor,
            vocab=vocab,
            special_names=SP_SPECIAL_NAMES,
            size_names=size_names,
            size_unit=size_unit,
            image_codes=list(range(pieces, pieces + num_image_codes)),
            vocab_size=pieces + num_image_codes,
            source=str(path),
        )

    @classmethod
    def load_chameleon(cls, path: str | Path) -> TextTokenizer:
        from tokenizers import Tokenizer

        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"Chameleon text_tokenizer.json not found: {path}")
        try:
            backend = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
            raise TokenizerError(f"{path} is not a tokenizers JSON file ({exc})") from exc
        vocab = backend.get_vocab(with_added_tokens=True)
        by_code = {
            chameleon_code_of_name(n): i for n, i in vocab.items() if n.startswith(CHAMELEON_IMAGE_PREFIX)
        }
        if sorted(by_code) != list(range(len(by_code))) or not by_code:
            raise TokenizerError(f"{path}: image-token names do not cover codes 0..{len(by_code) - 1}")
        names = map(chameleon_size_token_name, range(CHAMELEON_MAX_SIZE_STEPS))
        size_names = list(itertools.takewhile(vocab.__contains__, names))
        return cls(
            kind="chameleon",
            backend=backend,
            vocab=vocab,
            special_names=CHAMELEON_SPECIAL_NAMES,
            size_names=size_names,
            size_unit=CHAMELEON_SIZE_UNIT,
            image_codes=[by_code[c] for c in range(len(by_code))],
            vocab_size=backend.get_vocab_size(with_added_tokens=True),
            source=str(path),
        )

    # -- names --------------------------------------------------------------------------------------

    def special_token_names(self) -> dict[str, str]:
        """Role → token name (``bos``, ``image_start``, ``row_end``, ``end_of_turn``, …)."""
        return dict(self._special_names)

    def size_token_names(self) -> list[str]:
        return list(self._size_names)

    def token_to_id(self, name: str) -> int:
        """Id of a token by its name; a missing name raises :class:`TokenizerError` naming it."""
        try:
            return self._vocab[name]
        except KeyError:
            raise TokenizerError(f"token {name!r} is not in the vocabulary of {self.source}") from None

    def image_code_ids(self) -> list[int]:
        """``image_code_ids()[c]`` is the id of VQ code ``c``."""
        return list(self._image_codes)

    @property
    def num_image_codes(self) -> int:
        return len(self._image_codes)

    def special_tokens(self) -> SpecialTokens:
        return self._special_tokens

    # -- text ---------------------------------------------------------------------------------------

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        """Ids of ``text`` (no special tokens unless asked for)."""
        if self.kind == "sentencepiece":
            ids = list(self._backend.EncodeAsIds(text))
        else:
            ids = list(self._backend.encode(text, add_special_tokens=False).ids)
        special = self._special_tokens
        return ([special.bos] if bos else []) + ids + ([special.eos] if eos else [])

    def decode(self, ids: Iterable[int], *, skip_special: bool = True) -> str:
        """Text of ``ids``; structural tokens, resolution tokens and image codes are dropped by default."""
        ids = [int(t) for t in ids]
        if skip_special:
            ids = [t for t in ids if t not in self._non_text_ids]
        if self.kind == "sentencepiece":
            ids = [t for t in ids if t < self._image_codes[0]] if self._image_codes else ids
            return self._backend.DecodeIds(ids)
        return self._backend.decode(ids, skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"TextTokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, source={self.source!r})"


# ------------------------------------------------------------------------------------------- training


def train_sentencepiece(
    lines: Iterable[str], out_path: str | Path, vocab_size: int, num_size_tokens: int
) -> Path:
    """Train a BPE sentencepiece model on ``lines`` with our structural and resolution tokens.

    Byte fallback keeps any character encodable, so user data beyond the training corpus never turns
    into ``<unk>``. The file is written atomically.
    """
    import sentencepiece as spm

    out_path = Path(out_path)
    lines = list(lines)
    user_symbols = [n for role, n in SP_SPECIAL_NAMES.items() if role not in SP_CONTROL_IDS]
    user_symbols += [sp_size_token_name(i) for i in range(num_size_tokens)]
    # sentencepiece needs a piece for every control/byte/user symbol and every distinct character seen;
    # its own error for a too-small vocabulary is an opaque INTERNAL assertion.
    needed = len(SP_CONTROL_IDS) + 256 + len(user_symbols) + len(set("".join(lines)) - {" "})
    if vocab_size < needed:
        raise TokenizerError(
            f"tokenizer.vocab_size={vocab_size} is too small: 256 byte pieces, {len(SP_CONTROL_IDS)} control "
            f"and {len(user_symbols)} structural/size tokens plus the corpus characters need about {needed}"
        )
    model = io.BytesIO()
    spm.SentencePieceTrainer.Train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,  # a small corpus may not support the requested size
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        unk_id=SP_CONTROL_IDS["unk"],
        bos_id=SP_CONTROL_IDS["bos"],
        eos_id=SP_CONTROL_IDS["eos"],
        pad_id=SP_CONTROL_IDS["pad"],
        user_defined_symbols=user_symbols,
        num_threads=max(1, min(4, os.cpu_count() or 1)),
        minloglevel=2,
    )
    return write_bytes(out_path, model.getvalue())


def _read_corpus(paths: Sequence[str]) -> list[str]:
    lines: list[str] = []
    for path in paths:
        if not Path(path).is_file():
            raise TokenizerError(
                f"corpus file not found: {path} (generate the world: python -m unified_mllm.data.shapes)"
            )
        lines.extend(line for line in Path(path).read_text().splitlines() if line.strip())
    if not lines:
        raise TokenizerError(f"corpus {list(paths)} is empty")
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train or inspect the text tokenizer.")
    parser.add_argument("command", choices=["train", "info"])
    parser.add_argument("--corpus", action="append", default=[], help="text file(s), one sample a line")
    parser.add_argument("--force", action="store_true", help="retrain even when the model file exists")
    add_config_arguments(parser)
    args = parser.parse_intermixed_args(argv)  # the command and key=value overrides are both positional
    with one_line_errors((ConfigError, TokenizerError)):
        _run(args)


def _run(args: argparse.Namespace) -> None:
    config = config_from_args(args)
    tok_cfg = config.tokenizer
    if args.command == "train":
        if tok_cfg.kind != "sentencepiece":
            raise TokenizerError(
                "only sentencepiece tokenizers are trained here; Chameleon's is loaded from its file"
            )
        if Path(tok_cfg.path).is_file() and not args.force:
            print(f"text tokenizer exists: {tok_cfg.path} (use --force to retrain)")
        else:
            corpus = args.corpus or [str(Path(config.data.root) / "corpus.txt")]
            lines = _read_corpus(corpus)
            train_sentencepiece(lines, tok_cfg.path, tok_cfg.vocab_size, tok_cfg.num_size_tokens)
            print(f"trained sentencepiece on {len(lines)} lines -> {tok_cfg.path}")
    tokenizer = TextTokenizer.from_config(tok_cfg, config.model.vq.codebook_size)
    special = tokenizer.special_tokens()
    print(tokenizer)
    print(
        f"  text pieces + specials: {tokenizer.vocab_size - tokenizer.num_image_codes}, "
        f"image codes: {tokenizer.num_image_codes} at ids {special.code_ids[0]}..{special.code_ids[-1]}"
    )
    print("  " + ", ".join(f"{role}={i}" for role, i in special.named_ids().items()))
    print(f"  resolution tokens: {len(special.size_ids)} (unit {special.size_unit} codes)")
    if tokenizer.vocab_size > config.model.lm.vocab_size:
        print(
            f"  WARNING: {tokenizer.vocab_size} ids exceed model.lm.vocab_size={config.model.lm.vocab_size}"
        )


if __name__ == "__main__":
    main()
