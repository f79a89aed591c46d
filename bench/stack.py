"""Start and stop what a benchmark needs: a private redis-server, the registry with the model
promoted, worker processes (``banter worker --cpu``, or ``--gpu N`` with ``gpu=N`` or
``BENCH_GPU=N`` in the environment) and the producer (``banter producer``).

The broker is the private Redis, or with ``broker_url`` an existing broker (RabbitMQ): the
stack then uses queues of its own (``bench-<id>-interactive``, ``bench-<id>-bulk``) and deletes
them (and the exchange Celery names after the first) at the end, so it never touches anyone
else's messages.

Everything lives in one temporary directory (logs in ``logs/``) and is stopped and removed by
``close()``. Child processes are started in their own session so that ``close()`` can kill
exactly the process groups it started, and nothing else, if a polite SIGTERM is not enough.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import requests

from banter import keys
from banter.redisconn import connect
from banter.redisserver import RedisServer, free_port
from banter.settings import Settings
from registry.service import Registry

log = logging.getLogger("bench.stack")

START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 20.0
GPU_ENV = "BENCH_GPU"  # BENCH_GPU=N: every worker a scenario starts is ``banter worker --gpu N``


class StackError(RuntimeError):
    pass


class Child:
    """One child process with its log file."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.process = subprocess.Popen(args, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0fs; killing its process group", self.name,
                            timeout_s)
        # whatever is left of the group we started (gunicorn workers, a stuck child)
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.process.wait()
        self._log.close()


