"""Fetch an output over HTTP(S) into a bounded sink, under the egress policy: address checked and
pinned, redirects checked, a minimum rate, a deadline per file, bounded inflation, and the
prediction's and job's bounds on files and bytes; retries, token scope.

Transient failures (connection errors, timeouts, 429, 5xx) are retried with backoff while the
deadline allows; the Bearer token goes only to the one origin it was given for.
"""

from __future__ import annotations

import hashlib
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from typing import IO, NamedTuple
from urllib.parse import urlsplit

import requests
import urllib3.exceptions

from replicate_generation.egress import (
    Budget,
    EgressPolicy,
    EgressRefused,
    OutputBounds,
    Target,
    new_session,
    open_get,
    read_body,
)
from replicate_generation.outputs.base import DownloadError, file_errors
from replicate_generation.outputs.formats import HEAD_BYTES

_BACKOFF_BASE = 0.2
HTTP_PORTS: Mapping[str, int] = {"http": 80, "https": 443}
_local = threading.local()

Origin = tuple[str, str, int]


class Fetch(NamedTuple):
    """Everything one save_outputs call needs to fetch a URL."""

    session: requests.Session
    deadline: float
    clock: Callable[[], float]
    max_bytes: int
    attempts: int
    auth_token: str | None
    auth_origin: Origin | None
    policy: EgressPolicy
    budget: Budget


class Hints(NamedTuple):
    """What the transport says about a payload, for when magic bytes say nothing."""

    content_type: str | None
    url: str | None


class _Retryable(Exception):
    """A transient failure: connection error, timeout, 429 or 5xx."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class Sink:
    """Write one output to its temp file, enforcing max_bytes and the budget, keeping the head."""

    def __init__(self, fh: IO[bytes], number: int, max_bytes: int, budget: Budget) -> None:
        self._fh = fh
        self._number = number
        self._max_bytes = max_bytes
        self._budget = budget
        self.head = b""
        self.size = 0
        self.digest = hashlib.sha256()  # stored with the file, checked when it is read

    def reset(self) -> None:
        """Start over, e.g. before a retry."""
        with file_errors(f"output {self._number}"):
            self._fh.seek(0)
            self._fh.truncate()
        self._budget.give_back(0, self.size)
        self.head = b""
        self.size = 0
        self.digest = hashlib.sha256()

    def uncount(self) -> None:
        """Give this file's bytes back to the budget: it is not kept."""
        self._budget.give_back(0, self.size)
        self.size = 0

    def write(self, data: bytes) -> None:
        if self.size + len(data) > self._max_bytes:
            raise DownloadError(
                f"output {self._number} is larger than the {self._max_bytes}-byte limit",
                refused=True)
        try:
            self._budget.take(0, len(data))
        except EgressRefused as exc:
            raise DownloadError(f"output {self._number} was not saved: {exc.message}",
                                refused=True, exhausted=True) from None
        self.size += len(data)
        self.digest.update(data)
        if len(self.head) < HEAD_BYTES:
            self.head += data[: HEAD_BYTES - len(self.head)]
        with file_errors(f"output {self._number}"):
            self._fh.write(data)


def new_fetch(
    *,
    session: requests.Session | None,
    deadline: float,
    clock: Callable[[], float],
    max_bytes: int,
    attempts: int,
    auth_token: str | None,
    auth_origin: str | None,
    policy: EgressPolicy | None = None,
    budget: Budget | None = None,
) -> Fetch:
    """Bundle one call's fetch settings; this thread's Session unless one is given.

    Without a policy only public addresses are reached; without a budget, the default bounds.
    """
    return Fetch(
        session=session if session is not None else _thread_session(),
        deadline=deadline,
        clock=clock,
        max_bytes=max_bytes,
        attempts=attempts,
        auth_token=auth_token,
        auth_origin=_parse_auth_origin(auth_token, auth_origin),
        policy=policy if policy is not None else EgressPolicy(),
        budget=budget if budget is not None else Budget(OutputBounds()),
    )


def _thread_session() -> requests.Session:
    """Return this thread's Session: requests Sessions are not promised thread-safe."""
    session: requests.Session | None = getattr(_local, "session", None)
    if session is None:
        # Pinned and stateless: no proxy, and no tenant's cookie rides along on another's download.
        session = new_session()
        # Close the pooled sockets with the thread, not whenever the garbage collector runs.
        weakref.finalize(threading.current_thread(), session.close)
        _local.session = session
    return session


def _parse_auth_origin(auth_token: str | None, auth_origin: str | None) -> Origin | None:
    """Without both a token and an origin, no Authorization header is ever sent."""
    if not auth_token or auth_origin is None:
        return None
    origin = _origin(auth_origin)
    if origin is None:
        raise ValueError("auth_origin must be an http(s) origin such as https://api.replicate.com")
    return origin


