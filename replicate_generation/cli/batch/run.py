"""The run loop: submit the input's chunks as jobs, record each finished item, stop on request."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from replicate_generation.cli.batch.backend import Backend
from replicate_generation.cli.batch.errors import Busy
from replicate_generation.cli.batch.manifest import JobLog, Manifest
from replicate_generation.cli.batch.progress import Progress, say
from replicate_generation.cli.batch.reader import Row
from replicate_generation.errors import InvalidName
from replicate_generation.jobs.rows import ITEM_TERMINAL
from replicate_generation.outputs import IfExists

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
ACTIVE_JOBS = 2  # jobs in flight at once: the next one is queued while the last items run

# The package's name, so log lines read as they always have.
log = logging.getLogger(__package__)


@dataclass
class ActiveJob:
    chunk: int
    job_id: str
    rows: list[int]  # the job's item index -> the row index
    running: int = 0


@dataclass
class Run:
    """One `run` over the input: chunks, the manifest, the backend and the stop flag."""

    rows: list[Row]
    chunk_size: int
    options: dict[str, bool]
    input_sha: str
    manifest: Manifest
    joblog: JobLog
    backend: Backend
    output_dir: Path | None
    retry_failed: bool
    poll_interval: float
    progress: Progress
    stop: threading.Event
    if_exists: IfExists = "refuse"
    active: list[ActiveJob] = field(default_factory=list)

    def chunks(self) -> list[list[int]]:
        indexes = [r.index for r in self.rows]
        return [indexes[i:i + self.chunk_size] for i in range(0, len(indexes), self.chunk_size)]

    def body(self, rows: Sequence[int]) -> dict[str, Any]:
        return {"tasks": [self.rows[i].task for i in rows], **self.options, "async": True}

    def body_sha(self, rows: Sequence[int]) -> str:
        canonical = json.dumps(self.body(rows), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def key(self, chunk: int, rows: Sequence[int], round_: int) -> str:
        material = json.dumps({"input": self.input_sha, "chunk": chunk, "rows": list(rows),
                               "round": round_, "body": self.body(rows)}, sort_keys=True)
        return "batch-cli-" + hashlib.sha256(material.encode()).hexdigest()[:48]

    def plan(self, chunk: int, rows: list[int]) -> tuple[list[int], str] | None:
        """The rows and key to ask for: a live job of this chunk holding every unfinished row,
        else a new job of just the unfinished rows; None when the chunk is done."""
        remaining = [i for i in rows if not self.manifest.finished(i, self.retry_failed)]
        if not remaining:
            return None
        failed_in = set().union(*(self.manifest.failed_in.get(i, set()) for i in remaining))
        for entry in reversed(self.joblog.for_chunk(chunk)):
            rows_then = list(entry["rows"])
            if (set(rows_then) >= set(remaining) and entry["job_id"] not in failed_in
                    and entry.get("body_sha256") == self.body_sha(rows_then)
                    and self.backend.exists(entry["job_id"])):
                return rows_then, str(entry["key"])
        round_ = sum(len(self.manifest.failed_in.get(i, ())) for i in remaining) \
            if self.retry_failed else 0
        return remaining, self.key(chunk, remaining, round_)

    def execute(self) -> int:
        pending = list(enumerate(self.chunks()))
        busy_until = 0.0
        self._show()
        while (pending or self.active) and not self.stop.is_set():
            while pending and len(self.active) < ACTIVE_JOBS and time.monotonic() >= busy_until:
                try:
                    self.start(*pending[0])
                except Busy as exc:
                    log.warning("%s; trying again in %.0f s", exc, exc.retry_after)
                    busy_until = time.monotonic() + exc.retry_after
                    break
                pending.pop(0)
            self.collect()
            self._show()
            self.stop.wait(self.poll_interval)
        return self.finish()

    def start(self, chunk: int, rows: list[int]) -> None:
        """Submit (or resume) the job for a chunk's unfinished rows; Busy when there is no room."""
        planned = self.plan(chunk, rows)
        if planned is None:
            return
        job_rows, key = planned
        job_id, created = self.backend.submit(self.body(job_rows), key)
        self.joblog.add(chunk, key, job_id, job_rows, self.body_sha(job_rows))
        log.info("chunk %d: %s job %s (%d items)", chunk,
                 "started" if created else "resumed", job_id, len(job_rows))
        self.active.append(ActiveJob(chunk=chunk, job_id=job_id, rows=job_rows))

    def collect(self) -> None:
        """Record every item that finished since the last look; drop finished jobs."""
        for job in list(self.active):
            view = self.backend.poll(job.job_id)
            if view is None:
                continue
            job.running = view.counts.get("running", 0)
            for item in view.items:
                row = self.rows[job.rows[int(item["index"])]]
                if item["state"] in ITEM_TERMINAL and not self._recorded(row, job.job_id):
                    self.record(row, item, job.job_id)
            if view.terminal:
                self.active.remove(job)

    def _recorded(self, row: Row, job_id: str) -> bool:
        record = self.manifest.latest.get(row.index)
        if record is None:
            return False
        # With --retry-failed a failure of an earlier job is not this job's answer.
        return bool(record.get("success")) or record.get("job_id") == job_id or \
            not self.retry_failed

    def record(self, row: Row, item: dict[str, Any], job_id: str) -> None:
        files = list(item.get("files") or [])
        entry: dict[str, Any] = {
            "index": row.index, "prompt": row.prompt, "success": bool(item["success"]),
            "state": item["state"], "files": files, "model_requested": item["model_requested"],
            "model_used": item["model_used"], "prediction_id": item["prediction_id"],
            "error": item["error"], "error_type": item["error_type"],
            "cost_usd": item["cost_usd"], "placeholder": bool(item["placeholder"]),
            "routed": item.get("routed"), "job_id": job_id,
        }
        if self.backend.mode == "service":
            entry["urls"] = list(item.get("urls") or [])
        if files:
            try:
                local = self.backend.place(item, row, self.output_dir, self.if_exists)
            except (OSError, InvalidName, requests.RequestException) as exc:
                entry["copy_error"] = str(exc) or type(exc).__name__
                log.warning("%s: the files could not be saved locally: %s", row.where,
                            entry["copy_error"])
            else:
                if local:
                    entry["files"] = local
        self.manifest.write(entry)

    def _show(self, force: bool = False) -> None:
        done = sum(1 for r in self.rows if r.index in self.manifest.latest)
        failed = sum(1 for r in self.rows if r.index in self.manifest.latest
                     and not self.manifest.latest[r.index].get("success"))
        self.progress.update(done, failed, sum(j.running for j in self.active), force=force)

    def finish(self) -> int:
        if self.stop.is_set():
            self.backend.stop()
            self.collect()  # items that ended while stopping
        self._show(force=True)
        self.progress.finish()
        done = [self.manifest.latest[r.index] for r in self.rows
                if r.index in self.manifest.latest]
        failed = sum(1 for d in done if not d.get("success"))
        cost = round(sum(float(d.get("cost_usd") or 0) for d in done), 6)
        say(f"{len(done)}/{len(self.rows)} items done ({failed} failed, ${cost} estimated); "
            f"manifest: {self.manifest.path}")
        if self.stop.is_set():
            where = ("the service keeps running its jobs" if self.backend.mode == "service"
                     else "running predictions are left for the next run")
            say(f"stopped: {where}; run the same command again to resume")
            return EXIT_OK
        return EXIT_FAILED if failed else EXIT_OK
