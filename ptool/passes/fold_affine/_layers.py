"""The layers fold-affine edits (linear, addmm, conv) in one normalized form, and the weight maths.

Every fold ends in one of two edits, both computed in float64 and cast back once:

- :func:`fold_outputs`: ``y = layer(x) * a + t`` per output channel  ->  ``W' = diag(a) W``,
  ``b' = a * b + t``.
- :func:`fold_inputs`: ``y = layer(x * a + t)`` per input channel  ->  ``W' = W diag(a)``,
  ``b' = b + W t`` (for a conv, ``W t`` sums over the kernel window too).

and their full-matrix forms for linears (rotations, quantization transforms):
:func:`fold_inputs_matrix` (``layer(x @ m)``) and :func:`fold_outputs_matrix` (``layer(x) @ m``
on a range of output channels).

It also says which ops a per-channel constant passes through unchanged (:func:`through_last_dim`,
:func:`through_identity`), which every rule needs to see past views and eval-mode dropout.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.fx as fx

from ptool.ir.graph import add_tensor, attr_tensor, attr_users, is_op, mark, owner_of, replace_tensor, rounded_storage
from ptool.ir.noise import MISSING, is_noise, node_args

aten = torch.ops.aten

_CONVS = (aten.conv1d, aten.conv2d, aten.conv3d, aten.convolution)
_IDENTITY = frozenset({aten.clone.default, aten.contiguous.default, aten.alias.default, aten.detach.default,
                       aten.dropout.default})
_RESHAPES = frozenset({aten.view.default, aten.reshape.default, aten._unsafe_view.default,
                       aten.flatten.using_ints, aten.unflatten.int, aten.expand.default,
                       aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default})
_INDEXING = frozenset({aten.select.int, aten.slice.Tensor, aten.narrow.default, aten.index_select.default})


@dataclass
class Layer:
    """A linear / addmm / conv node with a stored weight, in normalized form.

    Attributes:
        kind: ``"linear"`` (weight (out, in)), ``"addmm"`` (GPT-2 Conv1D: weight (in, out)) or
            ``"conv"`` (weight (out, in/groups, *kernel)).
        x_index: position of the activation among ``node.args``.
    """

    node: fx.Node
    kind: Literal["linear", "addmm", "conv"]
    weight: fx.Node
    bias: fx.Node | None
    x_index: int
    groups: int = 1
    padding: object = 0

    @property
    def x(self) -> fx.Node:
        return self.node.args[self.x_index]

    @property
    def channels_last(self) -> bool:
        """True if the layer's features are the last dim of its input (linear, addmm)."""
        return self.kind != "conv"


def as_layer(node: object) -> Layer | None:
    """``node`` as a :class:`Layer`, or None if it is not a linear/addmm/(non-transposed) conv."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    if is_op(node, aten.linear):
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        return Layer(node, "linear", node.args[1], bias, 0)
    if is_op(node, aten.addmm):
        values, index = node_args(node)
        if values[index["beta"]] != 1 or values[index["alpha"]] != 1:
            return None
        return Layer(node, "addmm", node.args[2], node.args[0], 1)
    if is_op(node, *_CONVS):
        values, index = node_args(node)
        if "transposed" in index and values[index["transposed"]]:
            return None
        bias = values[index["bias"]]
        return Layer(node, "conv", node.args[1], None if bias is MISSING else bias, 0,
                     int(values[index["groups"]]), values[index["padding"]])
    return None


def why_not_editable(gm: fx.GraphModule, layer: Layer, *, untie: bool) -> str | None:
    """Why the layer's weight/bias cannot be rewritten (None if they can)."""
    w = attr_tensor(gm, layer.weight)
    if w is None or not w.is_floating_point():
        return f"{layer.node.name}'s weight is computed, not a stored float weight"
    if rounded_storage(w):
        return f"{layer.node.name}'s {rounded_storage(w)}"
    if layer.kind == "addmm" and (w.dim() != 2 or attr_tensor(gm, layer.bias) is None):
        return f"{layer.node.name} is an addmm without a stored 2-D weight and bias"
    if layer.bias is not None and attr_tensor(gm, layer.bias) is None:
        return f"{layer.node.name}'s bias is computed, not a stored weight"
    if untie:
        return None
    for param in filter(None, (layer.weight, layer.bias)):
        others = [u.name for u in attr_users(gm, param.target) if u is not layer.node]
        if others:
            return (f"{layer.node.name}'s {param.target} is tied (also read by {', '.join(others)}); "
                    "folding would untie and duplicate it (untie_weights=true allows it)")
    return None


