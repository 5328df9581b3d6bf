"""The LM trainer: every stage (0, 1, 2, 3) of the unified model, one process or many, FSDP2 or DeepSpeed.

    python -m unified_mllm.train --config configs/train/stage1.yaml [key=value ...]
    torchrun --nproc_per_node=8 -m unified_mllm.train --config configs/train/stage2.yaml

A stage is configuration only (design convention 4): which parameters train and at what LR scale
(``optim.param_groups``), which data mix (``data.sources``), whether images carry SigLIP features
(``model.vision.enabled``) and where the weights start (``checkpoint.init_from``: an earlier stage's export;
``model.lm.pretrained`` / ``model.vision.pretrained``: published LM and SigLIP weights).

One optimizer step = ``train.grad_accum_steps`` micro-batches of ``train.micro_batch_size`` sequences per rank.
The loss (:mod:`unified_mllm.train.losses`) is divided by the supervised tokens of the whole step on all ranks
(one all-reduce per step), so every token weighs the same whatever the padding, packing, accumulation or world
size; a data source's ``loss_weight`` counts in the loss and in the count alike (the logged ``ce`` too).

Run directory (``checkpoint.dir``): the harness's (:mod:`unified_mllm.train.harness`; TRAIN.md, "Checkpoints,
resume, export"), with the model and optimizer saved through the backend; the final export goes to
``checkpoint.export_dir`` (:mod:`unified_mllm.train.export`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from unified_mllm.config import Config
from unified_mllm.data.collate import Batch
from unified_mllm.data.conversation import IGNORE_INDEX
from unified_mllm.data.dataset import batch_stream, source_names
from unified_mllm.model import lora
from unified_mllm.model.unified import UnifiedModel
from unified_mllm.text import TextTokenizer
from unified_mllm.train import distributed, model_init
from unified_mllm.train.backend import Materialize, TrainingBackend, build_backend
from unified_mllm.train.distributed import DistInfo
from unified_mllm.train.divergence import check_finite, injected_fault
from unified_mllm.train.export import SUMMARY_FILE, export_files, export_run, fingerprint
from unified_mllm.train.harness import CheckpointPolicy, MetricWindow, Run, RunState, reuse_finished
from unified_mllm.train.losses import LossParts, causal_lm_loss
from unified_mllm.train.optim import ParamRule, apply_param_rules, config_rules, trainable_summary


def curve_panels(config: Config) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """The panels of ``loss_curves.png``: the loss, each data source's cross-entropy, z-loss, LR, grad norm."""
    return (
        ("loss", ("loss", "ce")),
        ("cross-entropy per source", tuple(f"ce/{name}" for name in source_names(config.data))),
        ("z-loss", ("z_loss",)),
        ("learning rate", ("lr",)),
        ("gradient norm", ("grad_norm",)),
    )


def build_model(config: Config, info: DistInfo) -> tuple[UnifiedModel, Materialize | None]:
    """The model of ``config`` (same on every rank) and, when it is still on ``meta``, the function the backend
    calls once it has sharded it, to allocate and load the starting weights shard by shard
    (:mod:`unified_mllm.train.model_init`). Otherwise the model is on this rank's device, weights loaded."""
    model, on_meta = model_init.build_model(config)
    if on_meta:
        return model, functools.partial(model_init.materialize, device=info.device, config=config)
    return model.to(info.device), None


def adapter_only(model: UnifiedModel, resolved: dict[str, ParamRule]) -> dict[str, ParamRule]:
    """LoRA: the adapters train (each with its layer's LR scale and weight decay), every base weight is
    frozen whatever ``optim.param_groups`` says (the rules still apply, so a typo in them stays an error)."""
    out = {}
    for name, param in model.named_parameters():
        trains = lora.is_adapter_name(name)
        param.requires_grad_(trains)
        out[name] = dataclasses.replace(resolved[name], trainable=trains)
    return out


def supervised_tokens(batch: Batch) -> float:
    """Positions that carry a loss after the shift (labels ``[B, T]`` are unshifted), code-stack positions
    predicted by the depth heads included (each counts as one token, whatever its depth); with
    ``batch.loss_weights`` each position counts its weight (the loss is then a weighted mean)."""
    supervised = batch.labels[:, 1:] != IGNORE_INDEX
    if batch.code_targets is not None:
        supervised = supervised | batch.code_targets[:, 1:]
    if batch.loss_weights is None:
        return float(supervised.sum())
    return float(batch.loss_weights[:, 1:][supervised].double().sum())


# ------------------------------------------------------------------------------------------ the loop


