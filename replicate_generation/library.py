"""Generate with Replicate models from your own Python code, in-process: no server needed.

`generate`, `generate_batch` and `generate_mixed` (and their a* forms) run as jobs on the service's
own engine, sharing one account's limits with every process on the host through `STATE_FILE`.
Files are moved to the caller's paths, never replacing one silently (docs/library.md)."""

from __future__ import annotations

import asyncio
import atexit
import base64
import contextlib
import contextvars
import functools
import mimetypes
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from replicate_generation.backends import limits_backend, open_limit_store
from replicate_generation.clients import account_key
from replicate_generation.errors import (
    InvalidName,
    InvalidRequest,
    OutputExists,
    QueueFull,
    SettingsError,
)
from replicate_generation.generation import Generator, Task
from replicate_generation.jobs.bodies import item_body
from replicate_generation.jobs.runner import JobRunner, Submission
from replicate_generation.jobs.store import ItemRow, JobRow
from replicate_generation.models.routing import REFERENCE_KEYS
from replicate_generation.outputs import (
    IfExists,
    OutputNames,
    check_if_exists,
    default_stem,
    place_without_clobbering,
    safe_filename,
)
from replicate_generation.request_parsing import (
    OPTION_KEYS,
    parse_batch,
    parse_single,
    request_hash,
)
from replicate_generation.settings import Settings, read_environ

__all__ = [
    "BatchClient",
    "GenerationFailed",
    "InvalidName",
    "InvalidRequest",
    "OutputExists",
    "Request",
    "Result",
    "agenerate",
    "agenerate_batch",
    "agenerate_mixed",
    "default_client",
    "generate",
    "generate_batch",
    "generate_mixed",
    "global_status",
    "load_settings",
]

FilePath = str | os.PathLike[str]

# Keys a caller's params may not carry: the request's own structure and the service-only options.
_RESERVED = frozenset({"model_name", "prompt", "prompts", "tasks", "custom_filename",
                       "custom_filenames", *OPTION_KEYS})
# How long to wait before offering a chunk again when this process's queue is full and none of
# this call's own jobs is running yet (another call's jobs fill it).
_QUEUE_FULL_PAUSE = 1.0
# How often a waiting call looks whether its awaiting task was cancelled.
_CANCEL_CHECK = 0.2
_T = TypeVar("_T")
# Set by the a* functions in their worker thread's context: the awaiting task was cancelled.
_CANCEL: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar(
    "replicate_generation_cancel", default=None)


class _CallCancelled(Exception):
    """Raised in the worker thread of an a* call whose task was cancelled, once its jobs are."""


class GenerationFailed(Exception):
    """Raised by `Result.raise_for_error()`; `result` is the failed item."""

    def __init__(self, result: Result) -> None:
        super().__init__(f"item {result.index} failed ({result.error_type}): {result.error}")
        self.result = result


@dataclass(frozen=True)
class Request:
    """One item of a mixed batch: what the upstream library called `BatchRequest`.

    `params` are the model's parameters (checked against the catalogue before anything is
    spent). A reference given as a `pathlib.Path` is read here and sent inline as a data: URI;
    a string must be an http(s) URL or a data: URI.
    """

    prompt: str
    model_name: str
    output_filepath: FilePath | None = None
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class Result:
    """What one item came to. `files` are real paths of files that exist on this machine."""

    index: int
    prompt: str
    success: bool
    files: list[str]
    model_requested: str
    model_used: str | None
    attempts: list[dict[str, Any]]
    prediction_id: str | None
    error: str | None
    error_type: str | None
    cost_usd: float | None
    placeholder: bool
    routed: str | None
    notes: list[str]
    job_id: str
    state: str

    def raise_for_error(self) -> Result:
        """Return self when the item succeeded; raise GenerationFailed otherwise."""
        if not self.success:
            raise GenerationFailed(self)
        return self

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


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


@dataclass(frozen=True)
class _Destination:
    """Where the caller wants an item's file: a directory and a name without extension."""

    directory: Path
    stem: str
    asked_suffix: str
    field: str = "output_filepath"


@dataclass
class _Chunk:
    tasks: list[Task]
    offset: int
    job: JobRow | None = None


