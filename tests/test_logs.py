"""Structured JSON logs: the trace id goes from the HTTP request through the Celery message to
every line the worker logs while it runs the job; the producer logs one access line per request."""

from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import replace
from types import SimpleNamespace

import pytest
from celery import signals

from banter import logs
from producer.app import create_app
from tests.conftest import Api, Server, start_worker, stop_process

QUEUES = {"BANTER_QUEUE_INTERACTIVE": "logs-interactive", "BANTER_QUEUE_BULK": "logs-bulk"}
NODE = "cpu-logs@localhost"


@pytest.fixture(scope="module")
def logged(settings, stack_env, redis_client, demo_models, tmp_path_factory):
    """A producer and a worker (INFO logs to a file, one ONNX Runtime thread per session) on
    queues no other worker consumes."""
    log_path = tmp_path_factory.mktemp("logs-test") / "worker.log"
    worker = start_worker({**stack_env, **QUEUES, "BANTER_LOG_LEVEL": "INFO",
                           "BANTER_ORT_THREADS": "1"}, NODE, log_path, redis_client)
    server = Server(create_app(replace(settings, queue_interactive=QUEUES["BANTER_QUEUE_INTERACTIVE"],
                                       queue_bulk=QUEUES["BANTER_QUEUE_BULK"]), redis_client))
    yield SimpleNamespace(api=Api(server.url), log_path=log_path)
    server.close()
    stop_process(worker)


def json_lines(path) -> list[dict]:
    """The log's JSON lines (Celery's start-up banner is plain text)."""
    out = []
    for line in path.read_text().splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


