"""The producer: a thin Flask app factory. It validates, records, enqueues and waits; it never
imports onnxruntime or runs a model."""

from __future__ import annotations

import re
import time
import uuid
from typing import Any

import orjson
import redis
from celery import Celery
from flask import Flask, g, request
from flask.json.provider import JSONProvider
from werkzeug.exceptions import NotFound

from banter import logs
from banter.broker import make_celery
from banter.errors import Unavailable
from banter.redisconn import connect
from banter.settings import Settings
from producer import (
    batches,
    errors,
    health,
    inference,
    jobs,
    metrics,
    models,
    openai_api,
    openapi,
    ratelimit,
    tokens,
)
from producer.auth import LiveKeys
from producer.context import Context
from producer.service import JobService
from producer.waits import WaitSlots
from registry.service import Registry

_TRACE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class FastJSON(JSONProvider):
    """Responses through orjson: insertion-ordered keys, shortest float repr as the standard
    library writes them, several times faster on large embedding lists."""

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        return orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS).decode()

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        return orjson.loads(s)


def create_app(settings: Settings, client: redis.Redis | None = None,
               celery: Celery | None = None) -> Flask:
    """The producer's WSGI app. Raises AuthNotConfigured (``producer.auth``) before touching
    Redis when no API key is configured and BANTER_AUTH_DISABLED is not true."""
    logs.setup(settings.log_level)  # first: reading the keys may already log
    keyring = LiveKeys(settings)
    client = client or connect(settings.redis_url)
    registry = Registry.from_settings(settings, client)
    celery = celery or make_celery(settings, "banterhearts-producer")
    app = Flask("banterhearts")
    app.url_map.merge_slashes = False  # "/v1//jobs" is a JSON 404, not a redirect to elsewhere
    # one byte over the limit: a chunked body (no Content-Length) is cut there when read, so
    # validation.json_body sees it is too long (413) instead of parsing a truncated body
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes + 1
    app.json = FastJSON(app)
    app.extensions["banter"] = Context(settings, client,
                                       JobService(settings, client, celery, registry),
                                       registry, keyring, WaitSlots(settings.max_waits_per_key))
    errors.register(app)
    for module in (jobs, inference, models, openai_api, tokens, batches, health, openapi,
                   metrics):
        app.register_blueprint(module.blueprint)

    @app.before_request
    def start_trace():
        g.started = time.perf_counter()
        sent = request.headers.get("X-Trace-ID", "")
        g.trace_id = sent if _TRACE_ID.fullmatch(sent) else uuid.uuid4().hex

    @app.before_request
    def refuse_leading_slashes():
        """werkzeug routes "//v1/jobs" as "/v1/jobs"; like "/v1//jobs" it names no route."""
        if request.environ.get("PATH_INFO", "").startswith("//"):
            raise NotFound()

    @app.before_request
    def bind_trace_to_logs():
        """Every log line of this request carries its trace id (banter.logs context)."""
        g.log_context = logs.bind(trace_id=g.trace_id)

    @app.before_request
    def rate_limit():
        """Count every /v1/ request against its key's per-minute budget (when one is set)."""
        # an OPTIONS request (a CORS preflight) carries no key and needs none
        if (settings.rate_limit_per_min and request.path.startswith("/v1/")
                and request.method != "OPTIONS"):
            ratelimit.check(client, keyring.owner(request), settings.rate_limit_per_min)

    @app.after_request
    def trace_headers(response):
        response.headers["X-Trace-ID"] = g.get("trace_id", "")
        if request.path.startswith(("/v1/inference", "/v1/embeddings", "/v1/completions",
                                    "/v1/chat/completions")):
            elapsed = (time.perf_counter() - g.get("started", time.perf_counter())) * 1000
            response.headers["X-Latency-MS"] = f"{elapsed:.2f}"
        return response

    @app.after_request
    def bare_options(response):
        """An OPTIONS request is answered by Flask with its ``Allow`` header and an empty HTML
        200: make it the plain 204 it is (no route runs, so no key is needed, as for CORS)."""
        if request.method == "OPTIONS" and response.status_code == 200 and not response.data:
            response.status_code = 204
            del response.headers["Content-Type"]
        return response

    @app.after_request
    def access_log(response):
        elapsed = (time.perf_counter() - g.get("started", time.perf_counter())) * 1000
        logs.access(request.method, request.path, response.status_code, elapsed,
                    g.get("trace_id", ""))
        return response

    app.after_request(app.extensions["banter"].release_wait)

    @app.teardown_request
    def unbind_trace(_exc):
        token = g.pop("log_context", None)
        if token is not None:
            logs.unbind(token)

    try:
        registry.ensure_mirror()
    except Unavailable:
        pass  # Redis not up yet: readyz says so, the first registry read retries
    return app
