"""A library call's arguments checked before anything is paid for: lists, options, the model's
parameters (local reference files inlined) and the caller's output paths."""

from __future__ import annotations

import base64
import mimetypes
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from replicate_generation.library.results import FilePath
from replicate_generation.models.routing import REFERENCE_KEYS
from replicate_generation.outputs import default_stem, safe_filename
from replicate_generation.request_parsing import OPTION_KEYS

# Keys a caller's params may not carry: the request's own structure and the service-only options.
_RESERVED = frozenset({"model_name", "prompt", "prompts", "tasks", "custom_filename",
                       "custom_filenames", *OPTION_KEYS})


@dataclass(frozen=True)
class Destination:
    """Where the caller wants an item's file: a directory and a name without extension."""

    directory: Path
    stem: str
    asked_suffix: str
    field: str = "output_filepath"


def as_list(value: object, name: str) -> list[Any]:
    if isinstance(value, str | bytes | os.PathLike) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a list (one entry per item), not "
                        f"{type(value).__name__}")
    if not value:
        raise ValueError(f"{name} must not be empty")
    return list(value)


def mode_options(fallback: bool, placeholder: bool, on_content_policy: bool) -> dict[str, bool]:
    for name, value in (("fallback", fallback), ("placeholder", placeholder),
                        ("fallback_on_content_policy", on_content_policy)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False")
    return {"fallback": fallback, "placeholder": placeholder,
            "fallback_on_content_policy": on_content_policy}


def model_params(params: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The model's parameters, with local reference files inlined as data: URIs."""
    if not isinstance(params, Mapping):
        raise TypeError(f"{where} must be a mapping of parameter names to values")
    clean: dict[str, Any] = {}
    for name, value in params.items():
        if name in _RESERVED:
            raise ValueError(f"{where}: '{name}' is not a model parameter here"
                             + (" (use output_filepath to name the file)"
                                if name.startswith("custom_filename") else ""))
        if name in REFERENCE_KEYS:
            value = _inline(value, f"{where}.{name}")
        clean[name] = value
    return clean


def _inline(value: object, field: str) -> object:
    """A pathlib.Path (or a list of them) becomes a data: URI; anything else is left to the
    validator (a plain string must be a URL: it is never read as a path)."""
    if isinstance(value, list):
        return [_inline(v, f"{field}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, Path):
        return value
    try:
        data = value.read_bytes()
    except OSError as exc:
        raise ValueError(f"{field}: cannot read {value}: {exc.strerror}") from None
    mime = mimetypes.guess_type(value.name)[0] or "application/octet-stream"
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def destination_of(path: FilePath, field: str) -> Destination:
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"{field} must be a path (str or os.PathLike)")
    target = Path(path)
    stem = safe_filename(target.name, field)
    return Destination(directory=target.parent, stem=stem,
                       asked_suffix=target.name[len(stem):], field=field)


def destinations_of(paths: Sequence[FilePath | None] | None, count: int, field: str, *,
                    attribute: str | None = None) -> list[Destination | None]:
    if paths is None:
        return [None] * count
    out: list[Destination | None] = []
    for i, path in enumerate(paths):
        where = f"{field}[{i}]" + (f".{attribute}" if attribute else "")
        out.append(destination_of(path, where) if path is not None else None)
    _unique_stems(out, field, attribute=attribute)
    return out


def _unique_stems(destinations: Sequence[Destination | None], field: str, *,
                  attribute: str | None = None) -> None:
    """Two items may not end up in the same file."""
    seen: dict[tuple[Path, str], int] = {}
    for i, destination in enumerate(destinations):
        if destination is None:
            continue
        key = (destination.directory.resolve(), destination.stem.casefold())
        other = seen.setdefault(key, i)
        if other != i:
            where = f"{field}[{i}]" + (f".{attribute}" if attribute else "")
            raise ValueError(f"{where} names the same file as item {other} "
                             f"({destination.directory / destination.stem}.*: an output takes "
                             "its real format's extension, so paths that differ only in "
                             "extension share one file); every item needs its own output path")


def job_stems(destinations: Sequence[Destination | None], models: Sequence[object]) -> list[str]:
    """Names in the job's own directory: the caller's name, made unique where two items share it
    (in different directories); items without a path keep the default name."""
    counts: dict[str, int] = {}
    for destination in destinations:
        if destination is not None:
            key = destination.stem.casefold()
            counts[key] = counts.get(key, 0) + 1
    stems = []
    for i, destination in enumerate(destinations):
        if destination is None:
            model = models[i]
            stems.append(default_stem(model if isinstance(model, str) else "output", i))
        elif counts[destination.stem.casefold()] > 1:
            stems.append(f"{destination.stem}_{i + 1:03d}")
        else:
            stems.append(destination.stem)
    return stems
