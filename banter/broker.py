"""The Celery app both sides build from settings; the task name is the only shared contract.

The broker is Redis (``redis://``, the default: the state Redis) or RabbitMQ (``amqp://``).
Both carry the same messages, and on both a worker holds at most its bulk share of bulk
messages (``_Channel`` on Redis, ``LaneConsumer`` on RabbitMQ), so interactive ones never wait
for a bulk job to end (docs/decisions.md, Broker).
"""

from __future__ import annotations

import functools
import ssl
import threading
import time
from typing import TYPE_CHECKING, Callable
from urllib.parse import urlsplit

import redis
from celery import Celery
from kombu import Consumer, Exchange, Queue
from kombu.exceptions import OperationalError
from kombu.transport import redis as kombu_redis

from banter.errors import Unavailable
from banter.redisconn import connect
from banter.settings import Settings, amqp_tls, is_amqp

if TYPE_CHECKING:
    from banter.jobs import JobRecord

RUN_JOB = "banter.run_job"


BULK_RECHECK_S = 0.05  # how often a channel holding its bulk share looks again for bulk work
# BRPOP's timeout is in seconds; one that a Redis server rounds down to 0 ms would mean "block
# until a message comes", so a short wait never goes below 1 ms
MIN_BRPOP_TIMEOUT_S = 0.001
AMQP_DEPTH_MAX_AGE_S = 0.5  # RabbitMQ queue depths are read at most this often per process


class _LaneCycle:
    """kombu's queue cycle (the order BRPOP lists the queues in), without the bulk queues
    while ``channel.bulk_full``."""

    def __init__(self, inner, channel: "_Channel") -> None:
        self.inner, self.channel = inner, channel

    def update(self, queues):
        self.inner.update(queues)

    def rotate(self, last_used):
        return self.inner.rotate(last_used)

    def consume(self, n):
        queues = self.inner.consume(n)
        if self.channel.bulk_full:
            queues = [q for q in queues if q not in self.channel.bulk_queues]
        return queues


class _Channel(kombu_redis.Channel):
    """kombu's Redis channel with two changes.

    * One ``redis.Redis`` per connection pool: kombu builds a new one for every ack, publish and
      event (about 0.15 ms of CPU each: a quarter of a worker's Celery overhead per job); the
      pool hands connections to any thread, so one client does the same work.
    * Lanes: a channel (one per worker process) holds at most ``bulk_limit`` (transport option)
      unacked messages from ``bulk_queues``. With that many, its BRPOP leaves the bulk queues
      out and comes back every ``BULK_RECHECK_S``, so the rest of the worker's prefetch (its
      thread pool) stays free for interactive messages instead of waiting for a bulk job to end.
      It also leaves them out while ``bulk_intake_wait()`` (transport option: seconds until a
      bulk message may be taken, 0 now; the worker's ``LaneGate``) says to wait, and comes back
      after that long.
    """

    _sync_client = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        options = self.connection.client.transport_options
        self.bulk_queues = frozenset(options.get("bulk_queues", ()))
        self.bulk_limit = int(options.get("bulk_limit", 0))
        self.bulk_intake_wait = options.get("bulk_intake_wait") or (lambda: 0.0)
        self.bulk_full = False
        self._queue_cycle = _LaneCycle(self._queue_cycle, self)

    def bulk_held(self) -> int:
        """Bulk messages this channel delivered that are not acked yet."""
        qos = self.qos
        acked = qos._dirty
        return sum(1 for tag, message in list(qos._delivered.items())
                   if tag not in acked and message.delivery_info.get("routing_key") in self.bulk_queues)

    def _brpop_start(self, timeout=None):
        recheck = BULK_RECHECK_S if self.bulk_limit and self.bulk_held() >= self.bulk_limit else 0
        if not recheck:
            recheck = self.bulk_intake_wait()
        self.bulk_full = recheck > 0
        if self.bulk_full and timeout is None:
            timeout = max(recheck, MIN_BRPOP_TIMEOUT_S)
        return super()._brpop_start(timeout)

    def _create_client(self, asynchronous=False):
        if self.connection is None or self.connection.client is None:
            # closed under this channel (Redis went away, or a connection of the worker's was
            # killed) while the consumer shuts it down or acks a message: kombu would fail on
            # the missing connection with an AttributeError, which Celery takes for an
            # unrecoverable (CRITICAL) error; it is a lost connection, recovered from
            raise redis.ConnectionError("the broker connection is closed")
        if asynchronous:
            return super()._create_client(asynchronous=True)
        client = self._sync_client
        if client is None or client.connection_pool is not self.pool:
            client = self._sync_client = super()._create_client()
        return client


