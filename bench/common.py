"""Helpers the embed, latency, sse and lanes scenarios share: percentiles, the load average,
a raw ONNX Runtime encoder (the baseline and the correctness oracle), deterministic sentences of
a given token length, a MiniLM-L6-shaped encoder for timing, and small HTTP helpers."""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import requests

# the MiniLM-L6 (sentence-transformers/all-MiniLM-L6-v2) geometry, for ``--shape minilm``
MINILM_DIMS = {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12,
               "intermediate_size": 1536, "max_position_embeddings": 512}
MINILM_NAME = "minilm-shape"

_WORDS = ("an encoder turns every sentence into one vector so that similar sentences end up "
          "close together and a search can rank documents by meaning rather than by the exact "
          "words they share with the query while the batching engine packs many inputs into a "
          "single pass of the network").split()


def positive(raw: str) -> int:
    """argparse type: an integer of at least 1."""
    value = int(raw)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def non_negative(raw: str) -> int:
    """argparse type: an integer of at least 0."""
    value = int(raw)
    if value < 0:
        raise argparse.ArgumentTypeError("must be at least 0")
    return value


def comma_list(choices: Sequence[str] | None = None, item: Callable[[str], Any] = str,
               empty_ok: bool = False, unique: bool = True) -> Callable[[str], list[Any]]:
    """argparse type: comma-separated ``item`` values (each one of ``choices`` when given),
    in order, once each unless not ``unique``; none only when ``empty_ok``."""
    def parse(raw: str) -> list[Any]:
        values: list[Any] = []
        for part in (p.strip() for p in raw.split(",")):
            if not part:
                continue
            if choices is not None and part not in choices:
                raise argparse.ArgumentTypeError(f"{part!r}: choose from {', '.join(choices)}")
            try:
                value = item(part)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{part!r} is not a number") from None
            if not unique or value not in values:
                values.append(value)
        if not values and not empty_ok:
            raise argparse.ArgumentTypeError("give at least one value")
        return values

    return parse


def env_pair(raw: str) -> tuple[str, str]:
    """argparse type of ``--worker-env``: ``NAME=VALUE``."""
    name, sep, value = raw.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {raw!r}")
    return name, value


def p50_p99_ms(values: Sequence[float]) -> dict[str, float | None]:
    """p50 and p99 in milliseconds, two decimals (the generate and soak scenarios' shape)."""
    if not values:
        return {"p50": None, "p99": None}
    arr = np.asarray(values) * 1000.0
    return {"p50": round(float(np.percentile(arr, 50)), 2),
            "p99": round(float(np.percentile(arr, 99)), 2)}


def percentiles_ms(seconds: Sequence[float]) -> dict[str, float | int | None]:
    """p50, p90, p99, mean, min and max in milliseconds, and the sample count."""
    if not seconds:
        return {"n": 0, "p50": None, "p90": None, "p99": None, "mean": None, "min": None,
                "max": None}
    ms = np.asarray(seconds, dtype=np.float64) * 1000.0
    return {"n": int(ms.size),
            **{f"p{q}": round(float(np.percentile(ms, q)), 3) for q in (50, 90, 99)},
            "mean": round(float(ms.mean()), 3), "min": round(float(ms.min()), 3),
            "max": round(float(ms.max()), 3)}


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def ratio(served: float | None, baseline: float | None, digits: int = 3) -> float | None:
    return round(served / baseline, digits) if served is not None and baseline else None


# -- raw ONNX Runtime encoder ----------------------------------------------------------------

class RawEncoder:
    """A plain encoder loop over a model directory (``model.onnx``, ``tokenizer.json``,
    ``config.json``): tokenize, right-pad, one ORT pass, masked mean pool, L2 normalise, with
    onnxruntime, tokenizers and numpy only (nothing from ``workers/``)."""

    def __init__(self, model_dir: Path, threads: int = 0,
                 providers: Sequence[str] = ("CPUExecutionProvider",)) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads > 0:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(Path(model_dir) / "model.onnx"),
                                            sess_options=options, providers=list(providers))
        self.tokenizer = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        config_path = Path(model_dir) / "config.json"
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
        self.pad_id = config.get("pad_token_id") or 0
        self.token_type = "token_type_ids" in {i.name for i in self.session.get_inputs()}

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.tokenizer.encode(t).ids for t in texts]

    def run_ids(self, rows: Sequence[Sequence[int]]) -> np.ndarray:
        """Embeddings ``[B, hidden]`` (float64, unit length) of already tokenized rows."""
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for b, row in enumerate(rows):
            ids[b, :len(row)] = row
            mask[b, :len(row)] = 1
        feeds = {"input_ids": ids, "attention_mask": mask}
        if self.token_type:
            feeds["token_type_ids"] = np.zeros_like(ids)
        hidden = self.session.run(["last_hidden_state"], feeds)[0]
        weights = mask[:, :, None].astype(np.float64)
        pooled = (hidden.astype(np.float64) * weights).sum(axis=1) / np.maximum(
            weights.sum(axis=1), 1)
        return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return self.run_ids(self.encode(texts))

    def loop(self, texts: Sequence[str], batch_size: int) -> tuple[np.ndarray, float]:
        """The batched loop over every text (tokenization included); (embeddings, seconds)."""
        out = []
        started = time.perf_counter()
        for start in range(0, len(texts), batch_size):
            out.append(self.embed(texts[start:start + batch_size]))
        return np.concatenate(out), time.perf_counter() - started


