"""``/v1/batches``: OpenAI Batch API on the bulk lane, and the one-request form ``banter bulk``
sends.

- ``POST /v1/batches/requests``: one batch input line (``banter.bulk`` format) plus an optional
  ``idempotency_key``; runs it on the bulk lane and answers its output line when it finished.
- ``POST /v1/batches``: ``{requests: [lines], endpoint?, completion_window?, metadata?,
  idempotency_key?}``, the lines inline (OpenAI takes an uploaded ``input_file_id``; there is no
  file API here), at most MAX_BATCH_REQUESTS; answers the batch object. With an
  ``idempotency_key`` the batch id is derived from (owner, key) and each line's job gets a key
  derived from (key, custom_id) (``line_key``), so a create sent again (a timeout, a crash half
  way) answers the same batch and runs no line twice. Without one, a create refused half way
  (the bulk queue filled meanwhile: 429) cancels the jobs it had submitted.
- ``GET /v1/batches`` (the owner's batches, newest first, OpenAI's list with ``limit`` and
  ``after``), ``GET /v1/batches/{id}``, ``POST /v1/batches/{id}/cancel``, and
  ``GET /v1/batches/{id}/output`` (the output lines of the requests finished so far, as JSONL,
  in input order).

A line's body is checked as its endpoint checks it (``producer.openai_api``); a body that
endpoint would refuse is answered in the line's output (``response.status_code`` 4xx), never by
failing the call or the batch. Batches are Redis hashes (``keys.batch``) with the job TTL.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import time
import uuid
from dataclasses import asdict, dataclass, replace
from typing import Any

from flask import Blueprint, Response, jsonify, url_for
from flask import request as flask_request

from banter import errors, keys
from banter.bulk import URLS, BatchLine, error_line, parse_line, response_line, succeeded
from banter.errors import IdempotencyKeyReused, InvalidRequest, NotFound, QueueFull, TooLarge, brief, openai_status
from banter.jobs import JobRecord, JobStatus, Lane
from producer import disconnect
from producer import openai_api as oa
from producer import validation as v
from producer.context import Context, ctx, trace_id
from producer.service import JobRequest

blueprint = Blueprint("batches", __name__)

MAX_BATCH_REQUESTS = 1000
LIST_LIMIT, MAX_LIST_LIMIT = 20, 100  # GET /v1/batches: OpenAI's default and largest page
MAX_IDEMPOTENCY_KEY_CHARS = 128
_BATCH_ID = re.compile(r"^batch_[0-9a-f]{32}\Z")


@dataclass
class Submitted:
    """One line after submission: the job it became, or the answer that refused it."""

    custom_id: str
    url: str
    job_id: str = ""
    base64: bool = False
    echo: bool = False  # /v1/completions with echo: the prompt before the text
    refused: dict[str, Any] | None = None


# ----------------------------------------------------------------------------- submit
def submit_line(c: Context, owner: str, line: BatchLine, key: str | None) -> Submitted:
    """Check ``line.body`` as its endpoint does and enqueue its job on the bulk lane. A body
    the endpoint would refuse (4xx) comes back as ``refused``; QueueFull and Unavailable raise."""
    try:
        encoding = "float"
        if line.url == "/v1/embeddings":
            request, encoding = oa.embed_request(c, line.body)
        else:
            request = text_request(c, line.url, line.body)
        request = replace(request, lane=Lane.BULK, idempotency_key=key)
        job_id = c.jobs.submit(request, owner, trace_id())[0].id
    except (InvalidRequest, NotFound, IdempotencyKeyReused) as exc:
        refused = response_line(line.custom_id, uuid.uuid4().hex, openai_status(exc.status),
                                {"error": exc.body()})
        return Submitted(line.custom_id, line.url, refused=refused)
    echo = line.url == "/v1/completions" and oa.echo(line.body)
    return Submitted(line.custom_id, line.url, job_id, encoding == "base64", echo)


def text_request(c: Context, url: str, body: dict) -> JobRequest:
    """The generate job ``/v1/completions`` or ``/v1/chat/completions`` would make of ``body``."""
    if oa.flag(body, "stream"):
        raise InvalidRequest("'stream' is not supported in a batch: every request is answered "
                             "whole", "stream")
    if oa.choices(body) > 1:
        raise InvalidRequest("'n' must be 1 in a batch: send one line per choice (each its own "
                             "custom_id)", "n")
    return oa.text_request(c, url, body)


# ----------------------------------------------------------------------------- render
def render(line: Submitted, record: JobRecord | None) -> dict[str, Any] | None:
    """The output line of a submitted line, or None while its job is unfinished. A job record
    gone (TTL) counts as expired."""
    if line.refused:
        return line.refused
    if record is not None and not JobStatus(record.status).terminal:
        return None
    request_id = line.job_id.replace("-", "")
    if record is None or record.status in (JobStatus.CANCELLED.value, JobStatus.EXPIRED.value):
        status = record.status if record else JobStatus.EXPIRED.value
        return error_line(line.custom_id, request_id, status,
                          f"the request was {status} before it finished")
    if record.status == JobStatus.FAILED.value:
        error = errors.from_dict(record.error or {"type": "inference_error",
                                                  "message": "the job failed"})
        return response_line(line.custom_id, request_id, openai_status(error.status),
                             {"error": error.body()})
    return response_line(line.custom_id, request_id, 200, answer(line, record))


def answer(line: Submitted, record: JobRecord) -> dict[str, Any]:
    """The body the line's endpoint answers for its succeeded job."""
    if line.url == "/v1/completions":
        return oa.answer_body(oa.TextShape, [record], line.echo)
    if line.url == "/v1/chat/completions":
        return oa.answer_body(oa.ChatShape, [record])
    return oa.embeddings_body(record, base64_floats=line.base64)


