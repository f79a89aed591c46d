"""The registry's current state: a pure replay of the history records."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Iterable

from banter.errors import InvalidRequest, WireError
from registry.records import Record, check_new_name, leaves_base


@dataclass
class ModelState:
    """One model name: its kind, the record that made its active version active (a promote or
    a rollback), each version's promote record, and the stack of active versions (the top is
    the active one; a rollback pops it)."""

    name: str
    kind: str
    active: Record | None = None
    versions: dict[int, Record] = field(default_factory=dict)
    stack: list[int] = field(default_factory=list)

    @property
    def max_version(self) -> int:
        return max(self.versions, default=0)


@dataclass
class RegistryState:
    """Every model name's state after ``records`` (kept, in order); ``last_seq`` is 0 when
    there are none."""

    models: dict[str, ModelState] = field(default_factory=dict)
    records: list[Record] = field(default_factory=list)

    @property
    def last_seq(self) -> int:
        return self.records[-1].seq if self.records else 0

    def active(self, name: str) -> Record | None:
        model = self.models.get(name)
        return model.active if model else None

    def list_active(self) -> list[Record]:
        """The active record of every name, sorted by name."""
        return [m.active for _, m in sorted(self.models.items()) if m.active is not None]


def replay(records: Iterable[Record]) -> RegistryState:
    """Apply ``records`` in order. Raise WireError when one cannot follow the ones before it
    (the history was edited by hand or written by something else)."""
    state = RegistryState()
    for record in records:
        apply(state, record)
    return state


class ReplayError(WireError):
    """A record that cannot follow the ones before it; ``seq`` is its seq (and its line in
    history.jsonl, whose seqs count from 1)."""

    def __init__(self, seq: int, message: str) -> None:
        super().__init__(f"registry record seq {seq} {message}")
        self.seq = seq


def apply(state: RegistryState, record: Record) -> None:
    """Apply one record to ``state`` in place: what a promote or rollback would have written
    after the records before it, or ReplayError."""
    if record.seq != state.last_seq + 1:
        raise ReplayError(record.seq, f"follows seq {state.last_seq}; seqs must count up by one "
                          "(was history.jsonl edited?)")
    try:
        check_new_name(record.name)
    except InvalidRequest as exc:
        raise ReplayError(record.seq, f"names no model a promote could make: {exc.message}") \
            from None
    if leaves_base(record.path):
        raise ReplayError(record.seq, f"names the artifact {record.path!r}, which is not under "
                          "the model root (a promote writes a path relative to it)")
    try:
        datetime.fromisoformat(record.time)
    except ValueError:
        raise ReplayError(record.seq, f"has the time {record.time!r}, which is not an ISO-8601 "
                          "time") from None
    model = state.models.get(record.name)
    if model is None:
        model = state.models[record.name] = ModelState(name=record.name, kind=record.kind)
    if record.kind != model.kind:
        raise ReplayError(record.seq, f"gives {record.name!r} kind {record.kind} but it has "
                          f"kind {model.kind}")
    active = model.active.version if model.active else None
    if record.action == "promote":
        if record.version != model.max_version + 1:
            raise ReplayError(record.seq, f"promotes {record.ref}, but the next version of "
                              f"{record.name!r} is {model.max_version + 1}")
        if record.previous_version != active:
            raise ReplayError(record.seq, f"says version {record.previous_version} was active "
                              f"before it, but {active} was")
        model.versions[record.version] = record
        model.stack.append(record.version)
    else:
        if len(model.stack) < 2 or model.stack[-2] != record.version:
            raise ReplayError(record.seq, f"rolls {record.name!r} back to version "
                              f"{record.version}, which is not the previous active one")
        if record.previous_version != active:
            raise ReplayError(record.seq, f"rolls back from version {record.previous_version}, "
                              f"but {active} was active")
        model.stack.pop()
    model.active = record
    state.records.append(record)
