"""soak: N mixed jobs from C concurrent clients against the whole stack; none may be lost,
duplicated, answered with a 5xx or wrong; reports peak RSS of the producer and the worker.

The stack is started here (private Redis, ``--workers`` x ``banter worker --cpu``, ``banter
producer`` under gunicorn, the demo models promoted). A plan of ``--jobs`` operations is drawn
(seeded) from this mix, and ``--clients`` threads take the next operation as soon as they are
free (closed loop):

* ``jobs_generate`` / ``jobs_embed``: ``POST /v1/jobs`` with an ``idempotency_key`` per job,
  then ``GET /v1/jobs/{id}`` until the job is final. One in ten is submitted twice with the same
  key (alternately one after the other and concurrently): both answers must name one job.
* ``inference``: synchronous ``POST /v1/inference``; ``inference_stream``: ``?stream=true``, SSE
  read to the end (every token ``seq`` exactly once, in order, one ``done``).
* ``embeddings``: ``POST /v1/embeddings`` (one input from a pool of texts).
* ``chat`` / ``chat_stream``: ``POST /v1/chat/completions``, whole or streamed (a few).

Every generation is greedy with ``max_tokens`` drawn from ``--max-tokens`` (default 1-8); the
demo decoder writes ``DEMO_TEXT`` whatever the prompt, so the right text of ``k`` tokens is its
first ``k`` words, each with its leading space. An embedding must match, within 1e-4, the one the
same text got alone before the run. A 429 is retried after its ``Retry-After`` (counted apart);
a transport error on ``POST /v1/jobs`` is retried with the same idempotency key.

Afterwards every job record in Redis is audited (status ``succeeded``, ``attempts`` 1, its stream
holds token seqs ``0..n-1`` exactly once and exactly one final event, last; its result text;
one record per idempotency key) and every job id a client was given is read back through
``GET /v1/jobs/{id}``. RSS (``VmRSS`` of ``/proc/PID/status``) of the producer (gunicorn master
plus its workers, summed), each worker and redis-server is sampled every 0.5 s.

Unlike the other scenarios, the exit code is 1 when anything was lost, duplicated, answered with
a 5xx, wrong or failed (the JSON is printed first).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import requests

from banter.client import sse_events
from bench.common import p50_p99_ms, positive, run_released
from bench.machine import machine_facts
from bench.stack import BenchStack

log = logging.getLogger("bench.soak")

DEFAULT_JOBS = 10_000
DEFAULT_CLIENTS = 64
DEFAULT_WORKERS = 1
DEFAULT_BASELINE_JOBS = 200
REQUEST_TIMEOUT_S = 300.0
JOB_TIMEOUT_S = 300.0       # a polled job not final after this is reported (and lost)
POLL_FIRST_S, POLL_MAX_S = 0.02, 0.25
RSS_PERIOD_S = 0.5
EMBED_ATOL = 1e-4
RESEND_EVERY = 10           # one /v1/jobs submission in this many is sent twice

# operation -> weight in the mix
MIX = {"jobs_generate": 28, "jobs_embed": 12, "inference": 20, "inference_stream": 20,
       "embeddings": 14, "chat": 3, "chat_stream": 3}

# operation -> the endpoint of its first request
ENDPOINT = {"jobs_generate": "POST /v1/jobs", "jobs_embed": "POST /v1/jobs",
            "inference": "POST /v1/inference",
            "inference_stream": "POST /v1/inference?stream=true",
            "embeddings": "POST /v1/embeddings", "chat": "POST /v1/chat/completions",
            "chat_stream": "POST /v1/chat/completions?stream"}
POLL = "GET /v1/jobs/{id}"
AUDIT = "GET /v1/jobs/{id} (audit)"

EMBED_TEXTS = [
    "hello", "a short sentence about batching", "the quick brown fox jumps over the lazy dog",
    "embeddings are useful for search", "Redis keeps the job records",
    "one ONNX Runtime pass for the whole batch", "exactly once, whatever fails",
    "zero lost, zero duplicated", "unicode: café, naïve, 東京", "numbers 1 2 3 4 5 6 7 8 9 10",
    "a much longer input that goes on for a while so that its token count is well above the "
    "others and the batch has to be padded to its length before the encoder runs over it",
    "soak", "the worker heartbeat renews its leases", "gunicorn threads wait on XREAD",
    "continuous batching", "the end",
]


class OpFailed(Exception):
    """An operation that got no valid answer (the reason is the message)."""


# -- the plan -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Op:
    index: int
    kind: str
    max_tokens: int     # generation ops
    text: str           # prompt, or embed input
    resend: str = ""    # jobs_*: "", "sequential" or "concurrent"


def make_plan(n: int, seed: int, tokens: tuple[int, int], first_index: int = 0,
              resubmit: str = "both") -> list[Op]:
    """``resubmit``: which resubmissions of a /v1/jobs job happen (one in RESEND_EVERY):
    ``both`` (alternately sequential and concurrent), ``sequential`` or ``none``."""
    rng = random.Random(seed)
    kinds, weights = zip(*MIX.items())
    plan, submissions = [], 0
    for i in range(first_index, first_index + n):
        kind = rng.choices(kinds, weights)[0]
        k = rng.randint(*tokens)
        resend = ""
        if kind.startswith("jobs_"):
            submissions += 1
            if submissions % RESEND_EVERY == 0 and resubmit != "none":
                concurrent = (submissions // RESEND_EVERY) % 2 and resubmit == "both"
                resend = "concurrent" if concurrent else "sequential"
        text = (EMBED_TEXTS[rng.randrange(len(EMBED_TEXTS))] if kind.endswith("embed")
                or kind == "embeddings" else f"soak request {i}: tell me about batching")
        plan.append(Op(i, kind, k, text, resend))
    return plan


def expected_text(k: int) -> str:
    from banter.demo import DEMO_TEXT

    words = [" " + w for w in DEMO_TEXT.split()]
    return "".join(words[i % len(words)] for i in range(k))


# -- results --------------------------------------------------------------------------------

@dataclass
class Outcome:
    op: Op
    job_ids: list[str] = field(default_factory=list)
    polled_final: bool = False   # the client already read the final record through the API
    error: str = ""
    wrong: str = ""
    duplicated: str = ""
    dup_key: tuple = ()          # what the duplicate is: ("idem", key) or ("job", id)
    latency_s: float = 0.0
    done_at: float = 0.0


class HttpStats:
    """Every HTTP answer by endpoint and status, request latencies, transport errors."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.statuses: dict[str, Counter] = defaultdict(Counter)
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.transport: Counter = Counter()
        self.retry_after_missing = 0

    def answer(self, endpoint: str, status: int, seconds: float) -> None:
        with self._lock:
            self.statuses[endpoint][status] += 1
            self.latency[endpoint].append(seconds)

    def failed(self, endpoint: str) -> None:
        with self._lock:
            self.transport[endpoint] += 1

    def count(self, predicate) -> int:
        with self._lock:
            return sum(n for by_status in self.statuses.values()
                       for status, n in by_status.items() if predicate(status))