# ----------------------------------------------------------------------------- one request
@blueprint.post("/v1/batches/requests")
def run_request():
    """One batch input line plus an optional ``idempotency_key`` (``banter bulk`` sends one per
    line), run on the bulk lane; answers 200 with its output line once it finished, whatever
    the request's own outcome. 422 when it is not a batch line; 429/503 as for any job; 504
    after BANTER_SYNC_TIMEOUT_S (the job goes on: send the same key again to pick it up). A
    client that leaves ends the wait, not the job (``banter bulk`` picks it up by its key)."""
    c = ctx()
    owner = c.owner()
    body = c.body()
    line = parse_line(body)
    key = v.string(body, "idempotency_key", max_len=MAX_IDEMPOTENCY_KEY_CHARS)
    c.hold_wait(owner)
    submitted = submit_line(c, owner, line, key)
    record = None
    if submitted.job_id:
        record = c.jobs.wait(submitted.job_id, gone=disconnect.watch(flask_request.environ))
    return jsonify(render(submitted, record))


# ----------------------------------------------------------------------------- batches
@blueprint.post("/v1/batches")
def create_batch():
    c = ctx()
    owner = c.owner()
    body = c.body()
    v.known_fields(body, ("requests", "endpoint", "completion_window", "metadata",
                          "idempotency_key"),
                   {"input_file_id": "send the request lines themselves in 'requests' (or run "
                                     "the file with banter bulk)"})
    key = v.string(body, "idempotency_key", max_len=MAX_IDEMPOTENCY_KEY_CHARS)
    lines = batch_lines(body)
    endpoint = body.get("endpoint")
    if endpoint is not None and (endpoint not in URLS or any(x.url != endpoint for x in lines)):
        raise InvalidRequest("'endpoint' must be one of " + ", ".join(URLS) + " and every "
                             "request's 'url' must equal it (leave it out to mix endpoints)",
                             "endpoint")
    window = v.choice(body, "completion_window", ("24h",), "24h")
    metadata = body.get("metadata")
    if metadata is not None and (not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(x, str) for k, x in metadata.items())):
        raise InvalidRequest("'metadata' must be an object of string values", "metadata")
    digest = batch_digest(body)
    if key:  # checked after the body: a bad field is a 422 whatever the key
        earlier = c.redis.hgetall(keys.batch(keyed_batch_id(owner, key)))
        if earlier:
            if earlier.get("request_hash") != digest:
                raise IdempotencyKeyReused(
                    f"idempotency_key {key!r} was used for a different batch "
                    f"({earlier['id']}); send that batch again, or use a new key")
            return jsonify(batch_object(c, earlier, submitted_lines(earlier)))
    check_room(c, len(lines), len(lines) - lines_with_jobs(c, owner, key, lines))
    batch_id = keyed_batch_id(owner, key) if key else f"batch_{uuid.uuid4().hex}"
    submitted = submit_lines(c, owner, lines, key)
    now = int(time.time())
    fields = {"id": batch_id, "owner": owner, "endpoint": endpoint or "",
              "completion_window": window, "metadata": json.dumps(metadata),
              "created_at": now, "in_progress_at": now, "status": "in_progress",
              "request_hash": digest, "requests": json.dumps([asdict(s) for s in submitted])}
    pipe = c.redis.pipeline()
    pipe.hset(keys.batch(batch_id), mapping=fields)
    pipe.expire(keys.batch(batch_id), c.settings.job_ttl_s)
    pipe.zadd(keys.batches(owner), {batch_id: time.time()})
    pipe.expire(keys.batches(owner), c.settings.job_ttl_s)
    pipe.execute()
    return jsonify(batch_object(c, fields, submitted))


