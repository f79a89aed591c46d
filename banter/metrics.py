"""The metric families recorded in ``keys.METRICS`` and rendered by ``GET /metrics``: names,
types, labels, help and fixed histogram bucket bounds, and the script part that counts a job
when it ends. Shared by both sides (the producer never imports ``workers``): ``workers.metrics``
records passes, ``jobs.JobStore.finish`` records every job's end (whoever ends it: a worker,
or the producer for a queued job cancelled, expired or refused by the broker), and
``producer.metrics`` renders them.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Family:
    """One metric family. Histogram ``bounds`` are fixed upper bounds (``+Inf`` is implied)."""

    name: str
    type: str  # "counter" | "histogram"
    help: str
    labels: tuple[str, ...]
    bounds: tuple[float, ...] = ()

    def series(self, **labels: str) -> str:
        """The hash field of the series with ``labels`` (in the family's label order)."""
        if set(labels) != set(self.labels):
            raise ValueError(f"{self.name} takes labels {self.labels}, got {sorted(labels)}")
        if not self.labels:
            return self.name
        inner = ",".join(f'{name}="{escape_label(str(labels[name]))}"' for name in self.labels)
        return f"{self.name}{{{inner}}}"

    @property
    def le(self) -> tuple[str, ...]:
        """Bucket labels, in bound order (the last is ``+Inf``)."""
        return (*(le_label(b) for b in self.bounds), "+Inf")

    def bucket(self, value: float) -> str:
        """The ``le`` label of the (non-cumulative) bucket ``value`` falls in."""
        return self.le[bisect.bisect_left(self.bounds, value)]


def le_label(bound: float) -> str:
    return repr(float(bound))


def escape_label(value: str) -> str:
    return value.replace("\\", r"\\").replace('"', r"\"").replace("\n", r"\n")


_LATENCY_BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   300.0, 1800.0)  # bulk backlogs wait minutes: the top buckets are for them

JOBS = Family("banter_jobs_total", "counter",
              "Jobs that ended, by kind, lane, final status and the backend that served them "
              "(one that never ran, or failed: the backend it was routed to).",
              ("kind", "lane", "status", "backend"))
FAILURES = Family("banter_job_failures_total", "counter",
                  "Failed jobs by kind and error type.", ("kind", "error"))
PROMPT_TOKENS = Family("banter_prompt_tokens_total", "counter",
                       "Input tokens of finished jobs.", ("kind", "backend"))
GENERATED_TOKENS = Family("banter_generated_tokens_total", "counter",
                          "Completion tokens of finished generate jobs (cancelled ones too).",
                          ("backend",))
GENERATION_SECONDS = Family("banter_generation_seconds_total", "counter",
                            "Run time (started to finished) of the generate jobs counted in "
                            "banter_generated_tokens_total: tokens per second per stream = "
                            "rate(generated_tokens) / rate(generation_seconds).", ("backend",))
QUEUE_WAIT = Family("banter_queue_wait_seconds", "histogram",
                    "Queued to first started by a worker, of every ended job a worker started.",
                    ("kind", "lane"), _LATENCY_BOUNDS)
TTFT = Family("banter_time_to_first_token_seconds", "histogram",
              "Queued to first token published, of generate jobs that produced one.",
              ("backend", "lane"), (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                                    30.0, 60.0, 300.0, 1800.0))
LATENCY = Family("banter_job_latency_seconds", "histogram",
                 "End to end (queued to finished) of succeeded jobs.", ("kind", "lane"),
                 _LATENCY_BOUNDS)
BATCH_SIZE = Family("banter_batch_size", "histogram",
                    "Sequences (generate) or inputs (embed) per ORT pass.", ("kind",),
                    (1, 2, 4, 8, 16, 32, 64))
ORT_PASS = Family("banter_ort_pass_seconds", "histogram",
                  "Wall time of one ONNX Runtime pass (session.run).", ("kind",),
                  (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   10.0))

BULK_YIELD = Family("banter_bulk_yield_seconds_total", "counter",
                    "Seconds bulk jobs waited for interactive ones in their worker "
                    "(BANTER_BULK_YIELD_MS).", ("kind",))

FAMILIES: tuple[Family, ...] = (JOBS, FAILURES, PROMPT_TOKENS, GENERATED_TOKENS,
                                GENERATION_SECONDS, QUEUE_WAIT, TTFT, LATENCY, BATCH_SIZE,
                                ORT_PASS, BULK_YIELD)
BY_NAME = {family.name: family for family in FAMILIES}


# -- per ended job ------------------------------------------------------------------------------

# job_end(metrics, job, stream, spec): count one ended job in the ``metrics`` hash. ``spec`` is
# ``job_end_spec``'s JSON {queued_at, finished_at, ttft: bool, incr: [[field, n]],
# incrf: [[field, x | name]], observe: [[series, x | name, [bounds], [le labels]]]} where name
# is one of the values the function derives: wait (the job's started_at - queued_at), run
# (finished_at - started_at), ttft (the id time of the stream's first entry, when it is token
# 0, - queued_at). Returns those it could derive, as JSON (seconds). ``jobs._FINISH`` runs it in
# the script that ends the job, so a job is counted exactly when it ends, and once.
JOB_END_FUNCTION = """
local function job_end(metrics, job, stream, spec_json)
  local spec = cjson.decode(spec_json)
  local values = {}
  local queued = tonumber(spec.queued_at)
  local started = tonumber(redis.call('HGET', job, 'started_at'))
  if started and queued then values.wait = math.max(0, started - queued) end
  if started then values.run = math.max(0, spec.finished_at - started) end
  if spec.ttft and queued then
    local first = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)[1]
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
  for _, op in ipairs(spec.incr) do redis.call('HINCRBY', metrics, op[1], op[2]) end
  for _, op in ipairs(spec.incrf) do
    local v = value(op[2])
    if v then redis.call('HINCRBYFLOAT', metrics, op[1], v) end
  end
  for _, op in ipairs(spec.observe) do
    local v = value(op[2])
    if v then
      local le = '+Inf'
      for i, bound in ipairs(op[3]) do
        if v <= bound then le = op[4][i]; break end
      end
      redis.call('HINCRBY', metrics, op[1] .. '|' .. le, 1)
      redis.call('HINCRBYFLOAT', metrics, op[1] .. '|sum', v)
    end
  end
  return cjson.encode(values)
end
"""


def _observe(family: Family, value: float | str, **labels: str) -> list[Any]:
    return [family.series(**labels), value, list(family.bounds), list(family.le[:-1])]


def job_end_spec(kind: str, lane: str, status: str, backend: str | None,
                 queued_at: float | None, finished_at: float,
                 usage: dict[str, int] | None = None, error: str | None = None,
                 yielded_s: float = 0.0) -> str:
    """What ``JOB_END_FUNCTION`` records of one ended job, as its JSON argument: the job
    counters, queue wait, run time, tokens, time to first token, latency of a succeeded job.
    ``backend``: the one that served it (a job that never ran: the one it was routed to);
    ``yielded_s``: how long it waited for interactive jobs (``workers/lanes.py``)."""
    backend = backend or "unknown"
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
    return json.dumps({"queued_at": queued_at, "finished_at": finished_at, "ttft": generate,
                       "incr": incr, "incrf": incrf, "observe": observe})


def timings_ms(values: dict[str, float]) -> dict[str, float]:
    """``JOB_END_FUNCTION``'s values, named and in milliseconds for a log line."""
    names = {"wait": "queue_ms", "run": "run_ms", "ttft": "ttft_ms"}
    return {names[name]: round(seconds * 1000.0, 2) for name, seconds in values.items()
            if name in names}
