"""Logging and whole-grid progress.

The library logs to the package logger ``robustbench_med`` (and its children, ``logging.getLogger(__name__)``) and never
configures the root logger: as the Python logging HOWTO asks of libraries, it only adds a ``NullHandler`` to its own
logger. The command line calls :func:`configure_logging` once (``--verbose`` / ``--quiet``).

:class:`GridProgress` is the one progress display of a grid run: a tqdm bar that stays on a terminal (cells done of the
grid's cells, rate, ETA, and the victim × defence × attack running now), and on a non-terminal (CI logs) no bar but an
INFO line every :data:`LOG_EVERY_SECONDS` with the same content.
"""
from __future__ import annotations

import logging
import sys
import time
from typing import IO, Any, Callable

LOGGER_NAME = "robustbench_med"
LOG_EVERY_SECONDS = 30.0  # non-terminal progress: one INFO line at most this often (and one at the end)
QUIET, NORMAL, VERBOSE = -1, 0, 1

logger = logging.getLogger(LOGGER_NAME)
logger.addHandler(logging.NullHandler())


class TqdmHandler(logging.StreamHandler):
    """A stream handler that writes through ``tqdm.write`` so a log line does not garble an active progress bar; the
    stream is looked up on every record (``sys.stderr`` by default), so redirected streams are honoured."""

    def __init__(self, stream: Callable[[], IO[str]] | None = None):
        super().__init__()
        self._stream = stream or (lambda: sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=self._stream())
        except Exception:  # pragma: no cover - the logging module's own contract: never raise from emit
            self.handleError(record)


def configure_logging(verbosity: int = NORMAL) -> logging.Handler:
    """For the command line only: one stderr handler on the root logger (replacing the one an earlier call added),
    warnings of other libraries, and ``robustbench_med`` at WARNING (``QUIET``), INFO (``NORMAL``) or DEBUG
    (``VERBOSE``). Returns the handler."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, TqdmHandler)]:
        root.removeHandler(old)
    handler = TqdmHandler()
    fmt = "%(levelname)s %(name)s: %(message)s" if verbosity >= VERBOSE else "robustbench-med: %(message)s"
    handler.setFormatter(logging.Formatter(fmt))
    root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > logging.WARNING:
        root.setLevel(logging.WARNING)
    level = logging.DEBUG if verbosity >= VERBOSE else logging.WARNING if verbosity <= QUIET else logging.INFO
    logger.setLevel(level)
    return handler


def is_terminal(stream: Any) -> bool:
    """Whether ``stream`` is an interactive terminal (a bar there; log lines elsewhere)."""
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class GridProgress:
    """Whole-grid progress: ``total`` cells, the cell running now, elapsed time and ETA.

    ``enabled=False`` shows nothing (``--quiet``). On a terminal ``stream`` it is a tqdm bar that stays after the run
    (inner bars use ``position=1, leave=False`` below it); elsewhere it logs an INFO line on ``robustbench_med.progress``
    when work starts, every :data:`LOG_EVERY_SECONDS` and at the end.
    """

    def __init__(self, total: int, desc: str, *, enabled: bool = True, stream: IO[str] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.total, self.desc, self.done, self.now = total, desc, 0, ""
        self.enabled, self._clock = enabled, clock
        self._start = self._last_log = clock()
        self._logged_once = False
        self.log = logging.getLogger(f"{LOGGER_NAME}.progress")
        stream = stream if stream is not None else sys.stderr
        self.bar: Any = None
        if enabled and is_terminal(stream):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="cell", position=0, leave=True, dynamic_ncols=True, file=stream)

    def running(self, what: str) -> None:
        """Name what runs now (``victim × defence × attack``; ``victim × defence`` while clean passes and fitting)."""
        self.now = what
        self.log.debug("%s: running %s", self.desc, what)
        if self.bar is not None:
            self.bar.set_postfix_str(what)
        elif self.enabled and not self._logged_once:
            self._log_line()

    def advance(self, cells: int) -> None:
        """Count ``cells`` as done (computed, resumed or skipped)."""
        self.done += cells
        if self.bar is not None:
            self.bar.update(cells)
        elif self.enabled and self._clock() - self._last_log >= LOG_EVERY_SECONDS:
            self._log_line()

    def eta(self) -> float | None:
        """Seconds left at the mean rate so far (None before the first cell is done)."""
        if self.done <= 0:
            return None
        return (self._clock() - self._start) / self.done * max(0, self.total - self.done)

    def line(self) -> str:
        """``grid X: 3/9 cells (33%), 0:12 elapsed, ETA 0:24; running V × D × A``."""
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        eta = self.eta()
        text = (f"{self.desc}: {self.done}/{self.total} cells{pct}, {_clock(self._clock() - self._start)} elapsed"
                + (f", ETA {_clock(eta)}" if eta is not None and self.done < self.total else ""))
        return text + (f"; running {self.now}" if self.now and self.done < self.total else "")

    def _log_line(self) -> None:
        self._last_log, self._logged_once = self._clock(), True
        self.log.info(self.line())

    def close(self) -> None:
        """Leave the bar on screen (terminal) or log the final line (elsewhere)."""
        if self.bar is not None:
            self.bar.set_postfix_str("", refresh=False)
            self.bar.close()
        elif self.enabled:
            self._log_line()
