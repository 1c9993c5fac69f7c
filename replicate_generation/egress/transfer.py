"""One GET under the egress policy: every hop checked and pinned, redirects followed by hand up to
the bound; then its body, read at a minimum rate before a deadline and inflated within a ratio."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple
from urllib.parse import urljoin

import requests
import urllib3.exceptions
from requests.structures import CaseInsensitiveDict

from replicate_generation.egress.pinning import pinned_tries
from replicate_generation.egress.policy import EgressPolicy, Hop
from replicate_generation.egress.urls import Target
from replicate_generation.errors import EgressRefused

_CHUNK_BYTES = 64 * 1024
_CONNECT_TIMEOUT = 5.0
# Below this many decoded bytes a high ratio is harmless (small, repetitive files compress well).
_RATIO_FLOOR_BYTES = 1024 * 1024
# Only what the body reader can inflate within its bounds.
_ACCEPT_ENCODING = "gzip, deflate"

HeadersFor = Callable[[Target], Mapping[str, str | None]]
"""The headers for one hop (e.g. a token for one origin only); None drops a session header."""


class Opened(NamedTuple):
    response: requests.Response
    url: str  # the last hop, by name


def open_get(session: requests.Session, url: str, policy: EgressPolicy, *, timeout: float,
             headers_for: HeadersFor, label: str) -> Opened:
    """GET the URL, following redirects only to URLs the policy accepts, at most max_redirects.

    :raises EgressRefused: a hop the policy refuses, or too many redirects.
    :raises requests.RequestException: the transport failed (the caller may retry).
    """
    current = url
    for hop_number in range(policy.max_redirects + 1):
        what = f"{label}: the URL" if hop_number == 0 else f"{label}: redirect {hop_number}"
        hop = policy.check(current, label=what)
        response = _get_hop(session, hop, headers_for(hop.target), timeout=timeout,
                            read_timeout=min(policy.stall_seconds, timeout))
        if not response.is_redirect:
            return Opened(response, hop.target.url)
        location = response.headers.get("Location", "")
        response.close()
        current = urljoin(hop.target.url, location)
    raise EgressRefused(f"{label} was redirected more than {policy.max_redirects} times "
                        "(EGRESS_MAX_REDIRECTS)")


def _get_hop(session: requests.Session, hop: Hop, headers: Mapping[str, str | None], *,
             timeout: float, read_timeout: float) -> requests.Response:
    """GET one checked hop at its pinned addresses, the next one only if none connected."""
    tries = pinned_tries(hop.target, hop.addresses)
    for number, (attempt_url, extra) in enumerate(tries, start=1):
        request = _prepared_get(session, attempt_url, {
            **headers, "Accept-Encoding": _ACCEPT_ENCODING, **extra})
        try:
            return session.send(
                request, stream=True, allow_redirects=False, verify=session.verify,
                cert=session.cert, proxies=session.proxies,
                timeout=(min(_CONNECT_TIMEOUT, timeout), read_timeout))
        except requests.ConnectionError as exc:
            if number == len(tries) or not never_connected(exc):
                raise
    raise AssertionError("unreachable: pinned_tries is never empty")


def _prepared_get(session: requests.Session, url: str,
                  headers: Mapping[str, str | None]) -> requests.PreparedRequest:
    """The GET as the session would prepare it (its headers, None dropping one, its auth,
    cookies, params and hooks) but never from the environment: a pinned request goes nowhere
    else. Session.request merges all that through generic paths that cost more than the send."""
    merged: CaseInsensitiveDict[str | bytes | None] = CaseInsensitiveDict(session.headers)
    merged.update(headers)
    request = requests.PreparedRequest()
    request.prepare(method="GET", url=url,
                    headers={name: value for name, value in merged.items() if value is not None},
                    params=session.params, auth=session.auth, cookies=session.cookies,
                    hooks=session.hooks)
    return request


def never_connected(exc: requests.RequestException) -> bool:
    """True when no connection was made, so the request was certainly not sent."""
    if isinstance(exc, requests.ConnectTimeout):
        return True
    reason = getattr(exc.args[0] if exc.args else None, "reason", None)
    return isinstance(reason, urllib3.exceptions.NewConnectionError)


class _Pace:
    """The transfer's deadline, and its rate over each window of stall_seconds."""

    def __init__(self, policy: EgressPolicy, clock: Callable[[], float], deadline: float,
                 label: str) -> None:
        self._policy = policy
        self._clock = clock
        self._deadline = deadline
        self._label = label
        self._since = clock()
        self._mark = 0

    def step(self, wire_bytes: int) -> None:
        now = self._clock()
        if now > self._deadline:
            raise EgressRefused(f"{self._label} did not finish before the deadline "
                                "(EGRESS_DOWNLOAD_SECONDS)")
        elapsed = now - self._since
        if elapsed < self._policy.stall_seconds:
            return
        if wire_bytes - self._mark < self._policy.min_bytes_per_second * elapsed:
            raise too_slow(self._label, self._policy)
        self._since, self._mark = now, wire_bytes


def too_slow(label: str, policy: EgressPolicy) -> EgressRefused:
    return EgressRefused(f"{label} arrived slower than {policy.min_bytes_per_second} bytes/s "
                         "(EGRESS_MIN_BYTES_PER_SECOND)")


def read_body(response: requests.Response, policy: EgressPolicy, *, deadline: float,
              clock: Callable[[], float], label: str) -> Iterator[bytes]:
    """The decoded body in pieces of at most 64 KiB, within the policy's rate, deadline and ratio.

    read1(), not iter_content(), which waits for whole chunks: a trickle could beat the deadline.
    :raises EgressRefused: too slow, too late, or inflating beyond max_decompression_ratio.
    :raises urllib3.exceptions.HTTPError: the transport failed or the encoding is corrupt.
    """
    raw = response.raw
    pace = _Pace(policy, clock, deadline, label)
    decoded = 0
    while chunk := _read_piece(raw, label, policy):
        decoded += len(chunk)
        wire = max(1, raw.tell())  # compressed bytes off the socket so far
        if decoded > _RATIO_FLOOR_BYTES and decoded > policy.max_decompression_ratio * wire:
            raise EgressRefused(f"{label} inflates more than {policy.max_decompression_ratio:g} "
                                "times its transferred size (EGRESS_MAX_DECOMPRESSION_RATIO)")
        pace.step(wire)
        yield chunk


def _read_piece(raw: Any, label: str, policy: EgressPolicy) -> bytes:
    """The next piece; nothing for a whole stall window (the read timeout) is below any rate."""
    try:
        piece: bytes = raw.read1(_CHUNK_BYTES, decode_content=True)
    except urllib3.exceptions.ReadTimeoutError:
        raise too_slow(label, policy) from None
    return piece
