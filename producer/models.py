"""``/v1/models``: the OpenAI-style list of active models and the registry admin endpoints."""

from __future__ import annotations

from datetime import datetime

from flask import Blueprint, jsonify, request
from werkzeug.routing import BaseConverter

from banter.errors import InvalidRequest, ModelNotFound
from producer import validation as v
from producer.context import ctx
from registry.records import RESERVED_NAMES, Record

blueprint = Blueprint("models", __name__)


class ModelId(BaseConverter):
    """A model id in ``/v1/models/<id>``: any path segment but the registry's POST endpoints,
    so that another method there answers 405 with ``Allow: POST`` instead of meeting the GET
    route (``history``, the third reserved name, is a static route, matched first)."""

    regex = "(?!(?:" + "|".join(n for n in RESERVED_NAMES if n != "history") + ")$)[^/]+"


blueprint.record_once(lambda state: state.app.url_map.converters.setdefault("model_id", ModelId))


@blueprint.get("/v1/models")
def list_models():
    c = ctx()
    c.owner()
    return jsonify({"object": "list", "data": [model_object(r) for r in c.registry.list_active()]})


@blueprint.get("/v1/models/<model_id:model_id>")
def retrieve_model(model_id: str):
    """OpenAI ``models.retrieve``: one active model, as ``/v1/models`` lists it; ``name@version``
    (as a request's ``model`` may pin it) answers that version, active or not."""
    c = ctx()
    c.owner()
    try:
        record = c.registry.resolve(model_id)
    except (InvalidRequest, ModelNotFound):
        raise ModelNotFound(f"no model {model_id!r}: GET /v1/models lists the active ones",
                            "model") from None
    return jsonify({**model_object(record), "id": model_id})


PUBLIC_FIELDS = ("name", "kind", "version", "backend", "upstream_model", "ref")


def model_object(record: Record) -> dict:
    """A model as OpenAI lists one, with its registry ``kind``, ``version``, ``backend``,
    ``upstream_model`` and ``ref``; where its artifact lies and who promoted it are for
    admins (``/v1/models/history``)."""
    public = record.to_public()
    return {"id": record.name, "object": "model", "owned_by": "banterhearts",
            "created": int(datetime.fromisoformat(record.time).timestamp()),
            **{k: public[k] for k in PUBLIC_FIELDS}}


@blueprint.get("/v1/models/history")
def history():
    c = ctx()
    c.owner(admin=True)
    name = request.args.get("name") or None
    return jsonify({"object": "list",
                    "data": [r.to_public() for r in c.registry.history(name)]})


@blueprint.post("/v1/models/promote")
def promote():
    c = ctx()
    actor = c.owner(admin=True)
    body = c.body()
    v.known_fields(body, ("name", "kind", "path", "backend", "model", "reason"),
                   {"upstream_model": "the upstream model's name goes in 'model'"})
    backend = v.choice(body, "backend", ("onnx", "openai"), "onnx")
    record, created = c.registry.promote(
        name=v.string(body, "name", required=True, max_len=64),
        kind=v.choice(body, "kind", ("generate", "embed"), ""),
        path=v.string(body, "path", required=backend == "onnx", default="", max_len=1024),
        backend=backend,
        upstream_model=v.string(body, "model", max_len=128),
        actor=actor,
        reason=v.string(body, "reason", default="", max_len=512, allow_empty=True) or "",
    )
    return jsonify(record.to_public()), 201 if created else 200


@blueprint.post("/v1/models/rollback")
def rollback():
    c = ctx()
    actor = c.owner(admin=True)
    body = c.body()
    v.known_fields(body, ("name", "reason"))
    name = v.string(body, "name", required=True, max_len=64)
    if name is None:
        raise InvalidRequest("'name' is required", "name")
    reason = v.string(body, "reason", default="", max_len=512, allow_empty=True) or ""
    return jsonify(c.registry.rollback(name, actor=actor, reason=reason).to_public())
