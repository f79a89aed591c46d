"""Redis over TLS (`rediss://`): the producer, the Celery broker and a worker, end to end."""

from __future__ import annotations

import subprocess
import time

import pytest

from banter.demo import DEMO_EMBED, DEMO_GPT, DEMO_TEXT, build_demo
from banter.redisconn import connect
from banter.redisserver import find_binary, free_port
from banter.settings import Settings
from producer.app import create_app
from registry.service import Registry
from tests.conftest import Api, Server, start_worker, stop_process


@pytest.fixture
def tls_redis(tmp_path):
    """A redis-server that speaks TLS only, with a self-signed certificate."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    port = free_port()
    server = subprocess.Popen([find_binary(), "--port", "0", "--tls-port", str(port),
                               "--tls-cert-file", str(cert), "--tls-key-file", str(key),
                               "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no",
                               "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = (f"rediss://127.0.0.1:{port}/0?ssl_cert_reqs=required"
           f"&ssl_ca_certs={cert}")
    client = connect(url)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except Exception:
            assert server.poll() is None, "redis-server refused the TLS options"
            assert time.monotonic() < deadline
            time.sleep(0.1)
    yield url
    server.terminate()
    server.wait()


@pytest.mark.parametrize("trust", ["url", "system"])
def test_a_job_runs_end_to_end_over_tls(tls_redis, tmp_path, monkeypatch, trust):
    """The CA in the URL's query, or (a bare ``rediss://`` URL) in the system's trust store
    (here SSL_CERT_FILE): records, streams and the Celery broker all speak TLS and check the
    certificate."""
    url = tls_redis
    if trust == "system":
        url = tls_redis.split("?", 1)[0]
        monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "cert.pem"))
    env = {"BANTER_REDIS_URL": url, "BANTER_HOME": str(tmp_path / "home"),
           "BANTER_WORKER_HEARTBEAT_S": "1", "BANTER_AUTH_DISABLED": "true",
           "BANTER_OPENAI_KEY": "", **({"SSL_CERT_FILE": str(tmp_path / "cert.pem")}
                                      if trust == "system" else {})}
    settings = Settings.from_env(env)
    dirs = build_demo(settings.model_root)
    registry = Registry.from_settings(settings, connect(url))
    registry.promote(name=DEMO_GPT, kind="generate", path=str(dirs[DEMO_GPT] / "model.onnx"))
    registry.promote(name=DEMO_EMBED, kind="embed", path=str(dirs[DEMO_EMBED] / "model.onnx"))
    worker = start_worker(env, "tls@localhost", tmp_path / "worker.log", connect(url))
    server = Server(create_app(settings, connect(url)))
    try:
        response = Api(server.url).post("/v1/inference", {"prompt": "secure", "max_tokens": 3})
        assert response.status_code == 200, response.text
        assert response.json()["text"] == "".join(" " + w for w in DEMO_TEXT.split()[:3])
    finally:
        server.close()
        stop_process(worker)
