"""The score path: from a softmax to the attention it belongs to, or the reason it belongs to none.

:func:`eager_attention` starts at a softmax and reads the written-out attention around it in the
canonical form of :mod:`.canonical`:

1. **the value side** (:func:`feeds`): the product the softmax's output reaches, through layout
   ops, casts, linear layers, scales or fills (so a softmax that reaches a product in a way that is
   not attention is still seen - and then named);
2. **the score side**: from the softmax input back to the scores product through layout ops, casts,
   scalar scales, added terms (the side that leads to a product is the scores; the other is a term),
   ``masked_fill`` / ``where`` masks. Steps that are not attention's (a tensor-valued temperature, a
   linear layer across the scores, a soft fill) are recorded as problems;
3. **the check**, on the meta device: the score path as a view of the canonical ``(B, H, N, M)``
   scores, the softmax along its rows, the probabilities reaching the value product in the layout
   that product reads them in.

What fails is *named*: forms recognised by their structure get a precise reason - talking heads
(CaiT: a linear layer mixes the heads' scores, before and/or after the softmax), channel attention
(XCiT: the summed axis of ``q k^T`` is the token axis of the projection, so the softmax runs over a
channel map), factorized attention (CoaT: the softmax normalizes a projection over its tokens on its
own and the next product sums that axis, ``k^T v``) - and anything else says which step broke it.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from ptool.ir.graph import is_op, module_path
from ptool.ir.noise import CAST_OPS, IDENTITY_OPS, LAYOUT_OPS, constant_value, is_noise, node_args, scale_step
from ptool.passes.attention.canonical import (
    PRODUCTS,
    VALUE_NOISE,
    VIEWS,
    WEIGHT_PRODUCT,
    Layout,
    Product,
    ScoreTerm,
    is_constant,
    operands,
    product,
    score_geometry,
    shape_of,
    term_layout,
    term_source,
    value_geometry,
)
from ptool.passes.attention.kernel import MASKED

aten = torch.ops.aten

_ADD = (aten.add.Tensor,)
_SUB = (aten.sub.Tensor,)
_TENSOR_SCALE = (aten.mul.Tensor, aten.div.Tensor)
_FILL = (aten.masked_fill.Scalar, aten.masked_fill.Tensor)
_WHERE = (aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf)
_LINEAR = (aten.linear.default, aten.addmm.default)
_FEED = LAYOUT_OPS | CAST_OPS | IDENTITY_OPS | frozenset(_LINEAR) | frozenset(_TENSOR_SCALE) | frozenset(_FILL)
_FEED_DEPTH = 6  # ops between a softmax and the product it feeds (talking heads: permute, linear, permute)
_WALK_DEPTH = 64


def _name(node: fx.Node) -> str:
    path = module_path(node)
    return node.name if path in ("?", "<root>") else f"{node.name} in {path}"


def _fill_value(node: object) -> float | None:
    value = constant_value(node)
    if value is None and is_op(node, aten.full.default, aten.scalar_tensor.default) and node.args:
        arg = node.args[1] if is_op(node, aten.full.default) else node.args[0]
        value = constant_value(arg)
    return value


# ------------------------------------------------------------------------------------ the score path
def _distance_to_product(node: object, limit: int = 12) -> int | None:
    """Ops from ``node`` back to the nearest product of two activations, or ``None`` within ``limit``."""
    frontier, seen = [node], set()
    for depth in range(limit):
        nxt = []
        for n in frontier:
            if not isinstance(n, fx.Node) or n in seen or n.op != "call_function":
                continue
            seen.add(n)
            if n.target in PRODUCTS and not any(is_constant(a) for a in operands(n)):
                return depth
            nxt.extend(a for a in n.all_input_nodes)
        frontier = nxt
    return None


def _scores_side(a: object, b: object) -> tuple[object, object] | None:
    da, db = _distance_to_product(a), _distance_to_product(b)
    if da is None and db is None:
        return None
    return (a, b) if db is None or (da is not None and da <= db) else (b, a)


@dataclass
class _Walk:
    product: fx.Node | None = None
    path: list[tuple[fx.Node, str, Any]] = field(default_factory=list)  # softmax input first
    problems: list[str] = field(default_factory=list)
    mixes: list[fx.Node] = field(default_factory=list)  # linear layers across the scores (talking heads)
    stop: object = None


def _walk_scores(node: object) -> _Walk:
    """From the softmax input back to the scores product, naming every step (and what is wrong)."""
    walk = _Walk()
    for _ in range(_WALK_DEPTH):
        if not isinstance(node, fx.Node) or node.op != "call_function":
            break
        if node.target in PRODUCTS:
            tensors = operands(node)
            mixed = [a for a in tensors if not is_constant(a) and _distance_to_product(a) is not None]
            if not (any(is_constant(a) for a in tensors) and mixed):
                walk.product = node
                return walk
            walk.mixes.append(node)
            walk.path.append((node, "mix", None))
            node = mixed[0]
            continue
        if is_noise(node, LAYOUT_OPS | VALUE_NOISE):
            walk.path.append((node, "layout" if node.target in LAYOUT_OPS else "noise", None))
            node = node.args[0]
            continue
        step = scale_step(node)
        if step is not None:
            walk.path.append((node, "scale", step[0]))
            node = step[1]
            continue
        if (is_op(node, *_ADD) or is_op(node, *_SUB)) and all(isinstance(a, fx.Node) for a in node.args[:2]):
            alpha = node.kwargs.get("alpha", node.args[2] if len(node.args) > 2 else 1)
            side = _scores_side(*node.args[:2])
            if side is None:
                break
            scores, term = side  # a + alpha * b, a - alpha * b: the scores must keep their sign and scale
            if scores is node.args[1] and (is_op(node, *_SUB) or alpha != 1):
                walk.problems.append(f"{node.name} computes {_name(term)} {'-' if is_op(node, *_SUB) else '+'} "
                                     f"{alpha:g} * scores, not scores plus a term")
            factor = 1.0 if scores is node.args[1] else float(alpha) * (-1.0 if is_op(node, *_SUB) else 1.0)
            walk.path.append((node, "add", (term, factor)))
            node = scores
            continue
        if is_op(node, *_TENSOR_SCALE) and all(isinstance(a, fx.Node) for a in node.args[:2]):
            side = _scores_side(*node.args[:2])
            if side is None:
                break
            scores, other = side
            if is_op(node, aten.div.Tensor) and scores is node.args[1]:
                walk.problems.append(f"the scores divide {_name(other)} ({node.name})")
            walk.problems.append(f"the scores are multiplied by a tensor, {term_source(other)} of shape "
                                 f"{shape_of(other)} ({node.name}), not by a constant")
            walk.path.append((node, "tensor-scale", other))
            node = scores
            continue
        if is_op(node, *_FILL) or (is_op(node, *_WHERE) and len(node.args) == 3):
            if is_op(node, *_FILL):
                (scores, cond, value), kind = node.args[:3], "drop"
            else:
                cond, a, b = node.args
                side = _scores_side(a, b)
                if side is None:
                    break
                scores, value = side
                kind = "keep" if scores is a else "drop"
            v = _fill_value(value)
            if v is None or v > MASKED:
                walk.problems.append(f"{node.name} fills the scores with {_fill_text(value)}, not a mask value "
                                     f"(<= {MASKED:g})")
            if kind == "drop" and is_op(cond, aten.bitwise_not.default, aten.logical_not.default):
                cond, kind = cond.args[0], "keep"  # masked_fill(~keep, ...): the kernel takes keep itself
            walk.path.append((node, "fill", (cond, kind)))
            node = scores
            continue
        if is_op(node, *_LINEAR):
            source = node.args[1] if is_op(node, aten.addmm.default) else node.args[0]
            if _distance_to_product(source) is None:
                break
            walk.mixes.append(node)
            walk.path.append((node, "mix", None))
            node = source
            continue
        break
    walk.stop = node
    return walk


def _talking_heads(before: list[fx.Node], after: list[fx.Node]) -> str:
    """CaiT's talking heads: linear layers mixing the heads' scores before and/or after the softmax."""
    def names(nodes: list[fx.Node]) -> str:
        return " and ".join(module_path(n) if module_path(n) not in ("?", "<root>") else n.name for n in nodes)

    parts = ([f"{names(before)} mixes the heads' scores before the softmax"] if before else []) + \
            ([f"{names(after)} mixes the probabilities after it"] if after else [])
    return (f"talking heads: {', and '.join(parts)} (linear layers across heads); the attention kernels "
            "compute each head on its own")


def _fill_text(value: object) -> str:
    number = _fill_value(value)
    return f"{number:g}" if number is not None else (value.name if isinstance(value, fx.Node) else repr(value))


def _meta_layout(node: fx.Node, meta: torch.Tensor) -> torch.Tensor | str:
    """``meta`` moved by the layout op ``node`` as a *view* (a reshape that would copy is refused)."""
    if node.target is aten.expand.default:
        return f"{node.name} expands the scores (broadcast copies of a row)"
    if node.target in VIEWS:
        shape = shape_of(node)
        try:
            return meta.view(shape)
        except RuntimeError:
            return f"{node.name} reshapes the scores across a permuted axis (it reorders elements)"
    try:
        args, _ = node_args(node)
        return node.target(meta, *args[1:])
    except Exception as e:  # an op the meta device cannot run: not a layout we can follow
        return f"{node.name} ({node.target}) cannot be followed as a view: {e}"


def _rows_ok(meta: torch.Tensor, dim: int, m: int) -> bool:
    """Does a softmax over ``dim`` of ``meta`` (a view of canonical ``(..., M)``) run along canonical rows?"""
    dim = dim % meta.dim()
    if meta.shape[dim] != m or (m > 1 and meta.stride(dim) != 1):
        return False
    return all(meta.stride(i) % m == 0 for i in range(meta.dim()) if i != dim and meta.shape[i] > 1)


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    if tuple(a.shape) != tuple(b.shape) or a.storage_offset() != b.storage_offset():
        return False
    return all(sa == sb for sa, sb, n in zip(a.stride(), b.stride(), a.shape) if n > 1)


# ------------------------------------------------------------------------------------ the value side
def feeds(softmax: fx.Node) -> tuple[fx.Node, int, list[fx.Node]] | None:
    """The product a softmax's output feeds: ``(product, operand index, path)`` (path: the ops from the
    softmax to that operand, softmax excluded), within a few layout / cast / linear / scale / fill ops."""
    parent: dict[fx.Node, fx.Node] = {}
    frontier = [softmax]
    for _ in range(_FEED_DEPTH + 1):
        nxt = []
        for node in frontier:
            for user in node.users:
                if user in parent or user.op != "call_function":
                    continue
                parent[user] = node
                if user.target in PRODUCTS:
                    tensors = operands(user)
                    index = tensors.index(node) if node in tensors else 0
                    path = []
                    at = node
                    while at is not softmax:
                        path.append(at)
                        at = parent[at]
                    return user, index, path[::-1]
                if user.target in _FEED:
                    nxt.append(user)
        frontier = nxt
    return None


# ------------------------------------------------------------------------------------ the site
@dataclass
class EagerAttention:
    """A written-out softmax attention, canonicalized (what :func:`eager_attention` returns)."""

    output: fx.Node
    softmax: fx.Node
    q: fx.Node
    k: fx.Node
    v: fx.Node
    q_layout: Layout
    k_layout: Layout
    v_layout: Layout
    out_layout: Layout
    terms: list[ScoreTerm]
    scale: float
    scores: tuple[int, int, int, int]
    head_dim: int
    value_dim: int
    spelling: str
    rank: int
    nodes: list[fx.Node]  # the nodes the site owns, consumer first


def _channel_attention(p: Product) -> str | None:
    """XCiT's cross-covariance attention: the summed axis of q k^T is the token axis of a projection."""
    for operand, labels, other in zip(p.operands, p.labels, p.labels[::-1]):
        summed = [labels.index(x) for x in labels if x in other and x not in p.out]
        found = _token_axis(operand) if len(summed) == 1 else None
        if found is None:
            continue
        meta, stride, tokens = found
        if tokens > 1 and meta.shape[summed[0]] == tokens and meta.stride(summed[0]) == stride:
            rows = [p.sizes[x] for x in p.out][-2:]
            return (f"channel attention (XCiT cross-covariance): the softmax runs over a {rows[0]}x{rows[1]} "
                    f"channel map q^T k with the {tokens} tokens summed; the attention kernels attend over tokens")
    return None


