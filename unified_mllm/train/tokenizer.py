"""Train an image tokenizer (``model.vq.kind``: VQ-GAN, UniTok or DualToken), plain or DDP.

    python -m unified_mllm.train.tokenizer --config configs/tokenizer/vqgan-tiny.yaml [key=value ...]
    torchrun --nproc_per_node=2 -m unified_mllm.train.tokenizer --config configs/tokenizer/unitok-tiny.yaml

The architecture is ``model.vq``; everything about training is ``vq_train`` (see ``python -m
unified_mllm.config --docs``). Per step, on ``vq_train.batch_size`` images per rank from
:class:`~unified_mllm.data.images.ImageStream`:

* **generator**: ``l1_weight * |x - x'| + l2_weight * (x - x')^2 + perceptual_weight * LPIPS(x', x)`` (the NLL
  term; LPIPS only with ``perceptual_weights``), plus ``codebook_weight * (codebook + beta * commitment)`` summed
  over the tokenizer's quantizers (commitment only with EMA codebooks), plus the kind's own terms —
  ``contrastive_weight * InfoNCE(image, caption)`` for UniTok (captions from the samples' metadata, ids from
  the project's text tokenizer), ``semantic_weight * distillation`` to the frozen teacher for DualToken — plus,
  from ``disc_start_step`` on, ``gan_weight * lambda * L_G(D(x'))`` with taming's adaptive ``lambda``
  (:func:`~unified_mllm.train.tokenizer_losses.adaptive_gan_weight`) or 1. The discriminator is frozen during this pass.
  Every ``restart_every`` steps, codes unused for ``model.vq.dead_code_steps`` passes are restarted from this
  batch's encoder outputs (rank 0's, broadcast);
* **discriminator** (from ``disc_start_step``): hinge or logistic loss on one forward of ``[x; sg(x')]``.

Distributed: under ``torchrun`` both networks are wrapped in DDP (gloo on CPU, nccl on CUDA) and the
quantizers' ``all_reduce`` sums code counts and EMA statistics over ranks, so the codebooks stay identical
everywhere. Training runs in fp32. UniTok's contrastive loss contrasts each rank's pairs with the
embeddings of every rank (the global batch; equal per-rank batches).

Output directory (``vq_train.output_dir``): the harness's run directory (:mod:`unified_mllm.train.harness`;
TRAIN.md, "Checkpoints, resume, export"; checkpoints hold both networks, optimizers and schedulers) plus the
final tokenizer, ``model.safetensors`` + ``config.json`` (``load_visual_tokenizer(output_dir)``),
``reconstructions.png`` (originals above reconstructions) and ``train_summary.json``, written last (a re-run
with the same settings reuses the run). ``metrics.jsonl`` logs the loss terms, codebook usage and perplexity
over the window, and PSNR / SSIM / usage on ``eval_images`` images of ``eval_data``. Resuming at another world
size restores the data position exactly but not the per-rank RNG streams.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from unified_mllm import io
from unified_mllm.config import Config, ConfigError, VQTrainConfig
from unified_mllm.data.images import ImageBatch, ImageStream, load_first_images
from unified_mllm.data.shards import list_shards
from unified_mllm.metrics import psnr, ssim
from unified_mllm.text import TextTokenizer
from unified_mllm.train import distributed
from unified_mllm.train.distributed import DistInfo
from unified_mllm.train.divergence import check_finite, injected_fault
from unified_mllm.train.harness import CheckpointPolicy, MetricWindow, Run, RunState, reuse_finished, run_cli
from unified_mllm.train.optim import backward_and_step, build_scheduler
from unified_mllm.train.tokenizer_losses import (
    Dinov2Features,
    FeatureDiscriminator,
    NLayerDiscriminator,
    PerceptualLoss,
    adaptive_gan_weight,
    build_perceptual_loss,
    discriminator_loss,
    generator_loss,
)
from unified_mllm.vision.contrastive import tokenize
from unified_mllm.vision.image import tensor_to_image
from unified_mllm.vision.quantizer import code_counts, perplexity_from_counts
from unified_mllm.vision.tokenizer_registry import build_visual_tokenizer, load_visual_tokenizer
from unified_mllm.vision.visual_tokenizer import TokenizerOutput, VisualTokenizer

SUMMARY_FILE = "train_summary.json"
GRID_FILE = "reconstructions.png"
_EXPORT_FILES = ("model.safetensors", "config.json")
# vq_train fields that do not change the trained weights: a finished run is reused when only they differ.
_NON_TRAINING_FIELDS = (
    "output_dir",
    "eval_data",
    "log_every",
    "eval_every",
    "eval_images",
    "checkpoint_every",
    "keep_last",
    "resume",
)


# ------------------------------------------------------------------------------------------ bookkeeping


def fingerprint(config: Config) -> dict[str, Any]:
    """What the final weights depend on (architecture, training settings, data); equal → reuse the run."""
    vq = {k: v for k, v in dataclasses.asdict(config.model.vq).items() if k != "checkpoint"}
    train = {k: v for k, v in dataclasses.asdict(config.vq_train).items() if k not in _NON_TRAINING_FIELDS}
    return {"vq": vq, "vq_train": train}


class TokenizerWindow(MetricWindow):
    """Loss terms of the steps since the last log (per-step means), with each quantizer's code counts
    (``[codebook_size]`` or ``[codebooks, codebook_size]``) summed over the window for usage and perplexity."""

    def __init__(self, device: torch.device) -> None:
        super().__init__(device, torch.float32)

    def reset(self) -> None:
        super().reset()
        self.counts: dict[str, torch.Tensor] = {}

    def add_step(self, terms: dict[str, torch.Tensor], counts: dict[str, torch.Tensor]) -> None:
        self.add(**terms)
        for name, value in counts.items():
            value = value.detach().float()
            self.counts[name] = self.counts[name] + value if name in self.counts else value
        self.steps += 1

    def flush(self) -> dict[str, float]:
        """Means over the window and over ranks (a collective: every rank calls it), then reset.

        ``usage`` / ``perplexity`` average over every codebook (a multi-codebook quantizer's rows each count
        once); with several quantizers each also gets ``usage_<name>`` / ``perplexity_<name>``."""
        out = self.reduce(mean=True)
        # Counts from a training forward are already summed over ranks by the quantizer's all_reduce.
        if "restarted" in out:  # dead codes restarted: a count per window, not a per-step mean
            out["restarted"] = round(out["restarted"] * self.steps)
        rows = {name: counts.reshape(-1, counts.shape[-1]) for name, counts in self.counts.items()}
        usage = {name: (r > 0).float().mean(dim=1) for name, r in rows.items()}
        perplexity = {
            name: torch.stack([perplexity_from_counts(row) for row in r]) for name, r in rows.items()
        }
        if usage:
            out["usage"] = float(torch.cat(list(usage.values())).mean())
            out["perplexity"] = float(torch.cat(list(perplexity.values())).mean())
        if len(rows) > 1:
            for name in rows:
                out[f"usage_{name}"] = float(usage[name].mean())
                out[f"perplexity_{name}"] = float(perplexity[name].mean())
        out["sec_per_step"] = self.seconds / max(self.steps, 1)
        self.reset()
        return out


# ------------------------------------------------------------------------------------------ networks


@dataclass
class Networks:
    """The trained modules (``generator`` / ``discriminator`` are the DDP wrappers in a distributed run,
    ``tokenizer`` / ``disc`` the modules themselves), their optimizers and schedulers, the frozen perceptual
    loss, and the caption tokenizer of contrastive tokenizers (UniTok)."""

    tokenizer: VisualTokenizer
    disc: nn.Module
    generator: nn.Module
    discriminator: nn.Module
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    sched_g: torch.optim.lr_scheduler.LambdaLR
    sched_d: torch.optim.lr_scheduler.LambdaLR
    perceptual: PerceptualLoss | None
    restart_generator: torch.Generator
    text: TextTokenizer | None = None


class TrainingForward(nn.Module):
    """``forward`` = the tokenizer's :meth:`~VisualTokenizer.training_forward`, so that DDP (which hooks
    ``forward``) wraps the training pass; the state dict is the tokenizer's under ``tokenizer.``."""

    def __init__(self, tokenizer: VisualTokenizer) -> None:
        super().__init__()
        self.tokenizer = tokenizer

    def forward(self, pixels: torch.Tensor, text_ids: torch.Tensor | None = None) -> TokenizerOutput:
        return self.tokenizer.training_forward(pixels, text_ids)


