"""What a training run shows and leaves behind: a tqdm bar, a JSONL metrics file, wandb, loss-curve PNGs.

Every trainer (the VQ tokenizer trainer, the LM trainer) logs through :class:`RunLogger` on rank 0 only:

* ``metrics.jsonl`` — one JSON record per log or evaluation step (``{"kind": "train", "step": 100, ...}``).
  On resume, records past the resumed step are dropped, because those steps are trained again;
* wandb — offline by default (files under the run directory; ``wandb sync`` uploads them later), online when
  ``train.wandb.mode=online``, nothing when ``disabled``;
* :func:`save_curves` — the JSONL's training records as a PNG, one panel per group of metric names.

The logger never syncs with the device: callers hand it plain floats, computed on logging steps only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from unified_mllm import io
from unified_mllm.config import WandbConfig
from unified_mllm.progress import progress as progress_bar

METRICS_FILE = "metrics.jsonl"


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (json.JSONDecodeError, AttributeError, ValueError):
        return 1 << 62  # unreadable line (a write cut short by a kill): drop it


def read_metrics(path: Path, kind: str | None = None) -> list[dict[str, Any]]:
    """The records of a metrics JSONL file (only those of ``kind`` when given)."""
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if kind is None or r.get("kind") == kind]


def init_wandb(wandb: WandbConfig, run_dir: Path, name: str, config: Mapping[str, Any]) -> Any:
    """A wandb run writing under ``run_dir`` (None when ``wandb.mode`` is ``disabled``)."""
    if wandb.mode == "disabled":
        return None
    import wandb as wandb_lib  # imported lazily: slow to import, and unused when disabled

    return wandb_lib.init(
        project=wandb.project,
        name=name,
        mode=wandb.mode,
        dir=str(run_dir),
        config=dict(config),
        # Our bar and metrics.jsonl already show the run; wandb's own console summary would repeat it.
        settings=wandb_lib.Settings(silent=True),
    )


class RunLogger:
    """Rank 0's outputs during training: the progress bar, the JSONL file and wandb (other ranks: nothing).

    ``total`` and ``initial`` are steps (the bar resumes where the run resumes); ``wandb_config`` is the
    configuration recorded with the wandb run.
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        name: str,
        total: int,
        initial: int,
        is_main: bool,
        wandb: WandbConfig,
        wandb_config: Mapping[str, Any],
        progress: bool = True,
    ) -> None:
        self.main, self.file = is_main, run_dir / METRICS_FILE
        if is_main and self.file.is_file():  # append-only, but the records past a resumed step are dropped
            kept = [line for line in self.file.read_text().splitlines() if _step_of(line) <= initial]
            io.write_text(self.file, "".join(line + "\n" for line in kept))
        self.wandb = init_wandb(wandb, run_dir, name, wandb_config) if is_main else None
        self.bar = progress_bar(
            total=total, initial=initial, desc=name, unit="step", disable=not (progress and is_main)
        )

    def log(self, record: Mapping[str, Any], postfix: Mapping[str, float] | None = None) -> None:
        """Write one record (it needs ``kind`` and ``step``) and show ``postfix`` on the bar."""
        if not self.main:
            return
        with open(self.file, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(dict(record)) + "\n")
        if self.wandb is not None:
            self.wandb.log(
                {f"{record['kind']}/{k}": v for k, v in record.items() if k != "kind"}, step=record["step"]
            )
        if postfix:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def close(self) -> None:
        self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()


Panel = tuple[str, Sequence[str]]


def save_curves(
    metrics_path: Path, path: Path, panels: Sequence[Panel], *, log_scale: Sequence[str] = ()
) -> None:
    """Plot the training records of ``metrics_path`` into a PNG: one panel ``(title, metric names)`` each.

    Panels whose metrics never appear say "not trained"; titles in ``log_scale`` get a logarithmic y axis.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on training machines
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path, "train")
    columns = min(2, len(panels))
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.5 * rows), squeeze=False)
    for ax, (title, names) in zip(axes.flat, panels):
        for name in names:
            points = [(r["step"], r[name]) for r in records if name in r and math.isfinite(r[name])]
            if points:
                ax.plot(*zip(*points), label=name)
        ax.set_title(title)
        ax.set_xlabel("step")
        if title in log_scale and ax.get_lines():
            ax.set_yscale("log")
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        else:
            ax.text(0.5, 0.5, "not trained", ha="center", va="center", transform=ax.transAxes)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    fig.tight_layout()
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
