"""Token streams: SSE replay and resume, raw Redis subscribers, cancellation of running jobs."""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import replace

import pytest
import requests

from banter import keys
from banter.demo import DEMO_TEXT
from producer.app import create_app
from tests.conftest import Api, Server, unserved_producer

WORDS = [" " + w for w in DEMO_TEXT.split()]


def sse_events(response: requests.Response):
    """(id, event, data) per SSE event, skipping keep-alive comments."""
    entry = {}
    for line in response.iter_lines(decode_unicode=True):
        if not line:
            if "event" in entry:
                yield entry.get("id"), entry["event"], json.loads(entry["data"])
            entry = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(": ")
            entry[name] = value


def submit(api, max_tokens: int, prompt: str = "go") -> str:
    return api.post("/v1/jobs", {"kind": "generate", "input": prompt,
                                 "params": {"max_tokens": max_tokens}}).json()["id"]


def test_late_subscriber_gets_every_token_then_done(api, redis_client):
    job_id = submit(api, 6)
    api.wait_job(job_id)
    with api.session.get(f"{api.url}/v1/jobs/{job_id}/events", stream=True, timeout=30) as r:
        events = list(sse_events(r))
    assert [e for _, e, _ in events] == ["token"] * 6 + ["done"]
    assert [d["seq"] for _, e, d in events if e == "token"] == list(range(6))
    assert "".join(d["text"] for _, e, d in events if e == "token") == "".join(WORDS[:6])
    job = api.get(f"/v1/jobs/{job_id}").json()
    assert events[-1][2] == {"finish_reason": "length", "usage": job["usage"]}
    raw = redis_client.xrevrange(keys.stream(job_id), count=1)[0][1]  # as XRANGE readers get it
    assert json.loads(raw["usage"]) == job["usage"]
    assert job["usage"]["completion_tokens"] == 6
    assert job["usage"]["total_tokens"] == job["usage"]["prompt_tokens"] + 6


def test_last_event_id_resumes_with_exactly_the_rest(api):
    job_id = submit(api, 8)
    api.wait_job(job_id)
    url = f"{api.url}/v1/jobs/{job_id}/events"
    with api.session.get(url, stream=True, timeout=30) as r:
        events = list(sse_events(r))
    cut = events[3][0]
    with api.session.get(url, stream=True, timeout=30, headers={"Last-Event-ID": cut}) as r:
        rest = list(sse_events(r))
    assert rest == events[4:]
    with api.session.get(url, stream=True, timeout=30, headers={"Last-Event-ID": "junk"}) as r:
        assert list(sse_events(r)) == events


def test_a_resume_at_or_past_the_final_event_ends_at_once(api):
    """A client that already has ``done`` (EventSource reconnects with its id) or names a later
    id gets 204 No Content, which stops EventSource reconnecting; an id Redis would refuse
    (a part of 2**64 or more) is malformed like any other: a full replay, never a 500."""
    job_id = submit(api, 3)
    api.wait_job(job_id)
    url = f"{api.url}/v1/jobs/{job_id}/events"
    with api.session.get(url, stream=True, timeout=30) as r:
        events = list(sse_events(r))
    done_id = events[-1][0]
    ms, seq = (int(part) for part in done_id.split("-"))
    for after in (done_id, f"{ms}-{seq + 1}", f"{ms + 10 ** 6}-0"):
        r = api.session.get(url, timeout=10, headers={"Last-Event-ID": after})
        assert r.status_code == 204 and r.text == "", after
    r = api.session.get(url, timeout=10, params={"last_event_id": done_id})
    assert r.status_code == 204
    for huge in (f"{2 ** 64}-0", f"0-{2 ** 64}", "1" * 4301 + "-0"):
        with api.session.get(url, stream=True, timeout=30, headers={"Last-Event-ID": huge}) as r:
            assert r.status_code == 200 and list(sse_events(r)) == events, huge
    # digits Python calls digits and Redis does not (a header cannot carry them: the query can)
    with api.session.get(url, stream=True, timeout=30, params={"last_event_id": "١٢-٣"}) as r:
        assert r.status_code == 200 and list(sse_events(r)) == events


