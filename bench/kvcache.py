"""kvcache: what moving the KV cache between host and device costs per decode step.

Two greedy decode loops over one decoder session (Optimum layout), in this process, from the
same random cache of ``--rows`` x ``--past`` positions, ``--steps`` steps each, ``--repeats``
times interleaved:

* ``host`` (``served``): the cache as numpy arrays, fed to ``session.run`` and fetched from it
  every pass: what the engine does on the CPU provider;
* ``device_bound`` (a baseline): the cache bound on the session's device with ONNX Runtime's
  I/O binding: ``present.*`` outputs stay where they were computed and are bound as the next
  pass's ``past_key_values.*``; only the logits come to the host;
* ``inplace_cache`` (a baseline, with ``--inplace``; CPU provider): the same decoder rebuilt
  from its own weights with its cache appended to in place (``workers/inplace.py``, what a
  worker serves with ``BANTER_KV_LAYOUT`` auto on the CPU provider): each step writes one new
  position instead of copying the whole past into ``present.*``.

On the CPU provider both keep the cache in host memory, so the ratio shows the cost of the
numpy round trip alone; with ``--gpu N`` (CUDA provider) it shows what bringing the cache to
the host and back every step would cost: what the engine saves by keeping it bound on the
device there (``Runner.run_decoder``; on the CPU provider the engine keeps numpy arrays).
``correct``: every loop chose the same tokens at every step.

``--profile-ops`` adds ``ops``: the host loop on a session with ONNX Runtime's profiler on
(after a warm-up loop), its kernel time per step split by operator type (``Concat`` is where an
Optimum-layout decoder copies the whole past into each ``present.*``; ``MatMul`` and
``FusedMatMul`` the weights and the attention): what a decode step's time is made of.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from bench.common import loadavg, positive, ratio
from bench.generate import RawDecoder
from bench.inplace import Inplace
from bench.machine import machine_facts

log = logging.getLogger("bench.kvcache")

WARM_UP_STEPS = 2  # each loop's untimed first run: allocations, kernels


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-dir", type=Path, default=None,
                   help="a decoder directory (model.onnx in the Optimum layout, tokenizer.json); "
                        "default: demo-gpt, built in a temporary directory")
    p.add_argument("--rows", type=positive, default=16, help="sequences in the batch (16)")
    p.add_argument("--past", type=positive, default=128, help="cached positions at the start (128)")
    p.add_argument("--steps", type=positive, default=32, help="decode steps per loop (32)")
    p.add_argument("--repeats", type=positive, default=3, help="interleaved runs of each loop (3)")
    p.add_argument("--gpu", type=int, default=None, help="run on GPU N (CUDA provider)")
    p.add_argument("--inplace", action="store_true",
                   help="add baselines.inplace_cache: the same decoder rebuilt with its cache "
                        "appended to in place (bench/inplace.py; CPU provider, gpt_graph "
                        "decoders: the demo and imported GPT-2s)")
    p.add_argument("--profile-ops", action="store_true",
                   help="add the host loop's kernel time per step by operator type (ORT's "
                        "profiler, two more loops of --steps)")


class Decoder:
    """The host and device loops over one ``RawDecoder`` (its session and cache geometry), on the
    device its session actually got."""

    def __init__(self, model_dir: Path, gpu: int | None, profile_prefix: str | None = None) -> None:
        import onnxruntime as ort

        self.ort = ort
        providers = ["CPUExecutionProvider"]
        if gpu is not None:
            providers = [("CUDAExecutionProvider", {"device_id": gpu}), "CPUExecutionProvider"]
        raw = RawDecoder(model_dir, providers=providers, profile_prefix=profile_prefix)
        self.session, self.past_names, self.present_names = (raw.session, raw.past_names,
                                                             raw.present_names)
        self.heads, self.head_dim, self.kv_dtype = raw.heads, raw.head_dim, raw.kv_dtype
        self.providers = self.session.get_providers()
        on_gpu = self.providers[0] == "CUDAExecutionProvider"
        self.device, self.device_id = ("cuda", gpu or 0) if on_gpu else ("cpu", 0)

    def start(self, rows: int, past: int, seed: int = 0) -> list[np.ndarray]:
        rng = np.random.default_rng(seed)
        shape = (rows, self.heads, past, self.head_dim)
        return [rng.standard_normal(shape).astype(self.kv_dtype) * 0.1 for _ in self.past_names]

    @staticmethod
    def step_inputs(rows: int, width: int, tokens: np.ndarray) -> dict[str, np.ndarray]:
        return {"input_ids": tokens.reshape(rows, 1).astype(np.int64),
                "attention_mask": np.ones((rows, width + 1), dtype=np.int64),
                "position_ids": np.full((rows, 1), width, dtype=np.int64)}

    def host_loop(self, cache: list[np.ndarray], steps: int) -> tuple[list[list[int]], float]:
        rows, width = cache[0].shape[0], cache[0].shape[2]
        past = list(cache)

        def step(tokens: np.ndarray, position: int) -> np.ndarray:
            nonlocal past
            feeds = {**self.step_inputs(rows, position, tokens), **dict(zip(self.past_names, past))}
            logits, *past = self.session.run(["logits", *self.present_names], feeds)
            return logits

        return greedy(rows, width, steps, step)

    def device_loop(self, cache: list[np.ndarray], steps: int) -> tuple[list[list[int]], float]:
        ort = self.ort
        rows, width = cache[0].shape[0], cache[0].shape[2]
        past = [ort.OrtValue.ortvalue_from_numpy(a, self.device, self.device_id) for a in cache]
        binding = self.session.io_binding()

        def step(tokens: np.ndarray, position: int) -> np.ndarray:
            nonlocal past
            binding.clear_binding_inputs()
            binding.clear_binding_outputs()
            for name, value in self.step_inputs(rows, position, tokens).items():
                binding.bind_cpu_input(name, value)
            for name, value in zip(self.past_names, past):
                binding.bind_ortvalue_input(name, value)
            binding.bind_output("logits", "cpu")
            for name in self.present_names:
                binding.bind_output(name, self.device, self.device_id)
            self.session.run_with_iobinding(binding)
            logits, *past = binding.get_outputs()
            return logits.numpy()

        return greedy(rows, width, steps, step)


def greedy(rows: int, width: int, steps: int,
           step: Callable[[np.ndarray, int], np.ndarray]) -> tuple[list[list[int]], float]:
    """A timed greedy decode loop every variant shares: ``step(tokens [rows], position)`` runs one
    pass of the previous step's tokens (ones at first) at ``position`` (``width`` on) and returns
    its logits. Returns each step's chosen tokens and the seconds the loop took."""
    tokens = np.ones(rows, dtype=np.int64)
    chosen = []
    started = time.perf_counter()
    for i in range(steps):
        tokens = step(tokens, width + i)[:, -1, :].argmax(axis=-1)
        chosen.append(tokens.tolist())
    return chosen, time.perf_counter() - started


