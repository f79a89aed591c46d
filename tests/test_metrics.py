"""GET /metrics: valid Prometheus text, cluster-wide numbers that workers record in Redis."""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest

from banter import keys
from banter import metrics as schema
from banter.jobs import JobRecord, JobStatus, JobStore
from banter.streams import DoneEvent, ErrorEvent, EventType, StreamWriter, read_events
from workers import metrics as wm

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"')
_SUFFIXES = {"histogram": ("_bucket", "_sum", "_count"), "counter": ("",), "gauge": ("",)}


def parse(text: str) -> dict[str, dict]:
    """A strict reader of the text exposition format (0.0.4): every sample belongs to the
    family whose HELP and TYPE came just before it; labels and values must parse."""
    assert text.endswith("\n")
    families: dict[str, dict] = {}
    current = None
    for line in text.splitlines():
        assert line, "no blank lines"
        if line.startswith("# HELP "):
            name, _, help_text = line[7:].partition(" ")
            assert name not in families, f"{name} declared twice"
            current = families[name] = {"help": help_text, "type": None, "samples": []}
            current["name"] = name
        elif line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            assert current is not None and current["name"] == name and current["type"] is None
            assert kind in _SUFFIXES
            current["type"] = kind
        else:
            match = _SAMPLE.match(line)
            assert match, f"bad sample line {line!r}"
            sample, raw_labels, value = match.groups()
            assert current is not None and current["type"], f"{sample} before its TYPE"
            assert sample in {current["name"] + s for s in _SUFFIXES[current["type"]]}, sample
            labels = dict(_LABEL.findall(raw_labels or ""))
            rebuilt = ",".join(f'{k}="{v}"' for k, v in _LABEL.findall(raw_labels or ""))
            assert rebuilt == (raw_labels or ""), f"bad labels in {line!r}"
            current["samples"].append((sample, labels, float(value)))
    try:  # the reference parser too, where it is installed (flower depends on it)
        from prometheus_client.parser import text_string_to_metric_families
    except ImportError:
        return families
    assert {f.name for f in text_string_to_metric_families(text)} >= {
        n.removesuffix("_total") for n in families}
    return families


def scrape(api) -> dict[str, dict]:
    response = api.get("/metrics")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return parse(response.text)


def value(families, name: str, **labels: str) -> float:
    return sum(v for sample, got, v in families.get(name, {"samples": []})["samples"]
               if sample == name and got == labels)


def histogram(families, name: str, **labels: str) -> dict:
    """``{"buckets": [(le, cumulative)], "sum", "count"}`` of one series (empty: zeros)."""
    out = {"buckets": [], "sum": 0.0, "count": 0.0}
    for sample, got, v in families[name]["samples"]:
        rest = {k: x for k, x in got.items() if k != "le"}
        if rest != labels:
            continue
        if sample.endswith("_bucket"):
            out["buckets"].append((got["le"], v))
        elif sample.endswith("_sum"):
            out["sum"] = v
        else:
            out["count"] = v
    return out


def check_histograms(families) -> None:
    """Every histogram series: the family's fixed buckets in order, cumulative (monotone),
    +Inf equal to _count, a _sum."""
    for family in schema.FAMILIES:
        if family.type != "histogram":
            continue
        assert families[family.name]["type"] == "histogram"
        series = {json.dumps({k: x for k, x in got.items() if k != "le"}, sort_keys=True)
                  for _, got, _ in families[family.name]["samples"]}
        for key in series:
            h = histogram(families, family.name, **json.loads(key))
            assert [le for le, _ in h["buckets"]] == list(family.le), family.name
            counts = [c for _, c in h["buckets"]]
            assert counts == sorted(counts), f"{family.name}{key} not monotone"
            assert counts[-1] == h["count"], f"{family.name}{key}: +Inf != _count"
            assert h["sum"] >= 0 and (h["count"] > 0 or h["sum"] == 0)