def test_a_resume_past_the_end_of_a_job_still_running_ends_with_its_final_event(
        settings, redis_client, demo_models):
    """An id the job has not written (past its last entry) while it runs: the stream sends
    nothing and ends when the job's final event is written, not at the next keep-alive. The
    job waits on a queue no worker serves, then is cancelled."""
    with unserved_producer(settings, redis_client) as (server, _queue):
        api = Api(server.url)
        job_id = api.post("/v1/jobs", {"kind": "generate", "input": "x",
                                       "params": {"max_tokens": 2}}).json()["id"]
        url = f"{server.url}/v1/jobs/{job_id}/events"
        # a read timeout under the keep-alive period (15 s): the end must not wait for it
        with api.session.get(url, stream=True, timeout=(10, 10),
                             headers={"Last-Event-ID": f"{int(time.time() * 1000) + 10 ** 9}-0"}) as r:
            assert r.status_code == 200
            assert api.session.delete(f"{server.url}/v1/jobs/{job_id}").status_code == 200
            body = b"".join(r.iter_content(None))
        assert body == b": stream open\n\n"
        assert api.get(f"/v1/jobs/{job_id}").json()["status"] == "cancelled"


def test_a_resume_past_the_end_of_a_job_that_just_ended_reads_its_final_event(redis_client):
    """The job ends between the producer's check (still running: a stream goes out) and the
    stream's first read: that read starts just before the last entry, so the final event ends
    the stream at once instead of after a keep-alive period of waiting on later ids."""
    from banter.streams import DoneEvent, EventType, StreamWriter, TokenEvent, read_events, read_start

    job_id = f"ended-{uuid.uuid4().hex[:8]}"
    writer = StreamWriter(redis_client, 100, 60)
    writer.publish([TokenEvent(job_id, 0, "a", 1),
                    DoneEvent(job_id, "stop", {"prompt_tokens": 1, "completion_tokens": 1})])
    future = f"{int(time.time() * 1000) + 10 ** 9}-0"
    start = read_start(redis_client, job_id, future)
    assert [kind for _id, kind, _ in read_events(redis_client, job_id, start)] == [
        EventType.DONE]
    empty = f"never-{uuid.uuid4().hex[:8]}"
    assert read_start(redis_client, empty, future) == "0-0"
    token_id = writer.publish([TokenEvent(empty, 0, "b", 2)])[0]
    assert read_start(redis_client, empty, token_id) == token_id  # not past the end: as asked


def test_a_job_and_its_stream_end_in_one_step(redis_client, monkeypatch):
    """A worker that dies between ending a job's record and ending its stream left a
    succeeded job whose stream never ended (a reader waited for ever): both are one step
    (``JobStore.finish``), which needs no second write, and which a worker that no longer holds
    the job does neither of."""
    from banter.jobs import JobRecord, JobStatus, JobStore
    from banter.streams import DoneEvent, EventType, StreamWriter, read_events

    store, streams = JobStore(redis_client, 60), StreamWriter(redis_client, maxlen=100, ttl_s=60)
    record = JobRecord(id=JobRecord.new_id(), kind="generate", model="demo-gpt", input="x",
                       owner="alice")
    store.create(record)
    assert store.take(record, "w1@test", 30)[0]
    monkeypatch.setattr(StreamWriter, "publish", lambda *a, **k: (_ for _ in ()).throw(
        AssertionError("a second write: a worker dying before it leaves the stream open")))
    done = DoneEvent(record.id, "stop", {"prompt_tokens": 1, "completion_tokens": 0})
    assert store.finish(record, (JobStatus.RUNNING,), JobStatus.SUCCEEDED, done, streams,
                        finished_at=1.0, owner="w2@test")[:2] == (False, "taken over")
    assert read_events(redis_client, record.id) == []
    assert store.finish(record, (JobStatus.RUNNING,), JobStatus.SUCCEEDED, done, streams,
                        finished_at=2.0, owner="w1@test", result={"text": ""})[:2] == (
        True, "running")
    assert store.get(record.id).status == "succeeded"
    assert [kind for _, kind, _ in read_events(redis_client, record.id)] == [EventType.DONE]
    assert store.finish(record, (JobStatus.RUNNING,), JobStatus.FAILED, done, streams,
                        finished_at=3.0, owner="w1@test")[:2] == (False, "succeeded")  # once
    assert len(read_events(redis_client, record.id)) == 1


