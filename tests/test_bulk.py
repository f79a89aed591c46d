"""Bulk offline processing against the running stack: ``banter bulk`` as a real process (a
2,000-line file killed halfway and resumed, duplicate custom_ids), the one-request endpoint it
uses, and the ``/v1/batches`` lifecycle."""

from __future__ import annotations

import base64
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from banter import keys
from banter.demo import DEMO_TEXT
from banter.redisserver import free_port
from producer import batches
from tests.conftest import Api, unserved_producer

CLI = [sys.executable, "-m", "banter.cli"]

BAD_LINES = [  # (raw line, error code in the error file)
    '{"custom_id": "torn", "method": "POST", "url": "/v1/completions", "body": {',
    "[1, 2, 3]",
    '{"method": "POST", "url": "/v1/completions", "body": {"prompt": "no id"}}',
    '{"custom_id": 7, "method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}}',
    '{"custom_id": " ", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}}',
    '{"custom_id": "get", "method": "GET", "url": "/v1/completions", "body": {"prompt": "x"}}',
    '{"custom_id": "img", "method": "POST", "url": "/v1/images/generations", "body": {}}',
    '{"custom_id": "str-body", "method": "POST", "url": "/v1/completions", "body": "x"}',
    '{"custom_id": "no-body", "method": "POST", "url": "/v1/embeddings"}',
    '{"custom_id": "nan", "method": "POST", "url": "/v1/completions", "body": {"top_p": NaN}}',
    '{"custom_id": "s\\ud800", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}}',
    '{"custom_id": "inf", "method": "POST", "url": "/v1/completions", "body": {"top_p": 1e400}}',
]
BAD_CODES = ["bad_json", "invalid_request", "invalid_request", "invalid_request",
             "invalid_request", "invalid_request", "invalid_request", "invalid_request",
             "invalid_request", "bad_json", "bad_json", "bad_json"]
REFUSED = {"c-5": 404, "c-8": 400}  # unknown model; max_tokens over the limit (400, as OpenAI)


def request_line(i: int, marker: str) -> dict:
    """Line i: embeddings, completions and chat in turn, 2 to 4 tokens each."""
    custom_id = f"c-{i}"
    text = f"{marker} item {i}"
    if i % 3 == 0:
        return {"custom_id": custom_id, "method": "POST", "url": "/v1/embeddings",
                "body": {"input": text}}
    body = {"max_tokens": 2 + i % 3, "temperature": 0}  # greedy: the text is known
    if custom_id in REFUSED:
        body.update({"model": "no-such-model"} if REFUSED[custom_id] == 404 else
                    {"max_tokens": 5000})
    if i % 3 == 1:
        return {"custom_id": custom_id, "method": "POST", "url": "/v1/completions",
                "body": {**body, "prompt": text}}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {**body, "messages": [{"role": "user", "content": text}]}}


