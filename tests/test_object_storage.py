"""Outputs in an S3-compatible bucket (OUTPUT_STORAGE=s3://...), against moto's S3 server started
here on a free port: two instances with no shared disk, checksums, crashes mid-upload, a bucket
that goes away mid-batch, signed URLs and ownership, retention."""

from __future__ import annotations

import hashlib
import io
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import boto3
import pytest
import requests
from botocore.exceptions import ClientError
from flask import Flask
from moto.server import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import BaseWSGIServer, make_server

from conftest import OTHER, USER, HeldClock
from replicate_generation import library as rb
from replicate_generation.devtools.simulator import Simulator
from replicate_generation.outputs.s3 import S3Storage
from replicate_generation.settings import Settings
from servers import ROOT, Gunicorn, wait_for
from test_cli import Cli, cli, cli_env, records, write_jsonl  # noqa: F401 - cli: a fixture

MiB = 1024 * 1024


class S3Server:
    """moto's S3 in server mode on 127.0.0.1, that can be stopped (its socket closed, so calls
    are refused) and started again on the same port; its objects live on in this process."""

    def __init__(self, conditional_writes: bool = True) -> None:
        self.port = 0
        self._conditional_writes = conditional_writes
        self._server: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        app: Any = DomainDispatcherApplication(create_backend_app)
        if not self._conditional_writes:
            app = _without_conditional_writes(app)
        self._server = make_server("127.0.0.1", self.port, app, threaded=True,
                                   request_handler=MotoRequestHandler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        assert self._server is not None and self._thread is not None
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _without_conditional_writes(app: Any) -> Any:
    """A store that answers If-None-Match on a write with 501, as some S3-compatibles do."""
    def refusing(environ: dict[str, Any], start_response: Any) -> Any:
        if environ["REQUEST_METHOD"] in ("PUT", "POST") and "HTTP_IF_NONE_MATCH" in environ:
            start_response("501 Not Implemented", [("Content-Type", "application/xml")])
            return [b"<Error><Code>NotImplemented</Code><Message>no conditional writes"
                    b"</Message></Error>"]
        return app(environ, start_response)
    return refusing


@dataclass
class Bucket:
    server: S3Server
    name: str
    s3: Any  # a boto3 S3 client of the test's own

    @property
    def url(self) -> str:
        return f"s3://{self.name}/outputs"

    def keys(self) -> list[str]:
        listed = self.s3.list_objects_v2(Bucket=self.name, Prefix="outputs/")
        return sorted(item["Key"] for item in listed.get("Contents", []))

    def read(self, relative: str) -> tuple[bytes, dict[str, str]]:
        answer = self.s3.get_object(Bucket=self.name, Key=f"outputs/{relative}")
        return answer["Body"].read(), answer["Metadata"]


@pytest.fixture
def bucket(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Bucket]:
    # The standard credential chain, pointed at fixed test keys and no developer's files.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    server = S3Server()
    server.start()
    s3 = boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1")
    name = f"outputs-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    yield Bucket(server, name, s3)
    server.stop()
    s3.close()


@pytest.fixture
def s3_app(make_app: Callable[..., Flask], bucket: Bucket,
           tmp_path: Path) -> Callable[..., Flask]:
    """An instance writing to the bucket, with a local directory (its spool) of its own."""
    def build(name: str, **overrides: Any) -> Flask:
        return make_app(output_storage=bucket.url, aws_endpoint_url=bucket.server.endpoint,
                        aws_region="us-east-1", output_dir=tmp_path / name, **overrides)
    return build


def storage_of(app: Flask) -> S3Storage:
    storage = app.extensions["jobs"].generator.storage
    assert isinstance(storage, S3Storage)
    return storage


def local_files(directory: Path) -> list[Path]:
    return [p for p in directory.rglob("*") if p.is_file()] if directory.exists() else []


def run_batch(app: Flask, prompts: list[str], names: list[str]) -> dict[str, Any]:
    body = {"model_name": "flux-dev", "prompts": prompts, "custom_filenames": names}
    answer = app.test_client().post("/generate-batch", json=body, headers=USER)
    assert answer.status_code == 200, answer.get_json()
    return dict(answer.get_json())


# --------------------------------------------------------------------------- two instances


def test_a_batch_on_one_instance_is_listed_downloaded_and_archived_on_another(
        s3_app: Callable[..., Flask], bucket: Bucket, sim: Simulator, tmp_path: Path) -> None:
    a, b = s3_app("a"), s3_app("b")
    done = run_batch(a, ["a red car", "a blue wave", "a green path"], ["car", "wave", "path"])
    job = b.test_client().get(f"/jobs/{done['job_id']}", headers=USER).get_json()
    relatives = [url.removeprefix("/files/") for item in job["items"] for url in item["urls"]]
    assert [r.rsplit("/", 1)[1].split(".")[0] for r in relatives] == ["car", "wave", "path"]
    assert bucket.keys() == sorted(f"outputs/{r}" for r in relatives)
    stored = {}
    for relative in relatives:
        data, metadata = bucket.read(relative)
        assert metadata["sha256"] == hashlib.sha256(data).hexdigest()
        stored[relative] = data
        served = b.test_client().get(f"/files/{relative}", headers=USER)
        assert served.status_code == 200 and served.data == data
        assert served.headers["Content-Length"] == str(len(data))
    with b.test_client().get(f"/jobs/{done['job_id']}/archive", headers=USER) as archive:
        assert archive.status_code == 200
        zipped = zipfile.ZipFile(io.BytesIO(archive.data))
    assert zipped.namelist() == [r.rsplit("/", 1)[1] for r in relatives]
    assert [zipped.read(n) for n in zipped.namelist()] == [stored[r] for r in relatives]
    # Nothing of it on either instance's disk: A's spool is empty, B never had a copy.
    assert local_files(tmp_path / "a") == local_files(tmp_path / "b") == []
    health = b.test_client().get("/health").get_json()["dependencies"]["outputs"]
    assert health == {"backend": "s3", "status": "ok", "location": f"{bucket.url}/"}


def test_a_stored_file_that_no_longer_matches_its_sha256_is_not_served(
        s3_app: Callable[..., Flask], bucket: Bucket, sim: Simulator) -> None:
    app = s3_app("a")
    done = run_batch(app, ["a quiet lake"], ["lake"])
    relative = done["results"][0]["urls"][0].removeprefix("/files/")
    _, metadata = bucket.read(relative)
    bucket.s3.put_object(Bucket=bucket.name, Key=f"outputs/{relative}", Body=b"tampered",
                         Metadata=metadata)  # the old checksum, other bytes
    answer = app.test_client().get(f"/files/{relative}", headers=USER)
    assert answer.status_code == 502
    assert "SHA-256" in answer.get_json()["error"]


def test_gunicorn_workers_read_the_bucket_from_the_environment_and_serve_its_files(
        start_gunicorn: Callable[..., Gunicorn], make_settings: Callable[..., Settings],
        bucket: Bucket, sim: Simulator) -> None:
    server = start_gunicorn(make_settings(), 2, OUTPUT_STORAGE=bucket.url,
                            AWS_ENDPOINT_URL=bucket.server.endpoint, AWS_REGION="us-east-1",
                            AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing-secret")
    done = requests.post(server.url + "/generate-batch", headers=USER, timeout=60, json={
        "model_name": "flux-dev", "prompts": ["a mill", "a weir"]})
    assert done.status_code == 200, done.text
    urls = [u for r in done.json()["results"] for u in r["urls"]]
    assert bucket.keys() == sorted(f"outputs/{u.removeprefix('/files/')}" for u in urls)
    for url in urls:  # either worker answers, from the bucket
        got = requests.get(server.url + url, headers=USER, timeout=10)
        assert got.status_code == 200
        assert got.content == bucket.read(url.removeprefix("/files/"))[0]
    health = requests.get(server.url + "/health", timeout=5).json()["dependencies"]["outputs"]
    assert (health["backend"], health["status"]) == ("s3", "ok")
    assert requests.get(server.url + "/ready", timeout=10).status_code == 200
    assert "testing-secret" not in server.log()


# --------------------------------------------------------------------------- crashes


def test_an_upload_killed_half_way_leaves_no_object_under_its_name(
        bucket: Bucket, tmp_path: Path) -> None:
    """A process streaming a multipart upload is SIGKILLed after its first part: the name shows
    nothing (the parts sit in an incomplete upload, which the lifecycle rule removes)."""
    fifo = tmp_path / "source"
    os.mkfifo(fifo)
    script = (
        "import sys; from pathlib import Path\n"
        "from replicate_generation.outputs.s3 import S3Storage\n"
        "s = S3Storage(sys.argv[1], Path(sys.argv[2]), endpoint_url=sys.argv[3],"
        " region='us-east-1', part_bytes=5 * 1024 * 1024, start_uploader=False)\n"
        "with open(sys.argv[4], 'rb') as source:\n"
        "    s.upload(source, 'group/big.png', '0' * 64, 'image/png')\n")
    child = subprocess.Popen(  # noqa: S603 - a fixed argv
        [sys.executable, "-c", script, bucket.url, str(tmp_path / "spool"),
         bucket.server.endpoint, str(fifo)], cwd=ROOT, env=dict(os.environ))
    try:
        with fifo.open("wb") as writer:
            writer.write(os.urandom(6 * MiB))  # one whole part and the start of the next
            wait_for(lambda: _uploaded_parts(bucket, "outputs/group/big.png") >= 1,
                     what="the first part to be uploaded")
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=10)
    except BrokenPipeError:
        pass
    assert child.returncode == -signal.SIGKILL
    assert bucket.keys() == []
    with pytest.raises(ClientError):
        bucket.s3.head_object(Bucket=bucket.name, Key="outputs/group/big.png")


def _uploaded_parts(bucket: Bucket, key: str) -> int:
    uploads = bucket.s3.list_multipart_uploads(Bucket=bucket.name).get("Uploads", [])
    return sum(len(bucket.s3.list_parts(Bucket=bucket.name, Key=key, UploadId=u["UploadId"])
                   .get("Parts", [])) for u in uploads if u["Key"] == key)


class _Failing(io.RawIOBase):
    """A source that gives `good` bytes, then fails as a broken download would."""

    def __init__(self, good: int) -> None:
        self._left = good

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._left <= 0:
            raise OSError("the source broke off")
        size = min(len(buffer), self._left)
        buffer[:size] = b"\x01" * size
        self._left -= size
        return size


def test_a_failed_multipart_upload_is_aborted_and_the_name_stays_free(
        bucket: Bucket, tmp_path: Path) -> None:
    storage = S3Storage(bucket.url, tmp_path / "spool", endpoint_url=bucket.server.endpoint,
                        region="us-east-1", part_bytes=5 * MiB, start_uploader=False)
    try:
        with pytest.raises(OSError, match="broke off"):
            storage.upload(io.BufferedReader(_Failing(7 * MiB)), "group/big.png", "0" * 64,
                           "image/png")
    finally:
        storage.close()
    assert bucket.keys() == []
    assert bucket.s3.list_multipart_uploads(Bucket=bucket.name).get("Uploads", []) == []


@pytest.mark.parametrize("conditional_writes", [True, False])
def test_a_taken_name_is_never_overwritten_large_or_small(
        bucket: Bucket, tmp_path: Path, conditional_writes: bool,
        caplog: pytest.LogCaptureFixture) -> None:
    """With If-None-Match honoured, and where the store answers it with 501 (HEAD first)."""
    store = S3Server(conditional_writes)
    store.start()
    storage = S3Storage(bucket.url, tmp_path / "spool", endpoint_url=store.endpoint,
                        region="us-east-1", part_bytes=5 * MiB, start_uploader=False)
    (tmp_path / "spool" / "group").mkdir(parents=True)
    names = []
    try:
        for data in (b"first", b"second", os.urandom(11 * MiB)):
            tmp = tmp_path / "spool" / "group" / ".part"
            tmp.write_bytes(data)
            names.append(storage.publish(tmp, "group/pic.png", hashlib.sha256(data).hexdigest(),
                                         "image/png"))
    finally:
        storage.close()
        store.stop()
    assert names == ["group/pic.png", "group/pic-2.png", "group/pic-3.png"]
    assert bucket.read("group/pic.png")[0] == b"first"
    assert len(bucket.read("group/pic-3.png")[0]) == 11 * MiB
    assert bucket.s3.list_multipart_uploads(Bucket=bucket.name).get("Uploads", []) == []
    fell_back = "does not honour If-None-Match" in caplog.text
    assert fell_back is not conditional_writes


# --------------------------------------------------------------------------- the bucket away


def test_a_bucket_stopped_mid_batch_loses_nothing_and_creates_nothing_twice(
        s3_app: Callable[..., Flask], bucket: Bucket,
        held_sim: tuple[Simulator, HeldClock]) -> None:
    own, clock = held_sim
    a = s3_app("a", replicate_base_url=own.base_url)
    b = s3_app("b", replicate_base_url=own.base_url)
    prompts = ["a harbour at dawn", "a harbour at noon", "a harbour at dusk #slow=100",
               "a harbour at night #slow=100"]
    body = {"model_name": "flux-dev", "prompts": prompts, "async": True}
    job_id = a.test_client().post("/generate-batch", json=body, headers=USER).get_json()["id"]
    wait_for(lambda: len(own.predictions()) == 4, what="every item to be created")
    clock.advance(1)  # the first two end, and their files reach the bucket
    wait_for(lambda: len(bucket.keys()) == 2, what="the first two files in the bucket")
    bucket.server.stop()
    clock.advance(200)  # the last two end now: their outputs meet no bucket
    job = wait_for(lambda: _finished(a, job_id), what="the batch to finish")
    assert [(i["state"], i["count"]) for i in job["items"]] == [("succeeded", 1)] * 4
    _says_the_bucket_is_away(a, b, job_id, job["items"][3]["urls"][0])
    bucket.server.start()
    storage_of(a).upload_pending()  # or its own thread got there first: either way, all are up
    assert storage_of(a).pending() == []
    assert a.test_client().get("/ready").status_code == 200
    relatives = [u.removeprefix("/files/") for i in job["items"] for u in i["urls"]]
    assert bucket.keys() == sorted(f"outputs/{r}" for r in relatives)
    for relative in relatives:
        data, metadata = bucket.read(relative)
        assert metadata["sha256"] == hashlib.sha256(data).hexdigest()
        assert b.test_client().get(f"/files/{relative}", headers=USER).data == data
    assert sorted(own.creates_by_prompt(USER["X-Replicate-API-Key"]).values()) == [1] * 4


def _says_the_bucket_is_away(a: Flask, b: Flask, job_id: str, spooled: str) -> None:
    """A keeps two files in its spool and serves them; /health and /ready say why; B, with no
    copy, answers 503 (not a 404 that would read as "lost")."""
    assert "unreachable" in storage_of(a).status()
    health = a.test_client().get("/health").get_json()
    assert health["status"] == "degraded"
    assert "2 file(s) waiting" in health["dependencies"]["outputs"]["status"]
    ready = a.test_client().get("/ready")
    assert ready.status_code == 503
    assert ready.get_json()["checks"]["outputs"].startswith("unavailable")
    with a.test_client().get(spooled, headers=USER) as served:
        assert served.status_code == 200 and served.data.startswith(b"RIFF")
    away = b.test_client().get(spooled, headers=USER)
    assert away.status_code == 503 and away.headers["Retry-After"]
    assert b.test_client().get(f"/jobs/{job_id}/archive", headers=USER).status_code == 503


def _finished(app: Flask, job_id: str) -> dict[str, Any] | None:
    job = dict(app.test_client().get(f"/jobs/{job_id}", headers=USER).get_json())
    return job if job["state"] in ("succeeded", "failed", "partially_failed") else None


# --------------------------------------------------------------------------- signed URLs


def test_signed_urls_expire_when_set_and_only_the_owner_gets_one(
        s3_app: Callable[..., Flask], bucket: Bucket, sim: Simulator) -> None:
    app = s3_app("a", output_serving="signed", output_url_expiry_seconds=90)
    before = time.time()
    done = run_batch(app, ["a night train"], ["train"])
    item = done["results"][0]
    assert item["urls"][0].startswith("/files/")  # the service's own URL stays where it was
    signed = item["signed_urls"][0]
    assert signed.startswith(f"{bucket.server.endpoint}/{bucket.name}/outputs/")
    query = parse_qs(urlsplit(signed).query)
    assert query["X-Amz-Expires"] == ["90"]
    signed_at = time.mktime(time.strptime(query["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ")) - time.timezone
    assert before - 1 <= signed_at <= time.time() + 1  # so it stops working 90 s from now
    relative = urlsplit(signed).path.split("/outputs/", 1)[1]
    data, metadata = bucket.read(relative)
    fetched = requests.get(signed, timeout=10)
    assert fetched.status_code == 200 and fetched.content == data
    assert hashlib.sha256(fetched.content).hexdigest() == metadata["sha256"]
    mine = app.test_client().get(f"/files/{relative}", headers=USER)
    assert mine.status_code == 302 and mine.headers["Location"].startswith(signed.split("?")[0])
    assert mine.headers["Cache-Control"] == "no-store"
    streamed = app.test_client().get(f"/files/{relative}",
                                     headers={**USER, "X-Output-Delivery": "stream"})
    assert streamed.status_code == 200 and streamed.data == data
    theirs = app.test_client().get(f"/files/{relative}", headers=OTHER)
    assert theirs.status_code == 404 and "Location" not in theirs.headers
    assert bucket.name not in theirs.get_data(as_text=True)
    job = app.test_client().get(f"/jobs/{done['job_id']}", headers=OTHER)
    assert job.status_code == 404 and bucket.name not in job.get_data(as_text=True)


# --------------------------------------------------------------------------- retention


def test_retention_deletes_a_jobs_objects_with_it(
        s3_app: Callable[..., Flask], bucket: Bucket, sim: Simulator) -> None:
    app = s3_app("a", job_retention_seconds=60)
    kept = run_batch(app, ["kept"], ["kept"])
    assert len(bucket.keys()) == 1
    runner = app.extensions["jobs"]
    assert runner.maintenance.purge_expired(time.time() + 120) == 1
    assert bucket.keys() == []
    assert app.test_client().get(f"/jobs/{kept['job_id']}", headers=USER).status_code == 404


def test_output_storage_must_name_a_bucket() -> None:
    from replicate_generation.errors import SettingsError

    with pytest.raises(SettingsError, match="OUTPUT_STORAGE"):
        Settings.from_env({"OUTPUT_STORAGE": "https://bucket.example.com/x"})
    with pytest.raises(SettingsError, match="OUTPUT_SERVING"):
        Settings.from_env({"OUTPUT_SERVING": "public"})
    settings = Settings.from_env({"OUTPUT_STORAGE": "s3://my-bucket/out", "AWS_REGION": "eu-west-1",
                                  "AWS_ENDPOINT_URL": "http://minio:9000"})
    assert (settings.output_storage, settings.aws_region, settings.aws_endpoint_url) == (
        "s3://my-bucket/out", "eu-west-1", "http://minio:9000")


# --------------------------------------------------------------------------- library and CLI


def test_the_library_writes_to_the_bucket_and_names_its_objects(
        make_settings: Callable[..., Settings], bucket: Bucket, sim: Simulator,
        tmp_path: Path) -> None:
    settings = make_settings(output_storage=bucket.url, aws_endpoint_url=bucket.server.endpoint,
                             aws_region="us-east-1")
    with rb.BatchClient(settings=settings) as client:
        results = client.generate_batch(["a cliff", "a cove"], "flux-dev")
    assert all(r.success for r in results), results
    located = [f for r in results for f in r.files]
    assert all(f.startswith(f"{bucket.url}/") for f in located)
    assert bucket.keys() == sorted(f"outputs/{f.removeprefix(bucket.url + '/')}" for f in located)
    assert local_files(settings.output_dir) == []
    before = set(bucket.keys())
    with rb.BatchClient(settings=settings) as client:
        placed = client.generate("a lagoon", "flux-dev", tmp_path / "mine" / "lagoon.png")
    assert placed.success and placed.files == [str(tmp_path / "mine" / "lagoon.webp")], placed
    (stored,) = set(bucket.keys()) - before
    assert Path(placed.files[0]).read_bytes() == bucket.read(stored.removeprefix("outputs/"))[0]
    assert local_files(settings.output_dir) == []  # the copy moved out; the bucket keeps its own


def test_an_in_process_cli_run_writes_to_the_bucket_and_places_copies(
        make_settings: Callable[..., Settings], bucket: Bucket, sim: Simulator, tmp_path: Path,
        cli: Cli) -> None:  # noqa: F811 - the fixture imported above
    env = {**cli_env(make_settings()), "OUTPUT_STORAGE": bucket.url,
           "AWS_ENDPOINT_URL": bucket.server.endpoint, "AWS_REGION": "us-east-1",
           **{k: os.environ[k] for k in os.environ if k.startswith("AWS_")}}
    source = write_jsonl(tmp_path / "rows.jsonl", [
        {"model_name": "flux-dev", "prompt": "a dune", "custom_filename": "dune"},
        {"model_name": "flux-dev", "prompt": "a reef", "custom_filename": "reef"}])
    placed = tmp_path / "placed"
    assert cli.run(["run", str(source), "--in-process", "--output-dir", str(placed),
                    "--poll-interval", "0.05"], env) == 0, cli.log()
    found = sorted(records(tmp_path / "rows.jsonl.manifest.jsonl"), key=lambda r: r["index"])
    assert [Path(r["files"][0]).name.split(".")[0] for r in found] == ["dune", "reef"]
    objects = bucket.keys()
    assert len(objects) == 2
    for record, key in zip(found, objects, strict=True):
        data, metadata = bucket.read(key.removeprefix("outputs/"))
        assert Path(record["files"][0]).read_bytes() == data
        assert metadata["sha256"] == hashlib.sha256(data).hexdigest()