def in_features(gm: fx.GraphModule, layer: Layer) -> int:
    w = attr_tensor(gm, layer.weight)
    return w.shape[0] if layer.kind == "addmm" else w.shape[1] * layer.groups


def out_features(gm: fx.GraphModule, layer: Layer) -> int:
    w = attr_tensor(gm, layer.weight)
    return w.shape[1] if layer.kind == "addmm" else w.shape[0]


def _weight64(gm: fx.GraphModule, layer: Layer) -> torch.Tensor:
    """The weight as float64 in (out, in_per_group, *kernel) order."""
    w = attr_tensor(gm, layer.weight).detach().double()
    return w.t() if layer.kind == "addmm" else w


def _bias64(gm: fx.GraphModule, layer: Layer, out: int) -> torch.Tensor:
    b = attr_tensor(gm, layer.bias) if layer.bias is not None else None
    return b.detach().double() if b is not None else torch.zeros(out, dtype=torch.float64)


def _write(gm: fx.GraphModule, layer: Layer, w64: torch.Tensor, b64: torch.Tensor | None, pass_name: str) -> None:
    dtype = attr_tensor(gm, layer.weight).dtype
    w = (w64.t() if layer.kind == "addmm" else w64).contiguous().to(dtype)
    layer.weight = replace_tensor(gm, layer.weight, w, user=layer.node, name="weight")
    if b64 is not None:
        _set_bias(gm, layer, b64.to(dtype), pass_name)
    mark(layer.node, pass_name)


def _set_bias(gm: fx.GraphModule, layer: Layer, value: torch.Tensor, pass_name: str) -> None:
    if layer.bias is not None:
        layer.bias = replace_tensor(gm, layer.bias, value, user=layer.node, name="bias")
        return
    node = mark(add_tensor(gm, owner_of(layer.weight.target), "bias", value, parameter=True, before=layer.node),
                pass_name)
    args = list(layer.node.args) + [None] * max(0, 3 - len(layer.node.args))
    args[2] = node
    layer.node.args = tuple(args)
    layer.node.kwargs = {k: v for k, v in layer.node.kwargs.items() if k != "bias"}
    layer.bias = node


def fold_outputs(gm: fx.GraphModule, layer: Layer, scale: torch.Tensor, shift: torch.Tensor | None,
                 pass_name: str) -> None:
    """``layer(x) * scale + shift`` (per output channel, float64 vectors) into the layer."""
    w = _weight64(gm, layer)
    b = _bias64(gm, layer, w.shape[0])
    new_b = scale * b + (shift if shift is not None else 0.0)
    needs_bias = layer.bias is not None or bool(new_b.ne(0).any())
    _write(gm, layer, w * scale.view(-1, *[1] * (w.dim() - 1)), new_b if needs_bias else None, pass_name)


