"""Fetch, validate and cache item images.

Why: the real Amazon data has many empty, dead or placeholder image URLs and some that serve HTML, and no URL may be
fetched twice across runs. So every URL gets an outcome (usable, or a short reason) instead of an exception. Permanent
outcomes are cached as ``cache_dir/<first 2 hex>/<sha256(url)>`` (never named by URL text): ``.img`` the original bytes
of a usable image, ``.json`` the outcome (written last, so a sidecar saying "ok" implies a complete image file);
transient failures stay uncached so a later run retries them.

URLs are data: a :class:`~sand.pipeline.acquire.url_policy.UrlPolicy` (chosen by where the metadata came from) decides
which ones may be read at all; only regular files are read, never more than ``max_bytes``; pixel counts are checked
from the header before decoding, and a process-wide pixel budget keeps large images from decoding at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import io
import json
import logging
import os
import stat
import threading
import urllib.request
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm.auto import tqdm

from sand.pipeline.acquire.retry import backoff_delays, is_retryable_status
from sand.pipeline.acquire.url_policy import REFUSED, UnresolvableHost, UrlPolicy, check_http_url, peer_allowed
from sand.pipeline.base.errors import SandError
from sand.pipeline.base.files import write_bytes_atomic
from sand.pipeline.base.locations import is_remote, local_path

log = logging.getLogger(__name__)

#: Largest image (in pixels) we decode, judged from the header before decoding. Far above any product photo (Amazon
#: hi-res is ~2-3 Mpx) but below Pillow's own bomb threshold: a 190 KB PNG can claim 7000 x 7000 RGBA pixels, over a
#: gigabyte once decoded and converted.
MAX_PIXELS = 40_000_000
#: Redirect hops followed per URL; each hop is checked against the URL policy.
MAX_REDIRECTS = 10
#: Outcomes that will not change if fetched again (cached on disk). Any "http-4xx" that is not retryable is permanent
#: as well (see :func:`_is_permanent`).
PERMANENT_REASONS = frozenset({"not-an-image", "undecodable", "placeholder", "too-small", "too-large",
                               "too-many-pixels", "too-many-redirects", "bad-encoding"})
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
    policy: UrlPolicy = field(default_factory=UrlPolicy)


# --------------------------------------------------------------------------- bounded decoding
class PixelBudget:
    """Pixels being decoded at once in this process. Why: each image is capped at ``max_pixels``, but many threads
    (fetch validation, encoding, several shards) could still decode several large images together. A reservation waits
    until the pixels fit; one image larger than the whole budget still proceeds, alone."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, int(capacity))
        self._used = 0
        self._cond = threading.Condition()

    @contextmanager
    def reserve(self, pixels: int) -> Iterator[None]:
        need = min(max(1, int(pixels)), self.capacity)
        with self._cond:
            self._cond.wait_for(lambda: self._used + need <= self.capacity)
            self._used += need
        try:
            yield
        finally:
            with self._cond:
                self._used -= need
                self._cond.notify_all()


_BUDGETS: dict[int, PixelBudget] = {}
_BUDGETS_LOCK = threading.Lock()


def decode_budget(max_pixels: int) -> PixelBudget:
    """The process-wide budget for images capped at ``max_pixels`` (room for one such image at a time)."""
    with _BUDGETS_LOCK:
        return _BUDGETS.setdefault(int(max_pixels), PixelBudget(max_pixels))


class TooManyPixels(Exception):
    """The header announces more pixels than allowed: refused before any decoding."""