class LaneConsumer(Consumer):
    """kombu's consumer with a prefetch per lane on RabbitMQ, where ``basic.qos`` (per consumer,
    the mode Celery uses there) applies to each consumer started after it: the bulk queues'
    consumers start under ``bulk_limit``, split between the bulk queues the worker consumes
    (both backends' when it has an OpenAI key: each takes an equal part, at least 1), the others
    under ``prefetch`` (the worker's task threads). A worker then holds at most ``bulk_limit``
    bulk messages and keeps the rest of its threads for interactive ones, as ``_Channel`` does
    on Redis (there the bulk queues share the limit as a whole)."""

    def __init__(self, *args, bulk_queues: frozenset[str] = frozenset(), bulk_limit: int = 0,
                 prefetch: int = 0, **kwargs) -> None:
        self.bulk_queues, self.bulk_limit, self.prefetch = bulk_queues, bulk_limit, prefetch
        super().__init__(*args, **kwargs)

    def _basic_consume(self, queue, *args, **kwargs):
        if self.bulk_limit and queue.name not in self._active_tags:
            limit = self.prefetch
            if queue.name in self.bulk_queues:
                consumed = sum(1 for q in self.queues if q.name in self.bulk_queues)
                limit = max(1, self.bulk_limit // max(1, consumed))
            self.channel.basic_qos(0, limit, False)
        return super()._basic_consume(queue, *args, **kwargs)


class RedisTransport(kombu_redis.Transport):
    """kombu's Redis transport with ``_Channel``; ``make_celery`` uses it for ``redis://``."""

    Channel = _Channel


def send_job(celery: Celery, settings: Settings, record: JobRecord) -> str:
    """Send the job's task (``RUN_JOB``, task id = job id, its trace id as a header) to its
    lane's queue for its backend; returns that queue. Raises what the broker raises."""
    queue = settings.lane_queue(record.lane, record.backend or "onnx")
    celery.send_task(RUN_JOB, args=[record.id], task_id=record.id, queue=queue,
                     headers={"trace_id": record.trace_id})
    return queue


class _IntakeWait:
    """``bulk_intake_wait`` as a transport option: called by the channel, and named in the
    worker's ``stats`` (Flower's worker page), which Celery sends as JSON with the options."""

    def __init__(self, wait: Callable[[], float]) -> None:
        self._wait = wait

    def __call__(self) -> float:
        return self._wait()

    def __json__(self) -> str:
        return "LaneGate.bulk_intake_wait"


def make_celery(settings: Settings, main: str = "banterhearts",
                bulk_intake_wait: Callable[[], float] | None = None) -> Celery:
    """A Celery app configured by ``celeryconfig`` plus the settings-derived values. It knows
    the queues of both backends: ``settings.queues`` (onnx) and ``settings.openai_queues``.
    ``bulk_intake_wait``: a worker's ``LaneGate.bulk_intake_wait`` (Redis broker only)."""
    app = Celery(main)
    app.config_from_object("celeryconfig")
    amqp = is_amqp(settings.broker_url)
    broker_url = settings.broker_url
    if amqp:
        # RabbitMQ acknowledges every published message: send_task returns once the broker
        # holds the job's message (durable queue, persistent message).
        transport_options = {"confirm_publish": True}
        broker_url, tls = amqp_tls(broker_url)  # py-amqp takes them as Celery's option
        if tls is not None:
            app.conf.broker_use_ssl = tls
    else:
        app.conf.broker_transport = f"{__name__}:RedisTransport"
        if urlsplit(settings.broker_url).scheme == "rediss":
            # TLS, the certificate checked against the system's CAs as redis-py checks it for
            # the job records (the URL's ssl_* options, when given, replace this): kombu sees
            # the scheme only through its own transport, and would connect in plain TCP
            app.conf.broker_use_ssl = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
        # kombu sweeps unacked messages every 10 s and restores those older than the
        # visibility timeout: a job whose worker died is delivered again within ~70 s.
        # "priority": a worker with a free slot always takes an interactive message first.
        transport_options = {"visibility_timeout": settings.visibility_timeout_s,
                             "queue_order_strategy": "priority",
                             "bulk_queues": list(settings.lane_queues("bulk")),
                             "bulk_limit": settings.bulk_limit(),
                             "unacked_restore_interval": 10,
                             "unacked_restore_throttle": 1}
        if bulk_intake_wait is not None:
            transport_options["bulk_intake_wait"] = _IntakeWait(bulk_intake_wait)
    app.conf.update(
        broker_url=broker_url,
        # each queue bound to an exchange of its own name under its own name (Celery would bind
        # every queue to the default queue's exchange and key); tasks are sent to a queue by
        # name either way
        task_queues=[Queue(name, Exchange(name, type="direct"), routing_key=name)
                     for lane in (0, 1)
                     for name in (settings.queues[lane], settings.openai_queues[lane])],
        task_default_queue=settings.queue_interactive,
        broker_transport_options=transport_options,
    )
    if amqp:
        app.amqp.Consumer = functools.partial(
            LaneConsumer, bulk_queues=frozenset(settings.lane_queues("bulk")),
            bulk_limit=settings.bulk_limit(), prefetch=settings.worker_concurrency)
    return app


class BrokerQueues:
    """The lanes' queues as the broker holds them.

    ``depth()``: messages waiting per lane, over both backends' queues; ``by_queue()``: per
    queue name. Read from the broker itself: on Redis the length of kombu's list per queue
    (``client`` when the broker is the state Redis), on RabbitMQ a passive ``queue_declare``
    per queue on one of the app's pooled connections (about 4 ms for the four, so a reading
    serves every caller for ``AMQP_DEPTH_MAX_AGE_S``, with what this process ``sent`` since
    added). A queue nobody declared yet holds nothing. An unreachable broker raises
    ``Unavailable``.
    """

    def __init__(self, settings: Settings, celery: Celery, client=None) -> None:
        self._lanes = {lane: settings.lane_queues(lane) for lane in ("interactive", "bulk")}
        self._names = [name for pair in self._lanes.values() for name in pair]
        self._celery = celery
        self._lock = threading.Lock()
        self._amqp_depth: dict[str, int] = {}
        self._amqp_read_at = float("-inf")
        self._redis = None
        if not is_amqp(settings.broker_url):
            same = client is not None and settings.broker_url == settings.redis_url
            self._redis = client if same else connect(settings.broker_url)

    def depth(self) -> dict[str, int]:
        by_name = self.by_queue()
        return {lane: sum(by_name[name] for name in pair) for lane, pair in self._lanes.items()}

    def by_queue(self) -> dict[str, int]:
        try:
            if self._redis is not None:
                return dict(zip(self._names, self._redis_counts()))
            with self._lock:
                if time.monotonic() - self._amqp_read_at >= AMQP_DEPTH_MAX_AGE_S:
                    self._amqp_depth = dict(zip(self._names, self._amqp_counts()))
                    self._amqp_read_at = time.monotonic()
                return dict(self._amqp_depth)
        except (OperationalError, redis.RedisError) as exc:
            raise Unavailable(f"the broker is not reachable: {exc}") from exc

    def sent(self, queue: str) -> None:
        """One message more in ``queue``: counted in a RabbitMQ reading until the next one (a
        Redis reading is live)."""
        if self._redis is None:
            with self._lock:
                if queue in self._amqp_depth:
                    self._amqp_depth[queue] += 1

    def _redis_counts(self) -> list[int]:
        pipe = self._redis.pipeline(transaction=False)
        for name in self._names:
            pipe.llen(name)
        return pipe.execute()

    def _amqp_counts(self) -> list[int]:
        counts = []
        with self._celery.pool.acquire(block=True, timeout=10) as conn:
            try:
                # (re)connects a pooled connection, which a broker outage leaves closed;
                # raises OperationalError when the broker does not answer
                conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0,
                                       timeout=5)
                channel = conn.channel()
                for name in self._names:
                    try:
                        counts.append(channel.queue_declare(queue=name, passive=True).message_count)
                    except conn.channel_errors:  # not declared yet; the broker closed the channel
                        counts.append(0)
                        channel = conn.channel()
                channel.close()
            except conn.connection_errors as exc:
                raise OperationalError(str(exc)) from exc
        return counts
