"""Every suite model: transform -> export_onnx -> ONNX Runtime and TVM, matching the torch graph.

The acceptance bar of the foundation: outputs within 1e-4 relative of the transformed torch graph,
and an ONNX file that passes ``onnx.checker``.
"""

import onnx
import pytest

import ptool
from tests.models import zoo

PIPELINE = ["dce", "cse", "constant-fold", "fold-bn"]
MODELS = ["bert", "vit", "gpt2", "llama", "resnet", "mobilenet_v2", "minilm"]


def _transformed(name):
    fixture = zoo.FIXTURES[name]()
    m2 = ptool.transform(fixture.model, PIPELINE, fixture.example_inputs, example_kwargs=fixture.example_kwargs)
    return fixture, m2


def _torch_reference(m2, inputs):
    import torch

    args, kwargs = inputs
    with torch.no_grad():
        return m2(*args, **kwargs)


@pytest.mark.parametrize("name", MODELS)
def test_transform_export_onnxruntime(name, tmp_path):
    fixture, m2 = _transformed(name)
    assert m2.report.total.max_rel_error <= 1e-5
    path = ptool.export_onnx(m2, tmp_path / f"{name}.onnx")
    onnx.checker.check_model(str(path))
    run = ptool.compile(m2, backend="onnxruntime")
    for seed in (0, 5):  # the example batch and a held-out one
        inputs = fixture.inputs(seed)
        fid = ptool.verify.compare(_torch_reference(m2, inputs), run(*inputs[0], **inputs[1]))
        assert fid.mismatched_leaves == 0
        assert fid.max_rel_error <= 1e-4, f"{name} seed {seed}: {fid}"


@pytest.mark.tvm
@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_transform_tvm(name):
    fixture, m2 = _transformed(name)
    run = ptool.compile(m2, backend="tvm")
    for seed in (0, 5):
        inputs = fixture.inputs(seed)
        fid = ptool.verify.compare(_torch_reference(m2, inputs), run(*inputs[0], **inputs[1]))
        assert fid.mismatched_leaves == 0
        assert fid.max_rel_error <= 1e-4, f"{name} seed {seed}: {fid}"
