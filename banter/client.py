"""A small HTTP client for the CLI's client commands (submit, stream, models, bulk).

Whatever a ``--url`` answers that is not a banterhearts producer's answer (another server's
page, an error with no banterhearts error body, JSON of another shape, a proxy's 502) is
``Unavailable`` naming the URL, as an unreachable server is: never a traceback. So is a server
that does not connect within CONNECT_TIMEOUT_S, or sends nothing for ``timeout_s`` (a hung
server: a stream's keep-alive comments count as something).
"""

from __future__ import annotations

import json
from typing import Any, Iterator

import requests
import urllib3

from banter.errors import BanterError, Unavailable, from_dict

CONNECT_TIMEOUT_S = 10.0
DEFAULT_TIMEOUT_S = 300.0

# what each token or final event's data must hold for the CLI to print it: (path, type)
EVENT_FIELDS = {"token": [(("text",), str)], "done": [(("finish_reason",), str)],
                "error": [(("error", "type"), str), (("error", "message"), str)]}


def sse_events(response: requests.Response) -> Iterator[tuple[str, Any]]:
    """``(event, data)`` of a banterhearts SSE response (``event:``/``data:`` lines, JSON
    data), each yielded as soon as its blank line arrives; comments are skipped."""
    event, data = "message", []
    response.encoding = "utf-8"  # an event stream always is (the SSE spec); requests would
    # take a text/* type without a charset for ISO-8859-1
    for line in response.iter_lines(chunk_size=None, decode_unicode=True):
        if line == "":
            if data:
                yield event, _json(response, "\n".join(data))
            event, data = "message", []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())


def _json(response: requests.Response, text: str | None = None) -> Any:
    """``text`` (default: the response's body) as JSON; Unavailable when it is not."""
    try:
        return json.loads(response.text if text is None else text)
    except ValueError:
        raise not_a_producer(response.url, f"HTTP {response.status_code} with a body that is "
                             "not JSON") from None


def _timed_out(exc: requests.RequestException) -> bool:
    """A read that waited ``timeout_s`` for its next byte: before the answer's headers
    (ReadTimeout), or in its body (requests wraps urllib3's ReadTimeoutError in a
    ConnectionError there)."""
    return isinstance(exc, requests.ReadTimeout) or bool(
        exc.args and isinstance(exc.args[0], urllib3.exceptions.ReadTimeoutError))


