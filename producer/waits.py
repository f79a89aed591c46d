"""Threads one API key may hold waiting on jobs in this producer process.

An event stream (``GET /v1/jobs/{id}/events``, a streamed inference or OpenAI call) or a
synchronous call holds one of the process's gunicorn threads for as long as its job runs or
waits in the queue. Without a bound one key could hold them all (a few hundred idle streams
on a queued job) and starve every other key, ``/healthz`` included. ``WaitSlots`` counts them
per key and refuses the one past ``BANTER_MAX_WAITS_PER_KEY`` with 429 ``too_many_waits``.
Only keys are counted: with authentication off there are no tenants to keep apart.
"""

from __future__ import annotations

import threading
from collections import Counter

from banter.errors import TooManyWaits


class WaitSlots:
    """``limit`` waits per key (0: no limit)."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._held: Counter[str] = Counter()
        self._lock = threading.Lock()

    def take(self, owner: str) -> None:
        """Count one more wait of ``owner``, or raise TooManyWaits; ``give`` ends it."""
        with self._lock:
            if self._limit and self._held[owner] >= self._limit:
                raise TooManyWaits(
                    f"this API key already holds {self._limit} event streams or synchronous "
                    "calls on this server (BANTER_MAX_WAITS_PER_KEY; a banter bulk run holds "
                    "up to its --max-in-flight); close one, or poll GET /v1/jobs/{id} "
                    "instead", retry_after_s=1)
            self._held[owner] += 1

    def give(self, owner: str) -> None:
        with self._lock:
            self._held[owner] -= 1
            if self._held[owner] <= 0:
                del self._held[owner]

    def held(self, owner: str) -> int:
        with self._lock:
            return self._held[owner]