def settle(api, done, timeout_s: float = 10.0) -> dict[str, dict]:
    """Scrape until ``done(families)``: a worker counts a job just after it publishes its end."""
    deadline = time.monotonic() + timeout_s
    while True:
        families = scrape(api)
        if done(families) or time.monotonic() > deadline:
            return families
        time.sleep(0.05)


def delta(after, before, name, **labels) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def hist_delta(after, before, name, **labels) -> dict:
    a, b = histogram(after, name, **labels), histogram(before, name, **labels)
    return {"count": a["count"] - b["count"], "sum": a["sum"] - b["sum"]}


EMBED = {"kind": "embed", "lane": "interactive", "status": "succeeded", "backend": "onnx"}
GENERATE = {**EMBED, "kind": "generate"}


def test_metrics_text_is_valid_and_has_every_family(api):
    families = scrape(api)
    for name in ("banter_queue_depth", "banter_live_workers", "banter_live_workers_by_backend",
                 *(f.name for f in schema.FAMILIES)):
        assert name in families and families[name]["help"], name
    assert {s[1]["lane"] for s in families["banter_queue_depth"]["samples"]} == {
        "interactive", "bulk"}
    assert value(families, "banter_live_workers") >= 1
    assert value(families, "banter_live_workers_by_backend", backend="onnx") >= 1
    assert families["banter_broker_up"]["samples"] == [("banter_broker_up", {}, 1.0)]
    check_histograms(families)


def test_jobs_tokens_latency_and_batch_sizes_are_counted(api):
    before = scrape(api)
    embeds, gens, max_tokens = 16, 3, 4
    with ThreadPoolExecutor(max_workers=embeds) as pool:
        ids = list(pool.map(lambda i: api.post("/v1/jobs", {"kind": "embed",
                                                            "input": f"metrics {i}"}).json()["id"],
                            range(embeds)))
    done = [api.wait_job(job_id) for job_id in ids]
    assert {job["status"] for job in done} == {"succeeded"}
    texts = [api.post("/v1/inference", {"prompt": f"count me {i}", "max_tokens": max_tokens})
             for i in range(gens)]
    assert all(r.status_code == 200 for r in texts)
    prompt_tokens = sum(r.json()["usage"]["prompt_tokens"] for r in texts)

    after = settle(api, lambda f: (delta(f, before, "banter_jobs_total", **EMBED) >= embeds
                                   and delta(f, before, "banter_jobs_total", **GENERATE) >= gens))
    check_histograms(after)
    assert delta(after, before, "banter_jobs_total", **EMBED) == embeds
    assert delta(after, before, "banter_jobs_total", **GENERATE) == gens
    assert delta(after, before, "banter_generated_tokens_total", backend="onnx") == gens * max_tokens
    assert delta(after, before, "banter_prompt_tokens_total", kind="generate",
                 backend="onnx") == prompt_tokens
    assert delta(after, before, "banter_prompt_tokens_total", kind="embed", backend="onnx") > 0
    assert delta(after, before, "banter_generation_seconds_total", backend="onnx") > 0
    for kind, n in (("embed", embeds), ("generate", gens)):
        for name in ("banter_queue_wait_seconds", "banter_job_latency_seconds"):
            h = hist_delta(after, before, name, kind=kind, lane="interactive")
            assert h["count"] == n and h["sum"] > 0, (name, kind, h)
    ttft = hist_delta(after, before, "banter_time_to_first_token_seconds", backend="onnx",
                      lane="interactive")
    assert ttft["count"] == gens and ttft["sum"] > 0
    latency = hist_delta(after, before, "banter_job_latency_seconds", kind="generate",
                         lane="interactive")
    assert ttft["sum"] <= latency["sum"]  # the first token comes before the end

    # ORT passes: concurrent embeds shared passes, so some pass had more than one input
    sizes = histogram(after, "banter_batch_size", kind="embed")
    sizes_before = histogram(before, "banter_batch_size", kind="embed")
    passes = sizes["count"] - sizes_before["count"]
    assert 1 <= passes < embeds
    assert sizes["sum"] - sizes_before["sum"] == embeds  # every input ran in exactly one pass
    alone = dict(sizes["buckets"])["1.0"] - dict(sizes_before["buckets"] or [("1.0", 0)])["1.0"]
    assert alone < passes, "no embed pass ran more than one input"
    ort = hist_delta(after, before, "banter_ort_pass_seconds", kind="embed")
    assert ort["count"] == passes and ort["sum"] > 0
    assert hist_delta(after, before, "banter_ort_pass_seconds", kind="generate")["count"] >= max_tokens
    workers = {s[1]["worker"] for s in after["banter_worker_ort_passes_total"]["samples"]}
    assert "cpu-test@localhost" in workers


