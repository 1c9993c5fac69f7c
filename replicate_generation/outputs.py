"""Fetch prediction outputs at once and write them safely under the output root.

Replicate deletes output files an hour after a prediction, so they are downloaded as
soon as the prediction succeeds. Every file lands under the output root (never outside
it), is written atomically (temp file + rename), and gets the extension of its real
content, not of whatever name the caller or the model suggested.
"""

from __future__ import annotations

import base64
import binascii
import errno
import http.cookiejar
import os
import re
import tempfile
import threading
import time
import unicodedata
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Literal, NamedTuple
from urllib.parse import unquote_to_bytes, urlsplit

import requests
import urllib3.exceptions

__all__ = [
    "IF_EXISTS_CHOICES",
    "DownloadError",
    "IfExists",
    "InvalidName",
    "OutputExists",
    "OutputNames",
    "SavedFile",
    "default_stem",
    "check_if_exists",
    "output_sources",
    "place_without_clobbering",
    "replace_into",
    "safe_filename",
    "save_outputs",
    "sniff_extension",
]


# --------------------------------------------------------------------------- errors


class InvalidName(ValueError):
    """A caller-supplied file name was rejected; ``field`` names the request field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


class DownloadError(Exception):
    """An output could not be fetched or written; the message is safe to show a caller.

    ``saved`` lists the outputs of the same call that were written before or after the
    failure: they are paid for, so the caller can still report them.
    """

    def __init__(self, message: str, *, saved: Sequence[SavedFile] = ()) -> None:
        super().__init__(message)
        self.saved: tuple[SavedFile, ...] = tuple(saved)


@dataclass(frozen=True)
class SavedFile:
    """One output written to disk."""

    path: Path
    relative: str
    size: int
    content_type: str


# --------------------------------------------------------------------------- names

# Extensions a caller may type out of habit; the real one comes from the content.
_MEDIA_EXTENSIONS = (
    ".jpg", ".jpeg", ".png", ".webp", ".gif", ".mp4", ".mov", ".webm",
    ".wav", ".mp3", ".flac", ".ogg", ".m4a",
)  # fmt: skip
_MAX_NAME_CHARS = 120
# NAME_MAX is 255 bytes on Linux file systems, not 255 characters; 200 leaves room for
# the "_<n>" suffix and the extension even when every character is multi-byte.
_MAX_STEM_BYTES = 200
# '/' and '\\' are separators; ':' opens NTFS alternate streams; the rest cannot be
# created on a Windows-hosted volume, which would fail only once the output is paid.
_FORBIDDEN_CHARS = frozenset('/\\:<>"|?*')
# Control, format (bidi overrides, zero-width), surrogate and line/paragraph separators.
_FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def safe_filename(name: str, field: str) -> str:
    """Validate a caller's plain file name; drop a known media extension."""
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
    return None


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
    if index is None:
        return base
    if index < 0:
        raise ValueError("index must be >= 0")
    return f"{base}_{index + 1:03d}"


# --------------------------------------------------------------------------- sources


def output_sources(output: object) -> list[object]:
    """Flatten a prediction's output (str, list, dict, FileOutput, None) to sources."""
    sources: list[object] = []
    _collect_sources(output, sources)
    return sources


def _collect_sources(item: object, into: list[object]) -> None:
    if item is None:
        return  # "no output" here, e.g. a model that returned fewer files
    if isinstance(item, str):
        into.append(item)
    elif hasattr(item, "url"):
        # Keep only the URL of a replicate FileOutput: its read() would send our token
        # to whatever host the URL names.
        url = item.url
        if not isinstance(url, str):
            raise DownloadError(f"unsupported output: {type(item).__name__}.url is not a string")
        into.append(url)
    elif isinstance(item, Mapping):
        for value in item.values():
            _collect_sources(value, into)
    elif isinstance(item, list | tuple):
        for value in item:
            _collect_sources(value, into)
    elif callable(getattr(item, "read", None)):
        into.append(item)  # save_outputs writes what read() returns
    else:
        raise DownloadError(f"unsupported output type: {type(item).__name__}")


# --------------------------------------------------------------------------- formats