def write_input(path: Path, good: int, marker: str) -> dict[int, str]:
    """``good`` request lines with BAD_LINES spread among them and a few blank lines; returns
    {line number: expected error code} of the bad ones."""
    bad_at = {good * (k + 1) // (len(BAD_LINES) + 1) + k: k for k in range(len(BAD_LINES))}
    expected, number, i = {}, 0, 0
    with open(path, "w") as file:
        while i < good or len(expected) < len(BAD_LINES):
            number += 1
            if number in bad_at or i == good:
                k = bad_at.get(number, len(expected))
                file.write(BAD_LINES[k] + "\n")
                expected[number] = BAD_CODES[k]
            else:
                file.write(json.dumps(request_line(i, marker)) + "\n")
                i += 1
            if number % 500 == 0:
                file.write("\n")  # blank lines are skipped, not counted
                number += 1
    return expected


def bulk(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, "bulk", *args], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def jobs_with(redis_client, marker: str) -> int:
    """How many job records hold ``marker`` in their input."""
    ids = list(redis_client.scan_iter(keys.job("*"), count=1000))
    pipe = redis_client.pipeline(transaction=False)
    for key in ids:
        pipe.hget(key, "input")
    return sum(1 for text in pipe.execute() if text and marker in text)


def check_body(line: dict, request: dict, api) -> None:
    """The response body is what the request's endpoint answers."""
    body = line["response"]["body"]
    if request["url"] == "/v1/embeddings":
        vector = body["data"][0]["embedding"]
        assert body["object"] == "list" and len(vector) == 128
        assert abs(sum(x * x for x in vector) - 1.0) < 1e-4
        return
    if request["url"] == "/v1/completions":
        assert body["object"] == "text_completion"
        text = body["choices"][0]["text"]
    else:
        assert body["object"] == "chat.completion"
        assert body["choices"][0]["message"]["role"] == "assistant"
        text = body["choices"][0]["message"]["content"]
    # the demo model writes DEMO_TEXT whatever the prompt: max_tokens words of it
    words = request["body"]["max_tokens"]
    assert text == "".join(" " + word for word in DEMO_TEXT.split()[:words])
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == words


def test_ctrl_c_says_how_far_it_got_and_how_to_resume(api, tmp_path):
    marker = f"bulk-{uuid.uuid4().hex[:8]}"
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(source, 600, marker)
    with open(tmp_path / "err", "w") as stderr:
        run = subprocess.Popen([*CLI, "bulk", str(source), "--out", str(out), "--url", api.url],
                               stdout=subprocess.PIPE, stderr=stderr)
    try:
        deadline = time.monotonic() + 60
        while not (out.exists() and out.read_bytes().count(b"\n") >= 50):
            assert time.monotonic() < deadline and run.poll() is None
            time.sleep(0.05)
        run.send_signal(signal.SIGINT)
        assert run.wait(timeout=60) == 130
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    said = (tmp_path / "err").read_text()
    written = len(out.read_bytes().splitlines())  # a torn last line counts, as for the CLI
    assert f"interrupted with {written} output lines in {out}" in said, said
    assert "run the same command again to resume" in said
    assert "Traceback" not in said


def test_bulk_file_killed_halfway_resumes_with_each_custom_id_once(api, redis_client, tmp_path):
    marker = f"bulk-{uuid.uuid4().hex[:8]}"
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    bad = write_input(source, 1990, marker)
    assert len(bad) == len(BAD_LINES)

    # when the first run is killed (SIGKILL) about halfway through
    with open(tmp_path / "first.err", "w") as stderr:
        first = subprocess.Popen([*CLI, "bulk", str(source), "--out", str(out), "--url", api.url],
                                 stdout=subprocess.PIPE, stderr=stderr)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and first.poll() is None:
            if out.exists() and out.read_bytes().count(b"\n") >= 900:
                break
            time.sleep(0.05)
        assert first.poll() is None, (tmp_path / "first.err").read_text()[-3000:]
        first.send_signal(signal.SIGKILL)
        first.wait()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    first_lines = out.read_bytes().splitlines(keepends=True)
    assert 900 <= len(first_lines) < 1990
    # and its last line is torn, as a kill in mid-write would leave it
    torn_id = json.loads(first_lines[-1])["custom_id"]
    out.write_bytes(b"".join(first_lines[:-1]) + first_lines[-1][:40])
    kept = {json.loads(line)["custom_id"] for line in first_lines[:-1]}
    refused_left = len(REFUSED.keys() - kept)

    # then the same command again
    second = bulk(str(source), "--out", str(out), "--url", api.url)
    assert second.returncode == 0, second.stderr[-3000:]
    summary = json.loads(second.stdout)
    assert summary == {"total": 1990 + len(BAD_LINES), "completed": 1990 - len(kept) - refused_left,
                       "failed": refused_left, "skipped_resumed": len(kept),
                       "invalid": len(BAD_LINES)}

    # expect every valid custom_id exactly once, the torn one redone
    lines = read_jsonl(out)
    ids = [line["custom_id"] for line in lines]
    assert len(ids) == 1990 and set(ids) == {f"c-{i}" for i in range(1990)}
    assert ids.count(torn_id) == 1
    # and no request ran twice: one job per line (the refused ones never became jobs), so the
    # requests in flight at the kill were picked up by their idempotency key, not resubmitted
    assert jobs_with(redis_client, marker) == 1988

    requests = {f"c-{i}": request_line(i, marker) for i in range(1990)}
    for line in lines:
        assert line["id"].startswith("batch_req_") and line["error"] is None
        status = line["response"]["status_code"]
        if line["custom_id"] in REFUSED:
            assert status == REFUSED[line["custom_id"]]
            assert line["response"]["body"]["error"]["type"] in ("model_not_found",
                                                                 "invalid_request")
            continue
        assert status == 200, line
        check_body(line, requests[line["custom_id"]], api)
    # embeddings equal what /v1/embeddings answers for the same text
    same = api.post("/v1/embeddings", {"input": f"{marker} item 0"}).json()["data"][0]["embedding"]
    first_embedding = next(x for x in lines if x["custom_id"] == "c-0")
    assert np.allclose(first_embedding["response"]["body"]["data"][0]["embedding"], same,
                       atol=1e-6)

    errors = read_jsonl(tmp_path / "out.errors.jsonl")
    assert [(e["line"], e["error"]["code"]) for e in errors] == sorted(bad.items())
    source_lines = source.read_text().split("\n")
    assert all(source_lines[e["line"] - 1] in BAD_LINES and e["error"]["message"]
               for e in errors)


def test_rerun_of_a_finished_file_sends_nothing(api, redis_client, tmp_path):
    marker = f"bulk-{uuid.uuid4().hex[:8]}"
    source, out, errors = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "bad.jsonl"
    source.write_text("".join(json.dumps(request_line(i, marker)) + "\n" for i in range(1, 4)))
    args = (str(source), "--out", str(out), "--errors", str(errors), "--url", api.url,
            "--max-in-flight", "2")
    first = bulk(*args)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout) == {"total": 3, "completed": 3, "failed": 0,
                                        "skipped_resumed": 0, "invalid": 0}
    assert "3/3" in first.stderr  # the progress bar
    assert errors.read_text() == ""
    before = out.read_text()
    again = bulk(*args)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout) == {"total": 3, "completed": 0, "failed": 0,
                                        "skipped_resumed": 3, "invalid": 0}
    assert again.stderr == ""  # nothing to send: no progress bar
    assert out.read_text() == before
    assert jobs_with(redis_client, marker) == 3


