"""Security over real HTTP: API keys (env, keys file, hashed entries), admin scope, job and
batch ownership, artifact paths under the model root, queue-depth and per-key rate limits, a
password-protected Redis, and a producer that refuses to start without keys."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import flask
import pytest
import redis
import requests
from flask import Flask

from banter import keys, stack
from banter.demo import DEMO_EMBED, DEMO_GPT
from banter.errors import Unauthorized
from banter.redisconn import connect, shown_url
from banter.redisserver import RedisServer, free_port
from banter.settings import Settings
from producer.app import create_app
from producer.auth import AuthNotConfigured, KeyRing, LiveKeys
from registry.service import Registry
from tests.conftest import Server, start_worker, stop_process

ALICE, BOB, CAROL, ADMIN, ROOT = "alice-key-1", "bob-key-2", "carol-key-3", "admin-key-4", "root-key-5"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


class Client:
    """requests against one producer as one key."""

    def __init__(self, url: str, key: str | None) -> None:
        self.url = url
        self.session = requests.Session()
        if key:
            self.session.headers.update(bearer(key))

    def post(self, path: str, body=None, **kwargs) -> requests.Response:
        return self.session.post(self.url + path, json=body, timeout=30, **kwargs)

    def get(self, path: str, **kwargs) -> requests.Response:
        return self.session.get(self.url + path, timeout=30, **kwargs)

    def delete(self, path: str) -> requests.Response:
        return self.session.delete(self.url + path, timeout=30)


def assert_error(response: requests.Response, status: int, type_: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == type_ and error["message"], error
    return error


def keyed_settings(settings: Settings, tmp_path: Path, **changes) -> Settings:
    """The suite's settings with keys: alice and bob in BANTER_API_KEYS, the admin key as its
    sha256 digest in BANTER_ADMIN_KEYS, carol (user) and root (admin) in a keys file."""
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"# banterhearts keys\n\nuser:{CAROL}   # carol\nadmin:{ROOT}\t# root\n")
    digest = hashlib.sha256(ADMIN.encode()).hexdigest()
    return replace(settings, api_keys=f"{ALICE}, {BOB}", admin_keys=f"sha256:{digest}",
                   keys_file=str(keys_file), auth_disabled=False, **changes)


@pytest.fixture(scope="module")
def idle(settings, redis_client, demo_models, tmp_path_factory):
    """A keyed producer whose queues no worker consumes: its jobs stay queued."""
    suffix = uuid.uuid4().hex[:8]
    server = Server(create_app(keyed_settings(
        settings, tmp_path_factory.mktemp("keys"), queue_interactive=f"idle-{suffix}",
        queue_bulk=f"idle-bulk-{suffix}"), redis_client))
    yield server.url
    server.close()


@pytest.fixture(scope="module")
def served(settings, redis_client, worker, tmp_path_factory):
    """A keyed producer on the suite's queues (the shared worker runs its jobs)."""
    server = Server(create_app(keyed_settings(settings, tmp_path_factory.mktemp("keys")),
                               redis_client))
    yield server.url
    server.close()


# ----------------------------------------------------------------------------- keys
def test_requests_without_a_known_key_are_401(idle):
    digest = hashlib.sha256(ADMIN.encode()).hexdigest()
    headers = [{}, {"Authorization": f"Basic {ALICE}"}, {"Authorization": "Bearer"},
               {"Authorization": "Bearer    "}, bearer("not-a-key"), bearer(ALICE.upper()),
               bearer(f"sha256:{digest}"),  # knowing a digest is not knowing the key
               {"Authorization": ALICE}]
    job_id = str(uuid.uuid4())
    for header in headers:
        for method, path, body in (("POST", "/v1/jobs", {"kind": "embed", "input": "x"}),
                                   ("GET", f"/v1/jobs/{job_id}", None),
                                   ("GET", "/v1/models", None),
                                   ("POST", "/v1/models/promote", {"name": "x"}),
                                   ("GET", "/v1/batches/batch_" + "0" * 32, None)):
            response = requests.request(method, idle + path, json=body, headers=header,
                                        timeout=30)
            assert_error(response, 401, "unauthorized")
            assert response.headers["WWW-Authenticate"] == "Bearer"
            assert response.headers["X-Trace-ID"]


def test_every_kind_of_configured_key_is_accepted(idle):
    for key in (ALICE, BOB, CAROL, ADMIN, ROOT):
        assert Client(idle, key).get("/v1/models").status_code == 200, key
    for path in ("/healthz", "/openapi.json", "/metrics"):  # no data: no key needed
        assert requests.get(idle + path, timeout=30).status_code == 200, path


