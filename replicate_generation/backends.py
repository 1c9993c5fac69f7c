"""Which backends the settings pick (SQLite, or Redis for limits and PostgreSQL for jobs), and
waiting for them at start-up; later outages are met by failing closed (StoreUnavailable)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

from replicate_generation.errors import Dependency, SettingsError, StoreUnavailable
from replicate_generation.limits.base import Limits, LimitStore
from replicate_generation.limits.sqlite import SQLiteLimitStore

if TYPE_CHECKING:
    from replicate_generation.settings import Settings

log = logging.getLogger(__name__)

# How long a starting process waits for Redis and PostgreSQL (compose may start them after us).
STARTUP_PATIENCE_S = 30.0


def limits_backend(settings: Settings) -> Dependency:
    return "redis" if settings.redis_url else "sqlite"


def jobs_backend(settings: Settings) -> Dependency:
    return "postgresql" if settings.database_url else "sqlite"


def limits_from_settings(settings: Settings) -> Limits:
    """The limits this process's environment asks for; the manager declares them in the store."""
    return Limits(
        max_concurrent=settings.concurrent_limit,
        requests_per_minute=settings.requests_per_minute,
        burst=settings.create_burst,
        polls_per_minute=settings.polls_per_minute,
    )


def open_limit_store(settings: Settings) -> LimitStore:
    """Redis when REDIS_URL is set (limits across hosts), else the host's state file."""
    limits = limits_from_settings(settings)
    if settings.redis_url:
        # Only deployments with REDIS_URL load the Redis client.
        from replicate_generation.limits.redis import RedisLimitStore  # noqa: PLC0415

        return RedisLimitStore(settings.redis_url, limits, lease_ttl=settings.lease_ttl_seconds,
                               key_prefix=settings.redis_key_prefix, cluster=settings.redis_cluster)
    return SQLiteLimitStore(settings.state_file, limits, lease_ttl=settings.lease_ttl_seconds)


def job_store_target(settings: Settings) -> str:
    """What JobStore opens: DATABASE_URL when set, else the state file."""
    return settings.database_url or str(settings.state_file)


def wait_for_backends(settings: Settings, patience: float = STARTUP_PATIENCE_S) -> None:
    """Start only once Redis and PostgreSQL answer (they may start after us); StoreUnavailable
    after `patience` seconds. Later outages are met by failing closed, not by exiting.
    SettingsError at once for a server that is not what the settings say (a Redis Cluster)."""
    checks: list[tuple[Dependency, Callable[[], None]]] = []
    if settings.redis_url:
        checks.append(("redis", partial(_ping_redis, settings.redis_url, settings.redis_cluster)))
    if settings.database_url:
        checks.append(("postgresql", partial(_ping_postgres, settings.database_url)))
    give_up = time.monotonic() + patience
    for dependency, check in checks:
        _wait_for(dependency, check, give_up)


def _wait_for(dependency: Dependency, check: Callable[[], None], give_up: float) -> None:
    warned = False
    while True:
        try:
            check()
            return
        except SettingsError:
            raise  # waiting cannot mend a wrong setting
        except Exception as exc:  # noqa: BLE001 - any failure to connect means "not yet"
            reason = type(exc).__name__
        if time.monotonic() >= give_up:
            raise StoreUnavailable(dependency, f"no answer at start-up ({reason})")
        if not warned:
            log.warning("waiting for %s to answer (%s)", dependency, reason)
            warned = True
        time.sleep(0.5)


def _ping_redis(url: str, cluster: bool) -> None:
    # Only deployments with REDIS_URL load the Redis client.
    from replicate_generation.limits.redis_client import probe  # noqa: PLC0415

    probe(url, cluster=cluster)


def _ping_postgres(url: str) -> None:
    import psycopg  # noqa: PLC0415 - only deployments with DATABASE_URL need it loaded

    conninfo = url.replace("postgresql+psycopg://", "postgresql://", 1)
    with psycopg.connect(conninfo, connect_timeout=2) as conn:
        conn.execute("SELECT 1")