def fold_inputs(gm: fx.GraphModule, layer: Layer, scale: torch.Tensor, shift: torch.Tensor | None,
                pass_name: str) -> None:
    """``layer(x * scale + shift)`` (per input channel, float64 vectors) into the layer."""
    w = _weight64(gm, layer)
    out, g = w.shape[0], layer.groups
    extra = [1] * (w.dim() - 2)
    # per output channel, the (in/groups) input channels it reads
    s = scale.view(g, -1).repeat_interleave(out // g, dim=0).view(out, -1, *extra)
    new_b = None
    if shift is not None and bool(shift.ne(0).any()):
        t = shift.view(g, -1).repeat_interleave(out // g, dim=0).view(out, -1, *extra)
        new_b = _bias64(gm, layer, out) + (w * t).flatten(1).sum(1)
    _write(gm, layer, w * s, new_b, pass_name)



def fold_inputs_matrix(gm: fx.GraphModule, layer: Layer, m: torch.Tensor, pass_name: str) -> None:
    """``layer(x @ m)`` (``m``: (in, in) float64) into a linear/addmm: ``W' = W m^T``.

    The full-matrix case of :func:`fold_inputs` (which is ``m = diag(scale)``): rotations and
    other invertible input transforms (quantization transforms, METHODS 4.1).
    """
    if not layer.channels_last:
        raise ValueError(f"{layer.node.name}: a full-matrix input fold needs a linear/addmm, not a {layer.kind}")
    w = _weight64(gm, layer)
    _write(gm, layer, w @ m.t(), None, pass_name)


def fold_outputs_matrix(gm: fx.GraphModule, layer: Layer, m: torch.Tensor, pass_name: str, start: int = 0) -> None:
    """``layer(x)[..., start:stop] @ m`` (``m``: (k, k) float64, ``stop = start + k``) into a linear/addmm.

    Output channels ``[start, stop)`` become ``W'[rows] = m^T W[rows]``, ``b'[rows] = b[rows] m``;
    the others are unchanged (a fused qkv projection keeps its q/k columns).
    """
    if not layer.channels_last:
        raise ValueError(f"{layer.node.name}: a full-matrix output fold needs a linear/addmm, not a {layer.kind}")
    w = _weight64(gm, layer).clone()
    stop = start + m.shape[0]
    w[start:stop] = m.t() @ w[start:stop]
    new_b = None
    if layer.bias is not None:
        new_b = _bias64(gm, layer, w.shape[0]).clone()
        new_b[start:stop] = new_b[start:stop] @ m
    _write(gm, layer, w, new_b, pass_name)


# ------------------------------------------------------------------------ what channels pass through
def _shape(node: object) -> tuple[int, ...] | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if not isinstance(val, torch.Tensor):
        return None
    try:
        return tuple(int(d) for d in val.shape)
    except Exception:  # symbolic sizes: not provable here, so not a pass-through
        return None


def dtype_of(node: object) -> torch.dtype | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val.dtype if isinstance(val, torch.Tensor) else None


def through_identity(node: fx.Node) -> fx.Node | None:
    """The input of ``node`` if ``node`` returns it unchanged (copies, eval dropout, same-dtype casts)."""
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    x = node.args[0]
    if node.target in _IDENTITY:
        return x if is_noise(node, _IDENTITY) else None
    if is_op(node, aten.to, aten._to_copy) and dtype_of(node) is not None and dtype_of(node) == dtype_of(x):
        return x
    return None


def through_last_dim(node: fx.Node) -> fx.Node | None:
    """The input of ``node`` if every output row along the last dim is an unchanged input row.

    Then a per-last-dim scale/shift commutes with ``node``: views and reshapes that keep the last
    dim's size, permutes that keep it last, and indexing along other dims.
    """
    x = through_identity(node)
    if x is not None:
        return x
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    x, out_shape, in_shape = node.args[0], _shape(node), _shape(node.args[0])
    if not out_shape or not in_shape or out_shape[-1] != in_shape[-1] or in_shape[-1] == 1:
        return None
    last = len(in_shape) - 1
    if node.target in _RESHAPES:
        return x
    if node.target is aten.transpose.int:
        return x if all(d % len(in_shape) != last for d in node.args[1:3]) else None
    if node.target is aten.permute.default:
        return x if node.args[1][-1] % len(in_shape) == last else None
    if node.target in _INDEXING:
        dim = node.args[1] if len(node.args) > 1 else 0
        return x if dim % len(in_shape) != last else None
    return None


def channel_range(node: fx.Node) -> tuple[fx.Node, int, int] | None:
    """``(source, start, stop)`` if ``node`` selects channels [start, stop) of ``source``'s last dim.

    Covers ``getitem(split(x, size, -1), i)``, ``split_with_sizes`` and ``slice(x, -1, a, b)``.
    """
    shape = _shape(node)
    if node.op != "call_function" or shape is None:
        return None
    if node.target is operator.getitem and is_op(node.args[0], aten.split, aten.split_with_sizes):
        split, i = node.args
        source = split.args[0]
        src = _shape(source)
        dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
        if src is None or dim % len(src) != len(src) - 1:
            return None
        sizes = split.args[1]
        if isinstance(sizes, int):
            sizes = [min(sizes, src[-1] - k) for k in range(0, src[-1], sizes)]
        start = sum(sizes[:i])
        return source, start, start + sizes[i]
    if node.target is aten.slice.Tensor:
        source = node.args[0]
        src = _shape(source)
        values, index = node_args(node)
        if src is None or values[index["dim"]] % len(src) != len(src) - 1 or values[index["step"]] != 1:
            return None
        start = values[index["start"]]
        start = 0 if start is None else start
        start = start + src[-1] if start < 0 else min(start, src[-1])
        return source, start, start + shape[-1]
    return None
