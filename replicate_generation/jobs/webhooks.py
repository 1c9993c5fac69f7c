"""Job-completion webhooks, signed the Standard Webhooks way, sent only to checked addresses.

Non-admin callers may name only https hosts that resolve to public addresses, and every delivery
connects to the address checked (docs/webhooks.md). Nothing here sleeps or keeps state."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import http.cookiejar
import ipaddress
import json
import math
import random
import secrets
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast
from urllib.parse import urlsplit

import requests
import urllib3.exceptions
from requests.adapters import HTTPAdapter
from urllib3.util import parse_url

from replicate_generation import metrics
from replicate_generation.errors import InvalidWebhook

if TYPE_CHECKING:
    from requests.adapters import _HostParams, _PoolKwargs

__all__ = [
    "MAX_ATTEMPTS",
    "USER_AGENT",
    "DeliveryResult",
    "InvalidWebhook",
    "Resolver",
    "backoff",
    "check_target",
    "deliver",
    "new_msg_id",
    "new_secret",
    "new_session",
    "retry_delay",
    "secret_bytes",
    "sign",
    "verify",
]

MAX_ATTEMPTS = 8
USER_AGENT = "replicate-concurrent-generation-webhooks/1"
MAX_URL_LENGTH = 2048
# Of a receiver's answer only the status line and headers are read (http.client caps those at
# 100 headers of 64 KiB); the body is never read, and the connection is closed.
_MAX_ADDRESSES = 3  # addresses of one host tried in turn when a connection cannot be made
_MAX_RETRY_AFTER = 86400.0
_SECRET_PREFIX = "whsec_"  # noqa: S105 - the Standard Webhooks secret prefix, not a secret
_DEFAULT_PORTS = {"http": 80, "https": 443}

Resolver = Callable[[str, int], list[str]]
"""(host, port) -> the addresses it resolves to, as strings; raises OSError when it cannot."""


# --------------------------------------------------------------------------- errors


# --------------------------------------------------------------------------- signing


def new_secret() -> str:
    """A fresh ``whsec_`` secret: 32 random bytes, base64-encoded."""
    return _SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode("ascii")


def new_msg_id() -> str:
    """A fresh message id (no ``.``, which would blur the signed content's fields)."""
    return "msg_" + secrets.token_urlsafe(18)


def secret_bytes(secret: str) -> bytes:
    """The HMAC key: ``whsec_<base64>`` decoded, any other string as UTF-8.

    :raises InvalidWebhook: empty, or a ``whsec_`` secret that is not valid base64 (the message
        never quotes the secret).
    """
    if not isinstance(secret, str) or not secret:
        raise InvalidWebhook("the webhook secret must be a non-empty string")
    if not secret.startswith(_SECRET_PREFIX):
        return secret.encode("utf-8")
    try:
        key = base64.b64decode(secret[len(_SECRET_PREFIX):], validate=True)
    except (binascii.Error, ValueError):
        raise InvalidWebhook("the whsec_ webhook secret is not valid base64") from None
    if not key:
        raise InvalidWebhook("the whsec_ webhook secret is empty")
    return key


def _check_header_value(name: str, value: str) -> None:
    if not value or "." in value or not all("!" <= ch <= "~" for ch in value):
        raise ValueError(f"{name} must be non-empty printable ASCII without spaces or '.'")


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """``v1,<base64(HMAC-SHA256(secret_bytes(secret), f"{msg_id}.{timestamp}.{body}"))>``.

    :raises ValueError: msg_id is empty or holds a ``.``, a space or a non-ASCII character.
    """
    _check_header_value("msg_id", msg_id)
    if isinstance(timestamp, bool) or not isinstance(timestamp, int) or timestamp < 0:
        raise ValueError("timestamp must be a non-negative integer (unix seconds)")
    signed = f"{msg_id}.{timestamp}.".encode("ascii") + body
    digest = hmac.new(secret_bytes(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def _header(headers: Mapping[str, str], name: str) -> str | None:
    """A header by its lower-case name, whatever case the mapping uses."""
    value = headers.get(name)
    if value is None:
        for key, candidate in headers.items():
            if key.lower() == name:
                return candidate
    return value


def verify(
    secret: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    tolerance: int = 300,
    now: float | None = None,
) -> bool:
    """True when ``headers`` carry a valid ``v1`` signature of ``body`` made at most
    ``tolerance`` seconds from ``now`` (either way). Header names match in any case (pass
    ``dict(request.headers)`` from Flask). Any one of several space-separated signatures may
    match (secret rotation); comparison is constant-time.

    :raises InvalidWebhook: the secret itself is malformed (a configuration error).
    """
    key = secret_bytes(secret)
    msg_id = _header(headers, "webhook-id")
    stamp = _header(headers, "webhook-timestamp")
    signatures = _header(headers, "webhook-signature")
    if not msg_id or not stamp or not signatures:
        return False
    if not (stamp.isascii() and stamp.isdigit()) or len(stamp) > 15:
        return False
    current = time.time() if now is None else now
    if abs(current - int(stamp)) > tolerance:
        return False
    signed = f"{msg_id}.{stamp}.".encode("utf-8", "surrogateescape") + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest())
    found = False
    for item in signatures.split(" "):
        version, _, candidate = item.partition(",")
        if version == "v1":
            # No early exit: every candidate is compared, in constant time.
            found |= hmac.compare_digest(expected, candidate.encode("utf-8", "surrogateescape"))
    return found


# --------------------------------------------------------------------------- targets

_BLOCKED_NETWORKS = tuple(ipaddress.ip_network(net) for net in (
    # IPv4: "this network", private, CGNAT, loopback, link-local (cloud metadata at
    # 169.254.169.254), IETF protocol assignments, documentation, 6to4 relay, benchmarking,
    # multicast, reserved and broadcast.
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
    "172.16.0.0/12", "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16",
    "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",
    "255.255.255.255/32",
    # IPv6: unspecified, loopback, IPv4-compatible and other ::/8, local-use NAT64, discard,
    # IETF protocol assignments (Teredo included), documentation, 6to4, unique-local,
    # link-local, site-local, multicast.
    "::/128", "::1/128", "::/8", "64:ff9b:1::/48", "100::/64", "2001::/23", "2001:db8::/32",
    "2002::/16", "3fff::/20", "fc00::/7", "fe80::/10", "fec0::/10", "ff00::/8",
))
_NAT64 = ipaddress.ip_network("64:ff9b::/96")

_IP = ipaddress.IPv4Address | ipaddress.IPv6Address


def _is_public(ip: _IP) -> bool:
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

    The last rule turns away the numeric forms the C resolver reads as IPv4 ("127.1",
    "2130706433", "0177.0.0.1") that ipaddress does not parse.
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
class _Target:
    url: str  # normalised
    scheme: str
    host: str  # lower case, no trailing dot; an IPv6 literal without brackets
    port: int
    ip: _IP | None  # the host when it is a literal address
    request_target: str  # path and query

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if self.ip is not None and self.ip.version == 6 else self.host
        return host if self.port == _DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"


def _parse_target(url: object, *, allow_private: bool) -> _Target:
    """Validate the URL's shape and policy (no DNS); return its normalised parts."""
    if not isinstance(url, str) or not url:
        raise InvalidWebhook("webhook must be a URL string")
    if len(url) > MAX_URL_LENGTH:
        raise InvalidWebhook(f"webhook URL is longer than {MAX_URL_LENGTH} characters")
    if any(not ch.isascii() or not ch.isprintable() or ch.isspace() for ch in url):
        raise InvalidWebhook("webhook URL must be ASCII with no whitespace or control characters"
                             " (percent-encode the path, punycode the host name)")
    if "\\" in url:
        raise InvalidWebhook("webhook URL must not contain a backslash")
    try:
        parts = urlsplit(url)
        port = parts.port
        raw_host = parts.hostname
    except ValueError:
        raise InvalidWebhook("webhook URL is malformed (bad port or IPv6 address)") from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise InvalidWebhook("webhook URL must start with https://"
                             if not allow_private else "webhook URL must be http:// or https://")
    if not allow_private and scheme != "https":
        raise InvalidWebhook("webhook URL must use https")
    if "@" in parts.netloc:
        raise InvalidWebhook("webhook URL must not contain a user name or password")
    if not raw_host:
        raise InvalidWebhook("webhook URL has no host")
    if port == 0:
        raise InvalidWebhook("webhook URL has an invalid port")
    host = raw_host[:-1] if raw_host.endswith(".") else raw_host
    ip: _IP | None
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if ip is not None:
        if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id:
            raise InvalidWebhook("webhook URL must not use an IPv6 zone id")
        if not allow_private and not _is_public(ip):
            raise InvalidWebhook("webhook URL must point to a public address")
        host = ip.compressed
    elif "[" in parts.netloc or not _host_name_ok(host):
        raise InvalidWebhook("webhook URL has an invalid host name")
    port = port or _DEFAULT_PORTS[scheme]
    request_target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    if not request_target.startswith("/"):
        raise InvalidWebhook("webhook URL is malformed")
    shown_host = f"[{host}]" if ip is not None and ip.version == 6 else host
    shown_port = "" if port == _DEFAULT_PORTS[scheme] else f":{port}"
    normalised = f"{scheme}://{shown_host}{shown_port}{request_target}"
    # The HTTP stack parses URLs with its own parser: it must see the same host and port.
    try:
        seen = parse_url(normalised)
    except ValueError:
        raise InvalidWebhook("webhook URL is malformed") from None
    if (seen.host or "").strip("[]").lower() != host or (seen.port or port) != port:
        raise InvalidWebhook("webhook URL is ambiguous")
    return _Target(url=normalised, scheme=scheme, host=host, port=port, ip=ip,
                   request_target=request_target)


def _system_resolve(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def _public_addresses(target: _Target, resolve: Resolver | None) -> list[_IP]:
    """Every address the target's host resolves to, all checked public, in resolver order.

    :raises InvalidWebhook: does not resolve (retryable), or resolves to any non-public address.
    """
    if target.ip is not None:
        return [target.ip]
    try:
        answers = (resolve or _system_resolve)(target.host, target.port)
    except (OSError, UnicodeError):
        raise InvalidWebhook("webhook host could not be resolved", retryable=True) from None
    addresses: list[_IP] = []
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
    """Validate a webhook URL against the SSRF policy and return it normalised.

    Any caller: http(s), a host, no user info, at most 2048 printable ASCII characters.
    ``allow_private=False`` (user-token callers) also needs https and a host whose every address
    (or the literal address itself) is globally routable. ``resolve`` replaces the system
    resolver (tests).

    :raises InvalidWebhook: with a message safe to show the caller (it never quotes the URL).
    """
    target = _parse_target(url, allow_private=allow_private)
    if not allow_private:
        _public_addresses(target, resolve)
    return target.url


# --------------------------------------------------------------------------- delivery


@dataclass(frozen=True)
class DeliveryResult:
    """The outcome of one attempt.

    ``ok``: the receiver answered 2xx. ``status``: its status, None when none came.
    ``error``: why not, safe to store and show (never the secret, the signature or the URL's
    query). ``retry_after``: the receiver's Retry-After, in seconds. ``retryable``: a later
    attempt may succeed; false on success, on 410 Gone and on a target that is no longer
    acceptable.
    """

    ok: bool
    status: int | None
    error: str | None
    retry_after: float | None
    retryable: bool = False

    @property
    def gone(self) -> bool:
        """The receiver answered 410 Gone: stop sending to this URL."""
        return self.status == 410


class _PinnedHostAdapter(HTTPAdapter):
    """For a request sent to an IP address with a ``Host`` header naming a host, do TLS as that
    host: SNI and the certificate's name check use the Host header's name, not the IP."""

    def build_connection_pool_key_attributes(
        self, request: requests.PreparedRequest, verify: bool | str,
        cert: str | tuple[str, str] | None = None,
    ) -> tuple[_HostParams, _PoolKwargs]:
        host_params, pool_kwargs = super().build_connection_pool_key_attributes(
            request, verify, cert)
        host_header = request.headers.get("Host")
        if (host_params["scheme"] == "https" and _is_ip(str(host_params["host"]))
                and host_header and "]" not in host_header):
            name = host_header.rsplit(":", 1)[0]
            if not _is_ip(name):
                # A pool-key field: pools for different names never share connections.
                cast("dict[str, object]", pool_kwargs)["server_hostname"] = name
        return host_params, pool_kwargs


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def new_session() -> requests.Session:
    """A Session fit for deliveries: no proxies, .netrc or cookies from the environment, and
    TLS to a pinned address checked against the host's name. Pass one to ``deliver`` to reuse
    connections; a plain Session fails every pinned https delivery (the name check fails)."""
    session = requests.Session()
    session.trust_env = False
    session.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
    adapter = _PinnedHostAdapter(max_retries=0)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    return session


def _parse_retry_after(value: str | None) -> float | None:
    """Retry-After in seconds (the HTTP-date form is ignored), clamped to a day."""
    try:
        seconds = float(value) if value else None
    except ValueError:
        return None
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return None
    return min(seconds, _MAX_RETRY_AFTER)


def _never_connected(exc: requests.RequestException) -> bool:
    """True when no connection was made, so the request was certainly not sent."""
    if isinstance(exc, requests.ConnectTimeout):
        return True
    reason = getattr(exc.args[0] if exc.args else None, "reason", None)
    return isinstance(reason, urllib3.exceptions.NewConnectionError)


def _failure(exc: requests.RequestException, timeout: float) -> DeliveryResult:
    """A transport error as a result; the text comes from the error's type only."""
    if isinstance(exc, requests.exceptions.SSLError):
        reason = "TLS handshake with the receiver failed (certificate or protocol)"
    elif isinstance(exc, requests.ConnectTimeout):
        reason = f"could not connect to the receiver within {timeout:g} s"
    elif isinstance(exc, requests.ReadTimeout):
        reason = f"the receiver did not answer within {timeout:g} s"
    elif isinstance(exc, requests.ConnectionError):
        reason = ("could not connect to the receiver" if _never_connected(exc)
                  else "the connection to the receiver failed")
    else:
        return DeliveryResult(ok=False, status=None, retry_after=None, retryable=False,
                              error=f"the webhook could not be sent ({type(exc).__name__})")
    return DeliveryResult(ok=False, status=None, error=reason, retry_after=None, retryable=True)


def _from_response(response: requests.Response) -> DeliveryResult:
    status = response.status_code
    if 200 <= status <= 299:
        return DeliveryResult(ok=True, status=status, error=None, retry_after=None)
    if status == 410:
        return DeliveryResult(ok=False, status=status, retry_after=None, retryable=False,
                              error="the receiver answered 410 Gone: no more deliveries")
    if 300 <= status <= 399:
        error = f"the receiver answered {status}: redirects are not followed, fix the URL"
    else:
        error = f"the receiver answered {status}"
    return DeliveryResult(ok=False, status=status, error=error, retryable=True,
                          retry_after=_parse_retry_after(response.headers.get("Retry-After")))


def _scrub(result: DeliveryResult, secret: str) -> DeliveryResult:
    """Belt and braces: no error text may carry the secret or its key."""
    if result.error is None:
        return result
    error = result.error
    for needle in {secret, secret.removeprefix(_SECRET_PREFIX)}:
        if len(needle) >= 4:
            error = error.replace(needle, "[redacted]")
    if error == result.error:
        return result
    return DeliveryResult(ok=result.ok, status=result.status, error=error,
                          retry_after=result.retry_after, retryable=result.retryable)


def deliver(
    url: str,
    payload: Mapping[str, object],
    *,
    secret: str,
    msg_id: str,
    allow_private: bool,
    timeout: float = 10.0,
    session: requests.Session | None = None,
    clock: Callable[[], float] = time.time,
    resolve: Resolver | None = None,
) -> DeliveryResult:
    """Make one delivery attempt and report how it went; never raises for a network problem.

    The target is checked again (DNS may have changed since it was accepted); with
    ``allow_private=False`` the connection goes to one of the addresses just checked, never to
    a fresh DNS answer. Redirects are never followed (a 3xx is a failure). ``timeout`` bounds
    the connection and each read. 2xx is success; 410 is final; anything else may be retried,
    after at least ``retry_after`` when the receiver said so.

    :raises ValueError: msg_id is malformed; TypeError or ValueError: payload is not
        JSON-serialisable (bugs); InvalidWebhook: the secret is malformed (configuration).
    """
    _check_header_value("msg_id", msg_id)
    secret_bytes(secret)  # a malformed secret is a configuration error: raise, do not report
    try:
        target = _parse_target(url, allow_private=allow_private)
        addresses = None if allow_private else _public_addresses(target, resolve)
    except InvalidWebhook as exc:
        return DeliveryResult(ok=False, status=None, error=exc.message, retry_after=None,
                              retryable=exc.retryable)
    body = json.dumps(payload, separators=(",", ":"), allow_nan=False).encode("ascii")
    timestamp = int(clock())
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, msg_id, timestamp, body),
    }
    # (url, extra headers) per try: the name itself, or each checked address in turn.
    tries: list[tuple[str, dict[str, str]]] = []
    if addresses is None or target.ip is not None:
        tries.append((target.url, {}))
    else:
        for address in addresses[:_MAX_ADDRESSES]:
            shown = f"[{address.compressed}]" if address.version == 6 else address.compressed
            tries.append((f"{target.scheme}://{shown}:{target.port}{target.request_target}",
                          {"Host": target.host_header}))
    own_session = session is None
    http = new_session() if session is None else session
    result = DeliveryResult(ok=False, status=None, error="not attempted", retry_after=None)
    try:
        for attempt_url, extra in tries:
            try:
                response = http.post(attempt_url, data=body, headers={**headers, **extra},
                                     timeout=(timeout, timeout), allow_redirects=False,
                                     stream=True)
            except requests.RequestException as exc:
                result = _failure(exc, timeout)
                if _never_connected(exc):
                    continue  # nothing was sent: the next address may answer
                break
            try:
                result = _from_response(response)
            finally:
                response.close()  # the body is never read
            break
    finally:
        if own_session:
            http.close()
    metrics.webhook_delivery("delivered" if result.ok else "failed")
    return _scrub(result, secret)


# --------------------------------------------------------------------------- retries


def backoff(
    attempt: int,
    *,
    base: float = 5.0,
    cap: float = 3600.0,
    factor: float = 4.0,
    jitter: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1 = the first).

    ``d = min(cap, base * factor ** (attempt - 1))``, then "equal jitter": a uniform draw in
    ``[d/2, d]``, so delays grow, spread out, and never exceed ``cap``.
    """
    if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1:
        raise ValueError("attempt must be an integer >= 1")
    if base <= 0 or cap <= 0 or factor < 1:
        raise ValueError("base and cap must be positive and factor at least 1")
    exponent = min(attempt - 1, 1000)
    try:
        delay = min(cap, base * factor ** exponent)
    except OverflowError:
        delay = cap
    draw = min(max(jitter(), 0.0), 1.0)
    return delay / 2 + draw * delay / 2


def retry_delay(
    result: DeliveryResult,
    attempt: int,
    *,
    max_attempts: int = MAX_ATTEMPTS,
    base: float = 5.0,
    cap: float = 3600.0,
    jitter: Callable[[], float] = random.random,
) -> float | None:
    """Seconds until the next attempt after attempt number ``attempt`` gave ``result``, or None
    when there is none (success, not retryable, or ``max_attempts`` reached). A receiver's
    Retry-After is honoured, up to ``cap``."""
    if result.ok or not result.retryable or attempt >= max_attempts:
        return None
    delay = backoff(attempt, base=base, cap=cap, jitter=jitter)
    if result.retry_after is not None:
        delay = max(delay, min(result.retry_after, cap))
    return delay
