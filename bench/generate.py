"""generate: served streaming throughput under N concurrent clients vs static batching,
one-at-a-time serving and a raw ONNX Runtime decode loop.

Each of ``--clients`` clients sends ``--rounds`` requests one after another (closed loop), each
``POST /v1/inference?stream=true`` with temperature 0 and a ``max_tokens`` taken from the
cycling ``--max-tokens`` list; every request has its own prompt. The same workload runs:

* served  (continuous batching): the real stack, one CPU worker;
* static  baseline: the same stack with the worker restarted with ``BANTER_ADMISSION=static``;
* batch1  baseline: the same stack with ``BANTER_MAX_RUNNING=1`` (one sequence at a time);
* raw_ort baseline: one process, a plain onnxruntime greedy loop with KV cache, each round's
  N sequences in one batch from the start (finished rows leave the batch), no Redis/HTTP;
* raw_ort_inplace baseline: the raw_ort loop on the model's in-place twin (``workers.inplace``,
  what a worker serves with ``BANTER_KV_LAYOUT`` auto on the CPU provider), for a ``gpt_graph``
  decoder on the CPU provider (else it is left out, ``skipped_baselines`` says why);
* raw_ort_batch1: the same loop one request at a time; its outputs are the greedy reference
  every other path must reproduce exactly (``correct``);
* variants.NAME (``--variant``): the served phase again on a worker with more environment,
  against served and the same baselines;
* diagnostics.engine_alone: the closed loop fed straight into ``Engine.step`` in this process,
  continuous and static, to tell the engine's own costs from the serving path's;
* diagnostics.flat_pass_model: not a measurement; the pass-times the schedule takes if every
  pass costs the same (``flat_pass_model``), the ceiling of ``ratios.static`` in that regime.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import requests

from banter.client import sse_events
from bench.common import comma_list, env_pair, non_negative, p50_p99_ms, positive, run_released
from bench.inplace import Inplace
from bench.machine import machine_facts
from bench.stack import BenchStack

BASELINES = ("static", "batch1", "raw_ort", "raw_ort_inplace")

if TYPE_CHECKING:
    from banter.settings import Settings
    from workers.engine import EngineSettings

log = logging.getLogger("bench.generate")

# mixed lengths in 8..128, cycled (client c, round r gets entry (c + r) % len)
DEFAULT_MAX_TOKENS = [8, 16, 32, 64, 128, 24, 48, 96, 12, 40, 80, 112, 20, 56, 104, 72]
DEFAULT_CLIENTS = 16
DEFAULT_ROUNDS = 3
DEFAULT_REPEATS = 3
DEFAULT_RAW_THREADS = 1
REQUEST_TIMEOUT_S = 600.0

_WORDS = ("the quick brown fox jumps over a lazy dog while every token of the answer streams "
          "back from one batched pass of the decoder so that many prompts share the same "
          "machine and nobody waits for long when the queue is busy and the cache keeps keys "
          "and values for each layer").split()


@dataclass(frozen=True)
class Request:
    index: int   # position in the workload (round * clients + client)
    client: int
    round: int
    prompt: str
    max_tokens: int


@dataclass
class Outcome:
    """What one served request got back."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = ""
    error: str = ""
    sent: float = 0.0
    first_token: float | None = None
    done: float = 0.0
    job_id: str = ""
    sent_at: float = 0.0  # time.time() of sent and first_token: compared with the job's record
    first_token_at: float | None = None


# -- workload --------------------------------------------------------------------------------

def make_prompt(j: int) -> str:
    """Deterministic, distinct prompts of varied length (4..16 words)."""
    n = 4 + (j * 5) % 13
    start = (j * 7) % len(_WORDS)
    words = [_WORDS[(start + k) % len(_WORDS)] for k in range(n)]
    return f"Request {j}: " + " ".join(words)


def make_workload(clients: int, rounds: int, max_tokens: list[int],
                  first_prompt: int = 0) -> list[Request]:
    """``rounds`` requests per client; ``first_prompt`` offsets the prompts (a warm-up's differ
    from the timed run's)."""
    return [Request(r * clients + c, c, r, make_prompt(first_prompt + r * clients + c),
                    max_tokens[(c + r) % len(max_tokens)])
            for r in range(rounds) for c in range(clients)]


# -- raw ONNX Runtime loop -------------------------------------------------------------------

