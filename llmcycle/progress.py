"""One progress bar for every long loop: a live tqdm bar on a terminal, plain lines in a log.

tqdm redraws its bar with carriage returns several times a second. On a terminal that is one line; in a
file (`llmcycle run > run.log 2>&1`, CI logs) every redraw is kept, and a short run left a 95 KB log of
`\\r` frames. When the stream is not a terminal we print a whole line now and then instead.
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm

LOG_INTERVAL_S = 30.0  # one plain line at most this often when not on a terminal


class LineProgress(tqdm):
    """tqdm that writes each update as a full line (no `\\r`, no cursor moves), for logs and pipes."""

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if msg != "":  # "" is tqdm asking to erase the bar: nothing to erase in a log
            self.fp.write((str(self) if msg is None else msg) + "\n")
            self.fp.flush()
        return True

    def clear(self, nolock: bool = False) -> None:
        """Nothing on screen to clear before `bar.write(...)`."""

    def moveto(self, n: int) -> None:
        """No cursor in a log."""

    def refresh(self, nolock: bool = False, lock_args: Any = None) -> bool:
        # tqdm redraws with nolock=True after every bar.write() and from its monitor thread; in a log
        # that would repeat the progress line after each message. Only update() and __init__ print one.
        if nolock:
            return False
        return super().refresh(nolock=nolock, lock_args=lock_args)

    def close(self) -> None:
        if self.disable:
            return
        self.display()  # the final numbers, once, on a line of their own
        self.disable = True
        self._decr_instances(self)


def is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # replaced or closed streams
        return False


def progress(*, disable: bool = False, file: Any = None, **kwargs: Any) -> tqdm:
    """A progress bar (tqdm's keyword arguments) on `file` (default stderr): tqdm's live bar on a terminal,
    `LineProgress` elsewhere, which prints a plain line at most every LOG_INTERVAL_S seconds."""
    file = file if file is not None else sys.stderr
    if is_terminal(file):
        return tqdm(file=file, disable=disable, dynamic_ncols=True, **kwargs)
    return LineProgress(file=file, disable=disable, mininterval=LOG_INTERVAL_S, **kwargs)
