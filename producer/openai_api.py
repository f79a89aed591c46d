"""OpenAI-compatible endpoints, mapped onto jobs: ``POST /v1/completions``,
``POST /v1/chat/completions`` and ``POST /v1/embeddings``.

A text request is one generate job per choice (``n``). Streamed answers are plain
``data: {chunk}`` SSE lines (no ``id:`` or ``event:`` fields), ending with ``data: [DONE]``; a
job error becomes one ``data: {"error": {type, message, param, code}}`` line before
``[DONE]``. Bad input is a JSON 4xx before any job is submitted, streamed or not (400 where the
rest of the API says 422, as OpenAI answers: ``producer.errors``).

Each endpoint takes OpenAI's fields for it and refuses any other (a misspelt ``max_token`` must
not run as its default; OpenAI refuses unknown fields too); of OpenAI's fields, those this server
cannot honour are refused when set to anything but their no-op value, and those that do not
change the output (``user``, ``metadata``, ``store``, ...) are accepted and ignored. As on
OpenAI, a request without ``temperature`` samples at 1.0 (the native ``/v1/inference`` and
``/v1/jobs`` are greedy by default).
"""

from __future__ import annotations

import base64
import codecs
import functools
import json
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import replace
from typing import Any

import numpy as np
from flask import Blueprint, after_this_request, jsonify

from banter import errors
from banter.errors import InvalidRequest, JobNotFound, Unavailable
from banter.jobs import JobKind, JobRecord, JobStatus
from banter.params import MAX_LOGPROBS
from banter.streams import EventType
from producer import chat, sse
from producer import validation as v
from producer.context import Context, ctx, trace_id
from producer.inference import (
    client_watch,
    generate_request,
    job_headers,
    keep_running,
    result_body,
    stream_job,
    tag_with_job,
    wait_answer,
)
from producer.service import JobRequest

blueprint = Blueprint("openai", __name__)

DONE = "data: [DONE]\n\n"
OPENAI_TEMPERATURE = 1.0  # OpenAI's default temperature
MAX_CHOICES = 16  # n: choices (one job each) per request
# OpenAI fields this server cannot honour: any value but null and the one each lists is refused.
COMPLETION_UNSUPPORTED = {"suffix": ("",)}
CHAT_UNSUPPORTED = {"tools": ([],),
                    "functions": ([],), "tool_choice": ("none", "auto"),
                    "function_call": ("none", "auto"), "audio": (), "prediction": (),
                    "web_search_options": (), "modalities": (["text"],),
                    "response_format": ({"type": "text"},)}
# OpenAI fields that do not change the output: accepted (null, or of OpenAI's type), ignored.
IGNORED = {"user": str, "metadata": dict, "store": bool, "service_tier": str,
           "parallel_tool_calls": bool, "reasoning_effort": str, "verbosity": str,
           "prompt_cache_key": str, "safety_identifier": str}
TYPE_NAMES = {str: "a string", dict: "an object", bool: "true or false"}
# this server's own: top_k (as vLLM takes it), keep_running (a streamed job outlives its client)
EXTENSIONS = ("top_k", "keep_running")
SAMPLING = ("max_tokens", "temperature", "top_p", "seed", "stop", "presence_penalty",
            "frequency_penalty", "logit_bias")  # OpenAI's, as SamplingParams reads them
COMPLETION_FIELDS = ("model", "prompt", *SAMPLING, "n", "best_of", "logprobs", "echo", "stream",
                     "stream_options", *COMPLETION_UNSUPPORTED, *IGNORED, *EXTENSIONS)
CHAT_FIELDS = ("model", "messages", *SAMPLING, "n", "max_completion_tokens", "logprobs",
               "top_logprobs", "stream", "stream_options", *CHAT_UNSUPPORTED, *IGNORED,
               *EXTENSIONS)
EMBEDDING_FIELDS = ("model", "input", "encoding_format", "dimensions", "user")