def test_a_key_removed_from_the_keys_file_is_refused_without_a_restart(settings, redis_client,
                                                                      demo_models, tmp_path):
    """Through HTTP: revoke carol and make dave an admin by editing the file the producer runs
    with; BANTER_API_KEYS' keys are untouched."""
    keyed = keyed_settings(settings, tmp_path)
    server = Server(create_app(keyed, redis_client))
    try:
        assert Client(server.url, CAROL).get("/v1/models").status_code == 200
        Path(keyed.keys_file).write_text(f"admin:{ROOT}\nadmin:dave-key-6\n")
        deadline = time.monotonic() + 30
        while Client(server.url, CAROL).get("/v1/models").status_code != 401:
            assert time.monotonic() < deadline, "carol's key was never revoked"
            time.sleep(0.2)
        dave = Client(server.url, "dave-key-6")
        assert dave.get("/v1/models/history").status_code == 200
        assert Client(server.url, ALICE).get("/v1/models").status_code == 200
    finally:
        server.close()


def owner(keys: LiveKeys, key: str) -> str | None:
    """The key id ``keys`` gives a request bearing ``key``, None for an unknown key."""
    with Flask("keys").test_request_context(headers=bearer(key)):
        try:
            return keys.owner(flask.request)
        except Unauthorized:
            return None


def test_a_broken_keys_file_keeps_the_keys_in_force(settings, tmp_path, caplog):
    """A typo in the edited file, or the file gone, must not lock every caller out (nor, as a
    reload of the whole producer would, stop it): the keys in force stay, the log says why
    without quoting a key, and the next good edit takes effect."""
    keyed = replace(keyed_settings(settings, tmp_path), api_keys="", admin_keys="")
    live = LiveKeys(keyed, recheck_s=0)
    path = Path(keyed.keys_file)
    carol = owner(live, CAROL)
    assert carol is not None
    for broken in (f"admn:{CAROL}\n", "# every key removed\n", None):
        if broken is None:
            path.unlink()
        else:
            path.write_text(broken)
        with caplog.at_level(logging.ERROR, logger="banter.producer"):
            caplog.clear()
            assert owner(live, CAROL) == carol
        assert [r.message for r in caplog.records] == ["keys_file_invalid"]
        assert CAROL not in caplog.records[0].error
    path.write_text(f"user:{BOB}\n")
    assert owner(live, CAROL) is None and owner(live, BOB) is not None


def test_a_process_no_request_reaches_still_takes_each_edit(settings, tmp_path, caplog):
    """A producer process sees every edit of the keys file on its own, not only when a request
    comes: one that served none between an edit revoking carol and a broken edit must not
    keep carol's key."""
    keyed = replace(keyed_settings(settings, tmp_path), home=tmp_path / "home")
    path = Path(keyed.keys_file)
    live = LiveKeys(keyed, recheck_s=0.2)
    with caplog.at_level(logging.INFO, logger="banter.producer"):
        path.write_text(f"admin:{ROOT}\n")  # carol revoked; no request comes
        deadline = time.monotonic() + 20
        while "keys_file_reloaded" not in [r.message for r in caplog.records]:
            assert time.monotonic() < deadline, "the edit was never read"
            time.sleep(0.05)
    path.write_text(f"admn:{ROOT}\n")
    time.sleep(0.5)
    assert owner(live, CAROL) is None and owner(live, ROOT) is not None


def test_a_producer_process_that_starts_while_the_keys_file_is_broken_keeps_its_last_keys(
        settings, tmp_path, caplog):
    """gunicorn replaces a producer process that died; booting with the file broken must not
    stop the producer, nor bring back a key revoked by a good edit before the break."""
    keyed = replace(keyed_settings(settings, tmp_path), home=tmp_path / "home")
    path = Path(keyed.keys_file)
    live = LiveKeys(keyed, recheck_s=0)
    path.write_text(f"admin:{ROOT}\n")  # carol revoked
    assert owner(live, CAROL) is None
    path.write_text(f"admn:{ROOT}\n")
    with caplog.at_level(logging.ERROR, logger="banter.producer"):
        reborn = LiveKeys(keyed, recheck_s=0)
    assert "keys_file_invalid" in [r.message for r in caplog.records]
    assert owner(reborn, CAROL) is None  # the revocation stands
    assert owner(reborn, ROOT) is not None and owner(reborn, ALICE) is not None  # file, env
    with pytest.raises(AuthNotConfigured):  # nothing kept for this home: it cannot start
        LiveKeys(replace(keyed, home=tmp_path / "elsewhere"))


