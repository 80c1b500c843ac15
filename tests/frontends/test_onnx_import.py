"""The ONNX frontend: safe loading, synthesized inputs, transform at ONNX level, the ORT module."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper
from onnx import helper as oh
from torch import nn

import ptool
from ptool.errors import BackendError, InputError, ModelLoadError
from ptool.frontends.onnx_import import example_inputs_for, load_onnx
from ptool.ir.onnx_module import OnnxTransformedModule
from ptool.verify import compare
from tests.models.onnx_graphs import reshaping_model


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        return self.head(y.mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A small conv net exported with the dynamo exporter, unoptimized so BatchNormalization stays."""
    torch.manual_seed(0)
    net = _Net()
    with torch.no_grad():  # non-trivial running statistics
        net.bn.running_mean.uniform_(-1, 1)
        net.bn.running_var.uniform_(0.5, 2)
        net.bn.weight.uniform_(0.5, 1.5)
    net.eval()
    x = torch.randn(2, 3, 16, 16)
    path = tmp_path_factory.mktemp("onnx") / "net.onnx"
    torch.onnx.export(net, (x,), str(path), dynamo=True, verbose=False, optimize=False)
    return net, x, path


def _tiny_model(**kw) -> onnx.ModelProto:
    w = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(4, 3) / 10, "w")
    graph = oh.make_graph(
        [oh.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])], [w],
    )
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 18)], ir_version=9, **kw)


# --- transform -----------------------------------------------------------------------------

def test_transform_exported_onnx_file(exported):
    net, x, path = exported
    m = ptool.transform(path, ["dce", "cse", "constant-fold", "fold-bn"], example_inputs=(x,))
    assert isinstance(m, OnnxTransformedModule) and isinstance(m, nn.Module)
    assert [r.name for r in m.report] == ["dce", "cse", "constant-fold", "fold-bn"]
    assert m.report.capture == "onnx" and m.report.verified_on == 1
    assert "BatchNormalization" in {n.op_type for n in onnx.load(path).graph.node}
    assert "BatchNormalization" not in {n.op_type for n in m.onnx_model.graph.node}
    assert m.report["fold-bn"].rewritten == 1 and m.report["fold-bn"].params_after < m.report["fold-bn"].params_before
    with torch.no_grad():
        expected = net(x)
    assert compare(expected, m(x)).max_rel_error <= 1e-5
    assert compare(expected, m(x=x.numpy())).max_rel_error <= 1e-5  # by name, numpy in
    assert "onnx" in str(m.report)


def test_transform_synthesizes_inputs_and_uses_calibration(exported):
    _, x, path = exported
    m = ptool.transform(str(path), ["dce"])
    assert m.report.verified_on == 1 and m.example_inputs[0].shape[1:] == (3, 16, 16)
    m = ptool.transform(path, ["dce"], example_inputs=(x,), calibration=[(x + 1,), (x * 2,)])
    assert m.report.verified_on == 3


def test_module_input_errors():
    m = ptool.transform(_tiny_model(), [])
    assert m(torch.ones(2, 4)).shape == (2, 3)
    with pytest.raises(InputError, match="takes 1 input"):
        m(torch.ones(2, 4), torch.ones(2, 4))
    with pytest.raises(InputError, match="no input 'xx'.*did you mean 'x'"):
        m(xx=torch.ones(2, 4))
    with pytest.raises(InputError, match="missing ONNX input"):
        m()
    with pytest.raises(InputError, match="axis 1.*fixes it to 4"):
        m(torch.ones(2, 5))
    with pytest.raises(InputError, match="dtype int64"):
        m(torch.ones(2, 4, dtype=torch.int64))
    with pytest.raises(InputError, match="takes 1 input"):
        ptool.transform(_tiny_model(), ["dce"], example_inputs=(torch.ones(2, 4), torch.ones(1)))


def test_example_inputs_for_rules():
    emb = numpy_helper.from_array(np.zeros((30, 4), np.float32), "emb")
    graph = oh.make_graph(
        [oh.make_node("Gather", ["emb", "input_ids"], ["e"])], "g",
        [
            oh.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            oh.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
            oh.make_tensor_value_info("pixels", TensorProto.FLOAT, ["N", 3, "h", "w"]),
        ],
        [oh.make_tensor_value_info("e", TensorProto.FLOAT, None)], [emb],
    )
    feeds = example_inputs_for(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 18)]))
    assert list(feeds) == ["input_ids", "attention_mask", "pixels"]
    ids, mask, pixels = feeds.values()
    assert ids.shape == (1, 16) and ids.dtype == np.int64 and 0 <= ids.min() and ids.max() < 30  # vocab 30
    assert mask.shape == (1, 16) and (mask == 1).all()
    assert pixels.shape == (1, 3, 16, 16) and pixels.dtype == np.float32 and pixels.std() > 0.5
    again = example_inputs_for(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 18)]))
    assert np.array_equal(again["pixels"], pixels)  # seeded


