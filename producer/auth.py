"""API keys: ``Authorization: Bearer KEY``. A job belongs to the key id that made it."""

from __future__ import annotations

import hashlib
import hmac

from flask import Request

from banter.errors import Forbidden, Unauthorized
from banter.settings import Settings

ANONYMOUS = "anonymous"


def key_id(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:16]


class KeyRing:
    """Hashed keys from settings. With no keys configured, everyone is ANONYMOUS and admin."""

    def __init__(self, settings: Settings) -> None:
        self.users = {_digest(k) for k in _split(settings.api_keys)}
        self.admins = {_digest(k) for k in _split(settings.admin_keys)}
        self.enabled = bool(self.users or self.admins)

    def owner(self, request: Request, admin: bool = False) -> str:
        """The caller's key id; Unauthorized without a known key, Forbidden when ``admin`` is
        required and the key is not an admin key."""
        if not self.enabled:
            return ANONYMOUS
        header = request.headers.get("Authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthorized("send an API key as 'Authorization: Bearer <key>'")
        digest = _digest(key.strip())
        is_admin = any(hmac.compare_digest(digest, d) for d in self.admins)
        if not is_admin and not any(hmac.compare_digest(digest, d) for d in self.users):
            raise Unauthorized("unknown API key")
        if admin and not is_admin:
            raise Forbidden("this needs an admin key (BANTER_ADMIN_KEYS)")
        return key_id(key.strip())


def _split(raw: str) -> list[str]:
    return [k.strip() for k in raw.split(",") if k.strip()]


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()