def test_banter_producer_survives_a_process_restart_while_the_keys_file_is_broken(
        stack_env, tmp_path):
    port = free_port()
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text(f"{CAROL}\n")
    env = {**stack_env, "BANTER_KEYS_FILE": str(keys_file), "BANTER_AUTH_DISABLED": "false",
           "BANTER_HOME": str(tmp_path / "home")}
    producer = start_producer(env, port, tmp_path / "producer.err")
    url = f"http://127.0.0.1:{port}"
    try:
        assert Client(url, CAROL).get("/v1/models").status_code == 200
        keys_file.write_text("admn:oops\n")
        first = subprocess.run(["pgrep", "-P", str(producer.pid)], capture_output=True,
                               text=True).stdout.split()
        assert len(first) == 1, first
        os.kill(int(first[0]), signal.SIGKILL)
        deadline = time.monotonic() + 60
        while True:  # gunicorn boots another process, which must come up with carol's key
            assert producer.poll() is None, (tmp_path / "producer.err").read_text()[-3000:]
            try:
                if Client(url, CAROL).get("/v1/models").status_code == 200:
                    now = subprocess.run(["pgrep", "-P", str(producer.pid)],
                                         capture_output=True, text=True).stdout.split()
                    if now and now != first:
                        break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "the producer did not come back"
            time.sleep(0.2)
    finally:
        stop_process(producer)
    assert "keys_file_invalid" in (tmp_path / "producer.err").read_text()


def test_only_admin_keys_reach_the_registry_admin_api(idle, settings):
    before = settings.registry_path.read_text()
    for key in (ALICE, CAROL):
        user = Client(idle, key)
        assert_error(user.get("/v1/models/history"), 403, "forbidden")
        assert_error(user.post("/v1/models/promote", {
            "name": DEMO_GPT, "kind": "generate", "path": f"{DEMO_GPT}/model.onnx"}),
            403, "forbidden")
        assert_error(user.post("/v1/models/rollback", {"name": DEMO_GPT}), 403, "forbidden")
    assert settings.registry_path.read_text() == before
    for key in (ADMIN, ROOT):
        admin = Client(idle, key)
        assert admin.get("/v1/models/history").status_code == 200
        assert_error(admin.post("/v1/models/rollback", {"name": f"nobody-{uuid.uuid4().hex}"}),
                     404, "model_not_found")


# ----------------------------------------------------------------------------- ownership
def test_a_job_and_its_stream_belong_to_the_key_that_made_it(idle):
    alice, bob, admin = Client(idle, ALICE), Client(idle, BOB), Client(idle, ADMIN)
    response = alice.post("/v1/jobs", {"kind": "generate", "input": "mine",
                                       "idempotency_key": "shared-key"})
    assert response.status_code == 202, response.text
    job = response.json()
    for other in (bob, admin):  # an admin key is another key too
        assert_error(other.get(f"/v1/jobs/{job['id']}"), 404, "job_not_found")
        assert_error(other.get(f"/v1/jobs/{job['id']}/events"), 404, "job_not_found")
        assert_error(other.get(f"/v1/jobs/{job['id']}/events",
                               headers={"Last-Event-ID": "0-0"}), 404, "job_not_found")
        assert_error(other.delete(f"/v1/jobs/{job['id']}"), 404, "job_not_found")
    assert alice.get(f"/v1/jobs/{job['id']}").json()["status"] == "queued"
    assert alice.delete(f"/v1/jobs/{job['id']}").json()["status"] == "cancelled"
    events = alice.get(f"/v1/jobs/{job['id']}/events")
    assert events.status_code == 200 and "event: done" in events.text
    # an idempotency key is the key's own: bob's same key makes bob's own job
    again = bob.post("/v1/jobs", {"kind": "generate", "input": "mine",
                                  "idempotency_key": "shared-key"})
    assert again.status_code == 202 and again.json()["id"] != job["id"]
    assert bob.delete(f"/v1/jobs/{again.json()['id']}").json()["status"] == "cancelled"


def test_a_batch_belongs_to_the_key_that_made_it(idle):
    alice, bob = Client(idle, ALICE), Client(idle, BOB)
    line = {"custom_id": "q1", "method": "POST", "url": "/v1/embeddings",
            "body": {"input": "hello"}}
    response = alice.post("/v1/batches", {"requests": [line]})
    assert response.status_code == 200, response.text
    batch_id = response.json()["id"]
    for path in (f"/v1/batches/{batch_id}", f"/v1/batches/{batch_id}/output"):
        assert_error(bob.get(path), 404, "not_found")
    assert_error(bob.post(f"/v1/batches/{batch_id}/cancel"), 404, "not_found")
    assert alice.get(f"/v1/batches/{batch_id}").json()["status"] == "in_progress"
    assert alice.post(f"/v1/batches/{batch_id}/cancel").json()["status"] in (
        "cancelling", "cancelled")


