"""The one exception tree of banterhearts.

Every error a client can cause or observe is a ``BanterError`` subclass with a stable ``type``
string (what clients see in ``{"error": {"type", "message", "param", "code"}}`` and in a job's
``error``) and an HTTP status. The producer maps them to responses in exactly one place
(``producer.errors``); workers store ``{type, message}`` in the job record. Messages say what
was wrong and how to fix it. ``param`` names the request field at fault where there is one;
``code`` is OpenAI's code for the same error where OpenAI has one (``context_length_exceeded``,
``model_not_found``, ``rate_limit_exceeded``, ``invalid_api_key``), so OpenAI clients that key on
it work unchanged.
"""

from __future__ import annotations


def brief(value: object, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters: what a message quotes of a client's value
    (a megabyte sent back in an error helps nobody)."""
    shown = repr(value)
    return shown if len(shown) <= limit else shown[:limit - 3] + "..."


class BanterError(Exception):
    """Root of every banterhearts error."""

    type = "internal_error"
    status = 500
    code: str | None = None  # OpenAI's error code for it, where OpenAI has one

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param  # the request field at fault, where there is one

    def to_dict(self) -> dict[str, str]:
        """``{type, message}``, and ``param`` where there is one: what a job record and a
        stream's ``error`` event keep, so a job's error names the request field at fault as
        an HTTP answer does (a worker's ``logit_bias`` check)."""
        if self.param is None:
            return {"type": self.type, "message": self.message}
        return {"type": self.type, "message": self.message, "param": self.param}

    def body(self) -> dict[str, str | None]:
        """The ``error`` object of an HTTP answer: ``to_dict`` plus ``param`` and ``code``
        (null where there is none), the fields OpenAI's errors have."""
        return {**self.to_dict(), "param": self.param, "code": self.code}


class InvalidRequest(BanterError):
    """The request is malformed or a value is out of range (422)."""

    type = "invalid_request"
    status = 422


class BadJSON(InvalidRequest):
    type = "bad_json"
    status = 400


class BadFraming(InvalidRequest):
    """The request body's HTTP framing is broken (a malformed chunk), so it cannot be read."""

    type = "bad_request"
    status = 400


class UnsupportedMediaType(InvalidRequest):
    type = "unsupported_media_type"
    status = 415


class TooLarge(InvalidRequest):
    type = "too_large"
    status = 413


class Unauthorized(BanterError):
    type = "unauthorized"
    status = 401
    code = "invalid_api_key"


class Forbidden(BanterError):
    type = "forbidden"
    status = 403


class NotFound(BanterError):
    type = "not_found"
    status = 404


class JobNotFound(NotFound):
    type = "job_not_found"


class ModelNotFound(NotFound):
    type = "model_not_found"
    code = "model_not_found"

    def __init__(self, message: str, param: str | None = "model") -> None:
        super().__init__(message, param)


class Conflict(BanterError):
    type = "conflict"
    status = 409


class IdempotencyKeyReused(Conflict):
    """An idempotency key came back with a different request than its first one."""

    type = "idempotency_key_reused"


class JobCancelled(Conflict):
    """A synchronous call's job was cancelled (``DELETE /v1/jobs/{id}``) before it had an
    answer to give (409)."""

    type = "job_cancelled"


class JobExpired(BanterError):
    """A synchronous call's job passed its deadline before it had an answer to give (504)."""

    type = "job_expired"
    status = 504


class FeatureDisabled(NotFound):
    type = "feature_disabled"


class Throttled(BanterError):
    """Refused for now (429); ``retry_after_s`` is the Retry-After header."""

    status = 429
    retry_after_s = 1

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class QueueFull(Throttled):
    type = "queue_full"


class RateLimited(Throttled):
    """The API key sent more requests this minute than BANTER_RATE_LIMIT_PER_MIN."""

    type = "rate_limited"
    code = "rate_limit_exceeded"


class TooManyWaits(Throttled):
    """The API key holds BANTER_MAX_WAITS_PER_KEY event streams or synchronous calls already."""

    type = "too_many_waits"
    code = "rate_limit_exceeded"


class Unavailable(BanterError):
    """No broker, no Redis or no live worker (503)."""

    type = "unavailable"
    status = 503


class ClientGone(BanterError):
    """The client closed its connection while its synchronous call waited on the job, which
    was cancelled (499, nginx's "client closed request": the answer reaches no one)."""

    type = "client_closed_request"
    status = 499


class WaitInterrupted(Unavailable):
    """Redis went away for longer than a synchronous call rides out, after its job was made;
    the job goes on (503 with ``X-Should-Retry: false``, as a Timeout's 504)."""

    type = "wait_interrupted"


class RequestTimeout(BanterError):
    """The client stopped sending its request body for BANTER_CLIENT_TIMEOUT_S (408)."""

    type = "request_timeout"
    status = 408


class RegistryUnavailable(Unavailable):
    """``history.jsonl`` cannot be read or written (permissions, a full disk), or holds a line
    that is not the next record, so it cannot be used until an admin restores it (503)."""

    type = "registry_unavailable"


class Timeout(BanterError):
    """A synchronous call waited longer than its limit; the job keeps running (504)."""

    type = "timeout"
    status = 504


class ArtifactError(InvalidRequest):
    """A model artifact is missing, outside the model root, or not the graph its kind needs."""

    type = "invalid_artifact"

    def __init__(self, message: str, param: str | None = "path") -> None:
        super().__init__(message, param)


class ChecksumMismatch(BanterError):
    """A worker found an artifact whose sha256 differs from the registry record (503: the
    model cannot be served until an admin promotes it again or restores the file)."""

    type = "checksum_mismatch"
    status = 503


class ModelLoadError(BanterError):
    """A worker cannot load a model's artifact or tokenizer (503, as above)."""

    type = "model_load_error"
    status = 503


class PromptTooLong(InvalidRequest):
    type = "prompt_too_long"
    code = "context_length_exceeded"


class InferenceError(BanterError):
    """The model run itself failed (ORT raised, bad output shape)."""

    type = "inference_error"
    status = 500


class WireError(BanterError):
    """A message read from Redis or Celery does not decode (a bug or a foreign writer)."""

    type = "wire_error"
    status = 500



def _error_class(type_name: str) -> type[BanterError] | None:
    pending = [BanterError]
    while pending:
        cls = pending.pop()
        if cls.type == type_name:
            return cls
        pending.extend(cls.__subclasses__())
    return None


def status_for(type_name: str) -> int:
    """HTTP status of an error ``type`` string (as stored in a job record)."""
    cls = _error_class(type_name)
    return cls.status if cls else BanterError.status


def openai_status(status: int) -> int:
    """The status an OpenAI-compatible endpoint answers for ``status``: a request OpenAI
    would call bad is 400 there (the ``openai`` client's ``BadRequestError``), not 422."""
    return 400 if status == InvalidRequest.status else status


def from_dict(error: dict[str, str], status: int | None = None) -> BanterError:
    """Rebuild a typed error from ``{type, message, param?}`` (a job record, an HTTP error
    body). ``status``: the HTTP status it came with, kept for a type this code does not know
    (a newer server's), which would otherwise be a 500."""
    type_name = error.get("type", BanterError.type)
    known = _error_class(type_name)
    cls = known or BanterError
    exc = cls.__new__(cls)
    BanterError.__init__(exc, error.get("message", "request failed"), error.get("param"))
    exc.type = type_name
    exc.status = cls.status if known or status is None else status
    return exc


class BackendUnavailable(Unavailable):
    """No backend this worker has can serve the job (no ONNX engine, no OpenAI key)."""

    type = "backend_unavailable"


class UpstreamError(BanterError):
    """The OpenAI-compatible upstream failed (5xx or 429 past the retry budget, unreachable,
    a refused request)."""

    type = "upstream_error"
    status = 502


class UpstreamAuthError(UpstreamError):
    """The upstream refused the configured key (401) or its permissions (403)."""

    type = "upstream_auth"


class UpstreamTimeout(UpstreamError):
    type = "upstream_timeout"
    status = 504


class UpstreamModelNotFound(ModelNotFound):
    """The upstream does not serve the model name it was asked for (404)."""

    type = "upstream_model_not_found"
