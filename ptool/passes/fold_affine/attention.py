"""The attention scale folded into the query projection.

``softmax((q k^T) * s + mask)`` with ``q = f(x W_q^T + b_q)`` and ``f`` linear in its argument
(views, transposes, head splits, casts, RoPE ``q*cos + rotate_half(q)*sin``) equals
``softmax((q' k^T) + mask)`` with ``W_q' = s W_q``, ``b_q' = s b_q``, because
``f(s y) = s f(y)``. For SDPA, ``scale=s`` (default ``1/sqrt(head_dim)``) becomes ``scale=1``.

Checked before any edit: the query path from the projection to the attention contains only
ops that are homogeneous of degree 1 in the query (a mul has exactly one query-derived operand,
an add/sub/cat only query-derived ones), the path feeds nothing but this attention's query slot,
and the projection's output (or, for a fused qkv projection split along the features, its query
columns) feeds nothing else. For eager attention the scores matmul must feed only the scale.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from ptool.ir.graph import is_op, op_name
from ptool.ir.noise import CAST_OPS, IDENTITY_OPS, LAYOUT_OPS, MISSING, node_args, scale_step
from ptool.passes.fold_affine._layers import (
    Layer,
    as_layer,
    channel_range,
    fold_outputs,
    out_features,
    through_identity,
    through_last_dim,
    why_not_editable,
)

aten = torch.ops.aten

SOFTMAX = (aten.softmax, aten._softmax, aten._safe_softmax)
_SCORES = (aten.matmul, aten.bmm)
# ops f with f(s*q) = s*f(q) in their first (query-derived) argument
_UNARY = LAYOUT_OPS | CAST_OPS | IDENTITY_OPS | frozenset({
    aten.slice.Tensor, aten.select.int, aten.narrow.default, aten.neg.default, aten.split.Tensor,
    aten.split_with_sizes.default, aten.chunk.default, aten.unbind.int, aten.index_select.default,
    operator.getitem,
})
_MULTI = frozenset({aten.mul.Tensor, aten.div.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.cat.default,
                    aten.stack.default})


@dataclass
class ScaleSite:
    """An attention whose scores are scaled by ``scale``: the SDPA node or the eager scores matmul."""

    attention: fx.Node
    scale: float
    scale_nodes: list[fx.Node]  # eager: the mul/div nodes to remove (outermost first); SDPA: []

    @property
    def query(self) -> fx.Node:
        return self.attention.args[0]


def sdpa_site(node: fx.Node) -> ScaleSite | str | None:
    """An SDPA node with a scale other than 1, as a :class:`ScaleSite`."""
    values, index = node_args(node)
    scale = values[index["scale"]]
    if scale is None or scale is MISSING:
        val = node.args[0].meta.get("val")
        try:
            scale = 1.0 / math.sqrt(int(val.shape[-1]))
        except Exception:  # no metadata or a symbolic head size
            return "the default scale 1/sqrt(head_dim) needs a static head size"
    return None if scale == 1.0 else ScaleSite(node, float(scale), [])


def eager_site(node: fx.Node) -> ScaleSite | None:
    """``softmax(matmul(q, k^T) * s [+ mask])`` rooted at the softmax, as a :class:`ScaleSite`."""
    x = node.args[0]
    while isinstance(x, fx.Node) and through_identity(x) is not None and len(x.users) == 1:
        x = through_identity(x)
    candidates = [a for a in x.args[:2] if isinstance(a, fx.Node)] if is_op(x, aten.add) else [x]
    for c in candidates:
        factor, nodes, n = 1.0, [], c
        while isinstance(n, fx.Node) and len(n.users) == 1 and (step := scale_step(n)) is not None:
            factor *= step[0]
            nodes.append(n)
            n = step[1]
        if nodes and is_op(n, *_SCORES) and len(n.users) == 1:
            return ScaleSite(n, factor, nodes)
    return None


def _layer_above(n: fx.Node) -> tuple[Layer, list[fx.Node]] | None:
    """The layer that ``n`` is (seen through last-dim-preserving views), and the views in between."""
    chain = []
    while as_layer(n) is None:
        prev = through_last_dim(n) if isinstance(n, fx.Node) else None
        if prev is None:
            return None
        chain.append(n)
        n = prev
    return as_layer(n), chain


def _roots(q: fx.Node) -> list[fx.Node]:
    """Where the query path starts: projections, or channel ranges of a fused projection."""
    roots, seen, stack = [], set(), [q]
    while stack:
        n = stack.pop()
        if not isinstance(n, fx.Node) or n in seen:
            continue
        seen.add(n)
        selected = channel_range(n)
        if as_layer(n) is not None or (selected is not None and _layer_above(selected[0]) is not None):
            roots.append(n)
        elif n.op == "call_function" and (n.target in _UNARY or n.target in _MULTI):
            stack.extend(a for a in _flat(n.args) if isinstance(a, fx.Node))
    return roots


def _flat(args: tuple) -> list:
    return [x for a in args for x in (a if isinstance(a, (list, tuple)) else [a])]


def _degree_one(n: fx.Node, cone: set) -> str | None:
    """Why ``n`` is not homogeneous of degree 1 in its query-derived operands (None if it is)."""
    inputs = [a for a in _flat(n.args) if isinstance(a, (fx.Node, int, float))]
    inside = [a in cone for a in inputs]
    if n.target in _UNARY:
        ok = inside[0] and not any(inside[1:])
    elif n.target is aten.mul.Tensor:
        ok = sum(inside[:2]) == 1
    elif n.target is aten.div.Tensor:
        ok = inside[0] and not inside[1]
    else:  # add / sub / cat / stack: every operand query-derived
        ok = all(a in cone for a in _flat(n.args[:2] if n.target not in (aten.cat.default, aten.stack.default)
                                           else n.args[:1]))
    return None if ok else f"{n.name} ({op_name(n)}) is not linear in the query"


def _cone_problem(root: fx.Node, attention: fx.Node) -> str | None:
    """Why scaling ``root`` would change more than ``attention``'s query (None if it would not)."""
    cone, queue = {root}, [root]
    while queue:
        n = queue.pop()
        for user in n.users:
            if user is attention or user in cone:
                continue
            if user.op == "output":
                return f"{n.name} (query-derived) is a model output"
            if user.op != "call_function" or (user.target not in _UNARY and user.target not in _MULTI):
                return f"the query also feeds {user.name} ({op_name(user)}), which is not linear in it"
            cone.add(user)
            queue.append(user)
    if attention.args[0] not in cone:
        return f"{attention.args[0].name} is not derived from {root.name}"
    if any(a in cone for a in _flat(attention.args[1:])) or any(v in cone for v in attention.kwargs.values()):
        return f"the query also reaches {attention.name}'s key, value or mask"
    for n in cone - {root}:
        why = _degree_one(n, cone)
        if why:
            return why
    return None


