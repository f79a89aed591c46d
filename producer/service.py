"""What the producer's routes do with jobs: submit, read, wait, cancel. No HTTP in here.

Routing: a job goes to the queues of the backend that will serve it (``Settings.lane_queue``):
the backend its registry record names, or ``openai`` (the fallback) when the fallback applies
(``Settings.fallback_blocker()`` is empty) and either the model is not in the registry or it is
an onnx model while no onnx worker is live (``keys.workers_for("onnx")``). Workers fall back
too, for what only they can see (an artifact that fails to load, a checksum mismatch).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any, Callable

import redis
from celery import Celery
from kombu.exceptions import OperationalError

from banter import keys
from banter.broker import BrokerQueues, send_job
from banter.errors import (
    BackendUnavailable,
    BanterError,
    ClientGone,
    InvalidRequest,
    JobNotFound,
    ModelNotFound,
    QueueFull,
    Timeout,
    Unavailable,
    WaitInterrupted,
)
from banter.jobs import JobKind, JobRecord, JobStatus, JobStore, Lane, end_queued
from banter.params import SamplingParams
from banter.settings import Settings
from banter.streams import ErrorEvent, EventType, StreamWriter, read_events
from registry.records import Record
from registry.service import Registry


@dataclass(frozen=True)
class JobRequest:
    """A validated job submission (every route builds one)."""

    kind: JobKind
    input: str | list[str]  # a list only for embed jobs
    model: str | None = None
    params: dict[str, Any] | None = None
    lane: Lane = Lane.INTERACTIVE
    idempotency_key: str | None = None
    deadline_s: float | None = None


class JobService:
    def __init__(self, settings: Settings, client: redis.Redis, celery: Celery,
                 registry: Registry) -> None:
        self.settings = settings
        self.redis = client
        self.celery = celery
        self.registry = registry
        self.queues = BrokerQueues(settings, celery, client)
        self.jobs = JobStore(client, settings.job_ttl_s)
        self.streams = StreamWriter(client, settings.stream_maxlen, settings.job_ttl_s)
        self._live_seen: dict[str, float] = {}  # backend -> when a live worker was last seen

    def default_model(self, kind: JobKind) -> str:
        if kind is JobKind.EMBED:
            return self.settings.default_embed_model
        return self.settings.default_generate_model

    def submit(self, req: JobRequest, owner: str, trace_id: str,
               waited: bool = False) -> tuple[JobRecord, bool]:
        """Check, record and enqueue one job; returns (job, created). An idempotency key
        already used by this owner returns the earlier job instead. ``waited``: the caller
        waits on the job (a synchronous or streamed call), so it is refused at once
        (BackendUnavailable, 503) when no live worker serves its backend, instead of queueing
        for a worker that may never come; a job submitted to be polled queues."""
        model_ref = req.model or self.default_model(req.kind)
        sampling = None
        if req.kind is JobKind.GENERATE:
            sampling = SamplingParams.from_dict(req.params or {}, self.settings.max_tokens_limit,
                                                self.settings.default_max_tokens)
        elif req.params:
            raise InvalidRequest("embed jobs take no 'params'", "params")
        digest = request_hash(req, model_ref, sampling) if req.idempotency_key else None
        if digest:  # a retry gets its job back, even with its lane full
            earlier = self.jobs.idempotent_job(owner, req.idempotency_key, digest)
            if earlier is not None:
                return earlier, False
        backend = self.backend_for(self.resolve(model_ref, req.kind))
        if waited and not self._worker_live(backend):
            raise BackendUnavailable(_NO_WORKER[backend])
        self._check_depth(req.lane)
        now = time.time()
        record = JobRecord(
            id=JobRecord.new_id(), kind=req.kind.value, model=model_ref, input=req.input,
            owner=owner, params=_params_dict(sampling) if sampling else {}, lane=req.lane.value,
            trace_id=trace_id, idempotency_key=req.idempotency_key, queued_at=now,
            backend=backend, deadline_at=now + req.deadline_s if req.deadline_s else None,
            request_hash=digest)
        record, created = self.jobs.create_idempotent(record)
        if created:
            self._enqueue(record)
        return record, created

    def submit_all(self, requests: list[JobRequest], owner: str, trace_id: str,
                   waited: bool = False) -> list[JobRecord]:
        """``submit`` each of ``requests`` (one call's jobs, none with an idempotency key);
        when one is refused (QueueFull, Unavailable, ...) the ones before it are cancelled, so
        no job the caller cannot name is left to run, then the refusal is raised."""
        records: list[JobRecord] = []
        try:
            for req in requests:
                records.append(self.submit(req, owner, trace_id, waited)[0])
        except (BanterError, redis.RedisError):
            self.cancel_all(records, owner)
            raise
        return records

    def cancel_all(self, records: list[JobRecord], owner: str) -> None:
        """``cancel`` each; one that cannot be cancelled (Redis gone) does not stop the rest."""
        for record in records:
            with contextlib.suppress(BanterError, redis.RedisError):
                self.cancel(record.id, owner)

    def _enqueue(self, record: JobRecord) -> None:
        """Send the job's task; when the broker refuses, the job fails at once (a retry with
        its idempotency key makes a new job) and the client gets 503."""
        try:
            self.queues.sent(send_job(self.celery, self.settings, record))
        except (OperationalError, redis.RedisError) as exc:
            error = Unavailable(f"the broker did not take the job: {exc}")
            self.jobs.finish(record, (JobStatus.QUEUED,), JobStatus.FAILED,
                             ErrorEvent(record.id, error.to_dict()), self.streams,
                             finished_at=time.time(), error=error.to_dict())
            self.jobs.forget_idempotency(record)
            raise error from None

    def resolve(self, model_ref: str, kind: JobKind) -> Record | None:
        """The registry record ``model_ref`` names; None when it is not in the registry and the
        openai fallback applies. Raise ModelNotFound (saying why the fallback does not apply),
        or InvalidRequest for a malformed reference or a model of another kind."""
        try:
            return self.registry.resolve(model_ref, kind.value)
        except ModelNotFound as exc:
            blocker = self.settings.fallback_blocker()
            if blocker:
                raise type(exc)(f"{exc.message}; {blocker}", exc.param) from exc
            return None

    def backend_for(self, model: Record | None) -> str:
        """The backend a new job of ``model`` (a ``resolve`` answer) goes to (module docstring)."""
        if model is None:
            return "openai"
        if (model.backend == "onnx" and not self.settings.fallback_blocker()
                and not self._worker_live("onnx")):
            return "openai"
        return model.backend

    def _worker_live(self, backend: str) -> bool:
        """Whether a worker serving ``backend`` beat its heartbeat within three periods. A
        yes is remembered for LIVE_SEEN_S (a worker that dies is noticed that much later,
        against a window of three heartbeat periods), so a synchronous call does not pay a
        Redis round trip for it; a no is asked again every time."""
        now = time.monotonic()
        seen = self._live_seen.get(backend)
        if seen is not None and now - seen < LIVE_SEEN_S:
            return True
        since = time.time() - self.settings.worker_live_s
        live = self.redis.zcount(keys.workers_for(backend), since, "+inf") > 0
        if live:
            self._live_seen[backend] = now
        return live

    def _check_depth(self, lane: Lane) -> None:
        limit = self.settings.max_queue_depth
        if limit and self.queues.depth()[lane.value] >= limit:
            raise QueueFull(f"the {lane.value} queue is at its limit of {limit} jobs "
                            "(BANTER_MAX_QUEUE_DEPTH); retry later", retry_after_s=2)

    def get(self, job_id: str, owner: str) -> JobRecord:
        """The owner's job. One still queued past its deadline expires here, as a worker
        taking it would expire it: its stream ends with an ``expired`` done event even while
        no worker takes from its queue."""
        record = self.jobs.get(job_id)
        if record is None or record.owner != owner:
            raise JobNotFound(f"no job {job_id!r}")
        now = time.time()
        if record.status == JobStatus.QUEUED.value and record.past_deadline(now):
            end_queued(self.jobs, self.streams, record, JobStatus.EXPIRED, now)
            record = self.jobs.get(job_id) or record
        return record

    def wait(self, job_id: str, timeout_s: float | None = None,
             gone: Callable[[], bool] | None = None) -> JobRecord:
        """Block until the job's stream ends (done or error), then return its record.
        ``gone``: asked about once a second, whether the waiting client has left; when it has,
        raise ClientGone (the job goes on: the caller cancels it)."""
        deadline = time.monotonic() + (timeout_s or self.settings.sync_timeout_s)
        after, outage = "0-0", RedisOutage()
        while True:
            if gone is not None and gone():
                raise ClientGone(f"the client left before job {job_id} ended")
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                raise Timeout(f"job {job_id} did not finish within "
                              f"{timeout_s or self.settings.sync_timeout_s:g}s; poll "
                              f"GET /v1/jobs/{job_id} for its result")
            tried_at = time.monotonic()
            try:
                after, record = self._read_to_end(job_id, after,
                                                  min(left_ms, 5000 if gone is None else 1000))
                outage.ended()
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                if outage.failed(tried_at):
                    raise WaitInterrupted(f"Redis went away while this call waited ({exc}); "
                                          f"job {job_id} goes on: poll GET /v1/jobs/{job_id} "
                                          "for its result") from None
                time.sleep(0.5)
                continue
            if record is not None:
                return record

    def _read_to_end(self, job_id: str, after: str,
                     block_ms: int) -> tuple[str, JobRecord | None]:
        """The job's events after ``after`` (waiting up to ``block_ms`` for one): the last
        entry id read, and the job's record once its final event is among them."""
        for entry_id, kind, _data in read_events(self.redis, job_id, after, block_ms=block_ms):
            after = entry_id
            if kind is not EventType.TOKEN:
                record = self.jobs.get(job_id)
                if record is None:
                    raise JobNotFound(f"job {job_id} expired")
                return after, record
        return after, None

    def cancel(self, job_id: str, owner: str) -> JobRecord:
        """Queued: never runs. Running: the worker stops it at the next step. Finished: as is."""
        ended = end_queued(self.jobs, self.streams, self.get(job_id, owner), JobStatus.CANCELLED,
                           time.time())
        if not ended.applied and ended.before == JobStatus.RUNNING.value:
            self.jobs.note(job_id, cancel_requested="1")
            self.redis.publish(keys.CANCEL, job_id)
        return self.get(job_id, owner)


