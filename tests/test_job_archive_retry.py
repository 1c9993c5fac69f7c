"""GET /jobs/<id>/archive and POST /jobs/<id>/retry over the JSON API, with ownership."""

from __future__ import annotations

import io
import zipfile
from typing import Any

from flask.testing import FlaskClient

from conftest import ADMIN, OTHER, USER
from servers import wait_for


def _run_batch(client: FlaskClient, prompts: list[str], names: list[str],
               headers: dict[str, str]) -> dict[str, Any]:
    body = {"model_name": "flux-dev", "prompts": prompts, "custom_filenames": names}
    response = client.post("/generate-batch", json=body, headers=headers)
    assert response.status_code == 200, response.get_json()
    job_id = response.get_json()["job_id"]
    return dict(client.get(f"/jobs/{job_id}", headers=headers).get_json())


def test_archive_holds_every_file_named_as_in_the_job(client: FlaskClient) -> None:
    job = _run_batch(client, ["a red car", "a blue wave", "a green path"],
                     ["car", "wave", "path"], USER)
    with client.get(f"/jobs/{job['id']}/archive", headers=USER) as response:
        assert response.status_code == 200
        assert response.content_type == "application/zip"
        names = zipfile.ZipFile(io.BytesIO(response.data)).namelist()
    assert names == [item["files"][0].rsplit("/", 1)[1] for item in job["items"]]
    assert [n.split(".")[0] for n in names] == ["car", "wave", "path"]


def test_archive_and_retry_of_someone_elses_job_are_404(client: FlaskClient) -> None:
    job = _run_batch(client, ["mine #fail"], ["mine"], USER)
    assert client.get(f"/jobs/{job['id']}/archive", headers=OTHER).status_code == 404
    assert client.post(f"/jobs/{job['id']}/retry", headers=OTHER).status_code == 404
    with client.get(f"/jobs/{job['id']}/archive", headers=ADMIN) as response:
        assert response.status_code == 200
    assert client.get(f"/jobs/{job['id']}/archive").status_code == 401


def test_retry_submits_only_the_failed_items_with_the_same_model(client: FlaskClient) -> None:
    job = _run_batch(client, ["fine one", "broken #fail", "fine two"], ["a", "b", "c"], USER)
    assert [i["state"] for i in job["items"]] == ["succeeded", "failed", "succeeded"]
    response = client.post(f"/jobs/{job['id']}/retry", headers=USER)
    assert response.status_code == 202
    retried = response.get_json()
    assert retried["retry_of"] == job["id"] and retried["total"] == 1
    assert response.headers["Location"] == f"/jobs/{retried['id']}"
    done = wait_for(lambda: _terminal(client, retried["id"]), what="the retry to finish")
    assert [i["prompt"] for i in done["items"]] == ["broken #fail"]
    assert done["items"][0]["model_requested"] == "flux-dev"
    assert done["items"][0]["files"] == [] or done["items"][0]["files"][0].endswith("b.webp")


def test_retry_without_failed_items_is_409(client: FlaskClient) -> None:
    job = _run_batch(client, ["all good"], ["good"], USER)
    assert client.post(f"/jobs/{job['id']}/retry", headers=USER).status_code == 409


def _terminal(client: FlaskClient, job_id: str) -> dict[str, Any] | None:
    job = dict(client.get(f"/jobs/{job_id}", headers=USER).get_json())
    return job if job["state"] in ("succeeded", "failed", "partially_failed") else None
