"""ONNX-level passes (``ptool/passes/onnx``): fold-bn, dce, cse, constant-fold and the ONNX manager.

Models are built with ``onnx.helper`` so that real BatchNormalization nodes (and dead / duplicated /
constant subgraphs) reach the passes: the dynamo exporter would fold or clean them itself. Each
numeric check runs ONNX Runtime on the model before and after (independently of ptool's own
verification) and requires ``max_rel_error <= 1e-5``.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, numpy_helper
from onnx import helper as oh

import ptool
from ptool.errors import PassError, VerificationError
from ptool.passes.base import Family, Pass, PassContext, PassResult
from ptool.passes.fold_bn import FoldBatchNorm
from ptool.passes.onnx import ONNX_IMPLEMENTATIONS, onnx_implementation
from ptool.passes.onnx.fold_bn import fold_batch_norms
from ptool.pipeline.manager import run_pipeline
from ptool.pipeline.onnx_ir import OnnxIR
from ptool.verify import NOISE_FACTOR, Close, Exact, compare
from tests.passes.onnx._builder import F32
from tests.passes.onnx._builder import GraphBuilder as _Builder

# --- builders ------------------------------------------------------------------------------

def conv_bn_model() -> onnx.ModelProto:
    """Conv(+bias, padded)+BN, Conv(no bias, grouped)+BN, ConvTranspose(grouped)+BN, BN->Conv(unpadded)."""
    b = _Builder(1)
    y = b.bn(b.node("Conv", ["x", b.randn(8, 3, 3, 3), b.randn(8)], pads=[1, 1, 1, 1]), 8)
    y = b.node("Relu", [y])
    y = b.bn(b.node("Conv", [y, b.randn(8, 4, 3, 3)], group=2, pads=[1, 1, 1, 1]), 8)
    y = b.bn(b.node("ConvTranspose", [y, b.randn(8, 3, 2, 2), b.randn(6)], group=2, strides=[2, 2]), 6)
    y = b.node("Relu", [y])
    y = b.node("Conv", [b.bn(y, 6), b.randn(4, 6, 3, 3), b.randn(4)])  # BN before an unpadded conv
    b.nodes[-1].output[0] = "y"
    return b.model([("x", F32, ["batch", 3, 8, 8])], [("y", F32)])


def gemm_bn_model() -> onnx.ModelProto:
    """Gemm(transB, alpha, beta, bias)+BN, Gemm(no bias)+BN, BN->Gemm (fold into next)."""
    b = _Builder(2)
    y = b.bn(b.node("Gemm", ["x", b.randn(12, 10), b.randn(12)], transB=1, alpha=1.3, beta=0.5), 12)
    y = b.node("Tanh", [y])
    y = b.bn(b.node("Gemm", [y, b.randn(12, 7)]), 7)
    y = b.node("Tanh", [y])
    y = b.node("Gemm", [b.bn(y, 7), b.randn(7, 5), b.randn(5)], alpha=0.7, beta=2.0)
    b.nodes[-1].output[0] = "y"
    return b.model([("x", F32, ["batch", 10])], [("y", F32)])


def unfoldable_bn_model() -> onnx.ModelProto:
    """BNs no rule may fold: after a Relu and before a padded Conv; after a Conv whose output is reused."""
    b = _Builder(3)
    y = b.node("Relu", ["x"])
    y = b.node("Conv", [b.bn(y, 3), b.randn(4, 3, 3, 3)], pads=[1, 1, 1, 1])
    c = b.node("Conv", [y, b.randn(4, 4, 1, 1)])
    y = b.node("Add", [b.bn(c, 4), c])
    b.nodes[-1].output[0] = "y"
    return b.model([("x", F32, [1, 3, 8, 8])], [("y", F32)])


def cleanup_model() -> onnx.ModelProto:
    """A dead Sigmoid (dce), a duplicated MatMul+Add (cse), a Constant*Constant subgraph (constant-fold)."""
    b = _Builder(4)
    w, c = b.randn(6, 6), b.randn(6)
    first = b.node("Add", [b.node("MatMul", ["x", w]), c])
    second = b.node("Add", [b.node("MatMul", ["x", w]), c])
    b.node("Sigmoid", ["x"])  # dead
    b.nodes.append(oh.make_node("Constant", [], ["k1"], value=numpy_helper.from_array(np.full((6,), 0.5, np.float32))))
    b.nodes.append(oh.make_node("Constant", [], ["k2"], value=numpy_helper.from_array(np.arange(6, dtype=np.float32))))
    folded = b.node("Mul", ["k1", "k2"])
    b.node("Add", [b.node("Mul", [first, second]), folded])
    b.nodes[-1].output[0] = "y"
    return b.model([("x", F32, ["batch", 6])], [("y", F32)])


def _run(proto: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feeds)


def _max_rel(proto_a, proto_b, feeds) -> float:
    a = [torch.from_numpy(o) for o in _run(proto_a, feeds)]
    b = [torch.from_numpy(o) for o in _run(proto_b, feeds)]
    return compare(a, b).max_rel_error


def _ops(proto: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in proto.graph.node]


# --- fold-bn -------------------------------------------------------------------------------

@pytest.mark.parametrize("builder, shape, folded", [(conv_bn_model, (2, 3, 8, 8), 4), (gemm_bn_model, (3, 10), 3)])
def test_fold_bn_removes_batch_norms_and_keeps_outputs(builder, shape, folded):
    proto = builder()
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    m = ptool.transform(proto, ["fold-bn"], example_inputs=(torch.from_numpy(x),))
    assert "BatchNormalization" not in _ops(m.onnx_model)
    assert _max_rel(proto, m.onnx_model, {"x": x}) <= 1e-5
    row = m.report["fold-bn"]
    assert row.rewritten == folded and not row.skipped
    assert row.nodes_after == row.nodes_before - folded
    assert row.fidelity is not None and row.fidelity.max_rel_error <= 1e-5
    assert m.report.capture == "onnx" and m.report.total.max_rel_error <= 1e-5
    out = m(torch.from_numpy(x))  # the module runs ORT and returns torch
    assert isinstance(out, torch.Tensor)
    assert compare(torch.from_numpy(_run(proto, {"x": x})[0]), out).max_rel_error <= 1e-5
    onnx.checker.check_model(m.onnx_model)


def test_fold_bn_does_not_touch_the_users_model():
    proto = conv_bn_model()
    before = proto.SerializeToString()
    ptool.transform(proto, ["fold-bn"])
    assert proto.SerializeToString() == before


def test_fold_bn_skips_with_reasons():
    proto = unfoldable_bn_model()
    m = ptool.transform(proto, ["fold-bn"])
    row = m.report["fold-bn"]
    assert row.rewritten == 0 and not row.fidelity.max_abs_error
    before_conv, after_conv = (s.reason for s in row.skipped)
    assert "input comes from Relu" in before_conv and "zero-pads its input" in before_conv
    assert "output is also used elsewhere" in after_conv and "feeds Add" in after_conv
    assert _ops(m.onnx_model).count("BatchNormalization") == 2


def test_fold_bn_fold_into_next_option():
    m = ptool.transform(conv_bn_model(), ["fold-bn:fold_into_next=false"])
    row = m.report[0]
    assert row.rewritten == 3 and len(row.skipped) == 1
    assert "fold_into_next=false" in row.skipped[0].reason


def test_fold_bn_training_mode_is_skipped():
    # onnxscript's fuse_batchnorm_into_conv folds this one (and changes the outputs).
    b = _Builder(5)
    b.bn(b.node("Conv", ["x", b.randn(4, 3, 3, 3)]), 4, training_mode=1)
    b.nodes[-1].output[0] = "y"
    model = ir.from_proto(b.model([("x", F32, [2, 3, 8, 8])], [("y", F32)]))
    result = fold_batch_norms(FoldBatchNorm(), model, PassContext())
    assert not result.changed and "training mode" in result.skipped[0].reason


def test_fold_bn_float16_layer_with_float32_statistics():
    # onnxscript's rule writes float32 weights into the float16 Conv: an invalid model.
    b = _Builder(6)
    y = b.bn(b.node("Conv", ["x", b.randn(4, 3, 3, 3, dtype=np.float16), b.randn(4, dtype=np.float16)]), 4)
    b.nodes[-1].output[0] = "y"
    proto = b.model([("x", TensorProto.FLOAT16, [1, 3, 8, 8])], [("y", TensorProto.FLOAT16)])
    assert y
    # verified: Close's rtol is raised to what float16 can resolve (verify.EPS_FACTOR x eps)
    m = ptool.transform(proto, ["fold-bn"])
    assert m.report["fold-bn"].fidelity.eps == np.finfo(np.float16).eps
    assert "BatchNormalization" not in _ops(m.onnx_model)
    assert {t.data_type for t in m.onnx_model.graph.initializer} == {TensorProto.FLOAT16}
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float16)
    assert _max_rel(proto, m.onnx_model, {"x": x}) < 5e-3  # float16 rounding of the folded weights


def test_fold_bn_is_idempotent_and_cleans_initializers():
    m = ptool.transform(conv_bn_model(), ["fold-bn", "fold-bn"])
    assert m.report[1].rewritten == 0 and m.report[1].nodes_before == m.report[1].nodes_after
    names = {t.name for t in m.onnx_model.graph.initializer}
    used = {i for n in m.onnx_model.graph.node for i in n.input}
    assert names <= used  # no BN statistics or old weights left behind
    assert all(n.metadata_props[0].value == "fold-bn" for n in m.onnx_model.graph.node if n.op_type.startswith("Conv"))


def test_fold_bn_keeps_graph_output_name():
    b = _Builder(7)
    b.bn(b.node("Conv", ["x", b.randn(4, 3, 1, 1)]), 4)
    b.nodes[-1].output[0] = "logits"
    proto = b.model([("x", F32, [1, 3, 4, 4])], [("logits", F32)])
    m = ptool.transform(proto, ["fold-bn"])
    assert _ops(m.onnx_model) == ["Conv"] and m.output_names == ["logits"]


# --- cleanup -------------------------------------------------------------------------------

def test_cleanup_passes_on_onnx():
    proto = cleanup_model()
    m = ptool.transform(proto, ["dce", "cse", "constant-fold"])
    dce, cse, fold = m.report
    assert dce.rewritten == 1 and dce.notes["removed_ops"] == {"Sigmoid": 1}
    assert cse.rewritten == 2 and cse.notes["merged_ops"] == {"MatMul": 1, "Add": 1}
    assert fold.rewritten == 1 and fold.notes["folded_ops"] == {"Mul": 1}
    assert all(r.fidelity.max_abs_error == 0 for r in (dce, cse))
    assert sorted(_ops(m.onnx_model)) == ["Add", "Add", "MatMul", "Mul"]
    x = np.random.default_rng(1).standard_normal((3, 6)).astype(np.float32)
    assert _max_rel(proto, m.onnx_model, {"x": x}) <= 1e-6


def test_constant_fold_respects_growth_budget():
    b = _Builder(8)
    big = b.randn(64, 64)
    y = b.node("Add", ["x", b.node("Transpose", [big])])
    b.node("Add", [y, big])  # the weight stays: folding the Transpose would add 16 KiB
    b.nodes[-1].output[0] = "y"
    proto = b.model([("x", F32, [64, 64])], [("y", F32)])
    row = ptool.transform(proto, ["constant-fold:max_growth_bytes=0"]).report[0]
    assert row.rewritten == 0 and "max_growth_bytes=0" in row.skipped[0].reason
    row = ptool.transform(proto, ["constant-fold"]).report[0]  # the default budget (1 MiB) allows it
    assert row.rewritten == 1 and not row.skipped


def test_constant_fold_budget_is_for_the_whole_pass():
    b = _Builder(8)
    y = "x"
    bigs = [b.randn(64, 64) for _ in range(3)]
    for big in bigs:  # three folds of 16 KiB each; every weight stays read by a second node
        y = b.node("Add", [y, b.node("Transpose", [big])])
    for big in bigs:
        y = b.node("Add", [y, big])
    b.nodes[-1].output[0] = "y"
    proto = b.model([("x", F32, [64, 64])], [("y", F32)])
    m2 = ptool.transform(proto, ["constant-fold:max_growth_bytes=40000"])
    row = m2.report[0]
    assert row.rewritten == 2 and len(row.skipped) == 1  # 2 x 16 KiB fit in 40000 bytes, the third does not
    assert "to the 32768 already added" in row.skipped[0].reason
    grown = sum(v.const_value.nbytes for v in ir.from_proto(m2.onnx_model).graph.initializers.values()) \
        - sum(v.const_value.nbytes for v in ir.from_proto(proto).graph.initializers.values())
    assert grown == 32768 <= 40000


# --- the ONNX manager --------------------------------------------------------------------

def test_onnx_implementations_are_keyed_by_registered_pass_class():
    from ptool.passes.cleanup import CommonSubexpressionElimination, ConstantFold, DeadCodeElimination
    from ptool.passes.registry import registry

    assert {DeadCodeElimination, CommonSubexpressionElimination, ConstantFold, FoldBatchNorm} <= set(ONNX_IMPLEMENTATIONS)
    assert set(ONNX_IMPLEMENTATIONS) <= set(registry().values())
    for cls in registry().values():  # every registered pass either runs on ONNX or says why not
        if cls not in ONNX_IMPLEMENTATIONS:
            with pytest.raises(PassError, match="torch graphs only"):
                onnx_implementation(cls())


class _TorchOnly(Pass):
    """A pass with no ONNX implementation."""

    name = "torch-only"
    family = Family.CLEANUP
    numerics = Exact()


def test_torch_only_pass_raises_pass_error():
    with pytest.raises(PassError, match="'torch-only' works on torch graphs only.*ExportedProgram"):
        onnx_implementation(_TorchOnly())
    with pytest.raises(PassError, match="torch-only"):
        ptool.transform(cleanup_model(), [_TorchOnly()])


class _BreakIt(Pass):
    """An 'exact' pass that changes the numbers."""

    name = "break-it"
    family = Family.CLEANUP
    numerics = Exact()


def _break_it(pass_, model, ctx):
    result = PassResult()
    for node in model.graph:
        if node.op_type == "Sigmoid":
            node.op_type = "Tanh"
            result.hit()
    return result


def test_exact_pass_that_changes_outputs_is_named(monkeypatch):
    monkeypatch.setitem(ONNX_IMPLEMENTATIONS, _BreakIt, _break_it)
    b = _Builder(9)
    b.node("Sigmoid", ["x"])
    b.nodes[-1].output[0] = "y"
    model = ir.from_proto(b.model([("x", F32, [4])], [("y", F32)]))
    feeds = [{"x": np.linspace(-2, 2, 4, dtype=np.float32)}]
    with pytest.raises(VerificationError, match="exact pass 'break-it' changed the outputs.*passes before it: dce"):
        run_pipeline(model, [ptool.passes.parse_pass("dce"), _BreakIt()], PassContext(), OnnxIR(), feeds)


class _Drift(_BreakIt):
    """Stands in for a rewrite exact in real arithmetic whose float drift the model's noise covers."""

    name = "drift"
    numerics = Close(rtol=1e-6)


