"""PID 1 of the image: runs its children, passes a stop on to them, reaps, and exits as they did.

Signals are blocked and taken with sigtimedwait, never by handlers: a PID 1 ignores a signal it
neither handles nor blocks, and nothing can arrive between two checks and be lost.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

# `docker stop`, Ctrl-C, and a closed terminal: each stops every child gracefully.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
WATCHED = frozenset({signal.SIGCHLD, *STOP_SIGNALS})
# A child starts with default handlers: Python ignores SIGPIPE and SIGXFSZ, and exec keeps that.
_DEFAULTS = frozenset({signal.SIGPIPE, signal.SIGXFSZ, *WATCHED})
# How often a child's start condition (gunicorn's socket, before nginx) is looked at.
_START_POLL_SECONDS = 0.05
# sigtimedwait needs a number: with nothing due, wake up this seldom.
_IDLE_SECONDS = 3600.0


@dataclass(frozen=True)
class Program:
    """A child: its name in messages, its argv (argv[0] a path) and its graceful stop signal."""

    name: str
    argv: list[str]
    stop_signal: signal.Signals
    # Given as the child's stdout when set (nginx's access log goes to the relay's pipe).
    stdout: int | None = None
    # Started only once this holds; children start in order.
    ready: Callable[[], bool] = lambda: True


def say(message: str) -> None:
    """One line on stderr, where `docker logs` shows it."""
    print(f"edge: {message}", file=sys.stderr, flush=True)


def block_signals() -> None:
    """Hold the watched signals for sigtimedwait: call before any child or thread starts."""
    signal.pthread_sigmask(signal.SIG_BLOCK, WATCHED)


def describe(code: int) -> str:
    """An exit code from os.waitstatus_to_exitcode, in words."""
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit {code}"


def spawn(program: Program, env: Mapping[str, str]) -> int:
    """Start a child in its own process group (only PID 1 gets a terminal's Ctrl-C)."""
    actions = [] if program.stdout is None else [(os.POSIX_SPAWN_DUP2, program.stdout, 1)]
    return os.posix_spawn(program.argv[0], program.argv, env, file_actions=actions,
                          setpgroup=0, setsigmask=(), setsigdef=_DEFAULTS)


def kill_group(pgid: int, sig: signal.Signals = signal.SIGKILL) -> None:
    """Signal a child's whole process group (its workers too), if any of it is left."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class Supervisor:
    """Runs programs until one ends on its own or a stop signal comes; then stops them all."""

    def __init__(self, env: Mapping[str, str], stop_seconds: float) -> None:
        self._env = dict(env)
        self._stop_seconds = stop_seconds
        self._running: dict[int, Program] = {}
        self._deadline: float | None = None  # set once stopping: then children get SIGKILL
        self.failed = False

    @property
    def stopping(self) -> bool:
        return self._deadline is not None

    def run(self, programs: Sequence[Program]) -> int:
        """Start the programs in order, supervise them; 0 only if a stop signal ended them all
        cleanly. block_signals() must have run first."""
        waiting = list(programs)
        try:
            while self._running or (waiting and not self.stopping):
                # Signals first: a stop that came during start-up starts nothing.
                self._handle(signal.sigtimedwait(WATCHED, self._timeout(waiting)))
                self._start_ready(waiting)
        except BaseException:
            for pid in self._running:  # a bug here must not leave the children running alone
                kill_group(pid)
            raise
        return 1 if self.failed else 0

    def stop(self, reason: str, *, failed: bool) -> None:
        """Ask every child to stop gracefully (once); SIGKILL what is left after stop_seconds."""
        self.failed |= failed
        if self.stopping:
            return
        self._deadline = time.monotonic() + self._stop_seconds
        names = ", ".join(program.name for program in self._running.values())
        say(f"{reason}: stopping {names}" if names else reason)
        for pid, program in self._running.items():
            try:
                os.kill(pid, program.stop_signal)
            except ProcessLookupError:
                pass  # already dead: its SIGCHLD is pending

    def _start_ready(self, waiting: list[Program]) -> None:
        while waiting and not self.stopping and waiting[0].ready():
            program = waiting.pop(0)
            try:
                pid = spawn(program, self._env)
            except OSError as exc:
                self.stop(f"{program.name} could not start ({exc})", failed=True)
                return
            self._running[pid] = program

    def _timeout(self, waiting: list[Program]) -> float:
        if self._deadline is not None:
            return min(_IDLE_SECONDS, max(0.0, self._deadline - time.monotonic()))
        if waiting:
            return _START_POLL_SECONDS if self._running else 0.0
        return _IDLE_SECONDS

    def _handle(self, info: signal.struct_siginfo | None) -> None:
        if info is None:
            if self._deadline is not None and time.monotonic() >= self._deadline:
                self._kill_all()
        elif info.si_signo == signal.SIGCHLD:
            self._reap()
        else:
            self.stop(f"{signal.Signals(info.si_signo).name} received", failed=False)

    def _kill_all(self) -> None:
        names = ", ".join(program.name for program in self._running.values())
        say(f"{names} still running {self._stop_seconds:.0f} s after the stop: killing")
        self.failed = True
        self._deadline = math.inf  # SIGKILL is not refused: wait for the SIGCHLDs
        for pid in self._running:
            kill_group(pid)

    def _reap(self) -> None:
        """Collect every dead child, ours or an orphan handed to PID 1 (its zombie goes too)."""
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if info is None:
                return
            program = self._running.pop(info.si_pid, None)
            if program is not None:
                # Still a zombie, so its group id cannot be reused: its leftover workers go.
                kill_group(info.si_pid)
            _, status = os.waitpid(info.si_pid, 0)
            if program is not None:
                self._exited(program, os.waitstatus_to_exitcode(status))

    def _exited(self, program: Program, code: int) -> None:
        if not self.stopping:
            self.stop(f"{program.name} ended unexpectedly ({describe(code)})", failed=True)
        elif code != 0:
            say(f"{program.name} stopped with {describe(code)}")
            self.failed = True


class Relay:
    """Copies a pipe to this process's stdout until every writer has closed it.

    nginx reopens its access log by path: /dev/stdout must be a pipe for that to work anywhere
    (a socket under systemd cannot be reopened, a file would be overwritten at its offset).
    """

    def __init__(self) -> None:
        self._read, self.write = os.pipe()
        self._thread = threading.Thread(target=self._copy, name="edge-log-relay", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Close this end once no child will be given it; wait for what nginx wrote last."""
        os.close(self.write)
        self._thread.join(timeout)

    def _copy(self) -> None:
        writable = True
        while chunk := os.read(self._read, 65536):
            while writable and chunk:
                try:
                    chunk = chunk[os.write(1, chunk):]
                except OSError:
                    writable = False  # stdout gone: keep draining, so nginx never blocks
        os.close(self._read)