def test_a_finished_job_is_still_only_its_owners(served):
    alice, bob = Client(served, ALICE), Client(served, BOB)
    response = alice.post("/v1/inference", {"prompt": "hello", "max_tokens": 2})
    assert response.status_code == 200, response.text
    job_id = response.json()["id"]
    assert alice.get(f"/v1/jobs/{job_id}").json()["status"] == "succeeded"
    events = alice.get(f"/v1/jobs/{job_id}/events")
    assert "event: done" in events.text
    assert_error(bob.get(f"/v1/jobs/{job_id}"), 404, "job_not_found")
    assert_error(bob.get(f"/v1/jobs/{job_id}/events"), 404, "job_not_found")
    assert_error(bob.delete(f"/v1/jobs/{job_id}"), 404, "job_not_found")


# ----------------------------------------------------------------------------- artifact paths
@pytest.fixture
def escape_link(settings, demo_models, tmp_path):
    """A symlink under the model root to a valid model directory outside it."""
    outside = tmp_path / "outside"
    shutil.copytree(demo_models[DEMO_EMBED], outside)
    link = settings.model_root / f"escape-{uuid.uuid4().hex[:8]}"
    link.symlink_to(outside, target_is_directory=True)
    yield link.name
    link.unlink()


def test_artifact_paths_outside_the_model_root_are_refused(idle, settings, escape_link):
    admin = Client(idle, ADMIN)
    root = settings.model_root
    paths = ["../../etc/passwd", "/etc/passwd", f"{DEMO_EMBED}/../../{root.name}-x/model.onnx",
             str(root.parent / "model.onnx"), escape_link, f"{escape_link}/model.onnx",
             f"{DEMO_EMBED}\x00/model.onnx", "\x00", f"{DEMO_EMBED}/model.onnx\x00.txt",
             "%2e%2e/%2e%2e/etc/passwd", "..%2f..%2fetc%2fpasswd", "....//....//etc/passwd",
             "..\\..\\etc\\passwd", "~/model.onnx", "file:///etc/passwd", ".", "",
             f"{DEMO_EMBED}/{'x' * 2000}", "\u202e/model.onnx", "/proc/self/environ"]
    before = settings.registry_path.read_text()
    for path in paths:
        response = admin.post("/v1/models/promote", {"name": f"escape-{uuid.uuid4().hex[:6]}",
                                                      "kind": "embed", "path": path})
        assert response.status_code == 422, (path, response.text)
        assert response.json()["error"]["type"] in ("invalid_artifact", "invalid_request")
    assert settings.registry_path.read_text() == before


# ----------------------------------------------------------------------------- limits
def wait_for_a_fresh_minute(margin_s: float) -> None:
    """Sleep into the next minute when fewer than ``margin_s`` seconds are left in this one."""
    left = 60 - time.time() % 60
    if left < margin_s:
        time.sleep(left + 0.05)


def test_per_key_rate_limit_is_429_with_retry_after(settings, redis_client, tmp_path,
                                                    demo_models):
    server = Server(create_app(keyed_settings(settings, tmp_path, rate_limit_per_min=3),
                               redis_client))
    try:
        wait_for_a_fresh_minute(margin_s=10)
        alice, bob = Client(server.url, ALICE), Client(server.url, BOB)
        for _ in range(3):
            assert alice.get("/v1/models").status_code == 200
        for path in ("/v1/models", "/v1/nothing"):
            limited = alice.get(path)
            assert_error(limited, 429, "rate_limited")
            assert 1 <= int(limited.headers["Retry-After"]) <= 60
            assert "BANTER_RATE_LIMIT_PER_MIN" in limited.json()["error"]["message"]
        refused = alice.post("/v1/jobs", {"kind": "embed", "input": "x"})
        assert_error(refused, 429, "rate_limited")  # refused before anything is queued
        assert bob.get("/v1/models").status_code == 200  # every key has its own budget
        assert requests.get(server.url + "/healthz", timeout=30).status_code == 200
        assert_error(Client(server.url, "wrong").get("/v1/models"), 401, "unauthorized")
        # a CORS preflight carries no key: answered, neither refused nor counted
        preflight = requests.options(server.url + "/v1/jobs", timeout=30,
                                     headers={"Origin": "https://app.example",
                                              "Access-Control-Request-Method": "POST"})
        assert preflight.status_code == 204, preflight.text
        assert "POST" in preflight.headers["Allow"]
    finally:
        server.close()


