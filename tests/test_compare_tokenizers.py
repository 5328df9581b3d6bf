"""scripts/compare_tokenizers.sh end to end with a micro budget: every tokenizer kind through its whole
pipeline, and the one table the script promises."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.helpers import MICRO

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_compare_script_fills_one_row_per_tokenizer(tmp_path: Path) -> None:
    env = {**os.environ, "UMLLM_OUTPUT": str(tmp_path), "UMLLM_BENCH_LIMIT": "4", "OMP_NUM_THREADS": "1"}
    command = ["bash", str(REPO / "scripts" / "compare_tokenizers.sh"), *MICRO]
    # 607 s alone on a 2-core box without AVX-512 bf16 (where CPU bf16 is slow): the limit only catches a hang.
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads((tmp_path / "compare" / "tokenizers.json").read_text())
    assert [r["tokenizer"] for r in rows] == ["vqgan", "unitok", "dualtoken"]
    assert [r["code_slots"] for r in rows] == [1, 4, 8]
    assert (
        rows[0]["zero_shot"] is None and rows[1]["zero_shot"] is not None and rows[2]["zero_shot"] is not None
    )
    for row in rows:
        assert 0 <= row["vqa_overall"] <= 1 and 0 <= row["generation_overall"] <= 1
        assert Path(row["export_dir"], "eval", "shapesbench", "shapesbench_samples.png").is_file()
    table = (tmp_path / "compare" / "tokenizers.md").read_text()
    assert table.count("\n") == 5 and "| unitok | 4 |" in table
