"""Merge parallel linear branches and chains of linear layers into one layer (exact).

Convolution and linear layers are linear in their input, so sums and compositions of them are
again one such layer:

- **Branch sums** (RepVGG / ACNet / DBB structural re-parameterization). For branches that read
  the *same* input ``x`` and are added, ``sum_i conv(x, W_i, b_i) + s*x + t`` is
  ``conv(x, sum_i pad(W_i) + s*I, sum_i b_i + t)``. Each kernel is zero-padded, centred, to the
  largest size; the identity (or a BatchNorm applied to ``x`` directly, RepVGG's identity branch:
  ``s = gamma/sqrt(var+eps)``, ``t = beta - s*mean``) is a kernel with ``s`` at the centre tap of
  its own channel (per group for grouped convs). Conditions: same stride, groups and channel
  counts; same dilation along every axis where two kernels have more than one tap; kernel sizes
  differing by an even amount; paddings that align the taps: ``p - d*(k-1)/2`` equal on every
  branch (3x3 with padding 1 and 1x1 with padding 0); for the identity also stride 1 and odd
  kernels. The branches compatible with the largest one merge; the others stay, with the reason.
  For linears, ``sum_i linear(x, W_i, b_i) + x`` is ``linear(x, sum_i W_i + I, sum_i b_i)``.
  Sums are trees of ``add`` and ``sub`` (and ``add_`` when nothing else reads the value it
  overwrites); a subtracted branch enters with a minus sign, so FastViT's RepMixer
  ``x + gamma * (mixer(x) - norm(x))`` merges once ``fold-affine`` has taken ``gamma`` into the merged
  mixer (run the three passes to a fixpoint).
- **Chains**: ``linear(linear(x, W1, b1), W2, b2) = linear(x, W2 W1, W2 b1 + b2)`` and a 1x1
  conv (stride 1, no padding) after any conv with the same groups: the 1x1 kernel is applied to
  every tap of the first kernel, per group. Only when the inner layer has no other consumer and the
  merged layer has at most the FLOPs (equivalently, weights) of the two; a low-rank factorization
  such as 384->64->384 is refused unless ``allow_growth=true``.

Exactness: new weights are computed in float64 and cast back once; the merged layer sums the
products in another order, so results match to float rounding, not bit for bit.

Zero-width pads (TF-"same" models put one before every 1x1 conv), copies and eval-mode dropout are
seen through: they do not separate a branch from its input or a chain's two layers; an added zero
inside a sum (MobileOne's ``0 + identity`` when a block has no scale branch) is no term.

Limits: weights must be stored tensors (get_attr); adds with ``alpha != 1``, transposed convs,
matmul spellings other than ``aten.linear`` and string padding other than valid / odd-kernel
'same' are not merged. A branch that still has a BatchNorm after its conv is refused: run
``fold-bn`` first.
"""

from __future__ import annotations

import dataclasses
import operator
from collections import Counter
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx

from ptool.ir.graph import (
    add_tensor,
    attr_tensor,
    eliminate_dead_code,
    erase_if_unused,
    is_op,
    mark,
    module_path,
    owner_of,
    replace_tensor,
    rounded_storage,
)
from ptool.ir.noise import IDENTITY_OPS, is_noise, named_args
from ptool.passes.base import Family, Pass, PassContext, PassResult
from ptool.passes.fold_bn import as_batch_norm
from ptool.verify import Close, Numerics

aten = torch.ops.aten

_CONVS = {aten.conv1d: 1, aten.conv2d: 2, aten.conv3d: 3}


