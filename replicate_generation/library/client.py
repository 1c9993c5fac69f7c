"""`BatchClient`: one job runner shared by many calls, which submits a call's items as jobs of at
most MAX_BATCH_SIZE, waits for them (cancelling them on Ctrl-C) and places their files."""

from __future__ import annotations

import atexit
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from replicate_generation.errors import QueueFull, SettingsError
from replicate_generation.generation import Generator, Task
from replicate_generation.jobs.bodies import item_body
from replicate_generation.jobs.rows import ItemRow, JobRow
from replicate_generation.jobs.runner import JobRunner, Submission
from replicate_generation.library.arguments import (
    Destination,
    as_list,
    destination_of,
    destinations_of,
    job_stems,
    mode_options,
    model_params,
)
from replicate_generation.library.cancellation import CANCEL, in_thread, raise_if_cancelled
from replicate_generation.library.placement import check_free, place
from replicate_generation.library.results import FilePath, Request, Result
from replicate_generation.library.status import load_settings
from replicate_generation.models.schema_fetch import Resolver, resolving
from replicate_generation.outputs import IfExists, check_if_exists, local_copies
from replicate_generation.request_parsing import parse_batch, parse_single, request_hash
from replicate_generation.settings import Settings

# Before offering a chunk again when other calls' jobs fill this process's queue.
_QUEUE_FULL_PAUSE = 1.0
# How often a waiting call looks whether its awaiting task was cancelled.
_CANCEL_CHECK = 0.2


@dataclass
class _Chunk:
    tasks: list[Task]
    offset: int
    job: JobRow | None = None


