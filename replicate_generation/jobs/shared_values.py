"""Long input strings shared by a job's items (a data URI sent to 1,000 items): stored once per
job in `job_values` and referenced by digest from each item's spec."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

from sqlalchemy import Connection, Row, select

from replicate_generation.jobs.schema import job_values

# Input strings at least this long are stored once per job and referenced from each item's spec.
SHARED_VALUE_MIN_CHARS = 1024
_SHARED_REF = "$shared"


def pack_specs(specs: Iterable[dict[str, Any]]) -> tuple[list[str], dict[str, str]]:
    """Each spec as JSON text with long input strings replaced by references, and the values
    those references name (by digest), each once; the specs are read once, as they come."""
    digests: dict[int, str] = {}  # by id(): 1,000 items sharing one string hash it once
    values: dict[str, str] = {}
    return [json.dumps(_pack(spec, digests, values)) for spec in specs], values


def _pack(spec: dict[str, Any], digests: dict[int, str], values: dict[str, str]) -> dict[str, Any]:
    model_input = spec.get("input")
    if not isinstance(model_input, dict):
        return spec
    packed = {name: _pack_value(value, digests, values) for name, value in model_input.items()}
    return {**spec, "input": packed}


def _pack_value(value: Any, digests: dict[int, str], values: dict[str, str]) -> Any:
    if isinstance(value, list):
        return [_pack_value(v, digests, values) for v in value]
    if not isinstance(value, str) or len(value) < SHARED_VALUE_MIN_CHARS:
        return value
    digest = digests.get(id(value))
    if digest is None:
        digest = hashlib.sha256(value.encode()).hexdigest()
        digests[id(value)] = digest
    values.setdefault(digest, value)
    # Validated inputs hold no objects, so a one-key object is unambiguously a reference.
    return {_SHARED_REF: digest}


def unpack(spec: Any, values: dict[str, str]) -> Any:
    """The spec with its references replaced by their values (specs of old rows have none)."""
    if not isinstance(spec, dict) or not isinstance(spec.get("input"), dict):
        return spec
    spec["input"] = {name: _unpack_value(v, values) for name, v in spec["input"].items()}
    return spec


def _unpack_value(value: Any, values: dict[str, str]) -> Any:
    if isinstance(value, list):
        return [_unpack_value(v, values) for v in value]
    if isinstance(value, dict) and set(value) == {_SHARED_REF}:
        return values[value[_SHARED_REF]]
    return value


def _references(value: Any) -> set[str]:
    if isinstance(value, list):
        return set().union(*(_references(v) for v in value)) if value else set()
    if isinstance(value, dict):
        if set(value) == {_SHARED_REF}:
            return {str(value[_SHARED_REF])}
        return set().union(*(_references(v) for v in value.values())) if value else set()
    return set()


def values_of(conn: Connection, job_id: str, row: Row[Any]) -> dict[str, str]:
    """Only the shared values one item's spec refers to."""
    wanted = sorted(_references(json.loads(row.spec)))
    if not wanted:
        return {}
    rows = conn.execute(select(job_values.c.digest, job_values.c.value).where(
        job_values.c.job_id == job_id, job_values.c.digest.in_(wanted)))
    return {str(r.digest): str(r.value) for r in rows}


def all_values(conn: Connection, job_id: str) -> dict[str, str]:
    """Every shared value of the job: one copy for all its items, however many there are."""
    return {str(r.digest): str(r.value) for r in conn.execute(
        select(job_values.c.digest, job_values.c.value).where(job_values.c.job_id == job_id))}
