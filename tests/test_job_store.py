"""The job store on a real SQLite state file: claiming rules, and a busy file."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest

from replicate_generation.errors import StoreBusy
from replicate_generation.jobs import database
from replicate_generation.jobs.rows import NewItem, NewJob
from replicate_generation.jobs.store import JobStore
from replicate_generation.sqlite_db import CACHE_SIZE, Database, patient_writes


def make_job(store: JobStore, job_id: str, origin: str, owner: str, now: float) -> None:
    store.create(NewJob(id=job_id, account="acct_a", kind="batch", request_id=job_id,
                        items=[NewItem(spec={"n": 1})], origin=origin), owner, now)


def test_orphans_are_claimed_by_their_own_origin_only_and_once(tmp_path: Path) -> None:
    store = JobStore(str(tmp_path / "state.sqlite3"))
    owners = store.owners
    owners.heartbeat("dead", 0.0)
    make_job(store, "job_service", "service", "dead", 0.0)
    make_job(store, "job_script", "library", "dead", 0.0)
    owners.heartbeat("alive", 100.0)
    make_job(store, "job_alive", "service", "alive", 100.0)
    # A script never takes over the service's jobs, nor the service a script's.
    assert owners.claim_orphans("script", ["acct_a"], 100.0, 30.0, "library") == ["job_script"]
    assert owners.claim_orphans("svc", ["acct_b"], 100.0, 30.0, "service") == []
    assert owners.claim_orphans("svc", ["acct_a"], 100.0, 30.0, "service") == ["job_service"]
    # Claimed jobs have a live owner now (heartbeats of the claimers).
    owners.heartbeat("svc", 100.0)
    owners.heartbeat("script", 100.0)
    assert owners.claim_orphans("other", ["acct_a"], 101.0, 30.0, "service") == []
    # A worker that retires hands its jobs over at once.
    owners.retire("svc")
    assert owners.claim_orphans("other", ["acct_a"], 101.0, 30.0, "service") == ["job_service"]


def test_a_locked_state_file_makes_writes_wait_then_refuse_while_patient_ones_wait_it_out(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "state.sqlite3"
    store = JobStore(str(path))
    make_job(store, "job_1", "service", "w", 0.0)
    monkeypatch.setattr(database, "WRITE_PATIENCE_S", 0.6)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process's long write
    started = time.monotonic()
    with pytest.raises(StoreBusy):
        store.owners.heartbeat("w", 1.0)
    assert 0.5 < time.monotonic() - started < 5.0
    # Readers never wait for the writer (WAL).
    assert store.get("job_1") is not None
    done: list[bool] = []

    def record() -> None:
        with patient_writes():
            done.append(store.record_attempts("job_1", 0, [], ("pred_1", "m")))

    writer = threading.Thread(target=record)
    writer.start()
    writer.join(1.5)
    assert writer.is_alive() and not done
    other.execute("ROLLBACK")
    other.close()
    writer.join(10)
    assert done == [True]
    item = store.item("job_1", 0)
    assert item is not None and item.prediction_id == "pred_1"
    store.close()


def test_every_connection_to_the_state_file_keeps_a_small_page_cache(tmp_path: Path) -> None:
    # One connection per thread: SQLite's 2 MiB default cache each grew workers with the file.
    path = tmp_path / "state.sqlite3"
    store = JobStore(str(path))
    try:
        with store.db.read() as conn:  # the job store's pooled connections
            assert conn.exec_driver_sql("PRAGMA cache_size").scalar() == CACHE_SIZE
    finally:
        store.close()
    # The limit store's per-thread connections.
    assert Database(path).connection().execute("PRAGMA cache_size").fetchone() == (CACHE_SIZE,)
    assert -1024 <= CACHE_SIZE < 0  # at most 1 MiB each (negative: KiB)
