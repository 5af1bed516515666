"""Fetch, validate and cache item images.

Why this module exists: the image stage must survive the real Amazon data, where
many image URLs are empty, dead, placeholders or serve HTML, and it must never
fetch the same URL twice across runs. Every URL therefore gets an outcome
(usable, or a short reason) instead of an exception, permanent outcomes are cached
on disk keyed by ``sha256(url)`` (never by URL text), and transient failures are
left uncached so a later run retries them.

Cache layout: ``cache_dir/<first 2 hex>/<sha256>.img`` holds the original bytes of
a usable image and ``<sha256>.json`` the outcome (written last, so a sidecar saying
"ok" implies a complete image file).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import io
import json
import logging
import os
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from PIL import Image, ImageOps, UnidentifiedImageError

from sand.pipeline.errors import SandError
from sand.pipeline.locations import local_path
from sand.pipeline.retry import backoff_delays, is_retryable_status

log = logging.getLogger(__name__)

#: Largest image (in pixels) we decode. Far above any product photo (Amazon hi-res is
#: ~2-3 Mpx) but well below Pillow's own bomb threshold, so a hostile or broken file
#: is rejected as "too-large" before it can allocate gigabytes.
MAX_PIXELS = 50_000_000

#: Outcomes that will not change if fetched again (cached on disk). Any "http-4xx"
#: that is not retryable is permanent as well (see :func:`_is_permanent`).
PERMANENT_REASONS = frozenset(
    {
        "not-an-image",
        "undecodable",
        "placeholder",
        "too-small",
        "too-large",
        "too-many-redirects",
        "bad-encoding",
    }
)

#: URL fragment of Amazon's "no image available" icon (e.g. ``.../x-site/icons/no-img-sm._CB192198896_.gif``).
PLACEHOLDER_URL_MARKERS = ("no-img",)

_USER_AGENT = "sand-rec/0.1 (item image features)"


@dataclass(frozen=True)
class ImageResult:
    """Outcome for one URL: ``reason is None`` means ``path`` holds a usable image."""

    url: str
    path: Path | None
    reason: str | None
    from_cache: bool = False

    @property
    def ok(self) -> bool:
        return self.reason is None


@dataclass(frozen=True)
class _Limits:
    max_bytes: int
    min_side: int
    max_pixels: int


# --------------------------------------------------------------------------- validation


def is_placeholder_url(url: str) -> bool:
    """True for URLs of Amazon's generic "no image" icon: its CNN feature says nothing about the item."""
    return any(marker in url for marker in PLACEHOLDER_URL_MARKERS)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB; transparent areas become white.

    Why white: product shots with alpha are cut-outs meant for a white page;
    dropping alpha would leave whatever colour the transparent pixels hold (often black).
    """
    if img.mode == "RGB":
        return img
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_rgb(path: Path | str) -> Image.Image:
    """Open an image file as an upright RGB picture (EXIF orientation applied)."""
    with Image.open(path) as img:
        img.load()
        upright = ImageOps.exif_transpose(img)
        return to_rgb(upright).copy()


def _is_uniform(img: Image.Image) -> bool:
    extrema = img.getextrema()
    if isinstance(extrema[0], tuple):
        return all(lo == hi for lo, hi in extrema)
    return extrema[0] == extrema[1]


def validate_image_bytes(
    data: bytes, *, min_side: int = 32, max_pixels: int = MAX_PIXELS
) -> tuple[str | None, tuple[int, int] | None]:
    """Decide whether ``data`` is a usable image; returns ``(reason, (width, height))``.

    Both ``verify`` (structure, checksums) and a full ``load`` (catches truncated
    JPEGs) are run because each one catches corruption the other misses.
    A single-colour GIF is treated as a placeholder: that is how image hosts answer
    for products without a picture (1x1 spacers, blank boxes).
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            size = img.size
            if size[0] * size[1] > max_pixels:
                return "too-large", size
            img.verify()
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            fmt = img.format
            upright = ImageOps.exif_transpose(img)
            rgb = to_rgb(upright)
            size = rgb.size
    except Image.DecompressionBombError:
        return "too-large", None
    except UnidentifiedImageError:
        return "not-an-image", None
    except Exception:
        # Pillow signals corrupt/truncated data with many exception types (OSError, SyntaxError,
        # ValueError, struct.error, ...); any of them means this body is not a usable picture.
        return "undecodable", None
    if min(size) < min_side:
        return "too-small", size
    if fmt == "GIF" and _is_uniform(rgb):
        return "placeholder", size
    return None, size


# --------------------------------------------------------------------------- cache


def cache_paths(cache_dir: Path, url: str) -> tuple[Path, Path]:
    """(image file, sidecar) for ``url``; names come from sha256(url), never from URL text."""
    digest = hashlib.sha256(url.encode("utf-8")).hexdigest()
    folder = Path(cache_dir) / digest[:2]
    return folder / f"{digest}.img", folder / f"{digest}.json"


