"""FLOPs of ONNX models from shape inference on the example's input shapes."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, numpy_helper
from onnx import helper as oh

from ptool.ir.onnx_flops import estimate_onnx_flops


def _model(node, inputs, weights):
    graph = oh.make_graph([node], "g", [oh.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
                          [oh.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(np.zeros(s, np.float32), n) for n, s in weights])
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 18)])


@pytest.mark.parametrize("node,inputs,weights,shapes,flops", [
    # MatMul (batch, seq, 16) @ (16, 4) at batch 2, seq 8: 2 * (2*8*4) * 16
    (oh.make_node("MatMul", ["x", "w"], ["y"]), [("x", ["batch", "seq", 16])], [("w", (16, 4))],
     {"x": (2, 8, 16)}, 2 * 2 * 8 * 4 * 16),
    # Gemm with transB: x (3, 16), w (5, 16): 2 * 3 * 5 * 16
    (oh.make_node("Gemm", ["x", "w"], ["y"], transB=1), [("x", [3, 16])], [("w", (5, 16))], {}, 2 * 3 * 5 * 16),
    # Conv 3->8, 3x3, pad 1 on 1x3x10x10: 2 * (1*8*10*10) * 3*3*3
    (oh.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1]), [("x", ["n", 3, "h", "w"])], [("w", (8, 3, 3, 3))],
     {"x": (1, 3, 10, 10)}, 2 * 8 * 10 * 10 * 27),
    # grouped Conv: 8 -> 8, groups 4, 3x3 on 1x8x6x6, no pad -> out 1x8x4x4: 2 * 128 * (2*9)
    (oh.make_node("Conv", ["x", "w"], ["y"], group=4), [("x", [1, 8, 6, 6])], [("w", (8, 2, 3, 3))], {},
     2 * 8 * 4 * 4 * 18),
    # ConvTranspose 4 -> 2, 2x2 stride 2 on 1x4x5x5: 2 * numel(in) * C_out * 4
    (oh.make_node("ConvTranspose", ["x", "w"], ["y"], strides=[2, 2]), [("x", [1, 4, 5, 5])], [("w", (4, 2, 2, 2))],
     {}, 2 * 100 * 2 * 4),
])
def test_formulas(node, inputs, weights, shapes, flops):
    estimate = estimate_onnx_flops(_model(node, inputs, weights), shapes)
    assert (estimate.total, estimate.unknown) == (flops, 0)
    assert estimate.by_op[node.op_type] == flops


def test_unknown_shapes_are_counted_not_guessed():
    model = _model(oh.make_node("MatMul", ["x", "w"], ["y"]), [("x", ["batch", "seq", 16])], [("w", (16, 4))])
    estimate = estimate_onnx_flops(model, {})  # no example shapes: 'batch' and 'seq' stay symbolic
    assert (estimate.total, estimate.unknown) == (0, 1)