def _token_axis(node: fx.Node) -> tuple[torch.Tensor, int, int] | None:
    """``node`` traced back through layout ops, selects and normalizations to a projection
    ``linear(x (.., N, C))``: ``(node's layout as a view of the projection output, the token stride, N)``."""
    ops: list[fx.Node] = []
    at: object = node
    for _ in range(16):
        if not isinstance(at, fx.Node) or at.op != "call_function":
            return None
        if is_op(at, aten.linear.default):
            shape = shape_of(at)
            if not shape or len(shape) < 3:
                return None
            meta = torch.empty(shape, device="meta")
            stride = meta.stride(-2)
            for op in reversed(ops):
                try:
                    if op.target is operator.getitem:
                        unbind = op.args[0]
                        dim = unbind.args[1] if len(unbind.args) > 1 else unbind.kwargs.get("dim", 0)
                        meta = meta.select(dim, op.args[1])
                    elif op.target in VIEWS:
                        meta = meta.view(shape_of(op))
                    elif op.target in LAYOUT_OPS:
                        meta = op.target(meta, *node_args(op)[0][1:])
                except Exception:
                    return None
            return meta, stride, shape[-2]
        if at.target in LAYOUT_OPS or at.target in VALUE_NOISE or at.target in _TENSOR_SCALE:
            ops.append(at)
            at = at.args[0]
        elif at.target is operator.getitem and is_op(at.args[0], aten.unbind.int):
            ops.append(at)
            at = at.args[0].args[0]
        else:
            return None
    return None