class TextShape:
    """How a generate job's text is shaped for ``/v1/completions``; ``echo``: the prompt, put
    before the text (``echo: true``; streamed, as the choice's first chunk)."""

    prefix = "cmpl"
    object = "text_completion"
    chunk_object = "text_completion"

    def __init__(self, index: int = 0, echo: str = "") -> None:
        self.index = index  # the choice's place in the answer (n)
        self.echo = echo
        self.offset = 0  # characters of the choice's text its tokens so far make
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def choice(self, text: str, finish_reason: str | None,
               logprobs: dict | None = None) -> dict[str, Any]:
        return self.chunk_choice(self.echo + text, finish_reason, logprobs)

    def chunk_choice(self, text: str, finish_reason: str | None,
                     logprobs: dict | None = None) -> dict[str, Any]:
        return {"index": self.index, "text": text, "finish_reason": finish_reason,
                "logprobs": logprobs}

    def logprobs(self, entries: list[dict]) -> dict[str, Any]:
        """The legacy ``logprobs`` object of the choice's next ``entries``
        (``workers.engine.token_logprob``): per token its text, log probability, the
        alternatives with the token itself (up to ``logprobs`` + 1, as OpenAI), and where in
        the choice's text it starts (``text_offset``): the characters its tokens' bytes made
        before it, so a token inside a multi-byte character starts where that character does."""
        offsets = []
        for entry in entries:
            offsets.append(self.offset)
            self.offset += len(self.decoder.decode(bytes(entry["bytes"])))
        return {"tokens": [e["token"] for e in entries],
                "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [{**{t["token"]: t["logprob"] for t in e["top_logprobs"]},
                                  e["token"]: e["logprob"]} for e in entries],
                "text_offset": offsets}


class ChatShape(TextShape):
    """How it is shaped for ``/v1/chat/completions``: the first streamed delta carries the
    ``assistant`` role (so one instance serves one stream)."""

    prefix = "chatcmpl"
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def __init__(self, index: int = 0, echo: str = "") -> None:
        super().__init__(index, echo)  # chat takes no echo: always ""
        self.role_sent = False

    def choice(self, text: str, finish_reason: str | None,
               logprobs: dict | None = None) -> dict[str, Any]:
        return {"index": self.index, "message": {"role": "assistant", "content": text},
                "finish_reason": finish_reason, "logprobs": logprobs}

    def chunk_choice(self, text: str, finish_reason: str | None,
                     logprobs: dict | None = None) -> dict[str, Any]:
        delta = {} if self.role_sent else {"role": "assistant"}
        if text:
            delta["content"] = text
        self.role_sent = True
        return {"index": self.index, "delta": delta, "finish_reason": finish_reason,
                "logprobs": logprobs}

    def logprobs(self, entries: list[dict]) -> dict[str, Any]:
        """The chat ``logprobs`` object: per token its text, bytes and log probability, and
        as many alternatives as ``top_logprobs`` asked."""
        def token(entry: dict) -> dict[str, Any]:
            return {"token": entry["token"], "logprob": entry["logprob"], "bytes": entry["bytes"]}

        return {"content": [{**token(e), "top_logprobs": [token(t) for t in e["top_logprobs"]]}
                            for e in entries], "refusal": None}


class Chunks:
    """An ``sse.Formatter`` turning one job's stream into OpenAI chunks: one per token with
    text, a final one with ``finish_reason``, with ``include_usage`` one more with
    ``choices: []`` and ``usage`` (earlier chunks then carry ``usage: null``), then ``[DONE]``.
    With ``alone`` false it formats one choice of several (``n``, ``shape.index``) under the
    answer's ``head`` record: its final event ends only its choice (``usage`` keeps its
    usage; ``merged`` writes the usage chunk and ``[DONE]``), and its error ends the whole
    stream (``sse.Final``; ``failed`` says so)."""

    def __init__(self, shape: TextShape, record: JobRecord, include_usage: bool,
                 alone: bool = True) -> None:
        self.shape = shape
        self.head = {"id": f"{shape.prefix}-{record.id}", "object": shape.chunk_object,
                     "created": int(record.queued_at), "model": record.model}
        self.include_usage = include_usage
        self.alone = alone
        self.usage: dict[str, int] | None = None
        self.failed = False
        self.echoed = not shape.echo

    def __call__(self, entry_id: str, kind: EventType, data: dict) -> str:
        if not self.echoed and kind is not EventType.ERROR:
            self.echoed = True
            return self.chunk([self.shape.chunk_choice(self.shape.echo, None)]) + self(
                entry_id, kind, data)
        if kind is EventType.TOKEN:
            entry = data.get("logprobs")
            if entry is None:
                return self.chunk([self.shape.chunk_choice(data["text"], None)]) if data["text"] else ""
            logprobs = self.shape.logprobs([entry])
            return self.chunk([self.shape.chunk_choice(data["text"], None, logprobs)])
        if kind is EventType.ERROR:
            self.failed = True
            line = sse_data({"error": errors.from_dict(data["error"]).body()})
            return line + DONE if self.alone else sse.Final(line)
        final = self.chunk([self.shape.chunk_choice("", data["finish_reason"])])
        self.usage = data["usage"]
        if not self.alone:
            return final
        if self.include_usage:
            final += self.chunk([], usage_totals(data["usage"]))
        return final + DONE

    def chunk(self, choices: list[dict], usage: dict | None = None) -> str:
        body = {**self.head, "choices": choices}
        if self.include_usage:
            body["usage"] = usage
        return sse_data(body)


