"""Sampling parameters of a generate job: the wire schema both producer and workers validate."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from banter.errors import InvalidRequest, brief

MAX_TEMPERATURE = 2.0
MIN_SEED, MAX_SEED = -(2**63), 2**63 - 1  # any int64, as OpenAI takes
MAX_TOP_K = 2**31 - 1  # any int32; past the vocabulary it filters nothing
MAX_STOPS = 4
MAX_STOP_CHARS = 64
PARAMS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop")  # the wire names


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence picks its tokens.

    ``temperature == 0`` is greedy (argmax; ``top_p``, ``top_k`` and ``seed`` are then unused).
    ``top_k == 0`` and ``top_p == 1`` switch those filters off (``top_k: -1`` on the wire, vLLM's
    "off", is read as 0). ``seed=None`` draws a fresh seed; ``seed`` is any int64.
    Generation stops after ``max_tokens`` tokens, at the EOS token, or before the first
    occurrence of any ``stop`` string.
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], max_tokens_limit: int) -> SamplingParams:
        """Validate request parameters; raises ``InvalidRequest`` naming the field and its range.

        An unknown key is refused (a misspelt option must not pass as its default); a
        missing or null field takes its default (``max_tokens`` defaults to
        ``min(16, max_tokens_limit)``).
        """
        if not isinstance(d, Mapping):
            raise InvalidRequest("sampling parameters must be a JSON object", "params")
        unknown = sorted(set(d) - set(PARAMS))
        if unknown:
            raise InvalidRequest(f"unknown sampling parameter {brief(unknown[0])}: the parameters "
                                 f"are {', '.join(PARAMS)}", unknown[0][:64])
        return cls(
            max_tokens=_int(d, "max_tokens", min(cls.max_tokens, max_tokens_limit),
                            1, max_tokens_limit),
            temperature=_float(d, "temperature", cls.temperature, 0.0, MAX_TEMPERATURE),
            top_p=_top_p(d),
            top_k=max(_int(d, "top_k", cls.top_k, -1, MAX_TOP_K) or 0, 0),
            seed=_int(d, "seed", None, MIN_SEED, MAX_SEED),
            stop=_stop(d),
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(d: Mapping[str, Any], key: str, default: int | None, low: int,
         high: int | None) -> int | None:
    value = d.get(key)
    if value is None:
        return default
    allowed = f"an integer from {low} to {high}" if high is not None else f"an integer >= {low}"
    if not _is_int(value) or value < low or (high is not None and value > high):
        raise InvalidRequest(f"{key} must be {allowed}, got {brief(value)}", key)
    return value


def _number(d: Mapping[str, Any], key: str, allowed: str) -> float | None:
    value = d.get(key)
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise InvalidRequest(f"{key} must be {allowed}, got {brief(value)}", key)
    return float(value)


def _float(d: Mapping[str, Any], key: str, default: float, low: float, high: float) -> float:
    allowed = f"a number from {low} to {high}"
    value = _number(d, key, allowed)
    if value is None:
        return default
    if not low <= value <= high:
        raise InvalidRequest(f"{key} must be {allowed}, got {brief(value)}", key)
    return value


def _top_p(d: Mapping[str, Any]) -> float:
    allowed = "a number greater than 0 and at most 1"
    value = _number(d, "top_p", allowed)
    if value is None:
        return SamplingParams.top_p
    if not 0.0 < value <= 1.0:
        raise InvalidRequest(f"top_p must be {allowed}, got {brief(value)}", "top_p")
    return value


def _stop(d: Mapping[str, Any]) -> tuple[str, ...]:
    value = d.get("stop")
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    allowed = (f"a string or a list of at most {MAX_STOPS} non-empty strings "
               f"of at most {MAX_STOP_CHARS} characters")
    if (not isinstance(stops, (list, tuple)) or len(stops) > MAX_STOPS
            or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops)):
        raise InvalidRequest(f"stop must be {allowed}, got {brief(value)}", "stop")
    return tuple(stops)
