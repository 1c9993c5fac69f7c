"""An item's files placed where its row or --output-dir asks, never over a file already there."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from replicate_generation.cli.batch.errors import UsageError
from replicate_generation.cli.batch.manifest import Manifest
from replicate_generation.cli.batch.reader import Row, curated
from replicate_generation.library.placement import keyed_in_the_way
from replicate_generation.outputs import (
    IfExists,
    OutputNames,
    place_without_clobbering,
    safe_filename,
)

_IF_EXISTS_HINT = ("nothing was submitted. Use --if-exists rename to write beside it under a new "
                   "name, or --if-exists overwrite to replace it")


def place_files(sources: Sequence[str], row: Row, output_dir: Path | None,
                fetch: Callable[[str, Path], None], if_exists: IfExists = "refuse") -> list[str]:
    """Fetch each source (`fetch` writes atomically) beside its target, then place it; the paths."""
    destination = output_destination(row, output_dir)
    if destination is None:
        return []
    directory, stem = destination
    rests = _rests(sources, row, stem)
    directory.mkdir(parents=True, exist_ok=True)
    staged: list[Path] = []
    try:
        for source in sources:
            staged.append(_stage(source, directory, fetch))
        placed = place_without_clobbering(list(zip(staged, rests, strict=True)),
                                          directory.absolute(), stem, if_exists)
    finally:
        for path in staged:
            path.unlink(missing_ok=True)
    return [str(p) for p in placed]


def output_destination(row: Row, output_dir: Path | None) -> tuple[Path, str] | None:
    """The directory and the name without extension of a row's local files, if it has any."""
    if row.output is not None:
        return row.output.parent, safe_filename(row.output.name, "output")
    if output_dir is None:
        return None
    return output_dir, safe_filename(str(row.task["custom_filename"]), "custom_filename")


def _rests(sources: Sequence[str], row: Row, stem: str) -> list[str]:
    """What follows the stem in each file's name: the real extension, `_<n>` for several."""
    names = [Path(s.split("?", 1)[0]).name for s in sources]
    if row.output is not None:
        if len(names) == 1:
            return [Path(names[0]).suffix]
        return [f"_{n}{Path(name).suffix}" for n, name in enumerate(names, start=1)]
    # Under --output-dir the files keep the job's names, which start with the row's stem.
    return [name[len(stem):] if name.startswith(stem) else f"_{n}{Path(name).suffix}"
            for n, name in enumerate(names, start=1)]


def _stage(source: str, directory: Path, fetch: Callable[[str, Path], None]) -> Path:
    fd, name = tempfile.mkstemp(prefix=".", suffix=".staged", dir=directory)
    os.close(fd)
    staged = Path(name)
    try:
        fetch(source, staged)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    return staged


def refuse_taken_outputs(rows: Sequence[Row], output_dir: Path | None, manifest: Manifest,
                         retry_failed: bool) -> None:
    """Stop before anything is spent if a row still to run would write over or share a name."""
    names = OutputNames()
    for row in rows:
        if manifest.finished(row.index, retry_failed):
            continue
        destination = output_destination(row, output_dir)
        if destination is None:
            continue
        directory, stem = destination
        other = names.claim(directory, stem, row.index)
        if other is not None:
            raise UsageError(f"{row.where}: its files ({directory / stem}.*) may share names "
                             f"with those of {rows[other].where}; {_IF_EXISTS_HINT}")
        in_the_way = names.in_the_way(directory, stem)
        if in_the_way is None and row.output is None and curated(row.model) is None:
            # Under --output-dir the files keep the job's names: a dict's are `<name>_<key>`.
            in_the_way = keyed_in_the_way(directory, stem)
        if in_the_way is not None:
            raise UsageError(f"{row.where}: {in_the_way} already exists (files take their real "
                             f"format's extension, so any {directory / stem}.* counts); "
                             f"{_IF_EXISTS_HINT}")


def copy_atomic(source: str, target: Path) -> None:
    """Hard-link (or copy) to a hidden temp file beside the target, then rename it into place."""
    fd, tmp_name = tempfile.mkstemp(prefix=".", suffix=".part", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        tmp.unlink()
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
