"""Which image URLs the image stage may read: trust follows where the metadata came from. Why: image URLs are data. A
URL in metadata downloaded from the internet must not make this machine read its own files (``file:///etc/passwd``,
``/dev/zero``, a FIFO) or call services on its network (``http://127.0.0.1``, ``10.x``, cloud metadata at
``169.254.169.254``), directly or through a redirect; metadata the user handed over as local files may name local files
and private hosts (a private image mirror). Hosts are judged by the addresses they resolve to, at every redirect hop."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

Origin = Literal["network", "local"]  #: Where the metadata naming the image URLs came from.
REFUSED = "refused"  #: Reason recorded for a URL the policy does not allow (whether or not a named file exists).


class UnresolvableHost(Exception):
    """The host name did not resolve now; may work later (a transient failure, not a refusal)."""


@dataclass(frozen=True)
class UrlPolicy:
    """What image URLs may point at; picklable, as it travels with shard jobs to processes and Dask workers.
    ``local_files``: ``file://`` URLs and plain paths (regular files only); ``private_hosts``: http(s) hosts resolving
    to loopback/private/link-local addresses; ``allowed_hosts``: ``host`` or ``host:port`` trusted even when private (an
    internal mirror named in downloaded metadata), the hosts a redirect leads to judged on their own."""

    local_files: bool = False
    private_hosts: bool = False
    allowed_hosts: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def for_origin(cls, origin: Origin, allowed_hosts: Iterable[str] = ()) -> UrlPolicy:
        trusted = origin == "local"
        hosts = frozenset(h.strip().lower() for h in allowed_hosts if h.strip())
        return cls(local_files=trusted, private_hosts=trusted, allowed_hosts=hosts)

    def allows_host(self, host: str, port: int) -> bool:
        """True when ``host`` needs no address check (private hosts trusted, or explicitly allowed)."""
        host = host.lower()
        return self.private_hosts or host in self.allowed_hosts or f"{host}:{port}" in self.allowed_hosts

    def describe(self) -> dict[str, object]:
        return {**dataclasses.asdict(self), "allowed_hosts": sorted(self.allowed_hosts)}


def is_public_address(address: str) -> bool:
    """True for a globally routable unicast address (IPv4-mapped IPv6 judged as its IPv4)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not (
        ip.is_multicast or ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved or ip.is_unspecified
    )


def host_and_port(url: str) -> tuple[str, int] | None:
    """(host, port) of an http(s) URL; None for any other scheme or a URL without a host."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        return None
    return parts.hostname, port or (443 if scheme == "https" else 80)


async def check_http_url(url: str, policy: UrlPolicy) -> str | None:
    """``None`` if ``url`` may be requested, else the reason. All the host's addresses must be public, so a name that
    points at 127.0.0.1 is refused like the literal address; :class:`UnresolvableHost` when it does not resolve now."""
    target = host_and_port(url)
    if target is None:
        return "unsupported-scheme" if urlsplit(url).scheme.lower() not in ("http", "https") else "bad-url"
    host, port = target
    if policy.allows_host(host, port):
        return None
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OSError) as exc:
        raise UnresolvableHost(f"{host}: {exc}") from None
    addresses = {info[4][0] for info in infos}
    return REFUSED if not addresses or not all(is_public_address(a) for a in addresses) else None


def peer_allowed(url: str, peer: object, policy: UrlPolicy) -> bool:
    """Is the address a connection actually reached allowed? Closes the DNS-rebinding gap between check and connect."""
    target = host_and_port(url)
    if target is None:
        return False
    if policy.allows_host(*target):
        return True
    if not isinstance(peer, tuple) or not peer:
        return True  # transport gives no address (e.g. a test double): the name check stands
    return is_public_address(str(peer[0]))
