"""Job records: the Redis hash every job lives in, shared by producer and workers.

A job moves ``queued -> running -> succeeded | failed | cancelled`` (or ``queued -> expired``
when its deadline passes first, ``queued -> cancelled`` when cancelled before it runs). Every
move is a compare-and-set on ``status`` (a Lua script), so a redelivered or cancelled job can
never be finished twice. The record expires ``Settings.job_ttl_s`` after its last write.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from enum import Enum
from typing import Any, Callable, NamedTuple

import orjson
import redis
from redis.client import Pipeline

from banter import keys
from banter.errors import IdempotencyKeyReused, WireError
from banter.metrics import JOB_END_FUNCTION, job_end_spec, timings_ms
from banter.streams import PUBLISH_FUNCTION, DoneEvent, StreamEvent, StreamWriter, with_total

log = logging.getLogger("banter.jobs")


class JobStatus(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"

    @property
    def terminal(self) -> bool:
        return self not in (JobStatus.QUEUED, JobStatus.RUNNING)


_NO_USAGE = {"prompt_tokens": 0, "completion_tokens": 0}  # a job that never ran
_EXPIRED_ERROR = {"type": "expired", "message": "the job's deadline passed before it could run"}


class JobKind(str, Enum):
    GENERATE = "generate"
    EMBED = "embed"


class Lane(str, Enum):
    INTERACTIVE = "interactive"
    BULK = "bulk"


_JSON_FIELDS = ("input", "params", "usage", "result", "error")


@dataclass
class JobRecord:
    """One job. ``input`` is the prompt (generate) or the text or list of texts (embed);
    ``params`` the validated sampling parameters; times are unix seconds (floats) or None."""

    id: str
    kind: str
    model: str
    input: Any
    owner: str = "anonymous"
    params: dict[str, Any] = field(default_factory=dict)
    lane: str = Lane.INTERACTIVE.value
    status: str = JobStatus.QUEUED.value
    idempotency_key: str | None = None
    request_hash: str | None = None  # what was asked, to tell a reused idempotency key apart
    deadline_at: float | None = None
    trace_id: str = ""
    queued_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    version: int | None = None
    backend: str | None = None
    worker: str | None = None
    batch_size: int | None = None
    attempts: int = 0
    cancel_requested: int = 0
    usage: dict[str, int] | None = None
    result: dict[str, Any] | None = None
    error: dict[str, str] | None = None

    @staticmethod
    def new_id() -> str:
        return str(uuid.uuid4())

    def past_deadline(self, now: float) -> bool:
        return self.deadline_at is not None and now >= self.deadline_at

    def to_redis(self) -> dict[str, str]:
        out = {}
        for name, value in asdict(self).items():
            if value is None:
                continue
            out[name] = _encode(name, value)
        return out

    @classmethod
    def from_redis(cls, raw: dict[str, str]) -> "JobRecord":
        try:
            values: dict[str, Any] = {k: v for k, v in raw.items() if k in _FIELD_TYPES}
            for name, value in values.items():
                kind = _FIELD_TYPES[name]
                if name in _JSON_FIELDS:
                    values[name] = orjson.loads(value)
                elif kind == "int":
                    values[name] = int(value)
                elif kind == "float":
                    values[name] = float(value)
            return cls(**values)
        except (TypeError, ValueError, orjson.JSONDecodeError) as exc:
            raise WireError(f"job record does not decode: {exc}") from exc

    def embeddings(self) -> list[list[float]]:
        """A succeeded embed job's vectors, in input order (one for a one-text job)."""
        result = self.result or {}
        return result.get("embeddings") or [result["embedding"]]

    def to_public(self) -> dict[str, Any]:
        """The ``GET /v1/jobs/{id}`` shape (DESIGN.md)."""
        usage = self.usage or {"prompt_tokens": 0, "completion_tokens": 0}
        return {
            "id": self.id, "kind": self.kind, "status": self.status, "model": self.model,
            "version": self.version, "backend": self.backend, "batch_size": self.batch_size,
            "lane": self.lane, "worker": self.worker, "attempts": self.attempts,
            "result": self.result, "error": self.error,
            "usage": with_total(usage),
            "timings": {
                "queued_at": _iso(self.queued_at), "started_at": _iso(self.started_at),
                "finished_at": _iso(self.finished_at),
                "queue_ms": _ms(self.queued_at, self.started_at),
                "run_ms": _ms(self.started_at, self.finished_at),
            },
        }


