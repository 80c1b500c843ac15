"""What the graph passes see through: noise op sets, compile-time scalars, scale steps.

The site finders of several passes (attention, fold-affine, merge-branches, logquant, shift-add)
walk the graph past ops that do not change what a value means. This leaf module (it imports only
torch) is their shared vocabulary:

* **Noise ops** (:data:`LAYOUT_OPS`, :data:`CAST_OPS`, :data:`IDENTITY_OPS`, their union
  :data:`NOISE_OPS`) move, broadcast, cast or copy a value without changing what it means for a
  site finder (:func:`is_noise`).
* **Compile-time scalars** (:func:`constant_value`): Python numbers, one-element tensor
  attributes and small expressions over them, e.g. ``torch.sqrt(torch.tensor(d))``.
* **Scale steps** (:func:`scale_step`): a ``mul``/``div`` of a tensor by such a scalar (the
  attention scale, however the model spells it).
* **Arguments in schema order** (:func:`node_args`), with :data:`MISSING` for an argument that
  was neither passed nor has a default.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx

__all__ = [
    "CAST_OPS", "IDENTITY_OPS", "LAYOUT_OPS", "MISSING", "NOISE_OPS", "constant_value", "is_noise",
    "node_args", "scale_step",
]

aten = torch.ops.aten

LAYOUT_OPS: frozenset = frozenset({
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default,
    aten.transpose.int, aten.permute.default, aten.t.default, aten.unsqueeze.default,
    aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.flatten.using_ints,
    aten.unflatten.int,
})
"""Ops that only move or broadcast elements."""

CAST_OPS: frozenset = frozenset({
    aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default, aten.type_as.default,
})
"""Ops that only change dtype or device."""

IDENTITY_OPS: frozenset = frozenset({
    aten.contiguous.default, aten.clone.default, aten.alias.default, aten.detach.default,
    aten.dropout.default,  # only when it is the identity: p == 0 or train=False (see is_noise)
})
"""Ops that return their input's values unchanged."""

NOISE_OPS: frozenset = LAYOUT_OPS | CAST_OPS | IDENTITY_OPS
"""Everything ``noise=True`` skips."""

_MUL = frozenset({aten.mul.Tensor, aten.mul.Scalar})
_DIV = frozenset({aten.div.Tensor, aten.div.Scalar})
_FOLD_UNARY: dict[Any, Callable[[float], float]] = {
    aten.sqrt.default: math.sqrt, aten.rsqrt.default: lambda x: 1.0 / math.sqrt(x),
    aten.reciprocal.default: lambda x: 1.0 / x, aten.neg.default: operator.neg,
    aten.lift_fresh_copy.default: float, aten.detach.default: float, aten.detach_.default: float,
    aten.clone.default: float, aten.to.dtype: float, aten.alias.default: float,
}
_FOLD_BINARY: dict[Any, Callable[[float, float], float]] = {
    aten.mul.Tensor: operator.mul, aten.mul.Scalar: operator.mul, aten.div.Tensor: operator.truediv,
    aten.div.Scalar: operator.truediv, aten.add.Tensor: operator.add, aten.sub.Tensor: operator.sub,
}


class _Sentinel:
    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


MISSING: Any = _Sentinel("<absent>")
"""What :func:`node_args` puts for an argument that was not passed and has no default."""


def constant_value(arg: Any, _depth: int = 0) -> float | None:
    """The scalar value of ``arg`` if it is a compile-time scalar, else ``None``.

    Accepts Python numbers, ``get_attr`` nodes holding one-element tensors (buffers, parameters,
    lifted constants) and small expressions over them (sqrt, rsqrt, reciprocal, neg, copies,
    mul/div/add/sub), e.g. ``torch.sqrt(torch.tensor(d))``.
    """
    if _is_number(arg):
        return float(arg)
    if not isinstance(arg, fx.Node) or _depth > 8:
        return None
    if arg.op == "get_attr":
        try:
            value = operator.attrgetter(str(arg.target))(arg.graph.owning_module)
            return float(value.detach().reshape(()).item()) if value.numel() == 1 else None
        except Exception:  # missing attribute, fake/meta tensor, non-tensor: not a known scalar
            return None
    if arg.op != "call_function" or not arg.args:
        return None
    try:
        if arg.target in _FOLD_UNARY:
            x = constant_value(arg.args[0], _depth + 1)
            return None if x is None else _FOLD_UNARY[arg.target](x)
        if arg.target in _FOLD_BINARY and len(arg.args) == 2 and not arg.kwargs:
            a, b = (constant_value(a, _depth + 1) for a in arg.args[:2])
            return None if a is None or b is None else _FOLD_BINARY[arg.target](a, b)
    except (ZeroDivisionError, ValueError):
        return None
    return None


def scale_step(node: fx.Node) -> tuple[float, Any] | None:
    """``(factor, operand)`` if ``node`` multiplies/divides a tensor by a scalar constant, else ``None``.

    ``x * c`` and ``c * x`` give ``(c, x)``; ``x / c`` gives ``(1/c, x)`` (never for ``c == 0``).
    """
    if node.target in _MUL and len(node.args) == 2:
        a, b = node.args
        for c, x in ((b, a), (a, b)):
            value = constant_value(c)
            if value is not None and isinstance(x, fx.Node) and constant_value(x) is None:
                return value, x
    if node.target in _DIV and len(node.args) == 2 and isinstance(node.args[0], fx.Node):
        value = constant_value(node.args[1])
        if value:
            return 1.0 / value, node.args[0]
    return None


def is_noise(node: fx.Node, ops: frozenset) -> bool:
    """True if ``node`` is one of ``ops`` applied to a node, so a pattern may look past it.

    Dropout counts only when it is the identity (``p == 0`` or ``train=False``).
    """
    if node.target not in ops or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    if node.target is aten.dropout.default:
        p, train = node_args(node)[0][1:3]
        return p == 0 or not train
    return True


def node_args(node: fx.Node) -> tuple[list, dict[str, int]]:
    """All arguments of ``node`` in schema order, and argument name -> index.

    Keyword arguments and schema defaults are folded in; an argument with neither is
    :data:`MISSING`. A target without a schema gives its positional ``args`` and an empty index.
    """
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return list(node.args), {}
    values, index = [], {}
    for i, a in enumerate(schema.arguments):
        index[a.name] = i
        if i < len(node.args):
            values.append(node.args[i])
        elif a.name in node.kwargs:
            values.append(node.kwargs[a.name])
        else:
            values.append(a.default_value if a.has_default_value() else MISSING)
    return values, index


def named_args(node: fx.Node) -> dict[str, Any]:
    """``node``'s arguments by schema name (:func:`node_args`): positional, keyword or default."""
    values, index = node_args(node)
    return {name: values[i] for name, i in index.items()}


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)
