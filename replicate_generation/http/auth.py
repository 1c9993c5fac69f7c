"""Who is calling: the admin key (checked in constant time), a key the admin issued (looked up by
its hash on every request, so a revoke holds at once), or a user's Replicate token (checked with
Replicate before anything is stored for it); the role a route needs, the token that pays for the
work, and which jobs the caller may see."""

from __future__ import annotations

import hmac
import math
import re
import time
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
from replicate_generation.jobs.keys import IssuedKey, looks_issued
from replicate_generation.jobs.rows import JobRow
from replicate_generation.jobs.spend import Budget
from replicate_generation.models.schema_fetch import Resolver, resolving
from replicate_generation.settings import Settings

AUTH_MESSAGE = ("No valid API key provided. Either provide X-Admin-API-Key or "
                "X-Replicate-API-Key header")
TOKEN_SHAPE = re.compile(r"^[\x21-\x7e]{8,256}$")
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Caller:
    """Who is calling and whose Replicate account pays (the server's for an issued key)."""

    admin: bool
    token: str | None
    key: IssuedKey | None = None

    @property
    def account(self) -> str | None:
        return account_key(self.token) if self.token else None

    @property
    def name(self) -> str:
        """Who this is in the audit log and the ledger: never a secret."""
        if self.admin:
            return "admin"
        if self.key is not None:
            return self.key.name
        return f"token:{self.account[:12]}" if self.account else "token"


def same_secret(given: str, expected: str | None) -> bool:
    """Constant-time; an unset expected value matches nothing."""
    if not expected:
        return False
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), expected.encode("utf-8"))


def token_shaped(token: str) -> bool:
    """Printable ASCII of a plausible length: worth trying as a user's Replicate token."""
    return bool(TOKEN_SHAPE.match(token))


def has_key() -> bool:
    return any(name in request.headers for name in (
        "X-Admin-API-Key", "X-Replicate-API-Key", "X-API-Key")) or _bearer_key() is not None


def _bearer_key() -> str | None:
    """An issued key sent as `Authorization: Bearer rgk_...` (other schemes are not ours)."""
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    value = value.strip()
    return value if scheme.lower() == "bearer" and looks_issued(value) else None


def resolve_caller(settings: Settings) -> Caller:
    """Admin key (constant-time) spends the server token; a user key spends the caller's own."""
    admin_key = request.headers.get("X-Admin-API-Key")
    if admin_key is not None:
        if not same_secret(admin_key, settings.admin_api_key):
            raise ApiError(401, AUTH_MESSAGE)
        return Caller(admin=True, token=settings.replicate_api_token)
    issued = request.headers.get("X-API-Key", _bearer_key())
    if issued is not None:
        return Caller(admin=False, token=settings.replicate_api_token, key=_issued_key(issued))
    user_token = request.headers.get("X-Replicate-API-Key")
    if user_token is not None and token_shaped(user_token):
        verify_user_token(user_token)
        return Caller(admin=False, token=user_token)
    raise ApiError(401, AUTH_MESSAGE)


def _issued_key(secret: str) -> IssuedKey:
    """The live issued key this secret opens, else 401 (revoked, expired, rotated out, unknown)."""
    key = None
    if token_shaped(secret) and looks_issued(secret):
        key = context.runner().store.keys.authenticate(secret, time.time())
    if key is None:
        raise ApiError(401, "This API key is not valid (unknown, revoked, expired or rotated "
                       "out)")
    return key


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
            if caller.token is not None and not caller.admin and caller.key is None:
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


def key_budget(key: IssuedKey) -> Budget | None:
    """The issued key's own budget, if it has one."""
    if key.budget_usd is None:
        return None
    return Budget(key.budget_usd, key.budget_period or "month", key_id=key.id,
                  allow_unknown_cost=key.allow_unknown_cost)


def budgets_of(caller: Caller, settings: Settings) -> tuple[Budget, ...]:
    """What the caller's request must fit: its key's budget, and ACCOUNT_BUDGET_USD when it
    spends the server's account (the admin key and issued keys; users pay for themselves)."""
    budgets = []
    own = key_budget(caller.key) if caller.key is not None else None
    if own is not None:
        budgets.append(own)
    server = (caller.admin or caller.key is not None) and caller.account is not None
    if server and settings.account_budget_usd is not None:
        # Unknown cost only for a key allowed it: the admin key has no such permission.
        unknown = caller.key is not None and caller.key.allow_unknown_cost
        budgets.append(Budget(settings.account_budget_usd, settings.account_budget_period,
                              account=caller.account, allow_unknown_cost=unknown))
    return tuple(budgets)


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
    """The admin sees every job, an issued key its own, a user token its account's."""
    caller: Caller = g.caller
    if caller.admin:
        return True
    if caller.key is not None:
        return job.key_id == caller.key.id
    return caller.account is not None and hmac.compare_digest(caller.account, job.account)
