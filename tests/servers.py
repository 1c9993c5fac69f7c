"""Run the service as the image does (gunicorn + the package's gunicorn_conf) in a child process."""

from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests

from replicate_generation.launch import gunicorn_argv
from replicate_generation.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
# An access log line of a /health answer; the group is the worker's pid (gunicorn_conf's format).
_HEALTH_ANSWERED_BY = re.compile(r'"GET /health HTTP/1\.1" 200 \d+ \d+ms <(\d+)>')


# Each xdist worker draws ports from its own residue class below the kernel's ephemeral range, so
# no other worker and no outgoing connection takes one between this check and the server's bind.
_WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_GIVEN: set[int] = set()
_RANDOM = random.Random()  # unmoved by a test that seeds the module's generator


def free_port() -> int:
    """A port free on 127.0.0.1 now, never given out before in this process."""
    for _ in range(1000):
        port = _RANDOM.randrange(20000 + _WORKER, 32768, _WORKERS)
        if port in _GIVEN:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _GIVEN.add(port)
        return port
    raise RuntimeError("no free port found for this test worker")


class Gunicorn:
    """A real gunicorn master with its workers, in its own process group."""

    def __init__(self, env: dict[str, str], log_path: Path, cwd: Path = ROOT,
                 command: list[str] | None = None,
                 run_as: tuple[int, int] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full_env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"),
                    "FLASK_HOST": "127.0.0.1", "FLASK_PORT": str(self.port), **env}
        # Kept so a probe can run in the service's exact environment (the image's HEALTHCHECK).
        self.env = full_env
        self.log_path = log_path
        self._log = log_path.open("wb")
        argv = command or gunicorn_argv()
        # run_as=(uid, gid) drops privileges in the child, supplementary groups included (a root
        # caller's would otherwise survive); None keeps the caller's identity.
        uid, gid = run_as if run_as is not None else (None, None)
        self.proc = subprocess.Popen(  # noqa: S603 - fixed argv, test only
            argv, cwd=cwd, env=full_env, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True, user=uid, group=gid,
            extra_groups=None if run_as is None else [])

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited: {self.log()}")
            try:
                if requests.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except (requests.ConnectionError, requests.Timeout):
                pass
            time.sleep(0.1)
        raise TimeoutError(f"gunicorn not ready: {self.log()}")

    def wait_workers(self, count: int, timeout: float = 60.0) -> None:
        """Ask /health until `count` distinct workers have answered (the access log names each
        answer's pid): a worker still booting would otherwise take CPU from the first requests.
        Asked in bursts wider than one worker's threads, so an idle worker cannot take them all."""
        deadline = time.monotonic() + timeout
        burst = 2 * int(self.env.get("GUNICORN_THREADS", "16"))
        with ThreadPoolExecutor(burst) as pool:
            while time.monotonic() < deadline:
                list(pool.map(lambda _: requests.get(self.url + "/health", timeout=5),
                              range(burst)))
                if len(set(_HEALTH_ANSWERED_BY.findall(self.log()))) >= count:
                    return
                time.sleep(0.05)
        raise TimeoutError(f"fewer than {count} gunicorn workers answered: {self.log()}")

    def post(self, path: str, body: Any, headers: dict[str, str], timeout: float = 120) -> Any:
        return requests.post(self.url + path, json=body, headers=headers, timeout=timeout)

    def kill(self, *, settle: bool = False) -> None:
        """SIGKILL the master and every worker at once: nothing gets to clean up. With `settle`,
        return once the servers they were calling have handled what was already sent."""
        os.killpg(self.proc.pid, signal.SIGSTOP)  # frozen: no new connection from here on
        calls = _calls_out(_group(self.proc.pid), self.port) if settle else set()
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        if calls:
            wait_for(lambda: not calls & _open_server_sides(), 10, "the dead calls answered")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")


# /proc/net/tcp states whose socket a server still holds open: ESTABLISHED, CLOSE_WAIT, CLOSE.
_SERVER_OPEN = {"01", "08", "07"}


