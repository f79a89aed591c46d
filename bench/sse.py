"""sse: K concurrent SSE subscribers on one producer: tokens delivered, tokens lost (must be 0)
and publish-to-client latency.

``--subscribers`` K connections follow ``K / --followers`` generate jobs (``--followers``
subscribers per job) through ``GET /v1/jobs/{id}/events`` on one ``banter producer`` (gunicorn,
gthread; every open stream holds a thread: see STREAMS_PER_PROCESS for the default sizing).
The jobs are submitted while no worker runs; once every subscriber's request is blocked in
Redis (``XREAD``) the worker starts, so every token is delivered live.

The clients are one asyncio loop in this process speaking plain HTTP/1.1 over sockets (no
extra dependency). A token's publish time is the millisecond timestamp of its Redis stream
entry id (Redis's clock, the same machine's); its receive time is when the client read it.
At the end every subscriber's events are compared with the job's stream (``XRANGE``): token
seqs, ids and texts, in order, then the final event. ``lost`` = tokens in the streams x their
followers - tokens delivered in order; ``correct`` needs it 0, no duplicates or reordering,
and every subscriber ending with the job's ``done`` event.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import requests

from bench.common import loadavg, percentiles_ms, positive, post, ratio
from bench.machine import machine_facts
from bench.stack import BenchStack

log = logging.getLogger("bench.sse")

DEFAULT_SUBSCRIBERS = 200
DEFAULT_FOLLOWERS = 10
DEFAULT_MAX_TOKENS = 64
CONNECT_STALL_S = 10.0
# Every open stream holds one producer thread and one pooled Redis connection (a blocked
# XREAD). banter.redisconn.connect() leaves redis-py's pool at its default size, which is 100
# connections per process since redis-py 6: a gunicorn process with more than ~100 open
# streams answers 500 (MaxConnectionsError). So by default the producer gets enough processes
# that none needs more than this many threads, with 1.5x room for an uneven accept spread.
STREAMS_PER_PROCESS = 90


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--subscribers", type=positive, default=DEFAULT_SUBSCRIBERS,
                   help=f"concurrent SSE subscribers (default {DEFAULT_SUBSCRIBERS}; the "
                        "target is 1000)")
    p.add_argument("--followers", type=positive, default=DEFAULT_FOLLOWERS,
                   help="subscribers per job (default 10: K/10 jobs; 1: K jobs)")
    p.add_argument("--max-tokens", type=positive, default=DEFAULT_MAX_TOKENS,
                   help=f"tokens each job generates (default {DEFAULT_MAX_TOKENS})")
    p.add_argument("--producer-workers", type=positive, default=None,
                   help="gunicorn worker processes (default: max(2, ceil(1.5 x subscribers / "
                        f"{STREAMS_PER_PROCESS})), see STREAMS_PER_PROCESS)")
    p.add_argument("--producer-threads", type=positive, default=STREAMS_PER_PROCESS,
                   help=f"threads per gunicorn worker (default {STREAMS_PER_PROCESS})")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds to wait for every stream to end (default 300)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")


@dataclass
class Subscriber:
    job_id: str
    events: list[tuple[str, str, dict, float]] = field(default_factory=list)  # id, kind, data, t
    status: int = 0
    error: str = ""
    connected: float = 0.0


async def follow(host: str, port: int, sub: Subscriber) -> None:
    """One SSE request over a raw socket; every event with its receive time (time.time())."""
    writer = None
    try:
        reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
        writer.write((f"GET /v1/jobs/{sub.job_id}/events HTTP/1.1\r\nHost: {host}:{port}\r\n"
                      "Accept: text/event-stream\r\nConnection: close\r\n\r\n").encode())
        await writer.drain()
        sub.connected = time.time()
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        sub.status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip()
                   for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        if sub.status != 200:
            body = await asyncio.wait_for(reader.read(2000), 5)
            sub.error = f"HTTP {sub.status}: {body[-300:].decode('utf-8', 'replace')}"
            return
        chunked = headers.get("transfer-encoding", "").lower() == "chunked"
        buffer = b""
        while True:
            if chunked:
                size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    break
                data = (await reader.readexactly(size + 2))[:-2]
            else:
                data = await reader.read(1 << 16)
                if not data:
                    break
            now = time.time()
            buffer += data
            while b"\n\n" in buffer:
                raw, buffer = buffer.split(b"\n\n", 1)
                event = _parse(raw.decode("utf-8"))
                if event:
                    sub.events.append((*event, now))
                    if event[1] != "token":
                        return
    except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
        sub.error = f"{type(exc).__name__}: {exc}"
    finally:
        if writer is not None:
            writer.close()


def _parse(raw: str) -> tuple[str, str, dict] | None:
    entry_id, kind, data = "", "message", []
    for line in raw.split("\n"):
        if line.startswith(":"):
            continue  # keep-alive comment
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "id":
            entry_id = value
        elif name == "event":
            kind = value
        elif name == "data":
            data.append(value)
    if not data:
        return None
    return entry_id, kind, json.loads("\n".join(data))


def settle(stack: BenchStack, quiet_cpu_s: float = 0.05, timeout_s: float = 120.0) -> None:
    """Wait until the producer's processes stop using CPU (every gunicorn worker has booted):
    the first booted ones would otherwise accept more connections than they have threads."""
    deadline = time.monotonic() + timeout_s
    last = stack.cpu_seconds()["producer"]
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = stack.cpu_seconds()["producer"]
        if now - last < quiet_cpu_s:
            return
        last = now
    log.warning("the producer did not settle in %.0fs", timeout_s)


def blocked_clients(stack: BenchStack) -> int:
    return int(stack.redis.info("clients")["blocked_clients"])


async def run_subscribers(stack: BenchStack, subs: list[Subscriber], direct: DirectReader,
                          timeout: float) -> dict[str, float]:
    """Connect every subscriber, wait until all block in Redis, start the worker, wait for
    every stream's end. Returns phase times."""
    parts = urlsplit(stack.producer_url)
    began = time.perf_counter()
    tasks = [asyncio.create_task(follow(parts.hostname, parts.port, s)) for s in subs]
    last, steady_since = -1, time.monotonic()
    while (waiting := blocked_clients(stack)) < len(subs):
        failed = [s for s in subs if s.error]
        if failed:
            raise RuntimeError(f"{len(failed)} subscribers failed to connect, first: "
                               f"{failed[0].error}")
        if waiting != last:
            last, steady_since = waiting, time.monotonic()
        elif time.monotonic() - steady_since > CONNECT_STALL_S:
            # a gunicorn process took more connections than it has threads: the rest wait
            # for a thread and will replay the stream from its start when they get one
            log.warning("only %d of %d subscribers are waiting in Redis; starting anyway",
                        waiting, len(subs))
            break
        await asyncio.sleep(0.05)
    connected = time.perf_counter() - began
    log.info("%d subscribers waiting in %.2fs; starting the worker", waiting, connected)
    direct.start()
    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    await loop.run_in_executor(None, stack.start_worker, "sse")
    worker_up = time.perf_counter() - started
    done, pending = await asyncio.wait(tasks, timeout=timeout)
    for task in pending:
        task.cancel()
    await loop.run_in_executor(None, direct.collect, 30)
    return {"connect_s": round(connected, 3), "waiting_in_redis_at_start": waiting,
            "worker_start_s": round(worker_up, 3),
            "streams_s": round(time.perf_counter() - started, 3), "unfinished": len(pending)}