def test_duplicate_custom_ids_are_refused_before_anything_is_sent(api, redis_client, tmp_path):
    marker = f"bulk-{uuid.uuid4().hex[:8]}"
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [request_line(i, marker) for i in range(1, 5)]
    lines.append({**request_line(9, marker), "custom_id": "c-2"})
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = bulk(str(source), "--out", str(out), "--url", api.url)
    assert result.returncode == 2
    assert "every custom_id must be unique" in result.stderr
    assert "'c-2' (lines 2 and 5)" in result.stderr and "Nothing was sent" in result.stderr
    assert result.stdout == ""
    assert not out.exists() and not (tmp_path / "out.errors.jsonl").exists()
    assert jobs_with(redis_client, marker) == 0


def test_a_second_run_on_the_same_output_file_is_refused(api, redis_client, tmp_path):
    """While a run holds OUT's lock (taken here as a run takes it), another run on the same
    OUT exits 2 naming it, and neither sends nor writes anything; once the lock is let go the
    same command runs."""
    marker = f"bulk-{uuid.uuid4().hex[:8]}"
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("".join(json.dumps(request_line(i, marker)) + "\n" for i in range(1, 4)))
    args = (str(source), "--out", str(out), "--url", api.url)
    with open(out, "ab") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = bulk(*args)
    assert result.returncode == 2, result.stderr
    assert f"banter: {out} is in use by another banter bulk run" in result.stderr
    assert "Nothing was sent" in result.stderr and result.stdout == ""
    assert out.read_bytes() == b"" and not (tmp_path / "out.errors.jsonl").exists()
    assert jobs_with(redis_client, marker) == 0
    again = bulk(*args)
    assert again.returncode == 0, again.stderr
    assert sorted(line["custom_id"] for line in read_jsonl(out)) == ["c-1", "c-2", "c-3"]


def test_a_missing_input_leaves_no_output_file(api, tmp_path):
    result = bulk(str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "out.jsonl"),
                  "--url", api.url)
    assert result.returncode == 2, result.stderr
    assert "missing.jsonl" in result.stderr and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("held", [
    "hello",
    json.dumps(request_line(1, "x")),  # an input file given as --out: not appended to
    '{"custom_id": ["x"], "response": null}',
    '{"id": "batch_req_1", "custom_id": null, "response": null, "error": null}',
])
def test_an_output_file_that_is_not_ours_is_refused(api, tmp_path, held):
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text(json.dumps(request_line(1, "x")) + "\n")
    out.write_text(held + "\n")
    result = bulk(str(source), "--out", str(out), "--url", api.url)
    assert result.returncode == 2, result.stderr
    assert "line 1 is not a batch output line" in result.stderr
    assert "Traceback" not in result.stderr
    assert out.read_text() == held + "\n"
    assert not (tmp_path / "out.errors.jsonl").exists()  # refused before the input is read


def test_a_utf16_input_is_refused_whole(api, redis_client, tmp_path):
    """Read line by line, a UTF-16 file would run the lines that happen to decode and fail the
    others with a codec error: it is refused as a file instead, and nothing is sent."""
    marker = f"bulk-{uuid.uuid4().hex[:8]}"
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    text = "".join(json.dumps(request_line(i, marker)) + "\n" for i in range(1, 4))
    source.write_bytes(text.encode("utf-16"))
    result = bulk(str(source), "--out", str(out), "--url", api.url)
    assert result.returncode == 2, result.stderr
    assert f"{source} is UTF-16" in result.stderr and "Nothing was sent" in result.stderr
    assert not out.exists() and not (tmp_path / "out.errors.jsonl").exists()
    assert jobs_with(redis_client, marker) == 0
    for codec in ("utf-16-le", "utf-16-be", "utf-32-le"):  # no byte order mark: NUL bytes
        source.write_bytes(text.encode(codec))
        result = bulk(str(source), "--out", str(out), "--url", api.url)
        assert result.returncode == 2, result.stderr
        assert f"{source} is UTF-16 or UTF-32" in result.stderr, result.stderr
        assert "Nothing was sent" in result.stderr and not out.exists()
    assert jobs_with(redis_client, marker) == 0
    source.write_bytes(b"\xef\xbb\xbf" + text.encode())  # UTF-8's byte order mark is UTF-8
    assert bulk(str(source), "--out", str(out), "--url", api.url).returncode == 0
    assert sorted(line["custom_id"] for line in read_jsonl(out)) == ["c-1", "c-2", "c-3"]


def test_an_input_that_cannot_be_read_is_named(api, tmp_path):
    """A directory given as the input file: exit 2 naming it, not a bare errno."""
    folder = tmp_path / "not-a-file"
    folder.mkdir()
    result = bulk(str(folder), "--out", str(tmp_path / "out.jsonl"), "--url", api.url)
    assert result.returncode == 2, result.stderr
    assert f"banter: {folder} cannot be read: Is a directory" in result.stderr
    assert "Errno" not in result.stderr and not (tmp_path / "out.jsonl").exists()


def test_an_input_rewritten_after_its_scan_stops_the_run_instead_of_hanging(tmp_path):
    """The feeder reads the file a second time: what it cannot read then (here a UTF-16
    rewrite after the scan) goes to the main thread, and every sender still gets its stop."""
    import queue

    from banter import bulk as runner

    source = tmp_path / "in.jsonl"
    source.write_bytes(json.dumps(request_line(1, "x")).encode("utf-16"))
    work, results = queue.Queue(maxsize=4), queue.Queue()
    runner._feed(source, source.stat().st_size, set(), work, results, workers=3)
    assert isinstance(results.get_nowait(), runner.BulkFileError)
    assert [work.get_nowait() for _ in range(3)] == [None, None, None]


