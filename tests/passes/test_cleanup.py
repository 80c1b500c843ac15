"""dce / cse / constant-fold: positive cases, negative cases with reasons, idempotence, exactness."""

import operator

import pytest
import torch

import ptool
from ptool.frontends.torch_export import capture
from ptool.ir.graph import op_histogram
from ptool.passes.base import PassContext
from tests.models import zoo


class _Redundant(torch.nn.Module):
    """Repeats work (cse), has weight-only math (constant-fold) and a random op (never shared)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(6, 8))
        self.register_buffer("offset", torch.arange(6, dtype=torch.float32))

    def forward(self, x):
        a = torch.sin(x) * 2
        b = torch.sin(x) * 2  # same op on the same input: cse shares it
        y = (a + b) @ self.w.t()  # w.t() depends only on a weight: constant-fold precomputes it
        return y + self.offset * 3  # buffer math: folded too


def _gm(model, x):
    return capture(model, (x,)).graph_module


def test_cse_shares_identical_pure_nodes():
    x = torch.randn(4, 8)
    m2 = ptool.transform(_Redundant(), ["cse"], (x,))
    rec = m2.report["cse"]
    assert rec.rewritten == 2  # the second sin and the second mul
    assert op_histogram(m2.graph_module)["aten.sin"] == 1
    assert rec.fidelity.max_abs_error == 0
    torch.testing.assert_close(m2(x), _Redundant()(x), rtol=0, atol=0)


def test_cse_never_shares_random_ops():
    class Noisy(torch.nn.Module):
        def forward(self, x):
            return torch.rand_like(x) + torch.rand_like(x)

    gm = _gm(Noisy(), torch.randn(3))
    result = ptool.passes.CommonSubexpressionElimination().run(gm, PassContext())
    assert result.rewritten == 0
    assert op_histogram(gm)["aten.rand_like"] == 2


def test_constant_fold_precomputes_weight_math_and_keeps_parameters_trainable():
    x = torch.randn(4, 8)
    m2 = ptool.transform(_Redundant(), ["constant-fold"], (x,))
    hist = op_histogram(m2.graph_module)
    assert "aten.t" not in hist and "aten.numpy_T" not in hist
    assert m2.report["constant-fold"].rewritten == 2  # w.t() and offset * 3
    assert any(p.requires_grad for p in m2.parameters())  # the folded w.t() is still a parameter
    # a contiguous w.t() may take another matmul kernel: equal up to float rounding, as declared
    fid = ptool.verify.compare(_Redundant()(x), m2(x))
    assert fid.max_rel_error <= 1e-6


def test_constant_fold_refuses_to_grow_the_model():
    class Expand(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("row", torch.randn(1, 512))

        def forward(self, x):
            return x + self.row.expand(1024, 512)  # 2 MiB if materialized

    x = torch.randn(1024, 512)
    m2 = ptool.transform(Expand(), ["constant-fold"], (x,))
    rec = m2.report["constant-fold"]
    assert rec.rewritten == 0
    assert "would add" in rec.skipped[0].reason
    m3 = ptool.transform(Expand(), ["constant-fold:max_growth_bytes=4000000"], (x,))
    assert m3.report["constant-fold"].rewritten == 1


def test_constant_fold_budget_is_for_the_whole_pass():
    class Expands(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("row", torch.randn(1, 256))

        def forward(self, x):  # three 256 KiB materializations; the buffer is read elsewhere too
            return x + self.row.expand(256, 256) * 2 + self.row.expand(256, 256) * 3 + self.row.expand(256, 256) * 4

    x = torch.randn(256, 256)
    model = Expands()
    m2 = ptool.transform(model, ["constant-fold:max_growth_bytes=600000"], (x,))
    rec = m2.report["constant-fold"]
    assert rec.rewritten == 2 and len(rec.skipped) == 1  # 2 x 256 KiB fit in the budget, the third does not
    assert "to the 524288 already added" in rec.skipped[0].reason
    assert torch.allclose(m2(x), model(x), rtol=1e-6, atol=0)
    grown = sum(t.numel() * t.element_size() for t in m2.graph_module.buffers()) + \
        sum(t.numel() * t.element_size() for t in m2.graph_module.parameters()) - 256 * 4
    assert grown <= 600000


def test_dce_removes_dead_pure_nodes_but_not_the_output():
    x = torch.randn(4, 8)
    gm = _gm(_Redundant(), x)
    out = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(out):
        dead = gm.graph.call_function(torch.ops.aten.cos.default, (next(iter(gm.graph.find_nodes(op="placeholder"))),))
        gm.graph.call_function(torch.ops.aten.neg.default, (dead,))
    gm.recompile()
    result = ptool.passes.DeadCodeElimination().run(gm, PassContext())
    assert result.rewritten == 2
    assert "aten.cos" not in op_histogram(gm)
    torch.testing.assert_close(gm(x), _Redundant()(x), rtol=0, atol=0)


@pytest.mark.parametrize("spec", ["dce", "cse", "constant-fold"])
def test_cleanup_passes_are_idempotent(spec):
    x = torch.randn(4, 8)
    gm = _gm(_Redundant(), x)
    p = ptool.passes.parse_pass(spec)
    p.run(gm, PassContext())
    gm.recompile()
    assert p.run(gm, PassContext()).changed is False


def test_getitem_is_treated_as_pure():
    from ptool.ir.purity import is_pure

    class Split(torch.nn.Module):
        def forward(self, x):
            a, b = x.split(2)
            return a + b

    gm = _gm(Split(), torch.randn(4, 3))
    items = [n for n in gm.graph.nodes if n.target is operator.getitem]
    assert items and all(is_pure(n) for n in items)


class _MaskedAttention(torch.nn.Module):
    """SDPA with a stored mask (a buffer: constant at transform time)."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)


