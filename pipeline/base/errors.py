"""User-facing errors: every problem a user can fix (bad input file, wrong config value, dead URL) is a
:class:`SandError` whose message is one line naming the file/field/value. The CLI prints that line and exits non-zero,
so nobody has to read a traceback to learn what to fix."""

from __future__ import annotations

#: Longest message :func:`one_line` keeps (a stack of chained reasons stays readable).
ONE_LINE_MAX = 300


class SandError(Exception):
    """A problem the user can fix; ``str(err)`` is the one-line explanation."""

    exit_code = 2


class ConfigError(SandError):
    """An invalid configuration value (names the field and the value)."""


class DataError(SandError):
    """Malformed or unusable input data (names the file, line and field)."""


class DownloadError(SandError):
    """A URL that cannot be fetched after the allowed retries."""


class StageError(SandError):
    """A stage that cannot run because an input artifact or file is missing."""


def one_line(err: BaseException | str, *, with_type: bool = False, limit: int | None = ONE_LINE_MAX) -> str:
    """The first non-blank line of an error's message, whitespace collapsed, at most ``limit`` characters (None: all),
    as the CLI's ``error:`` line, stage errors quoting a library and a grid's failure column show a foreign exception.
    No message gives the type's name; ``with_type`` prefixes the type (``"OSError: disk full"``)."""
    text = err if isinstance(err, str) else str(err)
    first = next((" ".join(line.split()) for line in text.splitlines() if line.strip()), "")
    if not isinstance(err, str):
        name = type(err).__name__
        first = f"{name}: {first}" if with_type and first else first or name
    return first if limit is None or len(first) <= limit else first[: limit - 3] + "..."