class RawDecoder:
    """A plain greedy decode loop over an Optimum-layout decoder: onnxruntime + numpy only
    (nothing from workers/), so it is both the hardware-limit baseline and the reference."""

    def __init__(self, model_dir: Path, threads: int = 0,
                 providers: Sequence[Any] = ("CPUExecutionProvider",),
                 profile_prefix: str | None = None) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads > 0:
            options.intra_op_num_threads = threads
        if profile_prefix is not None:  # ORT's profiler (bench kvcache --profile-ops)
            options.enable_profiling = True
            options.profile_file_prefix = profile_prefix
        self.session = ort.InferenceSession(str(model_dir / "model.onnx"), sess_options=options,
                                            providers=list(providers))
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        config_path = model_dir / "config.json"
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
        self.eos = config.get("eos_token_id")
        self.bos = config.get("bos_token_id")
        inputs = {i.name: i for i in self.session.get_inputs()}
        n_layer = sum(1 for n in inputs if n.startswith("past_key_values.") and n.endswith(".key"))
        self.past_names = [f"past_key_values.{i}.{p}" for i in range(n_layer)
                           for p in ("key", "value")]
        self.present_names = [f"present.{i}.{p}" for i in range(n_layer) for p in ("key", "value")]
        meta = inputs["past_key_values.0.key"]
        self.heads, self.head_dim = meta.shape[1], meta.shape[3]
        self.kv_dtype = np.float16 if meta.type == "tensor(float16)" else np.float32
        self.outputs = ["logits", *self.present_names]

    def encode(self, prompt: str) -> list[int]:
        ids = self.tokenizer.encode(prompt).ids
        if not ids:
            start = self.bos if self.bos is not None else self.eos
            ids = [start]
        return ids

    def text(self, token_ids: list[int]) -> str:
        """The text a stream of these tokens carries: EOS adds none; an unfinished multi-byte
        character at the very end comes out as U+FFFD, as the server's detokenizer gives out
        the bytes it held when a generation ends."""
        ids = [t for t in token_ids if t != self.eos]
        return self.tokenizer.decode(ids)

    def generate(self, prompts: list[list[int]], max_tokens: list[int]) -> tuple[list[list[int]], float, int]:
        """Greedy-decode every prompt in one batch; a row leaves the batch when it has its
        ``max_tokens`` or emits EOS. Returns (token ids per row, seconds in the loop, passes)."""
        batch = len(prompts)
        width = max(len(p) for p in prompts)
        ids = np.zeros((batch, width), dtype=np.int64)
        mask = np.zeros((batch, width), dtype=np.int64)
        positions = np.zeros((batch, width), dtype=np.int64)
        for b, p in enumerate(prompts):
            ids[b, width - len(p):] = p
            mask[b, width - len(p):] = 1
            positions[b, width - len(p):] = np.arange(len(p))
        next_pos = np.asarray([len(p) for p in prompts], dtype=np.int64)
        past = [np.zeros((batch, self.heads, 0, self.head_dim), dtype=self.kv_dtype)
                for _ in self.past_names]
        rows = np.arange(batch)  # original row of each live batch row
        out: list[list[int]] = [[] for _ in prompts]
        limits = np.asarray(max_tokens)
        passes = 0
        started = time.perf_counter()
        while True:
            feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions,
                     **dict(zip(self.past_names, past))}
            logits, *present = self.session.run(self.outputs, feeds)
            passes += 1
            tokens = logits[:, -1, :].argmax(axis=-1)
            keep = np.ones(len(rows), dtype=bool)
            for b, (row, token) in enumerate(zip(rows, tokens)):
                out[row].append(int(token))
                if len(out[row]) >= limits[row] or (self.eos is not None and token == self.eos):
                    keep[b] = False
            if not keep.any():
                break
            if not keep.all():
                rows, tokens, next_pos = rows[keep], tokens[keep], next_pos[keep]
                mask = mask[keep]
                present = [t[keep] for t in present]
            past = present
            ids = tokens.astype(np.int64)[:, None]
            positions = next_pos[:, None].copy()
            next_pos = next_pos + 1
            mask = np.concatenate((mask, np.ones((len(rows), 1), dtype=np.int64)), axis=1)
        return out, time.perf_counter() - started, passes


def run_raw(decoder: RawDecoder, workload: list[Request], clients: int,
            repeats: int, inplace: Inplace | None = None) -> dict:
    """The reference (one request at a time) and the batched loop (one batch per round, as a
    round's requests are sent together), ``repeats`` times each; medians of tokens/s. With
    ``inplace``, the batched loop on the in-place layout too (``inplace_batched``)."""
    encoded = [decoder.encode(r.prompt) for r in workload]
    reference: list[list[int]] = []
    alone_runs, batched_runs, batched_ok = [], [], True
    inplace_runs, inplace_ok = [], True
    for repeat in range(repeats):
        outputs, seconds, passes = [], 0.0, 0
        for r, ids in zip(workload, encoded):
            (tokens,), took, n = decoder.generate([ids], [r.max_tokens])
            outputs.append(tokens)
            seconds += took
            passes += n
        if repeat == 0:
            reference = outputs
        batched_ok &= outputs == reference  # later repeats: the loop is deterministic
        alone_runs.append((sum(len(t) for t in outputs), seconds, passes))
        outputs, seconds, passes = [], 0.0, 0
        for start in range(0, len(workload), clients):
            part = workload[start:start + clients]
            tokens, took, n = decoder.generate(encoded[start:start + clients],
                                               [r.max_tokens for r in part])
            outputs += tokens
            seconds += took
            passes += n
        batched_ok &= outputs == reference
        batched_runs.append((sum(len(t) for t in outputs), seconds, passes))
        if inplace is None:
            continue
        outputs, seconds, passes = [], 0.0, 0
        for start in range(0, len(workload), clients):
            part = workload[start:start + clients]
            tokens, took, n = inplace.generate(encoded[start:start + clients],
                                               [r.max_tokens for r in part], decoder.eos)
            outputs += tokens
            seconds += took
            passes += n
        inplace_ok &= outputs == reference
        inplace_runs.append((sum(len(t) for t in outputs), seconds, passes))

    def summary(runs: list[tuple[int, float, int]]) -> dict:
        rates = [tokens / seconds for tokens, seconds, _ in runs]
        return {"tokens_per_s": round(float(np.median(rates)), 2),
                "runs_tokens_per_s": [round(x, 2) for x in rates],
                "tokens": runs[0][0], "passes": runs[0][2],
                "seconds": [round(seconds, 4) for _, seconds, _ in runs]}

    raw = {"reference": reference, "prompt_tokens": [len(e) for e in encoded],
           "batch1": summary(alone_runs),
           "batched": {**summary(batched_runs), "correct": batched_ok}}
    if inplace is not None:
        raw["inplace_batched"] = {**summary(inplace_runs), "correct": inplace_ok}
    return raw


