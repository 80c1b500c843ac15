"""``precision`` on ONNX models: fp16 islands around MatMul / Gemm / Conv, checked against the same
arithmetic written out in numpy, the sites it leaves float32, and the options it refuses."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

import ptool
from ptool.errors import PassError
from tests.passes.onnx._builder import F32
from tests.passes.onnx._builder import GraphBuilder as _Builder


def _model():
    """MatMul(x, W) -> Add(b) -> Softmax -> MatMul(., x^T-shaped activation) and a Gemm beside."""
    b = _Builder(3)
    w, bias, wg, c = b.randn(16, 16), b.randn(16), b.randn(8, 16), b.randn(8)
    h = b.node("Softmax", [b.node("Add", [b.node("MatMul", ["x", w]), bias])], axis=-1)
    b.node("MatMul", [h, "v"])
    b.nodes[-1].output[0] = "y"
    b.node("Gemm", ["x", wg, c], transB=1)
    b.nodes[-1].output[0] = "g"
    proto = b.model([("x", F32, [4, 16]), ("v", F32, [16, 5])], [("y", F32), ("g", F32)])
    weights = {t.name: np.frombuffer(t.raw_data, np.float32).reshape(t.dims) for t in proto.graph.initializer}
    return proto, [weights[n] for n in (w, bias, wg, c)]


def _feeds():
    rng = np.random.default_rng(0)
    return {"x": rng.standard_normal((4, 16)).astype(np.float32), "v": rng.standard_normal((16, 5)).astype(np.float32)}


def test_fp16_sites_compute_in_fp16_and_the_rest_in_float32():
    proto, (w, bias, wg, c) = _model()
    feeds = _feeds()
    m2 = ptool.transform(proto, ["precision:dtype=fp16"], example_inputs=feeds)
    record = m2.report.records[0]
    assert record.rewritten == 3 and record.within_contract

    graph = m2.onnx_model.graph
    assert [n.op_type for n in graph.node].count("Cast") == 3 + 3  # x (shared by two sites), h, v; three outputs back
    stored = sorted(onnx.TensorProto.DataType.Name(t.data_type) for t in graph.initializer)
    assert stored == ["FLOAT", "FLOAT16", "FLOAT16", "FLOAT16"]  # the Add's bias stays float32

    half = lambda a: a.astype(np.float16)  # noqa: E731
    x16, v16 = half(feeds["x"]), half(feeds["v"])
    logits = (x16 @ half(w)).astype(np.float32) + bias
    soft = np.exp(logits - logits.max(-1, keepdims=True))
    soft /= soft.sum(-1, keepdims=True)
    y_ref = (half(soft) @ v16).astype(np.float32)
    g_ref = (x16 @ half(wg).T + half(c)).astype(np.float32)
    y, g = m2(**feeds)
    assert y.dtype == g.dtype == torch.float32
    np.testing.assert_allclose(y.numpy(), y_ref, rtol=0, atol=2e-3)
    np.testing.assert_allclose(g.numpy(), g_ref, rtol=0, atol=2e-2)
    assert np.abs(g.numpy() - (feeds["x"] @ wg.T + c)).max() > 0  # really rounded: not the float32 result


def test_exclude_keeps_a_site_float32_and_says_so():
    proto, _ = _model()
    m2 = ptool.transform(proto, ["precision:dtype=fp16,exclude=*Gemm*"], example_inputs=_feeds())
    record = m2.report.records[0]
    assert record.rewritten == 2
    assert any("exclude pattern '*Gemm*'" in s.reason for s in record.skipped)


def test_integer_sites_are_left_alone_silently():
    b = _Builder(0)
    w = b.init(np.ones((4, 4), np.int32))
    b.node("MatMul", ["x", w])
    b.nodes[-1].output[0] = "y"
    proto = b.model([("x", 6, [2, 4])], [("y", 6)])
    m2 = ptool.transform(proto, ["precision:dtype=fp16"], example_inputs={"x": np.ones((2, 4), np.int32)})
    assert m2.report.records[0].rewritten == 0 and not m2.report.records[0].skipped


@pytest.mark.parametrize("spec, says", [
    ("precision:dtype=bf16", "no bfloat16 MatMul/Gemm/Conv kernels"),
    ("precision:dtype=fp16,keep_float=1", "keep_float needs per-layer errors"),
])
def test_what_onnx_cannot_do_is_refused_in_one_line(spec, says):
    proto, _ = _model()
    with pytest.raises(PassError, match=says) as info:
        ptool.transform(proto, [spec], example_inputs=_feeds())
    assert "\n" not in str(info.value)


def test_the_fp16_model_passes_the_checker_and_keeps_no_dead_float32_weights():
    proto, _ = _model()
    m2 = ptool.transform(proto, ["precision:dtype=fp16"], example_inputs=_feeds())
    graph = m2.onnx_model
    onnx.checker.check_model(graph, full_check=True)
    read = {i for n in graph.graph.node for i in n.input}
    assert all(t.name in read for t in graph.graph.initializer)
    assert sum(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.graph.initializer) == 3
