"""Evaluate an image tokenizer (any ``model.vq.kind``) by reconstruction: PSNR, SSIM, codebook usage, judge
accuracy and (optionally) rFID.

    python -m unified_mllm.eval.tokenizer --config configs/tokenizer/vqgan-tiny.yaml \\
        [--checkpoint DIR] [--split test] [--limit N] [--inception PATH] [--reference-stats NPZ]

Every image of the split (``data.root/<split>``, or ``--shards``) is preprocessed to ``model.vq.resolution``,
encoded to codes and decoded back, in batches. Reported:

* **PSNR** (dB, mean over images with a finite value; exact reconstructions are counted apart) and **SSIM**
  (:mod:`unified_mllm.metrics`, images in [-1, 1]);
* **codebook usage** over all codes of the split (fraction of the codebook used at least once) and the
  **perplexity** of the code distribution (the effective number of codes) — per code slot of a position and
  averaged for tokenizers with several codes per position (UniTok's sub-codebooks, DualToken's depths);
* **judge accuracy on reconstructions** (world data only: samples whose metadata lists ``objects``): the
  programmatic judge (:func:`unified_mllm.eval.judge.read_scene`) reads each reconstruction back into objects;
  ``object_accuracy`` is the fraction of ground-truth objects (shape, colour, size, cell) found in it,
  ``scene_accuracy`` the fraction of scenes read back exactly (no object missed, none extra, nothing wrong).
  The same figures on the preprocessed originals are given as the ceiling the judge allows;
* **rFID** with ``--inception`` (the FID Inception-v3 weights, ``pt_inception-2015-12-05-6726825d.pth``;
  nothing is downloaded): the Fréchet distance between Inception features of the reconstructions and of the
  reference — the split's originals, or the statistics of ``--reference-stats`` (``--save-reference-stats``
  writes the originals' statistics for reuse). The published rFID of image tokenizers uses the 50 000 ImageNet
  validation images at 256 px; on the world's few hundred 64 px scenes, upsampled to Inception's 299 px, the
  number is only a relative figure for comparing tokenizers on the same split, not comparable to papers
  (fewer images than the 2048 feature dimensions also leave the covariance rank-deficient);
* **semantic zero-shot** (UniTok, DualToken; world data only, like the judge): (colour, shape)
  classification of the split's single-object scenes by the tokenizer's semantic side against text prompts
  (:func:`semantic_zero_shot`).

PSNR, SSIM, codebook usage and rFID need nothing but images, so any shards in the documented format work;
figures a split cannot give are left out (``null`` in the JSON), never reported as NaN.

The checkpoint is ``--checkpoint`` (a ``save_pretrained`` directory, or Chameleon's ``vqgan.ckpt`` with its
yaml beside it), else ``model.vq.checkpoint``, else the trainer's ``vq_train.output_dir``. Results are written
next to it: ``eval_<split>.json`` and ``eval_<split>.md`` in the directory (``<stem>-eval_<split>.*`` beside a
file), or under ``--output``.
"""

from __future__ import annotations

import argparse
import itertools
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from unified_mllm import io
from unified_mllm.cli import add_debug_argument, one_line_errors
from unified_mllm.config import Config, ConfigError, WorldConfig, add_config_arguments, config_from_args
from unified_mllm.data.shards import Sample, iter_samples
from unified_mllm.eval.image_metrics import (
    FIDAccumulator,
    codebook_usage,
    compute_fid,
    load_stats,
    save_stats,
)
from unified_mllm.eval.inception import InceptionFeatureExtractor, load_fid_inception
from unified_mllm.eval.judge import read_scene
from unified_mllm.eval.tasks import batched, markdown_table, percent
from unified_mllm.metrics import psnr, ssim, zero_shot_classify
from unified_mllm.progress import progress as progress_bar
from unified_mllm.text import TextTokenizer
from unified_mllm.vision.contrastive import embed_texts, load_contrastive, tokenize
from unified_mllm.vision.image import preprocess, tensor_to_image
from unified_mllm.vision.tokenizer_registry import load_visual_tokenizer
from unified_mllm.vision.visual_tokenizer import VisualTokenizer

ObjectKey = tuple[str, str, str, int, int]


# --------------------------------------------------------------------------------------------- judge


