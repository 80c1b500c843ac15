"""fold-bn: every conv/linear + BN form, the sites it must refuse (with reasons), real CNNs."""

import pytest
import torch

import ptool
from ptool.frontends.torch_export import capture
from ptool.ir.graph import op_histogram
from ptool.passes.base import PassContext
from tests.models import zoo

BN_OPS = ("aten.batch_norm", "aten._native_batch_norm_legit_no_training")


def _bn_count(gm) -> int:
    hist = op_histogram(gm)
    return sum(hist[k] for k in BN_OPS)


def _max_rel(fixture, m2, seed) -> float:
    args, kwargs = fixture.inputs(seed)
    return ptool.verify.compare(fixture.run((args, kwargs)), m2(*args, **kwargs)).max_rel_error


@pytest.mark.parametrize("fixture", zoo.bn_zoo(), ids=lambda f: f.name)
def test_fold_bn_cases(fixture):
    m2 = ptool.transform(fixture.model, ["fold-bn"], fixture.example_inputs, example_kwargs=fixture.example_kwargs)
    rec = m2.report["fold-bn"]
    assert rec.rewritten == fixture.folds, fixture.note
    assert len(rec.skipped) == fixture.keeps, fixture.note
    assert _bn_count(m2.graph_module) == fixture.keeps
    # exact on the example and on a held-out batch (not just the inputs it was verified on)
    assert rec.fidelity.max_rel_error <= 1e-5
    assert _max_rel(fixture, m2, seed=7) <= 1e-5


def test_padding_after_bn_is_skipped_with_the_reason():
    case = next(f for f in zoo.bn_zoo() if f.name == "bn_conv_pad1")
    m2 = ptool.transform(case.model, ["fold-bn"], case.example_inputs)
    (skip,) = m2.report["fold-bn"].skipped
    assert "zero-pads its input" in skip.reason and "not exact" in skip.reason
    assert "skipped sites" in str(m2.report) and "zero-pads" in str(m2.report)


def test_shared_conv_output_is_skipped_with_the_reason():
    case = next(f for f in zoo.bn_zoo() if f.name == "conv_bn_shared")
    m2 = ptool.transform(case.model, ["fold-bn"], case.example_inputs)
    (skip,) = m2.report["fold-bn"].skipped
    assert "also used elsewhere" in skip.reason


def test_batch_statistics_bn_is_skipped():
    case = next(f for f in zoo.bn_zoo() if f.name == "conv2d_bn_batchstats")
    m2 = ptool.transform(case.model, ["fold-bn"], case.example_inputs)
    (skip,) = m2.report["fold-bn"].skipped
    assert "training mode" in skip.reason or "running statistics" in skip.reason


def test_fold_into_next_can_be_turned_off():
    case = next(f for f in zoo.bn_zoo() if f.name == "bn_conv_pad0")
    m2 = ptool.transform(case.model, ["fold-bn:fold_into_next=false"], case.example_inputs)
    assert m2.report["fold-bn"].rewritten == 0
    assert "fold_into_next=false" in m2.report["fold-bn"].skipped[0].reason


@pytest.mark.parametrize("builder", [zoo.resnet, zoo.mobilenet_v2], ids=["resnet", "mobilenet_v2"])
def test_fold_bn_is_exact_on_real_cnns_and_removes_every_bn(builder):
    fixture = builder()
    before = _bn_count(capture(fixture.model, fixture.example_inputs, fixture.example_kwargs).graph_module)
    assert before > 5
    m2 = ptool.transform(fixture.model, ["fold-bn"], fixture.example_inputs, example_kwargs=fixture.example_kwargs)
    rec = m2.report["fold-bn"]
    assert rec.rewritten == before  # every BN the report counts is gone
    assert rec.skipped == []
    assert _bn_count(m2.graph_module) == 0
    assert rec.params_after < rec.params_before
    assert rec.nodes_after == rec.nodes_before - before
    assert rec.fidelity.max_rel_error <= 1e-5
    assert _max_rel(fixture, m2, seed=3) <= 1e-5


