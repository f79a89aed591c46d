"""``GET /openapi.json``: the OpenAPI 3.1 description of every endpoint.

The limits in it (prompt length, ``max_tokens``, batch size, request size) are this producer's
settings, so the description a client reads is the one the producer enforces. Error responses
share one schema, ``{"error": {"type", "message"}}``. The description is served without
authentication: it holds no data.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify

from banter.bulk import MAX_CUSTOM_ID_CHARS, URLS
from banter.params import (
    MAX_BIASED_TOKENS,
    MAX_LOGIT_BIAS,
    MAX_LOGPROBS,
    MAX_PENALTY,
    MAX_SEED,
    MAX_STOP_CHARS,
    MAX_STOPS,
    MAX_TEMPERATURE,
    MIN_SEED,
)
from banter.settings import Settings
from producer.batches import MAX_BATCH_REQUESTS, MAX_IDEMPOTENCY_KEY_CHARS
from producer.context import ctx
from producer.openai_api import MAX_CHOICES

blueprint = Blueprint("openapi", __name__)

Schema = dict[str, Any]

MODEL_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
NOT_BLANK = r"\S"  # at least one character that is not whitespace
ERROR_STATUSES = {
    400: "the body is not valid JSON; on the OpenAI-compatible endpoints, any invalid request",
    401: "no API key, or an unknown one",
    403: "the key is not an admin key",
    404: "unknown job, batch, model or route",
    408: "the body stopped arriving for BANTER_CLIENT_TIMEOUT_S before it was complete",
    409: "conflict with the current state",
    413: "the body, a list or a batch is over its limit",
    415: "the body is not application/json",
    422: "a field is missing, of the wrong type or out of range",
    429: "the lane's queue is full, the key's rate limit is spent, or it holds its "
         "BANTER_MAX_WAITS_PER_KEY open streams and synchronous calls; retry after Retry-After s",
    502: "the OpenAI-compatible upstream failed or refused the request (openai backend)",
    503: "Redis, the broker or every worker is unavailable",
    504: "a synchronous call waited longer than BANTER_SYNC_TIMEOUT_S (the job goes on)",
}


@blueprint.get("/openapi.json")
def openapi_json():
    return jsonify(spec(ctx().settings))


def spec(settings: Settings) -> Schema:
    """The OpenAPI document of a producer running with ``settings``."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "banterhearts",
            "version": "1",
            "description": (
                "Batched ONNX Runtime inference on Celery and Redis. Request bodies are JSON "
                f"(Content-Type: application/json) of at most {settings.max_request_bytes} "
                "bytes; every response carries X-Trace-ID; every error is "
                "{\"error\": {\"type\", \"message\", \"param\", \"code\"}}."),
        },
        "security": [{"bearer": []}],
        "paths": _paths(),
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "parameters": {
                "TraceID": {"name": "X-Trace-ID", "in": "header", "required": False,
                            "description": "echoed back when it matches [A-Za-z0-9._:-]{1,128}; "
                                           "otherwise a new one is made",
                            "schema": {"type": "string"}},
                "JobID": {"name": "job_id", "in": "path", "required": True,
                          "schema": {"type": "string", "format": "uuid"}},
                "BatchID": {"name": "batch_id", "in": "path", "required": True,
                            "schema": {"type": "string", "pattern": r"^batch_[0-9a-f]{32}$"}},
            },
            "responses": {
                **{str(code): _error_response(text) for code, text in ERROR_STATUSES.items()},
                "429": {**_error_response(ERROR_STATUSES[429]), "headers": {
                    "Retry-After": {"schema": {"type": "integer", "minimum": 1}}}},
            },
            "schemas": _schemas(settings),
        },
    }


# ----------------------------------------------------------------------------- paths
def _op(summary: str, responses: dict[str, Any], errors: tuple[int, ...], *,
        body: str | None = None, parameters: tuple[Schema, ...] = (),
        public: bool = False) -> Schema:
    """One operation: its success ``responses``, then its error statuses: ``errors``, and
    unless it is ``public`` (no key needed) 401 and 429 (the per-key rate limit)."""
    statuses = set(errors) if public else {*errors, 401, 429}
    op: Schema = {
        "summary": summary,
        "parameters": [{"$ref": "#/components/parameters/TraceID"}, *parameters],
        "responses": {**responses, **{str(code): {"$ref": f"#/components/responses/{code}"}
                                      for code in sorted(statuses)}},
    }
    if body:
        op["requestBody"] = {"required": True, "content": {
            "application/json": {"schema": _ref(body)}}}
    if public:
        op["security"] = []
    return op