# -- the client -----------------------------------------------------------------------------

class Client:
    """One client thread's HTTP: retries 429 after Retry-After, records every answer."""

    def __init__(self, url: str, stats: HttpStats, run_id: str,
                 references: dict[str, np.ndarray]) -> None:
        self.url = url
        self.stats = stats
        self.run_id = run_id
        self.references = references
        self.session = requests.Session()

    def close(self) -> None:
        self.session.close()

    def call(self, method: str, endpoint: str, path: str, *, retry_transport: bool = False,
             session: requests.Session | None = None, **kwargs) -> requests.Response:
        session = session or self.session
        transport_retries = 0
        while True:
            started = time.perf_counter()
            try:
                response = session.request(method, self.url + path, timeout=REQUEST_TIMEOUT_S,
                                            **kwargs)
            except requests.RequestException as exc:
                self.stats.failed(endpoint)
                if retry_transport and transport_retries < 3:
                    transport_retries += 1
                    time.sleep(0.5)
                    continue
                raise OpFailed(f"{endpoint}: {type(exc).__name__}: {exc}") from None
            self.stats.answer(endpoint, response.status_code, time.perf_counter() - started)
            if response.status_code != 429:
                return response
            retry_after = _seconds(response.headers.get("Retry-After"))
            response.close()
            if retry_after is None:
                with self.stats._lock:
                    self.stats.retry_after_missing += 1
                raise OpFailed(f"{endpoint}: 429 without a valid Retry-After")
            time.sleep(min(retry_after, 30.0))

    # -- operations --------------------------------------------------------------------------

    def run(self, op: Op) -> Outcome:
        outcome = Outcome(op)
        started = time.perf_counter()
        try:
            getattr(self, op.kind.replace("jobs_generate", "jobs").replace("jobs_embed", "jobs"))(
                op, outcome)
        except OpFailed as exc:
            outcome.error = str(exc)
        except (ValueError, KeyError, TypeError, IndexError) as exc:  # a malformed answer
            outcome.error = f"{op.kind}: malformed answer: {type(exc).__name__}: {exc}"
        outcome.done_at = time.perf_counter()
        outcome.latency_s = outcome.done_at - started
        return outcome

    def jobs(self, op: Op, outcome: Outcome) -> None:
        kind = "generate" if op.kind == "jobs_generate" else "embed"
        body = {"kind": kind, "input": op.text,
                "idempotency_key": f"soak-{self.run_id}-{op.index}"}
        if kind == "generate":
            body["params"] = {"max_tokens": op.max_tokens, "temperature": 0}
        if op.resend == "concurrent":
            answers: list = [None, None]

            def second() -> None:
                with requests.Session() as other:
                    try:
                        answers[1] = self._submit(body, other)
                    except OpFailed as exc:
                        answers[1] = exc

            helper = threading.Thread(target=second, daemon=True)
            helper.start()
            answers[0] = self._submit(body)
            helper.join()
            if isinstance(answers[1], OpFailed):
                raise answers[1]
            (first_id, first_status), (second_id, second_status) = answers
            if first_id != second_id:
                outcome.duplicated = (f"one idempotency key, two jobs: {first_id} and "
                                      f"{second_id}")
                outcome.dup_key = ("idem", body["idempotency_key"])
            elif sorted((first_status, second_status)) != [200, 202]:
                outcome.wrong = f"concurrent resubmission answered {first_status}, {second_status}"
            job_ids = sorted({first_id, second_id})
        else:
            job_id, _ = self._submit(body)
            job_ids = [job_id]
            if op.resend == "sequential":
                again, status = self._submit(body)
                if again != job_id:
                    outcome.duplicated = f"one idempotency key, two jobs: {job_id} and {again}"
                    outcome.dup_key = ("idem", body["idempotency_key"])
                    job_ids.append(again)
                elif status != 200:
                    outcome.wrong = f"resubmission answered {status}, not 200"
        outcome.job_ids = job_ids
        for job_id in job_ids:
            record = self._poll(job_id)
            self._check_record(op, record, outcome)
        outcome.polled_final = True

    def _submit(self, body: dict, session: requests.Session | None = None) -> tuple[str, int]:
        response = self.call("POST", "POST /v1/jobs", "/v1/jobs", json=body, session=session,
                             retry_transport=True)
        if response.status_code not in (200, 202):
            raise OpFailed(f"POST /v1/jobs: HTTP {response.status_code}: {response.text[:200]}")
        return response.json()["id"], response.status_code

    def _poll(self, job_id: str) -> dict:
        deadline = time.monotonic() + JOB_TIMEOUT_S
        delay = POLL_FIRST_S
        while True:
            response = self.call("GET", POLL, f"/v1/jobs/{job_id}")
            if response.status_code != 200:
                raise OpFailed(f"{POLL}: HTTP {response.status_code}: {response.text[:200]}")
            record = response.json()
            if record["status"] not in ("queued", "running"):
                return record
            if time.monotonic() > deadline:
                raise OpFailed(f"job {job_id} still {record['status']} after {JOB_TIMEOUT_S}s")
            time.sleep(delay)
            delay = min(delay * 1.5, POLL_MAX_S)

    def _check_record(self, op: Op, record: dict, outcome: Outcome) -> None:
        """A final public job record (GET /v1/jobs/{id})."""
        if record["status"] != "succeeded":
            raise OpFailed(f"job {record['id']} ended {record['status']}: {record.get('error')}")
        if record.get("attempts") != 1:
            outcome.duplicated = f"job {record['id']} attempts={record.get('attempts')}"
            outcome.dup_key = ("job", record["id"])
        if op.kind == "jobs_embed":
            self._check_embedding(op.text, record["result"]["embedding"], outcome)
        else:
            self._check_text(op, record["result"]["text"], record["result"]["finish_reason"],
                             outcome)

    def _check_text(self, op: Op, text: str, finish_reason: str | None, outcome: Outcome) -> None:
        want = expected_text(op.max_tokens)
        if text != want:
            outcome.wrong = f"{op.kind} #{op.index}: text {text!r}, expected {want!r}"
        elif finish_reason != "length":
            outcome.wrong = f"{op.kind} #{op.index}: finish_reason {finish_reason!r}"

    def _check_embedding(self, text: str, vector: list[float], outcome: Outcome) -> None:
        reference = self.references[text]
        got = np.asarray(vector, dtype=np.float64)
        if got.shape != reference.shape:
            outcome.wrong = f"embedding of {text!r} has shape {got.shape}"
        elif not np.allclose(got, reference, rtol=0, atol=EMBED_ATOL):
            outcome.wrong = (f"embedding of {text!r} differs from its reference by "
                             f"{float(np.max(np.abs(got - reference))):.2e}")

    def inference(self, op: Op, outcome: Outcome) -> None:
        response = self.call("POST", ENDPOINT[op.kind], "/v1/inference",
                             json={"prompt": op.text, "max_tokens": op.max_tokens,
                                   "temperature": 0})
        if response.status_code != 200:
            raise OpFailed(f"{ENDPOINT[op.kind]}: HTTP {response.status_code}: "
                           f"{response.text[:200]}")
        body = response.json()
        outcome.job_ids = [body["id"]]
        self._check_text(op, body["text"], body["finish_reason"], outcome)
        if body["usage"]["completion_tokens"] != op.max_tokens:
            outcome.wrong = f"inference #{op.index}: usage {body['usage']}"

    def inference_stream(self, op: Op, outcome: Outcome) -> None:
        endpoint = ENDPOINT[op.kind]
        body = {"prompt": op.text, "max_tokens": op.max_tokens, "temperature": 0}
        with self.call("POST", endpoint, "/v1/inference?stream=true", json=body,
                       stream=True) as response:
            if response.status_code != 200:
                raise OpFailed(f"{endpoint}: HTTP {response.status_code}: {response.text[:200]}")
            outcome.job_ids = [response.headers["X-Job-ID"]]
            seqs, pieces, finals, after_final = [], [], [], 0
            for event, data in sse_events(response):
                if finals:
                    after_final += 1
                if event == "token":
                    seqs.append(data["seq"])
                    pieces.append(data["text"])
                elif event in ("done", "error"):
                    finals.append((event, data))
        if not finals:
            raise OpFailed(f"{endpoint}: the stream of {outcome.job_ids[0]} ended with no "
                           "final event")
        if finals[0][0] == "error":
            raise OpFailed(f"{endpoint}: job {outcome.job_ids[0]} failed: {finals[0][1]}")
        if len(finals) != 1 or after_final:
            outcome.duplicated = f"stream of {outcome.job_ids[0]}: {len(finals)} final events"
            outcome.dup_key = ("job", outcome.job_ids[0])
        if len(set(seqs)) != len(seqs):
            outcome.duplicated = f"stream of {outcome.job_ids[0]}: token seqs {seqs}"
            outcome.dup_key = ("job", outcome.job_ids[0])
        elif seqs != list(range(len(seqs))):
            outcome.wrong = f"stream of {outcome.job_ids[0]}: token seqs {seqs}"
        self._check_text(op, "".join(pieces), finals[0][1]["finish_reason"], outcome)

    def embeddings(self, op: Op, outcome: Outcome) -> None:
        response = self.call("POST", ENDPOINT[op.kind], "/v1/embeddings", json={"input": op.text})
        if response.status_code != 200:
            raise OpFailed(f"{ENDPOINT[op.kind]}: HTTP {response.status_code}: "
                           f"{response.text[:200]}")
        data = response.json()["data"]
        if len(data) != 1:
            outcome.wrong = f"embeddings #{op.index}: {len(data)} vectors for one input"
            return
        self._check_embedding(op.text, data[0]["embedding"], outcome)

    def _chat_body(self, op: Op) -> dict:
        return {"messages": [{"role": "system", "content": "You are terse."},
                             {"role": "user", "content": op.text}],
                "max_tokens": op.max_tokens, "temperature": 0}

    def chat(self, op: Op, outcome: Outcome) -> None:
        response = self.call("POST", ENDPOINT[op.kind], "/v1/chat/completions",
                             json=self._chat_body(op))
        if response.status_code != 200:
            raise OpFailed(f"{ENDPOINT[op.kind]}: HTTP {response.status_code}: "
                           f"{response.text[:200]}")
        outcome.job_ids = [response.headers["X-Job-ID"]]
        choice = response.json()["choices"][0]
        self._check_text(op, choice["message"]["content"], choice["finish_reason"], outcome)

    def chat_stream(self, op: Op, outcome: Outcome) -> None:
        endpoint = ENDPOINT[op.kind]
        with self.call("POST", endpoint, "/v1/chat/completions",
                       json={**self._chat_body(op), "stream": True}, stream=True) as response:
            if response.status_code != 200:
                raise OpFailed(f"{endpoint}: HTTP {response.status_code}: {response.text[:200]}")
            outcome.job_ids = [response.headers["X-Job-ID"]]
            pieces, reasons, done_markers = [], [], 0
            for line in response.iter_lines(chunk_size=None, decode_unicode=True):
                if not line or not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    done_markers += 1
                    continue
                chunk = json.loads(payload)
                if "error" in chunk:
                    raise OpFailed(f"{endpoint}: job {outcome.job_ids[0]} failed: "
                                   f"{chunk['error']}")
                for choice in chunk["choices"]:
                    pieces.append(choice["delta"].get("content", ""))
                    if choice["finish_reason"] is not None:
                        reasons.append(choice["finish_reason"])
        if done_markers != 1 or len(reasons) != 1:
            outcome.duplicated = (f"chat stream of {outcome.job_ids[0]}: {len(reasons)} finish "
                                  f"chunks, {done_markers} [DONE]")
            outcome.dup_key = ("job", outcome.job_ids[0])
            return
        self._check_text(op, "".join(pieces), reasons[0], outcome)