def raw_inplace(model_dir: Path, providers: Sequence[Any], rows: int, threads: int) -> Inplace:
    """The raw loop on the in-place layout (``BANTER_KV_LAYOUT``), for a ``gpt_graph`` decoder
    on the CPU provider; ValueError for anything else."""
    if providers[0] != "CPUExecutionProvider":
        raise ValueError("the in-place layout runs on the CPU provider only")
    return Inplace(model_dir / "model.onnx", rows, threads=threads)  # NotInplaceable: ValueError


# -- the schedule with every pass costing the same -----------------------------------------

def flat_pass_model(workload: list[Request], clients: int, max_running: int,
                    think_passes: float = 1.0) -> dict:
    """A model, not a measurement: how many pass-times the closed-loop workload takes if every
    ORT pass costs the same whatever its rows (roughly a GPU's regime; on a CPU a pass costs
    in proportion to its rows). A step is a decode pass over the running sequences plus, when
    sequences join, a prefill pass that gives them their first token; a client sends its next
    request ``think_passes`` after its previous one ends. ``static`` admits only into an empty
    batch; ``continuous_prefill_beside`` counts a step with both passes as one pass-time
    (``BANTER_PREFILL_OVERLAP`` at best). Every request runs to its ``max_tokens``."""
    def run(static: bool, beside: bool) -> float:
        queues = {c: [r.max_tokens for r in workload if r.client == c] for c in range(clients)}
        ready = {c: 0.0 for c, todo in queues.items() if todo}  # when its next request arrives
        running: dict[int, int] = {}  # client -> tokens still to make
        t = 0.0
        while ready or running:
            joining = [] if static and running else sorted(
                (c for c, at in ready.items() if at <= t), key=ready.get)
            joining = joining[:max(0, max_running - len(running))]
            for c in joining:
                del ready[c]
                running[c] = queues[c].pop(0)
            if not running:
                t = min(ready.values())
                continue
            decoding = len(running) > len(joining)
            t += 2.0 if joining and decoding and not beside else 1.0
            for c in list(running):
                running[c] -= 1
                if not running[c]:
                    del running[c]
                    if queues[c]:
                        ready[c] = t + think_passes
        return t

    passes = {"continuous": run(False, False), "continuous_prefill_beside": run(False, True),
              "static": run(True, False)}
    return {"pass_times": passes, "think_passes": think_passes,
            "ratios": {"static": round(passes["static"] / passes["continuous"], 3),
                       "static_prefill_beside": round(passes["static"]
                                                      / passes["continuous_prefill_beside"], 3)}}


# -- engine alone ----------------------------------------------------------------------------

class _NullSink:
    """EngineSink that only adds up the ORT passes."""

    def __init__(self) -> None:
        self.passes, self.items, self.seconds = 0, 0, 0.0

    def publish_tokens(self, events) -> None:
        pass

    def record_pass(self, kind: str, model: str, version: int, batch_size: int,
                    seconds: float) -> None:
        self.passes += 1
        self.items += batch_size
        self.seconds += seconds


class _PassProbe:
    """Wraps a runner's ``run_decoder`` for one run and splits its passes into prompt passes
    (nothing cached before), merged passes (running rows and joining prompts in one pass,
    ``BANTER_PREFILL_MERGE``) and decode passes: count, rows (and positions, padding included,
    for prompt and merged passes), seconds, and decode seconds by rows."""

    def __init__(self, runner) -> None:
        self.runner, self.run = runner, runner.run_decoder
        self.passes: list[tuple[int, int, float, str]] = []  # rows, positions, seconds, kind

    def __enter__(self) -> _PassProbe:
        self.runner.run_decoder = self
        return self

    def __exit__(self, *exc) -> None:
        del self.runner.run_decoder  # the class's method again

    def __call__(self, inputs, pasts):
        started = time.perf_counter()
        out = self.run(inputs, pasts)
        rows, width = inputs["input_ids"].shape
        self.passes.append((rows, width, time.perf_counter() - started, self.kind(inputs)))
        return out

    @staticmethod
    def kind(inputs) -> str:
        ids = inputs["input_ids"]
        if "seqlens_k" in inputs:  # in place: a decode row has at least its prompt cached
            return "prompt" if ids.shape[1] > 1 or int(inputs["seqlens_k"].max()) == 0 else "decode"
        if inputs["attention_mask"].shape[1] == ids.shape[1]:  # nothing cached before
            return "prompt"
        return "merged" if ids.shape[1] > 1 else "decode"

    def split(self) -> dict:
        kinds = {kind: [p for p in self.passes if p[3] == kind] for kind in ("decode", "prompt", "merged")}
        by_rows: dict[int, list[float]] = {}
        for rows, _, seconds, _ in kinds["decode"]:
            by_rows.setdefault(rows, []).append(seconds)
        out = {kind: {"passes": len(passes), "rows": sum(p[0] for p in passes),
                      "positions": sum(p[0] * p[1] for p in passes),
                      "seconds": round(sum(p[2] for p in passes), 3)}
               for kind, passes in kinds.items()}
        del out["decode"]["positions"]  # one a row
        out["decode"]["ms_by_rows"] = {rows: {"passes": len(v), "mean_ms": round(1000 * float(np.mean(v)), 2)}
                                       for rows, v in sorted(by_rows.items())}
        return out