_EXT_TO_MIME: Mapping[str, str] = {
    ".jpg": "image/jpeg",
    ".png": "image/png",
    ".webp": "image/webp",
    ".gif": "image/gif",
    ".avif": "image/avif",
    ".mp4": "video/mp4",
    ".mov": "video/quicktime",
    ".webm": "video/webm",
    ".mkv": "video/x-matroska",
    ".wav": "audio/wav",
    ".mp3": "audio/mpeg",
    ".flac": "audio/flac",
    ".ogg": "audio/ogg",
    ".m4a": "audio/mp4",
    ".aac": "audio/aac",
    ".txt": "text/plain",
    ".json": "application/json",
    ".bin": "application/octet-stream",
}
_MIME_TO_EXT: Mapping[str, str] = {
    **{mime: ext for ext, mime in _EXT_TO_MIME.items()},
    "image/jpg": ".jpg",
    "image/pjpeg": ".jpg",
    "audio/x-wav": ".wav",
    "audio/wave": ".wav",
    "audio/vnd.wave": ".wav",
    "audio/mp3": ".mp3",
    "audio/x-flac": ".flac",
    "audio/x-m4a": ".m4a",
    "application/ogg": ".ogg",
}
_EXT_ALIASES: Mapping[str, str] = {".jpeg": ".jpg", ".jpe": ".jpg", ".oga": ".ogg"}
# Servers use these when they do not know; they say nothing about the format.
_UNINFORMATIVE_MIME = frozenset({"", "application/octet-stream", "binary/octet-stream"})
_SIMPLE_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", ".png"),
    (b"\xff\xd8\xff", ".jpg"),
    (b"GIF87a", ".gif"),
    (b"GIF89a", ".gif"),
    (b"fLaC", ".flac"),
    (b"OggS", ".ogg"),
    (b"ID3", ".mp3"),
)
_FTYP_BRANDS: Mapping[bytes, str] = {
    b"qt  ": ".mov",
    b"M4A ": ".m4a",
    b"M4B ": ".m4a",
    b"avif": ".avif",
    b"avis": ".avif",
}
_HEAD_BYTES = 512  # enough for every signature above, incl. the Matroska DocType


def sniff_extension(
    head: bytes,
    content_type: str | None = None,
    url: str | None = None,
    fallback: str | None = None,
) -> str:
    """Return ".ext" from magic bytes, else Content-Type, URL path, fallback, ".bin"."""
    return (
        _ext_from_magic(head)
        or _ext_from_content_type(content_type)
        or _ext_from_url(url)
        or _normalise_fallback(fallback)
        or ".bin"
    )


def _ext_from_magic(head: bytes) -> str | None:
    for magic, ext in _SIMPLE_MAGIC:
        if head.startswith(magic):
            return ext
    if head.startswith(b"RIFF"):
        return {b"WEBP": ".webp", b"WAVE": ".wav"}.get(head[8:12])
    if head[4:8] == b"ftyp":
        return _FTYP_BRANDS.get(head[8:12], ".mp4")
    if head.startswith(b"\x1a\x45\xdf\xa3"):  # EBML: WebM is a Matroska profile
        return ".mkv" if b"matroska" in head[:64] else ".webm"
    return _ext_from_mpeg_sync(head)


def _ext_from_mpeg_sync(head: bytes) -> str | None:
    """Recognise a bare MPEG audio frame (MP3 without ID3) or an ADTS AAC frame."""
    if len(head) < 2 or head[0] != 0xFF or head[1] & 0xE0 != 0xE0:
        return None
    layer = (head[1] >> 1) & 0b11
    return ".aac" if layer == 0 else ".mp3"


def _ext_from_content_type(content_type: str | None) -> str | None:
    if content_type is None:
        return None
    mime = content_type.split(";", 1)[0].strip().lower()
    return None if mime in _UNINFORMATIVE_MIME else _MIME_TO_EXT.get(mime)


def _ext_from_url(url: str | None) -> str | None:
    if not url or url[:5].lower() == "data:":
        return None
    try:
        path = urlsplit(url).path
    except ValueError:
        return None
    return _canonical_ext(PurePosixPath(path).suffix)


def _canonical_ext(ext: str) -> str | None:
    """Map ".JPEG" to ".jpg" and so on; None for extensions we do not know."""
    ext = ext.lower()
    ext = _EXT_ALIASES.get(ext, ext)
    return ext if ext in _EXT_TO_MIME else None


def _normalise_fallback(fallback: str | None) -> str | None:
    """Accept "webp", ".WEBP" or "jpeg"; anything but a short alnum suffix is a bug."""
    if fallback is None:
        return None
    ext = fallback.lower() if fallback.startswith(".") else "." + fallback.lower()
    if not re.fullmatch(r"\.[a-z0-9]{1,8}", ext):
        raise ValueError(f"malformed fallback extension {fallback!r}")
    return _EXT_ALIASES.get(ext, ext)