def test_ended_by_says_whether_a_reader_has_the_final_event(redis_client):
    from banter.streams import DoneEvent, StreamWriter, TokenEvent, ended_by

    writer = StreamWriter(redis_client, maxlen=100, ttl_s=60)
    job = "ended-by-job"
    assert not ended_by(redis_client, job, "0-0")  # no stream yet
    first = writer.publish([TokenEvent(job, 0, "a", 1)])[0]
    assert not ended_by(redis_client, job, first)  # the job goes on
    done = writer.publish([DoneEvent(job, "length", {"prompt_tokens": 1, "completion_tokens": 1})])[0]
    assert not ended_by(redis_client, job, first) and not ended_by(redis_client, job, "0-0")
    assert ended_by(redis_client, job, done) and ended_by(redis_client, job, "99999999999999-0")


def test_an_events_typed_data_is_what_its_stream_entry_reads_back_as():
    """The pub/sub message is built from ``data()``, the stream entry from ``fields()``: a
    subscriber and a stream reader must get the same event."""
    from banter.streams import DoneEvent, ErrorEvent, TokenEvent, decode_entry

    entry = {"token_id": 17, "token": " caf\u00e9", "logprob": -0.25,
             "top_logprobs": [{"token_id": 4, "token": "\ufffd", "logprob": -0.125}]}
    for event in (TokenEvent("j", 3, " caf\u00e9 \"x\"", 17),
                  TokenEvent("j", 4, "", 17, entry),
                  DoneEvent("j", "length", {"prompt_tokens": 2, "completion_tokens": 5}),
                  ErrorEvent("j", {"type": "inference_error", "message": "bad \u2713"})):
        kind, data = decode_entry(event.fields())
        assert kind.value == event.fields()["event"] and data == event.data()


def test_live_sse_and_raw_redis_subscriber_see_the_same_tokens(api, redis_client):
    job_id = submit(api, 400)
    pubsub = redis_client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(keys.tokens(job_id))
    with api.session.get(f"{api.url}/v1/jobs/{job_id}/events", stream=True, timeout=60) as r:
        sse = list(sse_events(r))
    live: list[dict] = []
    deadline = time.monotonic() + 30
    while not (live and live[-1]["event"] == "done") and time.monotonic() < deadline:
        message = pubsub.get_message(timeout=1.0)
        if message:
            live.append(json.loads(message["data"]))
    pubsub.close()
    assert len(sse) == 401 and sse[-1][1] == "done"
    # The subscription started after submission: it sees a suffix of the stream, in order,
    # with the stream entry ids, ending with the final event.
    assert live, "the raw subscriber saw no live message"
    assert live[-1]["event"] == "done"
    ids = [entry_id for entry_id, _, _ in sse]
    assert [m["id"] for m in live] == ids[len(ids) - len(live):]
    # each message is the SSE event's data, typed as there, with its id and event
    assert live == [{"id": i, "event": e, **d} for i, e, d in sse[len(sse) - len(live):]]
    assert all(isinstance(m["seq"], int) and isinstance(m["token_id"], int)
               for m in live if m["event"] == "token")
    assert isinstance(live[-1]["usage"], dict)


def test_cancelling_a_running_job_stops_it_and_spares_its_batch(api):
    victim = submit(api, 1000)
    neighbours = [submit(api, 40, prompt=f"n{i}") for i in range(3)]
    with api.session.get(f"{api.url}/v1/jobs/{victim}/events", stream=True, timeout=60) as r:
        events = sse_events(r)
        first = next(events)
        assert first[1] == "token"
        assert api.delete(f"/v1/jobs/{victim}").status_code == 200
        rest = list(events)
    assert rest[-1][1] == "done" and rest[-1][2]["finish_reason"] == "cancelled"
    job = api.wait_job(victim)
    assert job["status"] == "cancelled"
    assert job["result"]["finish_reason"] == "cancelled"
    assert 0 < job["usage"]["completion_tokens"] < 1000
    for job_id in neighbours:
        other = api.wait_job(job_id)
        assert other["status"] == "succeeded"
        assert other["result"]["text"] == "".join((WORDS * 3)[:40])


