"""What a run tells the user on stderr: the progress bar and one-line messages."""

from __future__ import annotations

import sys
import time
from typing import IO


class Progress:
    """A one-line bar on a terminal; on a pipe, a line per change (at most one a second)."""

    WIDTH = 30

    def __init__(self, total: int, stream: IO[str], enabled: bool) -> None:
        self.total = total
        self.stream = stream
        self.enabled = enabled
        self.tty = enabled and stream.isatty()
        self.started = time.monotonic()
        self._last: tuple[int, int, int] | None = None
        self._last_at = 0.0

    def update(self, done: int, failed: int, running: int, *, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        state = (done, failed, running)
        if not self.tty and (state == self._last or (now - self._last_at < 1.0 and not force)):
            return
        self._last, self._last_at = state, now
        filled = self.WIDTH * done // max(1, self.total)
        elapsed = int(now - self.started)
        line = (f"[{'#' * filled}{'.' * (self.WIDTH - filled)}] {done}/{self.total} done"
                f", {failed} failed, {running} running, {elapsed // 60}:{elapsed % 60:02d}")
        self.stream.write(f"\r{line}\x1b[K" if self.tty else line + "\n")
        self.stream.flush()

    def finish(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def say(message: str) -> None:
    sys.stderr.write(message + "\n")
    sys.stderr.flush()
