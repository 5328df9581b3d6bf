"""What the benchmark driver (``python -m unified_mllm.eval``) and the sweep (``python -m unified_mllm.eval.sweep``)
share on the command line: the flags that say how and where the model runs and which config it runs with, the
keyword arguments those flags become, and how an export's config is read.

It imports no model code, so that a bad flag or a bad ``--model`` fails in a moment.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from unified_mllm.cli import add_debug_argument
from unified_mllm.config import Config, load_config

# The resolved training config in an export (unified_mllm.model.export.CONFIG_YAML, named here so that a bad
# --model fails in a moment instead of after importing the training stack).
CONFIG_YAML = "config.yaml"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def at_least_one(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def add_run_arguments(parser: argparse.ArgumentParser, *, limit_help: str, output_default: str) -> None:
    """``--limit``, ``--batch-size``, ``--output`` (default ``MODEL/<output_default>``), ``--device``,
    ``--dtype``."""
    parser.add_argument("--limit", type=at_least_one, help=limit_help)
    parser.add_argument("--batch-size", type=at_least_one, default=32, help="rows per solver call (32)")
    parser.add_argument("--output", help=f"results directory (default: MODEL/{output_default})")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="compute dtype (default: the solver's)")


def add_config_arguments(parser: argparse.ArgumentParser, *, progress_help: str) -> None:
    """``--config`` files, ``--no-progress``, ``--debug`` and the ``key.sub=value`` overrides (last, since
    they are positional)."""
    parser.add_argument("--config", action="append", default=[], help="YAML merged over the export's config")
    parser.add_argument("--no-progress", action="store_true", help=progress_help)
    add_debug_argument(parser)
    parser.add_argument(
        "overrides", nargs="*", help="key.sub=value overrides (see python -m unified_mllm.config)"
    )


def run_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of ``evaluate()`` and ``sweep()`` that the flags of :func:`add_run_arguments` and
    :func:`add_config_arguments` set."""
    return {
        "limit": args.limit,
        "batch_size": args.batch_size,
        "output": args.output,
        "device": args.device,
        "dtype": DTYPES[args.dtype] if args.dtype else None,
        "config_files": args.config,
        "overrides": args.overrides,
        "progress": not args.no_progress,
    }


def export_config(export: Path, config_files: Sequence[str], overrides: Sequence[str]) -> Config:
    """The export's ``config.yaml``, then ``config_files``, then the ``key=value`` overrides, validated."""
    return load_config([export / CONFIG_YAML, *config_files], overrides)
