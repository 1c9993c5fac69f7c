"""Wake-ups for event streams: when any process appends job events, the streams of every process
re-read the event log at once. With REDIS_URL they travel on Redis pub/sub (every replica);
otherwise on the host's datagram sockets beside the state file (every worker and script there).

A wake-up is only a hint: the store is the truth, and a stream re-reads it every few seconds
anyway, so a lost one only delays. PostgreSQL LISTEN is not used: it needs a session, which
PgBouncer in transaction mode does not keep (see the README).
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from replicate_generation.limits.wakeups import HostWakeups, wakeup_directory
from replicate_generation.settings import Settings

if TYPE_CHECKING:
    from replicate_generation.limits.redis_client import RedisConnection, ReleaseListener

log = logging.getLogger(__name__)

# A publish that waits on a slow Redis delays no writer: it runs on its own thread, this long.
_PUBLISH_TIMEOUT_S = 2.0


class StreamWakeups:
    """This process's side: `announce` after appending, `wait` in a stream until something
    changed (here or elsewhere) or the timeout passed."""

    def __init__(self, settings: Settings) -> None:
        self._changed = threading.Condition()
        self._generation = 0
        self._pending = False
        self._closed = False
        self._redis: RedisConnection | None = None
        self._host: HostWakeups | None = None
        self._listener: ReleaseListener | None = None
        self._listening_pid = 0
        self._publisher_pid = 0
        self._channel = f"{settings.redis_key_prefix}:job-events"
        if settings.redis_url:
            # Only deployments with REDIS_URL load the Redis client.
            from replicate_generation.limits.redis_client import RedisConnection  # noqa: PLC0415

            self._redis = RedisConnection(settings.redis_url, cluster=settings.redis_cluster,
                                          socket_timeout=_PUBLISH_TIMEOUT_S, scripts={})
        else:
            self._host = HostWakeups(wakeup_directory(_beside(settings.state_file)))

    @property
    def transport(self) -> str:
        return "redis" if self._redis is not None else "host"

    def announce(self) -> None:
        """Events were appended: wake this process's streams now, the others' soon."""
        with self._changed:
            self._generation += 1
            self._pending = True
            self._changed.notify_all()
        self._ensure_publisher()

    def generation(self) -> int:
        with self._changed:
            return self._generation

    def wait(self, seen: int, timeout: float) -> None:
        """Return once the generation moved past `seen`, the timeout passed, or it closed."""
        with self._changed:
            self._changed.wait_for(lambda: self._generation != seen or self._closed, timeout)

    @property
    def closed(self) -> bool:
        return self._closed

    def stop_streams(self) -> None:
        """End every stream of this process now (the process is stopping); no more wake-ups
        are sent or heard."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def close(self) -> None:
        self.stop_streams()
        if self._listener is not None:
            self._listener.close()
        if self._host is not None:
            self._host.close()
        if self._redis is not None:
            self._redis.close()

    # -- from other processes ------------------------------------------------------------------

    def _woken(self) -> None:
        with self._changed:
            self._generation += 1
            self._changed.notify_all()

    def listen(self) -> None:
        """Subscribe once per process, when its first stream opens (threads do not survive
        fork)."""
        if self._listening_pid == os.getpid():
            return
        with self._changed:
            if self._listening_pid == os.getpid() or self._closed:
                return
            self._listening_pid = os.getpid()
        if self._redis is not None:
            from replicate_generation.limits.redis_client import ReleaseListener  # noqa: PLC0415

            self._listener = ReleaseListener(self._redis, self._channel)
            self._listener.add(self._woken)
        elif self._host is not None:
            self._host.listen(self._woken)

    # -- to other processes ---------------------------------------------------------------------

    def _ensure_publisher(self) -> None:
        if self._publisher_pid == os.getpid():
            return
        with self._changed:
            if self._publisher_pid == os.getpid() or self._closed:
                return
            self._publisher_pid = os.getpid()
        threading.Thread(target=self._publish_loop, name="event-wakeups", daemon=True).start()

    def _publish_loop(self) -> None:
        """One publish per burst of appends, off the writers' threads."""
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._pending or self._closed)
                if self._closed:
                    return
                self._pending = False
            self._publish()

    def _publish(self) -> None:
        try:
            if self._redis is not None:
                self._redis.client().publish(self._channel, "e")
            elif self._host is not None:
                self._host.publish()
        except Exception as exc:  # noqa: BLE001 - Redis down or a socket gone: a hint lost
            # The streams elsewhere re-read the store on their own within seconds.
            log.debug("event wake-up not sent: %s", type(exc).__name__)


def _beside(state_file: Path) -> Path:
    """A name of its own beside the state file: the limit store's wake-ups use the file's."""
    return state_file.with_name(state_file.name + "-events")