def test_close_pass_judged_against_the_models_own_float_noise(monkeypatch):
    """A drift within NOISE_FACTOR x the model's own noise floor is float rounding; past it, an error."""
    monkeypatch.setitem(ONNX_IMPLEMENTATIONS, _BreakIt, _break_it)
    monkeypatch.setitem(ONNX_IMPLEMENTATIONS, _Drift, _break_it)
    b = _Builder(9)
    b.node("Sigmoid", ["x"])
    b.nodes[-1].output[0] = "y"
    x = np.linspace(-2, 2, 4, dtype=np.float32)
    drift = float(np.abs(np.tanh(x) - 1 / (1 + np.exp(-x))).max())
    records = run_pipeline(ir.from_proto(b.model([("x", F32, [4])], [("y", F32)])), [_Drift()], PassContext(), OnnxIR(),
                                [{"x": x}], noise_floor=drift / NOISE_FACTOR)
    assert records[0].within_contract and records[0].fidelity.max_abs_error == pytest.approx(drift, rel=1e-5)
    with pytest.raises(VerificationError, match="noise floor"):
        run_pipeline(ir.from_proto(b.model([("x", F32, [4])], [("y", F32)])), [_Drift()], PassContext(), OnnxIR(),
                          [{"x": x}], noise_floor=drift / NOISE_FACTOR / 2)
    with pytest.raises(VerificationError, match="this pass must be bit-exact"):  # bit-exact passes ignore noise
        run_pipeline(ir.from_proto(b.model([("x", F32, [4])], [("y", F32)])), [_BreakIt()], PassContext(), OnnxIR(),
                          [{"x": x}], noise_floor=drift)


def test_report_of_an_onnx_transform_shows_its_noise_floor():
    m2 = ptool.transform(cleanup_model(), ["dce"], example_inputs={"x": np.ones((3, 6), np.float32)})
    assert m2.report.noise is not None and m2.report.noise.max_abs_error >= 0
    assert "noise floor (ONNX Runtime's optimizations on vs off): max abs" in str(m2.report)


def test_manager_records_without_verification():
    model = ir.from_proto(cleanup_model())
    records = run_pipeline(model, [ptool.passes.parse_pass("dce")], PassContext(), OnnxIR(), [])
    assert records[0].fidelity is None and records[0].rewritten == 1 and records[0].seconds >= 0
