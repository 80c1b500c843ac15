"""log-quant: the log grid's arithmetic, the calibrated search, the two site kinds, ONNX Runtime.

Known-value tests pin the quantizer (levels, dequantized values, the masked tail, AdaLog's LUT
gap); the search must find base 2 exactly on data that is exactly powers of two. On real graphs:
post-softmax attention weights of an eager ViT (log beats uniform at 4 bits on the same tensors),
the GELU shift is absorbed into the next bias exactly, and the quantized graph runs in ONNX
Runtime with the same outputs.
"""

import math

import pytest
import torch
from torch import nn

import ptool
from ptool.errors import PassError
from ptool.ir.graph import attr_tensor, is_op
from ptool.options import build_pass, split_spec
from ptool.passes.quant.logquant import (
    GELU_SHIFT,
    LogQuant,
    LogQuantizer,
    Objective,
    R,
    log_fake_quantize,
    log_quantize,
    lut_max_error,
    search_log,
)
from tests.models import zoo

aten = torch.ops.aten
CALIBRATION_BATCHES = 4


def _transform(fixture, p, **kw):
    return ptool.transform(fixture.model, [p], fixture.example_inputs, example_kwargs=fixture.example_kwargs,
                           calibration=fixture.batches(CALIBRATION_BATCHES), **kw)


def _trained_like_vit() -> zoo.Fixture:
    """The eager zoo ViT with its attention sharpened to a trained model's.

    With seeded random weights the attention is nearly uniform (row entropy 2.833 = log 17, the
    maximum), the one distribution a log grid has no advantage on. Scaling the q and k
    projections by 8 gives row entropy 2.55, that of the first layer of the ViT trained on digits
    (tests/models/digits_vit.py: 2.54 and 2.05 nats).
    """
    f = zoo.vit(attn_implementation="eager")
    with torch.no_grad():
        for layer in f.model.vit.layers:
            layer.attention.q_proj.weight.mul_(8)
            layer.attention.k_proj.weight.mul_(8)
    return f


# ---------------------------------------------------------------------------------------------
# arithmetic


def test_log2_levels_and_dequantized_values():
    x = torch.tensor([1.0, 2.0, 0.5, 0.3, 0.25, 0.1, 2 ** -7, 2 ** -8, 0.0, -0.1])
    levels, keep = log_quantize(x, 1.0, 1.0, bits=3)
    # 2.0 clips to the scale (level 0); -log2(0.3) = 1.74 -> 2; -log2(0.1) = 3.32 -> 3;
    # 2^-8 is past the last level (7) and maps to 0, like 0 and negatives
    assert levels.tolist() == [0, 0, 1, 2, 2, 3, 7, 7, 7, 7]
    assert keep.tolist() == [True] * 7 + [False] * 3
    expected = [1.0, 1.0, 0.5, 0.25, 0.25, 0.125, 2 ** -7, 0.0, 0.0, 0.0]
    assert log_fake_quantize(x, 1.0, 1.0, bits=3).tolist() == expected
    # a scale moves the grid: s * 2^-i
    assert log_fake_quantize(torch.tensor([0.75, 0.4]), 0.8, 1.0, bits=3).tolist() == pytest.approx([0.8, 0.4])


def test_sqrt2_grid_and_the_module_agree():
    x = torch.tensor([2 ** -0.5, 2 ** -1.5, 0.6])
    # base sqrt2: levels are half-octaves; 0.6 = 2^-0.737 -> level round(1.47) = 1
    assert log_quantize(x, 1.0, 0.5, bits=4)[0].tolist() == [1, 3, 1]
    q = LogQuantizer(scale=1.0, step=0.5, bits=4)
    assert torch.equal(q(x), log_fake_quantize(x, 1.0, 0.5, 4))
    assert q(x).tolist() == pytest.approx([2 ** -0.5, 2 ** -1.5, 2 ** -0.5])


def test_lut_gap_is_zero_for_base_two_and_small_otherwise():
    assert lut_max_error(R, 4) == 0.0
    gaps = [lut_max_error(q, 4) for q in range(10, 139) if q != R]
    # half a LUT step (entries are multiples of 1/30 at 4 bits) times 2^-floor(.) <= 1. METHODS 4.6
    # says <= 1.4e-2; over every q in [10, 138] the worst is 1.66e-2, just under the 1/60 bound
    assert 0 < max(gaps) <= 0.5 / 30


def test_adaptive_search_finds_base_two_on_powers_of_two():
    x = 2.0 ** -torch.arange(16.0).reshape(1, 16)  # 16 values, 16 levels at 4 bits: exact only in base 2
    choice = search_log(Objective([(x, torch.eye(16))]), bits=4, qs=[float(q) for q in range(10, 139)],
                        search_steps=6)
    assert choice.q == R and choice.scale == 1.0 and choice.loss == 0.0


# ---------------------------------------------------------------------------------------------
# sites on real graphs


def test_post_softmax_log_beats_uniform_on_the_same_tensors():
    f = _trained_like_vit()
    m2 = _transform(f, LogQuant(targets="softmax"))
    rec = m2.report["log-quant"]
    assert rec.rewritten == 2 and not rec.skipped
    for label, note in rec.notes["sites"].items():
        assert note["kind"] == "softmax"
        loss_log, loss_uniform = 1 - note["output_cosine"], 1 - note["uniform_output_cosine"]
        print(f"{label}: {note['quantizer']} cosine loss {loss_log:.2e} vs uniform {loss_uniform:.2e}")
        assert loss_log < loss_uniform
        assert note["sqnr_db"] > note["uniform_sqnr_db"]
    hist = [n for n in m2.graph_module.graph.nodes if n.op == "call_module" and n.target.startswith("ptool_logquant")]
    assert all(is_op(next(iter(n.users)), aten.matmul) for n in hist)  # quantizers feed the A @ V matmuls


