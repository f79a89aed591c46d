"""``/v1/jobs``: submit, poll, cancel, and follow a job's events."""

from __future__ import annotations

import uuid

from flask import Blueprint, jsonify, url_for

from banter.errors import InvalidRequest, JobNotFound
from banter.jobs import JobKind, JobRecord, Lane
from banter.params import SamplingParams
from banter.settings import Settings
from banter.streams import ended_by
from producer import sse
from producer import validation as v
from producer.context import ctx, trace_id
from producer.service import JobRequest

blueprint = Blueprint("jobs", __name__)


def job_request(body: dict, settings: Settings) -> JobRequest:
    """``input`` is a text; an embed job may carry a list of texts instead (at most
    BANTER_EMBED_MAX_INPUTS), embedded in order into ``result.embeddings``."""
    kind = JobKind(v.choice(body, "kind", tuple(k.value for k in JobKind), ""))
    v.known_fields(body, JOB_FIELDS)
    params = body.get("params")
    if params is not None and not isinstance(params, dict):
        raise InvalidRequest("'params' must be an object", "params")
    if params and kind is JobKind.GENERATE:  # checked again when submitted; here for its names
        try:
            SamplingParams.from_dict(params, settings.max_tokens_limit)
        except InvalidRequest as exc:  # the sampling fields sit under 'params' here
            raise InvalidRequest(exc.message, f"params.{exc.param}") from None
    max_chars = settings.max_prompt_chars
    if kind is JobKind.EMBED:
        text = v.embed_input(body, "input", max_items=settings.embed_max_inputs,
                             max_len=max_chars)
    else:
        text = v.string(body, "input", required=True, max_len=max_chars)
    return JobRequest(
        kind=kind,
        input=text,
        model=v.string(body, "model", max_len=128),
        params=params,
        lane=Lane(v.choice(body, "lane", tuple(lane.value for lane in Lane), "interactive")),
        idempotency_key=v.string(body, "idempotency_key", max_len=128),
        deadline_s=v.number(body, "deadline_s", low=0.001, high=86400),
    )


JOB_FIELDS = ("kind", "input", "model", "params", "lane", "idempotency_key", "deadline_s")


def links(job_id: str) -> dict[str, str]:
    return {"self": url_for("jobs.get_job", job_id=job_id),
            "events": url_for("jobs.job_events", job_id=job_id)}


def checked_id(job_id: str) -> str:
    try:
        return str(uuid.UUID(job_id))
    except ValueError:
        raise JobNotFound(f"no job {job_id!r}") from None


@blueprint.post("/v1/jobs")
def submit_job():
    c = ctx()
    owner = c.owner()
    req = job_request(c.body(), c.settings)
    record, created = c.jobs.submit(req, owner, trace_id())
    body = {"id": record.id, "status": record.status, "links": links(record.id)}
    return jsonify(body), 202 if created else 200


@blueprint.get("/v1/jobs/<job_id>")
def get_job(job_id: str):
    c = ctx()
    return jsonify(c.jobs.get(checked_id(job_id), c.owner()).to_public())


@blueprint.delete("/v1/jobs/<job_id>")
def cancel_job(job_id: str):
    c = ctx()
    record: JobRecord = c.jobs.cancel(checked_id(job_id), c.owner())
    return jsonify(record.to_public())


@blueprint.get("/v1/jobs/<job_id>/events")
def job_events(job_id: str):
    c = ctx()
    owner = c.owner()
    record = c.jobs.get(checked_id(job_id), owner)
    after = sse.resume_point()
    if ended_by(c.redis, record.id, after):  # resumed at or past the final event
        return "", 204  # EventSource does not reconnect after a 204
    c.hold_wait(owner)
    return sse.response(sse.events(c.redis, record.id, after,
                                   on_idle=lambda: c.jobs.get(record.id, owner)))
