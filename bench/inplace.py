"""A decoder whose KV cache a step appends to in place, for measurement (``bench kvcache
--inplace``): the served in-place layout (``workers.inplace``, ``BANTER_KV_LAYOUT``) against the
Optimum layout, one bare loop each, with no engine around them.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from workers.inplace import decode_inputs, inplace_model, prompt_inputs, run_in_place


class Inplace:
    """A session of ``inplace_model`` on the CPU provider, with one cache buffer per past input
    of ``capacity`` positions (default: the model's) for ``rows`` rows, written in place by
    every pass (a pass binds the leading rows it runs)."""

    def __init__(self, model_path: Path, rows: int, capacity: int | None = None,
                 threads: int = 0) -> None:
        import onnxruntime as ort

        model, facts = inplace_model(model_path)
        capacity = capacity or facts["positions"]
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads > 0:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(model, sess_options=options,
                                            providers=["CPUExecutionProvider"])
        self.n_layer, self.rows, self.capacity = facts["n_layer"], rows, capacity
        shape = (rows, facts["n_head"], capacity, facts["head_dim"])
        self.buffers = [np.zeros(shape, np.float32) for _ in range(2 * self.n_layer)]

    def load(self, cache: list[np.ndarray]) -> None:
        """Put a ``[rows, H, past, D]`` cache (Optimum order: key, value per layer) in front."""
        for buffer, past in zip(self.buffers, cache):
            buffer[:, :, :past.shape[2]] = past

    def step(self, ids: np.ndarray, positions: np.ndarray, cached: int) -> np.ndarray:
        """One pass of ``ids`` [rows, S] after ``cached`` positions in every row; returns the
        logits of each row's last position [rows, 1, vocab]."""
        rows, width = ids.shape
        if cached + width > self.capacity:
            raise ValueError(f"{cached + width} positions exceed the capacity {self.capacity}")
        return self.run({"input_ids": ids.astype(np.int64),
                         "position_ids": positions.astype(np.int64),
                         "seqlens_k": np.full(rows, cached + width - 1, np.int32),
                         "total_sequence_length": np.array(cached + width, np.int32),
                         "logits_index": np.arange(rows, dtype=np.int64) * width + width - 1})

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """One pass over the leading ``len(input_ids)`` rows; returns the logits
        (``run_in_place``)."""
        rows = len(inputs["input_ids"])
        return run_in_place(self.session, inputs, [b[:rows] for b in self.buffers], self.n_layer)

    def generate(self, prompts: list[list[int]], max_tokens: list[int],
                 eos: int | None) -> tuple[list[list[int]], float, int]:
        """``bench.generate.RawDecoder.generate`` on this layout: greedy-decode every prompt in
        one batch (prompts right-padded, each row attending to its own positions); a row
        leaves when it has its ``max_tokens`` or emits EOS, the rows after it moving up (a
        copy of their used positions, as the engine does). Returns (token ids per row, seconds
        in the loop, passes)."""
        if len(prompts) > self.rows:
            raise ValueError(f"{len(prompts)} prompts exceed the {self.rows} rows")
        inputs = prompt_inputs([np.asarray(p, dtype=np.int64) for p in prompts])
        cached = np.array([len(p) for p in prompts], dtype=np.int64)
        rows = np.arange(len(prompts))  # original row of each live batch row
        out: list[list[int]] = [[] for _ in prompts]
        limits = np.asarray(max_tokens)
        passes = 0
        started = time.perf_counter()
        logits = self.run(inputs)[:, -1]
        while True:
            passes += 1
            tokens = logits.argmax(axis=-1)
            keep = np.ones(len(rows), dtype=bool)
            for b, (row, token) in enumerate(zip(rows, tokens)):
                out[row].append(int(token))
                if len(out[row]) >= limits[row] or (eos is not None and token == eos):
                    keep[b] = False
            if not keep.any():
                break
            if not keep.all():
                width = int(cached[keep].max())
                for buffer in self.buffers:
                    buffer[:keep.sum(), :, :width] = buffer[np.flatnonzero(keep), :, :width]
                rows, tokens, cached = rows[keep], tokens[keep], cached[keep]
            logits = self.run(decode_inputs(tokens, cached))[:, -1]
            cached = cached + 1
        return out, time.perf_counter() - started, passes
