"""``--input NAME=SHAPE[:DTYPE]`` and ``--inputs FILE.npz`` on the commands that run a model, and
``inspect`` on ONNX files (every subgraph, Constant weights, FLOPs on the given shapes)."""

from __future__ import annotations

import json
import sys
import textwrap

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper
from onnx import helper as oh

from ptool.cli import main
from ptool.cli._inputs import InputShape, parse_input_shape
from tests.models.onnx_graphs import reshaping_model


def _run(capfd: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capfd.readouterr()  # file-descriptor level: ONNX Runtime's C++ log lines land here too
    return code, out, err


@pytest.fixture
def reshaping_onnx(tmp_path):
    """:func:`tests.models.onnx_graphs.reshaping_model` in a file."""
    path = tmp_path / "reshaping.onnx"
    onnx.save(reshaping_model(), str(path))
    return path


def test_made_up_inputs_that_do_not_fit_fail_in_one_line_after_a_note(capfd, reshaping_onnx, tmp_path):
    out_file = tmp_path / "out.onnx"
    code, _, err = _run(capfd, "convert", str(reshaping_onnx), "-p", "dce", "-o", str(out_file), "--verify")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and not out_file.exists()
    assert len(lines) == 2, err  # no ONNX Runtime log lines before them
    assert lines[0].startswith("ptool: note: made up input(s) x (1, 16) float32; s () float32; b (1, 4, 8) float32")
    assert lines[1].startswith("ptool: error: ONNX Runtime failed at node 'to_heads' (Reshape): ")


def test_input_shape_fixes_the_model_and_symbolic_dims_follow(capfd, reshaping_onnx, tmp_path):
    out_file = tmp_path / "out.onnx"
    code, out, err = _run(capfd, "convert", str(reshaping_onnx), "--input", "x=3x32", "-p", "dce",
                          "-o", str(out_file), "--verify")
    assert code == 0, err
    assert "ptool: note: made up input(s) s () float32; b (3, 4, 8) float32" in err  # batch 3 from x
    assert "verify: onnxruntime" in out and out_file.is_file()


def test_inputs_npz_runs_on_the_users_arrays_and_keeps_a_scalar_a_scalar(capfd, reshaping_onnx, tmp_path):
    arrays = tmp_path / "inputs.npz"
    np.savez(arrays, x=np.ones((2, 32), np.float32), s=np.array(2.0, np.float32), b=np.zeros((2, 4, 8), np.float32))
    code, out, err = _run(capfd, "inspect", str(reshaping_onnx), "--inputs", str(arrays), "--json")
    assert code == 0, err
    assert "made up" not in err
    assert json.loads(out)["inputs"].endswith("run on x (2, 32) float32, s () float32, b (2, 4, 8) float32")
    code, out, err = _run(capfd, "bench", str(reshaping_onnx), "--inputs", str(arrays), "--repeat", "3",
                          "--warmup", "1", "--json", str(tmp_path / "bench.json"))
    assert code == 0, err
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert [r["max_abs_error"] for r in rows] == [0.0, 0.0]


@pytest.mark.parametrize("argv,fragment", [
    (["--input", "x=1xa"], "every dim must be a positive integer"),
    (["--input", "x"], "is not NAME=SHAPE[:DTYPE]"),
    (["--input", "x=1x32:float99"], "unknown dtype 'float99'"),
    (["--input", "xx=1x32"], "no input 'xx' (did you mean 'x'?)"),
    (["--input", "b=1x5x8"], "size 4 on axis 1"),
    (["--inputs", "missing.npz"], "does not exist"),
])
def test_bad_inputs_are_one_line_usage_errors(capfd, reshaping_onnx, tmp_path, argv, fragment):
    code, _, err = _run(capfd, "inspect", str(reshaping_onnx), *argv)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("ptool: error: "), err
    assert fragment in lines[0]


def test_an_input_given_twice_is_refused(capfd, reshaping_onnx, tmp_path):
    arrays = tmp_path / "x.npz"
    np.savez(arrays, x=np.ones((1, 32), np.float32))
    code, _, err = _run(capfd, "inspect", str(reshaping_onnx), "--inputs", str(arrays), "--input", "x=1x32")
    assert code == 2 and "given by both --input and --inputs" in err


def test_parse_input_shape():
    assert parse_input_shape("images=1x3x640x640") == InputShape("images", (1, 3, 640, 640), None)
    assert parse_input_shape("ids=1,128:int64") == InputShape("ids", (1, 128), np.dtype("int64"))
    assert parse_input_shape("sr=") == InputShape("sr", (), None)


_TORCH_FIXTURE = textwrap.dedent(
    '''
    import torch
    from torch import nn


    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 8)
            self.out = nn.Linear(8, 3)

        def forward(self, ids, mask):
            return self.out(self.emb(ids) * mask[..., None])


    def tagger():
        torch.manual_seed(0)
        return Tagger().eval(), (torch.randint(0, 50, (1, 6)), torch.ones(1, 6))
    '''
)


@pytest.fixture
def torch_fixture(tmp_path, monkeypatch):
    (tmp_path / "ptool_inputs_fixture.py").write_text(_TORCH_FIXTURE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "ptool_inputs_fixture:tagger"
    sys.modules.pop("ptool_inputs_fixture", None)


def test_torch_model_inputs_replaced_by_name(capfd, torch_fixture, tmp_path):
    code, out, err = _run(capfd, "inspect", torch_fixture, "--input", "ids=2x9", "--input", "mask=2x9", "--json")
    assert code == 0, err
    assert json.loads(out)["inputs"] == "ids (2, 9) int64, mask (2, 9) float32"  # dtypes of the replaced examples
    arrays = tmp_path / "t.npz"
    np.savez(arrays, ids=np.arange(4).reshape(1, 4), mask=np.ones((1, 4), np.float32))
    code, out, err = _run(capfd, "inspect", torch_fixture, "--inputs", str(arrays), "--json")
    assert code == 0, err
    assert json.loads(out)["inputs"] == "ids (1, 4) int64, mask (1, 4) float32"
    code, _, err = _run(capfd, "inspect", torch_fixture, "--input", "idz=2x9")
    assert code == 2 and "no input 'idz' (did you mean 'ids'?)" in err


# --- inspect on ONNX ---------------------------------------------------------------------------

def _branching_onnx(path):
    """y = If(flag, then: x @ W1 (Constant weight), else: x @ W2 (initializer of the main graph))."""
    w1 = numpy_helper.from_array(np.ones((16, 4), np.float32), "w1")
    then_graph = oh.make_graph(
        [oh.make_node("Constant", [], ["w1"], value=w1), oh.make_node("MatMul", ["x", "w1"], ["t"])],
        "then", [], [oh.make_tensor_value_info("t", TensorProto.FLOAT, [1, 8, 4])])
    else_graph = oh.make_graph(
        [oh.make_node("MatMul", ["x", "w2"], ["e"])], "else", [],
        [oh.make_tensor_value_info("e", TensorProto.FLOAT, [1, 8, 4])])
    graph = oh.make_graph(
        [oh.make_node("If", ["flag"], ["y"], then_branch=then_graph, else_branch=else_graph)], "main",
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 16]),
         oh.make_tensor_value_info("flag", TensorProto.BOOL, [])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 4])],
        [numpy_helper.from_array(np.ones((16, 4), np.float32), "w2")],
    )
    onnx.save(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 18)]), str(path))
    return path


