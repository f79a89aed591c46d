"""Re-packing a decoder's KV cache where it lives, without a trip through the host."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import onnxruntime as ort

from workers.batching import plan_pack

OPSET = 17
IR_VERSION = 8  # what every supported onnxruntime (>= 1.17) loads


class KVPacker:
    """Cuts chosen rows of several left-padded KV caches into one, on the caches' device.

    ``pack`` takes what ``batching.pack_rows`` takes (``(pasts, mask, rows)`` parts, the pasts
    OrtValues on ``device`` or numpy arrays, and a number of blank rows) and returns the same
    layout (``plan_pack``), the pasts as OrtValues left on ``device``: a small ONNX graph run by
    ONNX Runtime with I/O binding. Per past input it Gathers each part's kept rows, lays them
    out as one ``[positions, H * D]`` table (Transpose, Reshape), adds a row of zeros, Gathers
    every output position from that table by an index the host computes from the masks (a
    padding or blank position takes the zeros), and shapes the result back to ``[B, H, T, D]``.
    On a GPU that is a few device-to-device copies of a few hundred microseconds where the host
    round trip of a GPT-2-small cache costs tens of milliseconds (docs/benchmarks.md,
    ``kvcache``). One graph per number of parts with rows kept, built on first use; only the
    engine thread calls ``pack``."""

    def __init__(self, n_past: int, dtype: type, providers: Sequence[str], device: str) -> None:
        self.n_past, self.dtype, self.device = n_past, np.dtype(dtype), device
        self.providers = list(providers)
        self._sessions: dict[int, ort.InferenceSession] = {}

    def pack(self, parts: Sequence[tuple[Sequence[Any], np.ndarray, Sequence[int]]],
             blank: int = 0) -> tuple[list[Any], np.ndarray]:
        plan = plan_pack([(mask, rows) for _, mask, rows in parts], blank)
        _, heads, _, dim = _shape(parts[0][0][0])
        used = [p for p, (_, _, rows) in enumerate(parts) if len(rows)]
        session = self._session(len(used))
        binding = session.io_binding()
        base, offset = {}, 0  # each used part's first position in the table
        for k, p in enumerate(used):
            pasts, mask, rows = parts[p]
            base[p], offset = offset, offset + len(rows) * mask.shape[1]
            binding.bind_cpu_input(f"rows_{k}", np.asarray(rows, dtype=np.int64))
            for j, value in enumerate(pasts):
                if isinstance(value, np.ndarray):
                    binding.bind_cpu_input(f"past_{k}_{j}", value)
                else:
                    binding.bind_ortvalue_input(f"past_{k}_{j}", value)
        total = len(plan.rows) + blank
        index = np.full((total, plan.width), offset, dtype=np.int64)  # offset: the zeros row
        local = {p: {row: i for i, row in enumerate(parts[p][2])} for p in used}
        for b, (p, row, columns) in enumerate(plan.rows):
            start = base[p] + local[p][row] * parts[p][1].shape[1]
            index[b, plan.width - len(columns):] = start + columns
        binding.bind_cpu_input("index", index.reshape(-1))
        binding.bind_cpu_input("flat_shape", np.array([-1, heads * dim], dtype=np.int64))
        binding.bind_cpu_input("zero_shape", np.array([1, heads * dim], dtype=np.int64))
        binding.bind_cpu_input("out_shape", np.array([total, plan.width, heads, dim], dtype=np.int64))
        for j in range(self.n_past):
            binding.bind_output(f"packed_{j}", self.device)
        session.run_with_iobinding(binding)
        return list(binding.get_outputs()), plan.mask

    def _session(self, n_parts: int) -> ort.InferenceSession:
        if n_parts not in self._sessions:
            self._sessions[n_parts] = graph_session(self._graph(n_parts), self.providers)
        return self._sessions[n_parts]

    def _graph(self, n_parts: int) -> Any:
        from onnx import TensorProto, helper

        elem = element_type(self.dtype)
        int64 = TensorProto.INT64
        inputs = [helper.make_tensor_value_info("index", int64, ["N"]),
                  helper.make_tensor_value_info("flat_shape", int64, [2]),
                  helper.make_tensor_value_info("zero_shape", int64, [2]),
                  helper.make_tensor_value_info("out_shape", int64, [4])]
        nodes = [helper.make_node("ConstantOfShape", ["zero_shape"], ["zeros"],
                                  value=helper.make_tensor("zero", elem, [1], [0]))]
        for p in range(n_parts):
            inputs.append(helper.make_tensor_value_info(f"rows_{p}", int64, [f"K{p}"]))
        outputs = []
        for j in range(self.n_past):
            tables = []
            for p in range(n_parts):
                name = f"past_{p}_{j}"
                inputs.append(helper.make_tensor_value_info(name, elem, [f"B{p}", "H", f"T{p}", "D"]))
                nodes += [
                    helper.make_node("Gather", [name, f"rows_{p}"], [f"kept_{p}_{j}"], axis=0),
                    helper.make_node("Transpose", [f"kept_{p}_{j}"], [f"by_pos_{p}_{j}"],
                                     perm=[0, 2, 1, 3]),
                    helper.make_node("Reshape", [f"by_pos_{p}_{j}", "flat_shape"], [f"table_{p}_{j}"]),
                ]
                tables.append(f"table_{p}_{j}")
            nodes += [
                helper.make_node("Concat", tables + ["zeros"], [f"table_{j}"], axis=0),
                helper.make_node("Gather", [f"table_{j}", "index"], [f"picked_{j}"], axis=0),
                helper.make_node("Reshape", [f"picked_{j}", "out_shape"], [f"shaped_{j}"],
                                 allowzero=1),  # a width of 0 is 0 columns
                helper.make_node("Transpose", [f"shaped_{j}"], [f"packed_{j}"], perm=[0, 2, 1, 3]),
            ]
            outputs.append(helper.make_tensor_value_info(f"packed_{j}", elem, ["B", "H", "T", "D"]))
        return helper.make_graph(nodes, f"kv_pack_{n_parts}", inputs, outputs)


def element_type(dtype: Any) -> int:
    """The ONNX element type of a float16 or float32 cache or logits."""
    from onnx import TensorProto

    return TensorProto.FLOAT16 if np.dtype(dtype) == np.float16 else TensorProto.FLOAT


def graph_session(graph: Any, providers: Sequence[str]) -> ort.InferenceSession:
    """An ONNX Runtime session of a small graph built here (``KVPacker``, ``LastLogits``), at
    the opset and IR version every supported onnxruntime loads."""
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    return ort.InferenceSession(model.SerializeToString(), providers=list(providers))


def _shape(value: Any) -> tuple[int, ...]:
    """A numpy array's or an OrtValue's shape."""
    return tuple(value.shape) if isinstance(value, np.ndarray) else tuple(value.shape())
