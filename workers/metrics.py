"""What workers record for ``GET /metrics`` (the families and their buckets: ``banter.metrics``).

Workers know what nobody else sees (ORT passes, batch sizes, when a job started and finished,
its tokens), so they write it to Redis, and any producer process renders the same cluster-wide
numbers (gunicorn runs several producer processes: an in-process registry would be per process).

Everything lives in one hash, ``keys.METRICS`` (field format there). Writes are batched:

- ``record_pass``: per ORT pass, on the engine thread; goes into the pipeline that also bumps the
  worker's own ``keys.worker_stats`` counters, so one round trip per pass, none per token.
- ``record_job_end``: per job a worker finishes or fails, one script call (one round trip). The
  script reads the job's ``started_at`` and its stream's first entry server-side, so queue wait,
  run time and time to first token cost no extra round trip and no per-token work: the first
  token's time is its stream entry id (Redis server clock, milliseconds).

Times mix clocks: ``queued_at`` is the producer's, ``started_at``/``finished_at`` the worker's,
the first token the Redis server's. Keep hosts NTP-synced; negative differences count as 0.
Recording never fails a job: a Redis error is logged and the observation dropped.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from typing import Any

import redis

from banter import keys
from banter.metrics import (
    BATCH_SIZE,
    BULK_YIELD,
    FAILURES,
    GENERATED_TOKENS,
    GENERATION_SECONDS,
    JOBS,
    LATENCY,
    ORT_PASS,
    PROMPT_TOKENS,
    QUEUE_WAIT,
    TTFT,
    Family,
)

log = logging.getLogger("banter.worker")


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


# -- per finished job ---------------------------------------------------------------------------

# KEYS[1] metrics hash, KEYS[2] job hash, KEYS[3] job stream. ARGV[1] JSON
# {queued_at, finished_at, ttft: bool, incr: [[field, n]], incrf: [[field, x | name]],
#  observe: [[series, x | name, [bounds], [le labels]]]} where name is one of the values the
# script derives: wait (started_at - queued_at), run (finished_at - started_at), ttft (first
# token entry's id time - queued_at). Returns those values as JSON (seconds).
_JOB_END = """
local spec = cjson.decode(ARGV[1])
local values = {}
local queued = tonumber(spec.queued_at)
local started = tonumber(redis.call('HGET', KEYS[2], 'started_at'))
if started and queued then values.wait = math.max(0, started - queued) end
if started then values.run = math.max(0, spec.finished_at - started) end
if spec.ttft and queued then
  local first = redis.call('XRANGE', KEYS[3], '-', '+', 'COUNT', 1)[1]
  if first then
    local event, seq
    for i = 1, #first[2], 2 do
      if first[2][i] == 'event' then event = first[2][i + 1] end
      if first[2][i] == 'seq' then seq = first[2][i + 1] end
    end
    if event == 'token' and seq == '0' then
      values.ttft = math.max(0, tonumber(string.match(first[1], '^(%d+)')) / 1000 - queued)
    end
  end
end
local function value(v)
  if type(v) == 'string' then return values[v] end
  return v
end
for _, op in ipairs(spec.incr) do redis.call('HINCRBY', KEYS[1], op[1], op[2]) end
for _, op in ipairs(spec.incrf) do
  local v = value(op[2])
  if v then redis.call('HINCRBYFLOAT', KEYS[1], op[1], v) end
end
for _, op in ipairs(spec.observe) do
  local v = value(op[2])
  if v then
    local le = '+Inf'
    for i, bound in ipairs(op[3]) do
      if v <= bound then le = op[4][i]; break end
    end
    redis.call('HINCRBY', KEYS[1], op[1] .. '|' .. le, 1)
    redis.call('HINCRBYFLOAT', KEYS[1], op[1] .. '|sum', v)
  end
end
return cjson.encode(values)
"""


@functools.lru_cache(maxsize=16)
def _job_end_script(client: redis.Redis) -> Any:
    return client.register_script(_JOB_END)


def _observe(family: Family, value: float | str, **labels: str) -> list[Any]:
    return [family.series(**labels), value, list(family.bounds), list(family.le[:-1])]


def job_end_spec(kind: str, lane: str, status: str, backend: str, queued_at: float | None,
                 finished_at: float, usage: dict[str, int] | None = None,
                 error: str | None = None, yielded_s: float = 0.0) -> dict[str, Any]:
    """What ``record_job_end`` sends: the counters and observations of one finished job
    (``yielded_s``: how long it waited for interactive jobs, ``workers/lanes.py``)."""
    incr: list[list[Any]] = [[JOBS.series(kind=kind, lane=lane, status=status, backend=backend),
                              1]]
    incrf: list[list[Any]] = []
    observe = [_observe(QUEUE_WAIT, "wait", kind=kind, lane=lane)]
    generate = kind == "generate"
    if error:
        incr.append([FAILURES.series(kind=kind, error=error), 1])
    if usage:
        if usage.get("prompt_tokens"):
            incr.append([PROMPT_TOKENS.series(kind=kind, backend=backend),
                         int(usage["prompt_tokens"])])
        if generate:
            incr.append([GENERATED_TOKENS.series(backend=backend),
                         int(usage.get("completion_tokens") or 0)])
            incrf.append([GENERATION_SECONDS.series(backend=backend), "run"])
    if yielded_s > 0:
        incrf.append([BULK_YIELD.series(kind=kind), yielded_s])
    if generate:
        observe.append(_observe(TTFT, "ttft", backend=backend, lane=lane))
    if status == "succeeded" and queued_at is not None:
        observe.append(_observe(LATENCY, max(0.0, finished_at - queued_at), kind=kind,
                                lane=lane))
    return {"queued_at": queued_at, "finished_at": finished_at, "ttft": generate,
            "incr": incr, "incrf": incrf, "observe": observe}


def record_job_end(client: redis.Redis, record: Any, status: str, backend: str | None,
                   finished_at: float | None = None, usage: dict[str, int] | None = None,
                   error: str | None = None, key: str = keys.METRICS,
                   yielded_s: float = 0.0) -> dict[str, float]:
    """Count a job a worker finished (``record``: its ``JobRecord``) in one round trip.
    Returns the timings for its log line: ``queue_ms``, ``run_ms``, ``ttft_ms`` (those known).
    """
    finished_at = time.time() if finished_at is None else finished_at
    spec = job_end_spec(record.kind, record.lane, status, backend or "unknown",
                        record.queued_at, finished_at, usage, error, yielded_s)
    try:
        values = json.loads(_job_end_script(client)(
            keys=[key, keys.job(record.id), keys.stream(record.id)], args=[json.dumps(spec)]))
    except (redis.RedisError, ValueError) as exc:
        log.warning("metrics_dropped", extra={"error": str(exc), "what": "job_end",
                                              "job_id": record.id})
        return {}
    names = {"wait": "queue_ms", "run": "run_ms", "ttft": "ttft_ms"}
    return {names[name]: round(seconds * 1000.0, 2) for name, seconds in values.items()
            if name in names}
