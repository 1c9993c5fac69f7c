"""The Replicate client pool: one guarded `replicate.Client` per token, and what is known of tokens.

Accounts are named by a token hash (`account_key`); a 401'd token is refused a while; requests get
timeouts and keep 429 hints; upstream text loses its tokens before it is stored or shown.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import re
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any
from urllib.parse import quote

import httpx
import replicate

from replicate_generation import json_depth, metrics
from replicate_generation.errors import TokenRejected

log = logging.getLogger(__name__)


def account_key(token: str) -> str:
    """Name an account by a hash of its token: limits, stats and logs never hold the token."""
    return "acct_" + hashlib.sha256(token.encode()).hexdigest()[:16]


class _Throttle(threading.local):
    """The last 429 this thread saw (ReplicateError drops Retry-After and the body retry_after)."""

    retry_after: float | None = None


_throttle = _Throttle()
_RESETS_IN = re.compile(r"resets in ~?(\d+(?:\.\d+)?)\s*s")


def retry_after_of(response: httpx.Response) -> float | None:
    """Read how long Replicate asks us to wait: header, body `retry_after`, or the detail text."""
    header = response.headers.get("retry-after", "").strip()
    if header.replace(".", "", 1).isdigit():
        return float(header)
    try:
        body = response.json()
    except ValueError:
        return None
    if isinstance(body, dict):
        value = body.get("retry_after")
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        match = _RESETS_IN.search(str(body.get("detail", "")))
        if match:
            return float(match.group(1))
    return None


def resets_in(text: str) -> float | None:
    """The seconds in Replicate's "resets in ~7s" throttle detail, if it says so."""
    match = _RESETS_IN.search(text)
    return float(match.group(1)) if match else None


def take_throttle_hint() -> float | None:
    """The wait the last 429 on this thread asked for, forgotten once read."""
    hint = _throttle.retry_after
    _throttle.retry_after = None
    return hint


class _CreateHeaders(threading.local):
    """Headers this thread's prediction creates carry (replicate 1.0.7 takes none per call)."""

    headers: Mapping[str, str] = {}


_create_headers = _CreateHeaders()


@contextmanager
def create_headers(headers: Mapping[str, str]) -> Iterator[None]:
    """Send `headers` (Cancel-After) with the prediction creates this thread makes in the block;
    forgotten when it ends, however it ends."""
    previous = _create_headers.headers
    _create_headers.headers = dict(headers)
    try:
        yield
    finally:
        _create_headers.headers = previous


def _is_create(request: httpx.Request) -> bool:
    """POST /v1/predictions, /v1/models/o/n/predictions or /v1/deployments/o/n/predictions."""
    return request.method == "POST" and request.url.path.rstrip("/").endswith("/predictions")


def read_prediction(client: replicate.Client, prediction_id: str) -> Any:
    """GET the prediction; an `aborted` one (a status replicate 1.0.7 cannot parse) is read raw."""
    try:
        return client.predictions.get(prediction_id)
    except ValueError:  # pydantic's ValidationError: a status or shape the client does not know
        body = client._request("GET", f"/v1/predictions/{prediction_id}").json()  # noqa: SLF001
        if not isinstance(body, dict) or body.get("status") != "aborted":
            raise
        return SimpleNamespace(id=prediction_id, status="aborted", error=body.get("error"),
                               output=None, metrics=body.get("metrics"))


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """One TLS context per process: building one loads the CA bundle (tens of ms), which every
    new account's client would otherwise pay on its first create."""
    return httpx.create_ssl_context()


class GuardedTransport(httpx.BaseTransport):
    """Give every request a timeout, creates the calling thread's `create_headers`, and remember
    429 hints for the calling thread.

    replicate 1.0.7 sends creates with no timeout and no per-call headers, and its ReplicateError
    drops Retry-After.
    """

    def __init__(self, timeout: httpx.Timeout, max_connections: int) -> None:
        self._timeout = timeout.as_dict()
        limits = httpx.Limits(max_connections=max_connections,
                              max_keepalive_connections=max_connections)
        self._inner = httpx.HTTPTransport(verify=_tls_context(), limits=limits)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        given = request.extensions.get("timeout") or {}
        request.extensions["timeout"] = {
            key: given.get(key) if given.get(key) is not None else default
            for key, default in self._timeout.items()
        }
        if _create_headers.headers and _is_create(request):
            request.headers.update(_create_headers.headers)
        inner = metrics.observe_replicate_call(self._inner.handle_request, request)
        response = DepthTolerantResponse(inner.status_code, headers=inner.headers,
                                         stream=inner.stream, extensions=inner.extensions,
                                         request=request)
        if response.status_code == 429:
            response.read()
            _throttle.retry_after = retry_after_of(response)
        return response

    def close(self) -> None:
        self._inner.close()


