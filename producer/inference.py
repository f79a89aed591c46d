"""``/v1/inference`` (synchronous, or SSE with ``?stream=true``) and ``/v1/inference/batch``."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from flask import Blueprint, after_this_request, jsonify, request

from banter import errors
from banter.errors import FeatureDisabled, InvalidRequest, TooLarge
from banter.jobs import JobKind, JobRecord, JobStatus
from producer import disconnect, sse
from producer import validation as v
from producer.context import Context, ctx, trace_id
from producer.service import JobRequest

blueprint = Blueprint("inference", __name__)


def generate_request(body: dict, prompt: str, c: Context) -> JobRequest:
    return JobRequest(kind=JobKind.GENERATE, input=prompt,
                      model=v.string(body, "model", max_len=128),
                      params=v.sampling_params(body, c.settings.default_max_tokens))


def result_body(record: JobRecord) -> dict[str, Any]:
    """The inference answer for a finished job, or raise its typed error."""
    if record.status == JobStatus.FAILED.value and record.error:
        raise errors.from_dict(record.error)
    public = record.to_public()
    result = record.result or {"text": "", "finish_reason": record.status}
    body = {"id": record.id, "text": result.get("text", ""),
            "finish_reason": result.get("finish_reason", record.status),
            "usage": public["usage"], "model": record.model, "version": record.version,
            "backend": record.backend, "batch_size": record.batch_size}
    if "logprobs" in result:  # asked for: one entry per generated token
        body["logprobs"] = result["logprobs"]
    return body


def tag_with_job(record: JobRecord) -> None:
    """``X-Job-ID`` on whatever answers this request: the result, a stream, or an error once
    the job exists (a 504 whose job runs on, a failed job), so a client can poll or resume it."""
    @after_this_request
    def tag(response):
        response.headers["X-Job-ID"] = record.id
        return response


def job_headers(records: list[JobRecord]) -> dict[str, str]:
    """``X-Backend`` (those that ran the jobs) and ``X-Batch-Size`` (the largest pass one of them
    shared), which is left out when none ran in a pass (every job failed before its pass)."""
    headers = {"X-Backend": ",".join(sorted({r.backend for r in records if r.backend}))}
    sizes = [r.batch_size for r in records if r.batch_size]
    if sizes:
        headers["X-Batch-Size"] = str(max(sizes))
    return headers


def wait_answer(c: Context, record: JobRecord, owner: str, gone: Callable[[], bool] | None,
                keep: bool = False) -> JobRecord:
    """The job's final record, for a synchronous call. A client that leaves first
    (``gone``, from ``disconnect.watch``) ends the wait (ClientGone, 499) and cancels the job
    unless ``keep`` (``keep_running``), as a streaming client does: its answer would reach
    no one, and an SDK that timed out sends the request again."""
    try:
        return c.jobs.wait(record.id, gone=gone)
    except errors.ClientGone:
        if not keep:
            c.jobs.cancel(record.id, owner)
        raise


def client_watch() -> Callable[[], bool]:
    """``wait_answer``'s ``gone`` for the request in hand."""
    return disconnect.watch(request.environ)


def _wait(c: Context, record: JobRecord, owner: str,
          gone: Callable[[], bool] | None) -> tuple[JobRecord, errors.Timeout | None]:
    """The job's final record, or (as submitted, the Timeout) past BANTER_SYNC_TIMEOUT_S."""
    try:
        return wait_answer(c, record, owner, gone), None
    except errors.Timeout as exc:
        return record, exc


def stream_query() -> bool:
    """``?stream=``: true/1/yes streams, false/0/no (or none) answers whole, else 422."""
    raw = request.args.get("stream", "false").lower()
    if raw not in ("1", "true", "yes", "0", "false", "no"):
        raise InvalidRequest(f"'stream' (query) must be true or false, got {raw[:32]!r}",
                             "stream")
    return raw in ("1", "true", "yes")


