"""OpenAPI 3.1 for the service, built from the catalogue and the route table, so it cannot drift.

`bodies` describes what requests send (oneOf per model, discriminated by `model_name`),
`responses` what the service answers, `operations` every route.
"""

from __future__ import annotations

from typing import Any

from flask import Flask

from replicate_generation.openapi.bodies import request_schemas
from replicate_generation.openapi.common import SCHEMAS, Schema, identifier
from replicate_generation.openapi.keys import key_request_schemas, key_response_schemas
from replicate_generation.openapi.operations import DOCS_ASSETS, TAGS, paths
from replicate_generation.openapi.responses import response_schemas
from replicate_generation.settings import Settings

__all__ = ["DOCS_ASSETS", "build_spec"]


def components(settings: Settings) -> Schema:
    schemas = {**request_schemas(settings), **key_request_schemas(), **response_schemas(),
               **key_response_schemas()}
    return {"schemas": schemas, "securitySchemes": {
        "AdminKey": {"type": "apiKey", "in": "header", "name": "X-Admin-API-Key",
                     "description": "Internal services; the server's Replicate token pays."},
        "ReplicateKey": {"type": "apiKey", "in": "header", "name": "X-Replicate-API-Key",
                         "description": "Your own Replicate token pays, for this request only."},
        "IssuedKey": {"type": "apiKey", "in": "header", "name": "X-API-Key",
                      "description": "A key the admin issued (rgk_...): the server's token "
                                     "pays, within the key's budget, models and limits."},
        "IssuedBearer": {"type": "http", "scheme": "bearer",
                         "description": "The same issued key as `Authorization: Bearer "
                                        "rgk_...`."},
        "MetricsToken": {"type": "http", "scheme": "bearer",
                         "description": "METRICS_TOKEN, when METRICS_ACCESS=token."}}}


def build_spec(app: Flask, settings: Settings, version: str) -> Schema:
    """The whole OpenAPI 3.1 document for this app and its settings."""
    described = paths(app, settings)
    used = {tag for operations in described.values() for op in operations.values()
            for tag in op["tags"]}
    return _plain_names({
        "openapi": "3.1.0",
        "info": {"title": "Replicate Concurrent Generation API", "version": version,
                 "description": "Generate images, videos and audio with Replicate models "
                                "within each account's limits. Every error answers "
                                "`{\"error\": ..., \"request_id\": ...}`."},
        "tags": [{"name": name, "description": text} for name, text in TAGS.items()
                 if name in used],
        "paths": described,
        "components": components(settings),
    })


def _plain_names(spec: Schema) -> Schema:
    """Every component schema under its identifier() name, and every reference to it."""
    schemas = spec["components"]["schemas"]
    names = {name: identifier(name) for name in schemas}
    if len(set(names.values())) != len(names):
        raise ValueError("two component schemas share one identifier")
    spec["components"]["schemas"] = {names[name]: schema for name, schema in schemas.items()}
    return dict(_renamed(spec, names))


def _renamed(node: Any, names: dict[str, str]) -> Any:
    if isinstance(node, list):
        return [_renamed(value, names) for value in node]
    if not isinstance(node, dict):
        return node
    out = {key: _renamed(value, names) for key, value in node.items()}
    if isinstance(node.get("$ref"), str) and node["$ref"].startswith(SCHEMAS):
        out["$ref"] = SCHEMAS + names[node["$ref"].removeprefix(SCHEMAS)]
    mapping = node.get("mapping")
    if "propertyName" in node and isinstance(mapping, dict):
        out["mapping"] = {key: SCHEMAS + names[target.removeprefix(SCHEMAS)]
                          for key, target in mapping.items()}
    return out
