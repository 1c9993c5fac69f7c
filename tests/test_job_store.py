"""The job store's claiming rules, on a real state file."""

from __future__ import annotations

from pathlib import Path

from replicate_generation.jobs.store import JobStore, NewItem, NewJob


def make_job(store: JobStore, job_id: str, origin: str, owner: str, now: float) -> None:
    store.create(NewJob(id=job_id, account="acct_a", kind="batch", request_id=job_id,
                        items=[NewItem(spec={"n": 1})], origin=origin), owner, now)


def test_orphans_are_claimed_by_their_own_origin_only_and_once(tmp_path: Path) -> None:
    store = JobStore(str(tmp_path / "state.sqlite3"))
    store.heartbeat("dead", 0.0)
    make_job(store, "job_service", "service", "dead", 0.0)
    make_job(store, "job_script", "library", "dead", 0.0)
    store.heartbeat("alive", 100.0)
    make_job(store, "job_alive", "service", "alive", 100.0)
    # A script never takes over the service's jobs, nor the service a script's.
    assert store.claim_orphans("script", ["acct_a"], 100.0, 30.0, "library") == ["job_script"]
    assert store.claim_orphans("svc", ["acct_b"], 100.0, 30.0, "service") == []
    assert store.claim_orphans("svc", ["acct_a"], 100.0, 30.0, "service") == ["job_service"]
    # Claimed jobs have a live owner now (heartbeats of the claimers).
    store.heartbeat("svc", 100.0)
    store.heartbeat("script", 100.0)
    assert store.claim_orphans("other", ["acct_a"], 101.0, 30.0, "service") == []
    # A worker that retires hands its jobs over at once.
    store.retire("svc")
    assert store.claim_orphans("other", ["acct_a"], 101.0, 30.0, "service") == ["job_service"]
