"""The JSON a job and its items are shown as: the API's job bodies, the webhook payload, and the
items the library and the CLI read. Stored file paths are shown under OUTPUT_DIR, URLs under /files.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

from replicate_generation.jobs.rows import ItemRow, JobRow


def job_body(job: JobRow, items: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """State, counts, cost and timestamps (all kept on the job's row); given item bodies, those
    too."""
    body: dict[str, Any] = {
        "id": job.id, "object": "job", "kind": job.kind, "state": job.state,
        "status_url": f"/jobs/{job.id}", "output_id": job.request_id,
        "request_id": job.request_id,  # the output directory's id, as before: see output_id
        "total": job.item_count, "counts": job.counts,
        "created_at": _iso(job.created_at), "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at),
        "cancel_requested_at": _iso(job.cancel_requested_at),
        "cost_usd": job.cost_usd,
    }
    if job.webhook_url:
        body["webhook"] = {"url": job.webhook_url, "state": job.webhook_state,
                           "attempts": job.webhook_attempts, "error": job.webhook_error}
    if items is not None:
        body["items"] = items
    return body


# Items a job's own document carries (GET /jobs/<id>, its webhook); the rest are paged.
JOB_ITEMS_SHOWN = 50


def job_with_first_items(job: JobRow, rows: list[ItemRow], output_dir: Path) -> dict[str, Any]:
    """The job's body with its first JOB_ITEMS_SHOWN of `rows` (read one more, to know whether
    more follow) and the link that pages on through the rest."""
    shown = rows[:JOB_ITEMS_SHOWN]
    more = len(rows) > JOB_ITEMS_SHOWN
    body = job_body(job, [item_body(row, output_dir) for row in shown])
    body["items_has_more"] = more
    body["items_next"] = (f"/jobs/{job.id}/items?after={shown[-1].index}&limit={JOB_ITEMS_SHOWN}"
                          if more else None)
    return body


def item_body(item: ItemRow, output_dir: Path) -> dict[str, Any]:
    """One item: its outcome, files (under `output_dir`), URLs, attempts, cost and times."""
    spec = item.spec
    return {
        "index": item.index, "state": item.state,
        "success": item.state == "succeeded",
        "prompt": spec["input"].get("prompt"),
        "name": spec.get("stem"),  # its files' name (custom_filename), known from submission
        "seed": spec["input"].get("seed"),
        "files": [(output_dir / f).as_posix() for f in item.files],
        # Percent-encoded: a name may hold '#', '%' or ' ', and /files decodes once.
        "urls": [f"/files/{quote(f)}" for f in item.files],
        "count": len(item.files),
        "model_requested": spec["requested"],
        "model_used": item.model_used,
        "routed": spec.get("routed"),
        "notes": [*spec.get("notes", []), *item.notes],
        "prediction_id": item.prediction_id or _last_prediction(item.attempts),
        "attempts": [_public_attempt(a) for a in item.attempts],
        "cost_usd": item.cost_usd,
        "placeholder": item.placeholder,
        "error": item.error, "error_type": item.error_type,
        "queued_at": _iso(item.queued_at), "started_at": _iso(item.started_at),
        "finished_at": _iso(item.finished_at),
    }


# What a caller sees of an attempt; the create's intent (time, input digest) is for reconciling.
_ATTEMPT_FIELDS = ("model", "prediction_id", "status", "error")


def _public_attempt(attempt: dict[str, Any]) -> dict[str, Any]:
    return {key: attempt.get(key) for key in _ATTEMPT_FIELDS}


def _last_prediction(attempts: list[dict[str, Any]]) -> str | None:
    for attempt in reversed(attempts):
        if attempt.get("prediction_id"):
            return str(attempt["prediction_id"])
    return None


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"
