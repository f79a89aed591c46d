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


def pack_rows(parts: Sequence[tuple[KVCache, np.ndarray, Sequence[int]]]
              ) -> tuple[list[np.ndarray], np.ndarray]:
    """One left-padded batch of the chosen rows of several: each part is ``(pasts [B_i, H, T_i,
    D] per past input, mask [B_i, T_i], rows to keep)``. The result is as wide as the widest
    real past among the kept rows (leading columns no kept row uses are dropped); every kept
    row's cache is copied exactly once, straight into the new arrays."""
    firsts = []
    for _, mask, rows in parts:
        used = mask[list(rows)].any(axis=0) if len(rows) else np.zeros(0, dtype=bool)
        firsts.append(int(used.argmax()) if used.any() else mask.shape[1])
    width = max((mask.shape[1] - first for (_, mask, _), first in zip(parts, firsts)), default=0)
    total = sum(len(rows) for _, _, rows in parts)
    template = parts[0][0]
    pasts = [np.empty((total, p.shape[1], width, p.shape[3]), dtype=p.dtype) for p in template]
    out_mask = np.zeros((total, width), dtype=np.int64)
    b = 0
    for (src, mask, rows), first in zip(parts, firsts):
        real = mask.shape[1] - first
        for row in rows:
            out_mask[b, width - real:] = mask[row, first:]
            for out, past in zip(pasts, src):
                out[b, :, :width - real] = 0
                out[b, :, width - real:] = past[row, :, first:]
            b += 1
    return pasts, out_mask

