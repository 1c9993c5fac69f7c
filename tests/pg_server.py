"""A private PostgreSQL server for tests that stop and restart it.

It lives in its own temp dir on a free port, run by a non-root user (initdb refuses root), so a
test can take it down without touching the shared server on 127.0.0.1:5432.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from servers import free_port

BIN = Path("/usr/lib/postgresql/15/bin")
# Who runs it when the tests run as root.
RUN_AS = "nobody"


def available() -> bool:
    return (BIN / "initdb").exists() and (BIN / "pg_ctl").exists()


class PrivateServer:
    """initdb in a temp dir, then start / stop / start again on the same data dir."""

    def __init__(self) -> None:
        # Under /tmp itself: pytest's tmp dirs sit in a root-only directory.
        self.root = Path(tempfile.mkdtemp(prefix="rg-pg-"))
        self.data = self.root / "data"
        self.sockets = self.root / "run"
        self.log = self.root / "server.log"
        self.port = free_port()
        self.running = False
        self.sockets.mkdir()
        if os.geteuid() == 0:
            user = pwd.getpwnam(RUN_AS)
            for path in (self.root, self.sockets):
                os.chown(path, user.pw_uid, user.pw_gid)
        self._run([str(BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust",
                   "-E", "UTF8", "--no-sync", "--no-instructions"])

    def url(self, database: str = "postgres", password: str | None = None) -> str:
        auth = f"postgres:{password}" if password else "postgres"
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        options = (f"-p {self.port} -k {self.sockets} -h 127.0.0.1 -c fsync=off"
                   " -c full_page_writes=off")
        self._run([str(BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", options,
                   "-w", "-t", "60", "start"])
        self.running = True

    def stop(self) -> None:
        self._run([str(BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"])
        self.running = False

    def remove(self) -> None:
        try:
            if self.running:
                self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def _run(self, argv: list[str]) -> None:
        if os.geteuid() == 0:
            argv = ["runuser", "-u", RUN_AS, "--", *argv]
        done = subprocess.run(argv, cwd=self.root, capture_output=True, text=True, timeout=120,
                              check=False)
        if done.returncode != 0:
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(f"{argv[-1]} failed: {done.stderr or done.stdout}\n{log[-2000:]}")
