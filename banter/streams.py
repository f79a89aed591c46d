"""The per-job token stream protocol.

Every job has a replayable Redis stream (``keys.stream(id)``) and a pub/sub channel
(``keys.tokens(id)``). Both carry the same entries: zero or more ``token`` entries, then exactly
one final ``done`` or ``error`` entry. Stream entries are flat string maps:

- ``token``: ``{"event": "token", "seq": "0", "text": "...", "token_id": "17"}``, plus
  ``"logprobs": "<json>"`` for a job that asked for them (``SamplingParams.logprobs``)
- ``done``:  ``{"event": "done", "finish_reason": "...", "usage": "<json>"}``
- ``error``: ``{"event": "error", "error": "<json {type, message, param?}>"}``

Pub/sub messages are one JSON object: ``"id"`` (the stream entry id, so a live subscriber can
resume from the stream with no gap), ``"event"``, and the event's data as an SSE client gets it,
typed (``decode_entry``): ``{"id", "event": "token", "seq": 0, "text", "token_id": 17}``
(with ``"logprobs": {...}`` where the job asked for them),
``{"id", "event": "done", "finish_reason", "usage": {...}}``, ``{"id", "event": "error",
"error": {"type", "message", "param"?}}``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable, Sequence

import orjson
import redis
from redis.client import Pipeline

from banter import keys
from banter.errors import WireError


class EventType(str, Enum):
    TOKEN = "token"
    DONE = "done"
    ERROR = "error"


@dataclass(frozen=True)
class TokenEvent:
    """One generated token of one job. ``text`` is the newly decodable text (may be empty while
    a multi-byte character is incomplete or a stop string may still match)."""

    job_id: str
    seq: int
    text: str
    token_id: int
    logprobs: dict[str, Any] | None = None  # workers.engine.token_logprob, when asked

    def fields(self) -> dict[str, str]:
        fields = {"event": EventType.TOKEN.value, "seq": str(self.seq), "text": self.text,
                  "token_id": str(self.token_id)}
        if self.logprobs is not None:
            fields["logprobs"] = orjson.dumps(self.logprobs).decode()
        return fields

    def data(self) -> dict[str, Any]:
        """The event's data, typed, as ``decode_entry`` reads it back from ``fields``."""
        data = {"seq": self.seq, "text": self.text, "token_id": self.token_id}
        if self.logprobs is not None:
            data["logprobs"] = self.logprobs
        return data


