"""What a run has done, on disk, so a resumed run skips it: the manifest and the job log."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import IO, Any

from replicate_generation.cli.batch.errors import UsageError


class Manifest:
    """The JSONL record of finished items, appended and flushed as each finishes; locked."""

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
    """Which job ran which rows of which chunk (`<manifest>.jobs`): a resume asks for a live job."""

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
