"""The one place that decides whether a source string is a URL, and which local file it names.

Why one module: acquire's cache key, the download step, the format sniffer and the image fetcher all ask "is this
``file://`` URL or plain path a local file, and which one?". When each answered on its own, one copy skipped URL
decoding (``file:///my%20data/x.gz`` was looked up literally, so edits to the file never changed the cache key) and one
read ``file://localhost/p`` as the relative path ``localhost/p``. Here the answer is given once: ``urlsplit`` + URL
decoding, ``file:///p`` and ``file://localhost/p`` accepted, any other host refused."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit
from urllib.request import url2pathname

from sand.pipeline.base.errors import ConfigError

REMOTE_SCHEMES = ("http", "https")
_LOCAL_HOSTS = ("", "localhost")


def url_scheme(source: str) -> str:
    """Lower-case URL scheme of ``source``; "" for a plain path (``C:\\x`` is a Windows path, not scheme c)."""
    scheme = urlsplit(source).scheme.lower()
    return scheme if len(scheme) > 1 else ""


def is_remote(source: str) -> bool:
    """True for http(s) URLs: the sources that need the network."""
    return url_scheme(source) in REMOTE_SCHEMES


def local_path(source: str) -> Path | None:
    """The local file a plain path or ``file://`` URL names; None for any other URL scheme.

    ``file:///data/my%20dumps/x.gz`` and ``file://localhost/data/my%20dumps/x.gz`` both name ``/data/my dumps/x.gz``. A
    ``file://`` URL naming another host cannot be read from here and is a :class:`ConfigError` (one line, naming the
    URL)."""
    scheme = url_scheme(source)
    if not scheme:
        return Path(source).expanduser()
    if scheme != "file":
        return None
    parts = urlsplit(source)
    if parts.netloc.lower() not in _LOCAL_HOSTS:
        raise ConfigError(
            f"file URL {source} names the host '{parts.netloc}': only local files can be read "
            "(file:///path or file://localhost/path)"
        )
    return Path(url2pathname(parts.path))
