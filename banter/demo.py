"""Deterministic, download-free demo models for banterhearts.

``build_demo(root)`` writes two tiny ONNX models with real transformer shapes and ops:

* ``demo-gpt``: GPT-2 decoder in the Hugging Face Optimum layout with KV cache
  (``input_ids``, ``attention_mask``, ``position_ids``, ``past_key_values.{i}.key|value`` ->
  ``logits``, ``present.{i}.key|value``). Its weights are chosen so that greedy decoding writes
  ``DEMO_TEXT`` token by token whatever the prompt, then starts it again, forever.
* ``demo-embed``: BERT-style encoder (``input_ids``, ``attention_mask`` -> ``last_hidden_state``)
  with fixed random weights, meant for mean pooling + L2 normalisation.

Each directory holds ``model.onnx``, ``tokenizer.json`` (byte-level BPE, so any unicode text
encodes) and ``config.json``. Two builds give byte-identical files.

How the decoder writes ``DEMO_TEXT``: each word of it is one extra vocab entry ``" word"`` (a
literal space, not the byte-level ``Ġ``, so no merge can ever produce it but the ByteLevel
decoder still gives back its raw text). The embedding of cycle token k is a spike on feature dim
k, every other token spikes on one shared "not in cycle" dim; ``lm_head`` maps dim k to the next
cycle token and the shared dim to the first. Attention/MLP weights are small, so they perturb
the residual stream without ever flipping the argmax (checked at build time with onnxruntime).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import tempfile

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

DEMO_TEXT = (" banterhearts streams every token from one batched ONNX pass, so many prompts"
             " share the GPU and nobody waits.")
DEMO_GPT = "demo-gpt"
DEMO_EMBED = "demo-embed"

GPT_DIMS = {"n_layer": 2, "n_head": 4, "n_embd": 128, "n_inner": 512, "n_positions": 1024}
BERT_DIMS = {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "intermediate_size": 512, "max_position_embeddings": 512}
OPSET, IR_VERSION = 17, 8
NEG = -1e9          # additive mask bias: masked keys get exactly zero weight, rows stay finite
SPIKE = 10.0        # size of the decoder's token-identity feature
MIN_MARGIN = 3.0    # build-time guarantee on the greedy logit margin

_CORPUS = """\
Banterhearts is a small inference server. It loads models in the ONNX format and runs them with
ONNX Runtime, on a graphics card when one is present and on the processor when it is not.
Requests arrive over HTTP, wait in a queue, and are picked up by workers that batch them together.
A batch of prompts is padded to the same length, the attention mask marks the real tokens, and
the model computes the next token for every prompt in a single pass over the network.

The decoder keeps a cache of keys and values for every layer, so each new step only has to
process the newest token. Text is streamed back to the client piece by piece as soon as each
token is chosen. Sampling can be greedy, or it can use a temperature and a top p filter.

The encoder turns a sentence into a vector. Its hidden states are averaged over the real tokens
and normalised to unit length, so that two similar sentences end up close to each other.
Embeddings are useful for search, for clustering, and for finding near duplicates in a corpus.

Good tests need models that are tiny, fast, and deterministic, with the same shapes and the same
operators as the real thing. These demo models are written by hand with numpy, so they can be
built anywhere in a second, without a download, and they give the same bytes every time.
"""


# ----------------------------------------------------------------------------- tokenizers
def _train_bpe(specials: list[str], vocab_size: int) -> Tokenizer:
    """GPT-2 style byte-level BPE trained on the embedded corpus (deterministic)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS.splitlines(), trainer)
    return tok


def gpt_tokenizer() -> tuple[Tokenizer, list[int]]:
    """Decoder tokenizer (``<|endoftext|>`` = 0) and the ids of the ``DEMO_TEXT`` cycle tokens."""
    spec = json.loads(_train_bpe(["<|endoftext|>"], 700).to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    words = [" " + w for w in DEMO_TEXT.split()]
    assert "".join(words) == DEMO_TEXT and not set(words) & set(vocab)
    cycle = list(range(len(vocab), len(vocab) + len(words)))
    vocab.update(zip(words, cycle))
    tok = Tokenizer.from_str(json.dumps(spec))
    reached = set(tok.encode(DEMO_TEXT + _CORPUS + "".join(w.strip() for w in words)).ids)
    assert not reached & set(cycle), "a cycle token is reachable by encoding"
    assert tok.decode(cycle) == DEMO_TEXT
    return tok, cycle


def bert_tokenizer() -> Tokenizer:
    """Encoder tokenizer: ``[PAD]`` = 0, ``[CLS]`` = 1, ``[SEP]`` = 2, template ``[CLS] $A [SEP]``."""
    tok = _train_bpe(["[PAD]", "[CLS]", "[SEP]"], 700)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 1), ("[SEP]", 2)])
    return tok


