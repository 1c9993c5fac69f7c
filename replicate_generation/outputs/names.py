"""Output file names: a caller's name checked, a default stem from the model, numbering, and
which names the items of one batch reserve.

Names here are stems: the extension comes later, from the content (see formats). Names are NFC and
compared case-folded, as macOS and Windows volumes compare them; Windows device names are refused.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable
from pathlib import PurePosixPath

from replicate_generation.errors import InvalidName

# Extensions a caller may type out of habit; the real one comes from the content.
_MEDIA_EXTENSIONS = (
    ".jpg", ".jpeg", ".png", ".webp", ".gif", ".mp4", ".mov", ".webm",
    ".wav", ".mp3", ".flac", ".ogg", ".m4a",
)  # fmt: skip
_MAX_NAME_CHARS = 120
# NAME_MAX is 255 bytes, not characters: 200 leaves room for "_<n>" and the extension.
_MAX_STEM_BYTES = 200
# `<stem>_<part>` names: with "_<n>" and an extension still under NAME_MAX (and check_stem).
_MAX_PART_NAME_BYTES = 230
# Path separators, ':' (NTFS streams) and characters a Windows-hosted volume would refuse.
_FORBIDDEN_CHARS = frozenset('/\\:<>"|?*')
# Control, format (bidi overrides, zero-width), surrogate and line/paragraph separators.
_FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
# Names Windows gives to devices, with any extension ("aux.png" opens the AUX device there).
_WINDOWS_DEVICES = frozenset({"con", "prn", "aux", "nul", "conin$", "conout$", "clock$",
                              *(f"{port}{n}" for port in ("com", "lpt") for n in "0123456789¹²³")})


def safe_filename(name: str, field: str) -> str:
    """Validate a caller's plain file name (as NFC); drop a known media extension."""
    if isinstance(name, str):
        name = unicodedata.normalize("NFC", name)
    problem = _name_problem(name)
    stem = name
    if problem is None:
        stem = _strip_media_extension(name)
        problem = _stem_problem(stem)
    if problem is not None:
        raise InvalidName(field, f"{field} must be a plain file name: {problem}")
    return stem


def _name_problem(name: object) -> str | None:
    """Say what is wrong with a raw caller name, or None if nothing is."""
    if not isinstance(name, str):
        return "expected a string"
    if not name:
        return "it is empty"
    if len(name) > _MAX_NAME_CHARS:
        return f"it is longer than {_MAX_NAME_CHARS} characters"
    if name != name.strip():
        return "it starts or ends with whitespace"
    if ".." in name:
        return "it must not contain '..'"
    if name.startswith("."):
        return "it must not start with '.'"
    bad = sorted({ch for ch in name if ch in _FORBIDDEN_CHARS})
    if bad:
        return "it must not contain " + " ".join(repr(ch) for ch in bad)
    if any(unicodedata.category(ch) in _FORBIDDEN_CATEGORIES for ch in name):
        return "it must not contain control or invisible characters"
    if is_device_name(name):
        return f"{name.split('.', 1)[0]!r} is a Windows device name"
    return None


def is_device_name(name: str) -> bool:
    """A name Windows reserves for a device, whatever its case and extension."""
    return name.split(".", 1)[0].rstrip(" ").casefold() in _WINDOWS_DEVICES


def _strip_media_extension(name: str) -> str:
    suffix = PurePosixPath(name).suffix
    return name[: -len(suffix)] if suffix.lower() in _MEDIA_EXTENSIONS else name


def _stem_problem(stem: str) -> str | None:
    """Check what is left once the extension is gone."""
    if not stem:
        return "it needs a name before the extension"
    if stem != stem.rstrip() or stem.endswith("."):
        return "it must not end with '.' or whitespace"
    if len(stem.encode("utf-8")) > _MAX_STEM_BYTES:
        return f"it is longer than {_MAX_STEM_BYTES} bytes in UTF-8"
    return None


def default_stem(model_short_id: str, index: int | None) -> str:
    """Build a default stem: "flux_dev", or "flux_dev_003" for the 0-based index 2."""
    base = model_short_id.split(":", 1)[0].rsplit("/", 1)[-1]  # no pinned version in names
    base = re.sub(r"[^0-9A-Za-z]+", "_", base).strip("_").lower()[:100] or "output"
    if is_device_name(base):
        base = f"{base}_output"
    if index is None:
        return base
    if index < 0:
        raise ValueError("index must be >= 0")
    return f"{base}_{index + 1:03d}"


def check_stem(stem: str) -> None:
    """Refuse a stem that is not a plain file name: a bug in the caller, not bad input."""
    if (
        not stem
        or stem.startswith(".")
        or any(ch in stem for ch in "/\\\x00")
        or len(stem.encode("utf-8", "replace")) > 240
    ):
        raise ValueError("stem must be a plain file name (use safe_filename/default_stem)")


def numbered_name(stem: str, number: int, count: int) -> str:
    """Name without extension: the extension is only known once the content is in."""
    return stem if count == 1 else f"{stem}_{number}"


def name_key(name: str) -> str:
    """How a case-insensitive, normalising file system tells names apart."""
    return unicodedata.normalize("NFC", unicodedata.normalize("NFC", name).casefold())


def bounded_name(stem: str, part: str, max_bytes: int = _MAX_PART_NAME_BYTES) -> str:
    """`<stem>_<part>` within `max_bytes` of UTF-8: a part too long is cut and keeps a digest of
    the whole, so two long parts that share a beginning still get two names."""
    room = max_bytes - len(stem.encode()) - 1
    if len(part.encode()) <= room:
        return f"{stem}_{part}"
    digest = hashlib.sha256(part.encode()).hexdigest()[:12]
    head = part.encode()[:max(0, room - len(digest) - 1)].decode("utf-8", "ignore")
    return f"{stem}_{head}_{digest}" if head else f"{stem}_{digest}"[:max_bytes]


def shared_name(planned: Iterable[tuple[int, str, int | None]]) -> tuple[int, int, str] | None:
    """(item, other item, name) for two items that could write the same file, else None.

    Each item is (index, stem, files): n files are `<stem>_1..n` (one: `<stem>`); None (a model
    whose output is not known ahead) reserves `<stem>` and every `<stem>_...` name.
    """
    items = [(index, name_key(stem), count) for index, stem, count in planned]
    families: dict[str, int] = {}
    for index, key, count in items:
        if count is None:
            families.setdefault(f"{key}_", index)
    exact: dict[str, int] = {}
    for index, key, count in items:
        names = [key] if count is None or count <= 1 else [f"{key}_{n}" for n in
                                                          range(1, count + 1)]
        for name in names:
            first = exact.setdefault(name, index)
            other = _family_of(name, families, index) if first == index else first
            if other is not None:
                return index, other, name
    return None


def _family_of(name: str, families: dict[str, int], index: int) -> int | None:
    """Another item whose reserved `<stem>_` names include `name`."""
    for position, char in enumerate(name):
        if char == "_":
            owner = families.get(name[:position + 1])
            if owner is not None and owner != index:
                return owner
    return None
