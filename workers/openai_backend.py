"""The openai backend: jobs served by an OpenAI-compatible API through the official client.

One ``OpenAIBackend`` per worker process, shared by its task threads: one ``openai.OpenAI``
client (its connection pool is thread-safe) and a semaphore that keeps at most
``Settings.openai_concurrency`` upstream requests in flight (a job waits for a slot).

- generate: ``chat.completions`` with ``stream=True``; the job's prompt is the one user
  message, ``max_tokens`` is capped at ``Settings.openai_max_tokens``, ``top_k`` is not sent
  (the API has none). Each delta is published as one token event (``seq`` from 0, ``text`` the
  delta, ``token_id`` -1: the upstream sends no token ids). A job that asks for ``logprobs``
  asks the upstream for them (``top_logprobs`` that many) and gets one token event per token
  the upstream scored, carrying its entry in the engine's shape (``token_id`` -1); the delta's
  text goes with its tokens' texts when they spell it, else whole with its first token.
  Cancellation and the job's deadline are checked at every delta; stopping closes the upstream
  response.
- embed: ``embeddings.create`` (``encoding_format="float"``).

429, 5xx, timeouts and connection errors are retried by the client (exponential backoff from
0.5 s, up to ``Settings.openai_max_retries`` times); what is left becomes a typed error from
``banter.errors``. The key goes to the client and nowhere else: upstream messages are cut
and scrubbed of it before they reach an error.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import openai

from banter.errors import (
    PromptTooLong,
    UpstreamAuthError,
    UpstreamError,
    UpstreamModelNotFound,
    UpstreamTimeout,
)
from banter.jobs import JobRecord, embed_result
from banter.params import SamplingParams
from banter.settings import Settings
from banter.streams import StreamWriter, TokenEvent
from workers.backends import Outcome

NO_TOKEN_ID = -1
DEFAULT_BASE_URL = "https://api.openai.com/v1"
MESSAGE_CHARS = 300  # how much of an upstream error message an error keeps
SLOT_POLL_S = 0.2  # a job waiting for an upstream slot checks its cancellation and deadline


class OpenAIBackend:
    """Runs generate and embed jobs upstream; ``cancel`` may be called from any thread."""

    def __init__(self, settings: Settings, streams: StreamWriter) -> None:
        self.settings = settings
        self.streams = streams
        self.client = openai.OpenAI(api_key=settings.openai_key,
                                    base_url=settings.openai_base_url or DEFAULT_BASE_URL,
                                    timeout=settings.openai_timeout_s,
                                    max_retries=settings.openai_max_retries)
        self._slots = threading.BoundedSemaphore(settings.openai_concurrency)
        self._lock = threading.Lock()
        self._stops: dict[str, threading.Event] = {}  # generate jobs in this process

    def cancel(self, job_id: str) -> bool:
        """Stop a generate job at its next delta (a job waiting for a slot never sends its
        request). False when this backend is not running the job."""
        with self._lock:
            stop = self._stops.get(job_id)
        if stop is None:
            return False
        stop.set()
        return True

    def generate(self, job: JobRecord, model: str,
                 cancel_requested: Callable[[], bool]) -> Outcome:
        """Stream ``job``'s completion from upstream ``model`` into its token stream.
        ``cancel_requested`` is asked once the job is cancellable, so a cancellation
        published before that is not lost."""
        params = SamplingParams.from_dict(job.params, self.settings.max_tokens_limit)
        stop = threading.Event()
        with self._lock:
            self._stops[job.id] = stop
        try:
            if cancel_requested():
                stop.set()
            while not self._slots.acquire(timeout=SLOT_POLL_S):  # all taken: keep checking
                stopped = _stopped(job, stop)
                if stopped:
                    return _text_outcome([], params.logprobs is not None, None, stopped)
            try:
                return self._stream(job, model, params, stop)
            finally:
                self._slots.release()
        finally:
            with self._lock:
                self._stops.pop(job.id, None)

    def embed(self, job: JobRecord, model: str) -> Outcome:
        """The embedding of ``job.input`` (a text, or a list of texts) from upstream ``model``."""
        texts = job.input if isinstance(job.input, list) else [job.input]
        with self._slots, self._errors(model):
            answer = self.client.embeddings.create(model=model, input=job.input,
                                                   encoding_format="float")
            prompt_tokens = answer.usage.prompt_tokens if answer.usage else 0
            data = sorted(answer.data, key=lambda d: d.index)
            indexes = [d.index for d in data]
            if indexes != list(range(len(texts))):
                raise UpstreamError(f"the upstream answered {len(data)} embeddings (indexes "
                                    f"{indexes[:8]}) for {len(texts)} inputs")
            vectors = [[float(x) for x in d.embedding] for d in data]
        return Outcome(result=embed_result(job.input, vectors),
                       finish_reason="stop",
                       usage={"prompt_tokens": prompt_tokens, "completion_tokens": 0},
                       batch_size=1, backend="openai", version=None)

    def _stream(self, job: JobRecord, model: str, params: SamplingParams,
                stop: threading.Event) -> Outcome:
        scored = params.logprobs is not None
        if stop.is_set():
            return _text_outcome([], scored, None, "cancelled")
        tokens: list[TokenEvent] = []
        usage = finish = None
        request = self._chat_request(job, model, params)
        with self._errors(model), self.client.chat.completions.create(
                **request) as stream:  # closed on leaving
            for chunk in stream:
                stopped = _stopped(job, stop)
                if stopped:
                    finish = stopped
                    break
                usage = chunk.usage or usage
                pieces = [piece for choice in chunk.choices for piece in _pieces(choice, scored)]
                if len(tokens) + len(pieces) > request["max_tokens"]:
                    # a delta is a token or more: an upstream past the limit is cut there
                    finish, usage = "length", None
                    break
                events = [TokenEvent(job.id, len(tokens) + i, text, NO_TOKEN_ID, entry)
                          for i, (text, entry) in enumerate(pieces)]
                if events:
                    self.streams.publish(events)
                    tokens.extend(events)
                finish = next((c.finish_reason for c in chunk.choices if c.finish_reason), finish)
        if finish is None:  # the connection closed, cleanly, before the answer's end
            raise UpstreamError(f"the upstream's stream ended after {len(tokens)} tokens "
                                "without a finish_reason: its answer was cut short")
        return _text_outcome(tokens, scored, usage, finish)

    def _chat_request(self, job: JobRecord, model: str, params: SamplingParams) -> dict[str, Any]:
        request: dict[str, Any] = {
            "model": model, "messages": [{"role": "user", "content": job.input}],
            "max_tokens": min(params.max_tokens, self.settings.openai_max_tokens),
            "temperature": params.temperature, "top_p": params.top_p,
            "stream": True, "stream_options": {"include_usage": True}}
        if params.seed is not None:
            request["seed"] = params.seed
        if params.stop:
            request["stop"] = list(params.stop)
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(params, name):
                request[name] = getattr(params, name)
        if params.logit_bias:  # token ids of the upstream model's tokenizer, as the client sent
            request["logit_bias"] = params.wire()["logit_bias"]
        if params.logprobs is not None:
            request["logprobs"] = True
            request["top_logprobs"] = params.logprobs
        return request

    @contextmanager
    def _errors(self, model: str) -> Iterator[None]:
        """Turn what the client raises (after its retries) into typed errors, unchained: the
        client's exception may quote the key (an upstream echoing it), tracebacks must not."""
        try:
            yield
        except openai.APITimeoutError:
            raise UpstreamTimeout(
                f"the upstream did not answer within {self.settings.openai_timeout_s:g}s "
                f"(BANTER_OPENAI_TIMEOUT_S), {self.settings.openai_max_retries} retries "
                "included") from None
        except openai.APIConnectionError as exc:
            raise UpstreamError(f"cannot reach the upstream at {self.client.base_url}: "
                                f"{self._said(exc)}") from None
        except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
            raise UpstreamAuthError(
                f"the upstream refused the OpenAI key ({exc.status_code}): check "
                f"BANTER_OPENAI_KEY or OPENAI_API_KEY; upstream said: {self._said(exc)}") from None
        except openai.NotFoundError as exc:
            raise UpstreamModelNotFound(
                f"the upstream does not serve model {model!r} (404): promote the name with "
                f"another --model or set BANTER_OPENAI_MODEL; upstream said: "
                f"{self._said(exc)}") from None
        except openai.BadRequestError as exc:
            if exc.code == "context_length_exceeded":
                raise PromptTooLong(f"the prompt is longer than upstream model {model!r} "
                                    f"accepts: {self._said(exc)}") from None
            raise UpstreamError(f"the upstream refused the request (400): "
                                f"{self._said(exc)}") from None
        except (openai.RateLimitError, openai.InternalServerError) as exc:
            raise UpstreamError(f"the upstream answered {exc.status_code} after "
                                f"{self.settings.openai_max_retries} retries "
                                f"(BANTER_OPENAI_MAX_RETRIES): {self._said(exc)}") from None
        except openai.APIStatusError as exc:
            raise UpstreamError(f"the upstream answered {exc.status_code}: "
                                f"{self._said(exc)}") from None
        except openai.APIError as exc:  # an error event inside the stream
            raise UpstreamError(f"the upstream failed: {self._said(exc)}") from None
        except (ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
            # a body that is not the JSON of its answer: an HTML page, a torn SSE line,
            # fields of the wrong type
            raise UpstreamError(f"the upstream sent an answer this server cannot read "
                                f"({type(exc).__name__}: {self._scrub(str(exc))})") from None

    def _said(self, exc: openai.APIError) -> str:
        """The upstream's own message, cut short, with the key scrubbed out."""
        body = exc.body if isinstance(exc.body, dict) else {}
        return self._scrub(str(body.get("message") or exc.message))

    def _scrub(self, text: str) -> str:
        key = self.settings.openai_key
        return (text.replace(key, "[redacted]") if key else text)[:MESSAGE_CHARS]


def _pieces(choice: Any, scored: bool) -> list[tuple[str, dict | None]]:
    """What one upstream choice delta publishes: ``(text, logprobs entry)`` per token event.
    Unscored, its text as one event (none for no text). Scored, one event per token the
    upstream sent an entry for, each with its token's text when those spell the delta (else
    the first with the whole delta, the rest with none); a delta without entries (a server that
    sends none) is one event with no entry."""
    text = choice.delta.content or ""
    entries = [_entry(e) for e in (choice.logprobs.content or [])] if (
        scored and choice.logprobs is not None) else []
    if not entries:
        return [(text, None)] if text else []
    texts = [e["token"] for e in entries]
    if "".join(texts) != text:
        texts = [text] + [""] * (len(entries) - 1)
    return list(zip(texts, entries))


def _entry(scored: Any) -> dict[str, Any]:
    """An upstream ``ChatCompletionTokenLogprob`` in the engine's shape
    (``workers.engine.token_logprob``), ``token_id`` -1: the upstream sends no ids."""
    def token(t: Any) -> dict[str, Any]:
        raw = t.bytes if t.bytes is not None else list(t.token.encode())
        return {"token_id": NO_TOKEN_ID, "token": t.token, "bytes": raw, "logprob": t.logprob}

    return {**token(scored), "top_logprobs": [token(t) for t in scored.top_logprobs or []]}


def _text_outcome(tokens: list[TokenEvent], scored: bool, usage: Any, finish: str) -> Outcome:
    """A generate outcome (with ``scored`` one logprobs entry per token event); without
    upstream usage (cancelled early, or a server that does not send it) prompt tokens are 0
    and completion tokens the number of token events."""
    result: dict[str, Any] = {"text": "".join(t.text for t in tokens), "finish_reason": finish}
    if scored:
        result["logprobs"] = [t.logprobs for t in tokens]
    return Outcome(result=result, finish_reason=finish,
                   usage={"prompt_tokens": usage.prompt_tokens if usage else 0,
                          "completion_tokens": usage.completion_tokens if usage
                          else len(tokens)},
                   batch_size=1, backend="openai", version=None)


def _stopped(job: JobRecord, stop: threading.Event) -> str | None:
    """``cancelled`` or ``expired`` when the job must stop before its next delta."""
    if stop.is_set():
        return "cancelled"
    if job.deadline_at is not None and time.time() >= job.deadline_at:
        return "expired"
    return None
