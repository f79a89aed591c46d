"""Strict JSON reading, the same for the producer's request bodies and ``banter bulk``'s input
lines: ``NaN``, ``Infinity`` and a number too large for a float (``1e400``) are refused, as no
JSON encoder writes them back (``requests`` refuses to send them), and so is a string holding an
unpaired UTF-16 surrogate escape (``"\\ud800"``): text that cannot be stored or sent on as
UTF-8."""

from __future__ import annotations

import json
import math
import re
from typing import Any

_SURROGATE = re.compile("[\ud800-\udfff]")


class UnpairedSurrogate(ValueError):
    """A string in the document holds an unpaired UTF-16 surrogate escape."""


def loads(text: str | bytes) -> Any:
    """``json.loads`` that raises ValueError for a non-finite number, UnpairedSurrogate for a
    string (a key or a value) holding a lone surrogate."""
    value = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    _reject_lone_surrogates(value)
    return value


def _reject_lone_surrogates(value: Any) -> None:
    pending = [value]
    while pending:
        value = pending.pop()
        if isinstance(value, str):
            if _SURROGATE.search(value):
                raise UnpairedSurrogate("an unpaired UTF-16 surrogate escape (\\ud800-\\udfff)")
        elif isinstance(value, dict):
            pending.extend(value)
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed in JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:32]} is too large")
    return value
