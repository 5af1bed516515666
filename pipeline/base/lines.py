"""Bounded reading of untrusted line files: gzip or plain, one line at a time, never one line whole.

Why a base-layer module: resolving a source (``acquire``) sniffs a file's first lines and the dataset readers
(``dataset``) read all of them; both need the same guarded iteration and the same safe parse of 2014's Python-literal
lines. Memory is bounded whatever the input: an over-long line is read and dropped in chunks, never held whole;
``literal_eval`` only sees lines with a bounded number of tokens; a gzip stream that inflates far beyond any real dump
(a "gzip bomb" of blank lines or one endless line) is refused in one line."""

from __future__ import annotations

import ast
import contextlib
import gzip
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from sand.pipeline.base.errors import DataError

_GZIP_MAGIC = b"\x1f\x8b"
#: Default longest line (bytes, newline excluded). Real 2014-2023 dump lines are under 100 KB.
DEFAULT_MAX_LINE_BYTES = 4 << 20
#: Over-long lines are discarded in chunks of this size, so they never sit in memory whole.
_DISCARD_CHUNK = 1 << 20
#: Real dumps inflate 4-10x; a gzip inflating more than this many times (once past the floor) is a bomb.
_MAX_INFLATION = 200
_INFLATION_FLOOR = 16 << 20
#: Most brackets, commas, colons and signs a Python literal line may hold before literal_eval sees it:
#: real 2014 meta lines hold a few hundred; 50k bounds literal_eval's syntax tree to tens of MB.
_MAX_LITERAL_TOKENS = 50_000
_LITERAL_TOKENS = tuple(bytes([c]) for c in b",:[]{}()+-")


class DirtyLine(Exception):
    """A dirty record: reason is the counted category, detail the offending value."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


def iter_lines(path: Path, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> Iterator[tuple[int, bytes | None]]:
    """Yield (1-based line number, raw line) from a gzip or plain file (detected by magic bytes); a line longer than
    ``max_line_bytes`` (newline excluded) as ``None``. A gzip stream inflating over ``_MAX_INFLATION`` times its
    compressed size (checked once past ``_INFLATION_FLOOR``) is a :class:`DataError`: nothing real compresses so, and a
    few MB of blank lines could keep a reader busy for hours."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        raw = open(path, "rb")  # noqa: SIM115 - closed by the with block below
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror})") from None
    with raw:
        magic = raw.read(2)
        if not magic:
            raise DataError(f"{path}: file is empty")
        raw.seek(0)
        gz = gzip.GzipFile(fileobj=raw, mode="rb") if magic == _GZIP_MAGIC else None
        fh = gz if gz is not None else raw
        guard = _InflationGuard(path, raw) if gz is not None else None
        lineno = 0
        try:
            while True:
                line = fh.readline(max_line_bytes + 1)
                if not line:
                    return
                lineno += 1
                if guard is not None:
                    guard.add(len(line), lineno)
                if len(line) > max_line_bytes and line[-1:] != b"\n":  # no newline within the limit
                    del line
                    _discard_rest_of_line(fh, guard, lineno)
                    yield lineno, None
                else:
                    yield lineno, line
        except (EOFError, gzip.BadGzipFile, zlib.error) as err:
            raise DataError(f"{path}: truncated gzip or corrupt gzip after line {lineno} "
                            f"(cannot read: {err})") from None
        finally:
            if gz is not None:
                gz.close()


def _discard_rest_of_line(fh: Any, guard: _InflationGuard | None, lineno: int) -> None:
    while True:
        chunk = fh.readline(_DISCARD_CHUNK)
        if guard is not None:
            guard.add(len(chunk), lineno)
        if not chunk or chunk[-1:] == b"\n":
            return


class _InflationGuard:
    """Counts inflated bytes against compressed bytes read; raises on a gzip bomb."""

    def __init__(self, path: Path, raw: Any) -> None:
        self.path, self.raw = path, raw
        self.inflated, self.next_check = 0, _INFLATION_FLOOR

    def add(self, n: int, lineno: int) -> None:
        self.inflated += n
        if self.inflated < self.next_check:
            return
        self.next_check = self.inflated + _INFLATION_FLOOR
        compressed = max(1, self.raw.tell())
        if self.inflated > _MAX_INFLATION * compressed:
            raise DataError(f"{self.path}:{lineno}: {self.inflated} bytes inflated from {compressed} compressed "
                            f"(over {_MAX_INFLATION}x, no real dump compresses so well): refusing a gzip bomb")


def parse_literal_line(line: bytes) -> Any:
    """2014 metadata: Python literals. JSON first (fast path), then ast.literal_eval (never eval), but only after a
    cheap token count: ``literal_eval`` builds a full syntax tree, so too many tokens is a counted skip."""
    with contextlib.suppress(orjson.JSONDecodeError):
        return orjson.loads(line)
    tokens = sum(line.count(t) for t in _LITERAL_TOKENS)
    if tokens > _MAX_LITERAL_TOKENS:
        raise DirtyLine("Python literal too complex", f"({tokens} brackets/commas/signs)")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise DirtyLine("not UTF-8") from None
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        raise DirtyLine("malformed Python literal") from None
