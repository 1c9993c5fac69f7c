"""JSON nested deeper than Python can parse, read anyway: the parts past a bound become a marker.

A model's author decides how deep its output nests; Python's parser gives up past ~1,000 levels
(RecursionError). `loads` keeps the rest of the answer (the prediction's id, status) readable, and
`too_deep` tells whoever reads a value that part of it was not read.
"""

from __future__ import annotations

import json
import re
from typing import Any

# How deep a document is read (the prediction itself is level 1, its output level 2).
MAX_DEPTH = 64
# What stands where a part nested deeper than MAX_DEPTH was.
TOO_DEEP = f"\u0000(nested deeper than {MAX_DEPTH} levels: not read)"
_TOKENS = re.compile(r'"(?:[^"\\]++|\\.)*+"|[\[\]{}]')


def loads(text: str | bytes) -> Any:
    """json.loads, except that parts past MAX_DEPTH become TOO_DEEP instead of failing."""
    try:
        return json.loads(text)
    except RecursionError:
        raw = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
        return json.loads(cut(raw, MAX_DEPTH))


def cut(text: str, limit: int) -> str:
    """The JSON text with every array or object opened past `limit` levels replaced by TOO_DEEP."""
    parts: list[str] = []
    depth, kept_to, skipping = 0, 0, False
    for token in _TOKENS.finditer(text):
        bracket = token.group()
        if bracket[0] == '"':
            continue
        if bracket in "[{":
            depth += 1
            if depth == limit + 1:
                parts.append(text[kept_to:token.start()])
                skipping = True
            continue
        if depth == limit + 1 and skipping:
            parts.append(json.dumps(TOO_DEEP))
            kept_to, skipping = token.end(), False
        depth -= 1
    parts.append(text[kept_to:])
    return "".join(parts)


def depth(value: object, limit: int) -> int:
    """How deep `value` nests, counting at most to limit + 1 (iterative: never a RecursionError).
    A TOO_DEEP marker counts as deeper than any limit."""
    deepest = 0
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, str) and item == TOO_DEEP:
            return limit + 1
        if isinstance(item, dict | list | tuple):
            if level > limit:
                return limit + 1
            deepest = max(deepest, level)
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, level + 1) for child in children)
    return deepest


def too_deep(value: object, limit: int) -> bool:
    """Whether `value` nests deeper than `limit` levels or lost a part past MAX_DEPTH."""
    return depth(value, limit) > limit
