"""The engine: the one loop that owns the models of a worker process.

Callers (Celery task threads) submit jobs and get futures; the engine thread calls ``step``
(or ``run``), which per model version runs at most one ORT pass for embeds and, for generate,
one decode pass over every running sequence plus one prefill pass for the sequences joining at
this step; it reports the step's tokens and passes to an ``EngineSink`` and resolves the
futures. Pure Python + numpy + onnxruntime: tests drive ``step`` by hand.

Generate KV caches live per model version as one left-padded batch (``_Batch``): a decode pass
feeds the previous pass's ``present.*`` arrays back as ``past_key_values.*`` without copying;
the arrays are re-packed only when sequences join (their prefill output is stacked on) or
leave (their rows are cut out, and each kept row keeps only its cached columns). Prefill runs
as a pass of its own so a joining prompt never pads every running row to its length; with
``EngineSettings.prefill_overlap`` that pass runs on a thread of its own, beside the decode pass.
With ``EngineSettings.prefill_merge`` (a GPU's default, where a pass costs about the same for one
token a row as for twenty) the joining prompts ride in the decode pass instead: one pass a step.
A model served in place (``Runner.kv_layout == "inplace"``) keeps its caches in fixed rows
instead (``_SlotBatch``): nothing is re-packed, a pass writes only its new positions.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
import weakref
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from queue import Queue
from typing import Callable, Protocol, Sequence

import numpy as np

from banter.errors import InferenceError, InvalidRequest, PromptTooLong
from banter.params import SamplingParams
from banter.settings import ADMISSIONS, PREFILL_MERGES, PREFILL_OVERLAPS
from banter.streams import TokenEvent
from workers.batching import collate, decode_feeds, mean_pool, merge_feeds, prompt_feeds, right_pad
from workers.detokenizer import IncrementalDetokenizer, find_stop, partial_stop_len
from workers.inplace import decode_inputs, prompt_inputs
from workers.runner import ModelSpec, PassHandle, Preempted, Runner, RunnerCache
from workers.sampling import adjust, logprobs, sample

log = logging.getLogger(__name__)

LANES = ("interactive", "bulk")  # admission order
DEAD_ROW_SHARE = 4  # finished rows kept in a generate batch until they are a quarter of it
# a merged pass (prefill_merge) pads every row to the longest joining prompt; past this many
# positions (rows x that prompt's length) the prompts get a pass of their own instead
MERGE_MAX_POSITIONS = 2048
MAX_BULK_STALL_S = 0.25  # bulk passes stopped for this long: the next one runs to the end
COST_WEIGHT = 0.2  # of the latest pass in a model's running estimate of seconds per token slot
# stopped bulk passes halve the bulk budget down to this share of bulk_pass_s, no further: so
# it never reaches 0 (which doubling could not undo) and 30 finished passes restore it
MIN_BULK_BUDGET_SHARE = 2.0 ** -30
IDLE_POLL_S = 0.2  # how often an idle ``run`` looks at its stop event
# interactive generations count as active this long after the last one ran or waited, so that
# the gaps between one client's requests do not let bulk generations fill the batch
INTERACTIVE_HOLD_S = 1.0


class EngineSink(Protocol):
    """Where the engine reports. Called from the engine thread."""

    def publish_tokens(self, events: Sequence[TokenEvent]) -> None:
        """Once per generate step with every token of that step (never with none)."""

    def record_pass(self, kind: str, model: str, version: int, batch_size: int,
                    seconds: float) -> None:
        """Once per successful ORT pass."""


@dataclass(frozen=True)
class EngineSettings:
    """Batching limits. ``enable_batching=False`` runs one embed and one generate sequence
    per pass. ``batch_window_s`` is how long a lone embed waits for company, when company is
    likely: only when the model's previous embed job arrived less than one window before it
    (a request at idle, or one of a client's sequential requests, runs at once).
    ``bulk_pass_s`` bounds an embed pass with bulk inputs in it: the engine measures each
    model's cost per token slot (input x padded length) and puts no more bulk inputs in a pass
    than fit in that time (at least one), so an interactive job never waits long behind bulk
    work. On a GPU, where a pass costs about the same for 1 and for 8 inputs, bulk batches stay
    full. Bulk inputs ride in a pass with interactive ones only while they add at most
    ``bulk_ride_share`` of ``bulk_pass_s`` to it (an interactive embed on a CPU does not pay
    for bulk rows beside it; on a GPU they come nearly free and still ride).
    ``bulk_max_running``: while interactive generations are active (running or waiting, or
    within ``INTERACTIVE_HOLD_S`` of it), bulk generations start only while fewer than this many
    run; the others wait (those running go on to their end). A step costs in proportion to its
    rows on a CPU, so bulk rows beside an interactive one slow each of its tokens; with no
    interactive generation about, bulk ones fill ``max_running``.
    ``admission="static"`` is the classic static-batching baseline (for benchmarks): new
    generate sequences of a model are admitted only while none of that model is running, so a
    batch forms, runs until all its sequences finish, then the next one forms.
    ``publish_ahead``: with 0 a step publishes its tokens and resolves its finished jobs before
    it returns; with N > 0 a publisher thread does that, in step order, while the engine runs
    the next passes (ONNX Runtime releases the GIL during a pass), at most N steps behind it.
    ``prefill_overlap``: at a step where sequences join a running batch, "on" runs their
    prefill pass on a thread of its own while the engine thread runs the decode pass (one ORT
    session, two passes in flight); "off" runs one after the other; "auto" overlaps for models
    whose KV cache is on a GPU (``Runner.kv_device == "cuda"``).
    ``prefill_merge``: at such a step, "on" runs the joining prompts and the running rows in one
    pass (``batching.merge_feeds``: each running row's token padded to the longest prompt, the
    pads masked; the cache keeps those masked columns until its rows are re-packed); "off" runs
    a prefill pass and a decode pass; "auto" merges for models whose KV cache is on a GPU, where
    a pass costs about the same for one new token a row as for a prompt's worth. A merged step
    does not overlap (``prefill_overlap`` applies to the steps that do not merge). Never for a
    model served in place, whose twin already computes each row's new positions only."""

    max_batch_size: int = 8
    batch_window_s: float = 0.005
    bulk_pass_s: float = 0.025
    bulk_ride_share: float = 0.25
    max_running: int = 32
    bulk_max_running: int = 4
    max_prompt_tokens: int = 512
    enable_batching: bool = True
    admission: str = "continuous"
    publish_ahead: int = 0
    prefill_overlap: str = "off"
    prefill_merge: str = "auto"

    def __post_init__(self) -> None:
        if self.prefill_merge not in PREFILL_MERGES:
            raise ValueError(f"prefill_merge must be one of {', '.join(PREFILL_MERGES)}, "
                             f"got {self.prefill_merge!r}")
        if self.prefill_overlap not in PREFILL_OVERLAPS:
            raise ValueError(f"prefill_overlap must be one of {', '.join(PREFILL_OVERLAPS)}, "
                             f"got {self.prefill_overlap!r}")
        if self.publish_ahead < 0:
            raise ValueError(f"publish_ahead must be >= 0, got {self.publish_ahead}")
        if self.admission not in ADMISSIONS:
            raise ValueError(f"admission must be one of {', '.join(ADMISSIONS)}, "
                             f"got {self.admission!r}")


@dataclass
class EmbedResult:
    """``embeddings`` in input order; ``batch_size`` is the largest pass any input ran in.
    A job cancelled or past its deadline before its last input ran has ``finish_reason``
    "cancelled" or "expired" and no embeddings (a result comes whole); ``prompt_tokens``
    counts the inputs that ran."""

    embeddings: list[list[float]]
    prompt_tokens: int
    batch_size: int
    finish_reason: str = "stop"


@dataclass
class GenerateResult:
    """``batch_size`` is the largest number of sequences in any ORT pass this job was part of;
    ``text`` is exactly the concatenated text of the job's token events."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int]
    batch_size: int
    logprobs: list[dict] | None = None  # one entry per token (``token_logprob``), when asked


def _new_future() -> Future:
    future: Future = Future()
    future.set_running_or_notify_cancel()  # only ``Engine.cancel`` stops a job
    return future


class _EmbedGroup:
    """One embed job: its inputs run as rows of whatever passes they land in; the future
    resolves once every row has its vector, with the first error, or when the job is
    cancelled or passes its ``deadline`` (``Engine._drop``)."""

    def __init__(self, job_id: str, runner: Runner, rows: int, deadline: float | None) -> None:
        self.job_id = job_id
        self.runner = runner
        self.deadline = deadline
        self.future = _new_future()
        self.vectors: list[list[float] | None] = [None] * rows
        self.remaining = rows
        self.prompt_tokens = 0
        self.batch_size = 0

    def row_done(self, index: int, vector: list[float], tokens: int, batch_size: int) -> None:
        if self.future.done():
            return
        self.vectors[index] = vector
        self.prompt_tokens += tokens
        self.batch_size = max(self.batch_size, batch_size)
        self.remaining -= 1
        if not self.remaining:
            self.future.set_result(EmbedResult(self.vectors, self.prompt_tokens,  # type: ignore[arg-type]
                                               self.batch_size))

    def stop(self, reason: str) -> None:
        """End the job before its last row ran: "cancelled" or "expired", no vectors."""
        if not self.future.done():
            self.future.set_result(EmbedResult([], self.prompt_tokens, self.batch_size, reason))

    def fail(self, exc: Exception) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


@dataclass(eq=False)
class _EmbedRow:
    """One input of an embed job, waiting for or in a pass."""

    group: _EmbedGroup
    index: int
    ids: list[int]
    ready_at: float  # when it goes into a pass even if the pass is not full
    lane: str = "interactive"


class _EmbedQueue:
    """The embed rows waiting for one model version: every interactive row ahead of every bulk
    row; within a lane, the jobs waiting take turns row by row (each job's rows in order), so
    a job of thousands of inputs does not hold back one of a single input that arrives after
    it: that input goes into the next pass."""

    def __init__(self) -> None:
        # per lane, one deque of waiting rows per job (never empty), the next to take first
        self._lanes: dict[str, deque[deque[_EmbedRow]]] = {lane: deque() for lane in LANES}
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def add(self, rows: Sequence[_EmbedRow]) -> None:
        """One job's rows (one lane), after the jobs already waiting."""
        if rows:
            self._lanes[rows[0].lane].append(deque(rows))
            self._size += len(rows)

    def put_back(self, rows: Sequence[_EmbedRow]) -> None:
        """Rows taken out for a pass that did not run: each job's back at the head of its
        lane, the jobs in the order they had in the pass."""
        taken: dict[_EmbedGroup, list[_EmbedRow]] = {}
        for row in rows:
            taken.setdefault(row.group, []).append(row)
        for group, mine in reversed(list(taken.items())):
            jobs = self._lanes[mine[0].lane]
            waiting = next((job for job in jobs if job[0].group is group), None)
            if waiting is None:
                waiting = deque()
            else:
                jobs.remove(waiting)
            waiting.extendleft(reversed(mine))
            jobs.appendleft(waiting)
        self._size += len(rows)

    def remove(self, group: _EmbedGroup) -> None:
        """Drop the rows of ``group`` that wait (a job cancelled or past its deadline)."""
        for jobs in self._lanes.values():
            for job in [job for job in jobs if job[0].group is group]:
                jobs.remove(job)
                self._size -= len(job)

    def head(self, count: int) -> list[_EmbedRow]:
        """The first ``count`` rows ``popleft`` would take, in that order."""
        out: list[_EmbedRow] = []
        for jobs in self._lanes.values():
            turn = 0
            while True:
                took = False
                for job in jobs:
                    if turn < len(job):
                        out.append(job[turn])
                        took = True
                        if len(out) == count:
                            return out
                if not took:
                    break
                turn += 1
        return out

    def first(self) -> _EmbedRow:
        return self.head(1)[0]

    def popleft(self) -> _EmbedRow:
        for jobs in self._lanes.values():
            if jobs:
                row = jobs[0].popleft()
                if jobs[0]:
                    jobs.rotate(-1)  # the job's next row waits for the other jobs' turns
                else:
                    jobs.popleft()
                self._size -= 1
                return row
        raise IndexError("pop from an empty embed queue")


class _Sequence:
    """One generate job: its cache, pending tokens, sampler state and streamed text."""

    def __init__(self, job_id: str, runner: Runner, prompt_ids: list[int],
                 params: SamplingParams, deadline: float | None,
                 lane: str = "interactive") -> None:
        self.job_id = job_id
        self.runner = runner
        self.lane = lane
        self.params = params
        self.deadline = deadline
        self.future = _new_future()
        self.prompt_tokens = len(prompt_ids)
        self.pending = np.asarray(prompt_ids, dtype=np.int64)
        self.past_len = 0
        self.rng = np.random.default_rng(None if params.seed is None else params.seed % 2**64)
        self.detokenizer = IncrementalDetokenizer(runner.tokenizer)
        self.token_ids: list[int] = []
        self.counts: dict[int, int] = {}  # generated token id to times, for the penalties
        self.logprobs: list[dict] | None = None if params.logprobs is None else []
        self.streamed = ""
        self.batch_size = 0
        self.started = False
        self.finish_reason: str | None = None
        self.error: InferenceError | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.error is not None

    def advance(self, token_id: int, batch_size: int, logprob: dict | None = None) -> TokenEvent:
        """Take one pass's result: the sampled token (and its ``token_logprob`` entry)."""
        self.past_len += len(self.pending)
        self.pending = np.array([token_id], dtype=np.int64)
        self.batch_size = max(self.batch_size, batch_size)
        self.token_ids.append(token_id)
        if self.params.adjusts:
            self.counts[token_id] = self.counts.get(token_id, 0) + 1
        if token_id == self.runner.eos_token_id:
            self.finish_reason = "stop"
            self.detokenizer.flush()
            end = len(self.detokenizer.text)
        else:
            self.detokenizer.push(token_id)
            if len(self.token_ids) >= self.params.max_tokens:
                self.detokenizer.flush()
            end = self._stream_end(self.detokenizer.text)
        piece = self.detokenizer.text[len(self.streamed):end]
        self.streamed += piece
        if self.logprobs is not None:
            self.logprobs.append(logprob)
        return TokenEvent(self.job_id, len(self.token_ids) - 1, piece, token_id, logprob)

    def _stream_end(self, text: str) -> int:
        stop_at = find_stop(text, self.params.stop, len(self.streamed))
        if stop_at >= 0:
            self.finish_reason = "stop"
            return stop_at
        if len(self.token_ids) >= self.params.max_tokens:
            self.finish_reason = "length"
            return len(text)
        return len(text) - partial_stop_len(text, self.params.stop)

    def result(self) -> GenerateResult:
        return GenerateResult(self.streamed, str(self.finish_reason), self.prompt_tokens,
                              len(self.token_ids), list(self.token_ids), self.batch_size,
                              None if self.logprobs is None else list(self.logprobs))


def token_logprob(runner: Runner, logits: np.ndarray, token_id: int, top: int) -> dict:
    """A generated token's entry for ``SamplingParams.logprobs``: ``{token_id, token, bytes,
    logprob, top_logprobs: [{token_id, token, bytes, logprob}]}``, ``token`` and ``bytes``
    being what the token stands for alone (``detokenizer.TokenText``)."""
    chosen, best = logprobs(logits, token_id, top)

    def token(i: int, logprob: float) -> dict:
        raw = runner.token_text.bytes(i)
        return {"token_id": i, "token": runner.token_text.text(raw), "bytes": list(raw),
                "logprob": logprob}

    return {**token(token_id, chosen), "top_logprobs": [token(i, lp) for i, lp in best]}


class _Batch:
    """The running sequences of one model version and their KV cache, left-padded: row b's
    real positions are the last ``seqs[b].past_len`` of the ``T`` columns that ``mask``
    ``[B, T]`` marks; ``pasts`` holds one ``[B, H, T, D]`` array per past input (an OrtValue
    on the model's ``kv_device`` between passes where it has one, re-packed there too:
    ``Runner.pack_kv``). ``T`` is the longest row's past, plus the masked columns the latest
    merged pass (``EngineSettings.prefill_merge``) left inside the rows that were decoding in
    it; a re-pack drops those too, so ``T`` never exceeds the model's positions.

    A finished sequence's row may stay as a dead row (fed its last token, its output ignored)
    until the next re-pack: cutting rows out copies the whole cache, which on a CPU costs about
    a decode pass, while a dead row costs 1/B of one. Rows are re-packed when sequences join
    (one copy for both), or when dead rows reach ``1 / DEAD_ROW_SHARE`` of the batch."""

    def __init__(self, seqs: list[_Sequence], pasts: list[np.ndarray], mask: np.ndarray) -> None:
        self.seqs, self.pasts, self.mask = seqs, pasts, mask

    def live(self) -> list[_Sequence]:
        return [seq for seq in self.seqs if not seq.done]

    def settle(self, arrivals: _Batch | None, runner: Runner) -> None:
        """Stack ``arrivals``' unfinished rows on, dropping dead rows in the same copy (each
        kept row's cache is copied once); without arrivals, re-pack only when dead rows are
        at least ``1 / DEAD_ROW_SHARE`` of the batch, nothing is live, or the next decode pass
        would make the cache wider than the model's positions allow (a dead row's columns
        keep growing, and a merged pass's pads take columns). Each copy is ``runner.pack_kv``:
        on the cache's device where it has one."""
        dead = sum(seq.done for seq in self.seqs)
        roomy = self.mask.shape[1] < runner.max_positions - 1
        if arrivals is None and roomy and DEAD_ROW_SHARE * dead < len(self.seqs):
            return
        parts = [(b, [i for i, seq in enumerate(b.seqs) if not seq.done])
                 for b in (self, arrivals) if b is not None]
        kept = [b.seqs[i] for b, rows in parts for i in rows]
        if kept:
            self.pasts, self.mask = runner.pack_kv([(b.pasts, b.mask, rows) for b, rows in parts])
        self.seqs = kept

    def merge(self, joining: list[_Sequence], runner: Runner) -> None:
        """Keep the live rows and add a blank row (nothing cached) for each of ``joining``, in
        one copy, ready for a merged pass (``batching.merge_feeds``)."""
        rows = [i for i, seq in enumerate(self.seqs) if not seq.done]
        self.pasts, self.mask = runner.pack_kv([(self.pasts, self.mask, rows)], len(joining))
        self.seqs = [self.seqs[i] for i in rows] + joining


class _SlotBatch:
    """The running sequences of an in-place model and their cache: ``slots`` is the runner's
    ``kv_slots``, row b holding ``seqs[b]``'s first ``past_len`` positions; a pass binds rows
    ``0 .. len(seqs) - 1``. Joining sequences are prefilled straight into the rows after those
    (``arrivals``). ``settle`` fills each finished sequence's row with a live row from the end
    (a copy of that one sequence's positions), so rows stay contiguous and no pass carries a
    dead row."""

    def __init__(self, seqs: list[_Sequence], slots: list[np.ndarray]) -> None:
        self.seqs, self.slots = seqs, slots

    def live(self) -> list[_Sequence]:
        return [seq for seq in self.seqs if not seq.done]

    def settle(self, arrivals: _SlotBatch | None, runner: Runner) -> None:
        rows = self.seqs + (arrivals.seqs if arrivals is not None else [])
        count = sum(not seq.done for seq in rows)
        holes = [b for b in range(count) if rows[b].done]
        movers = [b for b in range(count, len(rows)) if not rows[b].done]
        for hole, mover in zip(holes, movers):
            used = rows[mover].past_len
            for buffer in self.slots:
                buffer[hole, :, :used] = buffer[mover, :, :used]
            rows[hole] = rows[mover]
        self.seqs = rows[:count]


class _Publisher:
    """The engine's publishing thread (``EngineSettings.publish_ahead``): each step's tokens go
    out in step order, and a step's finished jobs resolve only after its tokens are out, so a
    job's ``done`` event (published by whoever waits on its future) always follows its last
    token. ``put`` blocks while ``ahead`` steps are waiting: the engine never runs further
    ahead of Redis than that."""

    def __init__(self, sink: EngineSink, resolve: Callable[[list[_Sequence]], None],
                 ahead: int) -> None:
        self._sink, self._resolve = sink, resolve
        self._queue: Queue[tuple[list[TokenEvent], list[_Sequence]]] = Queue(ahead)
        self._thread = threading.Thread(target=self._loop, name="engine-publisher", daemon=True)
        self._thread.start()

    def put(self, events: list[TokenEvent], leaving: list[_Sequence]) -> None:
        if events or leaving:
            self._queue.put((events, leaving))

    def flush(self) -> None:
        self._queue.join()

    def _loop(self) -> None:
        while True:
            events, leaving = self._queue.get()
            try:
                if events:
                    self._sink.publish_tokens(events)
            except Exception:  # the jobs still resolve; the next step's tokens still go out
                log.exception("engine publish failed")
            finally:
                self._resolve(leaving)
                self._queue.task_done()


class Engine:
    """Continuous batching over the models a worker serves.

    ``submit_*`` run in the caller's thread (load the model, tokenize, check limits, enqueue)
    and may raise ``BanterError`` subclasses synchronously. Submitting a generate job id that
    the engine already holds returns that job's future (a redelivery never runs it twice).
    Everything else happens in ``step``, on one engine thread; ``cancel`` and ``running_jobs``
    are thread-safe.
    """

    def __init__(self, runners: RunnerCache, sink: EngineSink,
                 settings: EngineSettings = EngineSettings(),
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._runners = runners
        self._sink = sink
        self._settings = settings
        self._clock = clock
        self._batch_cap = settings.max_batch_size if settings.enable_batching else 1
        self._running_cap = settings.max_running if settings.enable_batching else 1
        # embed s per (input x padded token), engine thread; weak: a retired version is freed
        self._slot_cost: weakref.WeakKeyDictionary[Runner, float] = weakref.WeakKeyDictionary()
        self._bulk_stalled_at: float | None = None  # first bulk stop since one last finished
        self._bulk_budget = settings.bulk_pass_s  # halved by each stopped bulk pass (_embed_cap)
        self._interactive_at = -math.inf  # when an interactive generation last ran or waited
        self._cond = threading.Condition()
        # shared with caller threads, guarded by _cond:
        self._embeds: dict[Runner, _EmbedQueue] = {}
        self._embed_jobs: dict[str, _EmbedGroup] = {}  # embed jobs not yet resolved
        # when each model's latest embed job arrived (weak, as _slot_cost)
        self._last_embed: weakref.WeakKeyDictionary[Runner, float] = weakref.WeakKeyDictionary()
        self._waiting: dict[str, deque[_Sequence]] = {lane: deque() for lane in LANES}
        self._jobs: dict[str, _Sequence] = {}  # generate jobs not yet resolved
        self._cancels: set[str] = set()
        self._preemptible: PassHandle | None = None  # the bulk-only pass running now
        # engine thread only (admission writes them under _cond):
        self._batches: dict[Runner, _Batch | _SlotBatch] = {}  # running sequences, their caches
        self._joining: dict[Runner, list[_Sequence]] = {}  # admitted at this step, no cache yet
        # in-place models' caches (Runner.kv_slots), freed with a retired runner:
        self._slots: weakref.WeakKeyDictionary[Runner, list[np.ndarray]] = weakref.WeakKeyDictionary()
        self._publisher = (_Publisher(sink, self._resolve, settings.publish_ahead)
                           if settings.publish_ahead else None)
        self._prefiller: ThreadPoolExecutor | None = None  # prefill_overlap's thread, made on use

    # -- caller threads ---------------------------------------------------------------------

    def submit_embed(self, spec: ModelSpec, texts: str | Sequence[str],
                     lane: str = "interactive", job_id: str | None = None,
                     deadline: float | None = None) -> Future[EmbedResult]:
        """Embed one text or a list of texts (one vector each, in order). The inputs of a
        list share passes with each other and with other jobs' inputs. ``job_id`` lets
        ``cancel`` stop it (a job id the engine already holds returns that job's future);
        past ``deadline`` (the engine's clock) its inputs that have not run never do."""
        if lane not in LANES:
            raise InvalidRequest(f"lane must be one of {', '.join(LANES)}, got {lane!r}")
        runner = self._runner(spec, "embed")
        inputs = [texts] if isinstance(texts, str) else texts
        if not inputs or not all(isinstance(text, str) for text in inputs):
            raise InvalidRequest("embed input must be a string or a non-empty list of strings")
        encoded = [e.ids for e in runner.tokenizer.encode_batch(list(inputs))]
        for index, ids in enumerate(encoded):
            where = "" if isinstance(texts, str) else f" {index}"
            if not ids:
                raise InvalidRequest(f"embed input{where} encodes to no tokens")
            self._check_length(len(ids), 0, runner, where)
        group = _EmbedGroup(job_id or f"embed-{uuid.uuid4().hex}", runner, len(encoded),
                            deadline)
        with self._cond:
            if group.job_id in self._embed_jobs:  # a redelivered job: the run in progress
                return self._embed_jobs[group.job_id].future
            self._embed_jobs[group.job_id] = group
            arrived = self._clock()
            previous = self._last_embed.get(runner)
            self._last_embed[runner] = arrived
            window = self._settings.batch_window_s
            ready_at = arrived + window if previous is not None and arrived - previous < window \
                else arrived
            rows = [_EmbedRow(group, index, ids, ready_at, lane)
                    for index, ids in enumerate(encoded)]
            self._embeds.setdefault(runner, _EmbedQueue()).add(rows)
            self._preempt_for(lane)
            self._cond.notify()
        return group.future

    def submit_generate(self, job_id: str, spec: ModelSpec, prompt: str, params: SamplingParams,
                        lane: str = "interactive",
                        deadline: float | None = None) -> Future[GenerateResult]:
        if lane not in LANES:
            raise InvalidRequest(f"lane must be one of {', '.join(LANES)}, got {lane!r}")
        if not isinstance(prompt, str):
            raise InvalidRequest("prompt must be a string")
        if params.max_tokens < 1:
            raise InvalidRequest("max_tokens must be at least 1")
        runner = self._runner(spec, "generate")
        ids = runner.tokenizer.encode(prompt).ids or self._start_ids(runner)
        self._check_length(len(ids), params.max_tokens, runner)
        self._check_bias(params, runner)
        seq = _Sequence(job_id, runner, ids, params, deadline, lane)
        with self._cond:
            if job_id in self._jobs:  # a redelivered job joins the run already in progress
                return self._jobs[job_id].future
            self._jobs[job_id] = seq
            self._waiting[lane].append(seq)
            self._preempt_for(lane)
            self._cond.notify()
        return seq.future

    def cancel(self, job_id: str) -> bool:
        """Stop a job at the next step (a waiting generation never starts; an embed job's
        inputs that have not run never do); its future gets finish_reason "cancelled". False
        when the engine does not hold the job."""
        with self._cond:
            if job_id not in self._jobs and job_id not in self._embed_jobs:
                return False
            self._cancels.add(job_id)
            self._cond.notify()
            return True

    def _preempt_for(self, lane: str) -> None:
        """An interactive job arrived: stop the bulk-only pass in progress (its jobs run again
        at the head of the bulk lane; once bulk passes have been stopped with none finishing
        for ``MAX_BULK_STALL_S``, the next runs to the end, so bulk work never starves).
        Called under ``_cond``."""
        if lane == "interactive" and self._preemptible is not None:
            self._preemptible.stop()

    def running_jobs(self) -> list[str]:
        with self._cond:
            return [job_id for job_id, seq in self._jobs.items() if seq.started]

    def _runner(self, spec: ModelSpec, kind: str) -> Runner:
        if spec.kind != kind:
            raise InvalidRequest(f"model {spec.name}@{spec.version} is a {spec.kind} model, "
                                 f"it cannot serve {kind} jobs")
        return self._runners.get(spec)

    def _check_length(self, prompt_tokens: int, max_tokens: int, runner: Runner,
                      where: str = "") -> None:
        limit = self._settings.max_prompt_tokens
        if prompt_tokens > limit:
            raise PromptTooLong(f"the input{where} is {prompt_tokens} tokens, the limit is "
                                f"{limit}")
        if prompt_tokens + max_tokens > runner.max_positions:
            asked = f"{prompt_tokens} input tokens" + (f" + {max_tokens} max_tokens"
                                                       if max_tokens else "")
            raise PromptTooLong(f"{asked} exceed the {runner.max_positions} positions of "
                                f"{runner.spec.name}; shorten the input or lower max_tokens")

    @staticmethod
    def _check_bias(params: SamplingParams, runner: Runner) -> None:
        outside = [token for token, _ in params.logit_bias if token >= runner.vocab_size]
        if outside:
            raise InvalidRequest(f"logit_bias: token id {outside[0]} is not in the vocabulary of "
                                 f"{runner.spec.name}@{runner.spec.version} (ids 0 to "
                                 f"{runner.vocab_size - 1})", "logit_bias")

    @staticmethod
    def _start_ids(runner: Runner) -> list[int]:
        start = runner.bos_token_id if runner.bos_token_id is not None else runner.eos_token_id
        if start is None:
            raise InvalidRequest("the prompt encodes to no tokens and the model has no bos or "
                                 "eos token to start from")
        return [start]

    # -- engine thread ----------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Step until ``stop`` is set; sleeps on a condition while there is nothing to do.
        Returns once every step's tokens are published."""
        while not stop.is_set():
            try:
                worked = self.step()
            except Exception:  # a sink failure must not kill the worker's engine thread
                log.exception("engine step failed")
                worked = False
            if not worked:
                self._wait_for_work(stop)
        self.flush()

    def flush(self) -> None:
        """Wait until the steps run so far have published their tokens and resolved their
        finished jobs (nothing to wait for with ``publish_ahead=0``)."""
        if self._publisher is not None:
            self._publisher.flush()

    def step(self, now: float | None = None) -> bool:
        """One iteration: drop cancelled/expired jobs, admit waiting ones; run the embed passes
        with interactive inputs, then the generate passes; publish the step's tokens and
        resolve the finished generations; then run the bulk-only embed passes. True if it did
        anything."""
        now = self._clock() if now is None else now
        with self._cond:
            leaving = self._drop(now)
            self._admit(now)
            embed_batches = self._take_embeds(now)
        urgent = [(r, b) for r, b in embed_batches if b[0].lane == "interactive"]
        bulk_only = [(r, b) for r, b in embed_batches if b[0].lane != "interactive"]
        for runner, batch in urgent:
            self._run_embed(runner, batch)
        events: list[TokenEvent] = []
        for runner in {*self._batches, *self._joining}:
            leaving += self._run_generate(runner, events)
        try:
            if self._publisher is not None:
                self._publisher.put(events, leaving)
            else:
                try:
                    if events:
                        self._sink.publish_tokens(events)
                finally:
                    self._resolve(leaving)
        finally:  # taken off their queue: run even when the publish failed, or they never end
            for runner, batch in bulk_only:  # once everything interactive is out the door
                self._run_bulk_embed(runner, batch)
        return bool(leaving or embed_batches or events)

    def _wait_for_work(self, stop: threading.Event) -> None:
        with self._cond:
            if stop.is_set() or self._batches or self._cancels or any(self._waiting.values()):
                return
            timeout = IDLE_POLL_S
            if self._embeds:
                first = min(q.first().ready_at for q in self._embeds.values())
                timeout = min(timeout, first - self._clock())
            if timeout > 0:
                self._cond.wait(timeout)

    def _drop(self, now: float) -> list[_Sequence]:
        """Take cancelled and expired sequences out of the waiting lanes and the running set,
        and end cancelled and expired embed jobs."""
        cancels, self._cancels = self._cancels, set()
        leaving = []

        def stop_reason(job_id: str, deadline: float | None) -> str | None:
            if job_id in cancels:
                return "cancelled"
            if deadline is not None and now >= deadline:
                return "expired"
            return None

        def leaves(seq: _Sequence) -> bool:
            reason = stop_reason(seq.job_id, seq.deadline)
            if reason is None:
                return False
            seq.finish_reason = reason
            leaving.append(seq)
            return True

        for group in list(self._embed_jobs.values()):
            reason = stop_reason(group.job_id, group.deadline)
            if reason is not None:
                self._stop_embed(group, reason)
        for lane, queue in self._waiting.items():
            if queue:
                self._waiting[lane] = deque(s for s in queue if not leaves(s))
        for runner, batch in list(self._batches.items()):
            if any([leaves(seq) for seq in batch.live()]):
                self._keep_unfinished(runner, batch)
        return leaving

    def _stop_embed(self, group: _EmbedGroup, reason: str) -> None:
        """End an embed job before its last input ran. Called under ``_cond``."""
        queue = self._embeds.get(group.runner)
        if queue is not None:
            queue.remove(group)
            if not queue:
                del self._embeds[group.runner]
        del self._embed_jobs[group.job_id]
        group.stop(reason)

    def _admit(self, now: float) -> None:
        running = [seq for batch in self._batches.values() for seq in batch.live()]
        count = len(running)
        bulk = sum(seq.lane != "interactive" for seq in running)
        # static admission: a model with a batch in progress takes no one until it drains
        busy = set(self._batches) if self._settings.admission == "static" else set()
        for lane in LANES:
            queue = self._waiting[lane]
            if lane == "interactive" and (queue or count > bulk):
                self._interactive_at = now
            cap = self._running_cap
            if lane != "interactive" and now - self._interactive_at < INTERACTIVE_HOLD_S:
                cap = min(cap, count - bulk + self._settings.bulk_max_running)
            while queue and count < cap:
                if queue[0].runner in busy:
                    return  # it waits for the batch to drain; nothing overtakes it
                seq = queue.popleft()
                seq.started = True
                self._joining.setdefault(seq.runner, []).append(seq)
                count += 1

    def _take_embeds(self, now: float) -> list[tuple[Runner, list[_EmbedRow]]]:
        busy = (bool(self._batches) or any(self._waiting.values())
                or any(len(q) >= self._batch_cap for q in self._embeds.values()))
        batches = []
        for runner, queue in list(self._embeds.items()):
            deadline = now if busy else queue.first().ready_at
            batch = collate(queue, self._embed_cap(runner, queue), deadline, now)
            if batch:
                batches.append((runner, batch))
            if not queue:
                del self._embeds[runner]
        return batches

    def _embed_cap(self, runner: Runner, queue: _EmbedQueue) -> int:
        """The batch size for the next pass: fewer than ``max_batch_size`` only where a bulk
        input would take the padded pass past ``bulk_pass_s`` at the measured cost per token
        slot, or, in a pass with interactive inputs, add more than ``bulk_ride_share`` of it
        to what they cost alone (every interactive input that waits goes in; at least one)."""
        cost = self._slot_cost.get(runner)
        if cost is None:
            return self._batch_cap
        budget = self._bulk_budget
        ride = self._settings.bulk_pass_s * self._settings.bulk_ride_share
        count, width, alone = 0, 0, 0.0
        for job in queue.head(self._batch_cap):
            wider = max(width, len(job.ids))
            if job.lane == "interactive":
                alone = (count + 1) * wider * cost
            elif count and (count + 1) * wider * cost > (
                    alone + ride if alone else budget):
                return count
            count, width = count + 1, wider
        return self._batch_cap

    def _run_bulk_embed(self, runner: Runner, batch: list[_EmbedRow]) -> None:
        stalled = self._bulk_stalled_at
        stoppable = stalled is None or self._clock() - stalled < MAX_BULK_STALL_S
        handle = PassHandle() if stoppable else None
        with self._cond:
            self._preemptible = handle
        try:
            self._run_embed(runner, batch, handle)
            self._bulk_stalled_at = None
            self._bulk_budget = min(self._settings.bulk_pass_s, self._bulk_budget * 2)
        except Preempted:
            log.debug("bulk_pass_preempted", extra={"model": runner.spec.name, "jobs": len(batch)})
            if stalled is None:
                self._bulk_stalled_at = self._clock()
            self._bulk_budget = max(self._bulk_budget / 2,  # fit between interactive arrivals
                                    self._settings.bulk_pass_s * MIN_BULK_BUDGET_SHARE)
            with self._cond:
                self._embeds.setdefault(runner, _EmbedQueue()).put_back(batch)
        finally:
            with self._cond:
                self._preemptible = None

    def _run_embed(self, runner: Runner, batch: list[_EmbedRow],
                   handle: PassHandle | None = None) -> None:
        ids, mask = right_pad([job.ids for job in batch], runner.pad_token_id)
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in runner.input_names:
            feeds["token_type_ids"] = np.zeros_like(ids)
        try:
            started = time.perf_counter()
            hidden = runner.run(feeds, handle)["last_hidden_state"]
            seconds = time.perf_counter() - started
            if hidden.ndim != 3 or hidden.shape[:2] != ids.shape:
                raise InferenceError(f"{runner.spec.name}: last_hidden_state has shape "
                                     f"{hidden.shape}, expected {ids.shape} + [hidden]")
        except InferenceError as exc:
            for row in batch:
                row.group.fail(exc)
            self._forget_resolved(batch)
            return
        self._sink.record_pass("embed", runner.spec.name, runner.spec.version, len(batch),
                               seconds)
        cost = seconds / ids.size
        last = self._slot_cost.get(runner, cost)
        self._slot_cost[runner] = last + COST_WEIGHT * (cost - last)
        for row, vector in zip(batch, mean_pool(hidden, mask).tolist()):
            row.group.row_done(row.index, vector, len(row.ids), len(batch))
        self._forget_resolved(batch)

    def _forget_resolved(self, batch: list[_EmbedRow]) -> None:
        """Stop tracking the jobs of ``batch`` that this pass resolved."""
        done = {row.group.job_id for row in batch if row.group.future.done()}
        if done:
            with self._cond:
                for job_id in done:
                    self._embed_jobs.pop(job_id, None)

    def _run_generate(self, runner: Runner, events: list[TokenEvent]) -> list[_Sequence]:
        """This step for one model version: a decode pass over its running sequences, a prefill
        pass for the ones joining, their tokens into ``events``. Returns the sequences that
        finished (or failed) and left the batch."""
        batch = self._batches.pop(runner, None)
        joining = self._joining.pop(runner, [])
        running = [] if batch is None else batch.live()
        first = 0 if batch is None else len(batch.seqs)  # the joining rows' first slot
        arrivals = None
        if batch is not None and joining and self._merges(runner, batch, joining):
            arrivals = self._decode_merged(runner, batch, joining, events)
        elif batch is not None and joining and self._overlaps(runner):
            joined: list[TokenEvent] = []
            prefill = self._prefill_thread().submit(self._prefill, runner, joining, joined, first)
            try:
                self._decode(runner, batch, events)
            finally:  # never leave the joining sequences' pass behind
                arrivals = prefill.result()
                events += joined
        else:
            if batch is not None:
                self._decode(runner, batch, events)
            if joining:
                arrivals = self._prefill(runner, joining, events, first)
        leaving = [seq for seq in running + joining if seq.done]
        if batch is None:
            batch, arrivals = arrivals, None
        if batch is not None:
            self._keep_unfinished(runner, batch, arrivals)
        return leaving

    def _merges(self, runner: Runner, batch: _Batch | _SlotBatch, joining: list[_Sequence]) -> bool:
        """Whether ``joining`` ride in ``batch``'s decode pass at this step: merging is on for
        this model (``EngineSettings.prefill_merge``), the pass fits in its positions once
        ``merge`` has re-packed the cache (as wide as the live row with the most cached
        columns), and its padded rows stay within ``MERGE_MAX_POSITIONS`` (a long prompt
        beside many running rows would pad each of them to its length)."""
        mode = self._settings.prefill_merge
        if not (mode == "on" or (mode == "auto" and runner.kv_device == "cuda")):
            return False
        live = [b for b, seq in enumerate(batch.seqs) if not seq.done]
        if not isinstance(batch, _Batch) or not live:
            return False
        width = max(len(seq.pending) for seq in joining)
        cached = int(batch.mask[live].sum(axis=1).max())
        return (cached + width <= runner.max_positions
                and (len(live) + len(joining)) * width <= MERGE_MAX_POSITIONS)

    def _overlaps(self, runner: Runner) -> bool:
        mode = self._settings.prefill_overlap
        return mode == "on" or (mode == "auto" and runner.kv_device == "cuda")

    def _prefill_thread(self) -> ThreadPoolExecutor:
        if self._prefiller is None:
            self._prefiller = ThreadPoolExecutor(1, thread_name_prefix="engine-prefill")
        return self._prefiller

    def _keep_unfinished(self, runner: Runner, batch: _Batch | _SlotBatch,
                         arrivals: _Batch | _SlotBatch | None = None) -> None:
        batch.settle(arrivals, runner)  # type: ignore[arg-type]  # arrivals match the batch
        if batch.live():
            self._batches[runner] = batch
        else:
            self._batches.pop(runner, None)

    def _decode(self, runner: Runner, batch: _Batch | _SlotBatch, events: list[TokenEvent]) -> None:
        rows = len(batch.seqs)
        tokens = np.array([seq.pending[0] for seq in batch.seqs], dtype=np.int64)
        positions = np.array([seq.past_len for seq in batch.seqs], dtype=np.int64)
        if isinstance(batch, _SlotBatch):
            pasts = [buffer[:rows] for buffer in batch.slots]
            out = self._pass(runner, batch.live(), decode_inputs(tokens, positions), pasts)
            if out is not None:
                self._sample(out[0], batch.seqs, events)
            return
        inputs = decode_feeds(tokens, positions, batch.mask)
        out = self._pass(runner, batch.live(), inputs, batch.pasts)
        if out is not None:
            logits, batch.pasts = out
            batch.mask = inputs["attention_mask"]
            self._sample(logits, batch.seqs, events)

    def _decode_merged(self, runner: Runner, batch: _Batch, joining: list[_Sequence],
                       events: list[TokenEvent]) -> _Batch | _SlotBatch | None:
        """One pass for ``batch``'s live rows and the ``joining`` prompts (``merge_feeds``).
        If it fails, the two run apart (a decode pass, then a prefill pass whose batch is
        returned, as ``_prefill``'s), so a failure ends only the jobs whose own pass fails (a
        long prompt that does not fit in the device's memory, say), as without merging."""
        batch.merge(joining, runner)
        running = batch.seqs[:len(batch.seqs) - len(joining)]
        tokens = np.array([seq.pending[0] for seq in running], dtype=np.int64)
        positions = np.array([seq.past_len for seq in running], dtype=np.int64)
        inputs = merge_feeds(tokens, positions, batch.mask, [seq.pending for seq in joining])
        out = self._pass(runner, batch.seqs, inputs, batch.pasts, blame=False)
        if out is None:
            batch.pasts, batch.mask = runner.pack_kv([(batch.pasts, batch.mask, range(len(running)))])
            batch.seqs = running
            self._decode(runner, batch, events)
            return self._prefill(runner, joining, events, len(running))
        logits, batch.pasts = out
        batch.mask = inputs["attention_mask"]
        self._sample(logits, batch.seqs, events)
        return None

    def _prefill(self, runner: Runner, seqs: list[_Sequence], events: list[TokenEvent],
                 first: int) -> _Batch | _SlotBatch | None:
        """The joining ``seqs``' prompt pass; an in-place model's caches go to rows ``first``
        on of its slots."""
        prompts = [seq.pending for seq in seqs]
        if runner.kv_layout == "inplace":
            if runner not in self._slots:  # first == 0: no decode pass beside this one
                try:
                    self._slots[runner] = runner.kv_slots(self._running_cap)
                except InferenceError as exc:
                    for seq in seqs:
                        seq.error = exc
                    return None
            slots = self._slots[runner]
            inputs = prompt_inputs(prompts)
            out = self._pass(runner, seqs, inputs,
                             [buffer[first:first + len(seqs)] for buffer in slots])
            if out is None:
                return None
            self._sample(out[0], seqs, events)  # the twin returns each prompt's last position
            return _SlotBatch(seqs, slots)
        inputs = prompt_feeds(prompts)
        out = self._pass(runner, seqs, inputs, runner.empty_pasts(len(seqs)))
        if out is None:
            return None
        logits, presents = out
        self._sample(logits, seqs, events)
        return _Batch(seqs, presents, inputs["attention_mask"])

    def _pass(self, runner: Runner, seqs: list[_Sequence], inputs: dict[str, np.ndarray],
              pasts: list, blame: bool = True) -> tuple[np.ndarray, list] | None:
        """One decoder pass for the live ``seqs`` (dead rows ride along): (logits, presents,
        see ``Runner.run_decoder``); on failure None returns and each of them gets the error,
        or, without ``blame`` (a merged pass, retried apart), none does and a warning
        (``merged_pass_failed``) says it."""
        ids = inputs["input_ids"]
        try:
            started = time.perf_counter()
            logits, presents = runner.run_decoder(inputs, pasts)
            seconds = time.perf_counter() - started
            expected = (len(ids), 1)  # each row's last position
            if logits.ndim != 3 or logits.shape[:2] != expected:
                raise InferenceError(f"{runner.spec.name}: logits have shape {logits.shape}, "
                                     f"expected {list(expected)} + [vocab]")
        except InferenceError as exc:
            if not blame:
                log.warning("merged_pass_failed", extra={"model": runner.spec.name,
                                                         "version": runner.spec.version,
                                                         "error": exc.message})
                return None
            for seq in seqs:
                seq.error = exc
            return None
        self._sink.record_pass("generate", runner.spec.name, runner.spec.version, len(seqs),
                               seconds)
        return logits, presents

    @staticmethod
    def _sample(logits: np.ndarray, seqs: list[_Sequence], events: list[TokenEvent]) -> None:
        """Advance the live sequences by one sampled token each (dead rows are skipped)."""
        last = logits[:, -1, :]
        live = sum(not seq.done for seq in seqs)
        for b, seq in enumerate(seqs):
            if not seq.done:
                scores = adjust(last[b], seq.params, seq.counts)
                token_id = sample(scores, seq.params, seq.rng)
                logprob = None
                if seq.params.logprobs is not None:
                    logprob = token_logprob(seq.runner, last[b], token_id, seq.params.logprobs)
                events.append(seq.advance(token_id, live, logprob))

    def _resolve(self, leaving: list[_Sequence]) -> None:
        with self._cond:
            for seq in leaving:
                self._jobs.pop(seq.job_id, None)
        for seq in leaving:
            if seq.error is not None:
                seq.future.set_exception(seq.error)
            else:
                seq.future.set_result(seq.result())
