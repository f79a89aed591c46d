"""Faults for real: kill -9 and SIGTERM of workers, a Redis restart and a producer restart while
jobs stream. Every accepted job must finish exactly once, with a stream that has every token
once, in order, and one final event."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
import requests

from banter import keys
from banter.demo import DEMO_EMBED, DEMO_GPT, DEMO_TEXT, build_demo
from banter.redisconn import connect
from banter.redisserver import RedisServer
from banter.settings import Settings
from banter.streams import EventType, read_events
from producer.app import create_app
from registry.service import Registry
from tests.conftest import Api, Server, start_worker, stop_process
from tests.test_streams import sse_events

pytestmark = pytest.mark.faults

WORDS = [" " + w for w in DEMO_TEXT.split()]


def expected_text(max_tokens: int) -> str:
    return "".join((WORDS * (max_tokens // len(WORDS) + 1))[:max_tokens])


@dataclass
class Stack:
    env: dict[str, str]
    settings: Settings
    redis_server: RedisServer
    api: Api
    server: Server
    logs: Path

    @property
    def redis(self):
        return connect(self.settings.redis_url)

    def worker(self, node: str):
        return start_worker(self.env, node, self.logs / f"{node}.log", self.redis)


@contextmanager
def open_stack(directory: Path, persist: bool = True,
               extra_env: dict[str, str] | None = None) -> Iterator[Stack]:
    """A private stack in ``directory``: its own Redis (with AOF when ``persist``, so it can
    restart), the demo models promoted, the producer; short leases and visibility."""
    redis_server = RedisServer(directory / "redis", persist=persist)
    url = redis_server.start()
    env = {"BANTER_REDIS_URL": url, "BANTER_HOME": str(directory / "home"),
           "BANTER_WORKER_HEARTBEAT_S": "0.5", "BANTER_LEASE_TTL_S": "2",
           "BANTER_VISIBILITY_TIMEOUT_S": "5", "BANTER_MAX_TOKENS_LIMIT": "1000",
           "BANTER_LOG_LEVEL": "INFO", "BANTER_OPENAI_KEY": "", "BANTER_AUTH_DISABLED": "true",
           **(extra_env or {})}
    settings = Settings.from_env(env)
    dirs = build_demo(settings.model_root)
    registry = Registry.from_settings(settings, connect(url))
    registry.promote(name=DEMO_GPT, kind="generate", path=str(dirs[DEMO_GPT] / "model.onnx"))
    registry.promote(name=DEMO_EMBED, kind="embed", path=str(dirs[DEMO_EMBED] / "model.onnx"))
    server = Server(create_app(settings, connect(url)))
    logs = directory / "logs"
    logs.mkdir()
    try:
        yield Stack(env, settings, redis_server, Api(server.url), server, logs)
    finally:
        server.close()
        redis_server.stop()


@pytest.fixture
def stack(tmp_path):
    with open_stack(tmp_path) as private:
        yield private


def submit_generations(api: Api, count: int, max_tokens: int) -> list[str]:
    return [api.post("/v1/jobs", {"kind": "generate", "input": f"fault {i}",
                                  "params": {"max_tokens": max_tokens}}).json()["id"]
            for i in range(count)]


def wait_tokens(stack: Stack, job_ids: list[str], at_least: int, timeout_s: float = 60) -> None:
    """Block until every job's stream holds ``at_least`` entries (they are mid-generation)."""
    deadline = time.monotonic() + timeout_s
    while any(stack.redis.xlen(f"banter:stream:{j}") < at_least for j in job_ids):
        assert time.monotonic() < deadline, "jobs did not start streaming"
        time.sleep(0.02)


def assert_exactly_once(stack: Stack, job_id: str, max_tokens: int) -> dict:
    job = stack.api.wait_job(job_id, timeout_s=150)
    assert job["status"] == "succeeded", job
    assert job["result"]["text"] == expected_text(max_tokens)
    entries = all_events(stack.redis, job_id)
    tokens = [data for _id, kind, data in entries if kind is EventType.TOKEN]
    assert [t["seq"] for t in tokens] == list(range(max_tokens)), "a token is missing or doubled"
    assert "".join(t["text"] for t in tokens) == job["result"]["text"]
    finals = [kind for _id, kind, _ in entries if kind is not EventType.TOKEN]
    assert finals == [EventType.DONE]
    return job


def all_events(client, job_id: str) -> list:
    entries, after = [], "0-0"
    while batch := read_events(client, job_id, after):
        entries += batch
        after = batch[-1][0]
    return entries


