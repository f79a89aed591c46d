"""The openai backend through real workers against a real OpenAI-compatible HTTP server
(``tests.fake_openai``): fallback with no local model, registry entries that name an upstream
model, a stack with no ONNX worker at all, retries, typed errors, cancellation, and a key that
never leaves the client.

The module runs its own stack (private redis-server, BANTER_HOME, producer) so the registry
state of the other tests is untouched. Only ``banter worker --openai`` runs unless a test
starts an ONNX worker itself.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import openai
import pytest
import requests
from openai.types.chat import ChatCompletionChunk

from banter import keys
from banter.demo import DEMO_GPT, DEMO_TEXT
from banter.errors import BanterError, status_for
from banter.jobs import JobRecord, JobStore
from banter.logs import JSONFormatter
from banter.redisconn import connect
from banter.redisserver import RedisServer
from banter.settings import Settings
from banter.streams import StreamWriter, read_events
from producer.app import create_app
from registry.history import HistoryFile
from registry.mirror import Mirror
from registry.service import Registry
from tests.conftest import Api, Server, start_worker, stop_process
from tests.fake_openai import REPLY, FakeOpenAI, logprob_of
from tests.test_streams import sse_events
from workers.openai_backend import OpenAIBackend, _pieces
from workers.runner import RunnerCache
from workers.runtime import WorkerRuntime

KEY = "sk-test-SECRET-123"
OPENAI_NODE = "openai-test@localhost"
ONNX_NODE = "cpu-openai-test@localhost"
UPSTREAM_TEXT = "".join(REPLY)


# ----------------------------------------------------------------------------- the stack
@pytest.fixture(scope="module")
def fake():
    server = FakeOpenAI(KEY)
    yield server
    server.close()


@pytest.fixture(scope="module")
def private_redis(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("openai-redis"), persist=False)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def env(private_redis, fake, tmp_path_factory) -> dict[str, str]:
    return {"BANTER_REDIS_URL": private_redis.url,
            "BANTER_HOME": str(tmp_path_factory.mktemp("openai-home")),
            "BANTER_WORKER_HEARTBEAT_S": "1", "BANTER_LOG_LEVEL": "DEBUG",
            "BANTER_OPENAI_KEY": KEY, "BANTER_OPENAI_BASE_URL": fake.url,
            "BANTER_OPENAI_MAX_RETRIES": "2", "BANTER_AUTH_DISABLED": "true"}


@pytest.fixture(scope="module")
def oa_settings(env) -> Settings:
    return Settings.from_env(env)


@pytest.fixture(scope="module")
def oa_redis(oa_settings):
    return connect(oa_settings.redis_url)


@pytest.fixture(scope="module")
def logs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("openai-logs")


@pytest.fixture(scope="module")
def producer_log():
    """Every log line of this process (the producer runs in it) while the module runs."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    root = logging.getLogger()
    handler, level = Collect(), root.level
    handler.setFormatter(JSONFormatter())
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield lines
    root.removeHandler(handler)
    root.setLevel(level)


def start_openai_worker(env: dict[str, str], node: str, log_path: Path, client):
    """``banter worker --openai`` as a child process; returns once its heartbeat is in Redis."""
    log = open(log_path, "ab")
    process = subprocess.Popen([sys.executable, "-m", "banter.cli", "worker", "--openai",
                                "--name", node], env={**os.environ, **env},
                               stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"worker exited: {log_path.read_text()[-3000:]}")
        if client.zscore(keys.workers_for("openai"), node) is not None:
            return process
        time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"worker did not start: {log_path.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def openai_worker(env, oa_redis, logs_dir):
    process = start_openai_worker(env, OPENAI_NODE, logs_dir / "openai-worker.log", oa_redis)
    yield process
    stop_process(process)


@pytest.fixture(scope="module")
def oa_api(oa_settings, oa_redis, producer_log, openai_worker):
    """The module's producer (in this process) with ``banter worker --openai`` running."""
    server = Server(create_app(oa_settings, oa_redis))
    yield Api(server.url)
    server.close()


