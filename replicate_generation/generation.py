"""The Flask-free core: run one validated task down its model chain, within the account's limits.

`jobs.JobRunner` runs every task through `execute` on the `Generator`'s dispatcher; scripts on the
host use the same classes and share the service's limits through the same state file.
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from replicate_generation import metrics
from replicate_generation.backends import open_limit_store
from replicate_generation.clients import ClientPool
from replicate_generation.concurrency_manager import ConcurrencyManager
from replicate_generation.dispatcher import Dispatcher
from replicate_generation.egress import Egress, EgressPolicy, OutputBounds
from replicate_generation.errors import GenerationError, OutputsNotSaved
from replicate_generation.limits.base import ANYONE, Turn
from replicate_generation.model_functions import (
    CANCEL_WAIT_SECONDS,
    NO_HOOKS,
    Attempt,
    Generated,
    Hooks,
    Job,
    Runtime,
    generate,
)
from replicate_generation.models.catalogue import MODELS, ModelSpec
from replicate_generation.models.cost import billed_cost, max_cost
from replicate_generation.models.fallback import fallback_input, should_fall_back
from replicate_generation.models.hardware import (
    NO_TIME_PRICES,
    REPLICATE_MAX_RUN_SECONDS,
    ModelHardware,
    TimePrices,
)
from replicate_generation.models.placeholder import write_placeholder
from replicate_generation.models.schema_fetch import recheck
from replicate_generation.models.schemas import spec_from_id
from replicate_generation.outputs import DiskStorage, OutputStorage
from replicate_generation.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Task:
    """One validated item of a request: the model to call first, its input, where files go, and
    what may happen if that model fails."""

    index: int
    spec: ModelSpec
    input: dict[str, object]
    stem: str
    requested: ModelSpec | None = None
    chain: tuple[ModelSpec, ...] = ()
    routed: str | None = None
    notes: tuple[str, ...] = ()
    fallback_on_content_policy: bool = False
    placeholder: bool = False

    @property
    def prompt(self) -> str:
        return str(self.input.get("prompt", ""))  # a non-curated model may take none

    @property
    def model_requested(self) -> ModelSpec:
        return self.requested or self.spec

    def max_cost_usd(self, prices: TimePrices = NO_TIME_PRICES) -> float | None:
        """The most it may cost: its model and every fallback, as if each were billed (a
        non-curated model for the longest it can run); None when any price is unknown."""
        costs = [max_cost(self.spec, self.input, prices)]
        for spec in self.chain:
            mapped = fallback_input(self.spec, self.input, spec)
            if mapped is not None:
                costs.append(max_cost(spec, mapped[0], prices))
        known = [cost for cost in costs if cost is not None]
        return round(sum(known), 6) if len(known) == len(costs) else None

    def to_record(self) -> dict[str, object]:
        """What the job store keeps of the task (plain JSON; models by id, a non-curated
        model by its `owner/name(:version)`)."""
        return {"model": self.spec.id, "input": self.input, "stem": self.stem,
                "requested": self.model_requested.id, "chain": [m.id for m in self.chain],
                "routed": self.routed, "notes": list(self.notes),
                "fallback_on_content_policy": self.fallback_on_content_policy,
                "placeholder": self.placeholder}

    @classmethod
    def from_record(cls, index: int, record: dict[str, Any]) -> Task:
        return cls(index=index, spec=spec_from_id(record["model"]),
                   input=dict(record["input"]), stem=str(record["stem"]),
                   requested=spec_from_id(record["requested"]),
                   chain=tuple(MODELS[m] for m in record["chain"]), routed=record["routed"],
                   notes=tuple(record["notes"]),
                   fallback_on_content_policy=bool(record["fallback_on_content_policy"]),
                   placeholder=bool(record["placeholder"]))


@dataclass(frozen=True)
class Resume:
    """Where a task stood when its process stopped, on the model `model_id`."""

    model_id: str
    prediction_id: str | None = None  # a prediction to poll, never to create again
    pending: Attempt | None = None  # a create that was sent but whose answer was never stored


@dataclass
class TaskResult:
    """What running one task came to: files (relative to the output root) or an error, and every
    attempt on every model of its chain."""

    task: Task
    files: list[str] = field(default_factory=list)
    error: GenerationError | None = None
    attempts: list[Attempt] = field(default_factory=list)
    model_used: ModelSpec | None = None
    cost_usd: float | None = None
    placeholder: bool = False
    notes: list[str] = field(default_factory=list)
    billed_seconds: float | None = None
    sizes: dict[str, int] = field(default_factory=dict)  # bytes of the files this run wrote

    @property
    def ok(self) -> bool:
        return self.error is None


def execute(task: Task, token: str, rt: Runtime, dest_dir: Path, result: TaskResult, *,
            hooks: Hooks = NO_HOOKS, resume: Resume | None = None, turn: Turn = ANYONE,
            start_by: float | None = None) -> None:
    """Run the task on its model, then down its fallback chain while the model itself fails.

    `resume` (after a restart) polls or looks up a lost create; Suspended when the process stops;
    `start_by` (wall clock): no create is sent after it, on any model of the chain ("expired").
    """
    models = [task.spec, *task.chain]
    position = _resume_position(models, resume)
    for spec in models[position:]:
        mapped = _input_for(task, spec, result)
        if mapped is None:
            continue
        job = Job(spec=spec, input=mapped, token=token, dest_dir=dest_dir, stem=task.stem,
                  turn=turn, start_by=start_by)
        here = resume if resume is not None and _is_at(resume, spec) else None
        try:
            generated = generate(job, rt, result.attempts, hooks=hooks,
                                 resume=here.prediction_id if here else None,
                                 pending=here.pending if here else None)
        except GenerationError as exc:
            _failed(result, exc, spec, mapped, token, rt)
            if not should_fall_back(exc.kind,
                                    on_content_policy=task.fallback_on_content_policy):
                break
            continue
        _succeeded(result, spec, mapped, generated, rt)
        return
    if result.error is None:
        result.error = GenerationError("no_model_available", "no model of the fallback chain can "
                                       "honour this request")
    if task.placeholder and result.error.kind not in NO_PLACEHOLDER and not result.files:
        saved = write_placeholder(task.model_requested, dest_dir, task.stem,
                                  root=rt.output_root)
        result.files, result.placeholder = [saved.relative], True
        result.sizes = {saved.relative: saved.size}


def _succeeded(result: TaskResult, spec: ModelSpec, mapped: dict[str, object],
               generated: Generated, rt: Runtime) -> None:
    """Its files and cost: the catalogue's price, or billed seconds x its hardware's price
    (None, not a guess, when that is unknown)."""
    result.error, result.model_used = None, spec
    result.files = [f.relative for f in generated.files]
    result.sizes = {f.relative: f.size for f in generated.files}
    result.billed_seconds = generated.billed_seconds
    result.cost_usd = billed_cost(spec, mapped, generated.billed_seconds, rt.prices)
    metrics.cost(spec.id if spec.curated else "other", result.cost_usd)


def _failed(result: TaskResult, exc: GenerationError, spec: ModelSpec,
            mapped: dict[str, object], token: str, rt: Runtime) -> None:
    """Note the model's failure; a time-billed model's prediction is paid for all the same."""
    _note_failure(result, _after_refusal(exc, spec, mapped, token, rt))
    if not spec.curated:  # it has no fallback: its billed time is the item's
        result.billed_seconds = exc.billed_seconds
        result.cost_usd = billed_cost(spec, mapped, exc.billed_seconds, rt.prices)
    if isinstance(exc, OutputsNotSaved):
        result.files = list(exc.files)  # paid for and on disk: reported with the error


# "expired": the caller's deadline_seconds passed; a black file after it helps no one.
NO_PLACEHOLDER = frozenset({"canceled", "shutting_down", "expired"})


def _after_refusal(exc: GenerationError, spec: ModelSpec, model_input: dict[str, object],
                   token: str, rt: Runtime) -> GenerationError:
    """A 422 on a non-curated model: refresh its schema; name the field it now refuses, else
    the 422 stands."""
    if exc.kind != "replicate_invalid_input" or spec.curated:
        return exc
    problem = recheck(spec, model_input, token, rt)
    if problem is None:
        return exc
    return GenerationError("replicate_invalid_input", f"{exc} (the model's schema changed: "
                           f"{problem.field}: {problem})", prediction_id=exc.prediction_id,
                           upstream_status=exc.upstream_status)


def _resume_position(models: list[ModelSpec], resume: Resume | None) -> int:
    if resume is None:
        return 0
    for position, spec in enumerate(models):
        if _is_at(resume, spec):
            return position
    return 0


def _is_at(resume: Resume, spec: ModelSpec) -> bool:
    # A non-curated model's attempts name its ref (owner/name), not its id (which may pin one).
    return resume.model_id == spec.id or (not spec.curated and resume.model_id == spec.ref)


def _input_for(task: Task, spec: ModelSpec, result: TaskResult) -> dict[str, object] | None:
    """The task's input for this model of its chain, or None when it cannot honour it."""
    if spec is task.spec:
        return task.input
    mapped = fallback_input(task.spec, task.input, spec)
    if mapped is None:
        result.notes.append(f"fallback to {spec.id} skipped: it cannot honour this request")
        return None
    model_input, notes = mapped
    result.notes.append(f"fell back to {spec.id}")
    metrics.fell_back(task.spec.id, spec.id)
    result.notes.extend(notes)
    return model_input


