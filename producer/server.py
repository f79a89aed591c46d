"""``banter producer``: the Flask app under gunicorn.

Worker class ``gthread``: every synchronous inference call and every SSE stream holds one
thread while it waits on Redis, so threads (not processes) are the unit of concurrency.
``workers x threads`` is the number of concurrent waiting requests one producer can hold.
"""

from __future__ import annotations

from gunicorn.app.base import BaseApplication

from banter.settings import Settings
from producer.auth import KeyRing


class _Gunicorn(BaseApplication):
    def __init__(self, settings: Settings, options: dict) -> None:
        self.settings = settings
        self.options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self):
        from producer.app import create_app

        return create_app(self.settings)


def serve(settings: Settings, host: str, port: int, workers: int = 2, threads: int = 64) -> None:
    """Run the producer until stopped. Its key settings are checked first, here, so a producer
    without API keys (``producer.auth``) exits with the reason instead of failing its workers."""
    KeyRing.from_settings(settings)
    _Gunicorn(settings, {
        "bind": f"{host}:{port}", "worker_class": "gthread", "workers": workers,
        "threads": threads, "timeout": 0, "graceful_timeout": 10, "keepalive": 5,
        "accesslog": None, "errorlog": "-", "loglevel": settings.log_level.lower(),
    }).run()