# ----------------------------------------------------------------------------- graph helpers
class _Graph:
    """Collects nodes and initializers; ``op`` returns the (auto-named) output. ``eps`` is the
    LayerNorm epsilon of every ``_layer_norm`` in the graph."""

    def __init__(self, weights: dict[str, np.ndarray], eps: float = 1e-5) -> None:
        self.weights, self.nodes, self.inits, self.n, self.eps = weights, [], [], 0, eps
        self._added: set[str] = set()

    def w(self, name: str) -> str:
        """The weight ``name`` as an initializer (added once, however often it is used)."""
        if name not in self._added:
            self._added.add(name)
            self.inits.append(numpy_helper.from_array(self.weights[name], name))
        return name

    def const(self, value, dtype=np.int64) -> str:
        self.n += 1
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype), f"const_{self.n}"))
        return f"const_{self.n}"

    def op(self, op_type: str, *inputs: str, out: str | None = None, **attrs) -> str:
        self.n += 1
        out = out or f"{op_type.lower()}_{self.n}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=f"{op_type}_{self.n}", **attrs))
        return out


def _linear(g: _Graph, x: str, p: str) -> str:
    return g.op("Add", g.op("MatMul", x, g.w(p + ".w")), g.w(p + ".b"))


def _layer_norm(g: _Graph, x: str, p: str, out: str | None = None) -> str:
    return g.op("LayerNormalization", x, g.w(p + ".g"), g.w(p + ".b"), out=out, axis=-1, epsilon=g.eps)


def _gelu(g: _Graph, x: str, kind: str = "erf") -> str:
    """GELU, exact (``erf``: BERT's "gelu") or the tanh approximation (GPT-2's "gelu_new")."""
    if kind == "tanh":
        cube = g.op("Mul", g.op("Mul", x, x), x)
        inner = g.op("Add", x, g.op("Mul", cube, g.const(0.044715, np.float32)))
        erf = g.op("Tanh", g.op("Mul", inner, g.const(math.sqrt(2 / math.pi), np.float32)))
    else:
        assert kind == "erf", kind
        erf = g.op("Erf", g.op("Mul", x, g.const(1 / math.sqrt(2), np.float32)))
    return g.op("Mul", g.op("Mul", x, g.const(0.5, np.float32)), g.op("Add", erf, g.const(1.0, np.float32)))


def _mlp(g: _Graph, x: str, p: str, gelu: str = "erf") -> str:
    return _linear(g, _gelu(g, _linear(g, x, p + ".fc"), gelu), p + ".proj")


