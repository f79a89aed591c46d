"""What workers record for ``GET /metrics`` per ORT pass (the families and their buckets:
``banter.metrics``).

Workers know what nobody else sees (ORT passes, batch sizes), so they write it to Redis, and any
producer process renders the same cluster-wide numbers (gunicorn runs several producer
processes: an in-process registry would be per process). Everything lives in one hash,
``keys.METRICS`` (field format there).

``add_pass``: per ORT pass, on the engine thread; goes into the pipeline that also bumps the
worker's own ``keys.worker_stats`` counters, so one round trip per pass, none per token. A job's
end (queue wait, run time, tokens, time to first token) is counted by the script that ends it
(``banter.metrics.JOB_END_FUNCTION``, run by ``jobs.JobStore.finish``): the script reads the
job's ``started_at`` and its stream's first entry server-side, so they cost no extra round trip
and no per-token work: the first token's time is its stream entry id (Redis server clock,
milliseconds).

Times mix clocks: ``queued_at`` is the producer's, ``started_at``/``finished_at`` the worker's,
the first token the Redis server's. Keep hosts NTP-synced; negative differences count as 0.
"""

from __future__ import annotations

from typing import Any

from banter import keys
from banter.metrics import BATCH_SIZE, ORT_PASS

# -- per ORT pass -------------------------------------------------------------------------------

def add_pass(pipe: Any, node: str, kind: str, batch_size: int, seconds: float,
             key: str = keys.METRICS) -> None:
    """Queue one pass's writes on ``pipe``: the worker's own counters (``keys.worker_stats``)
    and the cluster histograms of batch size and pass time."""
    stats = keys.worker_stats(node)
    pipe.hincrby(stats, f"{kind}_passes", 1)
    pipe.hincrby(stats, f"{kind}_items", batch_size)
    pipe.hincrbyfloat(stats, f"{kind}_seconds", seconds)
    size = BATCH_SIZE.series(kind=kind)
    pipe.hincrby(key, f"{size}|{BATCH_SIZE.bucket(batch_size)}", 1)
    pipe.hincrby(key, f"{size}|sum", batch_size)
    ort = ORT_PASS.series(kind=kind)
    pipe.hincrby(key, f"{ort}|{ORT_PASS.bucket(seconds)}", 1)
    pipe.hincrbyfloat(key, f"{ort}|sum", seconds)
