"""``python -m unified_mllm.convert KIND SRC DST`` (``merge-lora --adapter A --output B``): see :mod:`unified_mllm.convert`."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

from unified_mllm.cli import add_debug_argument, one_line_errors
from unified_mllm.convert import KINDS
from unified_mllm.convert.common import ConversionError


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m unified_mllm.convert",
        description="Convert a published checkpoint into this codebase's format (or back).",
    )
    add_debug_argument(parser)
    kinds = parser.add_subparsers(dest="kind", required=True, metavar="KIND")
    for kind, module_name in KINDS.items():
        module = importlib.import_module(f"unified_mllm.convert.{module_name}")
        sub = kinds.add_parser(kind, help=module.HELP, description=module.HELP)
        if not getattr(module, "OWN_ARGUMENTS", False):
            sub.add_argument("src", help="the published checkpoint (directory or file)")
            sub.add_argument("dst", help="where the converted directory is written (atomically)")
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser.parse_args(argv)


def convert(argv: Sequence[str] | None = None) -> Path:
    """Parse ``argv`` (``[--debug] KIND SRC DST [options]``, or that kind's own arguments) and run that
    converter; returns what it wrote."""
    args = _parse(argv)
    return args.run(args)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    with one_line_errors((ConversionError,), debug=args.debug):
        written = args.run(args)
    print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
