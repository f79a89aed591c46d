"""``/healthz`` (the process answers), ``/readyz`` (Redis and a live worker), ``/metrics``."""

from __future__ import annotations

import time

from flask import Blueprint, Response, jsonify

from banter import keys
from banter.broker import queue_depth
from banter.errors import Unavailable
from banter.redisconn import ping
from producer.context import ctx

blueprint = Blueprint("health", __name__)


def live_workers() -> list[str]:
    c = ctx()
    since = time.time() - 3 * c.settings.worker_heartbeat_s
    return c.redis.zrangebyscore(keys.WORKERS, since, "+inf")


@blueprint.get("/healthz")
def healthz():
    return jsonify({"status": "ok"})


@blueprint.get("/readyz")
def readyz():
    c = ctx()
    ping(c.redis)
    workers = live_workers()
    if not workers:
        raise Unavailable("no live worker: start one with 'banter worker --cpu' or '--gpu N'")
    return jsonify({"status": "ready", "workers": workers})


@blueprint.get("/metrics")
def metrics():
    c = ctx()
    workers = live_workers()
    lines = ["# HELP banter_queue_depth Jobs waiting per lane.", "# TYPE banter_queue_depth gauge"]
    lines += [f'banter_queue_depth{{lane="{lane}"}} {n}'
              for lane, n in queue_depth(c.redis, c.settings).items()]
    lines += ["# HELP banter_live_workers Workers with a recent heartbeat.",
              "# TYPE banter_live_workers gauge", f"banter_live_workers {len(workers)}",
              "# HELP banter_worker_total Worker counters (ORT passes, items, seconds) per kind.",
              "# TYPE banter_worker_total counter"]
    for node in workers:
        for name, value in sorted(c.redis.hgetall(keys.worker_stats(node)).items()):
            lines.append(f'banter_worker_total{{worker="{node}",counter="{name}"}} {value}')
    return Response("\n".join(lines) + "\n", mimetype="text/plain; version=0.0.4")