def build_tokenizer(config: Config) -> VisualTokenizer:
    """The tokenizer to train: random, or ``vq_train.init_from``'s weights; a DualToken backbone starts from
    ``model.vq.dualtoken.pretrained`` (which also becomes its frozen teacher)."""
    vq = config.model.vq
    tokenizer: Any = build_visual_tokenizer(vq)
    distils = vq.kind == "dualtoken"  # DualToken keeps a frozen teacher copy of its backbone
    if config.vq_train.init_from:  # fine-tuning: start from trained weights of exactly this architecture
        trained = load_visual_tokenizer(config.vq_train.init_from, config=vq)
        tokenizer.load_generator_state(trained.state_to_save(), source=config.vq_train.init_from)
        if distils:
            tokenizer.reset_teacher()
    elif distils and vq.dualtoken.pretrained:
        tokenizer.load_backbone(vq.dualtoken.pretrained)
    return tokenizer


def build_discriminator(cfg: VQTrainConfig) -> nn.Module:
    """The PatchGAN, or UniTok's heads on a frozen DINOv2 (its weights from ``disc_feature_model``)."""
    if cfg.discriminator == "patchgan":
        return NLayerDiscriminator(3, cfg.disc_channels, cfg.disc_layers, cfg.disc_norm)
    layers = tuple(cfg.disc_feature_layers)
    if cfg.disc_feature_model:
        return FeatureDiscriminator(Dinov2Features.from_pretrained(cfg.disc_feature_model, layers))
    return FeatureDiscriminator(Dinov2Features(layers=layers))  # a random ViT-S/14


