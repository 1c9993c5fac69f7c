"""The one I/O of models/: a non-curated model's schema, fetched and cached, and the Resolver.

The schema is fetched with the caller's token, paced as a poll, and cached per account and
version for SCHEMA_TTL_SECONDS. Problems are InvalidRequest, SchemaUnavailable or TokenRejected.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

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
    found = body if version else (body.get("latest_version") if isinstance(body, dict) else None)
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
