"""The HTTP API end to end: real producer over HTTP, real Redis, a real worker process."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import replace

import pytest
import requests

from banter import keys
from banter.demo import DEMO_TEXT
from banter.metrics import JOBS
from banter.redisserver import RedisServer
from producer.app import create_app
from tests.conftest import Api, Server, unserved_producer


def test_inference_writes_the_demo_text_with_headers(api):
    response = api.post("/v1/inference", {"prompt": "Tell me anything.", "max_tokens": 5},
                        headers={"X-Trace-ID": "trace-abc"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["text"] == " banterhearts streams every token from"
    assert body["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 5 and body["usage"]["prompt_tokens"] > 0
    assert (body["model"], body["version"], body["backend"]) == ("demo-gpt", 1, "onnx")
    assert response.headers["X-Trace-ID"] == "trace-abc"
    assert response.headers["X-Backend"] == "onnx"
    assert int(response.headers["X-Batch-Size"]) >= 1
    assert float(response.headers["X-Latency-MS"]) > 0


def test_max_tokens_decides_the_length_and_the_text_cycles(api):
    words = len(DEMO_TEXT.split())
    body = api.post("/v1/inference", {"prompt": "x", "max_tokens": words + 2}).json()
    assert body["text"] == DEMO_TEXT + " banterhearts streams"


def test_job_lifecycle_generate(api):
    response = api.post("/v1/jobs", {"kind": "generate", "input": "hello",
                                     "params": {"max_tokens": 3}})
    assert response.status_code == 202
    body = response.json()
    assert body["status"] == "queued"
    assert body["links"] == {"self": f"/v1/jobs/{body['id']}",
                             "events": f"/v1/jobs/{body['id']}/events"}
    job = api.wait_job(body["id"])
    assert job["status"] == "succeeded"
    assert job["result"] == {"text": " banterhearts streams every", "finish_reason": "length"}
    assert job["kind"] == "generate" and job["backend"] == "onnx" and job["version"] == 1
    assert job["worker"].startswith("cpu-test@")
    timings = job["timings"]
    assert timings["queued_at"] <= timings["started_at"] <= timings["finished_at"]
    assert timings["queue_ms"] >= 0 and timings["run_ms"] >= 0
    assert job["usage"]["completion_tokens"] == 3


def test_job_lifecycle_embed(api):
    body = api.post("/v1/jobs", {"kind": "embed", "input": "a sentence"}).json()
    job = api.wait_job(body["id"])
    assert job["status"] == "succeeded", job
    vector = job["result"]["embedding"]
    assert len(vector) == 128
    assert abs(sum(x * x for x in vector) - 1.0) < 1e-4
    assert job["model"] == "demo-embed" and job["batch_size"] >= 1


def test_an_embed_job_of_a_list_embeds_each_text_in_order(api):
    texts = [f"list text {i} " + "more " * (i % 4) for i in range(20)]  # several passes
    body = api.post("/v1/jobs", {"kind": "embed", "input": texts}).json()
    job = api.wait_job(body["id"])
    assert job["status"] == "succeeded", job
    vectors = job["result"]["embeddings"]
    assert len(vectors) == 20 and "embedding" not in job["result"]
    singles = [api.wait_job(api.post("/v1/jobs", {"kind": "embed", "input": t}).json()["id"])
               for t in (texts[0], texts[13])]
    for vector, single in zip((vectors[0], vectors[13]), singles):
        assert vector == pytest.approx(single["result"]["embedding"], abs=1e-5)
    assert job["usage"]["prompt_tokens"] > 20 and 1 <= job["batch_size"] <= 8
    listed = api.post("/v1/embeddings", {"input": texts}).json()
    assert [d["index"] for d in listed["data"]] == list(range(20))
    assert listed["data"][13]["embedding"] == pytest.approx(vectors[13], abs=1e-5)
    assert listed["usage"]["prompt_tokens"] == job["usage"]["prompt_tokens"]


@pytest.mark.parametrize("body, status, needle", [
    ({"kind": "embed", "input": []}, 422, "input"),
    ({"kind": "embed", "input": ["ok", ""]}, 422, "input[1]"),
    ({"kind": "embed", "input": ["ok", 7]}, 422, "input[1]"),
    ({"kind": "embed", "input": ["x"] * 2049}, 413, "2048"),
    ({"kind": "embed", "input": {"a": "b"}}, 422, "list of strings"),
    ({"kind": "generate", "input": ["a", "b"]}, 422, "input"),
])
def test_bad_list_inputs_are_refused(api, body, status, needle):
    response = api.post("/v1/jobs", body)
    assert response.status_code == status, response.text
    assert needle in response.json()["error"]["message"]


def test_events_replay_a_finished_job(api):
    body = api.post("/v1/jobs", {"kind": "generate", "input": "hi",
                                 "params": {"max_tokens": 4}}).json()
    api.wait_job(body["id"])
    response = api.get(body["links"]["events"])
    assert response.headers["Content-Type"].startswith("text/event-stream")
    events = [block for block in response.text.split("\n\n") if block.startswith("id:")]
    assert [e.split("\n")[1] for e in events] == ["event: token"] * 4 + ["event: done"]


def test_idempotency_key_returns_the_same_job(api):
    key = uuid.uuid4().hex
    first = api.post("/v1/jobs", {"kind": "embed", "input": "x", "idempotency_key": key})
    second = api.post("/v1/jobs", {"kind": "embed", "input": "x", "idempotency_key": key})
    assert first.status_code == 202 and second.status_code == 200
    assert first.json()["id"] == second.json()["id"]


def test_an_idempotency_key_reused_for_another_request_is_a_conflict(api):
    """Stripe's rule: a key names one request. The same key with another input, kind,
    parameter or model is refused (409), and the first job is left as it was; a sampled
    generation resent as it was still finds its job (its server-drawn seed is not compared)."""
    key = uuid.uuid4().hex
    first = api.post("/v1/jobs", {"kind": "generate", "input": "hello", "idempotency_key": key,
                                  "params": {"max_tokens": 3, "temperature": 0.7}})
    assert first.status_code == 202, first.text
    job_id = first.json()["id"]
    for other in ({"kind": "generate", "input": "DIFFERENT", "params": {"max_tokens": 3, "temperature": 0.7}},
                  {"kind": "generate", "input": "hello", "params": {"max_tokens": 4, "temperature": 0.7}},
                  {"kind": "generate", "input": "hello", "params": {
                      "max_tokens": 3, "temperature": 0.7, "logit_bias": {"5": 1}}},
                  {"kind": "generate", "input": "hello", "params": {
                      "max_tokens": 3, "temperature": 0.7, "presence_penalty": 0.1}},
                  {"kind": "embed", "input": "hello"},
                  {"kind": "generate", "input": "hello", "lane": "bulk",
                   "params": {"max_tokens": 3, "temperature": 0.7}}):
        reused = api.post("/v1/jobs", {**other, "idempotency_key": key})
        assert reused.status_code == 409, reused.text
        error = reused.json()["error"]
        assert error["type"] == "idempotency_key_reused" and job_id in error["message"]
    again = api.post("/v1/jobs", {"kind": "generate", "input": "hello", "idempotency_key": key,
                                  "params": {"temperature": 0.7, "max_tokens": 3}})
    assert again.status_code == 200 and again.json()["id"] == job_id



def test_default_max_tokens_applies_to_every_generate_endpoint(settings, redis_client, worker):
    """BANTER_DEFAULT_MAX_TOKENS is max_tokens for a request that sends none: a job's params,
    /v1/inference and the OpenAI endpoints alike."""
    server = Server(create_app(replace(settings, default_max_tokens=5), redis_client))
    try:
        own = Api(server.url)
        job = own.post("/v1/jobs", {"kind": "generate", "input": "own"}).json()
        assert own.wait_job(job["id"])["usage"]["completion_tokens"] == 5
        for path, body in (("/v1/inference", {"prompt": "x"}),
                           ("/v1/completions", {"prompt": "x", "temperature": 0})):
            answer = own.post(path, body).json()
            assert answer["usage"]["completion_tokens"] == 5, answer
    finally:
        server.close()


def test_an_idempotent_retry_may_spell_out_the_defaults(api, settings):
    """The key compares what is asked, not how: naming the default model or parameters the
    first request left out is the same request."""
    key = uuid.uuid4().hex
    first = api.post("/v1/jobs", {"kind": "generate", "input": "hi", "idempotency_key": key})
    assert first.status_code == 202, first.text
    spelled = {"kind": "generate", "input": "hi", "idempotency_key": key, "lane": "interactive",
               "model": settings.default_generate_model,
               "params": {"max_tokens": settings.default_max_tokens, "temperature": 0,
                          "top_p": 1, "top_k": 0, "stop": [], "presence_penalty": 0,
                          "frequency_penalty": 0.0, "logit_bias": {"9": 0}}}
    again = api.post("/v1/jobs", spelled)
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"], again.text
    timed = {"kind": "generate", "input": "hi", "idempotency_key": uuid.uuid4().hex}
    made = api.post("/v1/jobs", {**timed, "deadline_s": 500})
    assert made.status_code == 202, made.text
    retried = api.post("/v1/jobs", {**timed, "deadline_s": 500.0})  # the same number
    assert retried.status_code == 200 and retried.json()["id"] == made.json()["id"], retried.text
    other = api.post("/v1/jobs", {**timed, "deadline_s": 500.5})
    assert other.status_code == 409, other.text


def test_a_waited_call_with_no_worker_for_its_backend_is_refused_at_once(api, redis_client):
    """A model served upstream (openai backend) while no worker has an OpenAI key: a
    synchronous or streamed call gets 503 backend_unavailable at once (not a 504 after
    BANTER_SYNC_TIMEOUT_S), saying what to start; a job submitted to be polled queues. Such a
    job, cancelled or expired on a read, is counted in banter_jobs_total all the same."""
    def counted(status: str) -> int:
        return int(redis_client.hget(keys.METRICS, JOBS.series(
            kind="generate", lane="interactive", status=status, backend="openai")) or 0)

    before = counted("cancelled"), counted("expired")
    name = f"cloud-{uuid.uuid4().hex[:8]}"
    promoted = api.post("/v1/models/promote", {"name": name, "kind": "generate",
                                               "backend": "openai", "model": "gpt-4o-mini"})
    assert promoted.status_code == 201, promoted.text
    for path, body in (("/v1/inference", {"prompt": "hi", "model": name}),
                       ("/v1/inference?stream=true", {"prompt": "hi", "model": name}),
                       ("/v1/completions", {"prompt": "hi", "model": name}),
                       ("/v1/chat/completions", {"model": name, "stream": True,
                                                 "messages": [{"role": "user", "content": "hi"}]})):
        refused = api.post(path, body)
        assert refused.status_code == 503, (path, refused.text)
        error = refused.json()["error"]
        assert error["type"] == "backend_unavailable" and "OpenAI key" in error["message"]
    queued = api.post("/v1/jobs", {"kind": "generate", "input": "hi", "model": name})
    assert queued.status_code == 202 and queued.json()["status"] == "queued"
    assert api.delete(f"/v1/jobs/{queued.json()['id']}").json()["status"] == "cancelled"

    # a deadline passes while no worker takes from that queue: the job expires all the same
    due = api.post("/v1/jobs", {"kind": "generate", "input": "hi", "model": name,
                                "deadline_s": 0.5}).json()["id"]
    time.sleep(0.7)
    expired = api.get(f"/v1/jobs/{due}").json()
    assert expired["status"] == "expired" and expired["error"]["type"] == "expired"
    events = api.session.get(f"{api.url}/v1/jobs/{due}/events", timeout=10).text
    assert events.count("event: done") == 1 and '"finish_reason": "expired"' in events
    assert (counted("cancelled") - before[0], counted("expired") - before[1]) == (1, 1)


def test_inference_batch_keeps_prompt_order(api):
    response = api.post("/v1/inference/batch", {"prompts": ["a", "bb", "ccc"], "max_tokens": 2})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == 3 and len({r["id"] for r in results}) == 3
    assert all(r["text"] == " banterhearts streams" for r in results)
    assert int(response.headers["X-Batch-Size"]) >= 1


def test_an_inference_batch_of_many_long_prompts_answers_each(api):
    """Each prompt's wait asks whether the client left, all at once from the batch's threads."""
    for _ in range(3):
        response = api.post("/v1/inference/batch", {"prompts": list("abcdefgh"),
                                                     "max_tokens": 40})
        assert response.status_code == 200, response.text
        assert [r["finish_reason"] for r in response.json()["results"]] == ["length"] * 8


def test_the_client_watch_answers_many_threads_at_once():
    import socket
    import threading

    from producer.disconnect import watch

    ours, theirs = socket.socketpair()
    gone = watch({"werkzeug.socket": ours})
    seen: list[bool] = []
    failed: list[BaseException] = []

    def ask() -> None:
        try:
            seen.extend(gone() for _ in range(2000))
        except Exception as exc:  # a thread's failure is the test's
            failed.append(exc)

    threads = [threading.Thread(target=ask) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failed and len(seen) == 32000 and not any(seen)
    theirs.sendall(b"more bytes from a client that stays")  # data is not leaving
    assert not gone()
    theirs.close()
    assert gone()
    ours.close()


def test_inference_batch_whose_every_prompt_fails_before_its_pass_has_no_batch_size(api):
    response = api.post("/v1/inference/batch", {"prompts": ["zq " * 4000] * 2, "max_tokens": 1})
    assert response.status_code == 200, response.text
    assert [r["error"]["type"] for r in response.json()["results"]] == ["prompt_too_long"] * 2
    assert "X-Batch-Size" not in response.headers and response.headers["X-Backend"] == "onnx"


def test_inference_batch_past_the_sync_timeout_names_every_job(settings, redis_client,
                                                                demo_models):
    """Jobs not done within BANTER_SYNC_TIMEOUT_S go on; each prompt's result carries its job's
    id and a timeout error, so the client can poll every one (a queue no worker serves keeps
    them queued; a heartbeat makes the producer take them)."""
    with unserved_producer(settings, redis_client, sync_timeout_s=0.3) as (server, queue):
        response = Api(server.url).post("/v1/inference/batch",
                                        {"prompts": ["a", "b"], "max_tokens": 2})
        assert redis_client.llen(queue) == 2
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["error"]["type"] for r in results] == ["timeout", "timeout"]
    assert len({r["id"] for r in results}) == 2
    assert all(redis_client.exists(keys.job(r["id"])) for r in results)
    assert "X-Batch-Size" not in response.headers  # none ran yet


def hang_up_while_waiting(url: str, path: str, body: dict, redis_client,
                          queues: list[str], jobs: int, key: str = "") -> list[str]:
    """Send a synchronous call on a raw socket, wait until its ``jobs`` are queued on
    ``queues`` (no worker serves them), then close the connection; return the job ids."""
    import socket
    from urllib.parse import urlsplit

    payload = json.dumps(body).encode()
    address = urlsplit(url)
    def queued() -> set[str]:
        return {json.loads(m)["headers"]["id"] for q in queues for m in redis_client.lrange(q, 0, -1)}

    before = queued()
    with socket.create_connection((address.hostname, address.port), timeout=10) as sock:
        auth = f"Authorization: Bearer {key}\r\n" if key else ""
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {address.netloc}\r\n{auth}Content-Type: "
                     f"application/json\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
                     + payload)
        deadline = time.monotonic() + 10
        while len(queued() - before) < jobs:
            assert time.monotonic() < deadline, "the call's jobs were never queued"
            time.sleep(0.02)
    return sorted(queued() - before)


def wait_status(redis_client, job_id: str, status: str) -> None:
    deadline = time.monotonic() + 10
    while redis_client.hget(keys.job(job_id), "status") != status:
        assert time.monotonic() < deadline, redis_client.hgetall(keys.job(job_id))
        time.sleep(0.05)


CHAT = [{"role": "user", "content": "x"}]


@pytest.mark.parametrize("path, body, jobs", [
    ("/v1/inference", {"prompt": "x"}, 1),
    ("/v1/inference/batch", {"prompts": ["a", "b"]}, 2),
    ("/v1/completions", {"prompt": "x"}, 1),
    ("/v1/chat/completions", {"messages": CHAT}, 1),
    ("/v1/embeddings", {"input": "x"}, 1),
])
def test_a_client_that_leaves_a_synchronous_call_cancels_its_job(settings, redis_client,
                                                                  demo_models, path, body, jobs):
    """As a streaming client's leaving does: the answer would reach no one, and an SDK that
    timed out sends the request again (the openai client's retries would run it thrice)."""
    with unserved_producer(settings, redis_client) as (server, queue):
        job_ids = hang_up_while_waiting(server.url, path, body, redis_client, [queue], jobs)
        for job_id in job_ids:
            wait_status(redis_client, job_id, "cancelled")


def test_an_embeddings_call_whose_job_is_cancelled_is_a_409_not_a_500(settings, redis_client,
                                                                       demo_models):
    """A cancelled embed job has no vector to answer: its waiting call says so (409,
    ``job_cancelled``), as a typed error, not an internal one."""
    from concurrent.futures import ThreadPoolExecutor

    marker = f"embed-cancel-{uuid.uuid4().hex[:8]}"
    with unserved_producer(settings, redis_client) as (server, queue), \
            ThreadPoolExecutor(1) as pool:
        api = Api(server.url)
        answer = pool.submit(api.post, "/v1/embeddings", {"input": marker})
        deadline = time.monotonic() + 10
        while not (queued := [json.loads(m)["headers"]["id"]
                              for m in redis_client.lrange(queue, 0, -1)]):
            assert time.monotonic() < deadline, "the call's job was never queued"
            time.sleep(0.02)
        assert api.delete(f"/v1/jobs/{queued[0]}").status_code == 200
        response = answer.result(timeout=30)
    assert response.status_code == 409, response.text
    assert response.json()["error"]["type"] == "job_cancelled"
    assert response.headers["X-Job-ID"] == queued[0]


@pytest.mark.parametrize("path, body, jobs", [
    ("/v1/batches/requests", {"custom_id": "a", "method": "POST", "url": "/v1/embeddings",
                              "body": {"input": "left"}}, 1),
    ("/v1/inference", {"prompt": "left", "keep_running": True}, 1),
    ("/v1/completions", {"prompt": "left", "keep_running": True}, 1),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "left"}], "n": 2,
                              "keep_running": True}, 2),
])
def test_a_kept_call_whose_client_left_lets_go_of_its_wait(settings, redis_client, demo_models,
                                                          path, body, jobs):
    """Its jobs go on (``keep_running``; a batch line, which banter bulk picks up by its key),
    but the producer thread and the key's wait it held are let go at once, not held until
    BANTER_SYNC_TIMEOUT_S: a key with one wait can send its next call."""
    key = "one-wait-key"

    def call() -> dict:
        return {**body, "idempotency_key": uuid.uuid4().hex} if "custom_id" in body else body

    with unserved_producer(settings, redis_client, auth_disabled=False, api_keys=key,
                           max_waits_per_key=1) as (server, queue):
        left = hang_up_while_waiting(server.url, path, call(), redis_client,
                                     [queue, f"{queue}-bulk"], jobs, key=key)
        deadline = time.monotonic() + 10
        while True:  # the next call is taken (and waits on its job) once the wait is let go
            try:
                refused = requests.post(server.url + path, timeout=1.5, json=call(),
                                        headers={"Authorization": f"Bearer {key}"})
            except requests.ReadTimeout:
                break
            assert refused.status_code == 429, refused.text
            assert time.monotonic() < deadline, "the wait of the client that left was kept"
            time.sleep(0.2)
        assert [redis_client.hget(keys.job(j), "status") for j in left] == ["queued"] * jobs