def test_example_inputs_for_takes_given_arrays_and_stated_shapes_and_resolves_dim_names():
    model = reshaping_model()
    feeds = example_inputs_for(model, shapes={"x": ((3, 32), None)})
    assert feeds["x"].shape == (3, 32)
    assert feeds["b"].shape == (3, 4, 8)  # 'batch' took x's size, not the default 1
    assert feeds["s"].shape == ()  # a scalar stays a scalar
    given = np.full((2, 4, 8), 7.0, np.float32)
    feeds = example_inputs_for(model, given={"b": given})
    assert feeds["b"] is given and feeds["x"].shape == (2, 16)


@pytest.mark.parametrize("kwargs,match", [
    ({"shapes": {"z": ((1, 32), None)}}, "no input 'z'"),
    ({"shapes": {"b": ((1, 5, 8), None)}}, "size 4 on axis 1"),
    ({"shapes": {"b": ((1, 4), None)}}, "rank 3"),
    ({"shapes": {"x": ((1, 32), np.dtype("int64"))}}, "float32 in the model, not int64"),
    ({"shapes": {"x": ((2, 32), None)}, "given": {"b": np.zeros((3, 4, 8), np.float32)}}, "'batch' is"),
])
def test_example_inputs_for_refuses_what_contradicts_the_model(kwargs, match):
    with pytest.raises(InputError, match=match):
        example_inputs_for(reshaping_model(), **kwargs)


def test_anonymous_dims_are_not_one_name():
    graph = oh.make_graph([oh.make_node("Relu", ["x"], ["y"])], "g",
                          [oh.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, "?", "?"])],
                          [oh.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, "?", "?"])])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 18)])
    assert example_inputs_for(model, shapes={"x": ((1, 3, 48, 192), None)})["x"].shape == (1, 3, 48, 192)


def test_transform_takes_a_dict_of_arrays_and_warns_about_made_up_inputs():
    model = reshaping_model()
    x = np.random.default_rng(0).standard_normal((2, 32)).astype(np.float32)
    with pytest.warns(UserWarning, match=r"made up ONNX input\(s\) s \(\) float32, b \(2, 4, 8\) float32"):
        m2 = ptool.transform(model, ["dce"], example_inputs={"x": x})
    assert m2.example_inputs[0].shape == (2, 32) and m2.example_inputs[1].shape == ()
    s = np.array(3.0, np.float32)
    out = m2(x=x, s=s, b=np.ones((2, 4, 8), np.float32))
    np.testing.assert_allclose(out.numpy(), x.reshape(2, 4, 8) * 3 + 1, rtol=1e-6)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every input given: nothing made up, no warning
        ptool.transform(model, ["dce"], example_inputs={"x": x, "s": s, "b": np.ones((2, 4, 8), np.float32)})


def test_an_onnx_runtime_failure_is_one_line_naming_the_node():
    # made-up x (1, 16) cannot be reshaped to (-1, 4, 8): ORT fails inside the Reshape node
    with pytest.warns(UserWarning, match="made up"), pytest.raises(BackendError) as info:
        ptool.transform(reshaping_model(), ["dce"])
    message = str(info.value)
    assert "\n" not in message and "at node 'to_heads' (Reshape): " in message and "cannot be reshaped" in message
    assert "inputs: x (1, 16), s (), b (1, 4, 8)" in message
    assert "onnxruntime_src" not in message


def test_onnxruntime_failure_text():
    from ptool.errors import onnxruntime_failure

    nested = RuntimeError(
        "[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Non-zero status code returned while running If node. "
        "Name:'If_0' Status Message: Non-zero status code returned while running Pad node. Name:'' Status "
        "Message: /onnxruntime_src/onnxruntime/core/providers/cpu/tensor/pad.cc:12 void f(int) const Pad reflect:"
        " post-pad (32) exceeds maximum allowed (15)\n for axis 1.")
    assert onnxruntime_failure(nested) == "an unnamed Pad node: Pad reflect: post-pad (32) exceeds maximum allowed " \
                                          "(15) for axis 1."


# --- loading -------------------------------------------------------------------------------

