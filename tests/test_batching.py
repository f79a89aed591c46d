"""Concurrent jobs share ONNX Runtime passes on the worker, and batching changes no result."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from banter import keys
from tests.conftest import WORKER_NODE

TEXTS = [f"sentence number {i} about {'cats' if i % 2 else 'GPUs'}" * (1 + i % 3)
         for i in range(32)]


def embed_jobs(api, texts: list[str], concurrent: bool) -> list[dict]:
    def one(text: str) -> dict:
        job = api.post("/v1/jobs", {"kind": "embed", "input": text}).json()
        return api.wait_job(job["id"])

    if not concurrent:
        return [one(text) for text in texts]
    with ThreadPoolExecutor(max_workers=len(texts)) as pool:
        return list(pool.map(one, texts))


def embed_passes(redis_client) -> int:
    return int(redis_client.hget(keys.worker_stats(WORKER_NODE), "embed_passes") or 0)


def test_32_concurrent_embeds_run_batched_and_match_one_at_a_time(api, redis_client):
    alone = embed_jobs(api, TEXTS, concurrent=False)
    assert {job["batch_size"] for job in alone} == {1}
    before = embed_passes(redis_client)
    crowd = embed_jobs(api, TEXTS, concurrent=True)
    passes = embed_passes(redis_client) - before
    assert all(job["status"] == "succeeded" for job in crowd)
    assert max(job["batch_size"] for job in crowd) > 1
    assert len(TEXTS) // 8 <= passes < len(TEXTS)  # every pass counted by the time its jobs end
    for one, many in zip(alone, crowd):
        np.testing.assert_allclose(one["result"]["embedding"], many["result"]["embedding"],
                                   atol=1e-5)


def test_16_concurrent_embed_jobs_take_fewer_than_16_passes(api, redis_client):
    before = embed_passes(redis_client)
    jobs = embed_jobs(api, TEXTS[:16], concurrent=True)
    assert all(job["status"] == "succeeded" for job in jobs)
    assert embed_passes(redis_client) - before < 16


def test_batch_size_never_exceeds_the_setting(api, settings):
    jobs = embed_jobs(api, TEXTS, concurrent=True)
    assert max(job["batch_size"] for job in jobs) <= settings.inference_max_batch_size


def test_concurrent_generations_share_passes_and_keep_their_text(api):
    def one(i: int) -> dict:
        return api.post("/v1/inference", {"prompt": "p" * (i + 1), "max_tokens": 3 + i % 4}).json()

    with ThreadPoolExecutor(max_workers=12) as pool:
        results = list(pool.map(one, range(12)))
    expected = [" banterhearts", " streams", " every", " token", " from", " one"]
    for i, body in enumerate(results):
        assert body["text"] == "".join(expected[:3 + i % 4])
    assert max(body["batch_size"] for body in results) > 1
