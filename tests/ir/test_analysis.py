"""Whole-graph analysis helpers: networkx view, reachability, dominators, components, boundaries."""

from __future__ import annotations

import networkx as nx
import pytest
import torch

from ptool.ir import analysis as A

aten = torch.ops.aten


class _Diamond(torch.nn.Module):
    """x -> a -> (b, c) -> d, plus an independent chain y -> e -> f."""

    def forward(self, x, y):
        a = torch.relu(x)
        b = a + 1
        c = a * 2
        d = b - c
        f = torch.tanh(torch.sigmoid(y))
        return d, f


@pytest.fixture(scope="module")
def diamond():
    gm = torch.export.export(_Diamond(), (torch.randn(3), torch.randn(3)), strict=False).module()
    return gm, {n.name: n for n in gm.graph.nodes}


def test_to_networkx_mirrors_the_graph(diamond):
    gm, n = diamond
    g = A.to_networkx(gm)
    assert isinstance(g, nx.DiGraph)
    assert list(g.nodes) == [node.name for node in gm.graph.nodes]
    assert g.nodes["add"]["target"] == "aten.add.Tensor" and g.nodes["add"]["op"] == "call_function"
    assert g.nodes["add"]["shape"] == (3,) and g.nodes["add"]["dtype"] == "torch.float32"
    assert g.nodes["x"]["op"] == "placeholder" and g.nodes["add"]["node"] is n["add"]
    assert set(g.successors("relu")) == {"add", "mul"}
    assert g.edges["relu", "add"]["count"] == 1
    assert nx.is_directed_acyclic_graph(g)


def test_view_is_built_on_demand(diamond):
    gm, _ = diamond
    gm = __import__("copy").deepcopy(gm)
    before = A.to_networkx(gm)
    relu = next(x for x in gm.graph.nodes if x.target is aten.relu.default)
    with gm.graph.inserting_after(relu):
        extra = gm.graph.call_function(aten.neg.default, (relu,))
    assert extra.name not in before and extra.name in A.to_networkx(gm)


def test_reachability_and_closures(diamond):
    _, n = diamond
    assert A.is_reachable(n["x"], n["sub"]) and A.is_reachable(n["add"], n["add"])
    assert not A.is_reachable(n["sub"], n["x"]) and not A.is_reachable(n["x"], n["tanh"])
    assert A.descendants(n["relu"]) == {n["add"], n["mul"], n["sub"], n["output"]}
    assert A.ancestors(n["sub"]) == {n["x"], n["relu"], n["add"], n["mul"]}


def test_users_outside_and_boundary(diamond):
    _, n = diamond
    assert A.users_outside([n["relu"], n["add"]]) == {n["relu"]: [n["mul"]], n["add"]: [n["sub"]]}
    assert A.users_outside([n["relu"], n["add"], n["mul"], n["sub"]]) == {n["sub"]: [n["output"]]}
    inputs, outputs = A.boundary([n["relu"], n["add"], n["mul"]])
    assert inputs == [n["x"]] and outputs == [n["add"], n["mul"]]


def test_convexity(diamond):
    _, n = diamond
    assert not A.is_convex([n["relu"], n["sub"]])  # relu -> add -> sub leaves and re-enters
    assert A.is_convex([n["relu"], n["add"], n["mul"], n["sub"]])
    assert A.is_convex([n["add"], n["mul"]])


def test_dominators(diamond):
    _, n = diamond
    idom = A.dominators(diamond[0])
    assert idom[n["sub"]] is n["relu"] and idom[n["relu"]] is n["x"] and idom[n["x"]] is None
    assert A.dominates(idom, n["relu"], n["sub"]) and not A.dominates(idom, n["add"], n["sub"])
    assert idom[n["output"]] is None  # reached from both inputs
    pdom = A.post_dominators(diamond[0])
    assert pdom[n["relu"]] is n["sub"] and pdom[n["add"]] is n["sub"] and pdom[n["sub"]] is n["output"]
    assert A.dominates(pdom, n["sub"], n["x"]) and not A.dominates(pdom, n["add"], n["relu"])


def test_connected_components(diamond):
    _, n = diamond
    picked = [n["tanh"], n["relu"], n["sub"], n["sigmoid"], n["add"]]
    comps = A.connected_components(picked)
    assert comps == [{n["tanh"], n["sigmoid"]}, {n["relu"], n["sub"], n["add"]}]
    assert A.connected_components([n["relu"], n["sub"]]) == [{n["relu"]}, {n["sub"]}]


def test_assert_users_are_ignored():
    class Cast(torch.nn.Module):
        def forward(self, x):
            return torch.softmax(x, -1).float() + 1

    gm = torch.export.export(Cast(), (torch.randn(2, 3),), strict=False).module()
    n = {node.name: node for node in gm.graph.nodes}
    checks = [u for u in n["softmax"].users if A.is_assert(u)]
    assert [c.target for c in checks] == [aten._assert_tensor_metadata.default]
    assert A.users_outside([n["softmax"], n["to"]]) == {n["to"]: [n["add"]]}
    assert n["softmax"] in A.users_outside([n["softmax"], n["to"]], ignore_asserts=False)
