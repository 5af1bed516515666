"""Where the ``sand`` command's messages go: a one-line console, a complete log file. Why: a user who made a fixable
mistake should read one line, not tracebacks, and Prefect logs every failed flow and task run with its traceback, once
per nesting level, through the root logger (its own console handler stays off a configured root). So the console drops
Prefect's exception records and prints the others without traceback, through ``tqdm.write`` so never mid-bar; the log
file under ``<data-root>/logs`` gets INFO and up with tracebacks, and the ``error:`` line names it (records logged
before the data root is known wait in memory)."""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from sand.pipeline.base.errors import ConfigError

CONSOLE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FILE_FORMAT = "%(asctime)s %(levelname)s %(process)d %(threadName)s %(name)s: %(message)s"
#: Loggers whose exception records repeat the failure the CLI reports in its one line.
_REPORTED_ELSEWHERE = ("prefect",)
_QUIET = ("httpx", "httpcore")  # one line per Prefect API call drowns the pipeline's own log
KEEP_LOGS = 100  # newest run logs kept per directory
QUIET, NORMAL, VERBOSE = logging.WARNING, logging.INFO, logging.DEBUG


def requested_level(quiet: bool, verbose: bool) -> int | None:
    """The console level ``--quiet``/``--verbose`` ask for; ``None``: SAND_LOG_LEVEL's (default INFO)."""
    if quiet and verbose:
        raise ConfigError("--quiet and --verbose contradict each other: choose one")
    return QUIET if quiet else VERBOSE if verbose else None


def prefect_console_level(level: int) -> int:
    """Prefect's lines on the console: WARNING and up, INFO with --verbose. Why: its two INFO lines per stage sub-flow
    ("Beginning subflow run ...", "Finished in state Completed()") repeat the stage's own line; they stay in the log
    file and the UI. Prefect's DEBUG (every API call) never reaches the console: PREFECT_LOGGING_LEVEL is its knob."""
    return logging.INFO if level <= VERBOSE else max(level, logging.WARNING)


class _ConsoleFilter(logging.Filter):
    """Prefect's records pass above their own threshold and never with a traceback."""

    prefect_level = prefect_console_level(NORMAL)

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.name.startswith(_REPORTED_ELSEWHERE) or (
            not record.exc_info and record.levelno >= self.prefect_level)


class ProgressAwareHandler(logging.StreamHandler):
    """Writes through ``tqdm.write``, under tqdm's lock: bars cleared, the line printed, bars redrawn."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)


class _OneLineFormatter(logging.Formatter):
    """The record's message only: tracebacks belong in the log file."""

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None
        try:
            return super().format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


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
        self._filter = _ConsoleFilter()
        self._console = ProgressAwareHandler(sys.stderr)
        self._console.addFilter(self._filter)
        self._console.setFormatter(_OneLineFormatter(CONSOLE_FORMAT))
        root = logging.getLogger()
        root.setLevel(logging.INFO)
        root.addHandler(self._console)
        root.addHandler(self._buffer)
        for noisy in _QUIET:
            logging.getLogger(noisy).setLevel(logging.WARNING)
        self.installed = True
        level = logging.getLevelName(os.environ.get("SAND_LOG_LEVEL", "INFO").upper())
        self.set_level(level if isinstance(level, int) else logging.INFO)

    def set_level(self, level: int | None) -> None:
        """Console verbosity (``None``: keep SAND_LOG_LEVEL's). DEBUG applies to sand's own loggers only: other
        libraries' DEBUG (PIL, matplotlib, asyncio) is noise even when debugging sand."""
        if not self.installed or level is None:
            return
        self._console.setLevel(level)
        self._filter.prefect_level = prefect_console_level(level)
        logging.getLogger("sand").setLevel(logging.DEBUG if level <= VERBOSE else logging.NOTSET)

    def open(self, data_root: Path | None, writable: bool = True) -> Path | None:
        """Start this run's log file: ``<data-root>/logs`` or, when that cannot be written, the temp dir."""
        if self.path is not None or not self.installed:
            return self.path
        name = f"sand-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{os.getpid()}.log"
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
        self._buffer.setTarget(self._file)
        self._buffer.flush()
        logging.getLogger().removeHandler(self._buffer)
        logging.getLogger().addHandler(self._file)
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