def batch_digest(body: dict) -> str:
    """What a create asks for, as a digest: the same batch sent again with its defaults spelt
    out (null fields, ``completion_window`` "24h") has the same one, as a job's request hash
    does, so its idempotency key answers the earlier batch instead of a 409."""
    asked = {k: x for k, x in body.items() if k != "idempotency_key" and x is not None}
    if asked.get("completion_window") == "24h":
        del asked["completion_window"]
    return hashlib.sha256(json.dumps(asked, sort_keys=True).encode()).hexdigest()


def submit_lines(c: Context, owner: str, lines: list[BatchLine],
                 key: str | None) -> list[Submitted]:
    """``submit_line`` for each line. When one raises (QueueFull: another client filled the
    queue since ``check_room``; Unavailable), the jobs submitted so far are cancelled unless the
    batch has a key: no batch names them, and a retry would run them again; with a key the
    retry takes them over."""
    submitted: list[Submitted] = []
    try:
        for line in lines:
            submitted.append(submit_line(c, owner, line, line_key(key, line.custom_id)
                                         if key else None))
    except errors.BanterError:
        if not key:
            with contextlib.suppress(errors.BanterError):
                for line in submitted:
                    if line.job_id:
                        c.jobs.cancel(line.job_id, owner)
        raise
    return submitted


def line_key(key: str, custom_id: str) -> str:
    """The idempotency key of the job of line ``custom_id`` in the batch created with ``key``;
    one pair's, never another's (a plain ``key/custom_id`` made ``a/b`` + ``c`` and ``a`` +
    ``b/c`` one job)."""
    return "batch:" + hashlib.sha256(json.dumps([key, custom_id]).encode()).hexdigest()[:32]


def keyed_batch_id(owner: str, key: str) -> str:
    """The id of the batch ``owner`` creates with idempotency ``key``."""
    return "batch_" + hashlib.sha256(f"{owner}\0{key}".encode()).hexdigest()[:32]


@blueprint.get("/v1/batches")
def list_batches():
    """OpenAI ``batches.list``: the caller's batches (of the last BANTER_JOB_TTL_S), newest
    first, ``limit`` (1 to 100, default 20) per page after the batch id ``after``. An ``after``
    that is not one of the caller's listed batches is a 422, not the first page again (a client
    paging on would see repeats)."""
    c = ctx()
    owner = c.owner()
    limit = _query_int("limit", LIST_LIMIT, 1, MAX_LIST_LIMIT)
    after = flask_request.args.get("after")
    ids = c.redis.zrevrange(keys.batches(owner), 0, -1)
    if after is not None and after not in ids:
        raise InvalidRequest(f"'after' {brief(after)} is not one of your batches (or it "
                             "expired): list again from the start", "after")
    start = ids.index(after) + 1 if after is not None else 0
    data, has_more = [], False
    for batch_id in ids[start:]:
        if len(data) == limit:  # a full page: one more live batch after it is has_more
            if c.redis.exists(keys.batch(batch_id)):
                has_more = True
                break
        elif fields := c.redis.hgetall(keys.batch(batch_id)):
            data.append(batch_object(c, fields, submitted_lines(fields)))
            continue
        c.redis.zrem(keys.batches(owner), batch_id)  # expired
    return jsonify({"object": "list", "data": data, "has_more": has_more,
                    "first_id": data[0]["id"] if data else None,
                    "last_id": data[-1]["id"] if data else None})


