"""Every Redis key and channel banterhearts uses, in one place.

Celery's own keys (the queue lists named by ``Settings.queue_interactive`` / ``queue_bulk``,
``unacked``, ``_kombu.*``) belong to kombu and are not listed here.
"""

PREFIX = "banter"

# hash: one job record (fields in banter.jobs.JobRecord), TTL Settings.job_ttl_s
def job(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}"


# stream: the job's replayable events (banter.streams), capped, TTL Settings.job_ttl_s
def stream(job_id: str) -> str:
    return f"{PREFIX}:stream:{job_id}"


# pub/sub channel: the job's live events, the public contract for direct subscribers
def tokens(job_id: str) -> str:
    return f"{PREFIX}:tokens:{job_id}"


# string: job id created for (owner, idempotency_key), TTL Settings.job_ttl_s
def idempotency(owner: str, key: str) -> str:
    return f"{PREFIX}:idem:{owner}:{key}"


# pub/sub channel: job ids whose cancellation was requested while running
CANCEL = f"{PREFIX}:cancel"

# hash: model name -> JSON registry record of its active version
REGISTRY_ACTIVE = f"{PREFIX}:registry:active"

# string: seq of the last history.jsonl record the mirror reflects
REGISTRY_SEQ = f"{PREFIX}:registry:seq"

# pub/sub channel: a JSON registry record, published after each mirror change
REGISTRY_EVENTS = f"{PREFIX}:registry:events"


# hash: version (decimal string) -> JSON registry record, every version ever promoted
def registry_versions(name: str) -> str:
    return f"{PREFIX}:registry:versions:{name}"


# sorted set: worker node name -> unix time of its last heartbeat
WORKERS = f"{PREFIX}:workers"


# hash: counters a worker keeps (ORT passes and items per kind)
def worker_stats(node: str) -> str:
    return f"{PREFIX}:worker:{node}:stats"


# sorted set: worker node name -> unix time of its last heartbeat, one set per backend the
# worker can serve ("onnx", "openai"); every worker is also in WORKERS
def workers_for(backend: str) -> str:
    return f"{PREFIX}:workers:{backend}"


# hash: one /v1/batches batch (fields in producer.batches), TTL Settings.job_ttl_s
def batch(batch_id: str) -> str:
    return f"{PREFIX}:batch:{batch_id}"


# sorted set: one owner's batch ids by created_at (GET /v1/batches), TTL Settings.job_ttl_s
def batches(owner: str) -> str:
    return f"{PREFIX}:batches:{owner}"


# string: the node that runs the job now, with a TTL its heartbeat renews (Settings.lease_ttl_s)
def lease(job_id: str) -> str:
    return f"{PREFIX}:lease:{job_id}"


# set: ids of jobs some worker has taken (status running); the reaper's work list
RUNNING = f"{PREFIX}:running"


# sorted set: ids of jobs not yet taken, scored by when their task was (last) sent; a job
# leaves it when a worker takes it (or, lazily, when the reaper finds it ended or gone). The
# reaper re-sends the task of one queued too long while its lane's queue is empty: a message
# lost with Redis (kill -9 before an fsync) or never sent (the broker went down mid-submit)
QUEUED = f"{PREFIX}:queued"


# string: set for Settings.resend_after_s when a worker sends a job's task again (an orphan's,
# or a lost queued one's), so one copy is sent, not one per heartbeat; deleted when a worker
# takes the job
def requeued(job_id: str) -> str:
    return f"{PREFIX}:requeued:{job_id}"


# string: requests one API key id made in one minute (producer.ratelimit); expires after it
def rate_limit(key_id: str, minute: int) -> str:
    return f"{PREFIX}:ratelimit:{key_id}:{minute}"


# hash: cluster-wide metrics that workers record and GET /metrics renders (workers.metrics):
# field 'family{labels}' is a counter, 'family{labels}|le' a histogram bucket (not
# cumulative), 'family{labels}|sum' its sum. No TTL: counters live as long as Redis's data.
METRICS = f"{PREFIX}:metrics"