def run_engine_alone(runners, spec, workload: list[Request], clients: int,
                     settings: EngineSettings) -> tuple[dict, list[list[int]]]:
    """The same closed-loop workload straight into ``workers.engine.Engine.step`` in this
    process (no Redis, HTTP or Celery): what the engine's scheduling costs by itself, with its
    passes split into decode and prompt passes (``_PassProbe``)."""
    from banter.params import SamplingParams
    from workers.engine import Engine

    sink = _NullSink()
    engine = Engine(runners, sink, settings)
    queues = {c: [r for r in workload if r.client == c] for c in range(clients)}
    active, outputs = {}, {}

    def submit(client: int) -> None:
        r = queues[client].pop(0)
        active[client] = (r, engine.submit_generate(
            f"r{r.index}", spec, r.prompt, SamplingParams(max_tokens=r.max_tokens)))

    with _PassProbe(runners.get(spec)) as probe:
        started = time.perf_counter()
        for c in range(clients):
            if queues[c]:
                submit(c)
        while active:
            engine.step()
            for c, (r, future) in list(active.items()):
                if future.done():
                    outputs[r.index] = future.result().token_ids
                    del active[c]
                    if queues[c]:
                        submit(c)
        wall = time.perf_counter() - started
    tokens = sum(len(t) for t in outputs.values())
    return ({"tokens_per_s": tokens / wall, "passes": sink.passes,
             "mean_batch": round(sink.items / sink.passes, 2) if sink.passes else 0,
             "ort_s": round(sink.seconds, 3), **probe.split()},
            [outputs[r.index] for r in workload])


def engine_alone(model_dir: Path, name: str, promoted: dict, workload: list[Request],
                 clients: int, max_running: int, repeats: int,
                 reference: list[list[int]], providers: Sequence[str],
                 settings: Settings) -> dict:
    """``run_engine_alone`` for both admissions, interleaved ``repeats`` times; medians. The
    engine gets the worker's settings (``settings``: its ONNX Runtime threads too), publishing
    in the step (nothing to publish to)."""
    from workers.runner import ModelSpec, RunnerCache
    from workers.runtime import engine_settings

    spec = ModelSpec(name, promoted["version"], "generate", model_dir / "model.onnx",
                     model_dir / "tokenizer.json", promoted["sha256"])
    runners = RunnerCache(providers, intra_op_threads=settings.ort_threads,
                          kv_layout=settings.kv_layout)
    base = replace(engine_settings(settings), max_running=max_running, publish_ahead=0)
    run_engine_alone(runners, spec, workload[:1], 1, base)  # warm-up
    runs: dict[str, list[dict]] = {"continuous": [], "static": []}
    correct = {"continuous": True, "static": True}
    for _ in range(repeats):
        for admission in runs:
            result, outputs = run_engine_alone(runners, spec, workload, clients,
                                               replace(base, admission=admission))
            runs[admission].append(result)
            correct[admission] &= outputs == reference
    return {admission: {
        "tokens_per_s": round(float(np.median([r["tokens_per_s"] for r in results])), 2),
        "runs_tokens_per_s": [round(r["tokens_per_s"], 2) for r in results],
        "passes": results[0]["passes"], "mean_batch": results[0]["mean_batch"],
        "ort_s": [r["ort_s"] for r in results],
        "decode": results[0]["decode"], "prompt": results[0]["prompt"],
        "merged": results[0]["merged"],
        "correct": correct[admission]} for admission, results in runs.items()}


# -- served path -----------------------------------------------------------------------------