@pytest.mark.parametrize("path, body", [
    ("/v1/inference/batch", {"prompts": ["{m} a", "{m} b", "{m} c", "{m} d"]}),
    ("/v1/completions", {"prompt": "{m}", "n": 4}),
])
def test_a_call_of_several_jobs_refused_half_way_leaves_none_to_run(settings, redis_client,
                                                                     demo_models, path, body):
    """The queue fills after two of the call's four jobs: the call is a 429, and the two it
    had queued are cancelled (no answer names them; a retry would run them again)."""
    marker = f"half-{uuid.uuid4().hex[:8]}"
    body = json.loads(json.dumps(body).replace("{m}", marker))
    with unserved_producer(settings, redis_client, max_queue_depth=2) as (server, queue):
        refused = Api(server.url).post(path, {**body, "max_tokens": 2})
    assert refused.status_code == 429 and refused.json()["error"]["type"] == "queue_full"
    statuses = [redis_client.hget(key, "status") for key in redis_client.scan_iter(keys.job("*"))
                if marker in (redis_client.hget(key, "input") or "")]
    assert statuses == ["cancelled", "cancelled"]


def test_a_kept_or_bulk_call_outlives_its_client(settings, redis_client, demo_models):
    """``keep_running: true``, and a bulk line (``banter bulk`` resumes it by its key), stay
    queued when their client leaves; a plain call left at the same time is cancelled first."""
    line = {"custom_id": "a", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"},
            "idempotency_key": uuid.uuid4().hex}
    with unserved_producer(settings, redis_client) as (server, queue):
        both = [queue, f"{queue}-bulk"]
        kept = [*hang_up_while_waiting(server.url, "/v1/completions",
                                       {"prompt": "x", "keep_running": True},
                                       redis_client, both, 1),
                *hang_up_while_waiting(server.url, "/v1/inference",
                                       {"prompt": "x", "keep_running": True},
                                       redis_client, both, 1),
                *hang_up_while_waiting(server.url, "/v1/batches/requests", line,
                                       redis_client, both, 1)]
        plain = hang_up_while_waiting(server.url, "/v1/inference", {"prompt": "x"},
                                      redis_client, both, 1)[0]
        wait_status(redis_client, plain, "cancelled")
        time.sleep(1.5)  # the kept calls' waits have looked at their sockets since
        assert [redis_client.hget(keys.job(j), "status") for j in kept] == ["queued"] * 3