def make_sentences(n: int, tokenizer: Any, tokens: int, offset: int = 0) -> list[str]:
    """``n`` distinct deterministic sentences, each encoding (special tokens included) to as
    close to ``tokens`` tokens as whole words allow, never more (at least the numbered prefix)."""
    sentences = []
    for j in range(offset, offset + n):
        words = [f"Sentence {j}:"]
        k = (j * 7) % len(_WORDS)
        while True:
            candidate = " ".join([*words, _WORDS[k % len(_WORDS)]])
            if len(tokenizer.encode(candidate).ids) > tokens:
                break
            words.append(_WORDS[k % len(_WORDS)])
            k += 1
        sentences.append(" ".join(words))
    return sentences


def max_abs_diff(served: Sequence[Sequence[float]], reference: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(served, dtype=np.float64) - reference)))


# -- models ----------------------------------------------------------------------------------

def build_minilm_shape(model_root: Path) -> Path:
    """``model_root/minilm-shape``: a BERT encoder with MiniLM-L6's geometry and random
    weights (the demo encoder's graph builder and BPE tokenizer), for timing only.
    Deterministic."""
    from banter import demo

    d = MINILM_DIMS
    tok = demo.bert_tokenizer()
    vocab, hid, inner = tok.get_vocab_size(), d["hidden_size"], d["intermediate_size"]
    rng = np.random.default_rng(20240602)
    w = {"wte": rng.normal(0, 0.5, (vocab, hid)),
         "wpe": rng.normal(0, 0.1, (d["max_position_embeddings"], hid)),
         "ln_e.g": np.ones(hid), "ln_e.b": np.zeros(hid)}
    for i in range(d["num_hidden_layers"]):
        for part, shape in {"q": (hid, hid), "k": (hid, hid), "v": (hid, hid), "o": (hid, hid),
                            "fc": (hid, inner), "proj": (inner, hid)}.items():
            w[f"h.{i}.{part}.w"] = rng.normal(0, 0.05, shape)
            w[f"h.{i}.{part}.b"] = rng.normal(0, 0.01, shape[1])
        for norm in ("ln_1", "ln_2"):
            w[f"h.{i}.{norm}.g"], w[f"h.{i}.{norm}.b"] = np.ones(hid), np.zeros(hid)
    model = demo.bert_graph({k: v.astype(np.float32) for k, v in w.items()},
                            n_layer=d["num_hidden_layers"], n_head=d["num_attention_heads"],
                            name=MINILM_NAME)
    config = {"model_type": "bert", **d, "vocab_size": vocab, "pad_token_id": 0,
              "pooling": "mean", "normalize": True, "note": "random weights, for timing only"}
    folder = Path(model_root) / MINILM_NAME
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.onnx").write_bytes(model)
    (folder / "tokenizer.json").write_text(tok.to_str(pretty=True))
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder


def encoder_model(stack: Any, model_dir: Path | None, name: str | None,
                  shape: str) -> tuple[str, Path, dict]:
    """Promote the encoder a scenario serves: ``model_dir`` when given, else the demo encoder
    (``shape`` demo) or the MiniLM-shaped one (``shape`` minilm). (name, dir, promoted)."""
    from banter.demo import DEMO_EMBED, build_demo

    if model_dir:
        directory = Path(model_dir).resolve()
        name = name or directory.name
    elif shape == "minilm":
        directory, name = build_minilm_shape(stack.model_root), MINILM_NAME
    else:
        directory, name = build_demo(stack.model_root)[DEMO_EMBED], DEMO_EMBED
    return name, directory, stack.promote(name, "embed", directory)


# -- HTTP ------------------------------------------------------------------------------------

class HTTPFailure(RuntimeError):
    pass


def post(session: requests.Session, url: str, body: dict, timeout: float = 300.0,
         retry_429_s: float = 0.0) -> dict:
    """POST JSON, return the JSON answer; a 429 is retried for up to ``retry_429_s`` seconds
    (after its ``Retry-After``, at most 1 s); any other non-2xx raises HTTPFailure."""
    deadline = time.monotonic() + retry_429_s
    while True:
        response = session.post(url, json=body, timeout=timeout)
        if response.status_code == 429 and time.monotonic() < deadline:
            time.sleep(min(float(response.headers.get("Retry-After") or 1), 1.0))
            continue
        if response.status_code // 100 != 2:
            raise HTTPFailure(f"POST {url}: HTTP {response.status_code}: {response.text[:300]}")
        return response.json()


def run_released(threads: list[threading.Thread], barrier: threading.Barrier) -> float:
    """Start ``threads`` (each waits on ``barrier`` before its work), release them together
    and join them all; returns the ``time.perf_counter()`` of the release."""
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    return started
