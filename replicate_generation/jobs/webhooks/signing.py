"""Standard Webhooks signatures: secrets, message ids, signing and verifying."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import time
from collections.abc import Mapping

from replicate_generation.errors import InvalidWebhook

SECRET_PREFIX = "whsec_"  # noqa: S105 - the Standard Webhooks secret prefix, not a secret


def new_secret() -> str:
    """A fresh ``whsec_`` secret: 32 random bytes, base64-encoded."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode("ascii")


def new_msg_id() -> str:
    """A fresh message id (no ``.``, which would blur the signed content's fields)."""
    return "msg_" + secrets.token_urlsafe(18)


def secret_bytes(secret: str) -> bytes:
    """The HMAC key: ``whsec_<base64>`` decoded, any other string as UTF-8.

    Empty or bad base64 raises InvalidWebhook, whose message never quotes the secret.
    """
    if not isinstance(secret, str) or not secret:
        raise InvalidWebhook("the webhook secret must be a non-empty string")
    if not secret.startswith(SECRET_PREFIX):
        return secret.encode("utf-8")
    try:
        key = base64.b64decode(secret[len(SECRET_PREFIX):], validate=True)
    except (binascii.Error, ValueError):
        raise InvalidWebhook("the whsec_ webhook secret is not valid base64") from None
    if not key:
        raise InvalidWebhook("the whsec_ webhook secret is empty")
    return key


def check_header_value(name: str, value: str) -> None:
    if not value or "." in value or not all("!" <= ch <= "~" for ch in value):
        raise ValueError(f"{name} must be non-empty printable ASCII without spaces or '.'")


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """``v1,<base64(HMAC-SHA256(secret_bytes(secret), f"{msg_id}.{timestamp}.{body}"))>``.

    :raises ValueError: msg_id is empty or holds a ``.``, a space or a non-ASCII character.
    """
    check_header_value("msg_id", msg_id)
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
    """True when ``headers`` (any case) carry a ``v1`` signature of ``body`` within ``tolerance``.

    Any of several signatures may match (rotation), in constant time; a bad secret raises.
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
