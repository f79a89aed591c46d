"""The registry's current state: a pure replay of the history records."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from banter.errors import WireError
from registry.records import Record


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


def apply(state: RegistryState, record: Record) -> None:
    """Apply one record to ``state`` in place."""
    if record.seq != state.last_seq + 1:
        raise WireError(f"registry record seq {record.seq} follows seq {state.last_seq}; "
                        f"seqs must count up by one (was history.jsonl edited?)")
    model = state.models.get(record.name)
    if model is None:
        model = state.models[record.name] = ModelState(name=record.name, kind=record.kind)
    if record.kind != model.kind:
        raise WireError(f"registry record seq {record.seq} gives {record.name!r} kind "
                        f"{record.kind} but it has kind {model.kind}")
    if record.action == "promote":
        if record.version in model.versions:
            raise WireError(f"registry record seq {record.seq} promotes {record.ref} again")
        model.versions[record.version] = record
        model.stack.append(record.version)
    else:
        if len(model.stack) < 2 or model.stack[-2] != record.version:
            raise WireError(f"registry record seq {record.seq} rolls {record.name!r} back to "
                            f"version {record.version}, which is not the previous active one")
        model.stack.pop()
    model.active = record
    state.records.append(record)
