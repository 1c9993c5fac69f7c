"""Hostile models and schemas: what a community model's author can serve, for tests.

Outputs with very long keys or nested deeper than a JSON parser's recursion limit; any model's
Input schema replaced over HTTP (`POST /_sim/schema`). Deep values travel as marker strings that
`expand` turns into nested JSON text, so no deep Python object is ever built.
"""

from __future__ import annotations

import re
from typing import Any

from flask import Flask, Response, request

LONG_KEYS = "hostile/long-keys"
DEEP_OUTPUT = "hostile/deep-output"
PAIR = "hostile/pair"  # two files whatever it is asked: `<name>_1` and `<name>_2`
# How deep a deep output nests: far past Python's default recursion limit (1,000).
DEEP_LEVELS = 5000
# Two keys longer than any file name that differ only past their 4,000th character.
LONG_KEY_A = "k" * 4000 + "_first"
LONG_KEY_B = "k" * 4000 + "_second"

# ref -> (output kind, format), as schema_models.KINDS; kind -> files each prediction makes.
KINDS: dict[str, tuple[str, str]] = {LONG_KEYS: ("long-keys", "png"),
                                     DEEP_OUTPUT: ("deep", "json"), PAIR: ("pair", "png")}
FILE_COUNTS: dict[str, int] = {"long-keys": 2, "deep": 0, "pair": 2}

_MARKER = re.compile(r'"\\u0000deep-(array|items):(\d+)"')


def deep(kind: str, levels: int) -> str:
    """A marker for a value nested `levels` deep: "array" ([[[...]]]) or "items" (a schema
    property whose `items` nest)."""
    return f"\x00deep-{kind}:{levels}"


def expand(text: str) -> str:
    """JSON text with every deep marker replaced by the nested value it stands for."""
    if "\\u0000deep-" not in text:
        return text
    return _MARKER.sub(_nested, text)


def _nested(match: re.Match[str]) -> str:
    levels = int(match.group(2))
    if match.group(1) == "array":
        return "[" * levels + "]" * levels
    return '{"type":"array","items":' * levels + '{"type":"string"}' + "}" * levels


def schemas() -> dict[str, dict[str, Any]]:
    """The component schemas of each hostile model's one version."""
    uri = {"type": "string", "format": "uri"}
    prompt = {"prompt": {"type": "string", "title": "Prompt", "x-order": 0}}
    long_keys = {"Input": {"type": "object", "title": "Input", "required": ["prompt"],
                           "properties": prompt},
                 "Output": {"type": "object", "title": "Output",
                            "properties": {LONG_KEY_A: uri, LONG_KEY_B: uri}}}
    deep_output = {"Input": {"type": "object", "title": "Input", "properties": prompt},
                   "Output": {"type": "array", "title": "Output"}}
    pair = {"Input": {"type": "object", "title": "Input", "properties": prompt},
            "Output": {"type": "array", "title": "Output", "items": uri}}
    return {LONG_KEYS: long_keys, DEEP_OUTPUT: deep_output, PAIR: pair}


def output(kind: str, refs: list[str]) -> Any:
    if kind == "long-keys":
        return {LONG_KEY_A: refs[0], LONG_KEY_B: refs[1]}
    if kind == "pair":
        return refs
    return deep("array", DEEP_LEVELS)


def add_routes(app: Flask, set_input_schema: Any, clear: Any) -> None:
    """POST /_sim/schema {ref, input}: serve `input` as the model's latest Input schema;
    DELETE /_sim/schema: serve every model's own again."""

    def change() -> Response:
        if request.method == "DELETE":
            clear()
            return Response('{"ok":true}', 200, mimetype="application/json")
        spec = request.get_json(force=True, silent=True) or {}
        if not isinstance(spec.get("ref"), str) or not isinstance(spec.get("input"), dict):
            return Response('{"detail":"give ref and input","status":400}', 400,
                            mimetype="application/problem+json")
        set_input_schema(spec["ref"], spec["input"])
        return Response('{"ok":true}', 200, mimetype="application/json")

    app.add_url_rule("/_sim/schema", "sim_schema", change, methods=["POST", "DELETE"])
