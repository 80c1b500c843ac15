"""An ONNX model on the backends and the tuner: ONNX Runtime with its options, TVM through Relax's
ONNX frontend (the file as it is, no re-export), and ``ptool tune model.onnx``."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper
from onnx import helper as oh

import ptool
from ptool.errors import UsageError


def _paddle_style(path):
    """x (N, 8, ?, ?) -> Conv -> GlobalAveragePool -> Reshape to a shape computed from Shape/Gather/
    Concat (the form Paddle exports write; Relax's importer needs it folded) -> MatMul -> Softmax."""
    rng = np.random.default_rng(0)
    nodes = [
        oh.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        oh.make_node("Relu", ["c"], ["r"]),
        oh.make_node("GlobalAveragePool", ["r"], ["p"]),
        oh.make_node("Shape", ["p"], ["s"]),
        oh.make_node("Gather", ["s", "zero"], ["n"], axis=0),
        oh.make_node("Concat", ["n", "minus_one"], ["flat_shape"], axis=0),
        oh.make_node("Reshape", ["p", "flat_shape"], ["f"]),
        oh.make_node("MatMul", ["f", "fc"], ["logits"]),
        oh.make_node("Softmax", ["logits"], ["y"], axis=-1),
    ]
    inits = [numpy_helper.from_array(rng.standard_normal((16, 8, 3, 3)).astype(np.float32) * 0.2, "w"),
             numpy_helper.from_array(np.array([0], np.int64), "zero"),
             numpy_helper.from_array(np.array([-1], np.int64), "minus_one"),
             numpy_helper.from_array(rng.standard_normal((16, 5)).astype(np.float32), "fc")]
    graph = oh.make_graph(nodes, "paddle_style", [oh.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 8, "?", "?"])],
                          [oh.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 5])], inits)
    onnx.save(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 11)]), str(path))
    return path


@pytest.fixture
def model_file(tmp_path):
    return _paddle_style(tmp_path / "paddle_style.onnx")


def _x():
    return np.random.default_rng(1).standard_normal((1, 8, 12, 20)).astype(np.float32)


def test_onnx_runtime_takes_its_options_on_an_onnx_model(model_file):
    m2 = ptool.transform(model_file, ["dce"], example_inputs={"x": _x()})
    want = m2(_x())
    for options in ({}, {"intra_op_threads": 1, "graph_optimization_level": "basic"}):
        run = ptool.compile(m2, backend="onnxruntime", **options)
        assert run.options == options or set(options) <= set(run.options)
        torch.testing.assert_close(run(torch.from_numpy(_x())), want, rtol=1e-6, atol=1e-7)
    with pytest.raises(UsageError, match="runs on backend 'onnxruntime' or 'tvm', not 'torch'"):
        ptool.compile(m2, backend="torch")


@pytest.mark.slow
def test_tvm_builds_an_onnx_model_with_computed_shapes_and_matches_onnx_runtime(model_file):
    m2 = ptool.transform(model_file, ["dce"], example_inputs={"x": _x()})
    run = ptool.compile(m2, backend="tvm")
    assert run.info["frontend"] == "onnx"
    want = m2(_x())
    got = run(torch.from_numpy(_x()))
    assert float((got - want).abs().max() / want.abs().max()) <= 1e-4


def test_per_token_quantize_on_an_opset_11_model(model_file):
    m2 = ptool.transform(model_file, ["quantize:activations=per-token"], example_inputs={"x": _x()})
    assert m2.report[0].rewritten == 1 and m2.report[0].within_contract
    reduce = next(n for n in m2.onnx_model.graph.node if n.op_type == "ReduceMax")
    assert [a.name for a in reduce.attribute] == ["axes", "keepdims"] and len(reduce.input) == 1  # opset 11 form


def test_autotune_an_onnx_model(model_file, tmp_path):
    best = ptool.autotune(str(model_file), {"x": _x()}, backends=["onnxruntime"], passes=["quantize", "precision"],
                          max_error=0.05, repeat=3, record_dir=tmp_path / "record", progress=False,
                          variants={"onnxruntime": [{}]})
    labels = {r.label: r for r in best.table}
    assert set(labels) == {"exact | onnxruntime", "quantize | onnxruntime"}
    assert all(r.status == "ok" for r in labels.values())
    assert any("precision:dtype=bf16 cannot run on an ONNX model" in n for n in best.notes)
    assert best.config.backend == "onnxruntime"
    out = best.compiled(torch.from_numpy(_x()))
    want = ptool.transform(str(model_file), [], example_inputs={"x": _x()})(_x())
    assert float(torch.nn.functional.cosine_similarity(out.flatten(), want.flatten(), dim=0)) >= 0.95
    with pytest.raises(UsageError, match="not torch"):
        ptool.autotune(str(model_file), {"x": _x()}, backends=["torch"], progress=False)


def test_cli_tune_on_an_onnx_file(model_file, tmp_path, capsys):
    from ptool.cli import main

    code = main(["tune", str(model_file), "--input", "x=1x8x12x20", "--backend", "onnxruntime", "-p", "quantize",
                 "--repeat", "3", "-o", str(tmp_path / "tuned")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "winner: passes [dce, cse, constant-fold, fold-bn" in out
    record = json.loads((tmp_path / "tuned" / "tuning_record.json").read_text())
    assert {r["label"].split(" | ")[1].split("[")[0] for r in record["rows"]} == {"onnxruntime"}
