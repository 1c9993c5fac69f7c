"""Any Replicate model beside the curated nine: MODEL_POLICY, its cog schema, input checks.

The input is checked against the model's own schema (schema_fetch.py gets it) before anything is
created. A schema that nests too deeply or has malformed keywords is refused (502), and errors
quote only an excerpt of what a schema lists. Pure: problems are InvalidRequest (400) or
SchemaUnavailable.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from replicate_generation import json_depth
from replicate_generation.errors import InvalidRequest, SchemaUnavailable
from replicate_generation.models.catalogue import MODELS, ModelSpec, Param
from replicate_generation.models.validation import as_integer
from replicate_generation.models.validation import check_value as check_uri

_SEGMENT = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}"
MODEL_REF = re.compile(
    rf"^(?P<owner>{_SEGMENT})/(?P<name>{_SEGMENT})(?::(?P<version>[0-9a-f]{{64}}))?$")
# A deployment (a team's model on reserved hardware), named `deployments/<owner>/<name>`.
DEPLOYMENTS = "deployments/"
DEPLOYMENT_REF = re.compile(rf"^{DEPLOYMENTS}(?P<owner>{_SEGMENT})/(?P<name>{_SEGMENT})$")
VERSION_ID = re.compile(r"[0-9a-f]{64}")
MODEL_NAME_PATTERN = (r"^(deployments/[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*"
                      r"|[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*(:[0-9a-f]{64})?)$")
_ALLOWED_ITEM = re.compile(r"(deployments/)?[a-z0-9][a-z0-9_.-]*(/[a-z0-9][a-z0-9_.-]*)?")
_JSON_TYPES: Mapping[str, tuple[type, ...]] = {
    "string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,),
    "array": (list,), "object": (dict,)}
# A parameter nesting deeper is refused: cog's are a few levels (an array of objects at most).
MAX_PROPERTY_DEPTH = 32
# Keywords whose value must be a list where present.
_LIST_KEYWORDS = ("enum", "allOf", "required")
# How much of a list (choices, parameters) an error message quotes.
EXCERPT_ITEMS = 20
EXCERPT_CHARS = 300


# --------------------------------------------------------------------------- policy


@dataclass(frozen=True)
class ModelPolicy:
    """MODEL_POLICY: `curated` (default), `allow:<owners or owner/name, comma separated>`, `any`;
    a deployment by `any`, `deployments/<owner>` or `deployments/<owner>/<name>`."""

    mode: str = "curated"
    allowed: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, text: str | None) -> ModelPolicy:
        """:raises ValueError: naming what is wrong."""
        value = (text or "curated").strip()
        if value in ("curated", "any"):
            return cls(mode=value)
        if value.startswith("allow:"):
            items = frozenset(i.strip().lower() for i in value[6:].split(",") if i.strip())
            bad = [i for i in items if not _ALLOWED_ITEM.fullmatch(i)]
            if not items or bad:
                raise ValueError("MODEL_POLICY=allow: needs a comma list of owners or owner/name"
                                 + (f"; not {bad[0]!r}" if bad else ""))
            return cls(mode="allow", allowed=items)
        raise ValueError(f"MODEL_POLICY must be curated, any or allow:<list>, not {value[:50]!r}")

    def allows(self, ref: str) -> bool:
        if self.mode == "any":
            return True
        lowered = ref.lower()
        owner = lowered.rsplit("/", 1)[0] if DEPLOYMENT_REF.match(ref) else lowered.split("/")[0]
        return self.mode == "allow" and (owner in self.allowed or lowered in self.allowed)


def parse_ref(name: str) -> tuple[str, str | None] | None:
    """(`owner/name`, version or None) for a model reference, (`deployments/owner/name`, None)
    for a deployment's, or None when it is neither."""
    match = MODEL_REF.match(name)
    if match is None:
        return (name, None) if DEPLOYMENT_REF.match(name) else None
    return f"{match['owner']}/{match['name']}", match["version"]


def deployment_of(spec: ModelSpec) -> str | None:
    """The `owner/name` of the deployment the model runs on, or None for a model."""
    return spec.ref[len(DEPLOYMENTS):] if DEPLOYMENT_REF.match(spec.ref) else None


# --------------------------------------------------------------------------- schema


