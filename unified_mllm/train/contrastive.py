"""Contrastive pre-training of the tiny SigLIP on the world's captions, with the sigmoid loss of SigLIP.

Published SigLIP towers come from image–text pre-training (Zhai et al. 2023, "Sigmoid Loss for Language Image
Pre-Training"). The tiny preset has no such checkpoint, so this module trains one the same way on the embedded
world: the contrastive ``SiglipModel`` of :mod:`unified_mllm.vision.contrastive` (the vision tower of
``model.vision`` with SigLIP's attention-pooling head, and a small text tower reading our text tokenizer's
ids), with :func:`sigmoid_loss` (a learnable temperature, initialised to 10, and bias, to -10).

The result is a full ``SiglipModel`` (``save_pretrained``) in the run directory ``contrastive.output_dir``;
the unified model reads its vision tower with :func:`unified_mllm.vision.siglip.load_siglip_pretrained` (set
``model.vision.pretrained`` to that directory). ``contrastive.json`` beside it records what it was trained
from, so a re-run with the same settings reuses it. The report at the end, on ``contrastive.eval_split``
(``eval.json``), is what any captioned data allows (:func:`evaluate_contrastive`): image-text retrieval, and
zero-shot classification and linear probes where the records carry the world's ``objects``. A re-run that reuses
the weights re-scores only when the report's inputs changed (:func:`evaluation_key`, stored in ``eval.json``).

    python -m unified_mllm.train.contrastive --config configs/quickstart.yaml [key=value ...]

It needs captioned shards (the world's, ``python -m unified_mllm.data.shapes``, or your own in the same
format) and the text tokenizer (``python -m unified_mllm.text train``). Single process, no distribution
(model code here knows nothing of it).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.optim.lr_scheduler import LambdaLR
from transformers import SiglipModel
from transformers.utils import logging as hf_logging

from unified_mllm import io
from unified_mllm.config import Config, ConfigError, ContrastiveConfig, VisionConfig, WorldConfig
from unified_mllm.data.contrastive_views import hard_negative, object_view, scene_of, scene_pair
from unified_mllm.data.images import buffered_shuffle
from unified_mllm.data.shapes import cell_name
from unified_mllm.data.shards import Sample, iter_samples, list_shards
from unified_mllm.metrics import retrieval_recall, zero_shot_classify
from unified_mllm.text import TextTokenizer
from unified_mllm.train.contrastive_probes import format_probes, probe_eval
from unified_mllm.train.distributed import DistInfo
from unified_mllm.train.divergence import check_finite, injected_fault
from unified_mllm.train.harness import CheckpointPolicy, Run, RunState, reuse_finished, run_cli
from unified_mllm.train.optim import backward_and_step, build_scheduler
from unified_mllm.vision.contrastive import (
    build_contrastive_model,
    embed_images,
    embed_texts,
    image_pixels,
    load_contrastive,
    tokenize,
)

SUMMARY_FILE = "contrastive.json"
EVAL_FILE = "eval.json"
EVAL_KEY = "evaluation_key"  # in eval.json: what the report was computed from (evaluation_key)
# Settings the report depends on beyond the training fingerprint.
_EVALUATION_FIELDS = ("eval_split", "prompt_template", "probe_train_scenes")
# Settings that do not change the trained weights, so a finished run is reused when only they differ.
_NOT_TRAINING_FIELDS = (
    "output_dir",
    "eval_split",
    "prompt_template",
    "probe_train_scenes",
    "log_every",
    "checkpoint_every",
    "keep_last",
    "resume",
)
# One process: this trainer knows nothing of distribution.
_ONE = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
# The panels of loss_curves.png.
CURVE_PANELS = (("sigmoid loss", ("loss",)), ("temperature", ("temperature",)), ("learning rate", ("lr",)))


def sigmoid_loss(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor
) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss for ``B`` matching pairs (row i of each input belongs together).

    ``image_embeds``: ``(B, D)``, ``text_embeds``: ``(B + K, D)``, L2-normalised; texts past the first ``B``
    are extra negatives that match no image (hard negatives). ``logit_scale`` is t' (the temperature is
    ``exp(t')``), ``logit_bias`` is b. Every pair is a binary problem (+1 on the diagonal, -1 elsewhere); the
    negative log-likelihoods are summed over all ``B * (B + K)`` pairs and divided by ``B``, as in the paper.
    """
    logits = image_embeds @ text_embeds.t() * logit_scale.exp() + logit_bias
    labels = 2.0 * torch.eye(*logits.shape, device=logits.device, dtype=logits.dtype) - 1.0
    return -F.logsigmoid(labels * logits).sum() / logits.shape[0]


