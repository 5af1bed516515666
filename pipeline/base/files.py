"""Atomic file writes and streaming sha256.

A file a killed process left half-written must never be read as complete: every write goes to a temporary file in the
*same directory* (so ``os.replace`` is an atomic rename), is fsynced, then replaces the target; on failure the temporary
file is removed and the target left as it was. Hashing reads in chunks: inputs are multi-GB dumps and weights."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

HASH_CHUNK = 1 << 20


def _fsync(path: str) -> None:
    """Flush a file the writer closed (np.save, torch.save, pandas write by name, not by handle)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: Path | str, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (its parent created) that replaces ``path`` when the block ends without
    error, for writers that want a file name (``np.save``, ``torch.save``, ``DataFrame.to_csv``). ``suffix`` keeps an
    extension a writer insists on (``np.save`` appends ``.npy`` to a name without it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: Path | str, data: bytes) -> Path:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
    return Path(path)


def write_text_atomic(path: Path | str, text: str, encoding: str = "utf-8") -> Path:
    return write_bytes_atomic(path, text.encode(encoding))


def write_json_atomic(path: Path | str, obj: Any, *, indent: int = 2, sort_keys: bool = True) -> Path:
    """Write ``obj`` as JSON atomically (non-JSON values through ``str``); returns ``path``."""
    return write_text_atomic(path, json.dumps(obj, indent=indent, sort_keys=sort_keys, default=str))


def file_digest(path: Path | str, chunk_size: int = HASH_CHUNK) -> hashlib._Hash:
    """The sha256 object of a file's bytes, read ``chunk_size`` bytes at a time; unfinished, so a caller can keep
    feeding it (a resumed download appends)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(chunk_size), b""):
            digest.update(chunk)
    return digest


def sha256_file(path: Path | str, chunk_size: int = HASH_CHUNK) -> str:
    return file_digest(path, chunk_size).hexdigest()