class Window(MetricWindow):
    """The LM's metric window: token-weighted cross-entropy and z-loss, grad norm, throughput, padding.

    ``sources`` names the data mix's entries: the window then also sums each source's unweighted cross-entropy
    and tokens (``source_ce`` / ``source_tokens``, vectors) and logs ``ce/<name>``.
    """

    def __init__(self, device: torch.device, sources: tuple[str, ...] = ()) -> None:
        super().__init__(device)
        self.sources = sources

    def flush(self) -> dict[str, float]:
        """Token-weighted means over the window and all ranks (a collective), then reset."""
        sums, seconds = self.reduce(), self.seconds
        tokens = max(sums.pop("tokens"), 1.0)
        out = {
            "ce": sums["ce_sum"] / tokens,
            "z_loss": sums["z_sum"] / tokens,
            "grad_norm": sums["grad_norm"] / max(self.steps * distributed.get_world_size(), 1),
            "tokens_per_second": sums["seen_tokens"] / max(seconds, 1e-9),
            "padding": 1.0 - sums["real_tokens"] / max(sums["seen_tokens"], 1.0),
            "sec_per_step": seconds / max(self.steps, 1),
        }
        out["loss"] = out["ce"] + out["z_loss"]
        if "source_ce" in sums:
            for name, ce, count in zip(self.sources, sums["source_ce"], sums["source_tokens"]):
                if count > 0:
                    out[f"ce/{name}"] = ce / count
        self.reset()
        return out


def source_losses(
    batch: Batch, parts: LossParts, code_losses: torch.Tensor | None, num_sources: int
) -> dict[str, torch.Tensor]:
    """Each source's summed unweighted cross-entropy and supervised-token count in this micro-batch (LM-head
    tokens and depth-head code positions alike), as ``source_ce`` / ``source_tokens`` vectors; {} when the
    batch has no ``source_ids``."""
    if batch.source_ids is None or num_sources == 0:
        return {}
    ids = batch.source_ids.to(parts.token_ce.device, non_blocking=True)
    owners, values = [ids[parts.token_positions[:, 0], parts.token_positions[:, 1]]], [parts.token_ce]
    if code_losses is not None:
        assert batch.code_targets is not None  # depth-head losses come only with code targets
        owners.append(ids[batch.code_targets.to(ids.device)])
        values.append(code_losses.detach())
    owner, value = torch.cat(owners), torch.cat(values).double()
    ce = torch.zeros(num_sources, dtype=torch.float64, device=ids.device).index_add_(0, owner, value)
    tokens = torch.zeros_like(ce).index_add_(0, owner, torch.ones_like(value))
    return {"source_ce": ce, "source_tokens": tokens}


def train_step(
    backend: TrainingBackend,
    micro_batches: list[Batch],
    config: Config,
    info: DistInfo,
    window: Window,
    accept: Callable[[torch.Tensor, torch.Tensor], bool] | None = None,
    fault: float = 1.0,
) -> None:
    """One optimizer step over the step's micro-batches (loss normalised by the step's global token count),
    unless ``accept(loss, grad_norm)`` (the divergence guard) refuses it. ``fault`` multiplies the loss (drills)."""
    local = torch.tensor([supervised_tokens(b) for b in micro_batches], dtype=torch.float64).sum()
    # A copy: the all-reduce works in place, and `local` is logged as this rank's own count below. The count
    # stays a device tensor (no .item()): the collective is queued, not waited for by the host.
    global_tokens = distributed.all_reduce_sum(local.to(info.device, copy=True))
    normalizer = global_tokens.clamp(min=1.0) / backend.loss_multiplier()
    step_loss = torch.zeros((), device=info.device)  # this rank's part of the step's loss, for the guard
    for i, host_batch in enumerate(micro_batches):
        batch = host_batch.to(info.device)
        output = backend.forward(**batch.model_inputs())
        weights = batch.loss_weights
        parts = causal_lm_loss(
            output.logits, batch.labels, config.optim.z_loss_weight, normalizer=normalizer, weights=weights
        )
        loss, ce_sum = parts.loss, parts.ce_sum
        if output.code_losses is not None:  # the depth heads' cross-entropy of the code stacks
            code = output.code_losses
            if weights is not None:
                assert batch.code_targets is not None  # depth-head losses come only with code targets
                code = code * weights[batch.code_targets]
            loss = loss + code.sum() / normalizer
            ce_sum = ce_sum + code.detach().sum()
        loss = loss * fault
        step_loss = step_loss + loss.detach()
        backend.backward(loss, sync=i == len(micro_batches) - 1)
        window.add(
            ce_sum=ce_sum,
            z_sum=parts.z_sum,
            seen_tokens=float(batch.input_ids.numel()),
            real_tokens=float(batch.num_tokens),
            **source_losses(batch, parts, output.code_losses, len(window.sources)),
        )
    guard = None if accept is None else lambda norm: accept(step_loss, norm)
    window.add(tokens=local, grad_norm=backend.optimizer_step(guard))
    window.steps += 1


