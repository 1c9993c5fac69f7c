"""The Docker image's own CMD and HEALTHCHECK, run without Docker against the simulator.

The CMD is the edge supervisor (nginx in front of gunicorn, replicate_generation/edge/): these
tests hold it to #20 finding 12 (slow clients, JSON errors) and to how it stops and fails.

There is no Docker engine where the tests run, so this rebuilds the image as closely as a plain
machine allows and runs its exact commands. The Dockerfile is parsed, not restated: a fresh venv
gets only what its `RUN pip install` installs, the app dir gets only what its COPY lines bring in
past .dockerignore (so a module they leave out fails start-up here as it would in production), the
chowned runtime directories belong to the image's user, what RUN apt-get installs must be
installed here, and CMD and HEALTHCHECK run from WORKDIR with the ENV values and nothing of the
developer's environment, as the USER uid:gid when the test runs as root (as CI does), the CMD then
as PID 1 of its own PID namespace (unshare). What stays out of reach: the base image's OS and
exact patch release (Debian's nginx here is this machine's release, not the image's).
"""

from __future__ import annotations

import ast
import contextlib
import functools
import json
import math
import os
import posixpath
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import requests

from conftest import ADMIN, ADMIN_KEY
from replicate_generation.devtools.simulator import Simulator
from replicate_generation.launch import GUNICORN_CONFIG
from servers import (
    ROOT,
    Gunicorn,
    alive,
    assert_json_error,
    children_of,
    descendants,
    get_request,
    health_latencies,
    process_name,
    raw_exchange,
    slow_clients,
    socket_owners,
    tcp_listeners,
    wait_for,
)

# The server's Replicate token, for the simulator only (short, so it cannot pass for a real one).
TOKEN = "r8_image_test_token"

# The image's own directories after its PATH's python dir (/usr/local/bin), which the venv stands
# in for. Nothing of the developer's PATH (pyenv shims, ~/.local/bin) reaches the service.
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"

pytestmark = pytest.mark.skipif(
    sys.platform != "linux", reason="reproduces a Linux image: needs Linux uids and /proc")


# --------------------------------------------------------------------------- the Dockerfile


@dataclass(frozen=True)
class Copy:
    """One COPY: context paths (globs allowed), the destination, the numeric --chown if any."""

    sources: tuple[str, ...]
    dest: str
    owner: tuple[int, int] | None


@dataclass(frozen=True)
class Pip:
    """The arguments of one `RUN pip install`."""

    args: tuple[str, ...]


@dataclass(frozen=True)
class Dockerfile:
    """What the Dockerfile says the image is and runs."""

    python: str  # "3.11", from `FROM python:3.11.x-...`
    env: dict[str, str]
    workdir: PurePosixPath
    user: tuple[int, int]
    home: str  # what Docker sets HOME to: the USER's home in the image's passwd, else /
    steps: tuple[Copy | Pip, ...]  # in build order
    system_packages: tuple[str, ...]  # what RUN apt-get install adds from Debian (nginx)
    writable: tuple[tuple[PurePosixPath, tuple[int, int]], ...]  # what RUN chowns, to whom
    cmd: list[str]
    healthcheck: list[str]
    healthcheck_timeout: float
    stop_signal: signal.Signals


@dataclass
class _Accounts:
    """Users and groups that RUN useradd/groupadd create: USER and chown name them."""

    groups: dict[str, int] = field(default_factory=dict)
    users: dict[str, tuple[int, int, str]] = field(default_factory=dict)  # uid, gid, home

    def add(self, command: str, opts: dict[str, str], names: list[str]) -> None:
        if command == "groupadd":
            self.groups[names[-1]] = int(opts["--gid"])
            return
        group = opts["--gid"]
        gid = int(group) if group.isdigit() else self.groups[group]
        self.users[names[-1]] = (int(opts["--uid"]), gid, opts.get("--home-dir", "/"))

    def owner(self, spec: str) -> tuple[int, int]:
        """Resolve a chown-style `user[:group]` (names or numbers) to uid, gid."""
        user, _, group = spec.partition(":")
        if user.isdigit():
            uid, gid = int(user), int(user)
        else:
            uid, gid, _home = self.users[user]
        if group:
            gid = int(group) if group.isdigit() else self.groups[group]
        return uid, gid

    def home(self, uid: int) -> str:
        return next((home for u, _g, home in self.users.values() if u == uid), "/")


def _options(words: list[str]) -> tuple[dict[str, str], list[str]]:
    """Split a useradd/groupadd/chown command line into its valued options and its operands."""
    long_names = {"-u": "--uid", "-g": "--gid", "-d": "--home-dir", "-s": "--shell"}
    opts: dict[str, str] = {}
    operands: list[str] = []
    rest = iter(words[1:])
    for word in rest:
        name, equals, value = word.partition("=")
        name = long_names.get(name, name)
        if name in long_names.values():
            opts[name] = value if equals else next(rest)
        elif not word.startswith("-"):
            operands.append(word)
    return opts, operands


