"""One-row token sampling for the engine."""

from __future__ import annotations

import numpy as np

from banter.params import SamplingParams


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """Pick one token id from one row of logits ``[V]``."""
    if params.temperature == 0.0:
        return int(np.argmax(logits))
    scores = logits.astype(np.float64)
    with np.errstate(over="ignore"):  # a tiny temperature sends every other score to -inf
        scores = (scores - scores.max()) / params.temperature
    if 0 < params.top_k < scores.size:
        kth = np.partition(scores, -params.top_k)[-params.top_k]
        scores = np.where(scores >= kth, scores, -np.inf)
    probs = np.exp(scores - scores.max())
    probs /= probs.sum()
    if params.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        sorted_probs = probs[order]
        before = np.cumsum(sorted_probs) - sorted_probs
        cut = np.zeros_like(probs)
        keep = order[before < params.top_p]
        cut[keep] = probs[keep]
        probs = cut
    cdf = np.cumsum(probs)
    return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), cdf.size - 1))
