"""The documentation's code examples run as tests, so an example that breaks fails CI.

Every ```python block of README.md / TRAIN.md / INSTALL.md / BENCHMARKS.md is one test case, named after the
section heading above it. It runs (``exec`` in a fresh namespace) against a tiny random export written by the
test: the paths the example names are replaced by the test's own through :data:`PATHS`, GPU settings by CPU ones
through :data:`SUBSTITUTIONS`, and the free names an example takes for granted (``image``, ``my_pairs``) are
provided by :data:`GIVEN`. A path that no entry of the table knows fails the test with its name, so a new example
cannot be skipped silently. Bash blocks: every ``python -m unified_mllm.X`` they name must exist and answer
``--help``.
"""

from __future__ import annotations

import contextlib
import io
import re
import runpy
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.helpers import REPO, serving, write_export

DOCS = ("README.md", "TRAIN.md", "INSTALL.md", "BENCHMARKS.md")

# The paths the examples name -> the test's stand-in ("export" = the tiny export, "dir:" = a fresh folder).
PATHS: dict[str, str] = {
    "~/.cache/unified_mllm/runs/quickstart-stage2/export": "export",
    "runs/quickstart-stage2/export": "export",
    "/models/unitoken-base-stage2-converted": "export",
    "my_data/train": "dir:my_data/train",
}

# The server the serving examples talk to (the default of `python -m unified_mllm.serve`) and the model id they
# name (the quickstart's run name); the test serves its own export there on a free port.
SERVER_URL = "http://127.0.0.1:8000"
SERVED_MODEL_NAME = "quickstart-stage2"

# Plain text substitutions: the examples run on CPU in float32.
SUBSTITUTIONS: dict[str, str] = {
    'device="cuda"': 'device="cpu"',
    "dtype=torch.bfloat16": "dtype=torch.float32",
}


def _picture(color: str) -> Image.Image:
    return Image.new("RGB", (48, 40), color)


# Names an example uses without defining them (the reader's own images and data).
GIVEN: dict[str, Callable[[], Any]] = {
    "image": lambda: _picture("red"),
    "img_a": lambda: _picture("green"),
    "img_b": lambda: _picture("blue"),
    "my_pairs": lambda: [(_picture("red"), "a red circle"), (_picture("blue"), "a blue square")],
}

# A string literal that looks like a file path: the example's data it needs.
_PATH_LITERAL = re.compile(r"""["']((?:~|/|\.{1,2}/|[\w.-]+/)[^"'\s]*)["']""")
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def _blocks(language: str) -> list[tuple[str, str, str]]:
    """(document, heading, code) of every fenced block in the given language, in document order."""
    found = []
    for name in DOCS:
        path = REPO / name
        if not path.exists():
            continue
        heading, inside, lines = name, False, []
        for line in path.read_text().splitlines():
            if not inside and line.startswith("#"):
                heading = line.lstrip("#").strip()
            elif not inside and line.strip() == f"```{language}":
                inside, lines = True, []
            elif inside and line.strip() == "```":
                inside = False
                found.append((name, heading, "\n".join(lines) + "\n"))
            elif inside:
                lines.append(line)
    return found


def _case_ids(blocks: list[tuple[str, str, str]]) -> list[str]:
    ids: list[str] = []
    for doc, heading, _ in blocks:
        base = f"{doc}:{heading}"
        ids.append(base if base not in ids else f"{base}#{sum(i.startswith(base) for i in ids) + 1}")
    return ids


PYTHON_BLOCKS = _blocks("python")


def prepare(code: str, export: Path, root: Path) -> str:
    """The example with its paths replaced by the test's; an unknown path fails with its name."""
    for old, new in SUBSTITUTIONS.items():
        code = code.replace(old, new)
    for literal in sorted(set(_PATH_LITERAL.findall(code)), key=len, reverse=True):
        if literal.endswith(_IMAGE_SUFFIXES):
            target = root / Path(literal).name
            _picture("yellow").save(target)
        elif literal in PATHS:
            kind = PATHS[literal]
            target = export if kind == "export" else root / kind.removeprefix("dir:")
        else:
            raise AssertionError(
                f"the example names the path {literal!r}, which tests/test_readme_examples.py does not know: "
                "add it to PATHS (or fix the example)"
            )
        code = code.replace(f'"{literal}"', f'"{target}"').replace(f"'{literal}'", f'"{target}"')
    return code


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory, sp_model: Path) -> Path:
    # max_new_tokens far past the tiny LM's positions: left at its default, max_gen_len must shrink to the room
    # the longest prompt of a batch leaves (the README's batched example once asked for more than exist).
    return write_export(
        tmp_path_factory.mktemp("readme") / "export", sp_model, "generation.max_new_tokens=100000"
    )


@pytest.mark.parametrize(("doc", "heading", "code"), PYTHON_BLOCKS, ids=_case_ids(PYTHON_BLOCKS))
def test_python_example_runs(doc: str, heading: str, code: str, export: Path, tmp_path: Path) -> None:
    source = prepare(code, export, tmp_path)
    namespace: dict[str, Any] = {"__name__": "__readme_example__"}
    namespace.update({name: make() for name, make in GIVEN.items() if re.search(rf"\b{name}\b", source)})
    with contextlib.ExitStack() as stack:
        if SERVER_URL in source:  # a client of `python -m unified_mllm.serve`: serve the test's export there
            url = stack.enter_context(serving(export, model_name=SERVED_MODEL_NAME))
            source = source.replace(SERVER_URL, url)
        compiled = compile(source, f"<{doc}: {heading}>", "exec")
        exec(compiled, namespace)  # the project's own documentation: running it is the point


def test_unknown_path_is_refused(export: Path, tmp_path: Path) -> None:
    with pytest.raises(AssertionError, match="runs/new-example/export"):
        prepare('InferenceSolver.from_pretrained("runs/new-example/export")\n', export, tmp_path)


def test_every_document_has_its_blocks_found() -> None:
    # The README has examples; finding none would mean the extraction broke, not that all is well.
    assert any(doc == "README.md" for doc, _, _ in PYTHON_BLOCKS)


# ------------------------------------------------------------------------------------------ bash blocks

_MODULE = re.compile(r"python3? -m (unified_mllm(?:\.\w+)*)")


def _bash_modules() -> list[str]:
    return sorted({m for _, _, code in _blocks("bash") for m in _MODULE.findall(code)})


BASH_MODULES = _bash_modules()


def test_bash_blocks_name_modules() -> None:
    assert BASH_MODULES, "no `python -m unified_mllm...` found in the documents' bash blocks"


# runpy warns when the module was imported already (by the tests' own imports); harmless for --help.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("module", BASH_MODULES)
def test_bash_module_answers_help(module: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", [module, "--help"])
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as stop:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    assert stop.value.code in (0, None), f"`python -m {module} --help` exited with {stop.value.code}"
    assert "usage" in out.getvalue().lower(), f"`python -m {module} --help` printed no usage"


_REPO_FILE = re.compile(r"(?<![\w/.-])((?:scripts|configs)/[\w./-]+\w)")


def test_bash_blocks_name_existing_scripts_and_configs() -> None:
    named = {m for _, _, code in _blocks("bash") for m in _REPO_FILE.findall(code)}
    assert named, "no scripts/ or configs/ path found in the documents' bash blocks"
    missing = sorted(p for p in named if not (REPO / p).exists())
    assert not missing, f"the documents' bash blocks name files that do not exist: {missing}"