def _exec_form(text: str) -> list[str]:
    """CMD/HEALTHCHECK arguments: a JSON array runs as is, anything else through /bin/sh -c."""
    if text.startswith("["):
        argv = json.loads(text)
        assert isinstance(argv, list) and all(isinstance(a, str) for a in argv), text
        return argv
    return ["/bin/sh", "-c", text]


def _seconds(duration: str) -> float:
    """A Go duration as HEALTHCHECK takes it (`5s`, `1m30s`)."""
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration)
    assert "".join(n + u for n, u in parts) == duration, f"unparsed duration {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


class _Parser:
    """Reads the instructions one by one; each `_<keyword>` method handles one keyword."""

    def __init__(self) -> None:
        self.facts: dict[str, Any] = {
            "env": {}, "workdir": PurePosixPath("/"), "stop_signal": signal.SIGTERM,
            "system_packages": ()}
        self.steps: list[Copy | Pip] = []
        self.writable: list[tuple[PurePosixPath, tuple[int, int]]] = []
        self.accounts = _Accounts()
        self.stages = 0

    def feed(self, keyword: str, rest: str) -> None:
        handler = getattr(self, f"_{keyword.lower()}", None)
        if handler is None:
            # Something this reproduction would silently get wrong: say so instead.
            pytest.fail(f"Dockerfile: {keyword} is not reproduced by {Path(__file__).name}; "
                        "teach it before trusting this test", pytrace=False)
        handler(rest)

    def _from(self, rest: str) -> None:
        self.stages += 1
        match = re.search(r"\bpython:(\d+\.\d+)", rest)
        assert match, f"FROM {rest}: expected an official python:X.Y image"
        self.facts["python"] = match[1]

    def _env(self, rest: str) -> None:
        words = shlex.split(rest)
        pairs = dict(w.split("=", 1) for w in words) if "=" in words[0] \
            else {words[0]: rest.partition(" ")[2].strip()}  # legacy `ENV NAME value`
        assert not any("$" in v for v in pairs.values()), f"ENV {rest}: substitution not handled"
        self.facts["env"].update(pairs)

    def _workdir(self, rest: str) -> None:
        self.facts["workdir"] = self.facts["workdir"] / rest

    def _user(self, rest: str) -> None:
        match = re.fullmatch(r"(\d+):(\d+)", rest)
        assert match, f"USER {rest}: this test needs a numeric uid:gid"
        self.facts["user"] = (int(match[1]), int(match[2]))

    def _copy(self, rest: str) -> None:
        owner = None
        while rest.startswith("--"):
            flag, _, rest = rest.partition(" ")
            assert flag.startswith("--chown="), f"COPY {flag}: flag not reproduced"
            owner = self.accounts.owner(flag.removeprefix("--chown="))
        words = json.loads(rest) if rest.startswith("[") else shlex.split(rest)
        self.steps.append(Copy(tuple(words[:-1]), words[-1], owner))

    def _run(self, rest: str) -> None:
        for command in rest.split("&&"):
            words = shlex.split(command)
            opts, operands = _options(words)
            if words[:2] == ["pip", "install"]:
                self.steps.append(Pip(tuple(words[2:])))
            elif words[:2] == ["apt-get", "install"]:
                # Not installed here: this machine must have them already (.ci/run installs them).
                self.facts["system_packages"] += tuple(operands[1:])
            elif words[:2] == ["apt-get", "update"] or (words[:2] == ["rm", "-rf"] and all(
                    path.startswith("/var/lib/apt/lists/") for path in operands)):
                continue  # the package lists, fetched for the install and kept out of the layer
            elif words[0] in ("groupadd", "useradd"):
                self.accounts.add(words[0], opts, operands)
            elif words[0] == "chown":
                owner = self.accounts.owner(operands[0])
                self.writable += [(PurePosixPath(p), owner) for p in operands[1:]]
            else:
                # mkdir -p is implied by the chown that follows it; anything else is not rebuilt.
                assert words[:2] == ["mkdir", "-p"], f"RUN {command.strip()}: not reproduced"

    def _cmd(self, rest: str) -> None:
        self.facts["cmd"] = _exec_form(rest)

    def _healthcheck(self, rest: str) -> None:
        match = re.fullmatch(r"((?:--[a-z-]+=\S+\s+)*)CMD\s+(.+)", rest, re.DOTALL)
        assert match, f"HEALTHCHECK {rest}: expected `HEALTHCHECK [--opt=value ...] CMD ...`"
        options = dict(o.lstrip("-").split("=", 1) for o in match[1].split())
        self.facts["healthcheck"] = _exec_form(match[2])
        self.facts["healthcheck_timeout"] = _seconds(options.get("timeout", "30s"))

    def _stopsignal(self, rest: str) -> None:
        self.facts["stop_signal"] = signal.Signals(int(rest)) if rest.isdigit() \
            else signal.Signals[rest if rest.startswith("SIG") else f"SIG{rest}"]

    def _expose(self, rest: str) -> None:
        """Documentation only: the port bound is FLASK_PORT."""

    def _label(self, rest: str) -> None:
        """Metadata: changes nothing that runs."""

    def result(self) -> Dockerfile:
        assert self.stages == 1, "a multi-stage build is not reproduced by this test"
        missing = {"python", "user", "cmd", "healthcheck"} - self.facts.keys()
        # No USER means the image runs as root; no HEALTHCHECK means Docker never probes it.
        assert not missing, f"the Dockerfile sets no {', '.join(sorted(missing))}"
        return Dockerfile(
            **self.facts, home=self.accounts.home(self.facts["user"][0]),
            steps=tuple(self.steps), writable=tuple(self.writable))