def test_failed_jobs_are_counted_by_error(api):
    labels = {"kind": "generate", "lane": "interactive", "status": "failed", "backend": "onnx"}
    before = scrape(api)
    job = api.post("/v1/jobs", {"kind": "generate", "input": "word " * 600,
                                "params": {"max_tokens": 5}}).json()
    assert api.wait_job(job["id"])["error"]["type"] == "prompt_too_long"
    after = settle(api, lambda f: delta(f, before, "banter_jobs_total", **labels) >= 1)
    assert delta(after, before, "banter_jobs_total", **labels) == 1
    assert delta(after, before, "banter_job_failures_total", kind="generate",
                 error="prompt_too_long") == 1
    assert hist_delta(after, before, "banter_queue_wait_seconds", kind="generate",
                      lane="interactive")["count"] == 1
    assert hist_delta(after, before, "banter_job_latency_seconds", kind="generate",
                      lane="interactive")["count"] == 0  # latency: succeeded jobs only


def test_queue_depth_per_lane_counts_waiting_messages(api, redis_client, settings):
    redis_client.rpush(settings.queue_bulk + ".openai", "not-a-message")  # nobody consumes it
    try:
        families = scrape(api)
        assert value(families, "banter_queue_depth", lane="bulk") >= 1
    finally:
        redis_client.lrem(settings.queue_bulk + ".openai", 0, "not-a-message")


# -- the recording script, with times it cannot guess ----------------------------------------