def test_fold_bn_is_idempotent():
    fixture = zoo.resnet()
    gm = capture(fixture.model, fixture.example_inputs, fixture.example_kwargs).graph_module
    p = ptool.passes.FoldBatchNorm()
    assert p.run(gm, PassContext()).changed
    gm.recompile()
    assert p.run(gm, PassContext()).changed is False


def test_tied_conv_weight_is_not_overwritten_for_its_other_user():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 4, 1)
            self.bn = torch.nn.BatchNorm2d(4)

        def forward(self, x):
            a = self.bn(self.conv(x))
            b = torch.nn.functional.conv2d(x, self.conv.weight)  # reads the same weight, no BN
            return a + b

    model = Tied()
    zoo.randomize_batchnorm(model, 0)
    x = torch.randn(2, 4, 5, 5)
    m2 = ptool.transform(model.eval(), ["fold-bn"], (x,))
    assert m2.report["fold-bn"].rewritten == 1
    assert ptool.verify.compare(model(x), m2(x)).max_rel_error <= 1e-5


@pytest.mark.parametrize("builder", [zoo.resnet, zoo.mobilenet_v2], ids=["resnet", "mobilenet_v2"])
def test_fold_bn_is_exact_in_float64(builder):
    """In float64 the fold is exact to rounding (<= 1e-10 relative)."""
    fixture = builder()
    model = fixture.model.double()
    x = fixture.example_inputs[0].double()
    m2 = ptool.transform(model, ["fold-bn"], (x,))
    assert m2.report["fold-bn"].fidelity.max_rel_error <= 1e-10
    y = fixture.inputs(4)[0][0].double()
    with torch.no_grad():
        assert ptool.verify.compare(model(y), m2(y)).max_rel_error <= 1e-10


class _LinearNorm(torch.nn.Module):
    """LeViT's Linear -> flatten(0, 1) -> BatchNorm1d -> reshape_as (the features stay in the last axis)."""

    def __init__(self, a: int, b: int) -> None:
        super().__init__()
        self.linear, self.bn = torch.nn.Linear(a, b, bias=False), torch.nn.BatchNorm1d(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class _LeViTBlock(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = _LinearNorm(8, 16), _LinearNorm(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.nn.functional.hardswish(self.up(x)))


def test_batchnorm1d_over_a_linears_flattened_rows_folds_into_it():
    torch.manual_seed(0)
    model = _LeViTBlock().eval()
    zoo.randomize_batchnorm(model, 0)
    x = torch.randn(2, 5, 8)
    m2 = ptool.transform(model, ["fold-bn"], (x,))
    assert m2.report[0].rewritten == 2 and not m2.report[0].skipped
    assert not any("batch_norm" in k for k in op_histogram(m2.graph_module))
    torch.testing.assert_close(m2(x), model(x), rtol=1e-5, atol=1e-6)


def test_a_reshape_that_moves_the_features_is_not_seen_through():
    """A Linear (B, N, C) flattened to (B, N*C) rows: BatchNorm1d then normalizes N*C channels, not the features."""
    class Mixed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear, self.bn = torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(20)

        def forward(self, x):
            return self.bn(self.linear(x).flatten(1))

    model = Mixed().eval()
    zoo.randomize_batchnorm(model, 0)
    m2 = ptool.transform(model, ["fold-bn"], (torch.randn(3, 5, 4),))
    assert m2.report[0].rewritten == 0
    assert "not a conv/linear" in m2.report[0].skipped[0].reason


def test_batchnorm_before_a_linear_folds_through_eval_dropout():
    """LeViT's NormLinear head: BatchNorm1d -> Dropout -> Linear."""
    model = torch.nn.Sequential(torch.nn.BatchNorm1d(8), torch.nn.Dropout(0.1), torch.nn.Linear(8, 3)).eval()
    zoo.randomize_batchnorm(model, 0)
    x = torch.randn(4, 8)
    m2 = ptool.transform(model, ["fold-bn"], (x,))
    assert m2.report[0].rewritten == 1
    assert not any("batch_norm" in k for k in op_histogram(m2.graph_module))
    torch.testing.assert_close(m2(x), model(x), rtol=1e-5, atol=1e-6)