def build_networks(config: Config, info: DistInfo) -> Networks:
    """Generator, discriminator (seeded identically on every rank), DDP wrappers, optimizers, schedulers."""
    cfg = config.vq_train
    torch.manual_seed(cfg.seed)
    tokenizer = build_tokenizer(config).to(info.device)
    disc = build_discriminator(cfg).to(info.device)
    if info.distributed:
        # Code counts and EMA sums are summed over ranks inside the quantizers, so their buffers agree
        # everywhere without DDP re-broadcasting them every forward.
        for quantizer in tokenizer.quantizers().values():
            quantizer.all_reduce = distributed.all_reduce_sum
        tokenizer.gather_rows = distributed.all_gather_with_grad  # contrastive negatives: the global batch
    generator = distributed.wrap_ddp(TrainingForward(tokenizer), info, sync_buffers=False)
    discriminator = distributed.wrap_ddp(disc, info)  # BatchNorm statistics: rank 0's at each forward
    betas = (cfg.betas[0], cfg.betas[1])
    opt_g = torch.optim.AdamW(
        [p for p in tokenizer.parameters() if p.requires_grad],
        lr=cfg.lr,
        betas=betas,
        weight_decay=cfg.weight_decay,
    )
    opt_d = torch.optim.Adam(
        [p for p in disc.parameters() if p.requires_grad], lr=cfg.disc_lr or cfg.lr, betas=betas
    )
    sched_g = build_scheduler(opt_g, cfg, max(cfg.steps, 1))
    sched_d = build_scheduler(opt_d, cfg, max(cfg.steps - cfg.disc_start_step, 1))
    perceptual = build_perceptual_loss(cfg.perceptual, cfg.perceptual_weights, info.device)
    restart_generator = torch.Generator(device=info.device).manual_seed(cfg.seed + 1)
    text = None
    if config.model.vq.kind == "unitok" and cfg.contrastive_weight > 0:
        text = TextTokenizer.from_config(config.tokenizer, config.model.vq.codebook_size)
    return Networks(
        tokenizer,
        disc,
        generator,
        discriminator,
        opt_g,
        opt_d,
        sched_g,
        sched_d,
        perceptual,
        restart_generator,
        text,
    )


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """No gradients for ``module``'s parameters inside the block (the generator pass through D)."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for param, flag in zip(module.parameters(), flags):
            param.requires_grad_(flag)


# ---------------------------------------------------------------------------------------------- steps


def _caption_ids(nets: Networks, captions: Sequence[str], device: torch.device) -> torch.Tensor | None:
    """Padded caption ids for contrastive tokenizers (``None`` otherwise)."""
    if nets.text is None:
        return None
    unitok = nets.tokenizer.config.unitok
    return tokenize(nets.text, captions, unitok.text_context, pad=unitok.text_pad_id).to(device)


# The divergence guard's question: may this (loss, gradient norm) update the weights?
Accept = Callable[[torch.Tensor, torch.Tensor], bool]


def generator_step(
    nets: Networks,
    pixels: torch.Tensor,
    captions: Sequence[str],
    step: int,
    cfg: VQTrainConfig,
    accept: Accept | None = None,
) -> tuple[torch.Tensor, TokenizerOutput, dict[str, torch.Tensor]]:
    """One generator update (unless ``accept`` refuses it); returns (detached reconstruction, the tokenizer's
    output, loss terms)."""
    out: TokenizerOutput = nets.generator(pixels, _caption_ids(nets, captions, pixels.device))
    recon = out.reconstruction
    l1 = (recon - pixels).abs().mean()
    l2 = (recon - pixels).pow(2).mean()
    nll = cfg.l1_weight * l1 + cfg.l2_weight * l2
    quants = list(out.quant.values())
    terms = {
        "l1": l1,
        "l2": l2,
        "codebook": torch.stack([q.codebook_loss for q in quants]).mean(),
        "commitment": torch.stack([q.commitment_loss for q in quants]).mean(),
    }
    if nets.perceptual is not None and cfg.perceptual_weight > 0:
        terms["perceptual"] = nets.perceptual(recon, pixels)
        nll = nll + cfg.perceptual_weight * terms["perceptual"]
    loss = nll + cfg.codebook_weight * out.quantizer_loss
    # The weight of each tokenizer-specific loss term, by the name TokenizerOutput gives it.
    weights = {"contrastive": cfg.contrastive_weight, "semantic": cfg.semantic_weight}
    for name, value in out.losses.items():
        terms[name] = value
        loss = loss + weights[name] * value
    if gan_active(step, cfg):
        with frozen(nets.disc):
            terms["g_loss"] = generator_loss(nets.disc(recon), cfg.gan_loss)
        weight = torch.tensor(cfg.gan_weight, device=pixels.device)
        if cfg.adaptive_gan_weight:
            last = nets.tokenizer.get_last_layer()
            weight = weight * adaptive_gan_weight(
                nll, terms["g_loss"], last, max_weight=cfg.adaptive_weight_max
            )
        terms["gan_weight"] = weight
        loss = loss + weight * terms["g_loss"]
    loss = loss * injected_fault(step + 1)
    terms["loss"] = loss
    backward_and_step(loss, nets.tokenizer.parameters(), nets.opt_g, nets.sched_g, cfg.grad_clip, accept)
    return recon.detach(), out, terms


def discriminator_step(
    nets: Networks,
    pixels: torch.Tensor,
    recon: torch.Tensor,
    cfg: VQTrainConfig,
    accept: Accept | None = None,
) -> dict[str, torch.Tensor]:
    """One discriminator update on real and reconstructed images in a single forward (one DDP reduction)."""
    logits = nets.discriminator(torch.cat([pixels, recon]))
    real, fake = logits.chunk(2)
    loss = discriminator_loss(real, fake, cfg.gan_loss)
    backward_and_step(loss, nets.disc.parameters(), nets.opt_d, nets.sched_d, cfg.grad_clip, accept)
    return {"d_loss": loss, "logits_real": real.mean(), "logits_fake": fake.mean()}


def gan_active(step: int, cfg: VQTrainConfig) -> bool:
    """Whether the GAN terms train at (0-based) ``step``."""
    return cfg.gan_weight > 0 and step >= cfg.disc_start_step


def train_step(
    nets: Networks,
    batch: ImageBatch,
    step: int,
    cfg: VQTrainConfig,
    info: DistInfo,
    accept: Accept | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Generator update, dead-code restarts on check steps, discriminator update; returns (terms, counts by
    quantizer)."""
    pixels = batch.pixels.to(info.device)
    recon, out, terms = generator_step(nets, pixels, batch.captions, step, cfg, accept)
    restarting = {name: q for name, q in nets.tokenizer.quantizers().items() if q.dead_code_steps > 0}
    if (step + 1) % cfg.restart_every == 0 and restarting:
        # Every rank takes the same decision (the usage statistics are global), then rank 0's wins.
        broadcast = distributed.broadcast if info.distributed else None
        restarted = 0
        for name, quantizer in restarting.items():
            restarted += quantizer.restart_dead_codes(
                out.quant[name].latents, generator=nets.restart_generator, broadcast=broadcast
            ).numel()
        terms["restarted"] = torch.tensor(float(restarted), device=pixels.device)
    if gan_active(step, cfg):
        terms.update(discriminator_step(nets, pixels, recon, cfg, accept))
    return terms, {name: q.counts for name, q in out.quant.items()}


