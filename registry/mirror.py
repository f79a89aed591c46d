"""The Redis mirror of the registry: what workers read (they never see ``history.jsonl``).

Keys (``banter.keys``): ``REGISTRY_ACTIVE`` (hash name -> JSON of the record that made the
active version active: a promote or a rollback), ``registry_versions(name)`` (hash version ->
JSON of that version's promote record), ``REGISTRY_SEQ`` (the seq of the last history record
the mirror reflects). After each change the JSON of every record the mirror did not reflect
before is published on ``REGISTRY_EVENTS``, in seq order.

Every write is a complete snapshot of the replayed history at one seq, applied by one Lua
script only when that seq is greater than ``REGISTRY_SEQ`` (compare-and-set): concurrent
writers never move the mirror backwards, and a writer that loses the race loses nothing,
because the winner's snapshot already contains its record.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from typing import Iterator, Sequence

import redis

from banter import keys
from banter.errors import InvalidRequest, ModelNotFound, Unavailable, brief
from registry.records import Record, parse_ref
from registry.state import RegistryState, replay

# KEYS[1] seq, KEYS[2] active hash, KEYS[2+i] the versions hash of snapshot name i, then the
# versions hashes of stale names (to delete). ARGV[1] snapshot seq, ARGV[2] events channel,
# ARGV[3] snapshot JSON {"names": [...], "active": [json or ""], "versions": [[v, json, ...]],
# "events": [[seq, json], ...]}. Returns 1 when applied, 0 when the mirror is already at or
# past the snapshot's seq.
_WRITE_SNAPSHOT = """
local current = tonumber(redis.call('GET', KEYS[1])) or 0
local seq = tonumber(ARGV[1])
if seq <= current then return 0 end
local snap = cjson.decode(ARGV[3])
redis.call('DEL', KEYS[2])
for i, name in ipairs(snap.names) do
  if snap.active[i] ~= '' then redis.call('HSET', KEYS[2], name, snap.active[i]) end
  local versions = snap.versions[i]
  redis.call('DEL', KEYS[2 + i])
  for j = 1, #versions, 2 do redis.call('HSET', KEYS[2 + i], versions[j], versions[j + 1]) end
end
for i = 3 + #snap.names, #KEYS do redis.call('DEL', KEYS[i]) end
redis.call('SET', KEYS[1], ARGV[1])
for _, event in ipairs(snap.events) do
  if event[1] > current then redis.call('PUBLISH', ARGV[2], event[2]) end
end
return 1
"""


@contextmanager
def _redis_errors(action: str) -> Iterator[None]:
    try:
        yield
    except redis.RedisError as exc:
        raise Unavailable(f"Redis is not reachable while {action}: {exc}; check that Redis "
                          f"is up and BANTER_REDIS_URL points at it") from exc


def _text(value: str | bytes) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


class Mirror:
    """Reads and CAS-writes the registry mirror through ``client`` (decoding or not)."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._write = client.register_script(_WRITE_SNAPSHOT)

    def seq(self) -> int | None:
        """The seq the mirror reflects; None when the mirror is empty (never built, flushed)."""
        with _redis_errors("reading the registry mirror"):
            value = self.redis.get(keys.REGISTRY_SEQ)
        return None if value is None else int(value)

    def active(self, name: str) -> Record | None:
        """The record that made ``name``'s active version active, or None."""
        with _redis_errors("reading the registry mirror"):
            value = self.redis.hget(keys.REGISTRY_ACTIVE, name)
        return None if value is None else Record.from_json(value)

    def version(self, name: str, version: int) -> Record | None:
        """The promote record of ``name@version``, or None."""
        with _redis_errors("reading the registry mirror"):
            value = self.redis.hget(keys.registry_versions(name), str(version))
        return None if value is None else Record.from_json(value)

    def list_active(self) -> list[Record]:
        """The active record of every name, sorted by name."""
        with _redis_errors("reading the registry mirror"):
            values = self.redis.hgetall(keys.REGISTRY_ACTIVE)
        return sorted((Record.from_json(v) for v in values.values()), key=lambda r: r.name)

    def apply(self, record: Record, state_after: RegistryState) -> bool:
        """Mirror ``state_after`` (the replay up to and including ``record``) unless the mirror
        is already at or past ``record.seq``; return whether it was applied."""
        if state_after.last_seq != record.seq:
            raise ValueError(f"state_after ends at seq {state_after.last_seq}, "
                             f"not at the record's seq {record.seq}")
        return self._write_snapshot(state_after)

    def rebuild(self, records: Sequence[Record]) -> bool:
        """Replace the mirror with the replay of ``records`` (the whole history), unless it is
        already at or past their last seq; return whether it was rebuilt."""
        state = replay(records)
        if state.last_seq == 0:
            return False
        return self._write_snapshot(state)

    def _write_snapshot(self, state: RegistryState) -> bool:
        with _redis_errors("updating the registry mirror"):
            reflected = self.seq() or 0
            mirrored = {_text(name) for name in self.redis.hkeys(keys.REGISTRY_ACTIVE)}
            names = sorted(state.models)
            stale = sorted(mirrored - set(names))
            snapshot = {
                "names": names,
                "active": [m.active.to_json() if m.active else ""
                           for m in (state.models[n] for n in names)],
                "versions": [[part for version, record in sorted(state.models[n].versions.items())
                              for part in (str(version), record.to_json())] for n in names],
                "events": [[r.seq, r.to_json()] for r in state.records if r.seq > reflected],
            }
            applied = self._write(
                keys=[keys.REGISTRY_SEQ, keys.REGISTRY_ACTIVE,
                      *(keys.registry_versions(n) for n in names),
                      *(keys.registry_versions(n) for n in stale)],
                args=[state.last_seq, keys.REGISTRY_EVENTS,
                      json.dumps(snapshot, separators=(",", ":"))])
        return int(applied) == 1


def resolve_from_mirror(mirror: Mirror, ref: str, kind: str | None = None) -> Record:
    """The record ``ref`` (``name`` or ``name@version``) names, read from the mirror.

    ``name`` gives the active record; ``name@version`` that version's promote record. Raise
    InvalidRequest for a malformed ref or a model of another kind than ``kind`` (when given),
    ModelNotFound when the name or version is unknown.
    """
    name, version = parse_ref(ref)
    record = mirror.active(name) if version is None else mirror.version(name, version)
    if record is None:
        active = mirror.active(name) if version is not None else None
        if active is not None:
            raise ModelNotFound(f"model {brief(ref)} not found: {name!r} has no version {version} "
                                f"(its active version is {active.version}); see its history "
                                f"for the versions")
        hint = ""
        if mirror.seq() is None:
            hint = ("; the registry mirror in Redis is empty: the producer rebuilds it from "
                    "history.jsonl at start and on its next request")
        raise ModelNotFound(f"no model named {brief(ref)} in the registry: promote it first{hint}")
    if kind is not None and record.kind != kind:
        raise InvalidRequest(f"model {brief(ref)} has kind {record.kind}, not {kind}: use a model "
                             f"of kind {kind}", "model")
    return record