def _reason(exc: BaseException) -> str:
    """The cause at the bottom of requests' and urllib3's wrapping (``Connection refused``,
    ``Name or service not known``), else ``exc`` itself."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror
        cause = _inner(cause)
    return str(exc)


def _inner(exc: BaseException) -> BaseException | None:
    reason = getattr(exc, "reason", None)  # urllib3's MaxRetryError
    if isinstance(reason, BaseException):
        return reason
    if exc.args and isinstance(exc.args[0], BaseException):  # requests' ConnectionError
        return exc.args[0]
    return exc.__cause__ or exc.__context__


def not_a_producer(url: str, answered: str) -> Unavailable:
    return Unavailable(f"{url} answered {answered}, not what a banterhearts producer answers: "
                       "is --url (or BANTER_URL) the producer's base URL, e.g. "
                       "http://127.0.0.1:8000?")


class Client:
    def __init__(self, url: str, api_key: str | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.url = url.rstrip("/")
        self.session = requests.Session()
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"
        self.timeout_s = timeout_s

    def request(self, method: str, path: str, body: dict | None = None,
                params: dict | None = None) -> dict[str, Any]:
        return self.answer(method, path, body, params)[1]

    def answer(self, method: str, path: str, body: dict | None = None,
               params: dict | None = None) -> tuple[int, dict[str, Any]]:
        """A successful answer's HTTP status and JSON object."""
        response = self._send(method, path, body, params, stream=False)
        out = _json(response)
        if not isinstance(out, dict):
            raise not_a_producer(response.url, f"HTTP {response.status_code} with JSON that is "
                                 "not an object")
        return response.status_code, out

    def field(self, body: Any, *path: str | int, of: type | tuple[type, ...] = object) -> Any:
        """``body[path[0]][path[1]]...`` of an answer from this server, an instance of ``of``;
        Unavailable naming the URL when the answer does not hold one."""
        value = body
        shown = "".join(f"[{step!r}]" for step in path)
        for step in path:
            try:
                value = value[step]
            except (KeyError, IndexError, TypeError):
                raise not_a_producer(self.url, f"JSON without {shown}") from None
        if not isinstance(value, of) or isinstance(value, bool) and of is not bool:
            raise not_a_producer(self.url, f"JSON whose {shown} is {type(value).__name__}")
        return value

    def events(self, path: str, body: dict | None = None,
               method: str = "GET") -> Iterator[tuple[str, dict]]:
        """Yield ``(event, data)`` from an SSE endpoint until the stream ends; first
        ``("job", {"id"})`` when the response names its job (``X-Job-ID``). A stream that
        ends before its final event is Unavailable, naming the job to follow."""
        response = self._send(method, path, body, None, stream=True)
        if not response.headers.get("Content-Type", "").startswith("text/event-stream"):
            raise not_a_producer(response.url, f"HTTP {response.status_code} that is not an "
                                 "event stream")
        named = response.headers.get("X-Job-ID")
        if named:
            yield "job", {"id": named}
        job_id = named or path.split("/")[-2]  # else /v1/jobs/{id}/events
        try:
            for event, data in sse_events(response):
                for path, of in EVENT_FIELDS.get(event, ()):
                    self.field(data, *path, of=of)
                yield event, data
                if event in ("done", "error"):
                    return
        except requests.RequestException:
            pass  # the connection broke: as a stream that ended early
        raise Unavailable(f"the stream of job {job_id} ended before the job did (the server "
                          f"or its Redis went away, or it sent nothing for {self.timeout_s:g}s: "
                          f"--timeout); the job goes on: follow it with "
                          f"'banter stream {job_id}'")

    def _send(self, method: str, path: str, body: dict | None, params: dict | None,
              stream: bool) -> requests.Response:
        try:
            response = self.session.request(method, self.url + path, json=body, params=params,
                                            timeout=(CONNECT_TIMEOUT_S, self.timeout_s),
                                            stream=stream)
        except requests.ConnectTimeout:
            raise Unavailable(f"cannot reach {self.url}: no connection within "
                              f"{CONNECT_TIMEOUT_S:g}s") from None
        except requests.RequestException as exc:
            if _timed_out(exc):
                raise Unavailable(f"{self.url} did not answer {method} {path} within "
                                  f"{self.timeout_s:g}s (--timeout)") from None
            raise Unavailable(f"cannot reach {self.url}: {_reason(exc)}") from None
        if response.status_code >= 400:
            try:
                error = response.json()["error"]
                if not (isinstance(error["type"], str) and isinstance(error["message"], str)):
                    raise TypeError("an error's type and message are strings")
            except (ValueError, KeyError, TypeError):
                raise not_a_producer(self.url, f"{method} {path} with HTTP "
                                     f"{response.status_code} and no banterhearts error") from None
            if response.status_code == 404 and error["type"] == "not_found":
                error = {**error, "message": self._no_such_route(method, path)}
            raise from_dict(error, response.status_code)
        return response

    def _no_such_route(self, method: str, path: str) -> str:
        """The message for the producer's 404 of the route itself (not of a job or model it
        names): the usual cause is a ``--url`` with a path, which every request path is
        appended to."""
        return (f"{self.url} does not serve {method} {path} (HTTP 404): --url (or BANTER_URL) "
                "must be the producer's base URL, without a path, e.g. http://127.0.0.1:8000")


__all__ = ["Client", "BanterError"]