def contrastive_pair(
    sample: Sample, world: WorldConfig, contrastive: ContrastiveConfig, rng: np.random.Generator
) -> tuple[Image.Image, str, str | None]:
    """``(image, caption, hard negative or None)`` of one captioned sample, with the extra views of
    :mod:`unified_mllm.data.contrastive_views` drawn from ``rng`` where the record carries the world's scene."""
    image, text = sample.image, sample.meta["caption"]
    scene = scene_of(sample.meta) if contrastive.object_views or contrastive.hard_negatives else None
    if scene is None:
        return image, text, None
    if contrastive.object_views and rng.random() < contrastive.object_views:
        scene = object_view(scene, rng)
        image, text = scene_pair(scene)
    if not contrastive.hard_negatives:
        return image, text, None
    return image, text, hard_negative(scene, world, contrastive.hard_negatives, rng)


def caption_batches(
    shards: Sequence[Path],
    tokenizer: TextTokenizer,
    vision: VisionConfig,
    contrastive: ContrastiveConfig,
    *,
    world: WorldConfig | None = None,
    skip: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Endless ``(pixel_values (B, 3, S, S), input_ids (B, L), negative_ids (K, L))`` batches of (image,
    caption) pairs and the hard-negative captions of :func:`contrastive_pair` (``K = 0`` without them).

    Each pass visits the shards in a new seeded order through a shuffle buffer; samples without a caption
    are skipped. ``world``: the vocabularies hard negatives draw from (default: the world's defaults).
    ``skip``: the number of batches a resumed run has already trained on; they are drawn in the same order
    (the stream is a function of the seed alone) but not turned into tensors.
    """
    world = WorldConfig() if world is None else world
    rng = np.random.default_rng(contrastive.seed)
    # The extra views draw from their own stream, so turning them on leaves the order of the samples alone.
    views_rng = np.random.default_rng([contrastive.seed, 1])
    while True:
        order = [shards[int(i)] for i in rng.permutation(len(shards))]
        captioned = (s for s in iter_samples(order) if s.meta.get("caption"))
        batch: list[tuple[Image.Image, str, str | None]] = []
        seen = 0
        for sample in buffered_shuffle(captioned, contrastive.shuffle_buffer, rng):
            seen += 1
            batch.append(contrastive_pair(sample, world, contrastive, views_rng))
            if len(batch) == contrastive.batch_size:
                if skip:
                    skip -= 1
                else:
                    images, texts, negatives = zip(*batch)
                    extra = [text for text in negatives if text is not None]
                    yield (
                        image_pixels(images, vision.image_size),
                        tokenize(tokenizer, texts, contrastive.text_max_length),
                        tokenize(tokenizer, extra, contrastive.text_max_length).view(
                            len(extra), contrastive.text_max_length
                        ),
                    )
                batch = []
        if seen == 0:
            raise ValueError(f"no captioned samples in {[str(s) for s in shards]}")


# --------------------------------------------------------------------------------------------- training


def make_optimizer(model: SiglipModel, contrastive: ContrastiveConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (biases, norms, t' and b are not pulled towards 0)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": contrastive.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=contrastive.lr, betas=(0.9, 0.95))


def make_schedule(optimizer: torch.optim.Optimizer, contrastive: ContrastiveConfig) -> LambdaLR:
    """Linear warm-up, then a cosine down to ``min_lr_ratio`` at ``max_steps``."""
    return build_scheduler(optimizer, contrastive, contrastive.max_steps)


def train_step(
    model: SiglipModel,
    optimizer: torch.optim.Optimizer,
    schedule: LambdaLR,
    batch: tuple[torch.Tensor, ...],
    contrastive: ContrastiveConfig,
    accept: Callable[[torch.Tensor, torch.Tensor], bool] | None = None,
    fault: float = 1.0,
) -> float:
    """One optimizer step of :func:`sigmoid_loss` on ``batch`` (pixels, ids[, hard-negative ids]), unless
    ``accept(loss, norm)`` (the divergence guard) refuses it; returns the step's loss. ``fault`` multiplies the
    loss (fault drills)."""
    device = model.logit_scale.device
    pixels, ids = batch[0], torch.cat(batch[1:])
    image_embeds = embed_images(model, pixels.to(device))
    text_embeds = embed_texts(model, ids.to(device))
    loss = sigmoid_loss(image_embeds, text_embeds, model.logit_scale, model.logit_bias) * fault
    backward_and_step(loss, model.parameters(), optimizer, schedule, contrastive.grad_clip, accept)
    return loss.item()  # CPU-sized model: the sync costs nothing next to the step


def train_contrastive(
    model: SiglipModel,
    config: Config,
    tokenizer: TextTokenizer,
    *,
    force: bool = False,
    progress: bool = True,
    finish: Callable[[list[float]], None] | None = None,
) -> list[float]:
    """Run ``contrastive.max_steps`` optimizer steps on the run harness in ``contrastive.output_dir``
    (checkpoints, exact resume, ``metrics.jsonl``, ``loss_curves.png``), resumed from its newest checkpoint
    made with the same settings (``force``: started over); returns the loss of every step. ``finish`` is called
    with those losses while the run directory is still locked (so a second launch cannot interleave its own
    checkpoints with the export it writes)."""
    cfg = config.contrastive
    optimizer, shards = make_optimizer(model, cfg), _split_shards(config, cfg.train_split)
    schedule = make_schedule(optimizer, cfg)
    parts = {"model": model, "optimizer": optimizer, "schedule": schedule}
    harness = Run(
        Path(cfg.output_dir),
        dataclasses.replace(_ONE, device=model.logit_scale.device),
        CheckpointPolicy(cfg.checkpoint_every, cfg.keep_last, cfg.resume),
        "contrastive.max_steps",
        fingerprint=fingerprint(config),
        max_bad_steps=cfg.max_bad_steps,
        bad_steps_name="contrastive.max_bad_steps",
    )
    with harness.exclusive():
        if force:
            harness.start_over()
        run, state = harness.resume(cfg.max_steps)
        for key, part in parts.items():
            if state:
                part.load_state_dict(state[key])
        harness.snapshot_config(config)
        losses: list[float] = list(state.get("losses", []))
        batches = caption_batches(
            shards, tokenizer, config.model.vision, cfg, world=config.data.world, skip=run.step
        )
        logged, started = run.step, time.perf_counter()

        def step(run: RunState) -> None:
            number = run.step + 1

            def accept(loss: torch.Tensor, norm: torch.Tensor) -> bool:
                return harness.guard.accept(number, loss, norm)

            losses.append(
                train_step(model, optimizer, schedule, next(batches), cfg, accept, injected_fault(number))
            )
            run.data_state = run.step + 1  # batches drawn

        def log(run: RunState) -> tuple[dict[str, Any], dict[str, float]]:
            nonlocal logged, started
            loss, temperature = float(np.mean(losses[logged:])), model.logit_scale.exp().item()
            seconds = (time.perf_counter() - started) / max(run.step - logged, 1)
            logged, started = run.step, time.perf_counter()
            record = {"kind": "train", "step": run.step, "lr": optimizer.param_groups[0]["lr"], "loss": loss}
            record |= {"temperature": temperature, "bias": model.logit_bias.item(), "sec_per_step": seconds}
            return record, {"loss": loss, "t": temperature}

        def checkpoint(run: RunState) -> None:
            harness.save(run, {**{k: v.state_dict() for k, v in parts.items()}, "losses": losses}, config)

        wandb_config = {
            "contrastive": dataclasses.asdict(cfg),
            "vision": dataclasses.asdict(config.model.vision),
        }
        name, wandb = "siglip contrastive", config.train.wandb
        model.train()
        with harness.logging(
            run, name=name, total=cfg.max_steps, wandb=wandb, wandb_config=wandb_config, progress=progress
        ):
            harness.loop(run, cfg.max_steps, step, log_every=cfg.log_every, log=log, checkpoint=checkpoint)
        harness.save_curves(CURVE_PANELS)
        model.eval()
        if finish is not None:
            finish(losses)
        return losses


# ------------------------------------------------------------------------------------------- evaluation


def _embedders(
    model: SiglipModel, tokenizer: TextTokenizer, vision: VisionConfig, contrastive: ContrastiveConfig
) -> tuple[Callable[[Sequence[Image.Image]], torch.Tensor], Callable[[Sequence[str]], torch.Tensor]]:
    """Functions giving the model's L2-normalised fp32 embeddings of images and of texts."""
    device = model.logit_scale.device

    def images_fn(images: Sequence[Image.Image]) -> torch.Tensor:
        return embed_images(model, image_pixels(images, vision.image_size).to(device)).float()

    def texts_fn(texts: Sequence[str]) -> torch.Tensor:
        return embed_texts(model, tokenize(tokenizer, texts, contrastive.text_max_length).to(device)).float()

    return images_fn, texts_fn


def zero_shot_eval(
    model: SiglipModel,
    tokenizer: TextTokenizer,
    samples: Iterable[Sample],
    vision: VisionConfig,
    contrastive: ContrastiveConfig,
    colors: Sequence[str],
    shapes: Sequence[str],
    *,
    sizes: Sequence[str] = (),
    grid_size: int = 0,
) -> dict[str, Any]:
    """:func:`zero_shot_classify` with a contrastive SigLIP (the argmax of the cosine similarity is the
    argmax of the sigmoid logits, since ``t > 0`` and ``b`` is shared).

    A ``prompt_template`` that also names ``{size}`` and/or ``{cell}`` is expanded over ``sizes`` and the
    ``grid_size`` grid's cell names, and a class scores its best-matching variant: the prompts then have the
    form of the training captions ("a large red circle in the top left"), and the answer is the colour and
    shape of the single-object description that fits the image best (``prompt_variants`` in the result).
    """
    model.eval()
    images_fn, texts_fn = _embedders(model, tokenizer, vision, contrastive)
    variants = prompt_variants(contrastive.prompt_template, sizes, grid_size)
    if len(variants) == 1:
        return zero_shot_classify(
            images_fn,
            texts_fn,
            samples,
            prompt_template=variants[0],
            colors=colors,
            shapes=shapes,
            batch_size=contrastive.batch_size,
        )
    classes = [(color, shape) for color in colors for shape in shapes]
    # (V, C, D): every variant's prompt for every class.
    texts = torch.stack([texts_fn([v.format(color=c, shape=s) for c, s in classes]) for v in variants])

    def best_variant(images: Sequence[Image.Image]) -> torch.Tensor:
        # One "embedding" per class whose dot product with the prompts' one-hot rows is the class's best
        # variant score: zero_shot_classify then takes its argmax like any similarity.
        return torch.einsum("nd,vcd->nvc", images_fn(images), texts).amax(dim=1)

    def class_rows(prompts: Sequence[str]) -> torch.Tensor:
        return torch.eye(len(prompts))

    result = zero_shot_classify(
        best_variant,
        class_rows,
        samples,
        prompt_template="{color} {shape}",
        colors=colors,
        shapes=shapes,
        batch_size=contrastive.batch_size,
    )
    return {**result, "prompt_variants": len(variants)}


def prompt_variants(template: str, sizes: Sequence[str], grid_size: int) -> list[str]:
    """``template`` with ``{size}`` and ``{cell}`` filled in every way (only ``{color}``/``{shape}`` left)."""
    names = {
        "size": list(sizes),
        "cell": [cell_name(r, c, grid_size) for r in range(grid_size) for c in range(grid_size)],
    }
    used = [key for key in names if "{" + key + "}" in template]
    for key in used:
        if not names[key]:
            raise ConfigError(f"`contrastive.prompt_template` names {{{key}}} but the world gives no {key}s")
    keep = {"color": "{color}", "shape": "{shape}"}
    return [
        template.format(**keep, **dict(zip(used, values)))
        for values in itertools.product(*(names[key] for key in used))
    ]


def format_zero_shot(result: dict[str, Any], split: str) -> str:
    chance = result["chance"]
    return (
        f"zero-shot on {split} ({result['num_images']} single-object images): "
        f"colour+shape {100 * result['accuracy']:.1f}% (chance {100 * chance['accuracy']:.1f}%), "
        f"colour {100 * result['color_accuracy']:.1f}% (chance {100 * chance['color']:.1f}%), "
        f"shape {100 * result['shape_accuracy']:.1f}% (chance {100 * chance['shape']:.1f}%)"
        + (f", best of {result['prompt_variants']} prompt variants" if "prompt_variants" in result else "")
    )


@torch.no_grad()
def embed_pairs(
    model: SiglipModel,
    tokenizer: TextTokenizer,
    pairs: Sequence[tuple[Image.Image, str]],
    vision: VisionConfig,
    contrastive: ContrastiveConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised ``(image embeddings (N, D), caption embeddings (N, D))`` of (image, caption) pairs, fp32
    on the CPU."""
    images_fn, texts_fn = _embedders(model, tokenizer, vision, contrastive)
    images, captions = zip(*pairs)
    return images_fn(images).cpu(), texts_fn(captions).cpu()


def caption_retrieval(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, captions: Sequence[str]
) -> dict[str, Any]:
    """Recall@1/@5 of image -> caption and caption -> image retrieval by cosine similarity; pair i is image i
    with caption i, and images whose captions are the same string share their right captions (the world
    repeats captions, and no model can tell identical texts apart)."""
    index = {caption: i for i, caption in enumerate(dict.fromkeys(captions))}
    ids = torch.tensor([index[caption] for caption in captions])
    similarity = image_embeds @ text_embeds.t()
    return {
        "num_pairs": len(captions),
        "distinct_captions": len(index),
        **retrieval_recall(similarity, ids[:, None] == ids[None, :]),
    }


def evaluate_contrastive(
    model: SiglipModel,
    tokenizer: TextTokenizer,
    samples: Iterable[Sample],
    config: Config,
    *,
    progress: bool = True,
) -> dict[str, Any]:
    """What any captioned split allows, plus the world's figures where its records carry them.

    Returns ``split``, ``retrieval`` (:func:`caption_retrieval` over the captioned samples; None without any)
    and, only when some records list ``objects`` and one of them is a single-object scene, ``zero_shot``
    (:func:`zero_shot_eval`), and with ``contrastive.probe_train_scenes`` the linear probes of the image side
    (``probes``: :func:`unified_mllm.train.contrastive_probes.probe_eval`, fitted on that many scenes of
    ``train_split``). :func:`report_lines` words it for the console.
    """
    cfg, vision, world = config.contrastive, config.model.vision, config.data.world
    model.eval()
    annotated: list[Sample] = []  # records with the world's ground truth, for zero-shot classification
    pairs: list[tuple[Image.Image, str]] = []
    embeds: list[tuple[torch.Tensor, torch.Tensor]] = []
    captions: list[str] = []
    for sample in samples:
        if isinstance(sample.meta.get("objects"), list):
            annotated.append(sample)
        if sample.meta.get("caption"):
            pairs.append((sample.image, sample.meta["caption"]))
            captions.append(sample.meta["caption"])
        if len(pairs) == cfg.batch_size:
            embeds.append(embed_pairs(model, tokenizer, pairs, vision, cfg))
            pairs = []
    if pairs:
        embeds.append(embed_pairs(model, tokenizer, pairs, vision, cfg))
    result: dict[str, Any] = {"split": cfg.eval_split, "retrieval": None}
    if captions:
        image_embeds, text_embeds = (torch.cat(parts) for parts in zip(*embeds))
        result["retrieval"] = caption_retrieval(image_embeds, text_embeds, captions)
    if annotated:
        zero_shot = zero_shot_eval(
            model,
            tokenizer,
            annotated,
            vision,
            cfg,
            world.colors,
            world.shapes,
            sizes=world.sizes,
            grid_size=world.grid_size,
        )
        if zero_shot["num_images"]:
            result["zero_shot"] = zero_shot
    if annotated and cfg.probe_train_scenes:
        train = itertools.islice(iter_samples(_split_shards(config, cfg.train_split)), cfg.probe_train_scenes)
        probes = probe_eval(
            model, train, annotated, vision, world, batch_size=cfg.batch_size, progress=progress
        )
        if probes is not None:
            result["probes"] = probes
    return result


def report_lines(result: dict[str, Any]) -> list[str]:
    """:func:`evaluate_contrastive`'s result as console lines: retrieval, then zero-shot and probes when present."""
    split = result["split"]
    lines = [format_retrieval(result["retrieval"], split)]
    if "zero_shot" in result:
        lines.append(format_zero_shot(result["zero_shot"], split))
    if "probes" in result:
        lines.append(format_probes(result["probes"], split))
    return lines


def format_retrieval(result: dict[str, Any] | None, split: str) -> str:
    """One line of :func:`caption_retrieval`'s figures (or of their absence) for the console."""
    if result is None:
        return f"retrieval on {split}: no captioned images"
    i2t, t2i = result["image_to_text"], result["text_to_image"]
    return (
        f"retrieval on {split} ({result['num_pairs']} image-caption pairs, {result['distinct_captions']} "
        f"distinct captions): image->text R@1 {100 * i2t['recall@1']:.1f}%, "
        f"R@5 {100 * i2t['recall@5']:.1f}%; text->image R@1 {100 * t2i['recall@1']:.1f}%, "
        f"R@5 {100 * t2i['recall@5']:.1f}%"
    )


# ---------------------------------------------------------------------------------------- checkpointing


def fingerprint(config: Config) -> dict[str, Any]:
    """Everything the trained weights depend on; a saved checkpoint with the same fingerprint is reused."""
    vision = dataclasses.asdict(config.model.vision)
    for key in ("enabled", "feature_layer", "pretrained", "lr_scale", "anyres"):
        vision.pop(key)  # how the unified model uses the tower, not how it is pre-trained
    contrastive = dataclasses.asdict(config.contrastive)
    for key in _NOT_TRAINING_FIELDS:
        contrastive.pop(key)
    return {
        "vision": vision,
        "contrastive": contrastive,
        "tokenizer_sha256": io.file_digest(config.tokenizer.path),
        "train_data": str(Path(config.data.root).expanduser() / config.contrastive.train_split),
    }


def save_contrastive(model: SiglipModel, out_dir: str | Path, summary: dict[str, Any]) -> Path:
    """Write the model (``save_pretrained``: ``config.json``, ``model.safetensors``) into the run directory
    ``out_dir``, each file atomically, then ``contrastive.json`` last (it marks the run finished); a model with
    non-finite weights is refused."""
    out_dir = Path(out_dir).expanduser()
    check_finite(model.state_dict(), f"the SigLIP export in {out_dir}")
    # save_pretrained diffs against a default SiglipTextConfig, whose own token ids (49406/49407 for a
    # 32000-piece vocabulary) trigger a spurious warning about that default; our config is not concerned.
    # Its "Writing model shards" bar would be one more carriage-return bar in a log file.
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    tmp = io.begin_directory(out_dir / "export")
    try:
        model.save_pretrained(tmp)
        io.fsync_tree(tmp)
        for file in sorted(tmp.iterdir()):
            file.replace(out_dir / file.name)  # a rename within the directory's file system: atomic
        io.fsync_dir(out_dir)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
        shutil.rmtree(tmp, ignore_errors=True)
    io.write_json(out_dir / SUMMARY_FILE, summary)
    return out_dir


# ------------------------------------------------------------------------------------------------ CLI


def _split_shards(config: Config, split: str) -> list[Path]:
    path = Path(config.data.root).expanduser() / split
    try:
        return list_shards(path)
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            f"{exc} (write the world first: python -m unified_mllm.data.shapes)"
        ) from None


def run_contrastive(config: Config, *, force: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train (or reuse, or resume) the contrastive SigLIP of ``config`` and evaluate it
    (:func:`evaluate_contrastive`)."""
    cfg, vision = config.contrastive, config.model.vision
    if cfg.text_max_length < 1 or cfg.batch_size < 2 or cfg.max_steps < 1:
        raise ConfigError("`contrastive`: need text_max_length >= 1, batch_size >= 2 and max_steps >= 1")
    if min(cfg.log_every, cfg.checkpoint_every, cfg.keep_last) < 1:
        raise ConfigError("`contrastive`: log_every, checkpoint_every and keep_last must be >= 1")
    tokenizer = TextTokenizer.from_config(config.tokenizer, config.model.vq.codebook_size)
    out_dir = Path(cfg.output_dir).expanduser()
    record, what = out_dir / SUMMARY_FILE, f"checkpoint in {out_dir} (pass --force to retrain)"
    summary = None if force else reuse_finished(record, fingerprint(config), ("config.json",), _ONE, what)
    if summary is not None:
        model = load_contrastive(out_dir)
    else:
        _split_shards(config, cfg.train_split)  # fail before building anything when the world is missing
        (out_dir / SUMMARY_FILE).unlink(missing_ok=True)  # never an old summary beside new weights
        torch.manual_seed(cfg.seed)
        model = build_contrastive_model(vision, cfg, tokenizer.vocab_size, tokenizer.special_tokens().pad)
        start = time.perf_counter()
        saved: dict[str, Any] = {}

        def export(losses: list[float]) -> None:
            seconds = time.perf_counter() - start
            saved.update(
                fingerprint=fingerprint(config),
                steps=len(losses),
                samples_seen=len(losses) * cfg.batch_size,
                train_seconds=round(seconds, 2),
                first_loss=losses[0],
                final_loss=float(np.mean(losses[-10:])),
                temperature=model.logit_scale.exp().item(),
                bias=model.logit_bias.item(),
            )
            save_contrastive(model, out_dir, saved)
            print(
                f"trained {len(losses)} steps in {seconds:.1f} s: loss {losses[0]:.3f} -> "
                f"{saved['final_loss']:.3f}; saved to {out_dir}"
            )

        train_contrastive(model, config, tokenizer, force=force, progress=progress, finish=export)
        summary = saved
    key = evaluation_key(config, out_dir)
    stored = io.read_json(out_dir / EVAL_FILE)
    if isinstance(stored, dict) and stored.pop(EVAL_KEY, None) == key:
        print(f"reusing the report in {out_dir / EVAL_FILE} (same weights, data and evaluation settings)")
        result = stored
    else:
        samples = iter_samples(_split_shards(config, cfg.eval_split))
        result = evaluate_contrastive(model, tokenizer, samples, config, progress=progress)
        io.write_json(out_dir / EVAL_FILE, {**result, EVAL_KEY: key})
    print("\n".join(report_lines(result)))
    return {"summary": summary, **result, "output_dir": str(out_dir)}


def evaluation_key(config: Config, out_dir: Path) -> dict[str, Any]:
    """Everything the report depends on: the weights, the training fingerprint (tower, tokenizer), the world's
    classes, the evaluation settings and the shards read (names, sizes, times). A stored report with the same
    key is printed instead of re-scored: the probes' fit is most of a re-run's time."""
    cfg = config.contrastive
    shards = _split_shards(config, cfg.eval_split)
    if cfg.probe_train_scenes:
        shards += _split_shards(config, cfg.train_split)
    key = {
        "weights_sha256": io.file_digest(out_dir / "model.safetensors"),
        "fingerprint": fingerprint(config),
        "world": dataclasses.asdict(config.data.world),
        "evaluation": {k: getattr(cfg, k) for k in _EVALUATION_FIELDS},
        "shards": {str(p): [p.stat().st_size, p.stat().st_mtime_ns] for p in shards},
    }
    return json.loads(json.dumps(key))  # as it reads back from eval.json (tuples become lists)


def main(argv: Sequence[str] | None = None) -> None:
    run_cli(
        "Pre-train the SigLIP tower contrastively on captioned shards (the world's by default); "
        "report image-text retrieval recall, and zero-shot accuracy on the world.",
        lambda config, args: run_contrastive(config, force=args.force, progress=not args.no_progress),
        argv,
        errors=(FileNotFoundError, ConfigError, ValueError),
        flags={"--force": "retrain even when a matching checkpoint exists"},
    )


if __name__ == "__main__":
    main()
