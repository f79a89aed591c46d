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

import logging
import threading
import time
from dataclasses import replace
from typing import Sequence

import redis

from banter import keys, logs
from banter.errors import (
    BackendUnavailable,
    BanterError,
    ChecksumMismatch,
    InferenceError,
    ModelLoadError,
    ModelNotFound,
)
from banter.jobs import JobKind, JobRecord, JobStatus, JobStore
from banter.params import SamplingParams
from banter.settings import Settings
from banter.streams import DoneEvent, ErrorEvent, StreamWriter, TokenEvent
from registry.mirror import Mirror, resolve_from_mirror
from registry.records import Record
from workers.backends import Outcome
from workers.engine import EmbedResult, Engine, EngineSettings, GenerateResult
from workers.openai_backend import OpenAIBackend
from workers.runner import ModelSpec, RunnerCache

log = logging.getLogger("banter.worker")

_NO_USAGE = {"prompt_tokens": 0, "completion_tokens": 0}
_FINAL_STATUS = {"cancelled": JobStatus.CANCELLED, "expired": JobStatus.EXPIRED}


class RedisSink:
    """EngineSink that writes tokens to job streams and pass counters to the worker's stats."""

    def __init__(self, client: redis.Redis, streams: StreamWriter, node: str) -> None:
        self.redis = client
        self.streams = streams
        self.node = node

    def publish_tokens(self, events: Sequence[TokenEvent]) -> None:
        self.streams.publish(events)

    def record_pass(self, kind: str, model: str, version: int, batch_size: int,
                    seconds: float) -> None:
        key = keys.worker_stats(self.node)
        pipe = self.redis.pipeline(transaction=False)
        pipe.hincrby(key, f"{kind}_passes", 1)
        pipe.hincrby(key, f"{kind}_items", batch_size)
        pipe.hincrbyfloat(key, f"{kind}_seconds", seconds)
        pipe.execute()


