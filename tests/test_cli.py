"""The ``banter`` command line as real processes: client commands against the running producer,
``banter models``, and ``banter up`` starting (and stopping) the whole stack on its own."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import redis
import requests

from banter.demo import DEMO_EMBED, DEMO_GPT, DEMO_TEXT
from banter.redisserver import free_port
from banter.settings import Settings
from tests.conftest import Api, unserved_producer

CLI = [sys.executable, "-m", "banter.cli"]


def banter(*args: str, env: dict[str, str] | None = None,
           timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout,
                          env=env if env is not None else dict(os.environ))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def port_is_closed(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) != 0


def processes_with_home(home: Path) -> list[str]:
    """Every live process ``banter up`` with ``BANTER_HOME=home`` started: the worker, the
    producer and its gunicorn workers inherit that variable; redis-server rewrites its
    environment block (proc title), so it is found by its working directory, ``home/redis``."""
    marker = f"BANTER_HOME={home}".encode()
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            continue
        if marker in environ.split(b"\0") or cwd == str(home / "redis"):
            found.append(f"{pid}: {cmdline.decode(errors='replace').strip()}")
    return found


def kill_leftovers(home: Path) -> None:
    """Clean up after a failed test: SIGKILL what ``processes_with_home`` finds, by pid."""
    for entry in processes_with_home(home):
        try:
            os.kill(int(entry.split(":")[0]), signal.SIGKILL)
        except ProcessLookupError:
            pass


def fresh_up_env(home: Path) -> dict[str, str]:
    """The test's environment without any BANTER_* variable (so ``up`` starts its own Redis),
    and a private BANTER_HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BANTER_")}
    env["BANTER_HOME"] = str(home)
    return env


def wait_for_text(path: Path, text: str, process: subprocess.Popen, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        content = path.read_text()
        if text in content:
            return content
        if process.poll() is not None:
            break
        time.sleep(0.2)
    raise AssertionError(f"{text!r} never appeared (exit {process.poll()}):\n{path.read_text()}")


# ----------------------------------------------------------------------------- usage
def test_worker_needs_a_device():
    result = banter("worker")
    assert result.returncode == 2
    assert "usage: banter worker" in result.stderr
    assert "one of the arguments --gpu --cpu --openai is required" in result.stderr


@pytest.mark.parametrize("flags, needle", [
    (["--gpu", "-1"], "argument --gpu: must be a GPU index, 0 or more, got -1"),
    (["--cpu", "--name", "bad name,x"], "argument --name: 'bad name,x': use letters, digits"),
])
def test_worker_refuses_a_negative_gpu_or_a_node_name_celery_cannot_list(flags, needle):
    result = banter("worker", *flags)
    assert result.returncode == 2 and needle in result.stderr, result.stderr


def test_models_promote_rejects_an_unknown_kind_as_usage():
    result = banter("models", "promote", "m", "m/model.onnx", "--kind", "train")
    assert result.returncode == 2 and "invalid choice: 'train'" in result.stderr


@pytest.mark.parametrize("command", [["worker", "--cpu"], ["producer", "--port", "8"]])
@pytest.mark.parametrize("variable, value, needle", [
    ("BANTER_LOG_LEVEL", "LOUD", "BANTER_LOG_LEVEL='LOUD': expected one of DEBUG, INFO"),
    ("BANTER_MAX_RUNNING", "0", "BANTER_MAX_RUNNING"),
    ("BANTER_LEASE_TTL_S", "2", "BANTER_LEASE_TTL_S=2: must be at least twice"),
    ("BANTER_WORKER_HEARTBEAT_S", "0", "BANTER_WORKER_HEARTBEAT_S='0': must be more than 0 and"),
    ("BANTER_SYNC_TIMEOUT_S", "-1", "BANTER_SYNC_TIMEOUT_S='-1': must be more than 0 and at most"),
    ("BANTER_BATCH_WINDOW_MS", "-1", "BANTER_BATCH_WINDOW_MS='-1': must be a number from 0 to"),
    ("BANTER_DEFAULT_MAX_TOKENS", "5000", "must not be over BANTER_MAX_TOKENS_LIMIT"),
    ("BANTER_DEFAULT_GENERATE_MODEL", " ", "BANTER_DEFAULT_GENERATE_MODEL: invalid model name"),
    ("BANTER_DEFAULT_GENERATE_MODEL", "bad@name", "the version after '@' must be a positive"),
    ("BANTER_DEFAULT_EMBED_MODEL", "has space", "BANTER_DEFAULT_EMBED_MODEL: invalid model name"),
    ("BANTER_QUEUE_INTERACTIVE", "", "a queue name must be non-empty"),
    ("BANTER_QUEUE_BULK", "bulk,interactive", "without spaces or commas"),
    ("BANTER_QUEUE_BULK", "interactive", "each lane needs queues of its own"),
    ("BANTER_QUEUE_BULK", "interactive.openai", "each lane needs queues of its own"),
    ("BANTER_OPENAI_BASE_URL", "notaurl", "expected an http:// or https:// URL"),
    ("BANTER_OPENAI_BASE_URL", " http://x/v1", "expected an http:// or https:// URL"),
    ("BANTER_OPENAI_BASE_URL", "http://x:port/v1", "expected an http:// or https:// URL"),
    # past what Redis or the OS takes: refused at start, not failing every request later
    ("BANTER_CLIENT_TIMEOUT_S", "1e10", "must be more than 0 and at most 1e+08"),
    ("BANTER_BULK_YIELD_MS", "1e10", "must be a number from 0 to 1e+08"),
    ("BANTER_JOB_TTL_S", "99999999999999999999", "must be at most 2147483647"),
    ("BANTER_MAX_RUNNING", "100000000", "must be at most 4096"),
    ("BANTER_WORKER_CONCURRENCY", "99999999", "must be at most 4096 (each is a thread"),
    ("BANTER_BULK_CONCURRENCY", "64", "must be under BANTER_WORKER_CONCURRENCY (64"),
    ("BANTER_STREAM_MAXLEN", "5", "must be over BANTER_MAX_TOKENS_LIMIT + 1"),
    # what Python's int() and float() take but a setting is not: digit separators, other
    # scripts' digits, infinity
    ("BANTER_MAX_RUNNING", "1_0", "BANTER_MAX_RUNNING='1_0': expected an integer"),
    ("BANTER_JOB_TTL_S", "\u0663\u0660\u0660", "BANTER_JOB_TTL_S='\u0663\u0660\u0660': expected an integer"),
    ("BANTER_SYNC_TIMEOUT_S", "1_0", "BANTER_SYNC_TIMEOUT_S='1_0': expected a number"),
    ("BANTER_BULK_YIELD_MS", "Infinity", "BANTER_BULK_YIELD_MS='Infinity': expected a number"),
    # a Redis URL's options are the client's keyword arguments: refused at start, not by
    # a traceback at the first connection
    ("BANTER_REDIS_URL", "redis://127.0.0.1:1/0?socket_timeout=abc",
     "has an option Redis clients cannot take: Invalid value for 'socket_timeout'"),
    ("BANTER_REDIS_URL", "redis://:pw@127.0.0.1:1/0?colour=blue",
     "BANTER_REDIS_URL='redis://:***@127.0.0.1:1/0?colour=blue' has an option Redis clients "
     "cannot take"),
    ("BANTER_REDIS_URL", "rediss://127.0.0.1:1/0?ssl_cert_reqs=CERT_NONE",
     "has an option Redis clients cannot take: Invalid SSL Certificate Requirements Flag"),
    ("BANTER_HOME", "~no-such-user-here/x", "BANTER_HOME='~no-such-user-here/x' cannot be used"),
    # kombu takes no unix:// URL: refused at start (submits were a 500)
    ("BANTER_BROKER_URL", "unix:///tmp/redis.sock", "redis://, rediss:// (Redis; not unix://)"),
    ("BANTER_REDIS_URL", "unix:///tmp/redis.sock", "set BANTER_BROKER_URL to the same Redis over"),
    ("BANTER_BROKER_URL", "amqps://h//?ssl_foo=1", "unknown TLS option 'ssl_foo': amqps:// takes"),
    ("BANTER_BROKER_URL", "amqp://h//?ssl_ca_certs=/ca.pem", "TLS options are for an amqps://"),
    ("BANTER_BROKER_URL", "amqps://h//?ssl_cert_reqs=maybe", "ssl_cert_reqs must be required,"),
])
def test_a_bad_setting_exits_2_with_the_reason(command, variable, value, needle, tmp_path):
    env = {**fresh_up_env(tmp_path / "home"), "BANTER_AUTH_DISABLED": "true", variable: value}
    result = banter(*command, env=env)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("banter: invalid_setting: ") and needle in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", [["up", "--exit-after-sample"], ["worker", "--cpu"],
                                     ["producer", "--port", "8"]])
