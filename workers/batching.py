"""Pure batching helpers: when to cut a batch, and how to pad sequences into one ORT pass."""

from __future__ import annotations

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


def _left_pad_columns(array: np.ndarray, axis: int, width: int) -> np.ndarray:
    missing = width - array.shape[axis]
    if missing == 0:
        return array
    shape = list(array.shape)
    shape[axis] = missing
    return np.concatenate((np.zeros(shape, dtype=array.dtype), array), axis=axis)


def join_rows(parts: Sequence[tuple[KVCache, np.ndarray]]) -> tuple[list[np.ndarray], np.ndarray]:
    """Stack left-padded batches ``(pasts [B_i, H, T_i, D] per past input, mask [B_i, T_i])``
    along the batch axis, each left-padded with masked-out zeros to the widest ``T``."""
    width = max(mask.shape[1] for _, mask in parts)
    mask = np.concatenate([_left_pad_columns(m, 1, width) for _, m in parts])
    pasts = [np.concatenate([_left_pad_columns(past[i], 2, width) for past, _ in parts])
             for i in range(len(parts[0][0]))]
    return pasts, mask


def take_rows(pasts: KVCache, mask: np.ndarray, rows: Sequence[int]) -> tuple[list[np.ndarray], np.ndarray]:
    """Keep ``rows`` of a left-padded batch and drop the leading columns none of them uses."""
    mask = mask[rows]
    used = mask.any(axis=0)
    first = int(used.argmax()) if used.any() else mask.shape[1]
    return ([np.ascontiguousarray(past[rows, :, first:]) for past in pasts],
            np.ascontiguousarray(mask[:, first:]))
