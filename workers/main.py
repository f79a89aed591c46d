"""``banter worker``: one process per GPU (or one CPU worker), pinned before ONNX Runtime loads;
``banter worker --openai``: a worker with no engine that sends every job upstream."""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from celery.signals import worker_init, worker_shutting_down
from kombu.exceptions import OperationalError

from banter import keys, logs
from banter.errors import Unavailable
from banter.redisconn import connect
from banter.settings import Settings, SettingsError

if TYPE_CHECKING:
    from workers.runtime import WorkerRuntime

log = logging.getLogger("banter.worker")

# How long a Python thread may hold the GIL while another waits (Python's default: 5 ms). A
# worker's task threads mostly wait on Redis and the engine; with a bulk backlog draining, an
# interactive job's thread would wait up to 5 ms for the GIL after every Redis reply. Measured
# with `python -m bench lanes --shape minilm`: interactive p99 under backlog 92 -> 64 ms.
GIL_SWITCH_INTERVAL_S = 0.0005


def node_name(gpu: int | None, name: str | None = None) -> str:
    if name:
        return name
    host = socket.gethostname()
    return f"gpu{gpu}@{host}" if gpu is not None else f"cpu@{host}"


def run_worker(settings: Settings, gpu: int | None, name: str | None = None) -> int:
    """Pin to ``gpu`` (CUDA_VISIBLE_DEVICES before onnxruntime is imported), start the engine
    and serve both lanes' queues (and the openai queues when a key is set) with Celery's
    thread pool until stopped. Returns the exit code."""
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
    from workers.runner import RunnerCache  # imports onnxruntime: after the pin
    from workers.runtime import WorkerRuntime

    logs.setup(settings.log_level)
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    providers = worker_providers(settings, gpu)
    runners = RunnerCache(providers, intra_op_threads=settings.ort_threads, kv_layout=settings.kv_layout)
    runtime = WorkerRuntime(settings, connect(settings.redis_url), runners, node_name(gpu, name))
    return _serve(settings, runtime, providers=providers, gpu=gpu)


def worker_providers(settings: Settings, gpu: int | None) -> list[Any]:
    """The execution providers of a worker's sessions: CUDA (``BANTER_CUDA_TF32`` as its
    ``use_tf32``) then CPU for ``--gpu``, where this onnxruntime has CUDA; else the CPU."""
    from workers.runner import select_providers

    return select_providers(use_gpu=gpu is not None, tf32=settings.cuda_tf32)


def run_openai_worker(settings: Settings, name: str | None = None) -> int:
    """Serve the openai queues with no engine (no ONNX Runtime session, no GPU): every job
    goes upstream. Node ``openai@host`` unless ``name``. Raise SettingsError without a key."""
    if not settings.openai_key:
        raise SettingsError("banter worker --openai needs an OpenAI key: set BANTER_OPENAI_KEY, "
                            "or OPENAI_API_KEY with BANTER_OPENAI_KEY unset (set, even empty, "
                            "it wins)")
    from workers.runtime import WorkerRuntime

    logs.setup(settings.log_level)
    runtime = WorkerRuntime(settings, connect(settings.redis_url), None,
                            name or f"openai@{socket.gethostname()}")
    return _serve(settings, runtime)


def worker_queues(settings: Settings, backends: tuple[str, ...]) -> list[str]:
    """The queues a worker serving ``backends`` consumes, every interactive queue first: the
    broker hands out messages in this order (``queue_order_strategy: priority``)."""
    by_backend = {"onnx": settings.queues, "openai": settings.openai_queues}
    return [by_backend[backend][lane] for lane in (0, 1) for backend in backends]


def _serve(settings: Settings, runtime: WorkerRuntime, **details: object) -> int:
    from workers.app import create_worker_app

    queues = worker_queues(settings, runtime.backends)
    app = create_worker_app(settings, runtime)
    logs.event(log, "worker_starting", node=runtime.node, backends=list(runtime.backends),
               queues=queues, **details)
    seen = runtime.redis.zscore(keys.WORKERS, runtime.node)
    if seen is not None and seen > time.time() - settings.worker_live_s:
        logs.event(log, "worker_name_in_use", logging.WARNING, node=runtime.node,
                   hint="another live worker (or this one's last run) has this name; workers "
                        "that share a name count as one in /readyz, /metrics and Flower: "
                        "give each its own --name")
    argv = ["worker", "--pool", "threads", "--concurrency",
            str(settings.worker_concurrency), "--hostname", runtime.node,
            "--queues", ",".join(queues), "--loglevel", settings.log_level,
            "--task-events", "--without-gossip", "--without-mingle"]
    _check_broker(app)
    controllers, stops = [], []
    worker_init.connect(lambda sender, **_: controllers.append(sender), weak=False)
    worker_shutting_down.connect(lambda sender, sig, **_: stops.append(sig), weak=False)
    runtime.start()
    try:
        # Celery stops with a non-zero exit code when its consumer died of an error it could
        # not recover from (seen when Redis restarts under it): then consume again, the engine
        # and the jobs in hand live on in this process. A stop that a signal asked for (Ctrl-C
        # too, which Celery also ends with exit code 1) ends the loop.
        while True:
            app.worker_main(argv)
            if stops or not (controllers and controllers[-1].exitcode):
                break
            logs.event(log, "consumer_restarting", logging.WARNING, node=runtime.node,
                       exitcode=controllers[-1].exitcode)
            runtime.gate.clear()
            time.sleep(1.0)
    finally:
        runtime.stop()
    _leave_if_stuck(runtime.node)
    return 0


def _leave_if_stuck(node: str, wait_s: float = 5.0) -> None:
    """After a cold shutdown (a second Ctrl-C) Celery returns with task threads still waiting
    on the engine, which has stopped: they would never end, and the interpreter waits for
    them at exit for ever. Give them ``wait_s``, then leave as a crash would (exit 0: stopped
    as asked); their jobs are taken over once their leases lapse."""
    deadline = time.monotonic() + wait_s
    for thread in _task_threads():
        thread.join(max(0.0, deadline - time.monotonic()))
    stuck = _task_threads()
    if stuck:
        logs.event(log, "worker_left_jobs", logging.WARNING, node=node, threads=len(stuck),
                   hint="stopped mid-job (a second Ctrl-C): other workers take its jobs over "
                        "once their leases lapse")
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _task_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate()
            if thread is not threading.main_thread() and not thread.daemon and thread.is_alive()]


def _check_broker(app) -> None:
    """Unavailable (exit 3) when the broker does not answer at start: a worker that
    heartbeats while its consumer cannot connect would count as ready and take no job. (An
    outage later is ridden out: Celery's consumer reconnects.)"""
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=2, interval_start=0.5, interval_step=0.5,
                                   timeout=5)
    except OperationalError as exc:
        raise Unavailable(f"the broker is not reachable (BANTER_BROKER_URL): {exc}") from None