def test_one_key_cannot_hold_every_producer_thread(settings, redis_client, demo_models,
                                                  tmp_path):
    """Event streams and synchronous calls hold a producer thread while their job waits: past
    BANTER_MAX_WAITS_PER_KEY (2 here) a key gets 429 too_many_waits, other keys are served,
    and a stream that ends gives its slot back."""
    suffix = uuid.uuid4().hex[:8]
    app = create_app(keyed_settings(
        settings, tmp_path, queue_interactive=f"idle-{suffix}", queue_bulk=f"idle-b-{suffix}",
        max_waits_per_key=2), redis_client)
    waits, key_id = app.extensions["banter"].waits, hashlib.sha256(ALICE.encode()).hexdigest()[:16]
    server = Server(app)
    alice, bob = Client(server.url, ALICE), Client(server.url, BOB)
    jobs = {who: who.post("/v1/jobs", {"kind": "embed", "input": "x"}).json()["id"]
            for who in (alice, bob)}

    def stream(who):  # its first event is the job's done, once the job is cancelled
        response = who.get(f"/v1/jobs/{jobs[who]}/events")
        assert response.status_code != 200 or "event: done" in response.text
        return response.status_code

    try:
        with ThreadPoolExecutor(3) as pool:
            held = [pool.submit(stream, alice) for _ in range(2)] + [pool.submit(stream, bob)]
            deadline = time.monotonic() + 10
            while waits.held(key_id) < 2:  # both of alice's streams are being served
                assert time.monotonic() < deadline
                time.sleep(0.02)
            refused = alice.get(f"/v1/jobs/{jobs[alice]}/events")
            error = assert_error(refused, 429, "too_many_waits")
            assert error["code"] == "rate_limit_exceeded" and refused.headers["Retry-After"] == "1"
            assert "BANTER_MAX_WAITS_PER_KEY" in error["message"]
            assert requests.get(server.url + "/healthz", timeout=30).status_code == 200
            for who in (alice, bob):
                assert who.delete(f"/v1/jobs/{jobs[who]}").status_code == 200
            assert [f.result(timeout=30) for f in held] == [200, 200, 200]
        replay = alice.get(f"/v1/jobs/{jobs[alice]}/events")  # the two slots came back
        assert replay.status_code == 200 and "event: done" in replay.text
        deadline = time.monotonic() + 10
        while waits.held(key_id):  # the replay's own slot, given back once it is closed
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        server.close()


def test_a_full_queue_is_429_with_retry_after(settings, redis_client, demo_models):
    suffix = uuid.uuid4().hex[:8]
    server = Server(create_app(replace(settings, max_queue_depth=2,
                                       queue_interactive=f"full-{suffix}",
                                       queue_bulk=f"full-bulk-{suffix}"), redis_client))
    # a worker's heartbeat, so the waited calls below reach the queue check (with no live
    # worker they are refused before it: backend_unavailable)
    beat = f"queue-test-{suffix}"
    redis_client.zadd(keys.workers_for("onnx"), {beat: time.time() + 600})
    try:
        client = Client(server.url, None)
        first = client.post("/v1/jobs", {"kind": "embed", "input": "x", "idempotency_key": suffix})
        assert first.status_code == 202
        assert client.post("/v1/jobs", {"kind": "embed", "input": "x"}).status_code == 202
        # a retry of an accepted job gets it back, full lane or not
        retry = client.post("/v1/jobs", {"kind": "embed", "input": "x", "idempotency_key": suffix})
        assert retry.status_code == 200 and retry.json()["id"] == first.json()["id"]
        for path, body in (("/v1/jobs", {"kind": "embed", "input": "x"}),
                           ("/v1/inference", {"prompt": "x"}),
                           ("/v1/embeddings", {"input": "x"})):
            full = client.post(path, body)
            assert_error(full, 429, "queue_full")
            assert int(full.headers["Retry-After"]) >= 1
            assert "at its limit of 2 jobs (BANTER_MAX_QUEUE_DEPTH)" in full.json()["error"]["message"]
        line = {"custom_id": "a", "method": "POST", "url": "/v1/embeddings",
                "body": {"input": "x"}}
        assert client.post("/v1/jobs", {"kind": "embed", "input": "x",
                                        "lane": "bulk"}).status_code == 202
        assert_error(client.post("/v1/batches", {"requests": [line, {**line, "custom_id": "b"}]}),
                     429, "queue_full")
        # more lines than the queue ever holds: no wait would help
        never = client.post("/v1/batches", {"requests": [{**line, "custom_id": c} for c in "xyz"]})
        assert_error(never, 413, "too_large")
        assert "cannot fit the bulk queue's limit of 2" in never.json()["error"]["message"]
    finally:
        redis_client.zrem(keys.workers_for("onnx"), beat)
        server.close()


