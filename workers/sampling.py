"""One-row token sampling for the engine."""

from __future__ import annotations

import numpy as np

from banter.params import SamplingParams


def adjust(logits: np.ndarray, params: SamplingParams, counts: dict[int, int]) -> np.ndarray:
    """One row of logits ``[V]`` with OpenAI's adjustments (``SamplingParams``): ``logit_bias``
    added, and each generated token (``counts``: id to times generated) penalised by
    ``count * frequency_penalty + presence_penalty``. ``logits`` itself when there are none; a
    copy otherwise. Every biased id must be in ``[0, V)`` (the engine checks it at submit)."""
    if not params.adjusts:
        return logits
    scores = logits.astype(np.float32)  # a copy: the row belongs to the pass's output
    if params.logit_bias:
        ids, biases = zip(*params.logit_bias)
        scores[list(ids)] += np.asarray(biases, dtype=np.float32)
    if counts and (params.frequency_penalty or params.presence_penalty):
        ids = np.fromiter(counts.keys(), dtype=np.int64, count=len(counts))
        times = np.fromiter(counts.values(), dtype=np.float32, count=len(counts))
        scores[ids] -= times * params.frequency_penalty + params.presence_penalty
    return scores


def logprobs(logits: np.ndarray, token_id: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """The log probability of ``token_id`` under one row of raw logits ``[V]`` (the model's
    own distribution: no bias, penalty or temperature), and the ``top`` most likely tokens
    with theirs, most likely first (ties: lower id first)."""
    scores = logits.astype(np.float64)
    shifted = scores - scores.max()
    logp = shifted - np.log(np.exp(shifted).sum())
    best: list[tuple[int, float]] = []
    if top:
        count = min(top, logp.size)
        cut = -np.partition(-logp, count - 1)[count - 1]  # the count-th largest value
        ids = np.flatnonzero(logp >= cut)  # every id tied at the cut too, in id order
        ids = ids[np.lexsort((ids, -logp[ids]))][:count]
        best = [(int(i), float(logp[i])) for i in ids]
    return float(logp[token_id]), best


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """Pick one token id from one row of logits ``[V]`` (adjusted already: ``adjust``)."""
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