def embed_result(job_input: str | list[str], vectors: list[list[float]]) -> dict[str, Any]:
    """An embed job's ``result``: ``{embedding}`` for one text, ``{embeddings}`` (input order)
    for a list of texts."""
    return {"embedding": vectors[0]} if isinstance(job_input, str) else {"embeddings": vectors}


def _encode(name: str, value: Any) -> str:
    """A field's value as stored in the hash: JSON for the structured fields."""
    return orjson.dumps(value).decode() if name in _JSON_FIELDS else str(value)


_FIELD_TYPES = {name: f.type.split(" ")[0] for name, f in JobRecord.__dataclass_fields__.items()}


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds")


def _ms(start: float | None, end: float | None) -> float | None:
    if start is None or end is None:
        return None
    return round((end - start) * 1000.0, 2)


# transition(job, allowed, to, ttl, worker, fields): ``job`` (a hash) to status ``to`` with
# ``fields`` (name, value pairs: a large result is never decoded or re-encoded in Redis) if its
# status is one of ``allowed`` (a JSON list) and, unless ``worker`` is '', that worker holds it;
# its TTL becomes ``ttl`` seconds. Returns {1, status before} or {0, current | 'taken over'}.
_TRANSITION_FUNCTION = """
local function transition(job, allowed, to, ttl, worker, fields)
  local current = redis.call('HGET', job, 'status')
  if not current then return {0, ''} end
  if worker ~= '' and redis.call('HGET', job, 'worker') ~= worker then
    return {0, 'taken over'}
  end
  for _, status in ipairs(cjson.decode(allowed)) do
    if current == status then
      redis.call('HSET', job, 'status', to)
      for i = 1, #fields, 2 do
        redis.call('HSET', job, fields[i], fields[i + 1])
      end
      redis.call('EXPIRE', job, tonumber(ttl))
      return {1, current}
    end
  end
  return {0, current}
end
"""
# KEYS[1] job hash, KEYS[2] its stream, KEYS[3] its channel, KEYS[4] the metrics hash. ARGV:
# allowed, to, ttl, worker, the job's count (``metrics.job_end_spec``), n (how many field
# arguments follow), the fields' n arguments, then the final event's ``publish`` arguments. The
# transition and, only when it applies, the event that ends the stream and the job's count, in
# one step: a client never sees a finished job whose stream does not end, and every job that
# ends is counted once. A count that fails is dropped (its error returned), never the end.
# Returns {applied, status before, the count's values as JSON or its error}.
_FINISH = _TRANSITION_FUNCTION + PUBLISH_FUNCTION + JOB_END_FUNCTION + """
local n = tonumber(ARGV[6])
local done = transition(KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4], {unpack(ARGV, 7, 6 + n)})
if done[1] ~= 1 then return {done[1], done[2], ''} end
publish(KEYS[2], KEYS[3], ARGV[7 + n], ARGV[8 + n], ARGV[9 + n], ARGV[10 + n],
        {unpack(ARGV, 11 + n)})
local ok, values = pcall(job_end, KEYS[4], KEYS[1], KEYS[2], ARGV[5])
if not ok then values = cjson.encode({error = tostring(values)}) end
return {1, done[2], values}
"""