def job_streams(stack: BenchStack, job_ids: list[str]) -> dict[str, list[tuple[str, str, dict]]]:
    """Every job's stream as (entry id, event type, data), in order."""
    from banter import keys
    from banter.streams import decode_entry

    out = {}
    for job_id in job_ids:
        out[job_id] = []
        for entry_id, fields in stack.redis.xrange(keys.stream(job_id)):
            kind, data = decode_entry(fields)
            out[job_id].append((entry_id, kind.value, data))
    return out


def read_directly(redis_url: str, stream_keys: list[str], ready, results) -> None:
    """The floor, in a process of its own: ``XREAD BLOCK`` over every job's stream straight
    from Redis, no HTTP; puts the publish-to-read latency (s) of every token on ``results``."""
    from banter.redisconn import connect

    client = connect(redis_url)
    after = {key: "0-0" for key in stream_keys}
    latencies = []
    ready.set()
    while after:
        reply = client.xread(after, block=1000, count=512)
        now = time.time()
        for stream, entries in reply or []:
            for entry_id, fields in entries:
                after[stream] = entry_id
                if fields.get("event") == "token":
                    latencies.append(now - int(entry_id.split("-")[0]) / 1000.0)
                else:
                    del after[stream]
    results.put(latencies)


class DirectReader:
    """``read_directly`` in a spawned process (so the clients' event loop does not slow it)."""

    def __init__(self, stack: BenchStack, job_ids: list[str]) -> None:
        import multiprocessing

        from banter import keys

        context = multiprocessing.get_context("spawn")
        self.ready, self.results = context.Event(), context.Queue()
        self.process = context.Process(
            target=read_directly, daemon=True,
            args=(stack.env["BANTER_REDIS_URL"], [keys.stream(j) for j in job_ids], self.ready,
                  self.results))
        self.latencies: list[float] = []

    def start(self) -> None:
        self.process.start()
        if not self.ready.wait(60):
            raise RuntimeError("the direct Redis reader did not start")

    def collect(self, timeout: float) -> None:
        try:
            self.latencies = self.results.get(timeout=timeout)
        except Exception:  # queue.Empty: it never saw every stream end
            log.warning("the direct Redis reader did not finish")
        self.process.terminate()
        self.process.join()


