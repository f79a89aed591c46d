"""Strict JSON reading, the same for the producer's request bodies and ``banter bulk``'s input
lines: ``NaN``, ``Infinity`` and a number too large for a float (``1e400``) are refused, as no
JSON encoder writes them back (``requests`` refuses to send them)."""

from __future__ import annotations

import json
import math
from typing import Any


def loads(text: str | bytes) -> Any:
    """``json.loads`` that raises ValueError for a non-finite number."""
    return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed in JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:32]} is too large")
    return value
