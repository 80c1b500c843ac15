"""The pass manager: verification after every pass, records, instruments, error naming."""

import dataclasses
from typing import ClassVar

import pytest
import torch

import ptool
from ptool.errors import VerificationError
from ptool.ir.graph import attr_tensor, is_op
from ptool.passes.base import Family, Pass, PassResult
from ptool.passes.instruments import DumpIR
from ptool.verify import Close, Lossy


class _MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = torch.nn.Linear(8, 16)
        self.fc2 = torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _scale_first_weight(gm, factor):
    linear = next(n for n in gm.graph.nodes if is_op(n, torch.ops.aten.linear))
    w = attr_tensor(gm, linear.args[1])
    w.data.mul_(factor)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _BrokenExact(Pass):
    """Claims exactness but perturbs a weight by 1%."""

    name: ClassVar[str] = "broken-exact"
    family: ClassVar[Family] = Family.CLEANUP
    numerics: ClassVar = Close(rtol=1e-5)

    def run(self, gm, ctx):
        _scale_first_weight(gm, 1.01)
        r = PassResult()
        r.hit()
        return r


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Approx(Pass):
    """An approximate pass that perturbs a weight by 1%."""

    name: ClassVar[str] = "approx-toy"
    family: ClassVar[Family] = Family.ATTENTION_LINEAR
    numerics: ClassVar = Lossy("cosine", 0.999999)
    factor: ClassVar[float] = 1.01

    def run(self, gm, ctx):
        _scale_first_weight(gm, self.factor)
        r = PassResult()
        r.hit()
        return r


def test_exact_pass_that_drifts_is_named_in_the_error():
    x = torch.randn(3, 8)
    with pytest.raises(VerificationError, match=r"exact pass 'broken-exact' changed the outputs.*passes before it: dce"):
        ptool.transform(_MLP(), ["dce", _BrokenExact()], (x,))


def test_without_verification_the_broken_pass_runs():
    x = torch.randn(3, 8)
    m2 = ptool.transform(_MLP(), [_BrokenExact()], (x,), verify=False)
    assert m2.report[0].fidelity is None
    assert not torch.allclose(m2(x), _MLP()(x))


def test_approximate_pass_records_fidelity_and_contract():
    x = torch.randn(3, 8)
    m2 = ptool.transform(_MLP(), [_Approx()], (x,))
    rec = m2.report["approx-toy"]
    assert rec.exact is False
    assert 0.99 < rec.fidelity.cosine < 1.0
    assert rec.fidelity.max_abs_error > 0
    assert rec.within_contract is (rec.fidelity.cosine >= 0.999999)
    assert m2.report.total.max_abs_error == pytest.approx(rec.fidelity.max_abs_error)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Overreaching(_Approx):
    """Perturbs a weight by 50%: past any reasonable bound."""

    name: ClassVar[str] = "overreaching-toy"
    numerics: ClassVar = Lossy("cosine", 0.9999)
    factor: ClassVar[float] = 1.5


def test_approximate_pass_past_its_bound_warns_and_says_how():
    x = torch.randn(3, 8)
    with pytest.warns(UserWarning, match=r"approximate pass 'overreaching-toy' missed its declared bound "
                                         r"approx\(cosine bound 0.9999\): cosine 0.9\d+ is past the bound"):
        m2 = ptool.transform(_MLP(), [_Overreaching()], (x,))
    rec = m2.report["overreaching-toy"]
    assert rec.within_contract is False and rec.violation.startswith("cosine ")
    assert m2.report.to_dict()["passes"][0]["violation"] == rec.violation


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Scale(Pass):
    """Scales the first weight by ``factor`` under a cosine bound (an approximate toy)."""

    name: ClassVar[str] = "scale-toy"
    family: ClassVar[Family] = Family.ATTENTION_LINEAR
    numerics: ClassVar = Lossy("cosine", 0.9999)
    factor: float = 1.0

    def run(self, gm, ctx):
        _scale_first_weight(gm, self.factor)
        r = PassResult()
        r.hit()
        return r


def test_after_other_approximations_a_pass_is_judged_on_the_error_it_adds(recwarn):
    x = torch.randn(3, 8)
    # the second pass moves the outputs far from its input, but back onto the original model's
    m2 = ptool.transform(_MLP(), [_Scale(factor=1.5), _Scale(factor=1 / 1.5)], (x,))
    first, second = m2.report.records
    assert first.within_contract is False  # judged alone: 1.5x is past 0.9999
    assert second.fidelity.cosine < 0.9999 and second.within_contract is True
    assert m2.report.total.cosine > 0.999999
    # one that adds error of its own past its bound still misses it
    m2 = ptool.transform(_MLP(), [_Scale(factor=1.5), _Scale(factor=1.5)], (x,))
    assert m2.report.records[1].within_contract is False
    assert [str(w.message).count("missed its declared bound") for w in recwarn] == [1, 1, 1]