# ----------------------------------------------------------------------------------------- checkpoints


def _stateful_parts(nets: Networks) -> dict[str, Any]:
    """What a checkpoint holds the ``state_dict()`` of, by its key there."""
    return {
        "generator": nets.tokenizer,
        "discriminator": nets.disc,
        "opt_g": nets.opt_g,
        "opt_d": nets.opt_d,
        "sched_g": nets.sched_g,
        "sched_d": nets.sched_d,
    }


def training_state(nets: Networks, config: Config) -> dict[str, Any]:
    """The networks' part of a checkpoint (the harness adds step, data position and RNG)."""
    parts = {key: part.state_dict() for key, part in _stateful_parts(nets).items()}
    return {"vq": fingerprint(config)["vq"], **parts, "restart_generator": nets.restart_generator.get_state()}


def restore_training_state(nets: Networks, state: dict[str, Any], config: Config) -> None:
    """Load a :func:`training_state` into freshly built networks (same architecture required)."""
    if state.get("vq") != fingerprint(config)["vq"]:
        raise ConfigError(
            "`model.vq`: the checkpoint in vq_train.output_dir was trained with another architecture "
            f"({state.get('vq')}); pick another output_dir / run_name or set vq_train.resume=false"
        )
    for key, part in _stateful_parts(nets).items():
        part.load_state_dict(state[key])
    nets.restart_generator.set_state(state["restart_generator"].to("cpu"))