def _sdpa_masks(gm) -> list:
    return [(n.args[3] if len(n.args) > 3 else n.kwargs.get("attn_mask")) for n in gm.graph.nodes
            if n.target is torch.ops.aten.scaled_dot_product_attention.default]


@pytest.mark.parametrize("mask", [torch.ones(1, 1, 5, 5, dtype=torch.bool), torch.zeros(1, 1, 5, 5)],
                         ids=["all-true", "all-zero-additive"])
def test_constant_fold_drops_an_attention_mask_that_hides_nothing(mask):
    q, k, v = (torch.randn(1, 2, 5, 4) for _ in range(3))
    model = _MaskedAttention(mask)
    m2 = ptool.transform(model, ["constant-fold"], (q, k, v))
    assert _sdpa_masks(m2.graph_module) == [None]
    assert m2.report["constant-fold"].rewritten == 1
    assert not any(b.shape == mask.shape for b in m2.buffers())  # the mask is gone from the model
    torch.testing.assert_close(m2(q, k, v), model(q, k, v), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("hidden", [(0, 0, 1, 3), (0, 0, 4, 0)])
def test_constant_fold_keeps_an_attention_mask_that_hides_a_key(hidden):
    q, k, v = (torch.randn(1, 2, 5, 4) for _ in range(3))
    mask = torch.ones(1, 1, 5, 5, dtype=torch.bool)
    mask[hidden] = False
    m2 = ptool.transform(_MaskedAttention(mask), ["constant-fold"], (q, k, v))
    assert _sdpa_masks(m2.graph_module)[0] is not None
    torch.testing.assert_close(m2(q, k, v), _MaskedAttention(mask)(q, k, v), rtol=0, atol=0)


def test_constant_fold_drops_hugging_face_vits_always_true_mask_exactly():
    fixture = zoo.vit()
    assert all(m is not None for m in _sdpa_masks(_gm(fixture.model, *fixture.example_inputs)))
    m2 = ptool.transform(fixture.model, ["constant-fold"], fixture.example_inputs)
    masks = _sdpa_masks(m2.graph_module)
    assert len(masks) == 2 and masks == [None, None]  # transformers builds an all-True mask from arange
    with torch.no_grad():
        want = fixture.model(*fixture.example_inputs).logits
    torch.testing.assert_close(m2(*fixture.example_inputs).logits, want, rtol=0, atol=0)
