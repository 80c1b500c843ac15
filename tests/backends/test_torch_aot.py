"""AOTInductor on the torch backend (``compile=True, aot=True``): the same outputs as eager torch,
the structured call contract, fixed shapes with a clear error, and int8 models on integer kernels."""

from __future__ import annotations

import re
import zipfile

import pytest
import torch

import ptool
from ptool.backends import backend_options
from ptool.errors import InputError
from ptool.ops import onednn_int8
from ptool.verify import compare

pytestmark = pytest.mark.slow  # each case builds a shared library with a C++ compiler (~10-20 s)


def test_aot_matches_eager_and_keeps_the_output_structure(structured):
    run = ptool.compile(structured.model, backend="torch", example_inputs=structured.args,
                        example_kwargs=structured.kwargs, compile=True, aot=True)
    out, ref = run(*structured.args, **structured.kwargs), structured.reference()
    assert set(out) == {"logits", "aux", "count"} and out["count"] == 3
    assert compare(ref, out).max_abs_error < 1e-6
    assert run.options["aot"] is True and run.info["build_s"] > 0


def test_aot_fixes_the_example_shapes_with_one_clear_error(bert):
    run = ptool.compile(bert.model, backend="torch", example_inputs=bert.args, example_kwargs=bert.kwargs,
                        compile=True, freezing=True, aot=True)
    assert run.verify().max_rel_error < 1e-5
    ids = bert.args[0][:, :8]
    with pytest.raises(InputError, match=r"input 'input_ids' has shape \[2, 8\], the compiled model expects "
                                         r"\[2, 12\]"):
        run(ids, attention_mask=bert.kwargs["attention_mask"][:, :8])


def test_aot_with_dynamic_shapes_takes_other_lengths(cnn):
    run = ptool.compile(cnn.model, backend="torch", example_inputs=cnn.args, compile=True, aot=True, dynamic=True)
    x = torch.randn(3, 3, 20, 20)
    with torch.no_grad():
        assert compare(cnn.model(x), run(x)).max_abs_error < 1e-5


def test_quantized_model_runs_its_integer_kernels_ahead_of_time(bert):
    m2 = ptool.transform(bert.model, ["quantize:activations=per-token"], bert.args, example_kwargs=bert.kwargs)
    run = ptool.compile(m2, backend="torch", example_inputs=bert.args, example_kwargs=bert.kwargs,
                        compile=True, freezing=True, aot=True)
    with torch.no_grad():
        assert compare(m2(*bert.args, **bert.kwargs), run(*bert.args, **bert.kwargs)).max_abs_error < 1e-4
    # the library calls an integer GEMM through its C shim (invisible to the profiler): oneDNN's
    # int8 matmul on weights reordered at build time where this torch has it, else torch's _int_mm
    with zipfile.ZipFile(run.info["package"]) as package:
        wrapper = next(package.read(n).decode() for n in package.namelist() if n.endswith(".wrapper.cpp"))
    kernel = "aoti_torch_cpu__qlinear_pointwise_tensor" if onednn_int8.available() else "aoti_torch_cpu__int_mm_out"
    assert len(re.findall(kernel + r"\(", wrapper)) == 2 * 4 + 1  # qkv, o, fc1, fc2 + pooler
    assert not re.search(r"qlinear_prepack\w*\(", wrapper)  # folded into the library's constants
    assert "aoti_torch_cpu_mm" not in wrapper and "aoti_torch_cpu_addmm" not in wrapper


def test_aot_is_an_option_of_torch_compile():
    with pytest.raises(ptool.errors.UsageError, match="add compile=true"):
        backend_options("torch", {"aot": True})
