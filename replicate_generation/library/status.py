"""The service's settings as a script reads them, and the account's live limits and use."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from replicate_generation.backends import limits_backend, open_limit_store
from replicate_generation.clients import account_key
from replicate_generation.errors import SettingsError
from replicate_generation.settings import Settings, read_environ


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """The service's settings, from `environ` or else os.environ plus the `.env` file found from
    the current directory upwards (the environment wins over the file, as in the service)."""
    return Settings.from_env(read_environ() if environ is None else environ)


def global_status(*, token: str | None = None,
                  settings: Settings | None = None) -> dict[str, Any]:
    """The account's limits and live use, as every process sharing STATE_FILE sees them."""
    settings = settings if settings is not None else load_settings()
    paying = token or settings.replicate_api_token
    if not paying:
        raise SettingsError("REPLICATE_API_TOKEN is not set: pass token=... or set it")
    account = account_key(paying)
    # An observer: it never declares, so reading the status changes no process's limits.
    store = open_limit_store(settings)
    sources = store.describe_limits()
    limit = {name: source.value for name, source in sources.items()}
    [stats] = store.stats(account)
    return {"account": account, "state_file": str(settings.state_file),
            "limits_backend": limits_backend(settings),
            "concurrent_limit": limit["max_concurrent"],
            "requests_per_minute": limit["requests_per_minute"], "burst": limit["burst"],
            "polls_per_minute": limit["polls_per_minute"], "in_flight": stats.in_flight,
            "waiting": stats.waiting, "creates_last_minute": stats.creates_last_minute,
            "backoff_remaining_seconds": round(stats.backoff_remaining, 3),
            "available_slots": max(0, limit["max_concurrent"] - stats.in_flight),
            "limit_sources": {public: sources[name].as_dict() for public, name in (
                ("concurrent_limit", "max_concurrent"),
                ("requests_per_minute", "requests_per_minute"), ("burst", "burst"),
                ("polls_per_minute", "polls_per_minute"))}}
