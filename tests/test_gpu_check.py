"""scripts/gpu_check.py (the published-scale check a lent GPU runs) works end to end, at toy scale on the CPU."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.helpers import REPO


@pytest.mark.slow
def test_gpu_check_runs_at_toy_scale_on_the_cpu() -> None:
    command = [sys.executable, "scripts/gpu_check.py", "--device", "cpu", "--preset", "tiny", "--size", "64"]
    result = subprocess.run(
        [*command, "--dtype", "float32"], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert re.search(r"text-to-image 64 px \(CFG 3\.0, batched\): 72 image tokens in [\d.]+ s", result.stdout)
    assert re.search(r"understanding: \d+ answer tokens", result.stdout)
    assert "peak RSS" in result.stdout


def test_gpu_check_without_cuda_says_so() -> None:
    result = subprocess.run(
        [sys.executable, "scripts/gpu_check.py", "--device", "cuda"], cwd=REPO, capture_output=True, text=True
    )
    if "error: no CUDA device" not in result.stderr:
        pytest.skip("a CUDA device is present")
    assert result.returncode == 2