def _seconds(raw: str | None) -> float | None:
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value >= 0 else None


# -- running the clients --------------------------------------------------------------------

def run_clients(url: str, plan: list[Op], clients: int, stats: HttpStats, run_id: str,
                references: dict[str, np.ndarray], label: str,
                progress=None) -> tuple[list[Outcome], float]:
    """``clients`` threads work through ``plan`` (each takes the next op when free); returns
    the outcomes (plan order) and the wall time from the common start to the last answer."""
    outcomes: list[Outcome | None] = [None] * len(plan)
    lock = threading.Lock()
    cursor = iter(range(len(plan)))
    finished = [0]
    barrier = threading.Barrier(clients + 1)
    step = max(1, len(plan) // 10)

    def client() -> None:
        worker = Client(url, stats, run_id, references)
        try:
            barrier.wait()
            while True:
                with lock:
                    position = next(cursor, None)
                if position is None:
                    return
                outcomes[position] = worker.run(plan[position])
                with lock:
                    finished[0] += 1
                    if finished[0] % step == 0 and progress:
                        progress(label, finished[0], len(plan))
        finally:
            worker.close()

    threads = [threading.Thread(target=client, daemon=True, name=f"soak-client-{c}")
               for c in range(clients)]
    started = run_released(threads, barrier)
    return outcomes, max(o.done_at for o in outcomes) - started


# -- RSS --------------------------------------------------------------------------------------

def rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def descendants(roots: list[int]) -> list[int]:
    """``roots`` and every process below them (from /proc/*/stat parent ids)."""
    children: dict[int, list[int]] = defaultdict(list)
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", encoding="ascii", errors="replace") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            children[int(fields[1])].append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    found, pending = [], list(roots)
    while pending:
        pid = pending.pop()
        found.append(pid)
        pending.extend(children.get(pid, ()))
    return found


class RssSampler:
    """Samples ``VmRSS`` every ``period_s`` of process groups: name -> root pids (each group's
    figure is the sum over its roots and their descendants)."""

    def __init__(self, groups: dict[str, list[int]], period_s: float = RSS_PERIOD_S) -> None:
        self.groups = groups
        self.period_s = period_s
        self.samples: list[tuple[float, dict[str, float]]] = []
        self.marks: dict[str, float] = {}
        self._stop = threading.Event()
        self._began = time.perf_counter()
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss-sampler")

    def start(self) -> "RssSampler":
        self.sample()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def mark(self, name: str) -> None:
        self.marks[name] = time.perf_counter() - self._began

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.sample()

    def sample(self) -> dict[str, float]:
        values = {name: sum(rss_kb(pid) for pid in descendants(roots)) / 1024.0
                  for name, roots in self.groups.items()}
        self.samples.append((time.perf_counter() - self._began, values))
        return values

    def peak(self, name: str, since: float = 0.0) -> float:
        return round(max((v[name] for t, v in self.samples if t >= since), default=0.0), 1)

    def at(self, name: str, moment: float) -> float:
        """The first sample at or after ``moment``."""
        for t, values in self.samples:
            if t >= moment:
                return round(values[name], 1)
        return round(self.samples[-1][1][name], 1)

    def timeline(self, points: int = 24) -> list[list[float]]:
        stride = max(1, math.ceil(len(self.samples) / points))
        chosen = self.samples[::stride]
        if chosen[-1] is not self.samples[-1]:
            chosen.append(self.samples[-1])
        return [[round(t, 1), *(round(v[name], 1) for name in self.groups)] for t, v in chosen]


# -- the audit ------------------------------------------------------------------------------

def audit_redis(client, known: dict[str, Outcome]) -> dict:
    """Every job record and stream in Redis; see the module docstring."""
    from banter import keys
    from banter.jobs import JobRecord

    job_keys = sorted(client.scan_iter(match=keys.job("*"), count=1000))
    lost, duplicated, wrong = [], [], []
    statuses: Counter = Counter()
    by_idem: dict[tuple[str, str], list[str]] = defaultdict(list)
    records: dict[str, JobRecord] = {}
    for chunk_start in range(0, len(job_keys), 500):
        chunk = job_keys[chunk_start:chunk_start + 500]
        pipe = client.pipeline(transaction=False)
        for key in chunk:
            pipe.hgetall(key)
        for key in chunk:
            pipe.xrange(keys.stream(key.rsplit(":", 1)[1]))
        replies = pipe.execute()
        for raw, entries in zip(replies[:len(chunk)], replies[len(chunk):]):
            if not raw:
                continue
            record = JobRecord.from_redis(raw)
            records[record.id] = record
            statuses[record.status] += 1
            if record.idempotency_key:
                by_idem[(record.owner, record.idempotency_key)].append(record.id)
            problem = _audit_record(record, entries)
            if problem and problem[0] == "duplicated":
                extra_runs = max(1, record.attempts - 1)
                duplicated.append((("job", record.id), extra_runs, f"{record.id}: {problem[1]}"))
            elif problem:
                {"lost": lost, "wrong": wrong}[problem[0]].append(f"{record.id}: {problem[1]}")
    idem_pipe = client.pipeline(transaction=False)
    idem_items = sorted(by_idem.items())
    for (owner, key), _ids in idem_items:
        idem_pipe.get(keys.idempotency(owner, key))
    for ((owner, key), ids), points_to in zip(idem_items, idem_pipe.execute()):
        if len(ids) > 1:
            duplicated.append((("idem", key), len(ids) - 1,
                               f"idempotency key {key!r}: {len(ids)} records {sorted(ids)}"))
        elif points_to != ids[0]:
            wrong.append(f"idempotency key {key!r} points to {points_to}, its record is {ids[0]}")
    missing = sorted(job_id for job_id in known if job_id not in records)
    lost.extend(f"{job_id}: a client was given this id; no record in Redis" for job_id in missing)
    return {"records": len(records), "statuses": dict(statuses), "lost": lost,
            "duplicated": duplicated, "wrong": wrong,
            "idempotency_keys": len(by_idem)}


def _audit_record(record, entries) -> tuple[str, str] | None:
    if record.status != "succeeded":
        return "lost", f"status {record.status} (error {record.error})"
    if record.attempts != 1:
        return "duplicated", f"attempts {record.attempts}"
    seqs = [int(f["seq"]) for _id, f in entries if f.get("event") == "token"]
    finals = [(i, f) for i, (_id, f) in enumerate(entries) if f.get("event") != "token"]
    if len(finals) != 1 or finals[0][0] != len(entries) - 1:
        return "duplicated", f"{len(finals)} final events in {len(entries)} stream entries"
    if finals[0][1].get("event") != "done":
        return "wrong", f"final event {finals[0][1]}"
    if len(set(seqs)) != len(seqs):
        return "duplicated", f"token seqs {seqs}"
    if seqs != list(range(len(seqs))):
        return "wrong", f"token seqs {seqs}"
    if record.kind == "generate":
        k = int(record.params.get("max_tokens", 0))
        text = (record.result or {}).get("text")
        streamed = "".join(f.get("text", "") for _id, f in entries if f.get("event") == "token")
        if len(seqs) != k or text != expected_text(k) or streamed != text:
            return "wrong", f"{len(seqs)} tokens, text {text!r}, streamed {streamed!r}, max_tokens {k}"
    elif seqs:
        return "wrong", f"embed job with {len(seqs)} token events"
    return None


def audit_api(url: str, outcomes: list[Outcome], stats: HttpStats, run_id: str,
              references: dict[str, np.ndarray]) -> list[str]:
    """Read back through the API every job id a client was given but did not poll."""
    todo = [(o, job_id) for o in outcomes if not o.polled_final and not o.error
            for job_id in o.job_ids]
    problems: list[str] = []
    local = threading.local()

    def check(item) -> None:
        outcome, job_id = item
        if not hasattr(local, "client"):
            local.client = Client(url, stats, run_id, references)
        try:
            response = local.client.call("GET", AUDIT, f"/v1/jobs/{job_id}")
            if response.status_code != 200:
                raise OpFailed(f"HTTP {response.status_code}")
            record = response.json()
            probe = Outcome(outcome.op)
            local.client._check_record(outcome.op, record, probe)
            problem = probe.duplicated or probe.wrong
        except (OpFailed, ValueError, KeyError, TypeError) as exc:
            problem = f"{type(exc).__name__}: {exc}"
        if problem:
            problems.append(f"{job_id}: {problem}")

    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(check, todo))
    return problems


