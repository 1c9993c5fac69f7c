"""Save the output of a non-curated model, whatever its shape, as files (never inline).

Files are named as curated outputs are, a dict of files `<stem>_<key>` (each key's name bounded
and unique), text (cog's streamed tokens, joined) `<stem>.txt`, anything else `<stem>.json`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from replicate_generation import json_depth
from replicate_generation.outputs.base import DownloadError, SavedFile
from replicate_generation.outputs.names import bounded_name, name_key
from replicate_generation.outputs.saving import save_outputs

_FILE_PREFIXES = ("http://", "https://", "data:")
_TEXT_TYPES = {".txt": "text/plain; charset=utf-8", ".json": "application/json"}
_MAX_KEY_CHARS = 40
# Deeper JSON is refused: writing it would recurse past Python's limit.
MAX_JSON_DEPTH = 64


class _Bytes:
    def __init__(self, data: bytes) -> None:
        self._data = data

    def read(self) -> bytes:
        return self._data


def _is_file(value: object) -> bool:
    if hasattr(value, "url") and isinstance(value.url, str):
        return True
    return isinstance(value, str) and value.lower().startswith(_FILE_PREFIXES)


def _is_files(value: object) -> bool:
    if isinstance(value, list | tuple):
        return bool(value) and all(_is_file(v) for v in value)
    return _is_file(value)


def is_empty(output: object) -> bool:
    """No output at all (often a safety filter)."""
    return output is None or output in ("", [], {})


def _files(value: object) -> list[object]:
    return list(value) if isinstance(value, list | tuple) else [value]


def groups(output: object, stem: str) -> list[tuple[str, list[object], str | None]]:
    """(stem, sources, fallback extension) for each file or set of files to write."""
    if _is_files(output):
        return [(stem, _files(output), None)]
    if isinstance(output, Mapping) and output and all(
            v is None or _is_files(v) for v in output.values()):
        present = [(str(key), _files(value)) for key, value in output.items() if value is not None]
        names = _key_names(stem, present)
        return [(name, files, None) for name, (_, files) in zip(names, present, strict=True)]
    if isinstance(output, str) or (isinstance(output, list) and output
                                   and all(isinstance(v, str) for v in output)):
        text = output if isinstance(output, str) else "".join(output)
        return [(stem, [_Bytes(text.encode())], ".txt")]
    if json_depth.too_deep(output, MAX_JSON_DEPTH):
        raise DownloadError(f"the output nests deeper than {MAX_JSON_DEPTH} levels")
    return [(stem, [_Bytes(json.dumps(output, indent=2, ensure_ascii=False).encode())], ".json")]


def _key_names(stem: str, present: list[tuple[str, list[object]]]) -> list[str]:
    """`<stem>_<key>` for each key: bounded in bytes, and unique (with the `_<n>` of a key with
    several files) even when keys differ only past the cut or in characters that are replaced."""
    taken: set[str] = set()
    names = []
    for key, files in present:
        part = re.sub(r"[^0-9A-Za-z_-]+", "_", key).strip("_") or "output"
        if len(part) > _MAX_KEY_CHARS:
            part = _with_digest(part, key)
        name = bounded_name(stem, part)
        if _clashes(name, len(files), taken):
            name = bounded_name(stem, _with_digest(part, key))
        taken.update(_written(name, len(files)))
        names.append(name)
    return names


def _with_digest(part: str, key: str) -> str:
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return f"{part[:_MAX_KEY_CHARS - len(digest) - 1]}_{digest}"


def _written(name: str, count: int) -> list[str]:
    return [name_key(name)] if count == 1 else [name_key(f"{name}_{n}")
                                                for n in range(1, count + 1)]


def _clashes(name: str, count: int, taken: set[str]) -> bool:
    return any(written in taken for written in _written(name, count))


def save_any(output: object, dest_dir: Path, stem: str, **kwargs: Any) -> list[SavedFile]:
    """Save every part of the output (see the module's doc); raises as save_outputs does, with
    every part's saved files in the error."""
    saved: list[SavedFile] = []
    for name, sources, fallback in groups(output, stem):
        try:
            written = save_outputs(sources, dest_dir, name, fallback_ext=fallback, **kwargs)
        except DownloadError as exc:
            raise DownloadError(str(exc), saved=[*saved, *exc.saved], refused=exc.refused,
                                exhausted=exc.exhausted) from None
        for item in written:
            kind = _TEXT_TYPES.get(item.path.suffix) if fallback else None
            saved.append(dataclasses.replace(item, content_type=kind) if kind else item)
    return saved
