"""Keys the admin issues to internal services: minted with a secret shown once and kept only as
its SHA-256, looked up by that hash on every request (so a revoke holds at once in every worker
and replica), changed, rotated with a grace period for the old secret, and revoked."""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Row, and_, exc, or_, select, update

from replicate_generation.jobs.database import JobDatabase
from replicate_generation.jobs.schema import api_keys

# Recognisable to secret scanners, as GitHub's ghp_ and Stripe's sk_live_ are.
SECRET_PREFIX = "rgk_"  # noqa: S105 - a public prefix, not a secret
# What a listing shows of a secret: enough to tell keys apart, far too little to use.
_SHOWN_CHARS = len(SECRET_PREFIX) + 6
BUDGET_PERIODS = ("day", "month", "total")
# Fields the admin sets at minting and may change later.
SETTABLE = ("name", "budget_usd", "budget_period", "max_concurrent", "weight", "models",
            "expires_at", "allow_unknown_cost")


class KeyNameTaken(Exception):
    """Another live key has this name."""


@dataclass(frozen=True)
class IssuedKey:
    """One issued key as stored (never its secret)."""

    id: str
    name: str
    prefix: str
    budget_usd: float | None
    budget_period: str | None
    max_concurrent: int | None
    weight: float
    models: tuple[str, ...] | None
    expires_at: float | None
    created_at: float
    updated_at: float
    rotated_at: float | None
    previous_until: float | None
    revoked_at: float | None
    # May run models whose cost is unknown despite a budget (they hold and settle nothing).
    allow_unknown_cost: bool = False

    def live(self, now: float) -> bool:
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def looks_issued(secret: str) -> bool:
    return secret.startswith(SECRET_PREFIX)


class IssuedKeys:
    """The issued keys, on the job store's database."""

    def __init__(self, db: JobDatabase) -> None:
        self._db = db

    def mint(self, fields: Mapping[str, Any], now: float) -> tuple[IssuedKey, str]:
        """A new key with these fields (validated by the caller); returns it and its secret."""
        secret = _new_secret()
        values = {**_stored(fields), "id": "key_" + secrets.token_urlsafe(12),
                  "secret_hash": secret_hash(secret), "prefix": secret[:_SHOWN_CHARS],
                  "created_at": now, "updated_at": now}
        with self._db.write() as conn, _unique_name():
            conn.execute(api_keys.insert().values(values))
            return _load(conn, values["id"]), secret

    def list(self) -> list[IssuedKey]:
        with self._db.read() as conn:
            rows = conn.execute(select(api_keys).order_by(api_keys.c.created_at, api_keys.c.id))
            return [_key(row) for row in rows]

    def get(self, key_id: str) -> IssuedKey | None:
        with self._db.read() as conn:
            row = conn.execute(select(api_keys).where(api_keys.c.id == key_id)).first()
        return None if row is None else _key(row)

    def update(self, key_id: str, fields: Mapping[str, Any], now: float) -> IssuedKey | None:
        """Change a live key's fields; None when there is no such live key."""
        with self._db.write() as conn, _unique_name():
            done = conn.execute(update(api_keys).where(
                api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
                .values({**_stored(fields), "updated_at": now}))
            return _load(conn, key_id) if done.rowcount else None

    def rotate(self, key_id: str, grace_seconds: float,
               now: float) -> tuple[IssuedKey, str] | None:
        """A new secret; the current one keeps working for grace_seconds (0: not at all)."""
        secret = _new_secret()
        with self._db.write() as conn:
            current = conn.execute(select(api_keys.c.secret_hash).where(
                api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))).scalar()
            if current is None:
                return None
            conn.execute(update(api_keys).where(api_keys.c.id == key_id).values(
                secret_hash=secret_hash(secret), prefix=secret[:_SHOWN_CHARS],
                previous_hash=current if grace_seconds > 0 else None,
                previous_until=now + grace_seconds if grace_seconds > 0 else None,
                rotated_at=now, updated_at=now))
            return _load(conn, key_id), secret

    def revoke(self, key_id: str, now: float) -> IssuedKey | None:
        """Refused from the next request on; None when there is no such live key."""
        with self._db.write() as conn:
            done = conn.execute(update(api_keys).where(
                api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
                .values(revoked_at=now, updated_at=now, previous_hash=None,
                        previous_until=None))
            return _load(conn, key_id) if done.rowcount else None

    def authenticate(self, secret: str, now: float) -> IssuedKey | None:
        """The live key this secret opens (its current one, or the previous within its grace)."""
        digest = secret_hash(secret)
        with self._db.read() as conn:
            row = conn.execute(select(api_keys).where(or_(
                api_keys.c.secret_hash == digest,
                and_(api_keys.c.previous_hash == digest, api_keys.c.previous_until > now)))).first()
        if row is None or not _opens(row, digest, now):
            return None
        key = _key(row)
        return key if key.live(now) else None


def _opens(row: Row[Any], digest: str, now: float) -> bool:
    """Checked again in constant time: the database's match is not the authority."""
    if hmac.compare_digest(row.secret_hash, digest):
        return True
    return (row.previous_hash is not None and row.previous_until is not None
            and row.previous_until > now and hmac.compare_digest(row.previous_hash, digest))


def _new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def _stored(fields: Mapping[str, Any]) -> dict[str, Any]:
    values = {name: fields[name] for name in SETTABLE if name in fields}
    if "models" in values and values["models"] is not None:
        values["models"] = json.dumps(list(values["models"]))
    if "weight" in values and values["weight"] is None:
        values["weight"] = 1.0
    if "allow_unknown_cost" in values:
        values["allow_unknown_cost"] = int(bool(values["allow_unknown_cost"]))
    return values


def _load(conn: Connection, key_id: str) -> IssuedKey:
    return _key(conn.execute(select(api_keys).where(api_keys.c.id == key_id)).one())


def _key(row: Row[Any]) -> IssuedKey:
    return IssuedKey(
        id=row.id, name=row.name, prefix=row.prefix, budget_usd=row.budget_usd,
        budget_period=row.budget_period, max_concurrent=row.max_concurrent,
        weight=float(row.weight),
        models=None if row.models is None else tuple(json.loads(row.models)),
        expires_at=row.expires_at, created_at=row.created_at, updated_at=row.updated_at,
        rotated_at=row.rotated_at, previous_until=row.previous_until, revoked_at=row.revoked_at,
        allow_unknown_cost=bool(row.allow_unknown_cost))


@contextmanager
def _unique_name() -> Iterator[None]:
    """Turn the live-name index's refusal into KeyNameTaken."""
    try:
        yield
    except exc.IntegrityError as error:
        if "name" in str(error.orig):
            raise KeyNameTaken from None
        raise
