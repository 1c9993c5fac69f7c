"""Service settings: the environment (and `.env`) read once into values, parsed and checked.

`read_environ` is the one `.env` loader; `Env` is the one typed reader, gunicorn_conf's too.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, TypedDict, TypeVar

from dotenv import dotenv_values, find_dotenv, load_dotenv

from replicate_generation.egress.addresses import parse_networks
from replicate_generation.errors import SettingsError
from replicate_generation.models.chains import FallbackChains
from replicate_generation.models.hardware import ModelHardware
from replicate_generation.models.schemas import ModelPolicy

DEFAULT_BASE_URL = "https://api.replicate.com"

_T = TypeVar("_T")
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Settings:
    """Everything the service is configured with. Nothing reads os.environ after this."""

    replicate_api_token: str | None = field(default=None, repr=False)
    admin_api_key: str | None = field(default=None, repr=False)
    host: str = "0.0.0.0"  # noqa: S104 - a container must listen on every interface
    port: int = 5003
    concurrent_limit: int = 60
    requests_per_minute: int = 600
    create_burst: int = 10
    polls_per_minute: int = 2400
    replicate_base_url: str = DEFAULT_BASE_URL
    output_dir: Path = Path("output")
    state_file: Path = Path("data/state.sqlite3")
    # Outputs in an S3-compatible bucket (s3://bucket/prefix; output_dir is then the spool), how
    # /files and results hand them out ("stream" through us, or "signed" bucket URLs), and for how
    # long a signed URL works; the endpoint and region as AWS's tools read them.
    output_storage: str | None = None
    output_serving: str = "stream"
    output_url_expiry_seconds: int = 3600
    aws_endpoint_url: str | None = None
    aws_region: str | None = None
    lease_ttl_seconds: float = 30.0
    task_timeout_seconds: float = 300.0
    poll_interval_seconds: float = 5.0
    sync_wait_seconds: int = 10
    max_batch_size: int = 1000
    max_request_bytes: int = 16 * 1024 * 1024
    # The items' inputs as sent, summed: a shared 16 MiB image must not fan out 1,000 times.
    max_expanded_request_bytes: int = 256 * 1024 * 1024
    dispatch_threads: int = 128
    max_queued_tasks: int = 10000
    max_queued_per_account: int = 2000
    # What one user's account may keep in the job store (the admin key's account is the operator's).
    max_jobs_per_account: int = 10_000
    max_job_bytes_per_account: int = 1024**3
    # Non-curated models' schemas kept in memory per process (estimated bytes; LRU).
    schema_cache_max_bytes: int = 64 * 1024 * 1024
    # A budget on the server's account (admin key and issued keys together); None: none.
    account_budget_usd: float | None = None
    account_budget_period: str = "month"
    log_level: str = "INFO"
    job_retention_seconds: float = 7 * 86400.0
    shutdown_grace_seconds: float = 20.0
    # How long Replicate's word on a user's token (GET /v1/account) is kept in the shared store.
    token_verified_seconds: float = 300.0
    token_refused_seconds: float = 60.0
    webhook_signing_key: str | None = field(default=None, repr=False)
    webhook_max_attempts: int = 8
    webhook_retry_base_seconds: float = 5.0
    webhook_timeout_seconds: float = 10.0
    # Every fetch that is not Replicate's API (outputs, webhooks): the egress policy and bounds.
    egress_allow_private: tuple[IPNetwork, ...] = ()
    egress_max_redirects: int = 5
    egress_min_bytes_per_second: int = 32 * 1024
    egress_stall_seconds: float = 10.0
    egress_download_seconds: float = 120.0
    egress_max_decompression_ratio: float = 100.0
    output_max_file_bytes: int = 512 * 1024**2
    output_max_files_per_prediction: int = 100
    output_max_bytes_per_prediction: int = 1024**3
    output_max_files_per_job: int = 10_000
    output_max_bytes_per_job: int = 32 * 1024**3
    fallback_chains: FallbackChains = field(default_factory=FallbackChains.default)
    log_format: str = "text"
    metrics_access: str = "admin"
    metrics_token: str | None = field(default=None, repr=False)
    model_policy: ModelPolicy = ModelPolicy()  # MODEL_POLICY: curated | allow:<list> | any
    # MODEL_HARDWARE: which hardware non-curated models run on, so their cost is known.
    model_hardware: ModelHardware = ModelHardware()
    # Shared backends for several hosts; both unset = SQLite in state_file, as on one host.
    redis_url: str | None = field(default=None, repr=False)
    redis_key_prefix: str = "rg"
    # REDIS_URL names one node of a Redis Cluster: the client follows the cluster's slots.
    redis_cluster: bool = False
    database_url: str | None = field(default=None, repr=False)
    # DATABASE_URL without REDIS_URL keeps limits per host: allowed only when said so.
    single_host: bool = False
    # Event streams (GET /events): a comment line this often keeps proxies from closing one;
    # each holds a gunicorn thread, so a process serves this many at most (from the environment:
    # half of GUNICORN_THREADS), a caller fewer; each ends after max seconds (clients resume).
    event_heartbeat_seconds: float = 15.0
    event_streams_per_process: int = 8
    event_streams_per_caller: int = 4
    event_stream_max_seconds: float = 300.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        """Parse settings from an environment mapping; raise SettingsError naming the variable."""
        env = Env(environ)
        # Read in this order, so a bad environment is reported by the same variable first.
        concurrent_limit = _concurrent_limit(env)
        return cls(
            **_server(env),
            concurrent_limit=concurrent_limit,
            **_replicate(env),
            **_storage(env),
            **_timing(env),
            **_capacity(env),
            log_level=env.choice("LOG_LEVEL", cls.log_level, ("DEBUG", "INFO", "WARNING", "ERROR")),
            **_lifetimes(env),
            **_webhooks(env),
            **_egress(env),
            fallback_chains=_fallback_chains(env),
            **_observability(env),
            model_policy=_model_policy(env),
            model_hardware=_model_hardware(env),
            **_backends(env)._asdict(),
            **_event_streams(env),
        )


def _concurrent_limit(env: Env) -> int:
    """REPLICATE_CONCURRENT_LIMIT, or its alias REPLICATE_GLOBAL_MAX_CONCURRENT (never both)."""
    concurrent = env.integer("REPLICATE_CONCURRENT_LIMIT", None, 1, 10000)
    alias = env.integer("REPLICATE_GLOBAL_MAX_CONCURRENT", None, 1, 10000)
    if concurrent is not None and alias is not None and concurrent != alias:
        raise SettingsError(
            "REPLICATE_CONCURRENT_LIMIT and its alias REPLICATE_GLOBAL_MAX_CONCURRENT disagree "
            f"({concurrent} vs {alias}); set only one"
        )
    return concurrent or alias or Settings.concurrent_limit


class _Server(TypedDict):
    replicate_api_token: str | None
    admin_api_key: str | None
    host: str
    port: int


def _server(env: Env) -> _Server:
    """Who pays, who administers, and where the service listens."""
    return _Server(
        replicate_api_token=env.secret("REPLICATE_API_TOKEN"),
        admin_api_key=env.secret("CONCURRENT_DOCKER_ADMIN_API_KEY"),
        host=env.text("FLASK_HOST", Settings.host),
        port=env.required_int("FLASK_PORT", Settings.port, 1, 65535),
    )


class _Replicate(TypedDict):
    requests_per_minute: int
    create_burst: int
    polls_per_minute: int
    replicate_base_url: str


def _replicate(env: Env) -> _Replicate:
    """The account's pace of creates and polls, and where Replicate's API is."""
    return _Replicate(
        requests_per_minute=env.required_int(
            "REPLICATE_REQUESTS_PER_MINUTE", Settings.requests_per_minute, 1, 100000),
        create_burst=env.required_int("REPLICATE_CREATE_BURST", Settings.create_burst, 1, 1000),
        polls_per_minute=env.required_int(
            "REPLICATE_POLLS_PER_MINUTE", Settings.polls_per_minute, 1, 100000),
        replicate_base_url=env.base_url("REPLICATE_BASE_URL"),
    )


class _Storage(TypedDict):
    output_dir: Path
    state_file: Path
    output_storage: str | None
    output_serving: str
    output_url_expiry_seconds: int
    aws_endpoint_url: str | None
    aws_region: str | None


def _storage(env: Env) -> _Storage:
    """Where outputs and the state file go."""
    storage = env.text("OUTPUT_STORAGE", "").strip() or None
    if storage is not None and not re.match(r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/|$)",
                                            storage):
        raise SettingsError(f"OUTPUT_STORAGE must look like s3://bucket/prefix, got {storage!r}")
    serving = env.text("OUTPUT_SERVING", Settings.output_serving).strip().lower()
    if serving not in ("stream", "signed"):
        raise SettingsError(f"OUTPUT_SERVING must be stream or signed, got {serving!r}")
    return _Storage(output_dir=Path(env.text("OUTPUT_DIR", str(Settings.output_dir))),
                    state_file=Path(env.text("STATE_FILE", str(Settings.state_file))),
                    output_storage=storage, output_serving=serving,
                    # A SigV4 signed URL lives at most 7 days.
                    output_url_expiry_seconds=env.required_int(
                        "OUTPUT_URL_EXPIRY_SECONDS", Settings.output_url_expiry_seconds, 1,
                        7 * 86400),
                    aws_endpoint_url=env.text("AWS_ENDPOINT_URL", "").strip() or None,
                    aws_region=(env.text("AWS_REGION", "") or env.text("AWS_DEFAULT_REGION", "")
                                ).strip() or None)


class _Timing(TypedDict):
    lease_ttl_seconds: float
    task_timeout_seconds: float
    poll_interval_seconds: float
    sync_wait_seconds: int


def _timing(env: Env) -> _Timing:
    """How long a prediction's slot lives unrenewed, it may run, and a request waits for it."""
    return _Timing(
        lease_ttl_seconds=env.number("LEASE_TTL_SECONDS", Settings.lease_ttl_seconds, 0.5, 3600),
        task_timeout_seconds=env.number(
            "TASK_TIMEOUT_SECONDS", Settings.task_timeout_seconds, 1, 86400),
        poll_interval_seconds=env.number(
            "POLL_INTERVAL_SECONDS", Settings.poll_interval_seconds, 0.01, 60),
        sync_wait_seconds=env.required_int(
            "REPLICATE_SYNC_WAIT_SECONDS", Settings.sync_wait_seconds, 0, 60),
    )