@pytest.mark.parametrize("variable, under", [("BANTER_REGISTRY_PATH", "h.jsonl"),
                                             ("BANTER_MODEL_ROOT", "models"),
                                             ("BANTER_HOME", "home")])
def test_a_path_setting_under_a_file_exits_2_naming_it(command, variable, under, tmp_path):
    """A path whose directory is a file cannot be made: a bad setting (exit 2, named), not an
    unreachable server (exit 3) or a bare errno."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    env = {**fresh_up_env(tmp_path / "home"), "BANTER_AUTH_DISABLED": "true",
           variable: str(blocker / under)}
    result = banter(*command, env=env)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"banter: invalid_setting: {variable}: ")
    assert f"{blocker} is a file, not a directory" in result.stderr
    assert "Traceback" not in result.stderr and "Errno" not in result.stderr


def test_worker_concurrency_flag_is_the_setting_the_bulk_share_is_checked_against(tmp_path):
    env = {**fresh_up_env(tmp_path / "home"), "BANTER_BULK_CONCURRENCY": "4"}
    result = banter("worker", "--cpu", "--concurrency", "2", env=env)
    assert result.returncode == 2, result.stderr
    assert "must be under BANTER_WORKER_CONCURRENCY (2, or --concurrency)" in result.stderr
    result = banter("worker", "--cpu", "--concurrency", "99999999999", env=env)
    assert result.returncode == 2, result.stderr
    assert "(or --concurrency): must be at most 4096" in result.stderr


@pytest.mark.parametrize("variable", ["BANTER_HOME", "BANTER_MODEL_ROOT", "BANTER_REGISTRY_PATH"])
def test_a_path_setting_in_a_symlink_loop_exits_2_naming_it(variable, tmp_path):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    env = {**fresh_up_env(tmp_path / "home"), variable: str(tmp_path / "loop" / "x")}
    result = banter("submit", "hi", "--url", "http://127.0.0.1:1", env=env)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"banter: invalid_setting: {variable}=")
    assert "Symlink loop" in result.stderr and "Traceback" not in result.stderr


def test_a_model_root_of_dot_is_the_working_directory(tmp_path, monkeypatch):
    """``.`` is a directory like any other, not the unset default (BANTER_HOME/models)."""
    monkeypatch.chdir(tmp_path)
    settings = Settings.from_env({"BANTER_HOME": "h", "BANTER_MODEL_ROOT": ".",
                                  "BANTER_REGISTRY_PATH": "./r.jsonl"})
    assert settings.model_root == tmp_path.resolve()
    assert settings.registry_path == tmp_path.resolve() / "r.jsonl"
    assert Settings.from_env({"BANTER_HOME": "h"}).model_root == tmp_path.resolve() / "h" / "models"


def test_a_home_that_is_a_file_is_a_usage_error(tmp_path):
    home = tmp_path / "home"
    home.write_text("not a directory")
    for command in (["producer"], ["worker", "--cpu"], ["up"]):
        result = banter(*command, env={**fresh_up_env(home), "BANTER_AUTH_DISABLED": "true"})
        assert result.returncode == 2, result.stderr
        assert "exists and is not a directory" in result.stderr
        assert "Traceback" not in result.stderr


@pytest.mark.parametrize("flags, needle", [
    (["--url", "http://127.0.0.1:99999"], "argument --url: 'http://127.0.0.1:99999' has no valid "
                                          "port"),
    (["--url", "http://127.0.0.1:0"], "argument --url: 'http://127.0.0.1:0' has no valid port"),
    (["--api-key", "\u20ac"], "argument --api-key: the API key (--api-key or BANTER_API_KEY) "
                             "must be printable ASCII"),
    (["--api-key", "a\nb"], "must be printable ASCII without spaces"),
])
def test_a_client_url_or_key_that_cannot_be_sent_is_a_usage_error(flags, needle):
    for command in (["submit", "hi"], ["stream", "abc"], ["models", "list"]):
        result = banter(*command, *flags)
        assert result.returncode == 2, result.stderr
        assert needle in result.stderr and "Traceback" not in result.stderr
    env = {**os.environ, "BANTER_API_KEY": "\u20ac"}
    result = banter("submit", "hi", env=env)
    assert result.returncode == 2 and "BANTER_API_KEY" in result.stderr, result.stderr


@pytest.mark.parametrize("variable, value, needle", [
    ("BANTER_URL", "foo", "'foo' is not an http:// or https:// URL with a host"),
    ("BANTER_URL", "http://u:secret@127.0.0.1:1", "the URL holds a user or password"),
    ("BANTER_API_KEY", "k\n", "the API key (--api-key or BANTER_API_KEY) must be printable"),
    ("BANTER_API_KEY", "a b", "must be printable ASCII without spaces"),
])
def test_a_client_setting_that_cannot_be_sent_is_a_usage_error_for_every_command(variable, value,
                                                                                  needle):
    """``banter models`` takes its client flags without defaults: BANTER_URL and
    BANTER_API_KEY are checked there as ``submit`` checks them, never sent as they are."""
    env = {**os.environ, "BANTER_URL": "http://127.0.0.1:1", variable: value}
    for command in (["submit", "hi"], ["models", "list"], ["models", "history"]):
        result = banter(*command, env=env)
        assert result.returncode == 2, (command, result.stderr)
        assert needle in result.stderr and "secret" not in result.stderr, result.stderr


def test_a_url_with_credentials_is_refused_without_printing_them():
    result = banter("submit", "--url", "http://user:secret@127.0.0.1:1", "hi")
    assert result.returncode == 2 and "secret" not in result.stderr, result.stderr
    assert "give the API key with --api-key (or BANTER_API_KEY), not in the URL" in result.stderr


def test_a_reader_that_leaves_ends_the_command_quietly(tmp_path):
    """stdout closed before the command writes (``banter ... | true``): exit 141, as a process
    killed by SIGPIPE, with nothing on stderr (it was exit 2, "Broken pipe")."""
    process = subprocess.Popen([*CLI, "models", "build-demo", "--root", str(tmp_path / "m")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()
    assert process.wait(timeout=120) == 141
    assert process.stderr.read() == b""


@pytest.mark.parametrize("status, code", [(503, 3), (429, 3), (409, 1), (400, 1)])
def test_an_error_type_this_client_does_not_know_exits_by_its_http_status(status, code):
    """A newer server's error type: the exit code follows the status it came with (a 503 is
    exit 3, to retry), not the 500 an unknown type would otherwise be."""
    import http.server
    import threading

    class Newer(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            answer = json.dumps({"error": {"type": "brand_new_error", "message": "new"}}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Newer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        result = banter("submit", "hi", "--url", f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
    assert result.returncode == code, result.stderr
    assert "brand_new_error: new" in result.stderr


@pytest.mark.parametrize("status, body", [
    (200, b"<html>hello</html>"),  # another server's page
    (200, b"{}"),  # JSON of another shape
    (200, b"[1, 2]"),
    (404, b"<html>File not found</html>"),  # an error with no banterhearts error body
    (501, b'{"message": "Unsupported method"}'),
])
def test_a_url_that_is_not_a_producer_is_exit_3_naming_it(status, body):
    """A --url answering what a banterhearts producer does not (a proxy, another server), or
    an event stream whose data is not JSON: exit 3 naming the URL, never a traceback."""
    import http.server
    import threading

    class NotBanter(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            events = self.path.endswith("/events")
            if events:  # the job record: a generate job, then a stream that is not ours
                answer, code = b"event: token\ndata: notjson\n\n", 200
            elif self.path.startswith("/v1/jobs/") and status == 200 and body == b"{}":
                answer, code = b'{"kind": "generate"}', 200
            else:
                answer, code = body, status
            self.send_response(code)
            self.send_header("Content-Type", "text/event-stream" if events else "text/html")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        do_POST = do_GET

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotBanter)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        for command in (["submit", "hi"], ["submit", "--embed", "hi"], ["models", "list"],
                        ["models", "history"], ["stream", "abc"],
                        ["models", "promote", "m", "m/model.onnx", "--kind", "embed"]):
            result = banter(*command, "--url", url)
            assert result.returncode == 3, (command, result.stderr)
            assert url in result.stderr and "not what a banterhearts producer answers" in \
                result.stderr, (command, result.stderr)
            assert "Traceback" not in result.stderr
    finally:
        server.shutdown()


@pytest.mark.parametrize("port", ["0", "99999", "http"])
def test_a_port_out_of_range_is_a_usage_error(port):
    result = banter("producer", "--port", port)
    assert result.returncode == 2 and "argument --port: " in result.stderr
    assert "Traceback" not in result.stderr


def test_models_promote_without_a_path_needs_the_openai_backend():
    result = banter("models", "promote", "m", "--kind", "generate")
    assert result.returncode == 2
    assert "PATH (the artifact under the model root) is required with --backend onnx" \
        in result.stderr
    result = banter("models", "promote", "m", "--kind", "generate", "--backend", "openai",
                    "--url", "http://127.0.0.1:1")
    assert result.returncode == 2
    assert "--model (the upstream model name) is required with --backend openai" in result.stderr


@pytest.mark.parametrize("flags, said", [
    (["--stream"], "--stream is for generation, not --embed"),
    (["--max-tokens", "3"], "--max-tokens is for generation, not --embed"),
    (["--stream", "--max-tokens", "3"], "--stream and --max-tokens are for generation"),
])
def test_submit_embed_refuses_generation_flags_naming_those_given(flags, said):
    result = banter("submit", "--embed", "x", *flags, "--url", "http://127.0.0.1:1")
    assert result.returncode == 2 and result.stdout == ""
    assert f"banter: {said}" in result.stderr


@pytest.mark.parametrize("job_id", ["", " ", "a/b", "../jobs"])
def test_stream_of_a_malformed_job_id_is_a_usage_error(job_id):
    """Nothing is asked of the server (its URL here has nothing behind it, which would be
    exit 3): the id is checked first."""
    result = banter("stream", job_id, "--url", f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 2, result.stderr
    assert f"{job_id!r} is not a job id: a job id is the UUID that POST /v1/jobs answers" \
        in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


@pytest.mark.parametrize("command", [["producer"], ["up"], ["flower", "--unauthenticated"]])
def test_a_port_already_in_use_is_a_usage_error(command, tmp_path):
    """Nothing starts (no Redis, no worker): the port is checked first, so ``banter up`` never
    mistakes another server on that port for its own."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = banter(*command, "--port", str(port),
                        env={**fresh_up_env(tmp_path / "home"), "BANTER_AUTH_DISABLED": "true"})
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert not (tmp_path / "home").exists()


