"""The registry over HTTP end to end: the real producer, the shared redis-server, the shared
worker process and the real ``history.jsonl``.

The demo models (``demo-gpt`` / ``demo-embed``) are shared with other test files and must stay
active at version 1, so every test here promotes and rolls back its own fresh model names,
pointing at copies of the demo artifacts placed under the model root.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from banter import keys
from banter.demo import DEMO_EMBED, DEMO_GPT, DEMO_TEXT
from banter.settings import Settings
from producer.app import create_app
from tests.conftest import Api, Server

RECORD_FIELDS = {"seq", "time", "action", "name", "kind", "version", "path", "sha256", "backend",
                 "upstream_model", "actor", "reason", "previous_version", "files", "ref"}


# ----------------------------------------------------------------------------- helpers
def fresh_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def companions(directory: Path) -> dict[str, str]:
    """What a record's ``files`` must hold for the artifact in ``directory``."""
    return {name: sha256(directory / name) for name in
            ("tokenizer.json", "config.json", "tokenizer_config.json")
            if (directory / name).is_file()}


def copy_model(source: Path, target: Path) -> Path:
    """Copy a demo model directory (model.onnx, tokenizer.json, config.json) to ``target``."""
    shutil.copytree(source, target)
    return target


def perturbed_embed_copy(source: Path, target: Path) -> Path:
    """A genuinely different embed artifact: the demo encoder with its token embedding table
    perturbed (deterministically), so it hashes differently AND embeds differently."""
    copy_model(source, target)
    model = onnx.load(str(target / "model.onnx"))
    for index, init in enumerate(model.graph.initializer):
        if init.name == "wte":
            table = numpy_helper.to_array(init)
            noise = np.random.default_rng(7).normal(0.0, 1.0, table.shape).astype(table.dtype)
            model.graph.initializer[index].CopyFrom(numpy_helper.from_array(table + noise, "wte"))
            break
    else:
        raise AssertionError("the demo encoder has no 'wte' initializer any more")
    model.doc_string = "reg test: perturbed wte"
    onnx.save(model, str(target / "model.onnx"))
    return target


def history_lines(settings) -> list[dict]:
    return [json.loads(line) for line in settings.registry_path.read_text().splitlines()]


