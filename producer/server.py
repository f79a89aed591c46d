"""``banter producer``: the Flask app under gunicorn.

Worker class ``gthread`` (``TimedThreadWorker``: with a client timeout): every synchronous
inference call and every SSE stream holds one thread while it waits on Redis, so threads (not
processes) are the unit of concurrency. ``workers x threads`` is the number of concurrent
waiting requests one producer can hold.
"""

from __future__ import annotations

import logging

from gunicorn.app.base import BaseApplication
from gunicorn.workers.gthread import ThreadWorker

from banter.netaddr import host_port
from banter.settings import Settings
from producer.auth import KeyRing

NEWER_SETTINGS = {"control_socket_disable"}  # set only where the installed gunicorn has them


class TimedThreadWorker(ThreadWorker):
    """gthread whose request sockets time out: every read of a request's headers and body and
    every write of a response waits at most ``client_timeout_s`` (``serve`` sets it from
    BANTER_CLIENT_TIMEOUT_S), so a client that stops sending mid-request, or stops reading a
    stream, frees its thread instead of holding it for good (gunicorn bounds only the wait for
    a connection's first bytes). It is per read, as nginx's ``client_header_timeout`` and
    ``client_body_timeout`` are: a client trickling a byte at a time is a buffering proxy's to
    stop. Waiting on Redis for a result touches no socket: unaffected."""

    client_timeout_s = 30.0

    def handle(self, conn):
        # gunicorn makes the socket blocking (no timeout) and then calls ``conn.init`` before
        # it parses the headers: the timeout goes on right after, once per connection
        if not getattr(conn, "timed", False):
            conn.timed, init = True, conn.init

            def timed_init() -> None:
                init()
                conn.sock.settimeout(self.client_timeout_s)

            conn.init = timed_init
        return super().handle(conn)

    def handle_request(self, req, conn):
        conn.sock.settimeout(self.client_timeout_s)  # older gunicorns call init before handle
        return super().handle_request(req, conn)


class ClientTimeoutFilter(logging.Filter):
    """gunicorn logs a client cut off by the socket timeout as an ERROR with a traceback; it
    is a slow client, not a server fault: one warning line, ``client_timeout``."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], TimeoutError):
            record.msg, record.args, record.exc_info, record.exc_text = "client_timeout", (), None, None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


class _Gunicorn(BaseApplication):
    def __init__(self, settings: Settings, options: dict) -> None:
        self.settings = settings
        self.options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            if key in NEWER_SETTINGS and key not in self.cfg.settings:
                continue  # an older gunicorn without that feature
            self.cfg.set(key, value)

    def load(self):
        from producer.app import create_app

        return create_app(self.settings)


def serve(settings: Settings, host: str, port: int, workers: int = 2, threads: int = 64) -> None:
    """Run the producer until stopped. Its key settings are checked first, here, so a producer
    without API keys (``producer.auth``) exits with the reason instead of failing its workers."""
    KeyRing.from_settings(settings)
    worker_class = type("TimedThreadWorker", (TimedThreadWorker,),
                        {"client_timeout_s": settings.client_timeout_s})
    _Gunicorn(settings, {
        "bind": host_port(host, port), "worker_class": worker_class, "workers": workers,
        "threads": threads, "timeout": 0, "graceful_timeout": 10, "keepalive": 5,
        "accesslog": None, "errorlog": "-", "loglevel": settings.log_level.lower(),
        "logconfig_dict": json_logging(settings.log_level),
        # gunicorn 25.1+ listens on one control socket per user ($HOME/.gunicorn/gunicorn.ctl):
        # a second producer on the host would take the first one's over
        "control_socket_disable": True,
    }).run()


def json_logging(level: str) -> dict:
    """gunicorn's own log lines (start-up, worker boots, refused requests) as the JSON lines
    every other part of banterhearts writes (``banter.logs.JSONFormatter``)."""
    return {"version": 1, "disable_existing_loggers": False,
            "formatters": {"json": {"()": "banter.logs.JSONFormatter"}},
            "filters": {"client_timeout": {"()": "producer.server.ClientTimeoutFilter"}},
            "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "json",
                                    "filters": ["client_timeout"],
                                    "stream": "ext://sys.stderr"}},
            "loggers": {"gunicorn.error": {"handlers": ["stderr"], "level": level.upper(),
                                           "propagate": False}},
            "root": {"handlers": [], "level": level.upper()}}  # banter.logs.setup adds its own