def _instructions(text: str) -> Iterator[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction: continuations joined, comment lines dropped."""
    pending: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # Docker drops comment lines even inside a continuation
        if line.endswith("\\"):
            pending.append(line[:-1])
            continue
        keyword, _, rest = " ".join([*pending, line]).partition(" ")
        pending = []
        yield keyword.upper(), rest.strip()


def parse_dockerfile(text: str) -> Dockerfile:
    parser = _Parser()
    for keyword, rest in _instructions(text):
        parser.feed(keyword, rest)
    return parser.result()


# --------------------------------------------------------------------------- .dockerignore and COPY


def _parse_ignore(text: str) -> list[tuple[bool, tuple[str, ...]]]:
    """(is an exception `!`, pattern split into path segments), in file order."""
    patterns = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        cleaned = posixpath.normpath(line.removeprefix("!").strip()).lstrip("/")
        patterns.append((exception, tuple(cleaned.split("/"))))
    return patterns


def _match(pattern: tuple[str, ...], path: tuple[str, ...]) -> bool:
    """Docker's matching: fnmatch per path segment (`*` never crosses `/`), `**` any depth."""
    if not pattern:
        return not path
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        return any(_match(rest, path[i:]) for i in range(len(path) + 1))
    return bool(path) and fnmatchcase(path[0], head) and _match(rest, path[1:])


def _ignored(path: tuple[str, ...], patterns: list[tuple[bool, tuple[str, ...]]]) -> bool:
    """Whether .dockerignore keeps a context path out: the last pattern matching it or a parent
    directory decides, and patterns are anchored at the context root."""
    ignored = False
    for exception, pattern in patterns:
        if any(_match(pattern, path[:depth]) for depth in range(1, len(path) + 1)):
            ignored = not exception
    return ignored


def _expand(source: str, ignore: list[tuple[bool, tuple[str, ...]]]
            ) -> list[tuple[Path, PurePosixPath]]:
    """Context files one COPY source brings in, each with its path under the destination."""
    pairs: list[tuple[Path, PurePosixPath]] = []
    for match in sorted(ROOT.glob(posixpath.normpath(source).lstrip("/"))):
        if match.is_dir():  # a directory source copies its contents, not itself
            pairs += [(f, PurePosixPath(f.relative_to(match).as_posix()))
                      for f in sorted(match.rglob("*")) if f.is_file()]
        elif match.is_file():
            pairs.append((match, PurePosixPath(match.name)))
    return [(src, rel) for src, rel in pairs if not _ignored(src.relative_to(ROOT).parts, ignore)]


# --------------------------------------------------------------------------- building the "image"


@dataclass(frozen=True)
class Image:
    dockerfile: Dockerfile
    venv: Path  # stands in for the image's /usr/local python
    app_dir: Path  # WORKDIR
    code: frozenset[PurePosixPath]  # what COPY put under WORKDIR: files and their directories
    writable: frozenset[PurePosixPath]  # the chowned runtime directories, relative to WORKDIR
    run_as: tuple[int, int] | None  # the USER, when the test can switch to it (as root)

    @property
    def identity(self) -> tuple[int, int]:
        """Who the service really runs as: the USER, or the current user when not root."""
        return self.run_as or (os.getuid(), os.getgid())

    def env(self) -> dict[str, str]:
        """The container's environment, before the service's own variables."""
        return {**self.dockerfile.env, "PATH": f"{self.venv / 'bin'}:{SYSTEM_PATH}",
                "HOME": self.dockerfile.home}


def _as_user(run_as: tuple[int, int] | None) -> dict[str, Any]:
    """subprocess arguments that run a child as run_as, without root's supplementary groups."""
    if run_as is None:
        return {}
    return {"user": run_as[0], "group": run_as[1], "extra_groups": []}


def _probe_python(python: str, run_as: tuple[int, int] | None) -> str | None:
    code = "import ensurepip, sys; print(sys.base_prefix, '%d.%d' % sys.version_info[:2])"
    try:
        done = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=30,
                              check=False, **_as_user(run_as))
    except OSError:
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _base_python(version: str, run_as: tuple[int, int] | None) -> str:
    """A python{version} that the image's user can run with its own standard library.

    Run as another user, an interpreter it cannot read (pyenv's under a 0700 /root) may still
    start, on the system's libpython, so both runs must report the same prefix and version.
    """
    name = f"python{version}"
    candidates = dict.fromkeys(
        str(Path(d) / name) for d in (Path(sys.base_prefix) / "bin", "/usr/local/bin", "/usr/bin"))
    for candidate in (c for c in candidates if Path(c).is_file()):
        mine = _probe_python(candidate, None)
        if mine and mine.endswith(f" {version}") and _probe_python(candidate, run_as) == mine:
            return candidate
    pytest.fail(f"no {name} with venv support that uid {run_as and run_as[0]} can run "
                f"(tried {', '.join(candidates)}); install one readable by every user",
                pytrace=False)


