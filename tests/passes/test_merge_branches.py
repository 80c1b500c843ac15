"""merge-branches: RepVGG-style branch sums, linear sums and chains, refusals with reasons, real models."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import ptool
from ptool.ir.graph import op_histogram
from ptool.passes.fold_bn import FoldBatchNorm
from ptool.passes.merge_branches import MergeBranches
from tests.models import zoo

BN_OPS = ("aten.batch_norm", "aten._native_batch_norm_legit_no_training")


class RepVGGBlock(nn.Module):
    """3x3 conv+BN || 1x1 conv+BN || identity BN (when shapes allow), summed, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1, groups: int = 1):
        super().__init__()
        self.dense = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, groups=groups, bias=False), nn.BatchNorm2d(cout))
        self.one = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, 0, groups=groups, bias=False), nn.BatchNorm2d(cout))
        self.identity = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None

    def forward(self, x):
        y = self.dense(x) + self.one(x)
        if self.identity is not None:
            y = y + self.identity(x)
        return torch.relu(y)


def repvgg(dtype=torch.float32) -> nn.Module:
    # 3->8 (no identity: channels change), 8->8 (identity), 8->16 stride 2 (no identity), 16->16 groups 4
    model = nn.Sequential(RepVGGBlock(3, 8), RepVGGBlock(8, 8), RepVGGBlock(8, 16, stride=2),
                          RepVGGBlock(16, 16, groups=4))
    zoo.randomize_batchnorm(model, 0)
    return model.eval().to(dtype)


def _rel(model, m2, *args) -> float:
    """Relative error on held-out inputs (new values; the graph is traced for the example shapes)."""
    with torch.no_grad():
        return ptool.verify.compare(model(*args), m2(*args)).max_rel_error


def _merge(model, *args, **options):
    return ptool.transform(model, [MergeBranches(**options)], args)


# ---------------------------------------------------------------------------------------------
# RepVGG


@pytest.fixture(scope="module")
def repvgg_merged():
    model = repvgg()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    # the second merge-branches run is the idempotence check (test_second_run_changes_nothing)
    return model, x, ptool.transform(model, [FoldBatchNorm(), MergeBranches(), MergeBranches()], (x,))


def test_repvgg_stack_becomes_one_conv_per_block(repvgg_merged):
    model, x, m2 = repvgg_merged
    hist = op_histogram(m2.graph_module)
    assert hist["aten.conv2d"] == 4 and hist["aten.relu"] == 4 and len(hist) == 2  # no add, no BN left
    rec = m2.report["merge-branches"]
    assert rec.rewritten == 4 and rec.skipped == []
    assert rec.notes == {"conv_sums": 4, "linear_sums": 0, "conv_chains": 0, "linear_chains": 0}
    # per block conv, conv, add (+ BN, add with identity), relu -> conv, relu: 4+6+4+6 -> 4*2
    assert (rec.nodes_before, rec.nodes_after) == (20, 8)
    # the 1x1 kernels+biases and identity BNs go: 32 + (72 + 32) + 144 + (80 + 64) = 424 elements
    assert (rec.params_before, rec.params_after) == (2992, 2568)
    assert rec.fidelity.max_rel_error <= 1e-5
    held_out = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    assert _rel(model, m2, held_out) <= 1e-5


def test_repvgg_is_exact_in_float64():
    model = repvgg(torch.float64)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    m2 = ptool.transform(model, [FoldBatchNorm(), MergeBranches()], (x,))
    assert m2.report["merge-branches"].fidelity.max_rel_error <= 1e-10
    assert _rel(model, m2, torch.randn(2, 3, 16, 16, dtype=torch.float64)) <= 1e-10


def test_repvgg_onnxruntime_agrees(repvgg_merged):
    _, x, m2 = repvgg_merged
    run = ptool.compile(m2, backend="onnxruntime")
    with torch.no_grad():
        assert ptool.verify.compare(m2(x), run(x)).max_rel_error <= 1e-4


def test_second_run_changes_nothing(repvgg_merged):
    second = repvgg_merged[2].report[2]
    assert second.rewritten == 0 and second.nodes_after == second.nodes_before and second.skipped == []


def test_unfolded_batchnorm_branches_are_refused():
    model = RepVGGBlock(4, 4).eval()
    zoo.randomize_batchnorm(model, 1)
    m2 = _merge(model, torch.randn(1, 4, 6, 6))
    rec = m2.report["merge-branches"]
    assert rec.rewritten == 0
    (skip,) = rec.skipped
    assert "run fold-bn first" in skip.reason


