"""One line of ``history.jsonl``: the ``Record`` of a promote or a rollback, and the rules for
model names and ``name@version`` references.

A record is self-contained: a rollback record repeats the kind, path, sha256, files, backend
and upstream model of the version it restores, so the active record of a name is always enough
to load (and verify) the model.
"""

from __future__ import annotations

import json
import re
from dataclasses import MISSING, asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import PurePosixPath
from typing import Any

from banter.errors import InvalidRequest, WireError, brief

ACTIONS = ("promote", "rollback")
KINDS = ("generate", "embed")
BACKENDS = ("onnx", "openai")

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
_VERSION_PATTERN = re.compile(r"^[1-9][0-9]*\Z")
RESERVED_NAMES = ("history", "promote", "rollback")  # paths under /v1/models/ of their own


@dataclass(frozen=True)
class Record:
    """One registry change.

    ``version`` is the per-name version this record makes active (for a rollback: the version
    it restores); ``previous_version`` is the version that was active before it (None for a
    name's first promote). ``path`` is the artifact's ``.onnx`` file relative to the model root
    (posix separators; empty for the openai backend). ``time`` is ISO-8601 UTC. ``files``
    maps each companion file that was beside the artifact at promote (``tokenizer.json``,
    ``config.json``, ``tokenizer_config.json``) to its sha256; empty for the openai backend,
    and in records written before it existed (their companions are not verified).
    """

    seq: int
    time: str
    action: str
    name: str
    kind: str
    version: int
    path: str
    sha256: str
    backend: str
    upstream_model: str | None
    actor: str
    reason: str
    previous_version: int | None
    files: dict[str, str] = field(default_factory=dict)

    @property
    def ref(self) -> str:
        """``name@version``: the reference that pins this record's version."""
        return f"{self.name}@{self.version}"

    def to_json(self) -> str:
        """One compact JSON object, no newline."""
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> "Record":
        """Decode ``to_json`` output; raise WireError when it is not a valid record.

        Unknown keys are ignored so an older reader accepts records of a newer writer.
        """
        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise WireError(f"registry record is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise WireError(f"registry record must be a JSON object, got {type(data).__name__}")
        values = {f.name: data.get(f.name, _MISSING) for f in fields(cls)
                  if f.name in data or f.default_factory is MISSING}
        missing = [name for name, value in values.items() if value is _MISSING]
        if missing:
            raise WireError(f"registry record lacks {', '.join(missing)}: {data!r}")
        _check_record(values)
        return cls(**values)

    def to_public(self) -> dict[str, Any]:
        """What the HTTP API shows: every field, plus ``ref`` (``name@version``)."""
        public = asdict(self)
        public["ref"] = self.ref
        return public


_MISSING = object()


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_record(values: dict[str, Any]) -> None:
    """Raise WireError naming the first field of a decoded record with a wrong type or value."""
    problems = []
    for name in ("seq", "version"):
        if not _is_int(values[name]) or values[name] < 1:
            problems.append(f"{name} must be an integer >= 1")
    for name in ("time", "name", "path", "sha256", "actor", "reason"):
        if not isinstance(values[name], str):
            problems.append(f"{name} must be a string")
    for name, allowed in (("action", ACTIONS), ("kind", KINDS), ("backend", BACKENDS)):
        if values[name] not in allowed:
            problems.append(f"{name} must be one of {', '.join(allowed)}")
    files = values.get("files", {})
    if not isinstance(files, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        problems.append("files must be an object of file names to sha256 digests")
    if values["upstream_model"] is not None and not isinstance(values["upstream_model"], str):
        problems.append("upstream_model must be a string or null")
    previous = values["previous_version"]
    if previous is not None and (not _is_int(previous) or previous < 1):
        problems.append("previous_version must be an integer >= 1 or null")
    if problems:
        raise WireError(f"bad registry record ({'; '.join(problems)}): {values!r}")


def leaves_base(path: str) -> bool:
    """Whether a posix path meant relative to a directory reaches outside it: absolute, or
    through ``..``."""
    name = PurePosixPath(path)
    return name.is_absolute() or ".." in name.parts


def utc_now() -> str:
    """The current time as ISO-8601 UTC with milliseconds, e.g. ``2024-05-01T12:00:00.000Z``."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def check_name(name: str, param: str = "name") -> str:
    """Return ``name`` if it is a valid model name, else raise InvalidRequest (``param``: the
    request field that holds it)."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name) or ".." in name:
        raise InvalidRequest(
            f"invalid model name {brief(name)}: use 1-64 characters from letters, digits, '.', '_' "
            f"and '-', starting with a letter or digit, with no '..' (no '@' or '/')", param)
    return name


def check_new_name(name: str) -> str:
    """``check_name``, and not one of RESERVED_NAMES: a name a new model may take."""
    check_name(name)
    if name in RESERVED_NAMES:
        raise InvalidRequest(f"{name!r} cannot name a model: GET /v1/models/{name} is the "
                             f"registry's own endpoint (reserved: {', '.join(RESERVED_NAMES)})",
                             "name")
    return name


def parse_ref(ref: str) -> tuple[str, int | None]:
    """Split ``name`` or ``name@version`` into ``(name, version or None)``.

    Raise InvalidRequest when the name is invalid or the version is not a positive integer.
    """
    if not isinstance(ref, str):
        raise InvalidRequest(f"model reference must be a string like 'name' or 'name@3', "
                             f"got {brief(ref)}", "model")
    name, at, version = ref.partition("@")
    if at and not _VERSION_PATTERN.match(version):
        raise InvalidRequest(f"invalid model reference {brief(ref)}: the version after '@' must be a "
                             f"positive integer, e.g. '{name}@1'", "model")
    check_name(name, "model")
    return name, (int(version) if at else None)
