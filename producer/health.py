"""``/healthz`` (the process answers), ``/readyz`` (Redis, the broker and a live worker);
``/metrics`` is in ``producer.metrics``."""

from __future__ import annotations

import time

from flask import Blueprint, jsonify

from banter import keys
from banter.errors import Unavailable
from banter.redisconn import ping
from producer.context import ctx

blueprint = Blueprint("health", __name__)


def live_workers() -> list[str]:
    c = ctx()
    since = time.time() - c.settings.worker_live_s
    return c.redis.zrangebyscore(keys.WORKERS, since, "+inf")


@blueprint.get("/healthz")
def healthz():
    return jsonify({"status": "ok"})


@blueprint.get("/readyz")
def readyz():
    c = ctx()
    ping(c.redis)
    queued = c.jobs.queues.depth()  # Unavailable when the broker does not answer
    workers = sorted(live_workers())
    if not workers:  # the backlog stays in the answer: an outage is when it is looked at
        error = Unavailable("no live worker: start one with 'banter worker --cpu' or '--gpu N'")
        return jsonify({"error": error.body(), "status": "not_ready", "workers": [],
                        "queued": queued}), error.status
    return jsonify({"status": "ready", "workers": workers, "queued": queued})
