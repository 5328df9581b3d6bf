"""``python -m unified_mllm.train --config configs/train/stage1.yaml [key=value ...]`` (also under torchrun).

See :mod:`unified_mllm.train.trainer` for what a run does and writes, and TRAIN.md for the stages.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from unified_mllm.config import ConfigError, add_config_arguments, config_from_args
from unified_mllm.layout import LayoutError
from unified_mllm.train import distributed


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m unified_mllm.train",
        description="Train one stage of the unified model (plain, or under torchrun with FSDP2 / DeepSpeed).",
    )
    add_config_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_intermixed_args(argv)
    from unified_mllm.train.trainer import train  # heavy imports after argument parsing (fast --help)

    try:
        train(config_from_args(args), progress=not args.no_progress)
    except (FileNotFoundError, ConfigError, LayoutError) as exc:
        raise SystemExit(f"error: {exc}") from exc
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    main()
    distributed.exit_finished_worker()
