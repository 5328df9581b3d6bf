"""Choose decoding settings on the validation split: ShapesBench over a grid of sampling settings.

    python -m unified_mllm.eval.sweep --model EXPORT_DIR [--split val] [--limit N] [--output DIR] \\
        [--cfg 1 3 6 10 15 25] [--top-k 16 64 512] [--temperature 0.7 1.0] \\
        [--text-temperature 0 0.5] [--text-top-k 5] [--parts generation understanding] \\
        [--batch-size B] [--device cpu] [--config EXTRA.yaml] [key.sub=value ...]

**What it runs.** Generation: ShapesBench's generation part (the first ``--limit`` val prompts) for every
combination of ``--cfg`` x ``--top-k`` x ``--temperature``: a full grid, because the three interact (stronger
guidance sharpens the code distribution much as a lower temperature or a smaller top-k does), so one axis at a
time from a fixed start could miss the best pair. Understanding: ShapesBench's VQA part (the first ``--limit``
val scenes) for every ``--text-temperature`` x ``--text-top-k``; greedy by default, which is one run whose
figure is reported. The two grids are separate, not one product: understanding decoding never touches a drawn
image and image sampling never touches a text answer. An axis left out is the config's value (the export's
recorded default, or an override). A temperature of 0 is greedy, where top-k changes nothing, so those
combinations run once. Every setting samples with the same seeds (``generation.seed``), so settings are compared
on the same random numbers.

**The choice** is the setting with the highest generation overall (GenEval's mean of categories) and, apart,
the one with the highest VQA overall; a tie goes to the earlier setting in the grid's order. It is made on the
validation split only: ``--split test`` is refused, because a choice made on the test split makes every test
figure of that choice optimistic (measure test after choosing, with ``python -m unified_mllm.eval --task
shapesbench --config OUTPUT/chosen.yaml``). The choice is printed and written as ``chosen.yaml``, a
``generation:`` section for ``--config`` or a recipe.

**Files** under ``--output`` (default ``EXPORT_DIR/eval/sweep``): ``sweep.md`` and ``sweep.json`` (one row per
setting with its scores and their standard error, the axes, the choice; :mod:`.sweep_report`), ``sweep.png``,
``chosen.yaml`` and ``runs/<setting>/`` (each setting's own ShapesBench files: scores, records, images, sample
grid). A setting whose finished results are there, made with the same model, data and settings, is not run
again, so an interrupted sweep continues where it stopped and a widened grid runs only its new settings.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
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
    export_config,
    run_options,
)
from unified_mllm.eval.shapesbench import JSON_FILE, PARTS, ShapesBench
from unified_mllm.eval.sweep_report import write_report
from unified_mllm.eval.tasks import Solver, check_limit
from unified_mllm.progress import progress as progress_bar

# The config.generation fields each part's grid varies, in the grid's order; (temperature, top-k) of each
# part, for collapsing greedy settings.
AXES = {
    "generation": ("cfg_scale", "image_top_k", "temperature"),
    "understanding": ("text_temperature", "text_top_k"),
}
# The command-line flag of each axis, and what it sets.
FLAGS = {
    "cfg_scale": ("--cfg", "guidance scales (generation.cfg_scale)"),
    "image_top_k": ("--top-k", "top-k over image codes (generation.image_top_k; 0 disables)"),
    "temperature": ("--temperature", "image code temperatures (generation.temperature; 0 greedy)"),
    "text_temperature": ("--text-temperature", "answer temperatures (generation.text_temperature; 0 greedy)"),
    "text_top_k": ("--text-top-k", "top-k over answer tokens when sampling (generation.text_top_k)"),
}
GREEDY = {"generation": ("temperature", "image_top_k"), "understanding": ("text_temperature", "text_top_k")}
CHOICE_SPLIT = "val"
DEFAULT_OUTPUT = "eval/sweep"  # under the export
SETTING_FILE = "setting.json"  # written last in a setting's run directory: its fingerprint and scores
RUNS_DIR = "runs"
# The export's files whose identity (size, modification time) decides whether a cached result is this model's.
MODEL_FILES = ("model.safetensors", CONFIG_YAML)

Setting = dict[str, float]
Grid = tuple[dict[str, list[float]], list[Setting]]  # one part's axes and its settings


def setting_grid(axes: dict[str, Sequence[float]], greedy: tuple[str, str]) -> list[Setting]:
    """Every combination of the axes' values, in order (the last axis varies fastest), without repeats;
    a setting whose ``greedy[0]`` (temperature) is 0 keeps only the first value of ``greedy[1]`` (top-k)."""
    temperature, top_k = greedy
    settings: list[Setting] = []
    for values in itertools.product(*axes.values()):
        setting = dict(zip(axes, values, strict=True))
        if setting.get(temperature) == 0 and top_k in setting:
            setting[top_k] = axes[top_k][0]  # greedy decoding picks the same id under any top-k
        if setting not in settings:
            settings.append(setting)
    return settings


def setting_name(setting: Setting) -> str:
    """A directory name for a setting: ``cfg_scale=3.0,image_top_k=64,temperature=1.0``."""
    return ",".join(f"{key}={value:g}" for key, value in setting.items())


def choose(rows: Sequence[dict[str, Any]]) -> int:
    """Index of the row with the highest ``overall``; the earliest of equal ones (rows are in grid order)."""
    if not rows:
        raise ValueError("no settings were measured, so none can be chosen")
    return max(range(len(rows)), key=lambda i: (rows[i]["overall"], -i))


def check_axis(name: str, values: Sequence[float], *, integer: bool = False) -> list[float]:
    """The axis' values, which must be finite and >= 0 (whole numbers when ``integer``)."""
    bad = [v for v in values if not math.isfinite(v) or v < 0 or (integer and int(v) != v)]
    if bad or not values:
        kind = "whole numbers >= 0" if integer else "finite numbers >= 0"
        raise ValueError(f"{FLAGS[name][0]} takes {kind}, got {list(values)}")
    return [int(v) for v in values] if integer else [float(v) for v in values]