def _build_step(argv: list[str], cwd: Path, what: str) -> None:
    # Building talks to the package index like `docker build` does, so it keeps the developer's
    # pip configuration (index, proxy, certificates); only the running service gets a clean env.
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=900, check=False,
                          env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-20:])
        pytest.fail(f"could not build the image's venv: {what} exited {done.returncode}. Is PyPI "
                    f"reachable? (CI must reach it; this is a failure, not a skip)\n{tail}",
                    pytrace=False)


def _copy_into(copy: Copy, root: Path, workdir: PurePosixPath,
               ignore: list[tuple[bool, tuple[str, ...]]], as_root: bool) -> set[PurePosixPath]:
    """Do one COPY; return the image paths it wrote."""
    pairs = [pair for source in copy.sources for pair in _expand(source, ignore)]
    # docker build fails on a COPY source that matches nothing in the (ignore-filtered) context.
    assert pairs, f"COPY {' '.join(copy.sources)}: nothing in the build context matches"
    dest = workdir / copy.dest
    [first, *others] = copy.sources
    single_file = not others and not re.search(r"[*?\[]", first) and (ROOT / first).is_file()
    into_dir = not single_file or copy.dest.endswith("/") or (root / dest.relative_to("/")).is_dir()
    written = set()
    for src, rel in pairs:
        target = dest / rel if into_dir else dest
        host = root / target.relative_to("/")
        host.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        shutil.copy(src, host)  # keeps the mode bits, as COPY does; the owner is root
        if copy.owner and as_root:
            os.chown(host, *copy.owner)
        written.add(target)
    return written


def _relative_tree(paths: set[PurePosixPath], base: PurePosixPath) -> frozenset[PurePosixPath]:
    """The paths under base, relative to it, with every directory leading to them."""
    tree: set[PurePosixPath] = set()
    for path in (p.relative_to(base) for p in paths if p.is_relative_to(base)):
        tree |= {path, *(parent for parent in path.parents if parent != PurePosixPath("."))}
    return frozenset(tree)


def _make_world_readable(tree: Path) -> None:
    """The image's python is readable by every user; a venv built under a tight umask may not be.
    Symlinks are left alone: chmod would follow them to the system interpreter."""
    for dirpath, _dirs, files in os.walk(tree):
        for path in [Path(dirpath), *(Path(dirpath) / f for f in files)]:
            if path.is_symlink():
                continue
            mode = path.stat().st_mode
            executable = stat.S_ISDIR(mode) or mode & stat.S_IXUSR
            path.chmod(mode | stat.S_IROTH | (stat.S_IXOTH if executable else 0))


def _assert_reachable(root: Path, dockerfile: Dockerfile) -> None:
    # The non-root uid must traverse every directory above the image to reach it at all.
    closed = [str(p) for p in root.parents if not p.stat().st_mode & stat.S_IXOTH]
    assert not closed, f"uid {dockerfile.user[0]} cannot traverse {closed}; set TMPDIR elsewhere"


def _assert_no_dotenv(app_dir: Path) -> None:
    # create_app() loads the first .env found from its cwd upwards; the image has none anywhere.
    found = [str(d / ".env") for d in (app_dir, *app_dir.parents) if (d / ".env").exists()]
    assert not found, f"{found} would be loaded into the service; the image has no .env"


def _require_system_packages(packages: tuple[str, ...]) -> None:
    """What the image installs from Debian must be installed here too: the CMD runs it."""
    missing = []
    for package in (p.partition("=")[0] for p in packages):
        try:
            done = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package],
                                  capture_output=True, text=True, timeout=30, check=False)
        except FileNotFoundError:  # not Debian: nothing says it is there
            done = subprocess.CompletedProcess([], 1, "", "")
        if "install ok installed" not in done.stdout:
            missing.append(package)
    if missing:
        message = f"the image's Debian packages are not installed here: {' '.join(missing)}"
        if os.environ.get("CI"):
            pytest.fail(f"{message} (.ci/run installs them)", pytrace=False)
        pytest.skip(f"{message} (apt-get install -y {' '.join(missing)}; CI does)")


