"""shift-linear: the op equals the arith.py reference bit for bit, each mode's levels are what it claims,
ONNX Runtime equals torch, site selection (all / mlp / 1x1 conv / exclude / keep_float), bad options,
and the accuracy of an MLP trained on scikit-learn's digits after the pass."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import nn

import ptool
from ptool.errors import PassError
from ptool.ir.graph import op_histogram
from ptool.ops import shift as ops
from ptool.ops.shift_arith import MAX_EXP, matshift_reference, quantize_rows_int8, shift_weight_terms_int
from ptool.passes.shiftadd.shift_linear import ShiftLinear, encode_weight, level_table
from tests.models import zoo
from tests.models.digits_vit import accuracy, digits_data, single_thread

MODES = ("shift", "shift2", "ternary", "binary")


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


def _random_codes(terms: int, n: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    sign = torch.randint(-1, 2, (terms, n, k), dtype=torch.int8, generator=gen)
    e1 = torch.randint(1 if terms == 2 else 0, MAX_EXP + 1, (n, k), dtype=torch.int8, generator=gen)
    e2 = (torch.rand(n, k, generator=gen) * e1).to(torch.int8)  # in [0, e1 - 1]
    exp = torch.stack([e1, e2][:terms])
    return sign, exp


def _reference(x, sign, exp, alpha, bias):
    """The definition, from arith.py: integer accumulator (int64 inside), then the float epilogue."""
    x_int, sx = quantize_rows_int8(x)
    k = x.shape[-1]
    acc = matshift_reference(x_int.reshape(-1, k), [(sign[t], exp[t]) for t in range(sign.shape[0])])
    y = acc.reshape(*x.shape[:-1], -1) * sx * alpha
    return y + bias if bias is not None else y


# ------------------------------------------------------------------------------ the op
@pytest.mark.parametrize("terms", [1, 2])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("shape", [(7, 16), (2, 5, 96), (2, 3, 4, 300), (3, 1500)], ids=str)
def test_op_equals_reference_bit_for_bit(terms, with_bias, shape):
    gen = torch.Generator().manual_seed(sum(shape) + terms)
    k, n = shape[-1], 24
    x = torch.randn(*shape, generator=gen) * 3
    x[..., 0] = 0.0 if len(shape) > 2 else x[..., 0]  # a zero column changes nothing
    sign, exp = _random_codes(terms, n, k, gen)
    alpha = torch.rand(n, generator=gen) + 0.01
    bias = torch.randn(n, generator=gen) if with_bias else None
    got = torch.ops.ptool_shift.shift_linear(x, sign, exp, alpha, bias)
    assert got.shape == (*shape[:-1], n) and got.dtype == torch.float32
    assert torch.equal(got, _reference(x, sign, exp, alpha, bias))


def test_accumulator_is_exact_past_float32_integers():
    """K = 1500 with two terms: |acc| can pass 2**24, so the op accumulates in float64; all-max inputs
    and weights give acc = 127 * 96 * 1500 = 18 288 000 (not a float32 integer), exactly."""
    k = 1500
    x = torch.ones(2, k)
    sign = torch.ones(2, 3, k, dtype=torch.int8)
    exp = torch.stack([torch.full((3, k), MAX_EXP, dtype=torch.int8), torch.full((3, k), MAX_EXP - 1, dtype=torch.int8)])
    assert ops.accumulator_dtype(2, k) == torch.float64 and ops.accumulator_dtype(1, 1024) == torch.float32
    y = torch.ops.ptool_shift.shift_linear(x, sign, exp, torch.ones(3), None)
    sx = torch.tensor(1.0) / 127
    assert torch.equal(y, torch.full((2, 3), float(127 * 96 * k), dtype=torch.float32) * sx)
    assert 127 * 96 * k > 2**24


def test_op_gradient_is_straight_through():
    gen = torch.Generator().manual_seed(3)
    sign, exp = _random_codes(2, 6, 10, gen)
    alpha, bias = torch.rand(6, generator=gen), torch.randn(6, generator=gen).requires_grad_()
    x = torch.randn(4, 10, generator=gen, requires_grad=True)
    grad = torch.randn(4, 6, generator=gen)
    torch.ops.ptool_shift.shift_linear(x, sign, exp, alpha, bias).backward(grad)
    w = shift_weight_terms_int(sign, exp).float() * alpha[:, None]
    torch.testing.assert_close(x.grad, grad @ w, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(bias.grad, grad.sum(0), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------ weight levels
@functools.cache
def _gaussian_weight() -> torch.Tensor:
    return torch.randn(256, 256, generator=torch.Generator().manual_seed(0))


def _rel_mse(codes, w) -> float:
    return float((codes.weight() - w).pow(2).sum() / w.pow(2).sum())


def test_shift_levels_are_signed_powers_of_two():
    w = _gaussian_weight()
    c = encode_weight(w, "shift")
    assert c.sign.shape == (1, 256, 256) and c.sign.dtype == c.exp.dtype == torch.int8
    assert set(c.sign.unique().tolist()) == {-1, 0, 1}
    assert int(c.exp.min()) >= 0 and int(c.exp.max()) == MAX_EXP  # the top level is used
    levels = shift_weight_terms_int(c.sign, c.exp).abs()
    assert set(levels.unique().tolist()) <= {0} | {2**e for e in range(MAX_EXP + 1)}
    assert torch.equal(c.exp[c.sign == 0], torch.zeros_like(c.exp[c.sign == 0]))
    # one rounding grid per row: the level never falls as |w| grows, and the sign is w's
    order = w.abs().argsort(1)
    assert bool((levels.gather(1, order).diff(dim=1) >= 0).all())
    nonzero = c.sign[0] != 0
    assert torch.equal(c.sign[0][nonzero], torch.sign(w)[nonzero].to(torch.int8))
    # measured 0.0338 (alpha = max|w|/64 alone: 0.0378)
    assert _rel_mse(c, w) < 0.036


def test_shift2_levels_are_sums_of_two_powers_of_two():
    w = _gaussian_weight()
    c = encode_weight(w, "shift2")
    assert c.sign.shape == (2, 256, 256)
    both = (c.sign[0] != 0) & (c.sign[1] != 0)
    assert bool((c.exp[1][both] < c.exp[0][both]).all())
    assert bool(((c.sign[0] == 0) <= (c.sign[1] == 0)).all())  # the second term only with a first
    assert int(shift_weight_terms_int(c.sign, c.exp).abs().max()) <= ops.max_weight_level(2) == 96
    assert _rel_mse(c, w) < 0.0014  # measured 0.00124: 27x below one term


def test_ternary_follows_tbt_threshold():
    w = _gaussian_weight()
    c = encode_weight(w, "ternary")
    assert torch.equal(c.exp, torch.zeros_like(c.exp))
    assert set(c.sign.unique().tolist()) == {-1, 0, 1}
    zero = (w.abs() < w.abs().mean(1, keepdim=True) * 2 / 3)
    assert torch.equal(c.sign[0] == 0, zero)
    assert torch.equal(c.sign[0][~zero], torch.sign(w)[~zero].to(torch.int8))
    torch.testing.assert_close(c.alpha, (w.abs() * ~zero).sum(1) / (~zero).sum(1))  # least-squares scale
    assert _rel_mse(c, w) < 0.2  # measured 0.192 (TBT's 4/3 mean|w| scale: 0.198)


def test_binary_is_sign_times_mean_abs():
    w = _gaussian_weight()
    c = encode_weight(w, "binary")
    assert torch.equal(c.sign[0], torch.where(w >= 0, 1, -1).to(torch.int8))
    torch.testing.assert_close(c.alpha, w.abs().mean(1))
    assert abs(_rel_mse(c, w) - (1 - 2 / math.pi)) < 0.01  # Gaussian rows: 1 - 2/pi


def test_level_tables_are_sorted_and_decode():
    for mode in MODES:
        values, signs, exps = level_table(mode)
        assert bool((values[1:] > values[:-1]).all())
        decoded = (signs.int() * torch.bitwise_left_shift(torch.ones_like(exps, dtype=torch.int32), exps.int())).sum(1)
        assert torch.equal(decoded.float(), values)
    assert level_table("shift")[0].numel() == 2 * (MAX_EXP + 1) + 1


# ------------------------------------------------------------------------------ the pass on models
def _mlp(seed: int = 0, activation: type[nn.Module] = nn.GELU) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 96), activation(), nn.Linear(96, 10)).eval()


def test_pass_rewrites_every_linear_and_reports_counts():
    m, x = _mlp(), torch.randn(4, 3, 64)
    m2 = ptool.transform(m, ["shift-linear"], (x,))
    hist = op_histogram(m2.graph_module)
    assert hist.get("ptool_shift.shift_linear") == 3 and "aten.linear" not in hist
    notes = m2.report[0].notes
    macs = 12 * (64 * 128 + 128 * 96 + 96 * 10)
    assert notes["macs_replaced"] == macs
    assert notes["multiplies_added"] == 12 * ((64 + 2 * 128) + (128 + 2 * 96) + (96 + 2 * 10))
    assert notes["multiplications_removed"] == macs - notes["multiplies_added"]
    assert notes["weight_bytes_before"] == 4 * (64 * 128 + 128 * 96 + 96 * 10)
    assert notes["weight_bytes_int8"] == (64 * 128 + 128 * 96 + 96 * 10) + 4 * (128 + 96 + 10)
    assert max(notes["weight_error"].values()) < 0.04
    assert m2.report[0].fidelity.cosine > 0.95  # random weights, measured 0.961
    again = ShiftLinear().run(m2.graph_module, ptool.passes.base.PassContext(example_inputs=(x,)))
    assert not again.changed  # idempotent: nothing left to rewrite


def test_exported_model_runs_in_onnxruntime_bit_exact(tmp_path):
    """MatMulInteger (int8 x int8 -> int32) and the float epilogue give torch's numbers exactly on a ReLU
    MLP (ORT's GELU differs from torch's by rounding, so none here)."""
    import onnx

    for mode in ("shift", "shift2"):
        m, x = _mlp(1, nn.ReLU), torch.randn(5, 64)
        m2 = ptool.transform(m, [f"shift-linear:mode={mode}"], (x,))
        path = ptool.export_onnx(m2, tmp_path / f"{mode}.onnx", example_inputs=(x,))
        kinds = {n.op_type for n in onnx.load(str(path)).graph.node}
        assert "MatMulInteger" in kinds and not kinds & {"MatMul", "Gemm"}
        run = ptool.compile(m2, backend="onnxruntime", example_inputs=(x,))
        for seed in range(3):
            x2 = torch.randn(5, 64, generator=torch.Generator().manual_seed(seed)) * (seed + 1)
            assert torch.equal(run(x2), m2(x2))


class _PointwiseCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.expand = nn.Conv2d(16, 32, 1)
        self.reduce = nn.Conv2d(32, 8, 1, stride=2)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        return self.head(self.reduce(torch.relu(self.expand(torch.relu(self.stem(x))))).mean((2, 3)))


def test_pointwise_convs_become_shift_linears_and_strided_ones_are_skipped():
    torch.manual_seed(0)
    m, x = _PointwiseCNN().eval(), torch.randn(2, 3, 8, 8)
    m2 = ptool.transform(m, ["shift-linear"], (x,))
    rec = m2.report[0]
    assert rec.rewritten == 2  # expand (1x1) and head; stem is 3x3, reduce strided
    assert [s.reason for s in rec.skipped] == ["1x1 conv with stride [2, 2] / padding [0, 0] (only stride 1, no padding)"]
    assert rec.notes["macs_replaced"] == 2 * 8 * 8 * 16 * 32 + 2 * 8 * 5
    run = ptool.compile(m2, backend="onnxruntime", example_inputs=(x,))
    x2 = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(run(x2), m2(x2), rtol=1e-5, atol=1e-6)  # the float convs may differ by rounding
    assert rec.fidelity.cosine > 0.99


@pytest.mark.parametrize("model, want", [
    ("bert", {"intermediate.dense", "output.dense"}),
    ("llama", {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}),
    ("gpt2", {"mlp.c_fc", "mlp.c_proj"}),
    ("vit", {"mlp.fc1", "mlp.fc2"}),
])
def test_sites_mlp_picks_the_feed_forward_pair(model, want):
    f = getattr(zoo, model)()
    m2 = ptool.transform(f.model, ["shift-linear:sites=mlp"], f.example_inputs, example_kwargs=f.example_kwargs)
    rec = m2.report[0]
    paths = [label.split("(")[1].rstrip(")") for label in rec.notes["layers"]]
    assert len(paths) == 2 * len(want)  # two transformer layers
    assert not any("attention" in p or "attn" in p for p in paths)
    assert all(p.endswith(tuple(want)) for p in paths)
    assert {w for w in want if sum(p.endswith(w) for p in paths) == 2} == want
    assert all(s.reason == "not a feed-forward (MLP) layer (sites=mlp)" for s in rec.skipped)
    assert len(rec.skipped) >= 2 * 2  # at least the attention's input and output projections


def test_exclude_and_keep_float_leave_layers_in_float():
    m, x = _mlp(), torch.randn(8, 64)
    rec = ptool.transform(m, ["shift-linear:exclude=4"], (x,)).report[0]
    assert rec.rewritten == 2 and rec.skipped[0].reason == "kept float: matches exclude pattern '4'"
    rec = ptool.transform(m, ["shift-linear:mode=binary,keep_float=1"], (x,)).report[0]
    errors = rec.notes["layer_error"]
    worst = max(errors, key=errors.get)
    assert rec.rewritten == 2 and rec.skipped[0].site == worst
    assert worst not in rec.notes["layers"]


@pytest.mark.parametrize("spec, message", [
    ("shift-linear:mode=shift3", "did you mean 'shift'"),
    ("shift-linear:mode=terms2", "shift | shift2 | ternary | binary"),
    ("shift-linear:sites=attention", "all | mlp"),
    ("shift-linear:keep_float=-1", "keep_float must be >= 0"),
    ("shift-linear:bits=5", "bits"),
])
def test_bad_options_are_one_line_pass_errors(spec, message):
    with pytest.raises(PassError) as err:
        ptool.transform(_mlp(), [spec], (torch.randn(2, 64),))
    text = str(err.value)
    assert message in text and "shift-linear" in text and "\n" not in text


def test_spec_round_trips():
    p = ShiftLinear(mode="shift2", sites="mlp", exclude=("lm_head",), keep_float=2)
    assert ptool.passes.registry.parse_pass(p.spec()) == p


# ------------------------------------------------------------------------------ acceptance: digits
@functools.cache
def _digits_mlp() -> tuple[dict, float]:
    """A 64-128-128-10 ReLU MLP trained on digits (30 epochs, seeded, ~2 s); its state and test accuracy."""
    data = digits_data()
    x, y = data.x_train.flatten(1), data.y_train
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(30):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x) - 63, 64):
            idx = order[i:i + 64]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    return {k: v.clone() for k, v in model.state_dict().items()}, accuracy(model, data.x_test.flatten(1), data.y_test)


#: allowed accuracy loss in points per mode: the issue's 1.5 for ``shift`` (measured 0.0 of 98.0%);
#: the others are loose bounds over what was measured post-training (shift2 -0.2, ternary 5.6,
#: binary 8.0 points: TBT trains its ternary/binary weights, this does not).
_MAX_LOSS = {"shift": 1.5, "shift2": 1.0, "ternary": 7.0, "binary": 10.0}


@pytest.mark.parametrize("mode", MODES)
def test_digits_mlp_keeps_its_accuracy(mode):
    state, base = _digits_mlp()
    data = digits_data()
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    model.load_state_dict(state)
    x_test = data.x_test.flatten(1)
    assert base > 0.95
    m2 = ptool.transform(model.eval(), [f"shift-linear:mode={mode}"], (x_test,))  # traced on the whole split
    assert m2.report[0].rewritten == 3
    with torch.no_grad():
        loss = 100 * (base - float((m2(x_test).argmax(-1) == data.y_test).float().mean()))
    print(f"digits MLP {mode}: base {100 * base:.1f}%, loss {loss:.2f} points")
    assert loss <= _MAX_LOSS[mode]