# ----------------------------------------------------------------------------- redis password
@pytest.fixture
def password_redis(tmp_path):
    """A private redis-server that requires a password (as ``banter up``'s does)."""
    server = RedisServer(tmp_path / "redis", persist=False, password=f"pw-{uuid.uuid4().hex}")
    url = server.start()
    try:
        yield url
    finally:
        server.stop()


def test_the_password_is_in_no_command_line_and_no_printed_url(password_redis, tmp_path):
    parsed = redis.connection.parse_url(password_redis)
    password = parsed["password"]
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=parsed["port"]).ping()
    commands = [Path(f"/proc/{pid}/cmdline").read_bytes() for pid in os.listdir("/proc")
                if pid.isdigit() and Path(f"/proc/{pid}/cmdline").exists()]
    assert not any(password.encode() in command for command in commands)
    assert (tmp_path / "redis" / "redis.conf").stat().st_mode & 0o777 == 0o600
    assert shown_url(password_redis) == password_redis.replace(password, "***")
    assert shown_url("rediss://user:s%40cret@cache:6380/2") == "rediss://user:***@cache:6380/2"
    assert shown_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


def test_a_password_protected_redis_serves_jobs_end_to_end(password_redis, settings,
                                                           demo_models, tmp_path):
    env = {"BANTER_REDIS_URL": password_redis, "BANTER_HOME": str(tmp_path / "home"),
           "BANTER_MODEL_ROOT": str(settings.model_root), "BANTER_WORKER_HEARTBEAT_S": "1",
           "BANTER_LOG_LEVEL": "WARNING", "BANTER_OPENAI_KEY": "", "BANTER_API_KEYS": ALICE}
    secured = Settings.from_env(env)
    client = connect(secured.redis_url)
    registry = Registry.from_settings(secured, client)
    registry.promote(name=DEMO_GPT, kind="generate", path=str(demo_models[DEMO_GPT] / "model.onnx"))
    server = Server(create_app(secured, client))  # first: a failing app leaves no worker behind
    worker = start_worker(env, "cpu-password@localhost", tmp_path / "worker.log", client)
    try:
        answer = Client(server.url, ALICE).post("/v1/inference", {"prompt": "x", "max_tokens": 2})
        assert answer.status_code == 200, answer.text
        assert answer.json()["text"] == " banterhearts streams"
        assert requests.get(server.url + "/readyz", timeout=30).status_code == 200
    finally:
        server.close()
        stop_process(worker)
    wrong = password_redis.replace(":pw-", ":nope-")
    server = Server(create_app(replace(secured, redis_url=wrong, broker_url=wrong)))
    try:
        refused = requests.get(server.url + "/readyz", timeout=30)
        assert_error(refused, 503, "unavailable")
        assert "Redis" in refused.json()["error"]["message"]
    finally:
        server.close()


# ----------------------------------------------------------------------------- start-up
def test_the_app_refuses_to_start_without_keys(settings, tmp_path):
    with pytest.raises(AuthNotConfigured, match="BANTER_AUTH_DISABLED=true"):
        create_app(replace(settings, auth_disabled=False))
    with pytest.raises(AuthNotConfigured, match="unset BANTER_AUTH_DISABLED"):
        KeyRing.from_settings(replace(settings, api_keys=ALICE))
    bad = tmp_path / "keys"
    short = "a" * 63  # a digest one hex digit short must not become a working key
    for text, needle in ((f"admn:{ALICE}\n", ":1: what comes before the first ':' is not a"),
                         (f"# c\nadmin:{ALICE}\nuser:\n", ":3: the key after 'user:' is empty"),
                         (f"admin:sha256:{short}\n", ":1: sha256:... must be followed by exactly 64"),
                         ("sha256:zz\n", ":1: sha256:... must be followed"),
                         (f"{ALICE} and more\n", ":1: a key cannot hold spaces")):
        bad.write_text(text)
        with pytest.raises(AuthNotConfigured, match=needle) as refused:
            KeyRing.from_settings(replace(settings, auth_disabled=False, keys_file=str(bad)))
        assert ALICE not in str(refused.value) and "admn" not in str(refused.value)
    with pytest.raises(AuthNotConfigured, match="cannot be read"):
        KeyRing.from_settings(replace(settings, auth_disabled=False,
                                      keys_file=str(tmp_path / "missing")))
    for field, variable in (("api_keys", "BANTER_API_KEYS"), ("admin_keys", "BANTER_ADMIN_KEYS")):
        with pytest.raises(AuthNotConfigured, match=f"{variable}: sha256:... must be followed"):
            KeyRing.from_settings(replace(settings, auth_disabled=False,
                                          **{field: f"{ALICE}, SHA256:{short}"}))
        for key in ("k\x01ey", "kéy", "bad key"):  # no client could send it: refused at start
            with pytest.raises(AuthNotConfigured,
                               match=f"{variable}: a key must be printable ASCII") as refused:
                KeyRing.from_settings(replace(settings, auth_disabled=False,
                                              **{field: f"{ALICE},{key}"}))
            assert key not in str(refused.value)
    bad.write_text(f"admin:{ALICE}\nuser:k\u00e9y\n")
    with pytest.raises(AuthNotConfigured, match=":2: a key must be printable ASCII"):
        KeyRing.from_settings(replace(settings, auth_disabled=False, keys_file=str(bad)))


