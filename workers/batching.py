"""Pure batching helpers: when to cut a batch, and how to pad sequences into one ORT pass."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence, TypeVar

import numpy as np

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)
KVCache = Sequence[np.ndarray]  # a batch's past: one [B, H, T, D] array per past input


class Waiting(Protocol[T_co]):
    """A FIFO of items waiting for a batch (a ``deque`` is one)."""

    def __len__(self) -> int: ...

    def popleft(self) -> T_co: ...


def collate(waiting: Waiting[T], max_size: int, deadline: float, now: float) -> list[T] | None:
    """Pop up to ``max_size`` items from the left once the batch is full or ``now >= deadline``;
    ``None`` means keep waiting (also when nothing waits)."""
    if not waiting or (len(waiting) < max_size and now < deadline):
        return None
    return [waiting.popleft() for _ in range(min(max_size, len(waiting)))]


def right_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Encoder batch: ``(input_ids, attention_mask)``, both int64 ``[B, max len]``."""
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for b, row in enumerate(rows):
        ids[b, :len(row)] = row
        mask[b, :len(row)] = 1
    return ids, mask


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Masked mean over the sequence axis of ``[B, S, H]``, L2-normalised per row."""
    weights = mask[:, :, None].astype(np.float64)
    pooled = (hidden.astype(np.float64) * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1)
    norms = np.linalg.norm(pooled, axis=1, keepdims=True)
    return pooled / np.maximum(norms, 1e-12)


def left_pad_prompts(prompts: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Prefill inputs ``(input_ids, attention_mask, position_ids)``, all int64 ``[B, L]``: each
    prompt left-padded to the longest; pads are masked out and sit at position 0."""
    width = max(len(p) for p in prompts)
    ids = np.zeros((len(prompts), width), dtype=np.int64)
    mask = np.zeros((len(prompts), width), dtype=np.int64)
    positions = np.zeros((len(prompts), width), dtype=np.int64)
    for b, prompt in enumerate(prompts):
        ids[b, width - len(prompt):] = prompt
        mask[b, width - len(prompt):] = 1
        positions[b, width - len(prompt):] = np.arange(len(prompt))
    return ids, mask, positions


def prompt_feeds(prompts: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """A prompt pass's inputs for a decoder's own graph (Optimum layout): ``left_pad_prompts``
    by input name."""
    ids, mask, positions = left_pad_prompts(prompts)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions}


def decode_feeds(tokens: np.ndarray, positions: np.ndarray,
                 mask: np.ndarray) -> dict[str, np.ndarray]:
    """A decode pass's inputs for a decoder's own graph: one token per row at ``positions``
    [B], the previous pass's ``mask`` grown by that token's column."""
    grown = np.concatenate((mask, np.ones((len(tokens), 1), dtype=np.int64)), axis=1)
    return {"input_ids": tokens[:, None], "attention_mask": grown,
            "position_ids": positions[:, None]}


@dataclass(frozen=True)
class PackPlan:
    """How to cut chosen rows of several left-padded batches into one: the ``rows`` of source
    part ``source`` keep the columns from ``first`` on and get ``pad`` zero columns in front, so
    every row ends up ``width`` wide (the widest real past among the kept rows); ``mask`` is
    the new ``[rows, width]`` attention mask. Parts with no rows to keep are not in ``parts``."""

    parts: tuple[tuple[int, tuple[int, ...], int, int], ...]  # (source, rows, first, pad)
    width: int
    mask: np.ndarray


def plan_pack(parts: Sequence[tuple[np.ndarray, Sequence[int]]]) -> PackPlan:
    """The ``PackPlan`` for ``(mask [B_i, T_i], rows to keep)`` parts, from the masks alone
    (leading columns no kept row uses are dropped)."""
    firsts = []
    for mask, rows in parts:
        used = mask[list(rows)].any(axis=0) if len(rows) else np.zeros(0, dtype=bool)
        firsts.append(int(used.argmax()) if used.any() else mask.shape[1])
    width = max((mask.shape[1] - first for (mask, _), first in zip(parts, firsts)), default=0)
    out_mask = np.zeros((sum(len(rows) for _, rows in parts), width), dtype=np.int64)
    planned, b = [], 0
    for source, ((mask, rows), first) in enumerate(zip(parts, firsts)):
        if not len(rows):
            continue
        pad = width - (mask.shape[1] - first)
        out_mask[b:b + len(rows), pad:] = mask[list(rows), first:]
        planned.append((source, tuple(rows), first, pad))
        b += len(rows)
    return PackPlan(tuple(planned), width, out_mask)


def pack_rows(parts: Sequence[tuple[KVCache, np.ndarray, Sequence[int]]]
              ) -> tuple[list[np.ndarray], np.ndarray]:
    """One left-padded batch of the chosen rows of several, on the host: each part is
    ``(pasts [B_i, H, T_i, D] per past input, mask [B_i, T_i], rows to keep)``; laid out by
    ``plan_pack``, every kept row's cache copied exactly once, straight into the new arrays."""
    plan = plan_pack([(mask, rows) for _, mask, rows in parts])
    template = parts[0][0]
    total = plan.mask.shape[0]
    pasts = [np.zeros((total, p.shape[1], plan.width, p.shape[3]), dtype=p.dtype) for p in template]
    b = 0
    for source, rows, first, pad in plan.parts:
        for row in rows:
            for out, past in zip(pasts, parts[source][0]):
                out[b, :, pad:] = past[row, :, first:]
            b += 1
    return pasts, plan.mask
