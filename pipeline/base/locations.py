"""The one place that decides whether a source string is a URL, and which local file it names.

Acquire's cache key, the download step, the sniffer and the image fetcher all ask it; answered separately, one copy
skipped URL decoding and one read ``file://localhost/p`` as a relative path. Here: ``urlsplit`` + URL decoding,
``file:///p`` and ``file://localhost/p`` accepted, any other host refused."""

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
    """The local file a plain path or ``file://`` URL names (``file:///data/my%20dumps/x.gz`` and
    ``file://localhost/data/my%20dumps/x.gz`` both name ``/data/my dumps/x.gz``); None for any other URL scheme; a
    ConfigError for a ``file://`` URL naming another host."""
    scheme = url_scheme(source)
    if not scheme:
        return Path(source).expanduser()
    if scheme != "file":
        return None
    parts = urlsplit(source)
    if parts.netloc.lower() not in _LOCAL_HOSTS:
        raise ConfigError(f"file URL {source} names the host '{parts.netloc}': only local files can be read "
                          "(file:///path or file://localhost/path)")
    return Path(url2pathname(parts.path))