def _query_int(name: str, default: int, low: int, high: int) -> int:
    raw = flask_request.args.get(name)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 9) or not low <= int(raw) <= high:
        raise InvalidRequest(f"'{name}' must be an integer from {low} to {high}", name)
    return int(raw)


def batch_lines(body: dict) -> list[BatchLine]:
    """``requests``: 1 to MAX_BATCH_REQUESTS batch lines with unique custom_ids; the first
    bad one is a 422 naming its index (nothing is submitted)."""
    raw = body.get("requests")
    if not isinstance(raw, list) or not raw:
        raise InvalidRequest("'requests' must be a non-empty list of batch request lines "
                             "({custom_id, method, url, body})", "requests")
    if len(raw) > MAX_BATCH_REQUESTS:
        raise TooLarge(f"'requests' has {len(raw)} lines; the limit is {MAX_BATCH_REQUESTS} "
                       "(use 'banter bulk' for larger files)", "requests")
    lines, seen = [], set()
    for index, value in enumerate(raw):
        try:
            line = parse_line(value)
        except InvalidRequest as exc:
            raise InvalidRequest(f"'requests[{index}]': {exc.message}",
                                 f"requests[{index}].{exc.param}" if exc.param else
                                 f"requests[{index}]") from None
        if line.custom_id in seen:
            raise InvalidRequest(f"'requests[{index}].custom_id' {line.custom_id!r} is repeated; "
                                 "custom_ids must be unique", f"requests[{index}].custom_id")
        seen.add(line.custom_id)
        lines.append(line)
    return lines


def check_room(c: Context, lines: int, new: int) -> None:
    """QueueFull unless the bulk queue can take a job for each of the ``new`` lines (those
    with no job yet) now, so a batch is rarely cut in two (see docs/decisions.md, Bulk);
    TooLarge when its ``lines`` never could fit."""
    limit = c.settings.max_queue_depth
    if limit and lines > limit:  # no wait would help: 413, not a 429 to retry for ever
        raise TooLarge(f"a batch of {lines} requests cannot fit the bulk queue's limit of "
                       f"{limit} jobs (BANTER_MAX_QUEUE_DEPTH): split it, or use banter bulk",
                       "requests")
    if limit and new and c.jobs.queues.depth()[Lane.BULK.value] + new > limit:
        raise QueueFull(f"the bulk queue cannot take {new} more jobs now (limit {limit}); "
                        "retry later", retry_after_s=5)


def lines_with_jobs(c: Context, owner: str, key: str | None, lines: list[BatchLine]) -> int:
    """How many lines of a keyed batch already have a job: a create sent again after one cut
    short (a 429 half way, a timeout) takes them over, so they need no room in the queue."""
    if not key:
        return 0
    names = [keys.idempotency(owner, line_key(key, line.custom_id)) for line in lines]
    return sum(1 for job_id in c.redis.mget(names) if job_id)


@blueprint.get("/v1/batches/<batch_id>")
def get_batch(batch_id: str):
    c = ctx()
    fields, submitted = load_batch(c, batch_id, c.owner())
    return jsonify(batch_object(c, fields, submitted))


@blueprint.post("/v1/batches/<batch_id>/cancel")
def cancel_batch(batch_id: str):
    """Queued jobs never run, running ones stop at their next step; the batch is
    ``cancelling`` until every job has ended, then ``cancelled``."""
    c = ctx()
    owner = c.owner()
    fields, submitted = load_batch(c, batch_id, owner)
    running = [r for r in job_records(c, submitted)
               if r is not None and not JobStatus(r.status).terminal]
    if fields["status"] == "in_progress" and running:
        if move(c, batch_id, "in_progress", "cancelling") == "cancelling":
            for record in running:
                c.jobs.cancel(record.id, owner)
        fields = c.redis.hgetall(keys.batch(batch_id)) or fields
    return jsonify(batch_object(c, fields, submitted))


