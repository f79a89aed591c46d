"""``banter flower`` as a real process on the test stack's broker: it refuses to start without a
choice of authentication, and its HTTP API shows a finished job (state, worker, runtime, the job
id as the only argument)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

import requests

from banter.redisserver import RedisServer, free_port
from tests.conftest import WORKER_NODE, stop_process

CLI = [sys.executable, "-m", "banter.cli"]
AUTH = ("ops", "s3cret-" + uuid.uuid4().hex[:8])


def test_flower_refuses_to_start_without_an_auth_choice(stack_env):
    env = {k: v for k, v in os.environ.items() if k != "BANTER_FLOWER_BASIC_AUTH"}
    result = subprocess.run([*CLI, "flower", "--port", str(free_port())],
                            env={**env, **stack_env}, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "refusing to start Flower without a choice of authentication" in result.stderr
    assert "--basic-auth" in result.stderr and "--unauthenticated" in result.stderr

    bad = subprocess.run([*CLI, "flower", "--basic-auth", "no-password"],
                         env={**env, **stack_env}, capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "basic auth must be user:password" in bad.stderr
    both = subprocess.run([*CLI, "flower", "--basic-auth", "a:b", "--unauthenticated"],
                          env={**env, **stack_env}, capture_output=True, text=True, timeout=30)
    assert both.returncode == 2 and "not allowed with argument" in both.stderr


def wait_for_flower(url: str, process: subprocess.Popen, log) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()[-3000:]
        try:
            if requests.get(f"{url}/healthcheck", timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"flower did not start: {log.read_text()[-3000:]}")


def test_flower_shows_a_finished_job(api, settings, stack_env, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "flower.log"
    env = {**os.environ, **stack_env, "BANTER_FLOWER_BASIC_AUTH": f"{AUTH[0]}:{AUTH[1]}"}
    with open(log, "wb") as out:
        process = subprocess.Popen([*CLI, "flower", "--port", str(port)], env=env, stdout=out,
                                   stderr=subprocess.STDOUT)
    try:
        wait_for_flower(url, process, log)
        assert requests.get(f"{url}/api/tasks", timeout=10).status_code == 401

        # Flower sees only events sent after it connected: run jobs until it has seen the
        # whole life of one (sent by the producer, received, started, succeeded by the worker)
        secret = f"private prompt {uuid.uuid4().hex}"
        deadline = time.monotonic() + 30
        info = None
        while info is None and time.monotonic() < deadline:
            job = api.post("/v1/jobs", {"kind": "generate", "input": secret,
                                        "params": {"max_tokens": 2}}).json()
            finished = api.wait_job(job["id"])
            assert finished["status"] == "succeeded"
            shown = time.monotonic() + 3
            while time.monotonic() < shown:
                answer = requests.get(f"{url}/api/task/info/{job['id']}", auth=AUTH, timeout=10)
                seen = answer.json() if answer.status_code == 200 else {}
                if seen.get("state") == "SUCCESS" and seen["sent"] and seen["received"]:
                    info = seen
                    break
                time.sleep(0.1)
        assert info is not None, log.read_text()[-3000:]
        # its worker page: the worker's stats and registered tasks come back (as JSON: the
        # worker's transport options hold the lane gate's callable, named there)
        workers = requests.get(f"{url}/api/workers", params={"refresh": 1}, auth=AUTH,
                               timeout=30).json()
        node = workers[WORKER_NODE]
        assert node["stats"]["pool"]["max-concurrency"] >= 1, sorted(node)
        assert node["registered"] == ["banter.run_job"]
    finally:
        stop_process(process)

    assert info["uuid"] == job["id"] and info["name"] == "banter.run_job"
    assert info["worker"] == WORKER_NODE == finished["worker"]
    assert info["routing_key"] == settings.queue_interactive
    assert info["runtime"] > 0 and info["succeeded"] >= info["started"]
    assert info["args"] == repr([job["id"]]) and info["kwargs"] == "{}"
    assert secret not in json.dumps(info)


def test_flower_stops_on_sigterm_while_its_broker_is_gone(tmp_path):
    """Flower's threads retry a broker that went away for as long as it stays away; SIGTERM
    still stops it at once, with exit 0, as every banter server stops."""
    redis_server = RedisServer(tmp_path / "redis", persist=False)
    url = f"http://127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BANTER_")}
    env.update({"BANTER_REDIS_URL": redis_server.start(), "BANTER_HOME": str(tmp_path / "home"),
                "BANTER_AUTH_DISABLED": "true"})
    log = tmp_path / "flower.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([*CLI, "flower", "--port", url.rsplit(":", 1)[1],
                                    "--unauthenticated"], env=env, stdout=out,
                                   stderr=subprocess.STDOUT)
    try:
        wait_for_flower(url, process, log)
        redis_server.stop()
        try:  # a broker call: Flower's inspect retries it for as long as the broker is gone
            requests.get(f"{url}/api/workers", params={"refresh": 1}, timeout=3)
        except requests.exceptions.ReadTimeout:
            pass
        time.sleep(2)  # its event thread is retrying too
        process.terminate()
        assert process.wait(timeout=15) == 0, log.read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