def stream_request(session: requests.Session, url: str, model: str, request: Request) -> Outcome:
    """One ``POST /v1/inference?stream=true``; parses the SSE ``token``/``done``/``error``."""
    body = {"prompt": request.prompt, "max_tokens": request.max_tokens, "temperature": 0,
            "model": model}
    outcome = Outcome(sent=time.perf_counter(), sent_at=time.time())
    pieces: list[str] = []
    try:
        with session.post(f"{url}/v1/inference?stream=true", json=body, stream=True,
                          timeout=REQUEST_TIMEOUT_S) as response:
            if response.status_code != 200:
                outcome.error = f"HTTP {response.status_code}: {response.text[:300]}"
                return outcome
            outcome.job_id = response.headers.get("X-Job-ID", "")
            for event, payload in sse_events(response):
                if event == "token":
                    if outcome.first_token is None:
                        outcome.first_token = time.perf_counter()
                        outcome.first_token_at = time.time()
                    outcome.token_ids.append(payload["token_id"])
                    pieces.append(payload["text"])
                elif event == "done":
                    outcome.finish_reason = payload["finish_reason"]
                    break
                elif event == "error":
                    outcome.error = json.dumps(payload["error"])
                    break
    except requests.RequestException as exc:
        outcome.error = f"{type(exc).__name__}: {exc}"
    outcome.done = time.perf_counter()
    outcome.text = "".join(pieces)
    if not outcome.error and not outcome.finish_reason:
        outcome.error = "the stream ended without a done event"
    return outcome


def run_clients(url: str, model: str, workload: list[Request],
                clients: int) -> tuple[list[Outcome], float]:
    """Every client thread sends its requests in order; returns outcomes (workload order) and
    the wall time from the common start to the last answer."""
    outcomes: list[Outcome | None] = [None] * len(workload)
    by_client = [[r for r in workload if r.client == c] for c in range(clients)]
    barrier = threading.Barrier(clients + 1)

    def client(mine: list[Request]) -> None:
        with requests.Session() as session:
            barrier.wait()
            for r in mine:
                outcomes[r.index] = stream_request(session, url, model, r)

    threads = [threading.Thread(target=client, args=(mine,), daemon=True) for mine in by_client]
    started = run_released(threads, barrier)
    ended = max(o.done for o in outcomes)
    return outcomes, ended - started


def worker_counters(stack: BenchStack, node: str) -> dict[str, float]:
    from banter import keys

    raw = stack.redis.hgetall(keys.worker_stats(node))
    return {k: float(v) for k, v in raw.items()}


TTFT_PARTS = ("to_record", "to_worker", "to_first_token", "to_client")


def ttft_parts(redis_client, outcomes: list[Outcome]) -> dict[str, list[float]]:
    """Where each request's time to first token went, in seconds, from its job record
    (``queued_at``, ``started_at``) and the id of its stream's first entry (Redis's clock, on
    the same host): ``to_record`` the producer, from the client's send to the job's record;
    ``to_worker`` the broker and the worker's task thread, to the worker taking the job;
    ``to_first_token`` the engine, to the first token's stream entry (the next step, its
    prefill pass, the publisher); ``to_client`` from that entry to the client (the producer's
    stream read and the SSE response). Requests without a job id or a token are left out."""
    from banter import keys
    from banter.streams import entry_key

    timed = [o for o in outcomes if o.job_id and o.first_token_at is not None]
    pipe = redis_client.pipeline(transaction=False)
    for o in timed:
        pipe.hmget(keys.job(o.job_id), "queued_at", "started_at")
        pipe.xrange(keys.stream(o.job_id), count=1)
    replies = pipe.execute()
    parts: dict[str, list[float]] = {part: [] for part in TTFT_PARTS}
    for o, (queued, started), first in zip(timed, replies[0::2], replies[1::2]):
        if queued is None or started is None or not first:
            continue
        entry_at = entry_key(first[0][0])[0] / 1000  # the entry id's milliseconds
        for part, value in zip(TTFT_PARTS, (float(queued) - o.sent_at,
                                            float(started) - float(queued),
                                            entry_at - float(started),
                                            o.first_token_at - entry_at)):
            parts[part].append(value)
    return parts


@dataclass
class Sample:
    """One timed run of the workload on one freshly started worker."""

    outcomes: list[Outcome]
    wall_s: float
    counters: dict[str, float]
    providers: dict[str, list[str]]
    parts: dict[str, list[float]]  # ttft_parts

    @property
    def tokens(self) -> int:
        return sum(len(o.token_ids) for o in self.outcomes)


def served_sample(stack: BenchStack, label: str, env: dict[str, str], model: str,
                  workload: list[Request], clients: int, warm_up: list[Request]) -> Sample:
    """Start a worker with ``env``, warm it up (one short request: the model loads; then the
    ``warm_up`` workload, untimed), time the workload, stop it."""
    node = stack.start_worker(label, env)
    try:
        with requests.Session() as session:
            warm = stream_request(session, stack.producer_url, model,
                                  Request(-1, 0, 0, "warm up", 2))
        if warm.error:
            raise RuntimeError(f"{label}: the warm-up request failed: {warm.error}")
        if warm_up:
            failed = [o.error for o in run_clients(stack.producer_url, model, warm_up, clients)[0]
                      if o.error]
            if failed:
                raise RuntimeError(f"{label}: {len(failed)} warm-up requests failed, first: "
                                   f"{failed[0][:300]}")
        before = worker_counters(stack, node)
        outcomes, wall = run_clients(stack.producer_url, model, workload, clients)
        after = worker_counters(stack, node)
        parts = ttft_parts(stack.redis, outcomes)
        failed = [o.error for o in outcomes if o.error]
        if failed:
            log.warning("%s: %d requests failed, first: %s\n--- producer log tail:\n%s\n"
                        "--- worker log tail:\n%s", label, len(failed), failed[0][:300],
                        stack.producer.log_tail(), stack.workers[node].log_tail())
        providers = stack.worker_providers(node)
    finally:
        stack.stop_worker(node)
    counters = {k: after.get(k, 0.0) - before.get(k, 0.0)
                for k in ("generate_passes", "generate_items", "generate_seconds")}
    sample = Sample(outcomes, wall, counters, providers, parts)
    passes = counters["generate_passes"]
    log.info("%s: %d tokens in %.2fs = %.1f tokens/s, %d passes of %.1f rows, ORT %.2fs "
             "(%.2f ms a pass, %.2f ms of wall)", label, sample.tokens, wall,
             sample.tokens / wall, passes, counters["generate_items"] / max(passes, 1),
             counters["generate_seconds"], 1e3 * counters["generate_seconds"] / max(passes, 1),
             1e3 * wall / max(passes, 1))
    return sample


