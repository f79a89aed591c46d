"""The Celery app's Redis transport (banter.broker): a channel holds at most its bulk share of
unacked bulk messages and keeps taking interactive ones; queue depths come from the broker.
Real Redis, real kombu consumer (RabbitMQ: tests/test_rabbitmq.py)."""

from __future__ import annotations

import re
import socket
from dataclasses import replace

import pytest
from kombu import Consumer, Queue

from banter.broker import RUN_JOB, BrokerQueues, RedisTransport, make_celery
from banter.redisconn import connect
from banter.settings import Settings, SettingsError, is_amqp


@pytest.fixture
def lanes(settings, redis_client):
    names = (f"lanes-test-interactive-{id(settings)}", f"lanes-test-bulk-{id(settings)}")
    lane_settings = replace(settings, queue_interactive=names[0], queue_bulk=names[1],
                            bulk_concurrency=2)
    yield make_celery(lane_settings), lane_settings
    redis_client.delete(*names)


def drain(connection, timeout: float = 0.5) -> None:
    """Take every message the channel will deliver now (the consumer's callback keeps them)."""
    while True:
        try:
            connection.drain_events(timeout=timeout)
        except socket.timeout:
            return


def test_a_channel_holds_its_bulk_share_and_keeps_taking_interactive_messages(lanes):
    app, settings = lanes
    for i in range(5):
        app.send_task(RUN_JOB, args=[f"bulk-{i}"], queue=settings.queue_bulk)
    got: list = []
    with app.connection_for_read() as connection:
        assert isinstance(connection.transport, RedisTransport)
        channel = connection.channel()
        channel.basic_qos(0, 10, False)  # prefetch room for all of them
        consumer = Consumer(channel, queues=[Queue(q) for q in settings.queues], accept=["json"],
                            callbacks=[lambda body, message: got.append(message)])
        consumer.consume()
        drain(connection)
        assert len(got) == 2  # its bulk share, though the prefetch has room for all five
        assert channel.bulk_held() == 2
        app.send_task(RUN_JOB, args=["urgent"], queue=settings.queue_interactive)
        drain(connection)
        assert [m.payload[0] for m in got] == [["bulk-0"], ["bulk-1"], ["urgent"]]
        got[0].ack()  # a bulk job ended: room for one more
        drain(connection)
        assert [m.payload[0] for m in got[3:]] == [["bulk-2"]]
        for message in got[1:]:
            message.ack()
        drain(connection)
        assert [m.payload[0] for m in got[4:]] == [["bulk-3"], ["bulk-4"]]
        for message in got[4:]:
            message.ack()
        consumer.cancel()


def test_a_channel_closed_under_an_ack_is_a_lost_connection_not_a_crash(lanes):
    """An ack after the channel lost its connection (a Redis restart, a killed connection:
    kombu sets the channel's ``connection`` to None) raised AttributeError, which Celery logs
    as an unrecoverable error before it restarts its consumer; a connection error is what
    Celery recovers from (it logs "Couldn't ack" and the message is delivered again)."""
    import redis

    app, _ = lanes
    with app.connection_for_read() as connection:
        channel = connection.default_channel
        for gone in ("connection", "client"):
            owner = channel if gone == "connection" else channel.connection
            kept = getattr(owner, gone)
            setattr(owner, gone, None)
            try:
                with pytest.raises(redis.ConnectionError, match="broker connection is closed"):
                    channel._create_client()
            finally:
                setattr(owner, gone, kept)


def test_bulk_share_setting():
    assert Settings().bulk_limit() == 48  # three quarters of 64 task threads
    assert Settings(worker_concurrency=1).bulk_limit() == 1
    assert Settings.from_env({"BANTER_BULK_CONCURRENCY": "5"}).bulk_limit() == 5
    with pytest.raises(SettingsError, match="must be under BANTER_WORKER_CONCURRENCY"):
        Settings(worker_concurrency=2, bulk_concurrency=2)  # no thread left for interactive


def test_the_broker_url_is_redis_or_rabbitmq():
    with pytest.raises(SettingsError, match="BANTER_BROKER_URL"):
        Settings.from_env({"BANTER_BROKER_URL": "sqs://queue"})
    with pytest.raises(SettingsError, match="BANTER_REDIS_URL='nonsense'"):
        Settings.from_env({"BANTER_REDIS_URL": "nonsense"})
    for url, words in (("redis://127.0.0.1:99999/0", "Port out of range"),
                       ("redis://h:1/abc", "the database after the host must be a number"),
                       ("redis://[::1", "Invalid IPv6 URL"),
                       ("amqp://h", "expected a redis://, rediss:// or unix:// (Redis) URL")):
        with pytest.raises(SettingsError, match=re.escape(words)):
            Settings.from_env({"BANTER_REDIS_URL": url})
    with pytest.raises(SettingsError) as raised:  # a password never shows in the message
        Settings.from_env({"BANTER_REDIS_URL": "redis://:sekret@h:1/x"})
    assert "sekret" not in raised.value.message and ":***@" in raised.value.message
    assert Settings.from_env({}).broker_url == Settings.from_env({}).redis_url
    amqp = Settings.from_env({"BANTER_BROKER_URL": "amqp://guest:guest@127.0.0.1:5672//"})
    assert is_amqp(amqp.broker_url) and not is_amqp(amqp.redis_url)
    app = make_celery(amqp)
    assert app.conf.broker_transport_options == {"confirm_publish": True}
    with app.connection_for_write() as connection:  # no I/O until used
        assert not isinstance(connection.transport, RedisTransport)


def test_queue_depth_reads_the_redis_broker_not_the_state_redis(lanes, redis_client,
                                                                 redis_server):
    """Depths come from the broker's own lists: with the broker on another Redis database than
    the job records, the state database's lists do not count."""
    app, settings = lanes
    app.send_task(RUN_JOB, args=["bulk"], queue=settings.queue_bulk)
    assert BrokerQueues(settings, app, redis_client).depth() == {"interactive": 0, "bulk": 1}

    other = replace(settings, broker_url=redis_server.url.rsplit("/", 1)[0] + "/9")
    other_app = make_celery(other)
    try:
        other_app.send_task(RUN_JOB, args=["a"], queue=settings.queue_interactive)
        other_app.send_task(RUN_JOB, args=["b"], queue=settings.queue_interactive)
        assert BrokerQueues(other, other_app, redis_client).depth() == {"interactive": 2,
                                                                         "bulk": 0}
    finally:
        connect(other.broker_url).delete(settings.queue_interactive)


def test_each_queue_has_an_exchange_and_routing_key_of_its_own(lanes, redis_client):
    """Bound to one exchange under one key (Celery's default for bare queues), a publish to
    that exchange and key would land in every lane's queue; each queue is its own route."""
    app, settings = lanes
    queues = app.amqp.queues
    for name in (*settings.queues, *settings.openai_queues):
        assert (queues[name].exchange.name, queues[name].routing_key) == (name, name)
    with app.connection_for_write() as connection:
        producer = connection.Producer()
        bulk = queues[settings.queue_bulk]
        producer.publish({"x": 1}, exchange=bulk.exchange, routing_key=bulk.routing_key,
                         declare=[queues[name] for name in settings.queues])
    assert redis_client.llen(settings.queue_bulk) == 1
    assert redis_client.llen(settings.queue_interactive) == 0
