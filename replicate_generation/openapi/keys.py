"""Issued keys, the audit log and usage: the bodies the admin sends to /keys (as
http/key_fields.py reads them) and what /keys, /audit and /usage answer."""

from __future__ import annotations

from replicate_generation.http.key_fields import (
    MAX_BUDGET_USD,
    MAX_GRACE_SECONDS,
    MAX_MODELS,
    MAX_WEIGHT,
)
from replicate_generation.jobs.keys import BUDGET_PERIODS
from replicate_generation.jobs.spend import GROUPS
from replicate_generation.openapi.common import Schema, answer, nullable, ref

# http/key_fields.py's _NAME and _MODEL_REF, as whole-string patterns.
KEY_NAME_PATTERN = r"^(?:[A-Za-z0-9][A-Za-z0-9 ._:@/-]{0,62}[A-Za-z0-9._-]|[A-Za-z0-9])$"
MODEL_REF_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._/:-]{0,199}$"
# RFC 3339 as the service reads it: Python's fromisoformat takes T and Z upper-case only.
TIME = {"type": "string", "format": "date-time", "pattern": "^[-+0-9T:.Z]+$"}
KEY_STATES = ["active", "expired", "revoked"]


def key_fields_schema(minting: bool) -> Schema:
    """POST /keys (a name is required) and PATCH /keys/{key_id} (any of the fields)."""
    props: Schema = {
        "name": {"type": "string", "pattern": KEY_NAME_PATTERN,
                 "description": "1-64 letters, digits or ' ._:@/-'; unique among live keys."},
        "budget_usd": nullable("number", minimum=0, maximum=MAX_BUDGET_USD,
                               description="What the key may spend per budget_period."),
        "budget_period": {"enum": [*BUDGET_PERIODS, None],
                          "description": "Defaults to month when a budget is set at minting."},
        "max_concurrent": nullable("integer", minimum=1, maximum=10_000),
        "weight": nullable("number", exclusiveMinimum=0, maximum=MAX_WEIGHT,
                           description="Its share against other keys' (default 1)."),
        "models": {"type": ["array", "null"], "minItems": 1, "maxItems": MAX_MODELS,
                   "items": {"type": "string", "pattern": MODEL_REF_PATTERN},
                   "description": "The models it may run (curated ids or owner/name); null: "
                                  "any."},
        # Shown back in UTC, whose calendar ends at 9999-12-31: a year before 9999.
        "expires_at": {**TIME, "type": ["string", "null"], "maxLength": 40,
                       "pattern": "^(?!9999)[-+0-9T:.Z]+$",
                       "description": "When it stops working: a time in the future, before "
                                      "the year 9999."},
        "allow_unknown_cost": {"type": "boolean",
                               "description": "May run models whose cost is unknown (no price "
                                              "or hardware known) despite a budget; they hold "
                                              "and settle nothing (default false)."}}
    return {"type": "object", "properties": props, "additionalProperties": False,
            **({"required": ["name"]} if minting else {})}


def rotate_schema() -> Schema:
    return {"type": "object", "additionalProperties": False, "properties": {
        "grace_seconds": {"type": "number", "minimum": 0, "maximum": MAX_GRACE_SECONDS,
                          "description": "How long the old secret keeps working (default 3600)."}}}


def key_request_schemas() -> dict[str, Schema]:
    return {"KeyMint": key_fields_schema(minting=True),
            "KeyChange": key_fields_schema(minting=False), "KeyRotate": rotate_schema()}


def key_response_schemas() -> dict[str, Schema]:
    """A key (its secret only in the answer that made it), the audit log and usage."""
    string, when = {"type": "string"}, nullable("string")
    key = answer({
        "id": string, "object": {"const": "key"}, "name": string, "prefix": string,
        "state": {"enum": KEY_STATES}, "budget_usd": nullable("number"),
        "budget_period": {"enum": [*BUDGET_PERIODS, None]},
        "max_concurrent": nullable("integer"), "weight": {"type": "number"},
        "models": {"type": ["array", "null"], "items": string}, "expires_at": when,
        "created_at": when, "updated_at": when, "rotated_at": when,
        "previous_key_valid_until": when, "revoked_at": when,
        "allow_unknown_cost": {"type": "boolean"},
        "key": {"type": "string", "description": "The secret: shown once, when made."},
        "spent_usd": {"type": "number"}, "remaining_usd": {"type": "number"}},
        ("key", "spent_usd", "remaining_usd"))
    record = answer({
        "id": {"type": "integer"}, "at": string, "actor": string, "action": string,
        "target": nullable("string"),
        "details": {"type": "object", "additionalProperties": True}})
    usage_row = answer({
        "key": nullable("string"), "model": nullable("string"), "day": nullable("string"),
        "predictions": {"type": "integer"}, "cost_usd": {"type": "number"},
        "billed_seconds": {"type": "number"}})
    return {
        "Key": key,
        "KeyList": {"type": "object", "required": ["object", "data"], "properties": {
            "object": {"const": "list"}, "data": {"type": "array", "items": ref("Key")}}},
        "AuditList": {"type": "object", "required": ["object", "data", "has_more"],
                      "properties": {"object": {"const": "list"},
                                     "data": {"type": "array", "items": record},
                                     "has_more": {"type": "boolean"}}},
        "Usage": answer({
            "object": {"const": "list"}, "group_by": {"type": "array", "items": string},
            "data": {"type": "array", "items": usage_row}, "total_cost_usd": {"type": "number"}}),
    }


def usage_params() -> list[Schema]:
    """GET /usage's query: how to group, the period [from, to), and JSON or CSV."""
    group = "|".join(GROUPS)
    moment = {"anyOf": [{"type": "string", "format": "date"}, TIME]}
    return [
        {"name": "group_by", "in": "query", "required": False,
         "description": f"One or more of {', '.join(GROUPS)}, comma-separated (default key).",
         "schema": {"type": "string", "pattern": rf"^ *({group}) *(, *({group}) *)*$"}},
        {"name": "from", "in": "query", "required": False, "schema": moment,
         "description": "A UTC date or an RFC 3339 time (default: this month's start)."},
        {"name": "to", "in": "query", "required": False, "schema": moment,
         "description": "After `from`; a date includes that whole day (default: now)."},
        {"name": "format", "in": "query", "required": False,
         "schema": {"enum": ["json", "csv"], "default": "json"}},
    ]


def audit_params() -> list[Schema]:
    return [{"name": "limit", "in": "query", "required": False,
             "schema": {"type": "integer", "minimum": 1, "maximum": 500, "default": 50}},
            {"name": "before", "in": "query", "required": False,
             "description": "A record id: the page of records older than it.",
             "schema": {"type": "integer", "minimum": 1, "maximum": 2**62}}]