def leftovers(stack: BenchStack, timeout_s: float = 15.0) -> dict[str, int]:
    """What should be empty once every job is final: queues, kombu's unacked messages, the
    running set and leases (a job's lease is released just after its final event)."""
    from banter import keys

    settings = stack.settings
    queues = [*settings.queues, *settings.openai_queues]
    deadline = time.monotonic() + timeout_s
    while True:
        pipe = stack.redis.pipeline(transaction=False)
        for name in queues:
            pipe.llen(name)
        pipe.hlen("unacked")
        pipe.scard(keys.RUNNING)
        replies = pipe.execute()
        leases = sum(1 for _ in stack.redis.scan_iter(match=keys.lease("*"), count=1000))
        found = {"queued_messages": sum(replies[:len(queues)]),
                 "unacked_messages": replies[len(queues)], "running_set": replies[-1],
                 "leases": leases}
        if not any(found.values()) or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


# -- scenario --------------------------------------------------------------------------------

def _non_negative(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


def _token_range(raw: str) -> tuple[int, int]:
    try:
        low, _, high = raw.partition("-")
        bounds = (int(low), int(high or low))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW-HIGH or N, got {raw!r}") from None
    if bounds[0] < 1 or bounds[1] < bounds[0]:
        raise argparse.ArgumentTypeError("max_tokens range must be 1 <= LOW <= HIGH")
    return bounds


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--jobs", type=positive, default=DEFAULT_JOBS,
                   help=f"operations in the timed run, one job each (default {DEFAULT_JOBS})")
    p.add_argument("--clients", type=positive, default=DEFAULT_CLIENTS,
                   help=f"concurrent clients (default {DEFAULT_CLIENTS})")
    p.add_argument("--workers", type=positive, default=DEFAULT_WORKERS,
                   help=f"banter worker --cpu processes (default {DEFAULT_WORKERS})")
    p.add_argument("--max-tokens", type=_token_range, default=(1, 8),
                   help="max_tokens of generations, drawn uniformly from LOW-HIGH (default 1-8)")
    p.add_argument("--baseline-jobs", type=_non_negative, default=DEFAULT_BASELINE_JOBS,
                   help="operations of the single-client baseline run before the timed run "
                        f"(0: none; default {DEFAULT_BASELINE_JOBS})")
    p.add_argument("--resubmit", choices=("both", "sequential", "none"), default="both",
                   help=f"one /v1/jobs submission in {RESEND_EVERY} is sent again with its "
                        "idempotency key: alternately after the answer and concurrently "
                        "(both, the default), only after the answer, or never")
    p.add_argument("--seed", type=int, default=0, help="seed of the operation mix (default 0)")
    p.add_argument("--producer-workers", type=positive, default=2)
    p.add_argument("--producer-threads", type=positive, default=64)
    p.add_argument("--keep", action="store_true",
                   help="keep the temporary directory (logs) and log where it is")


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _progress(label: str, done: int, total: int) -> None:
    log.info("%s: %d of %d operations done", label, done, total)


