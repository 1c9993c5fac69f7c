"""Event streams (issue #23): GET /jobs/<id>/events and GET /events as Server-Sent Events, read
from the store's event log, so a client that reconnects with Last-Event-ID sees every event
exactly once, whichever worker or instance did the work."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient

from conftest import ADMIN, OTHER, SERVER_TOKEN, USER, HeldClock
from replicate_generation.devtools.simulator import Simulator
from replicate_generation.jobs.events import Scope
from replicate_generation.jobs.stream_wakeups import StreamWakeups
from replicate_generation.settings import Settings
from servers import Gunicorn, socket_owners, wait_for
from shared_backends import REDIS_URL, postgres_database, redis_prefix
from test_proxy import running_nginx

ITEMS = 3


@dataclass
class Frame:
    """One SSE frame: an event (id, kind, data) or a comment line (a heartbeat)."""

    id: int | None = None
    kind: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    comment: str | None = None
    retry: int | None = None


def parse_frames(chunks: Iterator[bytes]) -> Iterator[Frame]:
    """Frames as they arrive, whatever the chunking."""
    buffer = ""
    for chunk in chunks:
        buffer += chunk.decode()
        while "\n\n" in buffer:
            block, buffer = buffer.split("\n\n", 1)
            frame = Frame()
            for line in block.split("\n"):
                name, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if name == "":
                    frame.comment = value
                elif name == "id":
                    frame.id = int(value)
                elif name == "event":
                    frame.kind = value
                elif name == "data":
                    frame.data = json.loads(value)
                elif name == "retry":
                    frame.retry = int(value)
            yield frame


def events_until(frames: Iterator[Frame], done: Callable[[list[Frame]], bool]) -> list[Frame]:
    """The events (not comments) read until `done` says so."""
    seen: list[Frame] = []
    for frame in frames:
        if frame.kind is not None:
            seen.append(frame)
            if done(seen):
                return seen
    raise AssertionError(f"the stream ended first: {[f.kind for f in seen]}")


def ended(seen: list[Frame]) -> bool:
    return seen[-1].kind == "job.finished"


def running(count: int) -> Callable[[list[Frame]], bool]:
    def enough(seen: list[Frame]) -> bool:
        return sum(f.kind == "item.state" and f.data["state"] == "running" for f in seen) == count
    return enough


def submit(client: FlaskClient, prompts: list[str], headers: dict[str, str]) -> str:
    answer = client.post("/generate-batch", headers={**headers, "Prefer": "respond-async"},
                         json={"model_name": "flux-dev", "prompts": prompts,
                               "output_format": "png",
                               "custom_filenames": [f"pic_{i}" for i in range(len(prompts))]})
    assert answer.status_code == 202, answer.get_json()
    return str(answer.get_json()["id"])


class ClientStream:
    """A stream read through the Flask test client: the app runs in the reading thread."""

    def __init__(self, client: FlaskClient, url: str, headers: dict[str, str]) -> None:
        self.response = client.get(url, headers=headers, buffered=False)
        self.frames = parse_frames(iter(self.response.response))

    def close(self) -> None:
        self.response.close()


def assert_whole_story(events: list[Frame], items: int, output_dir: Path) -> None:
    """job.created first, every item running then succeeded then its file, job.finished last."""
    ids = [e.id for e in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids), ids
    assert events[0].kind == "job.created" and events[-1].kind == "job.finished"
    assert events[-1].data["state"] == "succeeded"
    assert events[-1].data["counts"]["succeeded"] == items
    for index in range(items):
        mine = [(e.kind, e.data.get("state")) for e in events if e.data.get("index") == index]
        assert mine == [("item.state", "running"), ("item.state", "succeeded"),
                        ("item.file", None)], mine
    for event in events:
        if event.kind == "item.file":
            assert event.data["name"] == f"pic_{event.data['index']}.png"
            relative = event.data["url"].removeprefix("/files/")
            assert event.data["size"] == (output_dir / relative).stat().st_size > 0
    finished = [e for e in events if e.kind == "item.state" and e.data["state"] == "succeeded"]
    assert [e.data["counts"]["succeeded"] for e in finished] == list(range(1, items + 1))
    assert all(e.data["cost_usd"] > 0 for e in finished)
    assert events[-1].data["cost_usd"] == pytest.approx(sum(e.data["cost_usd"] for e in finished))


# -- in one process ---------------------------------------------------------------------------


@pytest.fixture
def held(held_sim: tuple[Simulator, HeldClock], make_app: Callable[..., Flask]
         ) -> tuple[Flask, Simulator, HeldClock]:
    own, clock = held_sim
    return make_app(replicate_base_url=own.base_url, sync_wait_seconds=0), own, clock


def test_a_jobs_stream_shows_every_item_state_file_and_the_end_in_order(
        held: tuple[Flask, Simulator, HeldClock], make_settings: Callable[..., Settings]) -> None:
    app, own, clock = held
    client = app.test_client()
    job_id = submit(client, [f"#slow=1 picture {i}" for i in range(ITEMS)], ADMIN)
    stream = ClientStream(client, f"/jobs/{job_id}/events", ADMIN)
    first = next(stream.frames)
    assert first.retry is not None and stream.response.mimetype == "text/event-stream"
    assert stream.response.headers["X-Accel-Buffering"] == "no"
    before = events_until(stream.frames, running(ITEMS))
    wait_for(lambda: len(own.predictions(SERVER_TOKEN)) == ITEMS, what="every create")
    assert own.stats(SERVER_TOKEN)["inflight_now"] == ITEMS  # none ended: the clock is held
    clock.release()
    events = before + events_until(stream.frames, ended)
    assert_whole_story(events, ITEMS, make_settings().output_dir)
    with pytest.raises(StopIteration):  # the job's stream ends with the job
        next(stream.frames)
    stream.close()
    # Resumed after its last event, an ended job's stream says there is nothing more (204).
    assert client.get(f"/jobs/{job_id}/events",
                      headers={**ADMIN, "Last-Event-ID": str(events[-1].id)}).status_code == 204


def test_a_client_that_reconnects_with_last_event_id_sees_every_event_once(
        held: tuple[Flask, Simulator, HeldClock], make_settings: Callable[..., Settings]) -> None:
    app, _, clock = held
    client = app.test_client()
    job_id = submit(client, [f"#slow=1 picture {i}" for i in range(ITEMS)], ADMIN)
    stream = ClientStream(client, f"/jobs/{job_id}/events", ADMIN)
    before = events_until(stream.frames, running(ITEMS))
    stream.close()  # gone mid-job
    clock.release()
    wait_for(lambda: client.get(f"/jobs/{job_id}", headers=ADMIN).get_json()["state"]
             == "succeeded", what="the job to end while no one listens")
    again = ClientStream(client, f"/jobs/{job_id}/events",
                       {**ADMIN, "Last-Event-ID": str(before[-1].id)})
    after = events_until(again.frames, ended)
    again.close()
    assert_whole_story(before + after, ITEMS, make_settings().output_dir)
    # Nothing more and nothing less than the whole log, read again from the start.
    whole = ClientStream(client, f"/jobs/{job_id}/events", ADMIN)
    assert [e.id for e in events_until(whole.frames, ended)] == [e.id for e in before + after]
    whole.close()


def test_a_cancel_shows_the_dropped_items_then_the_running_ones_and_the_end(
        held_sim: tuple[Simulator, HeldClock], make_app: Callable[..., Flask]) -> None:
    own, _ = held_sim
    client = make_app(replicate_base_url=own.base_url, sync_wait_seconds=0,
                      concurrent_limit=1).test_client()
    job_id = submit(client, [f"picture {i}" for i in range(ITEMS)], ADMIN)
    stream = ClientStream(client, f"/jobs/{job_id}/events", ADMIN)
    before = events_until(stream.frames, running(1))  # one slot: the others wait, queued
    wait_for(lambda: len(own.predictions(SERVER_TOKEN)) == 1, what="the first create")
    assert client.post(f"/jobs/{job_id}/cancel", headers=ADMIN).status_code == 200
    after = events_until(stream.frames, ended)
    stream.close()
    kinds = [(e.kind, e.data.get("index"), e.data["state"]) for e in before + after]
    assert kinds == [("job.created", None, "queued"), ("item.state", 0, "running"),
                     ("job.cancel_requested", None, "cancel_requested"),
                     ("item.state", 0, "canceled"), ("job.finished", None, "canceled")]
    assert after[0].data["canceled"] == [1, 2]
    assert after[0].data["counts"]["canceled"] == 2
    assert after[-1].data["counts"]["canceled"] == ITEMS


def test_another_caller_gets_404_and_sees_none_of_the_events(
        make_app: Callable[..., Flask]) -> None:
    client = make_app(event_heartbeat_seconds=0.05).test_client()
    mine = ClientStream(client, "/events", USER)
    theirs = ClientStream(client, "/events", OTHER)
    admin = ClientStream(client, "/events", ADMIN)
    job_id = submit(client, ["a picture"], USER)
    assert client.get(f"/jobs/{job_id}/events", headers=OTHER).status_code == 404
    assert client.get("/jobs/job_nope/events", headers=USER).status_code == 404
    assert client.get(f"/jobs/{job_id}/events").status_code == 401
    assert {e.data["job_id"] for e in events_until(mine.frames, ended)} == {job_id}
    assert {e.data["job_id"] for e in events_until(admin.frames, ended)} == {job_id}
    # Read after the job ended: had any of its events been theirs, they would come first.
    frame = next(f for f in theirs.frames if f.retry is None)
    assert frame.kind is None and frame.comment == "keep-alive"
    for stream in (mine, theirs, admin):
        stream.close()


def test_an_issued_key_streams_its_own_jobs_only(make_app: Callable[..., Flask]) -> None:
    client = make_app(event_heartbeat_seconds=0.05).test_client()
    keys = [{"X-API-Key": client.post("/keys", json={"name": name}, headers=ADMIN)
             .get_json()["key"]} for name in ("svc-a", "svc-b")]
    mine, theirs = (ClientStream(client, "/events", key) for key in keys)
    admins_job = submit(client, ["the admin's"], ADMIN)  # the same account, not the key's
    job_id = submit(client, ["the key's"], keys[0])
    assert client.get(f"/jobs/{job_id}/events", headers=keys[1]).status_code == 404
    assert client.get(f"/jobs/{admins_job}/events", headers=keys[0]).status_code == 404
    assert {e.data["job_id"] for e in events_until(mine.frames, ended)} == {job_id}
    assert next(f for f in theirs.frames if f.retry is None).comment == "keep-alive"
    mine.close()
    theirs.close()


def test_an_idle_stream_gets_heartbeats(make_app: Callable[..., Flask]) -> None:
    client = make_app(event_heartbeat_seconds=0.05).test_client()
    stream = ClientStream(client, "/events", ADMIN)
    frames = [next(stream.frames) for _ in range(3)]
    assert frames[0].retry is not None
    assert [(f.kind, f.comment) for f in frames[1:]] == [(None, "keep-alive")] * 2
    stream.close()


def test_streams_past_the_callers_bound_get_429_until_one_closes(
        make_app: Callable[..., Flask]) -> None:
    client = make_app(event_streams_per_caller=2, event_streams_per_process=3).test_client()
    open_ = [ClientStream(client, "/events", USER) for _ in range(2)]
    refused = client.get("/events", headers=USER)
    assert refused.status_code == 429 and refused.headers["Retry-After"]
    assert "EVENT_STREAMS_PER_CALLER" in refused.get_json()["error"]
    other = ClientStream(client, "/events", OTHER)  # another caller has streams of its own
    assert other.response.status_code == 200
    full = client.get("/events", headers=ADMIN)  # ... until the process serves all it may
    assert full.status_code == 429 and "EVENT_STREAMS_PER_PROCESS" in full.get_json()["error"]
    open_.pop().close()
    again = ClientStream(client, "/events", USER)
    assert again.response.status_code == 200
    for stream in (*open_, other, again):
        stream.close()


def test_a_bad_last_event_id_is_a_400_naming_it(client: FlaskClient) -> None:
    for value in ("12x", "9" * 19, "", " 1", "١"):  # the last: an Arabic-Indic digit
        answer = client.get("/events", headers={**ADMIN, "Last-Event-ID": value})
        assert answer.status_code == 400 and answer.get_json()["field"] == "Last-Event-ID"
    answer = client.get("/events?last_event_id=-1", headers=ADMIN)
    assert answer.status_code == 400 and answer.get_json()["field"] == "last_event_id"


def test_retention_deletes_a_jobs_events_with_the_job(app: Flask) -> None:
    client = app.test_client()
    job_id = submit(client, ["a picture"], ADMIN)
    runner = app.extensions["jobs"]
    assert runner.wait(job_id, timeout=20).state == "succeeded"
    assert runner.store.events.after(Scope(job_id=job_id), 0)
    runner.maintenance.purge_expired(runner.store.get(job_id).finished_at
                                     + app.extensions["settings"].job_retention_seconds + 1)
    assert runner.store.get(job_id) is None
    assert runner.store.events.after(Scope(job_id=job_id), 0) == []
    assert client.get(f"/jobs/{job_id}/events", headers=ADMIN).status_code == 404


def test_a_finished_items_events_say_what_its_row_and_its_jobs_row_store(app: Flask) -> None:
    """The finish writes its events from what it stored (not read back): they must match the
    item's row, the job's cost as each item ended, and its files follow at once."""
    client = app.test_client()
    job_id = submit(client, ["a picture", "#nsfw a picture"], ADMIN)
    runner = app.extensions["jobs"]
    assert runner.wait(job_id, timeout=20).state == "partially_failed"
    events = [(e.kind, json.loads(e.data))
              for e in runner.store.events.after(Scope(job_id=job_id), 0)]
    items = {item.index: item for item in runner.store.items(job_id)}
    assert items[0].state == "succeeded" and items[1].state == "failed"
    finished = [(n, data) for n, (kind, data) in enumerate(events)
                if kind == "item.state" and data["state"] not in ("queued", "running")]
    assert sorted(data["index"] for _, data in finished) == [0, 1]
    shown = ("state", "model_used", "cost_usd", "error", "error_type")
    for _, data in finished:
        assert {k: data[k] for k in shown} == {k: getattr(items[data["index"]], k) for k in shown}
    costs = [data["cost_usd"] or 0.0 for _, data in finished]
    assert [data["job_cost_usd"] for _, data in finished] == pytest.approx(
        [sum(costs[:n + 1]) for n in range(len(costs))])
    at = next(n for n, data in finished if data["index"] == 0)
    assert events[at + 1][0] == "item.file" and events[at + 1][1]["index"] == 0
    assert [data["index"] for kind, data in events if kind == "item.file"] == [0]
    assert [Path(p).name for p in items[0].files] == [events[at + 1][1]["name"]]


def test_a_wait_on_a_job_another_process_ends_returns_at_its_end_not_at_a_reread(
        make_app: Callable[..., Flask], sim: Simulator) -> None:
    """A synchronous request waits in one process while another runs its job (a helper took
    its items): the other's events wake it, so it does not wait for its next look."""
    sim.config.run_seconds = 1.0
    here, there = make_app(), make_app()  # one state file: two processes' views
    job_id = submit(there.test_client(), ["a picture"], ADMIN)
    started = time.monotonic()
    job = here.extensions["jobs"].wait(job_id, timeout=120, reread=60)
    assert job is not None and job.state == "succeeded"
    assert time.monotonic() - started < 30  # a re-read would have come after 60 s