# --------------------------------------------------------------------------- HTTP

_CHUNK_BYTES = 64 * 1024
_CONNECT_TIMEOUT = 5.0
_MAX_READ_TIMEOUT = 30.0
_BACKOFF_BASE = 0.2
_DEFAULT_PORTS: Mapping[str, int] = {"http": 80, "https": 443}
_local = threading.local()


def _thread_session() -> requests.Session:
    """Return this thread's Session: requests Sessions are not promised thread-safe."""
    session: requests.Session | None = getattr(_local, "session", None)
    if session is None:
        session = requests.Session()
        # Downloads are stateless; a cookie set for one tenant must not ride along on
        # another tenant's download from the same host.
        session.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
        # Close the pooled sockets when the thread object goes away instead of leaving
        # them to the garbage collector.
        weakref.finalize(threading.current_thread(), session.close)
        _local.session = session
    return session


_Origin = tuple[str, str, int]


def _origin(url: str) -> _Origin | None:
    """Return (scheme, host, port) with the default port filled in, or None."""
    try:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in _DEFAULT_PORTS or not parts.hostname:
            return None
        return scheme, parts.hostname, parts.port or _DEFAULT_PORTS[scheme]
    except ValueError:  # bad port or malformed IPv6 literal
        return None


def _redact(url: str) -> str:
    """Quote a URL minus userinfo, query and fragment: signed URLs carry secrets."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "an unparsable URL"
    if ":" in host:
        host = f"[{host}]"
    text = f"{parts.scheme}://{host}{'' if port is None else f':{port}'}{parts.path}"
    text = "".join(ch if ch.isprintable() else "?" for ch in text)
    return text if len(text) <= 200 else text[:197] + "..."


def _retry_after(value: str | None) -> float | None:
    """Read a Retry-After in seconds; the rare HTTP-date form is ignored."""
    try:
        seconds = float(value) if value else None
    except ValueError:
        return None
    return seconds if seconds is not None and 0 <= seconds < float("inf") else None


# --------------------------------------------------------------------------- saving


class _Fetch(NamedTuple):
    """Everything one save_outputs call needs to fetch a URL."""

    session: requests.Session
    deadline: float
    clock: Callable[[], float]
    max_bytes: int
    attempts: int
    auth_token: str | None
    auth_origin: _Origin | None


class _Hints(NamedTuple):
    """What the transport says about a payload, for when magic bytes say nothing."""

    content_type: str | None
    url: str | None


class _Retryable(Exception):
    """A transient failure: connection error, timeout, 429 or 5xx."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class _Sink:
    """Write one output to its temp file, enforcing max_bytes and keeping the head."""

    def __init__(self, fh: IO[bytes], number: int, max_bytes: int) -> None:
        self._fh = fh
        self._number = number
        self._max_bytes = max_bytes
        self.head = b""
        self.size = 0

    def reset(self) -> None:
        """Start over, e.g. before a retry."""
        with _file_errors(f"output {self._number}"):
            self._fh.seek(0)
            self._fh.truncate()
        self.head = b""
        self.size = 0

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self._max_bytes:
            raise DownloadError(
                f"output {self._number} is larger than the {self._max_bytes}-byte limit"
            )
        if len(self.head) < _HEAD_BYTES:
            self.head += data[: _HEAD_BYTES - len(self.head)]
        with _file_errors(f"output {self._number}"):
            self._fh.write(data)


@contextmanager
def _file_errors(what: str) -> Iterator[None]:
    """Make an OSError a DownloadError; strerror, unlike str(exc), has no path."""
    try:
        yield
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise DownloadError(f"could not write {what}: {reason}") from None