def train_loop(
    backend: TrainingBackend, batches: Iterator[Batch], config: Config, harness: Run, run: RunState
) -> dict[str, Any]:
    """Train from ``run.step`` to ``train.max_steps`` on the harness; returns the last logged record."""
    info, train = harness.info, config.train
    window = Window(info.device, tuple(source_names(config.data)))

    def step(run: RunState) -> None:
        micro_batches = [next(batches) for _ in range(train.grad_accum_steps)]
        number = run.step + 1

        def accept(loss: torch.Tensor, norm: torch.Tensor) -> bool:
            return harness.guard.accept(number, loss, norm)

        train_step(backend, micro_batches, config, info, window, accept, injected_fault(number))
        run.data_state = micro_batches[-1].data_state

    def log(run: RunState) -> tuple[dict[str, Any], dict[str, float]]:
        metrics = window.flush()
        record = {"kind": "train", "step": run.step, "lr": backend.optimizer.param_groups[0]["lr"], **metrics}
        return record, {"loss": metrics["loss"], "tok/s": metrics["tokens_per_second"]}

    def checkpoint(run: RunState) -> None:
        harness.save(run, {"scheduler": backend.scheduler.state_dict()}, config)

    backend.module.train()
    last = harness.loop(run, train.max_steps, step, log_every=train.log_every, log=log, checkpoint=checkpoint)
    return last.get("train", {})


# ----------------------------------------------------------------------------------------- the run


def _report_start(model: UnifiedModel, resolved: dict[str, Any], config: Config, info: DistInfo) -> None:
    if not info.is_main:
        return
    counts = trainable_summary(resolved, model)
    parts = ", ".join(f"{k} {v:,}" for k, v in sorted(counts.items()))
    print(
        f"stage {config.train.stage}: {info.world_size} process(es) on {info.device.type}, "
        f"backend {config.train.parallel.backend}, {config.train.precision}; parameters: {parts}"
    )


def train(config: Config, *, progress: bool = True) -> dict[str, Any]:
    """Train (or reuse, or resume) the stage ``config`` describes; returns the export's summary."""
    info = distributed.init_distributed(config.train.device)
    export_dir = Path(config.checkpoint.export_dir).expanduser()
    summary = reuse_finished(
        export_dir / SUMMARY_FILE, fingerprint(config), export_files(config), info, f"export in {export_dir}"
    )
    if summary is not None:
        return summary
    tokenizer = TextTokenizer.from_config(config.tokenizer, num_image_codes=config.model.vq.codebook_size)
    model, materialize = build_model(config, info)
    resolved = apply_param_rules(model, config_rules(config))
    adapter = None
    if lora.enabled(config.train.lora):
        resolved = adapter_only(model, resolved)
        adapter = lora.injected_config(model)
    _report_start(model, resolved, config, info)
    backend = build_backend(model, resolved, config, info, materialize=materialize)
    ckpt = config.checkpoint
    policy = CheckpointPolicy(ckpt.every_steps, ckpt.keep_last, ckpt.resume, ckpt.fallback)
    harness = Run(
        Path(ckpt.dir),
        info,
        policy,
        "train.max_steps",
        sharded=backend,
        max_bad_steps=config.train.max_bad_steps,
    )
    with harness.exclusive():
        run, state = harness.resume(config.train.max_steps)
        if state:
            backend.scheduler.load_state_dict(state["scheduler"])
        harness.snapshot_config(config)
        batches = batch_stream(
            config,
            rank=info.rank,
            world_size=info.world_size,
            with_features=config.model.vision.enabled,
            state=run.data_state,
            tokenizer=tokenizer,
        )
        with harness.logging(
            run,
            name=f"stage{config.train.stage}",
            total=config.train.max_steps,
            wandb=config.train.wandb,
            wandb_config=dataclasses.asdict(config),
            progress=progress,
        ):
            last = train_loop(backend, batches, config, harness, run)
        state = backend.full_state_dict()  # a collective: every rank takes part
        if info.is_main:
            check_finite(state, f"the export in {export_dir}")
        harness.save_curves(curve_panels(config), log_scale=("loss",))
        if info.is_main:
            summary = {
                "fingerprint": fingerprint(config),
                "steps": run.step,
                "world_size": info.world_size,
                "train_seconds": round(run.elapsed, 2),
                "final_train": last,
            }
            export_run(state, config, export_dir, summary, adapter)
            print(
                f"stage {config.train.stage}: {run.step} steps in {run.elapsed:.0f} s; export in {export_dir}"
            )
        distributed.barrier()
        return distributed.broadcast_object(summary)
