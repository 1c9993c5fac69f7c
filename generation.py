"""The Flask-free core: turn validated tasks into results, in input order.

The HTTP layer builds `Task`s and calls `Generator.run`; scripts on the host can do the same and
share the service's per-account limits through the same state file.
"""

from __future__ import annotations

import logging
import secrets
import time
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from catalogue import ModelSpec
from concurrency_manager import ConcurrencyManager, Limits, SQLiteLimitStore
from dispatcher import Dispatcher
from model_functions import (
    Attempt,
    ClientPool,
    Generated,
    GenerationError,
    Job,
    Runtime,
    account_key,
    generate,
)
from settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Task:
    """One validated item of a request."""

    index: int
    spec: ModelSpec
    input: dict[str, object]
    stem: str

    @property
    def prompt(self) -> str:
        return str(self.input["prompt"])


@dataclass
class TaskResult:
    """The outcome of one task, reported in input order."""

    task: Task
    files: list[str] = field(default_factory=list)
    prediction_id: str | None = None
    error: GenerationError | None = None
    attempts: list[Attempt] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "index": self.task.index,
            "prompt": self.task.prompt,
            "success": self.ok,
            "files": self.files,
            "count": len(self.files),
            "model_requested": self.task.spec.id,
            "model_used": self.task.spec.id if self.ok else None,
            "prediction_id": self.prediction_id,
            "attempts": [a.as_dict() for a in self.attempts],
            "error": str(self.error) if self.error else None,
        }
        if self.error is not None:
            out["error_type"] = self.error.kind
        return out


def build_limits(settings: Settings) -> Limits:
    """The limits the environment asks for (a /configure override in the store wins)."""
    return Limits(
        max_concurrent=settings.concurrent_limit,
        requests_per_minute=settings.requests_per_minute,
        burst=settings.create_burst,
        polls_per_minute=settings.polls_per_minute,
    )


class Generator:
    """Owns the limits, the per-token clients and the dispatcher of one process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        store = SQLiteLimitStore(settings.state_file, build_limits(settings),
                                 lease_ttl=settings.lease_ttl_seconds)
        self.manager = ConcurrencyManager(store)
        self.runtime = Runtime(
            manager=self.manager,
            clients=ClientPool(settings.replicate_base_url,
                               max_connections=max(100, settings.dispatch_threads)),
            output_root=settings.output_dir.resolve(),
            api_origin=_origin(settings.replicate_base_url),
            task_timeout=settings.task_timeout_seconds,
            poll_interval=settings.poll_interval_seconds,
        )
        self.dispatcher = Dispatcher(
            settings.dispatch_threads, settings.max_queued_tasks,
            runners_for=lambda _account: self.manager.limits().max_concurrent,
        )

    def new_request_dir(self) -> tuple[str, Path]:
        """A fresh directory name per request, so default names can never collide."""
        request_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(4)
        return request_id, self.runtime.output_root / request_id

    def run(self, token: str, tasks: list[Task], dest_dir: Path) -> list[TaskResult]:
        """Run the tasks in parallel within the account's limits; return results in order."""
        jobs = [Job(spec=t.spec, input=t.input, token=token, dest_dir=dest_dir, stem=t.stem)
                for t in tasks]
        results = [TaskResult(task=t) for t in tasks]
        futures = self.dispatcher.submit_many(account_key(token), [
            partial(generate, job, self.runtime, result.attempts)
            for job, result in zip(jobs, results, strict=True)])
        for result, future in zip(results, futures, strict=True):
            _collect(result, future, self.settings.output_dir)
        return results

    def close(self) -> None:
        """Stop taking work, finish what runs, give back this process's leases."""
        self.dispatcher.shutdown(wait=True)
        self.manager.shutdown()


def _collect(result: TaskResult, future: Future[Generated], shown_root: Path) -> None:
    """Fill a result from its finished future; unexpected errors never escape as a 500."""
    try:
        generated = future.result()
    except CancelledError:
        result.error = GenerationError("shutting_down", "the service stopped before this task ran")
        return
    except GenerationError as exc:
        result.error = exc
        result.prediction_id = exc.prediction_id or _last_prediction(result.attempts)
        return
    except Exception as exc:  # noqa: BLE001 - one broken task must not sink its batch
        log.exception("task %d failed unexpectedly", result.task.index)
        result.error = GenerationError("internal_error", f"internal error: {type(exc).__name__}")
        return
    result.prediction_id = generated.prediction_id
    result.files = [(shown_root / f.relative).as_posix() for f in generated.files]


def _last_prediction(attempts: list[Attempt]) -> str | None:
    for attempt in reversed(attempts):
        if attempt.prediction_id:
            return attempt.prediction_id
    return None


def _origin(url: str) -> str:
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}"
