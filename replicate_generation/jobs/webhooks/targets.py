"""Which webhook URLs are accepted: the URL's shape, and for user callers only public addresses.

`parse_target` checks the URL without DNS; `public_addresses` resolves the host and checks
every address, which delivery then connects to (no second DNS answer is trusted).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

from urllib3.util import parse_url

from replicate_generation.errors import InvalidWebhook

MAX_URL_LENGTH = 2048
_DEFAULT_PORTS = {"http": 80, "https": 443}

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

IP = ipaddress.IPv4Address | ipaddress.IPv6Address


def _is_public(ip: IP) -> bool:
    """True only for a globally routable unicast address."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            return False
        if ip.ipv4_mapped is not None:
            return _is_public(ip.ipv4_mapped)
        if ip in _NAT64:  # DNS64-synthesised: judge the IPv4 address it stands for
            return _is_public(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    if any(ip.version == net.version and ip in net for net in _BLOCKED_NETWORKS):
        return False
    if (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast
            or ip.is_reserved or ip.is_unspecified):
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local:
        return False
    return ip.is_global


def _host_name_ok(host: str) -> bool:
    """A DNS name of letters, digits, '-' and '_' whose last label is not all digits.

    That rule refuses hosts like "127.1" that the C resolver reads as IPv4 and ipaddress does not.
    """
    if len(host) > 253:
        return False
    labels = host.split(".")
    for label in labels:
        if not 1 <= len(label) <= 63 or label[0] == "-" or label[-1] == "-":
            return False
        if not all(ch.isascii() and (ch.isalnum() or ch in "-_") for ch in label):
            return False
    return not labels[-1].isdigit()


@dataclass(frozen=True)
class Target:
    scheme: str
    host: str  # lower case, no trailing dot; an IPv6 literal without brackets
    port: int
    ip: IP | None  # the host when it is a literal address
    request_target: str  # path and query

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if self.ip is not None and self.ip.version == 6 else self.host
        return host if self.port == _DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"

    @property
    def url(self) -> str:
        """The URL normalised."""
        return f"{self.scheme}://{self.host_header}{self.request_target}"


def parse_target(url: object, *, allow_private: bool) -> Target:
    """Validate the URL's shape and policy (no DNS); return its normalised parts."""
    parts, port, raw_host = _split(_check_text(url))
    scheme = _check_scheme(parts.scheme, allow_private=allow_private)
    named = _check_authority(parts.netloc, raw_host, port)
    host, ip = _check_host(named, parts.netloc, allow_private=allow_private)
    target = Target(scheme=scheme, host=host, port=port or _DEFAULT_PORTS[scheme], ip=ip,
                    request_target=_request_target(parts))
    _check_same_parse(target)
    return target


def _check_text(url: object) -> str:
    """A string of at most MAX_URL_LENGTH printable ASCII characters, no spaces or backslash."""
    if not isinstance(url, str) or not url:
        raise InvalidWebhook("webhook must be a URL string")
    if len(url) > MAX_URL_LENGTH:
        raise InvalidWebhook(f"webhook URL is longer than {MAX_URL_LENGTH} characters")
    if any(not ch.isascii() or not ch.isprintable() or ch.isspace() for ch in url):
        raise InvalidWebhook("webhook URL must be ASCII with no whitespace or control characters"
                             " (percent-encode the path, punycode the host name)")
    if "\\" in url:
        raise InvalidWebhook("webhook URL must not contain a backslash")
    return url


def _split(url: str) -> tuple[SplitResult, int | None, str | None]:
    """The URL's parts, its port and its host name as urllib reads them."""
    try:
        parts = urlsplit(url)
        return parts, parts.port, parts.hostname
    except ValueError:
        raise InvalidWebhook("webhook URL is malformed (bad port or IPv6 address)") from None


def _check_scheme(raw_scheme: str, *, allow_private: bool) -> str:
    scheme = raw_scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise InvalidWebhook("webhook URL must start with https://"
                             if not allow_private else "webhook URL must be http:// or https://")
    if not allow_private and scheme != "https":
        raise InvalidWebhook("webhook URL must use https")
    return scheme


def _check_authority(netloc: str, raw_host: str | None, port: int | None) -> str:
    """A host, a usable port and no user info; return the host."""
    if "@" in netloc:
        raise InvalidWebhook("webhook URL must not contain a user name or password")
    if not raw_host:
        raise InvalidWebhook("webhook URL has no host")
    if port == 0:
        raise InvalidWebhook("webhook URL has an invalid port")
    return raw_host


def _check_host(raw_host: str, netloc: str, *, allow_private: bool) -> tuple[str, IP | None]:
    """The host normalised, and its address when it is a literal one (public unless allowed)."""
    host = raw_host[:-1] if raw_host.endswith(".") else raw_host
    ip: IP | None
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if ip is not None:
        if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id:
            raise InvalidWebhook("webhook URL must not use an IPv6 zone id")
        if not allow_private and not _is_public(ip):
            raise InvalidWebhook("webhook URL must point to a public address")
        return ip.compressed, ip
    if "[" in netloc or not _host_name_ok(host):
        raise InvalidWebhook("webhook URL has an invalid host name")
    return host, None


def _request_target(parts: SplitResult) -> str:
    request_target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    if not request_target.startswith("/"):
        raise InvalidWebhook("webhook URL is malformed")
    return request_target


def _check_same_parse(target: Target) -> None:
    """The HTTP stack parses URLs with its own parser: it must see the same host and port."""
    try:
        seen = parse_url(target.url)
    except ValueError:
        raise InvalidWebhook("webhook URL is malformed") from None
    same_host = (seen.host or "").strip("[]").lower() == target.host
    if not same_host or (seen.port or target.port) != target.port:
        raise InvalidWebhook("webhook URL is ambiguous")


def _system_resolve(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def public_addresses(target: Target, resolve: Resolver | None) -> list[IP]:
    """Every address the target's host resolves to, all checked public, in resolver order.

    :raises InvalidWebhook: does not resolve (retryable), or resolves to any non-public address.
    """
    if target.ip is not None:
        return [target.ip]
    try:
        answers = (resolve or _system_resolve)(target.host, target.port)
    except (OSError, UnicodeError):
        raise InvalidWebhook("webhook host could not be resolved", retryable=True) from None
    addresses: list[IP] = []
    for answer in answers:
        try:
            address = ipaddress.ip_address(answer)
        except ValueError:
            raise InvalidWebhook("webhook host resolved to an invalid address") from None
        if not _is_public(address):
            raise InvalidWebhook("webhook host resolves to a non-public address")
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise InvalidWebhook("webhook host could not be resolved", retryable=True)
    return addresses


def check_target(url: object, *, allow_private: bool, resolve: Resolver | None = None) -> str:
    """Validate a webhook URL against the SSRF policy (docs/webhooks.md); return it normalised.

    ``resolve`` replaces the system resolver (tests); InvalidWebhook never quotes the URL.
    """
    target = parse_target(url, allow_private=allow_private)
    if not allow_private:
        public_addresses(target, resolve)
    return target.url

