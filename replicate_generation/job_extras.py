"""Two job routes beside /jobs/<id>: the job's files as one zip, and a retry of its failed items."""

from __future__ import annotations

import tempfile
import zipfile
from pathlib import Path, PurePosixPath

from flask import Blueprint, Flask, Response, g, jsonify, send_file
from werkzeug.wrappers import Response as WerkzeugResponse

from replicate_generation.app import ApiError, _owned_job, _paying_token, _runner, require_key
from replicate_generation.generation import Task
from replicate_generation.jobs.runner import Submission, output_path
from replicate_generation.jobs.store import ItemRow

bp = Blueprint("extras", __name__)
# Zips larger than this spill from memory to a temporary file on disk.
SPOOL_BYTES = 8 * 1024 * 1024


def register(app: Flask) -> None:
    app.register_blueprint(bp)


@bp.get("/jobs/<job_id>/archive")
@require_key()
def job_archive(job_id: str) -> WerkzeugResponse:
    """Every file the job wrote, in input order, as one zip named after the job."""
    job = _owned_job(job_id)
    runner = _runner()
    spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)  # send_file closes it
    _write_zip(spool, runner.store.items(job.id), runner.generator.runtime.output_root)
    spool.seek(0)
    return send_file(spool, mimetype="application/zip", as_attachment=True,
                     download_name=f"{job.id}.zip", max_age=0)


def _write_zip(target: tempfile.SpooledTemporaryFile[bytes], items: list[ItemRow],
               root: Path) -> None:
    """Store each file under its own name (names are unique within a job's directory)."""
    with zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as archive:
        for item in items:
            for relative in item.files:
                path = output_path(root, relative)
                if path is not None and path.is_file():
                    archive.write(path, arcname=PurePosixPath(relative).name)


@bp.post("/jobs/<job_id>/retry")
@require_key()
def retry_job(job_id: str) -> tuple[Response, int, dict[str, str]]:
    """A new job with the failed items, same models and parameters: 202 with the new job."""
    job = _owned_job(job_id)
    runner = _runner()
    tasks = _failed_tasks(runner.store.items(job.id))
    if not tasks:
        raise ApiError(409, "This job has no failed item to retry")
    submission = Submission(kind=job.kind, tasks=tasks)
    new_job, _ = runner.submit(_paying_token(g.caller), submission)
    body = runner.describe(new_job, url_root="", items=False)
    body["retry_of"] = job.id
    return jsonify(body), 202, {"Location": f"/jobs/{new_job.id}"}


def _failed_tasks(items: list[ItemRow]) -> list[Task]:
    failed = [item for item in items if item.state == "failed"]
    return [Task.from_record(index, item.spec) for index, item in enumerate(failed)]