def copy_demo_gpt(demo_models, settings: Settings, name: str) -> Path:
    """The demo decoder's files under this module's model root as ``name/``."""
    target = settings.model_root / name
    shutil.copytree(demo_models[DEMO_GPT], target)
    return target


# ----------------------------------------------------------------------------- no local model
def test_no_local_model_inference_is_served_upstream(oa_api, fake):
    response = oa_api.post("/v1/inference", {"prompt": "plain hello", "max_tokens": 500})
    assert response.status_code == 200, response.text
    assert response.headers["X-Backend"] == "openai"
    body = response.json()
    assert (body["text"], body["finish_reason"], body["backend"]) == (UPSTREAM_TEXT, "stop",
                                                                       "openai")
    assert body["usage"]["completion_tokens"] == len(REPLY)
    [seen] = fake.seen("plain hello")
    assert seen.authorization == f"Bearer {KEY}"
    assert seen.body["model"] == "gpt-4o-mini" and seen.body["stream"] is True
    assert seen.body["max_tokens"] == 128  # capped by BANTER_OPENAI_MAX_TOKENS
    job = oa_api.wait_job(body["id"])
    assert (job["backend"], job["version"], job["worker"]) == ("openai", None, OPENAI_NODE)
    assert oa_api.get("/readyz").status_code == 200  # the openai worker is a live worker


def test_penalties_and_logit_bias_are_sent_upstream(oa_api, fake):
    """Sampling settings go upstream as the client sent them; those left at their no-op
    values are not sent."""
    response = oa_api.post("/v1/completions", {
        "prompt": "adjusted hello", "max_tokens": 5, "temperature": 0.5, "seed": 4,
        "presence_penalty": -1.5, "frequency_penalty": 0.75, "logit_bias": {"50256": -100},
        "stop": ["\n"]})
    assert response.status_code == 200, response.text
    [seen] = fake.seen("adjusted hello")
    assert {k: seen.body.get(k) for k in ("temperature", "seed", "presence_penalty",
                                          "frequency_penalty", "logit_bias", "stop")} == {
        "temperature": 0.5, "seed": 4, "presence_penalty": -1.5, "frequency_penalty": 0.75,
        "logit_bias": {"50256": -100.0}, "stop": ["\n"]}
    assert oa_api.post("/v1/inference", {"prompt": "plain again"}).status_code == 200
    [plain] = fake.seen("plain again")
    assert not {"presence_penalty", "frequency_penalty", "logit_bias"} & plain.body.keys()