def test_disconnecting_from_a_streamed_inference_cancels_it(api):
    job_id = stream_then_disconnect(api, {"prompt": "bye", "max_tokens": 1000})
    assert api.wait_job(job_id)["status"] == "cancelled"


def test_keep_running_survives_a_disconnect(api):
    job_id = stream_then_disconnect(api, {"prompt": "stay", "max_tokens": 200,
                                          "keep_running": True})
    job = api.wait_job(job_id)
    assert job["status"] == "succeeded" and job["usage"]["completion_tokens"] == 200


def test_a_bad_keep_running_or_stream_flag_is_refused_before_any_job(api, redis_client):
    """Checked before the job is made, streamed or not: a refused call leaves no job running
    that its client never learns the id of."""
    queued_before = redis_client.zcard(keys.QUEUED)
    jobs_before = sum(1 for _ in redis_client.scan_iter(keys.job("*"), count=1000))
    for path, body, param in (
            ("/v1/inference?stream=true", {"prompt": "x", "keep_running": "yes"}, "keep_running"),
            ("/v1/inference", {"prompt": "x", "keep_running": 1}, "keep_running"),
            ("/v1/inference?stream=maybe", {"prompt": "x"}, "stream")):
        refused = api.post(path, body)
        assert refused.status_code == 422 and refused.json()["error"]["param"] == param
    assert redis_client.zcard(keys.QUEUED) == queued_before
    assert sum(1 for _ in redis_client.scan_iter(keys.job("*"), count=1000)) == jobs_before


def stream_then_disconnect(api, body: dict) -> str:
    response = requests.post(f"{api.url}/v1/inference?stream=true", json=body, stream=True,
                             timeout=30)
    assert response.status_code == 200
    job_id = response.headers["X-Job-ID"]
    next(sse_events(response))
    response.close()
    return job_id


def test_streamed_inference_matches_the_synchronous_text(api):
    with requests.post(f"{api.url}/v1/inference?stream=true", json={"prompt": "s",
                       "max_tokens": 5}, stream=True, timeout=30) as r:
        events = list(sse_events(r))
    text = "".join(d["text"] for _, e, d in events if e == "token")
    assert text == api.post("/v1/inference", {"prompt": "s", "max_tokens": 5}).json()["text"]


def test_many_concurrent_streams(api):
    results: dict[int, str] = {}

    def follow(i: int) -> None:
        with requests.post(f"{api.url}/v1/inference?stream=true",
                           json={"prompt": f"c{i}", "max_tokens": 12}, stream=True,
                           timeout=60) as r:
            results[i] = "".join(d["text"] for _, e, d in sse_events(r) if e == "token")

    threads = [threading.Thread(target=follow, args=(i,)) for i in range(24)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert results == {i: "".join(WORDS[:12]) for i in range(24)}


def test_stream_of_unknown_job_is_404(api):
    assert api.get("/v1/jobs/00000000-0000-4000-8000-000000000000/events").status_code == 404



def test_a_generate_step_costs_one_redis_round_trip(redis_client, monkeypatch):
    """The step's tokens for every job and its pass counters go in one pipeline, the tokens
    as one script call."""
    from redis.client import Pipeline

    from banter.streams import StreamWriter, TokenEvent
    from workers.runtime import RedisSink

    sink = RedisSink(redis_client, StreamWriter(redis_client, 100, 60), "round-trip@test")
    sink.streams.publish([])  # loads the script once, as the first step does
    calls = []
    real = Pipeline.execute

    def execute(self, *args, **kwargs):
        calls.append([command[0] for command, _options in self.command_stack])
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Pipeline, "execute", execute)
    sink.record_pass("generate", "demo-gpt", 1, 3, 0.001)
    sink.publish_tokens([TokenEvent(f"rt-{i}", 0, "x", 7) for i in range(3)])
    assert len(calls) == 1 and calls[0].count("EVALSHA") == 1
    assert all(redis_client.xlen(f"banter:stream:rt-{i}") == 1 for i in range(3))
    assert redis_client.hget("banter:worker:round-trip@test:stats", "generate_passes") == "1"


