"""Every ONNX operator test case that ONNX Runtime runs correctly goes through ``ptool.transform``
with the exact cleanup pipeline with no ptool error and no wrong result (``tools/onnx_node_cases.py``):
uint64 and string tensors, sequences and optionals, scalars, empty tensors, If / Loop bodies."""

from __future__ import annotations

import collections
import importlib.util
import pathlib
import sys

_TOOL = pathlib.Path(__file__).resolve().parents[2] / "tools" / "onnx_node_cases.py"


def _tool():
    if "onnx_node_cases" in sys.modules:
        return sys.modules["onnx_node_cases"]
    spec = importlib.util.spec_from_file_location("onnx_node_cases", _TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules["onnx_node_cases"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_every_runnable_operator_case_survives_the_exact_pipeline():
    outcomes = list(_tool().run_all())
    counts = collections.Counter(o.status for o in outcomes)
    failures = [f"{o.name}: {o.status}: {o.detail}" for o in outcomes if o.status in ("ptool error", "wrong")]
    assert not failures, "\n".join(failures)
    # the suite really ran: most cases are runnable, and they include the awkward value kinds
    assert counts["ok"] > 1400, counts
    ok = {o.name for o in outcomes if o.status == "ok"}
    for name in ("test_add_uint64", "test_string_concat", "test_identity_sequence", "test_identity_opt",
                 "test_if_seq", "test_split_zero_size_splits_opset18", "test_loop16_seq_none"):
        assert name in ok, name


def test_cases_write_out_in_the_standard_layout(tmp_path):
    import onnx
    from onnx import numpy_helper

    tool = _tool()
    case = next(c for c in tool.cases("test_add_uint64"))
    tool.write_case(case, tmp_path)
    folder = tmp_path / "test_add_uint64"
    onnx.checker.check_model(str(folder / "model.onnx"))
    tensor = onnx.TensorProto()
    tensor.ParseFromString((folder / "test_data_set_0" / "output_0.pb").read_bytes())
    assert (numpy_helper.to_array(tensor) == case.data_sets[0][1][0]).all()
