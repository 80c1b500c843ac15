"""bf16 / fp16 graphs on TVM: the exported-program import keeps torch's dtypes around TVM's
float32-accumulating matmul converters (ptool/backends/tvm_precision.py)."""

from __future__ import annotations

import functools

import pytest
import torch

import ptool
from ptool.backends import tvm_precision
from ptool.passes.precision import Precision
from tests.models import zoo

pytestmark = pytest.mark.tvm


@functools.cache
def _compiled(model: str, dtype: str):
    """The fixture, its ``precision`` graph and that graph built by TVM (once per module run)."""
    fixture = getattr(zoo, model)()
    m2 = ptool.transform(fixture.model, [f"precision:dtype={dtype}"], fixture.example_inputs,
                         example_kwargs=fixture.example_kwargs)
    run = ptool.compile(m2, backend="tvm", example_inputs=fixture.example_inputs,
                        example_kwargs=fixture.example_kwargs)
    return fixture, m2, run


@pytest.mark.parametrize(("model", "dtype"), [("bert", "bf16"), ("bert", "fp16"), ("resnet", "bf16")])
def test_reduced_precision_imports_through_the_exported_program_and_agrees_with_torch(model, dtype):
    fixture, m2, run = _compiled(model, dtype)
    assert run.info["frontend"] == "exported_program" and "fallback_reason" not in run.info
    args, kwargs = fixture.heldout(1)
    with torch.no_grad():
        cosine = ptool.verify.compare(m2(*args, **kwargs), run(*args, **kwargs)).cosine
    assert cosine >= Precision.numerics.bound  # 0.999; measured 0.99997+ (bert bf16: 0.999997)


def test_outputs_keep_the_dtype_torch_gives_them():
    fixture, m2, run = _compiled("bert", "bf16")
    args, kwargs = fixture.heldout(1)
    with torch.no_grad():
        want = ptool.verify.flatten_outputs(m2(*args, **kwargs))
        got = ptool.verify.flatten_outputs(run(*args, **kwargs))
    assert [g.dtype for g in got] == [w.dtype for w in want] and want[0].dtype == torch.float32


def test_float32_programs_keep_tvms_own_converters():
    model = torch.nn.Linear(8, 4).eval()
    x = torch.randn(2, 8)
    ep = torch.export.export(model, (x,), strict=False)
    assert tvm_precision.converters(ep) == {}
    ep16 = torch.export.export(model.to(torch.bfloat16), (x.bfloat16(),), strict=False)
    assert {"addmm.default", "linear.default", "convolution.default"} <= tvm_precision.converters(ep16).keys()


def test_a_bf16_linear_with_bias_runs_on_tvm_as_torch_rounds_it():
    """The float32 accumulator plus the bias, rounded once to bf16: torch's CPU bf16 linear."""
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 32).eval().to(torch.bfloat16)
    x = torch.randn(4, 64).bfloat16()
    run = ptool.compile(model, backend="tvm", example_inputs=(x,))
    assert run.info["frontend"] == "exported_program"
    with torch.no_grad():
        want, got = model(x), run(x)
    assert got.dtype == torch.bfloat16
    # one bf16 rounding of float32 sums that differ in their last bits: at most one bf16 unit apart
    assert ((got.float() - want.float()).abs() <= want.float().abs() * 2.0 ** -7 + 1e-6).all()


def test_the_assembly_is_read_for_bf16_dot_products():
    _, _, run = _compiled("bert", "bf16")
    executable = run._keepalive[0]
    # TVM 0.27 widens bf16 to float32 before the multiply-add: no vdpbf16ps on this CPU or any other
    assert tvm_precision.bf16_dot_instructions(executable) == 0
