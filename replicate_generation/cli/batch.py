"""Run a CSV or JSONL file of generation requests, resumably.

    replicate-generation run requests.csv                        # in-process (this machine)
    replicate-generation run requests.jsonl --service-url http://127.0.0.1:5003 --output-dir out

Each row is one request: `prompt`, `model_name` (or `--model`), optional `custom_filename`,
`output` (a local path for the file) and the model's parameters (CSV columns, or JSONL keys and/or
a `params` object). Rows are sent in jobs of up to MAX_BATCH_SIZE items, each with an
Idempotency-Key derived from the input file's content and the job's items, so a resumed run gets
the same job back instead of creating anything. Every finished item is appended to the manifest
(JSONL) at once; a resumed run skips the items it lists. Ctrl-C or SIGTERM stops the run: in
service mode the service keeps running the jobs; in-process, predictions already running are left
in the state file and the next run polls them (nothing is created twice). A file already at an
output's name (whatever its extension) stops the run before anything is spent, unless
`--if-exists rename` or `overwrite` says otherwise. See docs/library.md.
"""

from __future__ import annotations

import argparse
import csv
import fcntl
import hashlib
import io
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import IO, Any

import requests

from replicate_generation.catalogue import ModelSpec
from replicate_generation.errors import QueueFull, ShuttingDown
from replicate_generation.jobs.store import ITEM_TERMINAL
from replicate_generation.errors import IdempotencyConflict
from replicate_generation.library import BatchClient, load_settings
from replicate_generation.model_functions import resolve_model
from replicate_generation.errors import InvalidRequest
from replicate_generation.outputs import (
    IF_EXISTS_CHOICES,
    IfExists,
    InvalidName,
    OutputNames,
    default_stem,
    place_without_clobbering,
    safe_filename,
)
from replicate_generation.request_parsing import parse_batch
from replicate_generation.routing import FallbackChains
from replicate_generation.settings import Settings
from replicate_generation.errors import SettingsError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
ACTIVE_JOBS = 2  # jobs in flight at once: the next one is queued while the last items run
RESERVED_COLUMNS = frozenset({"prompt", "model_name", "model", "custom_filename", "output",
                              "output_filepath", "params"})
HTTP_TIMEOUT = 30.0

log = logging.getLogger(__name__)


class UsageError(Exception):
    """Bad arguments, input, manifest or a request the service refused: exit 2."""


class Busy(Exception):
    """The service or this process has no room now; retry after `retry_after` seconds."""

    def __init__(self, retry_after: float, reason: str) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


# --------------------------------------------------------------------------- input


@dataclass(frozen=True)
class Row:
    """One request of the input file."""

    index: int
    where: str  # "line 3" / "row 3", for messages
    task: dict[str, Any]  # as sent: model_name, prompt, custom_filename and the parameters
    output: Path | None

    @property
    def prompt(self) -> str:
        return str(self.task.get("prompt"))


def read_rows(path: Path, data: bytes, default_model: str | None, fmt: str | None) -> list[Row]:
    """Parse the input into rows; every problem is a UsageError naming its line."""
    kind = fmt or {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}.get(path.suffix.lower())
    if kind is None:
        raise UsageError(f"{path}: cannot tell the format from the extension; use --format")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    records = _jsonl_records(text) if kind == "jsonl" else _csv_records(text)
    rows = [_row(i, where, record, default_model, from_csv=kind == "csv")
            for i, (where, record) in enumerate(records)]
    if not rows:
        raise UsageError(f"{path}: no requests in the file")
    return rows


def _jsonl_records(text: str) -> Iterator[tuple[str, dict[str, Any]]]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"line {number}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise UsageError(f"line {number}: each line must be a JSON object")
        params = record.pop("params", None)
        if params is not None:
            if not isinstance(params, dict):
                raise UsageError(f"line {number}: params must be a JSON object")
            record = {**params, **record}
        yield f"line {number}", record


