"""Rules of the test suite itself: no test module imports another; shared plain helpers live in
tests/helpers.py and fixtures in tests/conftest.py."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
SHARED = "helpers"  # the one module of tests/ that the others may import


def imported_modules(path: Path) -> list[str]:
    """Every module ``path`` imports, at any depth (imports inside functions count); relative ones keep
    their leading dots, and ``from . import x`` gives ``.x``."""
    found: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level and not node.module:
            found += ["." * node.level + alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append("." * node.level + (node.module or ""))
    return found


def suite_module(module: str, siblings: set[str]) -> str | None:
    """The module of tests/ that an import of ``module`` loads (as ``tests.x``, a bare sibling ``x`` or a
    relative ``.x``), ``""`` for the ``tests`` package itself, None for a module outside the suite."""
    parts = module.lstrip(".").split(".")
    if module.startswith("."):
        return parts[0]
    if parts[0] == "tests":
        return parts[1] if len(parts) > 1 else ""
    return parts[0] if parts[0] in siblings else None


def test_no_test_module_imports_another() -> None:
    siblings = {p.stem for p in TESTS.glob("*.py")}
    offending = [
        f"{path.name} imports {module}"
        for path in sorted(TESTS.glob("*.py"))
        for module in imported_modules(path)
        if suite_module(module, siblings) not in (None, SHARED)
    ]
    assert not offending, "move what they share to tests/helpers.py or a conftest.py fixture: " + "; ".join(
        offending
    )


def test_the_rule_sees_every_form_of_import(tmp_path: Path) -> None:
    source = tmp_path / "test_example.py"
    source.write_text(
        "import torch\n"
        "import tests.test_layout\n"
        "from tests.conftest import WORDS\n"
        "from tests import test_dataset\n"
        "from . import test_solver\n"
        "from .test_trainer import overrides\n"
        "from tests.helpers import TOKENS\n"
        "from unified_mllm.layout import SpecialTokens\n"
        "def f():\n"
        "    from test_quickstart import MICRO\n"
    )
    siblings = {"conftest", "helpers", "test_layout", "test_quickstart", "test_solver", "test_trainer"}
    found = {m: suite_module(m, siblings) for m in imported_modules(source)}
    assert found == {
        "torch": None,
        "tests.test_layout": "test_layout",
        "tests.conftest": "conftest",
        "tests": "",
        ".test_solver": "test_solver",
        ".test_trainer": "test_trainer",
        "tests.helpers": "helpers",
        "unified_mllm.layout": None,
        "test_quickstart": "test_quickstart",
    }
