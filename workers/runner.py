"""ONNX Runtime sessions: one ``Runner`` per loaded model version, cached in a ``RunnerCache``."""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from banter.errors import ChecksumMismatch, InferenceError, ModelLoadError
from registry.artifacts import sha256_file
from workers.batching import pack_rows
from workers.kvpacker import KVPacker

log = logging.getLogger("banter.worker")

KINDS = ("generate", "embed")
DEFAULT_MAX_POSITIONS = 1024
PAST_PREFIX = "past_key_values."
PRESENT_PREFIX = "present."


@dataclass(frozen=True)
class ModelSpec:
    """One registered model version: what to load and the sha256 its ``model.onnx`` must have."""

    name: str
    version: int
    kind: str
    model_path: Path
    tokenizer_path: Path
    sha256: str
    backend: str = "onnx"


def select_providers(use_gpu: bool) -> list[str]:
    """CUDA first when asked for and available in this onnxruntime build, else CPU only."""
    if use_gpu and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _verify(spec: ModelSpec) -> None:
    try:
        actual = sha256_file(spec.model_path)
    except OSError as exc:
        raise ModelLoadError(f"cannot read model file {spec.model_path}: {exc}") from exc
    if actual != spec.sha256.lower():
        raise ChecksumMismatch(
            f"sha256 of {spec.model_path} is {actual}, the registry expects {spec.sha256}; "
            "the artifact changed since it was promoted: promote it again or restore the file")


def _load_config(model_path: Path) -> dict[str, Any]:
    path = model_path.parent / "config.json"
    if not path.exists():
        return {}
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path} must hold a JSON object")
    return config


def _load_tokenizer(path: Path) -> Tokenizer:
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises bare Exception subclasses
        raise ModelLoadError(f"cannot load tokenizer {path}: {exc}") from exc
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def _optional_int(config: Mapping[str, Any], key: str) -> int | None:
    value = config.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class Preempted(Exception):
    """The pass was stopped by ``PassHandle.stop`` before it finished."""


class PassHandle:
    """Lets another thread stop one ORT pass: ``stop()`` ends the run in progress early (ORT
    checks the flag between graph nodes) or makes it fail at once if it has not started."""

    def __init__(self) -> None:
        self.options = ort.RunOptions()
        self.stopped = False

    def stop(self) -> None:
        self.stopped = True
        self.options.terminate = True