def _csv_records(text: str) -> Iterator[tuple[str, dict[str, Any]]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if not reader.fieldnames or "prompt" not in reader.fieldnames:
        raise UsageError("the CSV needs a header row with a 'prompt' column")
    for raw in reader:
        where = f"line {reader.line_num}"
        if None in raw:
            raise UsageError(f"{where}: more cells than header columns")
        cells = {k: v for k, v in raw.items() if k is not None and v not in (None, "")}
        if not cells:
            continue
        params_cell = cells.pop("params", None)
        record: dict[str, Any] = {}
        if params_cell is not None:
            try:
                params = json.loads(params_cell)
            except json.JSONDecodeError as exc:
                raise UsageError(f"{where}: the params cell is not valid JSON ({exc.msg})") \
                    from None
            if not isinstance(params, dict):
                raise UsageError(f"{where}: the params cell must hold a JSON object")
            record.update(params)
        record.update(cells)
        yield where, record


def _row(index: int, where: str, record: dict[str, Any], default_model: str | None, *,
         from_csv: bool) -> Row:
    prompt = record.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise UsageError(f"{where}: prompt is required")
    model = record.get("model_name", record.get("model", default_model))
    if not isinstance(model, str) or not model:
        raise UsageError(f"{where}: model_name is missing (give the column or --model)")
    spec = _spec(model)
    params = {k: v for k, v in record.items() if k not in RESERVED_COLUMNS}
    if from_csv and spec is not None:
        params = {k: _cell(spec, k, v) if isinstance(v, str) else v for k, v in params.items()}
    output_value = record.get("output", record.get("output_filepath"))
    if output_value is not None and not isinstance(output_value, str):
        raise UsageError(f"{where}: output must be a path")
    name = record.get("custom_filename")
    if name is None:
        name = default_stem(spec.id if spec else model, index)
    task = {"model_name": model, "prompt": prompt, "custom_filename": name, **params}
    return Row(index=index, where=where, task=task,
               output=Path(output_value) if output_value else None)


def _spec(model: str) -> ModelSpec | None:
    try:
        return resolve_model(model)
    except InvalidRequest:
        return None  # the validation of the whole input reports it, with the line


def _cell(spec: ModelSpec, name: str, raw: str) -> object:
    """A CSV cell as the parameter's type; a value that does not convert is left as text for the
    validator to reject by name."""
    param = spec.param(name)
    kind = param.type if param is not None else "string"
    text = raw.strip()
    try:
        if kind == "integer":
            return int(text)
        if kind == "number":
            return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        return raw
    if kind == "boolean":
        lowered = text.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        return raw
    if kind == "uri_list":
        if text.startswith("["):
            try:
                return json.loads(text)
            except json.JSONDecodeError:
                return raw
        return text.split()
    return raw


# --------------------------------------------------------------------------- manifest


class Manifest:
    """The JSONL record of finished items: appended (and flushed) as each item finishes, read
    back by a resumed run. Locked, so two runs never share one manifest."""

    def __init__(self, path: Path, input_sha: str) -> None:
        self.path = path
        self.input_sha = input_sha
        self.latest: dict[int, dict[str, Any]] = {}
        self.failed_in: dict[int, set[str]] = {}  # row -> the jobs where it failed
        path.parent.mkdir(parents=True, exist_ok=True)
        # Opened (and locked) for the whole run: a second run on the same manifest stops here.
        self._out: IO[str] = path.open("a", encoding="utf-8")
        try:
            fcntl.flock(self._out.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._out.close()
            raise UsageError(f"another run is using the manifest {path}") from None
        try:
            self._read()
        except BaseException:
            self._out.close()
            raise
        if path.stat().st_size and not path.read_bytes().endswith(b"\n"):
            self._out.write("\n")  # a line cut short by a crash stays on its own line

    def _read(self) -> None:
        if not self.path.exists():
            return
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # the last line of a run killed mid-write
            if not isinstance(record, dict) or not isinstance(record.get("index"), int):
                continue
            if record.get("input_sha256") != self.input_sha:
                raise UsageError(f"the manifest {self.path} was written for another input (the "
                                 "file's content changed); use a new --manifest")
            self._note(record)

    def finished(self, index: int, retry_failed: bool = False) -> bool:
        record = self.latest.get(index)
        return record is not None and (bool(record.get("success")) or not retry_failed)

    def write(self, record: dict[str, Any]) -> None:
        record = {**record, "input_sha256": self.input_sha}
        self._out.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._out.flush()
        os.fsync(self._out.fileno())
        self._note(record)

    def _note(self, record: dict[str, Any]) -> None:
        index = int(record["index"])
        self.latest[index] = record
        if not record.get("success"):
            self.failed_in.setdefault(index, set()).add(str(record.get("job_id")))

    def close(self) -> None:
        self._out.close()


class JobLog:
    """Which job ran which rows of which chunk (`<manifest>.jobs`), so that a resumed run asks for
    a job that still exists rather than one that would repeat finished rows."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: list[dict[str, Any]] = []
        if path.exists():
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(entry, dict) and {"chunk", "key", "job_id", "rows"} <= set(entry):
                    self.entries.append(entry)

    def add(self, chunk: int, key: str, job_id: str, rows: list[int], body_sha: str) -> None:
        if any(e["job_id"] == job_id for e in self.entries):
            return
        entry = {"chunk": chunk, "key": key, "job_id": job_id, "rows": rows,
                 "body_sha256": body_sha}
        with self.path.open("a", encoding="utf-8") as out:
            out.write(json.dumps(entry) + "\n")
            out.flush()
            os.fsync(out.fileno())
        self.entries.append(entry)

    def for_chunk(self, chunk: int) -> list[dict[str, Any]]:
        return [e for e in self.entries if e["chunk"] == chunk]


# --------------------------------------------------------------------------- files


def place_files(sources: Sequence[str], row: Row, output_dir: Path | None,
                fetch: Callable[[str, Path], None], if_exists: IfExists = "refuse") -> list[str]:
    """Put an item's files where the row (`output`) or --output-dir asks; return the local paths.

    `fetch(source, target)` writes one source to `target` atomically. Each file is fetched to a
    hidden name beside its target first, then placed without replacing anything unless
    `if_exists` says so (outputs.place_without_clobbering).
    """
    destination = output_destination(row, output_dir)
    if destination is None:
        return []
    directory, stem = destination
    rests = _rests(sources, row, stem)
    directory.mkdir(parents=True, exist_ok=True)
    staged: list[Path] = []
    try:
        for source in sources:
            staged.append(_stage(source, directory, fetch))
        placed = place_without_clobbering(list(zip(staged, rests, strict=True)),
                                          directory.absolute(), stem, if_exists)
    finally:
        for path in staged:
            path.unlink(missing_ok=True)
    return [str(p) for p in placed]


def output_destination(row: Row, output_dir: Path | None) -> tuple[Path, str] | None:
    """The directory and the name without extension of a row's local files, if it has any."""
    if row.output is not None:
        return row.output.parent, safe_filename(row.output.name, "output")
    if output_dir is None:
        return None
    return output_dir, safe_filename(str(row.task["custom_filename"]), "custom_filename")


def _rests(sources: Sequence[str], row: Row, stem: str) -> list[str]:
    """What follows the stem in each file's name: the real extension, `_<n>` for several."""
    names = [Path(s.split("?", 1)[0]).name for s in sources]
    if row.output is not None:
        if len(names) == 1:
            return [Path(names[0]).suffix]
        return [f"_{n}{Path(name).suffix}" for n, name in enumerate(names, start=1)]
    # Under --output-dir the files keep the job's names, which start with the row's stem.
    return [name[len(stem):] if name.startswith(stem) else f"_{n}{Path(name).suffix}"
            for n, name in enumerate(names, start=1)]


def _stage(source: str, directory: Path, fetch: Callable[[str, Path], None]) -> Path:
    fd, name = tempfile.mkstemp(prefix=".", suffix=".staged", dir=directory)
    os.close(fd)
    staged = Path(name)
    try:
        fetch(source, staged)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    return staged


def refuse_taken_outputs(rows: Sequence[Row], output_dir: Path | None, manifest: Manifest,
                         retry_failed: bool) -> None:
    """With --if-exists refuse: stop before anything is spent when a row still to run would
    write over a file already there (whatever its extension) or share names with another row."""
    names = OutputNames()
    for row in rows:
        if manifest.finished(row.index, retry_failed):
            continue
        destination = output_destination(row, output_dir)
        if destination is None:
            continue
        directory, stem = destination
        other = names.claim(directory, stem, row.index)
        if other is not None:
            raise UsageError(f"{row.where}: its files ({directory / stem}.*) may share names "
                             f"with those of {rows[other].where}; {_IF_EXISTS_HINT}")
        in_the_way = names.in_the_way(directory, stem)
        if in_the_way is not None:
            raise UsageError(f"{row.where}: {in_the_way} already exists (files take their real "
                             f"format's extension, so any {directory / stem}.* counts); "
                             f"{_IF_EXISTS_HINT}")


_IF_EXISTS_HINT = ("nothing was submitted. Use --if-exists rename to write beside it under a new "
                   "name, or --if-exists overwrite to replace it")


def copy_atomic(source: str, target: Path) -> None:
    """Hard-link (or copy) to a hidden temp file beside the target, then rename it into place."""
    fd, tmp_name = tempfile.mkstemp(prefix=".", suffix=".part", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        tmp.unlink()
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------- backends


@dataclass
class JobView:
    state: str
    counts: dict[str, int]
    items: list[dict[str, Any]]

    @property
    def terminal(self) -> bool:
        return self.state in ("succeeded", "partially_failed", "failed", "canceled")


class ServiceBackend:
    """Jobs on a running service, over its HTTP API."""

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        self.url = url.rstrip("/")
        self.session = requests.Session()
        self.session.headers.update(headers)
        self.mode = "service"

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
        return JobView(state=str(data["state"]), counts=dict(data["counts"]),
                       items=list(data["items"]))

    def place(self, item: dict[str, Any], row: Row, output_dir: Path | None,
              if_exists: IfExists) -> list[str]:
        return place_files(list(item.get("urls") or []), row, output_dir, self._download,
                           if_exists)

    def _download(self, url: str, target: Path) -> None:
        fd, tmp_name = tempfile.mkstemp(prefix=".", suffix=".part", dir=target.parent)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                with self.session.get(f"{self.url}{url}", stream=True,
                                      timeout=HTTP_TIMEOUT) as response:
                    if response.status_code != 200:
                        raise OSError(f"GET {url} answered {response.status_code}")
                    for chunk in response.iter_content(1024 * 1024):
                        out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

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


class InProcessBackend:
    """Jobs run by this process (replicate_batch.BatchClient), sharing the host's limits."""

    def __init__(self, client: BatchClient, token: str) -> None:
        self.client = client
        self.token = token
        self.runner = client.runner
        self.mode = "in-process"

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
        root = self.runner.generator.runtime.output_root
        items = []
        for row in self.runner.store.items(job_id):
            item = self.runner.describe_item(row, url_root="")
            item["files"] = [str(root / f) for f in row.files]  # real paths on this machine
            items.append(item)
        return JobView(state=job.state, counts=job.counts, items=items)

    def place(self, item: dict[str, Any], row: Row, output_dir: Path | None,
              if_exists: IfExists) -> list[str]:
        return place_files(list(item.get("files") or []), row, output_dir, copy_atomic,
                           if_exists)

    def stop(self) -> None:
        """Leave running predictions and queued items in the state file for the next run."""
        self.client.close()

    def close(self) -> None:
        self.client.close()


Backend = ServiceBackend | InProcessBackend


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


# --------------------------------------------------------------------------- progress


class Progress:
    """A one-line bar on a terminal; on a pipe, a line whenever the count changes (at most one a
    second)."""

    WIDTH = 30

    def __init__(self, total: int, stream: IO[str], enabled: bool) -> None:
        self.total = total
        self.stream = stream
        self.enabled = enabled
        self.tty = enabled and stream.isatty()
        self.started = time.monotonic()
        self._last: tuple[int, int, int] | None = None
        self._last_at = 0.0

    def update(self, done: int, failed: int, running: int, *, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        state = (done, failed, running)
        if not self.tty and (state == self._last or (now - self._last_at < 1.0 and not force)):
            return
        self._last, self._last_at = state, now
        filled = self.WIDTH * done // max(1, self.total)
        elapsed = int(now - self.started)
        line = (f"[{'#' * filled}{'.' * (self.WIDTH - filled)}] {done}/{self.total} done"
                f", {failed} failed, {running} running, {elapsed // 60}:{elapsed % 60:02d}")
        self.stream.write(f"\r{line}\x1b[K" if self.tty else line + "\n")
        self.stream.flush()

    def finish(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


# --------------------------------------------------------------------------- the run


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
        """The rows to ask for and the key: a job of this chunk that still exists and holds
        every unfinished row, else a new job of just the unfinished rows."""
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
                chunk, rows = pending[0]
                planned = self.plan(chunk, rows)
                if planned is None:
                    pending.pop(0)
                    continue
                job_rows, key = planned
                try:
                    job_id, created = self.backend.submit(self.body(job_rows), key)
                except Busy as exc:
                    log.warning("%s; trying again in %.0f s", exc, exc.retry_after)
                    busy_until = time.monotonic() + exc.retry_after
                    break
                self.joblog.add(chunk, key, job_id, job_rows, self.body_sha(job_rows))
                log.info("chunk %d: %s job %s (%d items)", chunk,
                         "started" if created else "resumed", job_id, len(job_rows))
                self.active.append(ActiveJob(chunk=chunk, job_id=job_id, rows=job_rows))
                pending.pop(0)
            self.collect()
            self._show()
            self.stop.wait(self.poll_interval)
        return self.finish()

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


def say(message: str) -> None:
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


def validate(rows: list[Row], chunk_size: int, options: dict[str, bool],
             chains: FallbackChains) -> None:
    """Check every request with the service's own parser before anything is spent."""
    names: dict[str, Row] = {}
    outputs: dict[Path, Row] = {}
    for row in rows:
        name = row.task.get("custom_filename")
        if isinstance(name, str):
            try:
                stem = safe_filename(name, "custom_filename")  # as the job names the file
            except InvalidName as exc:
                raise UsageError(f"{row.where}: {exc}") from None
            other = names.setdefault(stem.casefold(), row)
            if other is not row:
                raise UsageError(f"{row.where}: custom_filename {name!r} is also used on "
                                 f"{other.where}; every item needs its own name")
        if row.output is not None:
            try:
                stem = safe_filename(row.output.name, "output")
            except InvalidName as exc:
                raise UsageError(f"{row.where}: {exc}") from None
            key = (row.output.parent.absolute() / stem.casefold())
            taken = outputs.setdefault(key, row)
            if taken is not row:
                raise UsageError(f"{row.where}: output {row.output} is also used on "
                                 f"{taken.where}")
    for start in range(0, len(rows), chunk_size):
        chunk = rows[start:start + chunk_size]
        body = {"tasks": [r.task for r in chunk], **options}
        try:
            parse_batch(body, chunk_size, chains)
        except (InvalidRequest, InvalidName) as exc:
            raise UsageError(_where(exc, chunk)) from None


def _where(exc: InvalidRequest | InvalidName, chunk: list[Row]) -> str:
    """Name the input line of a validation error instead of the job's tasks[i]."""
    message = str(exc)
    field_name = exc.field
    if field_name.startswith("tasks["):
        position = int(field_name[6:field_name.index("]")])
        row = chunk[position]
        return f"{row.where}: {message.replace(f'tasks[{position}].', '')}"
    return message


# --------------------------------------------------------------------------- entry point


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The `run` command."""
    run = commands.add_parser("run", help="run (or resume) every request of a CSV/JSONL file",
                              description=__doc__.split("\n\n")[0])
    run.set_defaults(func=run_cli)
    run.add_argument("input", type=Path, help="requests: .csv (header row) or .jsonl")
    run.add_argument("--format", choices=("csv", "jsonl"), help="when the extension does not say")
    where = run.add_mutually_exclusive_group()
    where.add_argument("--service-url", help="run on this service (e.g. http://127.0.0.1:5003)")
    where.add_argument("--in-process", action="store_true",
                       help="run here, sharing the host's limits through STATE_FILE (default)")
    run.add_argument("--api-key", help="the service's admin key (default "
                     "$CONCURRENT_DOCKER_ADMIN_API_KEY); the server's token pays")
    run.add_argument("--replicate-token", help="a Replicate token that pays (default "
                     "$REPLICATE_API_TOKEN); sent as X-Replicate-API-Key to a service")
    run.add_argument("--manifest", type=Path, help="default: INPUT.manifest.jsonl")
    run.add_argument("--model", help="model for rows without model_name")
    run.add_argument("--output-dir", type=Path,
                     help="copy (or download) every item's files here")
    run.add_argument("--if-exists", choices=IF_EXISTS_CHOICES, default="refuse",
                     help="when a file's name is already taken (whatever its extension): stop "
                     "before anything is spent (refuse, default), write beside it under a new "
                     "name (rename: NAME-2.EXT), or replace it (overwrite)")
    run.add_argument("--chunk-size", type=int, help="items per job (default MAX_BATCH_SIZE)")
    run.add_argument("--poll-interval", type=float, default=1.0, help="seconds between looks")
    run.add_argument("--grace", type=float, default=0.0,
                     help="in-process: seconds running items may take to finish after Ctrl-C "
                     "(default 0: leave them for the next run)")
    run.add_argument("--retry-failed", action="store_true",
                     help="run again the items the manifest lists as failed")
    run.add_argument("--no-fallback", action="store_true", help="never fall back to another model")
    run.add_argument("--fallback-on-content-policy", action="store_true",
                     help="also fall back when a model refuses a prompt on content policy")
    run.add_argument("--placeholder", action="store_true",
                     help="write a black placeholder for failed image items (reported as failed)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    run.add_argument("-v", "--verbose", action="store_true", help="log each job")


def run_cli(args: argparse.Namespace) -> int:
    """Run the file; Ctrl-C or SIGTERM stops the run as the module docstring says."""
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s",
                        level=logging.INFO if args.verbose else logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        if stop.is_set():
            raise KeyboardInterrupt  # a second Ctrl-C: stop waiting for anything
        received.append(signum)
        say(f"\nstopping ({signal.Signals(signum).name}) ...")
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = run_command(args, stop)
    except UsageError as exc:
        say(f"error: {exc}")
        return EXIT_USAGE
    except SettingsError as exc:
        say(f"error: {exc}")
        return EXIT_USAGE
    except KeyboardInterrupt:
        say("interrupted")
        return 128 + signal.SIGINT
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 + received[0] if received else code


def run_command(args: argparse.Namespace, stop: threading.Event) -> int:
    settings = load_settings()
    try:
        data = args.input.read_bytes()
    except OSError as exc:
        raise UsageError(f"{args.input}: {exc.strerror}") from None
    rows = read_rows(args.input, data, args.model, args.format)
    chunk_size = args.chunk_size or settings.max_batch_size
    if chunk_size < 1 or args.poll_interval <= 0 or args.grace < 0:
        raise UsageError("--chunk-size must be >= 1, --poll-interval > 0 and --grace >= 0")
    options = {"fallback": not args.no_fallback,
               "fallback_on_content_policy": args.fallback_on_content_policy,
               "placeholder": args.placeholder}
    chains = FallbackChains.parse(settings.fallback_chains) if not args.service_url \
        else FallbackChains.default()
    validate(rows, chunk_size, options, chains)
    input_sha = hashlib.sha256(data).hexdigest()
    manifest_path = args.manifest or args.input.with_name(args.input.name + ".manifest.jsonl")
    manifest = Manifest(manifest_path, input_sha)
    try:
        if args.if_exists == "refuse":
            refuse_taken_outputs(rows, args.output_dir, manifest, args.retry_failed)
        backend = _backend(args, settings)
    except BaseException:
        manifest.close()
        raise
    try:
        run = Run(rows=rows, chunk_size=chunk_size, options=options, input_sha=input_sha,
                  manifest=manifest, joblog=JobLog(Path(str(manifest_path) + ".jobs")),
                  backend=backend, output_dir=args.output_dir, retry_failed=args.retry_failed,
                  poll_interval=args.poll_interval,
                  progress=Progress(len(rows), sys.stderr, not args.no_progress), stop=stop,
                  if_exists=args.if_exists)
        return run.execute()
    finally:
        backend.close()
        manifest.close()


def _backend(args: argparse.Namespace, settings: Settings) -> Backend:
    if args.service_url:
        admin = args.api_key or (None if args.replicate_token else settings.admin_api_key)
        token = args.replicate_token or settings.replicate_api_token
        if admin:
            return ServiceBackend(args.service_url, {"X-Admin-API-Key": admin})
        if token:
            return ServiceBackend(args.service_url, {"X-Replicate-API-Key": token})
        raise UsageError("give --api-key or --replicate-token (or set "
                         "CONCURRENT_DOCKER_ADMIN_API_KEY / REPLICATE_API_TOKEN)")
    if args.api_key:
        raise UsageError("--api-key is for --service-url; in-process runs pay with "
                         "--replicate-token or REPLICATE_API_TOKEN")
    client = BatchClient(token=args.replicate_token,
                         settings=replace(settings, shutdown_grace_seconds=args.grace))
    return InProcessBackend(client, client.token())