@pytest.mark.parametrize("root", ["/proc/no-such-dir", "/etc/passwd"])
def test_an_unusable_path_is_a_usage_error_not_a_traceback(root):
    result = banter("models", "build-demo", "--root", root)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("banter: ") and "Traceback" not in result.stderr


@pytest.mark.parametrize("url", ["notaurl", "ftp://host", "http://"])
def test_a_malformed_server_url_is_a_usage_error(url):
    result = banter("submit", "--url", url, "hi")
    assert result.returncode == 2, result.stderr
    assert "is not an http:// or https:// URL with a host" in result.stderr


def test_the_producer_logs_only_json_lines_and_opens_no_control_socket(tmp_path, stack_env):
    """gunicorn's own lines (start-up, worker boots, signals) are JSON like every other log
    line; gunicorn 25.1+'s per-user control socket stays closed, so two producers on one
    host do not fight over it."""
    err = tmp_path / "producer.err"
    with open(err, "w") as stderr:
        process = subprocess.Popen([*CLI, "producer", "--port", str(free_port()), "--workers", "1"],
                                   env={**os.environ, **stack_env, "BANTER_LOG_LEVEL": "INFO"},
                                   stdout=subprocess.DEVNULL,
                                   stderr=stderr)
    try:
        wait_for_text(err, "Booting worker", process, timeout_s=60)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    lines = [line for line in err.read_text().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line is a JSON object
    assert any(r["logger"] == "gunicorn.error" and "Booting worker" in r["event"] for r in records)
    assert not any("Control socket" in r["event"] for r in records)


@pytest.mark.parametrize("host", ["::1", "[::1]"])
def test_the_producer_listens_on_an_ipv6_address(host, tmp_path, stack_env):
    """An IPv6 ``--host``, bare or in brackets, is bound as gunicorn takes it (``[::1]:PORT``);
    a port it already holds is refused naming the address as a URL writes it."""
    port = free_port()
    process = subprocess.Popen([*CLI, "producer", "--host", host, "--port", str(port),
                                "--workers", "1"], env={**os.environ, **stack_env},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                assert requests.get(f"http://[::1]:{port}/healthz", timeout=5).json() == \
                    {"status": "ok"}
                break
            except requests.ConnectionError:
                assert process.poll() is None and time.monotonic() < deadline, \
                    process.stderr.read()[-2000:]
                time.sleep(0.2)
        result = banter("producer", "--host", host, "--port", str(port),
                        env={**os.environ, **stack_env})
        assert result.returncode == 2
        assert f"cannot listen on [::1]:{port}: Address already in use" in result.stderr
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=30)


def test_a_host_name_that_cannot_be_encoded_is_a_usage_error():
    result = banter("producer", "--host", "a" * 64)
    assert result.returncode == 2, result.stderr
    assert f"cannot listen on {'a' * 64!r}: not a host name" in result.stderr
    assert "Traceback" not in result.stderr


# ----------------------------------------------------------------------------- build-demo
def test_build_demo_writes_both_models(tmp_path, demo_models):
    root = tmp_path / "models"
    result = banter("models", "build-demo", "--root", str(root))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"{DEMO_GPT}\t{root / DEMO_GPT}",
                                          f"{DEMO_EMBED}\t{root / DEMO_EMBED}"]
    for name in (DEMO_GPT, DEMO_EMBED):
        assert sorted(p.name for p in (root / name).iterdir()) == \
            ["config.json", "model.onnx", "tokenizer.json"]
        # builds are deterministic: the same bytes as the demo models the stack serves
        for file in ("model.onnx", "tokenizer.json"):
            assert sha256(root / name / file) == sha256(demo_models[name] / file)