class Runner:
    """One loaded model version: a verified ONNX Runtime session, its tokenizer and config.

    The model file's sha256 is checked against ``spec.sha256`` before any session exists
    (``ChecksumMismatch``); any other load failure is a ``ModelLoadError``. ``run`` wraps ORT
    failures in ``InferenceError``. Decoder geometry (``n_layer``, ``n_head``, ``head_dim``,
    ``past_names``/``present_names`` in matching order) is read from the graph's inputs.
    Only the engine calls ``run`` / ``run_decoder``: from its thread, and with
    ``EngineSettings.prefill_overlap`` a prefill pass from its prefill thread at the same time
    (ONNX Runtime sessions run concurrently; each bound pass has its own I/O binding). The
    tokenizer may be used from any thread.

    ``kv_device``: where a decoder's KV cache stays between passes (``run_decoder``). On the
    CUDA provider it is ``"cuda"``: the ``present.*`` outputs are bound on the GPU (ONNX
    Runtime I/O binding) and fed back as the next pass's pasts without a trip to the host;
    ``pack_kv`` re-packs them there too (rows joining and leaving the batch). On
    the CPU provider it is None (numpy arrays; binding saves nothing there, docs/benchmarks.md
    ``kvcache``) unless ``bind_kv`` asks for it (the tests run the bound path on the CPU).
    """

    def __init__(self, spec: ModelSpec, providers: Sequence[str] = ("CPUExecutionProvider",),
                 intra_op_threads: int = 0, bind_kv: bool | None = None) -> None:
        if spec.kind not in KINDS:
            raise ModelLoadError(f"model {spec.name}@{spec.version}: kind must be one of {KINDS}")
        if spec.backend != "onnx":
            raise ModelLoadError(f"model {spec.name}@{spec.version}: backend {spec.backend!r} "
                                 "is not served by the ONNX runner")
        _verify(spec)
        self.spec = spec
        self.tokenizer = _load_tokenizer(spec.tokenizer_path)
        self.config = _load_config(spec.model_path)
        self.session = self._create_session(list(providers), intra_op_threads)
        self.providers: list[str] = self.session.get_providers()
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.input_names = frozenset(inputs)
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.max_positions = (_optional_int(self.config, "n_positions")
                              or _optional_int(self.config, "max_position_embeddings")
                              or DEFAULT_MAX_POSITIONS)
        self.eos_token_id = _optional_int(self.config, "eos_token_id")
        self.bos_token_id = _optional_int(self.config, "bos_token_id")
        self.pad_token_id = _optional_int(self.config, "pad_token_id") or 0
        self.n_layer = sum(1 for n in inputs if n.startswith(PAST_PREFIX) and n.endswith(".key"))
        self.past_names = [f"{PAST_PREFIX}{i}.{part}"
                           for i in range(self.n_layer) for part in ("key", "value")]
        self.present_names = [f"{PRESENT_PREFIX}{i}.{part}"
                              for i in range(self.n_layer) for part in ("key", "value")]
        self._check_graph(inputs)
        self.n_head, self.head_dim, self.kv_dtype = 0, 0, np.float32
        self.kv_device: str | None = None
        if spec.kind == "generate":
            self.n_head, self.head_dim, self.kv_dtype = self._kv_geometry(inputs)
            on_gpu = self.providers[0] == "CUDAExecutionProvider"
            if bind_kv or (bind_kv is None and on_gpu):
                self.kv_device = "cuda" if on_gpu else "cpu"
        self._packer: KVPacker | None = None
        if self.kv_device is not None:
            self._packer = KVPacker(len(self.past_names), self.kv_dtype, self.providers,
                                    self.kv_device)

    def _create_session(self, providers: list[str],
                        intra_op_threads: int) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if intra_op_threads > 0:
            options.intra_op_num_threads = intra_op_threads
        # Encoders spin (their passes run back to back under load, with little Python between
        # them: MiniLM passes cost 4.2 ms per input spinning, 5.1 ms not). Decoders do not: each
        # step has sampling and publishing between passes, which spinning threads would slow.
        spin = "1" if self.spec.kind == "embed" else "0"
        options.add_session_config_entry("session.intra_op.allow_spinning", spin)
        options.add_session_config_entry("session.inter_op.allow_spinning", spin)
        try:
            return ort.InferenceSession(str(self.spec.model_path), sess_options=options,
                                        providers=providers)
        except Exception as exc:  # ORT raises its own non-standard exception types
            raise ModelLoadError(f"cannot load {self.spec.model_path} "
                                 f"({self.spec.name}@{self.spec.version}): {exc}") from exc

    def _check_graph(self, inputs: Mapping[str, Any]) -> None:
        needed_in = {"input_ids", "attention_mask"}
        needed_out = {"last_hidden_state"}
        if self.spec.kind == "generate":
            if self.n_layer == 0:
                raise ModelLoadError(f"{self.spec.model_path}: a generate model needs "
                                     "past_key_values.* inputs (Optimum layout with KV cache)")
            needed_in |= {"position_ids", *self.past_names}
            needed_out = {"logits", *self.present_names}
        missing = sorted((needed_in - set(inputs)) | (needed_out - set(self.output_names)))
        if missing:
            raise ModelLoadError(f"{self.spec.model_path} is not a {self.spec.kind} graph: "
                                 f"it lacks {', '.join(missing)}")

    def _kv_geometry(self, inputs: Mapping[str, Any]) -> tuple[int, int, type]:
        """``(H, D, dtype)`` of the KV cache, from ``past_key_values.0.key`` [B, H, P, D]."""
        meta = inputs[f"{PAST_PREFIX}0.key"]
        if len(meta.shape) != 4 or not all(isinstance(d, int) for d in meta.shape[1::2]):
            raise ModelLoadError(f"{self.spec.model_path}: past_key_values.0.key must be "
                                 f"[B, H, P, D] with static H and D, not {meta.shape}")
        dtype = np.float16 if meta.type == "tensor(float16)" else np.float32
        return meta.shape[1], meta.shape[3], dtype

    def run(self, feeds: Mapping[str, np.ndarray],
            handle: PassHandle | None = None) -> dict[str, np.ndarray]:
        """One ORT pass; returns every output by name. Raises ``Preempted`` when ``handle``
        was stopped."""
        try:
            values = self.session.run(None, dict(feeds), handle.options if handle else None)
        except Exception as exc:  # ORT raises its own non-standard exception types
            if handle is not None and handle.stopped:
                raise Preempted() from exc
            raise InferenceError(f"{self.spec.name}@{self.spec.version}: ORT run failed: "
                                 f"{exc}") from exc
        return dict(zip(self.output_names, values))

    def run_decoder(self, inputs: Mapping[str, np.ndarray],
                    pasts: Sequence[Any]) -> tuple[np.ndarray, list[Any]]:
        """One decoder pass: ``inputs`` (``input_ids``, ``attention_mask``, ``position_ids``)
        and one past per ``past_names``. Returns the logits (numpy) and one present per
        ``present_names``: numpy arrays, or with ``kv_device`` OrtValues left on it (feed them
        back as the next pass's pasts; ``to_host`` brings them back for a re-pack). A bound
        pass that fails is run again without binding; when that succeeds the model stays
        unbound, re-packed on the host too (a warning says why), so a device that cannot bind
        still serves."""
        if self.kv_device is None:
            return self._host_pass(inputs, pasts)
        try:
            return self._bound_pass(inputs, pasts)
        except Exception as exc:  # ORT raises its own non-standard exception types
            bound_error = exc
        result = self._host_pass(inputs, pasts)  # an InferenceError here is the model's own
        log.warning("kv_binding_off", extra={"model": self.spec.name, "version": self.spec.version,
                                             "device": self.kv_device, "error": str(bound_error)})
        self.kv_device, self._packer = None, None
        return result

    def pack_kv(self, parts: Sequence[tuple[Sequence[Any], np.ndarray, Sequence[int]]]
                ) -> tuple[list[Any], np.ndarray]:
        """``batching.pack_rows`` for pasts from ``run_decoder``: with ``kv_device`` the cache
        is re-packed there (``KVPacker``), else on the host. A device re-pack that fails is done
        on the host instead, and this model re-packs on the host from then on (a warning says
        why)."""
        if self._packer is not None:
            try:
                return self._packer.pack(parts)
            except Exception as exc:  # ORT raises its own non-standard exception types
                log.warning("kv_pack_on_host", extra={"model": self.spec.name,
                                                      "version": self.spec.version,
                                                      "device": self.kv_device, "error": str(exc)})
                self._packer = None
        return pack_rows([(to_host(pasts), mask, rows) for pasts, mask, rows in parts])

    def _host_pass(self, inputs: Mapping[str, np.ndarray],
                   pasts: Sequence[Any]) -> tuple[np.ndarray, list[Any]]:
        out = self.run({**inputs, **dict(zip(self.past_names, to_host(pasts)))})
        return out["logits"], [out[name] for name in self.present_names]

    def _bound_pass(self, inputs: Mapping[str, np.ndarray],
                    pasts: Sequence[Any]) -> tuple[np.ndarray, list[Any]]:
        binding = self.session.io_binding()
        for name, value in inputs.items():
            binding.bind_cpu_input(name, value)
        for name, value in zip(self.past_names, pasts):
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, value)
            else:
                binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        for name in self.present_names:
            binding.bind_output(name, self.kv_device)
        self.session.run_with_iobinding(binding)
        logits, *presents = binding.get_outputs()
        return logits.numpy(), presents