def build_image(root: Path, dockerfile: Dockerfile) -> Image:
    _require_system_packages(dockerfile.system_packages)
    as_root = os.geteuid() == 0
    run_as = dockerfile.user if as_root else None
    root.chmod(0o755)
    if as_root:
        _assert_reachable(root, dockerfile)
    venv = root / "venv"
    base = _base_python(dockerfile.python, run_as)
    _build_step([base, "-m", "venv", str(venv)], root, f"{base} -m venv")
    app_dir = root / dockerfile.workdir.relative_to("/")
    app_dir.mkdir(parents=True)
    app_dir.chmod(0o755)  # WORKDIR creates it root-owned 0755
    ignore = _parse_ignore((ROOT / ".dockerignore").read_text())
    code: set[PurePosixPath] = set()
    for step in dockerfile.steps:  # in Dockerfile order: each pip install sees earlier COPYs
        if isinstance(step, Pip):
            # An absolute path in the image (COPY'd to /src) is that path under this root.
            args = [str(root / a.lstrip("/")) if a.startswith("/") else a for a in step.args]
            _build_step([str(venv / "bin" / "python"), "-m", "pip", "install", *args],
                        app_dir, f"pip install {' '.join(step.args)}")
        else:
            code |= _copy_into(step, root, dockerfile.workdir, ignore, as_root)
    for path, owner in dockerfile.writable:
        host = root / path.relative_to("/")
        host.mkdir(parents=True, exist_ok=True)
        if as_root:
            os.chown(host, *owner)
    _make_world_readable(venv)
    _assert_no_dotenv(app_dir)
    writable = {path for path, _owner in dockerfile.writable}
    return Image(dockerfile, venv, app_dir, _relative_tree(code, dockerfile.workdir),
                 _relative_tree(writable, dockerfile.workdir), run_as)


@pytest.fixture(scope="session")
def image() -> Iterator[Image]:
    """Built once per session (the venv is the slow part); removed afterwards."""
    dockerfile = parse_dockerfile((ROOT / "Dockerfile").read_text())
    # Not under pytest's basetemp: that is 0700 and the image's uid must be able to reach this.
    root = Path(tempfile.mkdtemp(prefix="image-"))
    try:
        yield build_image(root, dockerfile)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@functools.cache
def _pid_namespace() -> list[str] | None:
    """unshare's argv when this machine lets root give the CMD a PID namespace, as Docker does."""
    unshare = shutil.which("unshare")
    if os.geteuid() != 0 or unshare is None:
        return None
    probe = subprocess.run([unshare, "--pid", "--fork", "true"], capture_output=True, timeout=30,
                           check=False)
    return [unshare, "--pid", "--fork", "--kill-child"] if probe.returncode == 0 else None


@dataclass
class Container:
    """The image's CMD running: `server` is the process started (unshare, when it stands in for
    Docker's PID namespace and user switch) and `pid1` the CMD itself, PID 1 in that namespace."""

    server: Gunicorn
    pid1: int
    groups: set[int] = field(default_factory=set)  # the children's process groups

    @property
    def url(self) -> str:
        return self.server.url

    def children(self) -> dict[str, int]:
        """The supervisor's children by name: nginx's master and gunicorn's."""
        return {"nginx" if process_name(pid) == "nginx" else "gunicorn": pid
                for pid in children_of(self.pid1)}

    def private_dir(self) -> Path:
        """The run's directory: nginx's prefix (`-p DIR/`) on its command line."""
        # nginx rewrites it as one line: `nginx: master process /usr/sbin/nginx -p DIR/ ...`.
        argv = Path(f"/proc/{self.children()['nginx']}/cmdline").read_text().replace("\0", " ")
        words = argv.split()
        return Path(words[words.index("-p") + 1])

    def remove(self) -> None:
        """Stop it (with the namespace's PID 1, the kernel kills everything in it)."""
        self.server.stop()
        for group in self.groups:  # without a namespace, a child's orphans outlive PID 1
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)


def start_container(image: Image, sim_url: str, log: Path, **env: str) -> Container:
    """The image's CMD against the simulator on a free port on 127.0.0.1, ready to serve."""
    env = {**image.env(), "REPLICATE_BASE_URL": sim_url, "REPLICATE_API_TOKEN": TOKEN,
           "CONCURRENT_DOCKER_ADMIN_API_KEY": ADMIN_KEY, **env}
    namespace = _pid_namespace()
    if namespace and image.run_as:
        uid, gid = image.run_as
        command = [*namespace, f"--setuid={uid}", f"--setgid={gid}", "--", *image.dockerfile.cmd]
        server = Gunicorn(env, log, cwd=image.app_dir, command=command)
        pid1 = wait_for(lambda: children_of(server.proc.pid), 10, "unshare to start the CMD")[0]
    else:
        server = Gunicorn(env, log, cwd=image.app_dir, command=image.dockerfile.cmd,
                          run_as=image.run_as)
        pid1 = server.proc.pid
    container = Container(server, pid1)
    try:
        server.wait_ready()
        container.groups = set(container.children().values())
    except BaseException:
        container.remove()
        raise
    return container


@pytest.fixture
def container(image: Image, sim: Simulator, tmp_path: Path) -> Iterator[Container]:
    running = start_container(image, sim.base_url, tmp_path / "container.log")
    try:
        yield running
    finally:
        running.remove()