# KEYS[1] the batch hash. ARGV[1] the status it must have, ARGV[2] the new one, ARGV[3] the
# time. Sets the status and its ``<status>_at`` time (once) only from ARGV[1]; returns the
# status the batch has after.
_MOVE = """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= ARGV[1] then return status end
redis.call('HSET', KEYS[1], 'status', ARGV[2])
redis.call('HSETNX', KEYS[1], ARGV[2] .. '_at', ARGV[3])
return ARGV[2]
"""


def move(c: Context, batch_id: str, before: str, after: str) -> str:
    """Move the batch from status ``before`` to ``after`` in one step, so a cancel and a read
    that finds every job ended never overwrite each other; returns its status now."""
    return c.redis.eval(_MOVE, 1, keys.batch(batch_id), before, after, int(time.time()))


@blueprint.get("/v1/batches/<batch_id>/output")
def batch_output(batch_id: str):
    c = ctx()
    _fields, submitted = load_batch(c, batch_id, c.owner())
    lines = [render(s, r) for s, r in zip(submitted, job_records(c, submitted))]
    text = "".join(json.dumps(x) + "\n" for x in lines if x is not None)
    return Response(text, mimetype="application/jsonl")


def load_batch(c: Context, batch_id: str, owner: str) -> tuple[dict[str, Any], list[Submitted]]:
    """The batch's fields and lines; NotFound unless it exists and belongs to ``owner``."""
    fields = c.redis.hgetall(keys.batch(batch_id)) if _BATCH_ID.match(batch_id) else {}
    if not fields or fields.get("owner") != owner:
        raise NotFound(f"no batch {batch_id!r}")
    return fields, submitted_lines(fields)


def submitted_lines(fields: dict[str, Any]) -> list[Submitted]:
    return [Submitted(**s) for s in json.loads(fields["requests"])]


def job_records(c: Context, submitted: list[Submitted]) -> list[JobRecord | None]:
    """Every line's job record (None where it expired or the line was refused), read in one
    round trip."""
    pipe = c.redis.pipeline(transaction=False)
    for line in submitted:
        if line.job_id:
            pipe.hgetall(keys.job(line.job_id))
    raws = iter(pipe.execute())
    return [JobRecord.from_redis(raw) if line.job_id and (raw := next(raws)) else None
            for line in submitted]


FINAL_OF = {"in_progress": "completed", "cancelling": "cancelled"}  # once every job ended


def batch_object(c: Context, fields: dict[str, Any], submitted: list[Submitted]) -> dict[str, Any]:
    """The OpenAI batch object. Its status is worked out from the jobs: once every one has
    ended, ``in_progress`` becomes ``completed`` and ``cancelling`` becomes ``cancelled``
    (recorded once, with its time)."""
    outputs = [render(s, r) for s, r in zip(submitted, job_records(c, submitted))]
    done = [x for x in outputs if x is not None]
    completed = sum(1 for x in done if succeeded(x))
    status = fields["status"]
    while len(done) == len(outputs) and status in FINAL_OF:  # a cancel may come in between
        status = move(c, fields["id"], status, FINAL_OF[status]) or FINAL_OF[status]
        fields = c.redis.hgetall(keys.batch(fields["id"])) or fields
    created = int(fields["created_at"])

    def at(name: str) -> int | None:
        return int(fields[name]) if fields.get(name) else None

    return {
        "id": fields["id"], "object": "batch", "endpoint": fields["endpoint"] or None,
        "errors": None, "input_file_id": None, "completion_window": fields["completion_window"],
        "status": status, "output_file_id": None, "error_file_id": None,
        "created_at": created, "in_progress_at": at("in_progress_at"),
        "expires_at": created + c.settings.job_ttl_s, "finalizing_at": None,
        "completed_at": at("completed_at"), "failed_at": None, "expired_at": None,
        "cancelling_at": at("cancelling_at"), "cancelled_at": at("cancelled_at"),
        "request_counts": {"total": len(outputs), "completed": completed,
                           "failed": len(done) - completed},
        "metadata": json.loads(fields["metadata"]),
        "links": {"self": url_for("batches.get_batch", batch_id=fields["id"]),
                  "output": url_for("batches.batch_output", batch_id=fields["id"])},
    }
