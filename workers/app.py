"""The worker's Celery app: one task, ``banter.run_job``, bound to the process's runtime."""

from __future__ import annotations

from celery import Celery

from banter.broker import RUN_JOB, make_celery
from banter.settings import Settings
from workers.runtime import WorkerRuntime


def create_worker_app(settings: Settings, runtime: WorkerRuntime) -> Celery:
    app = make_celery(settings, "banterhearts-worker")

    @app.task(name=RUN_JOB)
    def run_job(job_id: str) -> str:
        """Run job ``job_id`` (its record holds everything); idempotent by job id."""
        return runtime.run_job(job_id)

    return app