def summarize(samples: list[Sample], env: dict[str, str], workload: list[Request],
              reference: list[list[int]], decoder: RawDecoder) -> dict:
    """tokens/s: the median over repeats; ttft and latency: percentiles over every request of
    every repeat; engine counters summed; correct: every request of every repeat matched."""
    rates = [s.tokens / s.wall_s for s in samples]
    outcomes = [o for s in samples for o in s.outcomes]
    errors, mismatches = [], []
    for s in samples:
        for r, o, ref in zip(workload, s.outcomes, reference):
            if o.error:
                errors.append(f"request {r.index}: {o.error}")
            elif o.token_ids != ref or o.text != decoder.text(ref):
                mismatches.append(r.index)
    passes = sum(s.counters["generate_passes"] for s in samples)
    items = sum(s.counters["generate_items"] for s in samples)
    ort_s = sum(s.counters["generate_seconds"] for s in samples)
    wall = sum(s.wall_s for s in samples)
    return {
        "worker_env": env,
        "tokens_per_s": round(float(np.median(rates)), 2),
        "runs_tokens_per_s": [round(x, 2) for x in rates],
        "requests_per_run": len(workload),
        "tokens_per_run": samples[0].tokens,
        "wall_s": [round(s.wall_s, 3) for s in samples],
        "ttft_ms": p50_p99_ms([o.first_token - o.sent for o in outcomes
                                   if o.first_token is not None]),
        "ttft_parts_ms": {part: p50_p99_ms([v for s in samples for v in s.parts[part]])
                          for part in TTFT_PARTS},
        "latency_ms": p50_p99_ms([o.done - o.sent for o in outcomes if not o.error]),
        "engine": {"passes": int(passes), "mean_batch": round(items / passes, 2) if passes else 0,
                   "ort_s": round(ort_s, 3),
                   "ort_share_of_wall": round(ort_s / wall, 3) if wall else 0},
        "errors": errors[:5],
        "error_count": len(errors),
        "mismatches": sorted(set(mismatches))[:20],
        "correct": not errors and not mismatches,
    }


# -- scenario --------------------------------------------------------------------------------

def variant_summary(phase: dict, served: float, baselines: dict[str, float],
                    env: dict[str, str]) -> dict:
    """A ``--variant`` phase against served and every baseline of the same run."""
    value = phase["tokens_per_s"]
    against = {"served": served, **baselines}
    return {"tokens_per_s": value, "worker_env": env, "ttft_ms": phase["ttft_ms"],
            "ratios": {name: round(value / other, 3) for name, other in against.items() if other}}


def static_ratios_by_repeat(phases: dict) -> dict[str, dict]:
    """Each served phase's tokens/s over static's, repeat by repeat (a repeat's phases run one
    after the other, so the machine's drift touches both alike), and their median: steadier
    than the ratio of two medians where runs spread widely (a GPU's do)."""
    if "static" not in phases:
        return {}
    static = phases["static"]["runs_tokens_per_s"]
    out = {}
    for phase, result in phases.items():
        if phase != "static":
            ratios = [round(a / b, 3) for a, b in zip(result["runs_tokens_per_s"], static) if b]
            out[phase] = {"runs": ratios, "median": round(float(np.median(ratios)), 3)}
    return out