class DepthTolerantResponse(httpx.Response):
    """A response whose JSON nested past json_depth.MAX_DEPTH still reads (that part marked): a
    model's deep output must not hide the prediction's id and status."""

    def json(self, **kwargs: Any) -> Any:
        try:
            return super().json(**kwargs)
        except RecursionError:
            return json_depth.loads(self.content)


# How long an account whose token Replicate answered 401 is refused without asking again.
REJECTED_SECONDS = 60.0
# Rejections remembered at most (oldest dropped first), so a storm of bad tokens stays bounded.
MAX_REJECTED = 100_000


class ClientPool:
    """One replicate.Client per token (bounded LRU), never the module-level default client.

    Idle accounts' clients are dropped (`forget`); a token answered 401 is refused a while.
    """

    def __init__(self, base_url: str, *, max_clients: int = 256, max_connections: int = 100,
                 timeout: httpx.Timeout | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._base_url = base_url
        self._max = max_clients
        self._max_connections = max_connections
        self._timeout = timeout or httpx.Timeout(30.0, connect=5.0, pool=10.0)
        self._clients: OrderedDict[str, replicate.Client] = OrderedDict()
        self._rejected: OrderedDict[str, float] = OrderedDict()
        self._on_rejected: list[Callable[[str], None]] = []
        self._clock = clock
        self._lock = threading.Lock()

    def get(self, token: str) -> replicate.Client:
        """Return the client for this token, building (and warming) it once; raise
        TokenRejected while Replicate's last word on the token was a 401."""
        key = account_key(token)
        with self._lock:
            remaining = self._rejection_left(key)
            if remaining is not None:
                raise TokenRejected(remaining)
            client = self._clients.get(key)
            if client is None:
                client = self._build(token)
                self._clients[key] = client
                while len(self._clients) > self._max:
                    self._clients.popitem(last=False)
            self._clients.move_to_end(key)
            return client

    def forget(self, account: str) -> None:
        """Drop the account's client (its work ended); a later call builds a new one."""
        with self._lock:
            self._clients.pop(account, None)

    def cached(self) -> int:
        """How many clients are kept."""
        with self._lock:
            return len(self._clients)

    def on_rejected(self, callback: Callable[[str], None]) -> None:
        """Call back with the account (outside the lock) when its token gets a 401."""
        self._on_rejected.append(callback)

    def reject(self, account: str) -> None:
        """Replicate answered 401 for this account: refuse its work for REJECTED_SECONDS."""
        with self._lock:
            self._clients.pop(account, None)
            self._rejected.pop(account, None)
            self._rejected[account] = self._clock() + REJECTED_SECONDS
            while len(self._rejected) > MAX_REJECTED:
                self._rejected.popitem(last=False)
        log.warning("replicate rejected the token of account=%s (401); refusing it for %.0fs",
                    account, REJECTED_SECONDS)
        for callback in self._on_rejected:
            try:
                callback(account)
            except Exception:  # noqa: BLE001 - the item still fails as unauthorized
                log.exception("handling the rejection of account=%s failed", account)

    def rejected_for(self, account: str) -> float | None:
        """Seconds the account is still refused for, or None."""
        with self._lock:
            return self._rejection_left(account)

    def _rejection_left(self, account: str) -> float | None:
        """Caller holds the lock; expired entries are dropped (oldest first, they expire first)."""
        now = self._clock()
        while self._rejected and next(iter(self._rejected.values())) <= now:
            self._rejected.popitem(last=False)
        until = self._rejected.get(account)
        return None if until is None else until - now

    def _build(self, token: str) -> replicate.Client:
        transport = GuardedTransport(self._timeout, self._max_connections)
        client = replicate.Client(api_token=token, base_url=self._base_url, transport=transport)
        # Built lazily and unlocked upstream: touched under our lock, racing calls leak no pools.
        _ = client._client  # noqa: SLF001
        return client


# Replicate's token shape, and credentials quoted back after "Bearer"/"Token" (whatever shape).
TOKEN_SHAPED = re.compile(r"r8_[\w-]{8,}")
_QUOTED_CREDENTIAL = re.compile(r"(?i)\b(bearer|token)(\s+|\s*[=:]\s*)[^\s\"',;]{8,}")


def redact_upstream(text: str, token: str | None) -> str:
    """Upstream text without the calling token (as sent or URL-encoded) or anything token-shaped."""
    if token:
        for spelling in {token, quote(token, safe="")}:
            text = text.replace(spelling, "[redacted]")
    text = TOKEN_SHAPED.sub("r8_[redacted]", text)
    return _QUOTED_CREDENTIAL.sub(r"\1\2[redacted]", text)