# KEYS[1] job hash, KEYS[2] lease, KEYS[3] running set, KEYS[4] queued set, KEYS[5] (when the
# job has one) its idempotency key. ARGV[1] node, ARGV[2] lease ms, ARGV[3] now, ARGV[4] record
# ttl s, ARGV[5] job id. Take the job when it is queued, or running with a lapsed lease (its
# worker died); the record and its key live ttl s from now. Returns {1, status before} or
# {0, status | 'leased'}.
_TAKE = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {0, ''} end
if status ~= 'queued' and status ~= 'running' then return {0, status} end
if not redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {0, 'leased'} end
redis.call('HSET', KEYS[1], 'status', 'running', 'worker', ARGV[1])
redis.call('HSETNX', KEYS[1], 'started_at', ARGV[3])
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[4]))
if KEYS[5] then redis.call('EXPIRE', KEYS[5], tonumber(ARGV[4])) end
redis.call('SADD', KEYS[3], ARGV[5])
redis.call('ZREM', KEYS[4], ARGV[5])
return {1, status}
"""

# KEYS: N lease keys, then the N jobs' hashes. ARGV[1] node, ARGV[2] lease ms. Renew each
# lease this node still holds, and take back one that lapsed (the node stalled past it) while
# nobody took the job over: it still runs here. Returns two lists of 1-based indexes: the
# leases lost to another node (or whose job has ended), and the jobs kept whose record asks
# for a cancel (``cancel_requested``).
_RENEW = """
local lost, cancel = {}, {}
local n = #KEYS / 2
for i = 1, n do
  local holder = redis.call('GET', KEYS[i])
  local kept = true
  if holder == ARGV[1] then
    redis.call('PEXPIRE', KEYS[i], ARGV[2])
  elseif not holder and redis.call('HGET', KEYS[n + i], 'status') == 'running'
      and redis.call('HGET', KEYS[n + i], 'worker') == ARGV[1] then
    redis.call('SET', KEYS[i], ARGV[1], 'PX', ARGV[2])
  else
    table.insert(lost, i)
    kept = false
  end
  if kept and redis.call('HGET', KEYS[n + i], 'cancel_requested') == '1' then
    table.insert(cancel, i)
  end
end
return {lost, cancel}
"""

# KEYS[1] lease, KEYS[2] running set. ARGV[1] node, ARGV[2] job id.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
redis.call('SREM', KEYS[2], ARGV[2])
"""


# KEYS[1] idempotency key, KEYS[2] the new job's hash, KEYS[3] queued set. ARGV[1] new job
# id, ARGV[2] ttl s, ARGV[3] job key prefix, ARGV[4] queued_at, ARGV[5..] the record's
# field/value pairs. Returns the id of the job the key names: an earlier one that still
# exists, or the new one, written here.
_CREATE_ONCE = """
local earlier = redis.call('GET', KEYS[1])
if earlier and redis.call('EXISTS', ARGV[3] .. earlier) == 1 then return earlier end
redis.call('SET', KEYS[1], ARGV[1], 'EX', tonumber(ARGV[2]))
redis.call('HSET', KEYS[2], unpack(ARGV, 5))
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[2]))
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[1])
return ARGV[1]
"""

