"""export_onnx: checked, optimized, named, atomic, external data past a threshold."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from ptool.backends import compile_module, export_onnx
from ptool.errors import BackendError, InputError
from ptool.verify import compare

MAX_REL_ERROR = 1e-4


@torch.library.custom_op("ptool_test::opaque", mutates_args=())
def _opaque(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


@_opaque.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class Unexportable(nn.Module):
    """Uses a custom op that has no ONNX translation: the exporter must fail."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.ptool_test.opaque(x) + 1


def _ort_run(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _leftovers(folder: Path, target: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p != target)


def test_export_passes_checker_and_runs(tmp_path, cnn):
    path = export_onnx(cnn.model, tmp_path / "cnn.onnx", cnn.args)
    assert path == tmp_path / "cnn.onnx" and path.is_file()
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path))
    assert [i.name for i in model.graph.input] == ["x"]
    assert [o.name for o in model.graph.output] == ["output"]
    (out,) = _ort_run(path, {"x": cnn.args[0].numpy()})
    assert compare(cnn.reference(), torch.from_numpy(out)).max_rel_error <= MAX_REL_ERROR
    assert _leftovers(tmp_path, path) == []  # no temp folder or data file left behind


def test_bert_names_follow_signature_and_output_fields(tmp_path, bert):
    path = export_onnx(bert.model, tmp_path / "bert.onnx", bert.args, bert.kwargs)
    model = onnx.load(str(path))
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in model.graph.output] == ["last_hidden_state", "pooler_output"]
    ops = {n.op_type for n in model.graph.node}
    assert "Constant" not in ops  # the optimizer lifted/folded constants
    feeds = {"input_ids": bert.args[0].numpy(), "attention_mask": bert.kwargs["attention_mask"].numpy()}
    hidden, pooled = _ort_run(path, feeds)
    ref = bert.reference()
    fid = compare((ref.last_hidden_state, ref.pooler_output), (torch.from_numpy(hidden), torch.from_numpy(pooled)))
    assert fid.max_rel_error <= MAX_REL_ERROR


def test_exported_graph_module_reexports(tmp_path, bert_exported):
    """An unlifted GraphModule (with its _guards_fn node) exports like the original model."""
    case = bert_exported
    assert any(n.op == "call_module" and n.target == "_guards_fn" for n in case.model.graph.nodes)
    path = export_onnx(case.model, tmp_path / "gm.onnx", case.args, case.kwargs)
    onnx.checker.check_model(str(path))
    model = onnx.load(str(path))
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask"]


def test_edited_graph_module_exports(tmp_path, cnn_exported, cnn):
    """A GraphModule edited in place (relu -> clamp_min 0) still exports and stays correct."""
    import copy

    gm = copy.deepcopy(cnn_exported.model)
    edited = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.aten.relu.default:
            node.target = torch.ops.aten.clamp_min.default
            node.args = (node.args[0], 0.0)
            edited += 1
    assert edited == 1
    gm.recompile()
    path = export_onnx(gm, tmp_path / "edited.onnx", cnn.args)
    (out,) = _ort_run(path, {"x": cnn.args[0].numpy()})
    assert compare(cnn.reference(), torch.from_numpy(out)).max_rel_error <= MAX_REL_ERROR


def test_failed_export_leaves_no_file(tmp_path):
    target = tmp_path / "bad.onnx"
    with pytest.raises(BackendError) as err:
        export_onnx(Unexportable(), target, (torch.randn(3),))
    assert "\n" not in str(err.value) and "ONNX export of Unexportable failed" in str(err.value)
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_failed_export_keeps_existing_file(tmp_path, cnn):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"previous")
    with pytest.raises(BackendError):
        export_onnx(Unexportable(), target, (torch.randn(3),))
    assert target.read_bytes() == b"previous"
    assert _leftovers(tmp_path, target) == []


def test_checker_failure_leaves_no_file(tmp_path, cnn, monkeypatch):
    def reject(*_args, **_kwargs):
        raise onnx.checker.ValidationError("Field 'type' of 'value_info' is required but missing.\nmore")

    monkeypatch.setattr(onnx.checker, "check_model", reject)
    target = tmp_path / "cnn.onnx"
    with pytest.raises(BackendError, match="fails onnx.checker: .*required but missing") as err:
        export_onnx(cnn.model, target, cnn.args)
    assert "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_external_data_with_small_threshold(tmp_path, bert):
    target = tmp_path / "sub" / "bert.onnx"
    export_onnx(bert.model, target, bert.args, bert.kwargs, external_data_threshold_bytes=0)
    data = target.parent / "bert.onnx.data"
    assert data.is_file() and data.stat().st_size > 10_000
    assert sorted(p.name for p in target.parent.iterdir()) == ["bert.onnx", "bert.onnx.data"]
    proto = onnx.load(str(target), load_external_data=False)
    locations = {
        entry.value
        for init in proto.graph.initializer
        if init.data_location == onnx.TensorProto.EXTERNAL
        for entry in init.external_data
        if entry.key == "location"
    }
    assert locations == {"bert.onnx.data"}  # relative, beside the model
    onnx.checker.check_model(str(target))
    # ONNX Runtime loads it through the backend, from the kept path
    run = compile_module(
        bert.model, "onnxruntime", bert.args, bert.kwargs, onnx_path=str(target), external_data_threshold_bytes=0
    )
    assert run.onnx_path == target
    assert compare(bert.reference(), run(*bert.args, **bert.kwargs)).max_rel_error <= MAX_REL_ERROR


def test_default_keeps_weights_inline(tmp_path, cnn):
    export_onnx(cnn.model, tmp_path / "cnn.onnx", cnn.args)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cnn.onnx"]


def test_dynamic_batch(tmp_path, cnn):
    batch = torch.export.Dim("batch", min=1, max=64)
    path = export_onnx(cnn.model, tmp_path / "dyn.onnx", cnn.args, dynamic_shapes=({0: batch},))
    model = onnx.load(str(path))
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    x = torch.randn(5, 3, 16, 16)
    (out,) = _ort_run(path, {"x": x.numpy()})
    with torch.no_grad():
        assert compare(cnn.model(x), torch.from_numpy(out)).max_rel_error <= MAX_REL_ERROR


def test_opset_conversion(tmp_path, cnn):
    path = export_onnx(cnn.model, tmp_path / "cnn.onnx", cnn.args, opset=20)
    versions = {o.domain: o.version for o in onnx.load(str(path)).opset_import}
    assert versions[""] == 20


def test_bad_path_and_inputs(tmp_path, cnn):
    with pytest.raises(BackendError, match="must end in .onnx"):
        export_onnx(cnn.model, tmp_path / "model.txt", cnn.args)
    with pytest.raises(InputError, match="example_inputs must be a tuple"):
        export_onnx(cnn.model, tmp_path / "model.onnx", {"x": cnn.args[0]})
    assert list(tmp_path.iterdir()) == []
