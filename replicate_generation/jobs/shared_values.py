"""What a job's items share, stored once per job in `job_values` and referenced by digest from
each item's spec: long input strings (a data URI sent to 1,000 items), and the first item's spec
as a template the others store only their differences from (a prompt, a seed, a name)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

from sqlalchemy import Connection, Row, select

from replicate_generation.jobs.schema import job_items, job_values

# Input strings at least this long are stored once per job and referenced from each item's spec.
SHARED_VALUE_MIN_CHARS = 1024
_SHARED_REF = "$shared"


# A spec stored as its differences from the job's template (the first item's spec), which is
# kept under this name among the job's values (no digest: one per job, and short to refer to).
_TEMPLATE = "$template"
_TEMPLATE_NAME = "template"
_CHANGED, _INPUT_CHANGED = "$set", "$input"
_REMOVED, _INPUT_REMOVED = "$unset", "$input_unset"


def pack_specs(specs: Iterable[dict[str, Any]]) -> tuple[list[str], dict[str, str]]:
    """Each spec as JSON text with long input strings replaced by references, and the values
    those references name (by digest), each once; the specs are read once, as they come.
    From a job's second item on, each spec is stored as its differences from the first's."""
    digests: dict[int, str] = {}  # by id(): 1,000 items sharing one string hash it once
    values: dict[str, str] = {}
    texts: list[str] = []
    first: dict[str, Any] | None = None
    for spec in specs:
        packed = _pack(spec, digests, values)
        if first is None:  # stored whole, unless a second item makes it the template
            first = packed
            texts.append(_text(packed))
            continue
        if _TEMPLATE_NAME not in values:
            values[_TEMPLATE_NAME], texts[0] = texts[0], _text({_TEMPLATE: 1})
        texts.append(_text(_difference(packed, first)))
    return texts, values


def _text(spec: dict[str, Any]) -> str:
    return json.dumps(spec, separators=(",", ":"))


def _difference(spec: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    spec_input, base_input = spec.get("input"), base.get("input")
    inputs = (spec_input, base_input) if isinstance(spec_input, dict) and isinstance(
        base_input, dict) else None
    changed = {k: v for k, v in spec.items()
               if not (k == "input" and inputs) and (k not in base or base[k] != v)}
    removed = [k for k in base if k not in spec]
    found: dict[str, Any] = {_TEMPLATE: 1}
    for key, part in ((_CHANGED, changed), (_REMOVED, removed)):
        if part:
            found[key] = part
    if inputs:
        found.update(_input_difference(*inputs))
    return found


def _input_difference(spec_input: dict[str, Any], base_input: dict[str, Any]) -> dict[str, Any]:
    changed = {k: v for k, v in spec_input.items() if k not in base_input or base_input[k] != v}
    removed = [k for k in base_input if k not in spec_input]
    found: dict[str, Any] = {}
    if changed:
        found[_INPUT_CHANGED] = changed
    if removed:
        found[_INPUT_REMOVED] = removed
    return found


def _from_template(spec: dict[str, Any], values: dict[str, str]) -> dict[str, Any]:
    """The whole spec a difference from its job's template stands for."""
    whole: dict[str, Any] = json.loads(values[_TEMPLATE_NAME])
    for key in spec.get(_REMOVED, ()):
        whole.pop(key, None)
    whole.update(spec.get(_CHANGED, {}))
    if isinstance(whole.get("input"), dict):
        model_input = whole["input"]
        for key in spec.get(_INPUT_REMOVED, ()):
            model_input.pop(key, None)
        model_input.update(spec.get(_INPUT_CHANGED, {}))
    return whole


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
    """The spec with its template and references replaced by their values (specs of old rows
    have none)."""
    if isinstance(spec, dict) and _TEMPLATE in spec:
        spec = _from_template(spec, values)
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


# The job's template beside an item's row: read in the item's own statement, not one more.
ITEM_TEMPLATE = select(job_values.c.value).where(
    job_values.c.job_id == job_items.c.job_id,
    job_values.c.digest == _TEMPLATE_NAME).scalar_subquery().label(_TEMPLATE_NAME)


def values_of(conn: Connection, job_id: str, row: Row[Any]) -> dict[str, str]:
    """Only the shared values one item's spec refers to (its template's, too, which the row
    carries when selected with ITEM_TEMPLATE)."""
    spec = json.loads(row.spec)
    templated = isinstance(spec, dict) and _TEMPLATE in spec
    if templated and _TEMPLATE_NAME in row._fields:
        found = {_TEMPLATE_NAME: str(row._mapping[_TEMPLATE_NAME])}
    else:
        found = _values(conn, job_id, [_TEMPLATE_NAME] if templated else [])
    references = _references(spec)
    if templated and _SHARED_REF in found[_TEMPLATE_NAME]:  # parsed only if it refers on
        references |= _references(json.loads(found[_TEMPLATE_NAME]))
    wanted = sorted(references - set(found))
    return {**found, **_values(conn, job_id, wanted)} if wanted else found


def _values(conn: Connection, job_id: str, digests: list[str]) -> dict[str, str]:
    if not digests:
        return {}
    rows = conn.execute(select(job_values.c.digest, job_values.c.value).where(
        job_values.c.job_id == job_id, job_values.c.digest.in_(digests)))
    return {str(r.digest): str(r.value) for r in rows}


def all_values(conn: Connection, job_id: str) -> dict[str, str]:
    """Every shared value of the job: one copy for all its items, however many there are."""
    return {str(r.digest): str(r.value) for r in conn.execute(
        select(job_values.c.digest, job_values.c.value).where(job_values.c.job_id == job_id))}