def _json(description: str, schema: str) -> Schema:
    return {"description": description, "content": {"application/json": {"schema": _ref(schema)}}}


def _json_or_sse(description: str, schema: str, event: str) -> Schema:
    """JSON, or with streaming on, server-sent events each described by ``event``."""
    return {"description": description, "content": {
        "application/json": {"schema": _ref(schema)},
        "text/event-stream": {"schema": _ref(event)}}}


def _paths() -> Schema:
    body_errors = (400, 408, 413, 415, 422)
    submit_errors = (*body_errors, 404, 503)
    sync_errors = (*submit_errors, 502, 504)
    openai_errors = tuple(code for code in sync_errors if code != 422)  # 400 there, as OpenAI
    job = {"$ref": "#/components/parameters/JobID"}
    batch = {"$ref": "#/components/parameters/BatchID"}
    stream_query = {"name": "stream", "in": "query", "required": False,
                    "description": "true: answer with server-sent events",
                    "schema": {"type": "boolean"}}
    resume = {"name": "Last-Event-ID", "in": "header", "required": False,
              "description": "resume after this stream entry id", "schema": {"type": "string"}}
    resume_query = {"name": "last_event_id", "in": "query", "required": False,
                    "description": "Last-Event-ID, for a client that cannot set headers",
                    "schema": {"type": "string"}}
    return {
        "/v1/jobs": {"post": _op(
            "Enqueue one job", {"202": _json("queued", "JobAccepted"),
                                "200": _json("the job made earlier with this idempotency_key",
                                             "JobAccepted")},
            (*submit_errors, 409), body="JobRequest")},
        "/v1/jobs/{job_id}": {
            "get": _op("Poll a job", {"200": _json("the job", "Job")}, (404, 503),
                       parameters=(job,)),
            "delete": _op("Cancel a job", {"200": _json("the job after the request", "Job")},
                          (404, 503), parameters=(job,)),
        },
        "/v1/jobs/{job_id}/events": {"get": _op(
            "A job's events (SSE: token, done, error), replayed then live",
            {"200": {"description": "the events",
                     "content": {"text/event-stream": {"schema": _ref("JobEvent")}}},
             "204": {"description": "resumed at or after the final event: nothing more"}},
            (404, 503), parameters=(job, resume, resume_query))},
        "/v1/inference": {"post": _op(
            "Generate and wait (or stream with ?stream=true)",
            {"200": _json_or_sse("the result", "InferenceResult", "JobEvent")}, sync_errors,
            body="InferenceRequest", parameters=(stream_query,))},
        "/v1/inference/batch": {"post": _op(
            "Generate for several prompts; results in prompt order",
            {"200": _json("one result (or error) per prompt", "InferenceBatchResult")},
            sync_errors, body="InferenceBatchRequest")},
        "/v1/completions": {"post": _op(
            "OpenAI completions",
            {"200": _json_or_sse("the completion", "Completion", "OpenAIEvent")},
            openai_errors, body="CompletionRequest")},
        "/v1/chat/completions": {"post": _op(
            "OpenAI chat completions",
            {"200": _json_or_sse("the chat completion", "ChatCompletion", "OpenAIEvent")},
            openai_errors, body="ChatCompletionRequest")},
        "/v1/embeddings": {"post": _op(
            "OpenAI embeddings", {"200": _json("the embeddings", "EmbeddingList")},
            (*openai_errors, 409), body="EmbeddingRequest")},
        "/v1/tokenize": {"post": _op(
            "A generate model's token ids for a prompt or a chat (as its worker encodes it)",
            {"200": _json("the ids", "Tokenized")}, (*body_errors, 404, 503),
            body="TokenizeRequest")},
        "/v1/detokenize": {"post": _op(
            "The text of a generate model's token ids", {"200": _json("the text", "Detokenized")},
            (*body_errors, 404, 503), body="DetokenizeRequest")},
        "/v1/models": {"get": _op("Active models", {"200": _json("models", "ModelList")},
                                  (503,))},
        "/v1/models/{model_id}": {"get": _op(
            "One active model (OpenAI models.retrieve)", {"200": _json("the model", "Model")},
            (404, 503), parameters=({"name": "model_id", "in": "path", "required": True,
                                     "schema": {"type": "string"}},))},
        "/v1/models/history": {"get": _op(
            "Every registry record (admin)", {"200": _json("records", "RecordList")},
            (403, 503), parameters=({"name": "name", "in": "query", "required": False,
                                     "schema": {"type": "string"}},))},
        "/v1/models/promote": {"post": _op(
            "Make an artifact the active version of a model (admin)",
            {"201": _json("the new record", "Record"),
             "200": _json("that artifact was already active", "Record")},
            (*body_errors, 403, 409, 503), body="PromoteRequest")},
        "/v1/models/rollback": {"post": _op(
            "Restore the previous version of a model (admin)",
            {"200": _json("the record now active", "Record")},
            (*body_errors, 403, 404, 409, 503), body="RollbackRequest")},
        "/v1/batches/requests": {"post": _op(
            "Run one batch input line on the bulk lane and answer its output line",
            {"200": _json("the output line", "BatchOutputLine")}, sync_errors,
            body="BatchRequestLine")},
        "/v1/batches": {"post": _op(
            "Create a batch (OpenAI Batch API, requests inline); the same idempotency_key "
            "answers the same batch",
            {"200": _json("the batch", "Batch")}, (*body_errors, 409, 503),
            body="BatchCreateRequest"), "get": _op(
            "The caller's batches, newest first (OpenAI batches.list)",
            {"200": _json("a page of batches", "BatchList")}, (422, 503),
            parameters=({"name": "limit", "in": "query", "required": False,
                         "schema": {"type": "integer", "minimum": 1, "maximum": 100,
                                    "default": 20}},
                        {"name": "after", "in": "query", "required": False,
                         "schema": {"type": "string"},
                         "description": "the last batch id of the previous page"}))},
        "/v1/batches/{batch_id}": {"get": _op(
            "A batch", {"200": _json("the batch", "Batch")}, (404, 503),
            parameters=(batch,))},
        "/v1/batches/{batch_id}/cancel": {"post": _op(
            "Cancel a batch", {"200": _json("the batch", "Batch")}, (404, 503),
            parameters=(batch,))},
        "/v1/batches/{batch_id}/output": {"get": _op(
            "Output lines of the requests finished so far (JSONL, input order)",
            {"200": {"description": "JSONL", "content": {
                "application/jsonl": {"schema": {"type": "string"}}}}},
            (404, 503), parameters=(batch,))},
        "/healthz": {"get": _op("Liveness", {"200": _json("alive", "Health")}, (), public=True)},
        "/readyz": {"get": _op("Readiness: Redis, the broker and a live worker",
                               {"200": _json("ready", "Ready"),
                                "503": {"description": "Redis or the broker down (an error), "
                                                       "or no live worker (this, backlog "
                                                       "included)",
                                        "content": {"application/json": {"schema": {"anyOf": [
                                            _ref("Error"), _ref("NotReady")]}}}}},
                               (), public=True)},
        "/metrics": {"get": _op(
            "Prometheus metrics", {"200": {"description": "Prometheus text", "content": {
                "text/plain": {"schema": {"type": "string"}}}}}, (503,), public=True)},
        "/openapi.json": {"get": _op(
            "This description", {"200": {"description": "OpenAPI 3.1", "content": {
                "application/json": {"schema": {"type": "object"}}}}}, (), public=True)},
    }


