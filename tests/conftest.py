"""Shared fixtures: a private redis-server, the demo models promoted, a real worker process
started by the CLI, and the producer served over real HTTP."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path

import pytest
import requests
from werkzeug.serving import make_server

from banter import keys
from banter.demo import DEMO_EMBED, DEMO_GPT, build_demo
from banter.redisconn import connect
from banter.redisserver import RedisServer
from banter.settings import Settings
from producer.app import create_app
from registry.service import Registry

WORKER_NODE = "cpu-test@localhost"


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"), persist=False)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def stack_env(redis_server, tmp_path_factory) -> dict[str, str]:
    """Environment shared by the test process's settings and every child process."""
    home = tmp_path_factory.mktemp("home")
    return {"BANTER_REDIS_URL": redis_server.url, "BANTER_HOME": str(home),
            "BANTER_BATCH_WINDOW_MS": "20", "BANTER_WORKER_HEARTBEAT_S": "1",
            "BANTER_MAX_TOKENS_LIMIT": "1000", "BANTER_LOG_LEVEL": "WARNING",
            "BANTER_OPENAI_KEY": "",  # never reach a real upstream from a developer's key
            "BANTER_AUTH_DISABLED": "true"}


@pytest.fixture(scope="session")
def settings(stack_env) -> Settings:
    return Settings.from_env(stack_env)


@pytest.fixture(scope="session")
def redis_client(settings):
    return connect(settings.redis_url)


@pytest.fixture(scope="session")
def demo_models(settings, redis_client) -> dict[str, Path]:
    dirs = build_demo(settings.model_root)
    registry = Registry.from_settings(settings, redis_client)
    registry.promote(name=DEMO_GPT, kind="generate", path=str(dirs[DEMO_GPT] / "model.onnx"))
    registry.promote(name=DEMO_EMBED, kind="embed", path=str(dirs[DEMO_EMBED] / "model.onnx"))
    return dirs


def start_worker(env: dict[str, str], node: str, log_path: Path,
                 redis_client) -> subprocess.Popen:
    """``banter worker --cpu`` as a child process; returns once its heartbeat is in Redis."""
    log = open(log_path, "ab")
    process = subprocess.Popen([sys.executable, "-m", "banter.cli", "worker", "--cpu",
                                "--name", node], env={**os.environ, **env},
                               stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"worker exited: {log_path.read_text()[-3000:]}")
        if redis_client.zscore(keys.WORKERS, node) is not None:
            return process
        time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"worker did not start: {log_path.read_text()[-3000:]}")


def stop_process(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="session")
def worker(stack_env, demo_models, redis_client, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("logs") / "worker.log"
    process = start_worker(stack_env, WORKER_NODE, log_path, redis_client)
    yield process
    stop_process(process)


class Server:
    def __init__(self, app):
        self.httpd = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()


@contextlib.contextmanager
def unserved_producer(settings: Settings, redis_client, **changes):
    """A producer, as ``(server, its interactive queue)``, on queues no worker consumes, with a
    worker heartbeat so that it takes jobs: they stay queued, and a synchronous call times out
    (``sync_timeout_s`` in ``changes``)."""
    queue = f"unserved-{uuid.uuid4().hex[:8]}"
    server = Server(create_app(replace(settings, queue_interactive=queue,
                                       queue_bulk=f"{queue}-bulk", **changes), redis_client))
    redis_client.zadd(keys.workers_for("onnx"), {queue: time.time() + 600})
    try:
        yield server, queue
    finally:
        redis_client.zrem(keys.workers_for("onnx"), queue)
        redis_client.delete(queue)
        server.close()


@pytest.fixture(scope="session")
def producer(settings, redis_client, demo_models):
    server = Server(create_app(settings, redis_client))
    yield server
    server.close()


@pytest.fixture(scope="session")
def api(producer, worker) -> "Api":
    return Api(producer.url)


class Api:
    """requests against the running producer, raising nothing on 4xx (tests check status)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.session = requests.Session()

    def post(self, path: str, body=None, **kwargs) -> requests.Response:
        return self.session.post(self.url + path, json=body, timeout=60, **kwargs)

    def get(self, path: str, **kwargs) -> requests.Response:
        return self.session.get(self.url + path, timeout=60, **kwargs)

    def delete(self, path: str, **kwargs) -> requests.Response:
        return self.session.delete(self.url + path, timeout=60, **kwargs)

    def wait_job(self, job_id: str, timeout_s: float = 60) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            body = self.get(f"/v1/jobs/{job_id}").json()
            if body["status"] not in ("queued", "running"):
                return body
            time.sleep(0.05)
        raise AssertionError(f"job {job_id} did not finish: {body}")