def test_ending_a_job_counts_it_with_wait_run_and_first_token(redis_client):
    """``JobStore.finish`` counts the job in the same script that ends it: queue wait, run
    time and time to first token come from the job's ``started_at`` and its stream's first
    entry; a job already ended is not counted again; a count that fails to record drops the
    count, never the end."""
    key = f"test-metrics:{uuid.uuid4().hex}"
    store = JobStore(redis_client, 60, metrics_key=key)
    streams = StreamWriter(redis_client, maxlen=100, ttl_s=60)
    queued = math.floor(time.time()) - 10.0
    record = JobRecord(id=str(uuid.uuid4()), kind="generate", model="m", input="x",
                       lane="bulk", queued_at=queued, backend="onnx")
    store.create(record)
    redis_client.hset(keys.job(record.id), mapping={"status": "running", "started_at": queued + 2})
    first_ms = int((queued + 3.0) * 1000)
    redis_client.xadd(keys.stream(record.id), {"event": "token", "seq": "0", "text": "a",
                                               "token_id": "1"}, id=f"{first_ms}-0")
    redis_client.xadd(keys.stream(record.id), {"event": "token", "seq": "1", "text": "b",
                                               "token_id": "2"}, id=f"{first_ms + 500}-0")
    usage = {"prompt_tokens": 3, "completion_tokens": 2}
    done = DoneEvent(record.id, "length", usage)
    ended_ids = [record.id]
    try:
        ended = store.finish(record, (JobStatus.RUNNING,), JobStatus.SUCCEEDED, done, streams,
                             finished_at=queued + 4.0, usage=usage)
        assert ended == (True, "running", {"queue_ms": 2000.0, "run_ms": 2000.0,
                                           "ttft_ms": 3000.0})
        series = 'kind="generate",lane="bulk"'
        counted = {
            'banter_jobs_total{kind="generate",lane="bulk",status="succeeded",backend="onnx"}': "1",
            'banter_prompt_tokens_total{kind="generate",backend="onnx"}': "3",
            'banter_generated_tokens_total{backend="onnx"}': "2",
            'banter_generation_seconds_total{backend="onnx"}': "2",
            f"banter_queue_wait_seconds{{{series}}}|2.5": "1",
            f"banter_queue_wait_seconds{{{series}}}|sum": "2",
            'banter_time_to_first_token_seconds{backend="onnx",lane="bulk"}|5.0': "1",
            'banter_time_to_first_token_seconds{backend="onnx",lane="bulk"}|sum': "3",
            f"banter_job_latency_seconds{{{series}}}|5.0": "1",
            f"banter_job_latency_seconds{{{series}}}|sum": "4",
        }
        assert redis_client.hgetall(key) == counted
        again = store.finish(record, (JobStatus.RUNNING,), JobStatus.FAILED, done, streams,
                             finished_at=queued + 5.0)
        assert again == (False, "succeeded", {}) and redis_client.hgetall(key) == counted

        # never started, its stream has no token: a failure with no wait, run or first token
        failed = replace(record, id=str(uuid.uuid4()), backend=None)
        ended_ids.append(failed.id)
        store.create(failed)
        error = {"type": "inference_error", "message": "boom"}
        ended = store.finish(failed, (JobStatus.QUEUED,), JobStatus.FAILED,
                             ErrorEvent(failed.id, error), streams, finished_at=queued,
                             error=error)
        assert ended == (True, "queued", {})
        assert redis_client.hget(key, 'banter_job_failures_total{kind="generate",'
                                      'error="inference_error"}') == "1"
        assert redis_client.hget(key, 'banter_jobs_total{kind="generate",lane="bulk",'
                                      'status="failed",backend="unknown"}') == "1"

        # the metrics field holds no number: the count is dropped, the job ends all the same
        broken = replace(record, id=str(uuid.uuid4()))
        ended_ids.append(broken.id)
        store.create(broken)
        redis_client.hset(key, 'banter_jobs_total{kind="generate",lane="bulk",'
                               'status="cancelled",backend="onnx"}', "not a number")
        ended = store.finish(broken, (JobStatus.QUEUED,), JobStatus.CANCELLED,
                             DoneEvent(broken.id, "cancelled", usage), streams, finished_at=queued)
        assert ended == (True, "queued", {})
        assert store.get(broken.id).status == "cancelled"
        assert [kind for _, kind, _ in read_events(redis_client, broken.id)] == [EventType.DONE]
    finally:
        for job_id in ended_ids:
            redis_client.delete(keys.job(job_id), keys.stream(job_id))
        redis_client.delete(key)


def test_pass_histograms_bucket_by_upper_bound(redis_client):
    key = f"test-metrics:{uuid.uuid4().hex}"
    pipe = redis_client.pipeline(transaction=False)
    for size, seconds in ((1, 0.0005), (2, 0.003), (3, 0.003), (64, 20.0), (65, 0.001)):
        wm.add_pass(pipe, "metrics-test@nowhere", "embed", size, seconds, key=key)
    pipe.execute()
    try:
        stored = redis_client.hgetall(key)
        size = 'banter_batch_size{kind="embed"}'
        ort = 'banter_ort_pass_seconds{kind="embed"}'
        assert {f: v for f, v in stored.items() if f.startswith(size)} == {
            f"{size}|1.0": "1", f"{size}|2.0": "1", f"{size}|4.0": "1", f"{size}|64.0": "1",
            f"{size}|+Inf": "1", f"{size}|sum": "135"}
        assert {f: v for f, v in stored.items() if f.startswith(ort) and not f.endswith("sum")} == {
            f"{ort}|0.0005": "1", f"{ort}|0.005": "2", f"{ort}|+Inf": "1", f"{ort}|0.001": "1"}
    finally:
        redis_client.delete(key, keys.worker_stats("metrics-test@nowhere"))


def test_series_escape_label_values():
    assert schema.FAILURES.series(kind="embed", error='a"b\\c\nd') == (
        'banter_job_failures_total{kind="embed",error="a\\"b\\\\c\\nd"}')
    with pytest.raises(ValueError):
        schema.JOBS.series(kind="embed")
