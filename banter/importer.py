"""``banter models import``: a local Hugging Face model directory -> the ONNX layout workers serve.

Without torch or transformers: weights are read with safetensors' numpy API (the optional extra
``pip install 'banterhearts[import]'``), mapped onto the weight names of ``banter.demo``'s graph
builders and written as ``model.onnx`` + ``tokenizer.json`` + ``config.json``. Supported:

* ``model_type: "bert"`` -> an ``embed`` model: ``input_ids``, ``attention_mask``,
  ``token_type_ids`` -> ``last_hidden_state`` (workers mean-pool over the mask and L2-normalise,
  which is what sentence-transformers' mean pooling + Normalize do).
* ``model_type: "gpt2"`` -> a ``generate`` model in the Optimum layout with KV cache.

Every import is checked before anything is written: the ONNX graph, run with ONNX Runtime on a
sample input, must match a float64 numpy forward pass written straight from the Hugging Face
tensors (``reference_bert`` / ``reference_gpt2``). ``pytorch_model.bin`` is not supported (it is
a pickle that needs torch): convert it to ``model.safetensors`` once where torch is installed.

``write_random_gpt2`` writes a GPT-2-small-shaped decoder with random weights for generation
timing (about 340 MB: generate it on demand, never commit it).

The serving path never imports this module (nor safetensors).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer, processors

from banter.demo import OPSET, _write, bert_graph, gpt_graph, gpt_tokenizer
from banter.errors import BanterError, InvalidRequest
from registry import records

SUPPORTED = {"bert": "embed", "gpt2": "generate"}
PRODUCER = "banterhearts.import"
MAX_ONNX_BYTES = (2 << 30) - (64 << 20)  # protobuf's 2 GiB limit, with room for the graph
SAMPLE_TEXT = "A man is playing a guitar on the stage, and the crowd sings along."
VERIFY_TOLERANCE = 1e-3  # max |onnx - reference| on the sample, times max(1, max |reference|)
_GELU = {"gelu": "erf", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh"}
_PREFIXES = {"bert": ("bert.",), "gpt2": ("transformer.",)}
_IGNORED = {"bert": re.compile(r"^(embeddings\.position_ids|pooler\..*|cls\..*)$"),
            "gpt2": re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")}


class ImportFailed(BanterError):
    """The directory cannot be imported; the message says why and what to do."""

    type = "import_failed"


class BadImportArgument(ImportFailed):
    """An argument of the import cannot be used (a source that is not a directory, a bad
    name, a kind the model is not, an output directory that cannot take the files): the CLI
    exits 2 for it, as for any bad argument, and 1 for other ImportFailed errors."""

    type = "invalid_import_argument"


@dataclass(frozen=True)
class Imported:
    """What ``import_model`` / ``write_random_gpt2`` wrote."""

    path: Path           # the output directory (model.onnx, tokenizer.json, config.json)
    name: str
    kind: str            # "embed" or "generate"
    model_type: str
    max_abs_diff: float  # ONNX Runtime vs the numpy reference on the sample input
    seconds: float


# ----------------------------------------------------------------------------- reading
def read_config(src: Path) -> dict[str, Any]:
    path = Path(src) / "config.json"
    if not path.exists():
        raise ImportFailed(f"{src} has no config.json: give a Hugging Face model directory "
                           "(config.json, model.safetensors, tokenizer.json)")
    return read_object(path)


def read_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; ImportFailed when it cannot be read or is not one."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ImportFailed(f"cannot read {path}: {exc}") from None
    if not isinstance(value, dict):
        raise ImportFailed(f"{path} must hold a JSON object")
    return value


def shard_names(index: Path) -> list[str]:
    """The weight files ``model.safetensors.index.json`` names (its ``weight_map`` values)."""
    weight_map = read_object(index).get("weight_map")
    if (not isinstance(weight_map, dict) or not weight_map
            or not all(isinstance(v, str) and v for v in weight_map.values())):
        raise ImportFailed(f"{index} must map tensor names to file names in 'weight_map'")
    names = sorted(set(weight_map.values()))
    if any(Path(name).name != name for name in names):
        raise ImportFailed(f"{index} names a weight file outside its directory")
    return names


def load_tensors(src: Path, model_type: str = "") -> dict[str, np.ndarray]:
    """Every tensor of ``model.safetensors`` (or its shards) as a numpy array, float tensors as
    float32, with the task-head prefix (``bert.``, ``transformer.``) dropped."""
    src = Path(src)
    index = src / "model.safetensors.index.json"
    if (src / "model.safetensors").is_file():
        files = [src / "model.safetensors"]
    elif index.is_file():
        files = [src / f for f in shard_names(index)]
    elif any((src / f).exists() for f in ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        raise ImportFailed(f"{src} holds pytorch_model.bin, which is a torch pickle: banterhearts "
                           "imports model.safetensors only (no torch). Convert it once where torch "
                           "is installed: model = AutoModel.from_pretrained(DIR); "
                           "model.save_pretrained(DIR, safe_serialization=True)")
    else:
        raise ImportFailed(f"{src} has no model.safetensors")
    try:
        from safetensors.numpy import load_file
    except ImportError:
        raise ImportFailed("reading model.safetensors needs the safetensors package: "
                           "pip install 'banterhearts[import]'") from None
    tensors: dict[str, np.ndarray] = {}
    for path in files:
        try:
            loaded = load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types (bf16: TypeError)
            raise ImportFailed(f"cannot read {path} with safetensors' numpy API ({exc}); "
                               "bfloat16 checkpoints need converting to float16/32 first") from None
        tensors.update(loaded)
    out = {}
    for name, array in tensors.items():
        for prefix in _PREFIXES.get(model_type, ()):
            if name.startswith(prefix):
                name = name[len(prefix):]
        if np.issubdtype(array.dtype, np.floating):
            array = array.astype(np.float32, copy=False)
        out[name] = array
    return out


class _Take:
    """Hands out tensors by name and remembers which ones were used."""

    def __init__(self, tensors: dict[str, np.ndarray], model_type: str) -> None:
        self.tensors, self.model_type, self.used = tensors, model_type, set()

    def __call__(self, *names: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        for name in names:
            if name in self.tensors:
                self.used.add(name)
                array = self.tensors[name]
                if shape is not None and array.shape != shape:
                    raise ImportFailed(f"{name} has shape {list(array.shape)}, the config says "
                                       f"{list(shape)}")
                return array
        raise ImportFailed(f"the checkpoint has no tensor {names[0]} (is it a "
                           f"{self.model_type} model? keys start with "
                           f"{', '.join(sorted(self.tensors)[:5])}, ...)")

    def check_all_used(self) -> None:
        ignored = _IGNORED[self.model_type]
        left = sorted(n for n in self.tensors if n not in self.used and not ignored.match(n))
        if left:
            raise ImportFailed(f"the checkpoint has tensors this importer does not know, so it "
                               f"would serve a different model: {', '.join(left[:8])}"
                               f"{' ...' if len(left) > 8 else ''}")


def _f32(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


def _gelu_kind(config: dict, key: str, default: str) -> str:
    act = config.get(key, default)
    if act not in _GELU:
        raise ImportFailed(f"{key} {act!r} is not supported (supported: {', '.join(_GELU)})")
    return _GELU[act]


def _heads(config: dict, embd: int, key: str) -> int:
    heads = int(config[key])
    if heads < 1 or embd % heads:
        raise ImportFailed(f"{key} {heads} does not divide the width {embd}")
    return heads


# ----------------------------------------------------------------------------- BERT
def bert_weights(config: dict, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Hugging Face BERT tensors (Linear weights [out, in]) -> ``banter.demo`` weight names."""
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise ImportFailed(f"position_embedding_type {config['position_embedding_type']!r} is "
                           "not supported (absolute only)")
    take = _Take(tensors, "bert")
    hid = int(config["hidden_size"])
    w = {"wte": take("embeddings.word_embeddings.weight"),
         "wpe": take("embeddings.position_embeddings.weight"),
         "tte": take("embeddings.token_type_embeddings.weight"),
         "ln_e.g": take("embeddings.LayerNorm.weight", "embeddings.LayerNorm.gamma", shape=(hid,)),
         "ln_e.b": take("embeddings.LayerNorm.bias", "embeddings.LayerNorm.beta", shape=(hid,))}
    parts = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
             "o": "attention.output.dense", "fc": "intermediate.dense", "proj": "output.dense"}
    norms = {"ln_1": "attention.output.LayerNorm", "ln_2": "output.LayerNorm"}
    for i in range(int(config["num_hidden_layers"])):
        p = f"encoder.layer.{i}."
        for ours, theirs in parts.items():
            w[f"h.{i}.{ours}.w"] = take(p + theirs + ".weight").T
            w[f"h.{i}.{ours}.b"] = take(p + theirs + ".bias")
        for ours, theirs in norms.items():
            w[f"h.{i}.{ours}.g"] = take(p + theirs + ".weight", p + theirs + ".gamma", shape=(hid,))
            w[f"h.{i}.{ours}.b"] = take(p + theirs + ".bias", p + theirs + ".beta", shape=(hid,))
    take.check_all_used()
    if w["wte"].shape[1] != hid or w["h.0.q.w"].shape != (hid, hid):
        raise ImportFailed(f"the tensors are not {hid} wide, as config.json's hidden_size says")
    return {k: _f32(v) for k, v in w.items()}


