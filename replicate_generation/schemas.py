"""Any Replicate model beside the curated nine: policy, schema fetch and cache, input checks.

A non-curated model (`owner/name` or `owner/name:<64-hex version>`) is allowed by MODEL_POLICY,
then its input is checked against the model's own cog schema (fetched with the caller's token,
paced as a poll, cached per account and version for SCHEMA_TTL_SECONDS) before anything is
created. No Flask here: problems are InvalidRequest (400), SchemaUnavailable or TokenRejected.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
from replicate.exceptions import ReplicateError

from replicate_generation.catalogue import MODELS, ModelSpec, Param
from replicate_generation.errors import (
    DeadlineExceeded,
    InvalidRequest,
    SchemaUnavailable,
    TokenRejected,
)
from replicate_generation.model_functions import OTHER_MODELS, Runtime, account_key
from replicate_generation.model_functions import check_value as check_uri

SCHEMA_TTL_SECONDS = 600.0
# How long a schema fetch may wait for the account's poll budget during an HTTP request.
FETCH_WAIT_SECONDS = 10.0
MODEL_REF = re.compile(
    r"^(?P<owner>[A-Za-z0-9][A-Za-z0-9_.-]{0,99})/(?P<name>[A-Za-z0-9][A-Za-z0-9_.-]{0,99})"
    r"(?::(?P<version>[0-9a-f]{64}))?$")
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*(:[0-9a-f]{64})?$"
_ALLOWED_ITEM = re.compile(r"[a-z0-9][a-z0-9_.-]*(/[a-z0-9][a-z0-9_.-]*)?")
_JSON_TYPES: Mapping[str, tuple[type, ...]] = {
    "string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,),
    "array": (list,), "object": (dict,)}


# --------------------------------------------------------------------------- policy


@dataclass(frozen=True)
class ModelPolicy:
    """MODEL_POLICY: `curated` (default), `allow:<owners or owner/name, comma separated>`, `any`."""

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
        owner = ref.split("/", 1)[0].lower()
        return self.mode == "allow" and (owner in self.allowed or ref.lower() in self.allowed)


def parse_ref(name: str) -> tuple[str, str | None] | None:
    """(`owner/name`, version or None) for a model reference, or None when it is not one."""
    match = MODEL_REF.match(name)
    if match is None:
        return None
    return f"{match['owner']}/{match['name']}", match["version"]


# --------------------------------------------------------------------------- schema


@dataclass(frozen=True)
class InputSchema:
    """A model version's Input: properties (enums resolved, in x-order) and required names."""

    version: str | None
    properties: dict[str, dict[str, Any]]
    required: tuple[str, ...]

    @classmethod
    def from_openapi(cls, openapi: object, version: str | None) -> InputSchema:
        components = _dig(openapi, "components", "schemas")
        spec = components.get("Input") if isinstance(components, dict) else None
        if not isinstance(spec, dict) or not isinstance(spec.get("properties", {}), dict):
            raise SchemaUnavailable(502, "the model's schema has no Input object")
        given = spec.get("properties", {})
        props = {name: _resolve(prop, components) for name, prop in given.items()
                 if isinstance(prop, dict)}
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


def _resolve(prop: dict[str, Any], components: dict[str, Any]) -> dict[str, Any]:
    """Merge cog's `allOf: [{"$ref": "#/components/schemas/X"}]` into the property."""
    merged = {k: v for k, v in prop.items() if k != "allOf"}
    for part in prop.get("allOf", []):
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
    """The input as sent; InvalidRequest naming the field for anything the schema refuses."""
    for name in values:
        if name not in schema.properties:
            allowed = ", ".join(schema.properties)
            raise InvalidRequest(f"{prefix}{name}", f"Unknown parameter '{name[:100]}' for model "
                                 f"{model}; allowed: {allowed}")
    for name in schema.required:
        if values.get(name) is None:
            raise InvalidRequest(f"{prefix}{name}", f"{prefix}{name} is required")
    for name, value in values.items():
        check_value(schema.properties[name], value, f"{prefix}{name}")
    return dict(values)


