"""Every progress bar of the package: tqdm on a terminal, a plain line every few percent anywhere else.

On a terminal tqdm redraws one line in place. Written to a file or a pipe (CI, ``quickstart.sh > log``) the
same redraws become thousands of carriage-return frames on one line of several thousand characters, so there
:func:`progress` prints a whole line at every ``every_percent`` of the total instead (every minute when the
total is unknown), each line tqdm's usual summary (``desc: 40%|####      | 40/100 [00:12<00:18, 3.3step/s,
loss=2.1]``).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable
from typing import IO, Any

from tqdm import tqdm

# Without a known total: one line per this many seconds.
UNKNOWN_TOTAL_INTERVAL_S = 60.0


class _Sink:
    """Takes what tqdm writes on its own (carriage returns, clearing spaces, the closing newline): nothing."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


class LineProgress(tqdm):
    """A tqdm bar that prints each refresh as a line of its own (never a carriage return), once per count."""

    def __init__(self, *args: Any, out: IO[str], **kwargs: Any) -> None:
        self._out = out
        self._shown: int | None = None
        super().__init__(*args, file=_Sink(), **kwargs)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if msg == "" or self.n == self._shown:
            return True  # a "clear" request (lines are never taken back), or this count is printed already
        self._shown = self.n
        self._out.write((msg if msg is not None else self.__str__()) + "\n")
        self._out.flush()
        return True

    def close(self) -> None:
        if not self.disable and self.n != self._shown:
            self.display()  # the final count, even when it falls between two printed percentages
        super().close()


def progress(
    iterable: Iterable[Any] | None = None,
    *,
    total: float | None = None,
    desc: str | None = None,
    unit: str = "it",
    initial: float = 0,
    disable: bool = False,
    file: IO[str] | None = None,
    every_percent: float = 5.0,
) -> tqdm:
    """A progress bar over ``iterable`` (or updated by hand, with ``total``) on ``file`` (stderr).

    On a terminal it is plain tqdm; otherwise a :class:`LineProgress` that prints a line every
    ``every_percent`` of the total (counted from ``initial``, and at the end).
    """
    out = sys.stderr if file is None else file
    options = {"total": total, "desc": desc, "unit": unit, "initial": initial, "disable": disable}
    isatty = getattr(out, "isatty", None)
    if isatty is not None and isatty():
        return tqdm(iterable, file=out, **options)
    if total is None and iterable is not None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
        options["total"] = total
    if total:
        pace = {"miniters": max(1, math.ceil(total * every_percent / 100)), "mininterval": 0.0}
    else:
        pace = {"miniters": 1, "mininterval": UNKNOWN_TOTAL_INTERVAL_S}
    # maxinterval=inf: tqdm's monitor thread would otherwise drop miniters to 1 after 10 quiet seconds.
    return LineProgress(iterable, out=out, maxinterval=math.inf, ncols=100, **pace, **options)
