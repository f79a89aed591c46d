"""Tests for banter.demo: deterministic demo-gpt / demo-embed ONNX models."""

from __future__ import annotations

import hashlib
import json
import pathlib
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from tokenizers import Tokenizer

from banter.demo import DEMO_EMBED, DEMO_GPT, DEMO_TEXT, build_demo

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, pathlib.Path]:
    return build_demo(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def gpt(built):
    d = built[DEMO_GPT]
    cfg = json.loads((d / "config.json").read_text())
    sess = ort.InferenceSession(str(d / "model.onnx"), providers=["CPUExecutionProvider"])
    return sess, Tokenizer.from_file(str(d / "tokenizer.json")), cfg


@pytest.fixture(scope="module")
def bert(built):
    d = built[DEMO_EMBED]
    sess = ort.InferenceSession(str(d / "model.onnx"), providers=["CPUExecutionProvider"])
    return sess, Tokenizer.from_file(str(d / "tokenizer.json"))


def _hashes(dirs: dict[str, pathlib.Path]) -> dict[str, str]:
    return {f"{k}/{f.name}": hashlib.sha256(f.read_bytes()).hexdigest()
            for k, d in dirs.items() for f in sorted(d.iterdir())}


def _empty_past(cfg, batch: int) -> list[np.ndarray]:
    shape = (batch, cfg["n_head"], 0, cfg["n_embd"] // cfg["n_head"])
    return [np.zeros(shape, np.float32)] * (2 * cfg["n_layer"])


def _step(gpt, ids, mask, pos, past) -> tuple[np.ndarray, list[np.ndarray]]:
    """One decoder pass; returns logits and the present key/values (same order as past)."""
    sess, _, cfg = gpt
    feeds = {"input_ids": np.asarray(ids, np.int64), "attention_mask": np.asarray(mask, np.int64),
             "position_ids": np.asarray(pos, np.int64)}
    names = [f"{i}.{kv}" for i in range(cfg["n_layer"]) for kv in ("key", "value")]
    feeds |= {f"past_key_values.{n}": p for n, p in zip(names, past)}
    out = sess.run(["logits"] + [f"present.{n}" for n in names], feeds)
    return out[0], out[1:]


def _alone_last_logits(gpt, ids: list[int]) -> np.ndarray:
    logits, _ = _step(gpt, [ids], [[1] * len(ids)], [list(range(len(ids)))], _empty_past(gpt[2], 1))
    return logits[0, -1]


def _cycle_ids(tok: Tokenizer) -> list[int]:
    return [tok.token_to_id(" " + w) for w in DEMO_TEXT.split()]


# ----------------------------------------------------------------------------- build
def test_build_is_deterministic(built, tmp_path):
    first = _hashes(built)
    assert _hashes(build_demo(tmp_path)) == first
    assert _hashes(build_demo(tmp_path)) == first  # overwrite in place
    assert not [p for p in tmp_path.rglob("*.tmp")]
    code = f"import pathlib, banter.demo as d; d.build_demo(pathlib.Path({str(tmp_path / 'sub')!r}))"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)  # fresh process, new hash seed
    assert _hashes({k: tmp_path / "sub" / k for k in built}) == first
    for d in built.values():
        assert (d / "model.onnx").stat().st_size < 4_000_000


def test_configs(gpt, built):
    _, tok, cfg = gpt
    assert cfg["model_type"] == "gpt2" and cfg["demo_text"] == DEMO_TEXT
    assert cfg["vocab_size"] == tok.get_vocab_size() and cfg["bos_token_id"] == cfg["eos_token_id"] == 0
    assert tok.id_to_token(0) == "<|endoftext|>"
    ecfg = json.loads((built[DEMO_EMBED] / "config.json").read_text())
    assert ecfg["model_type"] == "bert" and ecfg["pooling"] == "mean" and ecfg["normalize"] is True
    assert ecfg["pad_token_id"] == 0


def test_graph_signatures(built, gpt):
    _, _, cfg = gpt
    i64, f32 = onnx.TensorProto.INT64, onnx.TensorProto.FLOAT

    def sig(values):
        return {v.name: (v.type.tensor_type.elem_type, len(v.type.tensor_type.shape.dim)) for v in values}

    g = onnx.load(str(built[DEMO_GPT] / "model.onnx")).graph
    kv = [f"{i}.{n}" for i in range(cfg["n_layer"]) for n in ("key", "value")]
    assert sig(g.input) == {"input_ids": (i64, 2), "attention_mask": (i64, 2), "position_ids": (i64, 2),
                            **{f"past_key_values.{n}": (f32, 4) for n in kv}}
    assert sig(g.output) == {"logits": (f32, 3), **{f"present.{n}": (f32, 4) for n in kv}}
    e = onnx.load(str(built[DEMO_EMBED] / "model.onnx")).graph
    assert sig(e.input) == {"input_ids": (i64, 2), "attention_mask": (i64, 2)}
    assert sig(e.output) == {"last_hidden_state": (f32, 3)}


# ----------------------------------------------------------------------------- decoder
@pytest.mark.parametrize("prompt", [" ", "héllo 🌍", " banterhearts streams", "Hello!\nHow are you?", "<|endoftext|>"])
def test_greedy_writes_demo_text_then_cycles(gpt, prompt):
    _, tok, cfg = gpt
    cycle = _cycle_ids(tok)
    ids = tok.encode(prompt).ids
    assert ids and not set(ids) & set(cycle)
    logits, past = _step(gpt, [ids], [[1] * len(ids)], [list(range(len(ids)))], _empty_past(cfg, 1))
    out = []
    for _ in range(2 * len(cycle)):
        nxt = int(logits[0, -1].argmax())
        out.append(nxt)
        n = len(ids) + len(out)
        logits, past = _step(gpt, [[nxt]], [[1] * n], [[n - 1]], past)
    assert out == cycle * 2
    assert tok.decode(out[:len(cycle)]) == DEMO_TEXT
    assert tok.decode(out) == DEMO_TEXT * 2


def test_greedy_continues_from_inside_the_cycle(gpt):
    _, tok, _ = gpt
    cycle = _cycle_ids(tok)
    assert int(_alone_last_logits(gpt, cycle[:3]).argmax()) == cycle[3]
    assert int(_alone_last_logits(gpt, cycle[-1:]).argmax()) == cycle[0]


def test_kv_cache_matches_full_pass(gpt):
    _, tok, cfg = gpt
    ids = tok.encode("The quick brown fox, 🦊, jumps over the lazy dog.").ids
    n = len(ids)
    full, _ = _step(gpt, [ids], [[1] * n], [list(range(n))], _empty_past(cfg, 1))
    k = n // 2
    logits, past = _step(gpt, [ids[:k]], [[1] * k], [list(range(k))], _empty_past(cfg, 1))
    parts = [logits]
    logits, past = _step(gpt, [ids[k:k + 2]], [[1] * (k + 2)], [[k, k + 1]], past)  # a 2-token chunk
    parts.append(logits)
    for j in range(k + 2, n):
        logits, past = _step(gpt, [ids[j:j + 1]], [[1] * (j + 1)], [[j]], past)
        parts.append(logits)
    assert past[0].shape[2] == n
    np.testing.assert_allclose(np.concatenate(parts, axis=1), full, atol=1e-4)


def _left_pad(rows: list[list[int]], fill: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Left-pad with junk token ``fill``; positions count real tokens only."""
    width = max(len(r) for r in rows)
    ids = np.array([[fill] * (width - len(r)) + r for r in rows], np.int64)
    mask = np.array([[0] * (width - len(r)) + [1] * len(r) for r in rows], np.int64)
    return ids, mask, np.maximum(mask.cumsum(1) - 1, 0)


def test_decoder_padding_invariance(gpt):
    _, tok, cfg = gpt
    prompts = [tok.encode(t).ids for t in ("Hi", "A much longer prompt about batching ✨ tokens", "héllo 🌍")]
    ids, mask, pos = _left_pad(prompts, fill=123)
    logits, past = _step(gpt, ids, mask, pos, _empty_past(cfg, 3))
    assert np.isfinite(logits).all() and all(np.isfinite(p).all() for p in past)
    for r, p in enumerate(prompts):
        np.testing.assert_allclose(logits[r, -1], _alone_last_logits(gpt, p), atol=1e-4)

    # next step: padded past + left-padded new tokens of different lengths
    new = [tok.encode(t).ids[:m] for t, m in ((" and more words", 3), (" x", 1), (" yes no", 2))]
    nids, nmask, _ = _left_pad(new, fill=7)
    npos = mask.sum(1, keepdims=True) + np.maximum(nmask.cumsum(1) - 1, 0)
    logits2, past2 = _step(gpt, nids, np.concatenate([mask, nmask], 1), npos, past)
    assert np.isfinite(logits2).all() and all(np.isfinite(p).all() for p in past2)
    for r in range(3):
        np.testing.assert_allclose(logits2[r, -1], _alone_last_logits(gpt, prompts[r] + new[r]), atol=1e-4)

    # junk in masked positions (ids and cached values) must not leak into real outputs
    junk = [p.copy() for p in past]
    for p in junk:
        p.transpose(0, 2, 1, 3)[mask == 0] = 1e3  # [B,T,H,D] view
    logits3, _ = _step(gpt, np.where(nmask == 1, nids, 42), np.concatenate([mask, nmask], 1), npos, junk)
    np.testing.assert_allclose(logits3[:, -1], logits2[:, -1], atol=1e-5)


# ----------------------------------------------------------------------------- encoder
def _embed(bert, texts: list[str]) -> np.ndarray:
    sess, tok = bert
    encs = [tok.encode(t).ids for t in texts]
    width = max(map(len, encs))
    ids = np.array([e + [0] * (width - len(e)) for e in encs], np.int64)
    mask = np.array([[1] * len(e) + [0] * (width - len(e)) for e in encs], np.int64)
    hidden = sess.run(["last_hidden_state"], {"input_ids": ids, "attention_mask": mask})[0]
    assert hidden.shape == (len(texts), width, 128) and np.isfinite(hidden).all()
    pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


def test_encoder_padding_invariance_and_distinct(bert):
    texts = ["short one", "a considerably longer sentence about embeddings and search 🌍", "héllo"]
    batch = _embed(bert, texts)
    for i, t in enumerate(texts):
        np.testing.assert_allclose(batch[i], _embed(bert, [t])[0], atol=1e-5)
    sims = batch @ batch.T
    assert (sims[~np.eye(3, dtype=bool)] < 0.999).all()


# ----------------------------------------------------------------------------- tokenizers
@pytest.mark.parametrize("text", ["", " ", "héllo 🌍\nnew line\ttab", "日本語テキスト", "  spaces  ", DEMO_TEXT])
def test_decoder_tokenizer_roundtrip(gpt, text):
    _, tok, _ = gpt
    assert tok.decode(tok.encode(text).ids) == text


def test_encoder_tokenizer_adds_cls_sep(bert):
    _, tok = bert
    enc = tok.encode("hello 🌍")
    assert enc.tokens[0] == "[CLS]" and enc.tokens[-1] == "[SEP]"
    assert [tok.token_to_id(t) for t in ("[PAD]", "[CLS]", "[SEP]")] == [0, 1, 2]
    assert tok.decode(enc.ids) == "hello 🌍"
