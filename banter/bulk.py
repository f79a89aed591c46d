"""Bulk offline processing: the OpenAI Batch line format and the ``banter bulk`` runner.

An input line is ``{"custom_id", "method": "POST", "url", "body"}`` with ``url`` one of
``URLS``; an output line is ``{"id", "custom_id", "response": {"status_code", "body"} | null,
"error": {"code", "message"} | null}`` (OpenAI's batch output: an HTTP answer, error or not, is a
``response``; ``error`` is set only when the request never got one, e.g. its job was cancelled).

The format half (``parse_line``, ``response_line``, ``error_line``) is shared with the
producer's ``/v1/batches``. The runner half (``run``) is the CLI's: it talks to the producer only
over HTTP, one ``POST /v1/batches/requests`` per line, at most ``max_in_flight`` at once.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import queue
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from tqdm import tqdm

from banter import strictjson
from banter.client import not_a_producer
from banter.errors import BadJSON, InvalidRequest, Throttled, Timeout, Unavailable, brief

URLS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
MAX_CUSTOM_ID_CHARS = 512
REQUEST_PATH = "/v1/batches/requests"
RETRY_WINDOW_S = 300.0  # how long 429 / 503 / unreachable is retried before the run stops
MAX_BACKOFF_S = 30.0


class BulkFileError(InvalidRequest):
    """An input or output file that cannot be used as a whole (duplicate ``custom_id``s, an
    output file holding something other than output lines): nothing is sent."""

    type = "invalid_bulk_file"


# ----------------------------------------------------------------------------- the format
@dataclass(frozen=True)
class BatchLine:
    """One checked input request. Its ``body`` is checked by the endpoint ``url`` names."""

    custom_id: str
    url: str
    body: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"custom_id": self.custom_id, "method": "POST", "url": self.url, "body": self.body}


def parse_line(value: Any) -> BatchLine:
    """``value`` (a decoded JSON line) as a BatchLine; InvalidRequest names the first bad field.
    Unknown fields are ignored."""
    if not isinstance(value, dict):
        raise InvalidRequest("a request line must be a JSON object with 'custom_id', 'method', "
                             "'url' and 'body'")
    custom_id = value.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id.strip():
        raise InvalidRequest(f"'custom_id' must be a non-empty string{_got(value, 'custom_id')}",
                             "custom_id")
    if len(custom_id) > MAX_CUSTOM_ID_CHARS:
        raise InvalidRequest(f"'custom_id' is {len(custom_id)} characters; the limit is "
                             f"{MAX_CUSTOM_ID_CHARS}", "custom_id")
    if value.get("method") != "POST":
        raise InvalidRequest(f"'method' must be \"POST\"{_got(value, 'method')}", "method")
    if value.get("url") not in URLS:
        raise InvalidRequest(f"'url' must be one of {', '.join(URLS)}{_got(value, 'url')}", "url")
    if not isinstance(value.get("body"), dict):
        raise InvalidRequest(f"'body' must be a JSON object, the request the url takes"
                             f"{_got(value, 'body')}", "body")
    return BatchLine(custom_id, value["url"], value["body"])


def _got(value: dict[str, Any], name: str) -> str:
    """The end of a message about field ``name``: that it is missing, or what it was."""
    return " (it is missing)" if name not in value else f", got {brief(value[name])}"


def decode_line(raw: bytes) -> BatchLine:
    """One line of an input file as a BatchLine; BadJSON or InvalidRequest with the reason. A
    line holding an unpaired UTF-16 surrogate escape (``"\\ud800"``) is BadJSON, as the
    server refuses such a body: it is not text that can be stored or sent on as UTF-8."""
    try:
        value = strictjson.loads(raw)
    except strictjson.UnpairedSurrogate:
        raise BadJSON("the line holds an unpaired UTF-16 surrogate escape (such as "
                      "\"\\ud800\"): not valid Unicode text") from None
    except (ValueError, RecursionError) as exc:
        raise BadJSON(f"not valid JSON: {exc}") from None
    return parse_line(value)


OUTPUT_FIELDS = frozenset({"id", "custom_id", "response", "error"})  # every output line's


def response_line(custom_id: str, request_id: str, status_code: int,
                  body: dict[str, Any]) -> dict[str, Any]:
    """The output line of a request that got an HTTP answer (``status_code`` may be 4xx/5xx)."""
    return {"id": f"batch_req_{request_id}", "custom_id": custom_id,
            "response": {"status_code": status_code, "body": body}, "error": None}


def error_line(custom_id: str, request_id: str, code: str, message: str) -> dict[str, Any]:
    """The output line of a request that never got an answer (cancelled, expired)."""
    return {"id": f"batch_req_{request_id}", "custom_id": custom_id, "response": None,
            "error": {"code": code, "message": message}}


def succeeded(line: dict[str, Any]) -> bool:
    """Whether an output line is a success (a 2xx response)."""
    return line["error"] is None and line["response"]["status_code"] < 400


# ----------------------------------------------------------------------------- the runner
@dataclass
class Summary:
    """What ``banter bulk`` prints. ``total`` counts the non-blank input lines: each is
    ``invalid``, ``skipped_resumed`` (already in the output), ``completed`` or ``failed``."""

    total: int = 0
    completed: int = 0
    failed: int = 0
    skipped_resumed: int = 0
    invalid: int = 0


@dataclass(frozen=True)
class Scan:
    """The first pass over the input: its sha256, the custom_ids of its valid lines."""

    digest: str
    ids: set[str]
    total: int
    invalid: int
    size: int  # the file's size at the scan: the second pass reads no further


def default_errors_path(out_path: Path) -> Path:
    """``OUT.errors.jsonl`` beside ``OUT.jsonl``."""
    return out_path.with_name(out_path.name.removesuffix(".jsonl") + ".errors.jsonl")


def check_writable(path: Path) -> None:
    """BulkFileError unless ``path`` can be an output file: a regular file or nothing yet, in
    a directory that exists. The errors file is written whole and renamed into place, which
    would replace a device or a symlink (``--errors /dev/null``) instead of writing to it."""
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise BulkFileError(f"{path} is not a regular file: name a file to write (it is "
                            "replaced whole, so a device or a symlink would be replaced too)")
    if not path.parent.is_dir():
        raise BulkFileError(f"{path}: the directory {path.parent} does not exist")


@contextmanager
def locked_output(out_path: Path) -> Iterator[int]:
    """An O_APPEND descriptor of ``out_path`` (created if missing) under an exclusive ``flock``
    for the whole run, so that two runs never append the same results to one output file (nor
    rewrite its default errors file). BulkFileError, with nothing written, when another run
    holds the lock. A file created here is removed again if the run stops before writing a
    line (a bad input file leaves no empty output behind)."""
    created = not out_path.exists()
    fd = os.open(out_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise BulkFileError(f"{out_path} is in use by another banter bulk run: let it finish "
                            "(or stop it and run again to resume), or give another --out. "
                            "Nothing was sent.") from None
    try:
        yield fd
    except BaseException:
        if created and os.fstat(fd).st_size == 0:
            out_path.unlink(missing_ok=True)  # still locked: no other run can have taken it
        raise
    finally:
        os.close(fd)


BOMS = (b"\xff\xfe", b"\xfe\xff")  # UTF-16 (or UTF-32); UTF-8's is read as UTF-8


def input_lines(path: Path, size: int) -> Iterator[tuple[int, bytes]]:
    """(line number, raw line) of every non-blank line that ends within the first ``size``
    bytes, read one at a time. BulkFileError for a file that starts with a byte order mark or
    a NUL byte (UTF-16 or UTF-32, with or without the mark: its lines would be misread one by
    one; UTF-8 JSON lines never hold a NUL byte)."""
    try:
        yield from _input_lines(path, size)
    except OSError as exc:  # a directory, a device that fails: named, not a bare errno
        raise BulkFileError(f"{path} cannot be read: {exc.strerror or exc}") from None


def _input_lines(path: Path, size: int) -> Iterator[tuple[int, bytes]]:
    with open(path, "rb") as file:
        head = file.read(2)
        if head in BOMS:
            raise BulkFileError(f"{path} is UTF-16 (it starts with that byte order mark): "
                                "banter bulk reads UTF-8 JSON lines. Nothing was sent.")
        if b"\x00" in head:
            raise BulkFileError(f"{path} is UTF-16 or UTF-32 (it starts with a NUL byte): "
                                "banter bulk reads UTF-8 JSON lines. Nothing was sent.")
        file.seek(0)
        end = 0
        for number, raw in enumerate(file, start=1):
            end += len(raw)
            if end > size:
                return
            if raw.strip():
                yield number, raw


def scan_input(in_path: Path, err_path: Path) -> Scan:
    """Check every line; write the bad ones to ``err_path`` (replacing it) as
    ``{"line", "error": {"code", "message"}}``. BulkFileError on duplicate custom_ids, in which
    case no file is changed."""
    digest = hashlib.sha256()
    first_line: dict[str, int] = {}
    duplicates: list[str] = []
    total = invalid = 0
    size = in_path.stat().st_size  # both passes read these bytes, whatever is appended later
    partial = err_path.with_name(err_path.name + ".partial")
    try:
        with open(partial, "wb") as errors:
            for number, raw in input_lines(in_path, size):
                digest.update(raw.rstrip(b"\r\n") + b"\n")
                total += 1
                try:
                    line = decode_line(raw)
                except InvalidRequest as exc:
                    invalid += 1
                    errors.write(_json_line({"line": number, "error": {"code": exc.type,
                                                                       "message": exc.message}}))
                    continue
                if line.custom_id in first_line:
                    duplicates.append(f"{line.custom_id!r} (lines {first_line[line.custom_id]} "
                                      f"and {number})")
                first_line.setdefault(line.custom_id, number)
        if not duplicates:
            os.replace(partial, err_path)
    finally:
        partial.unlink(missing_ok=True)
    if duplicates:
        shown = ", ".join(duplicates[:5])
        more = f" and {len(duplicates) - 5} more" if len(duplicates) > 5 else ""
        raise BulkFileError(f"{in_path}: every custom_id must be unique; repeated: {shown}{more}. "
                            "Nothing was sent.")
    return Scan(digest.hexdigest(), set(first_line), total, invalid, size)


def load_finished(out_path: Path) -> set[str]:
    """custom_ids already in the output file. A torn last line (a kill in mid-write) is cut off,
    so its request runs again. BulkFileError when a complete line is not an output line."""
    if not out_path.exists():
        return set()
    finished: set[str] = set()
    with open(out_path, "rb+") as file:
        kept = 0
        for number, raw in enumerate(file, start=1):
            if not raw.endswith(b"\n"):
                break
            custom_id = _output_custom_id(raw)
            if custom_id is None:
                raise BulkFileError(f"{out_path}: line {number} is not a batch output line; "
                                    "refusing to append to this file")
            finished.add(custom_id)
            kept += len(raw)
        file.truncate(kept)
    return finished


def _output_custom_id(raw: bytes) -> str | None:
    """The custom_id of an output line (``response_line`` or ``error_line``: an object with
    ``id``, a string ``custom_id``, ``response`` and ``error``), or None for anything else (an
    input line, another file)."""
    try:
        line = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(line, dict) or not OUTPUT_FIELDS <= line.keys():
        return None
    return line["custom_id"] if isinstance(line["custom_id"], str) else None


def idempotency_key(digest: str, custom_id: str) -> str:
    """The same for the same input file and custom_id, so a request sent before a kill is
    picked up, not run again, when the command is rerun."""
    return "bulk-" + hashlib.sha256(f"{digest}\0{custom_id}".encode()).hexdigest()[:40]


def send(client: Any, line: BatchLine, key: str) -> dict[str, Any]:
    """Run one request through ``POST /v1/batches/requests`` and return its output line.

    504 (still running) is asked again at once: the idempotency key finds the same job. 429, 503
    and an unreachable server are retried with backoff for RETRY_WINDOW_S, then Unavailable.
    A 400/413/422 of the call itself fails this line only; anything else (auth, a producer
    without the route, an answer that is not this line's output line) raises and stops the
    run."""
    delay = 0.5
    give_up_at = time.monotonic() + RETRY_WINDOW_S
    while True:
        try:
            out = client.request("POST", REQUEST_PATH, {**line.to_dict(), "idempotency_key": key})
        except Timeout:
            give_up_at = time.monotonic() + RETRY_WINDOW_S
        except (Throttled, Unavailable) as exc:
            if time.monotonic() + delay > give_up_at:
                raise Unavailable(f"gave up on custom_id {line.custom_id!r} after "
                                  f"{RETRY_WINDOW_S:g}s of retries: {exc.message}") from None
            time.sleep(delay)
            delay = min(delay * 2, MAX_BACKOFF_S)
        except InvalidRequest as exc:
            return response_line(line.custom_id, uuid.uuid4().hex, exc.status,
                                 {"error": exc.body()})
        else:  # an answer that is not this line's output line stops the run, writing nothing
            if client.field(out, "custom_id", of=str) != line.custom_id:
                raise not_a_producer(client.url, f"the output line of custom_id "
                                     f"{out['custom_id']!r} to the request of "
                                     f"{line.custom_id!r}")
            if client.field(out, "error", of=(dict, type(None))) is None:
                client.field(out, "response", "status_code", of=int)
            return out


_WORKER_DONE = object()


def run(make_client: Callable[[], Any], in_path: Path, out_path: Path, err_path: Path,
        max_in_flight: int = 64) -> Summary:
    """Run every valid line of ``in_path`` not yet in ``out_path`` and append its output line.

    Two passes over the input (check, then send), so memory holds the custom_id index, not the
    file. ``max_in_flight`` threads each send one request at a time (each with its own client
    from ``make_client``); only this thread writes ``out_path``, one ``write`` per line, under
    ``locked_output``'s lock from before the input is read until the end."""
    for path in (out_path, err_path):
        check_writable(path)
    # a wrong --url or --api-key stops the run before it writes (the key's own batches: the
    # cheapest call that needs one)
    make_client().request("GET", "/v1/batches", params={"limit": 1})
    with locked_output(out_path) as fd:
        return _run_locked(make_client, in_path, out_path, err_path, max_in_flight, fd)


def _run_locked(make_client: Callable[[], Any], in_path: Path, out_path: Path, err_path: Path,
                max_in_flight: int, fd: int) -> Summary:
    finished = load_finished(out_path)  # an output file not ours stops it before the scan
    scan = scan_input(in_path, err_path)  # writes the errors file
    summary = Summary(total=scan.total, invalid=scan.invalid,
                      skipped_resumed=len(scan.ids & finished))
    todo, digest, size = len(scan.ids) - summary.skipped_resumed, scan.digest, scan.size
    del scan  # the custom_id index is not needed while sending
    work: queue.Queue = queue.Queue(maxsize=max_in_flight)
    results: queue.Queue = queue.Queue()
    threading.Thread(target=_feed, args=(in_path, size, finished, work, results,
                                         max_in_flight), daemon=True).start()
    for _ in range(max_in_flight):
        threading.Thread(target=_work, args=(make_client, digest, work, results),
                         daemon=True).start()
    with tqdm(total=todo, unit="req", file=sys.stderr, smoothing=0.05,
              disable=not todo) as bar:  # nothing to send: no bar, only the summary
        running = max_in_flight
        while running:
            item = results.get()
            if item is _WORKER_DONE:
                running -= 1
                continue
            if isinstance(item, Exception):
                raise item
            _append(fd, _json_line(item))
            if succeeded(item):
                summary.completed += 1
            else:
                summary.failed += 1
            bar.update(1)
            bar.set_postfix(failed=summary.failed, refresh=False)
    os.fsync(fd)
    if in_path.stat().st_size > size:
        print(f"banter bulk: {in_path} grew during the run; the lines added were not run: run "
              "the same command again to run them", file=sys.stderr)
    return summary


def _feed(in_path: Path, size: int, finished: set[str], work: queue.Queue,
          results: queue.Queue, workers: int) -> None:
    """Put every valid, unfinished line of the first ``size`` bytes (those the scan checked) on
    ``work`` (blocking while it is full), then one stop marker per worker."""
    try:
        for _number, raw in input_lines(in_path, size):
            try:
                line = decode_line(raw)
            except InvalidRequest:
                continue  # reported by scan_input
            if line.custom_id not in finished:
                work.put(line)
    except Exception as exc:  # handed to the main thread, which stops the run
        results.put(exc)
    for _ in range(workers):
        work.put(None)


def _work(make_client: Callable[[], Any], digest: str, work: queue.Queue,
          results: queue.Queue) -> None:
    client = make_client()
    while (line := work.get()) is not None:
        try:
            results.put(send(client, line, idempotency_key(digest, line.custom_id)))
        except Exception as exc:  # handed to the main thread, which stops the run
            results.put(exc)
            break
    results.put(_WORKER_DONE)


def _json_line(value: dict[str, Any]) -> bytes:
    return (json.dumps(value, separators=(",", ":"), ensure_ascii=False) + "\n").encode()


def _append(fd: int, data: bytes) -> None:
    """One ``write`` per line on an O_APPEND descriptor (looping only on a short write)."""
    while data:
        data = data[os.write(fd, data):]