def test_openai_embeddings_float_and_base64(api):
    import base64

    import numpy as np

    plain = api.post("/v1/embeddings", {"input": ["one", "two"], "model": "demo-embed"}).json()
    assert plain["object"] == "list" and [d["index"] for d in plain["data"]] == [0, 1]
    packed = api.post("/v1/embeddings", {"input": "one", "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(packed["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(decoded, plain["data"][0]["embedding"], atol=1e-6)
    assert plain["usage"]["prompt_tokens"] > 0


def test_pinned_model_version(api):
    body = api.post("/v1/inference", {"prompt": "x", "model": "demo-gpt@1", "max_tokens": 1})
    assert body.status_code == 200 and body.json()["version"] == 1


def test_models_list_is_openai_shaped(api):
    body = api.get("/v1/models").json()
    assert body["object"] == "list"
    names = {m["id"]: m for m in body["data"]}
    assert names["demo-gpt"]["kind"] == "generate" and names["demo-embed"]["kind"] == "embed"
    assert names["demo-gpt"]["object"] == "model" and names["demo-gpt"]["backend"] == "onnx"


def test_health_and_readiness(api):
    assert api.get("/healthz").json() == {"status": "ok"}
    ready = api.get("/readyz")
    assert ready.status_code == 200 and "cpu-test@localhost" in ready.json()["workers"]
    assert set(ready.json()["queued"]) == {"interactive", "bulk"}
    metrics = api.get("/metrics").text
    assert 'banter_queue_depth{lane="interactive"}' in metrics
    assert "banter_live_workers 1" in metrics


def test_unknown_job_is_404(api):
    for job_id in (str(uuid.uuid4()), "not-a-uuid"):
        response = api.get(f"/v1/jobs/{job_id}")
        assert response.status_code == 404
        assert response.json()["error"]["type"] == "job_not_found"


def test_delete_finished_job_leaves_it_as_it_was(api):
    body = api.post("/v1/jobs", {"kind": "embed", "input": "x"}).json()
    api.wait_job(body["id"])
    response = api.delete(f"/v1/jobs/{body['id']}")
    assert response.status_code == 200 and response.json()["status"] == "succeeded"


def test_a_running_embed_job_is_cancelled_and_one_sent_after_it_is_not_held_back(api):
    """DELETE stops a running embed job at its next pass (its inputs that have not run never
    do; it keeps no partial result), and a one-input embedding sent while it ran did not wait
    for all its inputs: it finished first."""
    words = " ".join(f"w{i}" for i in range(60))
    large = api.post("/v1/jobs", {"kind": "embed", "input": [f"{i} {words}" for i in range(2000)]})
    assert large.status_code == 202, large.text
    job_id = large.json()["id"]
    while api.get(f"/v1/jobs/{job_id}").json()["status"] == "queued":
        time.sleep(0.02)
    small = api.post("/v1/embeddings", {"input": "hi"})
    assert small.status_code == 200, small.text
    assert api.get(f"/v1/jobs/{job_id}").json()["status"] == "running"
    assert api.delete(f"/v1/jobs/{job_id}").status_code == 200
    ended = api.wait_job(job_id)
    assert ended["status"] == "cancelled" and ended["result"] is None
    assert 0 < ended["usage"]["prompt_tokens"]  # the inputs that ran


BAD_INPUTS = [
    ("/v1/inference", {"prompt": ""}, 422, "prompt"),
    ("/v1/inference", {"prompt": "   "}, 422, "prompt"),
    ("/v1/inference", {}, 422, "prompt"),
    ("/v1/inference", {"prompt": 5}, 422, "prompt"),
    ("/v1/inference", {"prompt": "x" * 20000}, 422, "limit"),
    ("/v1/inference", {"prompt": "x", "max_tokens": 0}, 422, "max_tokens"),
    ("/v1/inference", {"prompt": "x", "max_tokens": 100000}, 422, "max_tokens"),
    ("/v1/inference", {"prompt": "x", "max_tokens": "5"}, 422, "max_tokens"),
    ("/v1/inference", {"prompt": "x", "max_tokens": True}, 422, "max_tokens"),
    ("/v1/inference", {"prompt": "x", "temperature": -1}, 422, "temperature"),
    ("/v1/inference", {"prompt": "x", "top_p": 0}, 422, "top_p"),
    ("/v1/inference", {"prompt": "x", "top_k": -3}, 422, "top_k"),
    ("/v1/inference", {"prompt": "x", "seed": -(2**63) - 1}, 422, "seed"),
    ("/v1/inference", {"prompt": "x", "stop": [""]}, 422, "stop"),
    ("/v1/inference", {"prompt": "x", "model": "no-such-model"}, 404, "no-such-model"),
    ("/v1/inference", {"prompt": "x", "model": "demo-embed"}, 422, "embed"),
    ("/v1/inference", {"prompt": "x", "model": "demo-gpt@99"}, 404, "demo-gpt@99"),
    ("/v1/inference", {"prompt": "x", "model": "demo-gpt@zero"}, 422, "version"),
    ("/v1/inference", ["a list"], 422, "object"),
    ("/v1/inference", {"prompt": "x", "max_token": 3}, 422, "unknown field 'max_token'"),
    ("/v1/inference", {"prompt": "x", "stream": True}, 422, "?stream=true"),
    ("/v1/inference", {"prompt": "x", "deadline_s": 3}, 422, "POST /v1/jobs"),
    ("/v1/inference/batch", {"prompts": ["x"], "prompt": "y"}, 422, "'prompts'"),
    ("/v1/inference/batch?stream=true", {"prompts": ["x"]}, 422, "a batch does not stream"),
    ("/v1/jobs", {"kind": "generate", "input": "x", "bogus": 1}, 422, "unknown field 'bogus'"),
    ("/v1/jobs", {"kind": "generate", "input": "x", "params": {"max_token": 100}}, 422,
     "unknown sampling parameter 'max_token'"),
    ("/v1/jobs", {"kind": "train", "input": "x"}, 422, "kind"),
    ("/v1/jobs", {"kind": "embed"}, 422, "input"),
    ("/v1/jobs", {"kind": "embed", "input": "x", "lane": "fast"}, 422, "lane"),
    ("/v1/jobs", {"kind": "embed", "input": "x", "params": {"max_tokens": 3}}, 422, "params"),
    ("/v1/jobs", {"kind": "generate", "input": "x", "params": [1]}, 422, "params"),
    ("/v1/jobs", {"kind": "embed", "input": "x", "deadline_s": -5}, 422, "deadline_s"),
    ("/v1/inference/batch", {"prompts": []}, 422, "prompts"),
    ("/v1/inference/batch", {"prompts": ["x"] * 9}, 413, "limit"),
    ("/v1/inference/batch", {"prompts": ["x", 3]}, 422, "prompts[1]"),
    ("/v1/embeddings", {"input": [1, 2]}, 400, "input"),  # OpenAI endpoints: 400
    ("/v1/embeddings", {"input": "x", "encoding_format": "hex"}, 400, "encoding_format"),
    ("/v1/models/promote", {"name": "m", "kind": "embed"}, 422, "path"),
    ("/v1/models/promote", {"name": "m", "kind": "embed", "path": "../../etc/passwd"}, 422,
     "model root"),
    ("/v1/models/rollback", {}, 422, "name"),
]


def test_an_error_names_the_field_at_fault_and_quotes_only_a_little_of_it(api):
    nested = api.post("/v1/jobs", {"kind": "generate", "input": "x", "params": {"top_k": -3}})
    assert nested.status_code == 422 and nested.json()["error"]["param"] == "params.top_k"
    unknown = api.post("/v1/jobs", {"kind": "generate", "input": "x", "params": {"bogus": 1}})
    assert unknown.status_code == 422 and unknown.json()["error"]["param"] == "params.bogus"
    long_name = api.post("/v1/inference", {"prompt": "x", "model": "m" * 120})
    assert long_name.status_code == 422 and len(long_name.json()["error"]["message"]) < 250
    flat = api.post("/v1/inference", {"prompt": "x", "top_k": -3})
    assert flat.status_code == 422 and flat.json()["error"]["param"] == "top_k"
    for body in ({"prompt": "x", "f" * 100_000: 1}, {"prompt": "x", "max_tokens": "9" * 100_000},
                 {"prompt": "x", "stop": ["s"] * 100_000}):
        refused = api.post("/v1/inference", body)
        assert refused.status_code == 422 and len(refused.text) < 1000, refused.text[:300]


@pytest.mark.parametrize("path,body,status,needle", BAD_INPUTS)
def test_bad_input_gets_a_clear_4xx(api, path, body, status, needle):
    response = api.post(path, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"type", "message", "param", "code"}
    assert needle.lower() in error["message"].lower(), error


def test_malformed_requests(api):
    cases = [
        (dict(data="{not json", headers={"Content-Type": "application/json"}), 400, "bad_json"),
        (dict(data="prompt=x", headers={"Content-Type": "text/plain"}), 415,
         "unsupported_media_type"),
        (dict(data='{"prompt": NaN}', headers={"Content-Type": "application/json"}), 400,
         "bad_json"),
        (dict(data="[" * 100000, headers={"Content-Type": "application/json"}), 400, "bad_json"),
        (dict(data=b"\xff\xfe{", headers={"Content-Type": "application/json"}), 400, "bad_json"),
        (dict(data="x" * 2_000_000, headers={"Content-Type": "application/json"}), 413, None),
    ]
    for kwargs, status, kind in cases:
        response = api.session.post(api.url + "/v1/inference", timeout=30, **kwargs)
        assert response.status_code == status, (kwargs.get("headers"), response.text[:200])
        if kind:
            assert response.json()["error"]["type"] == kind


def test_a_chunked_body_over_the_limit_is_413_not_cut_and_parsed(api):
    """No Content-Length (Transfer-Encoding: chunked): the body is still measured whole. One
    whose first 1 MiB is valid JSON must not pass as that first MiB."""
    limit = 1_048_576  # BANTER_MAX_REQUEST_BYTES's default
    head = json.dumps({"kind": "embed", "input": "x"}).encode() + b" " * (limit - 100)
    assert len(head) < limit  # valid JSON (whitespace after the object), just under the limit
    for body in (b'{"kind": "embed", "input": "' + b"x" * (limit + 100) + b'"}',
                 head + b" " * (limit - len(head)) + b"trailing"):
        chunks = (body[i:i + 65536] for i in range(0, len(body), 65536))
        response = api.session.post(api.url + "/v1/jobs", data=chunks, timeout=30,
                                    headers={"Content-Type": "application/json"})
        assert response.status_code == 413, response.text[:200]
        assert response.json()["error"]["type"] == "too_large"
    ok = api.session.post(api.url + "/v1/jobs", data=iter([head]), timeout=30,
                          headers={"Content-Type": "application/json"})
    assert ok.status_code == 202, ok.text[:200]


def test_a_wire_error_answers_without_the_server_paths_it_names(caplog):
    """A registry line that does not decode names its file: the log gets that, the caller a
    500 wire_error that says where to look."""
    from flask import Flask

    from banter.errors import WireError
    from producer.errors import register

    app = Flask("wire")
    register(app)

    @app.get("/boom")
    def boom():
        raise WireError("/srv/secret/registry/history.jsonl line 5 is not a valid registry record")

    response = app.test_client().get("/boom")
    assert response.status_code == 500
    error = response.get_json()["error"]
    assert error["type"] == "wire_error" and "/srv/secret" not in error["message"]
    assert "producer log" in error["message"]
    assert any("/srv/secret/registry" in r.error for r in caplog.records if r.msg == "wire_error")


def test_unknown_route_and_method_are_json_errors(api):
    assert api.get("/v1/nothing").status_code == 404
    response = api.session.put(api.url + "/v1/inference", timeout=10)
    assert response.status_code == 405 and "error" in response.json()
    assert set(response.headers["Allow"].split(", ")) == {"POST", "OPTIONS"}  # RFC 9110
    options = api.session.options(api.url + "/v1/jobs/abc", timeout=10)
    assert options.status_code == 204 and options.content == b""
    assert "Content-Type" not in options.headers
    assert set(options.headers["Allow"].split(", ")) == {"GET", "HEAD", "DELETE", "OPTIONS"}


def test_prompt_longer_than_the_token_limit_fails_the_job_clearly(api):
    response = api.post("/v1/inference", {"prompt": "zq " * 4000, "max_tokens": 1})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["type"] == "prompt_too_long"
    job = api.get(f"/v1/jobs/{response.headers['X-Job-ID']}").json()
    assert (job["status"], job["model"], job["version"]) == ("failed", "demo-gpt", 1)



def test_not_ready_still_shows_the_backlog(tmp_path, demo_models, settings):
    """No live worker: 503, and the body still says what is queued per lane."""
    redis_server = RedisServer(tmp_path / "redis", persist=False)
    url = redis_server.start()
    server = Server(create_app(replace(settings, redis_url=url, broker_url=url)))
    try:
        client = Api(server.url)
        assert client.post("/v1/jobs", {"kind": "embed", "input": "waits"}).status_code == 202
        ready = client.get("/readyz")
        assert ready.status_code == 503
        body = ready.json()
        assert body["error"]["type"] == "unavailable" and body["status"] == "not_ready"
        assert body["workers"] == [] and body["queued"] == {"interactive": 1, "bulk": 0}
    finally:
        server.close()
        redis_server.stop()


# ----------------------------------------------------------------------------- tokenize
def test_tokenize_gives_the_ids_a_worker_counts_and_detokenize_reads_them_back(api,
                                                                               demo_models):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(demo_models["demo-gpt"] / "tokenizer.json"))
    answer = api.post("/v1/tokenize", {"prompt": "tell me a story"}).json()
    assert answer["model"].startswith("demo-gpt@")
    assert answer["tokens"] == tokenizer.encode("tell me a story").ids
    served = api.post("/v1/inference", {"prompt": "tell me a story", "max_tokens": 1}).json()
    assert answer["count"] == len(answer["tokens"]) == served["usage"]["prompt_tokens"]
    messages = [{"role": "user", "content": "Hello?"}]
    chat = api.post("/v1/tokenize", {"model": "demo-gpt", "messages": messages}).json()
    answered = api.post("/v1/chat/completions", {"messages": messages, "max_tokens": 1}).json()
    assert chat["count"] == answered["usage"]["prompt_tokens"]
    back = api.post("/v1/detokenize", {"tokens": answer["tokens"] + [0]}).json()
    assert back["prompt"] == "tell me a story<|endoftext|>"
    assert api.post("/v1/tokenize", {"prompt": ""}).json()["tokens"] == []
    nulls = api.post("/v1/tokenize", {"prompt": "tell me a story", "messages": None})
    assert nulls.status_code == 200 and nulls.json()["tokens"] == answer["tokens"], nulls.text
    chat_nulls = api.post("/v1/tokenize", {"model": "demo-gpt", "messages": messages,
                                           "prompt": None})
    assert chat_nulls.json()["tokens"] == chat["tokens"], chat_nulls.text


@pytest.mark.parametrize("path, body, status, needle", [
    ("/v1/tokenize", {}, 422, "send 'prompt' (a text) or 'messages'"),
    ("/v1/tokenize", {"prompt": None, "messages": None}, 422, "one of them"),
    ("/v1/tokenize", {"prompt": "x", "messages": [{"role": "user", "content": "x"}]}, 422,
     "one of them"),
    ("/v1/tokenize", {"prompt": 5}, 422, "'prompt'"),
    ("/v1/tokenize", {"prompt": "x", "extra": 1}, 422, "unknown field 'extra'"),
    ("/v1/tokenize", {"prompt": "x", "model": "demo-embed"}, 422, "embed"),
    ("/v1/tokenize", {"prompt": "x", "model": "no-such-model"}, 404, "no-such-model"),
    ("/v1/tokenize", {"messages": [{"role": "robot", "content": "x"}]}, 422, "messages[0].role"),
    ("/v1/detokenize", {"tokens": [1, 685]}, 422, "'tokens[1]' must be a token id of demo-gpt"),
    ("/v1/detokenize", {"tokens": [True]}, 422, "'tokens[0]'"),
    ("/v1/detokenize", {"tokens": "1 2"}, 422, "'tokens' must be a list"),
])
def test_tokenize_refuses_bad_input_naming_it(api, path, body, status, needle):
    response = api.post(path, body)
    assert response.status_code == status, response.text
    assert needle in response.json()["error"]["message"]


def test_tokenize_ignores_the_files_padding_and_truncation_as_the_worker_does(api, settings,
                                                                              demo_models):
    import shutil

    name = f"trunc-{uuid.uuid4().hex[:8]}"
    directory = settings.model_root / name
    shutil.copytree(demo_models["demo-gpt"], directory)
    spec = json.loads((directory / "tokenizer.json").read_text())
    spec["truncation"] = {"direction": "Right", "max_length": 2, "strategy": "LongestFirst",
                          "stride": 0}
    spec["padding"] = {"strategy": {"Fixed": 40}, "direction": "Right", "pad_to_multiple_of": None,
                       "pad_id": 0, "pad_type_id": 0, "pad_token": "<|endoftext|>"}
    (directory / "tokenizer.json").write_text(json.dumps(spec))
    assert api.post("/v1/models/promote", {"name": name, "kind": "generate",
                                           "path": name}).status_code == 201
    counted = api.post("/v1/tokenize", {"model": name, "prompt": "tell me a story"}).json()
    served = api.post("/v1/inference", {"model": name, "prompt": "tell me a story",
                                        "max_tokens": 1}).json()
    assert 2 < counted["count"] == served["usage"]["prompt_tokens"] < 40


def test_a_tokenizer_that_is_not_a_regular_file_is_a_503_not_a_hang(api, settings, demo_models):
    import os
    import shutil

    name = f"fifo-{uuid.uuid4().hex[:8]}"
    directory = settings.model_root / name
    shutil.copytree(demo_models["demo-gpt"], directory)
    assert api.post("/v1/models/promote", {"name": name, "kind": "generate",
                                           "path": name}).status_code == 201
    (directory / "tokenizer.json").unlink()
    os.mkfifo(directory / "tokenizer.json")
    response = api.post("/v1/tokenize", {"model": name, "prompt": "x"})
    assert response.status_code == 503, response.text
    assert response.json()["error"]["type"] == "model_load_error"


def test_a_model_with_no_tokenizer_here_or_a_changed_one_is_refused(api, settings, demo_models):
    """An openai-backend model has no tokenizer on this server (422); a tokenizer file edited
    after promote is a checksum_mismatch (503) naming no path."""
    import shutil

    cloud = f"cloud-{uuid.uuid4().hex[:8]}"
    assert api.post("/v1/models/promote", {"name": cloud, "kind": "generate", "backend": "openai",
                                           "model": "gpt-4o-mini"}).status_code == 201
    refused = api.post("/v1/tokenize", {"model": cloud, "prompt": "x"})
    assert refused.status_code == 422 and "openai backend" in refused.json()["error"]["message"]
    name = f"tok-{uuid.uuid4().hex[:8]}"
    directory = settings.model_root / name
    shutil.copytree(demo_models["demo-gpt"], directory)
    assert api.post("/v1/models/promote", {"name": name, "kind": "generate",
                                           "path": name}).status_code == 201
    (directory / "tokenizer.json").write_text((directory / "tokenizer.json").read_text() + " ")
    changed = api.post("/v1/tokenize", {"model": name, "prompt": "x"})
    assert changed.status_code == 503, changed.text
    error = changed.json()["error"]
    assert error["type"] == "checksum_mismatch" and str(settings.model_root) not in error["message"]
