"""Celery configuration module for banterhearts (producer and workers both load it).

Values that depend on settings (broker URL, queue names, visibility timeout) are applied by
``banter.broker.make_celery``; everything here is fixed policy.
"""

# JSON only: never pickle.
task_serializer = "json"
result_serializer = "json"
event_serializer = "json"
accept_content = ["json"]

# At-least-once delivery: ack after the job ran; a worker lost mid-job gets its jobs redelivered.
task_acks_late = True
task_reject_on_worker_lost = True

# Results live in the job records, not in a Celery result backend.
task_ignore_result = True

# Workers run the thread pool: each reserved task is one thread waiting on the shared engine, so
# the engine sees up to `concurrency` jobs at once. A multiplier of 1 keeps exactly that many
# reserved, so other workers are not starved of jobs that this one cannot batch yet.
worker_prefetch_multiplier = 1

# Events for Flower: workers send task events, producers send task-sent events.
worker_send_task_events = True
task_send_sent_event = True

broker_connection_retry_on_startup = True
worker_hijack_root_logger = False
worker_redirect_stdouts = False
