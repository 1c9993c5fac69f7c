"""The nginx binary and its command lines: the run itself and the config test before it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from replicate_generation.edge.config import EdgeError

# `nginx -t` only parses (a listen host named, not numbered, is looked up): seconds at most.
_TEST_SECONDS = 30
# `2026/01/02 03:04:05 [emerg] 12#12: message` or `nginx: [emerg] message`: the message.
_EMERG = re.compile(r"\[emerg\] (?:\d+#\d+: )?(.*)")


def find_nginx() -> str:
    """nginx on PATH; a one-line error without it."""
    found = shutil.which("nginx")
    if found is None:
        raise EdgeError("nginx is not on PATH (apt-get install nginx puts it in /usr/sbin); "
                        "`replicate-generation serve` runs gunicorn alone")
    return found


def nginx_argv(binary: str, work: Path, conf: Path, *, test: bool = False) -> list[str]:
    """nginx in the foreground with the run's config, its prefix and early errors in `work`/stderr.

    As root (never in the image), workers would switch to nobody and lose the 0700 directory.
    """
    directives = "daemon off;" + (" user root;" if os.geteuid() == 0 else "")
    return [binary, *(["-t", "-q"] if test else []), "-p", f"{work}/", "-c", str(conf),
            "-e", "stderr", "-g", directives]


def check_config(binary: str, work: Path, conf: Path) -> None:
    """`nginx -t`: a config nginx refuses stops the start with nginx's own last line."""
    try:
        done = subprocess.run(  # noqa: S603 - fixed argv: the nginx found above
            nginx_argv(binary, work, conf, test=True), capture_output=True, text=True,
            timeout=_TEST_SECONDS, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EdgeError(f"nginx config test could not run: {exc}") from None
    if done.returncode != 0:
        lines = (done.stderr + done.stdout).strip().splitlines() or [f"exit {done.returncode}"]
        # nginx's first [emerg] names the directive and line; its last only says "failed".
        emerg = next(filter(None, map(_EMERG.search, lines)), None)
        cause = emerg[1] if emerg else lines[-1].strip()
        raise EdgeError(f"nginx config test failed: {cause}")
