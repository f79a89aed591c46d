"""API keys: ``Authorization: Bearer KEY``. A job belongs to the key id that made it.

Keys come from ``BANTER_API_KEYS`` and ``BANTER_ADMIN_KEYS`` (comma-separated) and from
``BANTER_KEYS_FILE``, all of them together. The keys file holds one entry per line: ``KEY`` or
``user:KEY`` (a user key), ``admin:KEY`` (an admin key); blank lines, lines starting with ``#``
and a ``#`` after a space to the end of its line are comments, and a key holds no space.
Anywhere a key is written, ``sha256:<64 hex digits>`` stands for the key with that SHA-256
digest, so the file (or the environment) need not hold the key itself. Only digests are kept
in memory; a caller's key id (its job owner) is the first 16 hex digits.

Admin keys may do what user keys do, and also change the registry and read its history.
With no key configured the producer refuses to start (AuthNotConfigured) unless
``BANTER_AUTH_DISABLED=true``, where every caller is ANONYMOUS and admin. A key is printable
ASCII without spaces (it travels in an HTTP header); any other is refused at start.

A running producer reads the keys file again when it changes (LiveKeys), so keys are added
and revoked without a restart; a changed file that does not read keeps the keys in force.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

from flask import Request

from banter.errors import Forbidden, Unauthorized
from banter.settings import Settings, SettingsError

ANONYMOUS = "anonymous"
SCOPES = ("user", "admin")
_HASHED = re.compile(r"^sha256:([0-9a-fA-F]{64})\Z")
_DIGEST = re.compile(r"[0-9a-f]{64}")
_COMMENT = re.compile(r"(^|\s)#.*$")  # a whole-line comment, or one after an entry
log = logging.getLogger("banter.producer")


class AuthNotConfigured(SettingsError):
    """The producer's key settings are missing, unreadable or contradictory (exit 2)."""


