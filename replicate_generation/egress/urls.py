"""An outbound URL's shape, checked without DNS: http(s), a host the resolver and our HTTP stack
read the same way, no user info; `Target` is the URL normalised, ready to pin."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

from urllib3.util import parse_url

from replicate_generation.egress.addresses import IP
from replicate_generation.errors import EgressRefused

DEFAULT_PORTS = {"http": 80, "https": 443}
# Printable ASCII but the space: what a URL may hold as sent.
_VISIBLE_ASCII = re.compile(r"[\x21-\x7e]*")


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
        return host if self.port == DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"

    @property
    def url(self) -> str:
        """The URL normalised."""
        return f"{self.scheme}://{self.host_header}{self.request_target}"

    @property
    def origin(self) -> tuple[str, str, int]:
        return self.scheme, self.host, self.port


def parse_target(url: str, *, label: str, max_length: int, https_only: bool = False,
                 literal_ok: Callable[[IP], bool] | None = None) -> Target:
    """Check the URL's shape (no DNS); a literal address must pass `literal_ok` when given.

    Messages start with `label` ("webhook URL") and never quote the URL.
    """
    _check_text(url, label, max_length)
    parts, port, raw_host = _split(url, label)
    scheme = _check_scheme(parts.scheme, label, https_only=https_only)
    named = _check_authority(parts.netloc, raw_host, port, label)
    host, ip = _check_host(named, parts.netloc, label, literal_ok)
    target = Target(scheme=scheme, host=host, port=port or DEFAULT_PORTS[scheme], ip=ip,
                    request_target=_request_target(parts, label))
    _check_same_parse(target, label)
    return target


def _check_text(url: str, label: str, max_length: int) -> None:
    """At most max_length printable ASCII characters, no spaces or backslash."""
    if len(url) > max_length:
        raise EgressRefused(f"{label} is longer than {max_length} characters")
    if _VISIBLE_ASCII.fullmatch(url) is None:
        raise EgressRefused(f"{label} must be ASCII with no whitespace or control characters"
                            " (percent-encode the path, punycode the host name)")
    if "\\" in url:
        raise EgressRefused(f"{label} must not contain a backslash")


def _split(url: str, label: str) -> tuple[SplitResult, int | None, str | None]:
    """The URL's parts, its port and its host name as urllib reads them."""
    try:
        parts = urlsplit(url)
        return parts, parts.port, parts.hostname
    except ValueError:
        raise EgressRefused(f"{label} is malformed (bad port or IPv6 address)") from None


def _check_scheme(raw_scheme: str, label: str, *, https_only: bool) -> str:
    scheme = raw_scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise EgressRefused(f"{label} must start with https://" if https_only
                            else f"{label} must be http:// or https://")
    if https_only and scheme != "https":
        raise EgressRefused(f"{label} must use https")
    return scheme


def _check_authority(netloc: str, raw_host: str | None, port: int | None, label: str) -> str:
    """A host, a usable port and no user info; return the host."""
    if "@" in netloc:
        raise EgressRefused(f"{label} must not contain a user name or password")
    if not raw_host:
        raise EgressRefused(f"{label} has no host")
    if port == 0:
        raise EgressRefused(f"{label} has an invalid port")
    return raw_host


def _check_host(raw_host: str, netloc: str, label: str,
                literal_ok: Callable[[IP], bool] | None) -> tuple[str, IP | None]:
    """The host normalised, and its address when it is a literal one."""
    host = raw_host[:-1] if raw_host.endswith(".") else raw_host
    ip: IP | None
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if ip is not None:
        if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id:
            raise EgressRefused(f"{label} must not use an IPv6 zone id")
        if literal_ok is not None and not literal_ok(ip):
            raise EgressRefused(f"{label} must point to a public address")
        return ip.compressed, ip
    if "[" in netloc or not host_name_ok(host):
        raise EgressRefused(f"{label} has an invalid host name")
    return host, None


def host_name_ok(host: str) -> bool:
    """A DNS name of letters, digits, '-' and '_' whose last label is not all digits.

    That rule refuses hosts like "127.1" that the C resolver reads as IPv4 and ipaddress does not.
    """
    if len(host) > 253:
        return False
    labels = host.split(".")
    for part in labels:
        if not 1 <= len(part) <= 63 or part[0] == "-" or part[-1] == "-":
            return False
        if not all(ch.isascii() and (ch.isalnum() or ch in "-_") for ch in part):
            return False
    return not labels[-1].isdigit()


def _request_target(parts: SplitResult, label: str) -> str:
    request_target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    if not request_target.startswith("/"):
        raise EgressRefused(f"{label} is malformed")
    return request_target


def _check_same_parse(target: Target, label: str) -> None:
    """The HTTP stack parses URLs with its own parser: it must see the same host and port."""
    try:
        seen = parse_url(target.url)
    except ValueError:
        raise EgressRefused(f"{label} is malformed") from None
    same_host = (seen.host or "").strip("[]").lower() == target.host
    if not same_host or (seen.port or target.port) != target.port:
        raise EgressRefused(f"{label} is ambiguous")
