"""bf16 graphs on ONNX Runtime's CPU provider: bf16-stored weights, float32 arithmetic
(ptool/backends/onnx_bf16.py), and the autotuner leaving that candidate out with the reason."""

from __future__ import annotations

import functools

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import ptool
from ptool.backends import onnx_bf16
from ptool.passes.precision import Precision
from tests.models import zoo


def _bf16_linear_model() -> tuple[ir.Model, np.ndarray, np.ndarray]:
    """``y = float(bf16(x) @ W + b)`` with W and b stored in bf16: ORT's CPU provider cannot open it."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 4)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    w16, b16 = (numpy_helper.from_array(a, name) for a, name in ((w, "W"), (b, "B")))
    for t in (w16, b16):  # bf16 initializers: the float32 bits' upper halves (round toward zero)
        arr = numpy_helper.to_array(t).astype(np.float32).view(np.uint32) >> 16
        t.data_type, t.raw_data = TensorProto.BFLOAT16, arr.astype(np.uint16).tobytes()
        t.ClearField("float_data")
    nodes = [helper.make_node("Cast", ["x"], ["x16"], to=TensorProto.BFLOAT16),
             helper.make_node("MatMul", ["x16", "W"], ["mm"]),
             helper.make_node("Add", ["mm", "B"], ["y16"]),
             helper.make_node("Cast", ["y16"], ["y"], to=TensorProto.FLOAT)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], [w16, b16])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    stored = [numpy_helper.to_array(t).astype(np.float32) for t in (w16, b16)]
    return ir.from_proto(onnx.shape_inference.infer_shapes(model)), *stored


def _session(model: ir.Model) -> ort.InferenceSession:
    return ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])


def test_the_cpu_provider_cannot_open_a_bf16_graph_as_exported():
    model, _, _ = _bf16_linear_model()
    with pytest.raises(Exception, match="NOT_IMPLEMENTED"):
        _session(model)


def test_rewritten_it_runs_in_float32_on_the_stored_bf16_weights():
    model, w, b = _bf16_linear_model()
    assert onnx_bf16.compute_in_float32(model) == 5  # W and B read through a Cast; x16, mm, y16 retyped
    assert model.graph.initializers["W"].dtype == onnx_bf16.BF16  # still stored in bf16
    x = np.random.default_rng(1).standard_normal((2, 8)).astype(np.float32)
    (y,) = _session(model).run(None, {"x": x})
    np.testing.assert_allclose(y, x @ w + b, rtol=1e-6, atol=1e-6)  # float32 arithmetic: no bf16 rounding
    assert onnx_bf16.compute_in_float32(model) == 0  # a second run changes nothing


def test_a_float32_model_is_left_as_it_is():
    model = ir.from_proto(helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])))
    assert onnx_bf16.compute_in_float32(model) == 0 and len(model.graph) == 1


@functools.cache
def _bert_on_ort(dtype: str, folder: str):
    fixture = zoo.bert()
    m2 = ptool.transform(fixture.model, [f"precision:dtype={dtype}"], fixture.example_inputs,
                         example_kwargs=fixture.example_kwargs)
    run = ptool.compile(m2, backend="onnxruntime", example_inputs=fixture.example_inputs,
                        example_kwargs=fixture.example_kwargs, onnx_path=f"{folder}/{dtype}.onnx")
    return fixture, m2, run


def test_precision_bf16_compiles_on_onnxruntime_within_the_bound_with_weights_in_bf16(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("ort-bf16"))
    fixture, m2, run = _bert_on_ort("bf16", folder)
    args, kwargs = fixture.heldout(1)
    with torch.no_grad():
        cosine = ptool.verify.compare(m2(*args, **kwargs), run(*args, **kwargs)).cosine
    assert cosine >= Precision.numerics.bound  # measured 0.999997
    assert "computed in float32" in run.info["bf16"]
    stored = onnx.load(f"{folder}/bf16.onnx")
    sizes = {TensorProto.BFLOAT16: 0, TensorProto.FLOAT: 0}
    for t in stored.graph.initializer:
        if t.data_type in sizes:
            sizes[t.data_type] += int(np.prod(t.dims))
    # the matmul and embedding weights are stored in bf16; norms and small constants stay float32
    assert sizes[TensorProto.BFLOAT16] > 0.9 * (sizes[TensorProto.BFLOAT16] + sizes[TensorProto.FLOAT])
