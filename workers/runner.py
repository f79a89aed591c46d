"""ONNX Runtime sessions: one ``Runner`` per loaded model version, cached in a ``RunnerCache``."""

from __future__ import annotations

import ctypes
import gc
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
from banter.settings import KV_LAYOUTS
from registry.artifacts import COMPANIONS, companion_digest, sha256_file
from workers import inplace
from workers.batching import decode_feeds, pack_rows, prompt_feeds
from workers.detokenizer import TokenText
from workers.kvpacker import KVPacker
from workers.lastlogits import LastLogits

log = logging.getLogger("banter.worker")

KINDS = ("generate", "embed")
DEFAULT_MAX_POSITIONS = 1024
PAST_PREFIX = "past_key_values."
PRESENT_PREFIX = "present."


@dataclass(frozen=True)
class ModelSpec:
    """One registered model version: what to load, the sha256 its ``model.onnx`` must have and
    ``files``, the registry record's companion digests as ``(name, sha256)`` pairs (empty: the
    companions are not verified, as for a record written before they were recorded)."""

    name: str
    version: int
    kind: str
    model_path: Path
    tokenizer_path: Path
    sha256: str
    backend: str = "onnx"
    files: tuple[tuple[str, str], ...] = ()


def select_providers(use_gpu: bool, tf32: bool = False) -> list[Any]:
    """CUDA first when asked for and available in this onnxruntime build, else CPU only.
    ``tf32`` (``BANTER_CUDA_TF32``): let the CUDA provider run float32 matrix products on
    TF32 tensor cores (ONNX Runtime's ``use_tf32``: inputs rounded to a 10-bit mantissa), which
    is faster but makes a row's logits depend more on the kernel its batch's shape picks; off,
    they are float32 products as on the CPU."""
    if use_gpu and "CUDAExecutionProvider" in ort.get_available_providers():
        return [("CUDAExecutionProvider", {"use_tf32": "1" if tf32 else "0"}),
                "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _verify(spec: ModelSpec) -> None:
    """ChecksumMismatch unless ``model.onnx`` and its companions are as they were promoted:
    each recorded companion and external-data file there with its digest, and none of the
    ``COMPANIONS`` there that was not."""
    try:
        actual = sha256_file(spec.model_path)
    except OSError as exc:
        raise ModelLoadError(f"cannot read model file {spec.model_path}: {exc}") from exc
    if actual != spec.sha256.lower():
        raise ChecksumMismatch(
            f"sha256 of {spec.model_path} is {actual}, the registry expects {spec.sha256}; "
            "the artifact changed since it was promoted: promote it again or restore the file")
    if not spec.files:
        return
    expected = dict(spec.files)
    for name in dict.fromkeys((*COMPANIONS, *expected)):
        path = spec.model_path.parent / name
        try:
            found = companion_digest(path)
        except OSError as exc:
            raise ModelLoadError(f"cannot read {path}: {exc}") from exc
        if found != expected.get(name):
            what = ("is not a regular file" if found == "" else
                    "was not there when the model was promoted" if name not in expected else
                    "is gone" if found is None else
                    f"has sha256 {found}, the registry expects {expected[name]}")
            raise ChecksumMismatch(f"{path} {what}; the artifact changed since it was "
                                   "promoted: promote it again or restore the file")


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

    ``kv_layout``: ``"inplace"`` where the session is the model's in-place twin
    (``workers.inplace``: the cache is the runner's ``kv_slots``, each pass writes its new
    positions into the rows it is given), else ``"concat"`` (Optimum layout: each pass returns
    the cache grown by its positions). The twin is taken when the ``kv_layout`` argument allows
    it: ``"auto"`` for a ``gpt_graph`` decoder on the CPU provider, ``"inplace"`` likewise but
    with a warning where it cannot be; either way only once its logits match the model's own
    for a ragged prompt batch and a decode step (checked at load, so an ONNX Runtime whose
    ``GroupQueryAttention`` behaves otherwise keeps the model's own graph, with a warning).

    ``kv_device``: where a concat-layout KV cache stays between passes (``run_decoder``). On the
    CUDA provider it is ``"cuda"``: the ``present.*`` outputs are bound on the GPU (ONNX
    Runtime I/O binding) and fed back as the next pass's pasts without a trip to the host;
    ``pack_kv`` re-packs them there too (rows joining and leaving the batch). On
    the CPU provider it is None (numpy arrays; binding saves nothing there, docs/benchmarks.md
    ``kvcache``) unless ``bind_kv`` asks for it (the tests run the bound path on the CPU).
    """

    def __init__(self, spec: ModelSpec, providers: Sequence[str] = ("CPUExecutionProvider",),
                 intra_op_threads: int = 0, bind_kv: bool | None = None,
                 kv_layout: str = "concat") -> None:
        if spec.kind not in KINDS:
            raise ModelLoadError(f"model {spec.name}@{spec.version}: kind must be one of {KINDS}")
        if spec.backend != "onnx":
            raise ModelLoadError(f"model {spec.name}@{spec.version}: backend {spec.backend!r} "
                                 "is not served by the ONNX runner")
        _verify(spec)
        self.spec = spec
        self.tokenizer = _load_tokenizer(spec.tokenizer_path)
        self.token_text = TokenText(self.tokenizer)
        self.config = _load_config(spec.model_path)
        self.session = self._create_session(list(providers), intra_op_threads, spec.model_path)
        self.intra_op_threads = intra_op_threads  # 0: ONNX Runtime's default (one per core)
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
        self.vocab_size = self._vocab_size()
        self.n_layer = sum(1 for n in inputs if n.startswith(PAST_PREFIX) and n.endswith(".key"))
        self.past_names = [f"{PAST_PREFIX}{i}.{part}"
                           for i in range(self.n_layer) for part in ("key", "value")]
        self.present_names = [f"{PRESENT_PREFIX}{i}.{part}"
                              for i in range(self.n_layer) for part in ("key", "value")]
        self._check_graph(inputs)
        self.n_head, self.head_dim, self.kv_dtype = 0, 0, np.float32
        self.kv_device: str | None = None
        self.kv_layout = "concat"
        if spec.kind == "generate":
            self.n_head, self.head_dim, self.kv_dtype = self._kv_geometry(inputs)
        self._trial_pass()
        if spec.kind == "generate":
            if kv_layout != "concat":
                self._take_inplace(kv_layout, intra_op_threads)
            on_gpu = self.providers[0] == "CUDAExecutionProvider"
            if self.kv_layout == "concat" and (bind_kv or (bind_kv is None and on_gpu)):
                self.kv_device = "cuda" if on_gpu else "cpu"
        self._packer: KVPacker | None = None
        self._last: LastLogits | None = None
        if self.kv_device is not None:
            self._packer = KVPacker(len(self.past_names), self.kv_dtype, self.providers,
                                    self.kv_device)
            self._last = LastLogits(self._logits_dtype(), self.providers)

    def _vocab_size(self) -> int:
        """The logits' last dimension: the graph's when it is fixed, else the config's
        ``vocab_size``, else the tokenizer's (added tokens included)."""
        for output in self.session.get_outputs():
            if output.name == "logits" and output.shape and isinstance(output.shape[-1], int):
                return output.shape[-1]
        return (_optional_int(self.config, "vocab_size")
                or self.tokenizer.get_vocab_size(with_added_tokens=True))

    def _create_session(self, providers: list[str], intra_op_threads: int,
                        model: Path | bytes) -> ort.InferenceSession:
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
            source = model if isinstance(model, bytes) else str(model)
            return ort.InferenceSession(source, sess_options=options, providers=providers)
        except Exception as exc:  # ORT raises its own non-standard exception types
            raise ModelLoadError(f"cannot load {self.spec.model_path} "
                                 f"({self.spec.name}@{self.spec.version}): {exc}") from exc

    def _take_inplace(self, requested: str, intra_op_threads: int) -> None:
        """Swap the session for the model's in-place twin where ``requested`` and the model
        allow it (see the class docstring); otherwise keep the model's own graph."""
        quiet = requested == "auto"  # auto: a model or provider the twin is not for is no news
        try:
            if self.providers[0] != "CPUExecutionProvider":
                raise inplace.NotInplaceable("the in-place layout runs on the CPU provider only "
                                             "(GroupQueryAttention on CUDA takes float16 only)")
            blob, _ = inplace.inplace_model(self.spec.model_path)
            twin = self._create_session(self.providers, intra_op_threads, blob)
            self._check_twin(twin)
        except inplace.NotInplaceable as exc:
            if not quiet:
                self._keep_concat(str(exc))
            return
        except Exception as exc:  # ORT and onnx raise their own exception types
            self._keep_concat(f"its in-place twin does not serve: {exc}")
            return
        self.session, self.kv_layout = twin, "inplace"
        self.input_names = frozenset(i.name for i in twin.get_inputs())
        self.output_names = [o.name for o in twin.get_outputs()]
        self.past_names = inplace.past_names(self.n_layer)
        self.present_names = inplace.present_names(self.n_layer)

    def _trial_pass(self) -> None:
        """ModelLoadError unless the model runs one pass of one token: a graph whose shapes do
        not add up (heads that do not divide its width, a table smaller than its ids) fails
        here, once, with a message that says so, instead of in every job's pass."""
        try:
            ids = np.zeros((1, 1), dtype=np.int64)
            if self.spec.kind == "generate":
                self._host_pass(prompt_feeds([ids[0]]), self.empty_pasts(1))
            else:
                feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
                if "token_type_ids" in self.input_names:
                    feeds["token_type_ids"] = np.zeros_like(ids)
                self.run(feeds)
        except InferenceError as exc:
            raise ModelLoadError(f"model {self.spec.name}@{self.spec.version} fails a trial "
                                 f"pass of one token, so it cannot serve: {exc.message}") from exc

    def _keep_concat(self, reason: str) -> None:
        log.warning("kv_layout_concat", extra={"model": self.spec.name, "version": self.spec.version,
                                               "reason": reason})

    def _check_twin(self, twin: ort.InferenceSession) -> None:
        """Raise unless ``twin`` gives the logits the model's own graph gives for two prompts
        of different lengths and one decode step after them."""
        prompts = [np.array([1, 2, 3], dtype=np.int64), np.array([4], dtype=np.int64)]
        feeds = prompt_feeds(prompts)
        first, pasts = self._host_pass(feeds, self.empty_pasts(2))
        tokens, cached = np.array([5, 6], dtype=np.int64), np.array([3, 1])
        second, _ = self._host_pass(decode_feeds(tokens, cached, feeds["attention_mask"]), pasts)
        shape = (2, self.n_head, 4, self.head_dim)
        buffers = [np.zeros(shape, dtype=self.kv_dtype) for _ in self.past_names]
        n = self.n_layer
        twin_first = inplace.run_in_place(twin, inplace.prompt_inputs(prompts), buffers, n)
        twin_second = inplace.run_in_place(twin, inplace.decode_inputs(tokens, cached), buffers, n)
        for expected, got in ((first[:, -1], twin_first[:, -1]), (second[:, -1], twin_second[:, -1])):
            if not np.allclose(expected, got, rtol=1e-3, atol=1e-3):
                raise ValueError("its logits differ from the model's own by up to "
                                 f"{float(np.abs(expected - got).max()):.3g}")

    def empty_pasts(self, rows: int) -> list[np.ndarray]:
        """The pasts of a prompt pass of the model's own graph: ``rows`` rows, nothing cached."""
        empty = np.zeros((rows, self.n_head, 0, self.head_dim), dtype=self.kv_dtype)
        return [empty] * len(self.past_names)

    def kv_slots(self, rows: int) -> list[np.ndarray]:
        """A new cache for an in-place model: one ``[rows, H, max_positions, D]`` array per
        past input, zeros (the memory is committed as positions are written). The engine binds
        leading rows of them to ``run_decoder``. InferenceError when the memory cannot be
        reserved."""
        shape = (rows, self.n_head, self.max_positions, self.head_dim)
        try:
            return [np.zeros(shape, dtype=self.kv_dtype) for _ in self.past_names]
        except (MemoryError, ValueError) as exc:  # ValueError: larger than numpy can address
            raise InferenceError(f"{self.spec.name}@{self.spec.version}: cannot reserve its "
                                 f"in-place KV cache ({rows} rows x {self.max_positions} "
                                 f"positions): {exc}; lower BANTER_MAX_RUNNING or set "
                                 "BANTER_KV_LAYOUT=concat") from exc

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
        and one past per ``past_names``. Returns the logits of each row's last position, the
        one sampled (numpy ``[B, 1, vocab]``; with ``kv_device`` a pass of several columns
        cuts them there, ``LastLogits``), and one present per
        ``present_names``: numpy arrays, or with ``kv_device`` OrtValues left on it (feed them
        back as the next pass's pasts; ``to_host`` brings them back for a re-pack). A bound
        pass that fails is run again without binding; when that succeeds the model stays
        unbound, re-packed on the host too (a warning says why), so a device that cannot bind
        still serves.

        In-place (``kv_layout``): ``inputs`` are the twin's (``inplace.prompt_inputs`` /
        ``decode_inputs``) and ``pasts`` C-contiguous arrays (leading rows of ``kv_slots``),
        bound as both past and present: the pass writes its positions into them and returns
        them as the presents. Its logits are ``[B, 1, vocab]``: each row's sampled position
        only (``logits_index``)."""
        if self.kv_layout == "inplace":
            try:
                return inplace.run_in_place(self.session, inputs, pasts, self.n_layer), list(pasts)
            except Exception as exc:  # ORT raises its own non-standard exception types
                raise InferenceError(f"{self.spec.name}@{self.spec.version}: ORT run failed: "
                                     f"{exc}") from exc
        if self.kv_device is None:
            return self._host_pass(inputs, pasts)
        try:
            return self._bound_pass(inputs, pasts)
        except Exception as exc:  # ORT raises its own non-standard exception types
            bound_error = exc
        result = self._host_pass(inputs, pasts)  # an InferenceError here is the model's own
        log.warning("kv_binding_off", extra={"model": self.spec.name, "version": self.spec.version,
                                             "device": self.kv_device, "error": str(bound_error)})
        self.kv_device, self._packer, self._last = None, None, None
        return result

    def pack_kv(self, parts: Sequence[tuple[Sequence[Any], np.ndarray, Sequence[int]]],
                blank: int = 0) -> tuple[list[Any], np.ndarray]:
        """``batching.pack_rows`` for pasts from ``run_decoder``: with ``kv_device`` the cache
        is re-packed there (``KVPacker``), else on the host. A device re-pack that fails is done
        on the host instead, and this model re-packs on the host from then on (a warning says
        why)."""
        if self._packer is not None:
            try:
                return self._packer.pack(parts, blank)
            except Exception as exc:  # ORT raises its own non-standard exception types
                log.warning("kv_pack_on_host", extra={"model": self.spec.name,
                                                      "version": self.spec.version,
                                                      "device": self.kv_device, "error": str(exc)})
                self._packer = None
        return pack_rows([(to_host(pasts), mask, rows) for pasts, mask, rows in parts], blank)

    def _host_pass(self, inputs: Mapping[str, np.ndarray],
                   pasts: Sequence[Any]) -> tuple[np.ndarray, list[Any]]:
        out = self.run({**inputs, **dict(zip(self.past_names, to_host(pasts)))})
        return out["logits"][:, -1:], [out[name] for name in self.present_names]

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
        columns = inputs["input_ids"].shape[1]
        binding.bind_output("logits", self.kv_device if columns > 1 and self._last else "cpu")
        for name in self.present_names:
            binding.bind_output(name, self.kv_device)
        self.session.run_with_iobinding(binding)
        logits, *presents = binding.get_outputs()
        return self._last_position(logits, columns), presents

    def _last_position(self, logits: Any, columns: int) -> np.ndarray:
        """A bound pass's logits of each row's last position, as numpy: cut on the device when
        they stayed there. A cut that fails is made on the host instead, and every later pass
        brings its logits to the host whole (a warning says why)."""
        if columns > 1 and self._last is not None:
            try:
                return self._last.take(logits)
            except Exception as exc:  # ORT raises its own non-standard exception types
                log.warning("last_logits_on_host", extra={"model": self.spec.name,
                                                          "version": self.spec.version,
                                                          "device": self.kv_device, "error": str(exc)})
                self._last = None
        return logits.numpy()[:, -1:]

    def _logits_dtype(self) -> type:
        logits = next(o for o in self.session.get_outputs() if o.name == "logits")
        return np.float16 if logits.type == "tensor(float16)" else np.float32


def _return_freed_memory() -> None:
    """Hand freed heap back to the OS: glibc keeps it otherwise (``malloc_trim``); a no-op
    where there is no glibc."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def to_host(values: Sequence[Any]) -> list[np.ndarray]:
    """Numpy arrays of a KV cache that may be OrtValues on a device (``Runner.run_decoder``)."""
    return [v if isinstance(v, np.ndarray) else v.numpy() for v in values]


class RunnerCache:
    """Lazily loaded runners keyed by ``(name, version, sha256)``; thread-safe. A version whose
    record names another artifact than the one loaded (a history restored from elsewhere) is
    loaded anew, and the runner of the other artifact dropped.

    Concurrent ``get`` calls for one version load it once (the others wait for it); different
    versions load in parallel. ``retire`` drops a version: sequences already holding its
    runner finish on it, and the session is freed with the last reference.
    """

    def __init__(self, providers: Sequence[str] = ("CPUExecutionProvider",),
                 intra_op_threads: int = 0, bind_kv: bool | None = None,
                 kv_layout: str = "concat") -> None:
        if kv_layout not in KV_LAYOUTS:
            raise ValueError(f"kv_layout must be one of {', '.join(KV_LAYOUTS)}, got {kv_layout!r}")
        self.providers = list(providers)
        self._intra_op_threads = intra_op_threads
        self._bind_kv = bind_kv
        self._kv_layout = kv_layout
        self._lock = threading.Lock()
        self._runners: dict[tuple[str, int, str], Runner] = {}
        self._loading: dict[tuple[str, int, str], threading.Lock] = {}

    def get(self, spec: ModelSpec) -> Runner:
        key = (spec.name, spec.version, spec.sha256)
        with self._lock:
            if key in self._runners:
                return self._runners[key]
            key_lock = self._loading.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                if key in self._runners:
                    return self._runners[key]
            try:
                runner = Runner(spec, self.providers, self._intra_op_threads, self._bind_kv,
                                self._kv_layout)
                if runner.kv_layout == "inplace":
                    _return_freed_memory()  # building the twin's (GPT-2 small: about 1 GB)
                log.info("model_loaded", extra={"model": spec.name, "version": spec.version,
                                                "providers": runner.providers,
                                                "intra_op_threads": runner.intra_op_threads,
                                                "kv_device": runner.kv_device,
                                                "kv_layout": runner.kv_layout})
                with self._lock:
                    for other in [k for k in self._runners if k[:2] == key[:2]]:
                        del self._runners[other]
                    self._runners[key] = runner
            finally:
                with self._lock:
                    self._loading.pop(key, None)
        return runner

    def retire(self, name: str, version: int) -> bool:
        """Forget a loaded version; returns whether it was loaded."""
        with self._lock:
            keys = [k for k in self._runners if k[:2] == (name, version)]
            for key in keys:
                del self._runners[key]
            return bool(keys)

    def loaded(self) -> list[tuple[str, int]]:
        """The (name, version) pairs loaded."""
        with self._lock:
            return sorted({key[:2] for key in self._runners})