def _factorized(softmax: fx.Node, found: tuple[fx.Node, int, list[fx.Node]]) -> str | None:
    """CoaT's factorized attention: the softmax's own axis is the one the product sums over."""
    node, index, path = found
    p = product(node)
    shape = shape_of(softmax)
    if not isinstance(p, Product) or not shape:
        return None
    dim = (softmax.args[1] if len(softmax.args) > 1 else -1) % len(shape)
    meta = torch.empty(shape, device="meta")
    stride = meta.stride(dim)
    for op in path:
        if op.target in LAYOUT_OPS:
            moved = _meta_layout(op, meta)
            if isinstance(moved, str):
                return None
            meta = moved
        elif op.target not in VALUE_NOISE:
            return None
    labels, other = p.labels[index], p.labels[1 - index]
    for axis, label in enumerate(labels):
        if label in other and label not in p.out and meta.shape[axis] == shape[dim] and meta.stride(axis) == stride:
            return (f"factorized attention (CoaT): the softmax normalizes {softmax.args[0].name} over its "
                    f"{shape[dim]} tokens (dim {softmax.args[1] if len(softmax.args) > 1 else -1}) on its own and "
                    f"{node.name} sums that axis (k^T v); there are no q@k^T scores, and it is already linear "
                    "in the tokens")
    return None