def save_outputs(
    sources: Sequence[object],
    dest_dir: Path,
    stem: str,
    *,
    root: Path,
    deadline: float,
    session: requests.Session | None = None,
    auth_token: str | None = None,
    auth_origin: str | None = None,
    max_bytes: int = 512 * 1024 * 1024,
    clock: Callable[[], float] = time.time,
    fallback_ext: str | None = None,
    attempts: int = 3,
) -> list[SavedFile]:
    """Download every source now and write it atomically under dest_dir, in order.

    One source becomes "<stem><ext>"; several become "<stem>_1<ext>", "<stem>_2<ext>"...
    Every source is attempted even after one fails, because Replicate deletes outputs
    after an hour; the DownloadError raised then lists the files that were saved.

    :param root: the output root; dest_dir must resolve inside it.
    :param deadline: absolute time, on ``clock``, by which downloads must be done.
    :param auth_token: sent as a Bearer token only to URLs on ``auth_origin``.
    :param fallback_ext: the extension to use when neither content nor headers tell.
    :raises DownloadError: on any fetch or write failure, or a dest_dir outside root.
    :raises ValueError: on a malformed stem, fallback_ext, auth_origin or limit (a bug).
    """
    fallback = _check_arguments(stem, fallback_ext, max_bytes, attempts)
    fetch = _Fetch(
        session=session if session is not None else _thread_session(),
        deadline=deadline,
        clock=clock,
        max_bytes=max_bytes,
        attempts=attempts,
        auth_token=auth_token,
        auth_origin=_parse_auth_origin(auth_token, auth_origin),
    )
    root_dir, dest = _prepare_dest(dest_dir, root)
    saved: list[SavedFile] = []
    failures: list[DownloadError] = []
    for number, source in enumerate(sources, start=1):
        name = _output_name(stem, number, len(sources))
        try:
            saved.append(_save_one(source, number, dest / name, root_dir, fetch, fallback))
        except DownloadError as exc:
            failures.append(exc)
    if failures:
        more = f" (and {len(failures) - 1} more output(s) failed)" if len(failures) > 1 else ""
        raise DownloadError(f"{failures[0]}{more}", saved=saved)
    return saved


def _check_arguments(
    stem: str, fallback_ext: str | None, max_bytes: int, attempts: int
) -> str | None:
    """Reject programming errors before any download; return the fallback extension."""
    if (
        not stem
        or stem.startswith(".")
        or any(ch in stem for ch in "/\\\x00")
        or len(stem.encode("utf-8", "replace")) > 240
    ):
        raise ValueError("stem must be a plain file name (use safe_filename/default_stem)")
    if max_bytes < 1 or attempts < 1:
        raise ValueError("max_bytes and attempts must be >= 1")
    return _normalise_fallback(fallback_ext)


def _parse_auth_origin(auth_token: str | None, auth_origin: str | None) -> _Origin | None:
    """Without both a token and an origin, no Authorization header is ever sent."""
    if not auth_token or auth_origin is None:
        return None
    origin = _origin(auth_origin)
    if origin is None:
        raise ValueError("auth_origin must be an http(s) origin such as https://api.replicate.com")
    return origin


def _prepare_dest(dest_dir: Path, root: Path) -> tuple[Path, Path]:
    """Resolve root and dest_dir, refuse a dest_dir outside root, then mkdir -p it."""
    root_dir = root.resolve()
    dest = dest_dir.resolve()
    if not dest.is_relative_to(root_dir):
        raise DownloadError("the output directory is outside the output root")
    with _file_errors("the output directory"):
        dest.mkdir(parents=True, exist_ok=True)
    # Resolve again now that every component exists: a symlink that appeared while the
    # tree was created must not carry the write outside the root.
    if not dest.resolve().is_relative_to(root_dir):
        raise DownloadError("the output directory is outside the output root")
    return root_dir, dest


def _output_name(stem: str, number: int, count: int) -> str:
    """Name without extension: the extension is only known once the content is in."""
    return stem if count == 1 else f"{stem}_{number}"


