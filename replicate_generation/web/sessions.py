"""Console sessions in the state file: an opaque id (only its hash is stored) mapped to the role
and, for a Replicate token, the token sealed with a key that is never written to disk. A session
is bound to the key that opened it (an admin session ends when the admin key is rotated), and an
owner keeps at most MAX_PER_OWNER sessions."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import sqlite3
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from replicate_generation.clients import account_key

SCHEMA = ("CREATE TABLE IF NOT EXISTS console_sessions (id_hash TEXT PRIMARY KEY, "
          "admin INTEGER NOT NULL, nonce BLOB NOT NULL, sealed BLOB NOT NULL, "
          "csrf TEXT NOT NULL, expires REAL NOT NULL)")
# Who opened it: an account key, or "admin:" and a MAC of the admin key; older rows have ''.
OWNER_COLUMN = "ALTER TABLE console_sessions ADD COLUMN owner TEXT NOT NULL DEFAULT ''"
OWNER_INDEX = "CREATE INDEX IF NOT EXISTS console_sessions_owner ON console_sessions(owner)"
MAC_BYTES = 32
# The newest sessions an owner keeps; signing in again drops the oldest beyond these.
MAX_PER_OWNER = 20


@dataclass(frozen=True)
class ConsoleSession:
    admin: bool
    token: str | None  # the Replicate token; None for an admin session (the server's key)
    csrf: str


class SessionStore:
    """`admin_key` is the admin key in force: an admin session opened with another is void."""

    def __init__(self, path: Path, seal_key: bytes, ttl_seconds: float,
                 admin_key: str | None = None) -> None:
        self._path = path
        self._key = seal_key
        self._ttl = ttl_seconds
        self._admin_owner = self._owner(True, admin_key) if admin_key else None
        path.parent.mkdir(parents=True, exist_ok=True)
        with closing(self._connect()) as db:
            db.execute("BEGIN IMMEDIATE")  # one worker adds the column, the others see it
            db.execute(SCHEMA)
            columns = {row[1] for row in db.execute("PRAGMA table_info(console_sessions)")}
            if "owner" not in columns:
                db.execute(OWNER_COLUMN)
            db.execute(OWNER_INDEX)
            db.execute("COMMIT")

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self._path, timeout=10, isolation_level=None)

    def create(self, admin: bool, key: str) -> tuple[str, str]:
        """A new session opened with `key` (the admin key, or the user's token); returns
        (session id, CSRF token)."""
        session_id, csrf, nonce = secrets.token_urlsafe(32), secrets.token_urlsafe(32), \
            secrets.token_bytes(16)
        sealed = self._seal(nonce, b"" if admin else key.encode())
        owner = self._owner(admin, key)
        with closing(self._connect()) as db:
            db.execute("BEGIN IMMEDIATE")
            db.execute("DELETE FROM console_sessions WHERE expires < ?", (time.time(),))
            db.execute("INSERT INTO console_sessions (id_hash, admin, nonce, sealed, csrf, "
                       "expires, owner) VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (_hash(session_id), int(admin), nonce, sealed, csrf,
                        time.time() + self._ttl, owner))
            db.execute("DELETE FROM console_sessions WHERE owner = ? AND id_hash NOT IN ("
                       "SELECT id_hash FROM console_sessions WHERE owner = ? "
                       "ORDER BY expires DESC LIMIT ?)", (owner, owner, MAX_PER_OWNER))
            db.execute("COMMIT")
        return session_id, csrf

    def get(self, session_id: str) -> ConsoleSession | None:
        with closing(self._connect()) as db:
            row = db.execute("SELECT admin, nonce, sealed, csrf, expires, owner "
                             "FROM console_sessions WHERE id_hash = ?",
                             (_hash(session_id),)).fetchone()
        if row is None or row[4] < time.time():
            return None
        if row[0] and not (self._admin_owner and hmac.compare_digest(row[5], self._admin_owner)):
            self.delete(session_id)  # opened with an admin key no longer in force
            return None
        token = self._unseal(row[1], row[2])
        if token is None:
            return None
        return ConsoleSession(admin=bool(row[0]), token=token.decode() or None, csrf=row[3])

    def delete(self, session_id: str) -> None:
        with closing(self._connect()) as db:
            db.execute("DELETE FROM console_sessions WHERE id_hash = ?", (_hash(session_id),))

    def _owner(self, admin: bool, key: str) -> str:
        """An account key, or a MAC of the admin key (the key itself is never stored)."""
        if not admin:
            return account_key(key)
        return "admin:" + hmac.new(self._key, b"admin-key" + key.encode(),
                                   hashlib.sha256).hexdigest()

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
