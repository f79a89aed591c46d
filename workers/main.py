"""``banter worker``: one process per GPU (or one CPU worker), pinned before ONNX Runtime loads."""

from __future__ import annotations

import logging
import os
import socket

from banter import logs
from banter.redisconn import connect
from banter.settings import Settings

log = logging.getLogger("banter.worker")


def node_name(gpu: int | None, name: str | None = None) -> str:
    if name:
        return name
    host = socket.gethostname()
    return f"gpu{gpu}@{host}" if gpu is not None else f"cpu@{host}"


def run_worker(settings: Settings, gpu: int | None, name: str | None = None,
               concurrency: int | None = None) -> int:
    """Pin to ``gpu`` (CUDA_VISIBLE_DEVICES before onnxruntime is imported), start the engine
    and serve both queues with Celery's thread pool until stopped. Returns the exit code."""
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
    from workers.app import create_worker_app  # imports onnxruntime: after the pin
    from workers.runner import RunnerCache, select_providers
    from workers.runtime import WorkerRuntime

    logs.setup(settings.log_level)
    node = node_name(gpu, name)
    providers = select_providers(use_gpu=gpu is not None)
    runtime = WorkerRuntime(settings, connect(settings.redis_url), RunnerCache(providers), node)
    app = create_worker_app(settings, runtime)
    logs.event(log, "worker_starting", node=node, providers=providers,
               queues=list(settings.queues), gpu=gpu)
    runtime.start()
    try:
        app.worker_main([
            "worker", "--pool", "threads", "--concurrency",
            str(concurrency or settings.worker_concurrency), "--hostname", node,
            "--queues", ",".join(settings.queues), "--loglevel", settings.log_level,
            "--task-events", "--without-gossip", "--without-mingle",
        ])
    finally:
        runtime.stop()
    return 0