def _group(pgid: int) -> list[int]:
    """The pids of a process group."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:  # it ended while we looked
            continue
        if int(fields[2]) == pgid:
            pids.append(int(stat.parent.name))
    return pids


def _tcp_table() -> list[tuple[int, int, str, str]]:
    """(local port, remote port, state, inode) of every TCP socket on this machine."""
    rows = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            rows.append((int(fields[1].rsplit(":", 1)[1], 16),
                         int(fields[2].rsplit(":", 1)[1], 16), fields[3], fields[9]))
    return rows


def _calls_out(pids: list[int], own_port: int) -> set[tuple[int, int]]:
    """(server port, client port) of the connections these processes opened to other servers."""
    inodes = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").glob("*"):
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    return {(remote, local) for local, remote, state, inode in _tcp_table()
            if inode in inodes and state == "01" and local != own_port}


def _open_server_sides() -> set[tuple[int, int]]:
    return {(local, remote) for local, remote, state, _ in _tcp_table() if state in _SERVER_OPEN}


def wait_for(condition: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    """Poll `condition` every 20 ms until it is truthy (and return it); fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def service_env(settings: Settings, workers: int = 2) -> dict[str, str]:
    """The environment that gives a gunicorn service exactly these settings."""
    return {
        "REPLICATE_API_TOKEN": settings.replicate_api_token or "",
        "CONCURRENT_DOCKER_ADMIN_API_KEY": settings.admin_api_key or "",
        "REPLICATE_BASE_URL": settings.replicate_base_url,
        "OUTPUT_DIR": str(settings.output_dir),
        "STATE_FILE": str(settings.state_file),
        "REPLICATE_CONCURRENT_LIMIT": str(settings.concurrent_limit),
        "REPLICATE_REQUESTS_PER_MINUTE": str(settings.requests_per_minute),
        "REPLICATE_CREATE_BURST": str(settings.create_burst),
        "REPLICATE_POLLS_PER_MINUTE": str(settings.polls_per_minute),
        "POLL_INTERVAL_SECONDS": str(settings.poll_interval_seconds),
        "REPLICATE_SYNC_WAIT_SECONDS": str(settings.sync_wait_seconds),
        "TASK_TIMEOUT_SECONDS": str(settings.task_timeout_seconds),
        "LEASE_TTL_SECONDS": str(settings.lease_ttl_seconds),
        "DISPATCH_THREADS": str(settings.dispatch_threads),
        "WEB_CONCURRENCY": str(workers),
        "GUNICORN_THREADS": "8",
        "LOG_LEVEL": "DEBUG",
        "MALLOC_ARENA_MAX": "2",  # as the image sets it
        **backend_env(settings),
    }


def backend_env(settings: Settings) -> dict[str, str]:
    """REDIS_URL, DATABASE_URL and friends, only where the settings use them."""
    env = {"REDIS_URL": settings.redis_url, "DATABASE_URL": settings.database_url,
           "REDIS_KEY_PREFIX": settings.redis_key_prefix if settings.redis_url else None,
           "SINGLE_HOST": "true" if settings.single_host else None}
    return {name: value for name, value in env.items() if value}


# --------------------------------------------------------------------------- raw HTTP clients

# A request line cut in half: the client never sends the rest.
HALF_REQUEST_LINE = b"GET /health HT"


@contextmanager
def slow_clients(port: int, count: int, head: bytes = HALF_REQUEST_LINE) -> Iterator[
        list[socket.socket]]:
    """`count` connections that send `head` and then nothing; closed when the block ends."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(head)
            socks.append(sock)
        yield socks
    finally:
        for sock in socks:
            sock.close()


def health_latencies(url: str, count: int, timeout: float = 5.0) -> list[float]:
    """Seconds per sequential GET /health; a failure or timeout counts as infinity."""
    latencies = []
    for _ in range(count):
        start = time.monotonic()
        try:
            ok = requests.get(url + "/health", timeout=timeout).status_code == 200
        except requests.RequestException:
            ok = False
        latencies.append(time.monotonic() - start if ok else math.inf)
    return latencies


def raw_exchange(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send bytes as they are; return the status, headers (lower-cased names) and body."""
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        try:
            sock.sendall(request)
        except (ConnectionResetError, BrokenPipeError):
            pass  # nginx may answer and stop reading before the whole request is sent
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except ConnectionResetError:
            pass  # nginx resets after refusing a body it did not read; the answer is in
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split(" ", 2)[1]), {k.lower(): v for k, v in headers.items()}, body


def assert_json_error(status: int, headers: dict[str, str], body: bytes, expected: int) -> None:
    """The service's one error shape, written by nginx: {"error": "..."} as JSON."""
    assert status == expected, (status, body[:200])
    assert headers["content-type"] == "application/json", headers
    parsed = json.loads(body)
    assert set(parsed) == {"error"} and isinstance(parsed["error"], str), parsed


def get_request(target: bytes, headers: bytes = b"", method: bytes = b"GET") -> bytes:
    return (method + b" " + target + b" HTTP/1.1\r\nHost: localhost\r\n" + headers
            + b"Connection: close\r\n\r\n")


# --------------------------------------------------------------------------- processes


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process, from /proc."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # it ended while we looked
            continue
        # The command name (field 2) may hold spaces and ")": the parent pid follows the last ")".
        parents[int(stat.parent.name)] = int(text.rpartition(")")[2].split()[1])
    return parents


def children_of(pid: int) -> list[int]:
    return sorted(child for child, parent in _parents().items() if parent == pid)


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, children before grandchildren."""
    parents = _parents()
    found, frontier = [], [pid]
    while frontier:
        frontier = sorted(child for child, parent in parents.items() if parent in frontier)
        found += frontier
    return found


def process_name(pid: int) -> str:
    """The kernel's name of the process (`nginx` for nginx's master and workers)."""
    return Path(f"/proc/{pid}/comm").read_text().strip()


def alive(pid: int) -> bool:
    """Whether `pid` still runs (a zombie, dead but not yet reaped, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def socket_owners(inodes: set[str]) -> set[int]:
    """The pids holding any of these socket inodes open."""
    owners = set()
    for fd in Path("/proc").glob("[0-9]*/fd/*"):
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in inodes:
            owners.add(int(fd.parent.parent.name))
    return owners


def tcp_listeners(port: int | None = None) -> dict[str, int]:
    """Listening TCP sockets: inode -> port, only those on `port` when given."""
    found = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local = int(fields[1].rsplit(":", 1)[1], 16)
            if fields[3] == "0A" and port in (None, local):  # 0A: LISTEN
                found[fields[9]] = local
    return found
