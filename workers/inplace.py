"""The in-place decoder: a ``gpt_graph`` decoder rebuilt so each pass appends to its KV cache
where it lies instead of copying it.

An Optimum-layout decoder returns every ``present.*`` as ``Concat(past, new)``: each decode
step reads the whole cache and writes it out again, and on a CPU that copy is most of a long
sequence's step (docs/benchmarks.md, ``kvcache``). ``inplace_model`` rebuilds a decoder made
by ``banter.demo.gpt_graph`` (the demo decoder and every ``banter models import`` GPT-2) from
its own weights with ONNX Runtime's ``GroupQueryAttention`` contrib operator: a layer's past
and present are one buffer of fixed capacity, bound as both input and output, and
``seqlens_k`` says how much of it each row uses. Rows may differ in length (prompts are
right-padded; each row attends to its own positions only), so a batch costs what its rows
hold, not ``rows x`` the longest. Only the position each row samples from (a prompt's last
token) goes through the final LayerNorm and the vocabulary projection, which is about a third
of a GPT-2-small token's arithmetic, so a prompt costs a third less than on the original
graph, which projects every position. A pass may also carry a second group of rows, prompts
joining a running batch (``with_joining``): the linear layers run once over both groups'
positions (the weights are read once) and each group attends in its own cache rows. ``Runner``
serves this twin when ``BANTER_KV_LAYOUT`` allows
it and it reproduces the original's logits (checked at load).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from banter.demo import _Graph, _layer_norm, _linear, _mlp

CONTRIB = "com.microsoft"
PAST_PREFIX = "past_"  # past_key.{i}, past_value.{i}
PRESENT_PREFIX = "present_"
JOIN_PREFIX = "join_"  # the joining group's inputs and caches: join_input_ids, join_past_key.{i}


class NotInplaceable(ValueError):
    """The model is not a ``gpt_graph`` decoder, so it has no in-place twin."""


def past_names(n_layer: int, group: str = "") -> list[str]:
    return [f"{group}{PAST_PREFIX}{part}.{i}" for i in range(n_layer) for part in ("key", "value")]


def present_names(n_layer: int, group: str = "") -> list[str]:
    return [f"{group}{PRESENT_PREFIX}{part}.{i}" for i in range(n_layer)
            for part in ("key", "value")]


def _graph_facts(model: onnx.ModelProto) -> dict:
    """Layers, heads, vocabulary, positions, LayerNorm epsilon and GELU kind of a ``gpt_graph``
    decoder."""
    graph = model.graph
    past = [i for i in graph.input if i.name.startswith("past_key_values.")]
    dims = past[0].type.tensor_type.shape.dim
    norms = [n for n in graph.node if n.op_type == "LayerNormalization"]
    eps = next(a.f for a in norms[0].attribute if a.name == "epsilon")
    ops = {n.op_type for n in graph.node}
    rows = {t.name: t.dims[0] for t in graph.initializer if t.name in ("wte", "wpe")}
    return {"n_layer": len(past) // 2, "n_head": dims[1].dim_value, "head_dim": dims[3].dim_value,
            "vocab": rows["wte"], "positions": rows["wpe"], "eps": eps,
            "gelu": "tanh" if "Tanh" in ops else "erf"}


class _InPlaceGraph(_Graph):
    """A ``_Graph`` over the weights already in the loaded model: ``w`` names an initializer
    there (and notes it used) instead of adding a copy."""

    def __init__(self, present: set[str], eps: float) -> None:
        super().__init__({}, eps)
        self.present, self.used = present, set()

    def w(self, name: str) -> str:
        if name not in self.present:
            raise NotInplaceable(f"the decoder has no weight {name!r}")
        self.used.add(name)
        return name


def inplace_model(model_path: Path) -> tuple[bytes, dict]:
    """The in-place twin of the ``gpt_graph`` decoder at ``model_path`` (ONNX bytes) and its
    geometry (``n_layer``, ``n_head``, ``head_dim``, ``positions``). Inputs: ``input_ids``, ``position_ids``
    [B, S] int64 (a prompt batch right-padded); ``seqlens_k`` [B] int32 (each row's cached
    length after this pass, minus 1); ``total_sequence_length`` int32 scalar (the longest row's
    cached length after this pass); ``past_key.{i}`` / ``past_value.{i}`` [B, H, capacity,
    D]; the same again prefixed ``join_`` for the joining group (``join_input_ids`` [J, P] and
    so on; zero rows when nothing joins); ``logits_index`` [B + J] int64 (the flat index into
    the pass's positions, the first group's row by row then the joining group's, of the one
    position per row whose logits the pass returns: a prompt's last token).
    Outputs: ``logits`` [B + J, 1, vocab] and ``present_key.{i}`` / ``present_value.{i}`` and
    ``join_present_key.{i}`` / ``join_present_value.{i}`` (bind each to its past buffer).
    Raises ``NotInplaceable`` for any other model.

    The loaded model is edited where it lies (its nodes, inputs and outputs replaced, its
    weights kept as they are), so the weights are never copied before the one serialization."""
    model = onnx.load(str(model_path))
    names = {t.name for t in model.graph.initializer}
    if not {"h.0.q.w", "wte", "wpe"} <= names or not any(
            i.name.startswith("past_key_values.") for i in model.graph.input):
        raise NotInplaceable(f"{model_path} is not a banterhearts gpt_graph decoder (its "
                             "weights are not named h.0.q.w and so on, or it has no KV cache "
                             "inputs)")
    facts = _graph_facts(model)
    g = _InPlaceGraph(names, facts["eps"])
    inputs, outputs = _build(g, facts, "lm_head" in names)
    graph = model.graph
    for i in reversed(range(len(graph.initializer))):  # the old graph's constants go
        if graph.initializer[i].name not in g.used:
            del graph.initializer[i]
    graph.initializer.extend(g.inits)
    for field, values in (("node", g.nodes), ("input", inputs), ("output", outputs)):
        graph.ClearField(field)
        getattr(graph, field).extend(values)
    graph.ClearField("value_info")
    graph.name = "inplace"
    model.ClearField("opset_import")
    model.opset_import.extend([helper.make_opsetid("", 17), helper.make_opsetid(CONTRIB, 1)])
    return model.SerializeToString(), facts


def _build(g: _Graph, facts: dict, own_head: bool) -> tuple[list, list]:
    """The twin's nodes into ``g``; returns its inputs and outputs. Every layer runs its
    linear parts once over all the pass's positions (the first group's, then the joining
    group's, flattened); its attention is an ``If``: one ``GroupQueryAttention`` per group
    when the joining group has rows, else one for the first group (the operator cannot take
    an empty batch)."""
    n_layer, heads, hd = facts["n_layer"], facts["n_head"], facts["head_dim"]
    hidden = heads * hd
    B, S, C, J, P = "batch_size", "sequence_length", "capacity", "join_batch_size", "join_length"
    inputs, outputs = [], [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                                         ["rows", 1, facts["vocab"]])]
    flat = g.const([-1, hidden])
    parts = []
    for prefix, rows, width in (("", B, S), (JOIN_PREFIX, J, P)):
        ids, positions = f"{prefix}input_ids", f"{prefix}position_ids"
        inputs += [helper.make_tensor_value_info(ids, TensorProto.INT64, [rows, width]),
                   helper.make_tensor_value_info(positions, TensorProto.INT64, [rows, width]),
                   helper.make_tensor_value_info(f"{prefix}seqlens_k", TensorProto.INT32, [rows]),
                   helper.make_tensor_value_info(f"{prefix}total_sequence_length",
                                                 TensorProto.INT32, [])]
        x = g.op("Add", g.op("Gather", g.w("wte"), ids), g.op("Gather", g.w("wpe"), positions))
        shape = g.op("Shape", ids)
        parts.append((g.op("Reshape", x, flat), g.op("Concat", shape, g.const([3 * hidden]), axis=0),
                      g.op("ReduceProd", shape, keepdims=1)))
    inputs.append(helper.make_tensor_value_info("logits_index", TensorProto.INT64, ["rows"]))
    (x, qkv_shape, count), (joined, join_qkv_shape, join_count) = parts
    x = g.op("Concat", x, joined, axis=0)  # [positions of the pass, hidden]
    split = g.op("Concat", count, join_count, axis=0)
    has_join = g.op("Greater", g.op("Squeeze", join_count), g.const(0))
    pasts, presents = past_names(n_layer), present_names(n_layer)
    joins, join_presents = past_names(n_layer, JOIN_PREFIX), present_names(n_layer, JOIN_PREFIX)
    for i in range(n_layer):
        p = f"h.{i}"
        h = _layer_norm(g, x, f"{p}.ln_1")
        w = g.op("Concat", *(g.w(f"{p}.{n}.w") for n in "qkv"), axis=1)  # folded at load
        b = g.op("Concat", *(g.w(f"{p}.{n}.b") for n in "qkv"), axis=0)
        qkv = g.op("Add", g.op("MatMul", h, w), b)  # packed per position: q | k | v
        cache, join_cache = pasts[2 * i:2 * i + 2], joins[2 * i:2 * i + 2]
        both = _Branch(f"both_{i}", heads)
        first, rest = both.op("Split", qkv, split, axis=0, outs=2)
        both.attend(both.op("Reshape", first, qkv_shape), cache, "")
        both.attend(both.op("Reshape", rest, join_qkv_shape), join_cache, JOIN_PREFIX)
        both.out(both.op("Concat", *(both.op("Reshape", a, flat) for a in both.attended), axis=0))
        alone = _Branch(f"alone_{i}", heads)
        alone.attend(alone.op("Reshape", qkv, qkv_shape), cache, "")
        alone.out(alone.op("Reshape", alone.attended[0], flat))
        alone.presents += [alone.op("Identity", name) for name in join_cache]
        g.nodes.append(helper.make_node(
            "If", [has_join], [f"attn_{i}", *presents[2 * i:2 * i + 2],
                               *join_presents[2 * i:2 * i + 2]],
            name=f"If_{i}", then_branch=both.graph(), else_branch=alone.graph()))
        for names, rows in ((cache, B), (join_cache, J)):
            inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, [rows, heads, C, hd])
                       for n in names]
        for names, rows in ((presents[2 * i:2 * i + 2], B), (join_presents[2 * i:2 * i + 2], J)):
            outputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, [rows, heads, C, hd])
                        for n in names]
        x = g.op("Add", x, _linear(g, f"attn_{i}", f"{p}.o"))
        x = g.op("Add", x, _mlp(g, _layer_norm(g, x, f"{p}.ln_2"), p, facts["gelu"]))
    # only the position each row samples from goes through ln_f and the head
    x = g.op("Unsqueeze", g.op("Gather", x, "logits_index", axis=0), g.const([1]))
    x = _layer_norm(g, x, "ln_f")
    head = g.w("lm_head") if own_head else g.op("Transpose", g.w("wte"), perm=[1, 0])
    g.op("MatMul", x, head, out="logits")
    return inputs, outputs


class _Branch:
    """One branch of a layer's attention ``If``: its nodes, what its attention gave, and its
    outputs (the attention [positions, hidden], then each group's present key and value; the
    caches themselves are outer-scope names)."""

    def __init__(self, name: str, heads: int) -> None:
        self.name, self.heads, self.nodes, self.n = name, heads, [], 0
        self.attended: list[str] = []
        self.presents: list[str] = []
        self.result = ""

    def op(self, op_type: str, *inputs: str, outs: int = 1, **attrs):
        self.n += 1
        names = [f"{self.name}_{op_type.lower()}_{self.n}_{k}" for k in range(outs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names,
                                           name=f"{self.name}_{op_type}_{self.n}", **attrs))
        return names[0] if outs == 1 else names

    def attend(self, packed: str, cache: list[str], prefix: str) -> None:
        self.n += 1
        out = f"{self.name}_attn_{self.n}"
        presents = [f"{self.name}_{name}_present" for name in cache]
        self.nodes.append(helper.make_node(
            "GroupQueryAttention", [packed, "", "", *cache, f"{prefix}seqlens_k",
                                    f"{prefix}total_sequence_length"],
            [out, *presents], name=f"{self.name}_GroupQueryAttention_{self.n}", domain=CONTRIB,
            num_heads=self.heads, kv_num_heads=self.heads))
        self.attended.append(out)
        self.presents += presents

    def out(self, result: str) -> None:
        self.result = result

    def graph(self) -> onnx.GraphProto:
        outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
                   for name in (self.result, *self.presents)]
        return helper.make_graph(self.nodes, self.name, [], outputs)


def prompt_inputs(prompts: list[np.ndarray]) -> dict[str, np.ndarray]:
    """A prefill pass's inputs: ``prompts`` right-padded, each row's cache empty before it."""
    lengths = np.array([len(p) for p in prompts], dtype=np.int32)
    width = int(lengths.max())
    ids = np.zeros((len(prompts), width), dtype=np.int64)
    positions = np.zeros((len(prompts), width), dtype=np.int64)
    for b, prompt in enumerate(prompts):
        ids[b, :len(prompt)] = prompt
        positions[b, :len(prompt)] = np.arange(len(prompt))
    return {"input_ids": ids, "position_ids": positions, "seqlens_k": lengths - 1,
            "total_sequence_length": np.array(width, dtype=np.int32),
            "logits_index": np.arange(len(prompts), dtype=np.int64) * width + lengths - 1}


def decode_inputs(tokens: np.ndarray, cached: np.ndarray) -> dict[str, np.ndarray]:
    """A decode pass's inputs: one token per row after ``cached`` [B] positions."""
    positions = cached.astype(np.int64)
    return {"input_ids": tokens.astype(np.int64).reshape(-1, 1),
            "position_ids": positions.reshape(-1, 1),
            "seqlens_k": positions.astype(np.int32),
            "total_sequence_length": np.array(int(positions.max()) + 1, dtype=np.int32),
            "logits_index": np.arange(len(positions), dtype=np.int64)}


def with_joining(inputs: Mapping[str, np.ndarray], prompts: list[np.ndarray]) -> dict[str, np.ndarray]:
    """``inputs`` (a decode pass's) with ``prompts`` joining in the same pass: their rows come
    after the decode rows, in the logits too."""
    joining = prompt_inputs(prompts)
    offset = inputs["input_ids"].size  # the joining positions follow the decode positions
    return {**inputs, **{JOIN_PREFIX + name: value for name, value in joining.items()
                         if name != "logits_index"},
            "logits_index": np.concatenate((inputs["logits_index"],
                                            offset + joining["logits_index"]))}


_NO_JOIN = {f"{JOIN_PREFIX}input_ids": np.zeros((0, 1), dtype=np.int64),
            f"{JOIN_PREFIX}position_ids": np.zeros((0, 1), dtype=np.int64),
            f"{JOIN_PREFIX}seqlens_k": np.zeros(0, dtype=np.int32),
            f"{JOIN_PREFIX}total_sequence_length": np.array(1, dtype=np.int32)}


def run_in_place(session: ort.InferenceSession, inputs: Mapping[str, np.ndarray],
                 buffers: Sequence[np.ndarray], n_layer: int,
                 joining: Sequence[np.ndarray] | None = None) -> np.ndarray:
    """One pass of a twin ``session`` with ``buffers`` (C-contiguous arrays, one per past
    input: leading rows of a cache) as both its pasts and its presents, and ``joining`` (the
    rows after them, for ``with_joining`` inputs) as the joining group's; returns the logits
    [rows, 1, vocab] of each row's ``logits_index`` position, the joining rows last."""
    binding = session.io_binding()
    if joining is None:
        inputs, joining = {**_NO_JOIN, **inputs}, [buffer[:0] for buffer in buffers]
    for name, value in inputs.items():
        binding.bind_cpu_input(name, value)
    binding.bind_output("logits", "cpu")
    for group, cache in (("", buffers), (JOIN_PREFIX, joining)):
        for past, present, buffer in zip(past_names(n_layer, group),
                                         present_names(n_layer, group), cache):
            if not buffer.flags.c_contiguous:
                raise ValueError(f"{past}: an in-place cache must be C-contiguous")
            value = ort.OrtValue.ortvalue_from_numpy(buffer)  # shares the array's memory
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)
    session.run_with_iobinding(binding)
    return binding.get_outputs()[0].numpy()
