"""The bodies the JSON routes answer with: /health and /status, the results of /generate and
/generate-batch, job pages, /configure's view of the limits, and a job's files as one zip,
streamed as it is written (stored, ZIP64 where needed), never built whole first."""

from __future__ import annotations

import os
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import IO, Any

from replicate_generation.concurrency_manager import ConcurrencyManager
from replicate_generation.http.auth import Caller
from replicate_generation.http.errors import STATUS_BY_KIND
from replicate_generation.http.files import signed_items
from replicate_generation.http.limit_fields import effective, limits_view, sources_view
from replicate_generation.jobs.bodies import item_body, job_body
from replicate_generation.jobs.rows import JobRow
from replicate_generation.jobs.runner import JobRunner
from replicate_generation.models import schema_fetch
from replicate_generation.models.catalogue import MODELS
from replicate_generation.observability import current_request_id
from replicate_generation.settings import Settings

SERVICE = "replicate-concurrent-generation"
VERSION = "3.1.0"
# A job's zip is read from its files and sent in pieces of this size.
ZIP_CHUNK_BYTES = 1024 * 1024


def health(settings: Settings, runner: JobRunner) -> dict[str, Any]:
    """Liveness, each backend, and the limits in force when the limiter answers."""
    dependencies = runner.dependencies()
    storage = runner.generator.storage
    dependencies["outputs"] = {"backend": storage.kind, "status": storage.status(),
                               "location": storage.location()}
    healthy = all(d["status"] == "ok" for d in dependencies.values())
    return {"status": "healthy" if healthy else "degraded", "service": SERVICE,
            "version": VERSION, "supported_models": sorted(MODELS),
            "dependencies": dependencies,
            "concurrency_status": limits_view(runner.generator.manager.limits())
            if dependencies["limits"]["status"] == "ok" else None,
            "admin_key_configured": bool(settings.admin_api_key),
            "server_token_configured": bool(settings.replicate_api_token)}


def status(caller: Caller | None, settings: Settings, runner: JobRunner) -> dict[str, Any]:
    """Totals for everyone, the caller's account for a user, every account for the admin."""
    generator = runner.generator
    totals = generator.manager.stats()
    accounts = [a for a in totals if caller is not None and (caller.admin or
                                                              a.account == caller.account)]
    sources = generator.manager.limit_sources()
    # Admin only: what this process keeps per account (bounded by the accounts with work here)
    # and of non-curated models' schemas (bounded by SCHEMA_CACHE_MAX_BYTES).
    held = {"process": runner.accounts.held(), "schema_cache": schema_fetch.CACHE.usage()
            } if caller is not None and caller.admin else {}
    return {
        **held,
        "service": SERVICE, "version": VERSION, "backends": runner.backends(),
        "limits": limits_view(effective(sources)),
        "limit_sources": sources_view(sources),
        "admin_api_configured": bool(settings.admin_api_key),
        "default_replicate_key_configured": bool(settings.replicate_api_token),
        "totals": {"in_flight": sum(a.in_flight for a in totals),
                   "waiting": sum(a.waiting for a in totals),
                   "creates_last_minute": sum(a.creates_last_minute for a in totals),
                   "queued_in_this_process": generator.dispatcher.queued()},
        "accounts": [{**a._asdict(), "queued_in_this_process": generator.dispatcher.queued(
            a.account)} for a in accounts]}


def configuration(manager: ConcurrencyManager, message: str) -> dict[str, Any]:
    """The limits in force after a /configure change, and what set each one."""
    sources = manager.limit_sources()
    return {"success": True, "message": message, "new_settings": limits_view(effective(sources)),
            "limit_sources": sources_view(sources)}


def single_result(job: JobRow, items: list[dict[str, Any]]) -> tuple[dict[str, Any], int]:
    """The seed's /generate shape, plus the job and the full result."""
    item = items[0]
    body: dict[str, Any] = {"success": item["success"], "model_name": item["model_requested"],
                            "model_used": item["model_used"], "prompt": item["prompt"],
                            "files": item["files"], "urls": item["urls"],
                            "count": item["count"], "prediction_id": item["prediction_id"],
                            "request_id": current_request_id(), "output_id": job.request_id,
                            "job_id": job.id, "cost_usd": item["cost_usd"], "results": items}
    if item["success"]:
        return body, 200
    body["error"] = f"Generation failed: {item['error']}"
    body["error_type"] = item["error_type"]
    body["placeholder"] = item["placeholder"]
    return body, STATUS_BY_KIND.get(str(item["error_type"]), 502)


