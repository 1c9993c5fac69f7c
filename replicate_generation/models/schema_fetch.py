"""The one I/O of models/: a non-curated model's schema, fetched and cached, and the Resolver.

The schema is fetched with the caller's token, paced as a poll, and cached: each account's
answer for SCHEMA_TTL_SECONDS, the schemas themselves once per content, within a byte budget
(least recently used first out). Problems are InvalidRequest, SchemaUnavailable or TokenRejected.
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import NamedTuple, Protocol

import httpx
from replicate.exceptions import ReplicateError

from replicate_generation.clients import ClientPool, account_key
from replicate_generation.errors import (
    DeadlineExceeded,
    InvalidRequest,
    SchemaUnavailable,
    TokenRejected,
)
from replicate_generation.models.catalogue import MODELS, ModelSpec
from replicate_generation.models.schemas import (
    DEPLOYMENT_REF,
    VERSION_ID,
    InputSchema,
    ModelPolicy,
    check_input,
    parse_ref,
    schema_model,
)
from replicate_generation.models.validation import OTHER_MODELS

SCHEMA_TTL_SECONDS = 600.0
# How long a schema fetch may wait for the account's poll budget during an HTTP request.
FETCH_WAIT_SECONDS = 10.0
# The schemas kept, by their estimated size in memory (SCHEMA_CACHE_MAX_BYTES).
SCHEMA_CACHE_MAX_BYTES = 64 * 1024 * 1024
# Which schema each account saw, at most (each a few hundred bytes).
MAX_ACCOUNT_ENTRIES = 20_000
# A version's JSON larger than this is refused: real cog schemas are a few kB.
MAX_SCHEMA_BYTES = 8 * 1024 * 1024


class _Poller(Protocol):
    def wait_for_poll(self, account: str, deadline: float) -> None: ...


class Runtime(Protocol):
    """What a fetch needs of model_functions.Runtime (which sits above): clients, pace, clock."""

    @property
    def clients(self) -> ClientPool: ...

    @property
    def manager(self) -> _Poller: ...

    @property
    def clock(self) -> Callable[[], float]: ...


class _Seen(NamedTuple):
    expires: float
    digest: str


class _Kept(NamedTuple):
    schema: InputSchema
    size: int


class SchemaCache:
    """Which schema each (account, model, version) was served, for `ttl` seconds, and the
    schemas themselves once per content, within `max_bytes` (least recently used out first)."""

    def __init__(self, ttl: float = SCHEMA_TTL_SECONDS,
                 clock: Callable[[], float] = time.monotonic,
                 max_bytes: int = SCHEMA_CACHE_MAX_BYTES,
                 max_accounts: int = MAX_ACCOUNT_ENTRIES) -> None:
        self._ttl = ttl
        self._clock = clock
        self._max_bytes = max_bytes
        self._max_seen = max_accounts
        self._seen: OrderedDict[tuple[str, str, str | None], _Seen] = OrderedDict()
        self._kept: OrderedDict[str, _Kept] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, rt: Runtime, token: str, ref: str, version: str | None) -> InputSchema:
        key = (account_key(token), ref, version)
        with self._lock:
            found = self._lookup(key)
        if found is not None:
            return found
        schema = fetch_schema(rt, token, ref, version)
        with self._lock:
            return self._store(key, schema)

    def _lookup(self, key: tuple[str, str, str | None]) -> InputSchema | None:
        seen = self._seen.get(key)
        if seen is None or seen.expires <= self._clock():
            return None
        kept = self._kept.get(seen.digest)
        if kept is None:
            return None
        self._seen.move_to_end(key)
        self._kept.move_to_end(seen.digest)
        return kept.schema

    def _store(self, key: tuple[str, str, str | None], schema: InputSchema) -> InputSchema:
        """Keep the account's answer; the schema once (an equal one kept already is shared)."""
        digest, size = _measure(schema)
        kept = self._kept.get(digest)
        if kept is not None:
            schema = kept.schema
            self._kept.move_to_end(digest)
        elif size <= self._max_bytes:
            self._kept[digest] = _Kept(schema, size)
            self._bytes += size
            while self._bytes > self._max_bytes:
                self._bytes -= self._kept.popitem(last=False)[1].size
        self._seen.pop(key, None)
        self._seen[key] = _Seen(self._clock() + self._ttl, digest)
        while len(self._seen) > self._max_seen:
            self._seen.popitem(last=False)
        return schema

    def forget(self, token: str, ref: str, version: str | None) -> None:
        """Drop the entry (Replicate refused an input it passed: the schema may have changed)."""
        with self._lock:
            self._seen.pop((account_key(token), ref, version), None)

    def resize(self, max_bytes: int) -> None:
        """Keep at most `max_bytes` of schemas from now on (SCHEMA_CACHE_MAX_BYTES)."""
        with self._lock:
            self._max_bytes = max_bytes
            while self._bytes > self._max_bytes:
                self._bytes -= self._kept.popitem(last=False)[1].size

    def usage(self) -> dict[str, int]:
        """Schemas kept, their estimated bytes, the budget, and the accounts' entries."""
        with self._lock:
            return {"schemas": len(self._kept), "bytes": self._bytes,
                    "max_bytes": self._max_bytes, "account_entries": len(self._seen)}

    def clear(self) -> None:
        with self._lock:
            self._seen.clear()
            self._kept.clear()
            self._bytes = 0


