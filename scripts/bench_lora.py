"""LoRA against full fine-tuning in one process: trainable parameters, optimizer state and step time.

    python scripts/bench_lora.py --config configs/train/tiny-stage3.yaml \
        --lora-config configs/train/tiny-stage3-lora.yaml output_root=/tmp/qs-new

Both arms are built by the trainer's own code from the same config (the LoRA one adds ``train.lora``), start
from the same ``checkpoint.init_from`` export and take the same batches. The step times are measured in
alternating rounds, so load on a shared machine falls on both arms alike; the printed ratio is what to compare.
Nothing is written to disk.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Iterator

import torch
from tqdm import tqdm

from unified_mllm.config import Config, load_config
from unified_mllm.data.collate import Batch
from unified_mllm.data.dataset import batch_stream, source_names
from unified_mllm.model import lora
from unified_mllm.text import TextTokenizer
from unified_mllm.train import distributed
from unified_mllm.train.backend import TrainingBackend, build_backend
from unified_mllm.train.distributed import DistInfo
from unified_mllm.train.optim import apply_param_rules, config_rules
from unified_mllm.train.trainer import Window, adapter_only, build_model, train_step


class Arm:
    """One way of training: its backend, its batches and its step times."""

    def __init__(self, name: str, config: Config, info: DistInfo) -> None:
        self.name, self.config, self.info = name, config, info
        model, materialize = build_model(config, info)
        resolved = apply_param_rules(model, config_rules(config))
        if lora.enabled(config.train.lora):
            resolved = adapter_only(model, resolved)
        self.backend: TrainingBackend = build_backend(model, resolved, config, info, materialize=materialize)
        self.backend.module.train()
        tokenizer = TextTokenizer.from_config(config.tokenizer, num_image_codes=config.model.vq.codebook_size)
        self.batches: Iterator[Batch] = batch_stream(
            config, rank=0, world_size=1, with_features=config.model.vision.enabled, tokenizer=tokenizer
        )
        self.window = Window(info.device, tuple(source_names(config.data)))
        self.times: list[float] = []

    def step(self) -> float:
        micro = [next(self.batches) for _ in range(self.config.train.grad_accum_steps)]
        start = time.perf_counter()
        train_step(self.backend, micro, self.config, self.info, self.window)
        return time.perf_counter() - start

    def trainable(self) -> int:
        return sum(p.numel() for p in self.backend.module.parameters() if p.requires_grad)

    def total(self) -> int:
        return sum(p.numel() for p in self.backend.module.parameters())

    def optimizer_bytes(self) -> int:
        """Bytes of the optimizer's state tensors (AdamW's two moments and step counters)."""
        return sum(
            value.numel() * value.element_size()
            for state in self.backend.optimizer.state.values()
            for value in state.values()
            if isinstance(value, torch.Tensor)
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the full fine-tuning stage config")
    parser.add_argument("--lora-config", required=True, help="the same stage with train.lora")
    parser.add_argument("--rounds", type=int, default=6, help="alternating rounds of measured steps")
    parser.add_argument("--steps", type=int, default=5, help="measured steps per arm and round")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured steps per arm first")
    parser.add_argument("overrides", nargs="*", help="key=value overrides applied to both configs")
    args = parser.parse_args()
    configs = {
        "full": load_config([args.config], args.overrides),
        "lora": load_config([args.lora_config], args.overrides),
    }
    info = distributed.init_distributed(configs["full"].train.device)
    arms = [Arm(name, config, info) for name, config in configs.items()]
    total = len(arms) * (args.warmup + args.rounds * args.steps)
    with tqdm(total=total, desc="steps") as bar:
        for arm in arms:
            for _ in range(args.warmup):
                arm.step()
                bar.update()
        for _ in range(args.rounds):
            for arm in arms:
                for _ in range(args.steps):
                    arm.times.append(arm.step())
                    bar.update()
    print("| arm | trainable parameters | optimizer state | median step time |")
    print("|---|---|---|---|")
    for arm in arms:
        share = 100 * arm.trainable() / arm.total()
        print(
            f"| {arm.name} | {arm.trainable():,} of {arm.total():,} ({share:.1f}%) | "
            f"{arm.optimizer_bytes() / 2**20:.2f} MiB | {statistics.median(arm.times):.3f} s |"
        )
    full, adapted = arms
    print(
        f"LoRA / full: optimizer state {adapted.optimizer_bytes() / full.optimizer_bytes():.3f}, "
        f"median step time {statistics.median(adapted.times) / statistics.median(full.times):.3f} "
        f"({len(full.times)} steps each, {args.rounds} alternating rounds, {info.device.type})"
    )


if __name__ == "__main__":
    main()