def test_a_key_the_server_refuses_stops_the_run_before_it_writes(api, tmp_path):
    from banter import bulk as runner
    from banter.client import Client
    from banter.errors import Unauthorized

    class Refused(Client):  # as a keyed producer answers a wrong key: /healthz needs none
        def request(self, method, path, body=None, params=None):
            if path == "/healthz":
                return {"status": "ok"}
            raise Unauthorized("unknown API key")

    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text(json.dumps(request_line(1, "x")) + "\n" + "not json\n")
    try:
        runner.run(lambda: Refused(api.url), source, out, tmp_path / "out.errors.jsonl")
    except Unauthorized:
        pass
    else:
        raise AssertionError("the run went on with a refused key")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_lines_appended_during_a_run_wait_for_the_next_run(api, tmp_path, capsys):
    """The second pass reads only the bytes the first one checked: a line appended meanwhile
    (here by the first request) is neither run nor counted, and the run says to run again."""
    from banter import bulk as runner
    from banter.client import Client

    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    first = [request_line(i, "x") for i in (1, 2, 3)]
    source.write_text("".join(json.dumps(line) + "\n" for line in first))
    late = [{**request_line(4, "x"), "custom_id": "c-1"}, request_line(5, "x")]

    class Appending(Client):
        def request(self, method, path, body=None, params=None):
            if path == runner.REQUEST_PATH and late:
                with open(source, "a") as file:
                    file.write("".join(json.dumps(line) + "\n" for line in late))
                late.clear()
            return super().request(method, path, body, params)

    summary = runner.run(lambda: Appending(api.url), source, out,
                         tmp_path / "out.errors.jsonl", max_in_flight=1)
    assert (summary.total, summary.completed, summary.failed) == (3, 3, 0)
    assert sorted(line["custom_id"] for line in read_jsonl(out)) == ["c-1", "c-2", "c-3"]
    assert f"{source} grew during the run" in capsys.readouterr().err
    again = bulk(str(source), "--out", str(out), "--url", api.url)
    assert again.returncode == 2 and "'c-1' (lines 1 and 4)" in again.stderr


def test_an_output_path_that_is_not_a_regular_file_is_refused(tmp_path):
    """The errors file is written whole and renamed into place: a device or a symlink given as
    --errors (or --out) would be replaced, so neither is taken (checked before any request)."""
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps(request_line(1, "x")) + "\n")
    target = tmp_path / "kept.txt"
    target.write_text("keep me\n")
    link = tmp_path / "link.jsonl"
    link.symlink_to(target)
    unreachable = f"http://127.0.0.1:{free_port()}"
    for flags, named in ((["--errors", "/dev/null"], "/dev/null"),
                         (["--errors", str(link)], str(link)),
                         (["--errors", str(tmp_path)], str(tmp_path))):
        result = bulk(str(source), "--out", str(tmp_path / "out.jsonl"), *flags, "--url", unreachable)
        assert result.returncode == 2, result.stderr
        assert f"{named} is not a regular file" in result.stderr
    result = bulk(str(source), "--out", str(link), "--url", unreachable)
    assert result.returncode == 2 and f"{link} is not a regular file" in result.stderr
    result = bulk(str(source), "--out", str(tmp_path / "no" / "out.jsonl"), "--url", unreachable)
    assert result.returncode == 2 and f"the directory {tmp_path / 'no'} does not exist" in result.stderr
    assert Path("/dev/null").is_char_device() and target.read_text() == "keep me\n"
    assert link.is_symlink()


def test_a_rate_limited_request_is_retried_like_a_full_queue(monkeypatch):
    """The per-key rate limit's 429 (``rate_limited``, rebuilt as RateLimited from the HTTP
    body the client reads) is waited out with backoff, as queue_full is."""
    from banter import bulk
    from banter.client import Client
    from banter.errors import RateLimited, from_dict

    assert isinstance(from_dict({"type": "rate_limited", "message": "slow down"}), RateLimited)
    monkeypatch.setattr(bulk.time, "sleep", lambda s: None)

    class Limited(Client):
        calls = 0

        def request(self, method, path, body):
            self.calls += 1
            if self.calls < 3:
                raise from_dict({"type": "rate_limited", "message": "retry in 4 s"})
            return {"custom_id": body["custom_id"], "response": {"status_code": 200},
                    "error": None}

    client = Limited("http://127.0.0.1:9")
    line = bulk.decode_line(json.dumps(request_line(1, "x")).encode())
    assert bulk.send(client, line, "k")["custom_id"] == line.custom_id and client.calls == 3


def test_bulk_against_an_unreachable_server_exits_3(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps(request_line(1, "x")) + "\n")
    port = free_port()
    result = bulk(str(source), "--out", str(tmp_path / "out.jsonl"), "--url",
                  f"http://127.0.0.1:{port}", timeout=30)
    assert result.returncode == 3
    assert f"cannot reach http://127.0.0.1:{port}" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]  # nothing written