def test_an_embed_pass_costs_no_round_trip_and_rides_on_the_next_terminal_event(redis_client,
                                                                                  monkeypatch):
    """The engine thread never waits on Redis for pass counters: they go out with the next
    write that takes them (here a finishing job's done event, as ``WorkerRuntime._finish``
    sends it)."""
    from redis.client import Pipeline

    from banter.streams import DoneEvent, StreamWriter
    from workers.runtime import RedisSink

    sink = RedisSink(redis_client, StreamWriter(redis_client, 100, 60), "embed-ride@test")
    sink.streams.publish([])
    calls = []
    real = Pipeline.execute
    monkeypatch.setattr(Pipeline, "execute", lambda self, *a, **k: calls.append(1) or real(self))
    sink.record_pass("embed", "demo-embed", 1, 8, 0.002)
    sink.record_pass("embed", "demo-embed", 1, 3, 0.001)
    assert calls == []
    sink.streams.publish([DoneEvent("er-1", "stop", {"prompt_tokens": 3, "completion_tokens": 0})],
                         also=sink.add_passes)
    assert len(calls) == 1
    stats = redis_client.hgetall("banter:worker:embed-ride@test:stats")
    assert stats["embed_passes"] == "2" and stats["embed_items"] == "11"
    sink.streams.publish([DoneEvent("er-2", "stop", {})], also=sink.add_passes)
    assert redis_client.hget("banter:worker:embed-ride@test:stats", "embed_passes") == "2"  # once


@pytest.mark.parametrize("failure", ["timeout", "connection"])
def test_a_publish_whose_redis_does_not_answer_is_sent_again_not_dropped(redis_client, failure):
    """A hung Redis (the reply times out, the commands may have run) or a dropped connection:
    the step's tokens are sent again until Redis answers, and each is in the stream once."""
    import redis

    from banter.streams import StreamWriter, TokenEvent
    from workers.runtime import RedisSink

    job_id = f"hung-{uuid.uuid4().hex[:8]}"
    error = redis.TimeoutError if failure == "timeout" else redis.ConnectionError

    class Hung(StreamWriter):
        failures = 2

        def publish(self, events, also=None):
            if self.failures:
                self.failures -= 1
                if failure == "timeout":  # it ran; only the reply was lost
                    super().publish(events, also)
                raise error("Timeout reading from socket")
            return super().publish(events, also)

    sink = RedisSink(redis_client, Hung(redis_client, 100, 60), "hung@test")
    sink.publish_tokens([TokenEvent(job_id, 0, "a", 1), TokenEvent(job_id, 1, "b", 2)])
    entries = redis_client.xrange(keys.stream(job_id))
    assert [(e["seq"], e["text"]) for _id, e in entries] == [("0", "a"), ("1", "b")]


def test_pass_counters_drained_by_several_threads_at_once_are_each_counted_once():
    """The publisher, finishing jobs and the heartbeat drain the queued pass counters
    concurrently: none may fail on an emptied queue, none may be counted twice."""
    import sys
    import threading

    from workers.runtime import RedisSink

    class CountingPipe:
        def __init__(self):
            self.passes = 0

        def hincrby(self, key, field, amount):
            self.passes += field == "embed_passes"

        def hincrbyfloat(self, key, field, amount):
            pass

    sink = RedisSink(None, None, "drain@test")
    done, errors, pipes = threading.Event(), [], []

    def drain():
        pipe = CountingPipe()
        pipes.append(pipe)
        try:
            while not done.is_set():
                sink.add_passes(pipe)
        except Exception as exc:  # an emptied queue must not raise
            errors.append(exc)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        drainers = [threading.Thread(target=drain) for _ in range(6)]
        for thread in drainers:
            thread.start()
        for _ in range(20000):
            sink.record_pass("embed", "demo-embed", 1, 2, 0.001)
        done.set()
        for thread in drainers:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    last = CountingPipe()
    sink.add_passes(last)
    assert errors == []
    assert sum(p.passes for p in pipes) + last.passes == 20000