# ------------------------------------------------------------------------------------- evaluation, plots


@torch.no_grad()
def evaluate(tokenizer: VisualTokenizer, pixels: torch.Tensor) -> tuple[dict[str, float], torch.Tensor]:
    """Reconstruction PSNR / SSIM (dB / [0, 1], means) and code usage / perplexity (averaged over the code
    slots of a position) on ``pixels``; returns (metrics, recon)."""
    with tokenizer.eval_mode():
        codes = tokenizer.encode(pixels)
        recon = tokenizer.decode(codes).clamp(-1, 1)
    slots = codes.reshape(-1, tokenizer.code_depth)
    counts = [code_counts(slots[:, i], size) for i, size in enumerate(tokenizer.code_vocab_sizes())]
    metrics = {
        "psnr": float(psnr(recon, pixels).clamp(max=100.0).mean()),
        "ssim": float(ssim(recon, pixels).mean()),
        "usage": sum(float((c > 0).float().mean()) for c in counts) / len(counts),
        "perplexity": sum(float(perplexity_from_counts(c)) for c in counts) / len(counts),
    }
    return metrics, recon


def save_reconstruction_grid(
    originals: torch.Tensor, recon: torch.Tensor, path: Path, tile: int = 128
) -> None:
    """A PNG with the originals in the top row and their reconstructions below (each upscaled to ``tile``)."""
    count = originals.shape[0]
    grid = Image.new("RGB", (count * tile, 2 * tile), (255, 255, 255))
    for row, images in enumerate((originals, recon)):
        for col, pixels in enumerate(images):
            image = tensor_to_image(pixels.cpu()).resize((tile, tile), Image.Resampling.NEAREST)
            grid.paste(image, (col * tile, row * tile))
    with io.atomic_path(path) as tmp:
        grid.save(tmp, format="PNG")