@contextmanager
def decoded_rgb(data: bytes, *, max_pixels: int = MAX_PIXELS, draft_to: int | None = None) -> Iterator[Image.Image]:
    """An upright RGB picture of ``data``, decoded inside the process-wide pixel budget (held until the ``with`` block
    ends). The pixel count comes from the header (``Image.open`` is lazy) and is checked before ``load``; ``draft_to``
    lets JPEGs decode at a reduced scale that still covers ``draft_to`` pixels a side (a CNN input needs no more)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise TooManyPixels(f"{width}x{height} pixels, over the limit of {max_pixels}")
            if draft_to and img.format == "JPEG":
                img.draft(img.mode, (draft_to, draft_to))
            with decode_budget(max_pixels).reserve(img.size[0] * img.size[1]):
                img.load()
                yield to_rgb(ImageOps.exif_transpose(img))
    except Image.DecompressionBombError as exc:
        raise TooManyPixels(str(exc)) from None


# --------------------------------------------------------------------------- validation
def is_placeholder_url(url: str) -> bool:
    """True for URLs of Amazon's generic "no image" icon: its CNN feature says nothing about the item."""
    return any(marker in url for marker in PLACEHOLDER_URL_MARKERS)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB; transparent areas become white. Why white: product shots with alpha are cut-outs
    meant for a white page; dropping alpha would leave whatever colour the transparent pixels hold (often black)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_rgb(path: Path | str, *, max_bytes: int = 10_000_000, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open an image file as an upright RGB picture (EXIF orientation applied), or raise ``OSError`` naming the
    problem for anything but a readable regular file of at most ``max_bytes`` holding at most ``max_pixels`` pixels."""
    reason, data = read_regular_file(Path(path), max_bytes)
    if reason is not None or data is None:
        raise OSError(f"{path}: {reason}")
    try:
        with decoded_rgb(data, max_pixels=max_pixels) as img:
            return img.copy()
    except TooManyPixels as exc:
        raise OSError(f"{path}: {exc}") from None


def validate_image_bytes(
    data: bytes, *, min_side: int = 32, max_pixels: int = MAX_PIXELS
) -> tuple[str | None, tuple[int, int] | None]:
    """``(reason, (width, height))`` of ``data``: both ``verify`` (structure, checksums) and ``load`` (truncation) run,
    each catches corruption the other misses. A single-colour GIF is a placeholder: that is how image hosts answer for
    products without a picture (1x1 spacers, blank boxes)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            size = img.size
            if size[0] * size[1] > max_pixels:
                return "too-many-pixels", size
            fmt = img.format
            with decode_budget(max_pixels).reserve(size[0] * size[1]):
                img.verify()
        # Rotation does not change the smaller side, and only a GIF needs its colours (the placeholder check). A JPEG
        # decodes at its smallest DCT scale: every entropy-coded block is still read (so a truncated file still
        # fails), at a fraction of the full decode's cost.
        with Image.open(io.BytesIO(data)) as img, decode_budget(max_pixels).reserve(size[0] * size[1]):
            if fmt == "JPEG":
                img.draft(img.mode, (1, 1))
            img.load()
            uniform = fmt == "GIF" and all(lo == hi for lo, hi in to_rgb(img).getextrema())  # one colour per band
    except Image.DecompressionBombError:
        return "too-many-pixels", None
    except UnidentifiedImageError:
        return "not-an-image", None
    except Exception:
        # Pillow signals corrupt/truncated data with many exception types (OSError, SyntaxError, ValueError,
        # struct.error, ...); any of them means this body is not a usable picture.
        return "undecodable", None
    if min(size) < min_side:
        return "too-small", size
    if uniform:
        return "placeholder", size
    return None, size


# --------------------------------------------------------------------------- cache
def cache_paths(cache_dir: Path, url: str) -> tuple[Path, Path]:
    """(image file, sidecar) for ``url``; names come from sha256(url), never from URL text."""
    digest = hashlib.sha256(url.encode("utf-8")).hexdigest()
    folder = Path(cache_dir) / digest[:2]
    return folder / f"{digest}.img", folder / f"{digest}.json"


def _is_permanent(reason: str | None) -> bool:
    if reason is None or reason in PERMANENT_REASONS:
        return True
    if reason.startswith("http-"):
        status = int(reason[5:])
        return 400 <= status < 500 and not is_retryable_status(status)
    return False


def _write_cache(
    cache_dir: Path, url: str, reason: str | None, data: bytes | None, size: tuple[int, int] | None, limits: _Limits
) -> Path | None:
    img_path, meta_path = cache_paths(cache_dir, url)
    if reason is None and data is not None:
        write_bytes_atomic(img_path, data)
    meta = {
        "url": url, "reason": reason, "size": list(size) if size else None,
        "bytes": len(data) if data is not None else None,
        "max_bytes": limits.max_bytes, "min_side": limits.min_side, "max_pixels": limits.max_pixels,
        # Fetched where private hosts were allowed (its redirects may have gone there): not for network metadata.
        "private_hosts": limits.policy.private_hosts,
    }
    write_bytes_atomic(meta_path, json.dumps(meta).encode("utf-8"))
    return img_path if reason is None else None


def _read_cache(cache_dir: Path, url: str, limits: _Limits) -> ImageResult | None:
    """A cached outcome still valid under the current limits, else None (fetch again). Size-dependent outcomes are
    re-judged against today's limits, so lowering ``min_side`` or raising ``max_bytes`` refetches what it should."""
    img_path, meta_path = cache_paths(cache_dir, url)
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if meta.get("url") != url:  # hash collision or foreign file: ignore
        return None
    if meta.get("private_hosts", True) and not limits.policy.private_hosts:
        return None
    reason, size, nbytes = meta.get("reason"), meta.get("size"), meta.get("bytes")
    if reason is None:
        if not img_path.is_file() or (nbytes is not None and img_path.stat().st_size != nbytes):
            return None
        if size and min(size) < limits.min_side:
            reason = "too-small"
        elif (nbytes or 0) > limits.max_bytes:
            reason = "too-large"
        elif size and size[0] * size[1] > limits.max_pixels:
            reason = "too-many-pixels"
        return ImageResult(url, img_path if reason is None else None, reason, from_cache=True)
    if (  # a limit relaxed since, or a reason that may change: fetch again
        (reason == "too-small" and (not size or min(size) >= limits.min_side))
        or (reason == "too-large" and limits.max_bytes > meta.get("max_bytes", 0))
        or (reason == "too-many-pixels" and limits.max_pixels > meta.get("max_pixels", 0))
        or not _is_permanent(reason)
    ):
        return None
    return ImageResult(url, None, reason, from_cache=True)


# --------------------------------------------------------------------------- fetching
class _Final(Exception):
    """Stop fetching this URL for good with ``reason`` (too large, refused, too many redirects)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})


def _peer_address(resp: Any) -> object:
    stream = resp.extensions.get("network_stream")
    return stream.get_extra_info("server_addr") if stream is not None else None


async def _download(client: Any, url: str, max_bytes: int, policy: UrlPolicy, check_peer: bool) -> tuple[int, bytes]:
    """GET ``url`` streaming, following redirects by hand so each hop passes ``policy`` first, aborting as soon as the
    body exceeds ``max_bytes``."""
    for _ in range(MAX_REDIRECTS + 1):
        async with client.stream("GET", url) as resp:
            if check_peer and not peer_allowed(url, _peer_address(resp), policy):
                raise _Final(REFUSED)
            location = resp.headers.get("location")
            if resp.status_code in _REDIRECT_STATUSES and location:
                url = str(resp.url.join(location))
                if await check_http_url(url, policy) is not None:
                    raise _Final(REFUSED)
                continue
            if resp.status_code != 200:
                return resp.status_code, b""
            declared = resp.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                raise _Final("too-large")
            chunks, total = [], 0
            async for chunk in resp.aiter_bytes():
                total += len(chunk)
                if total > max_bytes:
                    raise _Final("too-large")
                chunks.append(chunk)
            return 200, b"".join(chunks)
    raise _Final("too-many-redirects")


async def _fetch_http(
    client: Any, url: str, *, retries: int, max_bytes: int, backoff_base: float, policy: UrlPolicy, check_peer: bool,
) -> tuple[str | None, bytes | None]:
    """Bytes of ``url`` or a failure reason, retrying only what may succeed later."""
    seed = int(hashlib.sha256(url.encode("utf-8")).hexdigest()[:8], 16)
    delays = backoff_delays(retries, base=backoff_base, seed=seed)
    while True:
        try:
            status, body = await _download(client, url, max_bytes, policy, check_peer)
            if status == 200:
                return None, body
            reason = f"http-{status}"
            retry = is_retryable_status(status)
        except _Final as final:
            return final.reason, None
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
        except (httpx.HTTPError, UnresolvableHost):  # any other transport problem (DNS, TLS, reset): retry
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


def read_regular_file(path: Path, max_bytes: int) -> tuple[str | None, bytes | None]:
    """``(None, bytes)`` of a regular file of at most ``max_bytes``, else ``(reason, None)``. Why so careful: a path
    named in data may be a device (``/dev/zero`` never ends), a FIFO (``open`` blocks until a writer appears) or a
    directory. The type is checked before opening, the open never blocks (``O_NONBLOCK``), the type is checked again on
    the open descriptor (the path may have been swapped), and reading stops at the cap."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return "not-a-file", None
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except (FileNotFoundError, NotADirectoryError):
        return "file-not-found", None
    except (OSError, ValueError):
        return "unreadable-file", None
    with os.fdopen(fd, "rb") as fh:
        try:
            info = os.fstat(fh.fileno())
            if not stat.S_ISREG(info.st_mode):
                return "not-a-file", None
            if info.st_size > max_bytes:
                return "too-large", None
            data = fh.read(max_bytes + 1)
        except OSError:
            return "unreadable-file", None
    return ("too-large", None) if len(data) > max_bytes else (None, data)


def _check_local(url: str, path: Path, limits: _Limits) -> ImageResult:
    """Validate a local image in place (no copy: it is already on disk and may change)."""
    reason, data = read_regular_file(path, limits.max_bytes)
    if reason is None and data is not None:
        reason, _ = validate_image_bytes(data, min_side=limits.min_side, max_pixels=limits.max_pixels)
    return ImageResult(url, path if reason is None else None, reason)


class _HostVerdicts:
    """Each host's policy verdict, looked up once per run (thousands of URLs share a few hosts)."""

    def __init__(self, policy: UrlPolicy) -> None:
        self.policy = policy
        self._done: dict[str, asyncio.Future[str | None]] = {}

    async def check(self, url: str) -> str | None:
        key = urlparse(url).netloc.lower()
        if key not in self._done:
            self._done[key] = asyncio.ensure_future(check_http_url(url, self.policy))
        try:
            return await asyncio.shield(self._done[key])
        except UnresolvableHost:
            self._done.pop(key, None)  # retried by the next URL of that host
            raise


async def _fetch_one(
    client: Any, sem: asyncio.Semaphore, url: str, cache_dir: Path, limits: _Limits, retries: int, backoff_base: float,
    verdicts: _HostVerdicts, check_peer: bool,
) -> ImageResult:
    url = url.strip() if isinstance(url, str) else ""
    if not url:
        return ImageResult(url, None, "empty-url")
    if is_placeholder_url(url):
        return ImageResult(url, None, "placeholder")
    local = _local_path(url)
    if local is not None:
        if not limits.policy.local_files:  # decided without touching the path: nothing about it leaks
            return ImageResult(url, None, REFUSED)
        return await asyncio.to_thread(_check_local, url, local, limits)
    if not is_remote(url):
        return ImageResult(url, None, "unsupported-scheme")
    try:
        verdict = await verdicts.check(url)
    except UnresolvableHost:
        return ImageResult(url, None, "connection-error")
    if verdict is not None:
        return ImageResult(url, None, verdict)
    if (cached := await asyncio.to_thread(_read_cache, cache_dir, url, limits)) is not None:
        return cached
    async with sem:
        reason, data = await _fetch_http(client, url, retries=retries, max_bytes=limits.max_bytes,
                                         backoff_base=backoff_base, policy=limits.policy, check_peer=check_peer)
    size = None
    if reason is None and data is not None:
        reason, size = await asyncio.to_thread(validate_image_bytes, data, min_side=limits.min_side,
                                               max_pixels=limits.max_pixels)
    if reason == REFUSED or not _is_permanent(reason):
        return ImageResult(url, None, reason)
    path = await asyncio.to_thread(_write_cache, cache_dir, url, reason, data, size, limits)
    return ImageResult(url, path, reason)


async def _fetch_all(
    urls: list[str], cache_dir: Path, *, concurrency: int, timeout: float, retries: int, limits: _Limits,
    backoff_base: float, progress: bool,
) -> dict[str, ImageResult]:
    sem = asyncio.Semaphore(concurrency)
    client_limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    verdicts = _HostVerdicts(limits.policy)
    # Through a proxy the peer is the proxy, not the image host: then the name check alone applies.
    check_peer = not limits.policy.private_hosts and not urllib.request.getproxies()
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout), follow_redirects=False, limits=client_limits,
                                 headers={"User-Agent": _USER_AGENT}) as client:  # redirects: by hand, in _download
        tasks = [asyncio.ensure_future(_fetch_one(client, sem, u, cache_dir, limits, retries, backoff_base, verdicts,
                                                  check_peer)) for u in urls]
        out: dict[str, ImageResult] = {}
        with tqdm(total=len(tasks), desc="images", unit="img", disable=not progress) as bar:
            for fut in asyncio.as_completed(tasks):
                res = await fut
                out[res.url] = res
                bar.update(1)
    # ``_fetch_one`` strips whitespace, so map results back to the URLs as given.
    return {u: out[u.strip() if isinstance(u, str) else ""] for u in urls}


