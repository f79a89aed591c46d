"""What every route needs, built once per app and stored in ``app.extensions['banter']``."""

from __future__ import annotations

from dataclasses import dataclass

import redis
from flask import Response, current_app, g, request

from banter.settings import Settings
from producer.auth import LiveKeys
from producer.service import JobService
from producer.validation import json_body
from producer.waits import WaitSlots
from registry.service import Registry


@dataclass(frozen=True)
class Context:
    settings: Settings
    redis: redis.Redis
    jobs: JobService
    registry: Registry
    keys: LiveKeys
    waits: WaitSlots

    def owner(self, admin: bool = False) -> str:
        return self.keys.owner(request, admin=admin)

    def hold_wait(self, owner: str) -> None:
        """This request waits on a job (a stream or a synchronous call): count it against
        ``owner``'s waits until its response is closed (a stream's end or its client's
        leaving), or raise TooManyWaits. Not counted with authentication off
        (``producer.waits``)."""
        if self.settings.auth_disabled or "wait_owner" in g:
            return
        self.waits.take(owner)
        g.wait_owner = owner

    def release_wait(self, response: Response) -> Response:
        """``after_request``: the request's wait ends when its response is closed."""
        owner = g.pop("wait_owner", None)
        if owner is not None:
            response.call_on_close(lambda: self.waits.give(owner))
        return response

    def body(self) -> dict:
        return json_body(request, self.settings.max_request_bytes)


def ctx() -> Context:
    return current_app.extensions["banter"]


def trace_id() -> str:
    return g.trace_id