# ----------------------------------------------------------------------------- one request
def test_one_request_endpoint(api):
    line = request_line(4, "one")
    first = api.post("/v1/batches/requests", {**line, "idempotency_key": "k-" + uuid.uuid4().hex})
    assert first.status_code == 200, first.text
    out = first.json()
    assert out["custom_id"] == "c-4" and out["error"] is None
    assert out["response"]["status_code"] == 200
    assert out["response"]["body"]["choices"][0]["text"] == " banterhearts streams every"
    # the same key gives the same job
    again = api.post("/v1/batches/requests", {**line, "idempotency_key": "k-" + out["id"]})
    same = api.post("/v1/batches/requests", {**line, "idempotency_key": "k-" + out["id"]})
    assert again.json()["id"] == same.json()["id"]

    # a body its endpoint refuses: 200, the refusal in the output line
    refused = api.post("/v1/batches/requests", {**line, "body": {"prompt": ""}})
    assert refused.status_code == 200
    assert refused.json()["response"]["status_code"] == 400  # what /v1/completions answers
    assert refused.json()["response"]["body"]["error"]["message"] == "'prompt' must not be empty"
    streamed = api.post("/v1/batches/requests", {**line, "body": {"prompt": "x", "stream": True}})
    assert streamed.json()["response"]["status_code"] == 400

    # not a batch line at all: the call itself is refused
    bad = api.post("/v1/batches/requests", {**line, "url": "/v1/jobs"})
    assert bad.status_code == 422 and "'url' must be one of" in bad.json()["error"]["message"]
    assert api.post("/v1/batches/requests", [line]).status_code == 422


def test_one_request_embeddings_list_and_base64(api):
    line = {"custom_id": "e", "method": "POST", "url": "/v1/embeddings",
            "body": {"input": ["a", "b"], "encoding_format": "base64"}}
    out = api.post("/v1/batches/requests", line).json()
    assert out["response"]["status_code"] == 200, out
    direct = api.post("/v1/embeddings", line["body"]).json()
    body = out["response"]["body"]
    assert [d["index"] for d in body["data"]] == [0, 1]
    assert body["data"][0]["embedding"] == direct["data"][0]["embedding"]
    assert body["usage"] == direct["usage"]


def test_one_request_chat_with_logprobs_and_a_bias(api):
    """A batch line takes what its endpoint takes, logprobs and logit adjustments included,
    and its output body is that endpoint's answer."""
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0,
            "logprobs": True, "top_logprobs": 1, "logit_bias": {"123": 100}}
    line = {"custom_id": "lp", "method": "POST", "url": "/v1/chat/completions", "body": body}
    out = api.post("/v1/batches/requests", line).json()
    assert out["response"]["status_code"] == 200, out
    direct = api.post("/v1/chat/completions", body).json()
    choice = out["response"]["body"]["choices"][0]
    assert choice["message"] == direct["choices"][0]["message"]
    assert [e["token"] for e in choice["logprobs"]["content"]] == [
        e["token"] for e in direct["choices"][0]["logprobs"]["content"]]
    assert len(choice["logprobs"]["content"]) == 3


def test_one_request_with_several_choices_is_refused_in_its_line(api):
    line = {"custom_id": "n", "method": "POST", "url": "/v1/completions",
            "body": {"prompt": "x", "n": 2}}
    out = api.post("/v1/batches/requests", line).json()
    assert out["response"]["status_code"] == 400, out
    error = out["response"]["body"]["error"]
    assert error["param"] == "n" and "one line per choice" in error["message"]


