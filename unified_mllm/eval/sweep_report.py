"""The sweep's files: ``sweep.md`` (tables), ``sweep.json`` (every row), ``sweep.png`` (plot), ``chosen.yaml``.

The input is the summary :func:`unified_mllm.eval.sweep.sweep` builds: per part (generation, understanding) its
axes, one row per setting (``setting``, ``overall``, ``stderr``, ``per_group`` accuracies, ...) in grid order,
and the index of the chosen row.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from unified_mllm import io
from unified_mllm.eval.tasks import markdown_table

JSON_FILE = "sweep.json"
MARKDOWN_FILE = "sweep.md"
PLOT_FILE = "sweep.png"
CHOSEN_FILE = "chosen.yaml"
# Column titles of the settings' fields.
HEADERS = {
    "cfg_scale": "cfg",
    "image_top_k": "top-k",
    "temperature": "temperature",
    "text_temperature": "text temperature",
    "text_top_k": "text top-k",
}
WHAT = {"generation": "GenEval-style prompts", "understanding": "VQA questions"}
SCORE = {"generation": "generation overall (mean of categories)", "understanding": "VQA overall"}


def _ratio(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.3f}"


def part_table(part: str, block: dict[str, Any]) -> str:
    """One row per setting: its fields, overall ± standard error, each group's accuracy; the choice in bold."""
    rows = block["rows"]
    fields = list(block["axes"])
    groups = list(dict.fromkeys(g for row in rows for g in row["per_group"]))
    extra = ["POPE F1"] if part == "understanding" else ["cluttered"]
    body = []
    for i, row in enumerate(rows):
        mark = (lambda text: f"**{text}**") if i == block["chosen_index"] else str
        cells = [mark(f"{row['setting'][f]:g}") for f in fields]
        cells += [mark(_ratio(row["overall"])), f"±{_ratio(row['stderr'])}"]
        cells += [_ratio(row["per_group"].get(g)) for g in groups]
        cells.append(_ratio(row["pope_f1"]) if part == "understanding" else str(row["cluttered"]))
        cells.append(f"{row['seconds']:.1f}")
        body.append(cells)
    header = [HEADERS.get(f, f) for f in fields] + ["overall", "s.e.", *groups, *extra, "seconds"]
    chosen = block["rows"][block["chosen_index"]]["setting"]
    total = rows[0]["total"] if rows else 0
    return (
        f"### {part}: {len(rows)} setting(s), {total} {WHAT[part]} each\n\n"
        + markdown_table(header, body)
        + f"\nChosen (highest {SCORE[part]}, in bold): "
        + ", ".join(f"`generation.{k}={v:g}`" for k, v in chosen.items())
        + "\n"
    )


def chosen_yaml(summary: dict[str, Any]) -> str:
    """A ``generation:`` section with every chosen field, for ``--config`` or a recipe."""
    limit = "all" if summary["limit"] is None else summary["limit"]
    lines = [
        f"# Chosen by `python -m unified_mllm.eval.sweep` on ShapesBench's {summary['split']} split "
        f"(--limit {limit}) for {summary['model']}",
        "generation:",
    ]
    for block in summary["parts"].values():
        # JSON scalars are YAML scalars
        lines += [f"  {key}: {json.dumps(value)}" for key, value in block["chosen"].items()]
    return "\n".join(lines) + "\n"


def _series_label(setting: dict[str, float]) -> str:
    if setting.get("temperature") == 0:
        return "greedy"
    return f"top-k {setting.get('image_top_k', 0):g}, temperature {setting.get('temperature', 1):g}"


def plot(summary: dict[str, Any], path: Path) -> None:
    """Generation overall against guidance, one line per (top-k, temperature) with a ±1 s.e. band and the
    choice starred; VQA overall per text setting beside it when more than one was measured."""
    import matplotlib

    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt

    parts = summary["parts"]
    panels = [p for p in ("generation", "understanding") if p in parts]
    if "understanding" in parts and len(parts["understanding"]["rows"]) < 2 and len(panels) > 1:
        panels.remove("understanding")  # a single bar says less than the table
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, part in zip(axes[0], panels, strict=True):
        block = parts[part]
        rows, best = block["rows"], block["rows"][block["chosen_index"]]
        if part == "generation":
            _plot_generation(ax, rows, best)
        else:
            _plot_understanding(ax, rows, best)
        ax.set_ylabel(SCORE[part])
        ax.set_title(f"ShapesBench {part}, {summary['split']} split, {rows[0]['total']} {WHAT[part]}")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def _plot_generation(ax: Any, rows: Sequence[dict[str, Any]], best: dict[str, Any]) -> None:
    series: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        series.setdefault(_series_label(row["setting"]), []).append(row)
    for label, points in series.items():
        points = sorted(points, key=lambda r: r["setting"]["cfg_scale"])
        x = [r["setting"]["cfg_scale"] for r in points]
        y = [r["overall"] for r in points]
        (line,) = ax.plot(x, y, marker="o", label=label)
        low = [r["overall"] - r["stderr"] for r in points]
        high = [r["overall"] + r["stderr"] for r in points]
        ax.fill_between(x, low, high, color=line.get_color(), alpha=0.15)
    ax.plot([best["setting"]["cfg_scale"]], [best["overall"]], "k*", markersize=16, label="chosen")
    scales = sorted({r["setting"]["cfg_scale"] for r in rows})
    if scales[0] > 0 and len(scales) > 2:
        ax.set_xscale("log")  # guidance scales are tried geometrically: 1, 3, 6, 10, ...
        ax.set_xticks(scales, [f"{s:g}" for s in scales])
        ax.minorticks_off()
    ax.set_xlabel("guidance scale (generation.cfg_scale)")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)


def _plot_understanding(ax: Any, rows: Sequence[dict[str, Any]], best: dict[str, Any]) -> None:
    labels = [
        "greedy"
        if r["setting"]["text_temperature"] == 0
        else f"T {r['setting']['text_temperature']:g}, k {r['setting']['text_top_k']:g}"
        for r in rows
    ]
    colors = ["black" if r is best else "tab:blue" for r in rows]
    ax.bar(labels, [r["overall"] for r in rows], yerr=[r["stderr"] for r in rows], color=colors, capsize=3)
    ax.set_xlabel("answer decoding (black: chosen)")
    ax.set_ylim(bottom=0)


def write_report(summary: dict[str, Any], output_dir: Path) -> dict[str, Any]:
    """Write the four files; returns ``{"table", "chosen", "files"}`` (also stored in ``sweep.json``)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "json": output_dir / JSON_FILE,
        "markdown": output_dir / MARKDOWN_FILE,
        "plot": output_dir / PLOT_FILE,
        "chosen": output_dir / CHOSEN_FILE,
    }
    limit = "all" if summary["limit"] is None else summary["limit"]
    table = f"## Decoding sweep on ShapesBench's {summary['split']} split — `{summary['model']}`\n\n"
    table += f"Per setting: --limit {limit}, batch size {summary['batch_size']}, the same seeds.\n\n"
    table += "\n".join(part_table(part, block) for part, block in summary["parts"].items())
    chosen = {k: v for block in summary["parts"].values() for k, v in block["chosen"].items()}
    report = {"table": table, "chosen": chosen, "files": {k: str(v) for k, v in files.items()}}
    plot(summary, files["plot"])
    io.write_text(files["markdown"], table)
    io.write_text(files["chosen"], chosen_yaml(summary))
    io.write_json(files["json"], {**summary, **report})
    return report
