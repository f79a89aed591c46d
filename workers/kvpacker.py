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
    OrtValues on ``device`` or numpy arrays) and returns the same layout (``plan_pack``), the
    pasts as OrtValues left on ``device``: a small ONNX graph (per part and past input: Gather
    the rows, Slice off the unused leading columns, Pad zeros in front; then Concat the parts)
    run by ONNX Runtime with I/O binding. On a GPU that is a device-to-device copy of a few
    hundred microseconds where the host round trip of a GPT-2-small cache costs tens of
    milliseconds (docs/benchmarks.md, ``kvcache``). One graph per number of parts, built on
    first use; only the engine thread calls ``pack``."""

    def __init__(self, n_past: int, dtype: type, providers: Sequence[str], device: str) -> None:
        self.n_past, self.dtype, self.device = n_past, np.dtype(dtype), device
        self.providers = list(providers)
        self._sessions: dict[int, ort.InferenceSession] = {}

    def pack(self, parts: Sequence[tuple[Sequence[Any], np.ndarray, Sequence[int]]]
             ) -> tuple[list[Any], np.ndarray]:
        plan = plan_pack([(mask, rows) for _, mask, rows in parts])
        session = self._session(len(plan.parts))
        binding = session.io_binding()
        for p, (source, rows, first, pad) in enumerate(plan.parts):
            binding.bind_cpu_input(f"rows_{p}", np.array(rows, dtype=np.int64))
            binding.bind_cpu_input(f"start_{p}", np.array([first], dtype=np.int64))
            binding.bind_cpu_input(f"pads_{p}", np.array([0, 0, pad, 0, 0, 0, 0, 0], dtype=np.int64))
            for j, value in enumerate(parts[source][0]):
                if isinstance(value, np.ndarray):
                    binding.bind_cpu_input(f"past_{p}_{j}", value)
                else:
                    binding.bind_ortvalue_input(f"past_{p}_{j}", value)
        for j in range(self.n_past):
            binding.bind_output(f"packed_{j}", self.device)
        session.run_with_iobinding(binding)
        return list(binding.get_outputs()), plan.mask

    def _session(self, n_parts: int) -> ort.InferenceSession:
        if n_parts not in self._sessions:
            self._sessions[n_parts] = ort.InferenceSession(
                self._graph(n_parts).SerializeToString(), providers=self.providers)
        return self._sessions[n_parts]

    def _graph(self, n_parts: int) -> Any:
        from onnx import TensorProto, helper

        elem = TensorProto.FLOAT16 if self.dtype == np.float16 else TensorProto.FLOAT
        int64 = TensorProto.INT64
        inputs, nodes = [], []
        inits = [helper.make_tensor("ends", int64, [1], [np.iinfo(np.int64).max]),
                 helper.make_tensor("axes", int64, [1], [2])]
        for p in range(n_parts):
            inputs += [helper.make_tensor_value_info(f"rows_{p}", int64, [f"K{p}"]),
                       helper.make_tensor_value_info(f"start_{p}", int64, [1]),
                       helper.make_tensor_value_info(f"pads_{p}", int64, [8])]
            for j in range(self.n_past):
                name = f"past_{p}_{j}"
                inputs.append(helper.make_tensor_value_info(name, elem, [f"B{p}", "H", f"T{p}", "D"]))
                nodes += [
                    helper.make_node("Gather", [name, f"rows_{p}"], [f"rows_{p}_{j}"], axis=0),
                    helper.make_node("Slice", [f"rows_{p}_{j}", f"start_{p}", "ends", "axes"],
                                     [f"cols_{p}_{j}"]),
                    helper.make_node("Pad", [f"cols_{p}_{j}", f"pads_{p}"], [f"part_{p}_{j}"]),
                ]
        outputs = []
        for j in range(self.n_past):
            nodes.append(helper.make_node("Concat", [f"part_{p}_{j}" for p in range(n_parts)],
                                          [f"packed_{j}"], axis=0))
            outputs.append(helper.make_tensor_value_info(f"packed_{j}", elem, ["B", "H", "T", "D"]))
        graph = helper.make_graph(nodes, f"kv_pack_{n_parts}", inputs, outputs, inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        model.ir_version = IR_VERSION
        return model