def stream_lines(api: Api, path: str, body: dict) -> list[dict]:
    """The JSON chunks of a streamed OpenAI answer (``[DONE]`` left out)."""
    with requests.post(api.url + path, json={**body, "stream": True}, stream=True,
                       timeout=30) as response:
        assert response.status_code == 200, response.text
        lines = [line[len("data: "):] for line in response.iter_lines(decode_unicode=True)
                 if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_chat_logprobs_are_asked_upstream_and_answered_per_token(oa_api, fake):
    """Each token the upstream scored is one token event with its entry; the answer, whole or
    streamed, is in OpenAI's chat shape."""
    ask = {"messages": [{"role": "user", "content": "logprob hello"}], "max_tokens": 4,
           "logprobs": True, "top_logprobs": 2}
    response = oa_api.post("/v1/chat/completions", ask)
    assert response.status_code == 200, response.text
    [seen] = fake.seen("logprob hello")
    assert (seen.body["logprobs"], seen.body["top_logprobs"]) == (True, 2)
    content = response.json()["choices"][0]["logprobs"]["content"]
    assert [e["token"] for e in content] == REPLY[:4]
    assert [e["logprob"] for e in content] == [logprob_of(t) for t in REPLY[:4]]
    assert content[2]["bytes"] == list(REPLY[2].encode())
    assert [t["token"] for t in content[0]["top_logprobs"]] == ["alt0", "alt1"]
    chunks = stream_lines(oa_api, "/v1/chat/completions", ask)
    scored = [e for c in chunks if c.get("choices") and c["choices"][0]["logprobs"]
              for e in c["choices"][0]["logprobs"]["content"]]
    assert scored == content


def test_a_delta_of_several_tokens_is_one_event_per_scored_token(oa_api, fake, oa_redis):
    """An upstream that sends two tokens a chunk: with logprobs, each gets its event, entry
    and text (legacy completions: tokens, offsets); without, the delta is one event."""
    fake.script("paired hello", "pairs", "pairs")
    body = {"prompt": "paired hello", "max_tokens": 5, "logprobs": 0}
    answer = oa_api.post("/v1/completions", body)
    assert answer.status_code == 200, answer.text
    choice = answer.json()["choices"][0]
    assert choice["text"] == "".join(REPLY[:5])
    assert choice["logprobs"]["tokens"] == REPLY[:5]
    assert choice["logprobs"]["text_offset"] == [len("".join(REPLY[:i])) for i in range(5)]
    job = oa_api.wait_job(answer.headers["X-Job-ID"])
    assert job["usage"]["completion_tokens"] == 5
    plain = oa_api.post("/v1/inference", {"prompt": "paired hello", "max_tokens": 5})
    events = read_events(oa_redis, plain.json()["id"])
    assert [d["text"] for _id, kind, d in events if kind.value == "token"] == [
        REPLY[0] + REPLY[1], REPLY[2] + REPLY[3], REPLY[4]]


def test_tokens_that_do_not_spell_their_delta_carry_it_whole_with_the_first():
    chunk = ChatCompletionChunk.model_validate({
        "id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
        "choices": [{"index": 0, "delta": {"content": "é!"}, "finish_reason": None,
                     "logprobs": {"content": [
                         {"token": "bytes:\\xc3", "bytes": [195], "logprob": -1.0,
                          "top_logprobs": []},
                         {"token": "bytes:\\xa9!", "bytes": [169, 33], "logprob": -2.0,
                          "top_logprobs": []}]}}]})
    pieces = _pieces(chunk.choices[0], scored=True)
    assert [text for text, _ in pieces] == ["é!", ""]
    assert [entry["bytes"] for _, entry in pieces] == [[195], [169, 33]]
    assert _pieces(chunk.choices[0], scored=False) == [("é!", None)]


def test_streamed_inference_carries_the_upstream_tokens_in_order(oa_api):
    with oa_api.session.post(f"{oa_api.url}/v1/inference?stream=true",
                             json={"prompt": "stream me", "max_tokens": 4}, stream=True,
                             timeout=30) as response:
        assert response.headers["X-Backend"] == "openai"
        events = list(sse_events(response))
    tokens = [data for _, event, data in events if event == "token"]
    assert tokens == [{"seq": i, "text": t, "token_id": -1} for i, t in enumerate(REPLY[:4])]
    assert events[-1][1:] == ("done", {"finish_reason": "length",
                                       "usage": {"prompt_tokens": 2, "completion_tokens": 4,
                                                 "total_tokens": 6}})


def test_embeddings_fall_back_to_the_upstream_embedding_model(oa_api, fake):
    response = oa_api.post("/v1/embeddings", {"input": "embed this text"})
    assert response.status_code == 200, response.text
    assert response.headers["X-Backend"] == "openai"
    assert response.json()["data"][0]["embedding"] == [15.0, 0.5, -0.5]
    assert fake.seen("embed this text")[0].body["model"] == "text-embedding-3-small"


def test_a_list_of_texts_falls_back_as_one_upstream_request(oa_api, fake):
    texts = ["first upstream text", "second", "the third one"]
    response = oa_api.post("/v1/embeddings", {"input": texts})
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert [d["embedding"][0] for d in data] == [float(len(t)) for t in texts]  # input order
    assert len(fake.seen("first upstream text")) == 1
    job = oa_api.get(f"/v1/jobs/{response.headers['X-Job-ID']}").json()
    assert [v[0] for v in job["result"]["embeddings"]] == [float(len(t)) for t in texts]


def test_chat_completions_with_no_local_model(oa_api):
    response = oa_api.post("/v1/chat/completions",
                           {"messages": [{"role": "user", "content": "chat fallback"}]})
    assert response.status_code == 200, response.text
    assert response.headers["X-Backend"] == "openai"
    assert response.json()["choices"][0]["message"]["content"] == UPSTREAM_TEXT


def test_banter_submit_is_served_upstream(oa_api, env):
    cli_env = {**os.environ, **env}
    cli_env.pop("BANTER_API_KEY", None)
    for extra in ([], ["--stream"]):
        result = subprocess.run([sys.executable, "-m", "banter.cli", "submit", "--url", oa_api.url,
                                 *extra, "cli hello"], capture_output=True, text=True,
                                timeout=60, env=cli_env)
        assert result.returncode == 0, result.stderr
        assert result.stdout == UPSTREAM_TEXT + "\n"


# ----------------------------------------------------------------------------- registry entries
def test_registry_entry_names_the_upstream_model(oa_api, fake):
    promoted = oa_api.post("/v1/models/promote", {"name": "cloud-gpt", "kind": "generate",
                                                  "backend": "openai", "model": "gpt-x"})
    assert promoted.status_code == 201, promoted.text
    version = promoted.json()["version"]

    # the official client against the producer, streaming, through the registry entry
    client = openai.OpenAI(base_url=f"{oa_api.url}/v1", api_key="unused", max_retries=0)
    stream = client.chat.completions.create(
        model="cloud-gpt", messages=[{"role": "user", "content": "registry chat"}],
        stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == UPSTREAM_TEXT
    assert fake.seen("registry chat")[0].body["model"] == "gpt-x"

    response = oa_api.post("/v1/inference", {"prompt": "registry sync", "model": "cloud-gpt"})
    assert response.headers["X-Backend"] == "openai"
    job = oa_api.wait_job(response.json()["id"])
    assert (job["backend"], job["version"], job["model"]) == ("openai", version, "cloud-gpt")


# ----------------------------------------------------------------------------- topology
def test_onnx_models_go_upstream_only_while_no_onnx_worker_is_live(oa_api, env, oa_redis,
                                                                   oa_settings, demo_models,
                                                                   logs_dir):
    copy_demo_gpt(demo_models, oa_settings, "good-gpt")
    broken = copy_demo_gpt(demo_models, oa_settings, "broken-gpt")
    for name in ("good-gpt", "broken-gpt"):
        assert oa_api.post("/v1/models/promote", {"name": name, "kind": "generate",
                                                  "path": f"{name}/model.onnx"}).status_code == 201
    with open(broken / "model.onnx", "ab") as artifact:
        artifact.write(b"tampered")  # checksum mismatch from now on

    def run(model: str) -> dict:
        response = oa_api.post("/v1/inference", {"prompt": f"to {model}", "model": model,
                                                 "max_tokens": 3})
        assert response.status_code == 200, response.text
        return oa_api.wait_job(response.json()["id"])

    # no ONNX worker at all: an onnx model is served upstream
    assert run("good-gpt")["backend"] == "openai"

    worker = start_worker(env, ONNX_NODE, logs_dir / "onnx-worker.log", oa_redis)
    try:
        local = run("good-gpt")
        assert (local["backend"], local["worker"]) == ("onnx", ONNX_NODE)
        assert local["result"]["text"] == "".join(" " + w for w in DEMO_TEXT.split()[:3])
        # the ONNX worker itself falls back when the artifact does not verify
        fallback = run("broken-gpt")
        assert (fallback["backend"], fallback["worker"]) == ("openai", ONNX_NODE)
        assert fallback["result"]["text"] == "".join(REPLY[:3]) and fallback["version"] is None
    finally:
        stop_process(worker)

    # every ONNX worker stopped: served upstream again
    assert run("good-gpt")["backend"] == "openai"


# ----------------------------------------------------------------------------- failures
def test_429_twice_then_200_succeeds_after_growing_backoff(oa_api, fake):
    fake.script("retry me", 429, 429)
    response = oa_api.post("/v1/inference", {"prompt": "retry me"})
    assert response.status_code == 200, response.text
    assert response.json()["text"] == UPSTREAM_TEXT
    first, second, third = (seen.at for seen in fake.seen("retry me"))
    assert third - second > second - first > 0.3  # 0.5 s then 1 s, less up to 25 % jitter


def test_5xx_past_the_retry_budget_is_an_upstream_error(oa_api, fake):
    fake.script("always failing", 500, 500, 500)
    response = oa_api.post("/v1/inference", {"prompt": "always failing"})
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["type"] == "upstream_error" and "500 after 2 retries" in error["message"]
    assert len(fake.seen("always failing")) == 3


def test_401_is_a_job_error_naming_the_cause(oa_api, fake):
    fake.script("bad key", 401)
    response = oa_api.post("/v1/jobs", {"kind": "generate", "input": "bad key"})
    job = oa_api.wait_job(response.json()["id"])
    assert job["status"] == "failed" and job["error"]["type"] == "upstream_auth"
    assert "refused the OpenAI key (401)" in job["error"]["message"]
    assert "Incorrect API key provided: [redacted]" in job["error"]["message"]
    assert len(fake.seen("bad key")) == 1  # not retried


@pytest.mark.parametrize("answer, error_type, words", [
    (404, "upstream_model_not_found", "does not serve model 'gpt-4o-mini' (404)"),
    ("context", "prompt_too_long", "longer than upstream model 'gpt-4o-mini' accepts"),
    (403, "upstream_auth", "refused the OpenAI key (403)"),
    ("hang", "upstream_timeout", "did not answer within 0.3s"),
    # never a success holding part of an answer, nor an internal error (500) for what the
    # upstream sent
    ("truncated", "upstream_error",
     "stream ended after 1 tokens without a finish_reason: its answer was cut short"),
    ("garbled", "upstream_error", "sent an answer this server cannot read"),
    ("html", "upstream_error", "stream ended after 0 tokens without a finish_reason"),  # no data:
])
def test_upstream_failures_become_typed_errors(fake, oa_settings, oa_redis, answer, error_type,
                                               words):
    backend = OpenAIBackend(replace(oa_settings, openai_timeout_s=0.3, openai_max_retries=0),
                            StreamWriter(oa_redis, 100, 60))
    marker = f"typed {answer}"
    fake.script(marker, answer)
    job = JobRecord(id=JobRecord.new_id(), kind="generate", model="m", input=marker,
                    params={"max_tokens": 4})
    with pytest.raises(BanterError) as raised:
        backend.generate(job, "gpt-4o-mini", lambda: False)
    assert raised.value.type == error_type and words in raised.value.message
    assert raised.value.status == status_for(error_type) and KEY not in raised.value.message


@pytest.mark.parametrize("answer, words", [
    ("short", "answered 1 embeddings (indexes [0]) for 2 inputs"),
    ("html", "sent an answer this server cannot read"),
])
def test_embeddings_that_do_not_answer_every_text_are_an_upstream_error(fake, oa_settings,
                                                                       oa_redis, answer, words):
    backend = OpenAIBackend(replace(oa_settings, openai_max_retries=0),
                            StreamWriter(oa_redis, 100, 60))
    marker = f"embed {answer}"
    fake.script(marker, answer)
    job = JobRecord(id=JobRecord.new_id(), kind="embed", model="m", input=[marker, "two"])
    with pytest.raises(BanterError) as raised:
        backend.embed(job, "text-embedding-3-small")
    assert raised.value.type == "upstream_error" and words in raised.value.message


def test_a_job_waiting_for_an_upstream_slot_ends_when_cancelled_or_past_its_deadline(
        fake, oa_settings, oa_redis):
    """With every upstream slot (BANTER_OPENAI_CONCURRENCY) taken, a waiting job that is
    cancelled, or whose deadline passes, ends so at once: it waited for a slot to free."""
    from concurrent.futures import ThreadPoolExecutor

    backend = OpenAIBackend(replace(oa_settings, openai_concurrency=1),
                            StreamWriter(oa_redis, 100, 60))
    cancelled = JobRecord(id=JobRecord.new_id(), kind="generate", model="m",
                          input="slot wait, cancelled")
    late = JobRecord(id=JobRecord.new_id(), kind="generate", model="m",
                     input="slot wait, late", deadline_at=time.time() + 0.5)
    assert backend._slots.acquire(timeout=1)  # the one slot, as a long stream would hold it
    with ThreadPoolExecutor(2) as pool:
        try:
            waits = [pool.submit(backend.generate, job, "gpt-4o-mini", lambda: False)
                     for job in (cancelled, late)]
            deadline = time.monotonic() + 10
            while not backend.cancel(cancelled.id) and time.monotonic() < deadline:
                time.sleep(0.05)
            outcomes = [wait.result(timeout=10) for wait in waits]
        finally:
            backend._slots.release()
    assert [o.finish_reason for o in outcomes] == ["cancelled", "expired"]
    assert fake.seen("slot wait") == []  # neither sent its request


NO_FALLBACK = [({"openai_fallback": False},
                "the openai fallback is off (BANTER_OPENAI_FALLBACK=false)"),
               ({"openai_key": ""}, "set BANTER_OPENAI_KEY or OPENAI_API_KEY")]


@pytest.mark.parametrize("change, words", NO_FALLBACK)
def test_an_unknown_model_is_a_404_saying_why_it_was_not_served_upstream(oa_settings, oa_redis,
                                                                        change, words):
    server = Server(create_app(replace(oa_settings, **change), oa_redis))
    try:
        response = Api(server.url).post("/v1/inference", {"prompt": "no fallback"})
    finally:
        server.close()
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "model_not_found"
    assert words in response.json()["error"]["message"]


@pytest.mark.parametrize("change, words", NO_FALLBACK)
def test_a_worker_that_may_not_fall_back_fails_with_the_local_cause(oa_settings, demo_models,
                                                                   tmp_path, change, words,
                                                                   caplog):
    """An in-process runtime on its own Redis database: no heartbeat, no Celery."""
    client = connect(oa_settings.redis_url.rsplit("/", 1)[0] + "/1")
    client.flushdb()
    shutil.copytree(demo_models[DEMO_GPT], tmp_path / "local-only")
    registry = Registry(HistoryFile(tmp_path / "history.jsonl"), Mirror(client), tmp_path)
    registry.promote(name="local-only", kind="generate", path="local-only/model.onnx")
    with open(tmp_path / "local-only" / "model.onnx", "ab") as artifact:
        artifact.write(b"tampered")
    runtime = WorkerRuntime(replace(oa_settings, model_root=tmp_path, **change), client,
                            RunnerCache(["CPUExecutionProvider"]), "in-process")
    store = JobStore(client, 60)
    messages = []
    for name, error_type in (("local-only", "checksum_mismatch"), ("nowhere", "model_not_found")):
        job = JobRecord(id=JobRecord.new_id(), kind="generate", model=name, input="x")
        store.create(job)
        assert runtime.run_job(job.id) == "failed"
        error = store.get(job.id).error
        assert error["type"] == error_type
        messages.append(error["message"])
    # a model that cannot be served is for an admin: its client sees no artifact, the
    # worker log has the cause and why the fallback did not serve it
    assert "model 'local-only' cannot be served now: its artifact changed" in messages[0]
    assert "model.onnx" not in messages[0] and str(tmp_path) not in messages[0]
    assert words in messages[1]
    logged = [r for r in caplog.records if r.msg == "inference_failed"]
    assert "local-only/model.onnx" in logged[0].error_message and words in logged[0].error_message


# ----------------------------------------------------------------------------- cancellation
def test_cancelling_mid_stream_closes_the_upstream_request(oa_api, fake):
    fake.script("slow story", "slow")
    fake.disconnected.clear()
    job_id = oa_api.post("/v1/jobs", {"kind": "generate", "input": "slow story",
                                      "params": {"max_tokens": 500}}).json()["id"]
    with oa_api.session.get(f"{oa_api.url}/v1/jobs/{job_id}/events", stream=True,
                            timeout=30) as response:
        events = sse_events(response)
        first = next(events)
        assert first[1] == "token"
        assert oa_api.delete(f"/v1/jobs/{job_id}").status_code == 200
        rest = list(events)
    assert rest[-1][1:] == ("done", {"finish_reason": "cancelled",
                                     "usage": {"prompt_tokens": 0,
                                               "completion_tokens": len(rest),
                                               "total_tokens": len(rest)}})
    assert fake.disconnected.wait(5), "the upstream never saw its client hang up"
    assert fake.slow_sent < 100
    job = oa_api.wait_job(job_id)
    assert job["status"] == "cancelled" and job["result"]["finish_reason"] == "cancelled"
    streamed = [first[2]["text"]] + [data["text"] for _, event, data in rest if event == "token"]
    assert job["result"]["text"] == "".join(streamed)


# ----------------------------------------------------------------------------- the key
def test_the_key_appears_nowhere_in_redis_logs_or_metrics(oa_api, fake, oa_redis, oa_settings,
                                                          logs_dir, producer_log):
    fake.script("leak check", 401)
    failed = oa_api.post("/v1/inference", {"prompt": "leak check"})
    assert failed.status_code == 502 and failed.json()["error"]["type"] == "upstream_auth"
    assert oa_api.post("/v1/inference", {"prompt": "leak check ok"}).status_code == 200
    assert fake.seen("leak check ok")[0].authorization == f"Bearer {KEY}"  # it did go upstream

    assert KEY not in redis_dump(oa_redis)
    assert KEY not in oa_api.get("/metrics").text
    assert KEY not in failed.text
    assert KEY not in repr(oa_settings)
    worker_logs = "".join(path.read_text() for path in logs_dir.iterdir())
    assert "inference_complete" in worker_logs and "inference_failed" in worker_logs
    assert KEY not in worker_logs
    assert KEY not in "\n".join(producer_log)


def redis_dump(client) -> str:
    """Every key name and value of the database, as text."""
    parts = []
    for key in client.scan_iter("*"):
        kind = client.type(key)
        if kind == "none":
            continue  # it expired since the scan (a lease, a guard)
        value = {"string": lambda: client.get(key),
                 "hash": lambda: client.hgetall(key),
                 "list": lambda: client.lrange(key, 0, -1),
                 "set": lambda: client.smembers(key),
                 "zset": lambda: client.zrange(key, 0, -1, withscores=True),
                 "stream": lambda: client.xrange(key)}[kind]()
        parts.append(f"{key} {json.dumps(value, default=str)}")
    assert parts, "the database is empty: nothing was checked"
    return "\n".join(parts)


def test_an_upstream_that_overruns_max_tokens_is_cut_at_the_limit(fake, oa_settings, oa_redis):
    """An OpenAI-compatible server that ignores max_tokens: the job gets no more than it
    asked for, finish_reason length, and its stream holds the same tokens."""
    backend = OpenAIBackend(oa_settings, StreamWriter(oa_redis, 100, 60))
    fake.script("overrun me", "overrun")
    job = JobRecord(id=JobRecord.new_id(), kind="generate", model="m", input="overrun me",
                    params={"max_tokens": 3})
    outcome = backend.generate(job, "gpt-4o-mini", lambda: False)
    assert outcome.result == {"text": "Hello, I", "finish_reason": "length"}
    assert outcome.usage["completion_tokens"] == 3
    events = read_events(oa_redis, job.id)
    assert [data["text"] for _id, kind, data in events] == ["Hello", ",", " I"]
