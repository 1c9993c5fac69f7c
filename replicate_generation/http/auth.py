"""Who is calling: the admin key (checked in constant time) or a user's Replicate token (checked
with Replicate before anything is stored for it), the role a route needs, the token that pays for
the work, and which jobs the caller may see."""

from __future__ import annotations

import hmac
import math
import re
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import wraps
from typing import Any, TypeVar, cast

from flask import g, request

from replicate_generation.clients import account_key
from replicate_generation.errors import TokenUnverified
from replicate_generation.http import context
from replicate_generation.http.errors import ApiError
from replicate_generation.jobs.rows import JobRow
from replicate_generation.models.schema_fetch import Resolver, resolving
from replicate_generation.settings import Settings

AUTH_MESSAGE = ("No valid API key provided. Either provide X-Admin-API-Key or "
                "X-Replicate-API-Key header")
TOKEN_SHAPE = re.compile(r"^[\x21-\x7e]{8,256}$")
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Caller:
    """Who is calling and whose Replicate account pays."""

    admin: bool
    token: str | None

    @property
    def account(self) -> str | None:
        return account_key(self.token) if self.token else None


def same_secret(given: str, expected: str | None) -> bool:
    """Constant-time; an unset expected value matches nothing."""
    if not expected:
        return False
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), expected.encode("utf-8"))


def token_shaped(token: str) -> bool:
    """Printable ASCII of a plausible length: worth trying as a user's Replicate token."""
    return bool(TOKEN_SHAPE.match(token))


def has_key() -> bool:
    return "X-Admin-API-Key" in request.headers or "X-Replicate-API-Key" in request.headers


def resolve_caller(settings: Settings) -> Caller:
    """Admin key (constant-time) spends the server token; a user key spends the caller's own."""
    admin_key = request.headers.get("X-Admin-API-Key")
    if admin_key is not None:
        if not same_secret(admin_key, settings.admin_api_key):
            raise ApiError(401, AUTH_MESSAGE)
        return Caller(admin=True, token=settings.replicate_api_token)
    user_token = request.headers.get("X-Replicate-API-Key")
    if user_token is not None and token_shaped(user_token):
        verify_user_token(user_token)
        return Caller(admin=False, token=user_token)
    raise ApiError(401, AUTH_MESSAGE)


def verify_user_token(token: str) -> None:
    """Replicate accepts this token (asked once per period, the verdict shared by every process);
    else 401 (TokenRejected) or 503 when Replicate could not be asked: nothing is stored."""
    try:
        context.runner().token_checks.check(token)
    except TokenUnverified as exc:
        raise ApiError(503, str(exc), headers={"Retry-After": str(math.ceil(exc.retry_after))},
                       error_type="token_unverified") from None


def require_key(role: str = "any") -> Callable[[F], F]:
    """Guard a view: 401 without a valid key, 403 for a user key on an admin route."""

    def decorate(view: F) -> F:
        @wraps(view)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            caller = resolve_caller(context.settings())
            if role == "admin" and not caller.admin:
                raise ApiError(403, "This route needs the admin key (X-Admin-API-Key)")
            g.caller = caller
            if caller.token is not None and not caller.admin:
                # A user's orphaned jobs can resume once their token is known again.
                context.runner().accounts.remember(caller.token)
            return view(*args, **kwargs)

        return cast(F, guarded)

    return decorate


def paying_token(caller: Caller) -> str:
    """The token the caller's work is paid with: theirs, or the server's for the admin key."""
    if caller.token is None:
        raise ApiError(503, "Admin API key accepted, but the server has no REPLICATE_API_TOKEN "
                       "configured; call with X-Replicate-API-Key instead",
                       headers={"Retry-After": "60"})
    return caller.token


def account_of(caller: Caller) -> str:
    if caller.account is None:
        raise ApiError(503, "The server has no REPLICATE_API_TOKEN configured",
                       headers={"Retry-After": "60"})
    return caller.account


def other_models() -> AbstractContextManager[None]:
    """Let this request's parsing resolve non-curated models, fetched with its paying token."""
    resolver = Resolver(policy=context.model_policy(), rt=context.generator().runtime,
                        token=lambda: paying_token(g.caller))
    return resolving(resolver)


def owned_job(job_id: str) -> JobRow:
    """The caller's job (any job for the admin key), else a 404."""
    job = context.runner().store.get(job_id)
    if job is None or not may_see(job):
        # Someone else's job looks exactly like a job that does not exist.
        raise ApiError(404, "Job not found")
    return job


def may_see(job: JobRow) -> bool:
    caller: Caller = g.caller
    return caller.admin or (caller.account is not None and hmac.compare_digest(
        caller.account, job.account))