def test_a_stream_opens_before_its_job_makes_anything(api, settings, redis_client):
    """The headers (X-Job-ID: what a client needs to cancel or resume) go out at once, with an
    opening comment, not with the first token: here the job waits in a queue no worker serves."""
    beat = "opening-test-heartbeat"  # a live worker, as a waited call needs, but on no queue
    redis_client.zadd(keys.workers_for("onnx"), {beat: time.time() + 600})
    paused = Server(create_app(replace(settings, queue_interactive="opening-test",
                                       queue_bulk="opening-test-bulk"), redis_client))
    try:
        with requests.post(f"{paused.url}/v1/inference?stream=true", json={"prompt": "x"},
                           stream=True, timeout=10) as r:
            assert r.status_code == 200 and r.headers["X-Job-ID"]
            assert next(r.iter_lines(decode_unicode=True)) == ": stream open"
            job_id = r.headers["X-Job-ID"]
    finally:
        redis_client.zrem(keys.workers_for("onnx"), beat)
        paused.close()
    assert api.wait_job(job_id)["status"] == "cancelled"  # its client left


def test_an_openai_stream_that_loses_redis_ends_with_an_error_chunk(monkeypatch):
    """Past REDIS_RETRY_S without Redis, an OpenAI-format stream (no ids to resume from) ends
    with an error chunk the openai client raises, naming the job to follow; a native stream
    ends without a final event, for a Last-Event-ID resume."""
    import redis as redis_py

    import producer.service
    from producer import sse

    class Gone:
        def xread(self, *args, **kwargs):
            raise redis_py.ConnectionError("Connection refused")

    monkeypatch.setattr(producer.service, "REDIS_RETRY_S", 0.0)
    assert list(sse.events(Gone(), "j", "0-0", interrupted="data: lost\n\n")) == [
        ": stream open\n\n", "data: lost\n\n"]
    assert list(sse.events(Gone(), "j", "0-0")) == [": stream open\n\n"]


def test_a_stream_whose_job_record_expires_ends_cleanly(settings, redis_client, demo_models,
                                                       monkeypatch):
    """A job queued where no worker serves it outlives its record (BANTER_JOB_TTL_S): its
    open stream ends at the next keep-alive check, and a reconnect is told 404."""
    from producer import sse

    monkeypatch.setattr(sse, "KEEPALIVE_S", 1)
    server = Server(create_app(replace(settings, job_ttl_s=2, queue_interactive="ttl-test",
                                       queue_bulk="ttl-test-bulk"), redis_client))
    try:
        submitted = requests.post(f"{server.url}/v1/jobs", json={"kind": "generate", "input": "x"},
                                  timeout=10)
        assert submitted.status_code == 202, submitted.text
        job_id = submitted.json()["id"]
        with requests.get(f"{server.url}/v1/jobs/{job_id}/events", stream=True,
                          timeout=30) as response:
            lines = [line for line in response.iter_lines(decode_unicode=True) if line]
        assert lines[0] == ": stream open" and set(lines[1:]) <= {": keep-alive"}
        assert requests.get(f"{server.url}/v1/jobs/{job_id}/events",
                            timeout=10).status_code == 404
    finally:
        redis_client.delete("ttl-test")
        server.close()


def sse_lines(response: requests.Response, within_s: float = 20) -> list[str]:
    """The stream's non-blank lines until it ends, or until ``within_s`` passed (then the
    last line is "(still open)")."""
    lines, deadline = [], time.monotonic() + within_s
    for line in response.iter_lines(decode_unicode=True):
        if line:
            lines.append(line)
        if time.monotonic() > deadline:
            return [*lines, "(still open)"]
    return lines