def eager_attention(softmax: fx.Node) -> EagerAttention | str | None:
    """The canonical site of ``softmax``, the reason it is not one, or ``None`` if it feeds no product."""
    found = feeds(softmax)
    if found is None:
        return None
    value_node, pi, post = found
    walk = _walk_scores(softmax.args[0])
    if walk.product is None:
        stop = walk.stop
        reason = _factorized(softmax, found)
        if reason:
            return reason
        what = f"{stop.name} ({stop.target})" if isinstance(stop, fx.Node) else repr(stop)
        return f"the softmax input comes from {what}, not from a product q@k^T (through scales, added terms, views)"
    if any(is_constant(a) for a in operands(walk.product)):
        return WEIGHT_PRODUCT
    scores_p = product(walk.product)
    if isinstance(scores_p, str):
        return scores_p
    channel = _channel_attention(scores_p)
    if channel:
        return channel
    if walk.mixes:
        return _talking_heads(walk.mixes, [n for n in post if is_op(n, *_LINEAR)])
    if walk.problems:
        return "; ".join(dict.fromkeys(walk.problems))
    reasons = []
    for qi in (0, 1):  # q is normally the first operand; a product written k q^T has it second
        got = _canonical(softmax, walk, scores_p, qi, found)
        if not isinstance(got, str):
            return got
        reasons.append(got)
    return reasons[0]