# ----------------------------------------------------------------------------- submit, stream
def test_submit_prints_the_generated_text(api):
    result = banter("submit", "hello", "--url", api.url, "--max-tokens", "3")
    assert result.returncode == 0, result.stderr
    assert result.stdout == " banterhearts streams every\n"


def test_submit_without_max_tokens_gets_the_servers_default(api, settings):
    result = banter("submit", "hello", "--url", api.url)
    assert result.returncode == 0, result.stderr
    same = api.post("/v1/inference", {"prompt": "hello"}).json()
    assert same["usage"]["completion_tokens"] == settings.default_max_tokens
    assert result.stdout == same["text"] + "\n"


def test_submit_embed_prints_the_vector_as_json(api):
    result = banter("submit", "--embed", "x", "--url", api.url)
    assert result.returncode == 0, result.stderr
    vector = json.loads(result.stdout)
    assert isinstance(vector, list) and len(vector) == 128
    assert all(isinstance(x, float) for x in vector)
    assert abs(sum(x * x for x in vector) - 1.0) < 1e-4
    same = api.post("/v1/embeddings", {"input": "x"}).json()["data"][0]["embedding"]
    assert np.allclose(vector, same, atol=1e-6)


def test_submit_stream_prints_the_tokens_as_they_come(api):
    result = banter("submit", "--stream", "x", "--max-tokens", "4", "--url", api.url)
    assert result.returncode == 0, result.stderr
    assert result.stdout == " banterhearts streams every token\n"


def test_stream_replays_a_finished_job(api):
    job = api.post("/v1/jobs", {"kind": "generate", "input": "replay me",
                                "params": {"max_tokens": 6}}).json()
    finished = api.wait_job(job["id"])
    assert finished["status"] == "succeeded"
    result = banter("stream", job["id"], "--url", api.url)
    assert result.returncode == 0, result.stderr
    assert result.stdout == finished["result"]["text"] + "\n"
    assert result.stdout == " banterhearts streams every token from one\n"


def test_stream_of_a_cancelled_job_says_so(api):
    job = api.post("/v1/jobs", {"kind": "generate", "input": "stop me",
                                "params": {"max_tokens": 900}}).json()
    assert api.delete(f"/v1/jobs/{job['id']}").status_code == 200
    assert api.wait_job(job["id"])["status"] == "cancelled"
    result = banter("stream", job["id"], "--url", api.url)
    assert result.returncode == 1
    assert result.stderr.strip() == "banter: the job was cancelled (DELETE /v1/jobs/{id}, or " \
                                    "its client left)"


def test_stream_of_a_failed_job_says_why(api):
    job = api.post("/v1/jobs", {"kind": "generate", "input": "zq " * 4000,
                                "params": {"max_tokens": 1}}).json()
    assert api.wait_job(job["id"])["status"] == "failed"
    result = banter("stream", job["id"], "--url", api.url)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == "banter: prompt_too_long: the input is 12000 tokens, the limit is 512\n"


def test_stream_of_an_embed_job_says_it_has_no_tokens(api):
    job = api.post("/v1/jobs", {"kind": "embed", "input": "no tokens here"}).json()
    api.wait_job(job["id"])
    result = banter("stream", job["id"], "--url", api.url)
    assert result.returncode == 2 and result.stdout == ""
    assert f"job {job['id']} is an embed job: it streams no tokens" in result.stderr


def test_stream_of_unknown_job_fails(api):
    result = banter("stream", str(uuid.uuid4()), "--url", api.url)
    assert result.returncode == 1
    assert "job_not_found" in result.stderr and result.stdout == ""


def test_submit_unknown_model_exits_1_with_the_reason(api):
    result = banter("submit", "x", "--model", "no-such-model", "--url", api.url)
    assert result.returncode == 1
    assert result.stdout == ""
    assert "model_not_found" in result.stderr and "no-such-model" in result.stderr


@pytest.mark.parametrize("command", [["submit", "hi"], ["submit", "--stream", "hi"],
                                     ["stream", "0f0f0f0f-0000-4000-8000-000000000000"]])
def test_a_url_with_a_path_says_to_give_the_base_url(api, command):
    result = banter(*command, "--url", api.url + "/v1")
    assert result.returncode == 1, result.stderr
    assert "does not serve" in result.stderr and "(HTTP 404)" in result.stderr
    assert "--url (or BANTER_URL) must be the producer's base URL, without a path, e.g. " \
           "http://127.0.0.1:8000" in result.stderr
    assert "requested URL was not found" not in result.stderr and result.stdout == ""


def test_submit_to_an_unreachable_server_exits_3():
    port = free_port()  # nothing listens there
    result = banter("submit", "x", "--url", f"http://127.0.0.1:{port}", timeout=30)
    assert result.returncode == 3
    # the reason, not the layers of urllib3 wrapped round it
    assert result.stderr == f"banter: cannot reach http://127.0.0.1:{port}: Connection refused\n"


def test_submit_that_no_live_worker_can_serve_exits_3_saying_what_to_start(api):
    """A 503 is "not now", as an unreachable server is: a model served upstream while no
    worker has an OpenAI key."""
    name = f"cloud-{uuid.uuid4().hex[:8]}"
    promoted = api.post("/v1/models/promote", {"name": name, "kind": "generate",
                                               "backend": "openai", "model": "gpt-4o-mini"})
    assert promoted.status_code == 201, promoted.text
    result = banter("submit", "--model", name, "hi", "--url", api.url)
    assert result.returncode == 3, result.stderr
    assert result.stderr.startswith("banter: no live worker serves the openai backend")
    assert "Traceback" not in result.stderr


def test_submit_to_a_full_queue_exits_3(settings, redis_client, demo_models):
    """A 429 is "not now", as a 503 is: a script retries it later."""
    with unserved_producer(settings, redis_client, max_queue_depth=1) as (server, _queue):
        assert Api(server.url).post("/v1/jobs", {"kind": "generate",
                                                 "input": "x"}).status_code == 202
        result = banter("submit", "hi", "--url", server.url)
    assert result.returncode == 3, result.stderr
    assert result.stderr.startswith("banter: queue_full: ") and result.stdout == ""


@pytest.mark.parametrize("stream", [False, True])
def test_submit_of_a_model_whose_file_changed_after_promote_exits_3(api, settings, demo_models,
                                                                     stream):
    """A checksum mismatch is the producer's 503 ("not until an admin acts"), whether the
    producer answers it or the worker ends the job with it: exit 3, not 1."""
    name = f"changed-{uuid.uuid4().hex[:8]}"
    directory = settings.model_root / name
    shutil.copytree(demo_models["demo-gpt"], directory)
    promoted = api.post("/v1/models/promote", {"name": name, "kind": "generate", "path": name})
    assert promoted.status_code == 201, promoted.text
    with open(directory / "model.onnx", "ab") as model:
        model.write(b"\0")
    result = banter("submit", *(["--stream"] if stream else []), "--model", name,
                    "--max-tokens", "2", "hi", "--url", api.url)
    assert result.returncode == 3, result.stderr
    assert "banter: checksum_mismatch: " in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("variable, needle", [
    ("BANTER_REDIS_URL", "banter: Redis is not reachable (BANTER_REDIS_URL)"),
    ("BANTER_BROKER_URL", "banter: the broker is not reachable (BANTER_BROKER_URL)"),
])
def test_a_worker_without_its_redis_or_broker_exits_3_saying_so(tmp_path, stack_env, variable,
                                                                needle):
    env = {**fresh_up_env(tmp_path / "home"), "BANTER_AUTH_DISABLED": "true",
           "BANTER_REDIS_URL": stack_env["BANTER_REDIS_URL"],
           variable: f"redis://127.0.0.1:{free_port()}/0"}
    result = banter("worker", "--cpu", "--name", "unreachable@localhost", env=env)
    assert result.returncode == 3, result.stderr
    assert needle in result.stderr and "Traceback" not in result.stderr


