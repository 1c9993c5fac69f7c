"""Private corners of the machine's shared Redis and PostgreSQL: a key prefix, a database."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

import psycopg
import pytest
import redis

REDIS_URL = "redis://127.0.0.1:6379/0"
POSTGRES_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


@contextmanager
def redis_prefix() -> Iterator[str]:
    """A key prefix no one else uses; its keys are deleted afterwards (never FLUSHALL)."""
    prefix = "t" + secrets.token_hex(6)
    try:
        yield prefix
    finally:
        client = redis.Redis.from_url(REDIS_URL)
        for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            client.delete(key)
        client.close()


@contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh database on the shared server, dropped afterwards; yields its URL."""
    name = "rg_" + secrets.token_hex(6)
    with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def missing(what: str) -> NoReturn:
    """A server the test needs is absent: skipped on a developer's machine, failed in CI (where
    .ci/run provides every server), so a missing server never passes as green."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} (CI must provide it)")
    pytest.skip(what)
