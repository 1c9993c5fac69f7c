"""The Redis connection the limit store runs on: one server, or (REDIS_CLUSTER=true) a Redis Cluster
followed slot by slot; Redis errors as StoreUnavailable or a clear configuration error; the
start-up probe; the releases listener (pub/sub, which a cluster relays to every node).
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Callable, Mapping
from typing import Any, ParamSpec, TypeVar

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.cluster import RedisCluster
from redis.commands.core import Script
from redis.connection import ConnectionPool, parse_url
from redis.exceptions import (
    AskError,
    AuthenticationError,
    BusyLoadingError,
    ClusterDownError,
    ClusterError,
    MasterDownError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from replicate_generation.errors import SettingsError, StoreUnavailable

__all__ = ["RedisConnection", "ReleaseListener", "fail_closed", "probe"]

Client = redis.Redis | RedisCluster

# The releases listener: how long one wait for a message lasts, and the pause after an error.
_LISTEN_TIMEOUT_S = 1.0
_LISTEN_RETRY_S = 0.5
# redis-py resends after a dropped connection only briefly: the manager, above, retries longer.
_RETRY = Retry(ExponentialWithJitterBackoff(cap=0.25, base=0.02), retries=2)
# Errors that mean "not now" rather than a bug, and the reason given; subclasses first.
_UNAVAILABLE: tuple[tuple[type[RedisError], str], ...] = (
    (AuthenticationError, "authentication failed"),
    (BusyLoadingError, "loading its data"),
    (RedisTimeoutError, "timed out"),
    (RedisConnectionError, "connection failed"),
    (ReadOnlyError, "read-only replica"),
    (OutOfMemoryError, "out of memory"),
    (MasterDownError, "the replica lost its primary"),
    (ClusterDownError, "the cluster is down"),
    (TryAgainError, "the cluster is resharding"),
    (ClusterError, "the cluster kept redirecting"),
)
# Plain ResponseErrors (redis-py has no class for them) that mean the same.
_TRANSIENT_PREFIXES = {"BUSY": "busy running a script", "NOREPLICAS": "not enough replicas"}

PLAIN_ON_CLUSTER = ("REDIS_URL names a node of a Redis Cluster, which answers MOVED for the keys "
                    "other nodes hold: set REDIS_CLUSTER=true")
CLUSTER_ON_PLAIN = ("REDIS_CLUSTER=true but the Redis at REDIS_URL is not in cluster mode: "
                    "unset REDIS_CLUSTER")
_CLUSTER_DB = "a Redis Cluster has only database 0: REDIS_URL must name /0 or no database"

P = ParamSpec("P")
R = TypeVar("R")


def unavailable_reason(exc: RedisError) -> str | None:
    """A short reason if ``exc`` means Redis cannot serve us now; None for a real error."""
    for kind, reason in _UNAVAILABLE:
        if isinstance(exc, kind):
            return reason
    if isinstance(exc, ResponseError):
        return _TRANSIENT_PREFIXES.get(str(exc).split(" ", 1)[0])
    return None


def fail_closed(method: Callable[P, R]) -> Callable[P, R]:
    """Turn Redis being unreachable into StoreUnavailable, naming the operation, never the URL;
    a MOVED answer to a plain client into the configuration error it is."""

    @functools.wraps(method)
    def guarded(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(*args, **kwargs)
        except AskError as exc:  # MOVED too: only a cluster node redirects
            raise SettingsError(PLAIN_ON_CLUSTER) from exc
        except RedisClusterException as exc:
            # Every node failed while the client looked for the cluster's slots again.
            raise StoreUnavailable("redis", f"{method.__name__}: the cluster cannot be reached") \
                from exc
        except RedisError as exc:
            reason = unavailable_reason(exc)
            if reason is None:
                raise
            raise StoreUnavailable("redis", f"{method.__name__}: {reason}") from exc

    return guarded


def _url_options(url: str) -> dict[str, Any]:
    try:
        options: dict[str, Any] = parse_url(url)  # type: ignore[no-untyped-call]
    except ValueError:
        # Its message may quote parts of the URL.
        raise ValueError("the Redis URL is not a valid redis:// or rediss:// URL") from None
    return options


class RedisConnection:
    """The client REDIS_URL names, and the store's Lua scripts registered on it.

    A plain client connects when a command needs it; a cluster client reads the cluster's slots
    when first used (and again when they move), so a store opens while its Redis is still down.
    """

    def __init__(self, url: str, *, cluster: bool, socket_timeout: float,
                 scripts: Mapping[str, str]) -> None:
        options = _url_options(url)
        if cluster and int(options.get("db", 0)) != 0:
            raise ValueError(_CLUSTER_DB)
        self._url = url
        self._cluster = cluster
        self._options: dict[str, Any] = {
            "socket_timeout": socket_timeout, "socket_connect_timeout": socket_timeout,
            "health_check_interval": 30, "retry": _RETRY, "decode_responses": True}
        self._sources = dict(scripts)
        self._lock = threading.Lock()
        self._client: Client | None = None
        self._scripts: dict[str, Script] = {}
        if not cluster:
            self.client()  # builds no connection yet

    def client(self) -> Client:
        """The client; a cluster's is built now if not yet (StoreUnavailable while unreachable)."""
        client = self._client
        if client is not None:
            return client
        with self._lock:
            if self._client is None:
                opened = self._open_cluster() if self._cluster else \
                    redis.Redis.from_url(self._url, **self._options)
                self._scripts = {name: opened.register_script(source)
                                 for name, source in self._sources.items()}
                self._client = opened
            return self._client

    def check(self) -> None:
        """A round trip; a cluster must also say every slot is served (else ClusterDownError)."""
        client = self.client()
        if not isinstance(client, RedisCluster):
            client.ping()
        elif (state := client.cluster_info().get("cluster_state")) != "ok":
            raise ClusterDownError(f"CLUSTERDOWN cluster_state is {state}")

    def script(self, name: str) -> Script:
        self.client()
        return self._scripts[name]

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    def _open_cluster(self) -> RedisCluster:
        try:
            return RedisCluster.from_url(self._url, **self._options)
        except (RedisClusterException, RedisError) as exc:
            if _cluster_enabled(self._url, 2.0) is False:
                raise SettingsError(CLUSTER_ON_PLAIN) from exc
            raise StoreUnavailable("redis", "the cluster cannot be reached") from exc


