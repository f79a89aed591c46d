"""embed: sentences per second at saturation through the whole stack vs the raw ONNX Runtime
batched loop and a naive Celery task that runs one ORT call per input.

``--sentences`` distinct sentences of about ``--tokens`` tokens each (special tokens included)
are embedded by every path:

* served: ``--clients`` client threads, closed loop, each ``POST /v1/embeddings`` with
  ``--inputs-per-request`` sentences (one embed job), through the producer (gunicorn),
  Redis/Celery and one ``banter worker`` (thread pool, batching engine, batch size
  BANTER_INFERENCE_MAX_BATCH_SIZE);
* raw_ort baseline: one process, tokenize + pad + one ORT pass + mean pool per batch of the
  same size, no Redis/HTTP; also the reference every other path must match within 1e-4;
* naive_celery baseline: a plain Celery task (``bench/naive_worker.py``) doing ONE ORT call per
  input, on the same Redis, with the served worker's thread pool and concurrency; the same
  number of client threads each send one task per sentence of a chunk, all at once, and wait
  for their replies (``BLPOP``), closed loop.

Served and naive runs are interleaved ``--repeats`` times; each figure is the median.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import requests

from bench.common import (
    RawEncoder,
    comma_list,
    encoder_model,
    env_pair,
    loadavg,
    make_sentences,
    max_abs_diff,
    non_negative,
    percentiles_ms,
    positive,
    post,
    ratio,
    run_released,
)
from bench.machine import machine_facts
from bench.stack import BenchStack

log = logging.getLogger("bench.embed")

DEFAULT_CLIENTS = 8
DEFAULT_INPUTS_PER_REQUEST = 64
DEFAULT_SENTENCES = 2048
DEFAULT_TOKENS = 32
DEFAULT_REPEATS = 2
TOLERANCE = 1e-4
BASELINES = ("raw_ort", "naive_celery")
REPO_ROOT = Path(__file__).resolve().parent.parent


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sentences", type=positive, default=DEFAULT_SENTENCES,
                   help=f"sentences per timed run (default {DEFAULT_SENTENCES})")
    p.add_argument("--clients", type=positive, default=DEFAULT_CLIENTS,
                   help=f"concurrent client threads, served and naive (default {DEFAULT_CLIENTS})")
    p.add_argument("--inputs-per-request", type=positive, default=DEFAULT_INPUTS_PER_REQUEST,
                   help="sentences per POST /v1/embeddings, and per chunk of naive tasks sent "
                        "at once (at most BANTER_EMBED_MAX_INPUTS; default "
                        f"{DEFAULT_INPUTS_PER_REQUEST})")
    p.add_argument("--encoding", choices=("base64", "float"), default="base64",
                   help="encoding_format of the served requests (default base64, what the "
                        "official openai client asks for unless told otherwise)")
    p.add_argument("--tokens", type=positive, default=DEFAULT_TOKENS,
                   help=f"tokens per sentence, special tokens included (default {DEFAULT_TOKENS})")
    p.add_argument("--repeats", type=positive, default=DEFAULT_REPEATS,
                   help=f"timed runs of each path, interleaved; medians (default {DEFAULT_REPEATS})")
    p.add_argument("--shape", choices=("demo", "minilm"), default="demo",
                   help="encoder when no --model-dir: demo-embed (2 layers, 128 wide) or a "
                        "MiniLM-L6-shaped one (6 layers, 384 wide, random weights)")
    p.add_argument("--model-dir", type=Path, default=None,
                   help="an encoder directory (model.onnx with input_ids/attention_mask -> "
                        "last_hidden_state, tokenizer.json, config.json) to serve instead; its "
                        "parent becomes the model root")
    p.add_argument("--model-name", default=None, help="registry name for --model-dir")
    p.add_argument("--baselines", default="raw_ort,naive_celery",
                   type=comma_list(BASELINES, empty_ok=True),
                   help="comma-separated subset of raw_ort, naive_celery (the raw loop always "
                        "runs once: it is the correctness reference)")
    p.add_argument("--raw-threads", default="1,0", type=comma_list(item=non_negative),
                   help="intra-op thread counts to try for the raw loop, comma-separated (0: "
                        "ORT's default, all cores, as the workers use); the baseline is the "
                        "fastest (default 1,0)")
    p.add_argument("--worker-env", action="append", default=[], metavar="NAME=VALUE", type=env_pair,
                   help="extra environment for the served worker (repeatable), e.g. "
                        "BANTER_BATCH_WINDOW_MS=2")
    p.add_argument("--gpu", type=int, default=None,
                   help="run the served and naive workers on GPU N (CUDA provider)")
    p.add_argument("--producer-workers", type=positive, default=2)
    p.add_argument("--producer-threads", type=positive, default=64)
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")


# -- client loops ----------------------------------------------------------------------------

class ClosedLoop:
    """``clients`` threads take the next chunk of work until none is left; each chunk's
    outcome lands at its index. ``run(work)`` returns the wall time from the common start."""

    def __init__(self, clients: int) -> None:
        self.clients = clients

    def run(self, chunks: list, call) -> tuple[list, list[float], float]:
        results: list = [None] * len(chunks)
        latencies: list[float] = [0.0] * len(chunks)
        errors: list[str] = []
        lock = threading.Lock()
        cursor = iter(range(len(chunks)))
        barrier = threading.Barrier(self.clients + 1)

        def client() -> None:
            state = {}
            barrier.wait()
            while True:
                with lock:
                    index = next(cursor, None)
                if index is None or errors:
                    return
                sent = time.perf_counter()
                try:
                    results[index] = call(state, chunks[index])
                except Exception as exc:  # any failure: reported, the run stops
                    with lock:
                        errors.append(f"chunk {index}: {type(exc).__name__}: {exc}")
                    return
                latencies[index] = time.perf_counter() - sent

        threads = [threading.Thread(target=client, daemon=True) for _ in range(self.clients)]
        started = run_released(threads, barrier)
        wall = time.perf_counter() - started
        if errors:
            raise RuntimeError(f"{len(errors)} client errors, first: {errors[0]}")
        return results, latencies, wall


def served_call(url: str, model: str, encoding: str):
    def call(state: dict, texts: list[str]) -> list[list[float]]:
        session = state.setdefault("session", requests.Session())
        body = post(session, f"{url}/v1/embeddings",
                    {"input": texts, "model": model, "encoding_format": encoding})
        vectors = [item["embedding"] for item in sorted(body["data"], key=lambda d: d["index"])]
        if encoding == "base64":
            vectors = [np.frombuffer(base64.b64decode(v), dtype="<f4").tolist() for v in vectors]
        return vectors
    return call


def naive_call(app, redis_url: str, timeout_s: float = 300.0):
    import redis

    from bench.naive_worker import QUEUE, TASK

    # the reply wait blocks up to timeout_s: the socket must outlast it (redis-py 8 defaults
    # socket_timeout to 5 s, and a BLPOP past it fails with "Timeout reading from socket")
    client = redis.Redis.from_url(redis_url, socket_timeout=timeout_s + 5)

    def call(state: dict, texts: list[str]) -> list[list[float]]:
        replies = [f"bench:naive:reply:{uuid.uuid4().hex}" for _ in texts]
        for text, key in zip(texts, replies):
            app.send_task(TASK, args=[text, key], queue=QUEUE)
        out = []
        for key in replies:
            reply = client.blpop([key], timeout=timeout_s)
            if reply is None:
                raise TimeoutError(f"no reply on {key} in {timeout_s:.0f}s")
            out.append(json.loads(reply[1]))
        return out
    return call


def start_naive_worker(stack: BenchStack, model_dir: Path, concurrency: int,
                       providers: str) -> tuple[object, str]:
    """The naive Celery worker as a child process; returns (client app, redis url) once a
    warm-up task came back (the worker consumes and its model is loaded)."""
    from bench.naive_worker import QUEUE, app

    url = stack.env["BANTER_REDIS_URL"]
    env = {"BENCH_NAIVE_REDIS_URL": url, "BENCH_NAIVE_MODEL_DIR": str(model_dir),
           "BENCH_NAIVE_PROVIDERS": providers,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    if stack.gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(stack.gpu)
    child = stack.start_child("naive-worker", [
        sys.executable, "-m", "celery", "-A", "bench.naive_worker", "worker", "--pool", "threads",
        "--concurrency", str(concurrency), "--queues", QUEUE, "--prefetch-multiplier", "1",
        "--loglevel", "WARNING", "--without-gossip", "--without-mingle", "--without-heartbeat",
        "--hostname", "bench-naive@%h"], env)
    app.conf.broker_url = url
    call = naive_call(app, url, timeout_s=90.0)
    try:
        call({}, ["warm up"])
    except TimeoutError:
        raise RuntimeError(f"the naive worker did not answer:\n{child.log_tail()}") from None
    return app, url


# -- scenario --------------------------------------------------------------------------------

def worker_counters(stack: BenchStack, node: str) -> dict[str, float]:
    from banter import keys

    return {k: float(v) for k, v in stack.redis.hgetall(keys.worker_stats(node)).items()}


def summarize(runs: list[tuple[list, list[float], float]], n: int, reference: np.ndarray) -> dict:
    rates = [n / wall for _, _, wall in runs]
    worst = max(max_abs_diff([v for chunk in results for v in chunk], reference)
                for results, _, _ in runs)
    return {"sentences_per_s": round(float(np.median(rates)), 2),
            "runs_sentences_per_s": [round(r, 2) for r in rates],
            "wall_s": [round(wall, 3) for _, _, wall in runs],
            "request_latency_ms": percentiles_ms([x for _, lat, _ in runs for x in lat]),
            "max_abs_diff": worst, "correct": bool(worst <= TOLERANCE)}


def run(args: argparse.Namespace) -> dict:
    began = time.perf_counter()
    load_at_start = loadavg()
    from banter.settings import Settings
    from workers.runner import select_providers

    baselines = set(args.baselines)
    worker_env = dict(args.worker_env)
    # the served worker's settings (the environment plus --worker-env): its
    # BANTER_INFERENCE_MAX_BATCH_SIZE is the raw loop's batch size too
    defaults = Settings.from_env({**os.environ, **worker_env})
    batch_size = defaults.max_batch()
    if args.inputs_per_request > defaults.embed_max_inputs:
        raise ValueError(f"--inputs-per-request is at most {defaults.embed_max_inputs}")
    model_root = args.model_dir.resolve().parent if args.model_dir else None

    with BenchStack(model_root=model_root, keep=args.keep, gpu=args.gpu) as stack:
        # the worker's own choice
        providers = select_providers(use_gpu=stack.gpu is not None, tf32=defaults.cuda_tf32)
        name, model_dir, promoted = encoder_model(stack, args.model_dir, args.model_name,
                                                  args.shape)
        raw_by_threads, reference, encoder = {}, None, None
        for threads in args.raw_threads:
            encoder = RawEncoder(model_dir, threads, providers)
            texts = make_sentences(args.sentences, encoder.tokenizer, args.tokens)
            encoder.loop(texts[:4 * batch_size], batch_size)  # warm-up
            runs = []
            for _ in range(args.repeats if "raw_ort" in baselines else 1):
                reference, seconds = encoder.loop(texts, batch_size)
                runs.append(seconds)
            raw_by_threads[threads] = {
                "sentences_per_s": round(args.sentences / float(np.median(runs)), 2),
                "runs_s": [round(x, 4) for x in runs],
                "pass_only_sentences_per_s": _pass_only(encoder, texts, batch_size),
                "batch1_pass_only_sentences_per_s": _pass_only(encoder, texts[:200], 1)}
            log.info("raw ORT loop, %s intra-op threads: %.1f sentences/s (batch %d)",
                     threads or "default", raw_by_threads[threads]["sentences_per_s"], batch_size)
        best_threads = max(raw_by_threads, key=lambda t: raw_by_threads[t]["sentences_per_s"])
        raw_rate = raw_by_threads[best_threads]["sentences_per_s"]
        lengths = [len(ids) for ids in encoder.encode(texts)]

        stack.start_producer(args.producer_workers, args.producer_threads)
        node = stack.start_worker("embed", worker_env)
        chunks = [texts[i:i + args.inputs_per_request]
                  for i in range(0, len(texts), args.inputs_per_request)]
        loop = ClosedLoop(args.clients)
        served_fn = served_call(stack.producer_url, name, args.encoding)
        loop_warm = ClosedLoop(min(args.clients, 8))
        loop_warm.run([[t] for t in texts[:32]], served_fn)
        naive_fn = None
        if "naive_celery" in baselines:
            names = [p if isinstance(p, str) else p[0] for p in providers]  # ORT's own options
            app, url = start_naive_worker(stack, model_dir, defaults.worker_concurrency,
                                          ",".join(names))
            naive_fn = naive_call(app, url)
            loop_warm.run([[t] for t in texts[:32]], naive_fn)

        served_runs, naive_runs, counters = [], [], []
        cpu = {"served": [], "naive_celery": []}
        for repeat in range(args.repeats):
            before, cpu_before = worker_counters(stack, node), stack.cpu_seconds()
            served_runs.append(loop.run(chunks, served_fn))
            after, cpu_after = worker_counters(stack, node), stack.cpu_seconds()
            counters.append({k: after.get(k, 0.0) - before.get(k, 0.0)
                             for k in ("embed_passes", "embed_items", "embed_seconds")})
            cpu["served"].append(_cpu_delta(cpu_before, cpu_after, node))
            log.info("served run %d: %.1f sentences/s", repeat + 1,
                     args.sentences / served_runs[-1][2])
            if naive_fn:
                cpu_before = stack.cpu_seconds()
                naive_runs.append(loop.run(chunks, naive_fn))
                cpu["naive_celery"].append(_cpu_delta(cpu_before, stack.cpu_seconds(), node))
                log.info("naive run %d: %.1f sentences/s", repeat + 1,
                         args.sentences / naive_runs[-1][2])
        worker_providers = stack.worker_providers(node)

    served = summarize(served_runs, args.sentences, reference)
    passes = sum(c["embed_passes"] for c in counters)
    items = sum(c["embed_items"] for c in counters)
    ort_s = sum(c["embed_seconds"] for c in counters)
    wall = sum(w for _, _, w in served_runs)
    served["cpu_ms_per_sentence"] = _cpu_per_sentence(cpu["served"], args.sentences)
    served["engine"] = {"passes": int(passes), "mean_batch": round(items / passes, 2) if passes else 0,
                        "ort_s": round(ort_s, 3), "ort_share_of_wall": round(ort_s / wall, 3)}
    numbers: dict[str, float] = {}
    phases: dict[str, dict] = {"served": served}
    if "raw_ort" in baselines:
        numbers["raw_ort"] = raw_rate
    phases["raw_ort"] = {**raw_by_threads[best_threads], "intra_op_threads": best_threads,
                         "by_intra_op_threads": {str(t): r for t, r in raw_by_threads.items()},
                         "correct": True}
    if naive_runs:
        phases["naive_celery"] = summarize(naive_runs, args.sentences, reference)
        phases["naive_celery"]["cpu_ms_per_sentence"] = _cpu_per_sentence(cpu["naive_celery"],
                                                                          args.sentences)
        numbers["naive_celery"] = phases["naive_celery"]["sentences_per_s"]
    correctness = {p: r["correct"] for p, r in phases.items()}
    return {
        "scenario": "embed",
        "unit": "sentences/s",
        "served": served["sentences_per_s"],
        "baselines": numbers,
        "ratios": {b: ratio(served["sentences_per_s"], v) for b, v in numbers.items()},
        "correct": all(correctness.values()),
        "correctness": correctness,
        "phases": phases,
        "settings": {
            "sentences": args.sentences, "clients": args.clients,
            "inputs_per_request": args.inputs_per_request, "encoding_format": args.encoding,
            "repeats": args.repeats,
            "tokens_per_sentence": {"target": args.tokens, "min": min(lengths),
                                    "max": max(lengths), "mean": round(float(np.mean(lengths)), 2)},
            "model": promoted, "shape": None if args.model_dir else args.shape,
            "batch_size": batch_size, "batch_window_ms": defaults.batch_window_ms,
            "worker_concurrency": defaults.worker_concurrency, "worker_env": worker_env,
            "worker": f"banter worker {'--gpu %d' % stack.gpu if stack.gpu is not None else '--cpu'}"
                      " (ORT's default intra-op threads)",
            "worker_providers": worker_providers,
            "naive_worker": f"celery -A bench.naive_worker worker --pool threads --concurrency "
                            f"{defaults.worker_concurrency} --prefetch-multiplier 1",
            "raw_ort_intra_op_threads_tried": args.raw_threads, "raw_providers": encoder.session.get_providers(),
            "tolerance": TOLERANCE,
            "producer": {"workers": args.producer_workers, "threads": args.producer_threads},
        },
        "machine": {**machine_facts(), "loadavg_at_start": load_at_start,
                    "loadavg_at_end": loadavg()},
        "duration_s": round(time.perf_counter() - began, 2),
    }


def _pass_only(encoder: RawEncoder, texts: list[str], batch_size: int) -> float:
    """Sentences/s of the ORT passes alone (pre-tokenized, pooling included)."""
    rows = encoder.encode(texts)
    started = time.perf_counter()
    for start in range(0, len(rows), batch_size):
        encoder.run_ids(rows[start:start + batch_size])
    return round(len(rows) / (time.perf_counter() - started), 2)


def _cpu_delta(before: dict[str, float], after: dict[str, float], node: str) -> dict[str, float]:
    """CPU seconds per part between two ``BenchStack.cpu_seconds`` readings."""
    names = {node: "worker", "naive-worker": "naive_worker"}
    return {names.get(k, k): after[k] - before.get(k, 0.0) for k in after}


def _cpu_per_sentence(runs: list[dict[str, float]], sentences: int) -> dict[str, float]:
    """Mean CPU milliseconds per sentence of each part over the runs, and their total."""
    if not runs:
        return {}
    out = {k: round(sum(r[k] for r in runs) / (len(runs) * sentences) * 1000, 3) for k in runs[0]}
    out["total"] = round(sum(out.values()), 3)
    return out
