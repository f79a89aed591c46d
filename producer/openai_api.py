"""OpenAI-compatible endpoints, mapped onto jobs: ``POST /v1/embeddings``."""

from __future__ import annotations

import base64
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from flask import Blueprint, jsonify

from banter import errors
from banter.errors import InvalidRequest
from banter.jobs import JobKind, JobStatus
from producer import validation as v
from producer.context import ctx, trace_id
from producer.inference import job_headers
from producer.service import JobRequest

blueprint = Blueprint("openai", __name__)


@blueprint.post("/v1/embeddings")
def embeddings():
    """OpenAI ``embeddings.create``: ``input`` is a string or a list of strings (at most
    BANTER_INFERENCE_MAX_BATCH_SIZE); ``encoding_format`` ``float`` (default) or ``base64``."""
    c = ctx()
    owner = c.owner()
    body = c.body()
    raw = body.get("input")
    texts = [raw] if isinstance(raw, str) else raw
    body = {**body, "input": texts}
    texts = v.string_list(body, "input", max_items=c.settings.inference_max_batch_size,
                          max_len=c.settings.max_prompt_chars)
    encoding = v.choice(body, "encoding_format", ("float", "base64"), "float")
    if body.get("dimensions") is not None:
        raise InvalidRequest("'dimensions' is not supported by this server")
    model = v.string(body, "model", max_len=128)
    submitted = [c.jobs.submit(JobRequest(JobKind.EMBED, text, model), owner, trace_id())[0]
                 for text in texts]
    with ThreadPoolExecutor(max_workers=len(submitted)) as pool:
        records = list(pool.map(lambda r: c.jobs.wait(r.id), submitted))
    data = []
    for index, record in enumerate(records):
        if record.status != JobStatus.SUCCEEDED.value:
            raise errors.from_dict(record.error or {"type": record.status,
                                                    "message": f"job {record.status}"})
        vector = record.result["embedding"]
        if encoding == "base64":
            vector = base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
        data.append({"object": "embedding", "index": index, "embedding": vector})
    prompt_tokens = sum(r.usage["prompt_tokens"] for r in records)
    response = jsonify({"object": "list", "data": data, "model": records[0].model,
                        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}})
    response.headers.update(job_headers(records))
    return response