def engine_settings(settings: Settings) -> EngineSettings:
    return EngineSettings(max_batch_size=settings.max_batch(),
                          batch_window_s=settings.batch_window_ms / 1000.0,
                          max_running=settings.max_running,
                          max_prompt_tokens=settings.max_prompt_tokens,
                          enable_batching=settings.enable_batching,
                          admission=settings.admission)


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
        self.engine = None if runners is None else Engine(
            runners, RedisSink(client, self.streams, node), engine_settings(settings))
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

    def stop(self) -> None:
        self._stop.set()
        pipe = self.redis.pipeline(transaction=False)
        for key in (keys.WORKERS, *map(keys.workers_for, self.backends)):
            pipe.zrem(key, self.node)
        pipe.execute()
        for thread in self._threads:
            thread.join(timeout=5)

    def run_job(self, job_id: str) -> str:
        """Run one job to a final status; safe to call again for the same id (redelivery)."""
        record = self.jobs.get(job_id)
        if record is None:
            log.warning("job_missing", extra={"job_id": job_id})
            return "missing"
        if JobStatus(record.status).terminal:
            return record.status
        now = time.time()
        if record.deadline_at is not None and now >= record.deadline_at:
            return self._expire(record, now)
        applied, current = self.jobs.transition(
            job_id, (JobStatus.QUEUED, JobStatus.RUNNING), JobStatus.RUNNING, started_at=now,
            worker=self.node, attempts=record.attempts + 1)
        if not applied:
            return current
        try:
            outcome = self._execute(record)
        except BanterError as exc:
            return self._fail(record, exc)
        except Exception as exc:  # a bug: record it on the job, keep the worker serving
            log.exception("job_crashed", extra={"job_id": job_id, "trace_id": record.trace_id})
            return self._fail(record, InferenceError(f"internal worker error: {exc!r}"))
        return self._finish(record, outcome)

    def _execute(self, record: JobRecord) -> Outcome:
        """Serve ``record`` on the backend its model names, or fall back (module docstring)."""
        try:
            model = resolve_from_mirror(self.mirror, record.model, record.kind)
        except ModelNotFound as exc:
            return self._fallback(record, exc)
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
        if record.kind == JobKind.EMBED.value:
            return self.upstream.embed(record, model)
        return self.upstream.generate(record, model, lambda: self._cancel_requested(record.id))

    def _local(self, record: JobRecord, model: Record) -> Outcome:
        model_path = self.settings.model_root / model.path
        spec = ModelSpec(name=model.name, version=model.version, kind=model.kind,
                         model_path=model_path, tokenizer_path=model_path.parent / "tokenizer.json",
                         sha256=model.sha256, backend=model.backend)
        if record.kind == JobKind.EMBED.value:
            future = self.engine.submit_embed(record.id, spec, record.input)
        else:
            params = SamplingParams.from_dict(record.params, self.settings.max_tokens_limit)
            deadline = None
            if record.deadline_at is not None:
                deadline = time.monotonic() + (record.deadline_at - time.time())
            future = self.engine.submit_generate(record.id, spec, record.input, params,
                                                 lane=record.lane, deadline=deadline)
        if self._cancel_requested(record.id):
            self.engine.cancel(record.id)
        return _local_outcome(future.result(), model.version)

    def _cancel_requested(self, job_id: str) -> bool:
        return self.redis.hget(keys.job(job_id), "cancel_requested") == "1"

    def _finish(self, record: JobRecord, outcome: Outcome) -> str:
        status = _FINAL_STATUS.get(outcome.finish_reason, JobStatus.SUCCEEDED)
        finished = time.time()
        applied, current = self.jobs.transition(
            record.id, (JobStatus.RUNNING,), status, finished_at=finished, result=outcome.result,
            usage=outcome.usage, batch_size=outcome.batch_size, version=outcome.version,
            backend=outcome.backend)
        if not applied:
            return current
        self.streams.publish([DoneEvent(record.id, outcome.finish_reason, outcome.usage)])
        started = record.started_at or finished
        logs.event(log, "inference_complete", trace_id=record.trace_id, job_id=record.id,
                   kind=record.kind, model=record.model, version=outcome.version,
                   backend=outcome.backend, batch_size=outcome.batch_size, status=status.value,
                   latency_ms=round((finished - (record.queued_at or started)) * 1000, 2))
        return status.value

    def _fail(self, record: JobRecord, exc: BanterError) -> str:
        applied, current = self.jobs.transition(
            record.id, (JobStatus.RUNNING,), JobStatus.FAILED, finished_at=time.time(),
            error=exc.to_dict())
        if applied:
            self.streams.publish([ErrorEvent(record.id, exc.to_dict())])
            logs.event(log, "inference_failed", logging.WARNING, trace_id=record.trace_id,
                       job_id=record.id, error=exc.type, error_message=exc.message)
        return JobStatus.FAILED.value if applied else current

    def _expire(self, record: JobRecord, now: float) -> str:
        error = {"type": "expired", "message": "the job's deadline passed before it could run"}
        applied, current = self.jobs.transition(record.id, (JobStatus.QUEUED,), JobStatus.EXPIRED,
                                                finished_at=now, error=error)
        if applied:
            self.streams.publish([DoneEvent(record.id, "expired", _NO_USAGE)])
        return JobStatus.EXPIRED.value if applied else current

    def _heartbeat(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                now = {self.node: time.time()}
                pipe = self.redis.pipeline(transaction=False)
                for key in (keys.WORKERS, *map(keys.workers_for, self.backends)):
                    pipe.zadd(key, now)
                pipe.execute()
            except redis.RedisError as exc:
                log.warning("heartbeat_failed", extra={"error": str(exc)})
            stop.wait(self.settings.worker_heartbeat_s)

    def _listen(self, stop: threading.Event) -> None:
        """Cancellations (job ids on CANCEL) and registry changes (retire inactive versions)."""
        while not stop.is_set():
            try:
                pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(keys.CANCEL, keys.REGISTRY_EVENTS)
                while not stop.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message and message["channel"] == keys.CANCEL:
                        self._cancel(message["data"])
                    elif message:
                        self._retire_inactive()
            except redis.RedisError as exc:
                log.warning("listener_reconnecting", extra={"error": str(exc)})
                stop.wait(1.0)

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


def _local_outcome(result: EmbedResult | GenerateResult, version: int) -> Outcome:
    if isinstance(result, EmbedResult):
        return Outcome(result={"embedding": result.embedding}, finish_reason="stop",
                       usage={"prompt_tokens": result.prompt_tokens, "completion_tokens": 0},
                       batch_size=result.batch_size, backend="onnx", version=version)
    return Outcome(result={"text": result.text, "finish_reason": result.finish_reason},
                   finish_reason=result.finish_reason,
                   usage={"prompt_tokens": result.prompt_tokens,
                          "completion_tokens": result.completion_tokens},
                   batch_size=result.batch_size, backend="onnx", version=version)
