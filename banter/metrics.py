"""The metric families workers record in ``keys.METRICS`` and ``GET /metrics`` renders: names,
types, labels, help and fixed histogram bucket bounds. Shared by both sides (the producer never
imports ``workers``); ``workers.metrics`` writes them, ``producer.metrics`` renders them.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass


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
              "Jobs a worker finished, by kind, lane, final status and the backend that served "
              "them (failed: the backend the job was routed to).",
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
                    "Queued to first started by a worker, of every job a worker finished.",
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
