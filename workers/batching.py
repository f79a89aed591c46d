"""Pure batching helpers: when to cut a batch, and how to pad sequences into one ORT pass."""

from __future__ import annotations

from collections import deque
from typing import Sequence, TypeVar

import numpy as np

T = TypeVar("T")
KVCache = Sequence[np.ndarray]  # one sequence's past: one [H, p, D] array per past input


def collate(waiting: deque[T], max_size: int, deadline: float, now: float) -> list[T] | None:
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


def left_pad_pending(pending: Sequence[np.ndarray],
                     past_lens: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decoder step inputs ``(input_ids [B,S], attention_mask [B,P+S], position_ids [B,S])``.

    Row b has a past of ``past_lens[b]`` real positions left-padded to ``P = max(past_lens)``,
    then its pending tokens left-padded to ``S = max len``; pads are masked out and sit at
    position 0, real tokens take positions ``p .. p+s-1``.
    """
    batch, big_p, big_s = len(pending), max(past_lens), max(len(t) for t in pending)
    ids = np.zeros((batch, big_s), dtype=np.int64)
    positions = np.zeros((batch, big_s), dtype=np.int64)
    mask = np.zeros((batch, big_p + big_s), dtype=np.int64)
    for b, (tokens, p) in enumerate(zip(pending, past_lens)):
        s = len(tokens)
        ids[b, big_s - s:] = tokens
        positions[b, big_s - s:] = np.arange(p, p + s)
        mask[b, big_p - p:big_p] = 1
        mask[b, big_p + big_s - s:] = 1
    return ids, mask, positions


def left_pad_past(caches: Sequence[KVCache | None], past_lens: Sequence[int], n_tensors: int,
                  head_shape: tuple[int, int], dtype: type) -> list[np.ndarray]:
    """Stack per-sequence pasts into ``n_tensors`` arrays ``[B, H, P, D]``, left-padded with
    zeros (masked out by ``left_pad_pending``). A sequence with no past has ``None``."""
    heads, dim = head_shape
    big_p = max(past_lens)
    stacked = [np.zeros((len(caches), heads, big_p, dim), dtype=dtype) for _ in range(n_tensors)]
    for b, (cache, p) in enumerate(zip(caches, past_lens)):
        if p:
            for out, part in zip(stacked, cache):
                out[b, :, big_p - p:] = part
    return stacked


def split_present(present: Sequence[np.ndarray], past_lens: Sequence[int],
                  pending_lens: Sequence[int]) -> list[list[np.ndarray]]:
    """Cut each sequence's own cache (its real positions only) out of ``present.*``
    ``[B, H, P+S, D]`` laid out as by ``left_pad_pending``."""
    big_p, big_s = max(past_lens), max(pending_lens)
    caches = []
    for b, (p, s) in enumerate(zip(past_lens, pending_lens)):
        if s == big_s:
            caches.append([t[b, :, big_p - p:] for t in present])
        else:
            caches.append([np.concatenate((t[b, :, big_p - p:big_p], t[b, :, big_p + big_s - s:]),
                                          axis=1) for t in present])
    return caches