# ----------------------------------------------------------------------------- schemas
def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _error_response(description: str) -> Schema:
    return {"description": description,
            "content": {"application/json": {"schema": _ref("Error")}}}


def _obj(properties: Schema, required: tuple[str, ...] = ()) -> Schema:
    schema: Schema = {"type": "object", "properties": properties}
    if required:
        schema["required"] = list(required)
    return schema


def _nullable(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


def _schemas(settings: Settings) -> Schema:
    chars = settings.max_prompt_chars
    batch = settings.inference_max_batch_size
    text = {"type": "string", "minLength": 1, "maxLength": chars, "pattern": NOT_BLANK}
    texts = {"type": "array", "items": text, "minItems": 1, "maxItems": settings.embed_max_inputs}
    model_ref = _nullable({"type": "string", "minLength": 1, "maxLength": 128,
                           "description": "a model name, or name@version to pin a version"})
    stop = {"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS}
    penalty = {"type": "number", "minimum": -MAX_PENALTY, "maximum": MAX_PENALTY, "default": 0,
               "description": "subtracted from a token's logit (presence: once it was "
                              "generated; frequency: per time it was generated)"}
    sampling = {
        "max_tokens": {"type": "integer", "minimum": 1, "maximum": settings.max_tokens_limit},
        "temperature": {"type": "number", "minimum": 0, "maximum": MAX_TEMPERATURE},
        "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "top_k": {"type": "integer", "minimum": -1, "description": "0 or -1: off"},
        "seed": {"type": "integer", "minimum": MIN_SEED, "maximum": MAX_SEED},
        "stop": {"anyOf": [stop, {"type": "array", "items": stop, "maxItems": MAX_STOPS}]},
        "presence_penalty": penalty, "frequency_penalty": penalty,
        "logit_bias": {"type": "object", "maxProperties": MAX_BIASED_TOKENS,
                       "propertyNames": {"pattern": "^[0-9]{1,10}$"},
                       "additionalProperties": {"type": "number", "minimum": -MAX_LOGIT_BIAS,
                                                "maximum": MAX_LOGIT_BIAS},
                       "description": "token id (the model's tokenizer) to a bias added to its "
                                      "logit before each token is picked"},
        "logprobs": {"type": "integer", "minimum": 0, "maximum": MAX_LOGPROBS,
                     "description": "each token's log probability under the model, with this "
                                    "many alternatives (the answer's logprobs)"},
    }
    sampling = {name: _nullable(field) for name, field in sampling.items()}  # null: unset
    streaming = {
        "stream": _nullable({"type": "boolean"}),
        "stream_options": _nullable(_obj({"include_usage": _nullable({"type": "boolean"}),
                                          "include_obfuscation": _nullable({"type": "boolean"})})),
        "keep_running": _nullable({"type": "boolean",
                                   "description": "keep the job going when the client leaves "
                                                  "(streamed or not)"}),
    }
    usage = _obj({"prompt_tokens": {"type": "integer"}, "completion_tokens": {"type": "integer"},
                  "total_tokens": {"type": "integer"}}, ("prompt_tokens", "completion_tokens"))
    error_detail = _obj({"type": {"type": "string"}, "message": {"type": "string"}},
                        ("type", "message"))
    openai_sampling = {"temperature": {**sampling["temperature"], "default": 1}}
    choices = _nullable({"type": "integer", "minimum": 1, "maximum": MAX_CHOICES, "default": 1,
                         "description": "choices, one job each (X-Job-IDs); 1 in a batch line"})
    user = _nullable({"type": "string", "maxLength": 1024})
    openai_fields = ("OpenAI's other fields for this endpoint are refused unless null or their "
                     "no-op value (tools [], ...) "
                     "or accepted and ignored where they change nothing (user, metadata, store, "
                     "service_tier, ...); any other field is refused")
    http_error = _obj({"type": {"type": "string"}, "message": {"type": "string"},
                       "param": {**_nullable({"type": "string"}),
                                 "description": "the request field at fault"},
                       "code": {**_nullable({"type": "string"}),
                                "description": "OpenAI's code for the error, where it has one"}},
                      ("type", "message", "param", "code"))
    nullable_str = _nullable({"type": "string"})
    nullable_int = _nullable({"type": "integer"})
    nullable_num = _nullable({"type": "number"})
    record = _obj({
        "seq": {"type": "integer"}, "time": {"type": "string"},
        "action": {"enum": ["promote", "rollback"]}, "name": {"type": "string"},
        "kind": {"enum": ["generate", "embed"]}, "version": {"type": "integer"},
        "path": {"type": "string"}, "sha256": {"type": "string"},
        "backend": {"enum": ["onnx", "openai"]}, "upstream_model": nullable_str,
        "actor": {"type": "string"}, "reason": {"type": "string"},
        "previous_version": nullable_int, "ref": {"type": "string"},
        "files": {"type": "object", "additionalProperties": {"type": "string"},
                  "description": "companion file name to its sha256"},
    }, ("seq", "name", "kind", "version", "path", "backend", "ref"))
    return {
        "Error": _obj({"error": http_error}, ("error",)),
        "SamplingParams": _obj(sampling),
        "JobRequest": _obj({
            "kind": {"enum": ["generate", "embed"]},
            "input": {"anyOf": [text, {**texts, "description": "embed jobs only: result "
                                                             "'embeddings', in input order"}]},
            "model": model_ref,
            "params": _nullable({**_ref("SamplingParams"), "description": "generate jobs only"}),
            "lane": _nullable({"enum": ["interactive", "bulk"]}),
            "idempotency_key": _nullable({"type": "string", "minLength": 1, "maxLength": 128,
                                          "pattern": NOT_BLANK}),
            "deadline_s": _nullable({"type": "number", "minimum": 0.001, "maximum": 86400}),
        }, ("kind", "input")),
        "JobAccepted": _obj({
            "id": {"type": "string"}, "status": {"type": "string"},
            "links": _obj({"self": {"type": "string"}, "events": {"type": "string"}},
                          ("self", "events")),
        }, ("id", "status", "links")),
        "Job": _obj({
            "id": {"type": "string"}, "kind": {"enum": ["generate", "embed"]},
            "status": {"enum": ["queued", "running", "succeeded", "failed", "cancelled",
                                "expired"]},
            "model": {"type": "string"}, "version": nullable_int, "backend": nullable_str,
            "batch_size": nullable_int, "lane": {"type": "string"}, "worker": nullable_str,
            "attempts": {"type": "integer", "description": "times a worker took it"},
            "result": _nullable({"type": "object"}),
            "error": _nullable(error_detail),
            "usage": usage,
            "timings": _obj({"queued_at": nullable_str, "started_at": nullable_str,
                             "finished_at": nullable_str, "queue_ms": nullable_num,
                             "run_ms": nullable_num}),
        }, ("id", "kind", "status", "model", "result", "error", "usage", "timings")),
        "InferenceRequest": _obj({"prompt": text, "model": model_ref, **sampling,
                                  "keep_running": streaming["keep_running"]}, ("prompt",)),
        "InferenceResult": _obj({
            "id": {"type": "string"}, "text": {"type": "string"},
            "finish_reason": {"type": "string"}, "usage": usage, "model": {"type": "string"},
            "version": nullable_int, "backend": nullable_str, "batch_size": nullable_int,
            "logprobs": {"type": "array", "description": "asked for with logprobs: one entry "
                                                         "per generated token"},
        }, ("id", "text", "finish_reason", "usage", "model")),
        "InferenceBatchRequest": _obj({
            "prompts": {"type": "array", "items": text, "minItems": 1, "maxItems": batch},
            "model": model_ref, **sampling}, ("prompts",)),
        "InferenceBatchResult": _obj({"results": {"type": "array", "items": {"anyOf": [
            _ref("InferenceResult"),
            _obj({"id": {"type": "string"}, "error": error_detail}, ("id", "error"))]}}},
            ("results",)),
        "CompletionRequest": _obj({
            "prompt": {"anyOf": [text, {"type": "array", "items": text,
                                        "minItems": 1, "maxItems": 1}]},
            "model": model_ref, **sampling, **openai_sampling, **streaming,
            "n": choices, "user": user,
            "best_of": _nullable({"type": "integer", "minimum": 1, "maximum": MAX_CHOICES,
                                  "description": "null or n: every choice made is answered"}),
            "echo": _nullable({"type": "boolean", "default": False,
                               "description": "the prompt before each text (not with "
                                              "logprobs)"}),
        }, ("prompt",)) | {"description": openai_fields},
        "ChatCompletionRequest": _obj({
            "messages": {"type": "array", "minItems": 1, "items": _obj({
                "role": {"enum": ["system", "user", "assistant", "developer"],
                         "description": "developer is taken as system"},
                "name": _nullable({"type": "string"}),
                "content": {"anyOf": [
                    {"type": "string", "maxLength": chars},
                    {"type": "array", "minItems": 1, "items": _obj({
                        "type": {"const": "text"},
                        "text": {"type": "string", "maxLength": chars}}, ("type", "text"))}]},
            }, ("role", "content"))},
            "model": model_ref, **sampling, **openai_sampling, **streaming,
            "max_completion_tokens": sampling["max_tokens"],
            "logprobs": _nullable({"type": "boolean"}),
            "top_logprobs": _nullable({"type": "integer", "minimum": 0, "maximum": MAX_LOGPROBS,
                                       "description": "alternatives per token; needs logprobs "
                                                      "true"}),
            "n": choices, "user": user,
        }, ("messages",)) | {"description": openai_fields},
        "TokenizeRequest": _obj({
            "model": model_ref, "prompt": _nullable({"type": "string", "maxLength": chars}),
            "messages": _nullable({"type": "array", "minItems": 1, "items": {"type": "object"},
                                   "description": "as /v1/chat/completions takes them"}),
        }) | {"description": "one of prompt and messages"},
        "Tokenized": _obj({"model": {"type": "string"},
                           "tokens": {"type": "array", "items": {"type": "integer"}},
                           "count": {"type": "integer"}}, ("model", "tokens", "count")),
        "DetokenizeRequest": _obj({
            "model": model_ref,
            "tokens": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        }, ("tokens",)),
        "Detokenized": _obj({"model": {"type": "string"}, "prompt": {"type": "string"}},
                            ("model", "prompt")),
        "EmbeddingRequest": _obj({
            "input": {"anyOf": [text, texts]},
            "model": model_ref, "encoding_format": _nullable({"enum": ["float", "base64"]}),
            "user": user, "dimensions": {"type": "null", "description": "vectors have the "
                                                                        "model's own size"},
        }, ("input",)),
        "Completion": _obj({
            "id": {"type": "string"}, "object": {"const": "text_completion"},
            "created": {"type": "integer"}, "model": {"type": "string"},
            "choices": {"type": "array", "items": _obj({
                "index": {"type": "integer"}, "text": {"type": "string"},
                "finish_reason": nullable_str,
                "logprobs": _nullable({"type": "object", "description": "asked for with "
                                       "logprobs: tokens, token_logprobs, top_logprobs, "
                                       "text_offset"})}, ("index", "text"))},
            "usage": usage,
        }, ("id", "object", "created", "model", "choices")),
        "ChatCompletion": _obj({
            "id": {"type": "string"}, "object": {"const": "chat.completion"},
            "created": {"type": "integer"}, "model": {"type": "string"},
            "choices": {"type": "array", "items": _obj({
                "index": {"type": "integer"},
                "message": _obj({"role": {"const": "assistant"}, "content": {"type": "string"}},
                                ("role", "content")),
                "finish_reason": nullable_str,
                "logprobs": _nullable({"type": "object", "description": "asked for with "
                                       "logprobs: content, one entry per token"})},
                ("index", "message"))},
            "usage": usage,
        }, ("id", "object", "created", "model", "choices")),
        "EmbeddingList": _obj({
            "object": {"const": "list"},
            "data": {"type": "array", "items": _obj({
                "object": {"const": "embedding"}, "index": {"type": "integer"},
                "embedding": {"anyOf": [{"type": "array", "items": {"type": "number"}},
                                        {"type": "string", "contentEncoding": "base64"}]},
            }, ("object", "index", "embedding"))},
            "model": {"type": "string"},
            "usage": _obj({"prompt_tokens": {"type": "integer"},
                           "total_tokens": {"type": "integer"}}, ("prompt_tokens", "total_tokens")),
        }, ("object", "data", "model")),
        "Model": _obj({
            "id": {"type": "string"}, "object": {"const": "model"},
            "created": {"type": "integer"}, "owned_by": {"type": "string"},
            "version": {"type": "integer"}, "kind": {"enum": ["generate", "embed"]},
            "backend": {"enum": ["onnx", "openai"]}, "name": {"type": "string"},
            "upstream_model": nullable_str,
            "ref": {"type": "string", "description": "name@version"}}, ("id", "object")),
        "ModelList": _obj({"object": {"const": "list"},
                           "data": {"type": "array", "items": _ref("Model")}}, ("object", "data")),
        "Record": record,
        "RecordList": _obj({"object": {"const": "list"},
                            "data": {"type": "array", "items": _ref("Record")}},
                           ("object", "data")),
        "PromoteRequest": _obj({
            "name": {"type": "string", "pattern": MODEL_NAME},
            "kind": {"enum": ["generate", "embed"]},
            "path": {"type": "string", "maxLength": 1024,
                     "description": "the .onnx file (or its directory) under the model root; "
                                    "required for the onnx backend"},
            "backend": {"enum": ["onnx", "openai"]},
            "model": {"type": "string", "maxLength": 128,
                      "description": "upstream model name (openai backend)"},
            "reason": {"type": "string", "maxLength": 512},
        }, ("name", "kind")),
        "RollbackRequest": _obj({"name": {"type": "string", "pattern": MODEL_NAME},
                                 "reason": {"type": "string", "maxLength": 512}}, ("name",)),
        "BatchLine": _obj({
            "custom_id": {"type": "string", "minLength": 1, "maxLength": MAX_CUSTOM_ID_CHARS,
                          "pattern": NOT_BLANK},
            "method": {"const": "POST"}, "url": {"enum": list(URLS)},
            "body": {"type": "object", "description": "what the url's endpoint takes"},
        }, ("custom_id", "method", "url", "body")),
        "BatchRequestLine": {"allOf": [_ref("BatchLine"), _obj({
            "idempotency_key": {"type": "string", "minLength": 1,
                                "maxLength": MAX_IDEMPOTENCY_KEY_CHARS,
                                "pattern": NOT_BLANK}})]},
        "BatchOutputLine": _obj({
            "id": {"type": "string"}, "custom_id": {"type": "string"},
            "response": _nullable(_obj({"status_code": {"type": "integer"},
                                        "body": {"type": "object"}},
                                       ("status_code", "body"))),
            "error": _nullable(_obj({"code": {"type": "string"},
                                     "message": {"type": "string"}})),
        }, ("id", "custom_id", "response", "error")),
        "BatchCreateRequest": _obj({
            "requests": {"type": "array", "items": _ref("BatchLine"), "minItems": 1,
                         "maxItems": MAX_BATCH_REQUESTS},
            "endpoint": {"enum": list(URLS)}, "completion_window": {"const": "24h"},
            "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
            "idempotency_key": {"type": "string", "minLength": 1, "maxLength": 128,
                                "pattern": NOT_BLANK},
        }, ("requests",)),
        "BatchList": _obj({
            "object": {"const": "list"}, "data": {"type": "array", "items": _ref("Batch")},
            "has_more": {"type": "boolean"}, "first_id": nullable_str,
            "last_id": nullable_str}, ("object", "data", "has_more")),
        "Batch": _obj({
            "id": {"type": "string"}, "object": {"const": "batch"},
            "status": {"enum": ["in_progress", "completed", "cancelling", "cancelled"]},
            "request_counts": _obj({"total": {"type": "integer"},
                                    "completed": {"type": "integer"},
                                    "failed": {"type": "integer"}},
                                   ("total", "completed", "failed")),
        }, ("id", "object", "status", "request_counts")),
        "JobEvent": _obj({
            "id": {"type": "string", "pattern": r"^[0-9]+-[0-9]+$",
                   "description": "stream entry id, for Last-Event-ID"},
            "event": {"enum": ["token", "done", "error"]},
            "data": {"type": "string", "contentMediaType": "application/json"},
        }, ("id", "event", "data")),
        "OpenAIEvent": _obj({
            "data": {"type": "string", "description": "a JSON chunk, or [DONE] at the end"},
        }, ("data",)),
        "Health": _obj({"status": {"const": "ok"}}, ("status",)),
        "Ready": _obj({"status": {"const": "ready"},
                       "workers": {"type": "array", "items": {"type": "string"}},
                       "queued": _obj({"interactive": {"type": "integer"},
                                       "bulk": {"type": "integer"}},
                                      ("interactive", "bulk"))},
                      ("status", "workers", "queued")),
        "NotReady": _obj({"error": http_error, "status": {"const": "not_ready"},
                          "workers": {"type": "array", "maxItems": 0},
                          "queued": _obj({"interactive": {"type": "integer"},
                                          "bulk": {"type": "integer"}})},
                         ("error", "status", "workers", "queued")),
    }