# ----------------------------------------------------------------------------- /v1/batches
def wait_batch(api, batch_id: str, timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        batch = api.get(f"/v1/batches/{batch_id}").json()
        if batch["status"] not in ("validating", "in_progress", "finalizing", "cancelling"):
            return batch
        time.sleep(0.1)
    raise AssertionError(f"batch {batch_id} did not finish: {batch}")


def test_batch_lifecycle(api):
    requests = [request_line(i, "batch") for i in range(1, 7)]  # 4 texts, 2 embeddings
    requests.append({**request_line(5, "batch"), "custom_id": "refused"})  # unknown model
    created = api.post("/v1/batches", {"requests": requests, "metadata": {"team": "ops"}})
    assert created.status_code == 200, created.text
    batch = created.json()
    assert batch["object"] == "batch" and batch["id"].startswith("batch_")
    assert batch["status"] in ("in_progress", "completed")
    assert batch["request_counts"]["total"] == 7
    assert batch["metadata"] == {"team": "ops"} and batch["completion_window"] == "24h"

    done = wait_batch(api, batch["id"])
    assert done["status"] == "completed" and done["completed_at"] >= done["created_at"]
    assert done["request_counts"] == {"total": 7, "completed": 5, "failed": 2}
    output = api.get(done["links"]["output"])
    assert output.status_code == 200 and output.headers["Content-Type"] == "application/jsonl"
    lines = [json.loads(x) for x in output.text.splitlines()]
    assert [x["custom_id"] for x in lines] == [r["custom_id"] for r in requests]
    statuses = {x["custom_id"]: x["response"]["status_code"] for x in lines}
    assert statuses == {"c-1": 200, "c-2": 200, "c-3": 200, "c-4": 200, "c-5": 404,
                        "c-6": 200, "refused": 404}
    assert lines[3]["response"]["body"]["choices"][0]["text"] == " banterhearts streams every"
    # a finished batch is not cancelled
    assert api.post(f"/v1/batches/{batch['id']}/cancel").json()["status"] == "completed"


def test_a_batch_line_with_echo_answers_the_prompt_then_the_text(api):
    """``echo`` is kept with the line (the stored batch and the one-request endpoint alike)."""
    body = {"prompt": "Say something. ", "max_tokens": 3, "temperature": 0}
    direct = api.post("/v1/completions", body).json()["choices"][0]["text"]
    lines = [{"custom_id": name, "method": "POST", "url": "/v1/completions",
              "body": {**body, "echo": echo}} for name, echo in (("echo", True), ("plain", False))]
    batch = wait_batch(api, api.post("/v1/batches", {"requests": lines}).json()["id"])
    output = [json.loads(x) for x in api.get(batch["links"]["output"]).text.splitlines()]
    texts = {x["custom_id"]: x["response"]["body"]["choices"][0]["text"] for x in output}
    assert texts == {"echo": body["prompt"] + direct, "plain": direct}
    one = api.post("/v1/batches/requests", lines[0]).json()
    assert one["response"]["body"]["choices"][0]["text"] == body["prompt"] + direct


def test_a_cancel_that_read_the_batch_before_it_completed_leaves_it_completed(api,
                                                                              monkeypatch):
    """A cancel that read the batch in progress while a read found every job ended and
    completed it: the cancel changes nothing (it wrote ``cancelling`` over ``completed``, and
    the batch ended ``cancelled`` with every line succeeded)."""
    from dataclasses import replace

    line = {**request_line(1, "cancel-race"), "custom_id": "only"}
    batch = wait_batch(api, api.post("/v1/batches", {"requests": [line]}).json()["id"])
    assert batch["status"] == "completed"
    load, records = batches.load_batch, batches.job_records

    def stale(c, batch_id, owner):  # what the cancel read a moment before
        fields, submitted = load(c, batch_id, owner)
        return {**fields, "status": "in_progress"}, submitted

    monkeypatch.setattr(batches, "load_batch", stale)
    monkeypatch.setattr(batches, "job_records", lambda c, submitted: [  # as they then were
        replace(r, status="running") for r in records(c, submitted)])
    answer = api.post(f"/v1/batches/{batch['id']}/cancel").json()
    monkeypatch.undo()
    assert answer["status"] == "completed" and answer["cancelling_at"] is None
    assert api.get(f"/v1/batches/{batch['id']}").json()["status"] == "completed"


def test_batch_cancel(api):
    requests = [{"custom_id": f"long-{i}", "method": "POST", "url": "/v1/completions",
                 "body": {"prompt": "x", "max_tokens": 900}} for i in range(40)]
    batch = api.post("/v1/batches", {"requests": requests}).json()
    cancelled = api.post(f"/v1/batches/{batch['id']}/cancel")
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] in ("cancelling", "cancelled")
    assert cancelled.json()["cancelling_at"] is not None
    done = wait_batch(api, batch["id"])
    assert done["status"] == "cancelled" and done["cancelled_at"] is not None
    counts = done["request_counts"]
    assert counts["total"] == 40 and counts["failed"] >= 1
    assert counts["completed"] + counts["failed"] == 40
    lines = [json.loads(x) for x in api.get(done["links"]["output"]).text.splitlines()]
    assert any(x["error"] == {"code": "cancelled",
                              "message": "the request was cancelled before it finished"}
               and x["response"] is None for x in lines)


def test_a_batch_created_again_with_its_key_is_the_same_batch(api, redis_client):
    """A client that retries a create (a timeout, a crash half way) with the same
    idempotency_key gets the batch it made, and no line runs twice."""
    marker = f"batch-key-{uuid.uuid4().hex[:8]}"
    body = {"requests": [request_line(i, marker) for i in range(1, 5)],
            "idempotency_key": marker}
    first = api.post("/v1/batches", body)
    again = api.post("/v1/batches", body)
    assert first.status_code == again.status_code == 200, again.text
    assert first.json()["id"] == again.json()["id"]
    assert wait_batch(api, first.json()["id"])["request_counts"]["completed"] == 4
    assert jobs_with(redis_client, marker) == 4
    other = api.post("/v1/batches", {**body, "requests": body["requests"][:2]})
    assert other.status_code == 409
    assert other.json()["error"]["type"] == "idempotency_key_reused"


def test_batch_keys_whose_parts_join_alike_are_still_two_batches(api):
    """Key 'K/x' with custom_id 'y' and key 'K' with custom_id 'x/y' are different lines of
    different batches: neither takes the other's job."""
    marker = f"batch-join-{uuid.uuid4().hex[:8]}"
    made = []
    for key, custom_id, word in ((f"{marker}/x", "y", "apple"), (marker, "x/y", "banana")):
        line = {"custom_id": custom_id, "method": "POST", "url": "/v1/completions",
                "body": {"prompt": f"{marker} {word}", "max_tokens": 2, "temperature": 0}}
        created = api.post("/v1/batches", {"requests": [line], "idempotency_key": key})
        assert created.status_code == 200, created.text
        made.append(created.json()["id"])
    for batch_id in made:
        assert wait_batch(api, batch_id)["request_counts"] == {"total": 1, "completed": 1,
                                                              "failed": 0}