def with_total(usage: Any) -> Any:
    """``usage`` with ``total_tokens`` (prompt plus completion), as a done event, a job record
    and OpenAI's answers have it; as it is when it lacks either count."""
    if isinstance(usage, dict) and {"prompt_tokens", "completion_tokens"} <= usage.keys():
        return {**usage, "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]}
    return usage


@dataclass(frozen=True)
class DoneEvent:
    job_id: str
    finish_reason: str
    usage: dict[str, int]

    def fields(self) -> dict[str, str]:
        return {"event": EventType.DONE.value, "finish_reason": self.finish_reason,
                "usage": json.dumps(with_total(self.usage))}

    def data(self) -> dict[str, Any]:
        return {"finish_reason": self.finish_reason, "usage": with_total(self.usage)}


@dataclass(frozen=True)
class ErrorEvent:
    job_id: str
    error: dict[str, str]

    def fields(self) -> dict[str, str]:
        return {"event": EventType.ERROR.value, "error": json.dumps(self.error)}

    def data(self) -> dict[str, Any]:
        return {"error": self.error}


StreamEvent = TokenEvent | DoneEvent | ErrorEvent


def decode_entry(fields: dict[str, str]) -> tuple[EventType, dict[str, Any]]:
    """Turn a stream entry's string map back into ``(type, data)`` with typed values."""
    try:
        kind = EventType(fields["event"])
        if kind is EventType.TOKEN:
            data = {"seq": int(fields["seq"]), "text": fields["text"],
                    "token_id": int(fields["token_id"])}
            if "logprobs" in fields:
                data["logprobs"] = json.loads(fields["logprobs"])
            return kind, data
        if kind is EventType.DONE:
            return kind, {"finish_reason": fields["finish_reason"],
                          "usage": json.loads(fields["usage"])}
        return kind, {"error": json.loads(fields["error"])}
    except (KeyError, ValueError, TypeError) as exc:
        raise WireError(f"bad stream entry {fields!r}: {exc}") from exc


# publish(stream, channel, maxlen, ttl, payload, order, fields): XADD the entry (``fields``:
# its field/value pairs) to ``stream`` then PUBLISH ``payload`` (a JSON object) with the entry
# id put first on ``channel``. ``order`` is a token's seq, or '' for a final event. Idempotent: an event the
# stream already holds (a token whose seq is not past the last one, anything after the final
# event) is not written again, so a write retried after a lost reply never doubles an entry.
PUBLISH_FUNCTION = """
local function publish(stream, channel, maxlen, ttl, payload, order, fields)
  local last = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)[1]
  if last then
    local entry, event, seq = last[2], nil, nil
    for i = 1, #entry, 2 do
      if entry[i] == 'event' then event = entry[i + 1] end
      if entry[i] == 'seq' then seq = tonumber(entry[i + 1]) end
    end
    if event ~= 'token' then return last[1] end
    if order ~= '' and seq and seq >= tonumber(order) then return last[1] end
  end
  local id = redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', unpack(fields))
  redis.call('EXPIRE', stream, tonumber(ttl))
  redis.call('PUBLISH', channel, '{"id":"' .. id .. '",' .. string.sub(payload, 2))
  return id
end
"""
# KEYS: per event its stream and its channel. ARGV: maxlen, ttl, then per event its payload,
# order, the number of items in its entry and those items (field/value pairs). Returns the ids.
_PUBLISH_MANY = PUBLISH_FUNCTION + """
local maxlen, ttl, at, ids = ARGV[1], ARGV[2], 3, {}
for k = 1, #KEYS / 2 do
  local count = tonumber(ARGV[at + 2])
  ids[k] = publish(KEYS[2 * k - 1], KEYS[2 * k], maxlen, ttl, ARGV[at], ARGV[at + 1],
                   {unpack(ARGV, at + 3, at + 2 + count)})
  at = at + 3 + count
end
return ids
"""


class StreamWriter:
    """Appends events to job streams and channels: one round trip and one script call per
    call, however many events (a generate step's tokens for every running job)."""

    def __init__(self, client: redis.Redis, maxlen: int, ttl_s: int) -> None:
        self.redis = client
        self.maxlen = maxlen
        self.ttl_s = ttl_s
        self._sha = ""

    def publish(self, events: Sequence[StreamEvent],
                also: Callable[[Pipeline], None] | None = None) -> list[str]:
        """Write every event (in order) to its job's stream and channel, all or none (one
        MULTI/EXEC round trip; ``also`` may queue more commands on it); return the entry ids."""
        if not self._sha:
            self._sha = self.redis.script_load(_PUBLISH_MANY)
        try:
            return self._send(events, also)
        except redis.exceptions.NoScriptError:  # Redis restarted without its script cache
            self._sha = self.redis.script_load(_PUBLISH_MANY)
            return self._send(events, None)

    def _send(self, events: Sequence[StreamEvent],
              also: Callable[[Pipeline], None] | None) -> list[str]:
        pipe = self.redis.pipeline(transaction=True)
        if events:
            names: list[str] = []
            args: list[Any] = [self.maxlen, self.ttl_s]
            for event in events:
                names += [keys.stream(event.job_id), keys.tokens(event.job_id)]
                payload, order, items = _script_args(event)
                args += [payload, order, len(items), *items]
            pipe.evalsha(self._sha, len(names), *names, *args)
        if also:
            also(pipe)
        replies = pipe.execute()
        return list(replies[0]) if events else []

    def publish_args(self, event: StreamEvent) -> list[Any]:
        """The arguments of ``PUBLISH_FUNCTION`` after its keys, flat: maxlen, ttl, payload,
        order, then the entry's field/value pairs."""
        payload, order, items = _script_args(event)
        return [self.maxlen, self.ttl_s, payload, order, *items]


def _script_args(event: StreamEvent) -> tuple[bytes, str, list[str]]:
    """``PUBLISH_FUNCTION``'s payload (the pub/sub message less its ``id``), order and entry
    items for ``event``."""
    entry = event.fields()
    order = entry["seq"] if isinstance(event, TokenEvent) else ""
    payload = orjson.dumps({"event": entry["event"], **event.data()})
    return payload, order, [item for pair in entry.items() for item in pair]


def read_events(client: redis.Redis, job_id: str, after: str = "0-0",
                block_ms: int | None = None) -> list[tuple[str, EventType, dict[str, Any]]]:
    """Entries of a job's stream after entry id ``after`` (``0-0``: from the start), waiting up
    to ``block_ms`` for the first one when given. ``client`` decodes replies (redisconn)."""
    reply = client.xread({keys.stream(job_id): after}, block=block_ms, count=512)
    return [(entry_id, *decode_entry(fields))
            for _stream, entries in reply or [] for entry_id, fields in entries]


def entry_key(entry_id: str) -> tuple[int, int] | None:
    """A stream entry id ``MS-SEQ`` as a pair to compare, or None when it is not one Redis
    accepts (two decimal parts, each below 2**64)."""
    ms, dash, seq = entry_id.partition("-")
    if not (dash and ms.isdigit() and seq.isdigit() and ms.isascii() and seq.isascii()
            and len(ms) <= 20 and len(seq) <= 20):
        return None
    pair = int(ms), int(seq)
    return pair if max(pair) < 2 ** 64 else None


def read_start(client: redis.Redis, job_id: str, after: str) -> str:
    """Where a reader resuming after entry id ``after`` reads from: ``after`` itself, or, when
    ``after`` is past the stream's last entry (an id the job has not written), just before that
    entry ("0-0" for an empty stream), so the reader gets it again and the entries still to
    come, instead of waiting on ids that come after it: a last entry that is final (the job
    ended between the reader's check and this read) ends the read at once."""
    if after == "0-0":
        return after
    last = client.xrevrange(keys.stream(job_id), count=1)
    ms, seq = entry_key(last[0][0]) if last else (0, 0)
    if (ms, seq) >= (entry_key(after) or (0, 0)):
        return after
    if not last:
        return "0-0"
    return f"{ms}-{seq - 1}" if seq else f"{ms - 1}-{2 ** 64 - 1}"


def ended_by(client: redis.Redis, job_id: str, after: str) -> bool:
    """Whether the job's stream ends (its ``done`` or ``error`` entry) at or before entry id
    ``after``: a reader who has everything up to ``after`` has the whole stream."""
    last = client.xrevrange(keys.stream(job_id), count=1)
    if not last:
        return False
    entry_id, fields = last[0]
    final = decode_entry(fields)[0] is not EventType.TOKEN
    return final and entry_key(entry_id) <= (entry_key(after) or (0, 0))
