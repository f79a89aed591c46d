"""A decoder whose KV cache a step appends to in place, for measurement (``bench kvcache
--inplace``): what the served format would gain from it.

An Optimum-layout decoder returns every ``present.*`` as ``Concat(past, new)``, so each step
copies the whole cache (``bench kvcache --profile-ops``). ``inplace_model`` rebuilds a decoder
made by ``banter.demo.gpt_graph`` (the demo decoder and every ``banter models import`` GPT-2)
from its own weights with ONNX Runtime's ``GroupQueryAttention`` contrib operator: the past and
present of each layer are one buffer of fixed capacity, bound as both input and output, and
``seqlens_k`` says how much of it each row uses. Same weights, same arithmetic: ``Inplace``
checks its logits against the original's. Nothing in the serving path uses this format.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from banter.demo import _Graph, _layer_norm, _linear, _mlp

CONTRIB = "com.microsoft"


def _graph_facts(model: onnx.ModelProto) -> dict:
    """Layers, heads, LayerNorm epsilon and GELU kind of a ``gpt_graph`` decoder."""
    graph = model.graph
    past = [i for i in graph.input if i.name.startswith("past_key_values.")]
    dims = past[0].type.tensor_type.shape.dim
    norms = [n for n in graph.node if n.op_type == "LayerNormalization"]
    eps = next(a.f for a in norms[0].attribute if a.name == "epsilon")
    ops = {n.op_type for n in graph.node}
    return {"n_layer": len(past) // 2, "n_head": dims[1].dim_value, "head_dim": dims[3].dim_value,
            "eps": eps, "gelu": "tanh" if "Tanh" in ops else "erf"}


def inplace_model(model_path: Path) -> tuple[bytes, dict]:
    """The in-place twin of the ``gpt_graph`` decoder at ``model_path`` (ONNX bytes) and its
    geometry. Inputs: ``input_ids``, ``position_ids`` [B, S] int64; ``seqlens_k`` [B] int32 (each
    row's cached length after this pass, minus 1); ``total_sequence_length`` int32 scalar;
    ``past_key.{i}`` / ``past_value.{i}`` [B, H, capacity, D]. Outputs: ``logits`` and
    ``present_key.{i}`` / ``present_value.{i}`` (bind them to the past buffers)."""
    model = onnx.load(str(model_path))
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    if "h.0.q.w" not in weights or not any(i.name.startswith("past_key_values.")
                                            for i in model.graph.input):
        raise ValueError(f"{model_path} is not a banterhearts gpt_graph decoder (its weights "
                         "are not named h.0.q.w and so on, or it has no KV cache inputs)")
    facts = _graph_facts(model)
    g = _Graph(weights, facts["eps"])
    n_layer, heads, hd = facts["n_layer"], facts["n_head"], facts["head_dim"]
    B, S, C = "batch_size", "sequence_length", "capacity"
    x = g.op("Add", g.op("Gather", g.w("wte"), "input_ids"), g.op("Gather", g.w("wpe"), "position_ids"))
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [B, S]),
              helper.make_tensor_value_info("position_ids", TensorProto.INT64, [B, S]),
              helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [B]),
              helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, [])]
    vocab = weights["wte"].shape[0]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [B, S, vocab])]
    for i in range(n_layer):
        p = f"h.{i}"
        h = _layer_norm(g, x, f"{p}.ln_1")
        q, k, v = (_linear(g, h, f"{p}.{n}") for n in "qkv")
        past, present = [f"past_key.{i}", f"past_value.{i}"], [f"present_key.{i}", f"present_value.{i}"]
        g.nodes.append(helper.make_node(
            "GroupQueryAttention", [q, k, v, *past, "seqlens_k", "total_sequence_length"],
            [f"attn_{i}", *present], name=f"GroupQueryAttention_{i}", domain=CONTRIB,
            num_heads=heads, kv_num_heads=heads))
        inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, [B, heads, C, hd]) for n in past]
        outputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, [B, heads, C, hd])
                    for n in present]
        x = g.op("Add", x, _linear(g, f"attn_{i}", f"{p}.o"))
        x = g.op("Add", x, _mlp(g, _layer_norm(g, x, f"{p}.ln_2"), p, facts["gelu"]))
    x = _layer_norm(g, x, "ln_f")
    head = g.w("lm_head") if "lm_head" in weights else g.op("Transpose", g.w("wte"), perm=[1, 0])
    g.op("MatMul", x, head, out="logits")
    graph = helper.make_graph(g.nodes, "inplace", inputs, outputs, g.inits)
    built = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid(CONTRIB, 1)])
    return built.SerializeToString(), facts


class Inplace:
    """A session of ``inplace_model`` on the CPU provider, with one cache buffer per past input
    of ``capacity`` positions for ``rows`` rows, written in place by every pass."""

    def __init__(self, model_path: Path, rows: int, capacity: int) -> None:
        import onnxruntime as ort

        self.ort = ort
        model, facts = inplace_model(model_path)
        options = ort.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(model, sess_options=options,
                                            providers=["CPUExecutionProvider"])
        self.n_layer, self.rows, self.capacity = facts["n_layer"], rows, capacity
        shape = (rows, facts["n_head"], capacity, facts["head_dim"])
        self.buffers = [ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, np.float32))
                        for _ in range(2 * self.n_layer)]

    def load(self, cache: list[np.ndarray]) -> None:
        """Put a ``[rows, H, past, D]`` cache (Optimum order: key, value per layer) in front."""
        for buffer, past in zip(self.buffers, cache):
            whole = buffer.numpy()
            whole[:, :, :past.shape[2]] = past
            buffer.update_inplace(whole)

    def step(self, ids: np.ndarray, positions: np.ndarray, cached: int) -> np.ndarray:
        """One pass of ``ids`` [rows, S] after ``cached`` positions; returns the logits."""
        rows, width = ids.shape
        if cached + width > self.capacity:
            raise ValueError(f"{cached + width} positions exceed the capacity {self.capacity}")
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", ids.astype(np.int64))
        binding.bind_cpu_input("position_ids", positions.astype(np.int64))
        binding.bind_cpu_input("seqlens_k", np.full(rows, cached + width - 1, np.int32))
        binding.bind_cpu_input("total_sequence_length", np.array(cached + width, np.int32))
        binding.bind_output("logits", "cpu")  # get_outputs() follows the binding order
        for i in range(self.n_layer):
            for j, part in enumerate(("key", "value")):
                buffer = self.buffers[2 * i + j]
                binding.bind_ortvalue_input(f"past_{part}.{i}", buffer)
                binding.bind_ortvalue_output(f"present_{part}.{i}", buffer)
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()
