"""Per-channel affine maps next to a Linear/Conv: norm affines and multiplications/additions by constants.

A site is a node computing ``y = x * a + t`` with ``a``, ``t`` stored per-channel constants:

- a LayerNorm's (``aten.layer_norm``) ``gamma``/``beta`` or an RMSNorm's (``aten.rms_norm``)
  weight, or the ``weight * x`` that a decomposed RMSNorm (Llama) ends with;
- ``x * c``, ``x / c``, ``x + c``, ``x - c``, ``c - x`` with ``c`` a number or a stored tensor
  (``get_attr``) that is constant along every dim but the channel one (the last dim for
  linears, dim 1 for convs) and does not broadcast ``x`` to a bigger shape or another dtype.

Folded **into the producer** (``y = layer(..) * a + t``, the layer's output having no other use)
or **into the consumers** (every use of ``y`` is a Linear/Conv reading it as input, possibly
through views and eval dropout). The second is the only option for a norm: its output is a
normalized value, not a layer's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.fx as fx

from ptool.ir.graph import attr_tensor, is_op, no_padding, op_name, rounded_storage
from ptool.ir.noise import constant_value
from ptool.passes.fold_affine._layers import (
    Layer,
    as_layer,
    dtype_of,
    fold_inputs,
    fold_outputs,
    in_features,
    out_features,
    through_identity,
    through_last_dim,
    why_not_editable,
)

aten = torch.ops.aten

Axis = Literal["last", "channel", "any"]  # which dim a/t run along; "any" for scalars


@dataclass
class Affine:
    """``node`` computes ``x * a + t`` (float64 ``a``/``t`` of shape () or (C,), None = 1 / 0).

    ``x`` is the runtime input for a constant op; for a norm it is None (the affine is inside
    the norm and is stripped by clearing its weight/bias arguments).
    """

    node: fx.Node
    x: fx.Node | None
    a: torch.Tensor | None
    t: torch.Tensor | None
    axis: Axis
    what: str

    def strip(self, gm: fx.GraphModule) -> None:
        """Remove the affine from the graph (after it has been folded somewhere)."""
        if self.x is None:
            n_params = 2 if is_op(self.node, aten.layer_norm) else 1  # (weight, bias) or (weight,)
            args = list(self.node.args)
            args[2:2 + n_params] = [None] * n_params
            self.node.args = tuple(args)
        else:
            self.node.replace_all_uses_with(self.x)
            gm.graph.erase_node(self.node)


def _vec(v: torch.Tensor | None, n: int) -> torch.Tensor | None:
    return None if v is None else v.expand(n).clone() if v.dim() == 0 else v


def _norm(gm: fx.GraphModule, node: fx.Node) -> Affine | str | None:
    """A LayerNorm/RMSNorm with an elementwise affine, as an :class:`Affine`."""
    layer_norm = is_op(node, aten.layer_norm)
    params = list(node.args[2:4] if layer_norm else node.args[2:3])
    if not any(isinstance(p, fx.Node) for p in params):
        return None  # no affine (already folded, or elementwise_affine=False)
    what = "LayerNorm" if layer_norm else "RMSNorm"
    if len(node.args[1]) != 1:
        return f"{what} normalizes over {len(node.args[1])} dims; only last-dim norms fold into Linears"
    tensors = [attr_tensor(gm, p) if p is not None else None for p in params]
    if any(p is not None and t is None for p, t in zip(params, tensors)):
        return f"{what}'s weight/bias is computed, not a stored weight"
    a = tensors[0].detach().double() if tensors[0] is not None else None
    t = tensors[1].detach().double() if len(tensors) > 1 and tensors[1] is not None else None
    return Affine(node, None, a, t, "last", f"{what} affine")


def _is_runtime(x: object) -> bool:
    return isinstance(x, fx.Node) and x.op != "get_attr" and constant_value(x) is None


def _constant(gm: fx.GraphModule, c: object, y: fx.Node) -> tuple[torch.Tensor, Axis] | str | None:
    """``c`` as a float64 scalar/channel vector relative to ``y``'s shape, a reason, or None (not constant)."""
    value = constant_value(c)
    if value is not None:
        return torch.tensor(value, dtype=torch.float64), "any"
    tensor = attr_tensor(gm, c)
    shape = y.meta.get("val").shape if isinstance(y.meta.get("val"), torch.Tensor) else None
    if tensor is None or shape is None:
        return None
    if not tensor.is_floating_point():
        return "the constant is not a float tensor"
    if rounded_storage(tensor):
        return f"the constant's {rounded_storage(tensor)}"
    rank = len(shape)
    varying = [rank - tensor.dim() + i for i, d in enumerate(tensor.shape) if d != 1]
    flat = tensor.detach().double().reshape(-1)
    if varying == [rank - 1] and tensor.shape[-1] == shape[-1]:
        return flat, "last"
    if varying == [1] and rank >= 3 and tensor.shape[1 - rank + tensor.dim()] == shape[1]:
        return flat, "channel"
    return f"the constant {c.target} {tuple(tensor.shape)} varies along dims {varying} of a {tuple(shape)} value, not one channel dim"