@dataclass
class _Layer:
    """A conv or linear call in normalized form."""

    node: torch.fx.Node
    x: torch.fx.Node  # the input, seen through no-op nodes
    via: list[torch.fx.Node]  # the no-op nodes between ``x`` and the layer (layer side first)
    weight_node: torch.fx.Node
    bias_node: torch.fx.Node | None
    weight: torch.Tensor  # the stored tensors (converted to float64 only when merged)
    bias: torch.Tensor | None
    kind: str  # "conv" or "linear"
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    term: torch.fx.Node | None = None  # in a sum: the term this layer is (the layer or a no-op on it)
    sign: float = 1.0  # in a sum: +1, or -1 for a subtracted term

    @property
    def kernel(self) -> tuple[int, ...]:
        return tuple(self.weight.shape[2:])

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1] * self.groups

    def anchor(self) -> tuple[float, ...]:
        """Input offset of the kernel's centre tap: ``p - d*(k-1)/2``; equal anchors align taps."""
        return tuple(p - d * (k - 1) / 2 for p, d, k in zip(self.padding, self.dilation, self.kernel))


def _tuple(value: object, n: int) -> tuple[int, ...]:
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value) if len(value) == n else tuple(int(value[0]) for _ in range(n))
    return (int(value),) * n


def _is_zero_pad(node: torch.fx.Node) -> bool:
    # TF-"same" models (HF MobileNetV2) put a pad of width 0 before every 1x1 conv
    return is_op(node, aten.pad, aten.constant_pad_nd) and isinstance(node.args[1], (list, tuple)) \
        and all(isinstance(p, int) and p == 0 for p in node.args[1])


def _see_through(node: object) -> tuple[object, list[torch.fx.Node]]:
    """The value behind no-op nodes (zero-width pads, copies, eval dropout) and the nodes skipped."""
    path = []
    while isinstance(node, torch.fx.Node) and (_is_zero_pad(node) or is_noise(node, IDENTITY_OPS)):
        path.append(node)
        node = node.args[0]
    return node, path


