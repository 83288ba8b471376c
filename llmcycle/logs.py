"""How llmcycle says what it is doing: Python `logging`, one logger per module under `llmcycle`.

Library code logs with `log = logging.getLogger(__name__)` (`llmcycle.data.run`, `llmcycle.card`, ...):
progress at INFO, a problem that does not stop the work at WARNING. Importing llmcycle configures nothing,
so a program that uses it as a library sees its warnings (Python's last-resort handler, on stderr) and
none of its progress until it asks: `logging.basicConfig(level=logging.INFO)`, or `setup_logging()`
for the CLI's look. To silence it: `logging.getLogger("llmcycle").setLevel(logging.ERROR)`.

The CLI calls `setup_logging()` once, in `main`: INFO lines go to stdout as the bare message (what the
commands printed before they logged), WARNING and above to stderr. What a command produces (a table,
JSON, the generated text) is printed, not logged: it is the command's output, not news about its work.

Under torchrun every process runs the same code; a training `Session` makes the other processes
(rank > 0) drop `llmcycle` progress below WARNING while it is open (`quiet_unless_main`), so the run's
progress is reported once.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

ROOT = "llmcycle"


class StreamAtEmit(logging.Handler):
    """Writes each record to `sys.<name>` as it is when the record is emitted, not when the handler was
    made, so redirected or captured streams (pytest's capsys, contextlib.redirect_stdout) get it."""

    def __init__(self, name: str, below: int | None = None) -> None:
        super().__init__()
        self.stream_name = name
        if below is not None:  # the stdout handler leaves warnings to the stderr one
            self.addFilter(lambda record: record.levelno < below)
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = getattr(sys, self.stream_name)
            stream.write(self.format(record) + "\n")
            stream.flush()
        except RecursionError:
            raise
        except BrokenPipeError:
            raise  # the CLI turns a reader that went away into exit 141, as for print
        except Exception:
            self.handleError(record)


def setup_logging(level: int = logging.INFO) -> logging.Logger:
    """Send the `llmcycle` loggers' records at `level` and above to stdout (below WARNING) and stderr (the
    rest), as plain messages. Idempotent: calling it again replaces the handlers it installed before."""
    logger = logging.getLogger(ROOT)
    for h in [h for h in logger.handlers if isinstance(h, StreamAtEmit)]:
        logger.removeHandler(h)
    errors = StreamAtEmit("stderr")
    errors.setLevel(logging.WARNING)
    logger.addHandler(StreamAtEmit("stdout", below=logging.WARNING))
    logger.addHandler(errors)
    logger.setLevel(level)
    return logger


def quiet_unless_main(is_main: bool) -> Callable[[], None]:
    """On a process other than the main one (rank 0 of a distributed run), raise the `llmcycle` loggers to
    WARNING until the returned function is called, which restores them; on the main process, nothing."""
    logger = logging.getLogger(ROOT)
    if is_main:
        return lambda: None
    before = logger.level
    logger.setLevel(max(logging.WARNING, logger.getEffectiveLevel()))
    return lambda: logger.setLevel(before)
