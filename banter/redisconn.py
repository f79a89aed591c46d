"""Redis connections: one helper so every client decodes replies to ``str``."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

import redis

from banter.errors import Unavailable

# Blocking reads (XREAD BLOCK for SSE and synchronous waits) block at most 15 s, under this.
SOCKET_TIMEOUT_S = 30
# Every SSE stream and synchronous wait holds a connection while it blocks: a producer process
# needs one per thread, far above redis-py's default of 100.
MAX_CONNECTIONS = 2048


def connect(url: str) -> redis.Redis:
    """A pooled, thread-safe client for ``url`` (``redis://``, ``rediss://`` for TLS,
    password in the URL)."""
    return redis.Redis.from_url(url, decode_responses=True, health_check_interval=30,
                                socket_connect_timeout=5, socket_timeout=SOCKET_TIMEOUT_S,
                                max_connections=MAX_CONNECTIONS)


def is_outage(exc: BaseException) -> bool:
    """Whether ``exc`` is Redis out of service for now rather than a bad command: gone or hung
    (a connection error, a timeout, still loading), a replica after a failover (READONLY), out
    of memory under ``noeviction`` (OOM), writes stopped by a failed save (MISCONF), a primary
    down. A writer holds what it has and tries again; it never drops it."""
    return isinstance(exc, (redis.ConnectionError, redis.TimeoutError,
                            redis.exceptions.ReadOnlyError, redis.exceptions.OutOfMemoryError,
                            redis.exceptions.MasterDownError, redis.exceptions.TryAgainError)) or (
        isinstance(exc, redis.ResponseError) and str(exc).startswith("MISCONF"))


def shown_url(url: str) -> str:
    """``url`` without its password (``redis://user:***@host``), to print or log."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def ping(client: redis.Redis) -> None:
    """Raise Unavailable with the cause when Redis does not answer."""
    try:
        client.ping()
    except redis.RedisError as exc:
        raise Unavailable(f"Redis is not reachable: {exc}") from exc
