"""The Docker image's own CMD and HEALTHCHECK, run without Docker against the simulator.

There is no Docker engine where the tests run, so this rebuilds the image as closely as a plain
machine allows and runs its exact commands. The Dockerfile is parsed, not restated: a fresh venv
gets only what its `RUN pip install` installs, the app dir gets only what its COPY lines bring in
past .dockerignore (so a module they leave out fails start-up here as it would in production), the
chowned runtime directories belong to the image's user, and CMD and HEALTHCHECK run from WORKDIR
with the ENV values and nothing of the developer's environment, as the USER uid:gid when the test
runs as root (as CI does). What stays out of reach: the base image's OS and exact patch release.
"""

from __future__ import annotations

import ast
import json
import os
import posixpath
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import requests

from conftest import ADMIN, ADMIN_KEY
from replicate_generation.devtools.simulator import Simulator
from servers import ROOT, Gunicorn

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
            "env": {}, "workdir": PurePosixPath("/"), "stop_signal": signal.SIGTERM}
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


def build_image(root: Path, dockerfile: Dockerfile) -> Image:
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


@pytest.fixture
def container(image: Image, sim: Simulator, tmp_path: Path) -> Iterator[Gunicorn]:
    """The image's CMD, running against the simulator on a free port on 127.0.0.1."""
    env = {**image.env(), "REPLICATE_BASE_URL": sim.base_url, "REPLICATE_API_TOKEN": TOKEN,
           "CONCURRENT_DOCKER_ADMIN_API_KEY": ADMIN_KEY}
    server = Gunicorn(env, tmp_path / "container.log", cwd=image.app_dir,
                      command=image.dockerfile.cmd, run_as=image.run_as)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
        try:  # a worker orphaned by a master that died would otherwise outlive the test
            os.killpg(server.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# --------------------------------------------------------------------------- checks


def _healthcheck(image: Image, server: Gunicorn) -> subprocess.CompletedProcess[str]:
    """The HEALTHCHECK command as Docker runs it: the container's env, user and WORKDIR."""
    return subprocess.run(image.dockerfile.healthcheck, cwd=image.app_dir, env=server.env,
                          capture_output=True, text=True, check=False,
                          timeout=image.dockerfile.healthcheck_timeout, **_as_user(image.run_as))


def _process_ids(pid: int) -> dict[str, list[str]]:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {name: fields[name].split() for name in ("Uid", "Gid", "Groups")}


def _children(pid: int) -> list[int]:
    children = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat_file.read_text()
        except OSError:  # the process ended while we looked
            continue
        # The command name (field 2) may hold spaces and ")": the parent pid follows the last ")".
        if int(text.rpartition(")")[2].split()[1]) == pid:
            children.append(int(stat_file.parent.name))
    return children


def _assert_runs_as_image_user(image: Image, server: Gunicorn) -> None:
    uid, gid = image.identity
    note = "" if image.run_as else (
        f" (the test is not root, so the service ran as the current user {uid}, not the image's "
        f"USER {image.dockerfile.user[0]}; CI runs as root and checks that)")
    workers = _children(server.proc.pid)
    assert workers, f"gunicorn has no workers{note}\n{server.log()}"
    for pid in [server.proc.pid, *workers]:
        ids = _process_ids(pid)
        # real, effective, saved and filesystem ids alike: nothing can switch back to root.
        assert ids["Uid"] == [str(uid)] * 4, f"pid {pid}: {ids}{note}"
        assert ids["Gid"] == [str(gid)] * 4, f"pid {pid}: {ids}{note}"
        if image.run_as:
            assert ids["Groups"] == [], f"pid {pid} kept supplementary groups: {ids}"


def _assert_commands_come_from_the_venv(image: Image, server: Gunicorn) -> None:
    # Otherwise a gunicorn or python elsewhere on the host could stand in for a missing dependency.
    for argv in (image.dockerfile.cmd, image.dockerfile.healthcheck):
        found = shutil.which(argv[0], path=server.env["PATH"])
        assert found and Path(found).parent == image.venv / "bin", f"{argv[0]} -> {found}"


def _assert_generates_into_output(image: Image, server: Gunicorn, sim: Simulator) -> None:
    answer = server.post("/generate", {"model_name": "flux-dev", "prompt": "a lighthouse"},
                         ADMIN, timeout=60)
    assert answer.status_code == 200, f"{answer.text}\n{server.log()}"
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


def _config_file(image: Image) -> Path:
    """The gunicorn config the CMD names: a file under WORKDIR, or `python:<module>`."""
    cmd = image.dockerfile.cmd
    config = cmd[cmd.index("-c") + 1]
    if config.startswith("python:"):
        return _installed_module(image, config.removeprefix("python:"))
    return image.app_dir / config


def _graceful_timeout(image: Image) -> float:
    """gunicorn's graceful_timeout, read from the config file the CMD names (default 30 s)."""
    for node in ast.parse(_config_file(image).read_text()).body:
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "graceful_timeout" for t in node.targets):
            return float(ast.literal_eval(node.value))
    return 30.0


def _stop_like_docker(image: Image, server: Gunicorn) -> None:
    """Send STOPSIGNAL to the CMD's process only, as `docker stop` does to PID 1."""
    grace = _graceful_timeout(image)
    server.proc.send_signal(image.dockerfile.stop_signal)
    try:
        code = server.proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running {grace:.0f} s after {image.dockerfile.stop_signal.name}: "
                    f"Docker would SIGKILL it\n{server.log()}", pytrace=False)
    assert code == 0, f"exit code {code}\n{server.log()}"
    with pytest.raises(ProcessLookupError):  # and no worker outlived the master
        os.killpg(server.proc.pid, 0)


# --------------------------------------------------------------------------- tests


def test_image_cmd_serves_as_its_user_and_stops_cleanly(
        image: Image, container: Gunicorn, sim: Simulator) -> None:
    _assert_commands_come_from_the_venv(image, container)
    _assert_runs_as_image_user(image, container)
    assert requests.get(container.url + "/health", timeout=5).status_code == 200
    healthy = _healthcheck(image, container)
    assert healthy.returncode == 0, f"HEALTHCHECK failed while up: {healthy.stderr}"
    _assert_generates_into_output(image, container, sim)
    _assert_only_image_files(image)
    _stop_like_docker(image, container)
    unhealthy = _healthcheck(image, container)
    assert unhealthy.returncode != 0, "HEALTHCHECK passed with the service stopped"


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
