"""The bodies the JSON routes answer with: /health and /status, the results of /generate and
/generate-batch, job pages and /configure's view of the limits (a job's zip: http/files)."""

from __future__ import annotations

from typing import Any

from replicate_generation.concurrency_manager import ConcurrencyManager
from replicate_generation.http.auth import Caller
from replicate_generation.http.ended_pages import EndedPages
from replicate_generation.http.errors import STATUS_BY_KIND
from replicate_generation.http.files import signed_items
from replicate_generation.http.limit_fields import effective, limits_view, sources_view
from replicate_generation.jobs.bodies import JOB_ITEMS_SHOWN, item_body, job_body
from replicate_generation.jobs.rows import ITEM_TERMINAL, JobRow
from replicate_generation.jobs.runner import JobRunner
from replicate_generation.models import schema_fetch
from replicate_generation.models.catalogue import MODELS
from replicate_generation.observability import current_request_id
from replicate_generation.settings import Settings

SERVICE = "replicate-concurrent-generation"
VERSION = "3.1.0"
ITEM_PAGE_DEFAULT = 100
ITEM_PAGE_MAX = 500
# Pages whose items all ended, per process (they cannot change; a deleted job is a 404 first).
_ENDED_PAGES = EndedPages()


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
    items, cursor = _page_bodies(runner, job, after, limit, state)
    query = f"after={cursor}&limit={limit}" + (f"&state={state}" if state else "")
    return {"object": "list", "job_id": job.id,
            "data": signed_items([dict(item) for item in items], runner.generator.storage),
            "has_more": cursor is not None, "next_cursor": cursor,
            "next": f"/jobs/{job.id}/items?{query}" if cursor is not None else None}


def _page_bodies(runner: JobRunner, job: JobRow, after: int, limit: int,
                 state: str | None) -> tuple[list[dict[str, Any]], str | None]:
    """A page's item bodies and the next cursor; an unfiltered page of ended items is kept."""
    key = (job.id, after, limit)
    kept = _ENDED_PAGES.get(key) if state is None else None
    if kept is not None:
        return kept.items, kept.cursor
    rows = runner.store.items_page(job.id, after=after, limit=limit + 1, state=state)
    page = rows[:limit]
    cursor = str(page[-1].index) if len(rows) > limit else None
    items = [item_body(row, runner.settings.output_dir) for row in page]
    if state is None and page and all(row.state in ITEM_TERMINAL for row in page):
        _ENDED_PAGES.put(key, items, cursor)  # ended items never change again
    return items, cursor


def job_page(jobs: list[JobRow], limit: int) -> dict[str, Any]:
    """One page of a job list, given up to one job past the page (which says there is more)."""
    page = jobs[:limit]
    has_more = len(jobs) > limit
    return {"object": "list", "data": [job_body(j) for j in page], "has_more": has_more,
            "next": f"/jobs?limit={limit}&after={page[-1].id}" if has_more else None}