def sse_data(body: dict) -> str:
    return f"data: {json.dumps(body)}\n\n"


def usage_totals(usage: dict[str, int], *more: dict[str, int]) -> dict[str, int]:
    """OpenAI's usage of one job, or of several choices of one prompt (``more``): the prompt
    counted once (as the choices that ran counted it: one cancelled before it ran counts
    none), their completions added up."""
    every = (usage, *more)
    prompt = max(u["prompt_tokens"] for u in every)
    completion = sum(u["completion_tokens"] for u in every)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def answer_body(shape: type[TextShape], records: list[JobRecord],
                echo: bool = False) -> dict[str, Any]:
    """The non-streamed answer for finished jobs, the choices of one request in order (with
    ``echo`` each text after its prompt), or raise the typed error of the first that failed."""
    results = [result_body(record) for record in records]
    choices = []
    for index, (record, result) in enumerate(zip(records, results)):
        entries = result.get("logprobs")
        form = shape(index, str(record.input) if echo else "")
        logprobs = None if entries is None else form.logprobs([e for e in entries if e])
        choices.append(form.choice(result["text"], result["finish_reason"], logprobs))
    first = records[0]
    return {"id": f"{shape.prefix}-{first.id}", "object": shape.object,
            "created": int(first.queued_at), "model": first.model, "choices": choices,
            "usage": usage_totals(*(result["usage"] for result in results))}


def flag(body: dict, name: str, label: str | None = None) -> bool:
    """An optional boolean field (null or missing: false)."""
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidRequest(f"'{label or name}' must be true or false", label or name)
    return value


def include_usage(body: dict) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise InvalidRequest("'stream_options' must be an object", "stream_options")
    if not flag(body, "stream"):  # as OpenAI answers
        raise InvalidRequest("'stream_options' is only allowed when 'stream' is true",
                             "stream_options")
    v.defined_fields(options, ("include_usage", "include_obfuscation"), "stream_options",
                     "stream_options")
    # include_obfuscation: checked, then ignored (no chunk carries an obfuscation field)
    flag(options, "include_obfuscation", "stream_options.include_obfuscation")
    return flag(options, "include_usage", "stream_options.include_usage")


def check_fields(body: dict, known: tuple[str, ...], unsupported: dict[str, tuple]) -> None:
    """Refuse a field outside ``known``, and an ``unsupported`` one set to anything but null
    or the no-op values it lists. The ``IGNORED`` ones must still be of OpenAI's type."""
    v.known_fields(body, known)
    v.string(body, "user", max_len=1024, allow_empty=True)
    for name, kind in IGNORED.items():
        if body.get(name) is not None and not isinstance(body[name], kind):
            raise InvalidRequest(f"'{name}' must be {TYPE_NAMES[kind]}", name)
    for name, no_ops in unsupported.items():
        value = body.get(name)
        if value is None or any(_same(value, ok) for ok in no_ops):
            continue
        if name == "response_format":
            raise InvalidRequest("'response_format' other than {\"type\": \"text\"} is not "
                                 "supported: this server returns plain text (no JSON mode)", name)
        raise InvalidRequest(f"'{name}' is not supported by this server"
                             + (f" (only {', '.join(map(json.dumps, no_ops))})" if no_ops else ""),
                             name)


def _same(value: Any, no_op: Any) -> bool:
    """JSON equality: ``0 == 0.0``, but ``false`` is not ``0`` and ``true`` is not ``1``."""
    if isinstance(value, bool) or isinstance(no_op, bool):
        return value is no_op
    return value == no_op


def text_request(c: Context, path: str, body: dict) -> JobRequest:
    """The generate job a ``/v1/completions`` or ``/v1/chat/completions`` body asks for."""
    if path == "/v1/completions":
        check_fields(body, COMPLETION_FIELDS, COMPLETION_UNSUPPORTED)
        best_of(body)
        echo(body)
        prompt = completion_prompt(body, c.settings.max_prompt_chars)
    else:
        check_fields(body, CHAT_FIELDS, CHAT_UNSUPPORTED)
        body = chat_logprobs(chat_max_tokens(body, c.settings.max_tokens_limit))
        prompt = chat_prompt(body, c)
    if body.get("temperature") is None:
        body = {**body, "temperature": OPENAI_TEMPERATURE}
    return generate_request(body, prompt, c)


