"""The admin's routes for issued keys (mint, list, read, change, rotate, revoke) and the audit log
that records them, with who did it (a key's name or "admin", never a secret)."""

from __future__ import annotations

import time
from typing import Any

from flask import Blueprint, Response, g, jsonify, request

from replicate_generation.http import context
from replicate_generation.http.auth import key_budget, require_key
from replicate_generation.http.errors import Answer, ApiError
from replicate_generation.http.inputs import int_arg, json_object
from replicate_generation.http.key_fields import grace_seconds, iso, key_body, key_fields
from replicate_generation.jobs.keys import IssuedKey, KeyNameTaken

keys_bp = Blueprint("keys", __name__)


def audit(action: str, target: str | None, details: dict[str, Any]) -> None:
    """Append who did what to the audit log."""
    context.runner().store.audit.append(g.caller.name, action, target, details, time.time())


@keys_bp.post("/keys")
@require_key("admin")
def mint_key() -> Answer:
    """A new key for an internal service: 201 with its secret, shown this once."""
    fields = key_fields(json_object(), minting=True)
    now = time.time()
    try:
        key, secret = context.runner().store.keys.mint(fields, now)
    except KeyNameTaken:
        raise ApiError(409, f"A live key is already named {fields['name']!r}",
                       field="name") from None
    audit("key.minted", key.id, _shown(fields))
    return jsonify(_body(key, now, secret)), 201, {"Location": f"/keys/{key.id}"}


@keys_bp.get("/keys")
@require_key("admin")
def list_keys() -> Response:
    """Every issued key, revoked ones included, oldest first (never their secrets)."""
    now = time.time()
    keys = context.runner().store.keys.list()
    return jsonify(object="list", data=[_body(key, now) for key in keys])


@keys_bp.get("/keys/<key_id>")
@require_key("admin")
def get_key(key_id: str) -> Response:
    return jsonify(_body(_existing(key_id), time.time()))


@keys_bp.patch("/keys/<key_id>")
@require_key("admin")
def change_key(key_id: str) -> Response:
    """Change a live key's name, budget, limits, models or expiry; its secret stays."""
    fields = key_fields(json_object(), minting=False)
    _existing(key_id)
    now = time.time()
    try:
        key = context.runner().store.keys.update(key_id, fields, now)
    except KeyNameTaken:
        raise ApiError(409, f"A live key is already named {fields['name']!r}",
                       field="name") from None
    if key is None:
        raise ApiError(409, "This key is revoked; mint a new one")
    audit("key.changed", key.id, _shown(fields))
    return jsonify(_body(key, now))


@keys_bp.post("/keys/<key_id>/rotate")
@require_key("admin")
def rotate_key(key_id: str) -> Response:
    """A new secret, shown this once; the old one keeps working for `grace_seconds`."""
    grace = grace_seconds(json_object() if request.content_length else {})
    _existing(key_id)
    now = time.time()
    rotated = context.runner().store.keys.rotate(key_id, grace, now)
    if rotated is None:
        raise ApiError(409, "This key is revoked; mint a new one")
    key, secret = rotated
    audit("key.rotated", key.id, {"grace_seconds": grace})
    return jsonify(_body(key, now, secret))


@keys_bp.delete("/keys/<key_id>")
@require_key("admin")
def revoke_key(key_id: str) -> Response:
    """Refused from the next request on, in every worker and replica; its jobs are kept."""
    existing = _existing(key_id)
    now = time.time()
    key = context.runner().store.keys.revoke(key_id, now)
    if key is not None:
        audit("key.revoked", key.id, {"name": key.name})
    return jsonify(_body(key or existing, now))


@keys_bp.get("/audit")
@require_key("admin")
def audit_log() -> Response:
    """Keys minted, changed, rotated and revoked, limit changes and admin cancels, newest
    first; `before` (a record id) pages back."""
    limit = int_arg("limit", 50, 1, 500)
    before = int_arg("before", 0, 1, 2**62) if "before" in request.args else None
    records = context.runner().store.audit.newest(limit + 1, before)
    page = records[:limit]
    for record in page:
        record["at"] = iso(record["at"])
    return jsonify(object="list", data=page, has_more=len(records) > limit)


def _body(key: IssuedKey, now: float, secret: str | None = None) -> dict[str, Any]:
    """The key's JSON with what it spent this period and has left, when it has a budget."""
    body = key_body(key, now, secret)
    budget = key_budget(key)
    if budget is not None:
        spent = context.runner().store.spend.used(budget, now)
        body["spent_usd"] = spent
        body["remaining_usd"] = round(max(0.0, budget.limit_usd - spent), 6)
    return body


def _existing(key_id: str) -> IssuedKey:
    key = context.runner().store.keys.get(key_id)
    if key is None:
        raise ApiError(404, "Key not found")
    return key


def _shown(fields: dict[str, Any]) -> dict[str, Any]:
    """The fields as the audit log keeps them (times readable)."""
    shown = dict(fields)
    if shown.get("expires_at") is not None:
        shown["expires_at"] = iso(shown["expires_at"])
    return shown
