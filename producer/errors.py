"""The one place exceptions become HTTP responses: ``{"error": {"type", "message", "param",
"code"}}`` (``BanterError.body``). On the OpenAI-compatible endpoints (the ``openai``
blueprint) a request error is 400, as OpenAI answers, instead of 422 (``openai_status``)."""

from __future__ import annotations

import logging

import redis
from flask import Flask, Response, jsonify, request
from kombu.exceptions import OperationalError
from werkzeug.exceptions import HTTPException

from banter.errors import (
    BanterError,
    RequestTimeout,
    Throttled,
    Timeout,
    Unauthorized,
    Unavailable,
    WaitInterrupted,
    WireError,
    openai_status,
)

log = logging.getLogger("banter.producer")


def error_response(exc: BanterError) -> tuple[Response, int]:
    response = jsonify({"error": exc.body()})
    if isinstance(exc, Throttled):
        response.headers["Retry-After"] = str(exc.retry_after_s)
    if isinstance(exc, Unauthorized):
        response.headers["WWW-Authenticate"] = "Bearer"
    if isinstance(exc, (Timeout, WaitInterrupted)):  # the job runs on: a retry would run it
        response.headers["X-Should-Retry"] = "false"  # twice (OpenAI's SDKs retry a 504 or a
        # 503 unless told not to)
    return response, openai_status(exc.status) if request.blueprint == "openai" else exc.status


def register(app: Flask) -> None:
    @app.errorhandler(BanterError)
    def banter_error(exc: BanterError):
        if isinstance(exc, RequestTimeout):  # as gunicorn's for unfinished headers
            log.warning("client_timeout", extra={"stage": "body", "path": request.path})
        if isinstance(exc, WireError):  # its message names server files: the log gets it
            log.error("wire_error", extra={"error": exc.message})
            return error_response(WireError("the server holds data it cannot read (a registry "
                                            "or job record); the producer log says which"))
        return error_response(exc)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        name = (exc.name or "error").lower().replace(" ", "_")
        response = jsonify({"error": {"type": name, "message": exc.description or exc.name,
                                      "param": None, "code": None}})
        for header, value in exc.get_headers():  # 405's Allow, for one
            if header.lower() != "content-type":
                response.headers[header] = value
        return response, exc.code or 500

    @app.errorhandler(redis.RedisError)
    @app.errorhandler(OperationalError)
    def broker_error(exc: Exception):
        log.warning("backend_unavailable", extra={"error": str(exc)})
        return error_response(Unavailable(f"Redis or the broker is not reachable: {exc}"))

    @app.errorhandler(Exception)
    def unexpected(exc: Exception):
        log.exception("unhandled_error")
        return jsonify({"error": BanterError("internal error; see the producer log").body()}), 500