# ---------------------------------------------------------------------------------------------
# conv branch forms


class Branches(nn.Module):
    def __init__(self, *convs: nn.Conv2d, identity: bool = False):
        super().__init__()
        self.convs = nn.ModuleList(convs)
        self.identity = identity

    def forward(self, x):
        y = self.convs[0](x)
        for conv in self.convs[1:]:
            y = y + conv(x)
        return y + x if self.identity else y


def test_asymmetric_kernels_and_depthwise_identity_merge():
    # ACNet: 3x3 + 1x3 + 3x1 (+ identity), depthwise
    model = Branches(nn.Conv2d(6, 6, 3, padding=1, groups=6), nn.Conv2d(6, 6, (1, 3), padding=(0, 1), groups=6),
                     nn.Conv2d(6, 6, (3, 1), padding=(1, 0), groups=6, bias=False), identity=True).eval()
    x = torch.randn(2, 6, 9, 7)
    m2 = _merge(model, x)
    assert op_histogram(m2.graph_module) == {"aten.conv2d": 1}
    assert m2.report["merge-branches"].notes["conv_sums"] == 1
    assert _rel(model, m2, torch.randn(2, 6, 9, 7)) <= 1e-5


def test_larger_kernel_with_dilation_and_stride_merges():
    model = Branches(nn.Conv2d(4, 5, 5, stride=2, padding=4, dilation=2), nn.Conv2d(4, 5, 3, stride=2, padding=2, dilation=2),
                     nn.Conv2d(4, 5, 1, stride=2)).eval()
    x = torch.randn(2, 4, 11, 11)
    m2 = _merge(model, x)
    assert op_histogram(m2.graph_module) == {"aten.conv2d": 1}
    assert _rel(model, m2, torch.randn(2, 4, 11, 11)) <= 1e-5


@pytest.mark.parametrize("convs, size, reason", [
    # same output size, but the 3x3 is centred one pixel off the 1x1
    ((nn.Conv2d(4, 4, 3, stride=3, padding=2), nn.Conv2d(4, 4, 1, stride=3)), 7, "paddings do not align"),
    ((nn.Conv2d(4, 4, 2, stride=2), nn.Conv2d(4, 4, 1, stride=2)), 8, "differ by an odd amount"),
    ((nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.Conv2d(4, 4, 1)), 7, "stride/groups differ"),
    ((nn.Conv2d(4, 4, 3, padding=2, dilation=2), nn.Conv2d(4, 4, 3, padding=1)), 7, "dilations differ"),
], ids=["misaligned", "even-kernel", "groups", "dilation"])
def test_incompatible_conv_branches_are_refused(convs, size, reason):
    model = Branches(*convs).eval()
    m2 = _merge(model, torch.randn(1, 4, size, size))
    rec = m2.report["merge-branches"]
    assert rec.rewritten == 0 and rec.nodes_after == rec.nodes_before
    (skip,) = rec.skipped
    assert reason in skip.reason


