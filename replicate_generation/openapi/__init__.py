"""OpenAPI 3.1 for the service, built from the catalogue and the route table, so it cannot drift.

`bodies` describes what requests send (oneOf per model, discriminated by `model_name`),
`responses` what the service answers, `operations` every route.
"""

from __future__ import annotations

from flask import Flask

from replicate_generation.openapi.bodies import request_schemas
from replicate_generation.openapi.common import Schema
from replicate_generation.openapi.keys import key_request_schemas, key_response_schemas
from replicate_generation.openapi.operations import DOCS_ASSETS, paths
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
    return {
        "openapi": "3.1.0",
        "info": {"title": "Replicate Concurrent Generation API", "version": version,
                 "description": "Generate images, videos and audio with Replicate models "
                                "within each account's limits. Every error answers "
                                "`{\"error\": ..., \"request_id\": ...}`."},
        "paths": paths(app, settings),
        "components": components(settings),
    }
