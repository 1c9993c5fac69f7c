"""One delivery attempt: the job POSTed, signed, to an address the target check accepted.

Of a receiver's answer only the status line and headers are read (http.client caps those at
100 headers of 64 KiB); the body is never read, and the connection is closed.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import requests

from replicate_generation import metrics
from replicate_generation.egress import (
    Network,
    Resolver,
    Try,
    never_connected,
    new_session,
    pinned_tries,
)
from replicate_generation.errors import InvalidWebhook
from replicate_generation.jobs.webhooks.signing import (
    SECRET_PREFIX,
    check_header_value,
    secret_bytes,
    sign,
)
from replicate_generation.jobs.webhooks.targets import parse_target, public_addresses

USER_AGENT = "replicate-concurrent-generation-webhooks/1"
_MAX_RETRY_AFTER = 86400.0


@dataclass(frozen=True)
class DeliveryResult:
    """The outcome of one attempt (fields: docs/webhooks.md); ``error`` is safe to store and show.

    ``retryable`` is false on success, on 410 Gone and for a target no longer acceptable.
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
    allowed: Sequence[Network] = (),
) -> DeliveryResult:
    """Make one delivery attempt and report how it went; never raises for a network problem.

    The target is checked again (DNS may change) and its checked address pinned (`allowed`:
    private ranges let through); only a bad msg_id, payload or secret raises.
    """
    check_header_value("msg_id", msg_id)
    secret_bytes(secret)  # a malformed secret is a configuration error: raise, do not report
    try:
        target = parse_target(url, allow_private=allow_private, allowed=allowed)
        addresses = None if allow_private else public_addresses(target, resolve, allowed)
    except InvalidWebhook as exc:
        return DeliveryResult(ok=False, status=None, error=exc.message, retry_after=None,
                              retryable=exc.retryable)
    body, headers = _signed(payload, secret=secret, msg_id=msg_id, clock=clock)
    tries = pinned_tries(target, addresses)
    http = new_session() if session is None else session
    try:
        result = _post(http, tries, body, headers, timeout)
    finally:
        if session is None:
            http.close()
    metrics.webhook_delivery("delivered" if result.ok else "failed")
    return _scrub(result, secret)


def _signed(payload: Mapping[str, object], *, secret: str, msg_id: str,
            clock: Callable[[], float]) -> tuple[bytes, dict[str, str]]:
    """The body as compact JSON, and the headers that sign it."""
    body = json.dumps(payload, separators=(",", ":"), allow_nan=False).encode("ascii")
    timestamp = int(clock())
    return body, {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, msg_id, timestamp, body),
    }


def _post(http: requests.Session, tries: list[Try], body: bytes, headers: dict[str, str],
          timeout: float) -> DeliveryResult:
    """POST to the first try that accepts a connection; no redirects, the body never read."""
    result = DeliveryResult(ok=False, status=None, error="not attempted", retry_after=None)
    for attempt_url, extra in tries:
        try:
            response = http.post(attempt_url, data=body, headers={**headers, **extra},
                                 timeout=(timeout, timeout), allow_redirects=False,
                                 stream=True)
        except requests.RequestException as exc:
            result = _failure(exc, timeout)
            if never_connected(exc):
                continue  # nothing was sent: the next address may answer
            break
        try:
            result = _from_response(response)
        finally:
            response.close()  # the body is never read
        break
    return result


def _parse_retry_after(value: str | None) -> float | None:
    """Retry-After in seconds (the HTTP-date form is ignored), clamped to a day."""
    try:
        seconds = float(value) if value else None
    except ValueError:
        return None
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return None
    return min(seconds, _MAX_RETRY_AFTER)


def _failure(exc: requests.RequestException, timeout: float) -> DeliveryResult:
    """A transport error as a result; the text comes from the error's type only."""
    if isinstance(exc, requests.exceptions.SSLError):
        reason = "TLS handshake with the receiver failed (certificate or protocol)"
    elif isinstance(exc, requests.ConnectTimeout):
        reason = f"could not connect to the receiver within {timeout:g} s"
    elif isinstance(exc, requests.ReadTimeout):
        reason = f"the receiver did not answer within {timeout:g} s"
    elif isinstance(exc, requests.ConnectionError):
        reason = ("could not connect to the receiver" if never_connected(exc)
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
    for needle in {secret, secret.removeprefix(SECRET_PREFIX)}:
        if len(needle) >= 4:
            error = error.replace(needle, "[redacted]")
    if error == result.error:
        return result
    return DeliveryResult(ok=result.ok, status=result.status, error=error,
                          retry_after=result.retry_after, retryable=result.retryable)
