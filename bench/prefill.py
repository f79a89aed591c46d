"""prefill: what a prompt pass costs (the ONNX Runtime part of time to first token) on a
decoder's own graph against the in-place twin a CPU worker serves.

One batch of ``--rows`` prompts of random token ids, ragged (row b has ``--prompt-tokens``
minus ``b % 4`` tokens), runs ``--repeats`` times interleaved through:

* ``inplace`` (``served``): the twin (``workers/inplace.py``, ``BANTER_KV_LAYOUT`` auto on the
  CPU provider): prompts right-padded, and only each prompt's last position goes through the
  final LayerNorm and the vocabulary projection;
* ``own_graph`` (baseline): the model's own graph (Optimum layout), prompts left-padded as the
  engine pads them for it: every position is projected onto the vocabulary and the last one
  sampled.

``correct``: both give every prompt the same greedy next token. The projection's share of a
token's arithmetic grows with the vocabulary: ``--random-gpt2-small`` measures a
GPT-2-small-shaped decoder with random weights and ``--vocab`` rows (default 50257, GPT-2's),
written to a temporary directory (about 500 MB, 20 s); ``banter models import
--random-gpt2-small`` writes one with the demo tokenizer's 685. CPU provider only (the twin is
not served on CUDA).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import loadavg, positive, ratio
from bench.generate import RawDecoder
from bench.inplace import Inplace
from bench.machine import machine_facts
from workers.batching import prompt_feeds
from workers.inplace import prompt_inputs

GPT2_VOCAB = 50257


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-dir", type=Path, default=None,
                   help="a gpt_graph decoder directory (model.onnx, tokenizer.json): the demo "
                        "decoder or a banter models import of a GPT-2; default: demo-gpt, built "
                        "in a temporary directory")
    p.add_argument("--random-gpt2-small", action="store_true",
                   help="instead, a GPT-2-small-shaped decoder with random weights and --vocab "
                        "rows, written to a temporary directory (about 500 MB)")
    p.add_argument("--vocab", type=positive, default=GPT2_VOCAB,
                   help=f"vocabulary rows of --random-gpt2-small ({GPT2_VOCAB})")
    p.add_argument("--rows", type=positive, default=16, help="prompts in the batch (16)")
    p.add_argument("--prompt-tokens", type=positive, default=16,
                   help="tokens of the longest prompt (16)")
    p.add_argument("--repeats", type=positive, default=5, help="interleaved passes of each (5)")
    p.add_argument("--threads", type=int, default=0,
                   help="ONNX Runtime intra-op threads (0: one per core)")


def write_random_decoder(out: Path, vocab: int, dims: dict | None = None) -> Path:
    """A GPT-2-small-shaped ``gpt_graph`` decoder (``dims`` overriding the shape) with random
    weights and ``vocab`` vocabulary rows in ``out`` (model.onnx; tokenizer.json is the demo's,
    which covers only its first ids: enough for a pass, not for decoding text)."""
    from banter.demo import gpt_tokenizer
    from banter.importer import gpt2_onnx, random_gpt2_config, random_gpt2_tensors

    config = random_gpt2_config(vocab, dims)
    out.mkdir(parents=True, exist_ok=True)
    (out / "model.onnx").write_bytes(gpt2_onnx(config, random_gpt2_tensors(config), "prefill"))
    gpt_tokenizer()[0].save(str(out / "tokenizer.json"))
    return out


def make_prompts(rows: int, tokens: int, vocab: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, max(1, tokens - b % 4)).astype(np.int64) for b in range(rows)]


class OwnGraph:
    """A prompt pass through the model's own graph, as the engine runs it there."""

    def __init__(self, model_dir: Path, threads: int) -> None:
        self.raw = RawDecoder(model_dir, threads=threads)

    def next_tokens(self, prompts: list[np.ndarray]) -> np.ndarray:
        raw = self.raw
        empty = np.zeros((len(prompts), raw.heads, 0, raw.head_dim), dtype=raw.kv_dtype)
        feeds = {**prompt_feeds(prompts), **{name: empty for name in raw.past_names}}
        return raw.session.run(["logits"], feeds)[0][:, -1].argmax(axis=-1)


class Twin:
    """A prompt pass through the in-place twin, as a CPU worker runs it."""

    def __init__(self, model_dir: Path, rows: int, capacity: int, threads: int) -> None:
        self.inplace = Inplace(model_dir / "model.onnx", rows, capacity, threads)

    def next_tokens(self, prompts: list[np.ndarray]) -> np.ndarray:
        return self.inplace.run(prompt_inputs(prompts))[:, -1].argmax(axis=-1)


def timed(loop, prompts: list[np.ndarray]) -> tuple[np.ndarray, float]:
    started = time.perf_counter()
    tokens = loop.next_tokens(prompts)
    return tokens, (time.perf_counter() - started) * 1000


def run(args: argparse.Namespace) -> dict:
    began = time.perf_counter()
    load_at_start = loadavg()
    scratch = Path(tempfile.mkdtemp(prefix="bench-prefill-"))
    try:
        if args.model_dir is not None:
            model_dir = args.model_dir
        elif args.random_gpt2_small:
            model_dir = write_random_decoder(scratch / "gpt2-small-random", args.vocab)
        else:
            from banter.demo import DEMO_GPT, build_demo

            model_dir = build_demo(scratch)[DEMO_GPT]
        loops = {"inplace": Twin(model_dir, args.rows, args.prompt_tokens, args.threads),
                 "own_graph": OwnGraph(model_dir, args.threads)}
        vocab = loops["own_graph"].raw.session.get_outputs()[0].shape[2]
        prompts = make_prompts(args.rows, args.prompt_tokens, vocab)
        for loop in loops.values():
            loop.next_tokens(prompts)  # warm-up
        runs: dict[str, list[float]] = {name: [] for name in loops}
        chosen: dict[str, list[list[int]]] = {name: [] for name in loops}
        for _ in range(args.repeats):
            for name, loop in loops.items():
                tokens, ms = timed(loop, prompts)
                runs[name].append(ms)
                chosen[name].append(tokens.tolist())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    ms = {name: round(float(np.median(values)), 2) for name, values in runs.items()}
    served = ms.pop("inplace")
    reference = chosen["own_graph"][0]
    return {
        "scenario": "prefill",
        "unit": "ms per prompt pass",
        "served": served,
        "baselines": ms,
        "ratios": {name: ratio(served, value) for name, value in ms.items()},
        "correct": all(tokens == reference for runs_ in chosen.values() for tokens in runs_),
        "runs_ms": {name: [round(x, 2) for x in values] for name, values in runs.items()},
        "settings": {"model_dir": None if args.model_dir is None else str(model_dir),
                     "random_gpt2_small": args.random_gpt2_small, "vocab": int(vocab),
                     "rows": args.rows, "prompt_tokens": args.prompt_tokens,
                     "prompt_tokens_total": sum(len(p) for p in prompts),
                     "repeats": args.repeats, "threads": args.threads},
        "machine": {**machine_facts(), "loadavg_at_start": load_at_start,
                    "loadavg_at_end": loadavg()},
        "duration_s": round(time.perf_counter() - began, 2),
    }