def to_host(values: Sequence[Any]) -> list[np.ndarray]:
    """Numpy arrays of a KV cache that may be OrtValues on a device (``Runner.run_decoder``)."""
    return [v if isinstance(v, np.ndarray) else v.numpy() for v in values]


class RunnerCache:
    """Lazily loaded runners keyed by ``(name, version)``; thread-safe.

    Concurrent ``get`` calls for one version load it once (the others wait for it); different
    versions load in parallel. ``retire`` drops a version: sequences already holding its
    runner finish on it, and the session is freed with the last reference.
    """

    def __init__(self, providers: Sequence[str] = ("CPUExecutionProvider",),
                 intra_op_threads: int = 0, bind_kv: bool | None = None) -> None:
        self.providers = list(providers)
        self._intra_op_threads = intra_op_threads
        self._bind_kv = bind_kv
        self._lock = threading.Lock()
        self._runners: dict[tuple[str, int], Runner] = {}
        self._loading: dict[tuple[str, int], threading.Lock] = {}

    def get(self, spec: ModelSpec) -> Runner:
        key = (spec.name, spec.version)
        with self._lock:
            if key in self._runners:
                return self._runners[key]
            key_lock = self._loading.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                if key in self._runners:
                    return self._runners[key]
            try:
                runner = Runner(spec, self.providers, self._intra_op_threads, self._bind_kv)
                log.info("model_loaded", extra={"model": spec.name, "version": spec.version,
                                                "providers": runner.providers,
                                                "kv_device": runner.kv_device})
                with self._lock:
                    self._runners[key] = runner
            finally:
                with self._lock:
                    self._loading.pop(key, None)
        return runner

    def retire(self, name: str, version: int) -> bool:
        """Forget a loaded version; returns whether it was loaded."""
        with self._lock:
            return self._runners.pop((name, version), None) is not None

    def loaded(self) -> list[tuple[str, int]]:
        with self._lock:
            return sorted(self._runners)