class BatchClient:
    """A reusable session: one job runner (threads, HTTP clients, state file) for many calls.

    Use it as a context manager, or call `close()`: running predictions are then left in the state
    file rather than abandoned, and any process with the same token picks them up.

    :param token: the Replicate token that pays; default REPLICATE_API_TOKEN.
    :param settings: default `load_settings()`.
    :param max_concurrent: at most this many of this client's items in flight at once, under
        the account's shared limit (which still bounds it); default: the account's limit.
    """

    def __init__(self, *, token: str | None = None, settings: Settings | None = None,
                 max_concurrent: int | None = None) -> None:
        if max_concurrent is not None and (isinstance(max_concurrent, bool)
                                           or not isinstance(max_concurrent, int)
                                           or max_concurrent < 1):
            raise ValueError("max_concurrent must be a positive integer, or None for the "
                             "account's limit")
        self.max_concurrent = max_concurrent
        self.settings = settings if settings is not None else load_settings()
        self._token = token or self.settings.replicate_api_token
        self.chains = self.settings.fallback_chains
        self._runner: JobRunner | None = None
        self._lock = threading.Lock()
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def runner(self) -> JobRunner:
        """The job runner, started on first use."""
        with self._lock:
            if self._closed:
                raise RuntimeError("this BatchClient is closed")
            if self._runner is None:
                # "library": a script resumes its own (and other scripts') jobs, never the
                # service's, which belong in the service's output directory.
                generator = Generator(self.settings, max_concurrent=self.max_concurrent)
                self._runner = JobRunner(self.settings, generator, origin="library")
                # A client nobody closed still hands its unfinished work over at exit.
                atexit.register(self._runner.close)
            return self._runner

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Stop the runner: unfinished items stay in the state file for the next process."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            runner, self._runner = self._runner, None
        if runner is not None:
            atexit.unregister(runner.close)
            runner.close()

    def __enter__(self) -> BatchClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def token(self, token: str | None = None) -> str:
        """The token a call pays with: the given one, else the client's, else an error."""
        chosen = token or self._token
        if not chosen:
            raise SettingsError("REPLICATE_API_TOKEN is not set: pass token=... or set it in the "
                                "environment or a .env file")
        return chosen

    # -- the three modes -----------------------------------------------------------------------

    def generate(self, prompt: str, model_name: str, output_filepath: FilePath | None = None, *,
                 token: str | None = None, fallback: bool = True, placeholder: bool = False,
                 fallback_on_content_policy: bool = False, if_exists: IfExists = "refuse",
                 **params: Any) -> Result:
        """Generate one prompt's outputs; `params` are the model's parameters.

        `if_exists`: what to do when `output_filepath`'s name is taken (module docstring).
        """
        check_if_exists(if_exists)
        clean = _params(params, "params")
        options = _options(fallback, placeholder, fallback_on_content_policy)
        destination = _destination(output_filepath, "output_filepath") \
            if output_filepath is not None else None
        body: dict[str, Any] = {"model_name": model_name, "prompt": prompt, **clean, **options}
        if destination is not None:
            body["custom_filename"] = destination.stem
        parsed = parse_single(body, self.chains)
        return self._run("generate", parsed.tasks, [destination], token, if_exists)[0]

    def generate_batch(self, prompts: Sequence[str], model_name: str,
                       output_filepaths: Sequence[FilePath | None] | None = None, *,
                       token: str | None = None, fallback: bool = True,
                       placeholder: bool = False, fallback_on_content_policy: bool = False,
                       if_exists: IfExists = "refuse", **params: Any) -> list[Result]:
        """Generate many prompts with one model in parallel; `params` apply to every prompt.

        `output_filepaths`, when given, is a list parallel to `prompts` (None entries keep the
        default name under OUTPUT_DIR).
        """
        check_if_exists(if_exists)
        prompt_list = _sequence(prompts, "prompts")
        paths = None
        if output_filepaths is not None:
            paths = _sequence(output_filepaths, "output_filepaths")
            if len(paths) != len(prompt_list):
                raise ValueError(f"output_filepaths has {len(paths)} items but prompts has "
                                 f"{len(prompt_list)}; give one output path per prompt")
        clean = _params(params, "params")
        destinations = _destinations(paths, len(prompt_list), "output_filepaths")
        body: dict[str, Any] = {"model_name": model_name, "prompts": prompt_list, **clean,
                                **_options(fallback, placeholder, fallback_on_content_policy)}
        if any(d is not None for d in destinations):
            body["custom_filenames"] = _stems(destinations, [model_name] * len(prompt_list))
        parsed = parse_batch(body, max(1, len(prompt_list)), self.chains)
        return self._run("batch", parsed.tasks, destinations, token, if_exists)

    def generate_mixed(self, requests: Sequence[Request], *, token: str | None = None,
                       fallback: bool = True, placeholder: bool = False,
                       fallback_on_content_policy: bool = False,
                       if_exists: IfExists = "refuse") -> list[Result]:
        """Generate items that each name their own model and parameters, in parallel."""
        check_if_exists(if_exists)
        items = _sequence(requests, "requests")
        for i, item in enumerate(items):
            if not isinstance(item, Request):
                raise TypeError(f"requests[{i}] must be a replicate_generation.library.Request")
        destinations = _destinations([r.output_filepath for r in items], len(items),
                                     "requests", attribute="output_filepath")
        stems = _stems(destinations, [r.model_name for r in items])
        tasks: list[dict[str, Any]] = []
        for i, (item, destination) in enumerate(zip(items, destinations, strict=True)):
            task = {"model_name": item.model_name, "prompt": item.prompt,
                    **_params(item.params, f"requests[{i}].params")}
            if destination is not None:
                task["custom_filename"] = stems[i]
            tasks.append(task)
        body: dict[str, Any] = {"tasks": tasks,
                                **_options(fallback, placeholder, fallback_on_content_policy)}
        parsed = parse_batch(body, max(1, len(items)), self.chains)
        return self._run("batch", parsed.tasks, destinations, token, if_exists)

    async def agenerate(self, *args: Any, **kwargs: Any) -> Result:
        return await _in_thread(self.generate, *args, **kwargs)

    async def agenerate_batch(self, *args: Any, **kwargs: Any) -> list[Result]:
        return await _in_thread(self.generate_batch, *args, **kwargs)

    async def agenerate_mixed(self, *args: Any, **kwargs: Any) -> list[Result]:
        return await _in_thread(self.generate_mixed, *args, **kwargs)

    # -- lower level: what the CLI uses --------------------------------------------------------

    def submit_body(self, body: dict[str, Any], *, idempotency_key: str | None = None,
                    token: str | None = None) -> tuple[JobRow, bool]:
        """Submit a /generate-batch body as a job without waiting; return (job, created).

        With an idempotency key already used by this account (and the same body), the existing
        job comes back instead: nothing is created. Raises InvalidRequest/InvalidName for a bad
        body, QueueFull when this process has no room.
        """
        parsed = parse_batch(body, self.settings.max_batch_size, self.chains)
        submission = Submission(kind="batch", tasks=parsed.tasks, idempotency_key=idempotency_key,
                                request_hash=request_hash("/generate-batch", body))
        return self.runner.submit(self.token(token), submission)

    def describe_item(self, item: ItemRow) -> dict[str, Any]:
        """An item as the API shows it, with `files` as real paths on this machine."""
        described = item_body(item, self.settings.output_dir)
        root = self.runner.generator.runtime.output_root
        described["files"] = [str(root / f) for f in item.files]
        return described

    # -- running -------------------------------------------------------------------------------

    def _run(self, kind: str, tasks: list[Task], destinations: Sequence[_Destination | None],
             token: str | None, if_exists: IfExists) -> list[Result]:
        """Submit the tasks as jobs of at most MAX_BATCH_SIZE items, wait, place the files."""
        paying = self.token(token)
        _check_free(destinations, if_exists)
        runner = self.runner
        cancel = _CANCEL.get() or threading.Event()
        size = self.settings.max_batch_size
        chunks = [_Chunk(tasks=tasks[i:i + size], offset=i) for i in range(0, len(tasks), size)]
        try:
            for position, chunk in enumerate(chunks):
                chunk.job = self._submit(runner, paying, kind, chunk, chunks[:position], cancel)
            results: list[Result] = []
            for chunk in chunks:
                assert chunk.job is not None  # noqa: S101 - every chunk was submitted above
                _wait(runner, chunk.job.id, cancel)
                for item in runner.store.items(chunk.job.id):
                    results.append(self._result(chunk.job.id, item, chunk.offset))
        except BaseException:
            # Interrupted (Ctrl-C, a cancelled task) or broken: nobody will collect these
            # results, so stop paying.
            for chunk in chunks:
                if chunk.job is not None:
                    runner.cancel(chunk.job.id)
            raise
        for result in results:
            destination = destinations[result.index]
            if destination is not None and result.files:
                _place(result, destination, tasks[result.index].stem, if_exists)
        return results

    def _submit(self, runner: JobRunner, token: str, kind: str, chunk: _Chunk,
                earlier: list[_Chunk], cancel: threading.Event) -> JobRow:
        while True:
            _raise_if_cancelled(cancel)
            try:
                job, _ = runner.submit(token, Submission(kind=kind, tasks=chunk.tasks))
                return job
            except QueueFull:
                # This process's queue is full: let an earlier chunk of this call finish first.
                pending = [c.job for c in earlier if c.job is not None]
                open_jobs = [j for j in pending if not _finished(runner, j.id)]
                if open_jobs:
                    _wait(runner, open_jobs[0].id, cancel)
                else:
                    cancel.wait(_QUEUE_FULL_PAUSE)

    def _result(self, job_id: str, item: ItemRow, offset: int) -> Result:
        view = self.describe_item(item)
        return Result(
            index=offset + item.index, prompt=str(view["prompt"]), success=bool(view["success"]),
            files=list(view["files"]), model_requested=str(view["model_requested"]),
            model_used=view["model_used"], attempts=list(view["attempts"]),
            prediction_id=view["prediction_id"], error=view["error"],
            error_type=view["error_type"], cost_usd=view["cost_usd"],
            placeholder=bool(view["placeholder"]), routed=view["routed"],
            notes=list(view["notes"]), job_id=job_id, state=item.state)