def truth_keys(meta: dict[str, Any]) -> list[ObjectKey]:
    """Ground-truth objects of a world sample as judge keys (shape, color, size, row, col)."""
    return [(o["shape"], o["color"], o["size"], int(o["row"]), int(o["col"])) for o in meta["objects"]]


@dataclass
class JudgeTally:
    """Running judge counts over scenes: objects found (as a multiset match), extra objects, exact scenes."""

    objects: int = 0
    recovered: int = 0
    extra: int = 0
    scenes: int = 0
    exact: int = 0

    def add(self, truth: Sequence[ObjectKey], read: Sequence[ObjectKey]) -> None:
        found = sum((Counter(truth) & Counter(read)).values())
        self.objects += len(truth)
        self.recovered += found
        self.extra += len(read) - found
        self.scenes += 1
        self.exact += found == len(truth) == len(read)

    def to_json(self) -> dict[str, Any]:
        return {
            # None, not NaN, when nothing was counted (scenes listing no objects): JSON has no NaN.
            "object_accuracy": self.recovered / self.objects if self.objects else None,
            "scene_accuracy": self.exact / self.scenes if self.scenes else None,
            "objects": self.objects,
            "objects_recovered": self.recovered,
            "extra_objects": self.extra,
            "scenes": self.scenes,
            "scenes_exact": self.exact,
        }


# ------------------------------------------------------------------------------------------ evaluation


@dataclass
class Tallies:
    """Everything accumulated over the split."""

    psnr: list[float] = field(default_factory=list)
    ssim: list[float] = field(default_factory=list)
    codes: list[torch.Tensor] = field(default_factory=list)
    judge: JudgeTally = field(default_factory=JudgeTally)
    judge_originals: JudgeTally = field(default_factory=JudgeTally)
    fid_real: FIDAccumulator | None = None
    fid_fake: FIDAccumulator | None = None


@torch.no_grad()
def _evaluate_batch(
    tokenizer: VisualTokenizer,
    batch: list[Sample],
    tallies: Tallies,
    world: WorldConfig,
    inception: InceptionFeatureExtractor | None,
) -> None:
    device = next(tokenizer.parameters()).device
    pixels = preprocess([s.image for s in batch], tokenizer.config.resolution).to(device)
    codes = tokenizer.encode(pixels)
    recon = tokenizer.decode(codes).clamp(-1, 1)
    tallies.psnr += psnr(recon, pixels).tolist()
    tallies.ssim += ssim(recon, pixels).tolist()
    tallies.codes.append(codes.cpu())
    for sample, original, rebuilt in zip(batch, pixels, recon):
        if isinstance(sample.meta.get("objects"), list):
            truth = truth_keys(sample.meta)
            tallies.judge.add(truth, [o.key for o in read_scene(tensor_to_image(rebuilt), world)])
            tallies.judge_originals.add(truth, [o.key for o in read_scene(tensor_to_image(original), world)])
    if inception is not None and tallies.fid_real is not None and tallies.fid_fake is not None:
        tallies.fid_real.update(inception((pixels + 1) / 2))
        tallies.fid_fake.update(inception((recon + 1) / 2))


def _summarize(tallies: Tallies, vocab_sizes: Sequence[int]) -> dict[str, Any]:
    """Means over the split; codebook usage and perplexity per code slot of a position, then averaged (one
    slot for VQ-GAN; UniTok's sub-codebooks, DualToken's pixel and semantic depths)."""
    finite = [v for v in tallies.psnr if math.isfinite(v)]
    slots = torch.cat(tallies.codes).reshape(-1, len(vocab_sizes))
    usage = [codebook_usage(slots[:, i], size) for i, size in enumerate(vocab_sizes)]
    result: dict[str, Any] = {
        "num_images": len(tallies.psnr),
        "psnr": sum(finite) / len(finite) if finite else math.inf,
        "exact_reconstructions": len(tallies.psnr) - len(finite),
        "ssim": sum(tallies.ssim) / len(tallies.ssim),
        "codebook_usage": sum(u["usage_fraction"] for u in usage) / len(usage),
        "codes_used": sum(u["used"] for u in usage),
        "codebook_size": sum(vocab_sizes),
        "perplexity": sum(u["perplexity"] for u in usage) / len(usage),
        "code_slots": len(vocab_sizes),
        "judge": None,
    }
    if tallies.judge.scenes:
        result["judge"] = {**tallies.judge.to_json(), "originals": tallies.judge_originals.to_json()}
    return result