@pytest.fixture(scope="module")
def shared_container(image: Image, sim_server: Simulator,
                     tmp_path_factory: pytest.TempPathFactory) -> Iterator[Container]:
    """One container for the tests that only read from it."""
    running = start_container(image, sim_server.base_url,
                              tmp_path_factory.mktemp("shared") / "container.log")
    try:
        yield running
    finally:
        running.remove()


# --------------------------------------------------------------------------- checks


def _healthcheck(image: Image, container: Container) -> subprocess.CompletedProcess[str]:
    """The HEALTHCHECK command as Docker runs it: the container's env, user and WORKDIR."""
    return subprocess.run(image.dockerfile.healthcheck, cwd=image.app_dir,
                          env=container.server.env, capture_output=True, text=True, check=False,
                          timeout=image.dockerfile.healthcheck_timeout, **_as_user(image.run_as))


def _process_ids(pid: int) -> dict[str, list[str]]:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {name: fields[name].split() for name in ("Uid", "Gid", "Groups")}


def _assert_runs_as_image_user(image: Image, container: Container) -> None:
    uid, gid = image.identity
    note = "" if image.run_as else (
        f" (the test is not root, so the service ran as the current user {uid}, not the image's "
        f"USER {image.dockerfile.user[0]}; CI runs as root and checks that)")
    children = container.children()
    assert set(children) == {"nginx", "gunicorn"}, f"{children}{note}\n{container.server.log()}"
    for name, pid in children.items():
        assert children_of(pid), f"{name} has no workers{note}\n{container.server.log()}"
    for pid in [container.pid1, *descendants(container.pid1)]:
        ids = _process_ids(pid)
        # real, effective, saved and filesystem ids alike: nothing can switch back to root.
        assert ids["Uid"] == [str(uid)] * 4, f"pid {pid}: {ids}{note}"
        assert ids["Gid"] == [str(gid)] * 4, f"pid {pid}: {ids}{note}"
        if image.run_as:
            assert ids["Groups"] == [], f"pid {pid} kept supplementary groups: {ids}"


def _assert_private_dir(image: Image, container: Container) -> Path:
    """gunicorn's socket and nginx's files are in a directory only the service's user can enter."""
    private = container.private_dir()
    info = private.stat()
    assert stat.S_IMODE(info.st_mode) == 0o700, oct(info.st_mode)
    assert (info.st_uid, info.st_gid) == image.identity
    assert stat.S_ISSOCK((private / "gunicorn.sock").stat().st_mode)
    return private


def _assert_commands_come_from_the_venv(image: Image, container: Container) -> None:
    # Otherwise a gunicorn or python elsewhere on the host could stand in for a missing dependency.
    path = container.server.env["PATH"]
    for argv in (image.dockerfile.cmd, image.dockerfile.healthcheck):
        found = shutil.which(argv[0], path=path)
        assert found and Path(found).parent == image.venv / "bin", f"{argv[0]} -> {found}"
    nginx = shutil.which("nginx", path=path)  # the image's Debian nginx: this machine's
    assert nginx and Path(nginx).parent in {Path(p) for p in SYSTEM_PATH.split(":")}, nginx


def _assert_generates_into_output(image: Image, container: Container, sim: Simulator) -> None:
    answer = container.server.post("/generate", {"model_name": "flux-dev",
                                                 "prompt": "a lighthouse"}, ADMIN, timeout=60)
    assert answer.status_code == 200, f"{answer.text}\n{container.server.log()}"
    [name] = answer.json()["files"]
    written = image.app_dir / name
    assert written.is_file() and written.resolve().is_relative_to(image.app_dir / "output"), name
    assert (written.stat().st_uid, written.stat().st_gid) == image.identity
    # REPLICATE_BASE_URL and REPLICATE_API_TOKEN from the environment reached the "Replicate".
    assert [p["status"] for p in sim.predictions(TOKEN)] == ["succeeded"]


def _assert_only_image_files(image: Image) -> None:
    """The service left nothing in WORKDIR outside its runtime directories (no .pyc either)."""
    found = set()
    for path in image.app_dir.rglob("*"):
        relative = PurePosixPath(path.relative_to(image.app_dir).as_posix())
        if not any(relative.is_relative_to(w) and relative != w for w in image.writable):
            found.add(relative)
    expected = image.code | image.writable
    assert found == expected, f"unexpected or missing: {sorted(map(str, found ^ expected))}"


def _installed_module(image: Image, module: str) -> Path:
    """Where the image's python finds `module` (site-packages, not this checkout)."""
    done = subprocess.run([str(image.venv / "bin" / "python"), "-c",
                           "import importlib.util, sys; "
                           "print(importlib.util.find_spec(sys.argv[1]).origin)", module],
                          cwd=image.app_dir, env=image.env(), capture_output=True, text=True,
                          timeout=30, check=True)
    return Path(done.stdout.strip())


