"""What a backend hands back to the worker runtime for one job, whichever backend served it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Outcome:
    """One finished job as the runtime records it.

    ``result`` is the record's result (``{text, finish_reason}`` or ``{embedding}``);
    ``finish_reason`` is ``stop``, ``length`` (or another upstream reason), ``cancelled`` or
    ``expired`` (``stop`` for embeds); ``batch_size`` is the largest batch the job ran in (1
    upstream); ``backend`` is ``onnx`` or ``openai``; ``version`` the registry version that
    served it (None for an openai fallback: no registry record describes that model).
    """

    result: dict[str, Any] | None  # None: an embed job that expired before it made one
    finish_reason: str
    usage: dict[str, int]
    batch_size: int
    backend: str
    version: int | None