def run(args: argparse.Namespace) -> dict:
    from banter import keys
    from banter.demo import DEMO_EMBED, DEMO_GPT, build_demo
    from banter.settings import Settings

    began = time.perf_counter()
    load_at_start = _loadavg()
    run_id = uuid.uuid4().hex[:8]
    stats = HttpStats()
    baseline_plan = make_plan(args.baseline_jobs, args.seed + 1, args.max_tokens,
                              resubmit=args.resubmit)
    plan = make_plan(args.jobs, args.seed, args.max_tokens, first_index=args.baseline_jobs,
                     resubmit=args.resubmit)
    defaults = Settings()

    with BenchStack(keep=args.keep) as stack:
        stack.env["BANTER_OPENAI_KEY"] = ""  # never reach a real upstream from a developer's key
        dirs = build_demo(stack.model_root)
        models = {"generate": stack.promote(DEMO_GPT, "generate", dirs[DEMO_GPT]),
                  "embed": stack.promote(DEMO_EMBED, "embed", dirs[DEMO_EMBED])}
        stack.start_producer(args.producer_workers, args.producer_threads)
        nodes = [stack.start_worker(f"soak{i}") for i in range(args.workers)]
        groups = {"producer": [stack.producer.process.pid],
                  "worker": [stack.workers[node].process.pid for node in nodes],
                  "redis": [stack.redis_server.process.pid]}
        per_worker = {node: [stack.workers[node].process.pid] for node in nodes}
        sampler = RssSampler({**groups, **per_worker}).start()
        try:
            log.info("warm-up and embedding references (%d texts, one at a time)",
                     len(EMBED_TEXTS))
            references = warm_up(stack.producer_url, stats)
            sampler.mark("warm")
            baseline = None
            outcomes_baseline: list[Outcome] = []
            if baseline_plan:
                log.info("baseline: %d operations from 1 client", len(baseline_plan))
                outcomes_baseline, wall = run_clients(stack.producer_url, baseline_plan, 1,
                                                      stats, run_id, references, "baseline")
                baseline = {"jobs": len(baseline_plan), "wall_s": round(wall, 3),
                            "jobs_per_s": round(len(baseline_plan) / wall, 2)}
            sampler.mark("start")
            log.info("soak: %d operations from %d clients, %d worker(s)", len(plan),
                     args.clients, args.workers)
            outcomes, wall = run_clients(stack.producer_url, plan, args.clients, stats, run_id,
                                         references, "soak", _progress)
            sampler.mark("end")
            log.info("soak: %d operations in %.1fs = %.1f jobs/s; auditing", len(plan), wall,
                     len(plan) / wall)
            everything = outcomes_baseline + outcomes
            known = {job_id: o for o in everything for job_id in o.job_ids}
            redis_audit = audit_redis(stack.redis, known)
            api_problems = audit_api(stack.producer_url, everything, stats, run_id, references)
            left = leftovers(stack)
            worker_stats = {node: {k: float(v) for k, v in
                                   stack.redis.hgetall(keys.worker_stats(node)).items()}
                            for node in nodes}
        finally:
            sampler.stop()
        failures_in_logs = {name: child.log_tail(1500) for name, child in
                            [("producer", stack.producer), *stack.workers.items()]
                            if not child.alive()}

    return finish(args, plan, outcomes, outcomes_baseline, wall, baseline, stats, redis_audit,
                  api_problems, left, sampler, models, worker_stats, failures_in_logs, defaults,
                  load_at_start, began, nodes)


