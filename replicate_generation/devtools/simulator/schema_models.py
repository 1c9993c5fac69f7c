"""Non-curated models the simulator serves, with input schemas in cog's real shape.

Enums via `allOf`/`$ref`, `x-order`, `nullable` numbers, `format: uri` files; tests swap a schema
(`set_input_schema`) to see the service pick the change up after a 422. Only the OFFICIAL ones are
created by name; the others (community models) only by a version id, as on Replicate.
"""

from __future__ import annotations

import copy
import hashlib
from typing import Any

from replicate_generation.devtools.simulator.hostile import FILE_COUNTS as HOSTILE_COUNTS
from replicate_generation.devtools.simulator.hostile import KINDS as HOSTILE_KINDS
from replicate_generation.devtools.simulator.hostile import output as hostile_output
from replicate_generation.devtools.simulator.hostile import schemas as hostile_schemas

FLUX_SCHNELL = "black-forest-labs/flux-schnell"
CUTOUT = "acme/cutout"
LLAMA = "meta/meta-llama-3-8b-instruct"
STYLE = "acme/style"  # a community image model with two versions
UPSCALE = "acme/upscale"  # a community model without a prompt: one file out (cog's `-> Path`)
# Created by name (POST /v1/models/{owner}/{name}/predictions); every other one by version only.
OFFICIAL = frozenset({FLUX_SCHNELL, LLAMA})

# ref -> (output kind, format): "image" a list of files, "dict" {image, mask}, "text" tokens,
# "file" one file.
KINDS: dict[str, tuple[str, str]] = {
    FLUX_SCHNELL: ("image", "webp"),
    CUTOUT: ("dict", "png"),
    LLAMA: ("text", "txt"),
    STYLE: ("image", "png"),
    UPSCALE: ("file", "png"),
    **HOSTILE_KINDS,
}
# Files a prediction of a kind makes whatever its input says (image kinds: num_outputs).
FILE_COUNTS: dict[str, int] = {"dict": 2, "file": 1, **HOSTILE_COUNTS}

# output_format values a model honours (the file it writes).
FORMATS: dict[str, tuple[str, ...]] = {FLUX_SCHNELL: ("webp", "jpg", "png")}

TEXT_TOKENS = ["Hello", ",", " world", "."]


def version_id(ref: str, label: str = "latest") -> str:
    return hashlib.sha256(f"{ref}@{label}".encode()).hexdigest()


def _enum(name: str, values: list[Any], kind: str = "string") -> dict[str, Any]:
    return {"enum": values, "type": kind, "title": name, "description": "An enumeration."}


def _ref(name: str, default: Any, order: int) -> dict[str, Any]:
    return {"allOf": [{"$ref": f"#/components/schemas/{name}"}], "default": default,
            "x-order": order}


def _flux_schnell(with_megapixels: bool) -> dict[str, Any]:
    props: dict[str, Any] = {
        "prompt": {"type": "string", "title": "Prompt", "x-order": 0},
        "aspect_ratio": _ref("aspect_ratio", "1:1", 1),
        "num_outputs": {"type": "integer", "title": "Num Outputs", "default": 1, "minimum": 1,
                        "maximum": 4, "x-order": 2},
        "seed": {"type": "integer", "title": "Seed", "nullable": True, "x-order": 3},
        "output_format": _ref("output_format", "webp", 4),
        "go_fast": {"type": "boolean", "title": "Go Fast", "default": True, "x-order": 5},
    }
    if with_megapixels:
        props["megapixels"] = _ref("megapixels", "1", 6)
    return {"Input": {"type": "object", "title": "Input", "required": ["prompt"],
                      "properties": props},
            "aspect_ratio": _enum("aspect_ratio", ["1:1", "16:9", "9:16"]),
            "output_format": _enum("output_format", ["webp", "jpg", "png"]),
            "megapixels": _enum("megapixels", ["1", "0.25"]),
            "Output": {"type": "array", "items": {"type": "string", "format": "uri"},
                       "title": "Output"}}


def _cutout() -> dict[str, Any]:
    props = {"image": {"type": "string", "format": "uri", "title": "Image", "x-order": 0},
             "threshold": {"type": "number", "title": "Threshold", "default": 0.5, "minimum": 0,
                           "maximum": 1, "x-order": 1}}
    uri = {"type": "string", "format": "uri"}
    return {"Input": {"type": "object", "title": "Input", "required": ["image"],
                      "properties": props},
            "Output": {"type": "object", "title": "Output",
                       "properties": {"image": uri, "mask": uri}}}


def _llama() -> dict[str, Any]:
    props = {"prompt": {"type": "string", "title": "Prompt", "default": "", "x-order": 0},
             "max_tokens": {"type": "integer", "title": "Max Tokens", "default": 512,
                            "minimum": 1, "x-order": 1},
             "temperature": {"type": "number", "title": "Temperature", "default": 0.6,
                             "minimum": 0, "maximum": 5, "x-order": 2}}
    return {"Input": {"type": "object", "title": "Input", "properties": props},
            "Output": {"type": "array", "items": {"type": "string"}, "title": "Output",
                       "x-cog-array-type": "iterator", "x-cog-array-display": "concatenate"}}