def keep_running(body: dict) -> bool:
    """``keep_running: true`` keeps a job going after its client disconnects, streamed or not
    (null: false, as for every optional field)."""
    value = body.get("keep_running")
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidRequest("'keep_running' must be true or false", "keep_running")
    return value


def stream_job(c: Context, record: JobRecord, owner: str, keep: bool,
               fmt: sse.Formatter = sse.sse_event, interrupted: str = "", gone: str = ""):
    """SSE of a just-submitted job; a client that leaves early cancels it unless ``keep``.
    ``interrupted``, ``gone``: what the stream ends with when Redis is lost, or the job with
    it (``sse.events``). A job that fails at once raises its error instead
    (``sse.early_error``)."""
    failed = sse.early_error(c.redis, record.id)
    if failed is not None:
        raise failed
    stream = sse.events(c.redis, record.id, "0-0", fmt, interrupted=interrupted, gone=gone,
                        on_idle=lambda: c.jobs.get(record.id, owner))
    if not keep:
        stream = sse.cancel_on_disconnect(stream, lambda: c.jobs.cancel(record.id, owner))
    return sse.response(stream, {"X-Backend": record.backend or ""})


INFERENCE_FIELDS = ("prompt", "model", "keep_running", *v.SAMPLING_FIELDS)
BATCH_FIELDS = ("prompts", "model", *v.SAMPLING_FIELDS)
HINTS = {"stream": "ask for a stream with POST /v1/inference?stream=true",
         "deadline_s": "a deadline is for jobs submitted with POST /v1/jobs",
         "input": "the text goes in 'prompt' here"}


@blueprint.post("/v1/inference")
def inference():
    c = ctx()
    owner = c.owner()
    body = c.body()
    v.known_fields(body, INFERENCE_FIELDS, HINTS)
    prompt = v.string(body, "prompt", required=True, max_len=c.settings.max_prompt_chars)
    streamed, keep = stream_query(), keep_running(body)
    c.hold_wait(owner)
    record, _ = c.jobs.submit(generate_request(body, prompt, c), owner, trace_id(), waited=True)
    tag_with_job(record)
    if streamed:
        return stream_job(c, record, owner, keep)
    record = wait_answer(c, record, owner, client_watch(), keep)
    response = jsonify(result_body(record))
    response.headers.update(job_headers([record]))
    return response


@blueprint.post("/v1/inference/batch")
def inference_batch():
    c = ctx()
    if not c.settings.enable_batching:
        raise FeatureDisabled("batch inference is off (BANTER_ENABLE_BATCHING=false)")
    owner = c.owner()
    if "stream" in request.args:
        raise InvalidRequest("a batch does not stream: stream each prompt with POST "
                             "/v1/inference?stream=true, or submit them as jobs", "stream")
    body = c.body()
    v.known_fields(body, BATCH_FIELDS, {**HINTS, "prompt": "a batch takes a list in 'prompts'"})
    limit = c.settings.inference_max_batch_size
    if isinstance(body.get("prompts"), list) and len(body["prompts"]) > limit:
        raise TooLarge(f"{len(body['prompts'])} prompts; the limit is {limit} "
                       "(BANTER_INFERENCE_MAX_BATCH_SIZE)", "prompts")
    prompts = v.string_list(body, "prompts", max_items=limit, max_len=c.settings.max_prompt_chars)
    c.hold_wait(owner)
    submitted = c.jobs.submit_all([generate_request(body, p, c) for p in prompts], owner,
                                  trace_id(), waited=True)
    gone = client_watch()
    with ThreadPoolExecutor(max_workers=len(submitted)) as pool:
        waited = list(pool.map(lambda r: _wait(c, r, owner, gone), submitted))
    records = [record for record, _ in waited]
    results = []
    for record, timeout in waited:
        try:
            results.append(result_body(record) if timeout is None else
                           {"id": record.id, "error": timeout.to_dict()})  # its job goes on
        except errors.BanterError as exc:
            results.append({"id": record.id, "error": exc.to_dict()})
    response = jsonify({"results": results})
    response.headers.update(job_headers(records))
    return response