def _linear_map(node: fx.Node, ci: int, v: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None] | None:
    """``(a, t)`` with ``node == x * a + t`` when the constant ``v`` is operand ``ci``; None if not affine."""
    alpha = node.kwargs.get("alpha", 1)
    if is_op(node, aten.mul):
        return v, None
    if is_op(node, aten.div) and ci == 1 and not node.kwargs.get("rounding_mode") and bool(v.ne(0).all()):
        return 1.0 / v, None
    if is_op(node, aten.add):
        return (None, alpha * v) if ci == 1 else (torch.tensor(float(alpha), dtype=torch.float64), v)
    if is_op(node, aten.sub):
        return (None, -alpha * v) if ci == 1 else (torch.tensor(-float(alpha), dtype=torch.float64), v)
    if is_op(node, aten.rsub) and ci == 1:  # rsub(x, c, alpha) = c - alpha * x
        return torch.tensor(-float(alpha), dtype=torch.float64), v
    return None


def as_affine(gm: fx.GraphModule, node: fx.Node) -> Affine | str | None:
    """``node`` as an :class:`Affine` site, a reason it is one but cannot fold, or None."""
    if is_op(node, aten.layer_norm, aten.rms_norm):
        return _norm(gm, node)
    if not is_op(node, aten.mul, aten.div, aten.add, aten.sub, aten.rsub) or len(node.args) != 2:
        return None
    for ci in (1, 0):
        x, c = node.args[1 - ci], node.args[ci]
        if not _is_runtime(x) or _is_runtime(c) or not (dtype_of(x) or torch.int64).is_floating_point:
            continue
        const = _constant(gm, c, x)
        if const is None:
            continue
        if isinstance(const, str):
            return const
        if dtype_of(node) != dtype_of(x) or node.meta["val"].shape != x.meta["val"].shape:
            return f"{op_name(node)} by the constant changes the shape or dtype of {x.name}"
        mapping = _linear_map(node, ci, const[0])
        if mapping is None:
            return None
        return Affine(node, x, *mapping, const[1], f"{op_name(node)} by a constant")
    return None


def into_producer(gm: fx.GraphModule, aff: Affine, *, untie: bool) -> Layer | str | None:
    """The layer whose output ``aff`` scales, if it can absorb it; a reason; None if no layer produces it."""
    if aff.x is None:
        return None
    chain, moved, n = [], False, aff.x
    while as_layer(n) is None:
        prev = through_last_dim(n) if isinstance(n, fx.Node) else None
        if prev is None:
            return None
        moved = moved or through_identity(n) is None
        chain.append(n)
        n = prev
    layer = as_layer(n)
    for v, user in zip([n, *reversed(chain)], [*reversed(chain), aff.node]):
        if len(v.users) != 1:
            others = ", ".join(u.name for u in v.users if u is not user)
            return f"{layer.node.name}'s output {v.name} also feeds {others}"
    if layer.channels_last and aff.axis == "channel":
        return f"the constant runs along dim 1 but {layer.node.name} is a linear (features last)"
    if not layer.channels_last and (aff.axis == "last" or (moved and aff.axis != "any")):
        return f"the constant does not run along {layer.node.name}'s output channels (dim 1)"
    return why_not_editable(gm, layer, untie=untie) or layer


def _non_layer_use(v: fx.Node, user: fx.Node) -> str:
    if user.op == "output":
        return f"{v.name} is a model output"
    if is_op(user, aten.add) and any(_is_runtime(a) and a is not v for a in user.args):
        other = next(a for a in user.args if a is not v)
        return (f"{v.name} is also added to {other.name} in {user.name}: a residual connection (post-LN: "
                "the norm output is the residual stream), not a Linear/Conv input")
    return f"{user.name} ({op_name(user)}) reads {v.name} and is not a Linear/Conv input"


def into_consumers(gm: fx.GraphModule, aff: Affine, *, untie: bool) -> list[Layer] | str | None:
    """Every layer reading ``aff``'s output, if all of them can absorb it; a reason; None if no layer reads it."""
    layers, failure, frontier = [], None, [(aff.node, False)]
    for v, moved in frontier:
        for user in v.users:
            layer = as_layer(user)
            if layer is not None and layer.x is v and sum(a is v for a in user.args) == 1:
                if (aff.axis == "last" and not layer.channels_last) or (aff.axis == "channel" and layer.channels_last):
                    failure = failure or f"{user.name} reads the channels along another dim than the {aff.what}"
                elif not layer.channels_last and aff.axis != "any" and moved:
                    failure = failure or f"a view between the {aff.what} and {user.name} moves its channels"
                elif layer.kind == "conv" and aff.t is not None and not no_padding(layer.padding):
                    failure = failure or (f"{user.name} zero-pads its input: padded zeros would become the "
                                          "shift after folding (not exact)")
                else:
                    failure = failure or why_not_editable(gm, layer, untie=untie)
                layers.append(layer)
                continue
            if user.op != "output" and through_last_dim(user) is v:
                frontier.append((user, moved or through_identity(user) is None))
                continue
            failure = failure or _non_layer_use(v, user)
    if not layers:
        return failure if aff.x is None else None
    return failure or layers


def fold(gm: fx.GraphModule, aff: Affine, target: Layer | list[Layer], pass_name: str) -> None:
    """Fold ``aff`` into its producer (one layer) or its consumers (a list), then remove it."""
    if isinstance(target, Layer):
        n = out_features(gm, target)
        scale = _vec(aff.a, n) if aff.a is not None else torch.ones(n, dtype=torch.float64)
        fold_outputs(gm, target, scale, _vec(aff.t, n), pass_name)
    else:
        for layer in target:
            n = in_features(gm, layer)
            scale = _vec(aff.a, n) if aff.a is not None else torch.ones(n, dtype=torch.float64)
            fold_inputs(gm, layer, scale, _vec(aff.t, n), pass_name)
    aff.strip(gm)
