"""The Redis side of a worker process: runs one job per Celery task thread through a backend,
keeps the job record and stream, listens for cancellations, beats its heartbeat.

Backends: ``onnx`` (the shared engine; absent in an upstream-only worker, ``banter worker
--openai``) and ``openai`` (present when an OpenAI key is set). A job runs on the backend its
registry record names. When no local model can serve it (the name is not in the registry, the
artifact fails to load or its checksum does not match, the worker has no engine) it falls back
to the openai backend, unless ``Settings.fallback_blocker()`` says why not: then the job fails
with the local cause plus that reason.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import replace
from typing import Any, Sequence

import redis

from banter import keys, logs
from banter.broker import BrokerQueues, make_celery, send_job
from banter.errors import (
    BackendUnavailable,
    BanterError,
    ChecksumMismatch,
    InferenceError,
    InvalidRequest,
    ModelLoadError,
    ModelNotFound,
    Unavailable,
)
from banter.jobs import JobKind, JobRecord, JobStatus, JobStore, embed_result, end_queued
from banter.params import SamplingParams
from banter.redisconn import is_outage
from banter.settings import Settings
from banter.streams import DoneEvent, ErrorEvent, EventType, StreamWriter, TokenEvent, decode_entry
from registry.mirror import Mirror, resolve_from_mirror
from registry.records import Record
from registry.service import Registry
from workers import metrics as worker_metrics
from workers.backends import Outcome
from workers.engine import EmbedResult, Engine, EngineSettings, GenerateResult
from workers.lanes import LaneGate
from workers.openai_backend import OpenAIBackend
from workers.runner import ModelSpec, RunnerCache

log = logging.getLogger("banter.worker")

_FINAL_STATUS = {"cancelled": JobStatus.CANCELLED, "expired": JobStatus.EXPIRED}


class RedisSink:
    """EngineSink that writes tokens to job streams and pass counters to the worker's stats.

    ``resume_from[job_id] = n`` drops the job's token events with ``seq < n``: a job taken over
    from a dead worker regenerates (same seed, same version) the tokens its stream already has.
    """

    def __init__(self, client: redis.Redis, streams: StreamWriter, node: str) -> None:
        self.redis = client
        self.streams = streams
        self.node = node
        self.resume_from: dict[str, int] = {}
        # pass counters not yet written: appended by the engine thread, drained by whichever
        # thread writes next (add_passes)
        self._passes: deque[tuple[str, int, float]] = deque()

    def publish_tokens(self, events: Sequence[TokenEvent]) -> None:
        """The step's tokens and the pass counters waiting, in one round trip (the same
        counters again on each retry)."""
        if self.resume_from:
            events = [e for e in events if e.seq >= self.resume_from.get(e.job_id, 0)]
        passes = self._take_passes()
        delay = 0.1
        while True:
            try:
                self.streams.publish(events, also=lambda pipe: self._write_passes(pipe, passes))
                return
            except redis.RedisError as exc:  # Redis restarting, hung, full or read-only: hold the
                # engine, keep the tokens (a publish whose reply was lost and is sent again
                # writes nothing twice: PUBLISH_FUNCTION)
                if not is_outage(exc):
                    raise
                log.warning("publish_retry", extra={"error": str(exc), "delay_s": delay})
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def record_pass(self, kind: str, model: str, version: int, batch_size: int,
                    seconds: float) -> None:
        """Queue a pass's counters: they ride on the next write that takes them (a step's
        token publish, a finishing job's terminal event, the heartbeat), never a round trip of
        their own on the engine thread. An embed pass is recorded before its jobs resolve, so
        its counters are in Redis by the time those jobs' ends are."""
        self._passes.append((kind, batch_size, seconds))

    def add_passes(self, pipe: Any) -> None:
        """Move the queued pass counters onto ``pipe`` (lost with it if it fails)."""
        self._write_passes(pipe, self._take_passes())

    def _take_passes(self) -> list[tuple[str, int, float]]:
        """Empty the queue. Several threads drain at once (the publisher, finishing jobs, the
        heartbeat): each counter goes to exactly one of them."""
        taken = []
        while True:
            try:
                taken.append(self._passes.popleft())
            except IndexError:
                return taken

    def _write_passes(self, pipe: Any, passes: list[tuple[str, int, float]]) -> None:
        for kind, batch_size, seconds in passes:
            worker_metrics.add_pass(pipe, self.node, kind, batch_size, seconds)


