"""What every route needs, built once per app and stored in ``app.extensions['banter']``."""

from __future__ import annotations

from dataclasses import dataclass

import redis
from flask import current_app, g, request

from banter.settings import Settings
from producer.auth import KeyRing
from producer.service import JobService
from producer.validation import json_body
from registry.service import Registry


@dataclass(frozen=True)
class Context:
    settings: Settings
    redis: redis.Redis
    jobs: JobService
    registry: Registry
    keys: KeyRing

    def owner(self, admin: bool = False) -> str:
        return self.keys.owner(request, admin=admin)

    def body(self) -> dict:
        return json_body(request, self.settings.max_request_bytes)


def ctx() -> Context:
    return current_app.extensions["banter"]


def trace_id() -> str:
    return g.trace_id
