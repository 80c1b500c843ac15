"""The int8 linears on oneDNN's pre-packed matmul: the same numbers as the ``_int_mm`` kernels, and
under a frozen ``torch.compile`` the weights are reordered once, at build time, not per call."""

from __future__ import annotations

import pytest
import torch

import ptool
from ptool.backends.torch_backend import with_torch_kernels
from ptool.ops import onednn_int8, quant

pytestmark = pytest.mark.skipif(not onednn_int8.available(), reason="oneDNN's int8 linear needs an x86 torch")


def _weights(rows_in: int, rows_out: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    weight_t = torch.randint(-127, 128, (rows_in, rows_out), dtype=torch.int8, generator=g)
    scale = torch.rand(1, rows_out, generator=g) * 0.01 + 1e-3
    bias = torch.randn(rows_out, generator=g)
    return weight_t, scale, bias


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("kind", ["token", "dynamic"])
def test_the_onednn_kernels_give_the_int_mm_kernels_numbers(kind, with_bias):
    weight_t, scale, bias = _weights(96, 40)
    bias = bias if with_bias else None
    x = torch.randn(2, 7, 96) * 3 + 0.5  # 3-D, off-centre: the dynamic zero point is not 128
    if kind == "token":
        ref, out = quant._int8_linear_token(x, weight_t, scale, bias), onednn_int8.linear_token_int8(x, weight_t, scale,
                                                                                                      bias)
    else:
        ref, out = quant._int8_linear_dynamic(x, weight_t, scale, bias), onednn_int8.linear_dynamic_int8(
            x, weight_t, scale, bias)
    assert out.shape == ref.shape == (2, 7, 40)
    # the same int32 sums, rescaled in another float32 order
    assert (out - ref).abs().max().item() < 1e-5 * ref.abs().max().item()


def _mlp():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 32)).eval()
    return model, (torch.randn(5, 64),)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["quantize:activations=per-token", "quantize"])
def test_a_frozen_compile_reorders_the_weights_once_and_matches_eager(mode):
    model, args = _mlp()
    m2 = ptool.transform(model, [mode], args)
    run = ptool.compile(m2, backend="torch", example_inputs=args, compile=True, freezing=True)
    x = torch.randn(5, 64)
    with torch.no_grad():
        ref = m2(x)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = run(x)
    assert (out - ref).abs().max().item() < 1e-4
    calls = {e.key: e.count for e in prof.key_averages()}
    assert calls.get("onednn::qlinear_pointwise") == 2
    assert "onednn::qlinear_prepack" not in calls  # folded into constants by freezing


def test_unless_asked_the_linears_stay_on_int_mm():
    model, args = _mlp()
    m2 = ptool.transform(model, ["quantize:activations=per-token"], args)
    targets = {n.target for n in with_torch_kernels(m2).graph_module.graph.nodes}
    assert quant._int8_linear_token in targets and onednn_int8.linear_token_int8 not in targets
    targets = {n.target for n in with_torch_kernels(m2, prepacked=True).graph_module.graph.nodes}
    assert onednn_int8.linear_token_int8 in targets