def completion_prompt(body: dict, max_chars: int) -> str:
    """``prompt``: a string, or a list of exactly one string. Token-id prompts are refused."""
    prompt = body.get("prompt")
    if _token_ids(prompt):
        raise InvalidRequest("'prompt' holds token ids: token-id prompts are not supported, "
                             "send text", "prompt")
    if isinstance(prompt, list):
        for i, item in enumerate(prompt):
            if not isinstance(item, str):
                raise InvalidRequest(f"'prompt[{i}]' must be a string", "prompt")
        if len(prompt) != 1:
            raise InvalidRequest(f"'prompt' must be a string or a list of exactly one string, got "
                                 f"{len(prompt)} items: send one request per prompt", "prompt")
        prompt = prompt[0]
    return v.string({"prompt": prompt}, "prompt", required=True, max_len=max_chars)


def best_of(body: dict) -> None:
    """``best_of`` (completions) must be null or ``n``: every choice made is answered (OpenAI
    refuses one under ``n``; one over it would rank choices this server does not score)."""
    value = v.number(body, "best_of", low=1, high=MAX_CHOICES, integer=True)
    if value is not None and value != choices(body):
        raise InvalidRequest(f"'best_of' must equal 'n' ({choices(body)}): every choice made is "
                             "answered; ask for several choices with 'n'", "best_of")


def echo(body: dict) -> bool:
    """``echo`` (completions): the prompt put before the text. Not with ``logprobs``: OpenAI
    would then give the prompt's tokens their log probabilities, which no pass here computes."""
    wanted = flag(body, "echo")
    if wanted and body.get("logprobs") is not None:
        raise InvalidRequest("'echo' with 'logprobs' is not supported: this server does not "
                             "compute the prompt's log probabilities (send one or the other)",
                             "echo")
    return wanted


def chat_prompt(body: dict, c: Context) -> str:
    """The prompt the model's chat template makes of ``messages`` (see ``producer.chat``)."""
    messages = chat.parse_messages(body)
    ref = v.string(body, "model", max_len=128) or c.jobs.default_model(JobKind.GENERATE)
    model = c.jobs.resolve(ref, JobKind.GENERATE)  # None: served by the openai fallback
    template = chat.template_for(c.settings.model_root, model) if model else chat.ChatTemplate()
    prompt = template.render(messages)
    if len(prompt) > c.settings.max_prompt_chars:
        raise InvalidRequest(f"'messages' make a prompt of {len(prompt)} characters; the limit is "
                             f"{c.settings.max_prompt_chars}", "messages")
    return prompt


def chat_max_tokens(body: dict, limit: int) -> dict:
    """``body`` with ``max_completion_tokens`` (the newer name) moved to ``max_tokens``."""
    value = v.number(body, "max_completion_tokens", low=1, high=limit, integer=True)
    if value is None:
        return body
    if body.get("max_tokens") is not None:
        raise InvalidRequest("'max_tokens' and 'max_completion_tokens' are the same limit: send "
                             "one", "max_completion_tokens")
    return {**body, "max_tokens": value}