def variant(raw: str) -> tuple[str, dict[str, str]]:
    """argparse type of ``--variant``: ``NAME:VAR=VALUE[,VAR=VALUE...]``."""
    name, sep, rest = raw.partition(":")
    if not sep or not rest or not re.fullmatch(r"[a-z0-9_]+", name):
        raise argparse.ArgumentTypeError(f"expected NAME:VAR=VALUE[,VAR=VALUE...] with NAME of "
                                         f"a-z, 0-9 and _, got {raw!r}")
    return name, dict(env_pair(item) for item in rest.split(","))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--clients", type=positive, default=DEFAULT_CLIENTS,
                   help=f"concurrent streaming clients (default {DEFAULT_CLIENTS})")
    p.add_argument("--max-tokens", type=comma_list(item=positive, unique=False), default=DEFAULT_MAX_TOKENS,
                   help="comma-separated max_tokens values, cycled over requests "
                        f"(default {','.join(map(str, DEFAULT_MAX_TOKENS))})")
    p.add_argument("--rounds", type=positive, default=DEFAULT_ROUNDS,
                   help=f"requests each client sends one after another (default {DEFAULT_ROUNDS})")
    p.add_argument("--repeats", type=positive, default=DEFAULT_REPEATS,
                   help="timed runs of each phase, interleaved, each on a fresh worker; "
                        f"tokens/s is their median (default {DEFAULT_REPEATS})")
    p.add_argument("--raw-repeats", type=positive, default=None,
                   help="timed runs of the raw loops (the first is the reference; default: "
                        "--repeats)")
    p.add_argument("--warm-up-rounds", type=non_negative, default=0,
                   help="rounds of the workload (other prompts) each served phase's fresh worker "
                        "runs untimed before its timed run, so first-time costs (a GPU's new "
                        "shapes, its memory arena growing) fall outside the timing (default 0: "
                        "one short request, which loads the model)")
    p.add_argument("--max-running", type=positive, default=None,
                   help="BANTER_MAX_RUNNING of the served and static workers "
                        "(default: the project default)")
    p.add_argument("--model-dir", type=Path, default=None,
                   help="an Optimum-layout decoder directory (model.onnx, tokenizer.json, "
                        "config.json) to promote and serve instead of the demo decoder; its "
                        "parent becomes the model root")
    p.add_argument("--model-name", default=None,
                   help="registry name for --model-dir (default: the directory's name)")
    p.add_argument("--baselines", default="static,batch1,raw_ort,raw_ort_inplace",
                   type=comma_list(BASELINES, empty_ok=True),
                   help="baselines to run, comma-separated, from static, batch1, raw_ort, "
                        "raw_ort_inplace "
                        "(the raw reference loop always runs: it is the correctness oracle)")
    p.add_argument("--raw-threads", type=int, default=DEFAULT_RAW_THREADS,
                   help="intra-op threads of the raw loop's ORT session (0: ORT's default, "
                        f"all cores; default {DEFAULT_RAW_THREADS})")
    p.add_argument("--gpu", type=int, default=None,
                   help="serve with banter worker --gpu N (CUDA provider); the raw loops and the "
                        "engine-alone diagnostic run on the CUDA provider too (default: "
                        "BENCH_GPU, else the CPU)")
    p.add_argument("--worker-env", action="append", default=[], metavar="NAME=VALUE",
                   type=env_pair,
                   help="extra environment for every served phase's worker (repeatable; each "
                        "phase's own BANTER_ADMISSION / BANTER_MAX_RUNNING win), e.g. "
                        "BANTER_PREFILL_OVERLAP=on; the engine-alone diagnostic reads it too")
    p.add_argument("--variant", action="append", default=[], type=variant,
                   metavar="NAME:VAR=VALUE[,VAR=VALUE...]",
                   help="one more continuous-batching phase (repeatable), interleaved with the "
                        "others, its worker with this environment on top; reported under "
                        "variants.NAME against served and the baselines of the same run, e.g. "
                        "prefill_overlap:BANTER_PREFILL_OVERLAP=on")
    p.add_argument("--producer-workers", type=positive, default=2)
    p.add_argument("--producer-threads", type=positive, default=64)
    p.add_argument("--keep", action="store_true",
                   help="keep the temporary directory (logs) and log where it is")