def _attention(g: _Graph, x: str, p: str, heads: int, bias: str,
               past: tuple[str, str] | None = None, present: tuple[str, str] | None = None) -> str:
    """Multi-head attention; ``bias`` [B,1,S,T] is added to the scaled scores. With ``past``,
    new keys/values are appended to the cache and the result is named ``present``."""
    embd = g.weights[p + ".q.w"].shape[0]
    shape = g.const([0, 0, heads, embd // heads])
    q, k, v = (g.op("Transpose", g.op("Reshape", _linear(g, x, f"{p}.{n}"), shape), perm=[0, 2, 1, 3])
               for n in "qkv")
    if past:
        k = g.op("Concat", past[0], k, axis=2, out=present[0])
        v = g.op("Concat", past[1], v, axis=2, out=present[1])
    scores = g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 3, 2]))
    scores = g.op("Add", g.op("Mul", scores, g.const(1 / math.sqrt(embd // heads), np.float32)), bias)
    ctx = g.op("MatMul", g.op("Softmax", scores, axis=-1), v)
    ctx = g.op("Reshape", g.op("Transpose", ctx, perm=[0, 2, 1, 3]), g.const([0, 0, embd]))
    return _linear(g, ctx, p + ".o")


def _dim(g: _Graph, x: str, axis: int) -> str:
    """Scalar int64 size of ``x`` along ``axis``."""
    return g.op("Squeeze", g.op("Shape", x, start=axis, end=axis + 1))


def _key_mask(g: _Graph, mask: str) -> str:
    """[B,T] int64 attention mask -> [B,1,1,T] bool."""
    return g.op("Cast", g.op("Unsqueeze", mask, g.const([1, 2])), to=TensorProto.BOOL)


def _where_bias(g: _Graph, keep: str) -> str:
    return g.op("Where", keep, g.const(0.0, np.float32), g.const(NEG, np.float32))


def _model(g: _Graph, name: str, inputs: list, outputs: list, producer: str = "banterhearts.demo") -> bytes:
    graph = helper.make_graph(g.nodes, name, inputs, outputs, g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name=producer, ir_version=IR_VERSION)
    onnx.checker.check_model(model)
    return model.SerializeToString(deterministic=True)


def _io(name: str, dtype: int, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


# ----------------------------------------------------------------------------- weights
def _block_weights(rng: np.random.Generator, p: str, embd: int, inner: int, std: float) -> dict:
    """Attention (q,k,v,o), MLP (fc,proj) and two LayerNorms (ln_1, ln_2) of one layer."""
    w = {}
    for n, (i, o) in {"q": (embd, embd), "k": (embd, embd), "v": (embd, embd), "o": (embd, embd),
                      "fc": (embd, inner), "proj": (inner, embd)}.items():
        w[f"{p}.{n}.w"] = rng.normal(0, std, (i, o))
        w[f"{p}.{n}.b"] = rng.normal(0, std / 4, o)
    for n in ("ln_1", "ln_2"):
        w[f"{p}.{n}.g"], w[f"{p}.{n}.b"] = np.ones(embd), np.zeros(embd)
    return w


def _gpt_weights(vocab: int, cycle: list[int]) -> dict[str, np.ndarray]:
    """Small random transformer + a readout that maps each token to its cycle successor."""
    d, rng, k = GPT_DIMS, np.random.default_rng(20240601), len(cycle)
    embd = d["n_embd"]
    assert k + 1 <= embd
    w = {"wte": rng.normal(0, 0.02, (vocab, embd)), "wpe": rng.normal(0, 0.01, (d["n_positions"], embd))}
    w["wte"][:, k] += SPIKE                                # "not in cycle" feature ...
    w["wte"][cycle, k] -= SPIKE                            # ... except for the cycle tokens,
    w["wte"][cycle, np.arange(k)] += SPIKE                 # which get their own feature dim
    for i in range(d["n_layer"]):
        w.update(_block_weights(rng, f"h.{i}", embd, d["n_inner"], 0.02))
    w["ln_f.g"], w["ln_f.b"] = np.ones(embd), np.zeros(embd)
    w["lm_head"] = rng.normal(0, 0.02, (embd, vocab))
    w["lm_head"][np.arange(k), np.roll(cycle, -1)] += 1.0  # C[j] -> C[j+1], C[last] -> C[0]
    w["lm_head"][k, cycle[0]] += 1.0                       # anything else -> C[0]
    return {n: a.astype(np.float32) for n, a in w.items()}


def _bert_weights(vocab: int) -> dict[str, np.ndarray]:
    d, rng = BERT_DIMS, np.random.default_rng(20240602)
    hid = d["hidden_size"]
    w = {"wte": rng.normal(0, 0.5, (vocab, hid)), "wpe": rng.normal(0, 0.1, (d["max_position_embeddings"], hid)),
         "ln_e.g": np.ones(hid), "ln_e.b": np.zeros(hid)}
    for i in range(d["num_hidden_layers"]):
        w.update(_block_weights(rng, f"h.{i}", hid, d["intermediate_size"], 0.1))
    return {n: a.astype(np.float32) for n, a in w.items()}


# ----------------------------------------------------------------------------- graphs
# Both builders take float32 weights named the same way (matrices are [in, out], x @ W + b):
#   wte [V, E] token embedding, wpe [P, E] position embedding, tte [types, E] token-type embedding
#   (encoder, optional: adds a ``token_type_ids`` input), ln_e.{g,b} embedding LayerNorm (encoder),
#   h.{i}.{q,k,v,o,fc,proj}.{w,b} attention and MLP of layer i, h.{i}.{ln_1,ln_2}.{g,b} its two
#   LayerNorms, ln_f.{g,b} final LayerNorm and lm_head [E, V] (decoder; absent: tied to wte).
# banter.importer maps Hugging Face checkpoints onto these names.
def gpt_graph(w: dict[str, np.ndarray], *, n_layer: int, n_head: int, name: str = DEMO_GPT,
              eps: float = 1e-5, gelu: str = "erf", producer: str = "banterhearts.demo") -> bytes:
    """Pre-LN GPT-2 with KV cache. Query i (absolute index past+i) sees key j iff
    j <= past+i and attention_mask[b, j] == 1; positions come only from position_ids."""
    g = _Graph(w, eps)
    vocab, embd = w["wte"].shape
    hd = embd // n_head
    B, S, P, T = "batch_size", "sequence_length", "past_sequence_length", "past_sequence_length + sequence_length"
    t, s = _dim(g, "attention_mask", 1), _dim(g, "input_ids", 1)
    keys = g.op("Range", g.const(0), t, g.const(1))
    queries = g.op("Range", g.op("Sub", t, s), t, g.const(1))
    causal = g.op("LessOrEqual", g.op("Unsqueeze", keys, g.const([0])), g.op("Unsqueeze", queries, g.const([1])))
    bias = _where_bias(g, g.op("And", causal, _key_mask(g, "attention_mask")))   # [B,1,S,T]
    x = g.op("Add", g.op("Gather", g.w("wte"), "input_ids"), g.op("Gather", g.w("wpe"), "position_ids"))
    inputs = [_io("input_ids", TensorProto.INT64, [B, S]), _io("attention_mask", TensorProto.INT64, [B, T]),
              _io("position_ids", TensorProto.INT64, [B, S])]
    outputs = [_io("logits", TensorProto.FLOAT, [B, S, vocab])]
    for i in range(n_layer):
        past = (f"past_key_values.{i}.key", f"past_key_values.{i}.value")
        present = (f"present.{i}.key", f"present.{i}.value")
        inputs += [_io(n, TensorProto.FLOAT, [B, n_head, P, hd]) for n in past]
        outputs += [_io(n, TensorProto.FLOAT, [B, n_head, T, hd]) for n in present]
        x = g.op("Add", x, _attention(g, _layer_norm(g, x, f"h.{i}.ln_1"), f"h.{i}", n_head, bias, past, present))
        x = g.op("Add", x, _mlp(g, _layer_norm(g, x, f"h.{i}.ln_2"), f"h.{i}", gelu))
    x = _layer_norm(g, x, "ln_f")
    head = g.w("lm_head") if "lm_head" in w else g.op("Transpose", g.w("wte"), perm=[1, 0])
    g.op("MatMul", x, head, out="logits")
    return _model(g, name, inputs, outputs, producer)


def bert_graph(w: dict[str, np.ndarray], *, n_layer: int, n_head: int, name: str = DEMO_EMBED,
               eps: float = 1e-5, gelu: str = "erf", producer: str = "banterhearts.demo") -> bytes:
    """Post-LN BERT encoder; bidirectional attention with a padding mask only."""
    g = _Graph(w, eps)
    B, S = "batch_size", "sequence_length"
    positions = g.op("Range", g.const(0), _dim(g, "input_ids", 1), g.const(1))
    x = g.op("Add", g.op("Gather", g.w("wte"), "input_ids"), g.op("Gather", g.w("wpe"), positions))
    if "tte" in w:
        x = g.op("Add", x, g.op("Gather", g.w("tte"), "token_type_ids"))
    x = _layer_norm(g, x, "ln_e")
    bias = _where_bias(g, _key_mask(g, "attention_mask"))                        # [B,1,1,S]
    for i in range(n_layer):
        x = _layer_norm(g, g.op("Add", x, _attention(g, x, f"h.{i}", n_head, bias)), f"h.{i}.ln_1")
        out = "last_hidden_state" if i == n_layer - 1 else None
        x = _layer_norm(g, g.op("Add", x, _mlp(g, x, f"h.{i}", gelu)), f"h.{i}.ln_2", out)
    names = ("input_ids", "attention_mask") + (("token_type_ids",) if "tte" in w else ())
    inputs = [_io(n, TensorProto.INT64, [B, S]) for n in names]
    hidden = w["wte"].shape[1]
    return _model(g, name, inputs, [_io("last_hidden_state", TensorProto.FLOAT, [B, S, hidden])], producer)


def _check_gpt(model: bytes, vocab: int, cycle: list[int]) -> float:
    """Run the decoder on every vocab token (several positions, no past) and on a long random
    sequence; assert the greedy successor wins by ``MIN_MARGIN``. Returns the smallest margin."""
    import onnxruntime as ort

    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    d = GPT_DIMS
    succ = np.full(vocab, cycle[0])
    succ[cycle] = np.roll(cycle, -1)

    def margin(ids: np.ndarray, pos: np.ndarray) -> float:
        b, s = ids.shape
        empty = np.zeros((b, d["n_head"], 0, d["n_embd"] // d["n_head"]), np.float32)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": pos}
        feeds |= {f"past_key_values.{i}.{kv}": empty for i in range(d["n_layer"]) for kv in ("key", "value")}
        logits = sess.run(["logits"], feeds)[0]
        want = np.take_along_axis(logits, succ[ids][..., None], -1)[..., 0]
        np.put_along_axis(logits, succ[ids][..., None], -np.inf, -1)
        return float((want - logits.max(-1)).min())

    ids = np.arange(vocab, dtype=np.int64)[:, None]
    worst = min(margin(ids, np.full_like(ids, p)) for p in (0, 1, 7, 511, d["n_positions"] - 1))
    seq = np.random.default_rng(0).integers(0, vocab, (2, 300))
    seq[1, 10:10 + 3 * len(cycle)] = np.tile(cycle, 3)
    worst = min(worst, margin(seq, np.tile(np.arange(300, dtype=np.int64), (2, 1))))
    assert worst >= MIN_MARGIN, f"demo-gpt greedy margin too small: {worst}"
    return worst


# ----------------------------------------------------------------------------- files
def _write(path: pathlib.Path, data: bytes) -> None:
    """Atomic write: temp file in the same directory, then os.replace."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def _json(obj: dict) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def _write_model(folder: pathlib.Path, model: bytes, tok: Tokenizer, config: dict) -> pathlib.Path:
    folder.mkdir(parents=True, exist_ok=True)
    _write(folder / "model.onnx", model)
    _write(folder / "tokenizer.json", tok.to_str(pretty=True).encode())
    _write(folder / "config.json", _json(config))
    return folder


def build_demo(model_root: pathlib.Path) -> dict[str, pathlib.Path]:
    """Write ``model_root/demo-gpt/{model.onnx,tokenizer.json,config.json}`` and
    ``model_root/demo-embed/{...}``; return ``{"demo-gpt": dir, "demo-embed": dir}``.

    Deterministic: two builds give byte-identical files. Existing files are replaced atomically.
    Raises ``AssertionError`` if the decoder would not greedily write ``DEMO_TEXT``.
    """
    root = pathlib.Path(model_root)
    gtok, cycle = gpt_tokenizer()
    gvocab = gtok.get_vocab_size()
    gpt = gpt_graph(_gpt_weights(gvocab, cycle), n_layer=GPT_DIMS["n_layer"], n_head=GPT_DIMS["n_head"])
    _check_gpt(gpt, gvocab, cycle)
    gcfg = {"model_type": "gpt2", **GPT_DIMS, "vocab_size": gvocab, "bos_token_id": 0, "eos_token_id": 0,
            "demo_text": DEMO_TEXT}
    btok = bert_tokenizer()
    bvocab = btok.get_vocab_size()
    bcfg = {"model_type": "bert", **BERT_DIMS, "vocab_size": bvocab, "pad_token_id": 0,
            "pooling": "mean", "normalize": True}
    bert = bert_graph(_bert_weights(bvocab), n_layer=BERT_DIMS["num_hidden_layers"],
                      n_head=BERT_DIMS["num_attention_heads"])
    return {DEMO_GPT: _write_model(root / DEMO_GPT, gpt, gtok, gcfg),
            DEMO_EMBED: _write_model(root / DEMO_EMBED, bert, btok, bcfg)}
