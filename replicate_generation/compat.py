"""The old `replicate-batch-process` names and signatures on this engine: code written for the old
package changes one import line. What differs on purpose is in docs/migration.md."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import inspect
import logging
import mimetypes
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from replicate_generation.errors import InvalidName, InvalidRequest
from replicate_generation.library import (
    BatchClient,
    GenerationFailed,
    Request,
    Result,
    global_status,
    load_settings,
)
from replicate_generation.models.catalogue import ModelSpec
from replicate_generation.models.chains import FallbackChains
from replicate_generation.models.routing import REFERENCE_KEYS
from replicate_generation.models.validation import resolve_model
from replicate_generation.request_parsing import parse_single
from replicate_generation.settings import Settings

__all__ = [
    "BatchRequest",
    "BatchResult",
    "GenerationFailed",
    "GlobalConcurrencyManager",
    "IntelligentBatchProcessor",
    "InvalidRequest",
    "UnsupportedParameter",
    "get_global_status",
    "intelligent_batch_process",
    "replicate_model_calling",
]

log = logging.getLogger(__name__)

FilePath = str | os.PathLike[str]
_REMOTE = ("http://", "https://", "data:")
_T = TypeVar("_T")


class UnsupportedParameter(InvalidRequest):
    """A parameter the model does not take: the old library switched models (or dropped it)."""


# --------------------------------------------------------------------------- the old API


def replicate_model_calling(prompt: str, model_name: str,
                            output_filepath: FilePath | None = None, *,
                            if_exists: str | None = None, **params: Any) -> list[str]:
    """Generate one prompt; return the paths of the files written (extension = real format).

    Raises UnsupportedParameter, InvalidRequest or GenerationFailed (docs/migration.md).
    """
    clean = _model_params(model_name, params)
    with BatchClient(settings=_settings(None)) as client:
        result = client.generate(prompt, model_name, output_filepath,
                                 **_file_options(client.generate, if_exists), **clean)
    _log_result(result)
    return result.raise_for_error().files


async def intelligent_batch_process(
        prompts: Sequence[str], model_name: str, max_concurrent: int = 8,
        output_dir: FilePath = "output/intelligent_batch", replicate_api_token: str | None = None,
        global_max_concurrent: int | None = None,
        output_filepath: Sequence[FilePath] | None = None, *, if_exists: str | None = None,
        **common_params: Any) -> list[str]:
    """Generate many prompts with one model; return the successful files in PROMPT order.

    `max_concurrent` caps this call under the account's shared limit; failures are only logged.
    """
    prompt_list = list(prompts) if isinstance(prompts, list | tuple) else prompts
    paths = _batch_paths(prompt_list, model_name, output_dir, output_filepath)
    clean = _model_params(model_name, common_params)
    client = BatchClient(token=replicate_api_token,
                         settings=_settings(global_max_concurrent), max_concurrent=max_concurrent)
    results = await _closing(client, client.agenerate_batch, prompt_list, model_name, paths,
                             **_file_options(client.generate_batch, if_exists), **clean)
    return _successful_files(results)


def get_global_status() -> dict[str, Any]:
    """The account's shared concurrency, as every process using STATE_FILE sees it."""
    return _old_status(None, _settings(None))


@dataclass
class BatchRequest:
    """One item for `IntelligentBatchProcessor`; `kwargs` are the model's parameters."""

    prompt: str
    model_name: str
    output_filepath: FilePath | None = None
    kwargs: dict[str, Any] | None = None
    request_id: str | None = None

    def __post_init__(self) -> None:
        if self.kwargs is None:
            self.kwargs = {}
        if self.request_id is None:
            # The old `req_<ms>` collided for requests made in the same millisecond.
            self.request_id = f"req_{uuid.uuid4().hex}"


@dataclass
class BatchResult:
    """What one BatchRequest came to; `details` is the engine's full Result (notes, model used)."""

    request_id: str
    prompt: str
    model_name: str
    success: bool
    file_paths: list[str] | None = None
    error: str | None = None
    duration: float | None = None
    details: Result | None = None


class GlobalConcurrencyManager:
    """`processor.global_manager`: the account's live figures from the shared state file."""

    def __init__(self, api_token: str | None = None,
                 global_max_concurrent: int | None = None) -> None:
        self._token = api_token
        self._global_max_concurrent = global_max_concurrent

    def get_global_status(self) -> dict[str, Any]:
        return _old_status(self._token, _settings(self._global_max_concurrent))


