"""The pattern matcher: real exported HF graphs from the zoo, and hand-written modules."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ptool.ir.noise import LAYOUT_OPS, constant_value
from ptool.ir.pattern import ANY, AnyOf, Const, Match, NoMatch, Noise, Op, Scaled, Var, find_all
from tests.ir.attention_graphs import ATTENTION, SCORES, SDPA
from tests.ir.attention_graphs import export as _export
from tests.ir.attention_graphs import hf_graph as _hf
from tests.models import zoo

aten = torch.ops.aten


def _names(nodes) -> list[str]:
    return [n.name for n in nodes]


# ------------------------------------------------------------------------------ real graphs
@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama", "vit"])
def test_eager_attention_found_once_per_layer(kind):
    gm, _, _ = _hf(kind)
    matches = find_all(gm, ATTENTION)
    assert len(matches) == 2
    assert find_all(gm, SDPA) == []
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    assert order[matches[0].root] < order[matches[1].root]
    for m in matches:
        assert m.is_self_contained()  # the softmax's _assert_tensor_metadata user does not count
        assert m["scale"] == pytest.approx(1 / math.sqrt(8))
        assert m["mask"].target is aten.where.ScalarOther  # HF always builds an additive mask
        assert m["probs"].target is aten.softmax.int
        assert {n.target for n in m.skipped["probs"]} <= {aten.dropout.default, aten.to.dtype}


def test_bert_captures_and_skipped_layout():
    gm, _, _ = _hf("bert")
    m = find_all(gm, ATTENTION)[0]
    # q/k/v are the projections; the head split and the k transpose were seen through and recorded.
    assert [m[x].target for x in "qkv"] == [aten.linear.default] * 3
    assert [n.target for n in m.skipped["q"]] == [aten.transpose.int, aten.view.default]
    assert [n.target for n in m.skipped["k"]] == [aten.transpose.int] * 2 + [aten.view.default]
    assert m.outer("k") is m.skipped["k"][0]
    assert m.outer("scale") == m["scale"]
    assert [n.target for n in m.nodes] == [
        aten.matmul.default, aten.dropout.default, aten.softmax.int, aten.add.Tensor,
        aten.mul.Tensor, aten.matmul.default,
    ]
    assert m.skipped["scale"] == (m.nodes[4],)


def test_llama_gqa_expansion_recorded_on_k_and_v():
    gm, _, _ = _hf("llama")
    m = find_all(gm, ATTENTION)[0]
    # repeat_kv: unsqueeze -> expand -> reshape, then k's transpose for q@kT.
    assert [n.target for n in m.skipped["k"]] == [
        aten.transpose.int, aten.reshape.default, aten.expand.default, aten.unsqueeze.default,
    ]
    assert m["k"].target is aten.add.Tensor  # RoPE output, (B, kv_heads, N, D)
    assert tuple(m["k"].meta["val"].shape) == (zoo.BATCH, 2, zoo.SEQ_LEN, 8)
    assert aten.to.dtype in {n.target for n in m.skipped["probs"]}  # softmax upcast


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama", "vit"])
def test_sdpa_found_in_default_models(kind):
    gm, _, _ = _hf(kind, "sdpa")
    matches = find_all(gm, SDPA)
    assert len(matches) == 2
    assert find_all(gm, ATTENTION) == []
    assert matches[0]["scale"] == pytest.approx(8 ** -0.5)
    assert matches[0]["mask"] is not None


def test_qk_matmul_is_not_an_attention_root():
    gm, _, _ = _hf("bert")
    qk = next(n for n in gm.graph.nodes if n.target is aten.matmul.default)
    m = ATTENTION.match(qk)
    assert not m and isinstance(m, NoMatch)
    assert m.reason == (f"arg 0 of {qk.name}, past transpose, view: expected aten.softmax.int, "
                        "got linear (aten.linear.default)")


def test_returned_attention_weights_make_the_match_not_self_contained():
    gm, _, _ = _hf("bert", output_attentions=True)
    matches = find_all(gm, ATTENTION)
    assert len(matches) == 2
    assert find_all(gm, ATTENTION, self_contained=True) == []
    verdict = matches[0].require_self_contained()
    assert not verdict
    assert "interior node dropout_1 (aten.dropout.default) is also used outside the match by output" in verdict.reason


def test_no_noise_means_no_match_with_reason():
    gm, _, _ = _hf("gpt2")
    strict = Op(aten.matmul.default, Op(aten.softmax.int, ANY, -1), Var("v"))
    root = find_all(gm, ATTENTION)[0].root
    m = strict.match(root)
    assert not m
    assert m.reason.startswith(f"arg 0 of {root.name}: expected aten.softmax.int, got dropout_1")
    # Layout-only noise does not skip the fp32 cast that GPT-2 puts after softmax.
    layout_only = Op(aten.matmul.default, Op(aten.softmax.int, ANY, -1, noise=LAYOUT_OPS), Var("v"))
    assert "got dropout_1 (aten.dropout.default)" in layout_only.match(root).reason
    assert Op(aten.matmul.default, Noise(Op(aten.softmax.int, ANY, -1)), ANY).match(root)


# ----------------------------------------------------------------------- scale placements
class _Attn(torch.nn.Module):
    def __init__(self, variant: str):
        super().__init__()
        self.variant = variant
        self.register_buffer("temperature", torch.tensor(0.125))

    def forward(self, q, k, v, t):
        d, kt = q.shape[-1], k.transpose(-2, -1)
        s = {
            "div_sqrt": lambda: (q @ kt) / math.sqrt(d),
            "mul_rsqrt": lambda: torch.matmul(q, k.transpose(-1, -2)) * (1 / math.sqrt(d)),
            "scaled_q": lambda: (q * d ** -0.5) @ kt,
            "scaled_kt": lambda: q @ (kt * d ** -0.5),
            "split": lambda: ((q * 0.5) @ (kt * 0.5)) / 2.0,
            "buffer": lambda: (q @ kt) * self.temperature,
            "tensor_sqrt": lambda: q @ kt / torch.sqrt(torch.tensor(d, dtype=torch.float32)),
            "einsum": lambda: torch.einsum("bhqd,bhkd->bhqk", q, k) * 0.125,
            "unscaled": lambda: q @ kt,
            "runtime": lambda: (q @ kt) * t,
            "mask_first": lambda: t + (q @ kt) * 0.125,
        }[self.variant]()
        return F.softmax(s.float(), dim=-1).type_as(q) @ v


def _attn_graph(variant: str):
    q, k, v = (torch.randn(2, 4, 8, 8) for _ in range(3))
    return _export(_Attn(variant), q, k, v, torch.randn(1))


@pytest.mark.parametrize("variant, scale", [
    ("div_sqrt", 8 ** -0.5), ("mul_rsqrt", 8 ** -0.5), ("scaled_q", 8 ** -0.5), ("scaled_kt", 8 ** -0.5),
    ("split", 0.125), ("buffer", 0.125), ("tensor_sqrt", 8 ** -0.5), ("unscaled", 1.0),
])
def test_scale_placements_normalize_to_one_capture(variant, scale):
    gm = _attn_graph(variant)
    (m,) = find_all(gm, ATTENTION)
    assert m["scale"] == pytest.approx(scale)
    assert m["q"].name == "q" and m["k"].name == "k" and m["v"].name == "v"
    assert m["mask"] is None and "mask" not in m  # the optional add is absent
    assert len(m.skipped.get("scale", ())) == {"unscaled": 0, "split": 3}.get(variant, 1)
    assert set(m.skipped.get("scale", ())) <= set(m.interior)
    assert m.is_self_contained()


def test_scale_through_einsum_operands():
    gm = _attn_graph("einsum")
    scores = Scaled(Op(aten.einsum.default, Const("bhqd,bhkd->bhqk"), [Var("q"), Var("k")]))
    pattern = Op(aten.matmul.default, Op(aten.softmax.int, Noise(scores), -1, noise=True), Var("v"))
    (m,) = find_all(gm, pattern)
    assert m["scale"] == pytest.approx(0.125)
    assert (m["q"].name, m["k"].name) == ("q", "k")


def test_runtime_scale_is_not_folded():
    gm = _attn_graph("runtime")
    assert find_all(gm, ATTENTION) == []
    softmax = next(n for n in gm.graph.nodes if n.target is aten.softmax.int)
    scores = Op(aten.add.Tensor, SCORES, Var("mask"), optional=True, noise=True)
    m = Op(aten.softmax.int, scores, -1).match(softmax)
    # Both readings (optional add present, absent) fail at the same place; the reason lists both.
    assert m.reason == (f"arg 0 of {softmax.name}, past to: expected aten.add.Tensor or "
                        "aten.matmul.default, got mul (aten.mul.Tensor)")


def test_commutative_add_and_opt_out():
    gm = _attn_graph("mask_first")  # t + scores: the mask is the first operand
    (m,) = find_all(gm, ATTENTION)
    assert m["mask"].name == "t" and m["scale"] == pytest.approx(0.125)
    add = next(n for n in gm.graph.nodes if n.target is aten.add.Tensor)
    fixed = Op(aten.add.Tensor, SCORES, Var("mask"), commutative=False)
    assert fixed.match(add).reason == "arg 0 of add: expected aten.matmul.default, got t (placeholder)"


# ------------------------------------------------------------------------- pattern elements
class _Small(torch.nn.Module):
    def forward(self, x, y):
        a = x * x
        b = x * y
        c = torch.softmax(a + b, dim=1)
        return c / 2.0, torch.relu(b).transpose(0, 1).reshape(-1)


@pytest.fixture(scope="module")
def small():
    gm = _export(_Small(), torch.randn(3, 4), torch.randn(3, 4))
    return gm, {n.name: n for n in gm.graph.nodes}


def test_var_binding_must_agree(small):
    _, nodes = small
    square = Op(aten.mul.Tensor, Var("x"), Var("x"))
    assert square.match(nodes["mul"])["x"].name == "x"
    m = square.match(nodes["mul_1"])
    assert m.reason == "arg 1 of mul_1: expected x (placeholder) (bound to 'x' elsewhere), got y (placeholder)"


def test_const_capture_and_expectation(small):
    _, nodes = small
    m = Op(aten.softmax.int, ANY, Const(name="dim")).match(nodes["softmax"])
    assert m["dim"] == 1
    m = Op(aten.softmax.int, ANY, -1).match(nodes["softmax"])
    assert m.reason == "arg 1 of softmax: expected -1, got constant 1"
    assert Op(aten.softmax, ANY, dim=1).match(nodes["softmax"])  # packet target, argument by name


def test_alternatives(small):
    _, nodes = small
    half = Op((aten.div.Tensor, aten.mul.Tensor), Var("x"), Const(name="c"))
    assert half.match(nodes["div"])["c"] == 2.0
    either = AnyOf(Op(aten.relu.default, Var("x")), Op(aten.div.Tensor, Var("x"), 2.0))
    assert either.match(nodes["div"])["x"].name == "softmax"
    assert either.match(nodes["relu"])["x"].name == "mul_1"
    assert either.match(nodes["add"]).reason == (
        "root: expected aten.relu.default or aten.div.Tensor, got add (aten.add.Tensor)")


def test_noise_on_root_and_var(small):
    gm, nodes = small
    relu = Op(aten.relu.default, Var("x"), noise=True, name="r")
    m = relu.match(nodes["reshape"])
    assert m["r"] is nodes["relu"]
    assert _names(m.skipped["r"]) == ["reshape", "transpose"]
    assert _names(m.nodes) == ["reshape", "transpose", "relu"]
    deep = Op(aten.reshape.default, Var("src", noise=True)).match(nodes["reshape"])
    assert deep["src"] is nodes["relu"] and _names(deep.skipped["src"]) == ["transpose"]
    assert deep.outer("src") is nodes["transpose"]
    assert not Op(aten.relu.default, ANY).match(nodes["reshape"])


def test_optional_op_and_find_all_non_overlapping():
    class Chain(torch.nn.Module):
        def forward(self, a, b, c, d):
            return torch.relu(((a + b) + c) + d)

    gm = _export(Chain(), *(torch.randn(2) for _ in range(4)))
    nested = Op(aten.add.Tensor, Op(aten.add.Tensor, Var("x"), Var("y"), commutative=False), Var("z"),
                commutative=False)
    matches = find_all(gm, nested)
    assert [m.root.name for m in matches] == ["add_1"]  # add_2 would reuse add_1: overlap
    relu = Op(aten.relu.default, Op(aten.neg.default, Var("x"), optional=True))
    m = relu.match(next(n for n in gm.graph.nodes if n.target is aten.relu.default))
    assert m["x"].name == "add_2"


def test_constant_value_folding():
    assert constant_value(3) == 3.0 and constant_value(True) is None and constant_value("a") is None
    gm = _attn_graph("tensor_sqrt")
    div = next(n for n in gm.graph.nodes if n.target is aten.div.Tensor)
    assert constant_value(div.args[1]) == pytest.approx(math.sqrt(8))


def test_match_is_truthy_and_reports_missing_names(small):
    _, nodes = small
    m = Op(aten.relu.default, Var("x")).match(nodes["relu"])
    assert isinstance(m, Match) and m and m.get("nope", 5) == 5
    with pytest.raises(KeyError, match="no capture named 'y'"):
        m["y"]
