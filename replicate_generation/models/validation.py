"""A curated model's input, checked against the catalogue: types, choices, ranges, URIs.

Every problem is an InvalidRequest naming the field. Models outside the catalogue resolve only
through OTHER_MODELS, which schema_fetch.resolving sets for one request.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from urllib.parse import urlsplit

from replicate_generation.errors import InvalidRequest
from replicate_generation.models.catalogue import MODELS, ModelSpec, Param

MAX_URI_LENGTH = 2048

# Set by schema_fetch.resolving for one request: resolves models outside the catalogue.
OTHER_MODELS: ContextVar[Callable[[str, str], ModelSpec | None] | None] = ContextVar(
    "other_models", default=None)


def resolve_model(name: object, field: str = "model_name") -> ModelSpec:
    """Return the catalogue entry for a short id (`flux-dev`) or a full ref (`owner/name`);
    any other `owner/name(:version)` only where MODEL_POLICY allows it (schema_fetch.py)."""
    if not isinstance(name, str) or not name:
        raise InvalidRequest(field, f"{field} is required and must be a string")
    for spec in MODELS.values():
        if name in (spec.id, spec.ref):
            return spec
    other = OTHER_MODELS.get()
    found = other(name, field) if other is not None else None
    if found is not None:
        return found
    raise InvalidRequest(
        field, f"Model '{name[:200]}' not supported", supported_models=sorted(MODELS)
    )


def build_input(
    spec: ModelSpec, prompt: object, params: Mapping[str, object], prefix: str = ""
) -> dict[str, object]:
    """Validate every parameter against the catalogue and return the full model input."""
    if prompt is None:
        raise InvalidRequest(f"{prefix}prompt", f"{prefix}prompt is required")
    checked = {"prompt": _check(_prompt_param(spec), prompt, f"{prefix}prompt")}
    if not str(checked["prompt"]).strip():
        raise InvalidRequest(f"{prefix}prompt", f"{prefix}prompt must not be empty")
    for name, value in params.items():
        param = spec.param(name)
        if param is None or name == "prompt":
            allowed = ", ".join(p.name for p in spec.params if p.name != "prompt")
            raise InvalidRequest(
                f"{prefix}{name}",
                f"Unknown parameter '{name[:100]}' for model {spec.id}; allowed: {allowed}",
            )
        checked[name] = _check(param, value, f"{prefix}{name}")
    for param in spec.params:
        if param.name not in checked:
            if param.required:
                raise InvalidRequest(f"{prefix}{param.name}", f"{prefix}{param.name} is required")
            if param.default is not None:
                checked[param.name] = param.default
    return checked


def _prompt_param(spec: ModelSpec) -> Param:
    param = spec.param("prompt")
    if param is None:  # every catalogue entry has one; a test guards the catalogue
        raise InvalidRequest("model_name", f"model {spec.id} takes no prompt")
    return param


def check_value(param: Param, value: object, field: str) -> object:
    """Return the value if it fits the parameter; else InvalidRequest naming `field`."""
    return _check(param, value, field)


def as_integer(value: object) -> object:
    """A whole float (30.0) as the int JSON Schema counts it as; any other value as it is."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _check(param: Param, value: object, field: str) -> object:
    """Return the value if it fits the parameter's type, choices and range (an integer's whole
    float as an int, so Replicate gets 30, not 30.0)."""
    if param.type == "integer":
        value = as_integer(value)
    checker = _CHECKERS[param.type]
    checker(param, value, field)
    if param.choices is not None and value not in param.choices:
        options = ", ".join(repr(c) for c in param.choices)
        raise InvalidRequest(field, f"{field} must be one of {options}")
    if isinstance(value, int | float) and not isinstance(value, bool):
        if param.minimum is not None and value < param.minimum:
            raise InvalidRequest(field, f"{field} must be >= {param.minimum}")
        if param.maximum is not None and value > param.maximum:
            raise InvalidRequest(field, f"{field} must be <= {param.maximum}")
    return value


def _check_string(param: Param, value: object, field: str) -> None:
    if not isinstance(value, str):
        raise InvalidRequest(field, f"{field} must be a string")
    if param.max_length is not None and len(value) > param.max_length:
        raise InvalidRequest(field, f"{field} must be at most {param.max_length} characters")


def _check_integer(param: Param, value: object, field: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(field, f"{field} must be an integer")


def _check_number(param: Param, value: object, field: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidRequest(field, f"{field} must be a number")


def _check_boolean(param: Param, value: object, field: str) -> None:
    if not isinstance(value, bool):
        raise InvalidRequest(field, f"{field} must be true or false")


def _check_uri(param: Param, value: object, field: str) -> None:
    """Accept an http(s) URL (printable ASCII) or a data: URI; never a path on this server."""
    message = (f"{field} must be an http(s) URL (printable ASCII) or a data: URI "
               "(paths on the server are not accepted)")
    if not isinstance(value, str):
        raise InvalidRequest(field, message)
    if value.startswith("data:"):
        if "," not in value:
            raise InvalidRequest(field, f"{field} is not a valid data: URI")
        return
    try:
        parts = urlsplit(value)
    except ValueError:  # e.g. "http://[": an unclosed IPv6 host
        raise InvalidRequest(field, message) from None
    # A URL is printable ASCII (RFC 3986): anything else is percent-encoded, the host punycoded.
    if (parts.scheme not in ("http", "https") or not parts.netloc or len(value) > MAX_URI_LENGTH
            or any(not "!" <= ch <= "~" for ch in value)):
        raise InvalidRequest(field, message)


def _check_uri_list(param: Param, value: object, field: str) -> None:
    """Accept a list of 1..max_items URIs, each as `_check_uri` does; name the bad item."""
    most = param.max_items
    if not isinstance(value, list):
        raise InvalidRequest(field, f"{field} must be a list of http(s) URLs or data: URIs")
    if not value or (most is not None and len(value) > most):
        limit = f"1 to {most}" if most is not None else "at least 1"
        raise InvalidRequest(field, f"{field} must hold {limit} items, not {len(value)}")
    for i, item in enumerate(value):
        _check_uri(param, item, f"{field}[{i}]")


_CHECKERS: dict[str, Callable[[Param, object, str], None]] = {
    "string": _check_string,
    "integer": _check_integer,
    "number": _check_number,
    "boolean": _check_boolean,
    "uri": _check_uri,
    "uri_list": _check_uri_list,
}

