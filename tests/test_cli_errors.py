"""Every command-line entry point ends on the project's own errors with one ``error: ...`` line and exit code 1,
and shows the traceback only with ``UMLLM_DEBUG=1`` (or ``--debug``); see :mod:`unified_mllm.cli`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from unified_mllm.cli import DEBUG_ENV, error_line, one_line_errors

REPO = Path(__file__).resolve().parents[1]

# (module, arguments with {tmp} for the test's folder, what the error line must name). The cheapest bad input of
# each: nothing here loads a model or writes data. Modules whose import alone takes ~5 s are marked slow.
CASES = [
    pytest.param("unified_mllm.train", ["no_such_key=1"], "unknown config key `no_such_key`", id="train"),
    pytest.param(
        "unified_mllm.train.tokenizer",
        ["--config", "{tmp}/missing.yaml"],
        "config file not found",
        id="train.tokenizer",
    ),
    pytest.param(
        "unified_mllm.train.contrastive", ["no_such_key=1"], "unknown config key", id="train.contrastive"
    ),
    pytest.param(
        "unified_mllm.eval",
        ["--task", "shapesbench", "--model", "{tmp}/nowhere"],
        "model export directory not found",
        id="eval",
    ),
    pytest.param(
        "unified_mllm.eval.tokenizer",
        ["--checkpoint", "{tmp}/nowhere"],
        "tokenizer weights not found",
        id="eval.tokenizer",
    ),
    pytest.param(
        "unified_mllm.eval.compare",
        ["--row", "a", "{tmp}/nowhere", "{tmp}/nowhere", "--output", "{tmp}/out"],
        "eval_test.json not found",
        id="eval.compare",
    ),
    pytest.param(
        "unified_mllm.eval.generation_bench",
        ["check", "no-such-bench", "{tmp}"],
        "unknown task 'no-such-bench'",
        id="eval.generation_bench",
    ),
    pytest.param(
        "unified_mllm.eval.judge", ["--read", "{tmp}/bad.png"], "cannot identify image file", id="eval.judge"
    ),
    pytest.param(
        "unified_mllm.convert",
        ["unitok", "{tmp}/nowhere.pth", "{tmp}/out"],
        "checkpoint file not found",
        id="convert",
        marks=pytest.mark.slow,
    ),
    pytest.param(
        "unified_mllm.data.shapes",
        ["data.root={tmp}/data", "data.world.grid_size=0"],
        "`data.world.grid_size`: must be >= 1",
        id="data.shapes",
    ),
    pytest.param(
        "unified_mllm.data.pretokenize",
        ["no_such_key=1"],
        "unknown config key",
        id="data.pretokenize",
        marks=pytest.mark.slow,
    ),
    pytest.param(
        "unified_mllm.serve", ["--model", "{tmp}/nowhere"], "export directory not found", id="serve"
    ),
    pytest.param(
        "unified_mllm.serve.demo", ["--model", "{tmp}/nowhere"], "export directory not found", id="serve.demo"
    ),
    pytest.param("unified_mllm.config", ["--get", "no.such"], "no config key 'no.such'", id="config"),
    pytest.param(
        "unified_mllm.text", ["info", "--config", "{tmp}/missing.yaml"], "config file not found", id="text"
    ),
    pytest.param(
        "unified_mllm.model.stats",
        ["no-such-model"],
        "unknown preset 'no-such-model'",
        id="model.stats",
        marks=pytest.mark.slow,
    ),
]


def run_module(
    module: str, args: list[str], tmp: Path, debug: bool = False
) -> subprocess.CompletedProcess[str]:
    (tmp / "bad.png").write_bytes(b"not an image")  # for the judge's --read
    env = {k: v for k, v in os.environ.items() if k != DEBUG_ENV}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    if debug:
        env[DEBUG_ENV] = "1"
    command = [sys.executable, "-m", module, *(a.format(tmp=tmp) for a in args)]
    return subprocess.run(command, cwd=tmp, env=env, capture_output=True, text=True, timeout=120)


def assert_one_line(result: subprocess.CompletedProcess[str], names: str) -> None:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and names in last, result.stderr


@pytest.mark.parametrize(("module", "args", "names"), CASES)
def test_bad_input_is_one_error_line(module: str, args: list[str], names: str, tmp_path: Path) -> None:
    assert_one_line(run_module(module, args, tmp_path), names)


@pytest.mark.parametrize(("module", "args", "names"), CASES)
def test_umllm_debug_shows_the_traceback(module: str, args: list[str], names: str, tmp_path: Path) -> None:
    result = run_module(module, args, tmp_path, debug=True)
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr and names in result.stderr
    assert not result.stderr.strip().splitlines()[-1].startswith("error: ")


def test_debug_flag_shows_the_traceback(tmp_path: Path) -> None:
    result = run_module("unified_mllm.config", ["--debug", "--get", "no.such"], tmp_path)
    assert result.returncode == 1 and "Traceback" in result.stderr and "ConfigError" in result.stderr


def test_an_argument_error_stays_argparse_s(tmp_path: Path) -> None:
    # usage errors keep argparse's usage line and exit code 2: they are not the project's errors
    result = run_module("unified_mllm.config", ["--no-such-flag"], tmp_path)
    assert result.returncode == 2 and "usage:" in result.stderr and "Traceback" not in result.stderr


# --------------------------------------------------------------------------------- the helper, in process


class OwnError(ValueError):
    pass


def test_one_line_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    with pytest.raises(SystemExit) as exc, one_line_errors((OwnError,)):
        raise OwnError("checkpoints failed:\n  a.pt: truncated\n\n  b.pt: crafted pickle\n")
    assert exc.value.code == "error: checkpoints failed:; a.pt: truncated; b.pt: crafted pickle"
    assert isinstance(exc.value.__cause__, OwnError)
    with pytest.raises(SystemExit, match=r"^error: \[Errno 2\] .*nowhere"), one_line_errors():
        open("/nonexistent/nowhere")  # FileNotFoundError is always the user's  # noqa: SIM115
    with pytest.raises(KeyError), one_line_errors((OwnError,)):  # a bug keeps its traceback
        raise KeyError("x")
    with pytest.raises(OwnError), one_line_errors((OwnError,), debug=True):
        raise OwnError("shown")
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(OwnError), one_line_errors((OwnError,)):
        raise OwnError("shown")
    monkeypatch.setenv(DEBUG_ENV, "0")
    with pytest.raises(SystemExit), one_line_errors((OwnError,)):
        raise OwnError("hidden")
    assert error_line(OwnError("")) == "error: OwnError"