LIVE_SEEN_S = 1.0
REDIS_RETRY_S = 10.0  # how long a wait or a stream rides out a dropped Redis connection


class RedisOutage:
    """One reader's time without Redis (a synchronous call's wait, an event stream): it has
    lasted too long once reads have failed for REDIS_RETRY_S, counted from when the first of
    them was tried, so a hung Redis's socket timeout counts as time out of reach."""

    def __init__(self) -> None:
        self._since: float | None = None

    def ended(self) -> None:
        """A read went through."""
        self._since = None

    def failed(self, tried_at: float) -> bool:
        """A read tried at ``tried_at`` (monotonic) failed: whether to give up now."""
        self._since = self._since if self._since is not None else tried_at
        return time.monotonic() - self._since > REDIS_RETRY_S


_NO_WORKER = {
    "onnx": "no live worker runs ONNX Runtime models: start one with 'banter worker --cpu' or "
            "'--gpu N' (or submit with POST /v1/jobs: the job waits in the queue for one)",
    "openai": "no live worker serves the openai backend: start one with an OpenAI key "
              "(BANTER_OPENAI_KEY or OPENAI_API_KEY; 'banter worker --openai' needs no GPU), or "
              "submit with POST /v1/jobs: the job waits in the queue for one"}


def request_hash(req: JobRequest, model_ref: str, sampling: SamplingParams | None) -> str:
    """What a submission asks for, as a digest: the same request sent again (a retry with
    its idempotency key) has the same one, also when it spells out a default (the model's
    name, ``max_tokens: 16``) that the first left out. The parameters are hashed as
    ``SamplingParams.wire`` spells them, which leaves out the logit adjustments and
    ``logprobs`` when unset: a request that does not use them hashes as it did before they
    existed (a retry across an upgrade still matches)."""
    deadline = req.deadline_s
    if deadline is not None and float(deadline).is_integer():
        deadline = int(deadline)  # 5.0 is 5, as a JSON writer may spell it
    asked = {"kind": req.kind.value, "input": req.input, "model": model_ref,
             "params": sampling.wire() if sampling else {}, "lane": req.lane.value,
             "deadline_s": deadline}
    return hashlib.sha256(json.dumps(asked, sort_keys=True).encode()).hexdigest()[:32]


def _params_dict(params: SamplingParams) -> dict[str, Any]:
    """The job's parameters. A sampled job without a seed gets a random one here, so a run
    taken over after its worker died writes the same tokens again."""
    seed = params.seed
    if seed is None and params.temperature > 0:
        seed = secrets.randbits(63)
    return {**params.wire(), "seed": seed}