class _Capacity(TypedDict):
    max_batch_size: int
    max_request_bytes: int
    max_expanded_request_bytes: int
    dispatch_threads: int
    max_queued_tasks: int
    max_queued_per_account: int
    max_jobs_per_account: int
    max_job_bytes_per_account: int
    schema_cache_max_bytes: int
    account_budget_usd: float | None
    account_budget_period: str


def _capacity(env: Env) -> _Capacity:
    """How big a request may be, and how much work this process takes on."""
    return _Capacity(
        max_batch_size=env.required_int("MAX_BATCH_SIZE", Settings.max_batch_size, 1, 100000),
        max_request_bytes=env.required_int(
            "MAX_REQUEST_BYTES", Settings.max_request_bytes, 1024, 1024**3),
        max_expanded_request_bytes=env.required_int(
            "MAX_EXPANDED_REQUEST_BYTES", Settings.max_expanded_request_bytes, 1024,
            64 * 1024**3),
        dispatch_threads=env.required_int("DISPATCH_THREADS", Settings.dispatch_threads, 1, 4096),
        max_queued_tasks=env.required_int(
            "MAX_QUEUED_TASKS", Settings.max_queued_tasks, 1, 10_000_000),
        max_queued_per_account=env.required_int(
            "MAX_QUEUED_TASKS_PER_ACCOUNT", Settings.max_queued_per_account, 1, 10_000_000),
        max_jobs_per_account=env.required_int(
            "MAX_JOBS_PER_ACCOUNT", Settings.max_jobs_per_account, 1, 100_000_000),
        max_job_bytes_per_account=env.required_int(
            "MAX_JOB_BYTES_PER_ACCOUNT", Settings.max_job_bytes_per_account, 1024, 1024**4),
        schema_cache_max_bytes=env.required_int(
            "SCHEMA_CACHE_MAX_BYTES", Settings.schema_cache_max_bytes, 0, 64 * 1024**3),
        account_budget_usd=env.optional_number("ACCOUNT_BUDGET_USD", 0, 1e9),
        account_budget_period=env.choice("ACCOUNT_BUDGET_PERIOD", "MONTH",
                                         ("DAY", "MONTH", "TOTAL")).lower(),
    )


