"""Bulk work steps aside while interactive jobs are in the worker process.

With a bulk backlog draining, the worker's Celery consumer takes bulk messages and dozens of bulk
job threads do their Redis and Python work, all on the cores (and the GIL) that an interactive
job needs for its own few milliseconds. ``LaneGate`` knows which interactive jobs are doing
their work in the process (from the moment Celery receives their message until they finish,
less the time they wait on the engine thread or the upstream API: a long generation does not
hold bulk work back) and, while there are any, holds the bulk lane back in two places:

* intake: the broker channel (on Redis) leaves the bulk queues out (``bulk_intake_wait``),
  except that one bulk message gets through every ``yield_s``, and keeps them out for
  ``yield_s / 2`` after an interactive job leaves (the next is often right behind it: a
  client's sequential requests);
* bulk job threads wait (``wait_clear``, on a condition, not holding the GIL) before they start
  a job and before they record its result, at most ``yield_s`` each time.

So the bulk lane slows down while interactive work runs and never stops: under a continuous
stream of interactive jobs it still takes a message every ``yield_s``, and each of its jobs waits
at most ``2 * yield_s``. ``yield_s`` 0 turns the gate off.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Callable, Iterator

LINGER_SHARE = 0.5  # of yield_s: the intake stays shut this long after an interactive job leaves


class LaneGate:
    def __init__(self, yield_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.yield_s = yield_s
        self._clock = clock
        self._cond = threading.Condition()
        self._interactive: set[str] = set()
        self._bulk_taken_at = float("-inf")
        self._left_at = float("-inf")  # when an interactive job last left

    def enter(self, job_id: str) -> None:
        """Interactive job ``job_id`` is in the process (its message came in, or it started)."""
        if self.yield_s > 0:
            with self._cond:
                self._interactive.add(job_id)

    def leave(self, job_id: str) -> None:
        """Interactive job ``job_id`` finished (or was never run here)."""
        with self._cond:
            if job_id in self._interactive:
                self._interactive.remove(job_id)
                self._left_at = self._clock()
            if not self._interactive:
                self._cond.notify_all()

    @contextlib.contextmanager
    def released(self, job_id: str) -> Iterator[None]:
        """Interactive job ``job_id`` out of the count meanwhile (it waits on its backend: the
        engine thread or the upstream API, not this process's Python)."""
        self.leave(job_id)
        try:
            yield
        finally:
            self.enter(job_id)

    def clear(self) -> None:
        """Forget every interactive job: Celery's consumer restarted and dropped the messages it
        had received (their jobs are delivered again)."""
        with self._cond:
            self._interactive.clear()
            self._cond.notify_all()

    def busy(self) -> bool:
        with self._cond:
            return bool(self._interactive)

    def bulk_intake_wait(self) -> float:
        """Seconds the broker channel should leave the bulk queues out of its fetches (0: take
        bulk messages now): while interactive jobs are in or one left less than
        ``LINGER_SHARE * yield_s`` ago, until ``yield_s`` after the last time bulk messages
        were let through."""
        with self._cond:
            now = self._clock()
            if not self._interactive and now - self._left_at >= LINGER_SHARE * self.yield_s:
                return 0.0
            wait = self._bulk_taken_at + self.yield_s - now
            if wait > 0:
                return wait
            self._bulk_taken_at = now
            return 0.0

    def wait_clear(self) -> float:
        """Called on a bulk job's thread: return once no interactive job is in the process, or
        after ``yield_s``. Returns the seconds it waited."""
        with self._cond:
            if not self._interactive:
                return 0.0
            started = self._clock()
            self._cond.wait_for(lambda: not self._interactive, timeout=self.yield_s)
            return self._clock() - started
