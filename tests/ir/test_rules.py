"""The rule driver: apply_rules on exported zoo graphs and small hand-written modules."""

from __future__ import annotations

import copy

import pytest
import torch

from ptool.ir.match import NoMatch
from ptool.ir.pattern import Op, Var, find_all
from ptool.ir.rules import RewriteError, Rule, RuleStats, apply_rules
from tests.ir.attention_graphs import ATTENTION, SDPA
from tests.ir.attention_graphs import export as _export
from tests.ir.attention_graphs import hf_graph as _hf

aten = torch.ops.aten


class EagerToSdpaRule(Rule):
    """Replace the eager chain by one SDPA call (exact when the dropout is the identity)."""

    pattern = ATTENTION

    def check(self, match):
        if not match.skipped.get("k"):
            return NoMatch(f"{match.root.name}: k is not transposed")
        return match

    def rewrite(self, match, gm):
        g = gm.graph
        with g.inserting_before(match.root):
            k = g.call_function(aten.transpose.int, (match.outer("k"), -2, -1))
            new = g.call_function(aten.scaled_dot_product_attention.default,
                                  (match.outer("q"), k, match.outer("v"), match["mask"]),
                                  {"scale": match["scale"]})
        match.root.replace_all_uses_with(new)
        match.erase_interior()


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_apply_rules_rewrites_every_layer_exactly(kind):
    gm, args, kwargs = _hf(kind)
    gm = copy.deepcopy(gm)
    before = gm(*args, **kwargs)
    stats = apply_rules(gm, [EagerToSdpaRule()])
    assert isinstance(stats, RuleStats)
    assert stats.hits == {"EagerToSdpaRule": 2} and stats.rewritten == 2 and stats.changed
    assert stats.converged and stats.iterations == 2
    assert len(find_all(gm, SDPA)) == 2 and find_all(gm, ATTENTION) == []
    assert not any(n.target is aten.softmax.int for n in gm.graph.nodes)
    after = gm(*args, **kwargs)
    torch.testing.assert_close(after[0], before[0], atol=1e-5, rtol=1e-5)
    again = apply_rules(gm, [EagerToSdpaRule()])  # idempotent
    assert not again.changed and again.hits == {"EagerToSdpaRule": 0}


def test_apply_rules_rejects_non_self_contained_and_explains():
    gm, _, _ = _hf("bert", output_attentions=True)
    gm = copy.deepcopy(gm)
    code = gm.code
    stats = apply_rules(gm, [EagerToSdpaRule()])
    assert not stats.changed and gm.code == code
    rejected = [r for site, r in stats.reasons["EagerToSdpaRule"] if "outside the match" in r]
    assert len(rejected) == 2 and len(stats.skipped) == 2
    assert "EagerToSdpaRule: 0 rewritten" in stats.explain()
    assert "expected aten.softmax.int" in stats.explain()  # the q@kT roots, kept for --explain


def test_failed_check_leaves_graph_untouched():
    class Refuse(EagerToSdpaRule):
        def check(self, match):
            return NoMatch(f"{match.root.name}: head dim 8 is too small")

    gm = copy.deepcopy(_hf("vit")[0])
    code = gm.code
    stats = apply_rules(gm, [Refuse()])
    assert gm.code == code and stats.hits == {"Refuse": 0}
    assert [s.reason for s in stats.skipped] == [
        "Refuse: matmul_1: head dim 8 is too small", "Refuse: matmul_3: head dim 8 is too small"]


def test_failing_rewrite_is_rolled_back():
    class Broken(EagerToSdpaRule):
        def rewrite(self, match, gm):
            gm.register_buffer("ptool_tmp", torch.zeros(1))
            super().rewrite(match, gm)
            raise RuntimeError("boom")

    gm = copy.deepcopy(_hf("bert")[0])
    code, count = gm.code, len(gm.graph.nodes)
    with pytest.raises(RewriteError, match="Broken failed to rewrite matmul_1: boom; the graph was rolled back"):
        apply_rules(gm, [Broken()])
    assert gm.code == code and len(gm.graph.nodes) == count and not hasattr(gm, "ptool_tmp")
    assert len(find_all(gm, ATTENTION)) == 2


class _Relu(torch.nn.Module):
    def forward(self, x):
        return torch.relu(x) + 1


def test_priority_order_and_iteration_cap():
    def replace_relu(target):
        def rewrite(self, match, gm):
            with gm.graph.inserting_before(match.root):
                new = gm.graph.call_function(target, (match["x"],))
            match.root.replace_all_uses_with(new)
            gm.graph.erase_node(match.root)
        return rewrite

    relu = Op(aten.relu.default, Var("x"))
    low = type("ToSigmoidRule", (Rule,), {"pattern": relu, "rewrite": replace_relu(aten.sigmoid.default)})
    high = type("ToTanhRule", (Rule,), {"pattern": relu, "priority": 10,
                                        "rewrite": replace_relu(aten.tanh.default)})
    gm = _export(_Relu(), torch.randn(3))
    stats = apply_rules(gm, [low(), high()])
    assert stats.hits == {"ToTanhRule": 1, "ToSigmoidRule": 0}
    assert any(n.target is aten.tanh.default for n in gm.graph.nodes)

    class GrowRule(Rule):  # relu(x) -> relu(relu(x)): matches its own output forever
        pattern = relu

        def rewrite(self, match, gm):
            with gm.graph.inserting_after(match.root):
                new = gm.graph.call_function(aten.relu.default, (match.root,))
            match.root.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)

    gm = _export(_Relu(), torch.randn(3))
    stats = apply_rules(gm, [GrowRule()], max_iterations=3)
    assert not stats.converged and stats.iterations == 3
    assert stats.skipped[-1].reason == "rules still matching after 3 iterations; stopped"
    assert sum(n.target is aten.relu.default for n in gm.graph.nodes) == 1 + 1 + 2 + 4