@dataclass(frozen=True)
class KeyRing:
    """The SHA-256 digests of the configured keys (never the keys themselves)."""

    users: frozenset[str]
    admins: frozenset[str]
    disabled: bool = False

    @classmethod
    def from_settings(cls, settings: Settings,
                      file_entries: list[tuple[str, str]] | None = None) -> "KeyRing":
        """The keys of ``settings`` (``file_entries``: the keys file's, already read);
        AuthNotConfigured when there are none and auth is not explicitly disabled, when auth
        is disabled while keys are set, or for a bad keys file."""
        users = {_entry_digest(k, "BANTER_API_KEYS") for k in _split(settings.api_keys)}
        admins = {_entry_digest(k, "BANTER_ADMIN_KEYS") for k in _split(settings.admin_keys)}
        if file_entries is None and settings.keys_file:
            file_entries = read_keys_file(Path(settings.keys_file))
        for scope, digest in file_entries or []:
            (admins if scope == "admin" else users).add(digest)
        if settings.auth_disabled and (users or admins):
            raise AuthNotConfigured(
                "BANTER_AUTH_DISABLED=true but API keys are configured: unset "
                "BANTER_AUTH_DISABLED to require the keys, or remove BANTER_API_KEYS, "
                "BANTER_ADMIN_KEYS and BANTER_KEYS_FILE")
        if not settings.auth_disabled and not (users or admins):
            raise AuthNotConfigured(
                "no API keys are configured: set BANTER_API_KEYS and/or BANTER_ADMIN_KEYS "
                "(comma-separated) or BANTER_KEYS_FILE, or set BANTER_AUTH_DISABLED=true to "
                "serve without authentication (trusted networks only)")
        return cls(frozenset(users - admins), frozenset(admins), settings.auth_disabled)

    def owner(self, request: Request, admin: bool = False) -> str:
        """The caller's key id; Unauthorized without a known key, Forbidden when ``admin`` is
        required and the key is not an admin key."""
        if self.disabled:
            return ANONYMOUS
        header = request.headers.get("Authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthorized("send an API key as 'Authorization: Bearer <key>'")
        digest = _hash(key.strip())
        is_admin = any(hmac.compare_digest(digest, d) for d in self.admins)
        if not is_admin and not any(hmac.compare_digest(digest, d) for d in self.users):
            raise Unauthorized("unknown API key: send one of the keys the producer was "
                               "configured with (BANTER_API_KEYS, BANTER_ADMIN_KEYS, "
                               "BANTER_KEYS_FILE)")
        if admin and not is_admin:
            raise Forbidden("this needs an admin key (BANTER_ADMIN_KEYS, or 'admin:KEY' in "
                            "BANTER_KEYS_FILE)")
        return digest[:16]


class LiveKeys:
    """The producer's KeyRing, built again when ``BANTER_KEYS_FILE`` changes (its size, time or
    inode; looked at every ``recheck_s`` by a thread of each producer process, and by a request
    that finds the last look older): an entry added or removed takes effect within that time,
    in every producer process, whether or not requests reach it (one that saw no request
    between a revoking edit and a broken one kept the revoked key). A changed file that does
    not give a valid ring (a malformed line, no key left, the file gone or unreadable) keeps
    the keys in force and logs ``keys_file_invalid`` once, naming the line; the next change is
    tried again.
    The environment's keys are read once, at start.

    Each good read of the file is kept, as digests, in ``BANTER_HOME/keyrings/`` (one file per
    keys file): a producer process that starts while the file is broken (gunicorn replacing
    one that died) takes those entries instead of failing to boot, which would stop the whole
    producer. Only where there are none does a broken file stop it (AuthNotConfigured)."""

    def __init__(self, settings: Settings, recheck_s: float = 1.0) -> None:
        self.settings = settings
        self.recheck_s = recheck_s
        self._path = Path(settings.keys_file) if settings.keys_file else None
        self._stamp = self._look()
        self._ring = self._boot_ring()
        self._checked = time.monotonic()
        self._lock = threading.Lock()
        if self._path is not None and recheck_s > 0:
            threading.Thread(target=_watch, args=(weakref.ref(self), recheck_s), daemon=True,
                             name="keys-file-watch").start()

    def current(self) -> KeyRing:
        if self._path is not None and time.monotonic() - self._checked >= self.recheck_s:
            self._recheck()
        return self._ring

    def owner(self, request: Request, admin: bool = False) -> str:
        """``KeyRing.owner`` on the keys in force."""
        return self.current().owner(request, admin=admin)

    def _recheck(self) -> None:
        with self._lock:
            if time.monotonic() - self._checked < self.recheck_s:
                return  # another thread just looked
            self._checked = time.monotonic()
            stamp = self._look()
            if stamp == self._stamp:
                return
            self._stamp = stamp
            try:
                ring = self._read()
            except AuthNotConfigured as exc:  # its messages never quote a key
                log.error("keys_file_invalid", extra={"error": str(exc),
                                                      "kept": "the keys in force"})
                return
            self._ring = ring
            log.info("keys_file_reloaded", extra={"users": len(ring.users),
                                                  "admins": len(ring.admins)})

    def _boot_ring(self) -> KeyRing:
        try:
            return self._read()
        except AuthNotConfigured as exc:
            kept = None if self._path is None else self._kept_entries()
            if kept is None:
                raise
            log.error("keys_file_invalid", extra={
                "error": str(exc), "kept": "the entries of its last good read"})
            return KeyRing.from_settings(self.settings, kept)

    def _read(self) -> KeyRing:
        """The ring from the environment and the keys file as it is now (AuthNotConfigured);
        the file's entries are kept for a process that starts while it is broken."""
        entries = read_keys_file(self._path) if self._path is not None else []
        ring = KeyRing.from_settings(self.settings, entries)
        if self._path is not None:
            self._keep_entries(entries)
        return ring

    def _kept_path(self) -> Path:
        name = hashlib.sha256(str(self._path.expanduser().absolute()).encode()).hexdigest()
        return self.settings.home.expanduser() / "keyrings" / f"{name[:16]}.json"

    def _keep_entries(self, entries: list[tuple[str, str]]) -> None:
        path = self._kept_path()
        text = json.dumps({"keys_file": str(self._path), "entries": entries})
        try:
            if path.exists() and path.read_text() == text:
                return
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            partial = path.with_name(f"{path.name}.{os.getpid()}")
            partial.write_text(text)
            partial.chmod(0o600)
            os.replace(partial, path)
        except OSError as exc:
            log.warning("keyring_not_kept", extra={"path": str(path), "error": str(exc)})

    def _kept_entries(self) -> list[tuple[str, str]] | None:
        try:
            kept = json.loads(self._kept_path().read_text())
            entries = [(scope, digest) for scope, digest in kept["entries"]]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if not all(scope in SCOPES and isinstance(digest, str) and _DIGEST.fullmatch(digest)
                   for scope, digest in entries):
            return None
        return entries

    def _look(self) -> tuple[int, int, int] | None:
        if self._path is None:
            return None
        try:
            stat = os.stat(self._path)
        except OSError:
            return None
        return stat.st_mtime_ns, stat.st_size, stat.st_ino


def _watch(ref: weakref.ref, period_s: float) -> None:
    """Look at the keys file every ``period_s`` while its LiveKeys lives."""
    while True:
        time.sleep(period_s)
        keys = ref()
        if keys is None:
            return
        try:
            keys._recheck()
        except Exception as exc:  # the thread must outlive any one look
            log.error("keys_file_watch_failed", extra={"error": str(exc)})
        del keys


def read_keys_file(path: Path) -> list[tuple[str, str]]:
    """``(scope, digest)`` per entry of a keys file (module docstring); AuthNotConfigured
    naming the line of a malformed entry, or when the file cannot be read."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise AuthNotConfigured(f"BANTER_KEYS_FILE={str(path)!r} cannot be read: {exc}") from None
    entries = []
    for number, line in enumerate(lines, 1):
        line = _COMMENT.sub("", line).strip()
        if not line:
            continue
        if len(line.split()) > 1:
            raise AuthNotConfigured(f"{path}:{number}: a key cannot hold spaces (a comment after "
                                    "an entry starts with ' #')")
        scope, sep, key = line.partition(":")
        if not sep or scope == "sha256":
            scope, key = "user", line
        if scope not in SCOPES:
            raise AuthNotConfigured(f"{path}:{number}: what comes before the first ':' is not "
                                    "a scope (user or admin; not quoted here, as it may be part "
                                    "of a key); write 'KEY', 'user:KEY' or 'admin:KEY' (a key "
                                    "that holds ':' needs its scope)")
        if not key.strip():
            raise AuthNotConfigured(f"{path}:{number}: the key after '{scope}:' is empty")
        entries.append((scope, _entry_digest(key.strip(), f"{path}:{number}")))
    return entries


def _split(raw: str) -> list[str]:
    return [k.strip() for k in raw.split(",") if k.strip()]


def _entry_digest(entry: str, where: str) -> str:
    """The digest a configured key entry stands for: ``sha256:<hex>`` names it, any other
    entry is the key itself. (A key a caller sends is always hashed: knowing a digest is not
    knowing the key.) An entry that starts ``sha256:`` but is not 64 hex digits is refused
    (AuthNotConfigured naming ``where``): taken as a key, a mistyped digest (meant to be safe
    to publish) would be a working password."""
    hashed = _HASHED.match(entry)
    if hashed:
        return hashed.group(1).lower()
    if entry.lower().startswith("sha256:"):
        raise AuthNotConfigured(f"{where}: sha256:... must be followed by exactly 64 hex "
                                "digits (the SHA-256 of the key)")
    if not all("!" <= ch <= "~" for ch in entry):  # the key itself is not repeated here
        raise AuthNotConfigured(f"{where}: a key must be printable ASCII without spaces: no "
                                "client could send it in an HTTP header")
    return _hash(entry)


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()
