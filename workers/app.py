"""The worker's Celery app: one task, ``banter.run_job``, bound to the process's runtime."""

from __future__ import annotations

from celery import Celery
from celery.signals import task_received

from banter.broker import RUN_JOB, make_celery
from banter.settings import Settings
from workers.runtime import WorkerRuntime


def create_worker_app(settings: Settings, runtime: WorkerRuntime) -> Celery:
    gate = runtime.gate
    app = make_celery(settings, "banterhearts-worker", bulk_intake_wait=gate.bulk_intake_wait)
    interactive = frozenset(settings.lane_queues("interactive"))

    @task_received.connect(weak=False)
    def on_received(sender, request, **_) -> None:
        """An interactive message is in: the bulk lane steps aside from now on (workers/lanes.py)."""
        if sender.app is app and request.delivery_info.get("routing_key") in interactive:
            gate.enter(request.id)

    @app.task(name=RUN_JOB)
    def run_job(job_id: str) -> str:
        """Run job ``job_id`` (its record holds everything); idempotent by job id."""
        return runtime.run_job(job_id)

    return app
