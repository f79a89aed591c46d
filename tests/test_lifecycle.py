"""Jobs that are cancelled or expire while queued never run, even when delivered later."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import replace

import pytest
import requests

from banter import keys
from banter.errors import Unavailable
from banter.jobs import JobRecord
from banter.metrics import JOBS
from banter.redisconn import connect
from banter.redisserver import RedisServer
from banter.streams import EventType, TokenEvent, decode_entry, read_events
from producer.app import create_app
from tests.conftest import Api, Server, start_worker, stop_process
from workers.backends import Outcome
from workers.engine import EmbedResult
from workers.runtime import WorkerRuntime, _local_outcome

PAUSED = {"BANTER_QUEUE_INTERACTIVE": "paused-interactive", "BANTER_QUEUE_BULK": "paused-bulk"}


@pytest.fixture(scope="module")
def paused(settings, redis_client, demo_models):
    """A producer whose queues no worker consumes until the test starts one."""
    server = Server(create_app(replace(settings, queue_interactive="paused-interactive",
                                       queue_bulk="paused-bulk"), redis_client))
    yield Api(server.url)
    server.close()


def stream_events(redis_client, job_id: str) -> list[tuple[EventType, dict]]:
    return [(kind, data) for _id, kind, data in read_events(redis_client, job_id)]


@pytest.fixture
def private_url(tmp_path):
    """A Redis of its own, for a test whose orphaned or running jobs the suite's live workers
    would take over first, or whose timing they would race."""
    server = RedisServer(tmp_path / "redis", persist=False)
    yield server.start()
    server.stop()


def runtime_on(settings, url: str, node: str, **changes) -> WorkerRuntime:
    """An in-process worker runtime (no Celery consumer) on the Redis at ``url``."""
    return WorkerRuntime(replace(settings, openai_key="", redis_url=url, broker_url=url,
                                 **changes), connect(url), None, node)


def counted(redis_client, **labels: str) -> int:
    """The worker's ``banter_jobs_total`` for one label set."""
    return int(redis_client.hget(keys.METRICS, JOBS.series(**labels)) or 0)


CANCELLED = {"kind": "generate", "lane": "interactive", "status": "cancelled", "backend": "onnx"}
EXPIRED = {"kind": "embed", "lane": "interactive", "status": "expired", "backend": "onnx"}


def test_cancelled_and_expired_queued_jobs_never_run(paused, stack_env, redis_client,
                                                     tmp_path):
    """Neither runs; both are counted in banter_jobs_total when they end: the cancelled one
    by the producer that cancelled it, the expired one by the worker that takes it off the
    queue too late (a deadline missed under load)."""
    before = counted(redis_client, **CANCELLED), counted(redis_client, **EXPIRED)
    cancelled = paused.post("/v1/jobs", {"kind": "generate", "input": "never",
                                         "params": {"max_tokens": 4}}).json()
    expiring = paused.post("/v1/jobs", {"kind": "embed", "input": "late",
                                        "deadline_s": 0.2}).json()
    normal = paused.post("/v1/jobs", {"kind": "generate", "input": "run me",
                                      "params": {"max_tokens": 2}}).json()
    response = paused.delete(f"/v1/jobs/{cancelled['id']}")
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    assert redis_client.llen("paused-interactive") == 3
    time.sleep(0.3)  # let the deadline pass while nothing consumes the queue

    worker = start_worker({**stack_env, **PAUSED}, "cpu-paused@localhost",
                          tmp_path / "worker.log", redis_client)
    try:
        assert paused.wait_job(normal["id"])["status"] == "succeeded"
        deadline = time.monotonic() + 30
        while redis_client.llen("paused-interactive") and time.monotonic() < deadline:
            time.sleep(0.05)
        done = paused.wait_job(cancelled["id"])
        expired = paused.wait_job(expiring["id"])
    finally:
        stop_process(worker)

    assert done["status"] == "cancelled"
    assert done["timings"]["started_at"] is None and done["result"] is None
    assert stream_events(redis_client, cancelled["id"]) == [
        (EventType.DONE, {"finish_reason": "cancelled",
                          "usage": {"prompt_tokens": 0, "completion_tokens": 0,
                                    "total_tokens": 0}})]
    assert expired["status"] == "expired" and expired["timings"]["started_at"] is None
    assert [kind for kind, _ in stream_events(redis_client, expiring["id"])] == [EventType.DONE]
    after = counted(redis_client, **CANCELLED), counted(redis_client, **EXPIRED)
    assert (after[0] - before[0], after[1] - before[1]) == (1, 1)


