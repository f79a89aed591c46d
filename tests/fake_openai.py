"""A small real HTTP server that speaks enough of the OpenAI API for the tests.

``POST /v1/chat/completions`` (streamed as SSE ``data:`` chunks ending with ``data: [DONE]``,
or whole), ``POST /v1/embeddings``, ``GET /v1/models``. Every completion is ``REPLY``, one
token per chunk, cut at ``max_tokens``. It checks the bearer key, records every request, and
answers scripted failures: ``script(marker, *answers)`` makes the next requests whose prompt
(last message, or embed input) contains ``marker`` get those answers first, one each: an HTTP
status (an OpenAI-style error body; a 401 echoes the whole key, like a careless upstream),
``"context"`` (400 ``context_length_exceeded``), ``"slow"`` (a long stream, one token every
``SLOW_TOKEN_S``, that notes when its client hangs up), ``"hang"`` (answers after
``HANG_S``), ``"overrun"`` (the whole reply, ``max_tokens`` ignored, as a careless
OpenAI-compatible server might), ``"pairs"`` (two tokens a chunk), ``"truncated"`` (one
token, then the connection closes cleanly: no ``finish_reason``, no ``[DONE]``),
``"garbled"`` (a stream whose second line is not JSON), ``"html"`` (200 with a web page) or
``"short"`` (embeddings: one vector fewer than the texts). A request with
``logprobs`` gets an entry per token (``logprob_of``, ``top_logprobs`` alternatives).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

REPLY = ["Hello", ",", " I", " am", " the", " upstream", "."]
SLOW_TOKENS = 200
SLOW_TOKEN_S = 0.05
HANG_S = 1.5


@dataclass(frozen=True)
class Seen:
    """One request as the server received it."""

    at: float
    path: str
    authorization: str
    body: dict[str, Any]

    @property
    def text(self) -> str:
        if "messages" in self.body:
            return str(self.body["messages"][-1]["content"])
        return str(self.body.get("input", ""))


class FakeOpenAI:
    def __init__(self, key: str) -> None:
        self.key = key
        self.requests: list[Seen] = []
        self.disconnected = threading.Event()  # a slow stream's client hung up
        self.slow_sent = 0  # tokens the last slow stream wrote before it ended
        self._scripts: dict[str, list[int | str]] = {}
        self._lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def script(self, marker: str, *answers: int | str) -> None:
        with self._lock:
            self._scripts[marker] = list(answers)

    def seen(self, marker: str) -> list[Seen]:
        with self._lock:
            return [r for r in self.requests if marker in r.text]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _take(self, seen: Seen) -> int | str | None:
        with self._lock:
            self.requests.append(seen)
            for marker, answers in self._scripts.items():
                if marker in seen.text and answers:
                    return answers.pop(0)
        return None


def _error_body(status: int | str, key: str) -> tuple[int, dict[str, Any]]:
    if status == "context":
        return 400, {"message": "This model's maximum context length is 8 tokens.",
                     "type": "invalid_request_error", "code": "context_length_exceeded"}
    messages = {401: f"Incorrect API key provided: {key}.", 403: "Project lacks access.",
                404: "The model does not exist.", 429: "Rate limit reached.",
                500: "The server had an error."}
    return int(status), {"message": messages.get(int(status), "error"), "type": "error",
                         "code": None}


def _handler(fake: FakeOpenAI) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            if self.path != "/v1/models":
                return self._json(404, {"error": {"message": "no such path"}})
            self._json(200, {"object": "list", "data": [
                {"id": "gpt-4o-mini", "object": "model", "created": 0, "owned_by": "fake"}]})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen = Seen(time.monotonic(), self.path, self.headers.get("Authorization", ""), body)
            answer = fake._take(seen)
            if seen.authorization != f"Bearer {fake.key}":
                answer = 401
            if answer == "hang":
                time.sleep(HANG_S)
            elif answer == "html":
                return self._page()
            elif answer is not None and answer not in ("slow", "overrun", "pairs", "truncated",
                                                       "garbled", "short"):
                status, error = _error_body(answer, fake.key)
                return self._json(status, {"error": error})
            if self.path == "/v1/embeddings":
                return self._embeddings(body, short=answer == "short")
            if self.path != "/v1/chat/completions":
                return self._json(404, {"error": {"message": f"no route {self.path}"}})
            if answer == "slow":
                return self._slow(body)
            if answer in ("truncated", "garbled"):
                self._start_sse()
                self._write(_chunk(body, {"role": "assistant", "content": REPLY[0]}, None))
                if answer == "garbled":
                    self.wfile.write(b"data: {not json\n\n")
                return None
            tokens = REPLY[:None if answer == "overrun" else body.get("max_tokens") or len(REPLY)]
            finish = "length" if len(tokens) < len(REPLY) else "stop"
            usage = {"prompt_tokens": len(seen.text.split()), "completion_tokens": len(tokens),
                     "total_tokens": len(seen.text.split()) + len(tokens)}
            if not body.get("stream"):
                return self._json(200, _completion(body, "".join(tokens), finish, usage))
            step = 2 if answer == "pairs" else 1
            chunks = [_chunk(body, {"role": "assistant", "content": "".join(tokens[i:i + step])},
                             None, tokens[i:i + step]) for i in range(0, len(tokens), step)]
            chunks.append(_chunk(body, {}, finish))
            if (body.get("stream_options") or {}).get("include_usage"):
                chunks.append({**_chunk(body, {}, None), "choices": [], "usage": usage})
            self._sse(chunks)

        def _embeddings(self, body: dict[str, Any], short: bool = False) -> None:
            texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
            words = sum(len(str(text).split()) for text in texts)
            data = [{"object": "embedding", "index": i,
                     "embedding": [float(len(str(text))), 0.5, -0.5]}
                    for i, text in enumerate(texts[:-1] if short else texts)]
            self._json(200, {"object": "list", "model": body["model"], "data": data[::-1],
                             "usage": {"prompt_tokens": words, "total_tokens": words}})

        def _slow(self, body: dict[str, Any]) -> None:
            self._start_sse()
            fake.slow_sent = 0
            try:
                for i in range(SLOW_TOKENS):
                    self._write(_chunk(body, {"content": f" t{i}"}, None))
                    fake.slow_sent = i + 1
                    time.sleep(SLOW_TOKEN_S)
                self._write(_chunk(body, {}, "stop"))
                self.wfile.write(b"data: [DONE]\n\n")
            except (BrokenPipeError, ConnectionResetError):
                fake.disconnected.set()

        def _sse(self, chunks: list[dict[str, Any]]) -> None:
            self._start_sse()
            for chunk in chunks:
                self._write(chunk)
            self.wfile.write(b"data: [DONE]\n\n")

        def _start_sse(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()  # HTTP/1.0: the body ends when the connection closes

        def _write(self, chunk: dict[str, Any]) -> None:
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())

        def _page(self) -> None:
            data = b"<html><body>Service temporarily unavailable</body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _json(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return Handler


def logprob_of(token: str) -> float:
    """The log probability the fake gives ``token`` (its alternatives: that minus 1, 2, ...)."""
    return -0.25 * (REPLY.index(token) + 1) if token in REPLY else -9.0


def _logprobs(body: dict[str, Any], tokens: list[str]) -> dict[str, Any] | None:
    if not body.get("logprobs"):
        return None

    def entry(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "bytes": list(token.encode()), "logprob": logprob}

    return {"content": [{**entry(t, logprob_of(t)), "top_logprobs": [
        entry(f"alt{k}", logprob_of(t) - k - 1) for k in range(body.get("top_logprobs") or 0)]}
        for t in tokens], "refusal": None}


def _chunk(body: dict[str, Any], delta: dict[str, Any], finish: str | None,
           tokens: list[str] = ()) -> dict[str, Any]:
    return {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0,
            "model": body["model"], "usage": None,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                         "logprobs": _logprobs(body, list(tokens)) if tokens else None}]}


def _completion(body: dict[str, Any], text: str, finish: str,
                usage: dict[str, int]) -> dict[str, Any]:
    return {"id": "chatcmpl-fake", "object": "chat.completion", "created": 0,
            "model": body["model"], "usage": usage,
            "choices": [{"index": 0, "finish_reason": finish, "logprobs": None,
                         "message": {"role": "assistant", "content": text}}]}