def model_identity(export: Path) -> dict[str, Any]:
    """The export's path and the size and modification time of its files: a retrained export is another model."""
    identity: dict[str, Any] = {"path": str(export)}
    for name in MODEL_FILES:
        stat = (export / name).stat() if (export / name).is_file() else None
        identity[name] = None if stat is None else [stat.st_size, stat.st_mtime_ns]
    return identity


def binomial_variance(correct: int, total: int) -> float:
    """Variance of an accuracy of ``correct`` / ``total``, with the rate smoothed to (correct + 1) / (total + 2)
    so that a group all right or all wrong in a few samples does not claim a zero error."""
    rate = (correct + 1) / (total + 2)
    return rate * (1 - rate) / total


def _generation_row(result: dict[str, Any]) -> dict[str, Any]:
    gen = result["generation"]
    groups = [g for g in gen["per_category"].values() if g["total"]]
    # overall is the mean of the categories: its variance is the sum of theirs over the count squared.
    variance = sum(binomial_variance(g["correct"], g["total"]) for g in groups)
    return {
        "overall": gen["overall"],
        "stderr": math.sqrt(variance) / max(1, len(groups)),
        "per_group": {name: g["accuracy"] for name, g in gen["per_category"].items()},
        "total": gen["total"],
        "cluttered": gen["cluttered"],
        "seconds": gen["seconds"],
        "used": gen["settings"],
    }


def _understanding_row(result: dict[str, Any]) -> dict[str, Any]:
    vqa = result["understanding"]
    return {
        "overall": vqa["overall"],
        "stderr": math.sqrt(binomial_variance(vqa["correct"], vqa["total"])),
        "per_group": {name: g["accuracy"] for name, g in vqa["per_type"].items()},
        "pope_f1": vqa["pope"]["f1"],
        "total": vqa["total"],
        "scenes": vqa["scenes"],
        "seconds": vqa["seconds"],
        "used": vqa["settings"],
    }


