"""Whole-graph questions about an FX graph: reachability, dominators, components, boundaries.

The FX graph stays the one source of truth. Functions here either walk ``node.users`` /
``node.all_input_nodes`` directly (cheap, for local questions) or build a ``networkx`` view on
demand (for dominators and components); no view is cached or kept in sync with the graph.

Assertion nodes that ``torch.export`` inserts (``aten._assert_tensor_metadata`` and friends) check
a value but compute nothing; :data:`ASSERT_OPS` lists them so that callers can treat them as
users that do not pin a value in place (a rewrite erases them with the value they check).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
import torch.fx as fx

if TYPE_CHECKING:
    import networkx as nx

aten = torch.ops.aten



def _overloads(*names: str) -> frozenset:
    out = set()
    for name in names:
        packet = getattr(aten, name, None)
        if packet is not None:
            out.update(getattr(packet, overload) for overload in packet.overloads())
    return frozenset(out)


#: Side-effect-only check ops that torch.export leaves in graphs; they never carry data onward.
ASSERT_OPS: frozenset = _overloads(
    "_assert_tensor_metadata", "_assert_scalar", "_assert_async",
    "sym_constrain_range", "sym_constrain_range_for_size",
)

_SOURCE = "__ptool_source__"
_SINK = "__ptool_sink__"


def is_assert(node: fx.Node) -> bool:
    """True if ``node`` is a torch.export runtime check (see :data:`ASSERT_OPS`)."""
    return node.op == "call_function" and node.target in ASSERT_OPS


def _as_graph(graph: fx.Graph | fx.GraphModule) -> fx.Graph:
    return graph.graph if isinstance(graph, fx.GraphModule) else graph


def topo_index(graph: fx.Graph | fx.GraphModule) -> dict[fx.Node, int]:
    """Position of every node in the graph's (topological) node order."""
    return {n: i for i, n in enumerate(_as_graph(graph).nodes)}


def _shape(node: fx.Node) -> tuple | None:
    val = node.meta.get("val")
    shape = getattr(val, "shape", None)
    if shape is None:
        return None
    return tuple(s if isinstance(s, int) else str(s) for s in shape)


def to_networkx(graph: fx.Graph | fx.GraphModule) -> nx.DiGraph:
    """A fresh ``networkx.DiGraph`` view of ``graph``: one vertex per node, edges producer -> user.

    Vertices are keyed by node name and carry ``op`` (placeholder, call_function, ...), ``target``
    (its string form), ``shape`` (tuple from ``meta["val"]`` or ``None``), ``dtype`` (string or
    ``None``), ``index`` (position in the graph) and ``node`` (the ``fx.Node`` itself). Edges carry
    ``count``, the number of times the user reads the producer.

    The view is a snapshot: build a new one after mutating the graph.

    Args:
        graph: an ``fx.Graph`` or a ``GraphModule``.

    Returns:
        The directed graph.
    """
    import networkx as nx

    g = nx.DiGraph()
    for i, node in enumerate(_as_graph(graph).nodes):
        val = node.meta.get("val")
        dtype = getattr(val, "dtype", None)
        g.add_node(
            node.name, op=node.op, target=str(node.target), shape=_shape(node),
            dtype=str(dtype) if dtype is not None else None, index=i, node=node,
        )
        for producer in node.all_input_nodes:
            if g.has_edge(producer.name, node.name):
                g.edges[producer.name, node.name]["count"] += 1
            else:
                g.add_edge(producer.name, node.name, count=1)
    return g


def users_outside(
    nodes: Iterable[fx.Node], *, ignore_asserts: bool = True
) -> dict[fx.Node, list[fx.Node]]:
    """Users of ``nodes`` that are not themselves in ``nodes``.

    Args:
        nodes: a set of nodes (e.g. the interior of a match).
        ignore_asserts: do not count torch.export check nodes (:func:`is_assert`) as users.

    Returns:
        ``{node: [outside users]}`` for every node in ``nodes`` that has any, in the order of
        ``nodes``; empty if none do.
    """
    inside = dict.fromkeys(nodes)  # ordered, so reports name nodes deterministically
    out: dict[fx.Node, list[fx.Node]] = {}
    for node in inside:
        users = [u for u in node.users if u not in inside and not (ignore_asserts and is_assert(u))]
        if users:
            out[node] = users
    return out


def descendants(node: fx.Node) -> set[fx.Node]:
    """Every node that (transitively) uses ``node``'s value, ``node`` excluded."""
    seen: set[fx.Node] = set()
    stack = list(node.users)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.users)
    return seen