def _measure(schema: InputSchema) -> tuple[str, int]:
    """A digest of the schema's content, and an estimate of its size in memory."""
    text = json.dumps([schema.version, schema.official, schema.model, schema.properties,
                       schema.required], sort_keys=True, default=repr).encode()
    return hashlib.sha256(text).hexdigest(), _footprint(schema.properties)


def _footprint(value: object) -> int:
    """sys.getsizeof over every container and value (iterative: schemas are depth-checked, but
    this must never be the one to recurse)."""
    total = 0
    stack = [value]
    while stack:
        item = stack.pop()
        total += sys.getsizeof(item)
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
    return total


CACHE = SchemaCache()


def fetch_schema(rt: Runtime, token: str, ref: str, version: str | None) -> InputSchema:
    """GET the model (or the pinned version) with the caller's token, paced as a poll; for a
    deployment, its current release's version."""
    if DEPLOYMENT_REF.match(ref):
        return _fetch_release(rt, token, ref)
    path = f"/v1/models/{ref}" + (f"/versions/{version}" if version else "")
    body = _get_json(rt, token, path, ref, version)
    found = body if version else (body.get("latest_version") if isinstance(body, dict) else None)
    if not isinstance(found, dict):
        raise SchemaUnavailable(502, f"{ref} has no version with a schema")
    try:
        schema = InputSchema.from_openapi(found.get("openapi_schema"),
                                          version or _version_id(found.get("id")))
    except SchemaUnavailable as exc:
        raise SchemaUnavailable(exc.status, f"the schema of {ref} cannot be used: {exc}") from None
    official = body.get("is_official") if isinstance(body, dict) and not version else None
    return replace(schema, official=official if isinstance(official, bool) else None)


def _fetch_release(rt: Runtime, token: str, ref: str) -> InputSchema:
    """A deployment's current release (GET /v1/deployments/...), then that version's schema."""
    body = _get_json(rt, token, f"/v1/{ref}", ref, None)
    release = body.get("current_release") if isinstance(body, dict) else None
    model = release.get("model") if isinstance(release, dict) else None
    version = _version_id(release.get("version")) if isinstance(release, dict) else None
    parsed = parse_ref(model) if isinstance(model, str) else None
    if parsed is None or parsed[1] is not None or version is None:
        raise SchemaUnavailable(502, f"{ref} has no current release with a model version")
    return replace(fetch_schema(rt, token, parsed[0], version), model=parsed[0])


def _get_json(rt: Runtime, token: str, path: str, ref: str, version: str | None) -> object:
    """One GET of Replicate's API with the caller's token, paced as a poll, its JSON bounded."""
    client = rt.clients.get(token)
    try:
        rt.manager.wait_for_poll(account_key(token), rt.clock() + FETCH_WAIT_SECONDS)
        response = client._request("GET", path)  # noqa: SLF001 - plain JSON, as served
        if len(response.content) > MAX_SCHEMA_BYTES:
            raise SchemaUnavailable(502, f"the schema of {ref} is larger than "
                                    f"{MAX_SCHEMA_BYTES // 1024**2} MiB; not used")
        return response.json()
    except DeadlineExceeded:
        raise SchemaUnavailable(503, "the account's request budget is used up; try again "
                                "shortly", retry_after=5.0) from None
    except ReplicateError as exc:
        raise _fetch_error(exc, rt, token, ref, version) from None
    except (httpx.HTTPError, ValueError, RecursionError) as exc:
        raise SchemaUnavailable(502, f"could not read the schema of {ref} from Replicate: "
                                f"{type(exc).__name__}") from None


def _version_id(value: object) -> str | None:
    """The record's latest version id, when it is one a create can name (64 hex)."""
    return value if isinstance(value, str) and VERSION_ID.fullmatch(value) else None


def _fetch_error(exc: ReplicateError, rt: Runtime, token: str, ref: str,
                 version: str | None) -> Exception:
    status = exc.status or 0
    if status == 404:
        what = f"{ref} version {version}" if version else ref
        kind = "Deployment" if DEPLOYMENT_REF.match(ref) else "Model"
        return InvalidRequest("model_name", f"{kind} '{what}' was not found on Replicate")
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