def test_a_create_refused_half_way_cancels_the_jobs_it_submitted(settings, redis_client,
                                                                demo_models, monkeypatch):
    """Another client filling the bulk queue between the room check and the last line's
    submit: the create is a 429 and the lines it had submitted never run (no batch names
    them; a retry would run them again). The race is made certain by skipping the check."""
    monkeypatch.setattr(batches, "check_room", lambda c, lines, new: None)
    marker = f"batch-half-{uuid.uuid4().hex[:8]}"
    with unserved_producer(settings, redis_client, max_queue_depth=2) as (server, _queue):
        refused = Api(server.url).post("/v1/batches", {"requests": [
            request_line(i, marker) for i in (1, 2, 4)]})
    assert refused.status_code == 429 and refused.json()["error"]["type"] == "queue_full"
    statuses = [redis_client.hget(key, "status") for key in redis_client.scan_iter(keys.job("*"))
                if marker in (redis_client.hget(key, "input") or "")]
    assert statuses == ["cancelled", "cancelled"]


def test_a_keyed_create_sent_again_needs_room_only_for_its_lines_without_jobs(
        settings, redis_client, demo_models, monkeypatch):
    """A keyed create cut short by a full queue keeps the jobs it queued; sent again, only the
    lines still without a job need room, so it goes through as soon as they fit (not once the
    whole batch would fit again beside its own jobs)."""
    marker = f"batch-room-{uuid.uuid4().hex[:8]}"
    body = {"requests": [request_line(i, marker) for i in (1, 2, 4)], "idempotency_key": marker}
    with unserved_producer(settings, redis_client, max_queue_depth=4) as (server, queue):
        api, bulk_queue = Api(server.url), f"{queue}-bulk"
        for _ in range(2):  # another client's backlog
            assert api.post("/v1/jobs", {"kind": "embed", "input": "x",
                                         "lane": "bulk"}).status_code == 202
        with monkeypatch.context() as patch:  # the race: the queue fills during the create
            patch.setattr(batches, "check_room", lambda c, lines, new: None)
            cut = api.post("/v1/batches", body)
        assert cut.status_code == 429 and redis_client.llen(bulk_queue) == 4
        redis_client.rpop(bulk_queue, 2)  # a worker takes the backlog: room for one more
        again = api.post("/v1/batches", body)
        assert again.status_code == 200, again.text
        assert again.json()["request_counts"]["total"] == 3
        assert redis_client.llen(bulk_queue) == 3 and jobs_with(redis_client, marker) == 3


def test_batches_are_listed_newest_first_a_page_at_a_time(api):
    marker = f"batch-list-{uuid.uuid4().hex[:8]}"
    made = [api.post("/v1/batches", {"requests": [request_line(3 * i + 1, marker)]}).json()["id"]
            for i in range(3)]
    page = api.get("/v1/batches", params={"limit": 2}).json()
    assert page["object"] == "list" and [b["id"] for b in page["data"]] == made[::-1][:2]
    assert page["has_more"] and page["last_id"] == made[1]
    rest = api.get("/v1/batches", params={"limit": 2, "after": page["last_id"]}).json()
    assert rest["data"][0]["id"] == made[0]
    bad = api.get("/v1/batches", params={"limit": 0})
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "limit"
    unknown = api.get("/v1/batches", params={"after": "batch_" + "0" * 32})
    assert unknown.status_code == 422 and unknown.json()["error"]["param"] == "after"
    assert "list again from the start" in unknown.json()["error"]["message"]


def test_a_page_followed_only_by_expired_batches_has_no_more(settings, redis_client, worker):
    """has_more is about batches the next page would list: one whose record expired (TTL) is
    not one. A key of its own gives the test a list no other test adds to."""
    from dataclasses import replace

    from producer.app import create_app
    from tests.conftest import Server

    key = f"key-{uuid.uuid4().hex}"
    server = Server(create_app(replace(settings, api_keys=key, auth_disabled=False),
                               redis_client))
    try:
        api = Api(server.url)
        api.session.headers["Authorization"] = f"Bearer {key}"
        made = [api.post("/v1/batches", {"requests": [request_line(1, "expiring")]}).json()["id"]
                for _ in range(3)]
        first = api.get("/v1/batches", params={"limit": 2}).json()
        assert [b["id"] for b in first["data"]] == made[:0:-1] and first["has_more"]
        redis_client.delete(keys.batch(made[0]))  # as its TTL would
        page = api.get("/v1/batches", params={"limit": 2}).json()
        assert [b["id"] for b in page["data"]] == made[:0:-1] and not page["has_more"]
        whole = api.get("/v1/batches", params={"limit": 3}).json()
        assert [b["id"] for b in whole["data"]] == made[:0:-1] and not whole["has_more"]
    finally:
        server.close()


def test_a_batch_sent_again_with_its_defaults_spelt_out_is_the_same_batch(api):
    key = f"batch-defaults-{uuid.uuid4().hex[:8]}"
    body = {"requests": [request_line(1, key)], "idempotency_key": key}
    first = api.post("/v1/batches", body).json()["id"]
    for spelt in ({"completion_window": "24h"}, {"endpoint": None, "metadata": None},
                  {"completion_window": None}):
        again = api.post("/v1/batches", {**body, **spelt})
        assert again.status_code == 200 and again.json()["id"] == first, again.text
    other = api.post("/v1/batches", {**body, "metadata": {"k": "v"}})
    assert other.status_code == 409 and other.json()["error"]["type"] == "idempotency_key_reused"
    bad = api.post("/v1/batches", {**body, "completion_window": "1h"})  # bad, whatever the key
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "completion_window"


