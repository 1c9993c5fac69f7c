"""The models the simulator serves (curated ones and the cog-schema ones of ``schema_models``),
how a create names one, and the catalogue routes: models, versions, deployments, account."""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from typing import Any

from flask import Flask, Response

from replicate_generation.devtools.simulator.schema_models import (
    FILE_COUNTS,
    FORMATS,
    KINDS,
    STYLE,
    has_version,
    is_official,
    version_id,
)
from replicate_generation.devtools.simulator.schema_models import version_json as schema_version
from replicate_generation.devtools.simulator.web import (
    INVALID_VERSION,
    NOT_FOUND,
    ApiError,
    json_response,
)

_WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"replicate-simulator-secret!").decode()


@dataclass(frozen=True)
class ModelSpec:
    """An official model the simulator knows: its output kind and formats."""

    ref: str
    kind: str  # "image" (list of files), "video" or "audio" (one file)
    default_format: str
    formats: tuple[str, ...] = ()  # allowed input.output_format values; () = no such input

    @property
    def version_id(self) -> str:
        """Return a stable 64-hex version id, so version-based calls can be tested."""
        return hashlib.sha256(self.ref.encode()).hexdigest()

    @property
    def owner(self) -> str:
        return self.ref.split("/", 1)[0]

    @property
    def name(self) -> str:
        return self.ref.split("/", 1)[1]


MODELS: dict[str, ModelSpec] = {
    spec.ref: spec
    for spec in (
        ModelSpec("black-forest-labs/flux-dev", "image", "webp", ("webp", "jpg", "png")),
        ModelSpec("black-forest-labs/flux-kontext-max", "image", "png", ("jpg", "png")),
        ModelSpec("qwen/qwen-image", "image", "webp", ("webp", "jpg", "png")),
        ModelSpec("google/imagen-4-ultra", "image", "jpg", ("jpg", "png")),
        ModelSpec("google/nano-banana", "image", "jpg", ("jpg", "png")),
        ModelSpec("black-forest-labs/flux-1.1-pro-ultra", "image", "jpg", ("jpg", "png")),
        ModelSpec("google/veo-3-fast", "video", "mp4"),
        ModelSpec("kwaivgi/kling-v2.1-master", "video", "mp4"),
        ModelSpec("resemble-ai/chatterbox", "audio", "wav"),
    )
}

# Non-curated models with cog-shaped schemas (served beside MODELS, not listed with them).
SCHEMA_MODELS: dict[str, ModelSpec] = {
    ref: ModelSpec(ref, kind, fmt, FORMATS.get(ref, ()))
    for ref, (kind, fmt) in KINDS.items()
}


def lookup(ref: str) -> ModelSpec | None:
    return MODELS.get(ref) or SCHEMA_MODELS.get(ref)


def official(spec: ModelSpec) -> bool:
    """An official model is created by name; a community one only by a version id (404)."""
    return spec.ref in MODELS or is_official(spec.ref)


def output_count(spec: ModelSpec, inp: dict[str, Any]) -> int:
    if spec.kind in FILE_COUNTS:
        return FILE_COUNTS[spec.kind]
    return int(inp.get("num_outputs", 1) or 1) if spec.kind == "image" else 1


def output_ext(spec: ModelSpec, inp: dict[str, Any]) -> str:
    fmt = inp.get("output_format")
    return fmt if spec.formats and fmt in spec.formats else spec.default_format


def resolve_version(value: Any) -> tuple[ModelSpec, str]:
    """Resolve ``version``: a 64-hex id, ``owner/name`` or ``owner/name:id`` (else 422)."""
    text = value if isinstance(value, str) else ""
    ref, _, vid = text.partition(":")
    if "/" in ref:
        spec = lookup(ref)
        if spec is not None and vid and _has_version(spec, vid):
            return spec, vid
        if spec is not None and not vid and official(spec):
            return spec, "hidden"
        raise ApiError(422, INVALID_VERSION)
    for spec in [*MODELS.values(), *SCHEMA_MODELS.values()]:
        if _has_version(spec, text):
            return spec, text
    raise ApiError(422, INVALID_VERSION)


def _has_version(spec: ModelSpec, vid: str) -> bool:
    if spec.ref in SCHEMA_MODELS:
        return has_version(spec.ref, vid)
    return vid == spec.version_id


def _known_model(owner: str, name: str) -> ModelSpec:
    spec = lookup(f"{owner}/{name}")
    if spec is None:
        raise ApiError(404, NOT_FOUND)
    return spec


# Deployments whose current release runs a cog-schema model: owner/name -> (model, version).
DEPLOYMENTS: dict[str, tuple[str, str]] = {"acme/style-prod": (STYLE, version_id(STYLE, "v1"))}


