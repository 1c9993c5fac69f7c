"""Which addresses an outbound connection may reach: globally routable unicast only, unless the
operator names private ranges; a host name is resolved once and every answer checked."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable

from replicate_generation.errors import EgressRefused

IP = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

Resolver = Callable[[str, int], list[str]]
"""(host, port) -> the addresses it resolves to, as strings; raises OSError when it cannot."""

_BLOCKED_NETWORKS = tuple(ipaddress.ip_network(net) for net in (
    # IPv4 not globally routable (docs/webhooks.md), link-local for cloud metadata included.
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
    "172.16.0.0/12", "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16",
    "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",
    "255.255.255.255/32",
    # IPv6 likewise; ::/8, NAT64, Teredo and 6to4 too, as they can stand for an IPv4 address.
    "::/128", "::1/128", "::/8", "64:ff9b:1::/48", "100::/64", "2001::/23", "2001:db8::/32",
    "2002::/16", "3fff::/20", "fc00::/7", "fe80::/10", "fec0::/10", "ff00::/8",
))
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def is_public(ip: IP) -> bool:
    """True only for a globally routable unicast address."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            return False
        if ip.ipv4_mapped is not None:
            return is_public(ip.ipv4_mapped)
        if ip in _NAT64:  # DNS64-synthesised: judge the IPv4 address it stands for
            return is_public(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    if any(ip.version == net.version and ip in net for net in _BLOCKED_NETWORKS):
        return False
    if (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast
            or ip.is_reserved or ip.is_unspecified):
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local:
        return False
    return ip.is_global


def in_networks(ip: IP, networks: Iterable[Network]) -> bool:
    """True when the address (or the IPv4 address it maps) lies in one of the ranges."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip.version == net.version and ip in net for net in networks)


def parse_networks(text: str) -> tuple[Network, ...]:
    """Comma- or space-separated CIDR ranges ("10.0.0.0/8, fd00::/8"); ValueError names a bad
    one."""
    networks: list[Network] = []
    for part in text.replace(",", " ").split():
        try:
            networks.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise ValueError(f"{part!r} is not a CIDR range such as 10.0.0.0/8") from None
    return tuple(networks)


def system_resolve(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def checked_addresses(host: str, port: int, resolve: Resolver | None,
                      accept: Callable[[IP], bool], *, what: str) -> list[IP]:
    """Every address the host resolves to, each accepted, in resolver order (no duplicates).

    :raises EgressRefused: does not resolve (retryable), or any answer is not accepted.
    """
    try:
        answers = (resolve or system_resolve)(host, port)
    except (OSError, UnicodeError):
        raise EgressRefused(f"{what} could not be resolved", retryable=True) from None
    addresses: list[IP] = []
    for answer in answers:
        try:
            address = ipaddress.ip_address(answer)
        except ValueError:
            raise EgressRefused(f"{what} resolved to an invalid address") from None
        if not accept(address):
            raise EgressRefused(f"{what} resolves to a non-public address")
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise EgressRefused(f"{what} could not be resolved", retryable=True)
    return addresses