def test_cancelling_twice_keeps_one_final_event(paused, redis_client):
    job = paused.post("/v1/jobs", {"kind": "embed", "input": "twice"}).json()
    assert paused.delete(f"/v1/jobs/{job['id']}").json()["status"] == "cancelled"
    assert paused.delete(f"/v1/jobs/{job['id']}").json()["status"] == "cancelled"
    assert len(stream_events(redis_client, job["id"])) == 1
    assert redis_client.hget(keys.job(job["id"]), "cancel_requested") == "0"


def test_redelivered_finished_job_does_nothing(api, redis_client, settings):
    """A second delivery of a finished job (at-least-once) changes neither record nor stream."""
    from banter.broker import RUN_JOB, make_celery

    body = api.post("/v1/jobs", {"kind": "generate", "input": "once",
                                 "params": {"max_tokens": 3}}).json()
    first = api.wait_job(body["id"])
    entries = len(read_events(redis_client, body["id"]))
    make_celery(settings).send_task(RUN_JOB, args=[body["id"]], queue=settings.queue_interactive)
    marker = api.post("/v1/jobs", {"kind": "embed", "input": "after"}).json()
    api.wait_job(marker["id"])  # the worker has drained the queue past the redelivery
    assert api.get(f"/v1/jobs/{body['id']}").json() == first
    assert len(read_events(redis_client, body["id"])) == entries


def test_a_worker_takes_interactive_jobs_before_a_bulk_backlog(paused, stack_env, redis_client,
                                                               tmp_path):
    bulk = [paused.post("/v1/jobs", {"kind": "embed", "input": f"bulk {i}", "lane": "bulk"}
                        ).json()["id"] for i in range(30)]
    interactive = paused.post("/v1/jobs", {"kind": "embed", "input": "urgent"}).json()["id"]
    worker = start_worker({**stack_env, **PAUSED, "BANTER_WORKER_CONCURRENCY": "1"},
                          "cpu-lanes@localhost", tmp_path / "worker.log", redis_client)
    try:
        jobs = [paused.wait_job(job_id) for job_id in [*bulk, interactive]]
    finally:
        stop_process(worker)
    started = sorted(jobs, key=lambda job: job["timings"]["started_at"])
    # one bulk job may already be reserved when the worker starts; the urgent one comes next
    assert interactive in [job["id"] for job in started[:2]]
    assert all(job["status"] == "succeeded" for job in jobs)


