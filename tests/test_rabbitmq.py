"""RabbitMQ as the Celery broker (``BANTER_BROKER_URL=amqp://...``), with Redis kept for job
records, streams and the registry mirror: jobs run through a private RabbitMQ node, queue
depths and backpressure read RabbitMQ's queues, an unreachable broker is a 503, and a worker
killed mid-generation loses nothing (RabbitMQ redelivers its unacked messages at once)."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
from kombu import Connection

from banter.broker import RUN_JOB, BrokerQueues, make_celery
from banter.redisconn import connect
from banter.redisserver import free_port
from banter.settings import Settings
from bench.stack import BenchStack
from producer.app import create_app
from tests.conftest import Api, Server, stop_process
from tests.rabbitmq_node import RabbitNode, find_server
from tests.test_broker import drain
from tests.test_faults import kill_9_mid_batch, open_stack, rescue
from tests.test_metrics import parse, value

pytestmark = pytest.mark.skipif(find_server() is None,
                                reason="RabbitMQ is not installed (no rabbitmq-server)")


@pytest.fixture(scope="module")
def rabbit(tmp_path_factory):
    node = RabbitNode(tmp_path_factory.mktemp("rabbitmq"))
    node.start()
    yield node
    node.stop()


@pytest.fixture(scope="module")
def stack(rabbit, tmp_path_factory):
    with open_stack(tmp_path_factory.mktemp("amqp-stack"), persist=False,
                    extra_env={"BANTER_BROKER_URL": rabbit.url}) as private:
        yield private


def test_jobs_run_through_rabbitmq(stack):
    worker = stack.worker("amqp@localhost")
    try:
        answer = stack.api.post("/v1/inference", {"prompt": "hi", "max_tokens": 4})
        assert answer.status_code == 200, answer.text
        assert answer.json()["backend"] == "onnx" and answer.json()["text"]
        embedded = stack.api.post("/v1/embeddings", {"input": ["one", "two"]})
        assert embedded.status_code == 200, embedded.text
        assert len(embedded.json()["data"]) == 2
    finally:
        stop_process(worker)
    # the messages went through RabbitMQ: Redis holds no broker list or binding
    assert stack.redis.keys("interactive*") == [] and stack.redis.keys("_kombu*") == []


def test_queue_depth_and_backpressure_read_rabbitmq(stack):
    """With no worker, queued jobs wait in RabbitMQ: /metrics counts them per lane, the depth
    limit refuses the next one (429), and a worker started later runs every one."""
    jobs = [stack.api.post("/v1/jobs", {"kind": "embed", "input": f"backlog {i}",
                                        "lane": "bulk"}).json()["id"] for i in range(3)]
    time.sleep(0.6)  # a RabbitMQ depth reading serves for AMQP_DEPTH_MAX_AGE_S
    families = parse(stack.api.get("/metrics").text)
    assert value(families, "banter_queue_depth", lane="bulk") == 3
    assert value(families, "banter_queue_depth", lane="interactive") == 0

    # a burst inside one depth reading: what this producer sent since counts too
    full = Server(create_app(replace(stack.settings, max_queue_depth=5),
                             connect(stack.settings.redis_url)))
    try:
        answers = [Api(full.url).post("/v1/jobs", {"kind": "embed", "input": f"burst {i}",
                                                   "lane": "bulk"}) for i in range(4)]
        assert [a.status_code for a in answers] == [202, 202, 429, 429], answers[-1].text
        assert answers[-1].json()["error"]["type"] == "queue_full"
        jobs += [a.json()["id"] for a in answers[:2]]
    finally:
        full.close()

    worker = stack.worker("amqp-drain@localhost")
    try:
        assert [stack.api.wait_job(j)["status"] for j in jobs] == ["succeeded"] * 5
    finally:
        stop_process(worker)


def test_an_unreachable_rabbitmq_is_a_503_and_metrics_say_so(stack):
    closed = replace(stack.settings, broker_url=f"amqp://guest:guest@127.0.0.1:{free_port()}//")
    server = Server(create_app(closed, connect(stack.settings.redis_url)))
    try:
        api = Api(server.url)
        answer = api.post("/v1/jobs", {"kind": "embed", "input": "lost?"})
        assert answer.status_code == 503, answer.text
        assert answer.json()["error"]["type"] == "unavailable"
        assert "broker" in answer.json()["error"]["message"]
        ready = api.get("/readyz")
        assert ready.status_code == 503 and "broker" in ready.json()["error"]["message"]
        # a scrape still gets what Redis holds, and says the broker is down
        scraped = api.get("/metrics")
        assert scraped.status_code == 200
        families = parse(scraped.text)
        assert families["banter_broker_up"]["samples"] == [("banter_broker_up", {}, 0.0)]
        assert families["banter_queue_depth"]["samples"] == []
        assert families["banter_live_workers"]["samples"]
    finally:
        server.close()


def test_kill_9_mid_generation_with_rabbitmq_loses_nothing(stack):
    rescue(stack, kill_9_mid_batch(stack, 4))


def test_a_bench_stack_on_rabbitmq_uses_and_removes_queues_of_its_own(rabbit):
    """``python -m bench lanes --broker-url``: the bench never touches the broker's other
    queues; its own are gone afterwards."""
    with BenchStack(broker_url=rabbit.url) as stack:
        names = list(stack.settings.queues)
        assert all(name.startswith("bench-") for name in names)
        app = make_celery(stack.settings)
        app.send_task(RUN_JOB, args=["x"], queue=names[1])
        assert BrokerQueues(stack.settings, app).depth() == {"interactive": 0, "bulk": 1}
    with Connection(rabbit.url) as conn:
        for name in names:
            channel = conn.channel()
            with pytest.raises(conn.channel_errors):
                channel.queue_declare(queue=name, passive=True)


@pytest.mark.parametrize("backends", [("onnx",), ("onnx", "openai")])
def test_a_worker_channel_holds_its_bulk_share_on_rabbitmq(rabbit, backends):
    """The worker's task consumer (``app.amqp.TaskConsumer``, as Celery builds it, on the
    worker's queues) takes at most ``bulk_limit`` unacked bulk messages, over both backends'
    bulk queues when it serves both, and keeps taking interactive ones."""
    from workers.main import worker_queues

    tag = "-".join(backends)  # queues of its own: a deleted queue's name is not reused
    settings = Settings.from_env({"BANTER_BROKER_URL": rabbit.url,
                                  "BANTER_QUEUE_INTERACTIVE": f"share-interactive-{tag}",
                                  "BANTER_QUEUE_BULK": f"share-bulk-{tag}",
                                  "BANTER_WORKER_CONCURRENCY": "8",
                                  "BANTER_BULK_CONCURRENCY": "2"})
    app = make_celery(settings)
    queues = worker_queues(settings, backends)
    bulk = [name for name in queues if name in settings.lane_queues("bulk")]
    for name in bulk:
        for i in range(5):
            app.send_task(RUN_JOB, args=[f"bulk-{i}"], queue=name)
    for i in range(3):
        app.send_task(RUN_JOB, args=[f"interactive-{i}"], queue=settings.queue_interactive)
    got = []
    with app.connection_for_read() as conn:
        consumer = app.amqp.TaskConsumer(conn, queues=[app.amqp.queues[name] for name in queues])
        consumer.register_callback(lambda body, message: got.append(message))
        consumer.consume()
        drain(conn)
        keys = [m.delivery_info["routing_key"] for m in got]
        assert sum(keys.count(name) for name in bulk) == 2, keys
        assert keys.count(settings.queue_interactive) == 3
        for message in got:
            message.ack()
        consumer.cancel()
        channel = conn.channel()
        for name in queues:
            channel.queue_delete(name)


@pytest.fixture(scope="module")
def tls_rabbit(tmp_path_factory):
    """A node with a TLS listener too, its certificate self-signed for 127.0.0.1 only."""
    import subprocess

    directory = tmp_path_factory.mktemp("rabbitmq-tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    node = RabbitNode(directory / "node", tls=(cert, key))
    node.start()
    yield node, cert
    node.stop()


def test_an_amqps_broker_checks_the_certificate_and_its_host(tls_rabbit):
    """``amqps://`` with redis-py's ``ssl_*`` names, as ``rediss://`` takes them: a job message
    goes through TLS with the CA the URL names; without it (the system's CAs) or under a host
    name the certificate does not carry, the connection is refused, never made unchecked.
    ``ssl_ca_certs`` raised a TypeError in py-amqp (a 500 for every submit)."""
    from kombu.exceptions import OperationalError

    node, cert = tls_rabbit

    def app_for(url: str):
        return make_celery(Settings.from_env({"BANTER_BROKER_URL": url}))

    app = app_for(f"{node.tls_url}?ssl_ca_certs={cert}")
    app.send_task(RUN_JOB, args=["over-tls"], queue="tls-check")
    with app.connection_for_read() as conn:
        assert conn.transport.driver_type == "amqp" and conn.ssl["server_hostname"] == "127.0.0.1"
        got = []
        consumer = app.amqp.TaskConsumer(conn, queues=[app.amqp.queues["tls-check"]])
        consumer.register_callback(lambda body, message: got.append(message))
        consumer.consume()
        drain(conn)
        assert [m.headers["id"] for m in got] and got[0].payload[0] == ["over-tls"]
        got[0].ack()
        consumer.cancel()
        conn.channel().queue_delete("tls-check")
    for url in (node.tls_url,  # the system's CAs do not hold the self-signed one
                f"{node.tls_url.replace('127.0.0.1', 'localhost')}?ssl_ca_certs={cert}"):
        with app_for(url).connection_for_write() as conn, pytest.raises(OperationalError):
            conn.ensure_connection(max_retries=1, interval_start=0, timeout=10)
