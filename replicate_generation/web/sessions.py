"""Console sessions in the state file: an opaque id (only its hash is stored) mapped to the role
and, for a Replicate token, the token sealed with a key that is never written to disk."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import sqlite3
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

SCHEMA = ("CREATE TABLE IF NOT EXISTS console_sessions (id_hash TEXT PRIMARY KEY, "
          "admin INTEGER NOT NULL, nonce BLOB NOT NULL, sealed BLOB NOT NULL, "
          "csrf TEXT NOT NULL, expires REAL NOT NULL)")
MAC_BYTES = 32


@dataclass(frozen=True)
class ConsoleSession:
    admin: bool
    token: str | None  # the Replicate token; None for an admin session (the server's key)
    csrf: str


class SessionStore:
    def __init__(self, path: Path, seal_key: bytes, ttl_seconds: float) -> None:
        self._path = path
        self._key = seal_key
        self._ttl = ttl_seconds
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute(SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self._path, timeout=10, isolation_level=None)

    def create(self, admin: bool, token: str | None) -> tuple[str, str]:
        """A new session; returns (session id, CSRF token)."""
        session_id, csrf, nonce = secrets.token_urlsafe(32), secrets.token_urlsafe(32), \
            secrets.token_bytes(16)
        sealed = self._seal(nonce, (token or "").encode())
        with closing(self._connect()) as db:
            db.execute("DELETE FROM console_sessions WHERE expires < ?", (time.time(),))
            db.execute("INSERT INTO console_sessions VALUES (?, ?, ?, ?, ?, ?)",
                       (_hash(session_id), int(admin), nonce, sealed, csrf,
                        time.time() + self._ttl))
        return session_id, csrf

    def get(self, session_id: str) -> ConsoleSession | None:
        with closing(self._connect()) as db:
            row = db.execute("SELECT admin, nonce, sealed, csrf, expires FROM console_sessions "
                             "WHERE id_hash = ?", (_hash(session_id),)).fetchone()
        if row is None or row[4] < time.time():
            return None
        token = self._unseal(row[1], row[2])
        if token is None:
            return None
        return ConsoleSession(admin=bool(row[0]), token=token.decode() or None, csrf=row[3])

    def delete(self, session_id: str) -> None:
        with closing(self._connect()) as db:
            db.execute("DELETE FROM console_sessions WHERE id_hash = ?", (_hash(session_id),))

    def _seal(self, nonce: bytes, plain: bytes) -> bytes:
        """Encrypt-then-MAC with an HMAC-SHA256 keystream (stdlib only)."""
        cipher = bytes(a ^ b for a, b in zip(plain, self._keystream(nonce, len(plain)),
                                             strict=True))
        return cipher + hmac.new(self._key, b"mac" + nonce + cipher, hashlib.sha256).digest()

    def _unseal(self, nonce: bytes, sealed: bytes) -> bytes | None:
        cipher, mac = sealed[:-MAC_BYTES], sealed[-MAC_BYTES:]
        expected = hmac.new(self._key, b"mac" + nonce + cipher, hashlib.sha256).digest()
        if not hmac.compare_digest(mac, expected):
            return None  # sealed under another secret (SESSION_SECRET changed)
        return bytes(a ^ b for a, b in zip(cipher, self._keystream(nonce, len(cipher)),
                                           strict=True))

    def _keystream(self, nonce: bytes, size: int) -> bytes:
        blocks = (hmac.new(self._key, b"ks" + nonce + n.to_bytes(4, "big"),
                           hashlib.sha256).digest() for n in range(size // 32 + 1))
        return b"".join(blocks)[:size]


def _hash(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()