_CURVE_PANELS = (
    ("reconstruction", ("l1", "l2", "perceptual")),
    ("quantizer", ("codebook", "commitment")),
    ("GAN", ("g_loss", "d_loss", "gan_weight")),
    ("codebook usage", ("usage",)),
)


# ------------------------------------------------------------------------------------------------- loop


def train_loop(
    nets: Networks, config: Config, harness: Run, run: RunState, eval_pixels: torch.Tensor | None
) -> dict[str, Any]:
    """Train from ``run.step`` to ``vq_train.steps`` (evaluating on ``eval_pixels`` if any); returns the last
    training and evaluation records."""
    cfg, info = config.vq_train, harness.info
    stream = ImageStream(
        cfg.train_data,
        resolution=config.model.vq.resolution,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        rank=info.rank,
        world_size=info.world_size,
        shuffle_buffer=cfg.shuffle_buffer,
        position=run.data_state,
        hflip=cfg.hflip,
    )
    window = TokenizerWindow(info.device)
    batches = iter(stream)
    epoch = 0

    def step(run: RunState) -> None:
        nonlocal epoch
        batch = next(batches)
        number = run.step + 1

        def accept(loss: torch.Tensor, norm: torch.Tensor) -> bool:
            return harness.guard.accept(number, loss, norm)

        window.add_step(*train_step(nets, batch, run.step, cfg, info, accept))
        run.data_state, epoch = batch.position, batch.epoch

    def log(run: RunState) -> tuple[dict[str, Any], dict[str, float]]:
        metrics = window.flush()
        lr = nets.opt_g.param_groups[0]["lr"]
        record = {"kind": "train", "step": run.step, "lr": lr, "epoch": epoch, **metrics}
        return record, {k: metrics[k] for k in ("l1", "usage") if k in metrics}

    def check(run: RunState) -> dict[str, Any]:
        assert eval_pixels is not None
        return {"kind": "eval", "step": run.step, **evaluate(nets.tokenizer, eval_pixels)[0]}

    return harness.loop(
        run,
        cfg.steps,
        step,
        log_every=cfg.log_every,
        log=log,
        checkpoint=lambda run: harness.save(run, training_state(nets, config), config),
        evaluate=check if eval_pixels is not None else None,
        eval_every=cfg.eval_every,
    )