def check(subs: list[Subscriber], streams: dict[str, list[tuple[str, str, dict]]]) -> dict:
    expected = delivered = in_order = duplicates = unfinished = mismatched = 0
    latencies: list[float] = []
    first_publish, last_receive = float("inf"), 0.0
    for sub in subs:
        truth = streams[sub.job_id]
        tokens = [(i, d["seq"], d["text"]) for i, kind, d in truth if kind == "token"]
        got = [(i, d["seq"], d["text"]) for i, kind, d, _ in sub.events if kind == "token"]
        expected += len(tokens)
        delivered += len(got)
        in_order += sum(1 for a, b in zip(tokens, got) if a == b)
        duplicates += len(got) - len(set(got))
        if got != tokens:
            mismatched += 1
        finals = [(i, kind) for i, kind, _, _ in sub.events if kind != "token"]
        truth_final = [(i, kind) for i, kind, _ in truth if kind != "token"]
        if not finals or finals != truth_final:
            unfinished += 1
        for i, kind, _, t in sub.events:
            if kind == "token":
                published = int(i.split("-")[0]) / 1000.0
                latencies.append(t - published)
                first_publish, last_receive = min(first_publish, published), max(last_receive, t)
    return {"expected": expected, "delivered": delivered, "lost": expected - in_order,
            "duplicates": duplicates, "subscribers_mismatched": mismatched,
            "subscribers_without_final_event": unfinished,
            "latency_ms": percentiles_ms(latencies),
            "delivery_s": max(last_receive - first_publish, 0.0) if latencies else 0.0}


def run(args: argparse.Namespace) -> dict:
    began = time.perf_counter()
    load_at_start = loadavg()
    from banter import keys
    from banter.demo import DEMO_GPT, build_demo

    k, followers = args.subscribers, args.followers
    n_jobs = -(-k // followers)
    threads = args.producer_threads
    workers = args.producer_workers or max(2, -(-3 * k // (2 * STREAMS_PER_PROCESS)))
    with BenchStack(keep=args.keep, log_level="INFO" if args.keep else "WARNING") as stack:
        model = stack.promote(DEMO_GPT, "generate", build_demo(stack.model_root)[DEMO_GPT])
        stack.start_producer(workers, threads)
        settle(stack)
        with requests.Session() as session:
            job_ids = [post(session, f"{stack.producer_url}/v1/jobs",
                            {"kind": "generate", "input": f"Stream {j}: tell me a story",
                             "params": {"max_tokens": args.max_tokens, "temperature": 0}})["id"]
                       for j in range(n_jobs)]
        subs = [Subscriber(job_ids[i % n_jobs]) for i in range(k)]
        direct = DirectReader(stack, job_ids)
        phases = asyncio.run(run_subscribers(stack, subs, direct, args.timeout))
        streams = job_streams(stack, job_ids)
        statuses = [stack.redis.hget(keys.job(j), "status") for j in job_ids]
    result = check(subs, streams)
    errors = [s.error for s in subs if s.error]
    tokens_per_job = [sum(1 for _, kind, _ in streams[j] if kind == "token") for j in job_ids]
    correct = (result["lost"] == 0 and result["duplicates"] == 0 and not errors
               and result["subscribers_mismatched"] == 0
               and result["subscribers_without_final_event"] == 0
               and all(n == args.max_tokens for n in tokens_per_job))
    delivery_s = result.pop("delivery_s")
    rate = result["delivered"] / delivery_s if delivery_s else None
    latency = result.pop("latency_ms")
    floor = percentiles_ms(direct.latencies)
    return {
        "scenario": "sse",
        "unit": "ms, publish-to-client latency p50",
        "served": latency["p50"],
        "baselines": {"redis_xread": floor["p50"]},
        "ratios": {"redis_xread": ratio(latency["p50"], floor["p50"])},
        "subscribers": k,
        "tokens": result,
        "lost": result["lost"],
        "publish_to_client_ms": latency,
        "redis_xread_ms": floor,
        "delivered_tokens_per_s": round(rate, 2) if rate else None,
        "delivery_s": round(delivery_s, 3),
        "correct": correct,
        "errors": errors[:5],
        "error_count": len(errors),
        "jobs": {"count": n_jobs, "statuses": {s: statuses.count(s) for s in set(statuses)},
                 "tokens_per_job": {"min": min(tokens_per_job), "max": max(tokens_per_job)}},
        "phases": phases,
        "settings": {"subscribers": k, "followers_per_job": followers, "jobs": n_jobs,
                     "max_tokens": args.max_tokens, "model": model,
                     "producer": {"workers": workers, "threads": threads},
                     "client": "one asyncio loop, raw HTTP/1.1 sockets, in the bench process",
                     "publish_time": "Redis stream entry id (ms)",
                     "receive_time": "time.time() when the client read the chunk"},
        "machine": {**machine_facts(), "loadavg_at_start": load_at_start,
                    "loadavg_at_end": loadavg()},
        "duration_s": round(time.perf_counter() - began, 2),
    }