def check_value(prop: Mapping[str, Any], value: object, field: str) -> None:
    """Type, format, enum, range and length of one value, as the property says."""
    if value is None:
        if not prop.get("nullable"):
            raise InvalidRequest(field, f"{field} must not be null")
        return
    _check_type(prop, value, field)
    if "enum" in prop and value not in prop["enum"]:
        options = ", ".join(repr(c) for c in prop["enum"])
        raise InvalidRequest(field, f"{field} must be one of {options}")
    if isinstance(value, int | float) and not isinstance(value, bool):
        if isinstance(prop.get("minimum"), int | float) and value < prop["minimum"]:
            raise InvalidRequest(field, f"{field} must be >= {prop['minimum']}")
        if isinstance(prop.get("maximum"), int | float) and value > prop["maximum"]:
            raise InvalidRequest(field, f"{field} must be <= {prop['maximum']}")
    if isinstance(value, str) and isinstance(prop.get("maxLength"), int) \
            and len(value) > prop["maxLength"]:
        raise InvalidRequest(field, f"{field} must be at most {prop['maxLength']} characters")
    if isinstance(value, list) and isinstance(prop.get("items"), dict):
        for i, item in enumerate(value):
            check_value(prop["items"], item, f"{field}[{i}]")


def _check_type(prop: Mapping[str, Any], value: object, field: str) -> None:
    kind = prop.get("type")
    wanted = _JSON_TYPES.get(str(kind))
    if wanted is not None and (not isinstance(value, wanted)
                               or (isinstance(value, bool) and bool not in wanted)):
        raise InvalidRequest(field, f"{field} must be of type {kind}")
    if prop.get("format") == "uri":
        check_uri(Param(field, "uri", "a file input"), value, field)


# --------------------------------------------------------------------------- models


@dataclass(frozen=True)
class SchemaModel(ModelSpec):
    """A non-curated model, with the schema it was validated against (absent once resumed)."""

    schema: InputSchema | None = field(default=None, compare=False, repr=False)

    def describe(self) -> dict[str, object]:
        return {"id": self.id, "replicate_model": self.ref, "version": self.version,
                "kind": self.kind, "curated": False, "description": self.description,
                "price": None, "reference_input": None,
                "parameters": self.schema.describe() if self.schema is not None else {}}


def schema_model(ref: str, version: str | None, schema: InputSchema | None = None) -> SchemaModel:
    """The ModelSpec of a non-curated model; its id is the reference as given."""
    model_id = f"{ref}:{version}" if version else ref
    return SchemaModel(id=model_id, ref=ref, kind="other", price_usd=0.0, price_unit="call",
                       description="A Replicate model validated from its own schema (not curated;"
                       " cost unknown)", params=(), version=version, curated=False,
                       schema=schema)


def spec_from_id(model_id: str) -> ModelSpec:
    """A task record's model: a curated id or a non-curated reference (for resuming a job)."""
    if model_id in MODELS:
        return MODELS[model_id]
    parsed = parse_ref(model_id)
    if parsed is None:
        raise KeyError(model_id)
    return schema_model(*parsed)


# --------------------------------------------------------------------------- fetch and cache


