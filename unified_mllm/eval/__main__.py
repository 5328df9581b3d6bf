"""The benchmark driver: run one registered task on an exported model.

    python -m unified_mllm.eval --task shapesbench --model EXPORT_DIR [--limit N] [--batch-size B] \\
        [--output DIR] [--device cuda] [--dtype bfloat16] [--config EXTRA.yaml] [key.sub=value ...]

``EXPORT_DIR`` is a training run's export (``checkpoint.export_dir``). The task's config is the export's own
resolved training config (``config.yaml`` in it), then any ``--config`` files, then the ``key=value``
overrides — so ``data.root=...`` points at the data and ``generation.cfg_scale=5.5`` changes the decoding.
``--limit N`` caps what each part of the task evaluates (ShapesBench: N test scenes and N prompts). Results go
to ``--output`` (default ``EXPORT_DIR/eval/<task>``); the driver prints the task's table and the files.

Tasks live in :mod:`unified_mllm.eval.tasks`' registry; ``--help`` lists them.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from unified_mllm.config import ConfigError, load_config
from unified_mllm.eval.tasks import Solver, check_limit, get_task, task_names

# The resolved training config in an export (unified_mllm.model.export.CONFIG_YAML, named here so that a bad
# --model fails in a moment instead of after importing the training stack).
CONFIG_YAML = "config.yaml"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def evaluate(
    task_name: str,
    export_dir: str | Path,
    *,
    limit: int | None = None,
    batch_size: int = 32,
    output: str | Path | None = None,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    config_files: Sequence[str] = (),
    overrides: Sequence[str] = (),
    progress: bool = True,
    solver: Solver | None = None,
) -> dict[str, Any]:
    """Run ``task_name`` on the export; every input is checked before the model loads.

    ``solver`` replaces the export's InferenceSolver (tests pass a fake); results go to ``output``, default
    ``export_dir/eval/<task>``.
    """
    path = Path(export_dir).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"model export directory not found: {path}")
    if not (path / CONFIG_YAML).is_file():
        raise FileNotFoundError(
            f"{path} has no {CONFIG_YAML} (the resolved training config every export carries); "
            "is it a finished export of `python -m unified_mllm.train`?"
        )
    check_limit(limit, batch_size)
    task = get_task(task_name)
    # The export's config.yaml, then config_files, then key=value overrides, validated.
    config = load_config([path / CONFIG_YAML, *config_files], overrides)
    task.check(config)
    if solver is None:
        # Imported here: the driver's checks need no model code.
        from unified_mllm.infer.solver import InferenceSolver

        solver = InferenceSolver.from_pretrained(path, device=device, dtype=dtype)
    output_dir = Path(output).expanduser() if output is not None else path / "eval" / task.name
    result = task.run(
        solver,
        config,
        limit=limit,
        batch_size=batch_size,
        output_dir=output_dir,
        progress=progress,
        model_name=str(path),
    )
    print(task.format_table(result))
    for label, file in result.get("files", {}).items():
        print(f"{label}: {file}")
    return result


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m unified_mllm.eval",
        description="Run a benchmark task on an exported model.",
        epilog=f"tasks: {', '.join(task_names())}",
    )
    parser.add_argument("--task", required=True, help=f"benchmark to run: {', '.join(task_names())}")
    parser.add_argument("--model", required=True, help="export directory of a trained model")
    parser.add_argument("--limit", type=_at_least_one, help="evaluate at most N samples of each part")
    parser.add_argument("--batch-size", type=_at_least_one, default=32, help="rows per solver call (32)")
    parser.add_argument("--output", help="results directory (default: MODEL/eval/<task>)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="compute dtype (default: the solver's)")
    parser.add_argument("--config", action="append", default=[], help="YAML merged over the export's config")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.add_argument(
        "overrides", nargs="*", help="key.sub=value overrides (see python -m unified_mllm.config)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_intermixed_args(argv)
    try:
        evaluate(
            args.task,
            args.model,
            limit=args.limit,
            batch_size=args.batch_size,
            output=args.output,
            device=args.device,
            dtype=DTYPES[args.dtype] if args.dtype else None,
            config_files=args.config,
            overrides=args.overrides,
            progress=not args.no_progress,
        )
    except (FileNotFoundError, ConfigError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from exc


if __name__ == "__main__":
    main()
