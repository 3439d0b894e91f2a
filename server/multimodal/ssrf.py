"""Which hosts and addresses a media URL may reach (the SSRF guard).

`HostPolicy` answers three questions, asked for every redirect hop and again by the
connection backend of `fetch.py` for the address it actually connects to:

  check_name(host)         host name allowed? (domain allow-list, cloud metadata names)
  resolve(host, port)      resolve ONCE, vet every address, return them (the fetcher then
                           connects to exactly these: no DNS-rebinding window)
  check_address(ip)        address allowed?

Refused by default: anything not globally routable (loopback, RFC1918, CGNAT 100.64/10,
link-local incl. fe80::/10, ULA fc00::/7, documentation and benchmark ranges), and IPv6 forms
that embed such an IPv4 address (mapped ::ffff:a.b.c.d, compatible ::a.b.c.d, NAT64, 6to4).
`allow_private_networks` opts into the non-global ranges; cloud metadata addresses and host
names, multicast, unspecified and reserved addresses are refused even then (no media lives
there, and 0.0.0.0 reaches the local host on Linux).
"""

from __future__ import annotations

import asyncio
import inspect
import ipaddress
import socket
from typing import Awaitable, Callable, Iterable, Sequence, Union

from vlmserve.multimodal.types import MediaError

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
# (host, port) -> addresses as strings; may be sync or async.
Resolver = Callable[[str, int], Union[Sequence[str], Awaitable[Sequence[str]]]]

PRIVATE_FLAG = "--allow-private-media-urls"
DOMAINS_FLAG = "--allowed-media-domains"

METADATA_HOSTNAMES = frozenset({
    "metadata", "metadata.google.internal", "metadata.goog",  # GCP
    "instance-data", "instance-data.ec2.internal",  # AWS
    "metadata.azure.com", "metadata.tencentyun.com", "metadata.platformequinix.com",
})
METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean, Oracle
    "169.254.170.2",  # AWS ECS task metadata
    "169.254.169.123",  # AWS time sync
    "100.100.100.200",  # Alibaba Cloud
    "fd00:ec2::254",  # AWS over IPv6
))
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_ULA = ipaddress.ip_network("fc00::/7")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_IPV4_COMPAT = ipaddress.ip_network("::/96")


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for, if it is one of the embedding forms."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64 or (ip in _IPV4_COMPAT and int(ip) > 1):  # :: and ::1 are not IPv4
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def address_refusal(ip: IPAddress, allow_private: bool) -> str | None:
    """Why `ip` may not be fetched from (a phrase for the error message), or None."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            ip = ipaddress.IPv6Address(int(ip))  # a zone id does not change the class
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            why = address_refusal(embedded, allow_private)
            return None if why is None else f"{why} (embedded in the IPv6 address)"
    if ip in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if ip.is_multicast:
        return "a multicast address"
    if ip.is_unspecified:
        return "the unspecified address"
    if ip.is_reserved:
        return "a reserved address"
    if allow_private or ip.is_global:
        return None
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address"
    if ip in _CGNAT:
        return "a carrier-grade NAT (100.64.0.0/10) address"
    if isinstance(ip, ipaddress.IPv6Address) and ip in _ULA:
        return "an IPv6 unique local (fc00::/7) address"
    if ip.is_private:
        return "a private-network address"
    return "not a globally routable address"


async def system_resolver(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [info[4][0] for info in infos]


def normalize_host(host: str) -> str:
    return host.strip().lower().rstrip(".").strip("[]")


class HostPolicy:
    def __init__(self, *, allowed_domains: Iterable[str] | None, allow_private: bool,
                 resolver: Resolver | None = None) -> None:
        self.allowed_domains = None if allowed_domains is None else tuple(allowed_domains)
        self.allow_private = allow_private
        self._resolver = resolver or system_resolver

    def check_name(self, host: str) -> None:
        name = normalize_host(host)
        if not name:
            raise MediaError("media URL has no host; expected http(s)://host/path")
        if name in METADATA_HOSTNAMES:
            raise MediaError(f"media URL host {name!r} is a cloud metadata service; "
                             "media cannot be fetched from it")
        if self.allowed_domains is not None and not self._domain_allowed(name):
            listed = ", ".join(self.allowed_domains) or "(none)"
            raise MediaError(f"media URL host {name!r} is not in the allowed media domains "
                             f"({listed}); the server's {DOMAINS_FLAG} sets them")
        literal = _ip_literal(name)
        if literal is not None:
            self.check_address(literal, host=name)

    def check_address(self, ip: IPAddress, host: str | None = None) -> None:
        why = address_refusal(ip, self.allow_private)
        if why is None:
            return
        where = f"{ip}" if host is None or host == str(ip) else f"{host!r} ({ip})"
        raise MediaError(f"media URL host {where} is {why}; only public internet addresses "
                         f"are fetched (private networks need the server's {PRIVATE_FLAG})")

    async def resolve(self, host: str, port: int) -> list[IPAddress]:
        """Resolves `host` once and vets every address. One bad address refuses the host: a
        name that also points inside the network is an attack, not a mirror."""
        name = normalize_host(host)
        literal = _ip_literal(name)
        if literal is not None:
            self.check_address(literal, host=name)
            return [literal]
        try:
            answer = self._resolver(name, port)
            if inspect.isawaitable(answer):
                answer = await answer
        except (OSError, UnicodeError) as e:
            raise MediaError(f"cannot resolve media URL host {name!r}: {e}") from None
        addresses: list[IPAddress] = []
        for text in answer:
            ip = ipaddress.ip_address(str(text).split("%")[0])
            self.check_address(ip, host=name)
            if ip not in addresses:
                addresses.append(ip)
        if not addresses:
            raise MediaError(f"media URL host {name!r} has no address")
        return addresses

    def _domain_allowed(self, name: str) -> bool:
        for entry in self.allowed_domains or ():
            if entry.startswith("*."):
                if name.endswith(entry[1:]):
                    return True
            elif name == entry:
                return True
        return False


def _ip_literal(name: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(name.split("%")[0])
    except ValueError:
        return None