def test_banter_producer_without_keys_exits_2_with_the_reason(stack_env):
    env = {k: v for k, v in os.environ.items() if not k.startswith("BANTER_")}
    env.update({k: v for k, v in stack_env.items() if k != "BANTER_AUTH_DISABLED"})
    done = subprocess.run([sys.executable, "-m", "banter.cli", "producer", "--port",
                           str(free_port())], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2, done.stderr
    assert "no API keys are configured" in done.stderr
    assert "BANTER_AUTH_DISABLED=true" in done.stderr
    env["BANTER_API_KEYS"] = "k\x01"  # a key no client could send: refused before it serves
    done = subprocess.run([sys.executable, "-m", "banter.cli", "producer", "--port",
                           str(free_port())], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2, done.stderr
    assert "BANTER_API_KEYS: a key must be printable ASCII" in done.stderr
    assert "Traceback" not in done.stderr


class FakeChild:
    """Stands in for the worker and producer processes ``banter up`` starts."""

    started: list[dict[str, str]] = []

    def __init__(self, args, env, **_options):
        FakeChild.started.append(env)

    def poll(self):
        return 0

    def wait(self, timeout=None):
        return 0


@pytest.mark.parametrize("keys,disabled", [({}, True), ({"BANTER_API_KEYS": ALICE}, False),
                                           ({"BANTER_KEYS_FILE": "keys.txt"}, False)])
def test_banter_up_turns_auth_off_only_without_keys(monkeypatch, capsys, stack_env, keys,
                                                    disabled, tmp_path):
    if "BANTER_KEYS_FILE" in keys:  # read before anything starts: it must be a real file
        (tmp_path / "keys.txt").write_text(f"admin:{ALICE}\n")
        keys = {"BANTER_KEYS_FILE": str(tmp_path / "keys.txt")}
    for name in ("BANTER_API_KEYS", "BANTER_ADMIN_KEYS", "BANTER_KEYS_FILE",
                 "BANTER_AUTH_DISABLED"):
        monkeypatch.delenv(name, raising=False)
    for name, value in {**stack_env, **keys}.items():
        if name != "BANTER_AUTH_DISABLED":
            monkeypatch.setenv(name, value)
    FakeChild.started = []
    monkeypatch.setattr(stack, "ensure_demo_models", lambda settings, registry: [])
    monkeypatch.setattr(stack.subprocess, "Popen", FakeChild)
    monkeypatch.setattr(stack, "wait_ready", lambda url, children: (_ for _ in ()).throw(
        KeyboardInterrupt))
    previous = signal.getsignal(signal.SIGTERM)
    try:
        assert stack.up(Settings.from_env(), "127.0.0.1", free_port(), False, False) == 0
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert len(FakeChild.started) == 2
    for env in FakeChild.started:
        assert (env.get("BANTER_AUTH_DISABLED") == "true") is disabled
    assert ("authentication is OFF" in capsys.readouterr().err) is disabled


# ----------------------------------------------------------------------------- slow clients
def port_listens(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def start_producer(env: dict[str, str], port: int, log: Path) -> subprocess.Popen:
    """``banter producer`` (gunicorn, one process of two threads) on ``port``, once it listens."""
    with open(log, "w") as stderr:
        producer = subprocess.Popen([sys.executable, "-m", "banter.cli", "producer", "--port",
                                     str(port), "--workers", "1", "--threads", "2"],
                                    env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                                    stderr=stderr)
    deadline = time.monotonic() + 60
    while not port_listens(port):
        if time.monotonic() > deadline or producer.poll() is not None:
            stop_process(producer)
            raise AssertionError(f"no producer: {log.read_text()}")
        time.sleep(0.1)
    return producer


def raw_exchange(port: int, request: bytes) -> str:
    """Send ``request`` as it is, close the sending side, and read the whole answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer.decode()


def test_a_body_that_cannot_be_read_whole_is_a_4xx_and_no_job(stack_env, redis_client,
                                                              tmp_path):
    """Through gunicorn: a malformed chunk is 400, a body cut short of its Content-Length 408
    (as one that stops arriving), and a path with '//' a JSON 404, not a redirect built from
    the Host header. None of them queues a job or logs a traceback."""
    port = free_port()
    producer = start_producer(stack_env, port, tmp_path / "producer.err")
    head = (b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\n")
    body = b'{"kind":"generate","input":"cut short"}'
    jobs_before = set(redis_client.keys(keys.job("*")))
    try:
        bad_chunk = raw_exchange(port, head + b"Transfer-Encoding: chunked\r\n\r\nZZ\r\n{}\r\n"
                                       b"0\r\n\r\n")
        unterminated = raw_exchange(port, head + b"Transfer-Encoding: chunked\r\n\r\n"
                                          b"2\r\n{}XX0\r\n\r\n")
        cut = raw_exchange(port, head + b"Content-Length: 500\r\n\r\n" + body)
        doubled = [requests.get(f"http://127.0.0.1:{port}{path}", timeout=30,
                                headers={"Host": "elsewhere.example"}, allow_redirects=False)
                   for path in ("/v1//models", "//v1/models", "//healthz")]
        leading = raw_exchange(port, b"POST //v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: "
                                     b"application/json\r\nConnection: close\r\n"
                                     b"Content-Length: %d\r\n\r\n" % len(body) + body)
    finally:
        stop_process(producer)
    for answer in (bad_chunk, unterminated):
        assert answer.startswith("HTTP/1.1 400 "), answer
        assert '"type":"bad_request"' in answer and "chunked" in answer, answer
    assert cut.startswith("HTTP/1.1 408 ") and '"type":"request_timeout"' in cut, cut
    for answer in doubled:
        assert answer.status_code == 404 and "Location" not in answer.headers, answer.url
        assert answer.json()["error"]["type"] == "not_found"
    assert leading.startswith("HTTP/1.1 404 ") and '"type":"not_found"' in leading, leading
    assert not set(redis_client.keys(keys.job("*"))) - jobs_before
    assert "Traceback" not in (tmp_path / "producer.err").read_text()


def test_clients_that_stop_sending_their_body_do_not_hold_the_producer(stack_env, tmp_path):
    """More stalled requests than the producer has threads (a slowloris): a stalled body is
    answered 408 once it has been silent for BANTER_CLIENT_TIMEOUT_S, unfinished headers are
    closed, each logged as one warning line, and other callers get through."""
    port = free_port()
    producer = start_producer({**stack_env, "BANTER_CLIENT_TIMEOUT_S": "1"}, port,
                              tmp_path / "producer.err")
    stalled: list[socket.socket] = []
    headers_only: list[socket.socket] = []
    try:
        for _ in range(4):  # twice the threads
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                         b"\r\nContent-Length: 100\r\n\r\n{\"kind\"")
            stalled.append(sock)
        for _ in range(4):  # and as many that never finish their headers
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(b"POST /v1/inference HTTP/1.1\r\nHost: x\r\nContent-Ty")
            headers_only.append(sock)
        # when the threads are all taken by stalled requests, expect a caller to get through
        assert requests.get(f"http://127.0.0.1:{port}/healthz", timeout=30).status_code == 200
        for sock in stalled:
            sock.settimeout(30)
            answer = sock.recv(65536).decode()
            assert answer.startswith("HTTP/1.1 408 "), answer
            assert '"type":"request_timeout"' in answer, answer
        for sock in headers_only:  # nothing to answer yet: the connection is closed
            sock.settimeout(30)
            assert sock.recv(65536) == b""
    finally:
        for sock in stalled + headers_only:
            sock.close()
        producer.send_signal(signal.SIGTERM)
        producer.wait(timeout=30)
    log = (tmp_path / "producer.err").read_text()
    assert "Traceback" not in log
    timeouts = [line for line in log.splitlines() if '"event": "client_timeout"' in line]
    assert sum('"stage": "body"' in line for line in timeouts) == len(stalled), log
    assert len(timeouts) > len(stalled), log  # the unfinished headers' too