# ----------------------------------------------------------------------------- models
@pytest.mark.parametrize("args", [["--url", "http://127.0.0.1:9", "build-demo"],
                                  ["--timeout", "5", "import", "somewhere"],
                                  ["--api-key", "k", "build-demo"]])
def test_models_actions_on_local_files_refuse_the_server_flags(args, tmp_path):
    """Given before ``build-demo`` or ``import``, a server flag was taken and ignored: the
    action works on local files, whatever the flag said."""
    result = banter("models", *args, env={**os.environ, "BANTER_HOME": str(tmp_path)})
    assert result.returncode == 2, result.stderr
    assert f"banter: {args[0]}: for the actions that ask a server" in result.stderr
    assert not (tmp_path / "models").exists()


def test_models_commands_against_the_api(api, settings, demo_models):
    name = f"cli-embed-{uuid.uuid4().hex[:8]}"
    shutil.copytree(demo_models[DEMO_EMBED], settings.model_root / name / "v1")
    v2 = settings.model_root / name / "v2"
    shutil.copytree(demo_models[DEMO_EMBED], v2)
    # a different artifact: the same graph with another doc_string, so another sha256
    model = onnx.load(str(v2 / "model.onnx"))
    model.doc_string = "cli test v2"
    onnx.save(model, str(v2 / "model.onnx"))
    url = ("--url", api.url)

    first = banter("models", "promote", name, f"{name}/v1", "--kind", "embed",
                   "--reason", "from the cli", *url)
    assert first.returncode == 0, first.stderr
    r1 = json.loads(first.stdout)
    assert (r1["name"], r1["kind"], r1["version"], r1["action"], r1["backend"], r1["reason"]) \
        == (name, "embed", 1, "promote", "onnx", "from the cli")
    assert r1["path"] == f"{name}/v1/model.onnx"
    assert r1["sha256"] == sha256(settings.model_root / name / "v1" / "model.onnx")

    second = banter("models", "promote", name, f"{name}/v2", "--kind", "embed", *url)
    assert second.returncode == 0, second.stderr
    r2 = json.loads(second.stdout)
    assert (r2["version"], r2["seq"], r2["previous_version"]) == (2, r1["seq"] + 1, 1)

    listed = banter("models", "list", *url)
    assert listed.returncode == 0, listed.stderr
    active = {m["id"]: m for m in json.loads(listed.stdout)}
    assert active[name]["version"] == 2
    assert (active[DEMO_GPT]["version"], active[DEMO_EMBED]["version"]) == (1, 1)

    back = banter("models", "rollback", name, "--reason", "undo", *url)
    assert back.returncode == 0, back.stderr
    rb = json.loads(back.stdout)
    assert (rb["action"], rb["version"], rb["previous_version"], rb["reason"]) == \
        ("rollback", 1, 2, "undo")
    # the artifact already active again: exit 0, the active record, and a word that nothing
    # changed (a new version says nothing on stderr)
    same = banter("models", "promote", name, f"{name}/v1", "--kind", "embed", *url)
    assert same.returncode == 0 and json.loads(same.stdout) == rb
    assert same.stderr == (f"banter: {name}@1 is already the active version of {name} with "
                           "that artifact: nothing changed\n")
    assert first.stderr == second.stderr == ""

    history = banter("models", "history", name, *url)
    assert history.returncode == 0, history.stderr
    assert json.loads(history.stdout) == [r1, r2, rb]
    everything = json.loads(banter("models", "history", *url).stdout)
    assert everything[-3:] == [r1, r2, rb]

    again = banter("models", "rollback", name, *url)
    assert again.returncode == 1 and "conflict" in again.stderr and again.stdout == ""
    bad = banter("models", "promote", name, "../elsewhere", "--kind", "embed", *url)
    assert bad.returncode == 1 and "invalid_artifact" in bad.stderr
    assert "outside the model root" in bad.stderr
    unknown = banter("models", "history", f"nobody-{uuid.uuid4().hex[:8]}", *url)
    assert unknown.returncode == 1 and "model_not_found" in unknown.stderr
    # nothing the failures sent changed the registry
    assert json.loads(banter("models", "history", name, *url).stdout) == [r1, r2, rb]


# ----------------------------------------------------------------------------- banter up
def start_up(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen, Path, int, Path, Path]:
    """``banter up --port PORT *extra`` on a fresh home, in a session of its own (as Ctrl-C in
    a terminal signals the whole foreground process group); returns the process, its home, its
    port and the files its stdout and stderr go to."""
    home = tmp_path / "home"
    port = free_port()
    out, err = tmp_path / "up.out", tmp_path / "up.err"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        process = subprocess.Popen([*CLI, "up", "--port", str(port), *extra],
                                   env=fresh_up_env(home), stdout=stdout, stderr=stderr,
                                   start_new_session=True)
    return process, home, port, out, err


