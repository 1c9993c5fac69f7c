"""Move finished files out of the output root to where a caller asked, never over a file unasked.

Extensions are known only after generation, so any file of the same stem (or `<stem>_<n>`) takes
the name; a claim is a hard link (or an O_EXCL file), so a file created meanwhile is never lost.
"""

from __future__ import annotations

import errno
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

from replicate_generation.errors import OutputExists
from replicate_generation.outputs.names import name_key

IfExists = Literal["refuse", "rename", "overwrite"]
IF_EXISTS_CHOICES: tuple[IfExists, ...] = ("refuse", "rename", "overwrite")
_EXTENSION = re.compile(r"\.[0-9A-Za-z]+$")
_NUMBERED = re.compile(r"_\d+$")
_MAX_RENAMES = 10_000


def check_if_exists(value: object, name: str = "if_exists") -> IfExists:
    if value not in IF_EXISTS_CHOICES:
        raise ValueError(f"{name} must be one of {', '.join(IF_EXISTS_CHOICES)}, not {value!r}")
    return value


def _stem_keys(name: str) -> set[str]:
    """The stems a file's name blocks: the name, without its extension, and without `_<n>`."""
    base = _EXTENSION.sub("", name)
    return {name_key(key) for key in (name, base, _NUMBERED.sub("", base))}


def taken_stems(directory: Path) -> dict[str, Path]:
    """Every blocked stem (as name_key folds it) of `directory`, with a file that blocks it."""
    taken: dict[str, Path] = {}
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                for key in _stem_keys(entry.name):
                    taken.setdefault(key, directory / entry.name)
    except (FileNotFoundError, NotADirectoryError):
        pass
    return taken


class OutputNames:
    """The names the outputs of one call or run will take, checked before anything is paid for:
    against the files already there and against each other (`a` and `a_1` may clash: `a`'s
    second output is `a_1`)."""

    def __init__(self) -> None:
        self._existing: dict[Path, dict[str, Path]] = {}
        self._claimed: dict[tuple[str, Path, str], int] = {}

    def in_the_way(self, directory: Path, stem: str) -> Path | None:
        """A file already in `directory` that an output named `stem` would clash with."""
        key = directory.absolute()
        if key not in self._existing:
            self._existing[key] = taken_stems(directory)
        return self._existing[key].get(name_key(stem))

    def claim(self, directory: Path, stem: str, owner: int) -> int | None:
        """Record that item `owner` writes `stem` in `directory`; return an earlier item whose
        names may clash with it, else None."""
        where = directory.resolve()
        folded = name_key(stem)
        base = _NUMBERED.sub("", folded)
        for kind, name in (("exact", folded), ("base", folded), ("exact", base)):
            other = self._claimed.get((kind, where, name))
            if other is not None and other != owner:
                return other
        self._claimed.setdefault(("exact", where, folded), owner)
        if base != folded:
            self._claimed.setdefault(("base", where, base), owner)
        return None


def place_without_clobbering(files: Sequence[tuple[Path, str]], directory: Path, stem: str,
                             if_exists: IfExists) -> list[Path]:
    """Give each `(source, rest)` the name `directory/<stem><rest>` and remove the sources.

    "overwrite" replaces, "refuse" raises OutputExists, "rename" takes the first free `<stem>-<n>`.
    """
    if if_exists == "overwrite":
        targets = [directory / f"{stem}{rest}" for _, rest in files]
        for (source, _), target in zip(files, targets, strict=True):
            replace_into(source, target)
        return targets
    for candidate in _candidate_stems(stem, if_exists):
        in_the_way = _claim_all(files, directory, candidate)
        if in_the_way is None:
            for source, _ in files:
                source.unlink(missing_ok=True)
            return [directory / f"{candidate}{rest}" for _, rest in files]
        if if_exists == "refuse":
            raise OutputExists(in_the_way, f"{in_the_way} already exists: not replaced")
    raise OutputExists(directory / stem, f"no free name for {directory / stem} after "
                                         f"{_MAX_RENAMES} tries")


def _candidate_stems(stem: str, if_exists: IfExists) -> Iterator[str]:
    yield stem
    if if_exists == "rename":
        for number in range(2, _MAX_RENAMES):
            yield f"{stem}-{number}"


def _claim_all(files: Sequence[tuple[Path, str]], directory: Path, stem: str) -> Path | None:
    """Link every file under `stem`; None when all are in place, else the path in the way
    (and none left linked)."""
    in_the_way = taken_stems(directory).get(name_key(stem))
    if in_the_way is not None:
        return in_the_way
    linked: list[Path] = []
    try:
        for source, rest in files:
            target = directory / f"{stem}{rest}"
            _link_exclusive(source, target)
            linked.append(target)
    except BaseException as exc:
        for target in linked:
            target.unlink(missing_ok=True)
        if isinstance(exc, FileExistsError):
            return target
        raise
    return None


def _link_exclusive(source: Path, target: Path) -> None:
    """A second name for `source`, failing with FileExistsError when `target` exists: a hard
    link, or where there are none, an O_EXCL file then replaced by a full copy."""
    try:
        os.link(source, target)
        return
    except FileExistsError:
        raise
    except OSError:
        pass  # another file system, or one without hard links
    os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    try:
        _copy_then_rename(source, target)
    except BaseException:
        target.unlink(missing_ok=True)
        raise


def publish(tmp: Path, final: Path) -> Path:
    """Give a finished temp file its name, never over a file there (another item's, or one a
    stopped process left): a taken name makes it `<name>-<n><ext>`, so two never share one."""
    stem, ext = _split_extension(final.name)
    for number in range(1, _MAX_RENAMES):
        candidate = final if number == 1 else final.with_name(f"{stem}-{number}{ext}")
        try:
            _link_exclusive(tmp, candidate)
        except FileExistsError:
            continue
        tmp.unlink(missing_ok=True)
        return candidate
    raise OutputExists(final, f"no free name for {final} after {_MAX_RENAMES} tries")


def _split_extension(name: str) -> tuple[str, str]:
    match = _EXTENSION.search(name)
    return (name[:match.start()], match.group()) if match else (name, "")


def replace_into(source: Path, target: Path) -> None:
    """Move `source` to `target`, replacing it: a rename on one file system, else a copy."""
    try:
        os.replace(source, target)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    _copy_then_rename(source, target)
    source.unlink(missing_ok=True)


def _copy_then_rename(source: Path, target: Path) -> None:
    """Copy to a hidden temp file beside the target, fsync and rename: a reader sees the old file
    or the whole new one."""
    fd, tmp_name = tempfile.mkstemp(prefix=".", suffix=".part", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, source.open("rb") as src:
            while chunk := src.read(1024 * 1024):
                out.write(chunk)
            out.flush()
            os.fchmod(out.fileno(), 0o644)
            os.fsync(out.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