def finish_run(
    nets: Networks, config: Config, run: RunState, last: dict[str, Any], eval_pixels: torch.Tensor | None
) -> dict[str, Any]:
    """Rank 0: export the tokenizer, the reconstruction grid and the summary (written last); a tokenizer with
    non-finite weights is refused."""
    out_dir = Path(config.vq_train.output_dir).expanduser()
    check_finite(nets.tokenizer.state_dict(), f"the tokenizer export in {out_dir}")
    nets.tokenizer.save_pretrained(out_dir)
    if eval_pixels is not None:
        metrics, recon = evaluate(nets.tokenizer, eval_pixels)
        last["eval"] = {"kind": "eval", "step": run.step, **metrics}
        save_reconstruction_grid(eval_pixels, recon, out_dir / GRID_FILE)
    summary = {
        "fingerprint": fingerprint(config),
        "steps": run.step,
        "samples_seen": run.data_state,
        "world_size": distributed.get_world_size(),
        "train_seconds": round(run.elapsed, 2),
        "final_train": last.get("train", {}),
        "final_eval": last.get("eval", {}),
        "output_dir": str(out_dir),
    }
    io.write_json(out_dir / SUMMARY_FILE, summary)
    return summary


def check_data(cfg: VQTrainConfig) -> None:
    """Fail before building anything when the training or evaluation shards are missing."""
    for path in filter(None, (cfg.train_data, cfg.eval_data)):
        try:
            list_shards(path)
        except FileNotFoundError as exc:
            hint = "write the world first: python -m unified_mllm.data.shapes --config ..."
            raise FileNotFoundError(f"{exc} ({hint})") from None


def train_tokenizer(config: Config, *, progress: bool = True) -> dict[str, Any]:
    """Train (or reuse, or resume) the tokenizer of ``config``; returns the run summary."""
    info = distributed.init_distributed()
    out_dir = Path(config.vq_train.output_dir).expanduser()
    what = f"tokenizer in {out_dir} (load_visual_tokenizer({str(out_dir)!r}))"
    summary = reuse_finished(out_dir / SUMMARY_FILE, fingerprint(config), _EXPORT_FILES, info, what)
    if summary is not None:
        return summary
    cfg = config.vq_train
    check_data(cfg)
    if info.is_main and cfg.perceptual != "none" and cfg.perceptual_weights is None:
        print("note: no perceptual loss (vq_train.perceptual_weights is not set; nothing is downloaded)")
    nets = build_networks(config, info)
    policy = CheckpointPolicy(cfg.checkpoint_every, cfg.keep_last, cfg.resume)
    harness = Run(
        out_dir,
        info,
        policy,
        "vq_train.steps",
        max_bad_steps=cfg.max_bad_steps,
        bad_steps_name="vq_train.max_bad_steps",
    )
    with harness.exclusive():
        run, state = harness.resume(cfg.steps, map_location=info.device)
        if state:
            restore_training_state(nets, state, config)
        run.data_state = run.data_state or 0
        harness.snapshot_config(config)
        eval_pixels = None  # rank 0 evaluates, on the first eval_images images of eval_data
        if cfg.eval_data and info.is_main:
            eval_pixels = load_first_images(cfg.eval_data, cfg.eval_images, config.model.vq.resolution)[0]
            eval_pixels = eval_pixels.to(info.device)
        with harness.logging(
            run,
            name=config.model.vq.kind,
            total=cfg.steps,
            wandb=config.train.wandb,
            wandb_config={"vq": dataclasses.asdict(config.model.vq), "vq_train": dataclasses.asdict(cfg)},
            progress=progress,
        ):
            last = train_loop(nets, config, harness, run, eval_pixels)
        # Pixel errors fall by orders of magnitude: the reconstruction panel is log-scaled.
        harness.save_curves(_CURVE_PANELS, log_scale=("reconstruction",))
        if info.is_main:
            summary = finish_run(nets, config, run, last, eval_pixels)
            print(f"trained {run.step} steps in {run.elapsed:.1f} s; tokenizer saved to {out_dir}")
        distributed.barrier()
        return distributed.broadcast_object(summary)


def main(argv: Sequence[str] | None = None) -> None:
    run_cli(
        "Train an image tokenizer: VQ-GAN, UniTok or DualToken (plain or under torchrun).",
        lambda config, args: train_tokenizer(config, progress=not args.no_progress),
        argv,
    )


if __name__ == "__main__":
    main()
    distributed.exit_finished_worker()
