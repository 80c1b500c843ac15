"""Fold eval-mode BatchNorm into the neighbouring convolution or linear layer.

With ``s = gamma / sqrt(running_var + eps)`` per channel:

- **BN after conv/linear** (Conv1d/2d/3d, ConvTranspose1d/2d/3d, Linear + BatchNorm1d):
  ``W' = s (.) W`` along output channels, ``b' = s * (b - mean) + beta``. Exact. A Linear with a
  3-D (or higher) output normalized by a BatchNorm1d over its flattened rows -- LeViT's
  ``bn(linear(x).flatten(0, 1)).reshape_as(x)`` -- folds the same way: the reshape between them
  keeps the features in the last axis, so they are still the BatchNorm's channels.
- **BN before conv/linear**, when every consumer of the BN output is a conv/linear reading it as
  its input (possibly through eval-mode dropout or a copy: LeViT's ``NormLinear`` head):
  ``W' = W (.) s`` along input channels, ``b' = b + sum(W * (beta - s * mean))``.
  Exact only without zero padding: padding inserts zeros *after* the BN, which the folded conv
  would see as ``beta - s * mean`` instead. Such sites are skipped and the report says why.

Limits: BatchNorm must be in eval mode (running statistics); the neighbour's weight must be a
model weight (a get_attr), and for BN-after-X the neighbour's output must feed only the BN.
New weights are computed in float64 and cast back, so the fold adds no rounding beyond one cast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx

from ptool.ir.graph import (
    add_tensor,
    attr_tensor,
    eliminate_dead_code,
    is_op,
    mark,
    module_path,
    no_padding,
    owner_of,
    replace_tensor,
    rounded_storage,
)
from ptool.ir.noise import IDENTITY_OPS, is_noise
from ptool.passes.base import Family, Pass, PassContext, PassResult
from ptool.verify import Close, Numerics

aten = torch.ops.aten

_CONVS = (aten.conv1d, aten.conv2d, aten.conv3d, aten.convolution)
_CONV_TRANSPOSES = (aten.conv_transpose1d, aten.conv_transpose2d, aten.conv_transpose3d)
_BATCH_NORMS = (aten.batch_norm, aten._native_batch_norm_legit_no_training)


@dataclass
class _Layer:
    """A conv/linear node in normalized form."""

    node: torch.fx.Node
    weight: torch.fx.Node
    bias: torch.fx.Node | None
    kind: str  # "conv", "conv_transpose" or "linear"
    groups: int
    padding: object

    @property
    def weight_arg_index(self) -> int:
        return 1


def _as_layer(node: torch.fx.Node) -> _Layer | None:
    if not isinstance(node, torch.fx.Node) or node.op != "call_function":
        return None
    args = list(node.args) + [None] * 9
    bias = args[2] if isinstance(args[2], torch.fx.Node) else None
    if is_op(node, aten.linear):
        return _Layer(node, args[1], bias, "linear", 1, 0)
    if is_op(node, aten.convolution):
        kind = "conv_transpose" if args[6] else "conv"
        return _Layer(node, args[1], bias, kind, int(args[8] or 1), args[4])
    if is_op(node, *_CONVS):
        return _Layer(node, args[1], bias, "conv", int(node.kwargs.get("groups", args[6] or 1)), node.kwargs.get("padding", args[4] if args[4] is not None else 0))
    if is_op(node, *_CONV_TRANSPOSES):
        return _Layer(node, args[1], bias, "conv_transpose", int(args[6] or 1), args[4])
    return None


@dataclass
class _BatchNorm:
    node: torch.fx.Node  # the node whose value is the normalized tensor
    bn: torch.fx.Node  # the batch_norm call itself
    x: torch.fx.Node
    scale: torch.Tensor  # s = gamma / sqrt(var + eps), float64
    shift: torch.Tensor  # t = beta - s * mean, float64


def as_batch_norm(gm: torch.fx.GraphModule, node: torch.fx.Node) -> _BatchNorm | str:
    """Normalize a batch-norm node or say why it is not foldable."""
    import operator

    args = list(node.args)
    if is_op(node, aten.batch_norm):
        x, w, b, mean, var, training, _momentum, eps = args[:8]
        out = node
        if training:
            return "BatchNorm is in training mode (uses batch statistics); call model.eval() first"
    else:  # _native_batch_norm_legit_no_training returns (out, mean, rstd); only getitem 0 may be used
        x, w, b, mean, var, _momentum, eps = args[:7]
        users = list(node.users)
        if not all(u.target is operator.getitem and u.args[1] == 0 for u in users) or len(users) != 1:
            return "BatchNorm's saved statistics are used"
        out = users[0]
    tensors = {k: attr_tensor(gm, v) if v is not None else None for k, v in dict(w=w, b=b, mean=mean, var=var).items()}
    if tensors["mean"] is None or tensors["var"] is None:
        return "BatchNorm has no running statistics (track_running_stats=False)"
    if (w is not None and tensors["w"] is None) or (b is not None and tensors["b"] is None):
        return "BatchNorm's affine parameters are computed, not stored weights"
    mean64, var64 = tensors["mean"].double(), tensors["var"].double()
    gamma = tensors["w"].double() if tensors["w"] is not None else torch.ones_like(mean64)
    beta = tensors["b"].double() if tensors["b"] is not None else torch.zeros_like(mean64)
    scale = gamma / torch.sqrt(var64 + float(eps))
    return _BatchNorm(out, node, x, scale, beta - scale * mean64)


def _channels_view(vec: torch.Tensor, ndim: int, dim: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[dim] = -1
    return vec.view(shape)


def _fold_after(gm: torch.fx.GraphModule, layer: _Layer, bn: _BatchNorm, pass_name: str) -> None:
    """W' = s W (output channels), b' = s (b - mean) + beta = s b + t. The BatchNorm's readers read
    its input instead (the layer's output, or the row-flattening reshape of it)."""
    w = attr_tensor(gm, layer.weight)
    w64 = w.double()
    s = bn.scale
    if layer.kind == "conv_transpose":  # weight (in, out/groups, *k): output channel o = g*opg + j
        g = layer.groups
        new_w = (w64.unflatten(0, (g, -1)) * s.view(g, 1, -1, *([1] * (w.dim() - 2)))).flatten(0, 1)
    else:
        new_w = w64 * _channels_view(s, w.dim(), 0)
    bias = attr_tensor(gm, layer.bias).double() if layer.bias is not None else torch.zeros_like(s)
    new_b = s * bias + bn.shift
    replace_tensor(gm, layer.weight, new_w.to(w.dtype), user=layer.node, name="weight")
    _set_bias(gm, layer, new_b.to(w.dtype), pass_name)
    bn.node.replace_all_uses_with(bn.x)
    mark(layer.node, pass_name)


def _set_bias(gm: torch.fx.GraphModule, layer: _Layer, value: torch.Tensor, pass_name: str) -> None:
    if layer.bias is not None:
        replace_tensor(gm, layer.bias, value, user=layer.node, name="bias")
        return
    node = add_tensor(gm, owner_of(layer.weight.target), "bias", value, parameter=True, before=layer.node)
    mark(node, pass_name)
    args = list(layer.node.args)
    while len(args) < 3:
        args.append(None)
    args[2] = node
    layer.node.args = tuple(args)


def _through_identities(bn_out: torch.fx.Node, user: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node]:
    """``(reader, fed)``: the node past identity ops (eval dropout, copies; one user each) that reads
    the BatchNorm output ``bn_out`` via ``user``, and the value it reads (``bn_out`` or the last of them)."""
    fed, node = bn_out, user
    while is_noise(node, IDENTITY_OPS) and len(node.users) == 1:
        fed, node = node, next(iter(node.users))
    return node, fed


def _fold_before(gm: torch.fx.GraphModule, layer: _Layer, bn: _BatchNorm, pass_name: str,
                 reader: torch.fx.Node) -> None:
    """W' = W s (input channels), b' = b + sum over in-channels/kernel of W t. ``reader``: the
    node that reads the BatchNorm output (the layer, or an identity op before it)."""
    w = attr_tensor(gm, layer.weight)
    w64 = w.double()
    out_ch = w.shape[0]
    g = layer.groups
    # per output channel, the (in/groups) input channels it reads
    s = bn.scale.view(g, -1).repeat_interleave(out_ch // g, dim=0)
    t = bn.shift.view(g, -1).repeat_interleave(out_ch // g, dim=0)
    extra = [1] * (w.dim() - 2)
    new_w = w64 * s.view(out_ch, -1, *extra)
    delta = (w64 * t.view(out_ch, -1, *extra)).flatten(1).sum(1)
    bias = attr_tensor(gm, layer.bias).double() if layer.bias is not None else torch.zeros(out_ch, dtype=torch.float64)
    replace_tensor(gm, layer.weight, new_w.to(w.dtype), user=layer.node, name="weight")
    _set_bias(gm, layer, (bias + delta).to(w.dtype), pass_name)
    reader.replace_input_with(bn.node, bn.x)
    mark(layer.node, pass_name)


def _rank(node: torch.fx.Node) -> int | None:
    val = node.meta.get("val")
    return val.dim() if isinstance(val, torch.Tensor) else None


_ROW_RESHAPES = (aten.view, aten.reshape, aten._unsafe_view, aten.flatten)


def _shape(node: torch.fx.Node) -> tuple[int, ...] | None:
    val = node.meta.get("val")
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _value_users(node: torch.fx.Node) -> list[torch.fx.Node]:
    """Readers of ``node``'s values: a ``reshape_as``/``view_as`` that only takes its shape, or a
    ``sym_size``, does not count (folding changes the values, never the shape)."""
    def shape_only(user: torch.fx.Node) -> bool:
        if is_op(user, aten.reshape_as, aten.view_as, aten.expand_as):
            return user.args[1] is node and user.args[0] is not node
        return is_op(user, aten.sym_size)
    return [u for u in node.users if not shape_only(u)]


def _layer_before(bn: _BatchNorm) -> torch.fx.Node:
    """The node that may be the folded layer: BN's input, or the Linear whose output a reshape
    flattens into BatchNorm1d's rows (the features kept in the last axis)."""
    x = bn.x
    if is_op(x, *_ROW_RESHAPES) and len(x.users) == 1 and _value_users(x.args[0]) == [x]:
        inner = x.args[0]
        before, after = _shape(inner), _shape(x)
        if (_as_layer(inner) is not None and _as_layer(inner).kind == "linear" and before and after
                and len(after) == 2 and len(before) >= 2 and before[-1] == after[-1]):
            return inner
    return x


def _why_not_after(gm: torch.fx.GraphModule, bn: _BatchNorm) -> str | None:
    producer = _layer_before(bn)
    layer = _as_layer(producer)
    if layer is None:
        return f"input comes from {bn.x.name}, not a conv/linear"
    if len(_value_users(producer)) != 1:
        return f"{producer.name}'s output is also used elsewhere ({len(producer.users)} users)"
    if attr_tensor(gm, layer.weight) is None or (layer.bias is not None and attr_tensor(gm, layer.bias) is None):
        return f"{producer.name}'s weight is computed, not a stored weight"
    if rounded_storage(attr_tensor(gm, layer.weight)):
        return f"{producer.name}'s {rounded_storage(attr_tensor(gm, layer.weight))}"
    if layer.kind == "linear" and producer is bn.x and _rank(layer.node) != 2:
        return "Linear output is not 2-D, so BatchNorm1d's channel axis is not the Linear's features"
    return None


def _why_not_before(gm: torch.fx.GraphModule, bn: _BatchNorm) -> str | None:
    users = list(bn.node.users)
    for user in users:
        reader, fed = _through_identities(bn.node, user)
        layer = _as_layer(reader)
        if layer is None or layer.node.args[0] is not fed or fed in layer.node.args[1:]:
            return f"BatchNorm output feeds {user.name}, which is not a conv/linear input"
        if layer.kind == "conv_transpose":
            return "folding BatchNorm into a following transposed convolution is not supported"
        if attr_tensor(gm, layer.weight) is None:
            return f"{user.name}'s weight is computed, not a stored weight"
        if rounded_storage(attr_tensor(gm, layer.weight)):
            return f"{user.name}'s {rounded_storage(attr_tensor(gm, layer.weight))}"
        if layer.kind == "linear" and _rank(bn.node) != 2:
            return "BatchNorm1d output is not 2-D, so its channels are not the Linear's input features"
        if layer.kind == "conv" and not no_padding(layer.padding):
            return (
                f"{user.name} zero-pads its input: padded zeros would become beta - s*mean after folding "
                "(not exact)"
            )
    return None


@dataclass(frozen=True, kw_only=True)
class FoldBatchNorm(Pass):
    """Fold eval-mode BatchNorm into the adjacent conv / transposed conv / linear (exact).

    Args:
        fold_into_next: also fold a BatchNorm into the conv/linear layers that read it (when exact).
    """

    name: ClassVar[str] = "fold-bn"
    family: ClassVar[Family] = Family.REPARAM
    numerics: ClassVar[Numerics] = Close(atol=0.0, rtol=1e-5)
    fold_into_next: bool = True

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult()
        for node in list(gm.graph.nodes):
            if node.graph is not gm.graph or not is_op(node, *_BATCH_NORMS):
                continue
            site = f"{node.name} ({module_path(node)})"
            bn = as_batch_norm(gm, node)
            if isinstance(bn, str):
                result.skip(site, bn)
                continue
            why_after = _why_not_after(gm, bn)
            if why_after is None:
                _fold_after(gm, _as_layer(_layer_before(bn)), bn, self.name)
            else:
                why_before = _why_not_before(gm, bn) if self.fold_into_next else "fold_into_next=false"
                if why_before is not None:
                    result.skip(site, f"not after a foldable layer ({why_after}); not before one ({why_before})")
                    continue
                for user in list(bn.node.users):
                    _fold_before(gm, _as_layer(_through_identities(bn.node, user)[0]), bn, self.name, user)
            for n in dict.fromkeys((bn.node, bn.bn)):  # the same node for aten.batch_norm
                if not n._erased and not n.users:
                    gm.graph.erase_node(n)
            result.hit()
        if result.changed:
            eliminate_dead_code(gm)
        return result

