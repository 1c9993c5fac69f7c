"""Jobs on a running service, over its HTTP API (`run --service-url`)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import requests

from replicate_generation.cli.batch.backend import JobView
from replicate_generation.cli.batch.errors import Busy, UsageError
from replicate_generation.cli.batch.files import place_files
from replicate_generation.cli.batch.reader import Row, curated, curated_types
from replicate_generation.errors import InvalidRequest
from replicate_generation.models.chains import FallbackChains
from replicate_generation.models.schemas import parse_ref
from replicate_generation.outputs import IfExists
from replicate_generation.outputs.storage import write_atomically
from replicate_generation.request_parsing import parse_batch

HTTP_TIMEOUT = 30.0
# Items per GET /jobs/<id>/items (the service's largest page).
ITEM_PAGE = 500

# The package's name, so log lines read as they always have.
log = logging.getLogger(__package__)


class ServiceBackend:
    """Jobs on a running service, over its HTTP API."""

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        self.url = url.rstrip("/")
        self.session = requests.Session()
        self.session.headers.update(headers)
        self.mode = "service"
        # Per job, how many items had ended at the last look: no change, no pages read.
        self._ended: dict[str, int] = {}

    def parameter_types(self, model: str) -> Mapping[str, str] | None:
        """The catalogue's types, or the service's word on another model (GET /models/...)."""
        parsed = parse_ref(model)
        if curated(model) is not None or parsed is None:
            return curated_types(model)
        response = self._get(f"/models/{parsed[0]}")
        if response is None or response.status_code != 200:
            return None  # the check of the whole input reports it, with the line
        params = response.json().get("parameters")
        return {str(name): str(param.get("type")) for name, param in params.items()
                if isinstance(param, dict)} if isinstance(params, dict) else None

    def check(self, body: dict[str, Any], max_items: int) -> None:
        """Curated models are checked here; a chunk with any other model by the service, as a
        dry run (its MODEL_POLICY and schemas; nothing is created)."""
        tasks = body.get("tasks") or []
        if all(curated(str(task.get("model_name"))) is not None for task in tasks):
            parse_batch(body, max_items, FallbackChains.default())
            return
        try:
            response = self.session.post(f"{self.url}/generate-batch", timeout=HTTP_TIMEOUT,
                                         json={**body, "dry_run": True})
        except requests.RequestException as exc:
            raise UsageError(f"cannot reach the service to check the input "
                             f"({type(exc).__name__})") from None
        if response.status_code == 400:
            data = response.json()
            raise InvalidRequest(str(data.get("field") or ""), str(data.get("error")))
        if response.status_code != 200:
            raise UsageError(f"the service could not check the input "
                             f"({response.status_code}): {_error_text(response)}")

    def submit(self, body: dict[str, Any], key: str) -> tuple[str, bool]:
        try:
            response = self.session.post(
                f"{self.url}/generate-batch", json=body, timeout=HTTP_TIMEOUT,
                headers={"Idempotency-Key": key, "Prefer": "respond-async"})
        except requests.RequestException as exc:
            # The answer may be lost after the job was made: the same key gets it back.
            raise Busy(2.0, f"cannot reach the service ({type(exc).__name__})") from None
        if response.status_code in (200, 201, 202):
            data = response.json()
            return str(data["id"]), response.headers.get("Idempotent-Replayed") != "true"
        if response.status_code in (429, 503) or response.status_code >= 500:
            raise Busy(_retry_after(response), f"the service answered {response.status_code}")
        raise UsageError(f"the service refused the request ({response.status_code}): "
                         f"{_error_text(response)}")

    def exists(self, job_id: str) -> bool:
        response = self._get(f"/jobs/{job_id}")
        return response is not None and response.status_code == 200

    def poll(self, job_id: str) -> JobView | None:
        response = self._get(f"/jobs/{job_id}")
        if response is None or response.status_code >= 500 or response.status_code == 429:
            return None  # try again at the next round
        if response.status_code != 200:
            raise UsageError(f"GET /jobs/{job_id} answered {response.status_code}: "
                             f"{_error_text(response)}")
        data = response.json()
        counts = dict(data["counts"])
        ended = sum(n for state, n in counts.items() if state not in ("queued", "running"))
        if ended == self._ended.get(job_id):
            items: list[dict[str, Any]] | None = []  # nothing ended since the last look
        else:
            items = self._every_item(job_id, data)
        if items is None:
            return None
        self._ended[job_id] = ended
        return JobView(state=str(data["state"]), counts=counts, items=items)

    def _every_item(self, job_id: str, job: dict[str, Any]) -> list[dict[str, Any]] | None:
        """The job's items, page after page (None: a page failed; the next round tries again)."""
        items = list(job["items"])
        more = bool(job.get("items_has_more"))
        while more:
            response = self._get(f"/jobs/{job_id}/items?after={items[-1]['index']}"
                                 f"&limit={ITEM_PAGE}")
            if response is None or response.status_code != 200:
                return None
            page = response.json()
            items += page["data"]
            more = bool(page["has_more"])
        return items

    def place(self, item: dict[str, Any], row: Row, output_dir: Path | None,
              if_exists: IfExists) -> list[str]:
        return place_files(list(item.get("urls") or []), row, output_dir, self._download,
                           if_exists)

    def _download(self, url: str, target: Path) -> None:
        # The bytes, never a redirect to a bucket that would carry our key along.
        with self.session.get(f"{self.url}{url}", stream=True, timeout=HTTP_TIMEOUT,
                              headers={"X-Output-Delivery": "stream"}) as response:
            if response.status_code != 200:
                raise OSError(f"GET {url} answered {response.status_code}")
            write_atomically(target, response.iter_content(1024 * 1024))

    def _get(self, path: str) -> requests.Response | None:
        try:
            return self.session.get(f"{self.url}{path}", timeout=HTTP_TIMEOUT)
        except requests.RequestException as exc:
            log.warning("GET %s failed: %s", path, type(exc).__name__)
            return None

    def stop(self) -> None:
        """Nothing to stop here: the service keeps running the jobs."""

    def close(self) -> None:
        self.session.close()


def _retry_after(response: requests.Response) -> float:
    try:
        return max(0.5, min(60.0, float(response.headers.get("Retry-After", "2"))))
    except ValueError:
        return 2.0


def _error_text(response: requests.Response) -> str:
    try:
        data = response.json()
    except ValueError:
        return response.text[:300]
    if isinstance(data, dict) and "error" in data:
        where = f" (field {data['field']})" if data.get("field") else ""
        return f"{data['error']}{where}"
    return str(data)[:300]
