"""Jobs run by this process (the library's BatchClient), sharing the host's limits (`run`)."""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

from replicate_generation.cli.batch.backend import JobView
from replicate_generation.cli.batch.errors import Busy, UsageError
from replicate_generation.cli.batch.files import copy_atomic, place_files
from replicate_generation.cli.batch.reader import Row
from replicate_generation.errors import (
    IdempotencyConflict,
    InvalidRequest,
    QueueFull,
    SchemaUnavailable,
    ShuttingDown,
    TokenRejected,
)
from replicate_generation.jobs.bodies import item_body
from replicate_generation.library import BatchClient
from replicate_generation.models.schemas import parameter_types
from replicate_generation.models.validation import resolve_model
from replicate_generation.outputs import IfExists, copy_out
from replicate_generation.request_parsing import parse_batch


class InProcessBackend:
    """Jobs run by this process's BatchClient, against the host's STATE_FILE."""

    def __init__(self, client: BatchClient, token: str) -> None:
        self.client = client
        self.token = token
        self.runner = client.runner
        self.mode = "in-process"
        self._ended: dict[str, int] = {}  # per job: items ended at the last look

    def parameter_types(self, model: str) -> Mapping[str, str] | None:
        """The model's parameter types: the catalogue's, or its own schema's (MODEL_POLICY)."""
        with self.client.other_models(self.token):
            try:
                return parameter_types(resolve_model(model))
            except (InvalidRequest, SchemaUnavailable, TokenRejected):
                return None  # the check of the whole input reports it, with the line

    def check(self, body: dict[str, Any], max_items: int) -> None:
        """Parse the chunk as the job will be, with every model MODEL_POLICY allows."""
        with self.client.other_models(self.token):
            parse_batch(body, max_items, self.client.chains)

    def submit(self, body: dict[str, Any], key: str) -> tuple[str, bool]:
        try:
            job, created = self.client.submit_body(body, idempotency_key=key, token=self.token)
        except QueueFull as exc:
            raise Busy(exc.retry_after, "this process's queue is full") from None
        except ShuttingDown:
            raise Busy(1.0, "stopping") from None
        except IdempotencyConflict:
            raise UsageError("the idempotency key was used with another body") from None
        return job.id, created

    def exists(self, job_id: str) -> bool:
        return self.runner.store.get(job_id) is not None

    def poll(self, job_id: str) -> JobView | None:
        job = self.runner.store.get(job_id)
        if job is None:
            raise UsageError(f"job {job_id} is gone from the state file")
        ended = sum(n for state, n in job.counts.items() if state not in ("queued", "running"))
        if ended == self._ended.get(job_id):
            return JobView(state=job.state, counts=job.counts, items=[])  # nothing new: no reads
        self._ended[job_id] = ended
        # The runner kept at start, not the client's: the last look comes after stop() closed it.
        storage = self.runner.generator.storage
        items = []
        for row in self.runner.store.items(job_id):
            item = item_body(row, self.runner.settings.output_dir)
            # Real paths on this machine (or, with OUTPUT_STORAGE, the bucket's s3:// URIs).
            item["files"] = [storage.locate(f) for f in row.files]
            items.append(item)
        return JobView(state=job.state, counts=job.counts, items=items)

    def place(self, item: dict[str, Any], row: Row, output_dir: Path | None,
              if_exists: IfExists) -> list[str]:
        storage = self.runner.generator.storage
        fetch = copy_atomic if storage.kind == "disk" else partial(copy_out, storage)
        return place_files(list(item.get("files") or []), row, output_dir, fetch, if_exists)

    def stop(self) -> None:
        """Leave running predictions and queued items in the state file for the next run."""
        self.client.close()

    def close(self) -> None:
        self.client.close()
