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
MAX_PENALTY = 2.0  # presence_penalty and frequency_penalty: OpenAI's range, -2 to 2
MAX_LOGIT_BIAS = 100.0  # a logit_bias value: OpenAI's range, -100 to 100
MAX_BIASED_TOKENS = 1024  # logit_bias entries
MAX_TOKEN_ID = 2**31 - 1
MAX_LOGPROBS = 20  # alternatives per token (OpenAI's top_logprobs limit)
PARAMS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "presence_penalty",
          "frequency_penalty", "logit_bias", "logprobs")  # the wire names


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence picks its tokens.

    ``temperature == 0`` is greedy (argmax; ``top_p``, ``top_k`` and ``seed`` are then unused).
    ``top_k == 0`` and ``top_p == 1`` switch those filters off (``top_k: -1`` on the wire, vLLM's
    "off", is read as 0). ``seed=None`` draws a fresh seed; ``seed`` is any int64.
    Generation stops after ``max_tokens`` tokens, at the EOS token, or before the first
    occurrence of any ``stop`` string.

    Before a token is picked (greedy included), OpenAI's adjustments change the logits: each
    ``logit_bias`` value is added to its token's logit (``(token_id, bias)`` pairs here,
    ``{"token_id": bias}`` on the wire), and a token already generated ``c`` times loses
    ``c * frequency_penalty + presence_penalty`` (the generated tokens only, not the prompt).

    ``logprobs`` (None: off) asks for each generated token's log probability under the model,
    with that many of the most likely alternatives (0 to ``MAX_LOGPROBS``).
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: int | None = None

    @property
    def adjusts(self) -> bool:
        """Whether the logits are changed before a token is picked."""
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)

    def wire(self) -> dict[str, Any]:
        """The parameters as a request spells them (what ``from_dict`` reads back). The
        logit adjustments and ``logprobs`` only where set: a job that does not use them is
        taken by a worker that predates them too."""
        wire = {"max_tokens": self.max_tokens, "temperature": self.temperature,
                "top_p": self.top_p, "top_k": self.top_k, "seed": self.seed,
                "stop": list(self.stop)}
        if self.presence_penalty:
            wire["presence_penalty"] = self.presence_penalty
        if self.frequency_penalty:
            wire["frequency_penalty"] = self.frequency_penalty
        if self.logit_bias:
            wire["logit_bias"] = {str(token): bias for token, bias in self.logit_bias}
        if self.logprobs is not None:
            wire["logprobs"] = self.logprobs
        return wire

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], max_tokens_limit: int,
                  default_max_tokens: int | None = None) -> SamplingParams:
        """Validate request parameters; raises ``InvalidRequest`` naming the field and its range.

        An unknown key is refused (a misspelt option must not pass as its default); a
        missing or null field takes its default (``max_tokens`` defaults to
        ``min(default_max_tokens or 16, max_tokens_limit)``).
        """
        if not isinstance(d, Mapping):
            raise InvalidRequest("sampling parameters must be a JSON object", "params")
        unknown = sorted(set(d) - set(PARAMS))
        if unknown:
            raise InvalidRequest(f"unknown sampling parameter {brief(unknown[0])}: the parameters "
                                 f"are {', '.join(PARAMS)}", unknown[0][:64])
        return cls(
            max_tokens=_int(d, "max_tokens", min(default_max_tokens or cls.max_tokens,
                                                 max_tokens_limit),
                            1, max_tokens_limit),
            temperature=_float(d, "temperature", cls.temperature, 0.0, MAX_TEMPERATURE),
            top_p=_top_p(d),
            top_k=max(_int(d, "top_k", cls.top_k, -1, MAX_TOP_K) or 0, 0),
            seed=_int(d, "seed", None, MIN_SEED, MAX_SEED),
            stop=_stop(d),
            presence_penalty=_float(d, "presence_penalty", 0.0, -MAX_PENALTY, MAX_PENALTY),
            frequency_penalty=_float(d, "frequency_penalty", 0.0, -MAX_PENALTY, MAX_PENALTY),
            logit_bias=_logit_bias(d),
            logprobs=_int(d, "logprobs", None, 0, MAX_LOGPROBS),
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


def _finite(value: Any) -> bool:
    """Whether ``value`` is a JSON number a float holds: not a bool, NaN, an infinity or an
    integer too large to convert."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _number(d: Mapping[str, Any], key: str, allowed: str) -> float | None:
    value = d.get(key)
    if value is None:
        return None
    if not _finite(value):
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


def _logit_bias(d: Mapping[str, Any]) -> tuple[tuple[int, float], ...]:
    """``{"token_id": bias}`` (keys are decimal token ids, as JSON object keys are strings) as
    sorted ``(token_id, bias)`` pairs; a zero bias is dropped. Whether an id is in the model's
    vocabulary is checked by the worker, which has the model."""
    value = d.get("logit_bias")
    if value is None:
        return ()
    if not isinstance(value, Mapping) or len(value) > MAX_BIASED_TOKENS:
        raise InvalidRequest("logit_bias must be an object of at most "
                             f"{MAX_BIASED_TOKENS} entries {{\"token_id\": bias}}, got {brief(value)}",
                             "logit_bias")
    pairs, seen = [], set()
    for key, bias in value.items():
        token = _token_id(key)
        if token is None:
            raise InvalidRequest(f"logit_bias keys must be token ids (integers from 0 to "
                                 f"{MAX_TOKEN_ID}), got {brief(key)}", "logit_bias")
        if token in seen:
            raise InvalidRequest(f"logit_bias names token {token} twice", "logit_bias")
        seen.add(token)
        if not _finite(bias) or abs(bias) > MAX_LOGIT_BIAS:
            raise InvalidRequest(f"logit_bias[{key}] must be a number from {-MAX_LOGIT_BIAS} to "
                                 f"{MAX_LOGIT_BIAS}, got {brief(bias)}", "logit_bias")
        if bias:
            pairs.append((token, float(bias)))
    return tuple(sorted(pairs))


def _token_id(key: Any) -> int | None:
    """A logit_bias key as a token id: a decimal string (or an int, from Python callers)."""
    if _is_int(key):
        token = key
    elif isinstance(key, str) and key.isascii() and key.isdigit() and len(key) <= 10:
        token = int(key)
    else:
        return None
    return token if 0 <= token <= MAX_TOKEN_ID else None
