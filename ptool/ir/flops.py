"""A FLOPs estimate from the shape metadata on the graph (``node.meta["val"]``).

Counted: the matrix-product ops that dominate transformer and CNN cost, one multiply-add = 2 FLOPs.

============================  ==============================================================
op                            FLOPs
============================  ==============================================================
linear(x, W[N,K])             2 * numel(out) * K   (ptool's quantized linears too)
mm / addmm / bmm / matmul     2 * numel(out) * K   (K = the contracted size of the first operand)
conv (incl. conv1d/2d/3d)     2 * numel(out) * C_in/groups * prod(kernel)
conv_transpose                2 * numel(in) * C_out/groups * prod(kernel)
scaled_dot_product_attention  2 * B*H * L * S * (E + Ev)   (QK^T and the product with V)
embedding                     0 (a gather)
============================  ==============================================================

Element-wise ops, norms and softmax are not counted (they are memory-bound and small next to the
products); the figure is therefore a lower bound, quoted as "matmul-class FLOPs". Symbolic sizes use
their example hint. Nodes without metadata (graphs from the ``make_fx`` fallback lack it) are counted
in ``unknown`` rather than guessed.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.fx

from ptool.ir.graph import compute_nodes, op_name

__all__ = ["FlopsEstimate", "estimate_flops", "node_flops", "format_flops"]

aten = torch.ops.aten


@dataclass
class FlopsEstimate:
    """FLOPs per call of the graph on the traced shapes.

    Attributes:
        total: all counted FLOPs.
        by_op: FLOPs per op name (``aten.linear`` ...).
        unknown: counted-kind nodes whose shapes were not available.
    """

    total: int = 0
    by_op: Counter = field(default_factory=Counter)
    unknown: int = 0

    def __str__(self) -> str:
        extra = f" ({self.unknown} nodes without shapes not counted)" if self.unknown else ""
        return f"{format_flops(self.total)}{extra}"


def format_flops(flops: float) -> str:
    """``1.23 GFLOPs``-style text."""
    for unit, scale in (("TFLOPs", 1e12), ("GFLOPs", 1e9), ("MFLOPs", 1e6), ("kFLOPs", 1e3)):
        if flops >= scale:
            return f"{flops / scale:.2f} {unit}"
    return f"{int(flops)} FLOPs"


def _int(x: object) -> int:
    """A concrete size: ints pass, SymInts give their example hint."""
    if isinstance(x, int):
        return x
    if isinstance(x, torch.SymInt):
        hint = getattr(x.node, "hint", None)
        if hint is not None:
            return int(hint)
    return int(x)  # raises for unbacked sizes; the caller counts the node as unknown


def _shape(value: object) -> tuple[int, ...] | None:
    if isinstance(value, torch.Tensor):
        return tuple(_int(s) for s in value.shape)
    return None


def _val_shape(arg: object) -> tuple[int, ...] | None:
    if isinstance(arg, torch.fx.Node):
        return _shape(arg.meta.get("val"))
    return _shape(arg)


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


_LINEAR = (aten.linear,)
_MATMUL = (aten.mm, aten.bmm, aten.matmul)
_ADDMM = (aten.addmm, aten.baddbmm)
_CONV = (aten.conv1d, aten.conv2d, aten.conv3d, aten.convolution, aten._convolution)
_CONV_T = (aten.conv_transpose1d, aten.conv_transpose2d, aten.conv_transpose3d)
_SDPA = (aten.scaled_dot_product_attention,)
_ZERO = (aten.embedding,)
COUNTED = (*_LINEAR, *_MATMUL, *_ADDMM, *_CONV, *_CONV_T, *_SDPA, *_ZERO)


def _packet(node: torch.fx.Node) -> object:
    return getattr(node.target, "overloadpacket", node.target)


def _is_quantized(node: torch.fx.Node, kind: str) -> bool:
    """ptool's quantized ops of one kind (``ptool_quant::linear_*``, ``ptool_quant::attention_*``)."""
    target = node.target
    return getattr(target, "namespace", None) == "ptool_quant" and f"::{kind}_" in getattr(target, "name", lambda: "")()


def _attention_flops(node: torch.fx.Node) -> int | None:
    """``q k^T`` and the product with ``v``: ``2 * B*H * L * S * (E + Ev)``."""
    q, k, v = (_val_shape(a) for a in node.args[:3])
    if q is None or k is None or v is None:
        return None
    out = _shape(node.meta.get("val"))
    batch = _numel(out[:-2]) if out is not None else _numel(q[:-2])
    return 2 * batch * q[-2] * k[-2] * (q[-1] + v[-1])


def node_flops(node: torch.fx.Node) -> int | None:
    """FLOPs of one node, 0 for ops not counted, None when a counted op lacks shapes."""
    if node.op != "call_function":
        return 0
    if _is_quantized(node, "linear"):  # x (..., K) times an integer (K, N) weight: the same products
        out, x = _shape(node.meta.get("val")), _val_shape(node.args[0])
        return None if out is None or x is None else 2 * _numel(out) * x[-1]
    if _is_quantized(node, "attention"):
        return _attention_flops(node)
    packet = _packet(node)
    if packet not in COUNTED:
        return 0
    if packet in _ZERO:
        return 0
    try:
        out = _shape(node.meta.get("val"))
        if packet in _SDPA:
            return _attention_flops(node)
        if out is None:
            return None
        if packet in _LINEAR:
            w = _val_shape(node.args[1])
            return None if w is None else 2 * _numel(out) * w[-1]
        if packet in _MATMUL:
            a = _val_shape(node.args[0])
            return None if a is None else 2 * _numel(out) * (a[-1] if a else 1)
        if packet in _ADDMM:
            a = _val_shape(node.args[1])
            return None if a is None else 2 * _numel(out) * a[-1]
        if packet in _CONV or packet in _CONV_T:
            x, w = _val_shape(node.args[0]), _val_shape(node.args[1])
            if w is None:
                return None
            transposed = packet in _CONV_T or (
                packet in (aten.convolution, aten._convolution) and len(node.args) > 6 and bool(node.args[6])
            )
            if transposed:
                # weight is (C_in, C_out/groups, *k): every input element feeds C_out/groups * k outputs
                return None if x is None else 2 * _numel(x) * _numel(w[1:])
            return 2 * _numel(out) * _numel(w[1:])  # weight is (C_out, C_in/groups, *k)
    except (TypeError, ValueError, RuntimeError, IndexError):
        return None  # unbacked symbolic sizes or an unexpected call form
    return 0


def estimate_flops(gm: torch.fx.GraphModule) -> FlopsEstimate:
    """Sum :func:`node_flops` over the graph's compute nodes."""
    est = FlopsEstimate()
    for node in compute_nodes(gm):
        f = node_flops(node)
        if f is None:
            est.unknown += 1
        elif f:
            est.total += f
            est.by_op[op_name(node)] += f
    return est
