"""The model registry against a private redis-server and real (tiny) ONNX files."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
import shutil
import socket
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import onnx
import pytest
import redis
from onnx import TensorProto, helper
from tokenizers import Tokenizer
from tokenizers.models import WordLevel

from banter import keys
from banter.errors import ArtifactError, Conflict, InvalidRequest, ModelNotFound, RegistryUnavailable, WireError
from registry.history import HistoryFile
from registry.mirror import Mirror, resolve_from_mirror
from registry.records import Record
from registry.service import Registry
from registry.state import replay


# ----------------------------------------------------------------------------- redis-server
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def redis_port(tmp_path_factory: pytest.TempPathFactory):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not on PATH")
    workdir = tmp_path_factory.mktemp("redis")
    port = _free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = redis.Redis(port=port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.02)
        client.close()
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def client(redis_port: int):
    c = redis.Redis(port=redis_port, decode_responses=True)
    c.flushall()
    yield c
    c.close()


# ----------------------------------------------------------------------------- ONNX files
TOKENS = {"[UNK]": 0, "a": 1, "b": 2}  # the test models' tokenizer


def _io(name: str, dtype: int, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


def _save(graph: onnx.GraphProto, path: Path, tokenizer: bool = True) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    if tokenizer:
        Tokenizer(WordLevel(TOKENS, unk_token="[UNK]")).save(str(path.parent / "tokenizer.json"))
    return path


def generate_graph(path: Path, tag: str = "", kv: bool = True, logits: bool = True,
                   heads: int | str = 2, vocab_rows: int = len(TOKENS)) -> Path:
    """A 1-layer decoder with the generate I/O names (logits = ids as float, present = past)
    that looks ``input_ids`` up in a ``vocab_rows``-row table."""
    ids = ["input_ids", "attention_mask", "position_ids"]
    inputs = [_io(n, TensorProto.INT64, ["B", "S"]) for n in ids]
    outputs = [_io("logits" if logits else "scores", TensorProto.FLOAT, ["B", "S"])]
    nodes = [helper.make_node("Cast", ["input_ids"], [outputs[0].name], to=TensorProto.FLOAT),
             helper.make_node("Gather", ["wte", "input_ids"], ["embedded"])]
    wte = helper.make_tensor("wte", TensorProto.FLOAT, [vocab_rows, 1], [0.0] * vocab_rows)
    if kv:
        for part in ("key", "value"):
            inputs.append(_io(f"past_key_values.0.{part}", TensorProto.FLOAT, ["B", heads, "P", 4]))
            outputs.append(_io(f"present.0.{part}", TensorProto.FLOAT, ["B", heads, "P", 4]))
            nodes.append(helper.make_node("Identity", [f"past_key_values.0.{part}"],
                                          [f"present.0.{part}"]))
    graph = helper.make_graph(nodes, "gen", inputs, outputs, initializer=[wte], doc_string=tag)
    return _save(graph, path)


def embed_graph(path: Path) -> Path:
    inputs = [_io(n, TensorProto.INT64, ["B", "S"]) for n in ("input_ids", "attention_mask")]
    outputs = [_io("last_hidden_state", TensorProto.FLOAT, ["B", "S", 1])]
    nodes = [helper.make_node("Cast", ["input_ids"], ["ids_f"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["ids_f", "axis"], ["last_hidden_state"])]
    axis = helper.make_tensor("axis", TensorProto.INT64, [1], [2])
    graph = helper.make_graph(nodes, "embed", inputs, outputs, initializer=[axis])
    return _save(graph, path)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    generate_graph(root / "gpt-a" / "model.onnx", tag="a")
    generate_graph(root / "gpt-b" / "model.onnx", tag="b")
    embed_graph(root / "emb" / "model.onnx")
    return root


@pytest.fixture
def history_path(tmp_path: Path) -> Path:
    return tmp_path / "registry" / "history.jsonl"


@pytest.fixture
def reg(client: redis.Redis, root: Path, history_path: Path) -> Registry:
    return Registry(HistoryFile(history_path), Mirror(client), root)


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


# ----------------------------------------------------------------------------- promote/rollback
def test_promote_creates_version_1(reg: Registry, root: Path, history_path: Path,
                                   client: redis.Redis):
    record, created = reg.promote("gpt", "generate", "gpt-a", actor="ana", reason="first")
    assert created
    expected_sha = hashlib.sha256((root / "gpt-a" / "model.onnx").read_bytes()).hexdigest()
    assert (record.seq, record.action, record.name, record.kind, record.version) == \
        (1, "promote", "gpt", "generate", 1)
    assert (record.path, record.sha256, record.backend, record.upstream_model) == \
        ("gpt-a/model.onnx", expected_sha, "onnx", None)
    assert (record.actor, record.reason, record.previous_version) == ("ana", "first", None)
    assert record.time.endswith("Z")
    assert len(lines(history_path)) == 1
    assert Record.from_json(lines(history_path)[0]) == record
    assert reg.mirror.seq() == 1
    assert reg.mirror.active("gpt") == record
    assert reg.resolve("gpt", "generate") == record
    assert record.to_public()["ref"] == "gpt@1"
    assert json.loads(client.hget(keys.REGISTRY_ACTIVE, "gpt"))["version"] == 1


def test_versions_idempotency_and_rollback(reg: Registry, history_path: Path):
    v1, _ = reg.promote("gpt", "generate", "gpt-a/model.onnx")
    v2, created = reg.promote("gpt", "generate", "gpt-b")
    assert created and v2.version == 2 and v2.previous_version == 1 and v2.seq == 2

    same, created = reg.promote("gpt", "generate", "gpt-b/model.onnx")
    assert not created and same == v2
    assert len(lines(history_path)) == 2

    back = reg.rollback("gpt", actor="ops", reason="bad outputs")
    assert (back.action, back.version, back.previous_version, back.seq) == ("rollback", 1, 2, 3)
    assert (back.path, back.sha256) == (v1.path, v1.sha256)
    assert len(lines(history_path)) == 3
    assert json.loads(lines(history_path)[-1])["action"] == "rollback"
    assert reg.resolve("gpt").version == 1
    assert [r.seq for r in reg.history("gpt")] == [1, 2, 3]

    with pytest.raises(Conflict, match="no earlier version"):
        reg.rollback("gpt")
    assert len(lines(history_path)) == 3

    # Promoting v2's artifact again is a new version (v2 is not active any more).
    v3, created = reg.promote("gpt", "generate", "gpt-b")
    assert created and v3.version == 3 and v3.previous_version == 1
    assert reg.rollback("gpt").version == 1


def test_a_rollback_to_a_version_whose_files_changed_or_went_is_refused(
        reg: Registry, root: Path, history_path: Path):
    """Rolled back to, such a version could not be served (a worker refuses files that are not
    the promoted ones): the rollback is refused saying why, and nothing is appended."""
    reg.promote("gpt", "generate", "gpt-a")
    reg.promote("gpt", "generate", "gpt-b")
    tokenizer = root / "gpt-a" / "tokenizer.json"
    original = tokenizer.read_bytes()
    tokenizer.write_bytes(original + b" ")
    with pytest.raises(Conflict, match="back to version 1: its files changed"):
        reg.rollback("gpt")
    shutil.move(root / "gpt-a", root / "gone")
    with pytest.raises(Conflict, match="back to version 1: its artifact no longer checks"):
        reg.rollback("gpt")
    assert len(lines(history_path)) == 2 and reg.resolve("gpt").version == 2
    shutil.move(root / "gone", root / "gpt-a")
    tokenizer.write_bytes(original)
    assert reg.rollback("gpt").version == 1


def test_pins_and_resolve_errors(reg: Registry):
    v1, _ = reg.promote("gpt", "generate", "gpt-a")
    v2, _ = reg.promote("gpt", "generate", "gpt-b")
    reg.promote("emb", "embed", "emb")
    assert reg.resolve("gpt@1") == v1
    assert reg.resolve("gpt@2", "generate") == v2
    assert reg.resolve("gpt") == v2
    assert resolve_from_mirror(reg.mirror, "gpt@1", "generate") == v1
    with pytest.raises(ModelNotFound, match="nope"):
        reg.resolve("nope")
    with pytest.raises(ModelNotFound, match="no version 7"):
        reg.resolve("gpt@7")
    with pytest.raises(InvalidRequest, match="has kind generate, not embed"):
        reg.resolve("gpt", "embed")
    with pytest.raises(InvalidRequest, match="has kind embed, not generate"):
        resolve_from_mirror(reg.mirror, "emb@1", "generate")
    for bad in ("gpt@0", "gpt@x", "gpt@", "gpt@-1", "a/b", "@1"):
        with pytest.raises(InvalidRequest):
            reg.resolve(bad)
    with pytest.raises(ModelNotFound):
        reg.rollback("nope")
    with pytest.raises(ModelNotFound):
        reg.history("nope")


def test_kind_cannot_change_and_openai_backend(reg: Registry):
    reg.promote("gpt", "generate", "gpt-a")
    with pytest.raises(Conflict, match="cannot change kind"):
        reg.promote("gpt", "embed", "emb")
    record, created = reg.promote("remote", "generate", "", backend="openai",
                                  upstream_model="gpt-4o-mini")
    assert created and (record.path, record.sha256, record.upstream_model) == \
        ("", "", "gpt-4o-mini")
    again, created = reg.promote("remote", "generate", "", backend="openai",
                                 upstream_model="gpt-4o-mini")
    assert not created and again == record
    other, created = reg.promote("remote", "generate", "", backend="openai",
                                 upstream_model="gpt-4o")
    assert created and other.version == 2
    with pytest.raises(InvalidRequest, match=r"backend 'openai' needs 'model' \(--model"):
        reg.promote("remote2", "generate", "", backend="openai")
    with pytest.raises(InvalidRequest, match="applies only to backend 'openai'"):
        reg.promote("remote3", "generate", "gpt-a", upstream_model="gpt-4o")
    with pytest.raises(InvalidRequest, match="backend"):
        reg.promote("x", "generate", "gpt-a", backend="torch")
    with pytest.raises(InvalidRequest, match="kind"):
        reg.promote("x", "classify", "gpt-a")
    assert [r.name for r in reg.list_active()] == ["gpt", "remote"]


@pytest.mark.parametrize("name", ["", "a@b", "a/b", "a..b", "-a", ".a", "x" * 65, "a b", "a\n"])
def test_bad_names(reg: Registry, name: str):
    with pytest.raises(InvalidRequest, match="invalid model name"):
        reg.promote(name, "generate", "gpt-a")


# ----------------------------------------------------------------------------- artifacts
def test_artifact_errors(reg: Registry, root: Path, tmp_path: Path, history_path: Path):
    outside = generate_graph(tmp_path / "outside" / "model.onnx")
    (root / "escape").symlink_to(outside.parent, target_is_directory=True)
    (root / "link.onnx").symlink_to(outside)
    generate_graph(root / "no-kv" / "model.onnx", kv=False)
    generate_graph(root / "no-logits" / "model.onnx", logits=False)
    generate_graph(root / "dyn-heads" / "model.onnx", heads="H")
    generate_graph(root / "no-tok" / "model.onnx")
    (root / "no-tok" / "tokenizer.json").unlink()
    (root / "junk").mkdir()
    (root / "junk" / "model.onnx").write_bytes(os.urandom(64) + b"not an onnx model")
    (root / "junk" / "tokenizer.json").write_text("{}")
    generate_graph(root / "bad-tok" / "model.onnx")
    (root / "bad-tok" / "tokenizer.json").write_text("{}")
    generate_graph(root / "small-vocab" / "model.onnx", vocab_rows=len(TOKENS) - 1)
    (root / "junk" / "model.txt").write_text("x")
    cases = {
        "../outside/model.onnx": "outside the model root",
        str(outside): "outside the model root",
        "escape/model.onnx": "outside the model root",
        "link.onnx": "outside the model root",
        "missing/model.onnx": "not found",
        "emb/none.onnx": "not found",
        "junk/model.onnx": "not a valid ONNX model",
        "junk/model.txt": ".onnx",
        "no-tok": "tokenizer.json",
        "bad-tok": "tokenizer.json does not load",
        "small-vocab": "tokenizer has 3 tokens but the model's embedding table 'wte' has 2 rows",
        "no-kv": "past_key_values",
        "no-logits": "missing outputs logits",
        "dyn-heads": "static heads",
        "emb": "missing inputs position_ids",
        "": "path is required",
    }
    for path, message in cases.items():
        with pytest.raises(ArtifactError, match=message):
            reg.promote("gpt", "generate", path)
    with pytest.raises(ArtifactError, match="missing outputs last_hidden_state"):
        reg.promote("emb", "embed", "gpt-a")
    assert not history_path.exists()


def test_companions_are_checked_like_the_artifact(reg: Registry, root: Path, tmp_path: Path,
                                                  history_path: Path):
    """A config beside the model is read by the workers (and the chat template by the
    producer): one that leaves the model root, is not a regular file (a directory; a device
    or FIFO a worker would hash forever) or is not a JSON object is refused at promote."""
    outside = tmp_path / "outside.json"
    outside.write_text("{}")
    cases = [("config.json", lambda p: p.symlink_to(outside), "outside the model root"),
             ("tokenizer_config.json", lambda p: p.mkdir(), "not a regular file"),
             ("config.json", lambda p: os.mkfifo(p), "not a regular file"),
             ("tokenizer_config.json", lambda p: p.write_text("[1]"), "JSON object"),
             ("config.json", lambda p: p.write_text("{"), "not readable JSON")]
    for i, (name, make, needle) in enumerate(cases):
        directory = root / f"comp-{i}"
        shutil.copytree(root / "gpt-a", directory)
        make(directory / name)
        with pytest.raises(ArtifactError, match=needle):
            reg.promote(f"comp-{i}", "generate", f"comp-{i}")
    assert not history_path.exists()  # a refused change creates no empty file
    good = root / "comp-good"
    shutil.copytree(root / "gpt-a", good)
    (good / "config.json").write_text('{"n_positions": 64}')
    record, _ = reg.promote("comp-good", "generate", "comp-good")
    assert set(record.files) == {"tokenizer.json", "config.json"}


def test_absolute_path_and_symlink_inside_root(reg: Registry, root: Path):
    record, _ = reg.promote("gpt", "generate", str(root / "gpt-a"))
    assert record.path == "gpt-a/model.onnx"
    (root / "current").symlink_to(root / "gpt-b", target_is_directory=True)
    record, _ = reg.promote("gpt", "generate", "current")
    assert record.path == "current/model.onnx"  # workers open it through the link


# ----------------------------------------------------------------------------- history file
def test_torn_last_line_is_ignored_and_truncated(reg: Registry, history_path: Path):
    reg.promote("gpt", "generate", "gpt-a")
    with open(history_path, "ab") as f:
        f.write(b'{"seq": 2, "time": "2024-')
    assert [r.seq for r in reg.history()] == [1]
    record, created = reg.promote("gpt", "generate", "gpt-b")
    assert created and record.seq == 2
    assert [Record.from_json(line).seq for line in lines(history_path)] == [1, 2]
    assert history_path.read_bytes().endswith(b"\n")

    with open(history_path, "ab") as f:
        f.write(b"\0" * 64 + b"\n")  # NUL bytes a crash can leave: also torn
    assert len(reg.history()) == 2
    record = reg.rollback("gpt")
    assert record.seq == 3
    assert [Record.from_json(line).seq for line in lines(history_path)] == [1, 2, 3]


def test_a_complete_bad_last_line_blocks_appends_so_no_version_is_reused(
        reg: Registry, root: Path, history_path: Path, client: redis.Redis):
    """A whole last line that is not a record was edited or damaged, not torn by a crash:
    serving reads past it, but an append would drop it and give its seq and version to
    another artifact, so appends are refused, naming the line, until it is fixed by hand."""
    generate_graph(root / "gpt-c" / "model.onnx", tag="c")
    reg.promote("gpt", "generate", "gpt-a")
    second, _ = reg.promote("gpt", "generate", "gpt-b")
    good = history_path.read_text()
    history_path.write_text(good[:-2] + "\n")  # the last record's closing brace gone
    client.flushdb()  # the mirror is rebuilt from what the file holds
    assert [r.seq for r in reg.history()] == [1]
    for change in (lambda: reg.promote("gpt", "generate", "gpt-c"), lambda: reg.rollback("gpt")):
        with pytest.raises(RegistryUnavailable, match="history.jsonl line 2"):
            change()
    assert history_path.read_text() == good[:-2] + "\n"  # nothing dropped, nothing written
    history_path.write_text(good)  # fixed by hand: appends go on after it
    third, _ = reg.promote("gpt", "generate", "gpt-c")
    assert (third.seq, third.version) == (second.seq + 1, second.version + 1)


def test_corrupt_middle_line_stops_changes_not_serving(reg: Registry, history_path: Path,
                                                      client: redis.Redis):
    """A damaged earlier line: history, promote and rollback are 503 naming the line (not
    the file's directory), while models go on being served from the mirror; with no mirror
    to serve from, resolving is that 503 too, never a 500."""
    reg.promote("gpt", "generate", "gpt-a")
    reg.promote("gpt", "generate", "gpt-b")
    first, second = lines(history_path)
    damaged = first + "\n" + "{not json\n" + second + "\n"
    history_path.write_text(damaged)
    for call in (reg.history, lambda: reg.promote("gpt", "generate", "gpt-a"),
                 lambda: reg.rollback("gpt")):
        with pytest.raises(RegistryUnavailable, match="history.jsonl line 2") as caught:
            call()
        assert str(history_path.parent) not in caught.value.message
    assert reg.resolve("gpt").version == 2  # from the mirror
    assert [r.ref for r in reg.list_active()] == ["gpt@2"]
    client.flushall()
    with pytest.raises(RegistryUnavailable, match="line 2"):
        reg.resolve("gpt")
    assert history_path.read_text() == damaged


def test_a_damaged_history_is_parsed_once_until_it_changes(tmp_path: Path, monkeypatch):
    """Every resolve asks for the last seq: a damaged file is not read and parsed again per
    request, only once it changed (fixed by hand)."""
    from registry import history as history_module

    history = HistoryFile(tmp_path / "history.jsonl")
    record = Record(seq=1, time="2024-01-01T00:00:00.000Z", action="promote", name="m",
                    kind="embed", version=1, path="m/model.onnx", sha256="ab", backend="onnx",
                    upstream_model=None, actor="a", reason="", previous_version=None)
    good = record.to_json() + "\n" + replace(record, seq=2, version=2).to_json() + "\n"
    history.path.write_text(record.to_json() + "\n{damaged\n" + good.splitlines()[1] + "\n")
    parsed = []
    real = history_module._parse
    monkeypatch.setattr(history_module, "_parse", lambda *a, **k: parsed.append(1) or real(*a, **k))
    for _ in range(3):
        with pytest.raises(RegistryUnavailable, match="line 2"):
            history.last_seq()
    assert len(parsed) == 1
    history.path.write_text(good)
    assert history.last_seq() == 2 and len(parsed) == 2


def test_a_duplicated_last_line_is_a_bad_tail(reg: Registry, history_path: Path,
                                              client: redis.Redis):
    """A last line repeated by hand is a record, but not the next one: reads leave it out,
    appends are refused naming it."""
    reg.promote("gpt", "generate", "gpt-a")
    reg.promote("gpt", "generate", "gpt-b")
    with open(history_path, "a") as f:
        f.write(lines(history_path)[-1] + "\n")
    client.flushall()
    assert [r.seq for r in reg.history()] == [1, 2] and reg.resolve("gpt").version == 2
    with pytest.raises(RegistryUnavailable, match="line 3.*seq 2, expected 3"):
        reg.rollback("gpt")
    assert len(lines(history_path)) == 3


def test_a_record_that_does_not_replay_stops_changes_not_serving(reg: Registry,
                                                                 history_path: Path):
    """A record appended by hand that cannot follow the ones before it (a rollback to a
    version that was not the previous one): serving goes on from the mirror, changes are
    503, and the history still reads (it is every line, as written)."""
    reg.promote("gpt", "generate", "gpt-a")
    reg.promote("gpt", "generate", "gpt-b")
    third = replace(Record.from_json(lines(history_path)[0]), seq=3, action="rollback",
                    version=7, previous_version=2)
    with open(history_path, "a") as f:
        f.write(third.to_json() + "\n")
    assert reg.resolve("gpt").version == 2  # the mirror, still at seq 2
    with pytest.raises(RegistryUnavailable, match="history.jsonl line 3 cannot follow the "
                                                  "lines before it .*back to version 7"):
        reg.promote("gpt", "generate", "gpt-a")
    assert [r.seq for r in reg.history()] == [1, 2, 3]


@pytest.mark.parametrize("edit, said", [
    ({"name": "bad name/../x"}, "names no model a promote could make"),
    ({"name": "history"}, "'history' cannot name a model"),
    ({"version": 7}, "the next version of 'gpt' is 2"),
    ({"previous_version": None}, "says version None was active before it, but 1 was"),
    ({"path": "../../outside/model.onnx"}, "which is not under the model root"),
    ({"path": "/etc/model.onnx"}, "which is not under the model root"),
    ({"time": "yesterday"}, "which is not an ISO-8601 time"),
])
def test_an_edited_middle_record_stops_changes(reg: Registry, history_path: Path,
                                               client: redis.Redis, edit, said):
    """A record a promote could not have written (a name it refuses, a version out of turn,
    a wrong previous version) stops changes, naming its line; what is served stays."""
    reg.promote("gpt", "generate", "gpt-a")
    reg.promote("gpt", "generate", "gpt-b")
    reg.promote("other", "generate", "gpt-a")
    first, second, third = lines(history_path)
    edited = {**json.loads(second), **edit}
    history_path.write_text("\n".join([first, json.dumps(edited), third]) + "\n")
    with pytest.raises(RegistryUnavailable, match=f"line 2 cannot follow .*{re.escape(said)}"):
        reg.promote("gpt", "generate", "gpt-a")
    assert reg.resolve("gpt").version == 2 and reg.resolve("other").version == 1
    assert len(lines(history_path)) == 3


def test_history_names_a_damaged_last_line_the_mirror_is_past(reg: Registry,
                                                              history_path: Path):
    """A last line edited after it was mirrored is left out of reads: the file then ends
    before the mirror, and the history says which line is wrong, not that the file moved."""
    reg.promote("gpt", "generate", "gpt-a")
    reg.promote("gpt", "generate", "gpt-b")
    first, second = lines(history_path)
    history_path.write_text(first + "\n" + second.replace('"seq":2', '"seq":6') + "\n")
    with pytest.raises(RegistryUnavailable, match="line 2 is not the next registry record "
                                                  r"\(it has seq 6, expected 2\)"):
        reg.history()


def test_a_last_record_that_lost_only_its_newline_is_kept(reg: Registry, history_path: Path,
                                                          client: redis.Redis):
    """A crash between a record's bytes and its newline leaves the whole record: it is read,
    served, and the next append writes the newline first, so no seq or version is reused."""
    reg.promote("gpt", "generate", "gpt-a")
    second, _ = reg.promote("gpt", "generate", "gpt-b")
    history_path.write_bytes(history_path.read_bytes()[:-1])
    client.flushall()
    assert [r.seq for r in reg.history()] == [1, 2] and reg.resolve("gpt").version == 2
    third = reg.rollback("gpt")
    assert third.seq == 3 and third.version == 1
    assert [Record.from_json(line).seq for line in lines(history_path)] == [1, 2, 3]
    assert history_path.read_bytes().endswith(b"\n")


def _promote_many(port: int, root: str, history: str, start: int, count: int) -> None:
    client = redis.Redis(port=port, decode_responses=True)
    reg = Registry(HistoryFile(history), Mirror(client), Path(root))
    for i in range(start, start + count):
        reg.promote("gpt", "generate", f"many/{i}")


def test_a_first_append_racing_another_processes_first_append_decides_under_the_lock(tmp_path):
    """Two processes promote into a registry with no history file yet: each asks ``make([])``
    first (a refusal leaves no empty file behind). The one that came second was refused when
    the other's first record was already in the mirror (an empty file looked behind it); now
    it finds the file there and decides again under the lock, on the records it holds."""
    path = tmp_path / "history.jsonl"
    record = Record(seq=1, time="2024-01-01T00:00:00.000Z", action="promote", name="m",
                    kind="embed", version=1, path="m/model.onnx", sha256="ab", backend="onnx",
                    upstream_model=None, actor="a", reason="", previous_version=None)
    seen = []

    def make(records: list[Record]) -> Record:
        seen.append(len(records))
        if not records and not path.exists():  # the other process wins the race here
            HistoryFile(path).append(lambda _records: record)
            raise Conflict("history.jsonl ends at seq 0, but the Redis mirror is at seq 1")
        return replace(record, seq=len(records) + 1, version=len(records) + 1)

    assert HistoryFile(path).append(make).seq == 2
    assert seen == [0, 1] and [r.seq for r in HistoryFile(path).read()] == [1, 2]
    with pytest.raises(Conflict):  # a refusal of the first record still leaves no file
        HistoryFile(tmp_path / "other.jsonl").append(lambda _records: (_ for _ in ()).throw(
            Conflict("refused")))
    assert not (tmp_path / "other.jsonl").exists()


def test_concurrent_promotes_from_two_processes(reg: Registry, root: Path, history_path: Path,
                                                redis_port: int, client: redis.Redis):
    for i in range(20):
        generate_graph(root / "many" / str(i) / "model.onnx", tag=str(i))
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_promote_many,
                         args=(redis_port, str(root), str(history_path), start, 10))
             for start in (0, 10)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [0, 0]
    records = reg.history()
    assert [r.seq for r in records] == list(range(1, 21))
    assert sorted(r.version for r in records) == list(range(1, 21))
    assert len({r.path for r in records}) == 20
    assert reg.mirror.seq() == 20
    assert reg.mirror.active("gpt") == records[-1]
    assert records[-1].version == 20
    assert len(client.hkeys(keys.registry_versions("gpt"))) == 20
    assert not reg.ensure_mirror()


# ----------------------------------------------------------------------------- mirror
def test_flushall_then_ensure_mirror_rebuilds(reg: Registry, client: redis.Redis):
    reg.promote("gpt", "generate", "gpt-a")
    reg.promote("gpt", "generate", "gpt-b")
    reg.rollback("gpt")
    reg.promote("emb", "embed", "emb")
    assert not reg.ensure_mirror()
    client.flushall()
    assert reg.mirror.seq() is None
    with pytest.raises(ModelNotFound, match="mirror in Redis is empty"):
        resolve_from_mirror(reg.mirror, "gpt")
    assert reg.ensure_mirror()
    assert reg.mirror.seq() == 4
    assert reg.mirror.active("gpt").version == 1
    assert reg.mirror.version("gpt", 2).version == 2
    assert [r.name for r in reg.mirror.list_active()] == ["emb", "gpt"]
    client.flushall()
    assert reg.resolve("emb", "embed").name == "emb"  # resolve repairs by itself


def test_a_file_older_than_the_mirror_takes_no_change(reg: Registry, history_path: Path):
    """history.jsonl restored from an older copy (or moved away) while the mirror workers
    serve from is further on: a change appended to it would never reach the mirror, so
    promote and rollback refuse (409) and write nothing; the history it would show is short,
    so reading it is refused too (503), and the models listed are the mirror's, as served."""
    reg.promote("gpt", "generate", "gpt-a")
    reg.promote("gpt", "generate", "gpt-b")
    first = lines(history_path)[0]
    history_path.write_text(first + "\n")  # the backup of an hour ago
    for change in (lambda: reg.promote("emb", "embed", "emb"), lambda: reg.rollback("gpt")):
        with pytest.raises(Conflict, match="ends at seq 1, but the Redis mirror workers serve "
                                           "from is at seq 2"):
            change()
    with pytest.raises(RegistryUnavailable, match="ends at seq 1"):
        reg.history()
    assert [(r.name, r.version) for r in reg.list_active()] == [("gpt", 2)]
    assert lines(history_path) == [first]
    history_path.unlink()  # moved away altogether
    with pytest.raises(Conflict, match="ends at seq 0"):
        reg.promote("emb", "embed", "emb")
    with pytest.raises(RegistryUnavailable, match="ends at seq 0"):
        reg.history("gpt")
    assert [(r.name, r.version) for r in reg.list_active()] == [("gpt", 2)]
    assert not history_path.exists()  # a refused change creates no empty file
    assert reg.mirror.seq() == 2 and reg.mirror.active("gpt").version == 2


def test_crash_between_append_and_mirror_is_repaired(reg: Registry, history_path: Path):
    v1, _ = reg.promote("gpt", "generate", "gpt-a")
    other = HistoryFile(history_path)  # another process that died before mirroring
    other.append(lambda records: replace(records[-1], seq=2, version=2, path="gpt-b/model.onnx",
                                         previous_version=1))
    assert reg.mirror.seq() == 1
    assert reg.mirror.active("gpt") == v1
    assert reg.ensure_mirror()
    assert reg.mirror.seq() == 2
    assert reg.mirror.active("gpt").version == 2
    assert reg.resolve("gpt@2").path == "gpt-b/model.onnx"
    assert not reg.ensure_mirror()


def test_mirror_cas_never_moves_back(reg: Registry, client: redis.Redis):
    v1, _ = reg.promote("gpt", "generate", "gpt-a")
    v2, _ = reg.promote("gpt", "generate", "gpt-b")
    client.flushall()
    mirror = Mirror(client)
    assert mirror.apply(v2, replay([v1, v2]))
    assert not mirror.apply(v1, replay([v1]))
    assert mirror.seq() == 2 and mirror.active("gpt") == v2
    assert not mirror.rebuild([v1])
    assert mirror.seq() == 2 and mirror.active("gpt") == v2
    # A rebuild drops names the file does not have.
    client.hset(keys.REGISTRY_ACTIVE, "ghost", v1.to_json())
    client.hset(keys.registry_versions("ghost"), "1", v1.to_json())
    client.set(keys.REGISTRY_SEQ, 1)
    assert mirror.rebuild([v1, v2])
    assert client.hkeys(keys.REGISTRY_ACTIVE) == ["gpt"]
    assert not client.exists(keys.registry_versions("ghost"))


def test_event_published_on_promote_and_rollback(reg: Registry, client: redis.Redis):
    pubsub = client.pubsub()
    pubsub.subscribe(keys.REGISTRY_EVENTS)
    assert pubsub.get_message(timeout=2)["type"] == "subscribe"
    record, _ = reg.promote("gpt", "generate", "gpt-a")
    back_to = reg.promote("gpt", "generate", "gpt-b")[0]
    rollback = reg.rollback("gpt")
    seen = []
    deadline = time.monotonic() + 5
    while len(seen) < 3 and time.monotonic() < deadline:
        message = pubsub.get_message(timeout=1)
        if message and message["type"] == "message":
            seen.append(Record.from_json(message["data"]))
    pubsub.close()
    assert seen == [record, back_to, rollback]


def test_bytes_client_works(redis_port: int, root: Path, history_path: Path, client):
    reg = Registry(HistoryFile(history_path), Mirror(redis.Redis(port=redis_port)), root)
    record, _ = reg.promote("gpt", "generate", "gpt-a")
    assert reg.resolve("gpt") == record
    assert reg.mirror.list_active() == [record]


def test_record_json_round_trip_and_errors():
    record = Record(seq=1, time="2024-01-01T00:00:00.000Z", action="promote", name="m",
                    kind="embed", version=1, path="m/model.onnx", sha256="ab", backend="onnx",
                    upstream_model=None, actor="a", reason="", previous_version=None)
    assert Record.from_json(record.to_json()) == record
    assert Record.from_json(record.to_json().encode()) == record
    for bad in ("nope", "[]", json.dumps({"seq": 1}),
                record.to_json().replace('"version":1', '"version":"1"'),
                record.to_json().replace('"kind":"embed"', '"kind":"other"'),
                record.to_json().replace('"files":{}', '"files":["tokenizer.json"]'),
                record.to_json().replace('"files":{}', '"files":{"tokenizer.json":1}')):
        with pytest.raises(WireError):
            Record.from_json(bad)


def test_a_record_written_before_companion_digests_still_reads():
    """history.jsonl lines of an earlier release have no ``files``: they read (the worker
    then verifies model.onnx only), and a record with them round-trips."""
    line = json.dumps({"seq": 1, "time": "2024-01-01T00:00:00.000Z", "action": "promote",
                       "name": "m", "kind": "embed", "version": 1, "path": "m/model.onnx",
                       "sha256": "ab", "backend": "onnx", "upstream_model": None, "actor": "a",
                       "reason": "", "previous_version": None})
    old = Record.from_json(line)
    assert old.files == {}
    new = replace(old, files={"tokenizer.json": "cd"})
    assert Record.from_json(new.to_json()) == new


def test_an_append_that_waited_on_a_file_replaced_meanwhile_goes_to_the_new_file(
        tmp_path: Path):
    """An editor's save (a copy moved over the file) while an append waits on the lock: the
    append must land in the file now at the path, not in the replaced one nobody reads."""
    import fcntl
    import threading

    history = HistoryFile(tmp_path / "history.jsonl")
    record = Record(seq=1, time="2024-01-01T00:00:00.000Z", action="promote", name="m",
                    kind="embed", version=1, path="m/model.onnx", sha256="ab", backend="onnx",
                    upstream_model=None, actor="a", reason="", previous_version=None)
    history.append(lambda records: record)
    with open(history.path, "rb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)  # another writer, or an editor
        waiting = threading.Thread(target=history.append, args=(
            lambda records: replace(record, seq=len(records) + 1, version=len(records) + 1),))
        waiting.start()
        waiting.join(timeout=0.5)
        assert waiting.is_alive()  # it waits on the lock
        copy = tmp_path / "history.jsonl.new"
        copy.write_bytes(history.path.read_bytes())
        os.replace(copy, history.path)
    waiting.join(timeout=10)
    assert [r.seq for r in history.read()] == [1, 2]


def test_history_file_refuses_a_wrong_seq_and_creates_dirs(tmp_path: Path):
    history = HistoryFile(tmp_path / "a" / "b" / "history.jsonl")
    assert history.read() == [] and history.last_seq() == 0
    record = Record(seq=1, time="2024-01-01T00:00:00.000Z", action="promote", name="m",
                    kind="embed", version=1, path="m/model.onnx", sha256="ab", backend="onnx",
                    upstream_model=None, actor="a", reason="", previous_version=None)
    assert history.append(lambda records: record) == record
    assert history.last_seq() == 1
    with pytest.raises(WireError, match="next seq is 2"):
        history.append(lambda records: replace(record, seq=3))
    with pytest.raises(WireError):
        history.append(lambda records: replace(record, seq=2, kind="other"))
    assert history.read() == [record]
    assert history.append(lambda records: replace(record, seq=2, version=2)).seq == 2
    assert history.last_seq() == 2