@st.composite
def _branch_geometries(draw):
    """2-3 conv branches on one input (+ maybe the identity): random kernels, paddings, dilations, groups."""
    groups = draw(st.sampled_from([1, 2, 4]))
    stride = draw(st.sampled_from([1, 1, 2]))
    convs = []
    for _ in range(draw(st.integers(2, 3))):
        kernel = (draw(st.sampled_from([1, 3, 5, 1, 3, 2])), draw(st.sampled_from([1, 3])))
        dilation = draw(st.sampled_from([1, 1, 2]))
        # mostly 'same'-style padding (mergeable), sometimes one more (misaligned: refused, or invalid)
        shift = draw(st.sampled_from([0] * 5 + [1]))
        padding = (dilation * (kernel[0] - 1) // 2 + shift, dilation * (kernel[1] - 1) // 2)
        branch_groups = draw(st.sampled_from([groups] * 4 + [1]))
        convs.append(nn.Conv2d(4, 4, kernel, stride, padding, dilation, groups=branch_groups))
    return convs, stride == 1 and draw(st.booleans())


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
@given(_branch_geometries())
def test_random_conv_branches_merge_exactly_or_are_refused_with_a_reason(case):
    convs, identity = case
    x = torch.randn(2, 4, 9, 9)
    model = Branches(*convs, identity=identity).eval()
    with torch.no_grad():
        try:
            model(x)
        except RuntimeError:
            return  # the branches' output sizes differ: not a valid model
    m2 = _merge(model, x)
    rec = m2.report["merge-branches"]
    assert rec.fidelity.max_rel_error <= 1e-5
    assert _rel(model, m2, torch.randn(2, 4, 9, 9)) <= 1e-5
    remaining = op_histogram(m2.graph_module)["aten.conv2d"]
    assert rec.rewritten > 0 or remaining == len(convs)
    assert remaining == 1 or (rec.skipped and all(s.reason for s in rec.skipped))  # what stays says why


# ---------------------------------------------------------------------------------------------
# linear sums and chains


class LinearSum(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(16, 16), nn.Linear(16, 16, bias=False), nn.Linear(16, 16)
        self.other = nn.Linear(16, 16)

    def forward(self, x, y):
        return self.a(x) + x + self.b(x) + self.other(y) + self.c(x)


def test_n_way_linear_sum_with_identity_merges_and_keeps_the_other_input():
    model = LinearSum().eval()
    x, y = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    m2 = _merge(model, x, y)
    rec = m2.report["merge-branches"]
    assert rec.notes["linear_sums"] == 1 and rec.rewritten == 1
    assert op_histogram(m2.graph_module) == {"aten.linear": 2, "aten.add": 1}
    assert (rec.nodes_before, rec.nodes_after) == (8, 3)
    assert rec.params_after == rec.params_before - 2 * (16 * 16) - 16  # b, c and c's bias folded into a
    assert _rel(model, m2, torch.randn(2, 5, 16), torch.randn(2, 5, 16)) <= 1e-5
    # what stays is reported: the linear on y has no partner
    assert "no two branches read the same input" in rec.skipped[0].reason


class LinearBatchNormDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.bn = nn.Linear(8, 8), nn.Linear(8, 8), nn.BatchNorm1d(8)

    def forward(self, x):
        return self.a(x) + self.bn(x) + nn.functional.dropout(self.b(x), 0.1, self.training)


def test_linear_sum_sees_through_eval_dropout_and_folds_an_input_batchnorm():
    model = LinearBatchNormDropout().eval()
    zoo.randomize_batchnorm(model, 2)
    x = torch.randn(4, 8)
    m2 = _merge(model, x)
    assert op_histogram(m2.graph_module) == {"aten.linear": 1}  # no dropout, BN or add left
    assert _rel(model, m2, torch.randn(4, 8)) <= 1e-5


class Chain(nn.Module):
    def __init__(self, *dims: int, act: bool = False):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, dims[1:]))
        self.act = act

    def forward(self, x):
        x = self.layers[0](x)
        for layer in self.layers[1:]:
            x = layer(torch.relu(x) if self.act else x)
        return x


def test_linear_chain_that_shrinks_is_collapsed():
    model = Chain(32, 16, 8, 8).eval()  # 32*16 + 16*8 >= 32*8, then 32*8 + 8*8 >= 32*8
    m2 = _merge(model, torch.randn(4, 32))
    rec = m2.report["merge-branches"]
    assert rec.notes["linear_chains"] == 2
    assert op_histogram(m2.graph_module) == {"aten.linear": 1}
    assert rec.params_after == 32 * 8 + 8
    assert _rel(model, m2, torch.randn(4, 32)) <= 1e-5


def test_low_rank_chain_is_refused_unless_growth_is_allowed():
    model = Chain(384, 64, 384).eval()
    x = torch.randn(2, 384)
    rec = _merge(model, x).report["merge-branches"]
    assert rec.rewritten == 0
    (skip,) = rec.skipped
    assert "grow the layer from 49152 to 147456" in skip.reason and "allow_growth=true" in skip.reason
    assert MergeBranches(allow_growth=True).spec() == "merge-branches:allow_growth=true"
    m2 = _merge(model, x, allow_growth=True)
    assert m2.report["merge-branches"].notes["linear_chains"] == 1
    assert _rel(model, m2, torch.randn(2, 384)) <= 1e-5


def test_chain_through_a_nonlinearity_or_shared_output_is_not_collapsed():
    rec = _merge(Chain(8, 8, 8, act=True).eval(), torch.randn(2, 8)).report["merge-branches"]
    assert rec.rewritten == 0 and rec.skipped == []  # relu between: not a chain at all

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 4), nn.Linear(4, 4)

        def forward(self, x):
            h = self.a(x)
            return self.b(h), h

    (skip,) = _merge(Shared().eval(), torch.randn(2, 8)).report["merge-branches"].skipped
    assert "also used elsewhere" in skip.reason


