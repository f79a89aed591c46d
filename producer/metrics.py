"""``GET /metrics``: Prometheus text format (exposition format 0.0.4), cluster-wide.

Every number comes from Redis, so each gunicorn process (and each producer) answers the same:

- read here, at scrape time: queue depth per lane (the broker's lists), live workers (heartbeat
  sets), each live worker's own ORT counters (``keys.worker_stats``);
- recorded by workers (``workers.metrics``; the families and their fixed bucket bounds are in
  ``banter.metrics``): jobs by kind/lane/status/backend, failures by error, tokens, generation
  seconds, queue wait, time to first token, end-to-end latency, batch size, ORT pass time.

Histograms are stored with non-cumulative buckets; this module makes them cumulative, adds
``_count`` (= the ``+Inf`` bucket) and renders every bucket of every series it has seen.
"""

from __future__ import annotations

import time
from collections import defaultdict

from flask import Blueprint, Response

from banter import keys
from banter.errors import Unavailable
from banter.metrics import BY_NAME, FAMILIES, Family, escape_label
from producer.context import ctx

blueprint = Blueprint("metrics", __name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
BACKENDS = ("onnx", "openai")
# worker_stats field suffix -> (family, help)
_WORKER_COUNTERS = {
    "passes": ("banter_worker_ort_passes_total", "ORT passes per live worker and kind."),
    "items": ("banter_worker_ort_items_total",
              "Inputs or sequences run in ORT passes per live worker and kind."),
    "seconds": ("banter_worker_ort_seconds_total",
                "Seconds spent in ORT passes per live worker and kind."),
}


@blueprint.get("/metrics")
def metrics():
    """A broker out of reach while Redis answers (RabbitMQ, or a broker Redis of its own)
    still gives every other metric, with ``banter_broker_up 0`` and no queue depth."""
    c = ctx()
    try:
        depth = c.jobs.queues.depth()
    except Unavailable:
        depth = None
    return Response(render(c.redis, c.settings, depth), content_type=CONTENT_TYPE)


def render(client, settings, depth: dict[str, int] | None) -> str:
    """The exposition text; ``depth``: messages waiting per lane (``BrokerQueues.depth``),
    None when the broker did not answer."""
    since = time.time() - settings.worker_live_s
    pipe = client.pipeline(transaction=False)
    pipe.hgetall(keys.METRICS)
    pipe.zrangebyscore(keys.WORKERS, since, "+inf")
    for backend in BACKENDS:
        pipe.zcount(keys.workers_for(backend), since, "+inf")
    stored, workers, *per_backend = pipe.execute()
    pipe = client.pipeline(transaction=False)
    for node in workers:
        pipe.hgetall(keys.worker_stats(node))
    stats = dict(zip(workers, pipe.execute())) if workers else {}

    out: list[str] = []
    _family(out, "banter_broker_up", "gauge",
            "1 when the broker answered this scrape's queue depth reading, else 0.",
            [("", int(depth is not None))])
    _family(out, "banter_queue_depth", "gauge", "Jobs waiting per lane (both backends' queues).",
            [(_labels(lane=lane), n) for lane, n in (depth or {}).items()])
    _family(out, "banter_live_workers", "gauge",
            "Worker processes with a heartbeat in the last three periods.", [("", len(workers))])
    _family(out, "banter_live_workers_by_backend", "gauge",
            "Live workers per backend they serve (a worker may serve both).",
            [(_labels(backend=b), n) for b, n in zip(BACKENDS, per_backend)])
    for suffix, (name, help_text) in _WORKER_COUNTERS.items():
        samples = []
        for node in sorted(stats):
            for field, value in sorted(stats[node].items()):
                kind, _, counter = field.rpartition("_")
                if counter == suffix and kind:
                    samples.append((_labels(worker=node, kind=kind), value))
        _family(out, name, "counter", help_text, samples)
    counters, histograms = _decode(stored)
    for family in FAMILIES:
        if family.type == "counter":
            _family(out, family.name, "counter", family.help, sorted(counters[family.name]))
        else:
            _histogram(out, family, histograms[family.name])
    return "\n".join(out) + "\n"


def _decode(stored: dict[str, str]):
    """Split the hash's fields into counter samples and histogram series (unknown fields, e.g.
    of a family a newer worker records, are skipped: a family is rendered with its HELP)."""
    counters: dict[str, list[tuple[str, str]]] = defaultdict(list)
    histograms: dict[str, dict[str, dict[str, str]]] = defaultdict(lambda: defaultdict(dict))
    for field, value in stored.items():
        series, _, part = field.partition("|")
        name, brace, labels = series.partition("{")
        family = BY_NAME.get(name)
        if family is None or (family.type == "histogram") != bool(part):
            continue
        labels = brace + labels
        if part:
            histograms[name][labels][part] = value
        else:
            counters[name].append((labels, value))
    return counters, histograms


def _histogram(out: list[str], family: Family, series: dict[str, dict[str, str]]) -> None:
    out += [f"# HELP {family.name} {_help(family.help)}", f"# TYPE {family.name} histogram"]
    for labels in sorted(series):
        parts = series[labels]
        total = 0
        for le in family.le:
            total += int(parts.get(le, 0))
            out.append(f"{family.name}_bucket{_with(labels, le=le)} {total}")
        out.append(f"{family.name}_sum{labels} {_number(parts.get('sum', 0))}")
        out.append(f"{family.name}_count{labels} {total}")


def _family(out: list[str], name: str, kind: str, help_text: str,
            samples: list[tuple[str, object]]) -> None:
    out += [f"# HELP {name} {_help(help_text)}", f"# TYPE {name} {kind}"]
    out += [f"{name}{labels} {_number(value)}" for labels, value in samples]


def _labels(**labels: str) -> str:
    inner = ",".join(f'{k}="{escape_label(str(v))}"' for k, v in labels.items())
    return f"{{{inner}}}" if inner else ""


def _with(labels: str, le: str) -> str:
    """``labels`` (``{a="b"}`` or empty) with ``le`` added last."""
    extra = f'le="{le}"'
    return f"{labels[:-1]},{extra}}}" if labels else f"{{{extra}}}"


def _help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


def _number(value: object) -> str:
    number = float(value)  # type: ignore[arg-type]
    return str(int(number)) if number.is_integer() and abs(number) < 2**53 else repr(number)
