"""A tiny ONNX graph builder the ONNX pass tests share."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper
from onnx import helper as oh

OPSET = 18
F32 = TensorProto.FLOAT


class GraphBuilder:
    """A tiny graph builder over onnx.helper with seeded random initializers."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.nodes: list = []
        self.inits: list = []
        self._n = 0

    def name(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}{self._n}"

    def init(self, array: np.ndarray, prefix: str = "w") -> str:
        name = self.name(prefix)
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def randn(self, *shape, dtype=np.float32, prefix="w") -> str:
        return self.init(self.rng.standard_normal(shape).astype(dtype), prefix)

    def node(self, op: str, inputs: list[str], n_out: int = 1, **attrs) -> str | list[str]:
        outs = [self.name(op.lower()) for _ in range(n_out)]
        self.nodes.append(oh.make_node(op, inputs, outs, name=self.name(op), **attrs))
        return outs[0] if n_out == 1 else outs

    def bn(self, x: str, channels: int, *, dtype=np.float32, epsilon: float = 1e-3, **attrs) -> str:
        r = self.rng
        params = [
            self.init((r.random(channels) + 0.5).astype(dtype), "gamma"),
            self.init(r.standard_normal(channels).astype(dtype), "beta"),
            self.init(r.standard_normal(channels).astype(dtype), "mean"),
            self.init((r.random(channels) * 2 + 0.1).astype(dtype), "var"),
        ]
        n_out = 3 if attrs.get("training_mode") else 1
        out = self.node("BatchNormalization", [x, *params], n_out=n_out, epsilon=epsilon, **attrs)
        return out if n_out == 1 else out[0]

    def model(self, inputs: list[tuple[str, int, list]], outputs: list[tuple[str, int]]) -> onnx.ModelProto:
        graph = oh.make_graph(
            self.nodes, "g",
            [oh.make_tensor_value_info(n, t, s) for n, t, s in inputs],
            [oh.make_tensor_value_info(n, t, None) for n, t in outputs],
            self.inits,
        )
        model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", OPSET)])
        model.ir_version = 9
        model = onnx.shape_inference.infer_shapes(model)
        onnx.checker.check_model(model)
        return model
