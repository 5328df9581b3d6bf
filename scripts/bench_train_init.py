"""Host memory of the trainer's model start: the CPU build against the meta-device start, per FSDP2 rank.

The subject is a ~300M-parameter LM (the ``tiny`` preset widened: 18 layers of width 1024, a 32k vocabulary;
``--set`` changes it) with random weights, written once as our export (``model.safetensors``, bf16) to a
temporary directory and named by ``checkpoint.init_from``. Then, for each way, ``torchrun`` starts 2 ranks
(FSDP2 on gloo, CPU) that set the model up exactly as the trainer does up to its first step — build, shard,
load, optimizer — and report their peak resident memory (``VmHWM`` from ``/proc/self/status``):

* ``cpu build`` — the trainer's start before the meta-device path: every rank builds the whole model on CPU
  under the seed, loads the whole export into it, then FSDP2 shards it (kept here, and only here, as the
  baseline);
* ``meta start`` — :func:`unified_mllm.train.trainer.build_model`: build on ``meta`` (random draws replayed, not
  stored), shard, allocate the shards, read each rank's slices from the file.

Both ways must give every rank the same shards: each rank prints a float64 checksum of its shards, and the
script exits 1 when they differ.

    python scripts/bench_train_init.py
    python scripts/bench_train_init.py --set model.lm.num_layers=8      # a smaller LM

Measured on the 2-core CPU box (the default command, 299M parameters): see TRAIN.md ("Memory at the start").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from unified_mllm.config import Config, load_config
from unified_mllm.model.export import load_safetensors_into, safetensors_files, unique_state_dict
from unified_mllm.model.unified import UnifiedModel
from unified_mllm.train import distributed
from unified_mllm.train.backend import build_backend
from unified_mllm.train.distributed import DistInfo
from unified_mllm.train.model_init import shard_region
from unified_mllm.train.optim import apply_param_rules, config_rules
from unified_mllm.train.trainer import build_model

REPO = Path(__file__).resolve().parents[1]
STAGE = REPO / "configs" / "train" / "tiny-stage2.yaml"
SUBJECT = (
    "model.lm.vocab_size=32768",
    "model.lm.hidden_size=1024",
    "model.lm.intermediate_size=2816",
    "model.lm.num_layers=18",
    "model.lm.num_heads=16",
    "model.lm.num_kv_heads=16",
)
WAYS = {"cpu build": "cpu", "meta start": "meta"}


def subject_config(export: Path, extra: list[str]) -> Config:
    return load_config(
        [STAGE],
        [
            *SUBJECT,
            *extra,
            f"checkpoint.init_from={export}",
            "model.vision.pretrained=null",
            "train.parallel.backend=fsdp",
            "train.precision=fp32",
            "train.device=cpu",
        ],
    )


def cpu_build(config: Config, info: DistInfo) -> UnifiedModel:
    """The trainer's start before the meta-device path (the baseline): a whole model per rank, then loaded."""
    torch.manual_seed(config.train.seed)
    model = UnifiedModel(config.model, device="cpu")
    init = Path(config.checkpoint.init_from)
    load_safetensors_into(unique_state_dict(model), safetensors_files(init), f"export {init}")
    return model.to(info.device)


def rss_mib(field: str) -> float:
    """``VmHWM`` (peak) or ``VmRSS`` (now) of this process from ``/proc/self/status``, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def worker(way: str, export: Path, extra: list[str], out: Path) -> None:
    """One rank: set the model up the given way, then write peak RSS, time and a checksum of its shards."""
    torch.set_num_threads(1)
    info = distributed.init_distributed("cpu")
    config = subject_config(export, extra)
    before = rss_mib("VmRSS")  # the interpreter, torch and transformers, before any weight exists
    started = time.perf_counter()
    if way == "cpu":
        model, materialize = cpu_build(config, info), None
    else:
        model, materialize = build_model(config, info)
    resolved = apply_param_rules(model, config_rules(config))
    build_backend(model, resolved, config, info, materialize=materialize)
    seconds = time.perf_counter() - started
    parts = [(shard_region(t) or (t, None))[0] for t in unique_state_dict(model).values()]
    checksum = sum(float(part.detach().double().sum()) for part in parts)
    record = {"rank": info.rank, "before": before, "peak_rss_mib": rss_mib("VmHWM"), "seconds": seconds}
    record["checksum"] = checksum
    (out / f"{way}-rank{info.rank}.json").write_text(json.dumps(record))
    torch.distributed.destroy_process_group()


def write_subject(directory: Path, extra: list[str]) -> int:
    """A random export of the subject in ``directory``; returns its parameter count."""
    config = subject_config(directory, extra)
    torch.manual_seed(1234)
    model = UnifiedModel(config.model, device="cpu")
    model.save_pretrained(directory, dtype=torch.bfloat16)
    return sum(p.numel() for p in model.parameters())


def run_way(way: str, export: Path, extra: list[str], out: Path) -> list[dict[str, float]]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += [__file__, "--worker", way, "--export", str(export), "--out", str(out)]
    command += [arg for item in extra for arg in ("--set", item)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(command, cwd=REPO, env=env, check=True)
    return [json.loads((out / f"{way}-rank{rank}.json").read_text()) for rank in range(2)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", action="append", default=[], help="config override for the subject")
    parser.add_argument("--worker", choices=sorted(WAYS.values()), help=argparse.SUPPRESS)
    parser.add_argument("--export", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.export, args.set, args.out)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        export, out = Path(tmp) / "export", Path(tmp)
        count = write_subject(export, args.set)
        size = (export / "model.safetensors").stat().st_size / 2**20
        print(f"subject: {count / 1e6:.0f}M parameters, export {size:.0f} MiB (bf16); 2 ranks, FSDP2, gloo")
        results = {name: run_way(way, export, args.set, out) for name, way in WAYS.items()}
    print(f"{'way':<12}{'rank':>6}{'RSS before MiB':>16}{'peak RSS MiB':>14}{'seconds':>10}   checksum")
    for name, ranks in results.items():
        for r in ranks:
            print(
                f"{name:<12}{r['rank']:>6}{r['before']:>16.0f}{r['peak_rss_mib']:>14.0f}{r['seconds']:>10.1f}"
                f"   {r['checksum']!r}"
            )
    old, new = results["cpu build"], results["meta start"]
    for rank in range(2):
        ratio = new[rank]["peak_rss_mib"] / old[rank]["peak_rss_mib"]
        growth = (new[rank]["peak_rss_mib"] - new[rank]["before"]) / (
            old[rank]["peak_rss_mib"] - old[rank]["before"]
        )
        print(
            f"rank {rank}: peak RSS meta start / cpu build = {ratio:.2f} (above the RSS before: {growth:.2f})"
        )
    same = all(old[r]["checksum"] == new[r]["checksum"] for r in range(2))
    print("shards identical in both ways" if same else "SHARDS DIFFER between the two ways")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