class IntelligentBatchProcessor:
    """Mixed-model batches. `rate_limit_per_minute`, `max_retries` and `retry_delay` are
    accepted and unused: the engine paces creates per account (REPLICATE_REQUESTS_PER_MINUTE,
    shared by every process) and retries 429 and 5xx answers itself."""

    def __init__(self, max_concurrent: int = 8, rate_limit_per_minute: int = 600,
                 max_retries: int = 3, retry_delay: float = 2.0,
                 progress_callback: Callable[[int, int, BatchResult], object] | None = None,
                 replicate_api_token: str | None = None,
                 global_max_concurrent: int | None = None) -> None:
        self.max_concurrent = _positive(max_concurrent, "max_concurrent")
        self.rate_limit_per_minute = rate_limit_per_minute
        self.max_retries = max_retries
        self.retry_delay = retry_delay
        self.progress_callback = progress_callback
        self.replicate_api_token = replicate_api_token
        self.global_max_concurrent = global_max_concurrent
        self.global_manager = GlobalConcurrencyManager(replicate_api_token, global_max_concurrent)

    async def process_intelligent_batch(self, requests: Sequence[BatchRequest],
                                        max_concurrent: int | None = None, *,
                                        if_exists: str | None = None) -> list[BatchResult]:
        """Run every request; return one BatchResult per request, in request order.

        A request refused before anything is spent comes back failed with the reason; others run.
        """
        items = list(requests)
        if not items:
            return []
        cap = _positive(max_concurrent, "max_concurrent") if max_concurrent is not None \
            else self.max_concurrent
        started = time.monotonic()
        client = BatchClient(token=self.replicate_api_token,
                             settings=_settings(self.global_max_concurrent), max_concurrent=cap)
        checked = [_checked_request(item, i, client.chains) for i, item in enumerate(items)]
        runnable = [(i, c) for i, c in enumerate(checked) if isinstance(c, Request)]
        results = await _closing(client, client.agenerate_mixed, [r for _, r in runnable],
                                 **_file_options(client.generate_mixed, if_exists)) \
            if runnable else []
        elapsed = time.monotonic() - started  # items run in parallel: the batch's time
        for (i, _), result in zip(runnable, results, strict=True):
            _log_result(result)
            checked[i] = _batch_result(items[i], result, elapsed)
        outcomes = [c for c in checked if isinstance(c, BatchResult)]
        self._report_progress(outcomes)
        return outcomes

    def _report_progress(self, outcomes: list[BatchResult]) -> None:
        if self.progress_callback is None:
            return
        for done, outcome in enumerate(outcomes, start=1):
            self.progress_callback(done, len(outcomes), outcome)


# --------------------------------------------------------------------------- parameters


def _model_params(model_name: str, params: Mapping[str, Any],
                  where: str = "") -> dict[str, Any]:
    """The caller's parameters, checked against the model; local reference files inlined."""
    spec = resolve_model(model_name, f"{where}model_name")
    for name in params:
        if name == "prompt":
            raise InvalidRequest(f"{where}prompt", "give the prompt as the prompt argument, "
                                 "not among the model's parameters")
        if name not in REFERENCE_KEYS and spec.param(name) is None:
            raise _unsupported(spec, name, where)
    return {name: _reference(value, f"{where}{name}") if name in REFERENCE_KEYS else value
            for name, value in params.items()}


def _unsupported(spec: ModelSpec, name: str, where: str) -> UnsupportedParameter:
    takes = ", ".join(p.name for p in spec.params if p.name != "prompt")
    return UnsupportedParameter(
        f"{where}{name}",
        f"{spec.ref} has no parameter '{name}' (it takes: {takes}). replicate-batch-process "
        "silently switched to another model (or dropped the parameter) here; "
        "replicate_generation deliberately refuses instead: remove the parameter or choose a "
        "model that takes it (docs/migration.md).")