def fetch_images(
    urls: Sequence[str], cache_dir: Path, *, concurrency: int = 16, timeout: float = 10.0, retries: int = 3,
    max_bytes: int = 10_000_000, min_side: int = 32, max_pixels: int = MAX_PIXELS, backoff_base: float = 0.5,
    progress: bool = True, policy: UrlPolicy | None = None,
) -> list[ImageResult]:
    """Fetch and validate every URL (duplicates once); one :class:`ImageResult` per input, in input order. Never raises
    for a bad URL or image: a run over thousands of items must not stop on one broken picture. http(s) URLs are cached
    under ``cache_dir``; ``file://`` URLs and plain paths are validated in place. The default ``policy`` trusts nothing
    local or private (as for metadata from the network): such URLs come back ``refused``."""
    limits = _Limits(max_bytes=max_bytes, min_side=min_side, max_pixels=max_pixels, policy=policy or UrlPolicy())
    unique = list(dict.fromkeys("" if u is None else str(u) for u in urls))
    fetch_all = _fetch_all(unique, Path(cache_dir), concurrency=max(1, concurrency), timeout=timeout,
                           retries=max(0, retries), limits=limits, backoff_base=backoff_base, progress=progress)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        by_url = asyncio.run(fetch_all)
    else:  # called from inside an event loop (notebook, async task): use a private loop in a thread
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            by_url = pool.submit(asyncio.run, fetch_all).result()
    results = [by_url["" if u is None else str(u)] for u in urls]
    counts = Counter(r.reason or "ok" for r in results)
    log.debug("images: %d URLs, %s", len(results), ", ".join(f"{k}={v}" for k, v in sorted(counts.items())))
    return results
