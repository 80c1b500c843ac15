"""``quantize`` on ONNX models: the integer forms ONNX Runtime runs, checked against the integer
arithmetic written out in numpy, and the sites it leaves float with their reasons."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

import ptool
from ptool.errors import PassError
from ptool.passes.quant import quantizers as qz
from tests.passes.onnx._builder import F32
from tests.passes.onnx._builder import GraphBuilder as _Builder


def _mlp(seed: int = 0):
    """MatMul(x, W1) -> Relu -> Gemm(transB, alpha, beta, C) -> output 'y'; an embedding Gather beside.
    Returns the model and its weights (w1, the Gemm's B (8, 32), C, the table)."""
    b = _Builder(seed)
    w1, wg, c, table = b.randn(16, 32), b.randn(8, 32), b.randn(8), b.randn(20, 6, prefix="table")
    h = b.node("Relu", [b.node("MatMul", ["x", w1])])
    b.node("Gemm", [h, wg, c], transB=1, alpha=0.5, beta=2.0)
    b.nodes[-1].output[0] = "y"
    b.node("Gather", [table, "ids"])
    b.nodes[-1].output[0] = "e"
    proto = b.model([("x", F32, ["batch", 16]), ("ids", 7, ["batch", 3])], [("y", F32), ("e", F32)])
    w = _weights(proto)
    return proto, [w[n] for n in (w1, wg, c, table)]


def _feeds(batch: int = 5):
    rng = np.random.default_rng(7)
    return {"x": rng.standard_normal((batch, 16)).astype(np.float32), "ids": rng.integers(0, 20, (batch, 3))}


def _weights(proto):
    return {t.name: np.frombuffer(t.raw_data, np.float32).reshape(t.dims) for t in proto.graph.initializer}


def _dynamic_uint8(x: np.ndarray) -> tuple[np.ndarray, np.float32, np.float32]:
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = np.float32((hi - lo) / 255)
    zero = np.float32(np.clip(np.round(-lo / scale), 0, 255))
    return np.clip(np.round(x / scale) + zero, 0, 255), scale, zero


def _int8_matmul_reference(x: np.ndarray, w_in_out: np.ndarray) -> np.ndarray:
    """DynamicQuantizeLinear(x) @ per-channel symmetric int8 W, in exact integer arithmetic."""
    levels, scales = qz.quantize_weight(torch.from_numpy(w_in_out.T.copy()), 8)
    xq, x_scale, x_zero = _dynamic_uint8(x)
    acc = (xq.astype(np.int64) - int(x_zero)) @ levels.numpy().T.astype(np.int64)
    return acc.astype(np.float32) * (x_scale * scales.reshape(-1).numpy())


def test_int8_dynamic_runs_integer_kernels_with_the_integer_arithmetic():
    proto, (w1, w_gemm, c, table) = _mlp()
    m2 = ptool.transform(proto, ["quantize"], example_inputs=_feeds())
    ops = [n.op_type for n in m2.onnx_model.graph.node]
    assert ops.count("MatMulInteger") == 2 and ops.count("DynamicQuantizeLinear") == 2
    assert "MatMul" not in ops and "Gemm" not in ops
    assert m2.report[0].rewritten == 3 and not m2.report[0].skipped  # 2 linears + the embedding
    feeds = _feeds()
    y, e = m2(**feeds)
    h = np.maximum(_int8_matmul_reference(feeds["x"], w1), 0)
    want = _int8_matmul_reference(h, 0.5 * w_gemm.T) + 2.0 * c
    np.testing.assert_allclose(y.numpy(), want, rtol=1e-5, atol=1e-5)
    levels, scales = qz.quantize_weight(torch.from_numpy(table.copy()), 8)
    want_e = (levels.numpy().astype(np.float32) * scales.numpy())[feeds["ids"]]
    np.testing.assert_allclose(e.numpy(), want_e, rtol=1e-6)
    notes = m2.report[0].notes
    assert notes["weight_bytes_after"] < notes["weight_bytes_before"] / 3  # int8 + scales vs float32


def test_per_token_and_int4_match_their_arithmetic():
    proto, (w1, *_) = _mlp(1)
    feeds = _feeds()
    x = feeds["x"]
    m2 = ptool.transform(proto, ["quantize:activations=per-token,embeddings=false"], example_inputs=feeds)
    first = m2.onnx_model.graph
    levels, scales = qz.quantize_weight(torch.from_numpy(w1.T.copy()), 8)
    row = np.maximum(np.abs(x).max(-1, keepdims=True), np.finfo(np.float32).tiny) / 127
    xq = np.clip(np.round(x / row), -127, 127)
    want = (xq @ levels.numpy().T.astype(np.float32)) * row * scales.reshape(-1).numpy()
    hidden = ptool.transform(_one_matmul(w1), ["quantize:activations=per-token"],
                             example_inputs={"x": x})(x=x)
    np.testing.assert_allclose(hidden.numpy(), want, rtol=1e-5, atol=1e-5)
    assert "Gather" in [n.op_type for n in first.node if n.op_type == "Gather"]  # embeddings=false: float table
    m4 = ptool.transform(_one_matmul(w1), ["quantize:mode=int4-weight,group_size=16"],
                         example_inputs={"x": x})
    assert [n.op_type for n in m4.onnx_model.graph.node] == ["MatMulNBits"]
    lv, sc, zp = qz.quantize_weight_asymmetric(torch.from_numpy(w1.T.copy()), 4, 16)
    deq = (lv.float() - zp.float().repeat_interleave(16, 1)) * sc.repeat_interleave(16, 1)
    np.testing.assert_allclose(m4(x=x).numpy(), x @ deq.numpy().T, rtol=1e-4, atol=1e-4)


def _one_matmul(w1):
    b = _Builder(0)
    b.node("MatMul", ["x", b.init(w1)])
    b.nodes[-1].output[0] = "y"
    return b.model([("x", F32, ["batch", 16])], [("y", F32)])


def test_sites_left_float_say_why_and_options_that_need_torch_refuse():
    b = _Builder(3)
    y = b.node("MatMul", ["x", "w_in"])  # a weight given at run time: not a site at all
    y = b.node("MatMul", [y, b.randn(4, 4)])
    y = b.node("Gemm", [y, b.randn(4, 4)], transA=1)
    b.nodes[-1].output[0] = "y"
    proto = b.model([("x", F32, [4, 4]), ("w_in", F32, [4, 4])], [("y", F32)])
    feeds = {"x": np.ones((4, 4), np.float32), "w_in": np.eye(4, dtype=np.float32)}
    row = ptool.transform(proto, ["quantize:exclude=MatMul*"], example_inputs=feeds).report[0]
    _, matmul, gemm = (n.name for n in proto.graph.node)
    assert {s.site: s.reason for s in row.skipped} == {
        f"{matmul} (MatMul)": "kept float: matches exclude pattern 'MatMul*'",
        f"{gemm} (Gemm)": "kept float: the Gemm transposes its input (transA=1)",
    }
    assert row.rewritten == 0
    for spec, fragment in (("quantize:keep_float=1", "exclude="),
                           ("quantize:mode=int4-weight,group_size=8", "power of 2 >= 16"),
                           ("quantize:attention=int8", "attention=int8 rewrites scaled_dot_product_attention in "
                                                       "torch graphs"),
                           ("quantize:attention=bf16", "give ptool the torch model")):
        with pytest.raises(PassError, match=fragment):
            ptool.transform(proto, [spec], example_inputs=feeds)


def test_a_quantized_graph_output_keeps_its_name_and_the_float_weights_go():
    m2 = ptool.transform(_mlp()[0], ["quantize"], example_inputs=_feeds())
    model = ir.from_proto(m2.onnx_model)
    assert [o.name for o in model.graph.outputs] == ["y", "e"]
    dtypes = {v.const_value.dtype for v in model.graph.initializers.values()}
    assert ir.DataType.INT8 in dtypes
    big_floats = [v.name for v in model.graph.initializers.values()
                  if v.const_value.dtype == ir.DataType.FLOAT and v.const_value.size >= 64]
    assert big_floats == []  # every float matrix replaced by its int8 levels


def _conv_net():
    b = _Builder(5)
    y = b.node("Conv", ["x", b.randn(8, 3, 3, 3), b.randn(8)], pads=[1, 1, 1, 1])
    y = b.node("Relu", [b.node("Conv", [y, b.randn(4, 8, 1, 1)])])
    b.nodes[-1].output[0] = "y"
    return b.model([("x", F32, [1, 3, 16, 16])], [("y", F32)])


def test_int8_static_writes_qdq_that_onnx_runtime_fuses_into_integer_convs(tmp_path):
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    calibration = [{"x": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)} for _ in range(6)]
    m2 = ptool.transform(_conv_net(), ["quantize:mode=int8-static"], example_inputs=calibration[0],
                         calibration=calibration)
    row = m2.report[0]
    assert row.rewritten == 2 and row.within_contract and row.fidelity.cosine >= 0.999
    ops = [n.op_type for n in m2.onnx_model.graph.node]
    # the second conv reads the first one's output Q/DQ pair: 3 activation pairs, not 4
    assert ops.count("QuantizeLinear") == 3 and ops.count("Conv") == 2
    assert [o.name for o in m2.onnx_model.graph.output] == ["y"]
    path = m2.save(tmp_path / "static.onnx")
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    fused = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert fused.count("QLinearConv") == 2 and "Conv" not in fused
    with pytest.raises(PassError, match="needs calibration data"):
        ptool.transform(_conv_net(), ["quantize:mode=int8-static"], example_inputs=calibration[0])


def test_int8_static_below_opset_13_uses_per_tensor_weight_scales():
    proto = _conv_net()
    proto.opset_import[0].version = 11
    rng = np.random.default_rng(0)
    calibration = [{"x": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)} for _ in range(4)]
    m2 = ptool.transform(proto, ["quantize:mode=int8-static"], example_inputs=calibration[0], calibration=calibration)
    assert "per-tensor" in m2.report[0].notes["weights"] and m2.report[0].rewritten == 2
    assert not any(a.name == "axis" for n in m2.onnx_model.graph.node if n.op_type == "DequantizeLinear"
                   for a in n.attribute)
    assert m2.report[0].fidelity.cosine >= 0.99
