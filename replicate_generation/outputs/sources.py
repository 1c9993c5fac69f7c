"""Where an output's bytes come from: a prediction's output flattened, each source read.

A source is an http(s) URL (downloaded), a data: URI (decoded) or an object with read();
never a local path or file:// URL, and never a FileOutput's own read(), which sends the token.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, Mapping
from urllib.parse import unquote_to_bytes, urlsplit

from replicate_generation.outputs.base import DownloadError
from replicate_generation.outputs.downloads import HTTP_PORTS, Fetch, Hints, Sink, download


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
        # Only a FileOutput's URL: its read() would send our token to whatever host it names.
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


def fill(sink: Sink, source: object, number: int, fetch: Fetch) -> Hints:
    """Write one source's bytes into the sink; return the transport's format hints."""
    if not isinstance(source, str) and hasattr(source, "url"):
        source = source.url  # never FileOutput.read(): it leaks the token to any host
    if isinstance(source, str):
        return _fill_from_url(sink, source, number, fetch)
    reader = getattr(source, "read", None)
    if callable(reader):
        return _fill_from_reader(sink, reader, number)
    raise DownloadError(f"output {number} has an unsupported type: {type(source).__name__}")


def _fill_from_url(sink: Sink, url: str, number: int, fetch: Fetch) -> Hints:
    try:
        scheme = urlsplit(url).scheme.lower()
    except ValueError:
        scheme = ""
    if scheme in HTTP_PORTS:
        return download(sink, url, number, fetch)
    if scheme == "data":
        return _fill_from_data_uri(sink, url, number)
    # Never a local path or file://: outputs are fetched, not read from our disk.
    raise DownloadError(f"output {number} is not an http(s) or data: URL")


def _fill_from_reader(sink: Sink, reader: Callable[[], object], number: int) -> Hints:
    try:
        data = reader()
    # A third-party reader may raise anything; callers rely on getting DownloadError.
    except Exception as exc:  # noqa: BLE001
        raise DownloadError(f"output {number} could not be read ({type(exc).__name__})") from exc
    if not isinstance(data, bytes | bytearray | memoryview):
        raise DownloadError(f"output {number}: read() returned {type(data).__name__}, not bytes")
    sink.write(bytes(data))
    return Hints(content_type=None, url=None)


def _fill_from_data_uri(sink: Sink, uri: str, number: int) -> Hints:
    """Decode data:[<mime>][;base64],<data>; its MIME is a hint after magic."""
    header, comma, payload = uri[5:].partition(",")
    if not comma:
        raise DownloadError(f"output {number} is a malformed data: URI")
    params = [part.strip().lower() for part in header.split(";")]
    data = unquote_to_bytes(payload)
    if "base64" in params[1:]:
        data = _decode_base64(data, number)
    sink.write(data)
    return Hints(content_type=params[0] or None, url=None)


def _decode_base64(text: bytes, number: int) -> bytes:
    text = re.sub(rb"\s+", b"", text).translate(bytes.maketrans(b"-_", b"+/"))
    text += b"=" * (-len(text) % 4)  # some encoders drop the padding
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error:
        raise DownloadError(f"output {number} is a data: URI with invalid base64") from None
