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
graph, which projects every position. ``Runner`` serves this twin when ``BANTER_KV_LAYOUT`` allows
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


class NotInplaceable(ValueError):
    """The model is not a ``gpt_graph`` decoder, so it has no in-place twin."""


def past_names(n_layer: int) -> list[str]:
    return [f"{PAST_PREFIX}{part}.{i}" for i in range(n_layer) for part in ("key", "value")]


def present_names(n_layer: int) -> list[str]:
    return [f"{PRESENT_PREFIX}{part}.{i}" for i in range(n_layer) for part in ("key", "value")]


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
    cached length after this pass); ``logits_index`` [B] int64 (the flat index, row x S +
    position, of the one position per row whose logits the pass returns: a prompt's last
    token); ``past_key.{i}`` / ``past_value.{i}`` [B, H, capacity, D].
    Outputs: ``logits`` [B, 1, vocab] and ``present_key.{i}`` / ``present_value.{i}`` (bind
    them to the past buffers). Raises ``NotInplaceable`` for any other model.

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
    """The twin's nodes into ``g``; returns its inputs and outputs."""
    n_layer, heads, hd = facts["n_layer"], facts["n_head"], facts["head_dim"]
    B, S, C = "batch_size", "sequence_length", "capacity"
    x = g.op("Add", g.op("Gather", g.w("wte"), "input_ids"), g.op("Gather", g.w("wpe"), "position_ids"))
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [B, S]),
              helper.make_tensor_value_info("position_ids", TensorProto.INT64, [B, S]),
              helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [B]),
              helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
              helper.make_tensor_value_info("logits_index", TensorProto.INT64, [B])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [B, 1, facts["vocab"]])]
    pasts, presents = past_names(n_layer), present_names(n_layer)
    for i in range(n_layer):
        p = f"h.{i}"
        h = _layer_norm(g, x, f"{p}.ln_1")
        q, k, v = (_linear(g, h, f"{p}.{n}") for n in "qkv")
        past, present = pasts[2 * i:2 * i + 2], presents[2 * i:2 * i + 2]
        g.nodes.append(helper.make_node(
            "GroupQueryAttention", [q, k, v, *past, "seqlens_k", "total_sequence_length"],
            [f"attn_{i}", *present], name=f"GroupQueryAttention_{i}", domain=CONTRIB,
            num_heads=heads, kv_num_heads=heads))
        inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, [B, heads, C, hd]) for n in past]
        outputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, [B, heads, C, hd])
                    for n in present]
        x = g.op("Add", x, _linear(g, f"attn_{i}", f"{p}.o"))
        x = g.op("Add", x, _mlp(g, _layer_norm(g, x, f"{p}.ln_2"), p, facts["gelu"]))
    # only the position each row samples from goes through ln_f and the head
    x = g.op("Reshape", x, g.const([-1, heads * hd]))
    x = g.op("Unsqueeze", g.op("Gather", x, "logits_index", axis=0), g.const([1]))
    x = _layer_norm(g, x, "ln_f")
    head = g.w("lm_head") if own_head else g.op("Transpose", g.w("wte"), perm=[1, 0])
    g.op("MatMul", x, head, out="logits")
    return inputs, outputs


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


def run_in_place(session: ort.InferenceSession, inputs: Mapping[str, np.ndarray],
                 buffers: Sequence[np.ndarray], n_layer: int) -> np.ndarray:
    """One pass of a twin ``session`` with ``buffers`` (C-contiguous arrays, one per past
    input: leading rows of a cache) as both its pasts and its presents; returns the logits
    [B, 1, vocab] of each row's ``logits_index`` position."""
    binding = session.io_binding()
    for name, value in inputs.items():
        binding.bind_cpu_input(name, value)
    binding.bind_output("logits", "cpu")
    for past, present, buffer in zip(past_names(n_layer), present_names(n_layer), buffers):
        if not buffer.flags.c_contiguous:
            raise ValueError(f"{past}: an in-place cache must be C-contiguous")
        value = ort.OrtValue.ortvalue_from_numpy(buffer)  # shares the array's memory
        binding.bind_ortvalue_input(past, value)
        binding.bind_ortvalue_output(present, value)
    session.run_with_iobinding(binding)
    return binding.get_outputs()[0].numpy()