def test_conv_then_1x1_conv_chain_is_collapsed_per_group():
    model = nn.Sequential(nn.Conv2d(8, 4, 3, stride=2, padding=1, groups=2), nn.Conv2d(4, 2, 1, groups=2)).eval()
    m2 = _merge(model, torch.randn(2, 8, 9, 9))
    rec = m2.report["merge-branches"]
    assert rec.notes["conv_chains"] == 1 and op_histogram(m2.graph_module) == {"aten.conv2d": 1}
    assert _rel(model, m2, torch.randn(2, 8, 9, 9)) <= 1e-5


# ---------------------------------------------------------------------------------------------
# real models: the pass runs, stays exact, and says why nothing merges


def _run_fixture(fixture, fold: bool, **options):
    passes = ([FoldBatchNorm()] if fold else []) + [MergeBranches(**options)]
    m2 = ptool.transform(fixture.model, passes, fixture.example_inputs, example_kwargs=fixture.example_kwargs)
    rec = m2.report["merge-branches"]
    args, kwargs = fixture.inputs(5)
    with torch.no_grad():
        assert ptool.verify.compare(fixture.run((args, kwargs)), m2(*args, **kwargs)).max_rel_error <= 1e-5
    return rec


def test_resnet_shortcut_add_is_not_merged():
    rec = _run_fixture(zoo.resnet(), fold=True)
    assert rec.rewritten == 0 and rec.nodes_after == rec.nodes_before and rec.fidelity.max_abs_error == 0
    # both bottlenecks add a projection shortcut conv (on the block input, stride 2 in stage 1) to the
    # last 1x1 conv of the branch (on relu_*): different inputs, nothing to merge
    assert len(rec.skipped) == 2
    assert all("no two branches read the same input" in s.reason for s in rec.skipped)


def test_mobilenet_v2_refuses_growing_chains_and_residual_adds():
    fixture = zoo.mobilenet_v2()
    # one transform, two records: the default refuses growth, allow_growth=true then merges
    passes = [FoldBatchNorm(), MergeBranches(), MergeBranches(allow_growth=True)]
    m2 = ptool.transform(fixture.model, passes, fixture.example_inputs, example_kwargs=fixture.example_kwargs)
    default, grown = m2.report[1], m2.report[2]
    assert default.rewritten == 0 and default.fidelity.max_abs_error == 0
    reasons = [s.reason for s in default.skipped]
    # 10 residual adds (projection output + block input); 2 linear-bottleneck -> 1x1 expansion chains
    # that would grow (stem reduce -> layer 0 expand, last projection -> conv_1x1); 5 such chains whose
    # projection output also feeds a residual add
    assert sum("no two branches read the same input" in r for r in reasons) == 10
    assert sum("would grow the layer" in r for r in reasons) == 2
    assert sum("also used elsewhere" in r for r in reasons) == 5
    assert grown.notes["conv_chains"] == 2 and grown.params_after > grown.params_before
    assert grown.fidelity.max_rel_error <= 1e-5
    args, kwargs = fixture.inputs(5)
    with torch.no_grad():
        assert ptool.verify.compare(fixture.run((args, kwargs)), m2(*args, **kwargs)).max_rel_error <= 1e-5


def test_bert_has_nothing_to_merge():
    rec = _run_fixture(zoo.bert(), fold=False)
    assert rec.rewritten == 0 and rec.nodes_after == rec.nodes_before
    # the residual adds: dense(attention or GELU output) + the LayerNorm'd stream, 2 per layer
    assert len(rec.skipped) == 4
    assert all("no two branches read the same input" in s.reason for s in rec.skipped)


class _ConvBN(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int, groups: int) -> None:
        super().__init__(nn.Conv2d(cin, cout, k, 1, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout))