def chat_logprobs(body: dict) -> dict:
    """``body`` with chat's ``logprobs`` (true or false) and ``top_logprobs`` (0 to
    MAX_LOGPROBS, only with ``logprobs``) made the one count a job takes: ``logprobs`` = the
    alternatives per token, left out when not asked for."""
    wanted = flag(body, "logprobs")
    top = v.number(body, "top_logprobs", low=0, high=MAX_LOGPROBS, integer=True)
    if top and not wanted:
        raise InvalidRequest("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    rest = {k: value for k, value in body.items() if k not in ("logprobs", "top_logprobs")}
    if wanted:
        rest["logprobs"] = int(top or 0)
    return rest


def choices(body: dict) -> int:
    """``n``: how many choices (1 to MAX_CHOICES; null: 1)."""
    return int(v.number(body, "n", low=1, high=MAX_CHOICES, integer=True) or 1)


def choice_requests(request: JobRequest, n: int) -> list[JobRequest]:
    """One generate job per choice. With a ``seed`` choice i samples with ``seed + i`` (wrapped
    into int64), so the choices differ and the same request gets the same choices; without
    one each job draws its own. Greedy choices are alike."""
    seed = (request.params or {}).get("seed")
    if seed is None:
        return [request] * n
    return [replace(request, params={**request.params,
                                     "seed": (seed + i + 2**63) % 2**64 - 2**63})
            for i in range(n)]


def run_text_job(c: Context, path: str, shape: type[TextShape]):
    """Submit the request's generate jobs (one per choice, ``n``), then stream them as chunks
    or wait and answer them whole."""
    owner = c.owner()
    body = c.body()
    request = text_request(c, path, body)
    echoed = str(request.input) if path == "/v1/completions" and echo(body) else ""
    n = choices(body)
    stream = flag(body, "stream")
    usage = include_usage(body)
    keep = keep_running(body)
    c.hold_wait(owner)
    if n > 1:
        return run_choices(c, choice_requests(request, n), owner, shape, stream, usage, keep,
                           echoed)
    form = shape(0, echoed)
    record, _ = c.jobs.submit(request, owner, trace_id(), waited=True)
    tag_with_job(record)
    if stream:
        lost = Unavailable(f"the stream lost Redis; job {record.id} goes on: follow it with GET "
                           f"/v1/jobs/{record.id}/events (resumable) or poll GET "
                           f"/v1/jobs/{record.id}")
        return stream_job(c, record, owner, keep, Chunks(form, record, usage),
                          interrupted=sse_data({"error": lost.body()}) + DONE,
                          gone=sse_data({"error": job_gone(record.id).body()}) + DONE)
    record = wait_answer(c, record, owner, client_watch(), keep)
    response = jsonify(answer_body(shape, [record], bool(echoed)))
    response.headers.update(job_headers([record]))
    return response


def run_choices(c: Context, requests: list[JobRequest], owner: str, shape: type[TextShape],
                stream: bool, usage: bool, keep: bool, echoed: str):
    """``run_text_job`` for n > 1: every choice's job submitted (a refusal part way cancels
    those before it), ``X-Job-ID`` the first, ``X-Job-IDs`` all in choice order; a client that
    leaves cancels them all unless ``keep``. ``echoed``: the prompt each text is put after."""
    records = c.jobs.submit_all(requests, owner, trace_id(), waited=True)

    def cancel_all() -> None:
        c.jobs.cancel_all(records, owner)

    tag_with_job(records[0])
    ids = ",".join(record.id for record in records)

    @after_this_request
    def tag_all(response):  # errors too: a 504's jobs go on, and can be polled by id
        response.headers["X-Job-IDs"] = ids
        return response

    if stream:
        failed = sse.early_error(c.redis, records[0].id)  # one prompt: the same for every job
        if failed is not None:
            cancel_all()
            raise failed
        lost = Unavailable(f"the stream lost Redis; jobs {ids} go on: follow each with GET "
                           "/v1/jobs/{id}/events (resumable) or poll GET /v1/jobs/{id}")
        formats = [Chunks(shape(i, echoed), records[0], usage, alone=False)
                   for i in range(len(records))]
        # the first stream that cannot go on ends the answer with its error line (jobs go on)
        streams = [sse.events(c.redis, record.id, "0-0", fmt,
                              on_idle=functools.partial(c.jobs.get, record.id, owner),
                              interrupted=sse.Final(sse_data({"error": lost.body()})),
                              gone=sse.Final(sse_data({"error": job_gone(record.id).body()})))
                   for record, fmt in zip(records, formats)]

        def end() -> str:  # a failed choice fails the answer: the others are stopped
            if any(f.failed for f in formats):
                cancel_all()
            return _last_chunks(formats, usage)

        merged = sse.merged(streams, end)
        if not keep:
            merged = sse.cancel_on_disconnect(merged, cancel_all)
        return sse.response(merged, {"X-Backend": records[0].backend or ""})
    gone = client_watch()
    with ThreadPoolExecutor(max_workers=len(records)) as pool:
        waits = [pool.submit(wait_answer, c, record, owner, gone, keep) for record in records]
        for done in as_completed(waits):  # a failed choice fails the answer: stop the rest
            if done.exception() is None and done.result().status == JobStatus.FAILED.value:
                cancel_all()
    finished = [wait.result() for wait in waits]  # a 504 or 499 is raised here
    response = jsonify(answer_body(shape, finished, bool(echoed)))
    response.headers.update(job_headers(finished))
    return response


def job_gone(job_id: str) -> JobNotFound:
    return JobNotFound(f"job {job_id} is gone from Redis (its record expired after "
                       "BANTER_JOB_TTL_S, or Redis lost it): its answer cannot be read")


def _last_chunks(formats: list[Chunks], usage: bool) -> str:
    """What ends a stream of several choices: with ``include_usage`` the usage of them all
    (when every choice finished), then ``[DONE]``."""
    finished = [f.usage for f in formats]
    if usage and all(u is not None for u in finished):
        return formats[0].chunk([], usage_totals(*finished)) + DONE  # type: ignore[arg-type]
    return DONE


@blueprint.post("/v1/completions")
def completions():
    """OpenAI ``completions.create``. One prompt per request: ``prompt`` is a string or a list
    of exactly one string (token ids are refused); ``n`` choices, one job each; ``best_of``
    must be null or ``n``; ``echo`` puts the prompt before each text (not with ``logprobs``);
    ``suffix`` is refused; ``user`` is ignored. ``model`` defaults to the default generate
    model. ``keep_running: true`` (an extension) keeps the job going after its client
    disconnects; otherwise a disconnect cancels it, streamed or not."""
    return run_text_job(ctx(), "/v1/completions", TextShape)


@blueprint.post("/v1/chat/completions")
def chat_completions():
    """OpenAI ``chat.completions.create``: ``messages`` (system, user or assistant; text
    content only) become one prompt by the model's chat template (``producer.chat``);
    ``max_completion_tokens`` is ``max_tokens``; otherwise as ``/v1/completions``."""
    return run_text_job(ctx(), "/v1/chat/completions", ChatShape)


@blueprint.post("/v1/embeddings")
def embeddings():
    """OpenAI ``embeddings.create``: ``input`` is a string or a list of strings (at most
    BANTER_EMBED_MAX_INPUTS), embedded as one job; ``encoding_format`` ``float`` (default) or
    ``base64``."""
    c = ctx()
    owner = c.owner()
    req, encoding = embed_request(c, c.body())
    c.hold_wait(owner)
    record, _ = c.jobs.submit(req, owner, trace_id(), waited=True)
    tag_with_job(record)
    record = wait_answer(c, record, owner, client_watch())
    if record.status == JobStatus.CANCELLED.value:
        raise errors.JobCancelled(f"job {record.id} was cancelled before it finished")
    if record.status == JobStatus.EXPIRED.value:
        raise errors.JobExpired(f"job {record.id} passed its deadline before it finished")
    if record.status != JobStatus.SUCCEEDED.value:
        raise errors.from_dict(record.error or {"type": "inference_error",
                                                "message": f"job {record.id} failed"})
    response = jsonify(embeddings_body(record, base64_floats=encoding == "base64"))
    response.headers.update(job_headers([record]))
    return response


def _token_ids(value: Any) -> bool:
    """Whether ``value`` is OpenAI's token-id input: a list of ints, or a list of such lists
    (anything else that is not text is refused by the text checks, naming the item)."""
    def ids(items: Any) -> bool:
        return isinstance(items, list) and bool(items) and all(
            isinstance(i, int) and not isinstance(i, bool) for i in items)

    return ids(value) or (isinstance(value, list) and bool(value) and all(map(ids, value)))


def embed_request(c: Context, body: dict) -> tuple[JobRequest, str]:
    """The embed job a ``/v1/embeddings`` body asks for, and its ``encoding_format``."""
    check_fields(body, EMBEDDING_FIELDS, {})
    if _token_ids(body.get("input")):
        raise InvalidRequest("'input' holds token ids: token-id inputs are not supported, send "
                             "text", "input")
    text = v.embed_input(body, "input", max_items=c.settings.embed_max_inputs,
                         max_len=c.settings.max_prompt_chars)
    encoding = v.choice(body, "encoding_format", ("float", "base64"), "float")
    if body.get("dimensions") is not None:
        raise InvalidRequest("'dimensions' is not supported by this server: the vectors have "
                             "the model's own size", "dimensions")
    return JobRequest(JobKind.EMBED, text, v.string(body, "model", max_len=128)), encoding


def embeddings_body(record: JobRecord, base64_floats: bool) -> dict[str, Any]:
    """OpenAI's embeddings answer for a succeeded embed job, in input order."""
    vectors = record.embeddings()
    if base64_floats:
        vectors = [base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
                   for vector in vectors]
    data = [{"object": "embedding", "index": index, "embedding": vector}
            for index, vector in enumerate(vectors)]
    prompt_tokens = record.usage["prompt_tokens"]
    return {"object": "list", "data": data, "model": record.model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}