def _reference(value: object, field: str) -> object:
    """A local path (str or os.PathLike) becomes a data: URI; URLs and data: URIs pass as is."""
    if isinstance(value, list | tuple):
        return [_reference(item, f"{field}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, str) and value.startswith(_REMOTE):
        return value
    if isinstance(value, str | os.PathLike):
        return _data_uri(Path(value), field)
    return value  # the engine's validator names the wrong type


def _data_uri(path: Path, field: str) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InvalidRequest(field, f"{field}: reference file '{path}' does not exist (relative "
                             f"to {Path.cwd()}); the old library skipped it silently, this one "
                             "refuses") from None
    except OSError as exc:
        raise InvalidRequest(field, f"{field}: cannot read reference file '{path}': "
                             f"{exc.strerror}") from None
    mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _checked_request(item: BatchRequest, index: int,
                     chains: FallbackChains) -> Request | BatchResult:
    """The item as a library Request, or a failed BatchResult saying why it cannot run."""
    if not isinstance(item, BatchRequest):
        raise TypeError(f"requests[{index}] must be a BatchRequest")
    try:
        params = _model_params(item.model_name, item.kwargs or {}, f"requests[{index}].")
        body: dict[str, Any] = {"model_name": item.model_name, "prompt": item.prompt, **params}
        if item.output_filepath is not None:
            body["custom_filename"] = Path(item.output_filepath).name
        parse_single(body, chains)  # the engine's own checks, before anything is spent
    except (InvalidRequest, InvalidName) as exc:
        return BatchResult(request_id=str(item.request_id), prompt=item.prompt,
                           model_name=item.model_name, success=False, error=str(exc),
                           duration=0.0)
    return Request(prompt=item.prompt, model_name=item.model_name,
                   output_filepath=item.output_filepath, params=params)


def _file_options(method: Callable[..., Any], if_exists: str | None) -> dict[str, Any]:
    """`if_exists` for the library call, when given and when the library takes it."""
    if if_exists is None:
        return {}
    if "if_exists" not in inspect.signature(method).parameters:
        raise TypeError("if_exists is not supported by this version of replicate_generation")
    return {"if_exists": if_exists}


def _positive(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


# --------------------------------------------------------------------------- running


def _settings(global_max_concurrent: int | None) -> Settings:
    """Read now (environment, then .env from the current directory): a script may set
    os.environ just before calling, as the old README does."""
    settings = load_settings()
    if global_max_concurrent is None:
        return settings
    limit = _positive(global_max_concurrent, "global_max_concurrent")
    return dataclasses.replace(settings, concurrent_limit=limit)


def _batch_paths(prompts: object, model_name: str, output_dir: FilePath,
                 output_filepath: Sequence[FilePath] | None) -> list[FilePath] | None:
    """One output path per prompt: the caller's list, else old-style names in output_dir."""
    if isinstance(output_filepath, str | os.PathLike):
        raise ValueError("output_filepath is a single path for a whole batch: "
                         "replicate-batch-process wrote every prompt's file to that same path. "
                         "Give a list with one path per prompt, or leave it out and use "
                         "output_dir")
    if not isinstance(prompts, list):
        return None  # the library names the mistake
    if output_filepath is not None:
        paths = list(output_filepath)
        if len(paths) != len(prompts):
            raise ValueError(f"output_filepath has {len(paths)} paths but prompts has "
                             f"{len(prompts)}; give one path per prompt")
        return paths
    slug = model_name.replace("/", "_").replace("-", "_").replace(".", "_")
    stamp = int(time.time())
    # No extension: the library adds the real format's.
    return [Path(output_dir) / f"intelligent_{slug}_{stamp}_{i:03d}"
            for i in range(len(prompts))]


async def _closing(client: BatchClient, call: Callable[..., Awaitable[_T]], *args: Any,
                   **kwargs: Any) -> _T:
    """Await a client's call, then close the client off the event loop (close joins threads)."""
    try:
        return await call(*args, **kwargs)
    finally:
        await asyncio.to_thread(client.close)


def _successful_files(results: list[Result]) -> list[str]:
    files: list[str] = []
    for result in results:
        _log_result(result)
        if result.success:
            files.extend(result.files)
    return files


def _log_result(result: Result) -> None:
    for note in ([result.routed] if result.routed else []) + result.notes:
        log.info("item %d: %s", result.index, note)
    if not result.success:
        log.warning("item %d failed (%s): %s", result.index, result.error_type, result.error)


def _batch_result(item: BatchRequest, result: Result, elapsed: float) -> BatchResult:
    return BatchResult(request_id=str(item.request_id), prompt=item.prompt,
                       model_name=item.model_name, success=result.success,
                       file_paths=list(result.files) if result.success else None,
                       error=None if result.success else result.error,
                       duration=round(elapsed, 3), details=result)


def _old_status(token: str | None, settings: Settings) -> dict[str, Any]:
    """library.global_status under the old key names, followed by the new ones."""
    status = global_status(token=token, settings=settings)
    limit, in_flight = int(status["concurrent_limit"]), int(status["in_flight"])
    return {"global_max_concurrent": limit, "current_concurrent": in_flight,
            "available_slots": status["available_slots"],
            "utilization_percentage": 100.0 * in_flight / limit if limit else 0.0, **status}
