"""The registry as the producer uses it: promote, rollback, history, resolve.

Every change is appended to ``history.jsonl`` first (the source of truth), then mirrored to
Redis. If the mirror update fails (Redis down, process killed) the change stands and
``ensure_mirror()`` repairs the mirror later: call it at startup; ``resolve`` calls it on
every request.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

import redis

from banter.errors import (
    ArtifactError,
    Conflict,
    InvalidRequest,
    ModelNotFound,
    RegistryUnavailable,
    Unavailable,
    WireError,
)
from banter.settings import Settings
from registry.artifacts import inspect_artifact
from registry.history import HistoryFile
from registry.mirror import Mirror, resolve_from_mirror
from registry.records import BACKENDS, KINDS, Record, check_name, check_new_name, utc_now
from registry.state import RegistryState, ReplayError, apply, replay

log = logging.getLogger("banter.registry")

UNREADABLE_LOG_EVERY_S = 60.0  # an unreadable history.jsonl is logged once a minute, not per call


class _Unchanged(Exception):
    """Raised inside an append to write nothing: ``record`` is already active."""

    def __init__(self, record: Record) -> None:
        super().__init__(record.ref)
        self.record = record


def _check_text(**values: object) -> None:
    for field, value in values.items():
        if not isinstance(value, str):
            raise InvalidRequest(f"{field} must be a string, got {type(value).__name__}", field)


class Registry:
    """Model versions of the deployment: ``history`` is the truth, ``mirror`` what workers
    read, ``model_root`` where artifacts must live."""

    def __init__(self, history: HistoryFile, mirror: Mirror, model_root: Path) -> None:
        self.history_file = history
        self.mirror = mirror
        self.model_root = Path(model_root)
        self._unreadable_logged = -UNREADABLE_LOG_EVERY_S

    @classmethod
    def from_settings(cls, settings: Settings, client: redis.Redis) -> "Registry":
        """The registry at ``settings.registry_path`` and ``settings.model_root``. Does no I/O:
        call ``ensure_mirror()`` once at startup."""
        return cls(HistoryFile(settings.registry_path), Mirror(client), settings.model_root)

    def promote(self, name: str, kind: str, path: str, backend: str = "onnx",
                upstream_model: str | None = None, actor: str = "admin",
                reason: str = "") -> tuple[Record, bool]:
        """Make a new version of ``name`` active; return ``(record, created)``.

        ``backend="onnx"``: ``path`` is the artifact (see ``inspect_artifact``), checked and
        hashed here. ``backend="openai"``: no path, ``upstream_model`` required. If the active
        version already has the same kind, backend, path, sha256, files and upstream model,
        nothing is appended and ``(active record, False)`` is returned, so retrying a promote is
        safe.
        Raise InvalidRequest (bad or reserved name, kind, backend or upstream model), ArtifactError (bad
        artifact) or Conflict (``name`` is a model of another kind).
        """
        check_new_name(name)
        _check_text(actor=actor, reason=reason)
        if kind not in KINDS:
            raise InvalidRequest(f"invalid kind {kind!r}: use one of {', '.join(KINDS)}", "kind")
        if backend not in BACKENDS:
            raise InvalidRequest(f"invalid backend {backend!r}: use one of {', '.join(BACKENDS)}",
                                 "backend")
        if backend == "onnx":
            if upstream_model:
                raise InvalidRequest("an upstream model ('model' in POST /v1/models/promote, "
                                     "--model in banter models promote) applies only to "
                                     "backend 'openai': leave it out for an onnx model", "model")
            artifact = inspect_artifact(self.model_root, path, kind)
            rel_path, sha256, upstream = artifact.rel_path, artifact.sha256, None
            files = artifact.files
        else:
            if path:
                raise InvalidRequest("backend 'openai' takes no path: leave it empty and name "
                                     "the upstream model in 'model' (--model in banter models "
                                     "promote)", "path")
            if not isinstance(upstream_model, str) or not upstream_model.strip():
                raise InvalidRequest("backend 'openai' needs 'model' (--model in banter models "
                                     "promote): the model name the upstream API serves, e.g. "
                                     "'gpt-4o-mini'", "model")
            rel_path, sha256, upstream = "", "", upstream_model.strip()
            files = {}

        def make(state: RegistryState) -> Record:
            model = state.models.get(name)
            active = model.active if model else None
            if model is not None and model.kind != kind:
                raise Conflict(f"model {name!r} has kind {model.kind}; a name cannot change "
                               f"kind: promote the {kind} model under another name")
            if active is not None and (active.backend, active.path, active.sha256, active.files,
                                       active.upstream_model) == (backend, rel_path, sha256,
                                                                  files, upstream):
                raise _Unchanged(active)
            return Record(seq=state.last_seq + 1, time=utc_now(), action="promote", name=name,
                          kind=kind, version=(model.max_version if model else 0) + 1,
                          path=rel_path, sha256=sha256, backend=backend,
                          upstream_model=upstream, actor=actor, reason=reason,
                          previous_version=active.version if active else None, files=files)

        try:
            record, state = self._append(make)
        except _Unchanged as unchanged:
            return unchanged.record, False
        self._mirror(record, state)
        return record, True

    def rollback(self, name: str, actor: str = "admin", reason: str = "") -> Record:
        """Make the version that was active before the current one of ``name`` active again,
        by appending a rollback record (``version`` = the restored version,
        ``previous_version`` = the one rolled back from). Raise ModelNotFound for an unknown
        name, Conflict when there is no earlier version to go back to or its files are no
        longer what it was promoted with (gone or changed: a rollback to it would stop the
        model being served)."""
        check_name(name)
        _check_text(actor=actor, reason=reason)

        def make(state: RegistryState) -> Record:
            model = state.models.get(name)
            if model is None or model.active is None:
                raise ModelNotFound(f"no model named {name!r} in the registry: nothing to "
                                    f"roll back", "name")
            if len(model.stack) < 2:
                raise Conflict(f"model {name!r} has no earlier version to roll back to "
                               f"(version {model.active.version} is the first of its active "
                               f"history): promote the version you want instead")
            current, restored = model.stack[-1], model.versions[model.stack[-2]]
            self._check_unchanged(restored)
            return Record(seq=state.last_seq + 1, time=utc_now(), action="rollback", name=name,
                          kind=restored.kind, version=restored.version, path=restored.path,
                          sha256=restored.sha256, backend=restored.backend,
                          upstream_model=restored.upstream_model, actor=actor, reason=reason,
                          previous_version=current, files=restored.files)

        record, state = self._append(make)
        self._mirror(record, state)
        return record

    def _check_unchanged(self, record: Record) -> None:
        """Conflict unless an onnx version's files are still those its record names."""
        if record.backend != "onnx":
            return
        try:
            artifact = inspect_artifact(self.model_root, record.path, record.kind)
        except ArtifactError as exc:
            raise Conflict(f"cannot roll {record.name!r} back to version {record.version}: its "
                           f"artifact no longer checks ({exc.message}); restore its files, or "
                           "promote the version you want") from None
        if (artifact.sha256, artifact.files) != (record.sha256, record.files):
            raise Conflict(f"cannot roll {record.name!r} back to version {record.version}: its "
                           "files changed since it was promoted (a worker would refuse them); "
                           "restore them, or promote the version you want")

    def history(self, name: str | None = None) -> list[Record]:
        """Every record in seq order, or only those of ``name``, read from the file.
        Raise ModelNotFound when ``name`` has none, RegistryUnavailable when the file is behind
        the mirror (moved away or replaced by an older copy: it would hide records)."""
        records = self.history_file.read()
        behind = self._behind(records[-1].seq if records else 0)
        if behind:  # a damaged last line left out, or the file moved away or replaced
            raise RegistryUnavailable(self.history_file.damage() or behind)
        if name is None:
            return records
        mine = [r for r in records if r.name == name]
        if not mine:
            raise ModelNotFound(f"no model named {name!r} in the registry", "name")
        return mine

    def list_active(self) -> list[Record]:
        """The active record of every model, sorted by name, read from the mirror (rebuilt
        first if behind) as ``resolve`` reads one: what the workers serve."""
        self.ensure_mirror()
        return self.mirror.list_active()

    def resolve(self, ref: str, kind: str | None = None) -> Record:
        """The record ``name`` or ``name@version`` names, read from the mirror (rebuilt first
        if behind). Raise InvalidRequest for a malformed ref or a model of another ``kind``,
        ModelNotFound for an unknown name or version."""
        self.ensure_mirror()
        return resolve_from_mirror(self.mirror, ref, kind)

    def ensure_mirror(self) -> bool:
        """Rebuild the mirror from the file when it is behind (REGISTRY_SEQ missing or lower
        than the file's last seq); return whether it rebuilt. Cheap when up to date: one GET,
        one stat. A file that cannot be read, or holds a line that is not the next record (or
        a record that cannot follow the ones before it), leaves a mirror that has records
        serving as it is, logged once a minute as ``registry_history_unreadable``;
        RegistryUnavailable when there is no mirror to serve from."""
        mirror_seq = self.mirror.seq()
        try:
            file_seq = self.history_file.last_seq()
            if file_seq == 0 or (mirror_seq is not None and mirror_seq >= file_seq):
                return False
            rebuilt = self.mirror.rebuild(self.history_file.read())
        except (RegistryUnavailable, WireError) as exc:
            if mirror_seq is None:
                raise self._damaged(exc) from None
            if time.monotonic() - self._unreadable_logged > UNREADABLE_LOG_EVERY_S:
                self._unreadable_logged = time.monotonic()
                log.warning("registry_history_unreadable", extra={
                    "path": str(self.history_file.path), "error": exc.message})
            return False
        if rebuilt:
            log.info("registry_mirror_rebuilt", extra={"from_seq": mirror_seq,
                                                       "to_seq": file_seq})
        return rebuilt

    def _append(self, make: Callable[[RegistryState], Record]) -> tuple[Record, RegistryState]:
        """Append ``make(state of the records so far)``'s record; return it with the state
        right after it. Records that do not replay are RegistryUnavailable: nothing is appended."""
        states: list[RegistryState] = []

        def capture(records: list[Record]) -> Record:
            self._check_not_behind(records[-1].seq if records else 0)
            try:
                states.append(replay(records))  # the records read under the lock
            except WireError as exc:
                raise self._damaged(exc) from None
            return make(states[-1])

        record = self.history_file.append(capture)
        apply(states[-1], record)  # make reads the state, never changes it
        return record, states[-1]

    def _damaged(self, exc: RegistryUnavailable | WireError) -> RegistryUnavailable:
        """``exc`` as the RegistryUnavailable a client gets: the history cannot be used."""
        if isinstance(exc, RegistryUnavailable):
            return exc
        where = f" line {exc.seq}" if isinstance(exc, ReplayError) else ""
        return RegistryUnavailable(f"{self.history_file.path.name}{where} cannot follow the "
                                   f"lines before it ({exc.message}); history.jsonl is "
                                   "append-only: restore it from a backup")

    def _check_not_behind(self, file_seq: int) -> None:
        """Conflict when the mirror workers read is past the file's last seq: a change appended
        to it would never reach the mirror."""
        behind = self._behind(file_seq)
        if behind:
            raise Conflict(f"{behind}; nothing was changed")

    def _behind(self, file_seq: int) -> str:
        """Why the file is behind the mirror workers read (its last seq lower: it was moved
        away or replaced by an older copy), or "" when it is not. Unchecked while Redis is
        down (a change then stands in the file and ensure_mirror() applies it later)."""
        try:
            mirror_seq = self.mirror.seq()
        except Unavailable:
            return ""
        if mirror_seq is None or mirror_seq <= file_seq:
            return ""
        return (f"{self.history_file.path.name} ends at seq {file_seq}, but the Redis mirror "
                f"workers serve from is at seq {mirror_seq}: the file was moved away or "
                "replaced by an older copy. Restore the newest history.jsonl (or set "
                "BANTER_REGISTRY_PATH to it)")

    def _mirror(self, record: Record, state: RegistryState) -> None:
        """Mirror a change already in the file; a Redis failure is logged, not raised: the
        change stands and ensure_mirror() repairs the mirror."""
        try:
            self.mirror.apply(record, state)
        except Unavailable as exc:
            log.warning("registry_mirror_update_failed",
                        extra={"seq": record.seq, "ref": record.ref, "error": exc.message})
