"""The Celery app both sides build from settings; the task name is the only shared contract."""

from __future__ import annotations

from urllib.parse import urlparse

from celery import Celery
from kombu import Queue
from kombu.transport import redis as kombu_redis

from banter.settings import Settings

RUN_JOB = "banter.run_job"


class _Channel(kombu_redis.Channel):
    """kombu's Redis channel builds a new ``redis.Redis`` for every ack, publish and event
    (about 0.15 ms of CPU each: a quarter of a worker's Celery overhead per job). One client
    per connection pool does the same work: the pool hands out connections to any thread."""

    _sync_client = None

    def _create_client(self, asynchronous=False):
        if asynchronous:
            return super()._create_client(asynchronous=True)
        client = self._sync_client
        if client is None or client.connection_pool is not self.pool:
            client = self._sync_client = super()._create_client()
        return client


class RedisTransport(kombu_redis.Transport):
    """kombu's Redis transport with ``_Channel``; used for ``redis://`` broker URLs."""

    Channel = _Channel


def make_celery(settings: Settings, main: str = "banterhearts") -> Celery:
    """A Celery app configured by ``celeryconfig`` plus the settings-derived values. It knows
    the queues of both backends: ``settings.queues`` (onnx) and ``settings.openai_queues``."""
    app = Celery(main)
    app.config_from_object("celeryconfig")
    if urlparse(settings.broker_url).scheme == "redis":
        app.conf.broker_transport = f"{__name__}:RedisTransport"
    app.conf.update(
        broker_url=settings.broker_url,
        task_queues=[Queue(name) for lane in (0, 1)
                     for name in (settings.queues[lane], settings.openai_queues[lane])],
        task_default_queue=settings.queue_interactive,
        # kombu sweeps unacked messages every 10 s and restores those older than the
        # visibility timeout: a job whose worker died is delivered again within ~70 s.
        # "priority": a worker with a free slot always takes an interactive message first.
        broker_transport_options={"visibility_timeout": settings.visibility_timeout_s,
                                  "queue_order_strategy": "priority",
                                  "unacked_restore_interval": 10,
                                  "unacked_restore_throttle": 1},
    )
    return app


def queue_depth(client, settings: Settings) -> dict[str, int]:
    """Messages waiting per lane, over both backends' queues (Redis broker: the queue lists
    kombu keeps)."""
    pipe = client.pipeline(transaction=False)
    for name in (*settings.queues, *settings.openai_queues):
        pipe.llen(name)
    interactive, bulk, openai_interactive, openai_bulk = pipe.execute()
    return {"interactive": interactive + openai_interactive, "bulk": bulk + openai_bulk}
