"""The benchmark driver: run one registered task on an exported model.

    python -m unified_mllm.eval --task shapesbench --model EXPORT_DIR [--split val] [--limit N] [--batch-size B] \\
        [--output DIR] [--device cuda] [--dtype bfloat16] [--quantize int8] [--config EXTRA.yaml] \\
        [key.sub=value ...]
    python -m unified_mllm.eval --task mmbench-en --model EXPORT_DIR --data MMBench_DEV_EN.tsv [--restart]
    python -m unified_mllm.eval --task all-understanding --model EXPORT_DIR --data BENCHMARKS_ROOT

``EXPORT_DIR`` is a training run's export (``checkpoint.export_dir``). The task's config is the export's own
resolved training config (``config.yaml`` in it), then any ``--config`` files, then the ``key=value``
overrides — so ``data.root=...`` points at the data and ``generation.cfg_scale=5.5`` changes the decoding.
``--limit N`` caps what each part of the task evaluates (ShapesBench: N test scenes and N prompts; a paper
benchmark: its first N questions). ``--split val`` runs ShapesBench on the world's validation split (what
settings are chosen on, see ``python -m unified_mllm.eval.sweep``; the default is test). ``--data`` is the
benchmark's released file or folder (paper benchmarks read nothing else; see the README's benchmark table for
what to download); ``--restart`` discards the
predictions a killed run cached (by default a rerun continues from them). ``--images-per-prompt`` and
``--scores`` are for the generation benchmarks (how many images to draw per prompt; the results file of the
benchmark's own scorer to summarise). ``--task all-understanding`` runs every understanding benchmark whose
files it finds under the ``--data`` root and prints one summary table. Results go to ``--output`` (default
``EXPORT_DIR/eval/<task>``); the driver prints the task's table and the files.

Tasks live in :mod:`unified_mllm.eval.tasks`' registry; ``--help`` lists them.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from unified_mllm import io
from unified_mllm.cli import one_line_errors
from unified_mllm.config import Config, ConfigError
from unified_mllm.eval.cli_common import (
    CONFIG_YAML,
    add_config_arguments,
    add_run_arguments,
    at_least_one,
    export_config,
    run_options,
)
from unified_mllm.eval.tasks import Solver, Task, check_limit, get_task, markdown_table, task_names

ALL_UNDERSTANDING = "all-understanding"
ABLATIONS = ("features", "codes")  # InferenceSolver.ablation's kinds (the solver module is imported lazily)
# InferenceSolver.from_pretrained's quantize modes (unified_mllm.infer.quantize.QUANT_MODES), named here too so
# that --quantize is checked before the model loads.
QUANT_MODES = ("int8", "int4", "int4-unpacked")
ABLATION_LABELS = {"features": "SigLIP features zeroed", "codes": "VQ codes random"}
ABLATION_FILE = "ablation"
SUMMARY_FILE = "summary"  # .json and .md of --task all-understanding


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
    data: str | Path | None = None,
    options: dict[str, Any] | None = None,
    ablate: Sequence[str] = (),
    quantize: str | None = None,
) -> dict[str, Any]:
    """Run ``task_name`` on the export; every input is checked before the model loads.

    ``ablate`` (``--ablate``) reruns the understanding part under each named solver ablation and writes the
    comparison table. ``data`` is the benchmark's files (``--data``); ``options`` go to the task's constructor (``restart``,
    ``images_per_prompt``, ``scores``, ``split``: only those the user set). ``solver`` replaces the export's
    InferenceSolver (tests pass a fake); results go to ``output``, default ``export_dir/eval/<task>``.
    ``quantize`` (``--quantize``): the LM's linear layers in int8 / int4 (:mod:`unified_mllm.infer.quantize`).
    """
    path = Path(export_dir).expanduser()
    _check_inputs(path, limit, batch_size, quantize, ablate)
    config = export_config(path, config_files, overrides)
    tasks = _tasks(task_name, data, {k: v for k, v in (options or {}).items() if v is not None}, config)
    if solver is None:
        # Imported here: the driver's checks need no model code.
        from unified_mllm.infer.solver import InferenceSolver

        solver = InferenceSolver.from_pretrained(path, device=device, dtype=dtype, quantize=quantize)
    base = Path(output).expanduser() if output is not None else path / "eval"
    results = {}
    for task in tasks:
        output_dir = base / task.name if output is None or task_name == ALL_UNDERSTANDING else base
        run_options = {
            "limit": limit,
            "batch_size": batch_size,
            "progress": progress,
            "model_name": str(path),
        }
        results[task.name] = result = task.run(solver, config, output_dir=output_dir, **run_options)
        print(task.format_table(result))
        for label, file in result.get("files", {}).items():
            print(f"{label}: {file}")
        if ablate:
            result["ablation"] = _ablation(task, result, solver, config, ablate, output_dir, run_options)
    if task_name != ALL_UNDERSTANDING:
        return results[tasks[0].name]
    return _write_summary(tasks, results, base, str(path))


def _check_inputs(
    path: Path, limit: int | None, batch_size: int, quantize: str | None, ablate: Sequence[str]
) -> None:
    """The export is one, and the flags that need no config are valid."""
    if not path.is_dir():
        raise FileNotFoundError(f"model export directory not found: {path}")
    if not (path / CONFIG_YAML).is_file():
        raise FileNotFoundError(
            f"{path} has no {CONFIG_YAML} (the resolved training config every export carries); "
            "is it a finished export of `python -m unified_mllm.train`?"
        )
    check_limit(limit, batch_size)
    if quantize is not None and quantize not in QUANT_MODES:
        raise ValueError(f"--quantize takes {', '.join(QUANT_MODES)}, got {quantize!r}")
    unknown = sorted(set(ablate) - set(ABLATIONS))
    if unknown:
        raise ValueError(f"--ablate takes {', '.join(ABLATIONS)}, got {', '.join(unknown)}")


def _tasks(task_name: str, data: str | Path | None, options: dict[str, Any], config: Config) -> list[Task]:
    """The task named (or every understanding benchmark found under ``data``), each checked against
    ``config`` before any model loads."""
    if task_name == ALL_UNDERSTANDING:
        if data is None:
            raise FileNotFoundError(
                f"--task {ALL_UNDERSTANDING} needs --data ROOT, the folder of benchmark files"
            )
        tasks = _found_understanding_tasks(Path(data).expanduser(), options)
    else:
        tasks = [_make_task(task_name, data, options)]
    for task in tasks:
        task.check(config)
    return tasks


def _ablation(
    task: Task,
    result: dict[str, Any],
    solver: Solver,
    config: Any,
    ablate: Sequence[str],
    output_dir: Path,
    run_options: dict[str, Any],
) -> dict[str, Any]:
    """Run ``task``'s understanding part again under each solver ablation (``--ablate``) and write the table
    of the normal run beside them (``ablation.md`` / ``ablation.json``); returns the rows."""
    if not hasattr(solver, "ablation"):
        raise ValueError("--ablate needs the export's InferenceSolver (this solver has no ablation())")
    rows = {"as trained": task.understanding_row(result)}
    for kind in ablate:
        ablated = task.ablated()
        with solver.ablation(kind, seed=config.generation.seed):
            run = ablated.run(solver, config, output_dir=output_dir / f"ablate-{kind}", **run_options)
        rows[ABLATION_LABELS[kind]] = ablated.understanding_row(run)
    columns = list(dict.fromkeys(c for row in rows.values() for c in row))
    table = f"## {task.name}: ablation of the image span's branches\n\n" + markdown_table(
        ("run", *columns),
        [(label, *(_ratio_cell(row.get(c)) for c in columns)) for label, row in rows.items()],
    )
    io.write_json(output_dir / f"{ABLATION_FILE}.json", rows)
    io.write_text(output_dir / f"{ABLATION_FILE}.md", table)
    print(table)
    return rows


def _ratio_cell(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def _make_task(name: str, data: str | Path | None, options: dict[str, Any]) -> Task:
    """The task with ``--data`` and the other options the user set; an option the task has no use for is an
    error that names it."""
    if data is not None:
        options = {"data": data, **options}
    return get_task(name, **options)


def _found_understanding_tasks(root: Path, options: dict[str, Any]) -> list[Task]:
    """Every understanding benchmark whose files are under ``root``."""
    from unified_mllm.eval.benchmark import UnderstandingTask

    if not root.is_dir():
        raise FileNotFoundError(f"--data {root} is not a folder of benchmark files")
    found = []
    for name in task_names():
        task = get_task(name)
        if isinstance(task, UnderstandingTask) and (files := task.find_data(root)) is not None:
            found.append(_make_task(name, files, options))
    if not found:
        raise FileNotFoundError(
            f"no understanding benchmark's files under {root}; the README's benchmark table lists the names "
            "each one looks for"
        )
    return found


def _write_summary(
    tasks: Sequence[Task], results: dict[str, Any], output: Path, model: str
) -> dict[str, Any]:
    """One row per benchmark run: its headline metric next to the papers' figures (summary.json / .md)."""
    rows = []
    for task in tasks:
        head = results[task.name]["headline"]
        value = head["value"]
        shown = (
            "n/a" if value is None else f"{100 * value:.1f}" if head["scale"] == "percent" else f"{value:g}"
        )
        rows.append(
            (task.name, head["metric"], shown, results[task.name]["samples"], getattr(task, "reported", ""))
        )
    table = f"## Understanding benchmarks — `{model}`\n\n" + markdown_table(
        ("benchmark", "metric", "ours", "prompts", "papers (7B)"), rows
    )
    summary = {
        "model": model,
        "benchmarks": {name: r["headline"] for name, r in results.items()},
        "files": {
            "json": str(output / f"{SUMMARY_FILE}.json"),
            "markdown": str(output / f"{SUMMARY_FILE}.md"),
        },
    }
    output.mkdir(parents=True, exist_ok=True)
    io.write_json(summary["files"]["json"], summary)
    io.write_text(summary["files"]["markdown"], table)
    print(table)
    return summary


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m unified_mllm.eval",
        description="Run a benchmark task on an exported model.",
        epilog=f"tasks: {', '.join([*task_names(), ALL_UNDERSTANDING])}",
    )
    parser.add_argument("--task", required=True, help="benchmark to run (listed below)")
    parser.add_argument("--model", required=True, help="export directory of a trained model")
    parser.add_argument(
        "--data", help="the benchmark's released file or folder (all-understanding: their root)"
    )
    parser.add_argument("--restart", action="store_true", default=None, help="discard cached predictions")
    parser.add_argument(
        "--split", choices=("val", "test"), help="shapesbench: the world's split to measure on (default test)"
    )
    parser.add_argument(
        "--images-per-prompt", type=at_least_one, help="generation benchmarks: images per prompt"
    )
    parser.add_argument(
        "--scores", help="generation benchmarks: the results file of the benchmark's own scorer"
    )
    parser.add_argument(
        "--ablate",
        nargs="+",
        default=[],
        choices=[*ABLATIONS, "all"],
        metavar="BRANCH",
        help="also run the understanding part with image-span branches removed: features (SigLIP features "
        "zeroed), codes (VQ codes random) or all; writes ablation.md beside the results",
    )
    add_run_arguments(
        parser, limit_help="evaluate at most N samples of each part", output_default="eval/<task>"
    )
    parser.add_argument(
        "--quantize",
        choices=QUANT_MODES,
        help="LM linear layers in int8, or int4 (CUDA, --dtype bfloat16); needs torchao (the adapt extra)",
    )
    add_config_arguments(parser, progress_help="hide the progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_intermixed_args(argv)
    # ImportError: an optional dependency of a benchmark (its message says what to install)
    with one_line_errors((ConfigError, ValueError, ImportError), debug=args.debug):
        evaluate(
            args.task,
            args.model,
            **run_options(args),
            data=args.data,
            options={
                "restart": args.restart,
                "split": args.split,
                "images_per_prompt": args.images_per_prompt,
                "scores": args.scores,
            },
            ablate=[k for a in args.ablate for k in (ABLATIONS if a == "all" else (a,))],
            quantize=args.quantize,
        )


if __name__ == "__main__":
    main()