class _Lifetimes(TypedDict):
    job_retention_seconds: float
    shutdown_grace_seconds: float
    token_verified_seconds: float
    token_refused_seconds: float


def _lifetimes(env: Env) -> _Lifetimes:
    """How long finished jobs are kept, a shutdown may take, and a token's check is trusted."""
    return _Lifetimes(
        job_retention_seconds=env.number(
            "JOB_RETENTION_SECONDS", Settings.job_retention_seconds, 60, 10 * 365 * 86400),
        shutdown_grace_seconds=env.number(
            "SHUTDOWN_GRACE_SECONDS", Settings.shutdown_grace_seconds, 0, 3600),
        token_verified_seconds=env.number(
            "TOKEN_VERIFIED_SECONDS", Settings.token_verified_seconds, 1, 86400),
        token_refused_seconds=env.number(
            "TOKEN_REFUSED_SECONDS", Settings.token_refused_seconds, 1, 3600),
    )


class _Webhooks(TypedDict):
    webhook_signing_key: str | None
    webhook_max_attempts: int
    webhook_retry_base_seconds: float
    webhook_timeout_seconds: float


def _webhooks(env: Env) -> _Webhooks:
    """How job-completion webhooks are signed, retried and timed out."""
    return _Webhooks(
        webhook_signing_key=env.secret("WEBHOOK_SIGNING_KEY"),
        webhook_max_attempts=env.required_int(
            "WEBHOOK_MAX_ATTEMPTS", Settings.webhook_max_attempts, 1, 50),
        webhook_retry_base_seconds=env.number(
            "WEBHOOK_RETRY_BASE_SECONDS", Settings.webhook_retry_base_seconds, 0.01, 3600),
        webhook_timeout_seconds=env.number(
            "WEBHOOK_TIMEOUT_SECONDS", Settings.webhook_timeout_seconds, 0.1, 120),
    )


