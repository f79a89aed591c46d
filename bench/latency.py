"""latency: end-to-end p50/p99 at idle for one small request vs the raw ONNX Runtime call
alone and vs a Redis round trip (the floor).

One client sends ``--requests`` requests one after another (keep-alive) of each kind:

* ``inference``: ``POST /v1/inference`` with a short prompt, ``max_tokens`` 1, temperature 0
  (one prefill pass of demo-gpt), answered when the job's stream ends;
* ``embeddings``: ``POST /v1/embeddings`` with one short input (one pass of demo-embed).

Baselines, same inputs, in this process: ``raw_ort``: tokenize + the one ORT pass (+ pooling
for the encoder), best of one intra-op thread and ORT's default; ``redis_ping``: a ``PING``
round trip to the stack's Redis. ``served_minus_raw_ms`` is served p50 minus raw p50. A
diagnostic phase repeats ``embeddings`` on a worker with ``BANTER_BATCH_WINDOW_MS=0`` (a lone
embed waits up to the batch window for company). For ``inference`` each request is also
split, from its job record's timestamps (same machine clock), into HTTP to submit, queue wait,
run and finish to answer.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import requests

from bench.common import RawEncoder, loadavg, percentiles_ms, positive, post, ratio
from bench.machine import machine_facts
from bench.stack import BenchStack

log = logging.getLogger("bench.latency")

DEFAULT_REQUESTS = 300
DEFAULT_WARMUP = 30
PROMPT = "Hello there, how are you?"
EMBED_INPUT = "a short sentence to embed"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--requests", type=positive, default=DEFAULT_REQUESTS,
                   help=f"timed requests of each kind (default {DEFAULT_REQUESTS})")
    p.add_argument("--warmup", type=int, default=DEFAULT_WARMUP,
                   help=f"untimed requests of each kind first (default {DEFAULT_WARMUP})")
    p.add_argument("--prompt", default=PROMPT, help="the inference prompt")
    p.add_argument("--input", default=EMBED_INPUT, help="the embeddings input")
    p.add_argument("--no-window-diagnostic", action="store_true",
                   help="skip the embeddings run on a worker with BANTER_BATCH_WINDOW_MS=0")
    p.add_argument("--gpu", type=int, default=None, help="run the worker on GPU N")
    p.add_argument("--producer-workers", type=positive, default=2)
    p.add_argument("--producer-threads", type=positive, default=64)
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")


def timed(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        started = time.perf_counter()
        fn()
        out.append(time.perf_counter() - started)
    return out


def raw_calls(gpt_dir: Path, embed_dir: Path, prompt: str, text: str, n: int,
              warmup: int) -> dict[str, dict]:
    """Per kind and intra-op thread count: percentiles of tokenize + one pass (+ pool)."""
    from bench.generate import RawDecoder

    out: dict[str, dict] = {"inference": {}, "embeddings": {}}
    for threads in (1, 0):
        decoder = RawDecoder(gpt_dir, threads)
        encoder = RawEncoder(embed_dir, threads)

        def generate_one() -> None:
            decoder.generate([decoder.encode(prompt)], [1])

        def embed_one() -> None:
            encoder.embed([text])

        for kind, fn in (("inference", generate_one), ("embeddings", embed_one)):
            timed(fn, warmup)
            out[kind][f"threads_{threads or 'default'}"] = percentiles_ms(timed(fn, n))
    return out


def best(per_threads: dict[str, dict]) -> tuple[str, dict]:
    return min(per_threads.items(), key=lambda item: item[1]["p50"])


def inference_once(session: requests.Session, stack: BenchStack, prompt: str,
                   max_tokens: int = 1) -> tuple[float, dict[str, float]]:
    """One ``POST /v1/inference``: (seconds, its stages in seconds from the job record's
    timestamps: client_to_queued, queue_wait, run, finished_to_client)."""
    from banter import keys

    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    sent_wall, sent = time.time(), time.perf_counter()
    answer = post(session, f"{stack.producer_url}/v1/inference", body)
    took, done_wall = time.perf_counter() - sent, time.time()
    if answer.get("finish_reason") not in ("length", "stop"):
        raise RuntimeError(f"unexpected answer {answer}")
    queued, started, finished = (float(x) for x in stack.redis.hmget(
        keys.job(answer["id"]), "queued_at", "started_at", "finished_at"))
    return took, {"client_to_queued": queued - sent_wall, "queue_wait": started - queued,
                  "run": finished - started, "finished_to_client": done_wall - finished}


def stage_medians_ms(stages: list[dict[str, float]]) -> dict[str, float]:
    return {k: round(float(np.median([s[k] for s in stages])) * 1000, 3)
            for k in (stages[0] if stages else {})}


def served_inference(stack: BenchStack, prompt: str, n: int, warmup: int) -> tuple[dict, dict]:
    """Sequential POST /v1/inference; (percentiles, per-stage medians from job records)."""
    latencies, stages = [], []
    with requests.Session() as session:
        for i in range(warmup + n):
            took, parts = inference_once(session, stack, prompt)
            if i >= warmup:
                latencies.append(took)
                stages.append(parts)
    return percentiles_ms(latencies), stage_medians_ms(stages)


def served_embeddings(url: str, text: str, n: int, warmup: int) -> dict:
    with requests.Session() as session:
        def call() -> None:
            post(session, f"{url}/v1/embeddings", {"input": text})

        timed(call, warmup)
        return percentiles_ms(timed(call, n))


def run(args: argparse.Namespace) -> dict:
    began = time.perf_counter()
    load_at_start = loadavg()
    from banter.demo import DEMO_EMBED, DEMO_GPT, build_demo
    from banter.settings import Settings

    defaults = Settings()
    with BenchStack(keep=args.keep, gpu=args.gpu) as stack:
        dirs = build_demo(stack.model_root)
        models = {DEMO_GPT: stack.promote(DEMO_GPT, "generate", dirs[DEMO_GPT]),
                  DEMO_EMBED: stack.promote(DEMO_EMBED, "embed", dirs[DEMO_EMBED])}
        ping = percentiles_ms(timed(stack.redis.ping, args.requests + args.warmup)[args.warmup:])
        log.info("redis PING p50 %.3f ms", ping["p50"])
        raw = raw_calls(dirs[DEMO_GPT], dirs[DEMO_EMBED], args.prompt, args.input,
                        args.requests, args.warmup)
        stack.start_producer(args.producer_workers, args.producer_threads)
        node = stack.start_worker("latency")
        inference, stages = served_inference(stack, args.prompt, args.requests, args.warmup)
        log.info("inference p50 %.2f ms", inference["p50"])
        embeddings = served_embeddings(stack.producer_url, args.input, args.requests, args.warmup)
        log.info("embeddings p50 %.2f ms", embeddings["p50"])
        providers = stack.worker_providers(node)
        window0 = None
        if not args.no_window_diagnostic:
            stack.stop_worker(node)
            stack.start_worker("window0", {"BANTER_BATCH_WINDOW_MS": "0"})
            window0 = served_embeddings(stack.producer_url, args.input, args.requests,
                                        args.warmup)
            log.info("embeddings, window 0: p50 %.2f ms", window0["p50"])

    raw_best = {kind: best(per) for kind, per in raw.items()}
    served_kinds = {"inference": inference, "embeddings": embeddings}
    if window0:
        served_kinds["embeddings_window_0"] = window0
    minus = {kind: round(result["p50"] - raw_best[kind.split("_window")[0]][1]["p50"], 3)
             for kind, result in served_kinds.items()}
    headline = inference["p50"]
    baselines = {"raw_ort": raw_best["inference"][1]["p50"], "redis_ping": ping["p50"]}
    return {
        "scenario": "latency",
        "unit": "ms (p50, POST /v1/inference max_tokens 1)",
        "served": headline,
        "baselines": baselines,
        "ratios": {name: ratio(headline, value) for name, value in baselines.items()},
        "served_minus_raw_ms": minus,
        "served_ms": served_kinds,
        "raw_ort_ms": {kind: {"best": raw_best[kind][0], **per} for kind, per in raw.items()},
        "redis_ping_ms": ping,
        "inference_stages_p50_ms": stages,
        "ratios_by_kind": {kind: {"raw_ort": ratio(result["p50"],
                                                   raw_best[kind.split("_window")[0]][1]["p50"]),
                                  "redis_ping": ratio(result["p50"], ping["p50"])}
                           for kind, result in served_kinds.items()},
        "settings": {
            "requests": args.requests, "warmup": args.warmup, "prompt": args.prompt,
            "input": args.input, "max_tokens": 1, "temperature": 0, "models": models,
            "batch_window_ms": defaults.batch_window_ms, "worker_providers": providers,
            "client": "one requests.Session, sequential, keep-alive",
            "producer": {"workers": args.producer_workers, "threads": args.producer_threads},
        },
        "machine": {**machine_facts(), "loadavg_at_start": load_at_start,
                    "loadavg_at_end": loadavg()},
        "duration_s": round(time.perf_counter() - began, 2),
    }