def stop_up(process: subprocess.Popen, home: Path) -> list[str]:
    """Kill ``banter up``'s session if it still runs; return what it left behind, killed too."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    leftovers = processes_with_home(home)
    kill_leftovers(home)
    return leftovers


@pytest.mark.slow
def test_up_with_a_sample_then_exit(tmp_path):
    process, home, port, out, err = start_up(tmp_path, "--sample", "--exit-after-sample")
    try:
        code = process.wait(timeout=120)
    finally:
        leftovers = stop_up(process, home)
    text = out.read_text()
    assert code == 0, text + err.read_text()[-3000:]
    assert "banterhearts is up" in text
    assert f"API      http://127.0.0.1:{port}" in text
    redis_url = re.search(r"Redis\s+(redis://:\*\*\*@127\.0\.0\.1:(\d+)/0) \(private; ", text)
    assert redis_url, text
    assert "(demo models built)" in text
    assert "Ctrl-C" not in text  # it stops by itself
    assert "sample generate (demo-gpt v1, onnx, batch 1," in text
    assert f"\n  {DEMO_TEXT.strip()}\n" in text  # 18 tokens: the whole demo sentence
    assert "\nsample embed (demo-embed): 128 dims, first [" in text

    # it built and promoted the demo models into its own home
    records = [json.loads(line) for line in
               (home / "registry" / "history.jsonl").read_text().splitlines()]
    assert [(r["name"], r["version"], r["actor"]) for r in records] == \
        [(DEMO_GPT, 1, "banter-up"), (DEMO_EMBED, 1, "banter-up")]

    # and nothing it started survives it
    assert port_is_closed(int(redis_url.group(2))), "its private redis-server still listens"
    assert port_is_closed(port), "its producer still listens"
    assert leftovers == []


def test_up_finishes_demo_models_a_stopped_first_start_left_half_promoted(tmp_path):
    """A first ``banter up`` stopped between its two promotes left demo-gpt alone: the next
    one promotes demo-embed (the demo's sample needs both), and leaves demo-gpt's version and
    files as they were; a registry holding a model of one's own gets no demo models."""
    from banter.demo import build_demo
    from banter.redisconn import connect
    from banter.redisserver import RedisServer
    from banter.stack import ensure_demo_models
    from registry.service import Registry

    server = RedisServer(tmp_path / "redis", persist=False)
    settings = Settings.from_env({"BANTER_HOME": str(tmp_path / "home"),
                                  "BANTER_REDIS_URL": server.start()})
    try:
        registry = Registry.from_settings(settings, connect(settings.redis_url))
        gpt = build_demo(settings.model_root)[DEMO_GPT] / "model.onnx"
        first, _ = registry.promote(name=DEMO_GPT, kind="generate", path=str(gpt),
                                    actor="banter-up", reason="demo model built by banter up")
        files = gpt.read_bytes()
        assert ensure_demo_models(settings, registry) == [DEMO_EMBED]
        assert [(r.name, r.version) for r in registry.history()] == \
            [(DEMO_GPT, 1), (DEMO_EMBED, 1)]
        assert registry.history()[0] == first and gpt.read_bytes() == files
        assert ensure_demo_models(settings, registry) == []

        other = replace(settings, registry_path=tmp_path / "other" / "history.jsonl",
                        redis_url=settings.redis_url.rsplit("/", 1)[0] + "/1")
        mine = Registry.from_settings(other, connect(other.redis_url))
        mine.promote(name="mine", kind="generate", path=str(settings.model_root / DEMO_GPT /
                                                            "model.onnx"), actor="me", reason="")
        assert ensure_demo_models(other, mine) == []
    finally:
        server.stop()


@pytest.mark.slow
def test_up_serves_http_until_ctrl_c(tmp_path):
    process, home, port, out, err = start_up(tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        text = wait_for_text(out, "Ctrl-C stops everything.", process, timeout_s=120)
        redis_port = int(re.search(r"Redis\s+redis://:\*\*\*@127\.0\.0\.1:(\d+)/0 \(private; "
                                   r"for other banter commands: BANTER_REDIS_URL=", text).group(1))
        assert requests.get(f"{url}/readyz", timeout=10).status_code == 200

        answer = requests.post(f"{url}/v1/inference", json={"prompt": "hi", "max_tokens": 5},
                               headers={"X-Trace-ID": "cli-up-trace"}, timeout=60)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["text"] == " banterhearts streams every token from"
        assert (body["model"], body["version"], body["backend"]) == (DEMO_GPT, 1, "onnx")
        assert answer.headers["X-Trace-ID"] == "cli-up-trace"
        assert answer.headers["X-Backend"] == "onnx"
        assert int(answer.headers["X-Batch-Size"]) >= 1
        assert re.fullmatch(r"\d+\.\d\d", answer.headers["X-Latency-MS"])

        embedded = requests.post(f"{url}/v1/embeddings", json={"input": "banterhearts"},
                                 timeout=60)
        assert embedded.status_code == 200, embedded.text
        assert len(embedded.json()["data"][0]["embedding"]) == 128
        assert embedded.headers["X-Backend"] == "onnx"
        assert int(embedded.headers["X-Batch-Size"]) >= 1
        assert embedded.headers["X-Trace-ID"]
        assert re.fullmatch(r"\d+\.\d\d", embedded.headers["X-Latency-MS"])

        started = processes_with_home(home)  # up, redis-server, worker, producer (+ workers)
        assert len(started) >= 5, started
        assert any("redis-server" in p for p in started), started
        # its AOF holds every prompt and result: no other user may read it
        assert (home / "redis").stat().st_mode & 0o777 == 0o700
        # nor connect to it: it wants a password, kept in a file only the owner may read and
        # shown nowhere else (not on a command line, not in the banner)
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=redis_port).ping()
        url_file = home / "redis" / "url"
        assert f'BANTER_REDIS_URL="$(cat {url_file})"' in text
        assert url_file.stat().st_mode & 0o777 == 0o600
        private_url = url_file.read_text().strip()
        assert redis.Redis.from_url(private_url).ping()
        password = redis.connection.parse_url(private_url)["password"]
        assert len(password) >= 32 and password not in text + err.read_text()
        assert not any(password in line for line in started)

        # a second banter up on the same home is refused before it starts anything: it would
        # write the same AOF and replace the first one's password and URL file
        second = banter("up", "--port", str(free_port()), env=fresh_up_env(home))
        assert second.returncode == 2, second.stderr
        assert "another private Redis runs in" in second.stderr and "BANTER_HOME" in second.stderr
        assert url_file.read_text().strip() == private_url
        assert redis.Redis.from_url(private_url).ping()
        assert processes_with_home(home) == started

        # when Ctrl-C is pressed, expect a clean exit and everything it started gone, even
        # when it is pressed again while the stack stops
        os.killpg(process.pid, signal.SIGINT)
        time.sleep(0.2)
        os.killpg(process.pid, signal.SIGINT)
        code = process.wait(timeout=30)
    finally:
        leftovers = stop_up(process, home)
    assert code == 0, out.read_text() + err.read_text()[-3000:]
    # Redis (a session of its own) outlived what writes to it: nobody's shutdown broke
    assert "Traceback" not in err.read_text(), err.read_text()[-3000:]
    assert port_is_closed(redis_port), "its private redis-server still listens"
    assert port_is_closed(port), "its producer still listens"
    assert leftovers == [] and not url_file.exists()


@pytest.mark.slow
def test_up_killed_outright_leaves_nothing_running_and_starts_again_with_its_data(tmp_path):
    """SIGKILL runs no cleanup in banter up: its children end with it (the kernel signals
    them), so none holds the port or writes the data directory; the next banter up on the
    same home then starts, with the jobs the first one kept."""
    process, home, port, out, err = start_up(tmp_path)
    try:
        wait_for_text(out, "Ctrl-C stops everything.", process, timeout_s=120)
        url = f"http://127.0.0.1:{port}"
        job = requests.post(f"{url}/v1/jobs", json={"kind": "embed", "input": "kept"},
                            timeout=30).json()
        # in flight at the kill: the worker must not wait on them for ever (its Redis goes too)
        running = [requests.post(f"{url}/v1/jobs", timeout=30, json={
            "kind": "generate", "input": "x", "lane": "bulk",
            "params": {"max_tokens": 512}}).json()["id"] for _ in range(30)]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(
                requests.get(f"{url}/v1/jobs/{job_id}", timeout=30).json()["status"] == "running"
                for job_id in running[-3:]):
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        deadline = time.monotonic() + 60
        while processes_with_home(home) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert processes_with_home(home) == []
        assert port_is_closed(port)

        again, home, port, out, err = start_up(tmp_path)
        try:
            wait_for_text(out, "Ctrl-C stops everything.", again, timeout_s=120)
            kept = requests.get(f"http://127.0.0.1:{port}/v1/jobs/{job['id']}", timeout=30)
            assert kept.status_code == 200 and kept.json()["id"] == job["id"], kept.text
        finally:
            stop_up(again, home)
    finally:
        stop_up(process, home)


@pytest.mark.slow
def test_up_stops_when_its_redis_dies(tmp_path):
    process, home, port, out, err = start_up(tmp_path)
    try:
        text = wait_for_text(out, "Ctrl-C stops everything.", process, timeout_s=120)
        redis_port = re.search(r"Redis\s+redis://:\*\*\*@127\.0\.0\.1:(\d+)/0", text).group(1)
        redis_pid = next(int(p.split(":")[0]) for p in processes_with_home(home)
                         if "redis-server" in p and redis_port in p)
        os.kill(redis_pid, signal.SIGKILL)
        code = process.wait(timeout=60)
    finally:
        leftovers = stop_up(process, home)
    assert code == 1
    assert "banter up: its Redis was killed by SIGKILL" in err.read_text()
    assert leftovers == [] and port_is_closed(port)


def serve_routes(routes: dict[str, tuple[int, str, bytes]]):
    """A server that is not a producer: ``routes`` maps a path to (status, content type,
    body), for GET and POST; anything else is a 404 page. Returns (server, url)."""
    import http.server
    import threading

    class Fixed(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            status, kind, body = routes.get(self.path, (404, "text/html", b"<html>no</html>"))
            self.send_response(status)
            if kind:
                self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Fixed)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def submit_against(stream: bool, events: bytes, answer: bytes,
                   **kwargs) -> subprocess.CompletedProcess:
    """``banter submit hi`` (``--stream`` when ``stream``) against a server whose
    ``/v1/inference`` answers ``events`` (SSE) when streamed and ``answer`` (JSON) when not."""
    route = (200, "text/event-stream", events) if stream else (200, "application/json", answer)
    server, url = serve_routes({"/v1/inference" + ("?stream=true" if stream else ""): route})
    try:
        return banter("submit", "hi", *(["--stream"] if stream else []), "--url", url, **kwargs)
    finally:
        server.shutdown()


JOB = (200, "application/json", b'{"kind": "generate", "status": "running"}')


@pytest.mark.parametrize("command, routes", [
    (["stream", "j"], {"/v1/jobs/j": JOB, "/v1/jobs/j/events": (
        200, "application/octet-stream", b'event: token\ndata: {"text": "a"}\n\n')}),
    (["stream", "j"], {"/v1/jobs/j": JOB, "/v1/jobs/j/events": (
        200, "text/event-stream", b'event: done\ndata: {"finish_reason": ["x"]}\n\n')}),
    (["stream", "j"], {"/v1/jobs/j": JOB, "/v1/jobs/j/events": (
        200, "text/event-stream", b'event: error\ndata: {"error": {"type": [1], '
                                  b'"message": "m"}}\n\n')}),
    (["stream", "j"], {"/v1/jobs/j": JOB, "/v1/jobs/j/events": (200, "text/html", b"<p>")}),
    (["stream", "j"], {"/v1/jobs/j": (200, "application/json", b'{"kind": ["generate"]}')}),
    (["models", "list"], {"/v1/models": (200, "application/json", b'{"data": 5}')}),
    (["submit", "hi"], {"/v1/inference": (200, "application/json", b'{"text": ["a"]}')}),
    (["submit", "--embed", "hi"], {"/v1/embeddings": (
        200, "application/json", b'{"data": [{"embedding": "x"}]}')}),
    (["submit", "hi"], {"/v1/inference": (
        500, "application/json", b'{"error": {"type": ["x"], "message": "m"}}')}),
])
def test_an_answer_of_the_wrong_shape_is_exit_3_naming_the_url(command, routes):
    server, url = serve_routes(routes)
    try:
        result = banter(*command, "--url", url)
    finally:
        server.shutdown()
    assert result.returncode == 3, result.stderr
    assert url in result.stderr and "not what a banterhearts producer answers" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("text, stdout", [("", ""), ("two\nlines\n", "two\nlines\n"),
                                          ("part", "part\n")])
def test_the_text_is_printed_with_its_last_line_ended_and_nothing_for_none(stream, text, stdout):
    """A generation stopped before its first character (a stop string, an end-of-text token)
    printed an empty line, as did a cancelled job that never ran (then the reason)."""
    events = (f'event: token\ndata: {{"seq": 0, "text": {json.dumps(text)}}}\n\n'
              'event: done\ndata: {"finish_reason": "stop"}\n\n')
    answer = json.dumps({"text": text, "finish_reason": "stop"})
    result = submit_against(stream, events.encode(), answer.encode())
    assert result.returncode == 0, result.stderr
    assert result.stdout == stdout


@pytest.mark.parametrize("stream", [False, True])
def test_submit_of_a_job_cancelled_while_it_ran_is_exit_1(stream):
    """The text so far is printed, then why it stopped: a cut generation is not a success."""
    events = (b'event: token\ndata: {"seq": 0, "text": "part"}\n\n'
              b'event: done\ndata: {"finish_reason": "cancelled"}\n\n')
    result = submit_against(stream, events, b'{"text": "part", "finish_reason": "cancelled"}')
    assert result.returncode == 1, result.stderr
    assert result.stdout == "part\n"
    assert "the job was cancelled (DELETE /v1/jobs/{id}, or its client left)" in result.stderr


@pytest.mark.parametrize("text, stdout", [("part", "part\n"), ("line\n", "line\n"), ("", "")])
def test_an_error_after_tokens_ends_their_line_then_says_why(text, stdout):
    events = (f'event: token\ndata: {{"seq": 0, "text": {json.dumps(text)}}}\n\n'
              'event: error\ndata: {"error": {"type": "inference_error", "message": "m"}}\n\n')
    result = submit_against(True, events.encode(), b"")
    assert result.returncode == 1, result.stderr
    assert result.stdout == stdout
    assert result.stderr == "banter: inference_error: m\n"


@pytest.mark.parametrize("stream", [False, True])
def test_text_the_terminal_cannot_encode_is_replaced_not_a_traceback(stream):
    events = b'event: token\ndata: {"seq": 0, "text": "caf\xc3\xa9 \xe2\x9c\x93"}\n\n' \
             b'event: done\ndata: {"finish_reason": "length"}\n\n'
    result = submit_against(stream, events,
                            '{"text": "café ✓", "finish_reason": "length"}'.encode(),
                            env={**os.environ, "PYTHONIOENCODING": "ascii"})
    assert result.returncode == 0, result.stderr
    assert result.stdout == "caf? ?\n" and "Traceback" not in result.stderr


def test_bulk_writes_nothing_of_an_answer_that_is_not_an_output_line(tmp_path):
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text(json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/embeddings",
                                  "body": {"input": "x"}}) + "\n")
    server, url = serve_routes({
        "/v1/batches?limit=1": (200, "application/json", b'{"object": "list", "data": []}'),
        "/v1/batches/requests": (200, "application/json", b'{"foo": 1}')})
    try:
        result = banter("bulk", str(source), "--out", str(out), "--url", url)
    finally:
        server.shutdown()
    assert result.returncode == 3, result.stderr
    assert url in result.stderr and "Traceback" not in result.stderr
    assert not out.exists() or out.read_text() == ""


