"""A per-item vector cache shared by the text and image feature stages.

Why: both stages encode items one vector each with a slow model, and a new filter, split or data snapshot mostly
re-asks for vectors computed before. Layout: ``<cache root>/<identity[:32]>/chunk-*.npz``, one directory per encoder
identity (model, weights, settings that change bits), each chunk holding ``keys`` (sha256 of identity + item content)
and ``vectors``. Chunks are written atomically and named by their keys, so concurrent writers (threads, processes, Dask
workers) at worst write identical bytes twice; a chunk whose zip CRC fails is deleted and its vectors recomputed; a
used chunk's modification time is refreshed, so ``sand cache prune --older-than`` drops what no recent run asked for."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sand.pipeline.base.files import atomic_path, write_bytes_atomic

log = logging.getLogger(__name__)

#: What a damaged chunk raises on reading (zip CRC, truncated archive, bad npy header).
_UNREADABLE = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile)
#: A human-readable record of what a directory's identity stands for (``sand cache info``).
IDENTITY_FILE = "identity.json"


def content_key(identity: str, content: str) -> str:
    return hashlib.sha256(f"{identity}\n{content}".encode()).hexdigest()


class FeatureCache:
    """Append-only per-item vector cache: ``<root>/<identity[:32]>/chunk-*.npz`` (keys + vectors)."""

    def __init__(self, root: Path, identity: str) -> None:
        self.dir = Path(root) / identity[:32]

    def describe(self, what: Mapping[str, object]) -> None:
        """Record what this identity stands for (once), so a size report can name it."""
        path = self.dir / IDENTITY_FILE
        if not path.exists():
            write_bytes_atomic(path, json.dumps(dict(what), indent=1, sort_keys=True).encode())

    def _drop(self, chunk: Path | str, err: BaseException) -> None:
        """A chunk that cannot be read is skipped; one whose content is damaged is also deleted."""
        if isinstance(err, OSError):  # e.g. permissions: the file may be fine
            log.warning("%s: unreadable feature cache chunk skipped, its vectors are recomputed (%s)", chunk, err)
            return
        log.warning("%s: corrupted feature cache chunk deleted, its vectors are recomputed (%s)", chunk, err)
        with contextlib.suppress(OSError):  # a read-only cache: skipping it is enough
            Path(chunk).unlink(missing_ok=True)

    def index(self, keys: set[str]) -> dict[str, str]:
        """key -> chunk file for the cached ``keys``, reading only key lists: a sharded run indexes the cache once and
        sends each shard only its own keys' chunk names, instead of every shard reading every chunk."""
        return {k: c for k, c in self.index_all().items() if k in keys} if keys else {}

    def index_all(self) -> dict[str, str]:
        """key -> chunk file for every cached key (for a caller that learns its keys as it goes)."""
        found: dict[str, str] = {}
        for chunk in sorted(self.dir.glob("chunk-*.npz")):  # none when the directory does not exist
            try:
                with np.load(chunk, allow_pickle=False) as z:
                    ckeys = z["keys"]
            except _UNREADABLE as err:
                self._drop(chunk, err)
                continue
            for key in ckeys.tolist():
                found.setdefault(key, str(chunk))
        return found

    def load(self, index: Mapping[str, str]) -> dict[str, np.ndarray]:
        """The vectors named by an :meth:`index`; a chunk found corrupted is deleted and its keys left out."""
        by_chunk: dict[str, set[str]] = {}
        for key, chunk in index.items():
            by_chunk.setdefault(chunk, set()).add(key)
        found: dict[str, np.ndarray] = {}
        for chunk, wanted in sorted(by_chunk.items()):
            try:
                with np.load(chunk, allow_pickle=False) as z:
                    ckeys, vecs = z["keys"], z["vectors"]
                if vecs.ndim != 2 or len(ckeys) != len(vecs):
                    raise ValueError(f"keys {ckeys.shape} vs vectors {vecs.shape}")
            except _UNREADABLE as err:
                self._drop(chunk, err)
                continue
            with contextlib.suppress(OSError):  # "recently used", for prune; a read-only cache still works
                os.utime(chunk)
            for i, key in enumerate(ckeys.tolist()):
                if key in wanted and key not in found:
                    found[key] = vecs[i]
        return found

    def lookup(self, keys: set[str]) -> dict[str, np.ndarray]:
        """Vectors for those of ``keys`` that are cached (corrupted chunks dropped, see :meth:`load`)."""
        return self.load(self.index(keys))

    def append(self, keys: Sequence[str], vectors: np.ndarray) -> Path:
        """Write one chunk atomically (temp file + rename): a crash never leaves half a chunk."""
        name = hashlib.sha256("\n".join(keys).encode()).hexdigest()[:24]
        final = self.dir / f"chunk-{name}.npz"
        with atomic_path(final) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, keys=np.asarray(list(keys), dtype="<U64"), vectors=vectors.astype(np.float32))
        return final


@dataclass(frozen=True)
class CacheUsage:
    """Files and bytes under one cache directory, and the age of its newest and oldest file."""

    name: str
    files: int
    bytes: int
    oldest: float | None  # modification times (epoch seconds)
    newest: float | None
    identity: dict | None = None  # what a feature-cache identity directory stands for


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and p.name != IDENTITY_FILE]


def _usage_row(root: Path, folder: Path, identity: dict | None = None) -> CacheUsage:
    stats = [f.stat() for f in _files(folder)]
    return CacheUsage(name=folder.relative_to(root).as_posix(), files=len(stats), bytes=sum(s.st_size for s in stats),
                      oldest=min((s.st_mtime for s in stats), default=None),
                      newest=max((s.st_mtime for s in stats), default=None), identity=identity)


def _caches(root: Path, names: Sequence[str] | None = None) -> list[Path]:
    dirs = root.iterdir() if root.is_dir() else ()
    return sorted(p for p in dirs if p.is_dir() and (names is None or p.name in names))


def usage(cache_root: Path) -> list[CacheUsage]:
    """One row per cache (``images``, ``text``, ``image_features``), then one per described identity in it."""
    root = Path(cache_root)
    rows: list[CacheUsage] = []
    for cache in _caches(root):
        rows.append(_usage_row(root, cache))
        for marker in sorted(cache.rglob(IDENTITY_FILE)):
            try:
                identity = json.loads(marker.read_text())
            except (OSError, ValueError):
                identity = None
            rows.append(_usage_row(root, marker.parent, identity))
    return rows


def prune(cache_root: Path, older_than_s: float, names: Sequence[str] | None = None,
          dry_run: bool = False) -> tuple[int, int]:
    """Delete the files of caches ``names`` (None: all) unused for ``older_than_s`` seconds; returns (files, bytes).
    Safe beside a running stage: every cache here is content-addressed, so a deleted file only costs recomputing it."""
    cutoff = time.time() - float(older_than_s)
    n = size = 0
    for cache in _caches(Path(cache_root), names):
        for f in _files(cache):
            with contextlib.suppress(FileNotFoundError):  # removed meanwhile by another pruner
                st = f.stat()
                if st.st_mtime < cutoff:
                    if not dry_run:
                        f.unlink()
                    n += 1
                    size += st.st_size
    return n, size
