"""Reading what a request sends, strictly: the body as a JSON object (no NaN, no duplicate keys,
no lone surrogates, bounded depth, a streamed body past the limit refused) and query integers."""

from __future__ import annotations

import json
import math
import sys
from typing import Any

from flask import request
from werkzeug.exceptions import RequestEntityTooLarge

from replicate_generation.errors import InvalidRequest
from replicate_generation.http.errors import ApiError

# Bodies are a few levels deep (tasks[0].input_images[1]); far deeper is an attack on the parser.
MAX_JSON_DEPTH = 32


def json_object() -> dict[str, Any]:
    """The request body as a JSON object, or the right 4xx."""
    if not request.is_json:
        raise ApiError(415, "Content-Type must be application/json")
    body = _parse_json(_body_bytes())
    if not isinstance(body, dict):
        raise ApiError(400, "Request body must be a JSON object")
    problem = _json_problem(body)
    if problem is not None:
        field, message = problem
        raise InvalidRequest(field, f"{field} {message}")
    return body


def int_arg(name: str, default: int, low: int, high: int) -> int:
    """A query argument as an integer from low to high, or the default when it is absent."""
    raw = request.args.get(name)
    if raw is None:
        return default
    # isdecimal: int() refuses the digit "²" (a 500); length first: int() refuses 4300+ digits.
    if not raw.isdecimal() or len(raw) > 20 or not low <= int(raw) <= high:
        raise InvalidRequest(name, f"{name} must be an integer from {low} to {high}")
    return int(raw)


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _body_bytes() -> bytes:
    """The raw body; a streamed (chunked) body past the limit is a 413, not a truncated read."""
    data = request.get_data(cache=True)
    limit = request.max_content_length
    if limit is not None and request.content_length is None and len(data) >= limit:
        # werkzeug stops reading at the limit without a word: one more byte says it was cut.
        if request.environ["wsgi.input"].read(1):
            raise RequestEntityTooLarge()
    return data


def _parse_json(data: bytes) -> object:
    """Strict JSON: no NaN/Infinity, no duplicate keys, no nesting deep enough to recurse out."""
    try:
        return json.loads(data, parse_constant=_refuse_constant, object_pairs_hook=_unique_keys)
    except _DuplicateKey as exc:
        raise InvalidRequest(exc.key, f"The key '{exc.key[:100]}' appears twice in one "
                             "object") from None
    except RecursionError:
        raise ApiError(400, f"Request body nests more than {MAX_JSON_DEPTH} levels deep") from None
    except ValueError:  # JSONDecodeError, and UnicodeDecodeError for bytes that are not UTF-8
        raise ApiError(400, "Request body must be valid JSON") from None


def _refuse_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def _json_problem(body: dict[str, Any]) -> tuple[str, str] | None:
    """The first (field path, problem) in the body that would fail later instead of here."""
    stack: list[tuple[str, object, int]] = [("", body, 0)]
    while stack:  # a loop, not recursion: depth is what is being checked
        path, value, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            return path[:200], f"nests more than {MAX_JSON_DEPTH} levels deep"
        if not _is_utf8(path):  # the path holds every key on the way here; shown escaped
            return (path.encode("utf-8", "backslashreplace").decode("utf-8"),
                    "is a key that is not valid Unicode text (it holds a lone surrogate)")
        problem = _value_problem(value)
        if problem is not None:
            return path, problem
        stack.extend((p, v, depth + 1) for p, v in reversed(_children(path, value)))
    return None


def _value_problem(value: object) -> str | None:
    # Values get UTF-8 encoded or used as numbers: lone surrogates, inf and huge ints would fail.
    if isinstance(value, str) and not _is_utf8(value):
        return "is not valid Unicode text (it holds a lone surrogate)"
    if isinstance(value, float) and not math.isfinite(value):
        return "is a number too large to represent"
    if isinstance(value, int) and abs(value) > sys.float_info.max:
        return "is a number too large to represent"
    return None


def _children(path: str, value: object) -> list[tuple[str, object]]:
    """A JSON value's members, each with its field path (`tasks[0].prompt`)."""
    if isinstance(value, dict):
        return [(f"{path}.{key}" if path else key, item) for key, item in value.items()]
    if isinstance(value, list):
        return [(f"{path}[{i}]", item) for i, item in enumerate(value)]
    return []


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