def evaluate_tokenizer(
    tokenizer: VisualTokenizer,
    samples: Iterator[Sample],
    world: WorldConfig,
    *,
    batch_size: int = 64,
    limit: int | None = None,
    inception: InceptionFeatureExtractor | None = None,
    reference_stats: str | None = None,
    save_reference: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Reconstruct ``samples`` with ``tokenizer`` (in eval mode) and measure it; see the module docstring."""
    if batch_size < 1 or (limit is not None and limit < 1):
        raise ValueError(f"need batch_size >= 1 and limit >= 1, got {batch_size}, {limit}")
    tokenizer.eval()
    tallies = Tallies()
    if inception is not None:
        device = next(tokenizer.parameters()).device
        tallies.fid_real, tallies.fid_fake = FIDAccumulator(device=device), FIDAccumulator(device=device)
    start = time.perf_counter()
    bar = progress_bar(desc="reconstruct", unit="img", total=limit, disable=not progress)
    for batch in batched(itertools.islice(samples, limit), batch_size):
        _evaluate_batch(tokenizer, batch, tallies, world, inception)
        bar.update(len(batch))
    bar.close()
    if not tallies.psnr:
        raise ValueError("no images to evaluate")
    result = _summarize(tallies, tokenizer.code_vocab_sizes())
    if tallies.fid_real is not None and tallies.fid_fake is not None:  # with inception
        if save_reference:
            save_stats(save_reference, tallies.fid_real.stats())
        reference = load_stats(reference_stats) if reference_stats else tallies.fid_real.stats()
        result["rfid"] = compute_fid(reference, tallies.fid_fake)
        result["rfid_reference"] = reference_stats or "originals of the evaluated images"
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


# ------------------------------------------------------------------------------------- semantic side


EmbedFn = Callable[[Sequence[Any]], torch.Tensor]


def semantic_embedders(tokenizer: VisualTokenizer, config: Config) -> tuple[EmbedFn, EmbedFn] | None:
    """``(images -> embeddings, prompts -> embeddings)`` of the tokenizer's semantic side (module docstring of
    :func:`semantic_zero_shot`), or None when it has none here."""
    vq = config.model.vq
    has_teacher = vq.dualtoken.pretrained and Path(vq.dualtoken.pretrained).is_dir()
    if not (vq.kind == "unitok" or (vq.kind == "dualtoken" and has_teacher)):
        return None
    text = TextTokenizer.from_config(config.tokenizer, vq.codebook_size)
    device = next(tokenizer.parameters()).device

    def pixels(images: Sequence[Any]) -> torch.Tensor:
        return preprocess(list(images), vq.resolution).to(device)

    model: Any = tokenizer
    if vq.kind == "unitok":
        return (
            lambda images: model.image_embedding(pixels(images)).float(),
            lambda prompts: model.text_embedding(
                tokenize(text, prompts, vq.unitok.text_context, pad=vq.unitok.text_pad_id).to(device)
            ).float(),
        )
    siglip = load_contrastive(vq.dualtoken.pretrained).to(device).eval()
    return (
        lambda images: model.semantic_embedding(pixels(images)).float(),
        lambda prompts: embed_texts(
            siglip, tokenize(text, prompts, config.contrastive.text_max_length).to(device)
        ).float(),
    )


@torch.no_grad()
def semantic_zero_shot(
    tokenizer: VisualTokenizer, config: Config, samples: Iterator[Sample], limit: int | None = None
) -> dict[str, Any] | None:
    """Zero-shot (colour, shape) accuracy of the tokenizer's *semantic* side on the single-object scenes of
    ``samples`` (``contrastive.prompt_template`` prompts): UniTok's image embedding of its codes against its own
    text tower, DualToken's quantized semantic embedding against the text tower of the SigLIP it distils
    (``model.vq.dualtoken.pretrained``, a contrastive SiglipModel directory). None for the VQ-GAN (no
    semantic side), a DualToken without that directory, or samples without single-object world scenes (data
    whose records carry no ``objects``)."""
    tokenizer.eval()
    embedders = semantic_embedders(tokenizer, config)
    if embedders is None:
        return None
    world = config.data.world
    result = zero_shot_classify(
        *embedders,
        itertools.islice(samples, limit),
        prompt_template=config.contrastive.prompt_template,
        colors=world.colors,
        shapes=world.shapes,
    )
    return result if result["num_images"] else None


# ------------------------------------------------------------------------------------------------ files


def format_markdown(result: dict[str, Any]) -> str:
    """The results as a markdown table."""
    rows = [
        ("images", str(result["num_images"])),
        ("PSNR (dB)", f"{result['psnr']:.2f}"),
        ("SSIM", f"{result['ssim']:.4f}"),
        (
            "codebook usage",
            f"{percent(result['codebook_usage'])} ({result['codes_used']}/{result['codebook_size']})",
        ),
        ("code perplexity", f"{result['perplexity']:.1f}"),
    ]
    judge = result.get("judge")
    if judge:
        for label, key in (("objects recovered", "object_accuracy"), ("scenes exact", "scene_accuracy")):
            both = f"{percent(judge[key])} (originals: {percent(judge['originals'][key])})"
            rows.append((f"judge: {label}", both))
        rows.append(("judge: extra objects", str(judge["extra_objects"])))
    if "rfid" in result:
        rows.append(("rFID (relative, see docs)", f"{result['rfid']:.2f}"))
    zero_shot = result.get("zero_shot")
    if zero_shot:
        rows.append(
            (
                f"semantic zero-shot ({zero_shot['num_images']} single-object images)",
                f"colour+shape {percent(zero_shot['accuracy'])}, colour {percent(zero_shot['color_accuracy'])}, "
                f"shape {percent(zero_shot['shape_accuracy'])}",
            )
        )
    header = f"Tokenizer `{result['checkpoint']}` on `{result['split']}`\n\n"
    return header + markdown_table(("metric", "value"), rows)


def output_paths(checkpoint: Path, split: str, output: str | None) -> tuple[Path, Path]:
    """Where the JSON and markdown results go (see the module docstring)."""
    name = f"eval_{Path(split).name}"
    if output is not None:
        base = Path(output).expanduser() / name
    elif checkpoint.is_dir():
        base = checkpoint / name
    else:
        base = checkpoint.parent / f"{checkpoint.stem}-{name}"
    return base.with_suffix(".json"), base.with_suffix(".md")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Measure an image tokenizer's reconstructions of a split.")
    add_config_arguments(parser)
    parser.add_argument("--checkpoint", help="tokenizer directory or file (default: see the module docs)")
    parser.add_argument("--split", default="test", help="split of data.root to reconstruct (default: test)")
    parser.add_argument("--shards", help="shards to reconstruct instead of data.root/<split>")
    parser.add_argument("--limit", type=int, help="evaluate only the first N images")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch (default: 64)")
    parser.add_argument("--inception", help="FID Inception weights: also report rFID")
    parser.add_argument("--reference-stats", help="rFID reference statistics (.npz) instead of the originals")
    parser.add_argument("--save-reference-stats", help="write the originals' Inception statistics here")
    parser.add_argument("--output", help="directory for the results (default: next to the checkpoint)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_debug_argument(parser)
    return parser


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The CLI's work: load, evaluate, write JSON + markdown, print the table."""
    config = config_from_args(args)
    # --checkpoint, else model.vq.checkpoint, else the trainer's output directory
    checkpoint = Path(
        args.checkpoint or config.model.vq.checkpoint or config.vq_train.output_dir
    ).expanduser()
    tokenizer = load_visual_tokenizer(checkpoint, config=config.model.vq, device=args.device)
    shards = Path(args.shards or Path(config.data.root) / args.split).expanduser()
    inception = load_fid_inception(args.inception, args.device) if args.inception else None
    result = evaluate_tokenizer(
        tokenizer,
        iter_samples(shards),
        config.data.world,
        batch_size=args.batch_size,
        limit=args.limit,
        inception=inception,
        reference_stats=args.reference_stats,
        save_reference=args.save_reference_stats,
        progress=not args.no_progress,
    )
    result["zero_shot"] = semantic_zero_shot(tokenizer, config, iter_samples(shards), args.limit)
    result = {"checkpoint": str(checkpoint), "split": args.split, "shards": str(shards), **result}
    json_path, md_path = output_paths(checkpoint, args.split, args.output)
    io.write_json(json_path, result)
    io.write_text(md_path, format_markdown(result))
    print(format_markdown(result))
    print(f"wrote {json_path} and {md_path}")
    return result


def main(argv: Sequence[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_intermixed_args(argv)
    with one_line_errors((ConfigError, ValueError), debug=args.debug):
        run(args)


if __name__ == "__main__":
    main()