def batch_result(job: JobRow, items: list[dict[str, Any]]) -> tuple[dict[str, Any], int]:
    """The seed's /generate-batch shape, plus the job and every result in input order."""
    ok = [i for i in items if i["success"]]
    failed = [i for i in items if not i["success"]]
    models = sorted({str(i["model_requested"]) for i in items})
    return {
        "success": not failed, "model_name": models[0] if len(models) == 1 else models,
        "request_id": current_request_id(), "output_id": job.request_id, "job_id": job.id,
        "state": job.state,
        "total_prompts": len(items), "successful_count": len(ok), "failed_count": len(failed),
        "successful_results": [{"prompt_index": i["index"], "files": i["files"],
                                "urls": i["urls"], "prompt": i["prompt"], "count": i["count"]}
                               for i in ok],
        "failed_results": [{"prompt_index": i["index"], "prompt": i["prompt"],
                            "error": i["error"], "error_type": i["error_type"]}
                           for i in failed],
        "cost_usd": round(sum(float(i["cost_usd"] or 0) for i in items), 6),
        "results": items}, 200


def job_summary(runner: JobRunner, job: JobRow) -> dict[str, Any]:
    """A job as GET /jobs/<id> shows it: its kept counts and cost, and its first JOB_ITEMS_SHOWN
    items; `items_next` pages on through the rest."""
    page = item_page(runner, job, after=-1, limit=JOB_ITEMS_SHOWN)
    body = job_body(job, page["data"])
    body["items_has_more"], body["items_next"] = page["has_more"], page["next"]
    return body


def item_page(runner: JobRunner, job: JobRow, *, after: int, limit: int,
              state: str | None = None) -> dict[str, Any]:
    """Up to `limit` of the job's items past index `after` (of `state`, if given), in input
    order; `next_cursor` is the `after` of the next page."""
    rows = runner.store.items_page(job.id, after=after, limit=limit + 1, state=state)
    page = rows[:limit]
    more = len(rows) > limit
    cursor = str(page[-1].index) if more else None
    query = f"after={cursor}&limit={limit}" + (f"&state={state}" if state else "")
    return {"object": "list", "job_id": job.id,
            "data": signed_items([item_body(row, runner.settings.output_dir) for row in page],
                                 runner.generator.storage),
            "has_more": more, "next_cursor": cursor,
            "next": f"/jobs/{job.id}/items?{query}" if more else None}


def job_page(jobs: list[JobRow], limit: int) -> dict[str, Any]:
    """One page of a job list, given up to one job past the page (which says there is more)."""
    page = jobs[:limit]
    has_more = len(jobs) > limit
    return {"object": "list", "data": [job_body(j) for j in page], "has_more": has_more,
            "next": f"/jobs?limit={limit}&after={page[-1].id}" if has_more else None}


def job_zip(runner: JobRunner, job: JobRow) -> Iterator[bytes]:
    """Every file the job wrote, in input order, each under its own name (unique in the job),
    as zip bytes made while they are sent: memory holds one piece, the disk nothing more."""
    root = runner.generator.runtime.output_root
    files = [(PurePosixPath(relative).name, path) for item in runner.store.items(job.id)
             for relative in item.files
             if (path := output_path(root, relative)) is not None and path.is_file()]
    return stream_zip(files)


class _Pieces:
    """A write-only file that keeps what zipfile writes until it is taken to be sent."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        return None

    def close(self) -> None:
        return None

    def take(self) -> bytes:
        data = b"".join(self._parts)
        self._parts.clear()
        return data


def stream_zip(files: list[tuple[str, Path]]) -> Iterator[bytes]:
    """A stored zip of `(name, path)` files, yielded piece by piece; with no seekable target,
    zipfile writes each entry's sizes after its data, and ZIP64 records where sizes need them."""
    pieces = _Pieces()
    with zipfile.ZipFile(pieces, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, path in files:
            try:
                source = path.open("rb")
            except OSError:
                continue  # removed since it was listed: the rest still go out
            with source:
                yield from _stored_entry(archive, pieces, name, source)
        yield pieces.take()
    yield pieces.take()  # the central directory


def _stored_entry(archive: zipfile.ZipFile, pieces: _Pieces, name: str,
                  source: IO[bytes]) -> Iterator[bytes]:
    stat = os.fstat(source.fileno())
    # zip has no time before 1980: an older (or unset) mtime is shown as 1980.
    info = zipfile.ZipInfo(name, max(time.localtime(stat.st_mtime)[:6], (1980, 1, 1, 0, 0, 0)))
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = 0o644 << 16
    info.file_size = stat.st_size  # read no more than this: zipfile chose ZIP64 by it
    left = stat.st_size
    with archive.open(info, "w") as entry:
        while left > 0 and (block := source.read(min(ZIP_CHUNK_BYTES, left))):
            entry.write(block)
            left -= len(block)
            yield pieces.take()