def _origin(url: str) -> Origin | None:
    """Return (scheme, host, port) with the default port filled in, or None."""
    try:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in HTTP_PORTS or not parts.hostname:
            return None
        return scheme, parts.hostname, parts.port or HTTP_PORTS[scheme]
    except ValueError:  # bad port or malformed IPv6 literal
        return None


def _redact(url: str) -> str:
    """Quote a URL minus userinfo, query and fragment: signed URLs carry secrets."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "an unparsable URL"
    if ":" in host:
        host = f"[{host}]"
    text = f"{parts.scheme}://{host}{'' if port is None else f':{port}'}{parts.path}"
    if not text.isprintable():
        text = "".join(ch if ch.isprintable() else "?" for ch in text)
    return text if len(text) <= 200 else text[:197] + "..."


def _retry_after(value: str | None) -> float | None:
    """Read a Retry-After in seconds; the rare HTTP-date form is ignored."""
    try:
        seconds = float(value) if value else None
    except ValueError:
        return None
    return seconds if seconds is not None and 0 <= seconds < float("inf") else None


def download(sink: Sink, url: str, number: int, fetch: Fetch) -> Hints:
    """GET url into the sink, retrying transient failures while this file's deadline allows."""
    label = f"output {number} ({_redact(url)})"
    fetch = fetch._replace(deadline=min(fetch.deadline,
                                        fetch.clock() + fetch.policy.download_seconds))
    attempt = 1
    while True:
        try:
            return _download_once(sink, url, label, fetch)
        except _Retryable as exc:
            if attempt >= fetch.attempts or not _wait_before_retry(attempt, exc, fetch):
                raise DownloadError(
                    f"{label} failed after {attempt} attempt(s): {exc.reason}"
                ) from None
        except EgressRefused as exc:
            raise DownloadError(exc.message, refused=True, exhausted=exc.exhausted) from None
        attempt += 1


def _wait_before_retry(attempt: int, exc: _Retryable, fetch: Fetch) -> bool:
    """Sleep the backoff (or Retry-After) unless that would pass the deadline."""
    delay = _BACKOFF_BASE * 2 ** (attempt - 1)
    if exc.retry_after is not None:
        delay = max(delay, exc.retry_after)
    if fetch.clock() + delay >= fetch.deadline:
        return False
    time.sleep(delay)
    return True


def _download_once(sink: Sink, url: str, label: str, fetch: Fetch) -> Hints:
    remaining = fetch.deadline - fetch.clock()
    if remaining <= 0:
        raise DownloadError(f"{label} was not downloaded: the deadline passed")
    sink.reset()
    try:
        opened = open_get(fetch.session, url, fetch.policy, timeout=remaining,
                          headers_for=lambda target: _auth_headers(target, fetch), label=label)
    except EgressRefused as exc:
        if not exc.retryable:
            raise
        raise _Retryable("its host could not be resolved") from None
    except requests.Timeout:
        raise _Retryable("timed out") from None
    except requests.ConnectionError:
        raise _Retryable("connection failed") from None
    # A malformed request: retrying cannot help.
    except requests.RequestException as exc:
        raise DownloadError(f"{label} could not be requested ({type(exc).__name__})") from None
    with opened.response as response:
        _check_response(response, label, fetch.max_bytes)
        _copy_body(response, sink, label, fetch)
        return Hints(content_type=response.headers.get("Content-Type"), url=opened.url)


def _auth_headers(target: Target, fetch: Fetch) -> dict[str, str | None]:
    """Bearer token for auth_origin only; None drops any header the session carries."""
    if fetch.auth_token and fetch.auth_origin is not None and target.origin == fetch.auth_origin:
        return {"Authorization": f"Bearer {fetch.auth_token}"}
    return {"Authorization": None}


def _check_response(response: requests.Response, label: str, max_bytes: int) -> None:
    status = response.status_code
    if status == 429 or status >= 500:
        raise _Retryable(f"HTTP {status}", _retry_after(response.headers.get("Retry-After")))
    if not 200 <= status < 300:
        raise DownloadError(f"{label} failed: HTTP {status}")
    length = response.headers.get("Content-Length", "")
    if length.isdigit() and int(length) > max_bytes:
        raise DownloadError(f"{label} is larger than the {max_bytes}-byte limit", refused=True)


def _copy_body(response: requests.Response, sink: Sink, label: str, fetch: Fetch) -> None:
    """Stream the decoded body into the sink within the policy's rate, deadline and ratio."""
    try:
        for chunk in read_body(response, fetch.policy, deadline=fetch.deadline,
                               clock=fetch.clock, label=label):
            sink.write(chunk)
    except urllib3.exceptions.DecodeError:
        raise DownloadError(f"{label} has a corrupt content encoding") from None
    except urllib3.exceptions.HTTPError:  # connection reset, truncated body, ...
        raise _Retryable("connection broke off") from None