def rescue(stack: Stack, job_ids: list[str]) -> None:
    """Start a fresh worker; every job of a dead one is taken over once and finishes."""
    rescuer = stack.worker("rescuer@localhost")
    try:
        for job_id in job_ids:
            job = assert_exactly_once(stack, job_id, 1000)
            assert job["worker"] == "rescuer@localhost" and job["attempts"] == 2
    finally:
        stop_process(rescuer)


def kill_9_mid_batch(stack: Stack, count: int) -> list[str]:
    """Start a worker, give it ``count`` long generations, kill -9 it once they stream."""
    doomed = stack.worker("doomed@localhost")
    job_ids = submit_generations(stack.api, count, 1000)
    wait_tokens(stack, job_ids, at_least=5)
    doomed.send_signal(signal.SIGKILL)
    doomed.wait()
    return job_ids


def test_kill_9_mid_batch_every_job_is_taken_over_once(stack):
    job_ids = kill_9_mid_batch(stack, 8)
    assert all(stack.api.get(f"/v1/jobs/{j}").json()["status"] == "running" for j in job_ids)

    rescue(stack, job_ids)
    log = (stack.logs / "rescuer@localhost.log").read_text()
    assert log.count('"job_taken_over"') == len(job_ids)


def test_a_job_cancelled_while_its_worker_is_dead_keeps_what_its_stream_has(stack):
    """Cancelled between its worker's death and the takeover: the rescuer stops it at once,
    and its record and final event count the tokens its stream holds (the rerun made fewer)."""
    job_id = kill_9_mid_batch(stack, 1)[0]
    assert stack.api.delete(f"/v1/jobs/{job_id}").status_code == 200
    rescuer = stack.worker("rescuer@localhost")
    try:
        job = stack.api.wait_job(job_id, timeout_s=150)
    finally:
        stop_process(rescuer)
    entries = all_events(stack.redis, job_id)
    tokens = [data for _id, kind, data in entries if kind is EventType.TOKEN]
    assert len(tokens) >= 5
    assert [t["seq"] for t in tokens] == list(range(len(tokens)))
    assert job["status"] == "cancelled", job
    assert job["result"]["text"] == "".join(t["text"] for t in tokens)
    assert job["usage"]["completion_tokens"] == len(tokens)
    assert [(kind, data["usage"]["completion_tokens"]) for _id, kind, data in entries
            if kind is not EventType.TOKEN] == [(EventType.DONE, len(tokens))]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl_c"])
def test_sigterm_or_ctrl_c_mid_batch_finishes_the_jobs_in_hand(stack, sig):
    """A warm shutdown either way: the worker ends its jobs and exits 0 (Celery ends a Ctrl-C
    with exit code 1, which must not read as a dead consumer to start again)."""
    node = f"graceful-{sig.name.lower()}@localhost"
    worker = stack.worker(node)
    job_ids = submit_generations(stack.api, 6, 600)
    wait_tokens(stack, job_ids, at_least=3)
    worker.send_signal(sig)
    try:
        assert worker.wait(timeout=120) == 0
    finally:
        if worker.poll() is None:  # it ignored the signal: do not leave it serving
            worker.kill()
    for job_id in job_ids:
        job = assert_exactly_once(stack, job_id, 600)
        assert job["worker"] == node and job["attempts"] == 1


def test_a_second_ctrl_c_mid_batch_stops_the_worker_and_another_takes_its_jobs(stack):
    """A cold shutdown (Celery's thread pool cannot kill its tasks): the worker exits 0 and
    every job is finished exactly once, by it or, taken over, by another."""
    node = "impatient@localhost"
    worker = stack.worker(node)
    job_ids = submit_generations(stack.api, 40, 1000)  # past BANTER_MAX_RUNNING (32): some wait
    wait_tokens(stack, job_ids[:4], at_least=3)
    worker.send_signal(signal.SIGINT)
    time.sleep(0.1)
    worker.send_signal(signal.SIGINT)
    try:
        code = worker.wait(timeout=60)
    finally:
        if worker.poll() is None:  # hung at exit: do not leave it behind
            worker.kill()
    assert code == 0
    rescuer = stack.worker("after-ctrl-c@localhost")
    try:
        for job_id in job_ids:
            assert_exactly_once(stack, job_id, 1000)
    finally:
        stop_process(rescuer)