class InplaceLoop:
    """The greedy loop of the other two on ``bench.inplace.Inplace``: the cache is copied into
    buffers of ``capacity`` positions before each run (not timed), then every step writes its
    one new position in place."""

    def __init__(self, model_dir: Path, rows: int, capacity: int) -> None:
        self.inplace = Inplace(model_dir / "model.onnx", rows, capacity)

    def run(self, cache: list[np.ndarray], steps: int) -> tuple[list[list[int]], float]:
        self.inplace.load(cache)
        rows, width = cache[0].shape[0], cache[0].shape[2]
        return greedy(rows, width, steps, lambda tokens, position: self.inplace.step(
            tokens.reshape(rows, 1), np.full((rows, 1), position), position))


def kernel_ms_by_op(trace: list[dict], steps: int, skip_runs: int = 0) -> dict:
    """ORT profiler events -> kernel milliseconds per step by operator type, largest first,
    with each type's share of the total; the first ``skip_runs`` session runs are left out."""
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in trace if e.get("name") == "model_run")
    after = runs[skip_runs - 1][1] if skip_runs else 0
    totals: collections.Counter[str] = collections.Counter()
    for event in trace:
        if (event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time")
                and event["ts"] >= after):
            totals[event["args"]["op_name"]] += event["dur"]  # microseconds
    whole = sum(totals.values())
    return {"kernel_ms_per_step": round(whole / 1000 / steps, 3),
            "by_type": {op: {"ms_per_step": round(us / 1000 / steps, 3),
                             "share": round(us / whole, 4)}
                        for op, us in totals.most_common()}}