def test_a_wake_up_reaches_the_streams_of_another_process_on_the_host(
        make_settings: Callable[..., Settings]) -> None:
    assert_wakes_the_other(make_settings())


def test_a_wake_up_reaches_the_streams_of_another_instance_through_redis(
        make_settings: Callable[..., Settings]) -> None:
    with redis_prefix() as prefix:
        assert_wakes_the_other(make_settings(redis_url=REDIS_URL, redis_key_prefix=prefix))


def assert_wakes_the_other(settings: Settings) -> None:
    """One side's announce wakes the other's waiting stream (not the fallback re-read)."""
    writer, reader = StreamWakeups(settings), StreamWakeups(settings)
    stop = threading.Event()

    def announce() -> None:  # until the reader is surely subscribed
        while not stop.is_set():
            writer.announce()
            stop.wait(0.05)

    seen = reader.generation()
    reader.listen()
    thread = threading.Thread(target=announce)
    thread.start()
    try:
        reader.wait(seen, 20)
        assert reader.generation() != seen
    finally:
        stop.set()
        thread.join()
        writer.close()
        reader.close()


# -- across processes -----------------------------------------------------------------------


class HttpStream:
    """A stream read over a real connection."""

    def __init__(self, url: str, path: str, headers: dict[str, str]) -> None:
        self.response = requests.get(url + path, headers=headers, stream=True, timeout=30)
        self.frames = parse_frames(self.response.iter_content(chunk_size=None))

    def worker(self, server: Gunicorn) -> int:
        """The gunicorn worker holding this connection (from /proc)."""
        # gunicorn closes after each response, so http.client hands the socket to the response.
        local_port = self.response.raw._fp.fp.raw._sock.getsockname()[1]
        (owner,) = socket_owners({inode for local, remote, inode in _tcp_sockets()
                                  if (local, remote) == (server.port, local_port)})
        return owner

    def close(self) -> None:
        self.response.close()