def test_garbage_file_is_refused(tmp_path):
    path = tmp_path / "junk.onnx"
    path.write_bytes(b"\x00\xffthis is not an onnx model\x13\x37" * 10)
    with pytest.raises(ModelLoadError, match="junk.onnx"):
        ptool.transform(path, ["dce"])


def test_checker_failure_is_one_line(tmp_path):
    model = _tiny_model()
    model.graph.node.append(oh.make_node("Relu", ["nowhere"], ["z"]))
    path = tmp_path / "bad.onnx"
    onnx.save(model, path)
    with pytest.raises(ModelLoadError, match="ONNX file 'bad.onnx' fails onnx.checker") as info:
        load_onnx(path)
    assert "\n" not in str(info.value)


def _with_external_data(tmp_path, location: str | None = None):
    """Save the tiny model with its weight outside the .onnx; optionally rewrite the location."""
    path = tmp_path / "ext.onnx"
    onnx.save_model(_tiny_model(), path, save_as_external_data=True, location="ext.bin", size_threshold=0)
    if location is not None:
        proto = onnx.load(path, load_external_data=False)
        for entry in proto.graph.initializer[0].external_data:
            if entry.key == "location":
                entry.value = location
        onnx.save(proto, path)
    return path


def test_external_data_beside_the_model_loads(tmp_path):
    proto = load_onnx(_with_external_data(tmp_path))
    w = numpy_helper.to_array(proto.graph.initializer[0])
    assert w.shape == (4, 3) and w[1, 0] == pytest.approx(0.3)


@pytest.mark.parametrize("location", ["/etc/hostname", "../ext.bin", "sub/../../ext.bin", "..\\ext.bin"])
def test_external_data_outside_the_folder_is_refused(tmp_path, location):
    folder = tmp_path / "m"
    folder.mkdir()
    path = _with_external_data(folder, location)
    with pytest.raises(ModelLoadError, match="outside the model's folder"):
        load_onnx(path)


def test_external_data_symlink_out_of_the_folder_is_refused(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    path = _with_external_data(folder, "link.bin")
    (tmp_path / "outside.bin").write_bytes((folder / "ext.bin").read_bytes())
    os.symlink(tmp_path / "outside.bin", folder / "link.bin")
    with pytest.raises(ModelLoadError, match="resolves outside"):
        load_onnx(path)


# --- save ----------------------------------------------------------------------------------

def test_save_roundtrip_and_external_data(tmp_path):
    m = ptool.transform(_tiny_model(), ["dce"])
    x = torch.randn(3, 4)
    saved = m.save(tmp_path / "out" / "model.onnx")
    assert compare(m(x), ptool.transform(saved, [])(x)).max_abs_error == 0
    m.save(tmp_path / "big.onnx", external_data=True)
    assert (tmp_path / "big.onnx.data").exists()
    assert compare(m(x), ptool.transform(tmp_path / "big.onnx", [])(x)).max_abs_error == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data", "out"]


def test_large_model_path_uses_external_data(tmp_path, monkeypatch):
    # Pretend every model is "large": sessions and save go through external data files.
    monkeypatch.setattr("ptool.ir.onnx_module.LARGE_MODEL_BYTES", 0)
    m = ptool.transform(_tiny_model(), ["dce"])
    x = torch.randn(2, 4)
    m.save(tmp_path / "model.onnx")
    assert (tmp_path / "model.onnx.data").exists()
    assert compare(m(x), ptool.transform(tmp_path / "model.onnx", [])(x)).max_abs_error == 0


def test_failing_save_leaves_no_file(tmp_path):
    m = ptool.transform(_tiny_model(), [])
    m.onnx_model.graph.node.append(oh.make_node("Relu", ["nowhere"], ["z"]))  # now invalid
    with pytest.raises(BackendError, match="could not save"):
        m.save(tmp_path / "model.onnx")
    assert list(tmp_path.iterdir()) == []


def test_export_and_compile_accept_an_onnx_transformed_model(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()
    x = torch.randn(1, 3, 8, 8)
    src = ptool.export_onnx(model, tmp_path / "src.onnx", (x,))
    m2 = ptool.transform(str(src), ["dce", "cse"])
    out = ptool.export_onnx(m2, tmp_path / "out.onnx")
    onnx.checker.check_model(str(out))
    run = ptool.compile(m2, backend="onnxruntime")
    torch.testing.assert_close(run(x), model(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(ptool.UsageError, match="runs on backend 'onnxruntime' or 'tvm', not 'torch'"):
        ptool.compile(m2, backend="torch")