def _graceful_timeout(image: Image) -> float:
    """gunicorn's graceful_timeout, from the config the CMD's gunicorn runs (default 30 s)."""
    config = _installed_module(image, GUNICORN_CONFIG.removeprefix("python:"))
    for node in ast.parse(config.read_text()).body:
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "graceful_timeout" for t in node.targets):
            return float(ast.literal_eval(node.value))
    return 30.0


def _stop_like_docker(image: Image, container: Container) -> None:
    """Send STOPSIGNAL to the CMD's process only, as `docker stop` does to PID 1."""
    grace = _graceful_timeout(image)
    tree, private = descendants(container.pid1), container.private_dir()
    os.kill(container.pid1, image.dockerfile.stop_signal)
    try:
        code = container.server.proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running {grace:.0f} s after {image.dockerfile.stop_signal.name}: "
                    f"Docker would SIGKILL it\n{container.server.log()}", pytrace=False)
    assert code == 0, f"exit code {code}\n{container.server.log()}"
    # No child or worker outlived it, and its private directory went with it.
    wait_for(lambda: not any(map(alive, tree)), 5, "every child and worker to end")
    assert not private.exists(), private


def _exit_code_after(container: Container, grace: float) -> int:
    try:
        return container.server.proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running {grace:.0f} s later\n{container.server.log()}", pytrace=False)


# --------------------------------------------------------------------------- tests


def test_image_cmd_serves_as_its_user_and_stops_cleanly(
        image: Image, container: Container, sim: Simulator) -> None:
    _assert_commands_come_from_the_venv(image, container)
    _assert_runs_as_image_user(image, container)
    _assert_private_dir(image, container)
    assert requests.get(container.url + "/health", timeout=5).status_code == 200
    healthy = _healthcheck(image, container)
    assert healthy.returncode == 0, f"HEALTHCHECK failed while up: {healthy.stderr}"
    _assert_generates_into_output(image, container, sim)
    _assert_only_image_files(image)
    _stop_like_docker(image, container)
    unhealthy = _healthcheck(image, container)
    assert unhealthy.returncode != 0, "HEALTHCHECK passed with the service stopped"
    for secret in (TOKEN, ADMIN_KEY):  # neither nginx's log nor gunicorn's has a credential
        assert secret not in container.server.log()


NGINX_HEALTH_LINE = re.compile(r'"GET /health HTTP/1\.1" 200 \d+ [\d.]+s upstream=200 ')


def test_image_healthcheck_goes_through_nginx(image: Image, shared_container: Container) -> None:
    # FLASK_PORT is nginx's; gunicorn and its workers hold no TCP listener at all.
    port_owners = socket_owners(set(tcp_listeners(shared_container.server.port)))
    assert port_owners and {process_name(pid) for pid in port_owners} == {"nginx"}
    master = shared_container.children()["gunicorn"]
    assert not socket_owners(set(tcp_listeners())) & {master, *descendants(master)}

    def health_lines() -> int:
        return len(NGINX_HEALTH_LINE.findall(shared_container.server.log()))

    before = health_lines()
    healthy = _healthcheck(image, shared_container)
    assert healthy.returncode == 0, f"HEALTHCHECK failed: {healthy.stderr}"
    wait_for(lambda: health_lines() > before, 5, "nginx to log the HEALTHCHECK's request")


def _still_open(sock: socket.socket) -> bool:
    """Neither answered nor closed by the server: the connection is held, waiting for the rest."""
    sock.setblocking(False)
    try:
        return sock.recv(1) != b""  # data would be an answer; b"" the server's close
    except BlockingIOError:
        return True
    except OSError:
        return False


def test_image_keeps_answering_while_128_requests_are_half_sent(
        shared_container: Container) -> None:
    """#20 finding 12: gunicorn facing clients answered 0 of 5 /health in 5 s with 128 held."""
    head = b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Half-Sent: "  # and nothing more
    with slow_clients(shared_container.server.port, 128, head) as socks:
        started = time.monotonic()
        latencies = health_latencies(shared_container.url, 5, timeout=5)
        elapsed = time.monotonic() - started
        held = sum(map(_still_open, socks))
    answered = sum(latency < math.inf for latency in latencies)
    print(f"\n128 half-sent requests held ({held} still open after): /health answered "
          f"{answered}/5 in {elapsed:.3f} s, slowest {max(latencies):.3f} s")
    assert answered == 5 and elapsed < 5, latencies
    assert held == 128  # nginx holds them, waiting (its header timeout is 10 s)


@pytest.mark.parametrize(("request_bytes", "expected"), [
    # Over gunicorn's own 8190-byte limits too: gunicorn alone answers these in HTML.
    (get_request(b"/health", b"X-Request-ID: " + b"a" * 9000 + b"\r\n"), 431),
    (get_request(b"/health?" + b"a" * 9000), 414),
    (b"GET /health HTTP/1.1 extra\r\nHost: localhost\r\n\r\n", 400),
], ids=["header-line-too-long", "uri-too-long", "malformed-request-line"])
def test_image_answers_server_level_errors_as_json(
        shared_container: Container, request_bytes: bytes, expected: int) -> None:
    assert_json_error(*raw_exchange(shared_container.server.port, request_bytes), expected)


