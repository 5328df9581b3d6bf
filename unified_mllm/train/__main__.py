"""``python -m unified_mllm.train --config configs/train/stage1.yaml [key=value ...]`` (also under torchrun).

See :mod:`unified_mllm.train.trainer` for what a run does and writes, and TRAIN.md for the stages.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from unified_mllm.cli import one_line_errors
from unified_mllm.config import Config
from unified_mllm.layout import LayoutError
from unified_mllm.train import distributed
from unified_mllm.train.harness import run_cli


def _train(config: Config, args: argparse.Namespace) -> None:
    # Heavy imports after argument parsing (fast --help).
    from unified_mllm.data.dataset import DataError
    from unified_mllm.data.shards import CorruptShardError
    from unified_mllm.model.export import CheckpointMismatchError
    from unified_mllm.train.trainer import train

    with one_line_errors((DataError, CorruptShardError, CheckpointMismatchError), debug=args.debug):
        train(config, progress=not args.no_progress)  # bad data or weights: one line, as run_cli's


def main(argv: Sequence[str] | None = None) -> None:
    run_cli(
        "Train one stage of the unified model (plain, or under torchrun with FSDP2 / DeepSpeed).",
        _train,
        argv,
        errors=(LayoutError,),
        prog="python -m unified_mllm.train",
    )


if __name__ == "__main__":
    main()
    distributed.exit_finished_worker()