def run(args: argparse.Namespace) -> dict:
    began = time.perf_counter()
    load_at_start = _loadavg()
    from banter.demo import DEMO_GPT, build_demo
    from banter.settings import Settings
    from workers.runner import select_providers

    baselines = set(args.baselines)
    workload = make_workload(args.clients, args.rounds, args.max_tokens)
    warm_up = make_workload(args.clients, args.warm_up_rounds, args.max_tokens,
                            first_prompt=len(workload))
    model_root = args.model_dir.resolve().parent if args.model_dir else None
    worker_env = dict(args.worker_env)
    # the workers' settings (the environment plus --worker-env): a bad value stops the run here
    defaults = Settings.from_env({**os.environ, **worker_env})
    max_running = args.max_running or defaults.max_running
    batching = {**worker_env, "BANTER_MAX_RUNNING": str(max_running)}
    served_phases = {"served": ("continuous", {**batching, "BANTER_ADMISSION": "continuous"})}
    if "static" in baselines:
        served_phases["static"] = ("static", {**batching, "BANTER_ADMISSION": "static"})
    if "batch1" in baselines:
        served_phases["batch1"] = ("batch1", {**worker_env, "BANTER_MAX_RUNNING": "1"})
    variants = dict(args.variant)
    for name, env in variants.items():
        if name in ("served", "static", "batch1", "raw_ort", "raw_ort_batch1", "raw_ort_inplace"):
            raise ValueError(f"--variant {name}: the name of a phase already in the run")
        phase_env = {**batching, "BANTER_ADMISSION": "continuous", **env}
        Settings.from_env({**os.environ, **phase_env})  # a bad value stops the run here
        served_phases[f"variant_{name}"] = (f"variant-{name.replace('_', '-')}", phase_env)

    with BenchStack(model_root=model_root, keep=args.keep, gpu=args.gpu) as stack:
        # the worker's own choice
        providers = select_providers(use_gpu=stack.gpu is not None, tf32=defaults.cuda_tf32)
        if args.model_dir:
            model_dir = args.model_dir.resolve()
            name = args.model_name or model_dir.name
        else:
            model_dir = build_demo(stack.model_root)[DEMO_GPT]
            name = DEMO_GPT
        promoted = stack.promote(name, "generate", model_dir)

        log.info("raw onnxruntime loops: the reference, one request at a time, and batched")
        decoder = RawDecoder(model_dir, args.raw_threads, providers)
        inplace, skipped = None, {}
        if "raw_ort_inplace" in baselines:
            try:
                inplace = raw_inplace(model_dir, providers, args.clients, args.raw_threads)
            except ValueError as exc:
                skipped["raw_ort_inplace"] = str(exc)
                log.warning("raw_ort_inplace left out: %s", exc)
        raw = run_raw(decoder, workload, args.clients, args.raw_repeats or args.repeats, inplace)
        reference = raw.pop("reference")

        log.info("the engine alone, in this process (diagnostic)")
        alone = engine_alone(model_dir, name, promoted, workload, args.clients, max_running,
                             args.repeats, reference, providers, defaults)

        stack.start_producer(args.producer_workers, args.producer_threads)
        samples: dict[str, list[Sample]] = {phase: [] for phase in served_phases}
        for repeat in range(args.repeats):  # interleaved: the machine's drift hits all alike
            for phase, (label, env) in served_phases.items():
                log.info("%s, run %d of %d: %d requests from %d clients", phase, repeat + 1,
                         args.repeats, len(workload), args.clients)
                samples[phase].append(served_sample(stack, label, env, name, workload,
                                                    args.clients, warm_up))
    phases = {phase: summarize(samples[phase], served_phases[phase][1], workload, reference,
                               decoder) for phase in served_phases}

    served = phases["served"]["tokens_per_s"]
    numbers = {phase: result["tokens_per_s"] for phase, result in phases.items()
               if phase in ("static", "batch1")}
    if "raw_ort" in baselines:
        numbers["raw_ort"] = raw["batched"]["tokens_per_s"]
    if "inplace_batched" in raw:
        numbers["raw_ort_inplace"] = raw["inplace_batched"]["tokens_per_s"]
    numbers["raw_ort_batch1"] = raw["batch1"]["tokens_per_s"]
    correctness = {phase: result["correct"] for phase, result in phases.items()}
    correctness["raw_ort"] = raw["batched"]["correct"]
    if "inplace_batched" in raw:
        correctness["raw_ort_inplace"] = raw["inplace_batched"]["correct"]
    correctness.update({f"engine_alone_{a}": r["correct"] for a, r in alone.items()})
    return {
        "scenario": "generate",
        "unit": "tokens/s",
        "served": served,
        "baselines": numbers,
        "ratios": {b: round(served / value, 3) for b, value in numbers.items() if value},
        "static_ratios_by_repeat": static_ratios_by_repeat(phases),
        "variants": {name: variant_summary(phases[f"variant_{name}"], served, numbers, env)
                     for name, env in variants.items()},
        "ttft_ms": {phase: result["ttft_ms"] for phase, result in phases.items()
                    if phase in ("served", "static")},
        "latency_ms": {phase: result["latency_ms"] for phase, result in phases.items()},
        "correct": all(correctness.values()),
        "correctness": correctness,
        "phases": {**phases, "raw_ort": raw["batched"], "raw_ort_batch1": raw["batch1"],
                   **({"raw_ort_inplace": raw["inplace_batched"]} if "inplace_batched" in raw else {})},
        "skipped_baselines": skipped,
        "diagnostics": {"engine_alone": alone,
                        "flat_pass_model": flat_pass_model(workload, args.clients, max_running)},
        "settings": {
            "clients": args.clients,
            "rounds": args.rounds,
            "repeats": args.repeats,
            "raw_repeats": args.raw_repeats or args.repeats,
            "requests_per_run": len(workload),
            "warm_up_rounds": args.warm_up_rounds,
            "max_tokens": args.max_tokens,
            "requested_tokens_per_run": sum(r.max_tokens for r in workload),
            "prompt_tokens": {"min": min(raw["prompt_tokens"]), "max": max(raw["prompt_tokens"])},
            "temperature": 0,
            "model": promoted,
            "max_running": max_running,
            "batch1_max_running": 1,
            "worker_concurrency": defaults.worker_concurrency,
            "worker": f"banter worker {'--gpu %d' % stack.gpu if stack.gpu is not None else '--cpu'}",
            "worker_intra_op_threads": defaults.ort_threads,  # BANTER_ORT_THREADS; 0: ORT's default
            "worker_providers": {phase: samples[phase][0].providers for phase in samples},
            "raw_providers": decoder.session.get_providers(),
            "raw_ort_intra_op_threads": args.raw_threads,
            "producer": {"workers": args.producer_workers, "threads": args.producer_threads},
            "worker_env": worker_env,
        },
        "machine": {**machine_facts(), "loadavg_at_start": load_at_start,
                    "loadavg_at_end": _loadavg()},
        "duration_s": round(time.perf_counter() - began, 2),
    }


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None
