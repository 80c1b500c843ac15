"""Small hand-built ONNX models the ONNX frontend and CLI tests share."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper
from onnx import helper as oh


def reshaping_model() -> onnx.ModelProto:
    """y = Reshape(x, [-1, 4, 8]) * s + b.

    x (batch, length) runs only with length 32 (16, the made-up size, fails in ONNX Runtime's
    Reshape node 'to_heads'); b (batch, 4, 8) shares the symbolic dim 'batch' with x; s is rank 0.
    """
    graph = oh.make_graph(
        [oh.make_node("Reshape", ["x", "shape"], ["r"], name="to_heads"), oh.make_node("Mul", ["r", "s"], ["m"]),
         oh.make_node("Add", ["m", "b"], ["y"])], "g",
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "length"]),
         oh.make_tensor_value_info("s", TensorProto.FLOAT, []),
         oh.make_tensor_value_info("b", TensorProto.FLOAT, ["batch", 4, 8])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 8])],
        [numpy_helper.from_array(np.array([-1, 4, 8], np.int64), "shape")],
    )
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 18)])