class BatchClient:
    """A reusable session: one job runner (threads, HTTP clients, state file) for many calls.

    `max_concurrent` caps this client under the account's limit; `close()` leaves work to resume.
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
                # "library": never resume the service's jobs, which belong in its output directory.
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

    def generate(self, prompt: str | None, model_name: str,
                 output_filepath: FilePath | None = None, *, token: str | None = None,
                 fallback: bool = True, placeholder: bool = False,
                 fallback_on_content_policy: bool = False, if_exists: IfExists = "refuse",
                 **params: Any) -> Result:
        """Generate one prompt's outputs; `params` are the model's parameters (None as the prompt
        for a model that takes none).

        `if_exists`: what to do when `output_filepath`'s name is taken (docs/library.md).
        """
        check_if_exists(if_exists)
        clean = model_params(params, "params")
        options = mode_options(fallback, placeholder, fallback_on_content_policy)
        destination = destination_of(output_filepath, "output_filepath") \
            if output_filepath is not None else None
        body: dict[str, Any] = {"model_name": model_name, **_prompt(prompt), **clean, **options}
        if destination is not None:
            body["custom_filename"] = destination.stem
        with self.other_models(token):
            parsed = parse_single(body, self.chains)
        return self._run("generate", parsed.tasks, [destination], token, if_exists)[0]

    def generate_batch(self, prompts: Sequence[str], model_name: str,
                       output_filepaths: Sequence[FilePath | None] | None = None, *,
                       token: str | None = None, fallback: bool = True,
                       placeholder: bool = False, fallback_on_content_policy: bool = False,
                       if_exists: IfExists = "refuse", **params: Any) -> list[Result]:
        """Generate many prompts with one model in parallel; `params` apply to every prompt.

        `output_filepaths` parallels `prompts`; a None keeps the default name under OUTPUT_DIR.
        """
        check_if_exists(if_exists)
        prompt_list = as_list(prompts, "prompts")
        paths = None
        if output_filepaths is not None:
            paths = as_list(output_filepaths, "output_filepaths")
            if len(paths) != len(prompt_list):
                raise ValueError(f"output_filepaths has {len(paths)} items but prompts has "
                                 f"{len(prompt_list)}; give one output path per prompt")
        clean = model_params(params, "params")
        destinations = destinations_of(paths, len(prompt_list), "output_filepaths")
        body: dict[str, Any] = {"model_name": model_name, "prompts": prompt_list, **clean,
                                **mode_options(fallback, placeholder, fallback_on_content_policy)}
        if any(d is not None for d in destinations):
            body["custom_filenames"] = job_stems(destinations, [model_name] * len(prompt_list))
        with self.other_models(token):
            parsed = parse_batch(body, max(1, len(prompt_list)), self.chains)
        return self._run("batch", parsed.tasks, destinations, token, if_exists)

    def generate_mixed(self, requests: Sequence[Request], *, token: str | None = None,
                       fallback: bool = True, placeholder: bool = False,
                       fallback_on_content_policy: bool = False,
                       if_exists: IfExists = "refuse") -> list[Result]:
        """Generate items that each name their own model and parameters, in parallel."""
        check_if_exists(if_exists)
        items = as_list(requests, "requests")
        for i, item in enumerate(items):
            if not isinstance(item, Request):
                raise TypeError(f"requests[{i}] must be a replicate_generation.library.Request")
        destinations = destinations_of([r.output_filepath for r in items], len(items),
                                     "requests", attribute="output_filepath")
        stems = job_stems(destinations, [r.model_name for r in items])
        tasks: list[dict[str, Any]] = []
        for i, (item, destination) in enumerate(zip(items, destinations, strict=True)):
            task = {"model_name": item.model_name, **_prompt(item.prompt),
                    **model_params(item.params, f"requests[{i}].params")}
            if destination is not None:
                task["custom_filename"] = stems[i]
            tasks.append(task)
        body: dict[str, Any] = {"tasks": tasks,
                                **mode_options(fallback, placeholder, fallback_on_content_policy)}
        with self.other_models(token):
            parsed = parse_batch(body, max(1, len(items)), self.chains)
        return self._run("batch", parsed.tasks, destinations, token, if_exists)

    async def agenerate(self, *args: Any, **kwargs: Any) -> Result:
        return await in_thread(self.generate, *args, **kwargs)

    async def agenerate_batch(self, *args: Any, **kwargs: Any) -> list[Result]:
        return await in_thread(self.generate_batch, *args, **kwargs)

    async def agenerate_mixed(self, *args: Any, **kwargs: Any) -> list[Result]:
        return await in_thread(self.generate_mixed, *args, **kwargs)

    # -- lower level: what the CLI uses --------------------------------------------------------

    def submit_body(self, body: dict[str, Any], *, idempotency_key: str | None = None,
                    token: str | None = None) -> tuple[JobRow, bool]:
        """Submit a /generate-batch body as a job without waiting; return (job, created).

        A reused idempotency key returns its job; raises InvalidRequest, InvalidName or QueueFull.
        """
        with self.other_models(token):
            parsed = parse_batch(body, self.settings.max_batch_size, self.chains)
        submission = Submission(kind="batch", tasks=parsed.tasks, idempotency_key=idempotency_key,
                                request_hash=request_hash("/generate-batch", body))
        return self.runner.submit(self.token(token), submission)

    @contextmanager
    def other_models(self, token: str | None = None) -> Iterator[None]:
        """Within the block, parsing also accepts the models MODEL_POLICY allows, each checked
        against its own schema (fetched with the paying token), as the service checks them."""
        if self.settings.model_policy.mode == "curated":
            yield
            return
        resolver = Resolver(policy=self.settings.model_policy,
                            rt=self.runner.generator.runtime, token=lambda: self.token(token))
        with resolving(resolver):
            yield

    def describe_item(self, item: ItemRow) -> dict[str, Any]:
        """An item as the API shows it, with `files` as real paths on this machine (with
        OUTPUT_STORAGE: the bucket's s3:// URIs)."""
        described = item_body(item, self.settings.output_dir)
        described["files"] = [self.runner.generator.storage.locate(f) for f in item.files]
        return described

    # -- running -------------------------------------------------------------------------------

    def _run(self, kind: str, tasks: list[Task], destinations: Sequence[Destination | None],
             token: str | None, if_exists: IfExists) -> list[Result]:
        """Submit the tasks as jobs of at most MAX_BATCH_SIZE items, wait, place the files."""
        paying = self.token(token)
        check_free(destinations, if_exists, [not task.spec.curated for task in tasks])
        runner = self.runner
        cancel = CANCEL.get() or threading.Event()
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
            # Interrupted (Ctrl-C, cancelled) or broken: nobody will collect these, so stop paying.
            for chunk in chunks:
                if chunk.job is not None:
                    runner.cancel(chunk.job.id)
            raise
        for result in results:
            destination = destinations[result.index]
            if destination is not None and result.files:
                # With OUTPUT_STORAGE, copies of the bucket's files are what moves there.
                result.files = local_copies(runner.generator.storage, result.files)
                place(result, destination, tasks[result.index].stem, if_exists)
        return results

    def _submit(self, runner: JobRunner, token: str, kind: str, chunk: _Chunk,
                earlier: list[_Chunk], cancel: threading.Event) -> JobRow:
        while True:
            raise_if_cancelled(cancel)
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
            index=offset + item.index, prompt=view["prompt"], success=bool(view["success"]),
            files=list(view["files"]), model_requested=str(view["model_requested"]),
            model_used=view["model_used"], attempts=list(view["attempts"]),
            prediction_id=view["prediction_id"], error=view["error"],
            error_type=view["error_type"], cost_usd=view["cost_usd"],
            placeholder=bool(view["placeholder"]), routed=view["routed"],
            notes=list(view["notes"]), job_id=job_id, state=item.state)


def _prompt(prompt: str | None) -> dict[str, Any]:
    """The prompt as a body carries it: absent for a model that takes none."""
    return {} if prompt is None else {"prompt": prompt}


def _finished(runner: JobRunner, job_id: str) -> bool:
    job = runner.store.get(job_id)
    return job is None or job.terminal


def _wait(runner: JobRunner, job_id: str, cancel: threading.Event) -> None:
    """Wait for the job to end, unless the call is cancelled first."""
    while True:
        raise_if_cancelled(cancel)
        if runner.wait(job_id, timeout=_CANCEL_CHECK) is not None or _finished(runner, job_id):
            return