def ancestors(node: fx.Node) -> set[fx.Node]:
    """Every node whose value (transitively) flows into ``node``, ``node`` excluded."""
    seen: set[fx.Node] = set()
    stack = list(node.all_input_nodes)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


def is_reachable(src: fx.Node, dst: fx.Node) -> bool:
    """True if ``dst`` depends on ``src`` (a path src -> ... -> dst exists, or ``src is dst``)."""
    if src is dst:
        return True
    seen: set[fx.Node] = set()
    stack = list(src.users)
    while stack:
        n = stack.pop()
        if n is dst:
            return True
        if n not in seen:
            seen.add(n)
            stack.extend(n.users)
    return False


def boundary(nodes: Iterable[fx.Node]) -> tuple[list[fx.Node], list[fx.Node]]:
    """Inputs and outputs of a node set, as a rewrite of that set would see them.

    Returns:
        ``(inputs, outputs)``: nodes outside the set that the set reads, and nodes inside the set
        that are read from outside it (assert nodes ignored). Both in first-seen order.
    """
    inside = list(dict.fromkeys(nodes))
    members = set(inside)
    inputs = list(dict.fromkeys(p for n in inside for p in n.all_input_nodes if p not in members))
    outputs = list(users_outside(inside))
    order = {n: i for i, n in enumerate(inside)}
    outputs.sort(key=order.__getitem__)
    return inputs, outputs


def is_convex(nodes: Iterable[fx.Node]) -> bool:
    """True if no path leaves the node set and comes back into it.

    A convex set can be replaced by one new node (or a new subgraph) without creating a cycle.
    """
    members = set(nodes)
    frontier = [u for n in members for u in n.users if u not in members]
    seen: set[fx.Node] = set()
    while frontier:
        n = frontier.pop()
        if n in members:
            return False
        if n not in seen:
            seen.add(n)
            frontier.extend(n.users)
    return True


def dominators(graph: fx.Graph | fx.GraphModule) -> dict[fx.Node, fx.Node | None]:
    """Immediate dominator of every node, for dataflow from the graph's sources.

    A node ``d`` dominates ``n`` if every path from any source (placeholder, get_attr, constant
    producer) to ``n`` passes through ``d``. Sources, and nodes whose only dominator is the
    virtual entry joining all sources, map to ``None``.

    Returns:
        ``{node: immediate dominator or None}`` for every node.
    """
    return _idoms(_as_graph(graph), reverse=False)


def post_dominators(graph: fx.Graph | fx.GraphModule) -> dict[fx.Node, fx.Node | None]:
    """Immediate post-dominator of every node: the nearest ``p`` on every path from it to the output.

    Nodes whose value never reaches the output (dead code, asserts) are absent; nodes whose only
    post-dominator is the virtual exit map to ``None``.
    """
    return _idoms(_as_graph(graph), reverse=True)


def _idoms(graph: fx.Graph, *, reverse: bool) -> dict[fx.Node, fx.Node | None]:
    import networkx as nx

    g = to_networkx(graph)
    if reverse:
        g = g.reverse(copy=False)
        start, ends = _SINK, [n.name for n in graph.nodes if n.op == "output"]
    else:
        start, ends = _SOURCE, [v for v in g.nodes if g.in_degree(v) == 0]
    g = nx.DiGraph(g)
    g.add_node(start)
    g.add_edges_from((start, v) for v in ends)
    idom = nx.immediate_dominators(g, start)
    by_name = {n.name: n for n in graph.nodes}
    return {
        by_name[v]: (None if d == start else by_name[d])
        for v, d in idom.items()
        if v != start
    }


def dominates(idom: dict[fx.Node, fx.Node | None], a: fx.Node, b: fx.Node) -> bool:
    """True if ``a`` dominates ``b`` under the immediate-dominator map ``idom`` (``a`` dominates itself).

    Works with both :func:`dominators` and :func:`post_dominators` results.
    """
    cur: fx.Node | None = b
    while cur is not None:
        if cur is a:
            return True
        cur = idom.get(cur)
    return False


def connected_components(nodes: Iterable[fx.Node]) -> list[set[fx.Node]]:
    """Weakly connected components of the subgraph induced by ``nodes``.

    Useful to split a set of selected nodes (e.g. all nodes a pass wants to touch) into
    independent regions. Components come in the order of their first node in ``nodes``.
    """
    import networkx as nx

    members = list(dict.fromkeys(nodes))
    inside = set(members)
    g = nx.Graph()
    g.add_nodes_from(members)
    g.add_edges_from((p, n) for n in members for p in n.all_input_nodes if p in inside)
    first = {n: i for i, n in enumerate(members)}
    comps = [set(c) for c in nx.connected_components(g)]
    comps.sort(key=lambda c: min(first[n] for n in c))
    return comps