def warm_up(url: str, stats: HttpStats) -> dict[str, np.ndarray]:
    """One generation (the model loads), then each embed text alone: its reference vector."""
    client = Client(url, stats, "warmup", {})
    try:
        response = client.call("POST", "POST /v1/inference", "/v1/inference",
                               json={"prompt": "warm up", "max_tokens": 2, "temperature": 0})
        if response.status_code != 200 or response.json()["text"] != expected_text(2):
            raise RuntimeError(f"the warm-up generation failed: {response.status_code} "
                               f"{response.text[:300]}")
        references = {}
        for text in EMBED_TEXTS:
            response = client.call("POST", "POST /v1/embeddings", "/v1/embeddings",
                                   json={"input": text})
            if response.status_code != 200:
                raise RuntimeError(f"the warm-up embedding failed: {response.status_code} "
                                   f"{response.text[:300]}")
            references[text] = np.asarray(response.json()["data"][0]["embedding"],
                                          dtype=np.float64)
        return references
    finally:
        client.close()


def finish(args, plan, outcomes, outcomes_baseline, wall, baseline, stats, redis_audit,
           api_problems, left, sampler, models, worker_stats, failures_in_logs, defaults,
           load_at_start, began, nodes) -> dict:
    everything = outcomes_baseline + outcomes
    errors = [f"#{o.op.index} {o.op.kind}: {o.error}" for o in everything if o.error]
    # a duplicate is counted once however many checks see it: extra runs of one job, extra
    # jobs for one idempotency key (the Redis audit and the clients may both see one)
    incidents: dict[tuple, int] = {}
    for key, count, _message in redis_audit["duplicated"]:
        incidents[key] = max(incidents.get(key, 0), count)
    for o in everything:
        if o.duplicated:
            incidents[o.dup_key] = max(incidents.get(o.dup_key, 0), 1)
    dup_messages = ([message for _key, _count, message in redis_audit["duplicated"]]
                    + [f"#{o.op.index} {o.op.kind}: {o.duplicated}" for o in everything
                       if o.duplicated])
    client_wrong = [f"#{o.op.index} {o.op.kind}: {o.wrong}" for o in everything if o.wrong]
    # jobs accepted: every op that was answered 2xx made one job; the warm-up made 1 + texts
    warm_jobs = 1 + len(EMBED_TEXTS)
    accepted = warm_jobs + sum(1 for o in everything if not o.error)
    unaccounted = redis_audit["records"] - accepted
    # ops that failed may or may not have made a job; extra records are duplicates only when
    # every op got an answer, and only those an idempotency key's extra records do not explain
    explained = sum(n for key, n in incidents.items() if key[0] == "idem")
    extra = max(0, unaccounted - explained) if unaccounted > 0 and not errors else 0
    shortfall = -unaccounted if unaccounted < 0 else 0
    lost = len(redis_audit["lost"]) + shortfall
    duplicated = sum(incidents.values()) + extra
    wrong = len(redis_audit["wrong"]) + len(client_wrong) + len(api_problems)
    http_5xx = stats.count(lambda s: s >= 500)
    http_429 = stats.count(lambda s: s == 429)
    served = round(len(plan) / wall, 2)

    latency = defaultdict(list)
    for o in outcomes:
        if not o.error:
            latency[o.op.kind].append(o.latency_s)
    start, end = sampler.marks["start"], sampler.marks["end"]
    rss = {name: {"after_warm_up": sampler.at(name, sampler.marks["warm"]),
                  "at_start": sampler.at(name, start), "peak": sampler.peak(name),
                  "at_end": sampler.at(name, end)}
           for name in ("producer", "worker", "redis")}
    ok = not (lost or duplicated or http_5xx or wrong or errors)
    result = {
        "scenario": "soak",
        "unit": "jobs/s",
        "served": served,
        "baselines": {"single_client": baseline["jobs_per_s"]} if baseline else {},
        "ratios": ({"single_client": round(served / baseline["jobs_per_s"], 3)}
                   if baseline else {}),
        "ok": ok,
        "lost": lost,
        "duplicated": duplicated,
        "http_5xx": http_5xx,
        "http_429": http_429,
        "wrong_results": wrong,
        "failed_ops": len(errors),
        "peak_rss_mb": {"producer": sampler.peak("producer"),
                        "worker": max(sampler.peak(node) for node in nodes),
                        "workers_sum": sampler.peak("worker"), "redis": sampler.peak("redis")},
        "rss_mb": rss,
        "rss_timeline_mb": {"columns": ["t_s", *sampler.groups],
                            "marks_s": {k: round(v, 1) for k, v in sampler.marks.items()},
                            "points": sampler.timeline()},
        "counts": {
            "ops": len(plan),
            "ops_by_kind": dict(Counter(o.op.kind for o in outcomes)),
            "baseline_ops": len(outcomes_baseline),
            "warm_up_jobs": warm_jobs,
            "jobs_accepted": accepted,
            "job_records": redis_audit["records"],
            "job_statuses": redis_audit["statuses"],
            "idempotency_keys": redis_audit["idempotency_keys"],
            "resubmissions": dict(Counter(o.op.resend for o in everything if o.op.resend)),
            "http": {endpoint: dict(sorted(by_status.items()))
                     for endpoint, by_status in sorted(stats.statuses.items())},
            "transport_errors": dict(stats.transport),
            "http_429_without_retry_after": stats.retry_after_missing,
        },
        "latency_ms": {kind: p50_p99_ms(values) for kind, values in sorted(latency.items())},
        "http_latency_ms": {endpoint: p50_p99_ms(values)
                            for endpoint, values in sorted(stats.latency.items())},
        "leftovers": left,
        "problems": {"lost": redis_audit["lost"][:10], "duplicated": dup_messages[:10],
                     "wrong": (redis_audit["wrong"] + client_wrong + api_problems)[:10],
                     "failed_ops": errors[:10], "dead_processes": failures_in_logs},
        "worker_stats": worker_stats,
        "settings": {
            "jobs": len(plan),
            "clients": args.clients,
            "workers": args.workers,
            "mix": MIX,
            "max_tokens": list(args.max_tokens),
            "temperature": 0,
            "resubmit": args.resubmit,
            "resubmit_every": RESEND_EVERY,
            "baseline_jobs": args.baseline_jobs,
            "seed": args.seed,
            "embed_texts": len(EMBED_TEXTS),
            "embed_atol": EMBED_ATOL,
            "poll_s": {"first": POLL_FIRST_S, "max": POLL_MAX_S, "factor": 1.5},
            "rss_period_s": RSS_PERIOD_S,
            "models": models,
            "max_running": defaults.max_running,
            "worker_concurrency": defaults.worker_concurrency,
            "max_queue_depth": defaults.max_queue_depth,
            "producer": {"workers": args.producer_workers, "threads": args.producer_threads},
        },
        "machine": {**machine_facts(), "loadavg_at_start": load_at_start,
                    "loadavg_at_end": _loadavg()},
        "wall_s": round(wall, 3),
        "duration_s": round(time.perf_counter() - began, 2),
    }
    if not ok:
        # the dispatcher exits 0 after printing; a failed soak must exit 1, JSON first
        json.dump(result, sys.stdout, indent=2)
        sys.stdout.write("\n")
        sys.stdout.flush()
        log.error("soak failed: lost %d, duplicated %d, 5xx %d, wrong %d, failed ops %d", lost,
                  duplicated, http_5xx, wrong, len(errors))
        raise SystemExit(1)
    return result
