"""The naive Celery baseline of ``python -m bench embed``: what a team would write without
banterhearts. One plain Celery task, ``bench.naive_embed(text, reply_key)``, runs ONE ONNX
Runtime call for its one input (tokenize, pass, mean pool, normalise) and pushes the embedding
(JSON) onto the Redis list ``reply_key``, where the client waits for it with ``BLPOP``.

Run it like the served worker (thread pool, same concurrency, prefetch multiplier 1)::

    BENCH_NAIVE_REDIS_URL=redis://... BENCH_NAIVE_MODEL_DIR=/models/demo-embed \\
        celery -A bench.naive_worker worker --pool threads --concurrency 64 \\
        --queues bench-naive --prefetch-multiplier 1

The ONNX Runtime session (ORT's default threads, the CPU provider unless
``BENCH_NAIVE_PROVIDERS`` names others, comma-separated) is shared by every task thread and
loaded by the first task.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import redis
from celery import Celery

QUEUE = "bench-naive"
TASK = "bench.naive_embed"
REPLY_TTL_S = 600

app = Celery("bench-naive")
app.conf.update(
    broker_url=os.environ.get("BENCH_NAIVE_REDIS_URL", "redis://127.0.0.1:6379/0"),
    task_serializer="json", accept_content=["json"], task_ignore_result=True,
    task_default_queue=QUEUE, worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True, worker_hijack_root_logger=False,
)

_lock = threading.Lock()
_state: dict = {}


def _encoder():
    """The shared encoder and Redis client, loaded once (the first task)."""
    if "encoder" not in _state:
        with _lock:
            if "encoder" not in _state:
                from bench.common import RawEncoder

                providers = os.environ.get("BENCH_NAIVE_PROVIDERS", "CPUExecutionProvider")
                _state["redis"] = redis.Redis.from_url(app.conf.broker_url)
                _state["encoder"] = RawEncoder(Path(os.environ["BENCH_NAIVE_MODEL_DIR"]),
                                               providers=providers.split(","))
    return _state["encoder"], _state["redis"]


@app.task(name=TASK)
def naive_embed(text: str, reply_key: str) -> None:
    encoder, client = _encoder()
    vector = encoder.embed([text])[0]
    pipe = client.pipeline(transaction=False)
    pipe.rpush(reply_key, json.dumps(vector.tolist()))
    pipe.expire(reply_key, REPLY_TTL_S)
    pipe.execute()
