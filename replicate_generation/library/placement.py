"""The caller's output paths: refused up front when taken, then the item's files moved there from
OUTPUT_DIR, keeping the real extension and noting any name that differs from the one asked."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path

from replicate_generation.errors import OutputExists
from replicate_generation.library.arguments import Destination
from replicate_generation.library.results import Result
from replicate_generation.outputs import IfExists, OutputNames, place_without_clobbering
from replicate_generation.outputs.names import name_key

_OPTIONS_HINT = ('Pass if_exists="rename" to write beside it under a new name, or '
                 'if_exists="overwrite" to replace it.')


def check_free(destinations: Sequence[Destination | None], if_exists: IfExists,
               keyed: Sequence[bool] = ()) -> None:
    """With "refuse", fail before anything is paid for when an output's name is taken: by a file
    there now (whatever its extension), or by another item of this call. A `keyed` item (a
    model outside the catalogue) may also write `<name>_<key>` (a dict output): any such file
    there counts too."""
    if if_exists != "refuse":
        return
    names = OutputNames()
    for i, destination in enumerate(destinations):
        if destination is None:
            continue
        where = destination.directory / destination.stem
        taken = keyed_in_the_way(destination.directory, destination.stem) \
            if i < len(keyed) and keyed[i] else None
        if taken is not None:
            raise OutputExists(taken, f"{destination.field}: {taken} already exists and this "
                               f"model's outputs may be named {destination.stem}_<key>; "
                               f"nothing was submitted. {_OPTIONS_HINT}")
        other = names.claim(destination.directory, destination.stem, i)
        if other is not None:
            raise OutputExists(where, f"{destination.field}: {where}.* may share names with "
                               f"item {other}'s outputs (several outputs are numbered "
                               f"<name>_<n>); nothing was submitted. {_OPTIONS_HINT}")
        in_the_way = names.in_the_way(destination.directory, destination.stem)
        if in_the_way is not None:
            raise OutputExists(in_the_way, f"{destination.field}: {in_the_way} already exists "
                               f"(the output gets its real format's extension, so any "
                               f"{where}.* counts); nothing was submitted. {_OPTIONS_HINT}")


def keyed_in_the_way(directory: Path, stem: str) -> Path | None:
    """A file in `directory` named `<stem>_...` (as a case-insensitive volume compares names)."""
    family = name_key(stem) + "_"
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                if name_key(entry.name).startswith(family):
                    return directory / entry.name
    except (FileNotFoundError, NotADirectoryError):
        pass
    return None


def place(result: Result, destination: Destination, job_stem: str, if_exists: IfExists) -> None:
    """Move the item's files from OUTPUT_DIR to where the caller asked, keeping the real
    extension; `<name>_<n>` for several outputs, as in the job (`job_stem` is the item's name in
    the job's directory). A file that is not placed stays in OUTPUT_DIR: it was paid for."""
    sources = [Path(f) for f in result.files]
    rests = [s.name[len(job_stem):] if s.name.startswith(job_stem) else s.suffix
             for s in sources]
    try:
        destination.directory.mkdir(parents=True, exist_ok=True)
        placed = place_without_clobbering(list(zip(sources, rests, strict=True)),
                                          destination.directory.absolute(), destination.stem,
                                          if_exists)
    except OutputExists as exc:
        _not_placed(result, f"{exc.path} appeared after the check and was not replaced; the "
                    f"output is kept at {', '.join(result.files)}")
        return
    except OSError as exc:
        # With "overwrite" some files may have moved already: report where each one is.
        result.files = [str(s) if s.exists() else str(destination.directory.absolute() /
                                                      f"{destination.stem}{rest}")
                        for s, rest in zip(sources, rests, strict=True)]
        _not_placed(result, f"moving the output to {destination.directory} failed: "
                    f"{exc.strerror}; still at {', '.join(result.files)}")
        return
    with contextlib.suppress(OSError):
        sources[0].parent.rmdir()  # the job's directory, now empty
    result.files = [str(p) for p in placed]
    _note_names(result, destination, placed[0], rests[0])


def _not_placed(result: Result, why: str) -> None:
    result.success = False
    result.error_type = "storage_error"
    result.error = f"generated, but {why}"


def _note_names(result: Result, destination: Destination, first: Path, rest: str) -> None:
    """Say when the file's name is not the one asked for: a new stem, or the real extension."""
    used_stem = first.name[:len(first.name) - len(rest)]
    if used_stem != destination.stem:
        result.notes.append(f"saved as {first.name}: a file named {destination.stem}.* "
                            'already existed (if_exists="rename")')
    real = first.suffix
    if destination.asked_suffix and destination.asked_suffix.lower() != real.lower():
        result.notes.append(f"saved as {first.name}: the output is {real.lstrip('.')}, "
                            f"not {destination.asked_suffix.lstrip('.')}")
