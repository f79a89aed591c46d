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


def merge_feeds(tokens: np.ndarray, positions: np.ndarray, mask: np.ndarray,
                prompts: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """One pass that decodes the running rows and prefills the joining prompts (a decoder's own
    graph): ``mask`` [B + J, T] is the packed cache's, its last J rows blank (the joining rows,
    nothing cached); ``tokens`` and ``positions`` [B] are the running rows'. The new columns
    are as wide as the longest prompt L, every row right-aligned in them: a running row's token
    sits in the last column after L - 1 masked pads (columns that stay masked in its cache), a
    joining prompt is left-padded as in ``left_pad_prompts``. The logits of each row's last
    column are its next token's."""
    ids, prompt_mask, prompt_positions = left_pad_prompts(prompts)
    rows, width = len(tokens), ids.shape[1]
    new_ids = np.zeros((rows + len(prompts), width), dtype=np.int64)
    new_mask = np.zeros((rows + len(prompts), width), dtype=np.int64)
    new_positions = np.zeros((rows + len(prompts), width), dtype=np.int64)
    new_ids[:rows, -1], new_mask[:rows, -1], new_positions[:rows, -1] = tokens, 1, positions
    new_ids[rows:], new_mask[rows:], new_positions[rows:] = ids, prompt_mask, prompt_positions
    return {"input_ids": new_ids, "attention_mask": np.concatenate((mask, new_mask), axis=1),
            "position_ids": new_positions}


@dataclass(frozen=True)
class PackPlan:
    """How to cut chosen rows of several batches into one left-padded batch: output row b is
    ``rows[b] = (source part, row, columns)``, that row's cached columns (the ones its mask
    marks, in order) right-aligned in ``width`` columns (the most any kept row has), zeros in
    front; ``mask`` is the new ``[rows + blank, width]`` attention mask, its last rows those of
    the ``blank`` rows that follow them (nothing cached, all masked). Leading columns no kept row uses and masked
    columns inside a row (``merge_feeds``' pads) are dropped."""

    rows: tuple[tuple[int, int, np.ndarray], ...]
    width: int
    mask: np.ndarray


def plan_pack(parts: Sequence[tuple[np.ndarray, Sequence[int]]], blank: int = 0) -> PackPlan:
    """The ``PackPlan`` for ``(mask [B_i, T_i], rows to keep)`` parts and ``blank`` new rows,
    from the masks alone."""
    rows = tuple((source, int(row), np.flatnonzero(mask[row]))
                 for source, (mask, kept) in enumerate(parts) for row in kept)
    width = max((len(columns) for _, _, columns in rows), default=0)
    out_mask = np.zeros((len(rows) + blank, width), dtype=np.int64)
    for b, (_, _, columns) in enumerate(rows):
        out_mask[b, width - len(columns):] = 1
    return PackPlan(rows, width, out_mask)


def pack_rows(parts: Sequence[tuple[KVCache, np.ndarray, Sequence[int]]], blank: int = 0
              ) -> tuple[list[np.ndarray], np.ndarray]:
    """One left-padded batch of the chosen rows of several, on the host: each part is
    ``(pasts [B_i, H, T_i, D] per past input, mask [B_i, T_i], rows to keep)``; laid out by
    ``plan_pack`` (``blank`` rows of zeros last), every kept row's cache copied exactly once,
    straight into the new arrays."""
    plan = plan_pack([(mask, rows) for _, mask, rows in parts], blank)
    template = parts[0][0]
    total = plan.mask.shape[0]
    pasts = [np.zeros((total, p.shape[1], plan.width, p.shape[3]), dtype=p.dtype) for p in template]
    for b, (source, row, columns) in enumerate(plan.rows):
        first = plan.width - len(columns)
        contiguous = len(columns) and columns[-1] - columns[0] + 1 == len(columns)
        taken = slice(columns[0], columns[-1] + 1) if contiguous else columns
        for out, past in zip(pasts, parts[source][0]):
            out[b, :, first:] = past[row][:, taken]
    return pasts, plan.mask
