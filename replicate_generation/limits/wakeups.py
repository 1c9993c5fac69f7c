"""Wake-ups between the processes of one host, for the SQLite limit store (SQLite cannot notify).

A release sends a byte to every store's Unix datagram socket beside the state file, so the next
waiter tries at once; polls stay the fallback, so a lost wake-up costs only a poll interval.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import select
import socket
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

# sockaddr_un holds 108 bytes; a longer path cannot be bound (waiters then only poll).
_MAX_SOCKET_PATH = 100
_NAME_ROOM = 32  # "/<pid>-<8 hex>.sock"
_SUFFIX = ".sock"
_WAIT_S = 1.0  # how often the listener looks at its stop flag


def wakeup_directory(state_file: str | os.PathLike[str]) -> Path:
    """Where the stores on this state file meet: a directory beside it (seen by every container
    that mounts it), or, where that path is too long for a socket, one in the temp directory
    named after the file."""
    path = Path(state_file)
    beside = path.with_name(f".{path.name}.wake")
    if len(str(beside)) + _NAME_ROOM <= _MAX_SOCKET_PATH:
        return beside
    digest = hashlib.sha256(os.path.realpath(path).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"rg-wake-{digest}"


class HostWakeups:
    """Listen for and send release wake-ups among the stores sharing one state file."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._callbacks: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._socket: socket.socket | None = None
        self._address: str | None = None
        self._pid = 0
        self._stop = threading.Event()

    def listen(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` on every wake-up sent by another store (threads do not survive
        fork, so a child binds its own socket)."""
        with self._lock:
            if self._pid != os.getpid():
                if self._socket is not None:
                    self._socket.close()  # a parent's: closing our copy leaves it bound there
                self._socket, self._address, self._callbacks = None, None, []
                self._pid = os.getpid()  # bound or not, tried once per process
                self._bind()
            self._callbacks.append(callback)

    def publish(self) -> None:
        """Tell every other listening store that a slot or a place in line came free."""
        try:
            peers = [entry.path for entry in os.scandir(self._directory)
                     if entry.name.endswith(_SUFFIX) and entry.path != self._address]
        except OSError:
            return  # nobody has listened yet
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
            sender.setblocking(False)
            for peer in peers:
                self._send(sender, peer)

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            self._unbind()

    @staticmethod
    def _send(sender: socket.socket, peer: str) -> None:
        try:
            sender.sendto(b"r", peer)
        except (ConnectionRefusedError, FileNotFoundError):
            # Its process died without unbinding: the socket file is litter.
            with contextlib.suppress(OSError):
                os.unlink(peer)
        except (BlockingIOError, OSError):
            pass  # its queue is full of wake-ups already, or it is going away

    def _bind(self) -> None:
        address = str(self._directory / f"{os.getpid()}-{secrets.token_hex(4)}{_SUFFIX}")
        if len(address) > _MAX_SOCKET_PATH:
            log.info("state file path too long for wake-up sockets; waiters poll instead")
            return
        try:
            self._directory.mkdir(mode=0o700, exist_ok=True)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.bind(address)
        except OSError as exc:
            log.info("no wake-up socket (%s); waiters poll instead", type(exc).__name__)
            return
        sock.setblocking(False)
        self._socket, self._address = sock, address
        self._stop = threading.Event()
        threading.Thread(target=self._receive, args=(sock, self._stop), name="host-wakeups",
                         daemon=True).start()

    def _unbind(self) -> None:
        if self._socket is None or self._pid != os.getpid():
            return
        self._socket.close()
        if self._address is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._address)
        self._socket = self._address = None

    def _receive(self, sock: socket.socket, stop: threading.Event) -> None:
        # poll, not select: select refuses descriptors past 1023, common in a busy worker.
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        try:
            while not stop.is_set():
                try:
                    ready = poller.poll(_WAIT_S * 1000)
                except OSError:
                    return
                if ready and ready[0][1] & (select.POLLNVAL | select.POLLERR):
                    return  # closed under us
                self._relay(self._drain(sock) if ready else 0)
        finally:
            sock.close()

    def _relay(self, count: int) -> None:
        for _ in range(count):
            for callback in list(self._callbacks):
                try:
                    callback()
                except Exception:  # noqa: BLE001 - a wake-up is a hint; polls stay the fallback
                    log.exception("a release wake-up callback failed")

    @staticmethod
    def _drain(sock: socket.socket) -> int:
        """Read every wake-up queued (the socket does not block); return how many."""
        count = 0
        with contextlib.suppress(OSError):
            while True:
                sock.recv(16)
                count += 1
        return count
