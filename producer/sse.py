"""Server-sent events from a job's Redis stream: replay from the start (or after
``Last-Event-ID``), then live, ending after the final ``done`` or ``error`` event."""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from typing import Callable, Iterator

import redis
from flask import Response, request, stream_with_context

from banter import errors
from banter.errors import JobNotFound
from banter.streams import EventType, ended_by, entry_key, read_events, read_start
from producer.service import RedisOutage

KEEPALIVE_S = 15
FIRST_EVENT_WAIT_S = 1.0  # how long a just-submitted job's stream waits for an early error

log = logging.getLogger("banter.producer")

Formatter = Callable[[str, EventType, dict], str]


def sse_event(entry_id: str, kind: EventType, data: dict) -> str:
    return f"id: {entry_id}\nevent: {kind.value}\ndata: {json.dumps(data)}\n\n"


def resume_point() -> str:
    """``Last-Event-ID`` (header or ``last_event_id`` query) when it is a stream id Redis
    accepts, else the start (a full replay)."""
    sent = request.headers.get("Last-Event-ID") or request.args.get("last_event_id") or ""
    return sent if entry_key(sent) is not None else "0-0"


def events(client: redis.Redis, job_id: str, after: str, fmt: Formatter = sse_event,
           on_idle: Callable[[], object] | None = None, interrupted: str = "",
           gone: str = "") -> Iterator[str]:
    """The job's events after ``after``, live until its final one. A reader already past the
    final event (a resume with its id, or a later one) gets no more: the stream ends.
    It opens with a comment, so the headers (``X-Job-ID``) go out before the job has made
    anything. ``on_idle`` runs whenever nothing came for a keep-alive period (a queued job's
    deadline is checked there; it raises JobNotFound for a job gone from Redis: its record
    past BANTER_JOB_TTL_S, or lost with a Redis that came back empty); a job gone ends the
    stream with ``gone``, and a reconnect gets 404. Redis out of reach for REDIS_RETRY_S ends
    the stream with ``interrupted``. Both are nothing by default: an event stream just ends,
    and the client resumes with ``Last-Event-ID`` (the job goes on)."""
    yield ": stream open\n\n"
    outage, cursor = RedisOutage(), None
    while True:
        tried_at = time.monotonic()
        try:
            cursor = cursor or read_start(client, job_id, after)
            batch = read_events(client, job_id, cursor, block_ms=KEEPALIVE_S * 1000)
            ended = not batch and ended_by(client, job_id, after)
            if not batch and not ended and on_idle is not None:
                on_idle()
            outage.ended()
        except JobNotFound:
            log.warning("stream_job_gone", extra={"job_id": job_id})
            if gone:
                yield gone
            return
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            if outage.failed(tried_at):
                log.warning("stream_interrupted", extra={"job_id": job_id, "error": str(exc)})
                if interrupted:
                    yield interrupted
                return
            time.sleep(0.5)
            continue
        if not batch:
            if ended:
                return
            yield ": keep-alive\n\n"
            continue
        for entry_id, kind, data in batch:
            cursor = entry_id
            if entry_key(entry_id) > entry_key(after):  # not so for a resume past the end
                after = entry_id
                yield fmt(entry_id, kind, data)
            if kind is not EventType.TOKEN:
                return


def early_error(client: redis.Redis, job_id: str) -> errors.BanterError | None:
    """The job's error when it is the first event of its stream within FIRST_EVENT_WAIT_S (a
    prompt too long for the model, a model that does not load): a streamed call is then
    answered with the error's status, as it is unstreamed, instead of a 200 stream holding only
    the error. None when a token or ``done`` came first, nothing came in time (the stream goes
    out, and an error later ends it as an event), or Redis did not answer (the stream rides
    that out)."""
    try:
        batch = read_events(client, job_id, "0-0", block_ms=int(FIRST_EVENT_WAIT_S * 1000))
    except redis.RedisError:
        return None
    if batch and batch[0][1] is EventType.ERROR:
        return errors.from_dict(batch[0][2]["error"])
    return None


class Final(str):
    """An item after which a ``merged`` stream ends at once (a choice that failed fails the
    answer): the other streams are not waited for."""


def merged(streams: list[Iterator[str]], end: Callable[[], str]) -> Iterator[str]:
    """Several streams as one, each item as soon as its stream yields it (a thread per
    stream, reading its job's events), then ``end()`` once all have ended or one yielded a
    ``Final`` item. Of their comments (the opening one, keep-alives) one a keep-alive period
    passes on, not one per stream. Once it ends or is closed (the client left), each thread
    stops at its stream's next item (a keep-alive period at most) and closes the stream: the
    jobs go on or not as the caller decides, but nobody reads them here."""
    items: queue.Queue = queue.Queue()
    stop = threading.Event()

    def pump(stream: Iterator[str]) -> None:
        try:
            for item in stream:
                if stop.is_set():
                    break
                items.put(item)
        except BaseException as exc:  # re-raised in the response's thread
            items.put(exc)
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()
            items.put(None)

    for stream in streams:
        threading.Thread(target=pump, args=(stream,), name="sse-merged", daemon=True).start()
    try:
        running, quiet_since = len(streams), 0.0
        while running:
            item = items.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            elif not item.startswith(":"):
                yield item
                if isinstance(item, Final):
                    break
            elif time.monotonic() - quiet_since >= KEEPALIVE_S or not quiet_since:
                quiet_since = time.monotonic()
                yield item
    finally:
        stop.set()
    yield end()


def cancel_on_disconnect(stream: Iterator[str], cancel: Callable[[], object]) -> Iterator[str]:
    """Pass ``stream`` through; when the client goes away before its end (the server closes
    this generator), call ``cancel``. A stream that ends on its own or fails does not."""
    try:
        yield from stream
    except GeneratorExit:
        cancel()
        raise


def response(stream: Iterator[str], headers: dict[str, str] | None = None) -> Response:
    out = Response(stream_with_context(stream), mimetype="text/event-stream")
    out.headers.update({"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})})
    return out