class _Egress(TypedDict):
    egress_allow_private: tuple[IPNetwork, ...]
    egress_max_redirects: int
    egress_min_bytes_per_second: int
    egress_stall_seconds: float
    egress_download_seconds: float
    egress_max_decompression_ratio: float
    output_max_file_bytes: int
    output_max_files_per_prediction: int
    output_max_bytes_per_prediction: int
    output_max_files_per_job: int
    output_max_bytes_per_job: int


def _egress(env: Env) -> _Egress:
    """What outbound fetches may reach and how fast, and what outputs may put on disk."""
    return _Egress(
        egress_allow_private=_networks(env, "EGRESS_ALLOW_PRIVATE"),
        egress_max_redirects=env.required_int(
            "EGRESS_MAX_REDIRECTS", Settings.egress_max_redirects, 0, 20),
        egress_min_bytes_per_second=env.required_int(
            "EGRESS_MIN_BYTES_PER_SECOND", Settings.egress_min_bytes_per_second, 1, 1024**3),
        egress_stall_seconds=env.number(
            "EGRESS_STALL_SECONDS", Settings.egress_stall_seconds, 0.1, 600),
        egress_download_seconds=env.number(
            "EGRESS_DOWNLOAD_SECONDS", Settings.egress_download_seconds, 1, 86400),
        egress_max_decompression_ratio=env.number(
            "EGRESS_MAX_DECOMPRESSION_RATIO", Settings.egress_max_decompression_ratio, 1, 1e6),
        output_max_file_bytes=env.required_int(
            "OUTPUT_MAX_FILE_BYTES", Settings.output_max_file_bytes, 1, 1024**4),
        output_max_files_per_prediction=env.required_int(
            "OUTPUT_MAX_FILES_PER_PREDICTION", Settings.output_max_files_per_prediction, 1,
            1_000_000),
        output_max_bytes_per_prediction=env.required_int(
            "OUTPUT_MAX_BYTES_PER_PREDICTION", Settings.output_max_bytes_per_prediction, 1,
            1024**4),
        output_max_files_per_job=env.required_int(
            "OUTPUT_MAX_FILES_PER_JOB", Settings.output_max_files_per_job, 1, 100_000_000),
        output_max_bytes_per_job=env.required_int(
            "OUTPUT_MAX_BYTES_PER_JOB", Settings.output_max_bytes_per_job, 1, 1024**5),
    )