def test_a_worker_whose_task_threads_cannot_end_still_exits():
    """After a cold shutdown a task thread may wait on the stopped engine for ever, and the
    interpreter waits for it at exit: the worker leaves anyway, saying so."""
    code = ("import threading, workers.main as m\n"
            "threading.Thread(target=threading.Event().wait).start()\n"
            "m._leave_if_stuck('stuck@localhost', wait_s=0.2)\n"
            "print('not reached')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and "not reached" not in done.stdout
    assert "worker_left_jobs" in done.stderr


def test_redis_restart_mid_stream_loses_nothing(stack):
    """Jobs in flight finish with whole streams, SSE clients resume, new jobs are served."""
    worker = stack.worker("steady@localhost")
    try:
        job_ids = submit_generations(stack.api, 4, 1000)
        wait_tokens(stack, job_ids, at_least=5)
        url = f"{stack.api.url}/v1/jobs/{job_ids[0]}/events"
        seen: list[tuple[str, str, dict]] = []
        with requests.get(url, stream=True, timeout=30) as response:
            for event in sse_events(response):
                seen.append(event)
                if len(seen) == 20:
                    break
        stack.redis_server.stop()
        time.sleep(1.0)
        stack.redis_server.start()
        resumed = []
        deadline = time.monotonic() + 120
        while not (resumed and resumed[-1][1] == "done"):
            assert time.monotonic() < deadline
            last_id = (resumed or seen)[-1][0]
            try:
                with requests.get(url, stream=True, timeout=30,
                                  headers={"Last-Event-ID": last_id}) as response:
                    resumed.extend(sse_events(response))
            except requests.RequestException:
                time.sleep(0.2)
        stream_tokens = [d["seq"] for _, e, d in seen + resumed if e == "token"]
        assert stream_tokens == list(range(1000))
        for job_id in job_ids:
            assert_exactly_once(stack, job_id, 1000)
        after = stack.api.post("/v1/inference", {"prompt": "after", "max_tokens": 2})
        assert after.status_code == 200 and after.json()["text"] == expected_text(2)
    finally:
        stop_process(worker)
    # a lost broker connection is recovered from, not logged as a crash
    assert "Unrecoverable error" not in (stack.logs / "steady@localhost.log").read_text()


def synchronous_call_across_an_outage(stack: Stack, down_s: float) -> tuple[requests.Response,
                                                                           str]:
    """``POST /v1/inference`` of 1,000 tokens; once its job streams, Redis stops for ``down_s``
    and starts again. Returns the call's answer and its job's id."""
    import threading

    answered: list[requests.Response] = []
    call = threading.Thread(target=lambda: answered.append(stack.api.post(
        "/v1/inference", {"prompt": "through", "max_tokens": 1000})))
    call.start()
    deadline = time.monotonic() + 60
    while not (streams := list(stack.redis.scan_iter(keys.stream("*")))):
        assert time.monotonic() < deadline, "the call's job never streamed"
        time.sleep(0.02)
    wait_tokens(stack, [streams[0].split(":")[-1]], at_least=5)
    stack.redis_server.stop()
    time.sleep(down_s)
    stack.redis_server.start()
    call.join(timeout=150)
    return answered[0], streams[0].split(":")[-1]


def test_a_synchronous_call_rides_out_a_redis_restart(stack):
    """The call waits through a short outage and answers its job's result: a 503 would have
    the client (an SDK's retry) send it again, and run it twice."""
    worker = stack.worker("patient@localhost")
    try:
        response, job_id = synchronous_call_across_an_outage(stack, down_s=1.0)
        assert response.status_code == 200, response.text
        assert response.json()["text"] == expected_text(1000)
        assert response.headers["X-Job-ID"] == job_id
        assert_exactly_once(stack, job_id, 1000)
    finally:
        stop_process(worker)


def test_a_synchronous_call_cut_by_a_long_outage_says_its_job_goes_on(stack, monkeypatch):
    """Past what a wait rides out (shortened here), the call is a 503 that names its job and
    tells SDKs not to retry (X-Should-Retry: false); the job finishes once Redis is back."""
    import producer.service

    monkeypatch.setattr(producer.service, "REDIS_RETRY_S", 1.0)
    worker = stack.worker("outlasted@localhost")
    try:
        response, job_id = synchronous_call_across_an_outage(stack, down_s=4.0)
        assert response.status_code == 503, response.text
        error = response.json()["error"]
        assert error["type"] == "wait_interrupted" and f"GET /v1/jobs/{job_id}" in error["message"]
        assert response.headers["X-Should-Retry"] == "false"
        assert response.headers["X-Job-ID"] == job_id
        assert_exactly_once(stack, job_id, 1000)
    finally:
        stop_process(worker)


def test_producer_restart_while_jobs_stream(stack):
    worker = stack.worker("calm@localhost")
    try:
        job_ids = submit_generations(stack.api, 3, 800)
        url_path = f"/v1/jobs/{job_ids[0]}/events"
        with requests.get(stack.api.url + url_path, stream=True, timeout=30) as response:
            first = [event for _, event in zip(range(10), sse_events(response))]
        stack.server.close()
        replacement = Server(create_app(stack.settings, connect(stack.settings.redis_url)))
        try:
            with requests.get(replacement.url + url_path, stream=True, timeout=60,
                              headers={"Last-Event-ID": first[-1][0]}) as response:
                rest = list(sse_events(response))
            seqs = [d["seq"] for _, e, d in first + rest if e == "token"]
            assert seqs == list(range(800)) and rest[-1][1] == "done"
            stack.api = Api(replacement.url)
            for job_id in job_ids:
                assert_exactly_once(stack, job_id, 800)
        finally:
            replacement.close()
    finally:
        stop_process(worker)


def test_a_second_delivery_of_a_running_job_does_not_run_it_again(stack):
    """What Celery does after the visibility timeout (the message is handed out again while
    the job still runs): the lease sends the second delivery away."""
    from banter.broker import RUN_JOB, make_celery

    worker = stack.worker("patient@localhost")
    job_ids = submit_generations(stack.api, 1, 1000)
    wait_tokens(stack, job_ids, at_least=5)
    other = stack.worker("eager@localhost")
    try:
        make_celery(stack.settings).send_task(RUN_JOB, args=[job_ids[0]],
                                              queue=stack.settings.queue_interactive)
        job = assert_exactly_once(stack, job_ids[0], 1000)
        assert job["attempts"] == 1 and job["worker"] == "patient@localhost"
    finally:
        stop_process(worker)
        stop_process(other)
    logs = "".join(p.read_text() for p in stack.logs.glob("*.log"))
    assert '"job_taken_over"' not in logs
    assert "'leased'" in logs or "'succeeded'" in logs


def test_a_queued_job_whose_message_was_lost_is_sent_again(stack):
    """Redis killed before an fsync can keep a job's record and lose its message (or the
    broker can fail mid-submit while Redis cannot record the failure): the job would stay
    queued for ever. A worker's heartbeat sends it again once it has been queued for
    ``resend_after_s`` (10 s here) with its queue empty; it then runs once. A message
    waiting for the other backend in the same lane does not hold it back."""
    job_ids = submit_generations(stack.api, 3, 20)
    assert stack.redis.llen(stack.settings.queue_interactive) == 3
    stack.redis.delete(stack.settings.queue_interactive)  # the messages are gone
    upstream_queue = stack.settings.lane_queue("interactive", "openai")
    stack.redis.lpush(upstream_queue, "an upstream job's message no worker here takes")
    worker = stack.worker("sweeper@localhost")
    try:
        for job_id in job_ids:
            job = assert_exactly_once(stack, job_id, 20)
            assert job["attempts"] == 1 and job["worker"] == "sweeper@localhost"
            assert job["timings"]["queue_ms"] >= stack.settings.resend_after_s * 1000
    finally:
        stop_process(worker)
        stack.redis.delete(upstream_queue)
    log = (stack.logs / "sweeper@localhost.log").read_text()
    assert log.count('"job_resent"') == 3
    assert stack.redis.zcard(keys.QUEUED) == 0


def test_jobs_queued_when_redis_loses_the_registry_mirror_still_run(stack):
    """FLUSHDB or eviction can take the registry mirror away while jobs wait: a worker does
    not fail them with model_not_found, it rebuilds the mirror from history.jsonl (this host
    has it) and serves them."""
    job_ids = submit_generations(stack.api, 3, 5)
    for key in stack.redis.scan_iter("banter:registry*"):
        stack.redis.delete(key)
    assert stack.redis.get(keys.REGISTRY_SEQ) is None
    worker = stack.worker("rebuilder@localhost")
    try:
        for job_id in job_ids:
            assert_exactly_once(stack, job_id, 5)
    finally:
        stop_process(worker)
    assert '"registry_mirror_rebuilt"' in (stack.logs / "rebuilder@localhost.log").read_text()


FRAGILE_WORKER = """
import sys
from workers.engine import Engine
real_step, steps = Engine.step, [0]

def step(self, now=None):
    steps[0] += 1
    if steps[0] > 100 and self.running_jobs():
        raise SystemExit("the engine thread dies mid-batch")
    return real_step(self, now)

Engine.step = step
from banter.cli import main
sys.exit(main(["worker", "--cpu", "--name", "fragile@localhost"]))
"""


def test_engine_thread_death_ends_the_worker_and_its_jobs_are_taken_over(stack):
    with open(stack.logs / "fragile.log", "ab") as log:
        fragile = subprocess.Popen([sys.executable, "-c", FRAGILE_WORKER],
                                   env={**os.environ, **stack.env}, stdout=log,
                                   stderr=subprocess.STDOUT)
    job_ids = submit_generations(stack.api, 4, 1000)
    assert fragile.wait(timeout=120) == 70
    assert '"engine_died"' in (stack.logs / "fragile.log").read_text()
    rescue(stack, job_ids)