def test_calibration_batches_are_verified_too():
    x = torch.randn(3, 8)
    calib = [(torch.randn(3, 8),) for _ in range(6)]
    m2 = ptool.transform(_MLP(), ["dce", "fold-bn"], (x,), calibration=calib)
    assert m2.report.verified_on == 1 + ptool.pipeline.fx_ir.VERIFY_BATCHES


def test_records_count_nodes_params_and_time():
    x = torch.randn(3, 8)
    m2 = ptool.transform(_MLP(), ["dce", "cse"], (x,))
    assert [r.name for r in m2.report] == ["dce", "cse"]
    for r in m2.report:
        assert r.nodes_before == r.nodes_after == 3  # linear, relu, linear
        assert r.params_after == 8 * 16 + 16 + 16 * 4 + 4
        assert r.seconds >= 0
        assert r.fidelity.max_abs_error == 0
    text = str(m2.report)
    assert "dce" in text and "cse" in text and "whole model vs original" in text


def test_dump_ir_instrument_writes_numbered_files(tmp_path):
    x = torch.randn(3, 8)
    ptool.transform(_MLP(), ["dce", "fold-bn"], (x,), instruments=[DumpIR(tmp_path)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000_input.txt", "001_dce.txt", "002_fold-bn.txt"]
    assert "aten.linear" in (tmp_path / "002_fold-bn.txt").read_text()


def test_transform_does_not_mutate_the_users_model():
    model = _MLP()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, 8)
    ptool.transform(model, [_BrokenExact()], (x,), verify=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_result_is_a_drop_in_module_and_stays_trainable():
    x = torch.randn(3, 8)
    m2 = ptool.transform(_MLP(), ["fold-bn"], (x,))
    assert isinstance(m2, torch.nn.Module)
    params = list(m2.parameters())
    assert params and all(p.requires_grad for p in params)
    m2(x).sum().backward()
    assert all(p.grad is not None for p in params)


def test_wrong_input_shape_gives_a_clear_error():
    x = torch.randn(3, 8)
    m2 = ptool.transform(_MLP(), ["dce"], (x,))
    with pytest.raises(ptool.InputError, match="does not fit the traced model"):
        m2(torch.randn(5, 8))
    with pytest.raises(ptool.InputError, match=r"fails on the example inputs \(\(3, 5\):float32\)"):
        ptool.transform(_MLP(), ["dce"], (torch.randn(3, 5),))


def test_missing_calibration_is_a_clear_error():
    ctx = ptool.passes.PassContext()
    with pytest.raises(ptool.PassError, match="pass 'x' needs calibration data"):
        ctx.require_calibration("x")


def test_dynamic_shapes_allow_other_batch_sizes():
    x = torch.randn(3, 8)
    batch = torch.export.Dim("batch", min=1, max=64)
    m2 = ptool.transform(_MLP(), ["fold-bn", "cse"], (x,), dynamic_shapes=({0: batch},))
    y = torch.randn(7, 8)
    torch.testing.assert_close(m2(y), _MLP()(y), rtol=1e-5, atol=1e-6)


class _RepVGGBlock(torch.nn.Module):
    """conv3x3+BN || conv1x1+BN, summed: merge-branches can only merge once fold-bn has run."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, padding=1, bias=False), torch.nn.BatchNorm2d(4))
        self.b = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 1, bias=False), torch.nn.BatchNorm2d(4))
        for bn in (self.a[1], self.b[1]):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)

    def forward(self, x):
        return torch.relu(self.a(x) + self.b(x))


def _convs(m2) -> int:
    return sum(1 for n in m2.graph_module.graph.nodes if is_op(n, torch.ops.aten.conv2d))


def test_fixpoint_repeats_the_exact_passes_until_nothing_changes():
    model, x = _RepVGGBlock().eval(), torch.randn(1, 4, 8, 8)
    once = ptool.transform(model, ["merge-branches", "fold-bn"], (x,))
    assert _convs(once) == 2 and "run fold-bn first" in str(once.report)

    m2 = ptool.transform(model, ["merge-branches", "fold-bn"], (x,), fixpoint=True)
    assert _convs(m2) == 1
    labels = [r.label for r in m2.report]
    assert labels == ["merge-branches", "fold-bn", "merge-branches (round 2)"]  # round 3 changed nothing: no rows
    assert "run fold-bn first" not in str(m2.report)  # the skip of round 1 is superseded by round 2
    assert "exact passes repeated to a fixpoint: 2 rounds" in str(m2.report)
    torch.testing.assert_close(m2(x), model(x), rtol=1e-4, atol=1e-5)


def test_fixpoint_leaves_approximate_passes_at_one_run():
    model, x = _MLP().eval(), torch.randn(4, 8)
    m2 = ptool.transform(model, ["dce", "quantize", "cse"], (x,), fixpoint=True)
    assert [r.spec for r in m2.report].count("quantize") == 1
    assert all(r.round == 1 for r in m2.report if not r.exact)
