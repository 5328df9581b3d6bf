"""How every command-line entry point ends on the project's own errors: one ``error: ...`` line, exit code 1.

Bad input (a missing file, an unknown config key, a corrupt shard, a crafted pickle, ...) is the user's to fix,
and a traceback only hides the one sentence that says what to fix; a bug (any other exception) keeps its
traceback. ``UMLLM_DEBUG=1`` in the environment, or ``--debug`` where the entry point has it, lets the
project's errors through with their traceback too. Under torchrun every rank that fails prints its own line.

This module imports nothing of the project (config.py's own command line uses it): each entry point names the
error classes it reports, :data:`BASE_ERRORS` is added to them.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from contextlib import contextmanager

DEBUG_ENV = "UMLLM_DEBUG"

# Reported by every entry point: a path the user named that is not there.
BASE_ERRORS: tuple[type[BaseException], ...] = (FileNotFoundError,)


def debug_enabled(flag: bool = False) -> bool:
    """``--debug`` given, or ``UMLLM_DEBUG`` set to anything but empty/0."""
    return flag or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")


def add_debug_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--debug", action="store_true", help=f"show the traceback of an error (or set {DEBUG_ENV}=1)"
    )


def error_line(exc: BaseException) -> str:
    """``error: <message>`` on one line. A multi-line message is joined with ``; `` rather than cut to its
    first line: some messages list one cause a line (every checkpoint that failed to load, and why), and each
    of those is what the user has to read; one line keeps the last line of stderr the whole story."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    # OSError's str without a message (FileNotFoundError(path)) is still its repr-ish text: never empty
    return "error: " + ("; ".join(lines) or type(exc).__name__)


@contextmanager
def one_line_errors(errors: tuple[type[BaseException], ...] = (), *, debug: bool = False) -> Iterator[None]:
    """Turn ``errors`` (and :data:`BASE_ERRORS`) raised in the block into ``SystemExit("error: ...")``:
    Python prints that one line to stderr and exits with code 1, and in-process callers (tests) can match the
    message. With ``debug`` or ``UMLLM_DEBUG`` they propagate unchanged; other exceptions always do."""
    try:
        yield
    except (*BASE_ERRORS, *errors) as exc:
        if debug_enabled(debug):
            raise
        # the chain stays for in-process callers; the interpreter prints only the message of a SystemExit
        raise SystemExit(error_line(exc)) from exc