@pytest.mark.parametrize("command", [["submit", "hi"], ["submit", "--stream", "hi"],
                                     ["stream", "j"], ["models", "list"], ["bulk", "IN"],
                                     ["models", "FLAGS", "list"], ["models", "FLAGS", "history"]])
def test_a_server_that_never_answers_is_exit_3_after_timeout(tmp_path, command):
    """A server that takes the connection and sends nothing (hung): the command gives up after
    ``--timeout`` seconds, naming the URL and the flag, instead of waiting 300 s. ``FLAGS``:
    the client flags where they go (else at the end); ``banter models`` takes them before its
    action too."""
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/embeddings",
                                  "body": {"input": "x"}}) + "\n")
    command = [str(source) if arg == "IN" else arg for arg in command]
    if command[0] == "bulk":
        command += ["--out", str(tmp_path / "out.jsonl")]
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(8)  # the kernel completes connections; nothing ever reads or answers
        url = f"http://127.0.0.1:{hung.getsockname()[1]}"
        flags = ["--url", url, "--timeout", "1"]
        if "FLAGS" not in command:
            command.append("FLAGS")
        at = command.index("FLAGS")
        result = banter(*command[:at], *flags, *command[at + 1:], timeout=40)
    assert result.returncode == 3, result.stderr
    assert url in result.stderr and "within 1s (--timeout)" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_an_answer_whose_body_stops_is_exit_3_after_timeout():
    """Headers, then part of the body, then nothing: as a server that never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"

        def half_answer() -> None:
            connection, _ = listener.accept()
            with connection:
                connection.recv(65536)
                connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                   b"Content-Length: 100\r\n\r\n{\"text\": ")
                time.sleep(10)

        threading.Thread(target=half_answer, daemon=True).start()
        result = banter("submit", "hi", "--url", url, "--timeout", "1", timeout=40)
    assert result.returncode == 3, result.stderr
    assert f"{url} did not answer POST /v1/inference within 1s (--timeout)" in result.stderr


def test_a_stream_that_goes_silent_is_exit_3_after_timeout():
    """A stream whose server stops sending (no event, no keep-alive) ends the command after
    ``--timeout``, with the tokens so far printed and the way to follow the job."""
    class Silent(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            if not self.path.endswith("/events"):
                body = b'{"kind": "generate", "status": "running"}'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            event = b'id: 1-0\nevent: token\ndata: {"seq": 0, "text": "Hello"}\n\n'
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")  # as gunicorn streams
            self.end_headers()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
            self.wfile.flush()
            time.sleep(30)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Silent)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        result = banter("stream", "j", "--url", f"http://127.0.0.1:{server.server_address[1]}",
                        "--timeout", "1", timeout=40)
    finally:
        server.shutdown()
    assert result.returncode == 3, result.stderr
    assert result.stdout.startswith("Hello")
    assert "sent nothing for 1s: --timeout" in result.stderr and "banter stream j" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("value", ["0", "-1", "abc", "nan", "inf", "86401", "1_0"])
def test_a_timeout_that_is_not_seconds_is_a_usage_error(value):
    result = banter("submit", "hi", "--timeout", value)
    assert result.returncode == 2, result.stderr
    assert "argument --timeout: must be seconds, more than 0 and at most 86400" in result.stderr


@pytest.mark.parametrize("args, needle", [
    (["producer", "--workers", "100000"], "argument --workers: must be at most 256, got 100000"),
    (["producer", "--workers", "0"], "argument --workers: must be at least 1"),
    (["producer", "--workers", "two"], "argument --workers: invalid integer value: 'two'"),
    (["producer", "--workers", "1_0"], "argument --workers: invalid integer value: '1_0'"),
    (["producer", "--port", "\uff18\uff10"], "argument --port: invalid port_number value"),
    (["producer", "--threads", "4097"], "argument --threads: must be at most 4096"),
    (["bulk", "in.jsonl", "--out", "out.jsonl", "--max-in-flight", "100000"],
     "argument --max-in-flight: must be at most 4096")])
def test_process_and_thread_counts_past_what_a_machine_runs_are_usage_errors(args, needle):
    """A producer asked for 100,000 gunicorn workers used to go on forking them for minutes,
    deaf to SIGTERM while it did: such a count is refused before anything starts."""
    result = banter(*args, timeout=30)
    assert result.returncode == 2, result.stderr
    assert needle in result.stderr


def up_refusals(tmp_path: Path) -> list[tuple[dict[str, str], list[str], int, str]]:
    bad_keys, good_keys = tmp_path / "bad-keys.txt", tmp_path / "keys.txt"
    bad_keys.write_text("foo bar\n")
    good_keys.write_text("admin:s3cret-key\n")
    return [
        ({"BANTER_KEYS_FILE": str(bad_keys)}, [], 2, "bad-keys.txt:1: a key cannot hold spaces"),
        ({"BANTER_KEYS_FILE": str(good_keys)}, ["--exit-after-sample"], 2,
         "set BANTER_API_KEY to one of them"),
        ({"BANTER_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}, [], 3,
         "Redis is not reachable (BANTER_REDIS_URL)"),
    ]


@pytest.mark.parametrize("case", range(3), ids=["bad_keys_file", "sample_without_key",
                                                "redis_unreachable"])
def test_up_refuses_before_it_starts_anything(tmp_path, case):
    """What would stop the stack part way is found first, with its own exit code and words."""
    variables, flags, code, needle = up_refusals(tmp_path)[case]
    home = tmp_path / "home"
    result = banter("up", "--port", str(free_port()), *flags,
                    env={**fresh_up_env(home), **variables})
    assert result.returncode == code, result.stderr
    assert needle in result.stderr and "Traceback" not in result.stderr
    assert not (home / "redis").exists() and processes_with_home(home) == []


@pytest.mark.slow
def test_up_starts_its_worker_again_when_it_dies(tmp_path):
    """A worker killed under ``banter up`` (the OOM killer, a crash) is started again, as a
    supervisor would, and ``banter up`` says which child died and how."""
    process, home, port, out, err = start_up(tmp_path)
    try:
        wait_for_text(out, "Ctrl-C stops everything.", process, timeout_s=120)
        workers = [p for p in processes_with_home(home) if "banter.cli worker" in p]
        assert len(workers) == 1, workers
        os.kill(int(workers[0].split(":")[0]), signal.SIGKILL)
        wait_for_text(err, "banter up: the worker was killed by SIGKILL; starting it again",
                      process, timeout_s=30)
        answer = requests.post(f"http://127.0.0.1:{port}/v1/inference",
                               json={"prompt": "again", "max_tokens": 3}, timeout=90)
        assert answer.status_code == 200, answer.text
        assert process.poll() is None
        os.killpg(process.pid, signal.SIGINT)
        assert process.wait(timeout=30) == 0
    finally:
        stop_up(process, home)


@pytest.mark.slow
def test_up_stops_everything_it_started_on_sigterm(tmp_path):
    """SIGTERM is how supervisors, ``docker stop``, systemd and ``kill`` stop a program; the
    stack must go down with ``banter up`` instead of being orphaned."""
    process, home, port, out, err = start_up(tmp_path)
    try:
        text = wait_for_text(out, "Ctrl-C stops everything.", process, timeout_s=120)
        redis_port = int(re.search(r"Redis\s+redis://:\*\*\*@127\.0\.0\.1:(\d+)/0 \(private; "
                                   r"for other banter commands: BANTER_REDIS_URL=", text).group(1))
        assert len(processes_with_home(home)) >= 5

        # when only the ``banter up`` process is sent SIGTERM
        process.terminate()
        code = process.wait(timeout=30)
        # expect every child it started (worker, producer, redis-server) to be stopped too
        deadline = time.monotonic() + 10  # give well-behaved children time to finish exiting
        while processes_with_home(home) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = processes_with_home(home)
        assert left == [], (f"BUG: SIGTERM to 'banter up' (exit {code}) orphaned what it "
                            f"started: {left}")
        assert port_is_closed(redis_port) and port_is_closed(port)
        assert code in (0, 128 + signal.SIGTERM), code
    finally:
        stop_up(process, home)


def test_a_stream_cut_before_its_end_says_how_to_follow_the_job(tmp_path):
    """A server (or its Redis) that goes away mid-stream: exit 3 and the job to follow, not
    exit 1 as if the job had failed."""
    class CutShort(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("X-Job-ID", "0f0f0f0f-0000-4000-8000-000000000000")
            self.end_headers()
            self.wfile.write(b': stream open\n\nid: 1-0\nevent: token\ndata: {"seq": 0, '
                             b'"text": " cut", "token_id": 5}\n\n')

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), CutShort)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        result = banter("submit", "--stream", "x", "--url",
                        f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
    assert result.returncode == 3, result.stderr
    assert result.stdout == " cut\n"  # the text's line ends before the error is said
    assert "job 0f0f0f0f-0000-4000-8000-000000000000" in result.stderr
    assert "ended before the job did" in result.stderr
    assert "'banter stream 0f0f0f0f-0000-4000-8000-000000000000'" in result.stderr


@pytest.mark.parametrize("status, error, needle", [
    (401, "invalid_setting", "set BANTER_API_KEY to a key the stack accepts"),
    (503, "internal_error", "the sample job failed (503)"),
])
def test_a_refused_sample_job_says_why(status, error, needle):
    from banter.errors import BanterError
    from banter.stack import _check_sample

    answer = requests.Response()
    answer.status_code, answer._content = status, b'{"error": {}}'
    with pytest.raises(BanterError) as raised:
        _check_sample(answer)
    assert raised.value.type == error and needle in raised.value.message