def test_image_stop_lets_an_in_flight_request_finish(
        image: Image, container: Container, sim: Simulator) -> None:
    body = {"model_name": "flux-dev", "prompt": "a slow lighthouse #slow=2"}
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(container.server.post, "/generate", body, ADMIN, 60)
        # In flight: the service has created the prediction, which runs 2 s on the simulator.
        wait_for(lambda: sim.predictions(TOKEN), 30, "the request to reach the simulator")
        stopped_at = time.monotonic()
        _stop_like_docker(image, container)
        response = answer.result(timeout=5)
    assert response.status_code == 200, response.text
    assert response.json()["success"] is True
    assert time.monotonic() - stopped_at >= 1  # it waited for the request, not cut it
    assert "SIGTERM received: stopping gunicorn, nginx" in container.server.log()


def test_image_ctrl_c_stops_it_as_sigterm_does(image: Image, container: Container) -> None:
    """`docker run -it` turns Ctrl-C into SIGINT for PID 1 alone: both children still stop
    gracefully (gunicorn's SIGINT would be a quick exit, so the supervisor sends SIGTERM)."""
    tree = descendants(container.pid1)
    os.kill(container.pid1, signal.SIGINT)
    code = _exit_code_after(container, _graceful_timeout(image))
    assert code == 0, f"exit code {code}\n{container.server.log()}"
    assert "SIGINT received: stopping gunicorn, nginx" in container.server.log()
    assert "Handling signal: term" in container.server.log()  # gunicorn's graceful stop
    wait_for(lambda: not any(map(alive, tree)), 5, "every child and worker to end")


@pytest.mark.parametrize("victim", ["nginx", "gunicorn"])
def test_image_stops_the_other_and_fails_when_a_child_dies(
        image: Image, container: Container, victim: str) -> None:
    tree = descendants(container.pid1)
    # SIGKILL: its workers are orphaned and handed to PID 1, which must end and reap them too.
    os.kill(container.children()[victim], signal.SIGKILL)
    code = _exit_code_after(container, _graceful_timeout(image))
    assert code == 1, f"exit code {code}\n{container.server.log()}"
    assert f"{victim} ended unexpectedly (killed by SIGKILL)" in container.server.log()
    wait_for(lambda: not any(map(alive, tree)), 5, "every child and worker to end")


@pytest.mark.parametrize(("env", "message"), [
    ({"PATH": "{venv}:/usr/bin:/bin"}, "edge: nginx is not on PATH"),
    ({"FLASK_HOST": "::g"}, 'edge: nginx config test failed: invalid IPv6 address in "[::g]:'),
], ids=["nginx-missing", "config-refused"])
def test_image_cmd_fails_fast_with_one_line(
        image: Image, env: dict[str, str], message: str) -> None:
    environ = {**image.env(), **{k: v.format(venv=image.venv / "bin") for k, v in env.items()}}
    done = subprocess.run(image.dockerfile.cmd, cwd=image.app_dir, env=environ,
                          capture_output=True, text=True, timeout=30, check=False,
                          **_as_user(image.run_as))
    output = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode == 2 and len(output) == 1, (done.returncode, output)
    assert output[0].startswith(message), output


@pytest.mark.skipif(os.geteuid() != 0,
                    reason="needs root: only root can make the code root-owned as in the image")
def test_image_user_cannot_write_its_code(image: Image) -> None:
    probe = ("import sys\n"
             "for path, mode in (('write-probe', 'x'), (sys.argv[1], 'a')):\n"
             "    try:\n"
             "        open(path, mode).close()\n"
             "    except PermissionError:\n"
             "        continue\n"
             "    sys.exit(f'uid wrote {path}')\n")
    module = str(_installed_module(image, "replicate_generation.app"))
    assert Path(module).is_relative_to(image.venv), module
    done = subprocess.run([str(image.venv / "bin" / "python"), "-c", probe, module],
                          cwd=image.app_dir, env=image.env(), capture_output=True, text=True,
                          timeout=30, check=False, **_as_user(image.run_as))
    assert done.returncode == 0, done.stderr
    assert not (image.app_dir / "write-probe").exists()


@pytest.mark.parametrize(("path", "ignored"), [
    ("README.md", True),
    ("docs/guide.md", False),  # patterns are anchored at the context root
    ("app.pyc", True),  # `**/` matches zero directories too
    ("pkg/sub/mod.pyc", True),
    ("tests/test_x.py", True),  # a directory pattern excludes what is inside it
    ("tests/keep.py", False),  # ... unless a later exception brings it back
    ("app.py", False),
])
def test_dockerignore_matching_follows_docker(path: str, ignored: bool) -> None:
    patterns = _parse_ignore("*.md\n**/*.py[cod]\ntests\n!tests/keep.py\n")
    assert _ignored(PurePosixPath(path).parts, patterns) is ignored