def _note_failure(result: TaskResult, exc: GenerationError) -> None:
    result.error = exc
    if result.attempts and result.attempts[-1].error is None:
        # Replicate aborted it (its Cancel-After passed before it started): it never ran.
        aborted = exc.kind == "expired" and exc.prediction_id is not None
        result.attempts[-1].status = "aborted" if aborted else "failed"
        result.attempts[-1].error = str(exc)


class Generator:
    """Owns the limits, the per-token clients and the dispatcher of one process."""

    def __init__(self, settings: Settings, *, max_concurrent: int | None = None) -> None:
        """`max_concurrent` caps this process's tasks in flight per account below the account's
        shared limit (the old library's local limit); None leaves the account's limit alone."""
        if max_concurrent is not None and max_concurrent < 1:
            raise ValueError(f"max_concurrent must be at least 1, got {max_concurrent}")
        self.settings = settings
        self.max_concurrent = max_concurrent
        self.limit_store = open_limit_store(settings)
        self.manager = ConcurrencyManager(self.limit_store)
        self.storage = open_output_storage(settings)
        self.runtime = Runtime(
            manager=self.manager,
            clients=ClientPool(settings.replicate_base_url,
                               max_connections=max(100, settings.dispatch_threads)),
            output_root=self.storage.root,
            api_origin=_origin(settings.replicate_base_url),
            task_timeout=settings.task_timeout_seconds,
            poll_interval=settings.poll_interval_seconds,
            sync_wait=settings.sync_wait_seconds,
            egress=egress_for(settings),
            prices=time_prices(settings.model_hardware, settings.task_timeout_seconds),
            storage=self.storage,
        )

        def runners_for(_account: str) -> int:
            # The shared limit stays the upper bound: a local cap can only lower it.
            shared = self.manager.limits().max_concurrent
            return shared if max_concurrent is None else min(shared, max_concurrent)

        self.dispatcher = Dispatcher(settings.dispatch_threads, settings.max_queued_tasks,
                                     runners_for=runners_for,
                                     max_queued_per_account=settings.max_queued_per_account)

    def new_request_dir(self) -> tuple[str, Path]:
        """A fresh directory name per request, so default names can never collide."""
        request_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(4)
        return request_id, self.runtime.output_root / request_id

    def close(self) -> None:
        """Stop taking work, finish what runs, give back this process's leases."""
        self.dispatcher.shutdown(wait=True)
        self.manager.shutdown()
        self.limit_store.close()
        self.storage.close()