def wait_for_line(path, match, timeout_s: float = 10.0) -> dict:
    """The first JSON line ``match`` accepts; the worker logs just after the job's end event."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = [line for line in json_lines(path) if match(line)]
        if found:
            return found[0]
        if time.monotonic() > deadline:
            raise AssertionError(f"no such line in {path.read_text()[-3000:]}")
        time.sleep(0.05)


def test_trace_id_reaches_every_worker_line_of_the_job(logged):
    response = logged.api.post("/v1/inference", {"prompt": "trace me", "max_tokens": 3},
                               headers={"X-Trace-ID": "trace-xyz"})
    assert response.status_code == 200, response.text
    job_id = response.json()["id"]
    done = wait_for_line(logged.log_path, lambda line: line["event"] == "inference_complete"
                         and line.get("job_id") == job_id)
    assert done["trace_id"] == "trace-xyz"
    assert (done["model"], done["version"], done["backend"], done["kind"]) == (
        "demo-gpt", 1, "onnx", "generate")
    assert done["batch_size"] >= 1 and done["status"] == "succeeded"
    assert done["completion_tokens"] == 3 and done["prompt_tokens"] > 0
    assert done["level"] == "info" and done["logger"] == "banter.worker"
    assert done["latency_ms"] > 0 and done["run_ms"] > 0 and done["queue_ms"] >= 0
    assert 0 < done["ttft_ms"] <= done["latency_ms"]

    of_job = [line for line in json_lines(logged.log_path) if line.get("job_id") == job_id]
    assert all(line.get("trace_id") == "trace-xyz" for line in of_job), of_job
    # lines that name neither id themselves get both from the task's log context: the first
    # job of a fresh worker loads its model inside the task
    loaded = [line for line in of_job if line["event"] == "model_loaded"]
    assert loaded and loaded[0]["model"] == "demo-gpt"
    assert loaded[0]["kv_layout"] == "inplace"  # BANTER_KV_LAYOUT=auto, a CPU worker
    assert loaded[0]["intra_op_threads"] == 1  # BANTER_ORT_THREADS


def test_a_failed_job_logs_its_trace_and_error(logged):
    response = logged.api.post("/v1/jobs", {"kind": "generate", "input": "word " * 600},
                               headers={"X-Trace-ID": "trace-fail"})
    job_id = response.json()["id"]
    failed = wait_for_line(logged.log_path, lambda line: line["event"] == "inference_failed"
                           and line.get("job_id") == job_id)
    assert failed["trace_id"] == "trace-fail" and failed["error"] == "prompt_too_long"
    assert failed["level"] == "warning" and failed["kind"] == "generate"


def test_embed_jobs_log_their_batch_and_no_input(logged):
    response = logged.api.post("/v1/jobs", {"kind": "embed", "input": "private text"},
                               headers={"X-Trace-ID": "trace-embed"})
    job_id = response.json()["id"]
    done = wait_for_line(logged.log_path, lambda line: line["event"] == "inference_complete"
                         and line.get("job_id") == job_id)
    assert done["trace_id"] == "trace-embed" and done["model"] == "demo-embed"
    assert done["batch_size"] >= 1 and "ttft_ms" not in done
    assert "private text" not in logged.log_path.read_text()


def test_the_producer_logs_one_access_line_per_request(logged, caplog):
    with caplog.at_level(logging.INFO, logger="banter.access"):
        ok = logged.api.post("/v1/inference", {"prompt": "secret prompt text", "max_tokens": 2},
                             headers={"X-Trace-ID": "trace-access",
                                      "Authorization": "Bearer sk-do-not-log"})
        missing = logged.api.get("/v1/jobs/no-such-job", headers={"X-Trace-ID": "trace-404"})
        logged.api.get("/healthz")  # probes log at DEBUG
    assert ok.status_code == 200 and missing.status_code == 404
    lines = [json.loads(logs.JSONFormatter().format(r)) for r in caplog.records
             if r.name == "banter.access"]
    by_trace = {line["trace_id"]: line for line in lines}
    access = by_trace["trace-access"]
    assert (access["event"], access["method"], access["path"], access["status"]) == (
        "http_request", "POST", "/v1/inference", 200)
    assert access["latency_ms"] > 0 and access["level"] == "info"
    assert (by_trace["trace-404"]["status"], by_trace["trace-404"]["path"]) == (
        404, "/v1/jobs/no-such-job")
    assert not any(line["path"] == "/healthz" for line in lines)
    text = "\n".join(logs.JSONFormatter().format(r) for r in caplog.records)
    assert "sk-do-not-log" not in text and "secret prompt text" not in text


# -- the log context, without processes -------------------------------------------------------

@pytest.fixture
def json_logger():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JSONFormatter())
    handler.addFilter(logs.ContextFilter())
    logger = logging.getLogger("banter.test-logs")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False

    def lines() -> list[dict]:
        return [json.loads(line) for line in stream.getvalue().splitlines()]

    yield logger, lines
    logger.removeHandler(handler)


def test_context_fields_reach_records_and_explicit_fields_win(json_logger):
    logger, lines = json_logger
    with logs.context(trace_id="t-1", job_id="j-1"):
        logger.info("inside")
        logs.event(logger, "explicit", trace_id="t-2")
        with logs.context(job_id="j-2"):
            logger.info("nested")
    logger.info("outside")
    inside, explicit, nested, outside = lines()
    assert (inside["trace_id"], inside["job_id"]) == ("t-1", "j-1")
    assert (explicit["trace_id"], explicit["job_id"]) == ("t-2", "j-1")
    assert (nested["trace_id"], nested["job_id"]) == ("t-1", "j-2")
    assert "trace_id" not in outside and "job_id" not in outside


def test_celery_task_signals_bind_the_job_and_its_trace_header(json_logger):
    logger, lines = json_logger
    logs.setup()  # connects the signals (idempotent)
    task = SimpleNamespace(request=SimpleNamespace(trace_id="trace-from-header"))
    signals.task_prerun.send(sender=None, task_id="job-1", task=task, args=(), kwargs={})
    try:
        logger.info("in task")
    finally:
        signals.task_postrun.send(sender=None, task_id="job-1", task=task, args=(), kwargs={},
                                  retval=None, state="SUCCESS")
    logger.info("after task")
    during, after = lines()
    assert (during["job_id"], during["trace_id"]) == ("job-1", "trace-from-header")
    assert "job_id" not in after and logs.current() == {}