def _finished(runner: JobRunner, job_id: str) -> bool:
    job = runner.store.get(job_id)
    return job is None or job.terminal


def _wait(runner: JobRunner, job_id: str, cancel: threading.Event) -> None:
    """Wait for the job to end, unless the call is cancelled first."""
    while True:
        _raise_if_cancelled(cancel)
        if runner.wait(job_id, timeout=_CANCEL_CHECK) is not None or _finished(runner, job_id):
            return


def _raise_if_cancelled(cancel: threading.Event) -> None:
    if cancel.is_set():
        raise _CallCancelled


async def _in_thread(call: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    """Run a synchronous call in a thread. When the awaiting task is cancelled, the call cancels
    its jobs (as on Ctrl-C in a synchronous call); CancelledError follows once it has."""
    cancel = threading.Event()
    context = contextvars.copy_context()
    context.run(_CANCEL.set, cancel)
    loop = asyncio.get_running_loop()
    future = loop.run_in_executor(None, functools.partial(context.run, call, *args, **kwargs))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        cancel.set()
        # The worker thread must stop paying before the caller moves on (or the loop closes).
        with contextlib.suppress(Exception):
            await future
        raise


# --------------------------------------------------------------------------- arguments


def _sequence(value: object, name: str) -> list[Any]:
    if isinstance(value, str | bytes | os.PathLike) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a list (one entry per item), not "
                        f"{type(value).__name__}")
    if not value:
        raise ValueError(f"{name} must not be empty")
    return list(value)


