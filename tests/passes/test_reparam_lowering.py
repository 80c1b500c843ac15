"""The re-parameterization passes compose with fold-bn and cleanup, and lower to ORT and TVM."""

import pytest
import torch

import ptool
from tests.models import zoo
from tests.passes.test_merge_branches import repvgg

FULL = ["dce", "cse", "constant-fold", "fold-bn", "merge-branches", "fold-affine", "cse", "dce"]


def _agree(m2, args, backend):
    run = ptool.compile(m2, backend=backend)
    with torch.no_grad():
        fid = ptool.verify.compare(m2(*args), run(*args))
    assert fid.max_rel_error <= 1e-4, f"{backend}: {fid}"


@pytest.mark.parametrize("backend", ["onnxruntime", pytest.param("tvm", marks=[pytest.mark.tvm, pytest.mark.slow])])
@pytest.mark.parametrize("case", ["repvgg", "vit", "llama"])
def test_full_exact_pipeline_lowers(case, backend):
    if case == "repvgg":
        model, args = repvgg(), (torch.randn(2, 3, 16, 16),)
    else:
        fixture = zoo.FIXTURES[case]()
        model, args = fixture.model, fixture.example_inputs
    m2 = ptool.transform(model, FULL, args)
    assert all(r.within_contract for r in m2.report)
    assert m2.report.total.max_rel_error <= 1e-5
    _agree(m2, args, backend)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["onnxruntime", pytest.param("tvm", marks=pytest.mark.tvm)])
def test_repbn_lowers_without_layernorm(backend, tmp_path):
    import onnx

    from tests.models.digits_vit import digits_vit, single_thread

    d = digits_vit(0)
    with single_thread():
        m2 = ptool.transform(d.model, ["repbn:finetune_steps=20", "fold-affine", "dce"], d.example_inputs,
                             calibration=[d.example_inputs])
    path = ptool.export_onnx(m2, tmp_path / "repbn.onnx")
    assert not {n.op_type for n in onnx.load(str(path)).graph.node} & {"LayerNormalization", "BatchNormalization"}
    _agree(m2, d.example_inputs, backend)