class _RepViTDW(nn.Module):
    """RepViT's RepVGGDW: ``bn(conv3x3_dw_bn(x) + conv1x1_dw(x) + x)``."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv, self.conv1, self.bn = _ConvBN(c, c, 3, c), nn.Conv2d(c, c, 1, groups=c), nn.BatchNorm2d(c)

    def forward(self, x):
        return self.bn((self.conv(x) + self.conv1(x)) + x)


class _MobileOneBlock(nn.Module):
    """MobileOne's block as timm writes it: ``scale_out = 0`` without a scale branch (1x1 stages),
    ``out = scale_out + bn(x)``, then ``+= conv_bn_i(x)`` for each over-parameterized branch."""

    def __init__(self, c: int, k: int, branches: int = 2) -> None:
        super().__init__()
        groups = c if k > 1 else 1
        self.skip = nn.BatchNorm2d(c)
        self.scale = _ConvBN(c, c, 1, groups) if k > 1 else None
        self.convs = nn.ModuleList([_ConvBN(c, c, k, groups) for _ in range(branches)])

    def forward(self, x):
        scale_out = self.scale(x) if self.scale is not None else 0
        out = scale_out + self.skip(x)
        for conv in self.convs:
            out = out + conv(x)
        return torch.relu(out)


@pytest.mark.parametrize("name, block", [("repvit_dw", lambda: _RepViTDW(8)),
                                         ("mobileone_dw3x3", lambda: _MobileOneBlock(8, 3)),
                                         ("mobileone_pw1x1", lambda: _MobileOneBlock(8, 1))])
def test_repvit_and_mobileone_blocks_become_one_conv_at_the_fixpoint(name, block):
    model = block()
    zoo.randomize_batchnorm(model, 0)
    model.eval()
    x = torch.randn(1, 8, 10, 10)
    m2 = ptool.transform(model, ["fold-bn", "merge-branches"], (x,), fixpoint=True)
    histogram = op_histogram(m2.graph_module)
    assert histogram["aten.conv2d"] == 1 and not any("batch_norm" in k for k in histogram), (name, histogram)
    torch.testing.assert_close(m2(x), model(x), rtol=1e-5, atol=1e-5)


class _RepMixer(nn.Module):
    """FastViT's RepMixer: ``x + gamma * (mixer(x) - norm(x))``, mixer a MobileOne block (identity BN,
    1x1 and 3x3 depthwise conv+BN branches), norm one with the identity BN only."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(c)
        self.mixer = _MobileOneBlock(c, 3, branches=1)
        self.gamma = nn.Parameter(torch.rand(c, 1, 1) + 0.5)

    def forward(self, x):
        mixed = self.mixer.scale(x) + self.mixer.skip(x) + self.mixer.convs[0](x)
        return x + self.gamma * (mixed - (0 + self.norm(x)))


def test_fastvit_repmixer_becomes_one_depthwise_conv():
    """Subtracted branches merge with a minus sign; fold-affine takes gamma into the merged conv; the
    residual then merges as an identity branch (round 2)."""
    model = _RepMixer(8)
    zoo.randomize_batchnorm(model, 0)
    model.eval()
    x = torch.randn(1, 8, 10, 10)
    m2 = ptool.transform(model, ["fold-bn", "merge-branches", "fold-affine"], (x,), fixpoint=True)
    assert op_histogram(m2.graph_module) == {"aten.conv2d": 1}
    assert "merge-branches (round 2)" in [r.label for r in m2.report]
    assert "skipped sites" not in str(m2.report)  # the BatchNorms skipped in round 1 were merged away since
    torch.testing.assert_close(m2(x), model(x), rtol=1e-5, atol=1e-5)


def test_a_subtracted_branch_merges_with_a_minus_sign():
    class Diff(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return self.a(x) - self.b(x)

    torch.manual_seed(0)
    model, x = Diff().eval(), torch.randn(1, 4, 6, 6)
    m2 = ptool.transform(model, ["merge-branches"], (x,))
    assert op_histogram(m2.graph_module) == {"aten.conv2d": 1}
    torch.testing.assert_close(m2(x), model(x), rtol=1e-5, atol=1e-5)


def test_an_identity_batchnorm_on_a_shared_conv_output_merges_as_an_identity_branch():
    """FastViT's downsample: a depthwise conv whose output feeds a MobileOne 1x1 block both as its
    identity BatchNorm and as the input of its 1x1 conv branch. fold-bn cannot fold that BatchNorm
    (the conv output has two readers), so merge-branches takes it as the block's identity branch."""
    class Downsample(nn.Module):
        def __init__(self):
            super().__init__()
            self.dw = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8)
            self.block = _MobileOneBlock(8, 1, branches=1)

        def forward(self, x):
            return self.block(self.dw(x))

    model = Downsample()
    zoo.randomize_batchnorm(model, 0)
    model.eval()
    x = torch.randn(1, 8, 10, 10)
    m2 = ptool.transform(model, ["fold-bn", "merge-branches"], (x,), fixpoint=True)
    histogram = op_histogram(m2.graph_module)
    assert histogram["aten.conv2d"] == 2 and not any("batch_norm" in k for k in histogram)
    torch.testing.assert_close(m2(x), model(x), rtol=1e-5, atol=1e-5)