def _options(fallback: bool, placeholder: bool, on_content_policy: bool) -> dict[str, bool]:
    for name, value in (("fallback", fallback), ("placeholder", placeholder),
                        ("fallback_on_content_policy", on_content_policy)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False")
    return {"fallback": fallback, "placeholder": placeholder,
            "fallback_on_content_policy": on_content_policy}


def _params(params: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The model's parameters, with local reference files inlined as data: URIs."""
    if not isinstance(params, Mapping):
        raise TypeError(f"{where} must be a mapping of parameter names to values")
    clean: dict[str, Any] = {}
    for name, value in params.items():
        if name in _RESERVED:
            raise ValueError(f"{where}: '{name}' is not a model parameter here"
                             + (" (use output_filepath to name the file)"
                                if name.startswith("custom_filename") else ""))
        if name in REFERENCE_KEYS:
            value = _inline(value, f"{where}.{name}")
        clean[name] = value
    return clean


def _inline(value: object, field: str) -> object:
    """A pathlib.Path (or a list of them) becomes a data: URI; anything else is left to the
    validator (a plain string must be a URL: it is never read as a path)."""
    if isinstance(value, list):
        return [_inline(v, f"{field}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, Path):
        return value
    try:
        data = value.read_bytes()
    except OSError as exc:
        raise ValueError(f"{field}: cannot read {value}: {exc.strerror}") from None
    mime = mimetypes.guess_type(value.name)[0] or "application/octet-stream"
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _destination(path: FilePath, field: str) -> _Destination:
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"{field} must be a path (str or os.PathLike)")
    target = Path(path)
    stem = safe_filename(target.name, field)
    return _Destination(directory=target.parent, stem=stem,
                        asked_suffix=target.name[len(stem):], field=field)


def _destinations(paths: Sequence[FilePath | None] | None, count: int, field: str, *,
                  attribute: str | None = None) -> list[_Destination | None]:
    if paths is None:
        return [None] * count
    out: list[_Destination | None] = []
    for i, path in enumerate(paths):
        where = f"{field}[{i}]" + (f".{attribute}" if attribute else "")
        out.append(_destination(path, where) if path is not None else None)
    _unique_stems(out, field, attribute=attribute)
    return out


def _unique_stems(destinations: Sequence[_Destination | None], field: str, *,
                  attribute: str | None = None) -> None:
    """Two items may not end up in the same file."""
    seen: dict[tuple[Path, str], int] = {}
    for i, destination in enumerate(destinations):
        if destination is None:
            continue
        key = (destination.directory.resolve(), destination.stem.casefold())
        other = seen.setdefault(key, i)
        if other != i:
            where = f"{field}[{i}]" + (f".{attribute}" if attribute else "")
            raise ValueError(f"{where} names the same file as item {other} "
                             f"({destination.directory / destination.stem}.*: an output takes "
                             "its real format's extension, so paths that differ only in "
                             "extension share one file); every item needs its own output path")


def _stems(destinations: Sequence[_Destination | None], models: Sequence[object]) -> list[str]:
    """Names in the job's own directory: the caller's name, made unique where two items share it
    (in different directories); items without a path keep the default name."""
    counts: dict[str, int] = {}
    for destination in destinations:
        if destination is not None:
            key = destination.stem.casefold()
            counts[key] = counts.get(key, 0) + 1
    stems = []
    for i, destination in enumerate(destinations):
        if destination is None:
            model = models[i]
            stems.append(default_stem(model if isinstance(model, str) else "output", i))
        elif counts[destination.stem.casefold()] > 1:
            stems.append(f"{destination.stem}_{i + 1:03d}")
        else:
            stems.append(destination.stem)
    return stems


# --------------------------------------------------------------------------- files


def _check_free(destinations: Sequence[_Destination | None], if_exists: IfExists) -> None:
    """With "refuse", fail before anything is paid for when an output's name is taken: by a file
    there now (whatever its extension), or by another item of this call."""
    if if_exists != "refuse":
        return
    names = OutputNames()
    for i, destination in enumerate(destinations):
        if destination is None:
            continue
        where = destination.directory / destination.stem
        other = names.claim(destination.directory, destination.stem, i)
        if other is not None:
            raise OutputExists(where, f"{destination.field}: {where}.* may share names with "
                               f"item {other}'s outputs (several outputs are numbered "
                               f"<name>_<n>); nothing was submitted. {_OPTIONS_HINT}")
        in_the_way = names.in_the_way(destination.directory, destination.stem)
        if in_the_way is not None:
            raise OutputExists(in_the_way, f"{destination.field}: {in_the_way} already exists "
                               f"(the output gets its real format's extension, so any "
                               f"{where}.* counts); nothing was submitted. {_OPTIONS_HINT}")


_OPTIONS_HINT = ('Pass if_exists="rename" to write beside it under a new name, or '
                 'if_exists="overwrite" to replace it.')


def _place(result: Result, destination: _Destination, job_stem: str,
           if_exists: IfExists) -> None:
    """Move the item's files from OUTPUT_DIR to where the caller asked, keeping the real
    extension; `<name>_<n>` for several outputs, as in the job (`job_stem` is the item's name in
    the job's directory). A file that is not placed stays in OUTPUT_DIR: it was paid for."""
    sources = [Path(f) for f in result.files]
    rests = [s.name[len(job_stem):] if s.name.startswith(job_stem) else s.suffix
             for s in sources]
    try:
        destination.directory.mkdir(parents=True, exist_ok=True)
        placed = place_without_clobbering(list(zip(sources, rests, strict=True)),
                                          destination.directory.absolute(), destination.stem,
                                          if_exists)
    except OutputExists as exc:
        _not_placed(result, f"{exc.path} appeared after the check and was not replaced; the "
                    f"output is kept at {', '.join(result.files)}")
        return
    except OSError as exc:
        # With "overwrite" some files may have moved already: report where each one is.
        result.files = [str(s) if s.exists() else str(destination.directory.absolute() /
                                                      f"{destination.stem}{rest}")
                        for s, rest in zip(sources, rests, strict=True)]
        _not_placed(result, f"moving the output to {destination.directory} failed: "
                    f"{exc.strerror}; still at {', '.join(result.files)}")
        return
    with contextlib.suppress(OSError):
        sources[0].parent.rmdir()  # the job's directory, now empty
    result.files = [str(p) for p in placed]
    _note_names(result, destination, placed[0], rests[0])


def _not_placed(result: Result, why: str) -> None:
    result.success = False
    result.error_type = "storage_error"
    result.error = f"generated, but {why}"


def _note_names(result: Result, destination: _Destination, first: Path, rest: str) -> None:
    """Say when the file's name is not the one asked for: a new stem, or the real extension."""
    used_stem = first.name[:len(first.name) - len(rest)]
    if used_stem != destination.stem:
        result.notes.append(f"saved as {first.name}: a file named {destination.stem}.* "
                            'already existed (if_exists="rename")')
    real = first.suffix
    if destination.asked_suffix and destination.asked_suffix.lower() != real.lower():
        result.notes.append(f"saved as {first.name}: the output is {real.lstrip('.')}, "
                            f"not {destination.asked_suffix.lstrip('.')}")


# --------------------------------------------------------------------------- module level

_default: BatchClient | None = None
_default_lock = threading.Lock()


def default_client() -> BatchClient:
    """The client behind the module-level functions: built on first use from the environment,
    closed when the interpreter exits."""
    global _default
    with _default_lock:
        if _default is None or _default.closed:
            _default = BatchClient()
            atexit.register(_default.close)
        return _default


def generate(prompt: str, model_name: str, output_filepath: FilePath | None = None, *,
             token: str | None = None, **kwargs: Any) -> Result:
    """`BatchClient.generate` on the default client."""
    return default_client().generate(prompt, model_name, output_filepath, token=token, **kwargs)


def generate_batch(prompts: Sequence[str], model_name: str,
                   output_filepaths: Sequence[FilePath | None] | None = None, *,
                   token: str | None = None, **kwargs: Any) -> list[Result]:
    """`BatchClient.generate_batch` on the default client."""
    return default_client().generate_batch(prompts, model_name, output_filepaths, token=token,
                                           **kwargs)


def generate_mixed(requests: Sequence[Request], *, token: str | None = None,
                   **kwargs: Any) -> list[Result]:
    """`BatchClient.generate_mixed` on the default client."""
    return default_client().generate_mixed(requests, token=token, **kwargs)


async def agenerate(*args: Any, **kwargs: Any) -> Result:
    return await _in_thread(generate, *args, **kwargs)


async def agenerate_batch(*args: Any, **kwargs: Any) -> list[Result]:
    return await _in_thread(generate_batch, *args, **kwargs)


async def agenerate_mixed(*args: Any, **kwargs: Any) -> list[Result]:
    return await _in_thread(generate_mixed, *args, **kwargs)