def _networks(env: Env, name: str) -> tuple[IPNetwork, ...]:
    """A list of CIDR ranges, comma- or space-separated."""
    try:
        return parse_networks(env.text(name, ""))
    except ValueError as exc:
        raise SettingsError(f"{name}: {exc}") from None


class _Observability(TypedDict):
    log_format: str
    metrics_access: str
    metrics_token: str | None


class _EventStreams(TypedDict):
    event_heartbeat_seconds: float
    event_streams_per_process: int
    event_streams_per_caller: int
    event_stream_max_seconds: float


def _event_streams(env: Env) -> _EventStreams:
    """How often an idle event stream speaks, how many may be open, and for how long: streams
    take at most half of a worker's threads (GUNICORN_THREADS, as gunicorn_conf reads it)."""
    threads = env.required_int("GUNICORN_THREADS", 16, 1, None)
    most = max(1, threads - 1)  # at least one thread is always left for other requests
    return _EventStreams(
        event_heartbeat_seconds=env.number(
            "EVENT_HEARTBEAT_SECONDS", Settings.event_heartbeat_seconds, 0.01, 300),
        event_streams_per_process=env.required_int(
            "EVENT_STREAMS_PER_PROCESS", max(1, threads // 2), 1, most),
        event_streams_per_caller=env.required_int(
            "EVENT_STREAMS_PER_CALLER", Settings.event_streams_per_caller, 1, 10_000),
        event_stream_max_seconds=env.number(
            "EVENT_STREAM_MAX_SECONDS", Settings.event_stream_max_seconds, 0.1, 86400),
    )


def _observability(env: Env) -> _Observability:
    """The log format, and who may read /metrics."""
    return _Observability(
        log_format=env.choice("LOG_FORMAT", Settings.log_format.upper(), ("TEXT", "JSON")).lower(),
        metrics_access=_metrics_access(env),
        metrics_token=env.secret("METRICS_TOKEN"),
    )

_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
_POSTGRES_SCHEMES = ("postgresql://", "postgres://", "postgresql+psycopg://")


class _Backends(NamedTuple):
    redis_url: str | None
    database_url: str | None
    single_host: bool
    redis_key_prefix: str
    redis_cluster: bool


def _backends(env: Env) -> _Backends:
    """REDIS_URL, DATABASE_URL and the one combination refused: jobs shared, limits per host."""
    redis_url = _url(env, "REDIS_URL", _REDIS_SCHEMES)
    database_url = _url(env, "DATABASE_URL", _POSTGRES_SCHEMES)
    single_host = env.flag("SINGLE_HOST")
    if database_url and not redis_url and not single_host:
        raise SettingsError(
            "DATABASE_URL without REDIS_URL would share jobs across hosts but keep each host's "
            "limits to itself; set REDIS_URL, or SINGLE_HOST=true if only one host runs")
    prefix = env.text("REDIS_KEY_PREFIX", "rg")
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", prefix):
        raise SettingsError("REDIS_KEY_PREFIX must be 1-64 letters, digits, '_', '.' or '-'")
    cluster = env.flag("REDIS_CLUSTER")
    if cluster and not (redis_url or "").startswith(("redis://", "rediss://")):
        raise SettingsError("REDIS_CLUSTER=true needs REDIS_URL: a redis:// or rediss:// URL of "
                            "one of the cluster's nodes")
    return _Backends(redis_url, database_url, single_host, prefix, cluster)


def _url(env: Env, name: str, schemes: tuple[str, ...]) -> str | None:
    # The value is never echoed: a URL may carry a password.
    value = env.secret(name)
    if value is not None and not value.startswith(schemes):
        raise SettingsError(f"{name} must start with {' or '.join(schemes)}")
    return value


def _model_policy(env: Env) -> ModelPolicy:
    """MODEL_POLICY, checked now so a typo stops the start rather than every request."""
    text = env.text("MODEL_POLICY", "curated").strip() or "curated"
    try:
        return ModelPolicy.parse(text)
    except ValueError as exc:
        raise SettingsError(str(exc)) from None


def _model_hardware(env: Env) -> ModelHardware:
    """MODEL_HARDWARE, checked now: an unknown hardware name stops the start."""
    try:
        return ModelHardware.parse(env.text("MODEL_HARDWARE", ""))
    except ValueError as exc:
        raise SettingsError(str(exc)) from None


def _fallback_chains(env: Env) -> FallbackChains:
    """REPLICATE_FALLBACK_CHAINS over the defaults, checked now as MODEL_POLICY is."""
    try:
        return FallbackChains.parse(env.text("REPLICATE_FALLBACK_CHAINS", "") or None)
    except ValueError as exc:
        raise SettingsError(str(exc)) from None


def _metrics_access(env: Env) -> str:
    """METRICS_ACCESS: admin, token (then METRICS_TOKEN is required) or open."""
    access = env.choice("METRICS_ACCESS", "ADMIN", ("ADMIN", "TOKEN", "OPEN")).lower()
    token = env.secret("METRICS_TOKEN")
    if access == "token" and (token is None or len(token) < 16):
        raise SettingsError("METRICS_ACCESS=token needs METRICS_TOKEN (at least 16 characters)")
    return access


def read_environ(*, export: bool = False) -> dict[str, str]:
    """os.environ over the `.env` found from the working directory upwards (the environment wins).

    `export` also puts the file's values in os.environ, for gunicorn's workers and the console.
    """
    found = find_dotenv(usecwd=True)
    if export:
        load_dotenv(found, override=False)
        return dict(os.environ)
    from_file = {k: v for k, v in dotenv_values(found).items() if v is not None} if found else {}
    return {**from_file, **os.environ}


class Env:
    """Typed access to an environment mapping, with errors that name the variable."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ

    def _raw(self, name: str) -> str | None:
        value = self._environ.get(name)
        if value is None or value.strip() == "":
            return None
        return value.strip()

    def text(self, name: str, default: str) -> str:
        return self._raw(name) or default

    def secret(self, name: str) -> str | None:
        value = self._raw(name)
        if value is not None and any(ch.isspace() or not ch.isprintable() for ch in value):
            # The value itself is never echoed: it is a secret.
            raise SettingsError(f"{name} contains whitespace or control characters")
        return value

    def _parse(self, name: str, kind: Callable[[str], _T], what: str) -> _T | None:
        raw = self._raw(name)
        if raw is None:
            return None
        try:
            return kind(raw)
        except ValueError:
            raise SettingsError(f"{name} must be {what}, got {raw!r}") from None

    def integer(self, name: str, default: int | None, low: int,
                high: int | None) -> int | None:
        value = self._parse(name, int, "an integer")
        if value is None:
            return default
        if value < low or (high is not None and value > high):
            bounds = f">= {low}" if high is None else f"between {low} and {high}"
            raise SettingsError(f"{name} must be {bounds}, got {value}")
        return value

    def required_int(self, name: str, default: int, low: int, high: int | None) -> int:
        value = self.integer(name, default, low, high)
        assert value is not None  # noqa: S101 - default is an int, so value is too
        return value

    def number(self, name: str, default: float, low: float, high: float) -> float:
        value = self._parse(name, float, "a number")
        if value is None:
            return default
        if not math.isfinite(value) or not low <= value <= high:
            raise SettingsError(f"{name} must be between {low} and {high}, got {value}")
        return value

    def optional_number(self, name: str, low: float, high: float) -> float | None:
        """A number when the variable is set (not blank), else None."""
        if self._raw(name) is None:
            return None
        return self.number(name, low, low, high)

    def flag(self, name: str) -> bool:
        value = (self._raw(name) or "false").lower()
        if value not in ("1", "true", "yes", "0", "false", "no"):
            raise SettingsError(f"{name} must be true or false, got {value!r}")
        return value in ("1", "true", "yes")

    def choice(self, name: str, default: str, allowed: tuple[str, ...]) -> str:
        value = (self._raw(name) or default).upper()
        if value not in allowed:
            raise SettingsError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        return value

    def base_url(self, name: str) -> str:
        value = self._raw(name) or DEFAULT_BASE_URL
        if not value.startswith(("http://", "https://")):
            raise SettingsError(f"{name} must start with http:// or https://, got {value!r}")
        # The client appends /v1/... itself, so a trailing /v1 would double it.
        trimmed = value.rstrip("/")
        if trimmed.endswith("/v1"):
            raise SettingsError(f"{name} must not end in /v1 (the client adds it), got {value!r}")
        return trimmed
