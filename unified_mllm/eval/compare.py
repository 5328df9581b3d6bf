"""One table comparing image tokenizers on the embedded world: reconstruction, semantic zero-shot, and the
unified model's ShapesBench after the same training budget (``scripts/compare_tokenizers.sh`` produces it).

    python -m unified_mllm.eval.compare --row NAME TOKENIZER_DIR EXPORT_DIR [--row ...] --output DIR

Each row reads what the project's own evaluations wrote: ``eval_test.json`` in the tokenizer's directory
(:mod:`unified_mllm.eval.tokenizer`: PSNR, SSIM, judge accuracy on reconstructions, semantic zero-shot)
and ``eval/shapesbench/shapesbench.json`` in the stage-2 export (:mod:`unified_mllm.eval.shapesbench`). It writes
``tokenizers.json`` and ``tokenizers.md`` under ``--output`` and prints the markdown.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from unified_mllm import io
from unified_mllm.cli import one_line_errors
from unified_mllm.eval.tasks import markdown_table

TOKENIZER_RESULT = "eval_test.json"
BENCH_RESULT = Path("eval") / "shapesbench" / "shapesbench.json"
COLUMNS = (
    "tokenizer",
    "codes / position",
    "PSNR (dB)",
    "SSIM",
    "judge on reconstructions",
    "semantic zero-shot",
    "VQA overall",
    "POPE F1",
    "generation overall",
)


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the evaluation that writes it first")
    return json.loads(path.read_text())


def _percent(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f} %"


def table_row(name: str, tokenizer_dir: Path, export_dir: Path) -> dict[str, Any]:
    """The figures of one tokenizer (raw values, fractions in [0, 1])."""
    recon, bench = _read(tokenizer_dir / TOKENIZER_RESULT), _read(export_dir / BENCH_RESULT)
    zero_shot = recon.get("zero_shot") or {}
    judge = recon.get("judge") or {}
    return {
        "tokenizer": name,
        "code_slots": recon.get("code_slots", 1),
        "psnr": recon["psnr"],
        "ssim": recon["ssim"],
        "judge_objects": judge.get("object_accuracy"),
        "zero_shot": zero_shot.get("accuracy"),
        "vqa_overall": bench["understanding"]["overall"],
        "pope_f1": bench["understanding"]["pope"]["f1"],
        "generation_overall": bench["generation"]["overall"],
        "tokenizer_dir": str(tokenizer_dir),
        "export_dir": str(export_dir),
    }


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    cells = [
        [
            row["tokenizer"],
            str(row["code_slots"]),
            f"{row['psnr']:.2f}",
            f"{row['ssim']:.3f}",
            *(
                _percent(row[k])
                for k in ("judge_objects", "zero_shot", "vqa_overall", "pope_f1", "generation_overall")
            ),
        ]
        for row in rows
    ]
    return markdown_table(COLUMNS, cells)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Compare image tokenizers from their evaluation results.")
    parser.add_argument(
        "--row", nargs=3, action="append", required=True, metavar=("NAME", "TOKENIZER_DIR", "EXPORT_DIR")
    )
    parser.add_argument("--output", required=True, help="directory for tokenizers.json and tokenizers.md")
    args = parser.parse_args(argv)
    with one_line_errors():  # a results file that is not there
        rows = [table_row(name, Path(tok), Path(export)) for name, tok, export in args.row]
    out, markdown = Path(args.output), format_table(rows)
    io.write_json(out / "tokenizers.json", rows)
    io.write_text(out / "tokenizers.md", markdown)
    print(markdown)


if __name__ == "__main__":
    main()
