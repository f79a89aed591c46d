"""The Redis side of a worker process: runs one job per Celery task thread through the shared
engine, keeps the job record and stream, listens for cancellations, beats its heartbeat."""

from __future__ import annotations

import logging
import threading
import time
from typing import Sequence

import redis

from banter import keys, logs
from banter.errors import BanterError, InferenceError
from banter.jobs import JobKind, JobRecord, JobStatus, JobStore
from banter.params import SamplingParams
from banter.settings import Settings
from banter.streams import DoneEvent, ErrorEvent, StreamWriter, TokenEvent
from registry.mirror import Mirror, resolve_from_mirror
from registry.records import Record
from workers.engine import EmbedResult, Engine, EngineSettings, GenerateResult
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
    """Everything one worker process runs besides Celery itself."""

    def __init__(self, settings: Settings, client: redis.Redis, runners: RunnerCache,
                 node: str) -> None:
        self.settings = settings
        self.redis = client
        self.node = node
        self.jobs = JobStore(client, settings.job_ttl_s)
        self.streams = StreamWriter(client, settings.stream_maxlen, settings.job_ttl_s)
        self.mirror = Mirror(client)
        self.runners = runners
        self.engine = Engine(runners, RedisSink(client, self.streams, node),
                             engine_settings(settings))
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for target, name in ((self.engine.run, "engine"), (self._heartbeat, "heartbeat"),
                             (self._listen, "listener")):
            thread = threading.Thread(target=target, args=(self._stop,), name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        self.redis.zrem(keys.WORKERS, self.node)
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
            model = resolve_from_mirror(self.mirror, record.model, record.kind)
            result = self._execute(record, model)
        except BanterError as exc:
            return self._fail(record, exc)
        except Exception as exc:  # a bug: record it on the job, keep the worker serving
            log.exception("job_crashed", extra={"job_id": job_id, "trace_id": record.trace_id})
            return self._fail(record, InferenceError(f"internal worker error: {exc!r}"))
        return self._finish(record, model, result)

    def _execute(self, record: JobRecord, model: Record) -> EmbedResult | GenerateResult:
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
        if self.redis.hget(keys.job(record.id), "cancel_requested") == "1":
            self.engine.cancel(record.id)
        return future.result()

    def _finish(self, record: JobRecord, model: Record,
                result: EmbedResult | GenerateResult) -> str:
        if isinstance(result, EmbedResult):
            body, reason = {"embedding": result.embedding}, "stop"
            usage = {"prompt_tokens": result.prompt_tokens, "completion_tokens": 0}
        else:
            body, reason = {"text": result.text, "finish_reason": result.finish_reason}, \
                result.finish_reason
            usage = {"prompt_tokens": result.prompt_tokens,
                     "completion_tokens": result.completion_tokens}
        status = _FINAL_STATUS.get(reason, JobStatus.SUCCEEDED)
        finished = time.time()
        applied, current = self.jobs.transition(
            record.id, (JobStatus.RUNNING,), status, finished_at=finished, result=body,
            usage=usage, batch_size=result.batch_size, version=model.version,
            backend=model.backend)
        if not applied:
            return current
        self.streams.publish([DoneEvent(record.id, reason, usage)])
        started = record.started_at or finished
        logs.event(log, "inference_complete", trace_id=record.trace_id, job_id=record.id,
                   kind=record.kind, model=model.name, version=model.version,
                   backend=model.backend, batch_size=result.batch_size, status=status.value,
                   latency_ms=round((finished - (record.queued_at or started)) * 1000, 2))
        return status.value

    def _fail(self, record: JobRecord, exc: BanterError) -> str:
        applied, current = self.jobs.transition(
            record.id, (JobStatus.RUNNING,), JobStatus.FAILED, finished_at=time.time(),
            error=exc.to_dict())
        if applied:
            self.streams.publish([ErrorEvent(record.id, exc.to_dict())])
            logs.event(log, "inference_failed", logging.WARNING, trace_id=record.trace_id,
                       job_id=record.id, error=exc.type, message=exc.message)
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
                self.redis.zadd(keys.WORKERS, {self.node: time.time()})
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
                        self.engine.cancel(message["data"])
                    elif message:
                        self._retire_inactive()
            except redis.RedisError as exc:
                log.warning("listener_reconnecting", extra={"error": str(exc)})
                stop.wait(1.0)

    def _retire_inactive(self) -> None:
        active = {(r.name, r.version) for r in self.mirror.list_active()}
        for name, version in self.runners.loaded():
            if (name, version) not in active and self.runners.retire(name, version):
                log.info("model_retired", extra={"model": name, "version": version})