def test_a_batch_with_an_unknown_field_is_refused(api):
    line = request_line(1, "unknown-field")
    for body, needle in (({"requests": [line], "foo": 1}, "unknown field 'foo'"),
                         ({"input_file_id": "file-1"}, "send the request lines themselves")):
        refused = api.post("/v1/batches", body)
        assert refused.status_code == 422 and needle in refused.json()["error"]["message"]
    rollback = api.post("/v1/models/rollback", {"name": "demo-gpt", "dry_run": True})
    assert rollback.status_code == 422 and "unknown field 'dry_run'" in rollback.text


def test_batch_bad_input_creates_nothing(api):
    line = request_line(1, "bad")
    no_method = {k: v for k, v in line.items() if k != "method"}
    cases = [
        ({}, 422, "'requests' must be a non-empty list", "requests"),
        ({"requests": [line, {**line, "url": "/v1/x"}]}, 422,
         "'requests[1]': 'url' must be one of /v1/chat/completions, /v1/completions, "
         "/v1/embeddings, got '/v1/x'", "requests[1].url"),
        ({"requests": [no_method]}, 422, "'requests[0]': 'method' must be \"POST\" (it is missing)",
         "requests[0].method"),
        ({"requests": [line, line]}, 422, "'requests[1].custom_id' 'c-1' is repeated",
         "requests[1].custom_id"),
        ({"requests": [line] * 1001}, 413, "the limit is 1000", "requests"),
        ({"requests": [line], "endpoint": "/v1/embeddings"}, 422, "'endpoint' must be", "endpoint"),
        ({"requests": [line], "completion_window": "1h"}, 422, "'completion_window' must be",
         "completion_window"),
        ({"requests": [line], "metadata": {"a": 1}}, 422, "'metadata' must be", "metadata"),
    ]
    for body, status, message, param in cases:
        answer = api.post("/v1/batches", body)
        assert answer.status_code == status, (body, answer.text)
        assert message in answer.json()["error"]["message"], answer.text
        assert answer.json()["error"]["param"] == param, answer.text
    assert api.get("/v1/batches/batch_" + "0" * 32).status_code == 404
    assert api.get("/v1/batches/nope").status_code == 404
    assert api.post("/v1/batches/nope/cancel").status_code == 404


def test_an_embeddings_line_of_many_texts_is_one_job_answered_in_order(api):
    texts = [f"bulk list text {i}" for i in range(12)]
    line = {"custom_id": "many", "method": "POST", "url": "/v1/embeddings",
            "body": {"input": texts, "encoding_format": "base64"}}
    answer = api.post("/v1/batches/requests", line)
    assert answer.status_code == 200, answer.text
    body = answer.json()["response"]["body"]
    assert [d["index"] for d in body["data"]] == list(range(12))
    alone = api.post("/v1/embeddings", {"input": texts[11]}).json()["data"][0]["embedding"]
    decoded = np.frombuffer(base64.b64decode(body["data"][11]["embedding"]), dtype="<f4")
    assert np.allclose(decoded, alone, atol=1e-5)


def test_odd_request_bodies_are_answered_never_500(api):
    odd_bodies = [
        ("/v1/completions", {"prompt": [1, 2]}), ("/v1/completions", {"prompt": "x", "n": 99}),
        ("/v1/completions", {"prompt": "x", "max_tokens": "3"}),
        ("/v1/completions", {"prompt": "x", "stop": {"a": 1}}),
        ("/v1/chat/completions", {"messages": "hi"}),
        ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                  "max_tokens": 2, "max_completion_tokens": 2}),
        ("/v1/embeddings", {"input": {"a": 1}}), ("/v1/embeddings", {"input": ["x"] * 2049}),
        ("/v1/embeddings", {"input": "x", "encoding_format": "hex"}),
        ("/v1/embeddings", {"input": "x", "model": "demo-gpt"}),
    ]
    lines = [{"custom_id": f"odd-{i}", "method": "POST", "url": url, "body": body}
             for i, (url, body) in enumerate(odd_bodies)]
    for line in lines:
        answer = api.post("/v1/batches/requests", line)
        assert answer.status_code == 200, answer.text
        assert 400 <= answer.json()["response"]["status_code"] < 500, answer.text
    batch = api.post("/v1/batches", {"requests": lines, "endpoint": None, "metadata": None})
    assert batch.status_code == 200, batch.text
    assert wait_batch(api, batch.json()["id"])["request_counts"] == \
        {"total": len(lines), "completed": 0, "failed": len(lines)}
    for body in ({"requests": "x"}, {"requests": [line], "endpoint": ["x"]},
                 {"requests": [line], "completion_window": ["24h"]},
                 {"custom_id": "x", "method": "POST", "url": "/v1/completions", "body": {},
                  "idempotency_key": 5}):
        for path in ("/v1/batches", "/v1/batches/requests"):
            assert 400 <= api.post(path, body).status_code < 500
