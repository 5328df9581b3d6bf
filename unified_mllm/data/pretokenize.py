"""Pre-tokenization: run the VQ tokenizer once over every image and store codes and text ids beside the data.

``python -m unified_mllm.data.pretokenize --config configs/quickstart.yaml [--split train] [key=value ...]``
reads ``${data.root}/<split>/*.tar`` and writes ``${data.tokenized_root}/<split>/`` with the same shard names.
Each output sample holds

* ``<key>.png`` — the image as RGB, losslessly (the continuous SigLIP branch reads pixels at training time);
* ``<key>.codes.npy`` — the code grid ``[h, w]`` (``[h, w, D]`` for tokenizers with D codes a position; int16, or
  int32 above 32767 codes) of the image resized and centre-cropped to ``model.vq.resolution``;
* ``<key>.json`` — the input record unchanged plus its ``pretokenized`` section: the text ids of the caption,
  every question and answer, prompt and conversation turn (:func:`~unified_mllm.data.samples.encode_record_texts`).

Input records are the world's (``caption``, ``vqa``, ``t2i``) or conversations
(``{"conversations": [{"from": "human", "value": "<|image|>\\nQ"}, {"from": "gpt", "value": "A"}]}``) with at
most one ``<|image|>``: each sample stores one image.

**Resumable.** Each shard is written atomically (:mod:`unified_mllm.io`), then recorded in ``manifest.json``
with its sample count and its input's size and mtime; a re-run skips every recorded shard whose input is
unchanged. The manifest carries fingerprints of the text tokenizer file and of the VQ weights: when either
changes, every shard is rebuilt (the training dataset checks the tokenizer's too). It says ``complete`` once
every shard is done. A corrupt input shard raises :class:`~unified_mllm.data.shards.CorruptShardError` naming it;
a VQ checkpoint whose settings differ from ``model.vq`` is refused.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import tarfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unified_mllm.cli import one_line_errors
from unified_mllm.config import Config, TextTokenizerConfig, add_config_arguments, config_from_args
from unified_mllm.data.samples import PRETOKENIZED_KEY, RecordError, encode_record_texts
from unified_mllm.data.shapes import SPLITS
from unified_mllm.data.shards import CorruptShardError, Sample, add_member, iter_samples, list_shards
from unified_mllm.io import atomic_path, file_digest, read_json, remove_stale_temporaries, write_json
from unified_mllm.progress import progress as progress_bar
from unified_mllm.text import TextTokenizer
from unified_mllm.vision.image import to_rgb
from unified_mllm.vision.tokenizer_registry import load_visual_tokenizer
from unified_mllm.vision.visual_tokenizer import VisualTokenizer, stored_settings

FORMAT_NAME = "unified_mllm.pretokenized"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
CODES_MEMBER = "codes.npy"


class PretokenizeError(ValueError):
    """A pre-tokenization that cannot run as configured (missing checkpoint, mismatched tokenizer)."""


# ------------------------------------------------------------------------------------------ fingerprints


def tokenizer_fingerprint(tokenizer: TextTokenizerConfig, num_image_codes: int) -> str:
    """What the stored text ids depend on: the tokenizer file, its kind, size unit and the number of codes."""
    if not Path(tokenizer.path).is_file():
        raise PretokenizeError(
            f"text tokenizer not found: {tokenizer.path} (train it: python -m unified_mllm.text train)"
        )
    settings = {"kind": tokenizer.kind, "size_unit": tokenizer.size_unit, "codes": num_image_codes}
    text = json.dumps(settings, sort_keys=True) + file_digest(tokenizer.path)
    return hashlib.sha256(text.encode()).hexdigest()


def vq_fingerprint(vq: VisualTokenizer) -> str:
    """What the stored codes depend on: the VQ weights and shapes (not the checkpoint's file name)."""
    digest = hashlib.sha256()
    settings = stored_settings(vq.config)
    if vq.config.preprocess != "center_crop":  # the codes depend on it; the default keeps old fingerprints
        settings["preprocess"] = vq.config.preprocess
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for name, tensor in sorted(vq.state_to_save().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# -------------------------------------------------------------------------------------------- manifest


def read_manifest(directory: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The ``manifest.json`` of a tokenized split directory, or None when there is none (or it is unreadable)."""
    manifest = read_json(Path(directory) / MANIFEST_FILE)
    return manifest if isinstance(manifest, dict) and manifest.get("format") == FORMAT_NAME else None


def _input_stamp(path: Path) -> dict[str, int]:
    stat = path.stat()
    return {"input_bytes": stat.st_size, "input_mtime_ns": stat.st_mtime_ns}


def _is_done(manifest: dict[str, Any], shard: Path, out_dir: Path) -> bool:
    entry = manifest["shards"].get(shard.name)
    output = out_dir / shard.name
    return (
        entry is not None
        and all(entry.get(k) == v for k, v in _input_stamp(shard).items())
        and output.is_file()
        and output.stat().st_size == entry.get("output_bytes")
    )


# ------------------------------------------------------------------------------------------- tokenizing


def load_vq(config: Config, device: str | torch.device = "cpu") -> VisualTokenizer:
    """The tokenizer at ``model.vq.checkpoint`` (any kind) in eval mode, checked against ``model.vq``."""
    path = config.model.vq.checkpoint
    if not path:
        raise PretokenizeError("`model.vq.checkpoint` is not set: point it at a trained VQ tokenizer")
    vq = load_visual_tokenizer(path, config=config.model.vq, device=device).eval()
    want = config.model.vq
    for field in ("kind", "resolution", "codebook_size", "code_depth"):
        if getattr(vq.config, field) != getattr(want, field):
            raise PretokenizeError(
                f"VQ checkpoint {path} has {field}={getattr(vq.config, field)} but `model.vq.{field}` is "
                f"{getattr(want, field)}: the codes would not match the model's token layout"
            )
    # How the LM's images become VQ input is the LM recipe's choice, not the tokenizer checkpoint's.
    vq.config.preprocess = want.preprocess
    return vq


def _write_batch(
    tar: tarfile.TarFile, batch: list[Sample], vq: VisualTokenizer, tokenizer: TextTokenizer
) -> None:
    """Encode a batch of samples (one VQ forward) and append their members to ``tar``."""
    codes = vq.images_to_codes([s.image for s in batch], batch_size=len(batch))
    dtype = np.int16 if vq.config.codebook_size <= np.iinfo(np.int16).max + 1 else np.int32
    for sample, grid in zip(batch, codes):
        where = f"{sample.shard}: sample {sample.key!r}"
        try:
            section = encode_record_texts(
                sample.meta, tokenizer.encode, (sample.image.height, sample.image.width), where
            )
        except RecordError as exc:
            raise CorruptShardError(str(exc)) from exc
        png, npy = io.BytesIO(), io.BytesIO()
        # RGB (transparency on white) is what both branches see, and PNG cannot hold every mode (CMYK).
        to_rgb(sample.image).save(png, format="PNG")
        np.save(npy, grid.astype(dtype), allow_pickle=False)
        add_member(tar, f"{sample.key}.png", png.getvalue())
        add_member(tar, f"{sample.key}.{CODES_MEMBER}", npy.getvalue())
        record = {**sample.meta, PRETOKENIZED_KEY: section}
        add_member(tar, f"{sample.key}.json", json.dumps(record, sort_keys=True).encode())


def tokenize_shard(
    source: Path, target: Path, vq: VisualTokenizer, tokenizer: TextTokenizer, batch_size: int
) -> int:
    """Write the tokenized twin of shard ``source`` to ``target`` atomically; returns its number of samples."""
    samples, count = iter_samples([source]), 0
    with atomic_path(target) as tmp, tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        while batch := list(islice(samples, batch_size)):
            _write_batch(tar, batch, vq, tokenizer)
            count += len(batch)
    return count


@dataclass
class SplitReport:
    """What one split's run did: shards written and reused, samples in all, where, and how long it took."""

    split: str
    directory: str
    written: int
    reused: int
    samples: int
    seconds: float


def _fresh_manifest(
    split: str, source: Path, fingerprint: dict[str, str], old: dict[str, Any] | None
) -> dict[str, Any]:
    """The existing manifest when it was made with the same tokenizer and VQ weights, else an empty one."""
    if old is not None and old.get("fingerprint") == fingerprint and old.get("version") == FORMAT_VERSION:
        return {**old, "complete": False}
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "split": split,
        "input": str(source),
        "fingerprint": fingerprint,
        "shards": {},
        "complete": False,
    }


def pretokenize_split(
    config: Config,
    split: str,
    vq: VisualTokenizer,
    tokenizer: TextTokenizer,
    fingerprint: dict[str, str],
    *,
    progress: bool = True,
) -> SplitReport:
    """Tokenize ``${data.root}/<split>`` into ``${data.tokenized_root}/<split>``, skipping finished shards."""
    source = Path(config.data.root).expanduser() / split
    shards = list_shards(source)
    out_dir = Path(config.data.tokenized_root).expanduser() / split
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = _fresh_manifest(split, source, fingerprint, read_manifest(out_dir))
    names = {s.name for s in shards}
    manifest["shards"] = {k: v for k, v in manifest["shards"].items() if k in names}
    # Leftovers: partial shards of a killed run, and shards whose input is gone (the output mirrors the input).
    # (``*.tmp``: the temporary names of earlier versions.)
    remove_stale_temporaries(out_dir)
    for stale in [*out_dir.glob("*.tmp"), *(p for p in out_dir.glob("*.tar") if p.name not in names)]:
        stale.unlink()
    start, written = time.perf_counter(), 0
    bar = progress_bar(shards, desc=f"pretokenize {split}", unit="shard", disable=not progress)
    for shard in bar:
        if _is_done(manifest, shard, out_dir):
            continue
        count = tokenize_shard(shard, out_dir / shard.name, vq, tokenizer, config.data.pretokenize_batch_size)
        output = {"samples": count, "output_bytes": (out_dir / shard.name).stat().st_size}
        manifest["shards"][shard.name] = {**output, **_input_stamp(shard)}
        write_json(out_dir / MANIFEST_FILE, manifest, indent=1, sort_keys=True)
        written += 1
        bar.set_postfix(samples=sum(e["samples"] for e in manifest["shards"].values()))
    manifest["complete"] = True
    manifest["num_samples"] = sum(e["samples"] for e in manifest["shards"].values())
    write_json(out_dir / MANIFEST_FILE, manifest, indent=1, sort_keys=True)
    seconds = time.perf_counter() - start
    return SplitReport(split, str(out_dir), written, len(shards) - written, manifest["num_samples"], seconds)


def pretokenize(
    config: Config, splits: Sequence[str] | None = None, *, device: str | None = None, progress: bool = True
) -> list[SplitReport]:
    """Pre-tokenize ``splits`` (default: every world split present under ``data.root``)."""
    root = Path(config.data.root).expanduser()
    if not splits:
        splits = [s for s in SPLITS if (root / s).is_dir()]
        if not splits:
            raise PretokenizeError(
                f"no splits under {root}: generate the world first (python -m unified_mllm.data.shapes) or "
                "name one with --split"
            )
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    vq = load_vq(config, device)
    tokenizer = TextTokenizer.from_config(config.tokenizer, config.model.vq.codebook_size)
    fingerprint = {
        "tokenizer": tokenizer_fingerprint(config.tokenizer, tokenizer.num_image_codes),
        "vq": vq_fingerprint(vq),
    }
    return [
        pretokenize_split(config, split, vq, tokenizer, fingerprint, progress=progress) for split in splits
    ]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Run the VQ tokenizer and text tokenizer once over a dataset."
    )
    add_config_arguments(parser)
    parser.add_argument(
        "--split", action="append", default=[], help="split(s) to tokenize (default: all present)"
    )
    parser.add_argument(
        "--device", default=None, help="torch device of the VQ tokenizer (default: cuda if any)"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_intermixed_args(argv)
    with one_line_errors((ValueError,)):  # ConfigError, CorruptShardError, ... name their cause
        reports = pretokenize(
            config_from_args(args), args.split, device=args.device, progress=not args.no_progress
        )
    for report in reports:
        print(
            f"{report.split}: {report.samples} samples in {report.written + report.reused} shard(s) "
            f"({report.written} written, {report.reused} reused) at {report.directory} "
            f"in {report.seconds:.1f} s"
        )


if __name__ == "__main__":
    main()
