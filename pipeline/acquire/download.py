"""Fetch one raw file (http(s) URL, ``file://`` URL or local path) into a directory. Why: the Amazon dumps are hundreds
of MB to GB on slow academic mirrors. A download goes to ``<name>.part``, resumes with ``Range`` requests, and is
renamed into place only when it has the announced size, so a dropped connection costs no received bytes and a
half-written file is never read as complete; a sidecar ``<name>.sha256.json`` lets later runs skip the network. Local
sources take the same path."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx
from filelock import FileLock
from tqdm.auto import tqdm

from sand.pipeline.acquire.retry import backoff_delays, is_retryable_status
from sand.pipeline.base.errors import DownloadError
from sand.pipeline.base.files import atomic_path, file_digest, write_text_atomic
from sand.pipeline.base.locations import is_remote, local_path, url_scheme

log = logging.getLogger(__name__)

PART_SUFFIX = ".part"
SIDECAR_SUFFIX = ".sha256.json"
MAX_NAME_LEN = 120
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class FileRecord:
    """What was fetched, from where, and how to recognise it again (size + sha256)."""

    path: Path
    source: str
    size: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "source": self.source, "size": self.size, "sha256": self.sha256}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FileRecord:
        return cls(Path(data["path"]), str(data["source"]), int(data["size"]), str(data["sha256"]))


class _Retryable(Exception):
    """An attempt failed in a way that another attempt may fix (the message is the reason)."""


def safe_name(source: str) -> str:
    """Sanitised basename of ``source``'s path, never raw URL text: no hidden files or ``..``, long names capped with a
    hash, a sha1 of the source when there is no basename, and no clash with our ``.part``/sidecar files."""
    digest = hashlib.sha1(source.encode("utf-8")).hexdigest()
    path = unquote(urlsplit(source).path) if url_scheme(source) else source
    base = re.split(r"[/\\]", path.rstrip("/\\"))[-1]
    name = _UNSAFE.sub("_", base).lstrip(".")
    if not name.strip("_."):
        return f"download-{digest[:16]}"
    if len(name) > MAX_NAME_LEN:
        stem, dot, ext = name.rpartition(".")
        ext = ext if dot and 0 < len(ext) <= 10 else ""
        keep = MAX_NAME_LEN - len(ext) - 18
        name = f"{(stem if ext else name)[:keep]}-{digest[:16]}" + (f".{ext}" if ext else "")
    if name.endswith((PART_SUFFIX, SIDECAR_SUFFIX, ".lock")):
        name += "_"
    return name


def fetch_file(source: str, dest_dir: Path, *, timeout: float = 60, retries: int = 5, backoff_base: float = 0.5,
               chunk_size: int = 1 << 20, progress: bool = True, client: httpx.Client | None = None) -> FileRecord:
    """Fetch ``source`` into ``dest_dir`` (no work when its sidecar names the same source and size); only timeouts,
    connection errors, short bodies, 5xx and 429 are retried, ``retries`` more times."""
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    name = safe_name(source)
    final = dest_dir / name
    with FileLock(str(dest_dir / f"{name}.lock")):
        cached = _cached_record(source, final)
        if cached is not None:
            log.info("using cached %s (%d bytes)", final, cached.size)
            return cached
        _sidecar(final).unlink(missing_ok=True)  # a stale sidecar must not vouch for the new file
        if is_remote(source):
            record = _fetch_http(source, final, timeout=timeout, retries=retries, backoff_base=backoff_base,
                                 chunk_size=chunk_size, progress=progress, client=client)
        else:
            record = _copy_local(source, final, chunk_size=chunk_size, progress=progress)
        write_text_atomic(_sidecar(final), json.dumps(record.to_dict(), indent=2) + "\n")
        log.info("fetched %s -> %s (%d bytes, sha256 %s)", source, final, record.size, record.sha256)
        return record


def _sidecar(final: Path) -> Path:
    return final.with_name(final.name + SIDECAR_SUFFIX)


def _cached_record(source: str, final: Path) -> FileRecord | None:
    """The sidecar's record if it vouches for ``final`` as a complete copy of ``source``."""
    sidecar = _sidecar(final)
    if not (final.is_file() and sidecar.is_file()):
        return None
    try:
        record = FileRecord.from_dict(json.loads(sidecar.read_text(encoding="utf-8")))
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring unreadable sidecar %s (%s); fetching again", sidecar, exc)
        return None
    stat = final.stat()
    if record.source != source or record.size != stat.st_size:
        return None
    if not is_remote(source):
        src = _local_path(source)
        # a local source edited after we copied it must be copied again
        if not src.is_file() or src.stat().st_size != record.size or src.stat().st_mtime > stat.st_mtime:
            return None
    return FileRecord(path=final, source=source, size=record.size, sha256=record.sha256)


