"""Idempotency keys: one job per key, however the submissions interleave."""

from __future__ import annotations

import threading
import uuid
from dataclasses import replace

import pytest

from banter import keys
from banter.broker import make_celery
from banter.errors import Unavailable
from banter.jobs import JobKind, JobRecord, JobStatus, JobStore
from banter.metrics import FAILURES
from banter.streams import EventType, read_events
from producer.service import JobRequest, JobService
from registry.service import Registry


def record(key: str) -> JobRecord:
    return JobRecord(id=JobRecord.new_id(), kind="embed", model="demo-embed", input="x",
                     owner="alice", idempotency_key=key)


def test_a_key_claimed_but_not_yet_written_is_not_taken_over(redis_client):
    """The race a two-step claim lost: the key is set, the first record not written yet."""
    store = JobStore(redis_client, 60)
    key = uuid.uuid4().hex
    redis_client.set(keys.idempotency("alice", key), "not-written-yet", ex=60)
    first, created = store.create_idempotent(record(key))
    assert created  # the key named no job: it is taken over by a job that exists
    second, created_again = store.create_idempotent(record(key))
    assert not created_again and second.id == first.id


def test_a_key_lives_as_long_as_the_record_it_names(redis_client):
    """Taking and ending a job renew its record's TTL; they renew its key's too. A key left to
    its creation TTL expired before a record that was taken or ended later: a retry then found
    no job and ran the request again."""
    from banter.streams import DoneEvent, StreamWriter

    store, streams = JobStore(redis_client, 600), StreamWriter(redis_client, 100, 600)
    key = uuid.uuid4().hex
    job, _ = store.create_idempotent(record(key))
    named = [keys.idempotency("alice", key), keys.job(job.id)]

    def aged() -> None:  # as if most of the TTL had passed since the last write
        for name in named:
            redis_client.expire(name, 5)

    aged()
    assert store.take(job, "w1@test", 30)[0]
    assert [redis_client.ttl(name) > 500 for name in named] == [True, True]
    aged()
    done = DoneEvent(job.id, "cancelled", {"prompt_tokens": 0, "completion_tokens": 0})
    assert store.finish(job, (JobStatus.RUNNING,), JobStatus.CANCELLED, done, streams,
                        finished_at=1.0).applied
    assert [redis_client.ttl(name) > 500 for name in named] == [True, True]


def test_concurrent_submissions_with_one_key_make_one_job(redis_client):
    store = JobStore(redis_client, 60)
    key = uuid.uuid4().hex
    results: list[tuple[str, bool]] = []
    barrier = threading.Barrier(16)

    def submit() -> None:
        barrier.wait()
        job, created = store.create_idempotent(record(key))
        results.append((job.id, created))

    threads = [threading.Thread(target=submit) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({job_id for job_id, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    assert redis_client.get(keys.idempotency("alice", key)) == results[0][0]


def test_a_job_the_broker_refused_fails_and_frees_its_key(settings, redis_client, demo_models):
    """With the depth check on, the dead broker refuses before anything is recorded; without
    it, the job's record exists when the publish fails: it fails (counted, error
    ``unavailable``) and frees its key."""
    refusals = FAILURES.series(kind="embed", error="unavailable")
    before = int(redis_client.hget(keys.METRICS, refusals) or 0)
    for limit in (settings.max_queue_depth, 0):
        dead = replace(settings, broker_url="redis://127.0.0.1:1/0", max_queue_depth=limit)
        celery = make_celery(dead)
        celery.conf.broker_connection_retry_on_startup = False
        celery.conf.broker_connection_max_retries = 0
        service = JobService(dead, redis_client, celery, Registry.from_settings(dead, redis_client))
        key = uuid.uuid4().hex
        with pytest.raises(Unavailable, match="broker"):
            service.submit(JobRequest(JobKind.EMBED, key, idempotency_key=key), "alice", "t")
        assert redis_client.get(keys.idempotency("alice", key)) is None
        failed = [k for k in redis_client.scan_iter(keys.job("*"))
                  if key in (redis_client.hget(k, "input") or "")]
        if limit == 0:  # recorded, then failed: its stream ends with the error, for a reader
            job_id = redis_client.hget(failed[0], "id")
            assert redis_client.hget(failed[0], "status") == "failed"
            assert [kind for _, kind, _ in read_events(redis_client, job_id)] == [EventType.ERROR]
            assert int(redis_client.hget(keys.METRICS, refusals)) == before + 1
        else:
            assert failed == []


def test_a_live_worker_is_remembered_briefly_and_a_missing_one_never(settings, redis_client,
                                                                      monkeypatch):
    """``JobService._worker_live``: a synchronous call does not ask Redis again right after a
    live worker was seen; a missing worker is asked about every time, so one that comes up is
    seen at once."""
    import time

    from producer import service as service_module

    backend = f"live-test-{uuid.uuid4().hex[:8]}"
    service = JobService(settings, redis_client, make_celery(settings),
                         Registry.from_settings(settings, redis_client))
    asked = []
    real = redis_client.zcount
    monkeypatch.setattr(redis_client, "zcount", lambda *a: asked.append(a) or real(*a))
    assert not service._worker_live(backend) and not service._worker_live(backend)
    assert len(asked) == 2  # a no is not remembered
    redis_client.zadd(keys.workers_for(backend), {"w": time.time()})
    assert service._worker_live(backend) and len(asked) == 3  # seen at once
    redis_client.delete(keys.workers_for(backend))
    assert service._worker_live(backend) and len(asked) == 3  # remembered: no round trip
    monkeypatch.setattr(service_module, "LIVE_SEEN_S", 0.0)
    assert not service._worker_live(backend) and len(asked) == 4  # past it: asked again