def _canonical(softmax: fx.Node, walk: _Walk, sp: Product, qi: int,
               found: tuple[fx.Node, int, list[fx.Node]]) -> EagerAttention | str:
    geo = score_geometry(sp, qi)
    if isinstance(geo, str):
        return geo
    meta = geo.to_product.apply(torch.empty(geo.scores, device="meta"))
    scale, terms = 1.0, []
    for node, kind, extra in reversed(walk.path):
        if kind == "layout":
            moved = _meta_layout(node, meta)
            if isinstance(moved, str):
                return moved
            meta = moved
        elif kind == "scale":
            scale *= extra
            for t in terms:
                t.factor *= extra
        elif kind in ("add", "fill"):
            if shape_of(node) != tuple(meta.shape):
                return f"{node.name} broadcasts the scores {tuple(meta.shape)} to {shape_of(node)}"
            term, how = extra
            if kind == "add":
                terms.append(ScoreTerm(term, "add", term_layout(meta, geo.scores), how))
            else:
                terms.append(ScoreTerm(term, how, term_layout(meta, geo.scores)))
    if scale <= 0:
        return f"the scores are scaled by {scale:g} (not a positive softmax temperature)"
    dim = softmax.args[1] if len(softmax.args) > 1 else -1
    if shape_of(softmax.args[0]) != tuple(meta.shape):
        return "the scores' shape metadata disagrees with the product's"
    if not _rows_ok(meta, dim, geo.scores[-1]):
        return f"the softmax (dim {dim}) does not run over the key axis of q@k^T"
    value_node, pi, post = found
    for node in post:
        if node.target in LAYOUT_OPS:
            moved = _meta_layout(node, meta)
            if isinstance(moved, str):
                return moved.replace("scores", "probabilities")
            meta = moved
        elif not is_noise(node, VALUE_NOISE):
            if is_op(node, *_LINEAR):
                return _talking_heads([], [node])
            return f"{node.name} ({node.target}) changes the probabilities between the softmax and the value product"
    vp = product(value_node)
    if isinstance(vp, str):
        return vp
    vg = value_geometry(vp, pi, geo.scores)
    if isinstance(vg, str):
        return vg
    if not _same_view(meta, vg.expected):
        return "the probabilities reach the value product in another layout than the scores' rows"
    rank = len(shape_of(geo.q) or ())
    nodes = [value_node, *reversed(post), softmax, *(n for n, _, _ in walk.path), walk.product]
    return EagerAttention(
        output=value_node, softmax=softmax, q=geo.q, k=geo.k, v=vp.operands[1 - pi], q_layout=geo.q_layout,
        k_layout=geo.k_layout, v_layout=vg.v_layout, out_layout=vg.out_layout, terms=terms, scale=scale,
        scores=geo.scores, head_dim=geo.head_dim, value_dim=vg.value_dim,
        spelling=sp.spelling if sp.spelling == vp.spelling else f"{sp.spelling}+{vp.spelling}", rank=rank,
        nodes=list(dict.fromkeys(nodes)))