@dataclass(frozen=True)
class InputSchema:
    """A model version's Input: properties (enums resolved, in x-order) and required names;
    `official` as the model's record says (None: fetched by version, or not said); for a
    deployment, `model` is its current release's model (`version` that release's)."""

    version: str | None
    properties: dict[str, dict[str, Any]]
    required: tuple[str, ...]
    official: bool | None = None
    model: str | None = None

    @classmethod
    def from_openapi(cls, openapi: object, version: str | None) -> InputSchema:
        components = _dig(openapi, "components", "schemas")
        spec = components.get("Input") if isinstance(components, dict) else None
        if not isinstance(spec, dict) or not isinstance(spec.get("properties", {}), dict):
            raise SchemaUnavailable(502, "the model's schema has no Input object")
        _check_keywords("Input", spec)
        given = spec.get("properties", {})
        props = {name: _resolve(_check_property(str(name), prop), components)
                 for name, prop in given.items() if isinstance(prop, dict)}
        for name, prop in props.items():
            _check_property(str(name), prop)  # and as merged with what it refers to
        ordered = dict(sorted(props.items(), key=lambda kv: _order(kv[1])))
        required = tuple(str(r) for r in spec.get("required", []) if isinstance(r, str))
        return cls(version=version, properties=ordered, required=required)

    def describe(self) -> dict[str, dict[str, object]]:
        """Each parameter as /models shows it."""
        out: dict[str, dict[str, object]] = {}
        for name, prop in self.properties.items():
            view: dict[str, object] = {"type": _type_name(prop),
                                       "description": prop.get("description", prop.get("title")),
                                       "required": name in self.required,
                                       "default": prop.get("default")}
            for key in ("enum", "minimum", "maximum", "maxLength", "nullable"):
                if key in prop:
                    view["choices" if key == "enum" else key] = prop[key]
            out[name] = view
        return out


def _dig(value: object, *keys: str) -> Any:
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _check_property(name: str, prop: dict[str, Any]) -> dict[str, Any]:
    """The property, unless validation could not apply it safely (SchemaUnavailable): deep
    nesting, keywords of the wrong kind."""
    if json_depth.too_deep(prop, MAX_PROPERTY_DEPTH):
        raise SchemaUnavailable(502, f"parameter '{_short(name)}' nests deeper than "
                                f"{MAX_PROPERTY_DEPTH} levels")
    _check_keywords(f"parameter '{_short(name)}'", prop)
    items = prop.get("items")
    while isinstance(items, dict):
        _check_keywords(f"parameter '{_short(name)}' (its items)", items)
        items = items.get("items")
    return prop


def _check_keywords(where: str, schema: Mapping[str, Any]) -> None:
    for keyword in _LIST_KEYWORDS:
        if keyword in schema and not isinstance(schema[keyword], list):
            raise SchemaUnavailable(502, f"{where} has an `{keyword}` that is not a list "
                                    f"({type(schema[keyword]).__name__})")


def _short(text: object, limit: int = 100) -> str:
    value = str(text)
    return value if len(value) <= limit else f"{value[:limit]}..."


def excerpt(values: Sequence[object], *, quote: bool = True) -> str:
    """The first of `values`, comma-separated, within EXCERPT_ITEMS and EXCERPT_CHARS; then how
    many there are in all."""
    shown: list[str] = []
    used = 0
    for value in values[:EXCERPT_ITEMS]:
        text = _short(repr(value) if quote else value, 80)
        if shown and used + len(text) > EXCERPT_CHARS:
            break
        shown.append(text)
        used += len(text) + 2
    rest = len(values) - len(shown)
    return ", ".join(shown) + (f", ... ({len(values):,} in all)" if rest > 0 else "")


def _resolve(prop: dict[str, Any], components: dict[str, Any]) -> dict[str, Any]:
    """Merge cog's `allOf: [{"$ref": "#/components/schemas/X"}]` into the property."""
    merged = {k: v for k, v in prop.items() if k != "allOf"}
    parts = prop.get("allOf", [])
    for part in parts if isinstance(parts, list) else []:
        target = str(part.get("$ref", "")).rsplit("/", 1)[-1] if isinstance(part, dict) else ""
        referenced = components.get(target)
        if isinstance(referenced, dict):
            merged = {**referenced, **merged}
    return merged


def _order(prop: dict[str, Any]) -> float:
    order = prop.get("x-order")
    return float(order) if isinstance(order, int | float) else float("inf")


def _type_name(prop: dict[str, Any]) -> str:
    if prop.get("format") == "uri":
        return "uri"
    if prop.get("type") == "array" and _dig(prop, "items", "format") == "uri":
        return "uri_list"
    return str(prop.get("type", "any"))


# --------------------------------------------------------------------------- validation


def check_input(schema: InputSchema, values: Mapping[str, object], prefix: str = "",
                model: str = "") -> dict[str, object]:
    """The input as sent (whole floats of integers as ints); InvalidRequest naming the field for
    anything the schema refuses."""
    for name in values:
        if name not in schema.properties:
            allowed = excerpt(list(schema.properties), quote=False)
            raise InvalidRequest(f"{prefix}{_short(name)}", f"Unknown parameter "
                                 f"'{_short(name)}' for model {model}; allowed: {allowed}")
    for name in schema.required:
        if values.get(name) is None:
            raise InvalidRequest(f"{prefix}{_short(name)}", f"{prefix}{_short(name)} is required")
    return {name: check_value(schema.properties[name], value, f"{prefix}{name}")
            for name, value in values.items()}


