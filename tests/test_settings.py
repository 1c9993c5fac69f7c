"""Settings are read once from the environment; a bad value names its variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from replicate_generation.errors import SettingsError
from replicate_generation.settings import Settings


def test_defaults_match_the_seed() -> None:
    settings = Settings.from_env({})
    assert (settings.host, settings.port) == ("0.0.0.0", 5003)  # noqa: S104
    assert (settings.concurrent_limit, settings.requests_per_minute) == (60, 600)
    assert settings.replicate_base_url == "https://api.replicate.com"
    assert settings.replicate_api_token is None and settings.admin_api_key is None
    assert settings.output_dir == Path("output")


def test_every_variable_is_read() -> None:
    settings = Settings.from_env({
        "REPLICATE_API_TOKEN": "r8_tok", "CONCURRENT_DOCKER_ADMIN_API_KEY": "k",
        "FLASK_HOST": "127.0.0.1", "FLASK_PORT": "8080", "REPLICATE_CONCURRENT_LIMIT": "7",
        "REPLICATE_REQUESTS_PER_MINUTE": "70", "REPLICATE_CREATE_BURST": "2",
        "REPLICATE_POLLS_PER_MINUTE": "100", "REPLICATE_BASE_URL": "http://127.0.0.1:9/",
        "OUTPUT_DIR": "/o", "STATE_FILE": "/s.db", "LEASE_TTL_SECONDS": "4",
        "TASK_TIMEOUT_SECONDS": "9", "POLL_INTERVAL_SECONDS": "0.5", "MAX_BATCH_SIZE": "5",
        "MAX_REQUEST_BYTES": "4096", "DISPATCH_THREADS": "3", "MAX_QUEUED_TASKS": "10",
        "LOG_LEVEL": "debug"})
    assert settings == Settings(
        replicate_api_token="r8_tok", admin_api_key="k", host="127.0.0.1", port=8080,
        concurrent_limit=7, requests_per_minute=70, create_burst=2, polls_per_minute=100,
        replicate_base_url="http://127.0.0.1:9", output_dir=Path("/o"),
        state_file=Path("/s.db"), lease_ttl_seconds=4, task_timeout_seconds=9,
        poll_interval_seconds=0.5, max_batch_size=5, max_request_bytes=4096,
        dispatch_threads=3, max_queued_tasks=10, log_level="DEBUG")


def test_library_alias_sets_the_concurrent_limit() -> None:
    assert Settings.from_env({"REPLICATE_GLOBAL_MAX_CONCURRENT": "12"}).concurrent_limit == 12
    with pytest.raises(SettingsError, match="disagree"):
        Settings.from_env({"REPLICATE_GLOBAL_MAX_CONCURRENT": "12",
                           "REPLICATE_CONCURRENT_LIMIT": "13"})


@pytest.mark.parametrize(("name", "value"), [
    ("FLASK_PORT", "abc"), ("FLASK_PORT", "70000"), ("REPLICATE_CONCURRENT_LIMIT", "0"),
    ("REPLICATE_REQUESTS_PER_MINUTE", "-1"), ("REPLICATE_BASE_URL", "api.replicate.com"),
    ("REPLICATE_BASE_URL", "https://api.replicate.com/v1"), ("LEASE_TTL_SECONDS", "nan"),
    ("LOG_LEVEL", "loud"), ("MAX_BATCH_SIZE", "1.5"),
])
def test_bad_values_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=name):
        Settings.from_env({name: value})


def test_a_bad_secret_is_refused_without_echoing_it() -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"CONCURRENT_DOCKER_ADMIN_API_KEY": "secret value"})
    assert "secret value" not in str(info.value)
    assert "hidden-key" not in repr(Settings(admin_api_key="hidden-key", replicate_api_token="x"))


def test_shared_backends_are_read_as_written() -> None:
    settings = Settings.from_env({
        "REDIS_URL": "rediss://:s3cret-pw@redis.internal:6380/2",
        "DATABASE_URL": "postgresql://app:s3cret-pw@db.internal:5432/jobs",
        "REDIS_KEY_PREFIX": "prod-eu"})
    assert settings.redis_url == "rediss://:s3cret-pw@redis.internal:6380/2"
    assert settings.database_url == "postgresql://app:s3cret-pw@db.internal:5432/jobs"
    assert (settings.redis_key_prefix, settings.single_host) == ("prod-eu", False)
    assert "s3cret-pw" not in repr(settings)


@pytest.mark.parametrize(("env", "named"), [
    ({"REDIS_URL": "http://:s3cret-pw@redis:6379"}, "REDIS_URL"),
    ({"REDIS_URL": "redis://r", "DATABASE_URL": "mysql://u:s3cret-pw@db/x"}, "DATABASE_URL"),
    ({"DATABASE_URL": "postgresql://u:s3cret-pw@db/x"}, "SINGLE_HOST"),
    ({"REDIS_URL": "redis://r", "REDIS_KEY_PREFIX": "a b"}, "REDIS_KEY_PREFIX"),
    ({"DATABASE_URL": "postgresql://u:s3cret-pw@db/x", "SINGLE_HOST": "maybe"}, "SINGLE_HOST"),
])
def test_backend_settings_that_cannot_work_are_refused_without_echoing_a_password(
        env: dict[str, str], named: str) -> None:
    with pytest.raises(SettingsError) as refused:
        Settings.from_env(env)
    assert named in str(refused.value) and "s3cret-pw" not in str(refused.value)


def test_jobs_shared_with_limits_per_host_only_when_said_so() -> None:
    settings = Settings.from_env({"DATABASE_URL": "postgresql://u@db/x", "SINGLE_HOST": "true"})
    assert settings.single_host and settings.redis_url is None


def test_an_account_budget_is_read_only_when_set() -> None:
    assert Settings.from_env({}).account_budget_usd is None
    budget = Settings.from_env({"ACCOUNT_BUDGET_USD": "25", "ACCOUNT_BUDGET_PERIOD": "day"})
    assert (budget.account_budget_usd, budget.account_budget_period) == (25.0, "day")
    for bad in ({"ACCOUNT_BUDGET_USD": "-1"}, {"ACCOUNT_BUDGET_USD": "nan"},
                {"ACCOUNT_BUDGET_PERIOD": "week"}):
        with pytest.raises(SettingsError, match=next(iter(bad))):
            Settings.from_env(bad)
