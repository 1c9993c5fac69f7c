"""Save the output of a non-curated model, whatever its shape, as files (never inline).

Files are named as curated outputs are, a dict of files `<stem>_<key>`, text (cog's streamed
tokens, joined) `<stem>.txt`, anything else `<stem>.json`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from replicate_generation.outputs.base import SavedFile
from replicate_generation.outputs.saving import save_outputs

_FILE_PREFIXES = ("http://", "https://", "data:")
_TEXT_TYPES = {".txt": "text/plain; charset=utf-8", ".json": "application/json"}


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
        return [(f"{stem}_{_key_name(str(key))}", _files(value), None)
                for key, value in output.items() if value is not None]
    if isinstance(output, str) or (isinstance(output, list) and output
                                   and all(isinstance(v, str) for v in output)):
        text = output if isinstance(output, str) else "".join(output)
        return [(stem, [_Bytes(text.encode())], ".txt")]
    return [(stem, [_Bytes(json.dumps(output, indent=2, ensure_ascii=False).encode())], ".json")]


def _key_name(key: str) -> str:
    return re.sub(r"[^0-9A-Za-z_-]+", "_", key).strip("_")[:40] or "output"


def save_any(output: object, dest_dir: Path, stem: str, **kwargs: Any) -> list[SavedFile]:
    """Save every part of the output (see the module's doc); raises as save_outputs does."""
    saved: list[SavedFile] = []
    for name, sources, fallback in groups(output, stem):
        for item in save_outputs(sources, dest_dir, name, fallback_ext=fallback, **kwargs):
            kind = _TEXT_TYPES.get(item.path.suffix) if fallback else None
            saved.append(dataclasses.replace(item, content_type=kind) if kind else item)
    return saved