def profile_ops(model_dir: Path, gpu: int | None, cache: list[np.ndarray], steps: int) -> dict:
    """The host loop twice on a session with ORT's profiler on; the first loop is a warm-up
    (a new session's memory arena grows during its first steps)."""
    with tempfile.TemporaryDirectory(prefix="bench-kvcache-profile-") as directory:
        decoder = Decoder(model_dir, gpu, profile_prefix=str(Path(directory) / "ort"))
        decoder.host_loop(cache, steps)
        decoder.host_loop(cache, steps)
        trace = json.loads(Path(decoder.session.end_profiling()).read_text())
    return kernel_ms_by_op(trace, steps, skip_runs=steps)


def run(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-kvcache-") as scratch:
        return measure(args, Path(scratch))


def measure(args: argparse.Namespace, scratch: Path) -> dict:
    """``run``'s result; the demo model, when no ``--model-dir`` is given, is built in
    ``scratch`` (removed afterwards)."""
    began = time.perf_counter()
    load_at_start = loadavg()
    model_dir = args.model_dir
    if model_dir is None:
        from banter.demo import DEMO_GPT, build_demo

        model_dir = build_demo(scratch)[DEMO_GPT]
    decoder = Decoder(Path(model_dir), args.gpu)
    cache = decoder.start(args.rows, args.past)
    log.info("providers %s, cache %d x %d positions, %.1f MB", decoder.providers, args.rows,
             args.past, sum(a.nbytes for a in cache) / 1e6)
    loops = {"host": decoder.host_loop, "device_bound": decoder.device_loop}
    if args.inplace:
        if decoder.device != "cpu":
            raise ValueError("--inplace runs on the CPU provider only (ONNX Runtime's CUDA "
                             "GroupQueryAttention takes float16)")
        loops["inplace_cache"] = InplaceLoop(Path(model_dir), args.rows,  # room for either run
                                             args.past + max(args.steps, WARM_UP_STEPS)).run
    for loop in loops.values():
        loop(cache, WARM_UP_STEPS)
    runs: dict[str, list[float]] = {name: [] for name in loops}
    reference, agree = None, True
    for _ in range(args.repeats):
        for name, loop in loops.items():
            tokens, seconds = loop(cache, args.steps)
            reference = reference or tokens
            agree = agree and tokens == reference
            runs[name].append(seconds / args.steps * 1000)
    ms = {name: round(float(np.median(values)), 3) for name, values in runs.items()}
    host_ms = ms.pop("host")
    log.info("host %.2f ms/step; %s", host_ms,
             ", ".join(f"{name} {value:.2f}" for name, value in ms.items()))
    ops = profile_ops(Path(model_dir), args.gpu, cache, args.steps) if args.profile_ops else None
    return {
        "scenario": "kvcache",
        "unit": "ms per decode step, KV cache fed and fetched as numpy arrays",
        "served": host_ms,
        "baselines": ms,
        "ratios": {name: ratio(host_ms, value) for name, value in ms.items()},
        "correct": agree,
        "runs_ms_per_step": {name: [round(x, 3) for x in values] for name, values in runs.items()},
        "providers": decoder.providers,
        "device": decoder.device,
        **({"ops": ops} if ops is not None else {}),
        "settings": {"model_dir": str(model_dir), "rows": args.rows, "past": args.past,
                     "steps": args.steps, "repeats": args.repeats, "gpu": args.gpu,
                     "profile_ops": args.profile_ops, "inplace": args.inplace,
                     "cache_mb_at_start": round(sum(a.nbytes for a in cache) / 1e6, 1)},
        "machine": {**machine_facts(), "loadavg_at_start": load_at_start,
                    "loadavg_at_end": loadavg()},
        "duration_s": round(time.perf_counter() - began, 2),
    }