def assert_error(response, status: int, type_: str, *needles: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message", "param", "code"}, body
    assert body["error"]["type"] == type_, body
    for needle in needles:
        assert needle in body["error"]["message"], body
    return body["error"]


def promote(api, name: str, kind: str, path: str, reason: str = ""):
    return api.post("/v1/models/promote", {"name": name, "kind": kind, "path": path,
                                           "reason": reason})


def run_embed_job(api, model: str, text: str = "pinned versions") -> dict:
    response = api.post("/v1/jobs", {"kind": "embed", "input": text, "model": model})
    assert response.status_code == 202, response.text
    job = api.wait_job(response.json()["id"])
    assert job["status"] == "succeeded", job
    return job


@pytest.fixture
def embed_model(api, settings, demo_models):
    """A fresh embed model name with two different artifacts under the model root:
    ``<name>/v1`` (the demo encoder's bytes) and ``<name>/v2`` (perturbed weights)."""
    name = fresh_name("reg-embed")
    base = settings.model_root / name
    v1 = copy_model(demo_models[DEMO_EMBED], base / "v1")
    v2 = perturbed_embed_copy(demo_models[DEMO_EMBED], base / "v2")
    assert sha256(v1 / "model.onnx") != sha256(v2 / "model.onnx")
    return name, v1, v2


# ----------------------------------------------------------------------------- promote
def test_promote_versions_and_idempotent_repeat(api, settings, embed_model):
    name, v1, v2 = embed_model
    before = len(history_lines(settings))

    # given a new name, when its first artifact is promoted, expect 201 with version 1
    first = promote(api, name, "embed", f"{name}/v1", reason="first cut")
    assert first.status_code == 201, first.text
    r1 = first.json()
    assert set(r1) == RECORD_FIELDS
    assert {k: r1[k] for k in RECORD_FIELDS - {"time", "actor"}} == {
        "seq": before + 1, "action": "promote", "name": name, "kind": "embed", "version": 1,
        "path": f"{name}/v1/model.onnx", "sha256": sha256(v1 / "model.onnx"),
        "backend": "onnx", "upstream_model": None, "reason": "first cut",
        "previous_version": None, "ref": f"{name}@1", "files": companions(v1)}
    assert isinstance(r1["actor"], str) and r1["actor"]
    assert len(history_lines(settings)) == before + 1

    # when a different artifact is promoted under the same name, expect 201 with version 2
    second = promote(api, name, "embed", f"{name}/v2/model.onnx", reason="retrained")
    assert second.status_code == 201, second.text
    r2 = second.json()
    assert (r2["seq"], r2["version"], r2["action"], r2["previous_version"]) == \
        (before + 2, 2, "promote", 1)
    assert r2["sha256"] == sha256(v2 / "model.onnx") and r2["path"] == f"{name}/v2/model.onnx"
    assert len(history_lines(settings)) == before + 2

    # when the active artifact is promoted again (directory or file path), expect 200 with the
    # active record and no new history line
    for path in (f"{name}/v2", f"{name}/v2/model.onnx"):
        again = promote(api, name, "embed", path, reason="retry")
        assert again.status_code == 200, again.text
        assert again.json() == r2
    assert len(history_lines(settings)) == before + 2

    # the history file holds exactly those records, last lines first-class JSON of the API's
    lines = history_lines(settings)
    assert lines[-2:] == [{k: v for k, v in r.items() if k != "ref"} for r in (r1, r2)]

    # GET /v1/models lists the name at its active version
    listed = {m["id"]: m for m in api.get("/v1/models").json()["data"]}
    assert listed[name]["version"] == 2 and listed[name]["kind"] == "embed"
    assert listed[name]["backend"] == "onnx" and listed[name]["object"] == "model"
    assert (listed[DEMO_GPT]["version"], listed[DEMO_EMBED]["version"]) == (1, 1)

    # GET /v1/models/history?name= lists that name's records in seq order
    history = api.get("/v1/models/history", params={"name": name})
    assert history.status_code == 200
    assert history.json() == {"object": "list", "data": [r1, r2]}
    everything = api.get("/v1/models/history").json()["data"]
    assert [r["seq"] for r in everything] == list(range(1, len(lines) + 1))
    assert everything[-2:] == [r1, r2]


def test_a_tokenizer_changed_after_promote_is_not_served(api, settings, demo_models):
    """The tokenizer decides what text a model's tokens are: one edited after promote (here
    re-indented: the same tokens, other bytes) is refused like a changed model.onnx, until the
    file is promoted again, which makes a new version instead of answering "unchanged"."""
    name = fresh_name("reg-tok")
    directory = copy_model(demo_models[DEMO_GPT], settings.model_root / name)
    first = promote(api, name, "generate", name)
    assert first.status_code == 201 and first.json()["files"] == companions(directory)
    assert set(first.json()["files"]) >= {"tokenizer.json", "config.json"}
    tokenizer = directory / "tokenizer.json"
    tokenizer.write_text(json.dumps(json.loads(tokenizer.read_text()), indent=1))

    job = api.post("/v1/jobs", {"kind": "generate", "input": "hi", "model": name,
                                "params": {"max_tokens": 2}}).json()
    failed = api.wait_job(job["id"])
    assert failed["status"] == "failed" and failed["error"]["type"] == "checksum_mismatch"

    again = promote(api, name, "generate", name, reason="tokenizer re-indented")
    assert again.status_code == 201, again.text
    assert again.json()["version"] == 2 and again.json()["files"] == companions(directory)
    job = api.post("/v1/jobs", {"kind": "generate", "input": "hi", "model": name,
                                "params": {"max_tokens": 2}}).json()
    done = api.wait_job(job["id"])
    assert done["status"] == "succeeded" and done["version"] == 2


def test_a_model_whose_link_points_out_of_the_root_since_promote_is_not_served(
        api, settings, demo_models, tmp_path):
    """Promoted through a link to a directory under the model root, then the link pointed at a
    copy outside it: the files match their digests, but a worker loads nothing from outside
    the root."""
    name = fresh_name("reg-link")
    inside = copy_model(demo_models[DEMO_GPT], settings.model_root / f"{name}-files")
    link = settings.model_root / name
    link.symlink_to(inside, target_is_directory=True)
    assert promote(api, name, "generate", name).status_code == 201
    outside = copy_model(demo_models[DEMO_GPT], tmp_path / "outside")
    link.unlink()
    link.symlink_to(outside, target_is_directory=True)
    job = api.post("/v1/jobs", {"kind": "generate", "input": "hi", "model": name,
                                "params": {"max_tokens": 2}}).json()
    failed = api.wait_job(job["id"])
    assert failed["status"] == "failed" and failed["error"]["type"] == "model_load_error"
    assert str(outside) not in failed["error"]["message"]


def external_data_copy(source: Path, target: Path, location: str = "model.onnx.data") -> Path:
    """A demo model directory whose weights are in an ONNX external-data file."""
    copy_model(source, target)
    model = onnx.load(str(target / "model.onnx"))
    onnx.save_model(model, str(target / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location=location, size_threshold=1024)
    return target


def test_external_data_changed_after_promote_is_not_served(api, settings, demo_models):
    """Weights in an external-data file are hashed into the record like the companions: a
    changed weights file is refused before the version loads; as promoted, it serves."""
    name = fresh_name("reg-ext")
    directory = external_data_copy(demo_models[DEMO_GPT], settings.model_root / name)
    weights = directory / "model.onnx.data"
    first = promote(api, name, "generate", name)
    assert first.status_code == 201, first.text
    assert first.json()["files"] == {**companions(directory), "model.onnx.data": sha256(weights)}

    original = weights.read_bytes()
    weights.write_bytes(original[:-1] + bytes([original[-1] ^ 0xFF]))
    job = api.post("/v1/jobs", {"kind": "generate", "input": "hi", "model": name,
                                "params": {"max_tokens": 2}}).json()
    failed = api.wait_job(job["id"])
    assert failed["status"] == "failed" and failed["error"]["type"] == "checksum_mismatch"

    weights.write_bytes(original)
    params = {"max_tokens": 4, "temperature": 0}
    served = api.wait_job(api.post("/v1/jobs", {"kind": "generate", "input": DEMO_TEXT,
                                                "model": name, "params": params}).json()["id"])
    assert served["status"] == "succeeded", served["error"]
    demo = api.wait_job(api.post("/v1/jobs", {"kind": "generate", "input": DEMO_TEXT,
                                              "model": DEMO_GPT, "params": params}).json()["id"])
    assert served["result"]["text"] == demo["result"]["text"]  # the same weights


def test_external_data_outside_the_model_directory_or_missing_is_refused(api, settings,
                                                                        demo_models):
    name = fresh_name("reg-ext-bad")
    directory = external_data_copy(demo_models[DEMO_GPT], settings.model_root / name)
    (directory / "model.onnx.data").rename(settings.model_root / f"{name}.data")
    refused = promote(api, name, "generate", name)
    assert_error(refused, 422, "invalid_artifact", "not found")
    model = onnx.load(str(directory / "model.onnx"), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = f"../{name}.data"
    onnx.save(model, str(directory / "model.onnx"))
    refused = promote(api, name, "generate", name)
    assert_error(refused, 422, "invalid_artifact", "must be a path inside the model's directory")
    assert api.get("/v1/models/history", params={"name": name}).status_code == 404


def test_history_of_unknown_name_is_404(api):
    response = api.get("/v1/models/history", params={"name": fresh_name("nobody")})
    assert_error(response, 404, "model_not_found", "no model named")


# ----------------------------------------------------------------------------- rollback
def test_rollback_restores_the_previous_version_once(api, settings, embed_model):
    name, v1, _ = embed_model
    r1 = promote(api, name, "embed", f"{name}/v1").json()
    r2 = promote(api, name, "embed", f"{name}/v2").json()
    before = len(history_lines(settings))

    # when the name is rolled back, expect 200 with a rollback record restoring version 1
    response = api.post("/v1/models/rollback", {"name": name, "reason": "v2 is worse"})
    assert response.status_code == 200, response.text
    back = response.json()
    assert {k: back[k] for k in RECORD_FIELDS - {"time", "actor"}} == {
        "seq": r2["seq"] + 1, "action": "rollback", "name": name, "kind": "embed",
        "version": 1, "path": r1["path"], "sha256": sha256(v1 / "model.onnx"),
        "backend": "onnx", "upstream_model": None, "reason": "v2 is worse",
        "previous_version": 2, "ref": f"{name}@1", "files": companions(v1)}
    assert history_lines(settings)[before:] == [{k: v for k, v in back.items() if k != "ref"}]
    listed = {m["id"]: m for m in api.get("/v1/models").json()["data"]}
    assert listed[name]["version"] == 1
    assert api.get("/v1/models/history", params={"name": name}).json()["data"] == [r1, r2, back]

    # when rolled back again there is no earlier version: 409, nothing written
    again = api.post("/v1/models/rollback", {"name": name})
    assert_error(again, 409, "conflict", "no earlier version")
    assert len(history_lines(settings)) == before + 1


def test_rollback_of_unknown_name_is_404(api, settings):
    before = len(history_lines(settings))
    response = api.post("/v1/models/rollback", {"name": fresh_name("nobody")})
    assert_error(response, 404, "model_not_found", "no model named")
    assert len(history_lines(settings)) == before


def test_pinned_version_runs_that_artifact_after_rollback(api, embed_model):
    name, _, _ = embed_model
    assert promote(api, name, "embed", f"{name}/v1").status_code == 201
    assert promote(api, name, "embed", f"{name}/v2").status_code == 201
    assert api.post("/v1/models/rollback", {"name": name}).status_code == 200

    # given version 1 active again, a job pinned to name@2 runs on version 2 ...
    pinned = run_embed_job(api, f"{name}@2")
    assert pinned["version"] == 2 and pinned["backend"] == "onnx"
    # ... and a job naming just the name runs on the active version 1
    active = run_embed_job(api, name)
    assert active["version"] == 1
    # version 1 is the demo encoder's bytes; version 2 has other weights: the worker really
    # loaded the pinned artifact, not only labelled the job
    demo = run_embed_job(api, DEMO_EMBED)
    assert np.allclose(active["result"]["embedding"], demo["result"]["embedding"], atol=1e-6)
    assert not np.allclose(pinned["result"]["embedding"], active["result"]["embedding"],
                           atol=1e-3)
    # a version that was never promoted is a 404, not a job
    missing = api.post("/v1/jobs", {"kind": "embed", "input": "x", "model": f"{name}@3"})
    assert_error(missing, 404, "model_not_found", f"{name}@3")


# ----------------------------------------------------------------------------- promote errors
@pytest.fixture
def bad_artifacts(settings, demo_models):
    """A fresh name's directory under the model root with a non-ONNX file and an embed graph."""
    name = fresh_name("reg-bad")
    base = settings.model_root / name
    junk = base / "junk"
    junk.mkdir(parents=True)
    (junk / "model.onnx").write_text("this is not a protobuf, just text\n" * 4)
    shutil.copy(demo_models[DEMO_EMBED] / "tokenizer.json", junk / "tokenizer.json")
    copy_model(demo_models[DEMO_EMBED], base / "embed")
    unknown_op = copy_model(demo_models[DEMO_EMBED], base / "unknown-op")
    model = onnx.load(str(unknown_op / "model.onnx"))
    model.graph.node[0].op_type = "NoSuchOp"  # ONNX Runtime would refuse the graph
    onnx.save(model, str(unknown_op / "model.onnx"))
    custom = copy_model(demo_models[DEMO_EMBED], base / "custom-domain")
    model = onnx.load(str(custom / "model.onnx"))
    model.graph.node[0].domain = "com.example"
    onnx.save(model, str(custom / "model.onnx"))
    future = copy_model(demo_models[DEMO_EMBED], base / "future-opset")
    model = onnx.load(str(future / "model.onnx"))
    model.opset_import[0].version = 99
    onnx.save(model, str(future / "model.onnx"))
    return name


def promote_error_cases(name: str) -> list[tuple[dict, int, str, tuple[str, ...]]]:
    ok = {"name": name, "kind": "embed", "path": f"{name}/embed"}
    return [
        ({**ok, "kind": "train"}, 422, "invalid_request", ("'kind' must be one of",)),
        ({**ok, "path": "../x"}, 422, "invalid_artifact", ("outside the model root",)),
        ({**ok, "path": "/etc/passwd"}, 422, "invalid_artifact", ("outside the model root",)),
        ({**ok, "path": f"{name}/nothing-here/model.onnx"}, 422, "invalid_artifact",
         ("not found",)),
        ({**ok, "path": f"{name}/junk/model.onnx"}, 422, "invalid_artifact",
         ("not a valid ONNX model",)),
        ({**ok, "path": f"{name}/unknown-op"}, 422, "invalid_artifact",
         ("uses operators ONNX does not define: NoSuchOp",)),
        ({**ok, "path": f"{name}/custom-domain"}, 422, "invalid_artifact",
         ("uses operators of domain 'com.example'",)),
        ({**ok, "path": f"{name}/future-opset"}, 422, "invalid_artifact",
         ("imports opset 99",)),
        ({**ok, "kind": "generate"}, 422, "invalid_artifact",
         ("missing inputs position_ids, past_key_values.0.key, past_key_values.0.value",)),
        ({**ok, "name": "a/b"}, 422, "invalid_request", ("invalid model name",)),
        ({**ok, "name": "x@1"}, 422, "invalid_request", ("invalid model name",)),
        ({**ok, "name": "history"}, 422, "invalid_request", ("cannot name a model",)),
        ({**ok, "name": "promote"}, 422, "invalid_request", ("reserved",)),
        ({**ok, "kind": None}, 422, "invalid_request", ("'kind' must be one of",)),
        ({**ok, "upstream_model": "gpt-4o"}, 422, "invalid_request",
         ("unknown field 'upstream_model'", "goes in 'model'")),
        ({**ok, "force": True}, 422, "invalid_request", ("unknown field 'force'",)),
    ]


def test_promote_errors_are_typed_json_and_change_nothing(api, settings, bad_artifacts):
    name = bad_artifacts
    before = settings.registry_path.read_text()
    for body, status, type_, needles in promote_error_cases(name):
        response = api.post("/v1/models/promote", body)
        assert response.status_code == status, (body, response.text)
        assert_error(response, status, type_, *needles)
    assert settings.registry_path.read_text() == before
    assert name not in {m["id"] for m in api.get("/v1/models").json()["data"]}
    # and the good artifact of that very name still promotes afterwards
    good = promote(api, name, "embed", f"{name}/embed")
    assert good.status_code == 201 and good.json()["version"] == 1


@pytest.mark.parametrize("body, param", [
    ({"backend": "openai", "model": "gpt-4o-mini", "path": "demo-gpt/model.onnx"}, "path"),
    ({"backend": "openai"}, "model"),
    ({"path": "demo-gpt/model.onnx", "model": "gpt-4o-mini"}, "model"),
    ({"path": "demo-gpt/model.onnx", "backend": "tpu"}, "backend"),
])
def test_promote_errors_name_the_field_at_fault(api, body, param):
    response = api.post("/v1/models/promote", {"name": "fielded", "kind": "generate", **body})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"] == param


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH"])
def test_the_registry_posts_answer_other_methods_with_405_allowing_post(api, method):
    for path in ("/v1/models/promote", "/v1/models/rollback"):
        response = api.session.request(method, api.url + path, timeout=60)
        assert response.status_code == 405, response.text
        assert set(response.headers["Allow"].split(", ")) == {"POST", "OPTIONS"}
        assert response.json()["error"]["type"] == "method_not_allowed"
        assert "X-Trace-ID" in response.headers


def test_a_model_named_like_an_endpoint_prefix_is_still_a_model_id(api):
    response = api.get("/v1/models/promoted")
    assert response.status_code == 404, response.text
    assert response.json()["error"]["param"] == "model"


def test_promote_path_with_a_nul_byte_is_a_422_not_a_500(api, settings, bad_artifacts):
    # the design: "Never a 500 for anything a client sent"; a NUL byte makes the path
    # resolution raise ValueError, which the artifact check must turn into an ArtifactError
    name = bad_artifacts
    before = settings.registry_path.read_text()
    for path in (f"{name}/embed\x00", f"{name}/embed/model.onnx\x00.onnx"):
        response = promote(api, name, "embed", path)
        assert response.status_code == 422, (
            f"BUG: promote with a NUL byte in 'path' answered {response.status_code} "
            f"{response.text} (registry/artifacts.py _resolve does not catch ValueError)")
        assert_error(response, 422, "invalid_artifact")
    assert settings.registry_path.read_text() == before


def test_a_name_cannot_change_kind(api, settings, demo_models, embed_model):
    name, _, _ = embed_model
    copy_model(demo_models[DEMO_GPT], settings.model_root / name / "gpt")
    assert promote(api, name, "embed", f"{name}/v1").status_code == 201
    before = len(history_lines(settings))
    # given an embed model, when a valid generate artifact is promoted under its name: 409
    response = promote(api, name, "generate", f"{name}/gpt")
    assert_error(response, 409, "conflict", "kind")
    assert len(history_lines(settings)) == before
    listed = {m["id"]: m for m in api.get("/v1/models").json()["data"]}
    assert (listed[name]["kind"], listed[name]["version"]) == ("embed", 1)


# ----------------------------------------------------------------------------- Redis lost it
def registry_mirror_keys(redis_client) -> list[str]:
    found = [keys.REGISTRY_ACTIVE, keys.REGISTRY_SEQ]
    found += list(redis_client.scan_iter(match=keys.registry_versions("*")))
    return [k.decode() if isinstance(k, bytes) else k for k in found]


def test_registry_survives_redis_losing_its_mirror(api, settings, redis_client, embed_model):
    name, _, _ = embed_model
    assert promote(api, name, "embed", f"{name}/v1").status_code == 201
    assert promote(api, name, "embed", f"{name}/v2").status_code == 201
    assert api.post("/v1/models/rollback", {"name": name}).status_code == 200
    last_seq = history_lines(settings)[-1]["seq"]

    # given Redis lost every registry key (a restart without persistence, for the registry)
    redis_client.delete(*registry_mirror_keys(redis_client))
    assert redis_client.exists(keys.REGISTRY_ACTIVE, keys.REGISTRY_SEQ) == 0
    assert list(redis_client.scan_iter(match=keys.registry_versions("*"))) == []

    # expect the model list to still show the active versions (history.jsonl is the truth)
    listed = {m["id"]: m["version"] for m in api.get("/v1/models").json()["data"]}
    assert (listed[name], listed[DEMO_GPT], listed[DEMO_EMBED]) == (1, 1, 1)

    # and jobs to resolve as before: the mirror is rebuilt from the file on the next resolve
    assert run_embed_job(api, name)["version"] == 1
    assert run_embed_job(api, f"{name}@2")["version"] == 2
    answer = api.post("/v1/inference", {"prompt": "still there?", "max_tokens": 3})
    assert answer.status_code == 200, answer.text
    assert answer.json()["text"] == " banterhearts streams every"
    assert DEMO_TEXT.startswith(answer.json()["text"])

    assert int(redis_client.get(keys.REGISTRY_SEQ)) == last_seq
    active = json.loads(redis_client.hget(keys.REGISTRY_ACTIVE, name))
    assert (active["version"], active["action"]) == (1, "rollback")
    assert sorted(int(v) for v in redis_client.hkeys(keys.registry_versions(name))) == [1, 2]


def test_a_history_file_that_cannot_be_written_is_503_not_500(settings, redis_client,
                                                               demo_models, tmp_path):
    """(Root writes through permissions: a file where the registry's directory should be
    stops any writer.)"""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    server = Server(create_app(replace(settings, registry_path=blocker / "history.jsonl"),
                               redis_client))
    try:
        client = Api(server.url)
        refused = client.post("/v1/models/promote", {"name": "unwritable", "kind": "embed",
                                                      "path": "demo-embed/model.onnx"})
        assert refused.status_code == 503, refused.text
        error = refused.json()["error"]
        assert error["type"] == "registry_unavailable"
        assert "history.jsonl cannot be written" in error["message"]
        assert str(tmp_path) not in error["message"]
        history = client.get("/v1/models/history")
        assert history.status_code == 503 and "cannot be read" in history.text
        # jobs are served from the Redis mirror meanwhile (it holds the registry)
        served = client.post("/v1/jobs", {"kind": "embed", "input": "still served"})
        assert served.status_code == 202, served.text
    finally:
        server.close()


def test_a_registry_path_that_is_a_directory_is_a_setting_error(tmp_path):
    from banter.settings import SettingsError

    with pytest.raises(SettingsError, match="BANTER_REGISTRY_PATH=.* is a directory"):
        Settings.from_env({"BANTER_REGISTRY_PATH": str(tmp_path)})
