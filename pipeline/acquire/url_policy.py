"""Which image URLs the image stage may read: trust follows where the metadata came from.

Why: image URLs are data. Metadata downloaded from the internet is untrusted, so a URL inside it must not make this
machine read its own files (``file:///etc/passwd``, ``/dev/zero``, a FIFO) or call services on its own network
(``http://127.0.0.1``, ``10.x``, cloud metadata at ``169.254.169.254``), directly or through a redirect. Metadata the
user handed over as local files (their own dump, an MMRec folder, the bundled sample) is theirs: it may name local files
and private hosts, so a private image mirror keeps working. Hosts are judged by the addresses they resolve to, not by
their names, and every redirect hop is judged again."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

#: Where the metadata naming the image URLs came from.
Origin = Literal["network", "local"]

#: Reason recorded for a URL the policy does not allow (the same whether or not a named file exists).
REFUSED = "refused"


class UnresolvableHost(Exception):
    """The host name did not resolve now; may work later (a transient failure, not a refusal)."""


@dataclass(frozen=True)
class UrlPolicy:
    """What image URLs may point at. Picklable: it travels with shard jobs to processes and Dask workers.

    ``local_files``: ``file://`` URLs and plain paths may be read (regular files only).
    ``private_hosts``: http(s) hosts may resolve to loopback/private/link-local addresses.
    ``allowed_hosts``: ``host`` or ``host:port`` entries trusted even when private (an internal mirror named in
    downloaded metadata); the hosts a redirect leads to are judged on their own."""

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
        return {
            "local_files": self.local_files, "private_hosts": self.private_hosts,
            "allowed_hosts": sorted(self.allowed_hosts),
        }


def is_public_address(address: str) -> bool:
    """True for a globally routable unicast address (IPv4-mapped IPv6 judged as its IPv4)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not (
        ip.is_multicast or ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved
        or ip.is_unspecified
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
    """``None`` if ``url`` may be requested, else the reason (``refused``, ``unsupported-scheme``).

    Resolves the host (all its addresses must be public): a name that points at 127.0.0.1 is refused just like the
    literal address. Raises :class:`UnresolvableHost` when the name does not resolve now."""
    target = host_and_port(url)
    if target is None:
        return "unsupported-scheme" if urlsplit(url).scheme.lower() not in ("http", "https") else "bad-url"
    host, port = target
    if policy.allows_host(host, port):
        return None
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OSError) as exc:
        raise UnresolvableHost(f"{host}: {exc}") from None
    addresses = {info[4][0] for info in infos}
    return REFUSED if not addresses or not all(is_public_address(a) for a in addresses) else None


def peer_allowed(url: str, peer: object, policy: UrlPolicy) -> bool:
    """Is the address a connection actually reached allowed? Closes the gap of a name re-resolving to a private address
    between the check and the connect (DNS rebinding)."""
    target = host_and_port(url)
    if target is None:
        return False
    if policy.allows_host(*target):
        return True
    if not isinstance(peer, tuple) or not peer:
        return True  # transport gives no address (e.g. a test double): the name check stands
    return is_public_address(str(peer[0]))