def test_more_waiting_subscribers_than_a_default_redis_pool_holds(paused, redis_client):
    """Every waiting SSE stream blocks on its own Redis connection: 150 at once on one producer
    process all get the final event (redis-py's default pool holds 100)."""
    job_id = paused.post("/v1/jobs", {"kind": "embed", "input": "watched"}).json()["id"]
    answers: dict[int, str] = {}

    def follow(i: int) -> None:
        with requests.get(f"{paused.url}/v1/jobs/{job_id}/events", stream=True,
                          timeout=60) as response:
            answers[i] = response.text if response.status_code == 200 else str(
                response.status_code)

    threads = [threading.Thread(target=follow, args=(i,)) for i in range(150)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    while sum(1 for c in redis_client.client_list() if c["cmd"] == "xread") < 150:
        assert time.monotonic() < deadline, "the subscribers never all waited at once"
        time.sleep(0.05)
    paused.delete(f"/v1/jobs/{job_id}")
    for thread in threads:
        thread.join(timeout=60)
    assert len(answers) == 150
    assert all("event: done" in text and '"cancelled"' in text for text in answers.values())


def test_a_lease_released_during_renewal_is_not_reported_lost(settings, redis_client,
                                                              monkeypatch):
    """Renewal races with jobs finishing: a job whose thread released its lease between the
    snapshot of held jobs and the renewal is done, not taken over; only a job still held is."""
    runtime = WorkerRuntime(replace(settings, openai_key=""), redis_client, None,
                            "renew-test@localhost")
    cancelled: list[str] = []
    monkeypatch.setattr(runtime, "_cancel", cancelled.append)
    runtime._held.update({"finished-meanwhile", "taken-over"})
    renew = runtime.jobs.renew

    def racing_renew(job_ids, node, lease_s):
        lost = renew(job_ids, node, lease_s)  # neither has a lease of this node: both "lost"
        runtime._held.discard("finished-meanwhile")  # its thread finished and released it
        return lost

    monkeypatch.setattr(runtime.jobs, "renew", racing_renew)
    runtime._renew_leases()
    assert cancelled == ["taken-over"]


def test_a_cancel_whose_message_was_missed_stops_the_job_at_the_next_renewal(settings,
                                                                           redis_client,
                                                                           monkeypatch):
    """The producer flags the record and publishes the id on ``CANCEL``; a worker whose
    listener was reconnecting to Redis at that moment never gets the message, and its job ran
    to the end. The lease renewal (every heartbeat) reads the flag of each job it keeps."""
    node = "missed-cancel@localhost"
    runtime = WorkerRuntime(replace(settings, openai_key=""), redis_client, None, node)
    cancelled: list[str] = []
    monkeypatch.setattr(runtime, "_cancel", cancelled.append)
    asked, going_on, elsewhere = (JobRecord(id=JobRecord.new_id(), kind="generate",
                                            model="demo-gpt", input="x", owner="t")
                                  for _ in range(3))
    for record in (asked, going_on, elsewhere):
        runtime.jobs.create(record)
        assert runtime.jobs.take(record, node, 30)[0]
        runtime._held.add(record.id)
    runtime.jobs.note(asked.id, cancel_requested="1")
    runtime.jobs.note(elsewhere.id, cancel_requested="1")
    redis_client.set(keys.lease(elsewhere.id), "other@localhost")  # taken over meanwhile
    runtime._renew_leases()
    assert sorted(cancelled) == sorted([asked.id, elsewhere.id])  # each stopped here, once
    assert cancelled.count(elsewhere.id) == 1


def test_a_worker_that_stalls_past_its_lease_finishes_its_job(demo_models, stack_env, settings,
                                                              tmp_path, private_url):
    """A worker paused (SIGSTOP, a long GC, a starved VM) past its lease while no other worker
    takes the job over takes the lease back and finishes the job: not cancelled, every token
    once. (A Redis of its own: the suite's live workers would take the orphan over.)"""
    url = private_url
    redis_client = connect(url)
    server = Server(create_app(replace(settings, redis_url=url, broker_url=url), redis_client))
    paused = Api(server.url)
    worker = start_worker({**stack_env, "BANTER_REDIS_URL": url, "BANTER_LEASE_TTL_S": "2"},
                          "cpu-stall@localhost", tmp_path / "worker.log", redis_client)
    try:
        job = paused.post("/v1/jobs", {"kind": "generate", "input": "stall",
                                       "params": {"max_tokens": settings.max_tokens_limit}}).json()
        deadline = time.monotonic() + 30
        while redis_client.xlen(keys.stream(job["id"])) < 20:  # well into its generation
            assert time.monotonic() < deadline
            time.sleep(0.001)
        os.kill(worker.pid, signal.SIGSTOP)
        assert redis_client.xlen(keys.stream(job["id"])) < settings.max_tokens_limit // 2
        time.sleep(3.5)  # the 2 s lease lapses
        assert not redis_client.exists(keys.lease(job["id"]))
        os.kill(worker.pid, signal.SIGCONT)
        done = paused.wait_job(job["id"])
        events = [decode_entry(fields) for _id, fields
                  in redis_client.xrange(keys.stream(job["id"]))]
    finally:
        os.kill(worker.pid, signal.SIGCONT)
        stop_process(worker)
        server.close()
    assert done["status"] == "succeeded", done
    assert done["usage"]["completion_tokens"] == settings.max_tokens_limit
    tokens = [data["seq"] for kind, data in events if kind is EventType.TOKEN]
    assert tokens == list(range(settings.max_tokens_limit))
    assert [kind for kind, _ in events].count(EventType.DONE) == 1


def test_a_dropped_redis_connection_neither_cuts_a_stream_nor_cancels_its_job(
        paused, stack_env, redis_client, tmp_path):
    """The producer's XREAD connection killed under a streamed call (a Redis failover, a proxy
    timeout): the stream reads on over a new connection; only the client leaving cancels."""
    got: dict = {}

    def follow() -> None:
        with requests.post(f"{paused.url}/v1/inference?stream=true", stream=True, timeout=120,
                           json={"prompt": "hold on", "max_tokens": 5}) as r:
            got["status"], got["job"] = r.status_code, r.headers.get("X-Job-ID")
            got["events"] = [line for line in r.iter_lines(decode_unicode=True)
                             if line.startswith("event: ")]

    beat = "dropped-test-heartbeat"  # a live worker, as a waited call needs, but on no queue
    redis_client.zadd(keys.workers_for("onnx"), {beat: time.time() + 600})
    reader = threading.Thread(target=follow)
    reader.start()
    deadline = time.monotonic() + 30
    while not (blocked := [c for c in redis_client.client_list() if c["cmd"] == "xread"]):
        assert time.monotonic() < deadline, "the stream never blocked on XREAD"
        time.sleep(0.05)
    for client in blocked:
        redis_client.client_kill_filter(_id=client["id"])
    worker = start_worker({**stack_env, **PAUSED}, "cpu-dropped@localhost",
                          tmp_path / "worker.log", redis_client)
    try:
        reader.join(timeout=60)
    finally:
        stop_process(worker)
        redis_client.zrem(keys.workers_for("onnx"), beat)
    assert got["status"] == 200
    assert got["events"] == ["event: token"] * 5 + ["event: done"]
    assert paused.get(f"/v1/jobs/{got['job']}").json()["status"] == "succeeded"


def test_an_orphaned_job_is_sent_again_once_not_every_heartbeat(settings, private_url):
    """A running job whose worker died is sent again; while that copy waits for a worker (none
    serves its queue yet), later heartbeats send no more copies, even past a lease period."""
    queue = "orphans"
    runtime = runtime_on(settings, private_url, "reaper@localhost", lease_ttl_s=1,
                         worker_heartbeat_s=0.5, queue_interactive=queue,
                         queue_bulk=queue + "-bulk")
    record = JobRecord(id=JobRecord.new_id(), kind="embed", model="demo-embed", input="x",
                       owner="anonymous", lane="interactive", backend="onnx")
    runtime.jobs.create(record)
    runtime.jobs.take(record, "dead@localhost", lease_s=0.05)  # running, then its worker dies
    time.sleep(0.1)
    assert record.id in runtime.jobs.orphans()
    runtime._requeue_orphans()
    time.sleep(runtime.settings.lease_ttl_s + 0.2)
    runtime._requeue_orphans()
    assert runtime.redis.llen(queue) == 1


def test_a_job_whose_redis_goes_away_while_it_runs_is_left_for_takeover(settings, private_url,
                                                                       monkeypatch):
    """Not failed as a worker bug would fail it ("internal worker error", for good): it stays
    running, with no error, for a worker to take over once its lease lapses."""
    import redis

    runtime = runtime_on(settings, private_url, "blip@localhost")
    record = JobRecord(id=JobRecord.new_id(), kind="embed", model="demo-embed", input="x",
                       owner="anonymous", lane="interactive", backend="onnx")
    runtime.jobs.create(record)

    def redis_gone(job):
        raise redis.ConnectionError("Connection closed by server.")

    monkeypatch.setattr(runtime, "_execute", redis_gone)
    assert runtime.run_job(record.id) == "interrupted"
    left = runtime.jobs.get(record.id)
    assert left.status == "running" and left.error is None
    assert runtime.redis.get(keys.lease(record.id)) is None  # released: no wait for its TTL


def test_a_second_worker_with_a_live_workers_name_is_warned(stack_env, redis_client, tmp_path):
    first = start_worker({**stack_env, **PAUSED}, "twin@localhost", tmp_path / "first.log",
                         redis_client)
    log = tmp_path / "second.log"
    try:
        with open(log, "wb") as out:
            second = subprocess.Popen([sys.executable, "-m", "banter.cli", "worker", "--cpu",
                                       "--name", "twin@localhost"],
                                      env={**os.environ, **stack_env, **PAUSED}, stdout=out,
                                      stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while '"worker_name_in_use"' not in log.read_text():
                assert time.monotonic() < deadline and second.poll() is None, log.read_text()
                time.sleep(0.1)
        finally:
            stop_process(second)
    finally:
        stop_process(first)
    assert '"worker_name_in_use"' not in (tmp_path / "first.log").read_text()


def test_a_job_that_expires_while_it_runs_says_so_like_one_that_never_ran(settings,
                                                                          private_url):
    """Its error is {type: expired}, as for a job that expired queued, and its result keeps
    the text it made. (In process: a real deadline passing mid-run would race the worker's
    speed.)"""
    runtime = runtime_on(settings, private_url, "expiry@localhost")
    record = JobRecord(id=JobRecord.new_id(), kind="generate", model="demo-gpt", input="x",
                       owner="anonymous", lane="interactive", backend="onnx")
    runtime.jobs.create(record)
    runtime.jobs.take(record, runtime.node, lease_s=5)
    outcome = Outcome(result={"text": " a b", "finish_reason": "expired"},
                      finish_reason="expired", usage={"prompt_tokens": 1, "completion_tokens": 2},
                      batch_size=1, backend="onnx", version=1)
    assert runtime._finish(runtime.jobs.get(record.id), outcome, 0.0) == "expired"
    job = runtime.jobs.get(record.id)
    assert job.status == "expired" and job.result == outcome.result
    assert job.error == {"type": "expired", "message": "the job's deadline passed while it "
                         "ran, after 2 tokens (its result holds them)"}


def test_an_embed_job_that_expires_while_it_runs_has_no_result(settings, private_url):
    runtime = runtime_on(settings, private_url, "embed-expiry@localhost")
    record = JobRecord(id=JobRecord.new_id(), kind="embed", model="demo-embed", input=["a", "b"],
                       owner="anonymous", lane="interactive", backend="onnx")
    runtime.jobs.create(record)
    runtime.jobs.take(record, runtime.node, lease_s=5)
    outcome = _local_outcome(EmbedResult([], 3, 1, "expired"), 1, record.input)
    assert (outcome.result, outcome.usage["prompt_tokens"]) == (None, 3)
    assert runtime._finish(runtime.jobs.get(record.id), outcome, 0.0) == "expired"
    job = runtime.jobs.get(record.id)
    assert job.status == "expired" and job.result is None
    assert job.error == {"type": "expired", "message": "the job's deadline passed while its "
                         "inputs ran (an embed job's vectors come whole, so it has none)"}


@pytest.mark.parametrize("kind", ["generate", "embed"])
def test_a_job_whose_worker_died_past_its_deadline_ends_expired_with_its_stream(
        settings, private_url, kind):
    """Taken over after its deadline, a running job is not run again and not left running:
    it ends expired, its result the text its dead worker streamed, its stream closed once."""
    runtime = runtime_on(settings, private_url, "rescuer@localhost")
    record = JobRecord(id=JobRecord.new_id(), kind=kind, model=f"demo-{kind[:3]}", input="x",
                       owner="anonymous", lane="interactive", backend="onnx",
                       deadline_at=time.time() + 0.05)
    runtime.jobs.create(record)
    runtime.jobs.take(record, "dead@localhost", lease_s=0.05)  # running, then it dies
    if kind == "generate":
        runtime.streams.publish([TokenEvent(record.id, i, t, 7 + i)
                                 for i, t in enumerate([" a", "", " b"])])
    time.sleep(0.2)  # its lease lapsed and its deadline passed
    assert runtime.run_job(record.id) == "expired"
    assert runtime.run_job(record.id) == "expired"  # a redelivery changes nothing
    job = runtime.jobs.get(record.id)
    events = stream_events(runtime.redis, record.id)
    assert job.status == "expired" and job.worker == "rescuer@localhost"
    assert job.error["type"] == "expired"
    streamed = 3 if kind == "generate" else 0
    assert job.usage["completion_tokens"] == streamed
    assert job.result == ({"text": " a b", "finish_reason": "expired"} if kind == "generate"
                          else None)
    assert [k for k, _ in events] == [EventType.TOKEN] * streamed + [EventType.DONE]
    assert events[-1][1]["finish_reason"] == "expired"


@pytest.mark.parametrize("reason", ["cancelled", "expired"])
def test_a_rerun_ended_before_it_caught_up_keeps_what_the_stream_holds(settings, private_url,
                                                                       reason):
    """A taken-over job cancelled or expired while its rerun was still behind the tokens its
    dead worker streamed ends with the stream's text and count, so record and stream agree."""
    runtime = runtime_on(settings, private_url, "catchup@localhost")
    record = JobRecord(id=JobRecord.new_id(), kind="generate", model="demo-gpt", input="x",
                       owner="anonymous", lane="interactive", backend="onnx")
    runtime.streams.publish([TokenEvent(record.id, i, t, i) for i, t in
                             enumerate([" one", " two", " three"])])
    runtime.sink.resume_from[record.id] = 3
    rerun = Outcome(result={"text": " one", "finish_reason": reason}, finish_reason=reason,
                    usage={"prompt_tokens": 1, "completion_tokens": 1}, batch_size=1,
                    backend="onnx", version=1)
    covered = runtime._covering_stream(record, rerun)
    assert covered.result == {"text": " one two three", "finish_reason": reason}
    assert covered.usage == {"prompt_tokens": 1, "completion_tokens": 3}


def test_a_record_gone_is_never_written_back_as_a_stub(settings, private_url):
    """Setting a field on a job whose record expired or was flushed writes nothing (a stub no
    reader could decode would answer 500 until deleted); on a live record it reports the
    cancel flag the worker acts on."""
    runtime = runtime_on(settings, private_url, "noter@localhost")
    assert runtime.jobs.note("gone", version=1) is None
    assert not runtime.redis.exists(keys.job("gone"))
    record = JobRecord(id=JobRecord.new_id(), kind="embed", model="demo-embed", input="x",
                       owner="anonymous")
    runtime.jobs.create(record)
    assert runtime.jobs.note(record.id, version=2) in ("0", "")
    assert runtime.jobs.note(record.id, cancel_requested="1") == "1"
    assert runtime.jobs.get(record.id).version == 2


def test_the_heartbeat_outlives_a_record_it_cannot_read(settings, private_url):
    """A held job whose record no longer decodes (written by hand, or by an older release)
    must not end the heartbeats: the worker would drop out of /readyz while it still serves."""
    runtime = runtime_on(settings, private_url, "sturdy@localhost", worker_heartbeat_s=0.2,
                         lease_ttl_s=1)
    client = runtime.redis
    stop = threading.Event()
    try:
        client.hset(keys.job("stub"), "version", "1")  # no id, kind, model, input
        client.set(keys.lease("stub"), "other@localhost")  # held elsewhere: renew says lost
        runtime._held.add("stub")
        beats = threading.Thread(target=runtime._heartbeat, args=(stop,), daemon=True)
        beats.start()
        seen: set[float] = set()
        deadline = time.monotonic() + 30
        while len(seen) < 3 and beats.is_alive() and time.monotonic() < deadline:
            beat = client.zscore(keys.WORKERS, runtime.node)
            if beat is not None:
                seen.add(beat)
            time.sleep(0.05)
        assert beats.is_alive() and len(seen) >= 3
    finally:
        stop.set()


@pytest.mark.parametrize("failure", [Unavailable("the registry mirror timed out"),
                                     RuntimeError("a bug in a registry handler")])
def test_the_listener_outlives_a_failing_registry_event(settings, redis_client, monkeypatch,
                                                         failure):
    """A registry event whose handling fails (the mirror's read timing out is Unavailable, not
    a Redis error) must not end the listener thread: cancels would then wait for a heartbeat."""
    runtime = WorkerRuntime(replace(settings, openai_key=""), redis_client, None,
                            "listener-test@localhost")
    cancelled: list[str] = []
    failures = [failure]

    def retire() -> None:
        if failures:
            raise failures.pop()

    monkeypatch.setattr(runtime, "_retire_inactive", retire)
    monkeypatch.setattr(runtime, "_cancel", cancelled.append)
    stop = threading.Event()
    listener = threading.Thread(target=runtime._listen, args=(stop,), daemon=True)
    listener.start()
    try:
        deadline = time.monotonic() + 10
        while failures:
            assert time.monotonic() < deadline, "the listener never took the registry event"
            redis_client.publish(keys.REGISTRY_EVENTS, "promote")
            time.sleep(0.05)
        job_id = f"after-{uuid.uuid4().hex[:8]}"
        while job_id not in cancelled:
            assert listener.is_alive(), "the listener thread died"
            assert time.monotonic() < deadline, "the listener stopped taking cancels"
            redis_client.publish(keys.CANCEL, job_id)
            time.sleep(0.05)
    finally:
        stop.set()
        listener.join(timeout=5)


def test_a_second_delivery_of_a_running_interactive_job_keeps_it_in_the_gate(settings,
                                                                             redis_client):
    """The copy is turned away (the job runs here), and must not take the running job out
    of the lane gate's count: bulk work would stop stepping aside while it still runs."""
    runtime = WorkerRuntime(replace(settings, openai_key="", bulk_yield_ms=500.0), redis_client,
                            None, "gate-test@localhost")
    record = JobRecord(id=JobRecord.new_id(), kind="generate", model="demo-gpt", input="x",
                       owner="t", lane="interactive")
    runtime.jobs.create(record)
    assert runtime.jobs.take(record, runtime.node, 30)[0]
    runtime._held.add(record.id)  # its first delivery runs it here
    runtime.gate.enter(record.id)
    assert runtime.run_job(record.id) == "running"  # the copy
    assert runtime.gate.busy()
    runtime._held.discard(record.id)
    runtime.gate.leave(record.id)
    assert not runtime.gate.busy()
