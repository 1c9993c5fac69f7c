"""The nginx config of one run: the package's one template (nginx.conf) with this run's values."""

from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

TEMPLATE = "nginx.conf"
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")
# A synchronous batch answers when its last task ends: TASK_TIMEOUT_SECONDS, then this margin.
READ_TIMEOUT_MARGIN_SECONDS = 30
# What would end a directive, open a block or start another parameter inside a value.
_UNSAFE = re.compile(r"[\s;{}'\"#$]")


class EdgeError(Exception):
    """Why the edge cannot start, in one line (nginx missing, a value nginx cannot take...)."""


@dataclass(frozen=True)
class ProxyConfig:
    """What differs between two runs of the template: addresses, paths and the service's limits."""

    listen: str  # nginx's `listen`: HOST:PORT
    upstream: str  # gunicorn: `unix:/path` or HOST:PORT
    work: Path  # the run's private directory: pid file and temp paths
    max_body_bytes: int  # MAX_REQUEST_BYTES
    task_timeout_seconds: float  # TASK_TIMEOUT_SECONDS
    resolver: str | None = None  # a nameserver, needed only when the upstream is a name

    def values(self) -> dict[str, str]:
        """Each placeholder's text."""
        resolver = (f"resolver {_bracketed(self.resolver)} valid=10s ipv6=off;" if self.resolver
                    else "# (none: the upstream is an address, nothing to look up)")
        return {
            "listen": self.listen,
            "upstream": self.upstream,
            "work": str(self.work),
            "max_body_bytes": str(self.max_body_bytes),
            "max_body_text": size_text(self.max_body_bytes),
            "read_timeout": f"{read_timeout_seconds(self.task_timeout_seconds)}s",
            "resolver": resolver,
        }


def template_text() -> str:
    """The shipped template, from the installed package (the image has no checkout)."""
    return resources.files(__package__).joinpath(TEMPLATE).read_text(encoding="utf-8")


def render(config: ProxyConfig, template: str | None = None) -> str:
    """The template with every placeholder filled; a value the template lacks is an error too."""
    text = template_text() if template is None else template
    values = config.values()
    used = set(_PLACEHOLDER.findall(text))
    if used != set(values):
        raise ValueError(f"template placeholders {sorted(used)} != values {sorted(values)}")
    for name in ("listen", "upstream", "work"):
        if _UNSAFE.search(values[name]):
            raise EdgeError(f"{name} {values[name]!r} cannot go into the nginx config")
    return _PLACEHOLDER.sub(lambda match: values[match[1]], text)


def host_port(host: str, port: int) -> str:
    """HOST:PORT as nginx reads it (`listen`, an upstream), bracketing a bare IPv6 host."""
    return f"{_bracketed(host)}:{port}"


def read_timeout_seconds(task_timeout_seconds: float) -> int:
    return math.ceil(task_timeout_seconds) + READ_TIMEOUT_MARGIN_SECONDS


def size_text(size: int) -> str:
    """16777216 -> "16 MiB", for the 413 message."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size % scale == 0:
            return f"{size // scale} {unit}"
    return f"{size} bytes"


def upstream_address(text: str) -> tuple[str, int]:
    """`--upstream HOST:PORT` split and checked (an IPv6 host in brackets)."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]") if host.startswith("[") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise EdgeError(f"--upstream must be HOST:PORT, got {text!r}")
    return host, int(port)


def needs_resolver(host: str) -> bool:
    """Whether nginx must look the upstream host up (a name, not an address)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return True
    return False


def nameserver(resolv_conf: str) -> str | None:
    """The first nameserver of /etc/resolv.conf's text (Docker's own DNS in a container)."""
    for line in resolv_conf.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "nameserver":
            return words[1]
    return None


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
