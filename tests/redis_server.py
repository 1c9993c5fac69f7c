"""Private Redis servers and a TCP proxy for tests that stop, pause, empty or eavesdrop on Redis.

Tests never stop, reconfigure or flush the shared server on 6379: whatever must break runs here,
on a free port, in the test's own directory.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

import redis

from servers import free_port


def wait_for_ping(port: int, password: str | None = None, timeout: float = 10.0) -> None:
    """Poll until the server on ``port`` answers PING; fail loudly instead of hanging."""
    client = redis.Redis(port=port, password=password, socket_timeout=0.5,
                         socket_connect_timeout=0.5)
    end = time.monotonic() + timeout
    try:
        while True:
            try:
                if client.ping():
                    return
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                if time.monotonic() > end:
                    raise
            time.sleep(0.01)
    finally:
        client.close()


class RedisServer:
    """One redis-server without persistence: a kill and restart empties it (data loss)."""

    def __init__(self, directory: Path, *, password: str | None = None,
                 options: Sequence[str] = ()) -> None:
        self.directory = directory
        self.password = password
        self.options = list(options)
        self.port = free_port()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", str(self.directory)]
        if self.password:
            argv += ["--requirepass", self.password]
        argv += self.options
        self._process = subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL)
        wait_for_ping(self.port, self.password)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no save; the data is gone."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=10)

    def stop(self) -> None:
        """SIGTERM: a clean shutdown; with an append-only file (options) the data is kept."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=10)

    def restart(self) -> None:
        """Start again, empty, on the same port and directory."""
        self.kill()
        self.start()

    def pause(self) -> None:
        """SIGSTOP: connections open but nothing answers (timeouts), and the data is kept."""
        if self._process is not None:
            self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self._process is not None:
            self._process.send_signal(signal.SIGCONT)

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.kill()


def parse_commands(buffer: bytes) -> tuple[list[list[bytes]], bytes]:
    """Complete RESP commands (arrays of bulk strings) in ``buffer``, and the unparsed rest."""
    commands: list[list[bytes]] = []
    while True:
        parsed = _parse_one(buffer)
        if parsed is None:
            return commands, buffer
        command, buffer = parsed
        commands.append(command)


def _parse_one(buffer: bytes) -> tuple[list[bytes], bytes] | None:
    if not buffer.startswith(b"*") or b"\r\n" not in buffer:
        return None
    header, rest = buffer[1:].split(b"\r\n", 1)
    parts: list[bytes] = []
    for _ in range(int(header)):
        if b"\r\n" not in rest:
            return None
        length_line, rest = rest[1:].split(b"\r\n", 1)
        length = int(length_line)
        if len(rest) < length + 2:
            return None
        parts.append(rest[:length])
        rest = rest[length + 2:]
    return parts, rest


class RedisProxy:
    """Forwards 127.0.0.1:<port> to a Redis server, records every command, and can drop the
    reply to the next command a predicate picks (a network fault after the server ran it).
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._lock = threading.Lock()
        self.commands: list[list[bytes]] = []
        self._drop_when: Callable[[list[bytes]], bool] | None = None
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, db: int) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def drop_reply_to(self, picks: Callable[[list[bytes]], bool]) -> None:
        """The next command ``picks`` accepts runs on the server; its reply never arrives."""
        with self._lock:
            self._drop_when = picks

    def close(self) -> None:
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            with self._lock:
                self._sockets += [client, upstream]
            dropping = threading.Event()
            threading.Thread(target=self._requests, args=(client, upstream, dropping),
                             daemon=True).start()
            threading.Thread(target=self._replies, args=(upstream, client, dropping),
                             daemon=True).start()

    def _requests(self, client: socket.socket, upstream: socket.socket,
                  dropping: threading.Event) -> None:
        pending = b""
        while data := _recv(client):
            commands, pending = parse_commands(pending + data)
            with self._lock:
                self.commands += commands
                picks = self._drop_when
                if picks is not None and any(picks(command) for command in commands):
                    self._drop_when = None
                    dropping.set()  # before forwarding: the reply must not slip through
            with contextlib.suppress(OSError):
                upstream.sendall(data)
        _close(client, upstream)

    @staticmethod
    def _replies(upstream: socket.socket, client: socket.socket,
                 dropping: threading.Event) -> None:
        while data := _recv(upstream):
            if dropping.is_set():
                break  # the server answered; the client never hears it
            with contextlib.suppress(OSError):
                client.sendall(data)
        _close(client, upstream)


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except OSError:
        return b""


def _close(*sockets: socket.socket) -> None:
    for sock in sockets:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            sock.close()
