"""Where the ``sand`` command's messages go: a one-line console, a complete log file.

Why: a user who made a fixable mistake should read one line, not tracebacks. Prefect
logs every failed flow and task run with its traceback, once per nesting level, and
sends the records through the root logger (Prefect keeps its own console handler off
the root when one is already configured). So the console handler drops Prefect's
exception records and prints every other record without its traceback; the log file
under ``<data-root>/logs`` receives everything, tracebacks included, and the CLI's
``error:`` line names it. Records logged before the data root is known are held in
memory and written to the file once it opens.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
import tempfile
import time
from pathlib import Path

CONSOLE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FILE_FORMAT = "%(asctime)s %(levelname)s %(process)d %(threadName)s %(name)s: %(message)s"
#: Loggers whose exception records repeat the failure the CLI reports in its one line.
_REPORTED_ELSEWHERE = ("prefect",)
_QUIET = ("httpx", "httpcore")
KEEP_LOGS = 100  # newest run logs kept per directory  # one line per Prefect API call drowns the pipeline's own log


class _ConsoleFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and record.name.startswith(_REPORTED_ELSEWHERE))


class _OneLineFormatter(logging.Formatter):
    """The record's message only: tracebacks belong in the log file."""

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None
        try:
            return super().format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


def _console_level() -> int:
    name = os.environ.get("SAND_LOG_LEVEL", "INFO").upper()
    level = logging.getLevelName(name)
    return level if isinstance(level, int) else logging.INFO


class RunLog:
    """The console handler and this run's log file (opened once the data root is known)."""

    def __init__(self) -> None:
        self.path: Path | None = None
        self.installed = False  # only the console entry point installs it (not CliRunner, not tests)
        self._file: logging.Handler | None = None
        self._buffer = logging.handlers.MemoryHandler(capacity=100_000, flushLevel=logging.CRITICAL + 1)
        self._exceptions = logging.getLogger("sand.cli.exceptions")  # file only, see record_exception
        self._exceptions.propagate = False

    def install(self) -> None:
        """Console on stderr (level from SAND_LOG_LEVEL, default INFO), file level INFO or lower."""
        console_level = _console_level()
        console = logging.StreamHandler(sys.stderr)
        console.setLevel(console_level)
        console.addFilter(_ConsoleFilter())
        console.setFormatter(_OneLineFormatter(CONSOLE_FORMAT))
        root = logging.getLogger()
        root.setLevel(min(console_level, logging.INFO))
        root.addHandler(console)
        root.addHandler(self._buffer)
        for noisy in _QUIET:
            logging.getLogger(noisy).setLevel(logging.WARNING)
        self.installed = True

    def open(self, data_root: Path | None, writable: bool = True) -> Path | None:
        """Start this run's log file: ``<data-root>/logs`` or, when that cannot be written, the temp dir."""
        if self.path is not None or not self.installed:
            return self.path
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        name = f"sand-{stamp}-{os.getpid()}.log"
        candidates = [Path(data_root) / "logs"] if data_root is not None and writable else []
        candidates.append(Path(tempfile.gettempdir()) / "sand-logs")
        for directory in candidates:
            try:
                directory.mkdir(parents=True, exist_ok=True)
                handler = logging.FileHandler(directory / name, encoding="utf-8")
            except OSError:
                continue
            handler.setFormatter(logging.Formatter(FILE_FORMAT))
            self._file, self.path = handler, directory / name
            break
        else:
            return None  # nowhere to write: the console line is all there is
        for stale in sorted(self.path.parent.glob("sand-*.log"))[:-KEEP_LOGS]:
            stale.unlink(missing_ok=True)
        root = logging.getLogger()
        self._buffer.setTarget(self._file)
        self._buffer.flush()
        root.removeHandler(self._buffer)
        root.addHandler(self._file)
        self._exceptions.addHandler(self._file)
        return self.path

    def record_exception(self, err: BaseException) -> Path | None:
        """Write ``err`` with its traceback to the log file (opened in the temp dir if need be)."""
        if self.open(None, writable=False) is None:
            return None
        self._exceptions.error("sand failed: %s: %s", type(err).__name__, err, exc_info=err)
        self._file.flush()
        return self.path


RUN_LOG = RunLog()
