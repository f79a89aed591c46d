"""Structured JSON logs: one object per line on stderr, ``event`` plus fields.

Every component (producer, workers, CLI) calls ``setup``. Records carry the fields of the
current *log context* (``bind`` / ``context``): the producer binds the request's ``trace_id``
for the length of a request, a worker binds the job's ``trace_id`` and ``job_id`` for the length
of a Celery task (``task_prerun`` / ``task_postrun``, connected by ``setup``; the trace id
travels in the task message's ``trace_id`` header, the job id is the task id). Fields passed
explicitly (``event(..., trace_id=...)`` or ``extra=``) win over the context.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import threading
from contextlib import contextmanager
from typing import Any, Iterator

_RESERVED = set(vars(logging.makeLogRecord({})))
_CONTEXT: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("banter_log_context",
                                                                          default={})


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"ts": round(record.created, 3), "level": record.levelname.lower(),
                               "logger": record.name, "event": record.getMessage()}
        out.update({k: v for k, v in vars(record).items() if k not in _RESERVED})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class ContextFilter(logging.Filter):
    """Copy the current log context's fields onto each record that does not set them."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in _CONTEXT.get().items():
            if value is not None and not hasattr(record, name):
                setattr(record, name, value)
        return True


def current() -> dict[str, Any]:
    """The fields bound in this thread / task right now."""
    return dict(_CONTEXT.get())


def bind(**fields: Any) -> contextvars.Token:
    """Add ``fields`` to the log context; pass the token to ``unbind`` to restore it."""
    return _CONTEXT.set({**_CONTEXT.get(), **fields})


def unbind(token: contextvars.Token) -> None:
    try:
        _CONTEXT.reset(token)
    except ValueError:  # set in another context (thread): just clear this one
        _CONTEXT.set({})


@contextmanager
def context(**fields: Any) -> Iterator[None]:
    """``with logs.context(trace_id=..., job_id=...):`` every record inside carries them."""
    token = bind(**fields)
    try:
        yield
    finally:
        unbind(token)


def setup(level: str = "INFO") -> None:
    """Send every logger's records to stderr as JSON lines, with the log context (idempotent)."""
    _connect_celery_tasks()
    root = logging.getLogger()
    if any(isinstance(h.formatter, JSONFormatter) for h in root.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter())
    handler.addFilter(ContextFilter())
    root.handlers = [handler]
    root.setLevel(level.upper())


def event(logger: logging.Logger, name: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log ``name`` with ``fields`` as top-level JSON keys."""
    logger.log(level, name, extra=fields)


# -- Celery: a task's lines carry its job ------------------------------------------------------

_TASK = threading.local()  # the log-context tokens of the tasks running in this thread


def _task_started(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    request = getattr(task, "request", None)
    trace_id = getattr(request, "trace_id", None) or (getattr(request, "headers", None)
                                                      or {}).get("trace_id")
    if not hasattr(_TASK, "tokens"):
        _TASK.tokens = []
    _TASK.tokens.append(bind(job_id=task_id, trace_id=trace_id))


def _task_ended(**_: Any) -> None:
    tokens = getattr(_TASK, "tokens", None)
    if tokens:
        unbind(tokens.pop())


def _connect_celery_tasks() -> None:
    """Bind ``job_id`` (the task id) and ``trace_id`` (the message header) around each Celery
    task this process runs. Signals fire in the thread that runs the task; a no-op where no
    task runs (the producer)."""
    from celery import signals

    signals.task_prerun.connect(_task_started, weak=False, dispatch_uid="banter-log-context")
    signals.task_postrun.connect(_task_ended, weak=False, dispatch_uid="banter-log-context")


# -- the producer's access log ------------------------------------------------------------------

_ACCESS = logging.getLogger("banter.access")
PROBES = ("/healthz", "/readyz", "/metrics")  # logged at DEBUG: scrapers call them constantly


def access(method: str, path: str, status: int, latency_ms: float, trace_id: str) -> None:
    """One ``http_request`` line per request. Never pass headers, query strings or bodies:
    they hold keys and prompts. ``latency_ms`` of a streamed response is time to headers."""
    event(_ACCESS, "http_request", logging.DEBUG if path in PROBES else logging.INFO,
          method=method, path=path, status=status, latency_ms=round(latency_ms, 2),
          trace_id=trace_id)
