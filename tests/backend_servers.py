"""A private 3-master Redis Cluster and a PgBouncer in transaction mode, for tests of the service
behind them. Both run on free ports in a temp dir; the shared Redis on 6379 and the shared
PostgreSQL on 5432 are never reconfigured (PgBouncer only forwards to the latter).
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg
import redis

from redis_server import wait_for_ping
from servers import free_port

# initdb and PgBouncer refuse root: who runs PgBouncer when the tests run as root.
RUN_AS = "nobody"


def _which(name: str) -> str | None:
    # Debian puts pgbouncer in /usr/sbin, which a non-login root shell may lack.
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


class RedisClusterServers:
    """Three cluster-enabled redis-servers made one cluster (no replicas) by redis-cli."""

    def __init__(self, directory: Path, masters: int = 3) -> None:
        self.directory = directory
        self.ports = [free_port() for _ in range(masters)]
        # The bus would default to port + 10000, in the kernel's range for outgoing connections.
        self.bus_ports = [free_port() for _ in range(masters)]
        self._processes: list[subprocess.Popen[bytes]] = []

    @staticmethod
    def missing() -> str | None:
        absent = [name for name in ("redis-server", "redis-cli") if _which(name) is None]
        return f"{' and '.join(absent)} not installed" if absent else None

    def url(self, node: int = 0) -> str:
        return f"redis://127.0.0.1:{self.ports[node]}/0"

    def start(self) -> None:
        for port, bus_port in zip(self.ports, self.bus_ports, strict=True):
            node_dir = self.directory / str(port)
            node_dir.mkdir(parents=True)
            argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                    "--cluster-enabled", "yes", "--cluster-port", str(bus_port),
                    "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "2000",
                    "--save", "", "--appendonly", "no", "--dir", str(node_dir),
                    "--logfile", str(node_dir / "redis.log")]
            self._processes.append(subprocess.Popen(
                argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for port, process in zip(self.ports, self._processes, strict=True):
            try:
                wait_for_ping(port)
            except redis.ConnectionError:
                log = self.directory / str(port) / "redis.log"
                raise RuntimeError(f"redis-server on {port} (exit {process.poll()}): "
                                   f"{log.read_text()[-2000:] if log.exists() else ''}") from None
        subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{port}" for port in self.ports),
             "--cluster-replicas", "0", "--cluster-yes"],
            check=True, capture_output=True, timeout=60)
        self._wait_until_ok()

    def _wait_until_ok(self, timeout: float = 30.0) -> None:
        """Every node agrees the cluster is up and every slot served."""
        clients = [redis.Redis(port=port, decode_responses=True) for port in self.ports]
        deadline = time.monotonic() + timeout
        try:
            while not all(client.cluster("INFO")["cluster_state"] == "ok"
                          for client in clients):
                if time.monotonic() > deadline:
                    raise TimeoutError("the Redis Cluster did not reach cluster_state:ok")
                time.sleep(0.05)
        finally:
            for client in clients:
                client.close()

    def keys_per_node(self, prefix: str) -> list[int]:
        """How many of this prefix's keys each node holds."""
        counts = []
        for port in self.ports:
            client = redis.Redis(port=port)
            counts.append(sum(1 for _ in client.scan_iter(match=f"{prefix}:*", count=1000)))
            client.close()
        return counts

    def kill(self, node: int) -> None:
        """SIGKILL one node: its slots go unserved (no replicas to promote)."""
        self._processes[node].kill()
        self._processes[node].wait(timeout=10)

    def stop(self) -> None:
        for process in self._processes:
            process.kill()
        for process in self._processes:
            process.wait(timeout=10)
        self._processes.clear()


class PgBouncer:
    """Debian's pgbouncer in transaction pooling mode in front of the shared PostgreSQL, with a
    small server pool so consecutive transactions of one client meet different sessions."""

    def __init__(self, upstream_port: int = 5432, server_pool: int = 3) -> None:
        self.upstream_port = upstream_port
        self.server_pool = server_pool
        self.port = free_port()
        # Under /tmp itself, readable by RUN_AS: pytest's tmp dirs sit in a root-only directory.
        self.root = Path(tempfile.mkdtemp(prefix="rg-pgbouncer-"))
        self.log = self.root / "pgbouncer.log"
        self._process: subprocess.Popen[bytes] | None = None

    @staticmethod
    def missing() -> str | None:
        return None if _which("pgbouncer") else "pgbouncer not installed"

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        (self.root / "users.txt").write_text('"postgres" ""\n')
        (self.root / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"* = host=127.0.0.1 port={self.upstream_port}\n"
            "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {self.port}\nunix_socket_dir =\n"
            f"auth_type = trust\nauth_file = {self.root / 'users.txt'}\n"
            "pool_mode = transaction\n"
            f"default_pool_size = {self.server_pool}\nmin_pool_size = 0\nreserve_pool_size = 0\n"
            "max_client_conn = 500\n"
            f"logfile = {self.log}\npidfile = {self.root / 'pgbouncer.pid'}\n")
        argv = [str(_which("pgbouncer")), str(self.root / "pgbouncer.ini")]
        if os.geteuid() == 0:
            user = pwd.getpwnam(RUN_AS)
            for path in (self.root, *self.root.iterdir()):
                os.chown(path, user.pw_uid, user.pw_gid)
            argv.insert(1, f"--user={RUN_AS}")
        self._process = subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL)
        self._wait_ready()

    def _wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with psycopg.connect(self.url("postgres"), connect_timeout=1) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.OperationalError:
                if self._process is not None and self._process.poll() is not None:
                    raise RuntimeError(f"pgbouncer exited: {self.log_text()}") from None
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            process.wait(timeout=10)
        shutil.rmtree(self.root, ignore_errors=True)
