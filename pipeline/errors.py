"""User-facing errors.

Every problem a user can fix (bad input file, wrong config value, dead URL) is
raised as a :class:`SandError` whose message is one line naming the
file/field/value. The CLI prints that line and exits non-zero, so nobody has to
read a traceback to learn what to fix.
"""

from __future__ import annotations


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