def deployment_release(owner: str, name: str) -> tuple[ModelSpec, str] | None:
    """The model and version a deployment's current release runs: one of DEPLOYMENTS, or any
    deployment named like a curated model (``acme/flux-dev``) runs that model."""
    release = DEPLOYMENTS.get(f"{owner}/{name}")
    if release is not None:
        return SCHEMA_MODELS[release[0]], release[1]
    exact = MODELS.get(f"{owner}/{name}")
    spec = exact or next((s for s in MODELS.values() if s.name == name), None)
    return None if spec is None else (spec, spec.version_id)


def _version_json(spec: ModelSpec) -> dict[str, Any]:
    """Return a version whose Output schema is not an iterator (so run() returns a value)."""
    if spec.ref in SCHEMA_MODELS:
        return schema_version(spec.ref)
    properties: dict[str, Any] = {"prompt": {"type": "string", "title": "Prompt", "x-order": 0}}
    if spec.formats:
        properties["output_format"] = {
            "type": "string",
            "enum": list(spec.formats),
            "default": spec.default_format,
            "x-order": 1,
        }
    uri = {"type": "string", "format": "uri"}
    output = {"type": "array", "items": uri} if spec.kind == "image" else uri
    schemas = {
        "Input": {
            "type": "object",
            "title": "Input",
            "required": ["prompt"],
            "properties": properties,
        },
        "Output": {**output, "title": "Output"},
    }
    return {
        "id": spec.version_id,
        "created_at": "2025-01-01T00:00:00.000000Z",
        "cog_version": "0.14.0",
        "openapi_schema": {
            "openapi": "3.0.2",
            "info": {"title": "Cog", "version": "0.1.0"},
            "components": {"schemas": schemas},
        },
    }


def _model_json(spec: ModelSpec) -> dict[str, Any]:
    return {
        "url": f"https://replicate.com/{spec.ref}",
        "owner": spec.owner,
        "name": spec.name,
        "description": f"Simulated {spec.kind} model",
        "visibility": "public",
        "is_official": official(spec),
        "github_url": None,
        "paper_url": None,
        "license_url": None,
        "run_count": 0,
        "cover_image_url": None,
        "default_example": None,
        "latest_version": _version_json(spec),
    }


def _deployment_json(owner: str, name: str, spec: ModelSpec, version: str) -> dict[str, Any]:
    return {
        "owner": owner,
        "name": name,
        "current_release": {
            "number": 1,
            "model": spec.ref,
            "version": version,
            "created_at": "2025-01-01T00:00:00.000000Z",
            "created_by": {"type": "user", "username": "sim", "name": "Sim", "github_url": None},
            "configuration": {"hardware": "gpu-a100-large", "min_instances": 0, "max_instances": 1},
        },
    }


def add_catalogue_routes(app: Flask) -> None:
    route = app.add_url_rule
    route("/v1/models/<owner>/<name>", view_func=_get_model, methods=["GET"])
    route("/v1/models/<owner>/<name>/versions", view_func=_list_versions, methods=["GET"])
    route("/v1/models/<owner>/<name>/versions/<vid>", view_func=_get_version, methods=["GET"])
    route("/v1/deployments/<owner>/<name>", view_func=_get_deployment, methods=["GET"])
    route("/v1/account", view_func=_get_account, methods=["GET"])
    route("/v1/webhooks/default/secret", view_func=_get_webhook_secret, methods=["GET"])


def _get_model(owner: str, name: str) -> Response:
    """GET /v1/models/{owner}/{name}."""
    return json_response(200, _model_json(_known_model(owner, name)))


def _list_versions(owner: str, name: str) -> Response:
    """GET /v1/models/{owner}/{name}/versions."""
    spec = _known_model(owner, name)
    return json_response(200, {"next": None, "previous": None, "results": [_version_json(spec)]})


def _get_version(owner: str, name: str, vid: str) -> Response:
    """GET /v1/models/{owner}/{name}/versions/{id}: run() calls it for version refs."""
    spec = _known_model(owner, name)
    if not _has_version(spec, vid):
        raise ApiError(404, NOT_FOUND)
    if spec.ref in SCHEMA_MODELS:
        return json_response(200, schema_version(spec.ref, vid))
    return json_response(200, _version_json(spec))


def _get_deployment(owner: str, name: str) -> Response:
    """GET /v1/deployments/{owner}/{name}."""
    release = deployment_release(owner, name)
    if release is None:
        raise ApiError(404, NOT_FOUND)
    return json_response(200, _deployment_json(owner, name, *release))


def _get_account() -> Response:
    """GET /v1/account."""
    return json_response(
        200, {"type": "user", "username": "sim", "name": "Sim", "github_url": None}
    )


def _get_webhook_secret() -> Response:
    """GET /v1/webhooks/default/secret (no webhooks are delivered)."""
    return json_response(200, {"key": _WEBHOOK_SECRET})