@pytest.mark.parametrize("path, body, last", [
    ("/v1/inference?stream=true", {"prompt": "x"}, ": stream open"),
    ("/v1/completions", {"prompt": "x", "stream": True}, "data: [DONE]"),
    ("/v1/completions", {"prompt": "x", "stream": True, "n": 2}, "data: [DONE]"),
])
def test_a_synchronous_stream_whose_job_record_expires_ends(settings, redis_client, monkeypatch,
                                                            path, body, last):
    """As ``/v1/jobs/{id}/events`` does, a stream a submit answers ends when its job's record
    is gone (here past BANTER_JOB_TTL_S in a queue no worker serves): a native stream just
    ends, an OpenAI one with an error chunk naming the job, then ``[DONE]``. They sent
    keep-alives for ever."""
    from producer import sse

    monkeypatch.setattr(sse, "KEEPALIVE_S", 1)
    with unserved_producer(settings, redis_client, job_ttl_s=2) as (server, _queue):
        with requests.post(server.url + path, json=body, stream=True, timeout=30) as response:
            assert response.status_code == 200, response.text
            lines = sse_lines(response)
    assert lines[-1] == last, lines
    errors = [json.loads(line[6:])["error"] for line in lines if line.startswith("data: {")]
    if last == "data: [DONE]":
        assert len(errors) == 1 and errors[0]["type"] == "job_not_found", lines
        assert "is gone from Redis" in errors[0]["message"]
    else:
        assert set(lines[1:]) <= {": keep-alive"}, lines


def test_a_merged_stream_that_loses_redis_after_one_choice_ended_says_so(settings, redis_client,
                                                                          monkeypatch):
    """n choices streamed: Redis lost after choice 0 ended (cancelled here) still ends the
    answer with the error chunk before ``[DONE]``, whichever choice's reader saw it; the
    answer never looks whole while a choice has no finish_reason."""
    import redis as redis_py

    import producer.service

    monkeypatch.setattr(producer.service, "REDIS_RETRY_S", 0.5)
    client = redis_py.Redis.from_url(settings.redis_url, decode_responses=True)
    cut = threading.Event()
    real_xread = client.xread

    def xread(*args, **kwargs):
        if cut.is_set():
            raise redis_py.ConnectionError("Connection refused")
        return real_xread(*args, **kwargs)

    monkeypatch.setattr(client, "xread", xread)
    queue = f"unserved-{uuid.uuid4().hex[:8]}"
    redis_client.zadd(keys.workers_for("onnx"), {queue: time.time() + 600})
    server = Server(create_app(replace(settings, queue_interactive=queue,
                                       queue_bulk=f"{queue}-bulk"), client))
    try:
        with requests.post(f"{server.url}/v1/completions", stream=True, timeout=60,
                           json={"prompt": "x", "stream": True, "n": 2}) as response:
            assert response.status_code == 200, response.text
            first, second = response.headers["X-Job-IDs"].split(",")
            assert requests.delete(f"{server.url}/v1/jobs/{first}", timeout=10).ok
            lines, deadline = [], time.monotonic() + 20
            for line in response.iter_lines(decode_unicode=True):
                if line:
                    lines.append(line)
                if '"finish_reason": "cancelled"' in line:
                    cut.set()
                if time.monotonic() > deadline:
                    break
    finally:
        redis_client.zrem(keys.workers_for("onnx"), queue)
        redis_client.delete(queue)
        server.close()
    assert lines[-1] == "data: [DONE]", lines
    error = json.loads(lines[-2][6:])["error"]
    assert error["type"] == "unavailable" and second in error["message"], lines


def test_a_client_that_leaves_a_kept_merged_stream_frees_its_readers(settings, redis_client,
                                                                      monkeypatch):
    """``keep_running`` keeps the jobs, not the readers: once the client of an n-choice stream
    leaves, its reader threads stop within a keep-alive period (they read until the jobs
    ended, each holding a Redis connection, beyond the key's wait limit)."""
    from producer import sse

    monkeypatch.setattr(sse, "KEEPALIVE_S", 1)

    def readers() -> int:
        return sum(1 for t in threading.enumerate() if t.name == "sse-merged")

    before = readers()
    with unserved_producer(settings, redis_client) as (server, _queue):
        with requests.post(f"{server.url}/v1/completions", stream=True, timeout=30,
                           json={"prompt": "x", "stream": True, "n": 4,
                                 "keep_running": True}) as response:
            assert response.status_code == 200
            next(response.iter_lines())
            assert readers() == before + 4
            ids = response.headers["X-Job-IDs"].split(",")
        deadline = time.monotonic() + 30
        while readers() > before and time.monotonic() < deadline:
            time.sleep(0.2)
        assert readers() == before
        assert all(requests.get(f"{server.url}/v1/jobs/{i}", timeout=10).json()["status"]
                   == "queued" for i in ids)  # kept