class _PartState:
    """A file being written plus a running sha256 of exactly the bytes it holds, so a multi-GB dump is not re-read after
    it finishes; when the two disagree (a ``.part`` left by an earlier process) the prefix is hashed once from disk."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.digest = hashlib.sha256()
        self.size = 0

    def sync(self) -> int:
        on_disk = self.path.stat().st_size if self.path.exists() else 0
        if on_disk != self.size:
            self.digest = file_digest(self.path) if on_disk else hashlib.sha256()
            self.size = on_disk
        return self.size

    def reset(self) -> None:
        self.path.unlink(missing_ok=True)
        self.digest, self.size = hashlib.sha256(), 0

    def append(self, chunks: Iterator[bytes], bar: tqdm, *, truncate: bool, buffer_size: int) -> None:
        """Write chunks as they arrive; the file buffer is flushed even when the stream breaks."""
        if truncate:
            self.digest, self.size = hashlib.sha256(), 0
        with open(self.path, "wb" if truncate else "ab", buffering=buffer_size) as fh:
            for chunk in chunks:
                fh.write(chunk)
                self.digest.update(chunk)
                self.size += len(chunk)
                bar.update(len(chunk))


def _local_path(source: str) -> Path:
    path = local_path(source)
    if path is None:
        raise DownloadError(f"cannot download {source}: unsupported URL scheme '{urlsplit(source).scheme}' "
                            "(use http, https, file or a path)")
    return path


def _copy_local(source: str, final: Path, *, chunk_size: int, progress: bool) -> FileRecord:
    src = _local_path(source)
    if not src.is_file():
        raise DownloadError(f"cannot read {source}: no such file")
    with atomic_path(final) as tmp, open(src, "rb") as fin, _bar(final.name, src.stat().st_size, 0, progress) as bar:
        part = _PartState(tmp)
        part.append(iter(lambda: fin.read(chunk_size), b""), bar, truncate=True, buffer_size=chunk_size)
    return FileRecord(path=final, source=source, size=part.size, sha256=part.digest.hexdigest())


def _bar(name: str, total: int | None, initial: int, enabled: bool) -> tqdm:
    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024, desc=name,
                disable=not enabled, leave=False)


def _fetch_http(url: str, final: Path, *, timeout: float, retries: int, backoff_base: float, chunk_size: int,
                progress: bool, client: httpx.Client | None) -> FileRecord:
    part = _PartState(final.with_name(final.name + PART_SUFFIX))
    session = httpx.Client(follow_redirects=True, timeout=timeout) if client is None else contextlib.nullcontext(client)
    delays = backoff_delays(retries, base=backoff_base)
    last_reason = "no attempt made"
    with session as http:
        for attempt in range(retries + 1):
            try:
                _http_attempt(url, part, http, timeout=timeout, chunk_size=chunk_size, progress=progress)
                break
            except _Retryable as exc:
                last_reason = str(exc)
            except httpx.TimeoutException as exc:
                last_reason = f"timed out after {timeout:g} s ({type(exc).__name__})"
            except httpx.TransportError as exc:
                last_reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            if attempt < retries:
                delay = next(delays)
                log.warning("download of %s failed (%s); retry %d/%d in %.2f s", url, last_reason, attempt + 1, retries,
                            delay)
                time.sleep(delay)
        else:
            raise DownloadError(f"cannot download {url} after {retries + 1} attempts: {last_reason}")
    os.replace(part.path, final)
    return FileRecord(path=final, source=url, size=part.size, sha256=part.digest.hexdigest())


def _http_attempt(url: str, part: _PartState, http: httpx.Client, *, timeout: float, chunk_size: int,
                  progress: bool) -> None:
    """One GET, resuming from the ``.part`` size; returns only when the part is complete."""
    start = part.sync()
    headers = {"Accept-Encoding": "identity"}  # we want the file's bytes, not a transfer-decoded body
    if start:
        headers["Range"] = f"bytes={start}-"
    with http.stream("GET", url, headers=headers, timeout=timeout, follow_redirects=True) as resp:
        status = resp.status_code
        if status == 416 and start:
            total = _content_range(resp.headers.get("Content-Range"))[2]
            if total is not None and total == start:
                return  # we already hold every byte
            part.reset()
            raise _Retryable(f"HTTP 416 for a {start}-byte partial file (total {total}); restarting")
        if status >= 400 or status < 200:
            reason = f"HTTP {status} {resp.reason_phrase}".rstrip()
            if is_retryable_status(status):
                raise _Retryable(reason)
            raise DownloadError(f"cannot download {url}: {reason}")
        length = _int_or_none(resp.headers.get("Content-Length"))
        if status == 206:
            first, _last, total = _content_range(resp.headers.get("Content-Range"))
            if first != start:
                part.reset()
                raise _Retryable(f"server answered range from byte {first} instead of {start}; restarting")
            expected = total if total is not None else (start + length if length is not None else None)
            truncate = False
        else:  # 200 (or another 2xx): the whole file; a server that ignored Range starts us over
            if start:
                log.info("%s ignored the Range request; downloading from the start", url)
            start, expected, truncate = 0, length, True
        with _bar(part.path.name.removesuffix(PART_SUFFIX), expected, start, progress) as bar:
            # network-sized chunks (no re-chunking): bytes received before a dropped
            # connection are kept for the resume instead of dying in a half-filled buffer
            part.append(resp.iter_raw(), bar, truncate=truncate, buffer_size=chunk_size)
    if expected is not None and part.size < expected:
        raise _Retryable(f"connection closed after {part.size} of {expected} bytes")
    if expected is not None and part.size > expected:
        part.reset()
        raise _Retryable(f"received {part.size} bytes but the server announced {expected}; restarting")


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:  # also ``*`` in a Content-Range
        return None


def _content_range(value: str | None) -> tuple[int | None, int | None, int | None]:
    """(first, last, total) from ``bytes a-b/N`` / ``bytes */N``; None where absent or ``*``."""
    match = _CONTENT_RANGE.match(value or "")
    first, last, total = match.groups() if match else (None, None, None)
    return _int_or_none(first), _int_or_none(last), _int_or_none(total)