# KEYS[1] job hash. ARGV: field/value pairs. Sets them only on a record that exists (an HSET
# on an expired or flushed record would leave a stub no reader can decode); returns its
# cancel_requested flag ('1' once asked), or false when there is no record.
_NOTE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
redis.call('HSET', KEYS[1], unpack(ARGV))
return redis.call('HGET', KEYS[1], 'cancel_requested') or ''
"""


def _idempotency_keys(record: JobRecord) -> list[str]:
    """The idempotency key naming ``record``'s job, when it was submitted with one: each write
    that renews the record's TTL renews the key's, so a retry finds the job while it exists."""
    if not record.idempotency_key:
        return []
    return [keys.idempotency(record.owner, record.idempotency_key)]


class Ended(NamedTuple):
    """What ``JobStore.finish`` did: whether it ended the job, the status the job had (''
    when it does not exist, 'taken over' when another node holds it), and the job's timings
    for a log line (``metrics.timings_ms``; empty when it did not end it)."""

    applied: bool
    before: str
    timings: dict[str, float]


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


class JobStore:
    """Job records in Redis. Thread-safe (redis-py pools connections)."""

    def __init__(self, client: redis.Redis, ttl_s: int, metrics_key: str = keys.METRICS) -> None:
        self.redis = client
        self.ttl_s = ttl_s
        self.metrics_key = metrics_key
        self._finish = client.register_script(_FINISH)
        self._take = client.register_script(_TAKE)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._create_once = client.register_script(_CREATE_ONCE)
        self._note = client.register_script(_NOTE)

    def create(self, record: JobRecord) -> None:
        record.queued_at = record.queued_at or time.time()
        pipe = self.redis.pipeline()
        pipe.hset(keys.job(record.id), mapping=record.to_redis())
        pipe.expire(keys.job(record.id), self.ttl_s)
        pipe.zadd(keys.QUEUED, {record.id: record.queued_at})
        pipe.execute()

    def create_idempotent(self, record: JobRecord) -> tuple[JobRecord, bool]:
        """Create unless ``(owner, idempotency_key)`` already names a live job; return (job,
        created), or raise IdempotencyKeyReused when that job was asked with another
        ``request_hash``. Claiming the key and writing the record are one atomic script, so two
        concurrent submissions with one key always get one job."""
        if not record.idempotency_key:
            self.create(record)
            return record, True
        record.queued_at = record.queued_at or time.time()
        flat = [item for pair in record.to_redis().items() for item in pair]
        job_id = self._create_once(
            keys=[keys.idempotency(record.owner, record.idempotency_key), keys.job(record.id),
                  keys.QUEUED],
            args=[record.id, self.ttl_s, keys.job(""), record.queued_at, *flat])
        if job_id == record.id:
            return record, True
        existing = self._same_request(self.get(job_id), record.idempotency_key,
                                      record.request_hash)
        if existing is None:  # expired between the script and this read: a new job after all
            return self.create_idempotent(record)
        return existing, False

    def idempotent_job(self, owner: str, key: str, request_hash: str) -> JobRecord | None:
        """The live job ``(owner, key)`` names, or None; IdempotencyKeyReused when it was
        asked with another ``request_hash``."""
        job_id = self.redis.get(keys.idempotency(owner, key))
        return self._same_request(self.get(job_id) if job_id else None, key, request_hash)

    @staticmethod
    def _same_request(existing: JobRecord | None, key: str,
                      request_hash: str | None) -> JobRecord | None:
        if existing is not None and existing.request_hash \
                and existing.request_hash != request_hash:
            raise IdempotencyKeyReused(
                f"idempotency_key {key!r} was used for a different request (job "
                f"{existing.id}); send that request again, or use a new key")
        return existing

    def forget_idempotency(self, record: JobRecord) -> None:
        """Free the record's idempotency key (its job was never enqueued)."""
        if record.idempotency_key:
            self.redis.delete(keys.idempotency(record.owner, record.idempotency_key))

    def get(self, job_id: str) -> JobRecord | None:
        raw = self.redis.hgetall(keys.job(job_id))
        return JobRecord.from_redis(raw) if raw else None

    def note(self, job_id: str, **fields: Any) -> str | None:
        """Set ``fields`` on the job's record if it still exists; returns its
        ``cancel_requested`` flag (``"1"`` once a cancel was asked), or None when the record
        is gone."""
        flag = self._note(keys=[keys.job(job_id)],
                          args=[x for k, v in fields.items() for x in (k, _encode(k, v))])
        return None if flag is None else (flag.decode() if isinstance(flag, bytes) else flag)

    def finish(self, record: JobRecord, allowed: tuple[JobStatus, ...], to: JobStatus,
               final: StreamEvent, streams: StreamWriter, *, finished_at: float, owner: str = "",
               also: Callable[[Pipeline], None] | None = None, yielded_s: float = 0.0,
               **fields: Any) -> Ended:
        """End ``record``'s job: set ``status=to``, ``finished_at`` and ``fields`` only if the
        status is one of ``allowed`` (and, with ``owner``, the job's worker is that node) and,
        only then, write ``final`` (the ``done`` or ``error`` event) to the job's stream and
        channel and count the job in the metrics (``metrics.job_end_spec``: the ``backend``
        field when given, else the one it was routed to; a failed job's error type;
        ``yielded_s``), in one atomic step: a process that dies at any point leaves all or
        none, and a job is counted once, whoever ends it. ``also`` may queue more commands
        (counters) on the same MULTI/EXEC round trip."""
        error = fields.get("error") or {}
        count = job_end_spec(record.kind, record.lane, to.value,
                             fields.get("backend") or record.backend, record.queued_at,
                             finished_at, fields.get("usage"),
                             error.get("type") if to is JobStatus.FAILED else None, yielded_s)
        fields["finished_at"] = finished_at
        pairs = [x for k, v in fields.items() if v is not None for x in (k, _encode(k, v))]
        pipe = self.redis.pipeline(transaction=True)
        self._finish(keys=[keys.job(record.id), keys.stream(record.id), keys.tokens(record.id),
                           self.metrics_key],
                     args=[json.dumps([s.value for s in allowed]), to.value, self.ttl_s, owner,
                           count, len(pairs), *pairs, *streams.publish_args(final)], client=pipe)
        for key in _idempotency_keys(record):  # it lives as long as the record it names
            pipe.expire(key, self.ttl_s)
        if also:
            also(pipe)
        applied, before, counted = pipe.execute()[0]
        values = json.loads(counted) if counted else {}
        if "error" in values:
            log.warning("metrics_dropped", extra={"error": values["error"], "job_id": record.id})
        return Ended(bool(applied), _text(before), timings_ms(values))

    def take(self, record: JobRecord, node: str, lease_s: float) -> tuple[bool, str]:
        """Lease the job to ``node`` and mark it running: it must be queued, or running with a
        lapsed lease. Returns (taken, status before; 'leased' while another node holds it)."""
        taken, status = self._take(
            keys=[keys.job(record.id), keys.lease(record.id), keys.RUNNING, keys.QUEUED,
                  *_idempotency_keys(record)],
            args=[node, int(lease_s * 1000), time.time(), self.ttl_s, record.id])
        return bool(taken), status

    def renew(self, job_ids: list[str], node: str,
              lease_s: float) -> tuple[list[str], list[str]]:
        """Extend ``node``'s leases (taking back any that lapsed while no other node took its
        job); returns the ids whose lease another node holds now, and the ids it keeps whose
        record asks for a cancel (``cancel_requested``)."""
        if not job_ids:
            return [], []
        lost, cancel = self._renew(keys=[*map(keys.lease, job_ids), *map(keys.job, job_ids)],
                                   args=[node, int(lease_s * 1000)])
        return [job_ids[i - 1] for i in lost], [job_ids[i - 1] for i in cancel]

    def release(self, job_id: str, node: str) -> None:
        self._release(keys=[keys.lease(job_id), keys.RUNNING], args=[node, job_id])

    def orphans(self) -> list[str]:
        """Ids of jobs marked running whose lease has lapsed (their worker is gone)."""
        job_ids = sorted(self.redis.smembers(keys.RUNNING))
        if not job_ids:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.exists(keys.lease(job_id))
        return [job_id for job_id, alive in zip(job_ids, pipe.execute()) if not alive]

    def stale_queued(self, sent_before: float, limit: int = 100) -> list[JobRecord]:
        """Queued jobs whose task was last sent before ``sent_before`` (oldest first, at most
        ``limit``). Ids in the queued set whose job has ended or expired leave it here."""
        job_ids = self.redis.zrangebyscore(keys.QUEUED, "-inf", sent_before, start=0, num=limit)
        if not job_ids:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hgetall(keys.job(job_id))
        queued, ended = [], []
        for job_id, raw in zip(job_ids, pipe.execute()):
            if raw and raw.get("status") == JobStatus.QUEUED.value:
                queued.append(JobRecord.from_redis(raw))
            else:
                ended.append(job_id)
        if ended:
            self.redis.zrem(keys.QUEUED, *ended)
        return queued

    def sent(self, job_id: str, at: float) -> None:
        """Note that the queued job's task was sent again at ``at``."""
        self.redis.zadd(keys.QUEUED, {job_id: at}, xx=True)


def end_queued(store: JobStore, streams: StreamWriter, record: JobRecord, status: JobStatus,
               now: float) -> Ended:
    """End ``record``'s job, if it is still queued, as ``status`` (cancelled or expired) and
    close its stream with the matching ``done`` event, no usage: the one way a job that never
    ran ends, whoever ends it (a cancel, a read past its deadline, a worker taking it too
    late). Returns ``JobStore.finish``'s answer."""
    error = _EXPIRED_ERROR if status is JobStatus.EXPIRED else None
    return store.finish(record, (JobStatus.QUEUED,), status,
                        DoneEvent(record.id, status.value, _NO_USAGE), streams, finished_at=now,
                        error=error)
