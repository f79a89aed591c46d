"""Request body parsing and field checks; every failure is a typed 4xx naming the field."""

from __future__ import annotations

import math
from typing import Any

from flask import Request
from gunicorn.http.errors import ParseException
from werkzeug.exceptions import ClientDisconnected

from banter import strictjson
from banter.errors import (
    BadFraming,
    BadJSON,
    InvalidRequest,
    RequestTimeout,
    TooLarge,
    UnsupportedMediaType,
    brief,
)
from banter.params import PARAMS

_MISSING = object()


def json_body(request: Request, max_bytes: int) -> dict[str, Any]:
    """The request's JSON object, or BadJSON / UnsupportedMediaType / TooLarge / InvalidRequest.

    The body must be UTF-8 (RFC 8259; no BOM), hold no ``NaN``/``Infinity`` and no number too
    large for a float, nest less deep than Python's recursion limit, and hold no unpaired
    surrogate escape (``"\\ud800"``): text that cannot be stored or sent on as UTF-8."""
    if request.mimetype != "application/json":
        raise UnsupportedMediaType("send the body as JSON with Content-Type: application/json")
    if request.content_length is not None and request.content_length > max_bytes:
        raise TooLarge(f"request body is over the {max_bytes} byte limit")
    try:
        raw = request.get_data(cache=True)
    except ClientDisconnected:  # closed, or silent past its timeout (producer.server)
        raise _unfinished() from None
    except ParseException as exc:  # gunicorn's: a malformed chunk size or terminator
        raise BadFraming(f"request body is not valid HTTP chunked encoding ({type(exc).__name__})"
                         ": send it with a correct Content-Length or chunks") from None
    if request.content_length is not None and len(raw) < request.content_length:
        raise _unfinished()  # gunicorn ends the input at a closed connection without an error
    if len(raw) > max_bytes:
        raise TooLarge(f"request body is over the {max_bytes} byte limit")
    try:
        body = strictjson.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise BadJSON(f"request body is not UTF-8 ({exc}): send JSON encoded as UTF-8") from None
    except strictjson.UnpairedSurrogate:
        raise BadJSON("request body holds an unpaired UTF-16 surrogate escape "
                      "(\\ud800-\\udfff): send text as valid Unicode") from None
    except (ValueError, RecursionError) as exc:
        if "integer string conversion" in str(exc):  # Python's cap on an int's digits
            raise BadJSON("request body holds a number with too many digits") from None
        raise BadJSON(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    return body


def _unfinished() -> RequestTimeout:
    return RequestTimeout("the request body stopped arriving before it was complete: send it "
                          "whole")


def string(body: dict, name: str, *, required: bool = False, default: str | None = None,
           max_len: int = 256, allow_empty: bool = False) -> str | None:
    value = body.get(name, _MISSING)
    if value is _MISSING or value is None:
        if required:
            raise InvalidRequest(f"'{name}' is required", name)
        return default
    if not isinstance(value, str):
        raise InvalidRequest(f"'{name}' must be a string", name)
    if not value.strip() and not allow_empty:
        raise InvalidRequest(f"'{name}' must not be empty", name)
    if len(value) > max_len:
        raise InvalidRequest(f"'{name}' is {len(value)} characters; the limit is {max_len}", name)
    return value


def number(body: dict, name: str, *, low: float, high: float,
           integer: bool = False) -> float | int | None:
    value = body.get(name)
    if value is None:
        return None
    valid = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not valid:
        raise InvalidRequest(f"'{name}' must be {'an integer' if integer else 'a number'}", name)
    if (isinstance(value, float) and not math.isfinite(value)) or not low <= value <= high:
        raise InvalidRequest(f"'{name}' must be between {low} and {high}", name)
    return value


def choice(body: dict, name: str, options: tuple[str, ...], default: str) -> str:
    """One of ``options``; missing or null: ``default`` (which may be outside ``options`` to
    make the field required)."""
    value = body.get(name)
    if value is None:
        value = default
    if value not in options:
        raise InvalidRequest(f"'{name}' must be one of {', '.join(options)}", name)
    return value


def string_list(body: dict, name: str, *, max_items: int, max_len: int) -> list[str]:
    value = body.get(name)
    if not isinstance(value, list) or not value:
        raise InvalidRequest(f"'{name}' must be a non-empty list of strings", name)
    if len(value) > max_items:
        raise TooLarge(f"'{name}' has {len(value)} items; the limit is {max_items}", name)
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item.strip():
            raise InvalidRequest(f"'{name}[{i}]' must be a non-empty string", name)
        if len(item) > max_len:
            raise InvalidRequest(f"'{name}[{i}]' is {len(item)} characters; the limit is "
                                 f"{max_len}", name)
    return value


def embed_input(body: dict, name: str, *, max_items: int, max_len: int) -> str | list[str]:
    """An embed job's input: one text, or a non-empty list of at most ``max_items`` texts."""
    value = body.get(name)
    if isinstance(value, list):
        return string_list(body, name, max_items=max_items, max_len=max_len)
    if value is not None and not isinstance(value, str):
        raise InvalidRequest(f"'{name}' must be a string or a non-empty list of strings", name)
    return string(body, name, required=True, max_len=max_len)


SAMPLING_FIELDS = PARAMS


def known_fields(body: dict, known: tuple[str, ...], hints: dict[str, str] | None = None) -> None:
    """InvalidRequest naming the first field of ``body`` outside ``known`` (a misspelt or
    unsupported option must not pass silently as its default); ``hints`` say what to do
    instead for some."""
    for name in body:
        if name not in known:
            hint = (hints or {}).get(name) or f"the fields are {', '.join(sorted(known))}"
            shown = name if len(name) <= 64 else name[:61] + "..."
            raise InvalidRequest(f"unknown field {shown!r}: {hint}", shown)


def defined_fields(value: dict, defined: tuple[str, ...], where: str, what: str) -> None:
    """InvalidRequest naming ``where.field`` for the first field of the object ``value`` (an
    OpenAI ``what``: "a message", "a text part") outside what OpenAI ``defined`` for it."""
    unknown = sorted(set(value) - set(defined))
    if unknown:
        raise InvalidRequest(f"'{where}' has a field OpenAI does not define for {what}: "
                             f"{brief(unknown[0])} ({what} takes {', '.join(defined)})",
                             f"{where}.{unknown[0]}"[:200])


def sampling_params(body: dict, default_max_tokens: int) -> dict[str, Any]:
    """The sampling fields present in ``body`` (checked fully by SamplingParams.from_dict)."""
    params = {k: body[k] for k in SAMPLING_FIELDS if body.get(k) is not None}
    params.setdefault("max_tokens", default_max_tokens)
    return params