def _tcp_sockets() -> list[tuple[int, int, str]]:
    """(local port, remote port, inode) of every TCP socket on this machine."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            found.append((int(fields[1].rsplit(":", 1)[1], 16),
                          int(fields[2].rsplit(":", 1)[1], 16), fields[9]))
    return found


def http_submit(server: Gunicorn, prompts: list[str], headers: dict[str, str]) -> str:
    answer = server.post("/generate-batch", {
        "model_name": "flux-dev", "prompts": prompts, "output_format": "png",
        "custom_filenames": [f"pic_{i}" for i in range(len(prompts))]},
        {**headers, "Prefer": "respond-async"}, timeout=10)
    assert answer.status_code == 202, answer.text
    return str(answer.json()["id"])


def on_another_worker(server: Gunicorn, path: str, headers: dict[str, str],
                      busy: int) -> HttpStream:
    """A stream that worker `busy` does not serve: the ones it takes stay open meanwhile, so
    once it holds all it may (EVENT_STREAMS_PER_PROCESS) it answers 429 and the other serves."""
    held: list[HttpStream] = []
    try:
        for _ in range(200):
            stream = HttpStream(server.url, path, headers)
            if stream.response.status_code == 429:
                stream.close()
                continue
            assert stream.response.status_code == 200, stream.response.text
            if stream.worker(server) != busy:
                return stream
            held.append(stream)
        raise AssertionError("no other worker ever served a stream")
    finally:
        for stream in held:
            stream.close()


@pytest.fixture
def held_settings(held_sim: tuple[Simulator, HeldClock], make_settings: Callable[..., Settings]
                  ) -> Callable[..., Settings]:
    own, _ = held_sim
    return lambda **more: make_settings(replicate_base_url=own.base_url, sync_wait_seconds=0,
                                        **more)


def test_a_stream_resumed_on_the_other_gunicorn_worker_sees_every_event_once(
        held_sim: tuple[Simulator, HeldClock], held_settings: Callable[..., Settings],
        start_gunicorn: Callable[..., Gunicorn]) -> None:
    own, clock = held_sim
    settings = held_settings()
    server = start_gunicorn(settings, workers=2)
    job_id = http_submit(server, [f"#slow=1 picture {i}" for i in range(ITEMS)], ADMIN)
    first = HttpStream(server.url, f"/jobs/{job_id}/events", ADMIN)
    before = events_until(first.frames, running(ITEMS))
    second = on_another_worker(server, f"/jobs/{job_id}/events",
                               {**ADMIN, "Last-Event-ID": str(before[-1].id)},
                               first.worker(server))
    first.close()  # gone mid-job; resumed on the other worker
    wait_for(lambda: len(own.predictions(SERVER_TOKEN)) == ITEMS, what="every create")
    clock.release()
    after = events_until(second.frames, ended)
    second.close()
    assert_whole_story(before + after, ITEMS, settings.output_dir)
    assert len(own.predictions(SERVER_TOKEN)) == ITEMS


def test_a_stream_resumed_on_another_instance_sees_every_event_once(
        held_sim: tuple[Simulator, HeldClock], held_settings: Callable[..., Settings],
        start_gunicorn: Callable[..., Gunicorn], tmp_path: Path) -> None:
    own, clock = held_sim
    with redis_prefix() as prefix, postgres_database() as database_url:
        shared = {"redis_url": REDIS_URL, "redis_key_prefix": prefix,
                  "database_url": database_url}
        a, b = (start_gunicorn(held_settings(state_file=tmp_path / host / "state.sqlite3",
                                             **shared), workers=1) for host in "ab")
        job_id = http_submit(a, [f"#slow=1 picture {i}" for i in range(ITEMS)], ADMIN)
        first = HttpStream(a.url, f"/jobs/{job_id}/events", ADMIN)
        before = events_until(first.frames, running(ITEMS))
        first.close()  # gone mid-job; resumed on the instance that does not run it
        second = HttpStream(b.url, f"/jobs/{job_id}/events",
                            {**ADMIN, "Last-Event-ID": str(before[-1].id)})
        everything = HttpStream(b.url, "/events", {**ADMIN, "Last-Event-ID": "0"})
        wait_for(lambda: len(own.predictions(SERVER_TOKEN)) == ITEMS, what="every create")
        clock.release()
        after = events_until(second.frames, ended)
        assert_whole_story(before + after, ITEMS, tmp_path / "output")
        # GET /events on the other instance tells the same story, from its first event.
        assert [e.id for e in events_until(everything.frames, ended)] == \
            [e.id for e in before + after]
        for stream in (second, everything):
            stream.close()
        a.stop()
        b.stop()


def test_the_shipped_proxy_passes_a_stream_unbuffered_and_resumes_it(
        make_settings: Callable[..., Settings], start_gunicorn: Callable[..., Gunicorn],
        tmp_path: Path) -> None:
    server = start_gunicorn(make_settings(), workers=1, EVENT_HEARTBEAT_SECONDS="0.2")
    with running_nginx(tmp_path / "nginx", server.port) as nginx:
        idle = HttpStream(nginx.url, "/events", ADMIN)
        assert idle.response.headers["Content-Type"].startswith("text/event-stream")
        # Frames of a few bytes each: a buffering proxy would hold them back.
        assert [next(idle.frames).comment for _ in range(3)][1:] == ["keep-alive"] * 2
        idle.close()
        answer = requests.post(nginx.url + "/generate-batch", headers={
            **ADMIN, "Prefer": "respond-async"}, timeout=10, json={
            "model_name": "flux-dev", "prompts": ["a", "b"], "output_format": "png"})
        job_id = answer.json()["id"]
        whole = HttpStream(nginx.url, f"/jobs/{job_id}/events", ADMIN)
        story = events_until(whole.frames, ended)
        whole.close()
        resumed = HttpStream(nginx.url, f"/jobs/{job_id}/events",
                             {**ADMIN, "Last-Event-ID": str(story[0].id)})
        assert [e.id for e in events_until(resumed.frames, ended)] == [e.id for e in story[1:]]
        resumed.close()


def test_sigterm_ends_open_streams_so_they_do_not_hold_the_shutdown(
        make_settings: Callable[..., Settings], start_gunicorn: Callable[..., Gunicorn]) -> None:
    server = start_gunicorn(make_settings(), workers=1)
    stream = HttpStream(server.url, "/events", ADMIN)
    assert next(stream.frames).retry is not None
    server.stop()  # SIGTERM; SIGKILL after 15 s, before gunicorn's 30 s graceful_timeout
    assert server.proc.returncode == 0  # it exited by itself
    assert list(stream.frames) == []  # and the stream ended cleanly (the client resumes)