def _atomic_write(path: Path, data: bytes) -> None:
    """Write via a temporary file and ``os.replace`` so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _is_permanent(reason: str | None) -> bool:
    if reason is None or reason in PERMANENT_REASONS:
        return True
    if reason.startswith("http-"):
        status = int(reason[5:])
        return 400 <= status < 500 and not is_retryable_status(status)
    return False


def _write_cache(
    cache_dir: Path,
    url: str,
    reason: str | None,
    data: bytes | None,
    size: tuple[int, int] | None,
    limits: _Limits,
) -> Path | None:
    img_path, meta_path = cache_paths(cache_dir, url)
    if reason is None and data is not None:
        _atomic_write(img_path, data)
    meta = {
        "url": url,
        "reason": reason,
        "size": list(size) if size else None,
        "bytes": len(data) if data is not None else None,
        "max_bytes": limits.max_bytes,
        "min_side": limits.min_side,
        "max_pixels": limits.max_pixels,
    }
    _atomic_write(meta_path, json.dumps(meta).encode("utf-8"))
    return img_path if reason is None else None


def _read_cache(cache_dir: Path, url: str, limits: _Limits) -> ImageResult | None:
    """A cached outcome still valid under the current limits, else None (fetch again).

    Size-dependent outcomes are re-judged against today's limits, so lowering
    ``min_side`` or raising ``max_bytes`` refetches exactly what it should.
    """
    img_path, meta_path = cache_paths(cache_dir, url)
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if meta.get("url") != url:  # hash collision or foreign file: ignore
        return None
    reason, size, nbytes = meta.get("reason"), meta.get("size"), meta.get("bytes")
    if reason is None:
        if not img_path.is_file() or (nbytes is not None and img_path.stat().st_size != nbytes):
            return None
        if size and min(size) < limits.min_side:
            reason = "too-small"
        elif (nbytes or 0) > limits.max_bytes or (size and size[0] * size[1] > limits.max_pixels):
            reason = "too-large"
        return ImageResult(url, img_path if reason is None else None, reason, from_cache=True)
    if reason == "too-small":
        if not size or min(size) >= limits.min_side:
            return None
    elif reason == "too-large":
        if limits.max_bytes > meta.get("max_bytes", 0) or limits.max_pixels > meta.get("max_pixels", 0):
            return None
    elif not _is_permanent(reason):
        return None
    return ImageResult(url, None, reason, from_cache=True)


# --------------------------------------------------------------------------- fetching


class _TooLarge(Exception):
    """The body passed ``max_bytes`` while streaming: stop reading, the image is unusable."""


async def _download(client: Any, url: str, max_bytes: int) -> tuple[int, bytes]:
    """GET ``url`` streaming, aborting as soon as the body exceeds ``max_bytes``."""
    async with client.stream("GET", url) as resp:
        if resp.status_code != 200:
            return resp.status_code, b""
        declared = resp.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > max_bytes:
            raise _TooLarge
        chunks, total = [], 0
        async for chunk in resp.aiter_bytes():
            total += len(chunk)
            if total > max_bytes:
                raise _TooLarge
            chunks.append(chunk)
        return 200, b"".join(chunks)


async def _fetch_http(
    client: Any, url: str, *, retries: int, max_bytes: int, backoff_base: float
) -> tuple[str | None, bytes | None]:
    """Bytes of ``url`` or a failure reason, retrying only what may succeed later."""
    import httpx

    seed = int(hashlib.sha256(url.encode("utf-8")).hexdigest()[:8], 16)
    delays = backoff_delays(retries, base=backoff_base, seed=seed)
    while True:
        try:
            status, body = await _download(client, url, max_bytes)
            if status == 200:
                return None, body
            reason = f"http-{status}"
            retry = is_retryable_status(status)
        except _TooLarge:
            return "too-large", None
        except httpx.TooManyRedirects:
            return "too-many-redirects", None
        except (httpx.InvalidURL, httpx.UnsupportedProtocol):
            return "bad-url", None
        except httpx.TimeoutException:
            reason, retry = "timeout", True
        except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
            # A connection dropped mid-body: the server may do better next time.
            text = str(exc)
            reason = "truncated" if "incomplete" in text or "complete message" in text else "connection-error"
            retry = True
        except httpx.DecodingError:  # body does not match its Content-Encoding: the server's fault, for good
            return "bad-encoding", None
        except httpx.HTTPError:  # any other transport problem (DNS, TLS, reset): worth another try
            reason, retry = "connection-error", True
        delay = next(delays, None) if retry else None
        if delay is None:
            return reason, None
        await asyncio.sleep(delay)


def _local_path(url: str) -> Path | None:
    """The file a ``file://`` URL or plain path names; None for any other scheme (or a remote file host)."""
    try:
        return local_path(url)
    except SandError:  # file://otherhost/...: not readable here; the caller reports the scheme
        return None