def _style(with_style: bool) -> dict[str, Any]:
    props: dict[str, Any] = {
        "prompt": {"type": "string", "title": "Prompt", "x-order": 0},
        "num_outputs": {"type": "integer", "title": "Num Outputs", "default": 1, "minimum": 1,
                        "maximum": 2, "x-order": 1}}
    if with_style:
        props["style"] = _ref("style", "ink", 2)
    return {"Input": {"type": "object", "title": "Input", "required": ["prompt"],
                      "properties": props},
            "style": _enum("style", ["ink", "oil", "pixel"]),
            "Output": {"type": "array", "items": {"type": "string", "format": "uri"},
                       "title": "Output"}}


def _upscale() -> dict[str, Any]:
    props = {"image": {"type": "string", "format": "uri", "title": "Image", "x-order": 0},
             "scale": {"type": "integer", "title": "Scale", "default": 2, "minimum": 2,
                       "maximum": 4, "x-order": 1}}
    return {"Input": {"type": "object", "title": "Input", "required": ["image"],
                      "properties": props},
            "Output": {"type": "string", "format": "uri", "title": "Output"}}


_VERSIONS: dict[str, dict[str, dict[str, Any]]] = {
    FLUX_SCHNELL: {version_id(FLUX_SCHNELL): _flux_schnell(True),
                   version_id(FLUX_SCHNELL, "v1"): _flux_schnell(False)},
    CUTOUT: {version_id(CUTOUT): _cutout()},
    LLAMA: {version_id(LLAMA): _llama()},
    STYLE: {version_id(STYLE): _style(True), version_id(STYLE, "v1"): _style(False)},
    UPSCALE: {version_id(UPSCALE): _upscale()},
    **{ref: {version_id(ref): comps} for ref, comps in hostile_schemas().items()},
}
_overrides: dict[str, dict[str, Any]] = {}


def set_input_schema(ref: str, input_schema: dict[str, Any]) -> None:
    """Replace the latest version's Input schema (until `clear_overrides`)."""
    _overrides[ref] = copy.deepcopy(input_schema)


def clear_overrides() -> None:
    _overrides.clear()


def has_version(ref: str, vid: str) -> bool:
    return vid in _VERSIONS.get(ref, {})


def is_official(ref: str) -> bool:
    """Whether Replicate creates the model by name; a community model needs a version id."""
    return ref in OFFICIAL


def components(ref: str, vid: str | None) -> dict[str, Any]:
    """The version's component schemas (the latest when `vid` is None or "hidden")."""
    latest = version_id(ref)
    vid = latest if vid in (None, "hidden") else vid
    schemas = copy.deepcopy(_VERSIONS[ref][vid])
    if vid == latest and ref in _overrides:
        schemas["Input"] = copy.deepcopy(_overrides[ref])
    return schemas


def version_json(ref: str, vid: str | None = None) -> dict[str, Any]:
    vid = version_id(ref) if vid in (None, "hidden") else vid
    return {"id": vid, "created_at": "2025-01-01T00:00:00.000000Z", "cog_version": "0.14.0",
            "openapi_schema": {"openapi": "3.0.2", "info": {"title": "Cog", "version": "0.1.0"},
                               "components": {"schemas": components(ref, vid)}}}


def input_errors(ref: str, vid: str | None, inp: dict[str, Any]) -> list[tuple[str, str]]:
    """(field, problem) for each required field missing or value of the wrong type or enum.

    Unknown fields are dropped silently, as Replicate does.
    """
    schemas = components(ref, vid)
    spec = schemas["Input"]
    errors = [(name, "required") for name in spec.get("required", []) if name not in inp]
    for name, value in inp.items():
        prop = spec["properties"].get(name)
        if prop is None:
            continue
        for part in prop.get("allOf", []):
            prop = {**schemas[part["$ref"].rsplit("/", 1)[1]], **prop}
        problem = _value_problem(prop, value)
        if problem:
            errors.append((name, problem))
    return errors


_TYPES = {"string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,)}


def _value_problem(prop: dict[str, Any], value: Any) -> str | None:
    if value is None:
        return None if prop.get("nullable") else "invalid_type"
    wanted = _TYPES.get(prop.get("type", ""), (object,))
    if not isinstance(value, wanted) or (isinstance(value, bool) and bool not in wanted):
        return "invalid_type"
    if "enum" in prop and value not in prop["enum"]:
        return "enum"
    if "minimum" in prop and value < prop["minimum"]:
        return "number_gte"
    if "maximum" in prop and value > prop["maximum"]:
        return "number_lte"
    return None


def output(kind: str, refs: list[str]) -> Any:
    """The prediction output of a schema model, given its file URLs."""
    if kind == "dict":
        return {"image": refs[0], "mask": refs[1]}
    if kind == "text":
        return list(TEXT_TOKENS)
    if kind == "file":
        return refs[0]
    if kind in HOSTILE_COUNTS:
        return hostile_output(kind, refs)
    return refs