def _cluster_enabled(url: str, timeout: float) -> bool | None:
    """What the node at `url` says under INFO cluster; None when it cannot say (down, refused).
    Asked of database 0: a cluster node refuses SELECT."""
    options = _url_options(url)
    options.pop("db", None)
    client = redis.Redis(connection_pool=ConnectionPool(
        **options, socket_timeout=timeout, socket_connect_timeout=timeout))
    try:
        info = client.info("cluster")
    except RedisError:
        return None
    finally:
        client.close()
    enabled = info.get("cluster_enabled")
    return None if enabled is None else bool(int(enabled))


def probe(url: str, *, cluster: bool, timeout: float = 2.0) -> None:
    """Start-up check: Redis answers, as one server or as a cluster as REDIS_CLUSTER says.
    SettingsError for a mismatch (retrying cannot mend it); RedisError or StoreUnavailable for
    a Redis not answering yet."""
    enabled = _cluster_enabled(url, timeout)
    if enabled is not None and enabled != cluster:
        raise SettingsError(PLAIN_ON_CLUSTER if enabled else CLUSTER_ON_PLAIN)
    connection = RedisConnection(url, cluster=cluster, socket_timeout=timeout, scripts={})
    try:
        connection.check()
    finally:
        connection.close()


class ReleaseListener:
    """One thread per process on the releases channel, so the next waiter in line, whatever
    process it is in, tries at once instead of at its next poll (polls stay the fallback).
    A cluster relays every PUBLISH to all its nodes: subscribing on any one hears them all."""

    def __init__(self, connection: RedisConnection, channel: str) -> None:
        self._connection = connection
        self._channel = channel
        self._callbacks: list[Callable[[], None]] = []
        self._pid = os.getpid()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._listen, name="redis-releases", daemon=True)
        self._thread.start()

    def add(self, callback: Callable[[], None]) -> None:
        self._callbacks.append(callback)

    def alive_here(self) -> bool:
        return self._pid == os.getpid() and self._thread.is_alive()

    def close(self) -> None:
        self._stop.set()

    def _listen(self) -> None:
        while not self._stop.is_set():
            try:
                self._relay()
            except (RedisError, RedisClusterException, StoreUnavailable, OSError, ValueError):
                # Down, or the pool closed under us: waiters poll meanwhile; the store says why.
                self._stop.wait(_LISTEN_RETRY_S)

    def _relay(self) -> None:
        client = self._connection.client()
        pubsub = client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
        try:
            pubsub.subscribe(self._channel)
            while not self._stop.is_set():
                if _next_message(pubsub) is not None:
                    for callback in list(self._callbacks):
                        callback()
        finally:
            with contextlib.suppress(RedisError, RedisClusterException, OSError, ValueError):
                pubsub.close()


def _next_message(pubsub: Any) -> Any:
    """The next message within _LISTEN_TIMEOUT_S; a connection closed under the read (the store
    closing) makes redis-py fail in its parser, which is read as the connection lost."""
    try:
        return pubsub.get_message(timeout=_LISTEN_TIMEOUT_S)
    except AttributeError as exc:  # its buffer is None once another thread disconnected it
        raise RedisConnectionError("the connection was closed under the listener") from exc
