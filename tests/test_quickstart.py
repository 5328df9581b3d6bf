"""The README's main command end to end, on a micro world (CI runs it, so a broken quickstart fails CI)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MICRO = ["data.world.num_train=120", "data.world.num_val=10", "data.world.num_test=10", "tokenizer.vocab_size=420"]


@pytest.mark.slow
def test_quickstart_runs_and_reuses_finished_steps(tmp_path: Path) -> None:
    env = {**os.environ, "UMLLM_OUTPUT": str(tmp_path), "UMLLM_SELF_CHECK": "100"}
    command = ["bash", str(REPO / "scripts" / "quickstart.sh"), *MICRO]
    first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    assert (tmp_path / "data" / "shapes" / "train" / "shapes-train-000000.tar").is_file()
    assert (tmp_path / "tokenizer" / "text.model").is_file()
    assert "clean" in first.stdout and "100.00%" in first.stdout
    assert f"artifacts under {tmp_path}" in first.stdout

    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "text tokenizer exists" in second.stdout
    assert "wrote train" not in second.stdout  # the finished split is reused, not rewritten