def _as_layer(gm: torch.fx.GraphModule, node: object) -> _Layer | str | None:
    """Normalize a conv/linear node; a reason string if it is one we cannot merge; None otherwise."""
    if is_op(node, aten.linear):
        kind, n = "linear", 0
    elif is_op(node, *_CONVS):
        kind, n = "conv", _CONVS[node.target.overloadpacket]
    elif is_op(node, aten.convolution):
        kind, n = "conv", len(node.args[3])
    else:
        return None
    a = named_args(node)
    if a.get("transposed"):
        return f"{node.name} is a transposed convolution (not merged)"
    weight = attr_tensor(gm, a["weight"])
    bias = attr_tensor(gm, a["bias"]) if a["bias"] is not None else None
    if weight is None or (a["bias"] is not None and bias is None):
        return f"{node.name}'s weight is computed, not a stored weight"
    if rounded_storage(weight):
        return f"{node.name}'s {rounded_storage(weight)}"
    x, via = _see_through(a["input"])
    if not isinstance(x, torch.fx.Node):
        return f"{node.name}'s input is not a graph value"
    layer = _Layer(node, x, via, a["weight"], a["bias"], weight, bias, kind)
    if kind == "conv":
        layer.stride = _tuple(a["stride"], n)
        layer.dilation = _tuple(a["dilation"], n)
        layer.groups = int(a["groups"])
        padding = a["padding"]
        if padding == "valid":
            padding = 0
        elif padding == "same":
            if any(k % 2 == 0 for k in layer.kernel) or any(s != 1 for s in layer.stride):
                return f"{node.name} uses padding='same' with an even kernel or a stride"
            padding = [d * (k - 1) // 2 for d, k in zip(layer.dilation, layer.kernel)]
        layer.padding = _tuple(padding, n)
    return layer


def _bn_node(node: torch.fx.Node) -> torch.fx.Node | None:
    """The batch-norm call behind ``node`` (the node itself, or the BN of ``getitem(bn, 0)``)."""
    if is_op(node, aten.batch_norm):
        return node
    if node.op == "call_function" and node.target is operator.getitem:
        if node.args[1] == 0 and is_op(node.args[0], aten._native_batch_norm_legit_no_training):
            return node.args[0]
    return None


def _is_add(node: object) -> bool:
    """``a + b`` or ``a - b`` on two tensors (alpha 1); an in-place ``a += b`` only when nothing else
    reads ``a``."""
    if not (is_op(node, aten.add.Tensor, aten.add_.Tensor, aten.sub.Tensor) and node.kwargs.get("alpha", 1) == 1
            and len(node.args) == 2 and all(isinstance(a, torch.fx.Node) for a in node.args)):
        return False
    return node.target is not aten.add_.Tensor or len(node.args[0].users) == 1


def _absorbed(node: torch.fx.Node) -> bool:
    """True if ``node`` is an inner add of a larger sum (its only user is an add of the same shape)."""
    if len(node.users) != 1:
        return False
    user = next(iter(node.users))
    return _is_add(user) and _shape(user) == _shape(node)


def _plus_zero(node: object) -> bool:
    """``t + 0`` (a Python zero): MobileOne starts its sum as ``0 + identity`` when it has no scale branch."""
    if not is_op(node, aten.add.Tensor, aten.add.Scalar) or node.kwargs.get("alpha", 1) != 1 or len(node.args) != 2:
        return False
    a, b = node.args
    return isinstance(a, torch.fx.Node) and isinstance(b, (int, float)) and b == 0


def _signed_args(node: torch.fx.Node, sign: float) -> list[tuple[torch.fx.Node, float]]:
    """The tensor operands of an add/sub node with their signs in the whole sum."""
    args = [(a, sign) for a in node.args if isinstance(a, torch.fx.Node)]
    if is_op(node, aten.sub.Tensor):
        args[1] = (args[1][0], -sign)
    return args


def _sum_terms(root: torch.fx.Node) -> tuple[list[torch.fx.Node], list[torch.fx.Node], list[float]]:
    """Flatten a tree of adds and subtractions into its terms (with repeats), its add/sub nodes (root
    first) and each term's sign; an added zero inside the tree is no term."""
    terms, adds, signs = [], [root], []
    stack = list(reversed(_signed_args(root, 1.0)))
    while stack:
        node, sign = stack.pop()
        if (_is_add(node) or _plus_zero(node)) and _absorbed(node):
            adds.append(node)
            stack.extend(reversed(_signed_args(node, sign)))
        else:
            terms.append(node)
            signs.append(sign)
    return terms, adds, signs


def _shape(node: torch.fx.Node) -> tuple | None:
    val = node.meta.get("val")
    return (tuple(val.shape), val.dtype) if isinstance(val, torch.Tensor) else None


def _site(node: torch.fx.Node) -> str:
    return f"{node.name} ({module_path(node)})"


def _describe_terms(gm: torch.fx.GraphModule, terms: list[torch.fx.Node], adds: list[torch.fx.Node]) -> str:
    """``conv2d_3(relu_2) + conv2d_4(max_pool2d) + x``: each private layer term with its input."""
    parts = []
    for term in terms:
        core, path = _see_through(term)
        layer = _as_layer(gm, core)
        private = set(term.users) <= set(adds) and all(len(n.users) == 1 for n in [*path, core][1:])
        parts.append(f"{core.name}({layer.x.name})" if isinstance(layer, _Layer) and private else core.name)
    return " + ".join(parts)


@dataclass
class _Identity:
    """``scale * x + shift`` along channel dim 1 (scale/shift None: the plain identity)."""

    node: torch.fx.Node  # the term in the sum
    scale: torch.Tensor | None = None
    shift: torch.Tensor | None = None
    sign: float = 1.0  # +1, or -1 for a subtracted term


def _group_terms(gm: torch.fx.GraphModule, root: torch.fx.Node, terms: list[torch.fx.Node], adds: list[torch.fx.Node],
                 signs: list[float]):
    """Sort the terms of a sum into branches by the input they read.

    Returns ``(by_input, blocked, reasons)`` or None if no term is a layer (not a site):
    ``by_input`` maps an input to the layers and identity terms on it; ``blocked`` maps an input to
    why a layer reading it cannot take part (its output is used elsewhere); ``reasons`` are other
    refusals found on the way.
    """
    by_input: dict[torch.fx.Node, list] = {}
    blocked: dict[torch.fx.Node, str] = {}
    reasons: list[str] = []
    saw_layer = False
    for term, sign in zip(terms, signs):
        core, path = _see_through(term)
        private = set(term.users) <= set(adds) and all(len(n.users) == 1 for n in [*path, core][1:])
        same_shape = _shape(term) == _shape(root)
        layer, bn = _as_layer(gm, core), _bn_node(core)
        if isinstance(layer, _Layer):
            saw_layer = True
            if private and same_shape:
                by_input.setdefault(layer.x, []).append(dataclasses.replace(layer, term=term, sign=sign))
                continue
            blocked[layer.x] = (f"{core.name}'s output is also used outside the sum" if same_shape
                                else f"{core.name} is broadcast in the sum")
        elif isinstance(layer, str):
            saw_layer = True
            reasons.append(layer)
        elif bn is not None and isinstance(_as_layer(gm, _see_through(bn.args[0])[0]), _Layer) \
                and len(bn.args[0].users) == 1:  # fold-bn can fold it into that layer
            saw_layer = True
            reasons.append(f"{core.name} is a BatchNorm after {bn.args[0].name}: run fold-bn first")
        elif bn is not None:  # a BatchNorm on the input itself: RepVGG's identity branch
            stats = as_batch_norm(gm, bn)
            if isinstance(stats, str):
                reasons.append(f"{core.name}: {stats}")
            elif private and same_shape:
                ident = _Identity(term, stats.scale, stats.shift, sign)
                by_input.setdefault(_see_through(stats.x)[0], []).append(ident)
                continue
        if same_shape:  # any other term may be the identity branch of layers reading it
            by_input.setdefault(core, []).append(_Identity(term, sign=sign))
    return (by_input, blocked, reasons) if saw_layer else None


def _pair_reason(m: _Layer, ref: _Layer) -> str | None:
    """Why branch ``m`` cannot be merged with the already accepted branch ``ref``."""
    if m.kind != ref.kind:
        return f"{m.node.name} ({m.kind}) and {ref.node.name} ({ref.kind}) are different kinds of layer"
    if m.out_features != ref.out_features or m.in_features != ref.in_features:
        return f"{m.node.name} and {ref.node.name} have different channel counts"
    if m.kind == "linear":
        return None
    if (m.stride, m.groups) != (ref.stride, ref.groups):
        return f"stride/groups differ: {m.node.name} {m.stride}/{m.groups} vs {ref.node.name} {ref.stride}/{ref.groups}"
    if any((a - b) % 2 for a, b in zip(m.kernel, ref.kernel)):
        return f"kernel sizes {m.kernel} and {ref.kernel} differ by an odd amount (no common centre)"
    if m.anchor() != ref.anchor():
        return (f"paddings do not align the kernels' centres ({m.node.name}: kernel {m.kernel} padding "
                f"{m.padding}; {ref.node.name}: kernel {ref.kernel} padding {ref.padding})")
    if _dilation([m, ref]) is None:
        return f"dilations differ: {m.node.name} {m.dilation} vs {ref.node.name} {ref.dilation}"
    return None


def _identity_reason(ident: _Identity, ref: _Layer) -> str | None:
    """Why the identity (or input BatchNorm) term cannot be folded into a layer shaped like ``ref``."""
    if ref.in_features != ref.out_features:
        return f"identity branch needs in = out channels ({ref.in_features} != {ref.out_features})"
    if ref.kind == "conv" and any(k % 2 == 0 for k in ref.kernel):
        return f"identity branch needs odd kernels (a centre tap); {ref.node.name} has kernel {ref.kernel}"
    if ref.kind == "conv" and (any(s != 1 for s in ref.stride) or any(a != 0 for a in ref.anchor())):
        return "identity branch needs stride 1 and kernels centred on the output pixel"
    if ident.scale is not None and ref.kind == "linear" and len(ident.node.meta["val"].shape) != 2:
        return "BatchNorm on a linear's input is only merged for 2-D inputs (channels = features)"
    return None


def _compatible(members: list) -> tuple[list, list[str]]:
    """The branches that merge with the largest layer (greedily, pairwise) and why the others do not."""
    layers = sorted((m for m in members if isinstance(m, _Layer)), key=lambda m: -m.weight[0].numel())
    accepted, reasons = [], []
    for m in layers:
        why = next((w for a in accepted if (w := _pair_reason(m, a))), None)
        accepted.append(m) if why is None else reasons.append(why)
    for ident in (m for m in members if isinstance(m, _Identity)):
        why = _identity_reason(ident, accepted[0])
        accepted.append(ident) if why is None else reasons.append(why)
    return accepted, reasons


def _dilation(layers: list[_Layer]) -> tuple[int, ...] | None:
    """The common dilation per dim of the kernels larger than 1 there (a 1-tap dim has none); None on conflict."""
    merged = []
    for dim in range(len(layers[0].kernel)):
        found = {m.dilation[dim] for m in layers if m.kernel[dim] > 1}
        if len(found) > 1:
            return None
        merged.append(found.pop() if found else 1)
    return tuple(merged)


def _merge_sum(members: list, ref: _Layer) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """Merged float64 weight and bias of compatible branches (``ref`` one of them) and the conv geometry."""
    layers = [m for m in members if isinstance(m, _Layer)]
    kernel = tuple(max(k) for k in zip(*(m.kernel for m in layers))) if ref.kind == "conv" else ()
    weight = torch.zeros(ref.weight.shape[:2] + kernel, dtype=torch.float64)
    bias = torch.zeros(ref.out_features, dtype=torch.float64)
    for m in layers:
        index = [slice(None), slice(None)] + [slice((big - k) // 2, (big + k) // 2) for big, k in zip(kernel, m.kernel)]
        weight[tuple(index)] += m.sign * m.weight.double()
        if m.bias is not None:
            bias += m.sign * m.bias.double()
    channels = torch.arange(ref.out_features)
    per_group = ref.weight.shape[1]
    centre = tuple(k // 2 for k in kernel)
    for ident in (m for m in members if isinstance(m, _Identity)):
        scale = ident.scale if ident.scale is not None else torch.ones(ref.out_features, dtype=torch.float64)
        weight[(channels, channels % per_group, *centre)] += ident.sign * scale
        if ident.shift is not None:
            bias += ident.sign * ident.shift
    if ref.kind == "linear":
        return weight, bias, ()
    dilation = _dilation(layers)
    padding = tuple(round(a + d * (k - 1) / 2) for a, d, k in zip(ref.anchor(), dilation, kernel))
    return weight, bias, (ref.stride, padding, dilation, ref.groups)


def _chain_cost(inner: _Layer, outer: _Layer) -> tuple[int, int]:
    """Multiply-adds per output position before and after merging (also the weight counts)."""
    taps = inner.weight[0].numel()  # in/groups * prod(kernel) of the inner layer
    before = inner.out_features * taps + outer.weight.numel()
    return before, outer.out_features * taps


def _chain_reason(inner: _Layer, outer: _Layer, allow_growth: bool) -> str | None:
    if inner.kind != outer.kind:
        return f"{inner.kind} followed by {outer.kind} is not merged"
    if inner.kind == "conv":
        if any(k != 1 for k in outer.kernel) or any(s != 1 for s in outer.stride) or any(outer.padding):
            return (f"{outer.node.name} is not a 1x1 conv with stride 1 and no padding (kernel {outer.kernel}, "
                    f"stride {outer.stride}, padding {outer.padding})")
        if inner.groups != outer.groups:
            return f"groups differ ({inner.groups} then {outer.groups})"
    before, after = _chain_cost(inner, outer)
    if after > before and not allow_growth:
        return (f"merging would grow the layer from {before} to {after} multiply-adds/weights per position "
                f"(a low-rank factorization); set allow_growth=true to merge anyway")
    return None


def _compose(inner: _Layer, outer: _Layer) -> tuple[torch.Tensor, torch.Tensor | None]:
    """W = W2 W1 (per group, on every tap of W1), b = W2 b1 + b2."""
    g = inner.groups
    w2 = outer.weight.double().reshape(g, outer.out_features // g, -1)  # (g, o2/g, o1/g)
    w1 = inner.weight.double().reshape(g, inner.out_features // g, -1)  # (g, o1/g, taps)
    weight = torch.bmm(w2, w1).reshape((outer.out_features,) + inner.weight.shape[1:])
    if inner.bias is None and outer.bias is None:
        return weight, None
    bias = outer.bias.double() if outer.bias is not None else torch.zeros(outer.out_features, dtype=torch.float64)
    if inner.bias is not None:
        bias = bias + torch.bmm(w2, inner.bias.double().reshape(g, -1, 1)).flatten()
    return weight, bias


def _emit(gm: torch.fx.GraphModule, like: _Layer, x: torch.fx.Node, weight: torch.Tensor, bias: torch.Tensor | None,
          geometry: tuple, before: torch.fx.Node, pass_name: str) -> torch.fx.Node:
    """A new conv/linear node on ``x`` before ``before``, storing its tensors in ``like``'s attributes.

    ``geometry`` is ``(stride, padding, dilation, groups)`` for a conv (ignored for a linear).
    """
    dtype = attr_tensor(gm, like.weight_node).dtype
    w_node = replace_tensor(gm, like.weight_node, weight.to(dtype), user=like.node, name="weight")
    b_node = None
    if bias is not None and like.bias_node is not None:
        b_node = replace_tensor(gm, like.bias_node, bias.to(dtype), user=like.node, name="bias")
    elif bias is not None:
        owner = owner_of(like.weight_node.target)
        b_node = add_tensor(gm, owner, "bias", bias.to(dtype), parameter=True, before=before)
        mark(b_node, pass_name)
    with gm.graph.inserting_before(before):
        if like.kind == "linear":
            node = gm.graph.call_function(aten.linear.default, (x, w_node, b_node))
        else:
            stride, padding, dilation, groups = geometry
            op = {1: aten.conv1d, 2: aten.conv2d, 3: aten.conv3d}[len(padding)].default
            node = gm.graph.call_function(op, (x, w_node, b_node, list(stride), list(padding), list(dilation), groups))
    node.meta.update({k: v for k, v in like.node.meta.items() if k in ("nn_module_stack", "stack_trace")})
    node.meta["val"] = before.meta.get("val")  # same shape as the node it replaces; refreshed by the manager
    return mark(node, pass_name)


@dataclass(frozen=True, kw_only=True)
class MergeBranches(Pass):
    """Merge summed parallel conv/linear/identity branches and linear chains into one layer (exact).

    Args:
        allow_growth: also collapse chains whose merged layer has more FLOPs/weights than the two
            layers (e.g. a low-rank factorization); off by default.
    """

    name: ClassVar[str] = "merge-branches"
    family: ClassVar[Family] = Family.REPARAM
    numerics: ClassVar[Numerics] = Close(atol=0.0, rtol=1e-5)
    allow_growth: bool = False

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult()
        counts: Counter = Counter()
        skipped: dict[torch.fx.Node, str] = {}
        progress = True
        while progress:  # one merge can expose another (a merged sum may start a chain)
            progress = False
            for node in list(gm.graph.nodes):
                if node._erased or not node.users:
                    continue  # erased, or dead: a branch merged away earlier in this sweep
                if _is_add(node) and not _absorbed(node):
                    outcome = self._merge_sum(gm, node)
                else:
                    outcome = self._merge_chain(gm, node)
                if outcome is None:
                    continue
                kind, reason = outcome
                if reason is None:
                    counts[kind] += 1
                    progress = True
                    skipped.pop(node, None)
                else:
                    skipped[node] = reason
            if progress:
                eliminate_dead_code(gm)
        for node, reason in skipped.items():
            if not node._erased:  # a site merged away later (as a branch of another sum) needs no reason
                result.skip(_site(node), reason)
        result.hit(sum(counts.values()))
        result.notes.update({k: counts[k] for k in ("conv_sums", "linear_sums", "conv_chains", "linear_chains")})
        return result

    def _merge_sum(self, gm: torch.fx.GraphModule, root: torch.fx.Node) -> tuple[str, str | None] | None:
        """Merge one group of same-input branches of the sum at ``root``; None if it has no layer term."""
        terms, adds, signs = _sum_terms(root)
        classified = _group_terms(gm, root, terms, adds, signs)
        if classified is None:
            return None
        by_input, blocked, reasons = classified
        for x, members in by_input.items():
            if x in blocked:  # another term reads the blocked layer's input: say why it stays apart
                reasons.append(blocked[x])
            if len(members) < 2 or not any(isinstance(m, _Layer) for m in members):
                continue
            members, why = _compatible(members)
            reasons += why
            if len(members) < 2:
                continue
            ref = members[0]
            weight, bias, geometry = _merge_sum(members, ref)
            acc = _emit(gm, ref, x, weight, bias, geometry, root, self.name)
            merged_terms = {m.term if isinstance(m, _Layer) else m.node for m in members}
            for term, sign in zip(terms, signs):  # the terms that stay
                if term in merged_terms:
                    continue
                with gm.graph.inserting_before(root):
                    op = aten.add.Tensor if sign > 0 else aten.sub.Tensor
                    acc = mark(gm.graph.call_function(op, (acc, term)), self.name)
                acc.meta["val"] = root.meta.get("val")
            root.replace_all_uses_with(acc)
            # erased here, users first: DCE keeps an in-place add_ and an eval dropout (both "impure")
            doomed = adds + [n for t in merged_terms for n in _see_through(t)[1]]
            erase_if_unused(gm, doomed[::-1])
            return ("conv_sums" if ref.kind == "conv" else "linear_sums"), None  # the next sweep sees the rest
        if not reasons:
            described = _describe_terms(gm, terms, adds)
            reasons.append(f"no two branches read the same input ({described}): nothing to merge")
        return "sum", "; ".join(dict.fromkeys(reasons))

    def _merge_chain(self, gm: torch.fx.GraphModule, node: torch.fx.Node) -> tuple[str, str | None] | None:
        """Collapse ``outer(inner(x))`` at ``node``; None if ``node`` is not a layer reading a layer."""
        outer = _as_layer(gm, node)
        if not isinstance(outer, _Layer):
            return None
        inner = _as_layer(gm, outer.x)
        if inner is None:
            return None
        if isinstance(inner, str):
            return "chain", f"{outer.x.name} -> {node.name}: {inner}"
        shared = [n for n in [*outer.via, inner.node] if len(n.users) != 1]
        why = (f"{shared[0].name}'s output is also used elsewhere ({len(shared[0].users)} users)" if shared
               else _chain_reason(inner, outer, self.allow_growth))
        if why is not None:
            return "chain", f"{inner.node.name} -> {node.name}: {why}"
        weight, bias = _compose(inner, outer)
        # the merged conv samples its input like the inner one (the outer is 1x1, stride 1, unpadded)
        geometry = (inner.stride, inner.padding, inner.dilation, inner.groups)
        node.replace_all_uses_with(_emit(gm, outer, inner.x, weight, bias, geometry, node, self.name))
        erase_if_unused(gm, [*outer.via[::-1], node])  # graph order; the no-ops between (DCE keeps dropout)
        return f"{outer.kind}_chains", None