def _check_local(url: str, path: Path, limits: _Limits) -> ImageResult:
    """Validate a local image in place (no copy: it is already on disk and may change)."""
    try:
        if path.stat().st_size > limits.max_bytes:
            return ImageResult(url, None, "too-large")
        data = path.read_bytes()
    except FileNotFoundError:
        return ImageResult(url, None, "file-not-found")
    except OSError:
        return ImageResult(url, None, "unreadable-file")
    reason, _ = validate_image_bytes(data, min_side=limits.min_side, max_pixels=limits.max_pixels)
    return ImageResult(url, path if reason is None else None, reason)


async def _fetch_one(
    client: Any,
    sem: asyncio.Semaphore,
    url: str,
    cache_dir: Path,
    limits: _Limits,
    retries: int,
    backoff_base: float,
) -> ImageResult:
    url = url.strip() if isinstance(url, str) else ""
    if not url:
        return ImageResult(url, None, "empty-url")
    if is_placeholder_url(url):
        return ImageResult(url, None, "placeholder")
    local = _local_path(url)
    if local is not None:
        return await asyncio.to_thread(_check_local, url, local, limits)
    if urlparse(url).scheme.lower() not in ("http", "https"):
        return ImageResult(url, None, "unsupported-scheme")
    cached = await asyncio.to_thread(_read_cache, cache_dir, url, limits)
    if cached is not None:
        return cached
    async with sem:
        reason, data = await _fetch_http(
            client, url, retries=retries, max_bytes=limits.max_bytes, backoff_base=backoff_base
        )
    size = None
    if reason is None and data is not None:
        reason, size = await asyncio.to_thread(
            validate_image_bytes, data, min_side=limits.min_side, max_pixels=limits.max_pixels
        )
    if not _is_permanent(reason):
        return ImageResult(url, None, reason)
    path = await asyncio.to_thread(_write_cache, cache_dir, url, reason, data, size, limits)
    return ImageResult(url, path, reason)


async def _fetch_all(
    urls: list[str],
    cache_dir: Path,
    *,
    concurrency: int,
    timeout: float,
    retries: int,
    limits: _Limits,
    backoff_base: float,
    progress: bool,
) -> dict[str, ImageResult]:
    import httpx
    from tqdm.auto import tqdm

    sem = asyncio.Semaphore(concurrency)
    client_limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(
        timeout=httpx.Timeout(timeout),
        follow_redirects=True,
        limits=client_limits,
        headers={"User-Agent": _USER_AGENT},
    ) as client:
        tasks = {
            asyncio.ensure_future(_fetch_one(client, sem, u, cache_dir, limits, retries, backoff_base)): u for u in urls
        }
        out: dict[str, ImageResult] = {}
        with tqdm(total=len(tasks), desc="images", unit="img", disable=not progress) as bar:
            for fut in asyncio.as_completed(tasks):
                res = await fut
                out[res.url] = res
                bar.update(1)
    # ``_fetch_one`` strips whitespace, so map results back to the URLs as given.
    return {u: out[u.strip() if isinstance(u, str) else ""] for u in urls}


def fetch_images(
    urls: Sequence[str],
    cache_dir: Path,
    *,
    concurrency: int = 16,
    timeout: float = 10.0,
    retries: int = 3,
    max_bytes: int = 10_000_000,
    min_side: int = 32,
    max_pixels: int = MAX_PIXELS,
    backoff_base: float = 0.5,
    progress: bool = True,
) -> list[ImageResult]:
    """Fetch and validate every URL; one :class:`ImageResult` per input, in input order.

    Never raises for a bad URL or image: a run over thousands of items must not stop
    on one broken picture. Duplicate URLs are fetched once. http(s) URLs are cached
    under ``cache_dir``; ``file://`` URLs and plain paths are validated in place.
    """
    limits = _Limits(max_bytes=max_bytes, min_side=min_side, max_pixels=max_pixels)
    unique = list(dict.fromkeys("" if u is None else str(u) for u in urls))
    coro_args = dict(
        concurrency=max(1, concurrency),
        timeout=timeout,
        retries=max(0, retries),
        limits=limits,
        backoff_base=backoff_base,
        progress=progress,
    )

    def run() -> dict[str, ImageResult]:
        return asyncio.run(_fetch_all(unique, Path(cache_dir), **coro_args))

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        by_url = run()
    else:  # called from inside an event loop (notebook, async task): use a private loop in a thread
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            by_url = pool.submit(run).result()
    results = [by_url["" if u is None else str(u)] for u in urls]
    counts = Counter(r.reason or "ok" for r in results)
    log.info("images: %d URLs, %s", len(results), ", ".join(f"{k}={v}" for k, v in sorted(counts.items())))
    return results