def bert_onnx(config: dict, tensors: dict[str, np.ndarray], name: str) -> bytes:
    w = bert_weights(config, tensors)
    return bert_graph(w, n_layer=int(config["num_hidden_layers"]),
                      n_head=_heads(config, w["wte"].shape[1], "num_attention_heads"),
                      name=name, eps=float(config.get("layer_norm_eps", 1e-12)),
                      gelu=_gelu_kind(config, "hidden_act", "gelu"), producer=PRODUCER)


# ----------------------------------------------------------------------------- GPT-2
def gpt2_weights(config: dict, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Hugging Face GPT-2 tensors (Conv1D weights [in, out], fused c_attn) -> ``banter.demo``
    weight names. ``lm_head`` only when it is not tied to ``wte``."""
    for flag in ("scale_attn_by_inverse_layer_idx",):
        if config.get(flag):
            raise ImportFailed(f"{flag} is not supported")
    if config.get("scale_attn_weights", True) is False:
        raise ImportFailed("scale_attn_weights=false is not supported")
    take = _Take(tensors, "gpt2")
    embd = int(config["n_embd"])
    w = {"wte": take("wte.weight"), "wpe": take("wpe.weight"),
         "ln_f.g": take("ln_f.weight", shape=(embd,)), "ln_f.b": take("ln_f.bias", shape=(embd,))}
    for i in range(int(config["n_layer"])):
        p = f"h.{i}."
        qkv_w = take(p + "attn.c_attn.weight", shape=(embd, 3 * embd))
        qkv_b = take(p + "attn.c_attn.bias", shape=(3 * embd,))
        for j, n in enumerate("qkv"):
            w[f"h.{i}.{n}.w"] = qkv_w[:, j * embd:(j + 1) * embd]
            w[f"h.{i}.{n}.b"] = qkv_b[j * embd:(j + 1) * embd]
        for ours, theirs in {"o": "attn.c_proj", "fc": "mlp.c_fc", "proj": "mlp.c_proj"}.items():
            w[f"h.{i}.{ours}.w"] = take(p + theirs + ".weight")
            w[f"h.{i}.{ours}.b"] = take(p + theirs + ".bias")
        for n in ("ln_1", "ln_2"):
            w[f"h.{i}.{n}.g"] = take(f"{p}{n}.weight", shape=(embd,))
            w[f"h.{i}.{n}.b"] = take(f"{p}{n}.bias", shape=(embd,))
    if "lm_head.weight" in tensors:
        head = take("lm_head.weight")
        if not np.array_equal(head, w["wte"]):
            w["lm_head"] = head.T
    take.check_all_used()
    if w["wte"].shape[1] != embd:
        raise ImportFailed(f"wte is {w['wte'].shape[1]} wide, config.json's n_embd says {embd}")
    return {k: _f32(v) for k, v in w.items()}


def gpt2_onnx(config: dict, tensors: dict[str, np.ndarray], name: str) -> bytes:
    w = gpt2_weights(config, tensors)
    return gpt_graph(w, n_layer=int(config["n_layer"]),
                     n_head=_heads(config, w["wte"].shape[1], "n_head"), name=name,
                     eps=float(config.get("layer_norm_epsilon", 1e-5)),
                     gelu=_gelu_kind(config, "activation_function", "gelu_new"), producer=PRODUCER)


def random_gpt2_tensors(config: dict, seed: int = 0, std: float = 0.02, bias_std: float = 0.0,
                        ln_std: float = 0.0) -> dict[str, np.ndarray]:
    """Random Hugging Face GPT-2 tensors for ``config`` (GPT-2's init by default: normal(0,
    std), residual projections scaled by 1/sqrt(2 n_layer), zero biases, unit LayerNorms)."""
    rng = np.random.default_rng(seed)
    embd, n_layer, vocab = int(config["n_embd"]), int(config["n_layer"]), int(config["vocab_size"])
    inner = int(config.get("n_inner") or 4 * embd)

    def normal(shape, scale):
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)).astype(np.float32)

    def norm(p: str) -> dict:
        return {p + ".weight": 1 + normal(embd, ln_std), p + ".bias": normal(embd, ln_std)}

    t = {"wte.weight": normal((vocab, embd), std), "wpe.weight": normal((config["n_positions"], embd), std),
         **norm("ln_f")}
    resid = std / math.sqrt(2 * n_layer)
    for i in range(n_layer):
        p = f"h.{i}."
        for n, shape, scale in (("attn.c_attn", (embd, 3 * embd), std), ("attn.c_proj", (embd, embd), resid),
                                ("mlp.c_fc", (embd, inner), std), ("mlp.c_proj", (inner, embd), resid)):
            t[p + n + ".weight"] = normal(shape, scale)
            t[p + n + ".bias"] = normal(shape[1], bias_std)
        t |= norm(p + "ln_1") | norm(p + "ln_2")
    return t


# ----------------------------------------------------------------------------- references
def _layer_norm(x: np.ndarray, g: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * g + b


_erf = np.vectorize(math.erf, otypes=[np.float64])


def _gelu(x: np.ndarray, kind: str) -> np.ndarray:
    if kind == "tanh":
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    return 0.5 * x * (1 + _erf(x / math.sqrt(2)))


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, heads: int, allowed: np.ndarray) -> np.ndarray:
    """[B,S,E] q/k/v, ``allowed`` [B,1,S,T] -> [B,S,E]."""
    b, s, e = q.shape

    def split(x):
        return x.reshape(b, x.shape[1], heads, e // heads).transpose(0, 2, 1, 3)

    scores = split(q) @ split(k).transpose(0, 1, 3, 2) / math.sqrt(e // heads)
    scores = np.where(allowed, scores, np.finfo(np.float64).min)
    return (_softmax(scores) @ split(v)).transpose(0, 2, 1, 3).reshape(b, s, e)


class _F64:
    """float64 views of the tensors, made on first use; ``T(name)`` is a matrix transposed into
    C order (a contiguous right operand keeps numpy's matmul on its fast BLAS path)."""

    def __init__(self, tensors: dict[str, np.ndarray]) -> None:
        self.tensors = tensors

    def __getitem__(self, name: str) -> np.ndarray:
        return self.tensors[name].astype(np.float64)

    def T(self, name: str) -> np.ndarray:
        return np.ascontiguousarray(self.tensors[name].T, dtype=np.float64)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors


def _matmul(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """[..., K] @ [K, N] as one 2-D matmul."""
    return (x.reshape(-1, x.shape[-1]) @ w).reshape(*x.shape[:-1], w.shape[1])


def reference_bert(config: dict, tensors: dict[str, np.ndarray], input_ids: np.ndarray,
                   attention_mask: np.ndarray, token_type_ids: np.ndarray | None = None) -> np.ndarray:
    """``last_hidden_state`` of a Hugging Face BERT, in float64 numpy, from its own tensors."""
    t = _F64(tensors)
    eps, heads = float(config.get("layer_norm_eps", 1e-12)), int(config["num_attention_heads"])
    act = _GELU[config.get("hidden_act", "gelu")]
    types = np.zeros_like(input_ids) if token_type_ids is None else token_type_ids
    x = (tensors["embeddings.word_embeddings.weight"][input_ids].astype(np.float64)
         + t["embeddings.position_embeddings.weight"][np.arange(input_ids.shape[1])]
         + t["embeddings.token_type_embeddings.weight"][types])
    x = _layer_norm(x, t["embeddings.LayerNorm.weight"], t["embeddings.LayerNorm.bias"], eps)
    allowed = attention_mask.astype(bool)[:, None, None, :]

    def dense(x, p):  # torch.nn.Linear: weight [out, in]
        return _matmul(x, t.T(p + ".weight")) + t[p + ".bias"]

    for i in range(int(config["num_hidden_layers"])):
        p = f"encoder.layer.{i}."
        ctx = _attend(dense(x, p + "attention.self.query"), dense(x, p + "attention.self.key"),
                      dense(x, p + "attention.self.value"), heads, allowed)
        x = _layer_norm(x + dense(ctx, p + "attention.output.dense"),
                        t[p + "attention.output.LayerNorm.weight"], t[p + "attention.output.LayerNorm.bias"], eps)
        h = dense(_gelu(dense(x, p + "intermediate.dense"), act), p + "output.dense")
        x = _layer_norm(x + h, t[p + "output.LayerNorm.weight"], t[p + "output.LayerNorm.bias"], eps)
    return x


def reference_gpt2(config: dict, tensors: dict[str, np.ndarray], input_ids: np.ndarray,
                   attention_mask: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
    """Logits [B,S,V] of a Hugging Face GPT-2 (full pass, no cache), in float64 numpy: token j
    sees token i <= j where ``attention_mask`` is 1; positions come from ``position_ids``."""
    t = _F64(tensors)
    eps, heads, embd = float(config.get("layer_norm_epsilon", 1e-5)), int(config["n_head"]), int(config["n_embd"])
    act = _GELU[config.get("activation_function", "gelu_new")]
    s = input_ids.shape[1]
    causal = np.tril(np.ones((s, s), bool))
    allowed = causal[None, None] & attention_mask.astype(bool)[:, None, None, :]
    x = (tensors["wte.weight"][input_ids].astype(np.float64)
         + tensors["wpe.weight"][position_ids].astype(np.float64))

    def conv1d(x, p):  # GPT-2's Conv1D: weight [in, out]
        return _matmul(x, t[p + ".weight"]) + t[p + ".bias"]

    for i in range(int(config["n_layer"])):
        p = f"h.{i}."
        qkv = conv1d(_layer_norm(x, t[p + "ln_1.weight"], t[p + "ln_1.bias"], eps), p + "attn.c_attn")
        q, k, v = np.split(qkv, [embd, 2 * embd], axis=-1)
        x = x + conv1d(_attend(q, k, v, heads, allowed), p + "attn.c_proj")
        h = _layer_norm(x, t[p + "ln_2.weight"], t[p + "ln_2.bias"], eps)
        x = x + conv1d(_gelu(conv1d(h, p + "mlp.c_fc"), act), p + "mlp.c_proj")
    x = _layer_norm(x, t["ln_f.weight"], t["ln_f.bias"], eps)
    return _matmul(x, t.T("lm_head.weight" if "lm_head.weight" in t else "wte.weight"))


# ----------------------------------------------------------------------------- checks
def _session(model: bytes):
    import onnxruntime as ort

    return ort.InferenceSession(model, providers=["CPUExecutionProvider"])


def _verify(kind: str, model: bytes, config: dict, tensors: dict, tok: Tokenizer) -> float:
    """Max |ONNX Runtime - numpy reference| on the sample text; ImportFailed when too large."""
    ids = np.array([tok.encode(SAMPLE_TEXT).ids[:64]], np.int64)
    if ids.size == 0:
        ids = np.zeros((1, 1), np.int64)
    mask = np.ones_like(ids)
    sess = _session(model)
    if kind == "embed":
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        got = sess.run(["last_hidden_state"], feeds)[0]
        want = reference_bert(config, tensors, ids, mask)
    else:
        pos = np.arange(ids.shape[1], dtype=np.int64)[None]
        heads, embd = int(config["n_head"]), int(config["n_embd"])
        empty = np.zeros((1, heads, 0, embd // heads), np.float32)
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
        feeds |= {f"past_key_values.{i}.{kv}": empty for i in range(int(config["n_layer"]))
                  for kv in ("key", "value")}
        got = sess.run(["logits"], feeds)[0]
        want = reference_gpt2(config, tensors, ids, mask, pos)
    diff = float(np.abs(got - want).max())
    limit = VERIFY_TOLERANCE * max(1.0, float(np.abs(want).max()))
    if not np.isfinite(got).all() or not diff <= limit:
        raise ImportFailed(f"the ONNX graph does not match the numpy reference on a sample input "
                           f"(max |diff| {diff:.3g} > {limit:.3g}); nothing was written")
    return diff


def _tokenizer(src: Path, kind: str, vocab_rows: int) -> Tokenizer:
    """The directory's ``tokenizer.json`` with padding and truncation switched off (workers
    switch them off too; a copy that padded to 128 would mislead anyone loading it directly)
    and, for encoders, checked to wrap every input in [CLS] ... [SEP]."""
    path = src / "tokenizer.json"
    if not path.is_file():
        raise ImportFailed(f"{src} has no tokenizer.json (the fast-tokenizer file); save one with "
                           "AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR) where "
                           "transformers is installed")
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
        spec["padding"] = spec["truncation"] = None
        tok = Tokenizer.from_str(json.dumps(spec))
    except Exception as exc:  # tokenizers raises bare Exception subclasses
        raise ImportFailed(f"cannot load {path}: {exc}") from None
    if kind == "embed":
        cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tokens = tok.encode("hello").tokens
        if tokens[:1] != ["[CLS]"] or tokens[-1:] != ["[SEP]"]:
            if tok.post_processor is not None or cls is None or sep is None:
                raise ImportFailed(f"{path} does not wrap inputs in [CLS] ... [SEP] (got {tokens})")
            tok.post_processor = processors.TemplateProcessing(
                single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    top = max(tok.get_vocab(with_added_tokens=True).values())
    if top >= vocab_rows:
        raise ImportFailed(f"{path} has token id {top}, but the embedding has only {vocab_rows} "
                           "rows: tokenizer and weights do not belong together")
    return tok


def _check_pooling(src: Path) -> None:
    """Workers mean-pool: refuse a sentence-transformers model that pools another way."""
    path = src / "1_Pooling" / "config.json"
    if path.is_file():
        pooling = read_object(path)
        others = [k for k, v in pooling.items() if k.startswith("pooling_mode") and v
                  and k != "pooling_mode_mean_tokens"]
        if others or not pooling.get("pooling_mode_mean_tokens", False):
            raise ImportFailed(f"{path} asks for {', '.join(others) or 'no mean pooling'}; "
                               "workers serve mean pooling only")


def _sha256(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def check_out(out: Path, overwrite: bool = False) -> None:
    """BadImportArgument unless ``out`` can take an import: nothing there yet, an empty
    directory, or (``overwrite``) a directory whose files may be replaced. Refusing by default keeps an
    import from rewriting the artifact a promoted version is served from (its workers would
    then fail its checksum)."""
    if out.exists() and not out.is_dir():
        raise BadImportArgument(f"{out} exists and is not a directory: give --out a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise BadImportArgument(f"{out} already holds files, perhaps an artifact a promoted "
                                "version is served from: import under another --name or --out, "
                                "or pass --overwrite to replace them")


def _write_out(out: Path, model: bytes, tok: Tokenizer, config: dict) -> None:
    if len(model) > MAX_ONNX_BYTES:
        raise ImportFailed(f"the model is {len(model) >> 20} MiB; ONNX files over 2 GiB need "
                           "external data, which banterhearts does not import")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BadImportArgument(f"cannot write {out}: {exc.strerror or exc}") from None
    _write(out / "model.onnx", model)
    _write(out / "tokenizer.json", tok.to_str(pretty=True).encode())
    _write(out / "config.json", (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
    for f in ("model.onnx", "tokenizer.json", "config.json"):
        os.chmod(out / f, 0o644)  # mkstemp makes 0600; workers may run as another user


# ----------------------------------------------------------------------------- entry points
def default_name(src: Path) -> str:
    """A registry name from the source path: the first directory name (walking up) that is not
    a generic one (``model``, ``snapshots``, a commit hash), ``models--org--x`` -> ``x``."""
    for part in reversed(Path(src).resolve().parts):
        if part.lower() in ("model", "models", "snapshots", "main") or re.fullmatch(r"[0-9a-f]{40}", part):
            continue
        part = part.split("--")[-1]
        name = re.sub(r"[^A-Za-z0-9._-]+", "-", part).strip("-._").lower().replace("_", "-")[:64]
        if name:
            return name
    return "imported"


def check_name(name: str) -> str:
    """``name`` if a new model may take it (``registry.records.check_new_name``), else
    BadImportArgument with the reason."""
    try:
        return records.check_new_name(name)
    except InvalidRequest as exc:
        raise BadImportArgument(exc.message) from None


def import_model(src: Path | str, out: Path | str, *, name: str | None = None,
                 kind: str | None = None, overwrite: bool = False) -> Imported:
    """Convert the Hugging Face model directory ``src`` into ``out`` (model.onnx,
    tokenizer.json, config.json). ``kind`` is checked against the model type when given.
    Raises BadImportArgument (nothing written) when ``src`` is not a directory, ``name`` or
    ``kind`` does not fit, or ``out`` cannot take the files (``check_out``); ImportFailed
    (nothing written) when the directory cannot be served faithfully."""
    started = time.perf_counter()
    src, out = Path(src).expanduser(), Path(out).expanduser()
    if not src.is_dir():
        problem = "is not a directory" if src.exists() else "does not exist"
        raise BadImportArgument(f"{src} {problem}: give a Hugging Face model directory "
                                "(config.json, model.safetensors, tokenizer.json)")
    check_out(out, overwrite)
    config = read_config(src)
    model_type = config.get("model_type", "")
    if not isinstance(model_type, str) or model_type not in SUPPORTED:
        raise ImportFailed(f"model_type {model_type!r} is not supported: banter models import "
                           f"handles {', '.join(sorted(SUPPORTED))}")
    want = SUPPORTED[model_type]
    if kind not in (None, want):
        raise BadImportArgument(f"a {model_type} model is imported as {want!r}, not {kind!r}: "
                                f"pass --kind {want} or leave --kind out")
    name = check_name(name or default_name(src))
    if want == "embed":
        _check_pooling(src)
    tensors = load_tensors(src, model_type)
    try:
        model = (bert_onnx if want == "embed" else gpt2_onnx)(config, tensors, name)
        rows = (tensors["embeddings.word_embeddings.weight"] if want == "embed" else tensors["wte.weight"]).shape[0]
    except (KeyError, ValueError, TypeError) as exc:
        raise ImportFailed(f"config.json lacks or garbles a field the {model_type} importer "
                           f"needs: {exc!r}") from None
    tok = _tokenizer(src, want, rows)
    diff = _verify(want, model, config, tensors, tok)
    weights = sorted(p for p in src.glob("model*.safetensors"))
    out_config = {**config, "banter_import": {"source": str(src.resolve()), "opset": OPSET,
                                              "weights_sha256": _sha256(weights),
                                              "max_abs_diff_vs_reference": diff}}
    if want == "embed":
        out_config |= {"pooling": "mean", "normalize": True}
    _write_out(out, model, tok, out_config)
    return Imported(out, name, want, model_type, diff, time.perf_counter() - started)


GPT2_SMALL = {"n_layer": 12, "n_head": 12, "n_embd": 768, "n_positions": 1024}


def random_gpt2_config(vocab_size: int, dims: dict | None = None) -> dict:
    """The Hugging Face config of a GPT-2-small-shaped decoder (``dims`` overriding
    ``GPT2_SMALL``) with ``vocab_size`` vocabulary rows and no EOS token."""
    return {"model_type": "gpt2", **GPT2_SMALL, **(dims or {}), "vocab_size": vocab_size,
            "bos_token_id": 0, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
            "n_inner": None}


def write_random_gpt2(out: Path | str, *, name: str = "gpt2-small-random", seed: int = 0,
                      dims: dict | None = None, overwrite: bool = False) -> Imported:
    """A GPT-2-small-shaped decoder (12 layers, 768 wide, 12 heads, 1024 positions) with random
    weights and the demo decoder's tokenizer (so its vocab is small: the lm_head is ~1/70 of
    real GPT-2's). No eos_token_id: generation always runs to max_tokens, as timing wants."""
    started = time.perf_counter()
    out = Path(out).expanduser()
    check_out(out, overwrite)
    tok, _ = gpt_tokenizer()
    config = random_gpt2_config(tok.get_vocab_size(), dims)
    tensors = random_gpt2_tensors(config, seed)
    model = gpt2_onnx(config, tensors, check_name(name))
    diff = _verify("generate", model, config, tensors, tok)
    _write_out(out, model, tok, {**config, "banter_import": {"source": f"random (seed {seed})",
                                                             "max_abs_diff_vs_reference": diff}})
    return Imported(out, name, "generate", "gpt2", diff, time.perf_counter() - started)


def promote_command(model_root: Path, result: Imported) -> str | None:
    """The ``banter models promote`` line for ``result`` (its path relative to the model root);
    None when it lies outside the model root, where promote cannot take it."""
    root, path = Path(model_root).resolve(), result.path.resolve()
    if not path.is_relative_to(root):
        return None
    where = path.relative_to(root).as_posix()
    return f"banter models promote {result.name} {shlex.quote(where)} --kind {result.kind}"