class BenchStack:
    """``with BenchStack() as stack:`` private Redis + registry; then ``promote_*``,
    ``start_producer`` and ``start_worker``/``stop_worker`` as the scenario needs."""

    def __init__(self, model_root: Path | None = None, log_level: str = "WARNING",
                 heartbeat_s: float = 1.0, keep: bool = False, gpu: int | None = None,
                 broker_url: str | None = None) -> None:
        self._broker_url = broker_url
        self._model_root = Path(model_root).resolve() if model_root else None
        self._log_level = log_level
        self._heartbeat_s = heartbeat_s
        self._keep = keep
        self.workdir: Path | None = None
        self.redis_server: RedisServer | None = None
        self.env: dict[str, str] = {}
        self.settings: Settings | None = None
        self.redis = None
        self.producer: Child | None = None
        self.producer_url = ""
        self.workers: dict[str, Child] = {}
        self.worker_logs: dict[str, Path] = {}  # node -> its log, kept until close()
        self.children: list[Child] = []  # other processes a scenario started (start_child)
        if gpu is None and os.environ.get(GPU_ENV, "").strip():
            gpu = int(os.environ[GPU_ENV])
        self.gpu = gpu

    # -- lifecycle -----------------------------------------------------------------------------

    def __enter__(self) -> "BenchStack":
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="banter-bench-"))
        (self.workdir / "logs").mkdir()
        self.redis_server = RedisServer(self.workdir / "redis", persist=False)
        url = self.redis_server.start()
        home = self.workdir / "home"
        model_root = self._model_root or home / "models"
        model_root.mkdir(parents=True, exist_ok=True)
        self.env = {"BANTER_REDIS_URL": url, "BANTER_HOME": str(home),
                    "BANTER_MODEL_ROOT": str(model_root),
                    "BANTER_REGISTRY_PATH": str(home / "registry" / "history.jsonl"),
                    "BANTER_WORKER_HEARTBEAT_S": str(self._heartbeat_s),
                    "BANTER_LOG_LEVEL": self._log_level, "BANTER_AUTH_DISABLED": "true"}
        if self._broker_url:
            tag = f"bench-{uuid.uuid4().hex[:8]}"
            self.env.update({"BANTER_BROKER_URL": self._broker_url,
                             "BANTER_QUEUE_INTERACTIVE": f"{tag}-interactive",
                             "BANTER_QUEUE_BULK": f"{tag}-bulk"})
        self.settings = Settings.from_env(self.env)
        self.redis = connect(url)
        log.info("stack in %s, redis %s", self.workdir, url)

    def close(self) -> None:
        for node in list(self.workers):
            self.stop_worker(node)
        while self.children:
            self.children.pop().stop()
        if self.producer:
            self.producer.stop()
            self.producer = None
        if self._broker_url and self.settings:
            self._delete_queues()
        if self.redis_server:
            self.redis_server.stop()
            self.redis_server = None
        if self.workdir:
            if self._keep:
                log.info("kept %s (logs in logs/)", self.workdir)
            else:
                shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def _delete_queues(self) -> None:
        from banter.broker import make_celery

        names = [*self.settings.queues, *self.settings.openai_queues]
        try:
            with make_celery(self.settings).connection_for_write() as conn:
                channel = conn.channel()
                for name in names:
                    channel.queue_delete(name)
                channel.exchange_delete(self.settings.queue_interactive)  # Celery's default
        except Exception as exc:  # kombu and amqp raise several kinds; the queues are ours
            log.warning("could not delete the bench queues %s: %s", names, exc)

    # -- models --------------------------------------------------------------------------------

    @property
    def model_root(self) -> Path:
        return self.settings.model_root

    def promote(self, name: str, kind: str, model_dir: Path) -> dict:
        """Promote ``model_dir/model.onnx`` (it must lie under the model root)."""
        registry = Registry.from_settings(self.settings, self.redis)
        record, _ = registry.promote(name=name, kind=kind, path=str(Path(model_dir) / "model.onnx"),
                                     actor="bench", reason="benchmark")
        log.info("promoted %s v%s (%s)", record.name, record.version, record.path)
        return {"name": record.name, "version": record.version, "sha256": record.sha256,
                "path": str(self.model_root / record.path)}

    # -- processes -----------------------------------------------------------------------------

    def _child_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        return {**os.environ, **self.env, **(extra or {})}

    def start_producer(self, workers: int = 2, threads: int = 64) -> str:
        port = free_port()
        self.producer = Child("producer", [sys.executable, "-m", "banter.cli", "producer",
                                           "--host", "127.0.0.1", "--port", str(port),
                                           "--workers", str(workers), "--threads", str(threads)],
                              self._child_env(), self.workdir / "logs" / "producer.log")
        self.producer_url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if not self.producer.alive():
                raise StackError(f"the producer exited:\n{self.producer.log_tail()}")
            try:
                requests.get(f"{self.producer_url}/healthz", timeout=2)
                return self.producer_url
            except requests.RequestException:
                time.sleep(0.1)
        raise StackError(f"the producer did not answer in {START_TIMEOUT_S:.0f}s:\n"
                         f"{self.producer.log_tail()}")

    def start_worker(self, label: str, extra_env: dict[str, str] | None = None) -> str:
        """``banter worker --cpu --name bench-LABEL@host`` (``--gpu N`` when the stack has a
        GPU; its log level is then INFO, so the log says which execution providers the model
        got: ``worker_providers``) with ``extra_env`` on top; returns the node name once its
        heartbeat is in Redis and (with a producer) /readyz is 200."""
        node = f"bench-{label}@{socket.gethostname()}"
        device = ["--cpu"] if self.gpu is None else ["--gpu", str(self.gpu)]
        if self.gpu is not None:
            extra_env = {"BANTER_LOG_LEVEL": "INFO", **(extra_env or {})}
        log_path = self.workdir / "logs" / f"worker-{label}.log"
        child = Child(node, [sys.executable, "-m", "banter.cli", "worker", *device, "--name",
                             node], self._child_env(extra_env), log_path)
        self.workers[node] = child
        self.worker_logs[node] = log_path
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if not child.alive():
                raise StackError(f"worker {node} exited:\n{child.log_tail()}")
            if self.redis.zscore(keys.WORKERS, node) is not None:
                break
            time.sleep(0.1)
        else:
            raise StackError(f"worker {node} sent no heartbeat in {START_TIMEOUT_S:.0f}s:\n"
                             f"{child.log_tail()}")
        if self.producer:
            self.wait_ready(deadline)
        log.info("worker %s up (%s)", node, extra_env or {})
        return node

    def wait_ready(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{self.producer_url}/readyz", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise StackError("the producer's /readyz did not turn 200")

    def stop_worker(self, node: str) -> None:
        child = self.workers.pop(node, None)
        if child is None:
            return
        child.stop()
        providers = self.worker_providers(node)
        if providers:
            log.info("worker %s ran %s", node, providers)
        if self.redis is not None:
            try:
                self.redis.zrem(keys.WORKERS, node)  # after a kill it could not do it itself
            except Exception:  # Redis already gone during cleanup
                pass
        log.info("worker %s stopped", node)

    def worker_providers(self, node: str) -> dict[str, list[str]]:
        """``model@version -> execution providers`` of the sessions worker ``node`` loaded, from
        its ``model_loaded`` log lines (INFO: logged when the stack has a GPU, or with
        ``BANTER_LOG_LEVEL=INFO`` in the worker's env); empty when the log does not say."""
        found: dict[str, list[str]] = {}
        path = self.worker_logs.get(node)
        try:
            lines = path.read_text(errors="replace").splitlines() if path else []
        except OSError:
            return found
        for line in lines:
            if '"model_loaded"' not in line:
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            found[f"{entry.get('model')}@{entry.get('version')}"] = entry.get("providers")
        return found

    def start_child(self, name: str, args: list[str],
                    extra_env: dict[str, str] | None = None) -> Child:
        """Any other process a scenario needs (with the stack's env and ``extra_env``), logged
        to ``logs/NAME.log`` and stopped by ``close()``."""
        child = Child(name, args, self._child_env(extra_env), self.workdir / "logs" / f"{name}.log")
        self.children.append(child)
        return child

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds (user + system) used so far by each part: ``redis``, ``producer`` (its
        whole process group: gunicorn master and workers), each worker by node, each other
        child by name, and ``bench`` (this process). Linux /proc only; empty elsewhere."""
        groups = {"producer": self.producer, **self.workers,
                  **{child.name: child for child in self.children}}
        sessions = {child.process.pid: name for name, child in groups.items() if child}
        out = {name: 0.0 for name in ["redis", *groups, "bench"]}
        tick = os.sysconf("SC_CLK_TCK")
        redis_pid = self.redis_server.process.pid if self.redis_server and \
            self.redis_server.process else None
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            pid, session = int(stat.parent.name), int(fields[3])
            name = "redis" if pid == redis_pid else sessions.get(session)
            if name:
                out[name] += (int(fields[11]) + int(fields[12])) / tick
        times = os.times()
        out["bench"] = times.user + times.system
        return out