class SchemaCache:
    """Schemas per (account, model, version), each kept for `ttl` seconds."""

    def __init__(self, ttl: float = SCHEMA_TTL_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl = ttl
        self._clock = clock
        self._entries: dict[tuple[str, str, str | None], tuple[float, InputSchema]] = {}
        self._lock = threading.Lock()

    def get(self, rt: Runtime, token: str, ref: str, version: str | None) -> InputSchema:
        key = (account_key(token), ref, version)
        with self._lock:
            entry = self._entries.get(key)
        if entry is not None and entry[0] > self._clock():
            return entry[1]
        schema = fetch_schema(rt, token, ref, version)
        with self._lock:
            self._entries[key] = (self._clock() + self._ttl, schema)
        return schema

    def forget(self, token: str, ref: str, version: str | None) -> None:
        """Drop the entry (Replicate refused an input it passed: the schema may have changed)."""
        with self._lock:
            self._entries.pop((account_key(token), ref, version), None)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


CACHE = SchemaCache()


def fetch_schema(rt: Runtime, token: str, ref: str, version: str | None) -> InputSchema:
    """GET the model (or the pinned version) with the caller's token, paced as a poll."""
    client = rt.clients.get(token)
    path = f"/v1/models/{ref}" + (f"/versions/{version}" if version else "")
    try:
        rt.manager.wait_for_poll(account_key(token), rt.clock() + FETCH_WAIT_SECONDS)
        body = client._request("GET", path).json()  # noqa: SLF001 - plain JSON, as served
    except DeadlineExceeded:
        raise SchemaUnavailable(503, "the account's request budget is used up; try again "
                                "shortly", retry_after=5.0) from None
    except ReplicateError as exc:
        raise _fetch_error(exc, rt, token, ref, version) from None
    except (httpx.HTTPError, ValueError) as exc:
        raise SchemaUnavailable(502, f"could not read the schema of {ref} from Replicate: "
                                f"{type(exc).__name__}") from None
    found = body if version else _dig(body, "latest_version")
    if not isinstance(found, dict):
        raise SchemaUnavailable(502, f"{ref} has no version with a schema")
    return InputSchema.from_openapi(found.get("openapi_schema"), found.get("id") or version)


def _fetch_error(exc: ReplicateError, rt: Runtime, token: str, ref: str,
                 version: str | None) -> Exception:
    status = exc.status or 0
    if status == 404:
        what = f"{ref} version {version}" if version else ref
        return InvalidRequest("model_name", f"Model '{what}' was not found on Replicate")
    if status == 401:
        rt.clients.reject(account_key(token))
        return TokenRejected(60.0)
    if status == 429:
        return SchemaUnavailable(503, "Replicate throttled the schema fetch; try again shortly",
                                 retry_after=5.0)
    return SchemaUnavailable(502, f"Replicate answered {status} to the schema fetch of {ref}")


# --------------------------------------------------------------------------- resolving


@dataclass(frozen=True)
class Resolver:
    """Resolves non-curated model names during one request, with that request's token."""

    policy: ModelPolicy
    rt: Runtime
    token: Callable[[], str]
    cache: SchemaCache = CACHE

    def __call__(self, name: str, field: str) -> ModelSpec | None:
        parsed = parse_ref(name)
        if parsed is None:
            return None
        ref, version = parsed
        if self.policy.mode == "curated":
            return None
        if not self.policy.allows(ref):
            raise InvalidRequest(field, f"Model '{ref}' is not allowed here (MODEL_POLICY)",
                                 supported_models=sorted(MODELS))
        try:
            schema = self.cache.get(self.rt, self.token(), ref, version)
        except InvalidRequest as exc:
            raise InvalidRequest(field, str(exc)) from None
        return schema_model(ref, version, schema)


@contextmanager
def resolving(resolver: Resolver) -> Iterator[None]:
    """Within the block, resolve_model also accepts models the resolver allows."""
    handle = OTHER_MODELS.set(resolver)
    try:
        yield
    finally:
        OTHER_MODELS.reset(handle)


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


def recheck(spec: ModelSpec, model_input: Mapping[str, object], token: str,
            rt: Runtime) -> InvalidRequest | None:
    """After Replicate refused an input (422): refresh the schema and say what it refuses now."""
    if spec.curated:
        return None
    CACHE.forget(token, spec.ref, spec.version)
    try:
        schema = CACHE.get(rt, token, spec.ref, spec.version)
        check_input(schema, model_input, "", spec.id)
    except InvalidRequest as exc:
        return exc
    except (SchemaUnavailable, TokenRejected):
        return None
    return None