def check_value(prop: Mapping[str, Any], value: object, field: str) -> object:
    """Type, format, enum, range and length of one value, as the property says; the value as
    sent (an integer's whole float as an int)."""
    if value is None:
        if not prop.get("nullable"):
            raise InvalidRequest(field, f"{field} must not be null")
        return None
    if prop.get("type") == "integer":
        value = as_integer(value)
    _check_type(prop, value, field)
    if "enum" in prop and value not in prop["enum"]:
        raise InvalidRequest(field, f"{field} must be one of {excerpt(prop['enum'])}")
    if isinstance(value, int | float) and not isinstance(value, bool):
        if isinstance(prop.get("minimum"), int | float) and value < prop["minimum"]:
            raise InvalidRequest(field, f"{field} must be >= {prop['minimum']}")
        if isinstance(prop.get("maximum"), int | float) and value > prop["maximum"]:
            raise InvalidRequest(field, f"{field} must be <= {prop['maximum']}")
    if isinstance(value, str) and isinstance(prop.get("maxLength"), int) \
            and len(value) > prop["maxLength"]:
        raise InvalidRequest(field, f"{field} must be at most {prop['maxLength']} characters")
    if isinstance(value, list) and isinstance(prop.get("items"), dict):
        return [check_value(prop["items"], item, f"{field}[{i}]") for i, item in enumerate(value)]
    return value


def _check_type(prop: Mapping[str, Any], value: object, field: str) -> None:
    kind = prop.get("type")
    wanted = _JSON_TYPES.get(str(kind))
    if wanted is not None and (not isinstance(value, wanted)
                               or (isinstance(value, bool) and bool not in wanted)):
        raise InvalidRequest(field, f"{field} must be of type {_short(kind)}")
    if prop.get("format") == "uri":
        check_uri(Param(field, "uri", "a file input"), value, field)


# --------------------------------------------------------------------------- models


@dataclass(frozen=True)
class SchemaModel(ModelSpec):
    """A non-curated model, with the schema it was validated against (absent once resumed)."""

    schema: InputSchema | None = field(default=None, compare=False, repr=False)

    def describe(self) -> dict[str, object]:
        schema = self.schema
        return {"id": self.id, "replicate_model": self.ref, "version": self.version,
                "latest_version": schema.version if schema is not None and not self.version
                else None, "official": schema.official if schema is not None else None,
                "deployment": deployment_of(self),
                "release_model": schema.model if schema is not None else None,
                "kind": self.kind, "curated": False, "description": self.description,
                "price": None, "reference_input": None,
                "parameters": self.schema.describe() if self.schema is not None else {}}


def schema_model(ref: str, version: str | None, schema: InputSchema | None = None) -> SchemaModel:
    """The ModelSpec of a non-curated model (or deployment); its id is the reference as given."""
    model_id = f"{ref}:{version}" if version else ref
    return SchemaModel(id=model_id, ref=ref, kind="other", price_usd=0.0, price_unit="call",
                       description="A Replicate model validated from its own schema (not curated;"
                       " cost unknown)", params=(), version=version, curated=False,
                       schema=schema)


def runnable(spec: ModelSpec) -> ModelSpec:
    """The model an item runs: a community model named without a version runs the latest
    version its record names (Replicate creates it by version id only); official, pinned and
    curated models run as named."""
    schema = spec.schema if isinstance(spec, SchemaModel) else None
    if (schema is None or spec.version or schema.version is None or schema.official
            or deployment_of(spec)):  # a deployment runs its current release, by its name
        return spec
    return schema_model(spec.ref, schema.version, schema)


def parameter_types(spec: ModelSpec) -> dict[str, str]:
    """Each parameter's type as /models names it (`uri`, `uri_list`, `integer`, ...): from the
    catalogue, or from a non-curated model's schema."""
    if isinstance(spec, SchemaModel):
        schema = spec.schema
        return {} if schema is None else {n: _type_name(p) for n, p in schema.properties.items()}
    return {param.name: param.type for param in spec.params}


def spec_from_id(model_id: str) -> ModelSpec:
    """A task record's model: a curated id or a non-curated reference (for resuming a job)."""
    if model_id in MODELS:
        return MODELS[model_id]
    parsed = parse_ref(model_id)
    if parsed is None:
        raise KeyError(model_id)
    return schema_model(*parsed)


def validate(spec: ModelSpec, prompt: object, params: Mapping[str, object],
             prefix: str = "") -> dict[str, object]:
    """The input of a non-curated model, checked against the schema it was resolved with."""
    values = dict(params)
    if prompt is not None:
        values["prompt"] = prompt
    schema = spec.schema if isinstance(spec, SchemaModel) else None
    if schema is None:
        raise InvalidRequest(f"{prefix}model_name", f"no schema known for {spec.id}")
    return check_input(schema, values, prefix, spec.id)
