"""Cutting a decoder pass's logits down to each row's last position where they were made."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import onnxruntime as ort

from workers.kvpacker import element_type, graph_session


class LastLogits:
    """Takes ``[B, L, vocab]`` logits, an OrtValue on ``device``, and returns the last
    position's ``[B, 1, vocab]`` as a numpy array: a one-node ONNX graph (Slice) run by ONNX
    Runtime with I/O binding, so only those rows cross to the host. A prompt or merged pass
    makes logits for every new column, and with a real vocabulary that is most of what the
    pass would copy (16 rows x 20 columns x GPT-2's 50,257 tokens: 64 MB, against 3 MB for the
    last column). Built on first use; only the engine's passes call ``take``."""

    def __init__(self, dtype: type, providers: Sequence[str]) -> None:
        self.dtype, self.providers = np.dtype(dtype), list(providers)
        self._session: ort.InferenceSession | None = None

    def take(self, logits: Any) -> np.ndarray:
        session = self._session or self._build()
        binding = session.io_binding()
        binding.bind_ortvalue_input("logits", logits)
        binding.bind_output("last", "cpu")
        session.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()

    def _build(self) -> ort.InferenceSession:
        from onnx import TensorProto, helper

        elem = element_type(self.dtype)
        int64 = TensorProto.INT64
        inits = [helper.make_tensor("starts", int64, [1], [-1]),
                 helper.make_tensor("ends", int64, [1], [np.iinfo(np.int64).max]),
                 helper.make_tensor("axes", int64, [1], [1])]
        graph = helper.make_graph(
            [helper.make_node("Slice", ["logits", "starts", "ends", "axes"], ["last"])],
            "last_logits",
            [helper.make_tensor_value_info("logits", elem, ["B", "L", "V"])],
            [helper.make_tensor_value_info("last", elem, ["B", 1, "V"])], inits)
        self._session = graph_session(graph, self.providers)
        return self._session