ROWS = {"generation": _generation_row, "understanding": _understanding_row}


def sweep(
    export_dir: str | Path,
    *,
    axes: dict[str, Sequence[float]] | None = None,
    parts: Sequence[str] = PARTS,
    split: str = CHOICE_SPLIT,
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
    """Measure every setting of the grids, choose, write the report; returns what ``sweep.json`` holds.

    ``axes`` maps config.generation field names (:data:`AXES`) to the values to try; a field left out keeps
    the config's value. ``solver`` replaces the export's InferenceSolver (tests pass a fake)."""
    check_request(split, parts, axes or {})
    check_limit(limit, batch_size)
    export = Path(export_dir).expanduser()
    if not (export / CONFIG_YAML).is_file():
        raise FileNotFoundError(f"{export} is not a model export: it has no {CONFIG_YAML}")
    config = export_config(export, config_files, overrides)
    grids = part_grids(config, parts, axes or {}, split)
    if solver is None:
        from unified_mllm.infer.solver import InferenceSolver  # the checks above need no model code

        solver = InferenceSolver.from_pretrained(export, device=device, dtype=dtype)
    out = Path(output).expanduser() if output is not None else export / DEFAULT_OUTPUT
    runs = Runs(solver, config, split, limit, batch_size, out, model_identity(export))
    summary: dict[str, Any] = {"model": str(export), "split": split, "limit": limit, "batch_size": batch_size}
    summary["parts"] = measure_grids(grids, runs, progress)
    summary.update(write_report(summary, out))
    print(summary["table"])
    for label, file in summary["files"].items():
        print(f"{label}: {file}")
    return summary


def check_request(split: str, parts: Sequence[str], axes: dict[str, Sequence[float]]) -> None:
    """The split is the one settings are chosen on, the parts are ShapesBench's, the axes are :data:`AXES`'."""
    if split != CHOICE_SPLIT:
        raise ValueError(
            f"the sweep chooses settings on the {CHOICE_SPLIT} split only, got --split {split}: settings chosen "
            "on the test split make every test figure measured with them optimistic. Choose on val, then "
            "measure test once with `python -m unified_mllm.eval --task shapesbench --config OUTPUT/chosen.yaml`"
        )
    unknown = sorted(set(parts) - set(PARTS))
    if unknown or not parts:
        raise ValueError(f"--parts takes one or both of {', '.join(PARTS)}, got {', '.join(parts) or 'none'}")
    known = {name for names in AXES.values() for name in names}
    if set(axes) - known:
        raise ValueError(
            f"the sweep varies {', '.join(sorted(known))}, not {', '.join(sorted(set(axes) - known))}"
        )


def part_grids(
    config: Config, parts: Sequence[str], axes: dict[str, Sequence[float]], split: str
) -> dict[str, Grid]:
    """Each part's axes (the values given, else the config's one value) and its settings, in :data:`PARTS`'
    order; each part's ShapesBench is checked against ``config`` before any model loads."""
    grids = {}
    for part in (p for p in PARTS if p in parts):
        given = {name: axes.get(name) for name in AXES[part]}
        part_axes = {
            name: check_axis(name, values, integer=name.endswith("top_k"))
            if values is not None
            else [getattr(config.generation, name)]
            for name, values in given.items()
        }
        grids[part] = (part_axes, setting_grid(part_axes, GREEDY[part]))
        ShapesBench(parts=(part,), split=split).check(config)
    return grids


@dataclass(frozen=True)
class Runs:
    """What every setting's run shares: the solver, the config the settings change, the data and where the
    runs go (``out/runs/<part>/<setting>``)."""

    solver: Solver
    config: Config
    split: str
    limit: int | None
    batch_size: int
    out: Path
    identity: dict[str, Any]

    def run(self, part: str, setting: Setting) -> tuple[dict[str, Any], bool]:
        """ShapesBench's ``part`` under ``setting`` (config.generation fields), or its cached result when one
        was made with the same model, data and settings; returns (the row of scores, whether it was cached)."""
        config = copy.deepcopy(self.config)
        for key, value in setting.items():
            setattr(config.generation, key, value)
        task = ShapesBench(parts=(part,), split=self.split)
        output_dir = self.out / RUNS_DIR / part / setting_name(setting)
        record_file = output_dir / SETTING_FILE
        fingerprint = self.fingerprint(part, task, config)
        cached = io.finished_output(record_file, {"fingerprint": fingerprint}, [JSON_FILE])
        if cached is not None:
            return cached["row"], True
        result = task.run(
            self.solver,
            config,
            limit=self.limit,
            batch_size=self.batch_size,
            output_dir=output_dir,
            progress=False,
            model_name=self.identity["path"],
        )
        row = {"setting": setting, "dir": str(output_dir), **ROWS[part](result)}
        io.write_json(record_file, {"fingerprint": fingerprint, "row": row})
        return row, False

    def fingerprint(self, part: str, task: ShapesBench, config: Config) -> dict[str, Any]:
        """Everything a setting's result depends on: a cached result with another fingerprint is run again."""
        return {
            "model": self.identity,
            "part": part,
            "split": self.split,
            "limit": self.limit,
            "batch_size": self.batch_size,  # sets which seed each prompt is drawn with
            "num_prompts": task.num_prompts,
            "prompt_seed": task.prompt_seed,
            "data_root": str(Path(config.data.root).expanduser()),
            "world": dataclasses.asdict(config.data.world),
            "generation": dataclasses.asdict(config.generation),
        }


def measure_grids(grids: dict[str, Grid], runs: Runs, progress: bool) -> dict[str, Any]:
    """Every setting of every part measured (one progress step each) and each part's choice: what
    ``sweep.json`` holds under ``parts``."""
    total = sum(len(settings) for _, settings in grids.values())
    bar = progress_bar(total=total, desc="sweep", unit="setting", disable=not progress)
    measured: dict[str, Any] = {}
    for part, (part_axes, settings) in grids.items():
        rows, reused = [], 0
        for setting in settings:
            bar.set_postfix_str(f"{part} {setting_name(setting)}")
            row, cached = runs.run(part, setting)
            rows.append(row)
            reused += cached
            bar.update(1)
        best = choose(rows)
        measured[part] = {
            "axes": part_axes,
            "rows": rows,
            "chosen": rows[best]["setting"],
            "chosen_index": best,
            "reused": reused,
        }
    bar.close()
    return measured


def _floats(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m unified_mllm.eval.sweep",
        description="Choose decoding settings on ShapesBench's validation split (a grid of settings).",
    )
    parser.add_argument("--model", required=True, help="export directory of a trained model")
    parser.add_argument("--split", default=CHOICE_SPLIT, help="the split settings are chosen on: val (only)")
    for dest, (flag, text) in FLAGS.items():
        parser.add_argument(flag, dest=dest, nargs="+", type=_floats, help=f"{text}; default: the config's")
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS, help="what to sweep (both)")
    add_run_arguments(
        parser, limit_help="val prompts and val scenes per setting", output_default=DEFAULT_OUTPUT
    )
    add_config_arguments(parser, progress_help="hide the progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_intermixed_args(argv)
    axes = {name: getattr(args, name) for names in AXES.values() for name in names}
    with one_line_errors((ConfigError, ValueError), debug=args.debug):
        sweep(
            args.model,
            axes={name: values for name, values in axes.items() if values is not None},
            parts=args.parts,
            split=args.split,
            **run_options(args),
        )


if __name__ == "__main__":
    main()
