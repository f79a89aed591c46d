"""The producer: a thin Flask app factory. It validates, records, enqueues and waits; it never
imports onnxruntime or runs a model."""

from __future__ import annotations

import re
import time
import uuid

import redis
from celery import Celery
from flask import Flask, g, request

from banter import logs
from banter.broker import make_celery
from banter.redisconn import connect
from banter.settings import Settings
from producer import batches, errors, health, inference, jobs, models, openai_api
from producer.auth import KeyRing
from producer.context import Context
from producer.service import JobService
from registry.service import Registry

_TRACE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def create_app(settings: Settings, client: redis.Redis | None = None,
               celery: Celery | None = None) -> Flask:
    logs.setup(settings.log_level)
    client = client or connect(settings.redis_url)
    registry = Registry.from_settings(settings, client)
    celery = celery or make_celery(settings, "banterhearts-producer")
    app = Flask("banterhearts")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    app.json.sort_keys = False
    app.extensions["banter"] = Context(settings, client,
                                       JobService(settings, client, celery, registry),
                                       registry, KeyRing(settings))
    errors.register(app)
    for module in (jobs, inference, models, openai_api, batches, health):
        app.register_blueprint(module.blueprint)

    @app.before_request
    def start_trace():
        g.started = time.perf_counter()
        sent = request.headers.get("X-Trace-ID", "")
        g.trace_id = sent if _TRACE_ID.match(sent) else uuid.uuid4().hex

    @app.after_request
    def trace_headers(response):
        response.headers["X-Trace-ID"] = g.get("trace_id", "")
        if request.path.startswith(("/v1/inference", "/v1/embeddings", "/v1/completions",
                                    "/v1/chat/completions")):
            elapsed = (time.perf_counter() - g.get("started", time.perf_counter())) * 1000
            response.headers["X-Latency-MS"] = f"{elapsed:.2f}"
        return response

    try:
        registry.ensure_mirror()
    except redis.RedisError:
        pass  # Redis not up yet: readyz says so, the first registry read retries
    return app