def _save_one(
    source: object,
    number: int,
    base: Path,
    root_dir: Path,
    fetch: _Fetch,
    fallback: str | None,
) -> SavedFile:
    """Write one source to a hidden temp file next to its final name, then rename it."""
    with _file_errors(f"output {number}"):
        fd, tmp_name = tempfile.mkstemp(prefix=".", suffix=".part", dir=base.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            sink = _Sink(fh, number, fetch.max_bytes)
            hints = _fill(sink, source, number, fetch)
            _make_durable(fh, number)
        if sink.size == 0:
            raise DownloadError(f"output {number} was empty")
        ext = sniff_extension(sink.head, hints.content_type, hints.url, fallback)
        final = base.with_name(base.name + ext)
        with _file_errors(f"output {number}"):
            # Atomic: a reader sees the old file or the whole new one, never half.
            os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(final.parent)
    return SavedFile(
        path=final,
        relative=final.relative_to(root_dir).as_posix(),
        size=sink.size,
        content_type=_EXT_TO_MIME.get(ext, "application/octet-stream"),
    )


def _make_durable(fh: IO[bytes], number: int) -> None:
    with _file_errors(f"output {number}"):
        fh.flush()
        # mkstemp creates 0600; other containers and the host read the volume.
        os.fchmod(fh.fileno(), 0o644)
        os.fsync(fh.fileno())


def _fsync_dir(directory: Path) -> None:
    """Persist the rename; some volume drivers refuse fsync on a directory: fine."""
    with suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fill(sink: _Sink, source: object, number: int, fetch: _Fetch) -> _Hints:
    """Write one source's bytes into the sink; return the transport's format hints."""
    if not isinstance(source, str) and hasattr(source, "url"):
        source = source.url  # never FileOutput.read(): it leaks the token to any host
    if isinstance(source, str):
        return _fill_from_url(sink, source, number, fetch)
    reader = getattr(source, "read", None)
    if callable(reader):
        return _fill_from_reader(sink, reader, number)
    raise DownloadError(f"output {number} has an unsupported type: {type(source).__name__}")


def _fill_from_url(sink: _Sink, url: str, number: int, fetch: _Fetch) -> _Hints:
    try:
        scheme = urlsplit(url).scheme.lower()
    except ValueError:
        scheme = ""
    if scheme in _DEFAULT_PORTS:
        return _download(sink, url, number, fetch)
    if scheme == "data":
        return _fill_from_data_uri(sink, url, number)
    # Never a local path or file://: outputs are fetched, not read from our disk.
    raise DownloadError(f"output {number} is not an http(s) or data: URL")


def _fill_from_reader(sink: _Sink, reader: Callable[[], object], number: int) -> _Hints:
    try:
        data = reader()
    # A third-party reader may raise anything; callers rely on getting DownloadError.
    except Exception as exc:  # noqa: BLE001
        raise DownloadError(f"output {number} could not be read ({type(exc).__name__})") from exc
    if not isinstance(data, bytes | bytearray | memoryview):
        raise DownloadError(f"output {number}: read() returned {type(data).__name__}, not bytes")
    sink.write(bytes(data))
    return _Hints(content_type=None, url=None)


def _fill_from_data_uri(sink: _Sink, uri: str, number: int) -> _Hints:
    """Decode data:[<mime>][;base64],<data>; its MIME is a hint after magic."""
    header, comma, payload = uri[5:].partition(",")
    if not comma:
        raise DownloadError(f"output {number} is a malformed data: URI")
    params = [part.strip().lower() for part in header.split(";")]
    data = unquote_to_bytes(payload)
    if "base64" in params[1:]:
        data = _decode_base64(data, number)
    sink.write(data)
    return _Hints(content_type=params[0] or None, url=None)


def _decode_base64(text: bytes, number: int) -> bytes:
    text = re.sub(rb"\s+", b"", text).translate(bytes.maketrans(b"-_", b"+/"))
    text += b"=" * (-len(text) % 4)  # some encoders drop the padding
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error:
        raise DownloadError(f"output {number} is a data: URI with invalid base64") from None


def _download(sink: _Sink, url: str, number: int, fetch: _Fetch) -> _Hints:
    """GET url into the sink, retrying transient failures while allowed."""
    label = f"output {number} ({_redact(url)})"
    attempt = 1
    while True:
        try:
            return _download_once(sink, url, label, fetch)
        except _Retryable as exc:
            if attempt >= fetch.attempts or not _wait_before_retry(attempt, exc, fetch):
                raise DownloadError(
                    f"{label} failed after {attempt} attempt(s): {exc.reason}"
                ) from None
        attempt += 1


def _wait_before_retry(attempt: int, exc: _Retryable, fetch: _Fetch) -> bool:
    """Sleep the backoff (or Retry-After) unless that would pass the deadline."""
    delay = _BACKOFF_BASE * 2 ** (attempt - 1)
    if exc.retry_after is not None:
        delay = max(delay, exc.retry_after)
    if fetch.clock() + delay >= fetch.deadline:
        return False
    time.sleep(delay)
    return True


def _download_once(sink: _Sink, url: str, label: str, fetch: _Fetch) -> _Hints:
    remaining = fetch.deadline - fetch.clock()
    if remaining <= 0:
        raise DownloadError(f"{label} was not downloaded: the deadline passed")
    sink.reset()
    try:
        response = fetch.session.get(
            url,
            headers=_auth_headers(url, fetch),
            stream=True,
            timeout=(
                min(_CONNECT_TIMEOUT, remaining),
                min(_MAX_READ_TIMEOUT, remaining),
            ),
        )
    except requests.Timeout:
        raise _Retryable("timed out") from None
    except requests.ConnectionError:
        raise _Retryable("connection failed") from None
    # Bad URL, redirect to a non-http scheme, too many redirects: retrying cannot help.
    except requests.RequestException as exc:
        raise DownloadError(f"{label} could not be requested ({type(exc).__name__})") from None
    with response:
        _check_response(response, label, fetch.max_bytes)
        _copy_body(response, sink, label, fetch)
        return _Hints(content_type=response.headers.get("Content-Type"), url=response.url)


def _auth_headers(url: str, fetch: _Fetch) -> dict[str, str | None]:
    """Bearer token for auth_origin only; None drops any header the session carries."""
    if fetch.auth_token and fetch.auth_origin is not None and _origin(url) == fetch.auth_origin:
        return {"Authorization": f"Bearer {fetch.auth_token}"}
    return {"Authorization": None}


def _check_response(response: requests.Response, label: str, max_bytes: int) -> None:
    status = response.status_code
    if status == 429 or status >= 500:
        raise _Retryable(f"HTTP {status}", _retry_after(response.headers.get("Retry-After")))
    if not 200 <= status < 300:
        raise DownloadError(f"{label} failed: HTTP {status}")
    length = response.headers.get("Content-Length", "")
    if length.isdigit() and int(length) > max_bytes:
        raise DownloadError(f"{label} is larger than the {max_bytes}-byte limit")


def _copy_body(response: requests.Response, sink: _Sink, label: str, fetch: _Fetch) -> None:
    """Stream the body into the sink, checking the deadline after every read.

    read1() returns what one socket read delivers; iter_content() would block until a
    whole chunk has arrived, so a server trickling bytes could outlive the deadline.
    """
    try:
        while chunk := response.raw.read1(_CHUNK_BYTES, decode_content=True):
            sink.write(chunk)
            if fetch.clock() > fetch.deadline:
                raise DownloadError(f"{label} did not finish before the deadline")
    except urllib3.exceptions.DecodeError:
        raise DownloadError(f"{label} has a corrupt content encoding") from None
    except urllib3.exceptions.ReadTimeoutError:
        raise _Retryable("timed out") from None
    except urllib3.exceptions.HTTPError:  # connection reset, truncated body, ...
        raise _Retryable("connection broke off") from None


# --------------------------------------------------------------------------- placing elsewhere
# Files moved out of the root to where a caller asked: never over a file without being told to.
# The real extension is known only after generation, so a name is "taken" by any file with the
# same stem whatever its extension, and by the `<stem>_<n>.<ext>` names of several outputs.

IfExists = Literal["refuse", "rename", "overwrite"]
IF_EXISTS_CHOICES: tuple[IfExists, ...] = ("refuse", "rename", "overwrite")
_EXTENSION = re.compile(r"\.[0-9A-Za-z]+$")
_NUMBERED = re.compile(r"_\d+$")
_MAX_RENAMES = 10_000


class OutputExists(FileExistsError):
    """An output's name is taken by ``path`` and the caller did not ask to rename or replace."""

    def __init__(self, path: Path, message: str) -> None:
        super().__init__(errno.EEXIST, message, str(path))
        self.path = path
        self.message = message

    def __str__(self) -> str:
        return self.message


def check_if_exists(value: object, name: str = "if_exists") -> IfExists:
    if value not in IF_EXISTS_CHOICES:
        raise ValueError(f"{name} must be one of {', '.join(IF_EXISTS_CHOICES)}, not {value!r}")
    return value


def _stem_keys(name: str) -> set[str]:
    """The stems a file's name blocks: the name, without its extension, and without `_<n>`."""
    base = _EXTENSION.sub("", name)
    return {key.casefold() for key in (name, base, _NUMBERED.sub("", base))}


def taken_stems(directory: Path) -> dict[str, Path]:
    """Every blocked stem (casefolded) of `directory`, with a file that blocks it."""
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
        return self._existing[key].get(stem.casefold())

    def claim(self, directory: Path, stem: str, owner: int) -> int | None:
        """Record that item `owner` writes `stem` in `directory`; return an earlier item whose
        names may clash with it, else None."""
        where = directory.resolve()
        folded = stem.casefold()
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

    "overwrite" replaces what is there; "refuse" raises OutputExists when the stem is taken (the
    sources stay); "rename" uses the first free of `<stem>-2`, `<stem>-3`, ... for every file. A
    name is claimed with a hard link (or an O_EXCL file): a file created meanwhile is never lost.
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
    in_the_way = taken_stems(directory).get(stem.casefold())
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