def engine_settings(settings: Settings) -> EngineSettings:
    return EngineSettings(max_batch_size=settings.max_batch(),
                          batch_window_s=settings.batch_window_ms / 1000.0,
                          bulk_pass_s=settings.bulk_pass_ms / 1000.0,
                          max_running=settings.max_running,
                          bulk_max_running=settings.bulk_max_running,
                          max_prompt_tokens=settings.max_prompt_tokens,
                          enable_batching=settings.enable_batching,
                          admission=settings.admission,
                          publish_ahead=settings.publish_ahead_steps,
                          prefill_overlap=settings.prefill_overlap,
                          prefill_merge=settings.prefill_merge)


class WorkerRuntime:
    """Everything one worker process runs besides Celery itself. ``runners`` None makes an
    upstream-only worker (no engine); ``settings.openai_key`` adds the openai backend.
    ``backends`` names what this worker serves (its heartbeat sets and queues)."""

    def __init__(self, settings: Settings, client: redis.Redis, runners: RunnerCache | None,
                 node: str) -> None:
        self.settings = settings
        self.redis = client
        self.node = node
        self.jobs = JobStore(client, settings.job_ttl_s)
        self.streams = StreamWriter(client, settings.stream_maxlen, settings.job_ttl_s)
        self.mirror = Mirror(client)
        self.runners = runners
        self.sink = RedisSink(client, self.streams, node)
        self.engine = None if runners is None else Engine(runners, self.sink,
                                                          engine_settings(settings))
        self.celery = make_celery(settings, "banterhearts-reaper")
        self.queues = BrokerQueues(settings, self.celery, client)
        self.gate = LaneGate(settings.bulk_yield_ms / 1000.0)  # workers/lanes.py
        self._held: set[str] = set()
        self._held_lock = threading.Lock()
        self.upstream = OpenAIBackend(settings, self.streams) if settings.openai_key else None
        self.backends = tuple(name for name, backend in (("onnx", self.engine),
                                                         ("openai", self.upstream))
                              if backend is not None)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        targets = [(self._heartbeat, "heartbeat"), (self._listen, "listener")]
        if self.engine is not None:
            targets.append((self.engine.run, "engine"))
        for target, name in targets:
            thread = threading.Thread(target=target, args=(self._stop,), name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def engine_alive(self) -> bool:
        return all(t.is_alive() for t in self._threads if t.name == "engine")

    def on_engine_death(self) -> None:
        """Leave at once, as a crash would: the supervisor starts the worker again and the
        jobs it held are taken over once their leases lapse."""
        os._exit(70)

    def stop(self) -> None:
        """Stop the heartbeat and leave the worker sets; with Redis already gone the entries
        lapse on their own (three heartbeat periods)."""
        self._stop.set()
        pipe = self.redis.pipeline(transaction=False)
        for key in (keys.WORKERS, *map(keys.workers_for, self.backends)):
            pipe.zrem(key, self.node)
        try:
            pipe.execute()
        except redis.RedisError as exc:
            log.warning("worker_stop_unregistered", extra={"node": self.node, "error": str(exc)})
        for thread in self._threads:
            thread.join(timeout=5)

    def run_job(self, job_id: str) -> str:
        """Run one job to a final status; safe to call again for the same id (redelivery).
        A bulk job first waits while interactive ones are in the process (``LaneGate``)."""
        try:
            record = self.jobs.get(job_id)
            if record is None:
                log.warning("job_missing", extra={"job_id": job_id})
                return "missing"
            yielded = 0.0
            if record.lane == "interactive":
                self.gate.enter(job_id)
            else:
                yielded = self.gate.wait_clear()
            return self._run_job(record, yielded)
        finally:
            with self._held_lock:  # a second delivery of a job running here leaves it counted
                running_here = job_id in self._held
            if not running_here:
                self.gate.leave(job_id)

    def _run_job(self, record: JobRecord, yielded: float) -> str:
        job_id = record.id
        if JobStatus(record.status).terminal:
            return record.status
        with self._held_lock:
            if job_id in self._held:  # a copy of a job this worker runs (re-sent while it stalled)
                return record.status
        now = time.time()
        if record.past_deadline(now) and record.status == JobStatus.QUEUED.value:
            return self._expire(record, now)
        taken, current = self.jobs.take(record, self.node, self.settings.lease_ttl_s)
        if not taken:
            return current  # finished meanwhile, or a live worker holds it ('leased')
        self.redis.delete(keys.requeued(job_id))  # should this worker die, send it again
        with self._held_lock:
            self._held.add(job_id)
        try:
            if current == JobStatus.RUNNING.value:
                self._resume(record)
                if record.past_deadline(time.time()):  # its worker died, and its time is up
                    return self._finish(record, self._expired_outcome(record), yielded)
            return self._run(record, yielded)
        finally:
            with self._held_lock:
                self._held.discard(job_id)
            self.sink.resume_from.pop(job_id, None)
            with contextlib.suppress(redis.RedisError):  # Redis gone: the lease lapses instead
                self.jobs.release(job_id, self.node)

    def _resume(self, record: JobRecord) -> None:
        """A job taken over from a dead worker: skip the tokens its stream already has."""
        last = self.redis.xrevrange(keys.stream(record.id), count=1)
        if last and last[0][1].get("event") == "token":
            self.sink.resume_from[record.id] = int(last[0][1]["seq"]) + 1
        logs.event(log, "job_taken_over", trace_id=record.trace_id, job_id=record.id,
                   attempts=record.attempts + 1,
                   resume_from=self.sink.resume_from.get(record.id, 0))

    def _run(self, record: JobRecord, yielded: float) -> str:
        """``yielded``: seconds the job has waited for interactive ones so far."""
        try:
            outcome = self._execute(record)
        except BanterError as exc:
            return self._fail(record, exc)
        except Exception as exc:  # a bug: record it on the job, keep the worker serving
            if is_outage(exc):
                return self._interrupted(record, exc)
            log.exception("job_crashed", extra={"job_id": record.id, "trace_id": record.trace_id})
            return self._fail(record, InferenceError(f"internal worker error: {exc!r}"))
        if record.lane != "interactive":
            yielded += self.gate.wait_clear()
        try:
            return self._finish(record, self._covering_stream(record, outcome), yielded)
        except redis.RedisError as exc:
            if not is_outage(exc):
                raise
            return self._interrupted(record, exc)

    def _interrupted(self, record: JobRecord, exc: Exception) -> str:
        """Redis went away (or refused writes: ``is_outage``) while the job ran (not the job's
        fault, nor a bug): it stays ``running``, and once its lease lapses a worker takes it
        over (Delivery), its stream kept as it is."""
        log.warning("job_interrupted", extra={"job_id": record.id, "trace_id": record.trace_id,
                                              "error": str(exc)})
        return "interrupted"

    def _covering_stream(self, record: JobRecord, outcome: Outcome) -> Outcome:
        """A taken-over job cancelled or expired before its rerun caught up with its stream
        (the tokens a dead worker published) ends with what the stream holds, so record and
        stream agree."""
        published = self.sink.resume_from.get(record.id, 0)
        if outcome.finish_reason not in ("cancelled", "expired") or \
                outcome.usage.get("completion_tokens", 0) >= published:
            return outcome
        text, logprobs = self._streamed(record.id)
        result = {**outcome.result, "text": text}
        if "logprobs" in result:
            result["logprobs"] = logprobs
        return replace(outcome, result=result,
                       usage={**outcome.usage, "completion_tokens": len(logprobs)})

    def _expired_outcome(self, record: JobRecord) -> Outcome:
        """A running job taken over after its deadline: it ends ``expired`` with what its dead
        worker streamed (a generate job's text; no result for an embed job)."""
        text, logprobs = self._streamed(record.id)
        result = None
        if record.kind == JobKind.GENERATE.value:
            result = {"text": text, "finish_reason": "expired"}
            if (record.params or {}).get("logprobs") is not None:
                result["logprobs"] = logprobs
        return Outcome(result=result, finish_reason="expired",
                       usage={"prompt_tokens": (record.usage or {}).get("prompt_tokens", 0),
                              "completion_tokens": len(logprobs)},
                       batch_size=record.batch_size or 0, backend=record.backend or "onnx",
                       version=record.version)

    def _streamed(self, job_id: str) -> tuple[str, list[dict | None]]:
        """The text of the job's stream so far, and per token its logprobs entry (None where
        the job did not ask for them): as many as the stream has tokens."""
        tokens = [data for kind, data in (decode_entry(fields) for _id, fields
                                          in self.redis.xrange(keys.stream(job_id)))
                  if kind is EventType.TOKEN]
        return "".join(t["text"] for t in tokens), [t.get("logprobs") for t in tokens]

    def _execute(self, record: JobRecord) -> Outcome:
        """Serve ``record`` on the backend its model names, or fall back (module docstring)."""
        ref = record.model
        if record.version is not None and "@" not in ref:
            ref = f"{ref}@{record.version}"  # a taken-over job keeps its first version
        try:
            model = resolve_from_mirror(self.mirror, ref, record.kind)
        except ModelNotFound as exc:
            if not self._rebuild_mirror(record):
                return self._fallback(record, exc)
            try:  # once more: the mirror was emptied, and is back (rebuilt here or by another)
                model = resolve_from_mirror(self.mirror, ref, record.kind)
            except ModelNotFound as again:
                return self._fallback(record, again)
        if model.backend == "openai":
            return replace(self._upstream(record, model.upstream_model), version=model.version)
        if self.engine is None:
            return self._fallback(record, BackendUnavailable(
                f"model {model.ref} runs on ONNX Runtime and this worker has none "
                "(banter worker --openai)"))
        try:
            return self._local(record, model)
        except (ModelLoadError, ChecksumMismatch) as exc:
            return self._fallback(record, exc)

    def _rebuild_mirror(self, record: JobRecord) -> bool:
        """A model was not found: where this host has history.jsonl, rebuild the registry
        mirror from it if Redis lost it (flushed, evicted; a producer rebuilds it too, at
        start and on its next request). True when the mirror now holds the file's records, so
        resolving again is worth it (another job's thread may have rebuilt it meanwhile)."""
        if not self.settings.registry_path.exists():
            return False
        if Registry.from_settings(self.settings, self.redis).ensure_mirror():
            logs.event(log, "registry_mirror_rebuilt", logging.WARNING, job_id=record.id,
                       trace_id=record.trace_id)
        return self.mirror.seq() is not None

    def _fallback(self, record: JobRecord, cause: BanterError) -> Outcome:
        """Serve ``record`` upstream because no local model can (``cause``), or raise
        ``cause`` extended with why the fallback cannot serve it either."""
        blocker = self.settings.fallback_blocker()
        if blocker:
            raise type(cause)(f"{cause.message}; {blocker}")
        logs.event(log, "openai_fallback", trace_id=record.trace_id, job_id=record.id,
                   model=record.model, cause=cause.type)
        model = (self.settings.openai_embed_model if record.kind == JobKind.EMBED.value
                 else self.settings.openai_model)
        return self._upstream(record, model)

    def _upstream(self, record: JobRecord, model: str) -> Outcome:
        if self.upstream is None:
            raise BackendUnavailable(f"model {record.model!r} is served by the openai backend "
                                     "and this worker has no OpenAI key: set BANTER_OPENAI_KEY "
                                     "or OPENAI_API_KEY")
        with self._on_backend(record):
            if record.kind == JobKind.EMBED.value:
                return self.upstream.embed(record, model)
            return self.upstream.generate(record, model,
                                          lambda: self._cancel_requested(record.id))

    def _local(self, record: JobRecord, model: Record) -> Outcome:
        model_path = self.settings.model_root / model.path
        tokenizer_path = model_path.parent / "tokenizer.json"
        root = self.settings.model_root.resolve()
        for path in (model_path, tokenizer_path):
            if not path.resolve().is_relative_to(root):  # a symlink retargeted since promote
                raise ModelLoadError(f"{model.ref}: its files no longer lie under the model "
                                     "root (a link in its path points elsewhere now)")
        spec = ModelSpec(name=model.name, version=model.version, kind=model.kind,
                         model_path=model_path, tokenizer_path=tokenizer_path,
                         sha256=model.sha256, backend=model.backend,
                         files=tuple(sorted(model.files.items())))
        try:
            future = self._submit(record, spec)
        except InvalidRequest:  # the input does not fit this version: its record says which
            self.jobs.note(record.id, version=model.version)
            raise
        # the version is kept if the job is taken over; a cancel that came before the engine
        # held the job, or a record gone meanwhile (expired, flushed), stops it now
        if self.jobs.note(record.id, version=model.version) in ("1", None):
            self.engine.cancel(record.id)
        with self._on_backend(record):
            result = future.result()
        return _local_outcome(result, model.version, record.input)

    def _submit(self, record: JobRecord, spec: ModelSpec) -> Future:
        deadline = None
        if record.deadline_at is not None:
            deadline = time.monotonic() + (record.deadline_at - time.time())
        if record.kind == JobKind.EMBED.value:
            return self.engine.submit_embed(spec, record.input, lane=record.lane,
                                            job_id=record.id, deadline=deadline)
        params = SamplingParams.from_dict(record.params, self.settings.max_tokens_limit)
        return self.engine.submit_generate(record.id, spec, record.input, params,
                                           lane=record.lane, deadline=deadline)

    def _on_backend(self, record: JobRecord):
        """While an interactive job waits on its backend, it does not hold bulk jobs back."""
        if record.lane == "interactive":
            return self.gate.released(record.id)
        return contextlib.nullcontext()

    def _cancel_requested(self, job_id: str) -> bool:
        return self.redis.hget(keys.job(job_id), "cancel_requested") == "1"

    def _finish(self, record: JobRecord, outcome: Outcome, yielded: float) -> str:
        status = _FINAL_STATUS.get(outcome.finish_reason, JobStatus.SUCCEEDED)
        finished = time.time()
        error = None  # an expired job says why, as one that expired before it ran does
        if status is JobStatus.EXPIRED:
            error = {"type": "expired", "message": _expired_message(record, outcome)}
        ended = self.jobs.finish(
            record, (JobStatus.RUNNING,), status,
            DoneEvent(record.id, outcome.finish_reason, outcome.usage), self.streams,
            owner=self.node, also=self.sink.add_passes, yielded_s=yielded, finished_at=finished,
            result=outcome.result, error=error, usage=outcome.usage,
            batch_size=outcome.batch_size, version=outcome.version, backend=outcome.backend)
        if not ended.applied:
            return ended.before
        timings = ended.timings
        if yielded:
            timings["bulk_yield_ms"] = round(yielded * 1000.0, 2)
        started = record.started_at or finished
        logs.event(log, "inference_complete", trace_id=record.trace_id, job_id=record.id,
                   kind=record.kind, model=record.model, version=outcome.version,
                   backend=outcome.backend, batch_size=outcome.batch_size, status=status.value,
                   latency_ms=round((finished - (record.queued_at or started)) * 1000, 2),
                   lane=record.lane, prompt_tokens=outcome.usage.get("prompt_tokens"),
                   completion_tokens=outcome.usage.get("completion_tokens"), **timings)
        return status.value

    def _fail(self, record: JobRecord, exc: BanterError) -> str:
        """End the job ``failed``. The error its record and stream keep (which its client
        sees) names artifacts relative to the model root, never by this host's paths; a
        model that cannot be served (its artifact changed or does not load) is an operator's
        matter, so its client sees no artifact at all, only where an admin finds it: the log
        line, which has the message as raised."""
        if isinstance(exc, (ChecksumMismatch, ModelLoadError)):
            what = "changed since it was promoted" if isinstance(exc, ChecksumMismatch) \
                else "does not load"
            message = (f"model {record.model!r} cannot be served now: its artifact {what}; an "
                       f"admin finds why in the worker log (inference_failed, job {record.id})")
        else:
            message = self._relative_paths(exc.message)
        error = {**exc.to_dict(), "message": message}
        ended = self.jobs.finish(
            record, (JobStatus.RUNNING,), JobStatus.FAILED, ErrorEvent(record.id, error),
            self.streams, owner=self.node, also=self.sink.add_passes, finished_at=time.time(),
            error=error)
        if ended.applied:
            logs.event(log, "inference_failed", logging.WARNING, trace_id=record.trace_id,
                       job_id=record.id, error=exc.type, error_message=exc.message,
                       kind=record.kind, model=record.model, lane=record.lane, **ended.timings)
        return JobStatus.FAILED.value if ended.applied else ended.before

    def _relative_paths(self, message: str) -> str:
        for root in {self.settings.model_root.resolve(), self.settings.model_root.absolute()}:
            message = message.replace(f"{root}{os.sep}", "")
        return message

    def _expire(self, record: JobRecord, now: float) -> str:
        ended = end_queued(self.jobs, self.streams, record, JobStatus.EXPIRED, now)
        return JobStatus.EXPIRED.value if ended.applied else ended.before

    def _heartbeat(self, stop: threading.Event) -> None:
        """Every period: announce this worker, renew the leases of its jobs, and re-enqueue
        jobs whose worker died (their lease lapsed). A worker whose engine thread died stops
        here: no more heartbeats or renewals, so other workers take its jobs over."""
        while not stop.is_set():
            if not self.engine_alive():
                logs.event(log, "engine_died", logging.CRITICAL, node=self.node,
                           jobs=sorted(self._held))
                self.on_engine_death()
                return
            try:
                now = {self.node: time.time()}
                pipe = self.redis.pipeline(transaction=False)
                for key in (keys.WORKERS, *map(keys.workers_for, self.backends)):
                    pipe.zadd(key, now)
                self.sink.add_passes(pipe)  # an idle worker's last pass counters
                pipe.execute()
                self._renew_leases()
                self._requeue_orphans()
                self._resend_lost()
            except (redis.RedisError, Unavailable) as exc:
                log.warning("heartbeat_failed", extra={"error": str(exc)})
            except Exception:  # noqa: BLE001 - a bad record must not end the heartbeats
                log.exception("heartbeat_failed")
            stop.wait(self.settings.worker_heartbeat_s)

    def _renew_leases(self) -> None:
        """Renew the leases of the jobs held here; stop the copy of a job another worker took
        over, and a job whose record asks for a cancel: the ``CANCEL`` message is the fast
        path, and a listener that missed it (reconnecting to Redis) misses it for good."""
        with self._held_lock:
            held = sorted(self._held)
        lost, cancel_asked = self.jobs.renew(held, self.node, self.settings.lease_ttl_s)
        for job_id in cancel_asked:
            self._cancel(job_id)
        with self._held_lock:  # a job that finished meanwhile released its lease: not lost
            lost = [job_id for job_id in lost if job_id in self._held]
        for job_id in lost:
            # another worker took it over while this one stalled (a lease that lapsed with
            # nobody taking the job is taken back by renew): stop the local copy
            record = self.jobs.get(job_id)
            logs.event(log, "lease_lost", logging.WARNING, job_id=job_id,
                       trace_id=record.trace_id if record else "")
            self._cancel(job_id)

    def _requeue_orphans(self) -> None:
        """Send the task of each running job whose lease lapsed (its worker died) once per
        ``resend_after_s``: the copy waits in its queue until a worker takes the job (the
        lease comes back and the job leaves the orphans), and one more is sent only if that
        copy too was lost, as for a queued job (``_resend_lost``). A copy every heartbeat
        would pile up in a queue no worker serves."""
        for job_id in self.jobs.orphans():
            if not self.redis.set(keys.requeued(job_id), self.node, nx=True,
                                  ex=int(self.settings.resend_after_s)):
                continue  # sent already, by this worker or another
            record = self.jobs.get(job_id)
            if record is None or record.status != JobStatus.RUNNING.value:
                self.jobs.release(job_id, self.node)
                continue
            queue = send_job(self.celery, self.settings, record)
            logs.event(log, "job_requeued", job_id=job_id, trace_id=record.trace_id,
                       queue=queue, last_worker=record.worker)

    def _resend_lost(self) -> None:
        """Send again the task of a job queued for ``resend_after_s`` while its queue (its
        lane's for its backend) is empty: its message was lost (Redis killed before an fsync)
        or never sent (the broker failed mid-submit and Redis could not record the failure). A
        task that was only slow to come makes a second message, which ``take`` turns into
        nothing."""
        now = time.time()
        stale = self.jobs.stale_queued(now - self.settings.resend_after_s)
        if not stale:
            return
        depth = self.queues.by_queue()
        for record in stale:
            queue = self.settings.lane_queue(record.lane, record.backend or "onnx")
            if depth.get(queue, 0) or not self.redis.set(
                    keys.requeued(record.id), self.node, nx=True,
                    ex=int(self.settings.resend_after_s)):
                continue  # messages wait in its queue, or another worker is sending it
            send_job(self.celery, self.settings, record)
            self.jobs.sent(record.id, now)
            logs.event(log, "job_resent", logging.WARNING, job_id=record.id,
                       trace_id=record.trace_id, queue=queue,
                       queued_s=round(now - (record.queued_at or now), 1))

    def _listen(self, stop: threading.Event) -> None:
        """Cancellations (job ids on CANCEL) and registry changes (retire inactive versions)."""
        while not stop.is_set():
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(keys.CANCEL, keys.REGISTRY_EVENTS)
                while not stop.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message and message["channel"] == keys.CANCEL:
                        self._cancel(message["data"])
                    elif message:
                        self._retire_inactive()
            except (redis.RedisError, Unavailable) as exc:  # the mirror's reads raise Unavailable
                log.warning("listener_reconnecting", extra={"error": str(exc)})
                stop.wait(1.0)
            except Exception:  # a bug: the thread must go on, or cancels wait for a heartbeat
                log.exception("listener_failed")
                stop.wait(1.0)
            finally:
                pubsub.close()

    def _cancel(self, job_id: str) -> None:
        """Stop the job wherever it runs in this process (each backend ignores unknown ids)."""
        if self.engine is not None:
            self.engine.cancel(job_id)
        if self.upstream is not None:
            self.upstream.cancel(job_id)

    def _retire_inactive(self) -> None:
        if self.runners is None:
            return
        active = {(r.name, r.version) for r in self.mirror.list_active()}
        for name, version in self.runners.loaded():
            if (name, version) not in active and self.runners.retire(name, version):
                log.info("model_retired", extra={"model": name, "version": version})


def _expired_message(record: JobRecord, outcome: Outcome) -> str:
    """Why a job that a worker took ended ``expired``."""
    if record.kind == JobKind.EMBED.value:
        return ("the job's deadline passed while its inputs ran (an embed job's vectors come "
                "whole, so it has none)")
    made = outcome.usage.get("completion_tokens", 0)
    if made:
        return f"the job's deadline passed while it ran, after {made} tokens (its result holds them)"
    return ("the job's deadline passed after a worker took it, before its first token (a "
            "generation waits there while BANTER_MAX_RUNNING sequences run)")


def _local_outcome(result: EmbedResult | GenerateResult, version: int,
                   job_input: str | list[str]) -> Outcome:
    if isinstance(result, EmbedResult):
        whole = result.finish_reason == "stop"
        return Outcome(result=embed_result(job_input, result.embeddings) if whole else None,
                       finish_reason=result.finish_reason,
                       usage={"prompt_tokens": result.prompt_tokens, "completion_tokens": 0},
                       batch_size=result.batch_size, backend="onnx", version=version)
    answer = {"text": result.text, "finish_reason": result.finish_reason}
    if result.logprobs is not None:
        answer["logprobs"] = result.logprobs
    return Outcome(result=answer, finish_reason=result.finish_reason,
                   usage={"prompt_tokens": result.prompt_tokens,
                          "completion_tokens": result.completion_tokens},
                   batch_size=result.batch_size, backend="onnx", version=version)