def test_inspect_onnx_counts_every_subgraph_constant_weights_and_flops(capfd, tmp_path):
    code, out, err = _run(capfd, "inspect", str(_branching_onnx(tmp_path / "if.onnx")), "--json")
    assert code == 0, err
    figures = json.loads(out)
    assert figures["nodes"] == 3 and figures["graphs"] == 3  # If + a MatMul in each branch
    assert figures["parameters"] == 2 * 16 * 4  # the Constant-node weight and the initializer
    assert figures["parameter_bytes"] == 2 * 16 * 4 * 4
    assert figures["flops"] == 2 * (2 * 8 * 4 * 16)  # each branch's MatMul counted once
    assert figures["flops_unknown_nodes"] == 0


def _conv_onnx(path):
    rng = np.random.default_rng(0)
    graph = oh.make_graph(
        [oh.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]), oh.make_node("Relu", ["c"], ["y"])], "g",
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 8, 8])],
        [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
         numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b")])
    onnx.save(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)]), str(path))
    return path


def test_calibration_npz_feeds_static_quantization(capfd, tmp_path):
    model = _conv_onnx(tmp_path / "conv.onnx")
    calibration = tmp_path / "calib.npz"
    np.savez(calibration, x=np.random.default_rng(1).standard_normal((6, 1, 3, 8, 8)).astype(np.float32))
    out_file = tmp_path / "q.onnx"
    code, out, err = _run(capfd, "convert", str(model), "--input", "x=1x3x8x8", "--calibration", str(calibration),
                          "-p", "quantize:mode=int8-static", "-o", str(out_file), "--verify")
    assert code == 0, err
    assert "verify: onnxruntime on 5 input(s)" in out  # the example and the first 4 calibration batches
    assert "QuantizeLinear" in {n.op_type for n in onnx.load(str(out_file)).graph.node}
    code, _, err = _run(capfd, "convert", str(model), "--input", "x=1x3x8x8", "-p", "quantize:mode=int8-static",
                        "-o", str(out_file))
    assert code == 2 and "CLI: --calibration FILE.npz" in err
    np.savez(calibration, x=np.zeros((2, 1, 3, 8, 8), np.float32), y=np.zeros((3, 1), np.float32))
    code, _, err = _run(capfd, "inspect", str(model), "--calibration", str(calibration))
    assert code == 2 and "the same number of samples on its first axis" in err