def time_prices(hardware: ModelHardware, task_timeout: float) -> TimePrices:
    """A prediction is billed at most until its task timeout and the cancel sent then (which
    may wait out a 429 back-off), and never beyond Replicate's own cap."""
    longest = min(task_timeout + CANCEL_WAIT_SECONDS, REPLICATE_MAX_RUN_SECONDS)
    return TimePrices(hardware, longest)


def open_output_storage(settings: Settings) -> OutputStorage:
    """The local volume, or (OUTPUT_STORAGE) a bucket with OUTPUT_DIR/spool as its spool."""
    if not settings.output_storage:
        return DiskStorage(settings.output_dir)
    from replicate_generation.outputs.s3 import S3Storage  # boto3 loads only where it is used

    return S3Storage(settings.output_storage, settings.output_dir / "spool",
                     endpoint_url=settings.aws_endpoint_url, region=settings.aws_region,
                     serving=settings.output_serving,
                     url_expiry_seconds=settings.output_url_expiry_seconds)


def egress_for(settings: Settings) -> Egress:
    """The egress policy and output bounds the settings name; Replicate's own origin (outputs it
    serves, the simulator's on 127.0.0.1 included) is let through whatever its address."""
    policy = EgressPolicy(
        allow_private=settings.egress_allow_private,
        max_redirects=settings.egress_max_redirects,
        min_bytes_per_second=settings.egress_min_bytes_per_second,
        stall_seconds=settings.egress_stall_seconds,
        download_seconds=settings.egress_download_seconds,
        max_decompression_ratio=settings.egress_max_decompression_ratio,
    ).trusting([settings.replicate_base_url])
    bounds = OutputBounds(
        max_file_bytes=settings.output_max_file_bytes,
        max_files_per_prediction=settings.output_max_files_per_prediction,
        max_bytes_per_prediction=settings.output_max_bytes_per_prediction,
        max_files_per_job=settings.output_max_files_per_job,
        max_bytes_per_job=settings.output_max_bytes_per_job,
    )
    return Egress(policy, bounds)


def _origin(url: str) -> str:
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}"