def test_uniform_baseline_is_the_same_search_on_the_same_sites():
    f = _trained_like_vit()
    uni = _transform(f, LogQuant(targets="softmax", base="uniform")).report["log-quant"]
    ada = _transform(f, LogQuant(targets="softmax")).report["log-quant"]
    assert list(uni.notes["sites"]) == list(ada.notes["sites"])
    for label, note in uni.notes["sites"].items():
        assert note["quantizer"] == "uniform"
        assert note["output_cosine"] == ada.notes["sites"][label]["uniform_output_cosine"]
    assert ada.fidelity.cosine > uni.fidelity.cosine  # and on the model output


def test_gelu_shift_is_absorbed_exactly():
    f = zoo.vit()  # sdpa: no softmax sites, GELU sites only
    original = {n: p.detach().clone() for n, p in f.model.named_parameters()}
    m2 = _transform(f, LogQuant(targets="gelu", base="log2"))
    rec = m2.report["log-quant"]
    assert rec.rewritten == 2
    gm = m2.graph_module
    shifts = [n for n in gm.graph.nodes if is_op(n, aten.add) and n.meta.get("ptool.from_pass") == "log-quant"]
    assert [n.args[1] for n in shifts] == [GELU_SHIFT, GELU_SHIFT] and all(is_op(n.args[0], aten.gelu) for n in shifts)
    # b' = b - shift * W 1 on fc2
    fc2 = next(n for n in gm.graph.nodes if is_op(n, aten.linear) and n.args[0].op == "call_module")
    w, b = original["vit.layers.0.mlp.fc2.weight"], original["vit.layers.0.mlp.fc2.bias"]
    assert torch.allclose(attr_tensor(gm, fc2.args[2]), b - GELU_SHIFT * w.sum(1), atol=1e-6)
    # the shifted-but-unquantized graph is the original model
    for n in gm.graph.nodes:
        if n.op == "call_module" and n.target.startswith("ptool_logquant"):
            gm.add_submodule(n.target, nn.Identity())
    gm.recompile()
    for seed in (0, 7):
        args, kwargs = f.inputs(seed)
        fid = ptool.verify.compare(f.run((args, kwargs)), m2(*args, **kwargs))
        assert fid.max_rel_error <= 1e-5, fid


def test_log_quantized_vit_runs_in_onnxruntime():
    f = zoo.vit(attn_implementation="eager")
    m2 = _transform(f, LogQuant())
    assert m2.report["log-quant"].rewritten == 4
    run = ptool.compile(m2, backend="onnxruntime")
    for seed in (0, 3):
        args, kwargs = f.inputs(seed)
        with torch.no_grad():
            fid = ptool.verify.compare(m2(*args, **kwargs), run(*args, **kwargs))
        assert fid.max_rel_error <= 1e-4, fid


def test_second_run_changes_nothing_and_says_why():
    f = zoo.vit(attn_implementation="eager")
    m2 = ptool.transform(f.model, [LogQuant(), LogQuant()], f.example_inputs,
                         calibration=f.batches(CALIBRATION_BATCHES))
    first, second = m2.report[0], m2.report[1]
    assert first.rewritten == 4 and first.within_contract, first.fidelity
    assert second.rewritten == 0 and second.nodes_after == second.nodes_before
    assert [s.reason for s in second.skipped] == ["already quantized"] * 4


def test_sdpa_graph_has_no_softmax_site_and_gelu_into_non_linear_is_skipped():
    class GeluToSum(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)

        def forward(self, x):
            h = torch.nn.functional.gelu(self.fc1(x))
            return self.fc2(h) + h.sum(-1, keepdim=True)

    m2 = ptool.transform(GeluToSum().eval(), [LogQuant()], (torch.randn(2, 8),), calibration=[(torch.randn(2, 8),)])
    rec = m2.report["log-quant"]
    (skip,) = rec.skipped
    assert rec.rewritten == 0 and "not a Linear" in skip.reason and "sum" in skip.reason
    f = zoo.vit()
    assert _transform(f, LogQuant(targets="softmax")).report["log-quant"].rewritten == 0


# ---------------------------------------------------------------------------------------------
# options


@pytest.mark.parametrize(("spec", "allowed"), [
    ("base=log3", "log2 | sqrt2 | adaptive | uniform"),
    ("targets=attention", "softmax | gelu | both"),
    ("bits=9", "2..8"),
    ("search_steps=1", ">= 2"),
])
def test_bad_options_name_the_allowed_values(spec, allowed):
    with pytest.raises(PassError, match=f"allowed|{allowed}") as err:
        build_pass(LogQuant, split_spec(f"log-quant:{spec}")[1])
    assert allowed in str(err.value)


def test_bad_values_in_python_are_value_errors_and_specs_round_trip():
    with pytest.raises(ValueError, match="log2, sqrt2, adaptive, uniform"):
        LogQuant(base="log3")
    p = LogQuant(bits=3, base="sqrt2", targets="gelu")
    assert build_pass(LogQuant, split_spec(p.spec())[1]) == p
    assert p.needs_calibration and not p.exact and p.numerics.metric == "cosine"
    assert math.isclose(p.gelu_shift, 0.16997)


def test_missing_calibration_is_a_pass_error_naming_the_pass():
    f = zoo.vit()
    with pytest.raises(PassError, match="pass 'log-quant' needs calibration data"):
        ptool.transform(f.model, [LogQuant()], f.example_inputs)
