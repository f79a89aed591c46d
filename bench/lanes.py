"""lanes: interactive latency at idle and while a bulk backlog drains (issue 5: interactive p99
within 2x its idle value).

One worker serves demo-embed and demo-gpt. One client sends ``--requests`` small interactive
requests one after another, alternating ``POST /v1/embeddings`` (one short input) and
``POST /v1/inference`` (``--max-tokens``, 1), first at idle. Then ``--submitters`` threads
enqueue ``--bulk`` embed jobs (``POST /v1/jobs``, lane ``bulk``, ~32-token inputs), or with
``--bulk-kind generate`` generate jobs of ``--bulk-max-tokens`` (60) on those sentences, as fast
as the producer takes them (a 429 is retried after its Retry-After), and, with the backlog draining,
the same interactive requests run again. Reported per kind: p50/p99 at idle and under backlog
and their ratios; how much backlog was left; bulk sentences/s while measuring (the worker's
embed items minus the interactive ones) and how long the bulk jobs that finished meanwhile
waited for interactive ones (``BANTER_BULK_YIELD_MS``); then every bulk job is awaited and
counted by status (``lost``: not succeeded). For inference each request is split into its
stages (HTTP to submit, queue wait, run, finish to answer) from its job record.
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
from urllib.parse import urlparse

import requests

from bench.common import (
    RawEncoder,
    comma_list,
    encoder_model,
    loadavg,
    make_sentences,
    percentiles_ms,
    positive,
    post,
    ratio,
)
from bench.latency import EMBED_INPUT, PROMPT, inference_once, stage_medians_ms
from bench.machine import machine_facts
from bench.stack import BenchStack

log = logging.getLogger("bench.lanes")

DEFAULT_BULK = 10_000
DEFAULT_REQUESTS = 100
DEFAULT_SUBMITTERS = 16
SLOWEST = 3  # slowest inference requests reported with their stages
KINDS = ("embeddings", "inference")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bulk", type=positive, default=DEFAULT_BULK,
                   help=f"bulk embed jobs in the backlog (default {DEFAULT_BULK})")
    p.add_argument("--requests", type=positive, default=DEFAULT_REQUESTS,
                   help=f"interactive requests per kind and phase (default {DEFAULT_REQUESTS})")
    p.add_argument("--kinds", default=",".join(KINDS), type=comma_list(KINDS),
                   help="interactive kinds, alternating: embeddings, inference (default both)")
    p.add_argument("--submitters", type=positive, default=DEFAULT_SUBMITTERS,
                   help=f"threads enqueueing the backlog (default {DEFAULT_SUBMITTERS})")
    p.add_argument("--tokens", type=positive, default=32, help="tokens per bulk input")
    p.add_argument("--bulk-kind", choices=("embed", "generate"), default="embed",
                   help="the backlog's jobs: embed (default), or generate on demo-gpt")
    p.add_argument("--bulk-max-tokens", type=positive, default=60,
                   help="max_tokens of each bulk generate job (default 60)")
    p.add_argument("--max-tokens", type=positive, default=1,
                   help="max_tokens of each interactive inference request (default 1)")
    p.add_argument("--shape", choices=("demo", "minilm"), default="demo",
                   help="the encoder: demo-embed, or a MiniLM-L6-shaped one (random weights) "
                        "whose passes cost ~20x more")
    p.add_argument("--drain-timeout", type=float, default=900.0,
                   help="seconds to wait for the backlog to finish (default 900)")
    p.add_argument("--worker-env", action="append", default=[], metavar="NAME=VALUE",
                   help="extra environment for the worker (repeatable)")
    p.add_argument("--producer-workers", type=positive, default=2)
    p.add_argument("--producer-threads", type=positive, default=64)
    p.add_argument("--broker-url", default=None,
                   help="run on this broker (e.g. amqp://user:pass@host:5672//, RabbitMQ) "
                        "with queues of the bench's own, instead of the private Redis")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")


class Interactive:
    """The interactive client: one session, requests one after another, kinds alternating."""

    def __init__(self, stack: BenchStack, kinds: list[str], embed_model: str,
                 max_tokens: int) -> None:
        self.stack = stack
        self.kinds = kinds
        self.embed_model = embed_model
        self.max_tokens = max_tokens
        self.session = requests.Session()

    def one(self, kind: str) -> tuple[float, dict | None]:
        if kind == "inference":
            return inference_once(self.session, self.stack, PROMPT, self.max_tokens)
        sent = time.perf_counter()
        post(self.session, f"{self.stack.producer_url}/v1/embeddings",
             {"input": EMBED_INPUT, "model": self.embed_model})
        return time.perf_counter() - sent, None

    def phase(self, n: int, backlog=None) -> dict[str, dict]:
        """``n`` requests of each kind. With ``backlog()`` (bulk messages still queued, read
        before and after each request) only requests that ran entirely with a backlog count,
        and the phase ends early when the backlog is gone (``dropped`` counts the others).
        Returns per kind: latencies (s), stages, backlog before each counted request."""
        out = {kind: {"latencies": [], "stages": [], "backlog": [], "dropped": 0}
               for kind in self.kinds}
        for _ in range(n):
            for kind in self.kinds:
                before = backlog() if backlog else None
                if before == 0:
                    return out
                took, stages = self.one(kind)
                if backlog and backlog() == 0:
                    out[kind]["dropped"] += 1
                    return out
                out[kind]["latencies"].append(took)
                if before is not None:
                    out[kind]["backlog"].append(before)
                if stages:
                    out[kind]["stages"].append(stages)
        return out


def bulk_body(kind: str, text: str, model: str, max_tokens: int) -> dict:
    """One bulk job: an embed of ``text``, or a greedy generation from it."""
    if kind == "embed":
        return {"kind": "embed", "input": text, "lane": "bulk", "model": model}
    return {"kind": "generate", "input": text, "lane": "bulk", "model": model,
            "params": {"max_tokens": max_tokens, "temperature": 0}}


def enqueue(url: str, bodies: list[dict], submitters: int) -> tuple[list[str], float, int]:
    """POST every body as a job from ``submitters`` threads; (ids, seconds, 429 answers
    seen)."""
    ids: list[str | None] = [None] * len(bodies)
    cursor = iter(range(len(bodies)))
    lock = threading.Lock()
    refused = [0]
    errors: list[str] = []

    def submitter() -> None:
        with requests.Session() as session:
            while not errors:
                with lock:
                    i = next(cursor, None)
                if i is None:
                    return
                while True:
                    response = session.post(f"{url}/v1/jobs", json=bodies[i], timeout=60)
                    if response.status_code != 429:
                        break
                    with lock:
                        refused[0] += 1
                    time.sleep(min(float(response.headers.get("Retry-After") or 1), 1.0))
                if response.status_code != 202:
                    errors.append(f"HTTP {response.status_code}: {response.text[:300]}")
                    return
                ids[i] = response.json()["id"]

    started = time.perf_counter()
    threads = [threading.Thread(target=submitter, daemon=True) for _ in range(submitters)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise RuntimeError(f"enqueueing the backlog failed: {errors[0]}")
    return [i for i in ids if i], time.perf_counter() - started, refused[0]


def statuses(stack: BenchStack, ids: list[str]) -> dict[str, int]:
    from banter import keys

    counts: dict[str, int] = {}
    for start in range(0, len(ids), 2000):
        pipe = stack.redis.pipeline(transaction=False)
        for job_id in ids[start:start + 2000]:
            pipe.hget(keys.job(job_id), "status")
        for status in pipe.execute():
            counts[str(status)] = counts.get(str(status), 0) + 1
    return counts


def broker_name(url: str | None) -> str:
    """The broker a run used, without credentials."""
    if not url:
        return "the stack's private Redis"
    parsed = urlparse(url)
    return f"{parsed.scheme}://{parsed.hostname}:{parsed.port or ''}{parsed.path}"


def slowest(latencies: list[float], stages: list[dict[str, float]],
            count: int = SLOWEST) -> list[dict[str, float]]:
    """The ``count`` slowest requests with their stages, in ms: where the tail comes from."""
    ranked = sorted(zip(latencies, stages), key=lambda pair: pair[0], reverse=True)[:count]
    return [{"latency": round(took * 1000, 3), **{k: round(v * 1000, 3) for k, v in parts.items()}}
            for took, parts in ranked]


def summary(phase: dict[str, dict]) -> dict[str, dict]:
    out = {}
    for kind, data in phase.items():
        out[kind] = {"latency_ms": percentiles_ms(data["latencies"])}
        if data["stages"]:
            out[kind]["stages_p50_ms"] = stage_medians_ms(data["stages"])
            out[kind]["slowest_ms"] = slowest(data["latencies"], data["stages"])
        if data["backlog"]:
            out[kind]["bulk_queued"] = {"first": data["backlog"][0], "last": data["backlog"][-1],
                                        "dropped_samples": data["dropped"]}
    return out


def run(args: argparse.Namespace) -> dict:
    began = time.perf_counter()
    load_at_start = loadavg()
    from banter import keys
    from banter.broker import BrokerQueues, make_celery
    from banter.demo import DEMO_GPT, build_demo
    from banter.metrics import BULK_YIELD
    from banter.settings import Settings

    kinds = args.kinds
    worker_env = dict(item.split("=", 1) for item in args.worker_env)
    settings = Settings()
    with BenchStack(keep=args.keep, broker_url=args.broker_url) as stack:
        gpt_dir = build_demo(stack.model_root)[DEMO_GPT]
        embed_name, embed_dir, embed_record = encoder_model(stack, None, None, args.shape)
        models = {DEMO_GPT: stack.promote(DEMO_GPT, "generate", gpt_dir), embed_name: embed_record}
        texts = make_sentences(args.bulk, RawEncoder(embed_dir, 1).tokenizer, args.tokens)
        stack.start_producer(args.producer_workers, args.producer_threads)
        node = stack.start_worker("lanes", worker_env)
        client = Interactive(stack, kinds, embed_name, args.max_tokens)
        queues = BrokerQueues(stack.settings, make_celery(stack.settings), stack.redis)
        client.phase(10)  # warm-up: models load, connections open
        idle = client.phase(args.requests)
        log.info("idle: %s", {k: percentiles_ms(v["latencies"])["p50"] for k, v in idle.items()})

        def waiting() -> int:
            return queues.depth()["bulk"]

        def counters() -> dict[str, float]:
            stats = {k: float(v) for k, v in stack.redis.hgetall(keys.worker_stats(node)).items()}
            yielded = stack.redis.hget(keys.METRICS, BULK_YIELD.series(kind=args.bulk_kind))
            return {**stats, "bulk_yield_s": float(yielded or 0.0)}

        bulk_model = embed_name if args.bulk_kind == "embed" else DEMO_GPT
        bodies = [bulk_body(args.bulk_kind, text, bulk_model, args.bulk_max_tokens)
                  for text in texts]
        ids, enqueue_s, refused = enqueue(stack.producer_url, bodies, args.submitters)
        backlog_start = waiting()
        log.info("enqueued %d bulk jobs in %.1fs (%.0f/s, %d 429s); %d still queued",
                 len(ids), enqueue_s, len(ids) / enqueue_s, refused, backlog_start)
        before, measure_started = counters(), time.perf_counter()
        loaded = client.phase(args.requests, backlog=waiting)
        measure_s = time.perf_counter() - measure_started
        during = {k: v - before.get(k, 0.0) for k, v in counters().items()}
        interactive_embeds = (len(loaded["embeddings"]["latencies"]) + loaded["embeddings"]["dropped"]
                              if "embeddings" in loaded else 0)
        bulk_items = during.get("embed_items", 0.0) - interactive_embeds
        passes = during.get("embed_passes", 0.0)
        generated = during.get("generate_items", 0.0)
        engine = {"embed_passes": int(passes),
                  "embed_mean_batch": round(during.get("embed_items", 0.0) / passes, 2)
                  if passes else 0,
                  "embed_ort_share_of_wall": round(during.get("embed_seconds", 0.0) / measure_s, 3),
                  "generate_passes": int(during.get("generate_passes", 0.0)),
                  "generate_rows": int(generated)}
        backlog_end = waiting()
        log.info("under backlog: %s; %d bulk jobs still queued",
                 {k: percentiles_ms(v["latencies"])["p50"] for k, v in loaded.items()}, backlog_end)

        drain_started = time.perf_counter()
        deadline = time.monotonic() + args.drain_timeout
        while True:
            counts = statuses(stack, ids)
            if not counts.get("queued") and not counts.get("running"):
                break
            if time.monotonic() > deadline:
                log.warning("the backlog did not drain in %.0fs: %s", args.drain_timeout, counts)
                break
            time.sleep(1.0)
        drain_s = time.perf_counter() - drain_started

    idle_s, loaded_s = summary(idle), summary(loaded)
    ratios = {}
    for kind in kinds:
        for q in ("p50", "p99"):
            ratios[f"{kind}_{q}"] = ratio(loaded_s[kind]["latency_ms"][q],
                                          idle_s[kind]["latency_ms"][q], 2)
    headline = kinds[0]
    short = [kind for kind in kinds if loaded_s[kind]["latency_ms"]["n"] < args.requests]
    if short:
        log.warning("the backlog drained before %d requests of %s ran under it: enqueue a larger "
                    "--bulk", args.requests, ", ".join(short))
    succeeded = counts.get("succeeded", 0)
    return {
        "scenario": "lanes",
        "unit": f"ms, interactive {headline} p99 during the bulk backlog",
        "served": loaded_s[headline]["latency_ms"]["p99"],
        "baselines": {"idle_p99": idle_s[headline]["latency_ms"]["p99"]},
        "ratios": ratios,
        "target": "interactive p99 under backlog <= 2x idle (issue 5)",
        "meets_target": {kind: ratios[f"{kind}_p99"] is not None and ratios[f"{kind}_p99"] <= 2
                         for kind in kinds},
        "idle": idle_s,
        "backlog": loaded_s,
        "bulk": {
            "jobs": len(ids), "enqueue_s": round(enqueue_s, 2),
            "enqueue_per_s": round(len(ids) / enqueue_s, 1), "refused_429": refused,
            "queued_when_measuring_began": backlog_start, "queued_when_measuring_ended": backlog_end,
            "measure_s": round(measure_s, 2),
            "kind": args.bulk_kind,
            "sentences_per_s_while_measuring": round(bulk_items / measure_s, 1),
            "yield_s_while_measuring": round(during.get("bulk_yield_s", 0.0), 2),
            "engine_while_measuring": engine,
            "drain_after_measuring_s": round(drain_s, 2),
            "statuses": counts, "lost": len(ids) - succeeded,
        },
        "correct": succeeded == len(ids) == args.bulk,
        "settings": {
            "bulk": args.bulk, "requests_per_kind": args.requests, "kinds": kinds,
            "submitters": args.submitters, "tokens_per_bulk_input": args.tokens,
            "bulk_kind": args.bulk_kind, "bulk_max_tokens": args.bulk_max_tokens,
            "interactive": {"embeddings": {"input": EMBED_INPUT},
                            "inference": {"prompt": PROMPT, "max_tokens": args.max_tokens}},
            "models": models, "shape": args.shape, "worker_env": worker_env,
            "worker_concurrency": settings.worker_concurrency,
            "batch_size": settings.max_batch(), "max_queue_depth": settings.max_queue_depth,
            "producer": {"workers": args.producer_workers, "threads": args.producer_threads},
            "broker": broker_name(args.broker_url),
        },
        "machine": {**machine_facts(), "loadavg_at_start": load_at_start,
                    "loadavg_at_end": loadavg()},
        "duration_s": round(time.perf_counter() - began, 2),
    }