def query_projection(gm: fx.GraphModule, site: ScaleSite, *, untie: bool) -> tuple[Layer, int, int] | str:
    """The projection producing the query and its query channels ``[start, stop)``, or a reason."""
    roots = _roots(site.query)
    if len(roots) != 1:
        return (f"the query {site.query.name} is not a linear function of one Linear projection "
                f"({len(roots)} found walking up through views, RoPE and head splits)")
    root = roots[0]
    why = _cone_problem(root, site.attention)
    if why:
        return why
    layer = as_layer(root)
    if layer is not None:
        start, stop = 0, out_features(gm, layer)
    else:
        source, start, stop = channel_range(root)
        layer, chain = _layer_above(source)
        for v in [layer.node, *reversed(chain)][:-1]:
            if len(v.users) != 1:
                return f"{layer.node.name}'s output {v.name} has other users"
        for user in source.users:
            selectors = list(user.users) if is_op(user, aten.split, aten.split_with_sizes) else [user]
            for sel in selectors:
                r = channel_range(sel) if sel is not root else None
                if sel is not root and (r is None or (r[1] < stop and start < r[2])):
                    return f"{source.name} (the fused projection's output) also feeds {sel.name} with the query columns"
    return why_not_editable(gm, layer, untie=untie) or (layer, start, stop)


def fold(gm: fx.GraphModule, site: ScaleSite, projection: tuple[Layer, int, int], pass_name: str) -> None:
    """Scale the query columns of the projection by ``site.scale`` and drop the scale from the attention."""
    layer, start, stop = projection
    scale = torch.ones(out_features(gm, layer), dtype=torch.float64)
    scale[start:stop] = site.scale
    fold_outputs(gm, layer, scale, None, pass_name)
    if site.scale_nodes:
        for n in site.scale_nodes:  # outermost first: each one's operand is the next
            n.replace_all_uses_with(scale_step(n)[1])
            gm.graph.erase_node(n)
    else:
        site.attention.kwargs = {**site.attention.kwargs, "scale": 1.0}
