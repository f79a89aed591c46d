"""Job records: the Redis hash every job lives in, shared by producer and workers.

A job moves ``queued -> running -> succeeded | failed | cancelled`` (or ``queued -> expired``
when its deadline passes first, ``queued -> cancelled`` when cancelled before it runs). Every
move is a compare-and-set on ``status`` (a Lua script), so a redelivered or cancelled job can
never be finished twice. The record expires ``Settings.job_ttl_s`` after its last write.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from enum import Enum
from typing import Any

import redis

from banter import keys
from banter.errors import WireError


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


class JobKind(str, Enum):
    GENERATE = "generate"
    EMBED = "embed"


class Lane(str, Enum):
    INTERACTIVE = "interactive"
    BULK = "bulk"


_JSON_FIELDS = ("input", "params", "usage", "result", "error")


@dataclass
class JobRecord:
    """One job. ``input`` is the prompt (generate) or text (embed); ``params`` the validated
    sampling parameters; times are unix seconds (floats) or None."""

    id: str
    kind: str
    model: str
    input: Any
    owner: str = "anonymous"
    params: dict[str, Any] = field(default_factory=dict)
    lane: str = Lane.INTERACTIVE.value
    status: str = JobStatus.QUEUED.value
    idempotency_key: str | None = None
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

    def to_redis(self) -> dict[str, str]:
        out = {}
        for name, value in asdict(self).items():
            if value is None:
                continue
            out[name] = json.dumps(value) if name in _JSON_FIELDS else str(value)
        return out

    @classmethod
    def from_redis(cls, raw: dict[str, str]) -> "JobRecord":
        try:
            values: dict[str, Any] = {k: v for k, v in raw.items() if k in _FIELD_TYPES}
            for name, value in values.items():
                kind = _FIELD_TYPES[name]
                if name in _JSON_FIELDS:
                    values[name] = json.loads(value)
                elif kind == "int":
                    values[name] = int(value)
                elif kind == "float":
                    values[name] = float(value)
            return cls(**values)
        except (TypeError, ValueError) as exc:
            raise WireError(f"job record does not decode: {exc}") from exc

    def to_public(self) -> dict[str, Any]:
        """The ``GET /v1/jobs/{id}`` shape (DESIGN.md)."""
        usage = self.usage or {"prompt_tokens": 0, "completion_tokens": 0}
        return {
            "id": self.id, "kind": self.kind, "status": self.status, "model": self.model,
            "version": self.version, "backend": self.backend, "batch_size": self.batch_size,
            "lane": self.lane, "worker": self.worker, "attempts": self.attempts,
            "result": self.result, "error": self.error,
            "usage": {**usage, "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]},
            "timings": {
                "queued_at": _iso(self.queued_at), "started_at": _iso(self.started_at),
                "finished_at": _iso(self.finished_at),
                "queue_ms": _ms(self.queued_at, self.started_at),
                "run_ms": _ms(self.started_at, self.finished_at),
            },
        }


_FIELD_TYPES = {name: f.type.split(" ")[0] for name, f in JobRecord.__dataclass_fields__.items()}


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds")


def _ms(start: float | None, end: float | None) -> float | None:
    if start is None or end is None:
        return None
    return round((end - start) * 1000.0, 2)


# KEYS[1] job hash. ARGV[1] JSON list of allowed current statuses, ARGV[2] new status,
# ARGV[3] ttl seconds, ARGV[4] JSON object of extra fields. Returns {1, old} or {0, current}.
_TRANSITION = """
local current = redis.call('HGET', KEYS[1], 'status')
if not current then return {0, ''} end
for _, allowed in ipairs(cjson.decode(ARGV[1])) do
  if current == allowed then
    redis.call('HSET', KEYS[1], 'status', ARGV[2])
    for name, value in pairs(cjson.decode(ARGV[4])) do
      redis.call('HSET', KEYS[1], name, value)
    end
    redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
    return {1, current}
  end
end
return {0, current}
"""


class JobStore:
    """Job records in Redis. Thread-safe (redis-py pools connections)."""

    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        self.redis = client
        self.ttl_s = ttl_s
        self._transition = client.register_script(_TRANSITION)

    def create(self, record: JobRecord) -> None:
        record.queued_at = record.queued_at or time.time()
        pipe = self.redis.pipeline()
        pipe.hset(keys.job(record.id), mapping=record.to_redis())
        pipe.expire(keys.job(record.id), self.ttl_s)
        pipe.execute()

    def create_idempotent(self, record: JobRecord) -> tuple[JobRecord, bool]:
        """Create unless ``(owner, idempotency_key)`` already named a job; return (job, created)."""
        if not record.idempotency_key:
            self.create(record)
            return record, True
        key = keys.idempotency(record.owner, record.idempotency_key)
        if self.redis.set(key, record.id, nx=True, ex=self.ttl_s):
            self.create(record)
            return record, True
        existing = self.get(self.redis.get(key) or "")
        if existing is None:  # the earlier job expired: take the key over
            self.redis.set(key, record.id, ex=self.ttl_s)
            self.create(record)
            return record, True
        return existing, False

    def get(self, job_id: str) -> JobRecord | None:
        raw = self.redis.hgetall(keys.job(job_id))
        return JobRecord.from_redis(raw) if raw else None

    def transition(self, job_id: str, allowed: tuple[JobStatus, ...], to: JobStatus,
                   **fields: Any) -> tuple[bool, str]:
        """Set ``status=to`` (and ``fields``) only if the status is one of ``allowed``.
        Returns (applied, status before the call; '' when the job does not exist)."""
        encoded = {k: json.dumps(v) if k in _JSON_FIELDS else str(v)
                   for k, v in fields.items() if v is not None}
        applied, current = self._transition(
            keys=[keys.job(job_id)],
            args=[json.dumps([s.value for s in allowed]), to.value, self.ttl_s,
                  json.dumps(encoded)])
        return bool(applied), current.decode() if isinstance(current, bytes) else current
