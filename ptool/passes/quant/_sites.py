"""Where a quantization transform goes: the input sites of Linears and what can absorb ``x -> x P``.

For any invertible ``P``, ``y = x W^T = (x P)(W P^-T)^T`` (METHODS 4.1). A **site** is one value
that a group of Linears (``aten.linear``, GPT-2's ``addmm``) reads as input: q/k/v reading one
norm output, fc1/gate/up, o_proj, down/fc2. The weight side is folded into each reader; the
``x P`` side goes into the site's **producer** when one can absorb it exactly:

- :class:`NormScale` - a stored per-channel multiplier whose output feeds only the site: a
  LayerNorm/RMSNorm affine (gamma, and beta), or the ``gamma * x`` a decomposed RMSNorm ends
  with. Diagonal ``P`` only.
- :class:`LinearOutput` - output channels ``[start, stop)`` of a Linear (through views, and
  through GPT-2's fused-qkv split). Any ``P``.
- :class:`HeadOutput` - the value projection, through the attention (v -> o_proj):
  ``P = blockdiag(M, ..., M)`` with one ``head_dim x head_dim`` block for every head. The
  attention weights mix tokens, never head channels, so ``(A v) M = A (v M)``; grouped-query
  head repeats and any reordering of heads commute with a block that is the same for all heads.
- :class:`ProductOutput` - a Linear output that is one factor of an elementwise product of two
  same-shape values (SwiGLU's ``silu(gate) * up``). Diagonal ``P`` only: scaling one factor
  scales the product.

A site no producer can absorb (a post-LN norm output that is also the residual stream; GELU ->
fc2; a rotation after a norm) is **online**: ``P`` stays in the graph as one op on the site value
(:func:`insert_online`). Every walk requires each value it passes to have no other user, so a
fold never changes anything but the site.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ptool.ir.graph import add_tensor, attr_tensor, attr_users, is_op, mark, module_path, op_name, owner_of
from ptool.ir.record import record_values
from ptool.passes.fold_affine._layers import (
    _INDEXING,
    Layer,
    _shape,
    as_layer,
    channel_range,
    in_features,
    out_features,
    through_last_dim,
    why_not_editable,
)

aten = torch.ops.aten

#: ``node.meta`` key listing the quantization transforms already applied to a Linear's input
#: (what makes a second run of a pass change nothing).
DONE_KEY = "ptool.quant_transform"

_SPLITS = (aten.view, aten.reshape, aten._unsafe_view)


@dataclass
class NormScale:
    """A stored per-channel multiplier (``weight``, and a shift ``bias``) on the site's path."""

    node: fx.Node
    weight: fx.Node
    bias: fx.Node | None
    what: str


@dataclass
class LinearOutput:
    """Output channels ``[start, stop)`` of ``layer`` are the site value (up to views)."""

    layer: Layer
    start: int
    stop: int


@dataclass
class HeadOutput:
    """The site value is attention over the heads of ``layer``'s channels ``[start, stop)``."""

    layer: Layer
    start: int
    stop: int
    head_dim: int


@dataclass
class ProductOutput:
    """The site value is ``layer(...) * other``, elementwise, same shapes."""

    layer: Layer


Producer = NormScale | LinearOutput | HeadOutput | ProductOutput


@dataclass
class Site:
    """A value read as input by ``layers``; ``entries[i]`` is the node of layer i's path that reads it."""

    key: fx.Node
    layers: list[Layer] = field(default_factory=list)
    entries: list[fx.Node] = field(default_factory=list)
    producer: Producer | None = None
    why_online: str = ""

    @property
    def label(self) -> str:
        names = "+".join(module_path(layer.node).rpartition(".")[2] or layer.node.name for layer in self.layers)
        return f"{module_path(self.layers[0].node).rpartition('.')[0] or '<root>'}:{names}"

    def width(self, gm: fx.GraphModule) -> int:
        return in_features(gm, self.layers[0])

    def done_by(self, pass_name: str) -> bool:
        """True if a run of ``pass_name`` already transformed this site's input."""
        return all(pass_name in layer.node.meta.get(DONE_KEY, ()) for layer in self.layers)

    def mark_done(self, pass_name: str) -> None:
        for layer in self.layers:
            layer.node.meta[DONE_KEY] = (*layer.node.meta.get(DONE_KEY, ()), pass_name)


def users(node: fx.Node) -> list[fx.Node]:
    """``node``'s users, without the export's ``_assert_tensor_metadata`` checks (which hold after any
    transform here: shapes and dtypes do not change)."""
    return [u for u in node.users if not is_op(u, aten._assert_tensor_metadata)]


def _key_of(layer: Layer) -> tuple[fx.Node, fx.Node]:
    """``(key, entry)``: walk up from the layer's input through views that only feed this layer."""
    entry, key = layer.node, layer.x
    while len(users(key)) == 1 and key.target not in _INDEXING and (prev := through_last_dim(key)) is not None:
        entry, key = key, prev
    return key, entry


def find_sites(gm: fx.GraphModule, select: Callable[[Layer], bool] = lambda layer: True,
               ) -> tuple[list[Site], list[tuple[str, str]]]:
    """The graph's Linear input sites (in graph order) and the Linears left out, with reasons.

    A Linear is left out when its weight is computed or tied to another op (GPT-2's lm_head is
    the token embedding), or its input's width is unknown.
    """
    sites: dict[fx.Node, Site] = {}
    skipped: list[tuple[str, str]] = []
    for node in gm.graph.nodes:
        layer = as_layer(node)
        if layer is None or layer.kind not in ("linear", "addmm") or not select(layer):
            continue
        why = why_not_editable(gm, layer, untie=False)
        if why is None and sum(a is layer.x for a in node.args) != 1:
            why = f"{node.name} reads its input more than once"
        if why is None and (_shape(layer.x) is None or _shape(layer.x)[-1] != in_features(gm, layer)):
            why = f"{node.name}'s input has no static shape matching its weight"
        if why:
            skipped.append((f"{node.name} ({module_path(node)})", why))
            continue
        key, entry = _key_of(layer)
        site = sites.setdefault(key, Site(key))
        site.layers.append(layer)
        site.entries.append(entry)
    out = list(sites.values())
    for site in out:
        site.producer, site.why_online = producer_of(gm, site)
    return out, skipped


# ------------------------------------------------------------------------------------ producers
def _users_text(node: fx.Node, but: Sequence[fx.Node] = ()) -> str:
    return ", ".join(f"{u.name} ({op_name(u)})" for u in users(node) if u not in but)


def _up_single(n: fx.Node) -> tuple[fx.Node, str | None]:
    """Walk up through channel-preserving views whose input feeds only them; the top and a reason to stop."""
    while (prev := through_last_dim(n)) is not None:
        if len(users(prev)) != 1:
            return prev, f"{prev.name} also feeds {_users_text(prev, [n])}"
        n = prev
    return n, None


def _linear_output(gm: fx.GraphModule, top: fx.Node) -> LinearOutput | str | None:
    """``top`` as (a channel range of) a Linear's output; a reason; None if it is neither."""
    layer = as_layer(top)
    if layer is not None:
        if layer.kind not in ("linear", "addmm"):
            return f"{top.name} is a {layer.kind}, not a linear"
        return why_not_editable(gm, layer, untie=False) or LinearOutput(layer, 0, out_features(gm, layer))
    selected = channel_range(top)
    if selected is None:
        return None
    source, start, stop = selected
    src_top, why = _up_single(source)
    layer = as_layer(src_top)
    if why or layer is None or layer.kind not in ("linear", "addmm"):
        return why or f"{source.name} is not a linear's output"
    for user in users(source):  # the other column ranges of a fused projection must not overlap
        selectors = users(user) if is_op(user, aten.split, aten.split_with_sizes) else [user]
        for sel in selectors:
            r = channel_range(sel) if sel is not top else None
            if sel is not top and (r is None or (r[1] < stop and start < r[2])):
                return f"{source.name} also feeds {sel.name} with the same columns"
    return why_not_editable(gm, layer, untie=False) or LinearOutput(layer, start, stop)


def _head_output(gm: fx.GraphModule, top: fx.Node) -> HeadOutput | str | None:
    """``top`` as the head merge ``(.., H, dh) -> (.., H*dh)`` of attention over a value projection."""
    if not is_op(top, *_SPLITS) or not isinstance(top.args[0], fx.Node):
        return None
    out, inp = _shape(top), _shape(top.args[0])
    if not out or not inp or len(inp) != len(out) + 1 or inp[-2] * inp[-1] != out[-1]:
        return None
    dh, n, attended = inp[-1], top.args[0], False
    while True:
        if len(users(n)) != 1:
            return f"{n.name} (on the value path) also feeds {_users_text(n)}"
        if is_op(n, aten.scaled_dot_product_attention) and not attended:
            v = n.args[2]
            if any(a is v for a in n.args[:2]):
                return f"{n.name} uses the value as its query or key"
            n, attended = v, True
        elif is_op(n, aten.matmul, aten.bmm) and not attended:
            n, attended = n.args[1], True  # (A @ v) M = A @ (v M)
        elif (prev := through_last_dim(n)) is not None:
            n = prev
        elif attended and is_op(n, *_SPLITS) and _shape(n)[-1] == dh and _shape(n.args[0])[-1] == _shape(n)[-2] * dh:
            top_v, why = _up_single(n.args[0])
            if why:
                return why
            found = _linear_output(gm, top_v)
            if not isinstance(found, LinearOutput):
                return found or f"the value heads come from {top_v.name} ({op_name(top_v)}), not a linear"
            return HeadOutput(found.layer, found.start, found.stop, dh)
        else:
            return (f"the head merge {top.name} reads {n.name} ({op_name(n)}), not attention over a value "
                    "projection" if not attended else f"the value path passes {n.name} ({op_name(n)})")
        if not isinstance(n, fx.Node) or _shape(n) is None or _shape(n)[-1] != dh:
            return f"the value path changes the head size at {getattr(n, 'name', n)}"


def _norm_scale(gm: fx.GraphModule, top: fx.Node, width: int) -> NormScale | str | None:
    """``top`` as a stored per-channel multiplier of width ``width`` (norm affine, ``gamma * x``)."""
    if is_op(top, aten.layer_norm, aten.rms_norm):
        what = "LayerNorm" if is_op(top, aten.layer_norm) else "RMSNorm"
        params = list(top.args[2:4] if what == "LayerNorm" else top.args[2:3]) + [None]
        weight, bias = params[0], params[1] if what == "LayerNorm" else None
        if len(top.args[1]) != 1:
            return f"{what} {top.name} normalizes over several dims"
        if attr_tensor(gm, weight) is None:
            return f"{what} {top.name} has no stored weight (elementwise_affine=False)"
        if bias is not None and attr_tensor(gm, bias) is None:
            return f"{what} {top.name}'s bias is computed"
    elif is_op(top, aten.mul) and len(top.args) == 2:
        stored = [a for a in top.args if attr_tensor(gm, a) is not None]
        if len(stored) != 1 or attr_tensor(gm, stored[0]).shape != (width,):
            return None
        weight, bias, what = stored[0], None, "per-channel multiplier"
    else:
        return None
    for p in filter(None, (weight, bias)):
        if not attr_tensor(gm, p).is_floating_point() or attr_users(gm, p.target) != [top]:
            return f"{top.name}'s {p.target} is not a float tensor used only there"
    return NormScale(top, weight, bias, what)


def _product_output(gm: fx.GraphModule, top: fx.Node) -> ProductOutput | None:
    """``top = a * b`` (same shapes, both computed) with ``a`` or ``b`` a Linear's whole output."""
    if not is_op(top, aten.mul) or len(top.args) != 2 or not all(isinstance(a, fx.Node) for a in top.args):
        return None
    if top.args[0] is top.args[1] or any(_shape(a) != _shape(top) for a in top.args):
        return None
    for factor in top.args:
        if len(users(factor)) != 1:
            continue
        src, why = _up_single(factor)
        found = _linear_output(gm, src) if why is None else None
        if isinstance(found, LinearOutput) and (found.start, found.stop) == (0, out_features(gm, found.layer)):
            return ProductOutput(found.layer)
    return None


def producer_of(gm: fx.GraphModule, site: Site) -> tuple[Producer | None, str]:
    """What can absorb ``x -> x P`` for ``site`` (None: nothing) and, if nothing, why."""
    key = site.key
    others = [u for u in users(key) if u not in site.entries]
    if others:
        residual = any(is_op(u, aten.add) for u in others)
        return None, (f"{key.name} also feeds {_users_text(key, site.entries)}"
                      + (": the residual stream (post-LN)" if residual else ""))
    top, why = _up_single(key)
    if why:
        return None, why
    for finder in (_linear_output, _head_output):
        found = finder(gm, top)
        if isinstance(found, (LinearOutput, HeadOutput)):
            return found, ""
        if isinstance(found, str):
            return None, found
    found = _norm_scale(gm, top, site.width(gm))
    if isinstance(found, NormScale):
        return found, ""
    if isinstance(found, str):
        return None, found
    found = _product_output(gm, top)
    if found is not None:
        return found, ""
    return None, f"the input comes from {top.name} ({op_name(top)}), which no weight can absorb"


# ------------------------------------------------------------------------------------ edits
def insert_online(gm: fx.GraphModule, site: Site, op: Callable, tensor: torch.Tensor, name: str,
                  pass_name: str) -> fx.Node:
    """Insert ``op(key, tensor)`` (``tensor`` a stored buffer) and make the site's layers read it."""
    key = site.key
    with gm.graph.inserting_after(key):
        node = gm.graph.call_function(op, (key, key))
    owner = owner_of(site.layers[0].weight.target)
    buf = add_tensor(gm, owner, name, tensor, parameter=False, before=node)
    node.args = (key, buf)
    val = key.meta.get("val")
    if isinstance(val, torch.Tensor):
        node.meta["val"] = val
    mark(node, pass_name)
    for entry in site.entries:
        entry.replace_input_with(key, node)
    site.key = node
    return node


def scale_producer(gm: fx.GraphModule, producer: Producer, inverse: torch.Tensor, pass_name: str) -> None:
    """Make the producer emit ``x * inverse`` (``inverse``: the site-wide float64 vector ``1/s``)."""
    from ptool.ir.graph import replace_tensor
    from ptool.passes.fold_affine._layers import fold_outputs

    if isinstance(producer, NormScale):
        for p, pname in ((producer.weight, "weight"), (producer.bias, "bias")):
            if p is not None:
                t = attr_tensor(gm, p)
                replace_tensor(gm, p, (t.double() * inverse).to(t.dtype), user=producer.node, name=pname)
        mark(producer.node, pass_name)
        return
    layer = producer.layer
    vec = torch.ones(out_features(gm, layer), dtype=torch.float64)
    if isinstance(producer, HeadOutput):
        dh = producer.head_dim
        vec[producer.start:producer.stop] = inverse[:dh].repeat((producer.stop - producer.start) // dh)
    elif isinstance(producer, LinearOutput):
        vec[producer.start:producer.stop] = inverse
    else:
        vec = inverse
    fold_outputs(gm, layer, vec, None, pass_name)


def rotate_producer(gm: fx.GraphModule, producer: LinearOutput | HeadOutput, m: torch.Tensor, pass_name: str) -> None:
    """Make the producer emit ``x @ m`` (for a head output, ``m`` is the per-head block)."""
    from ptool.passes.fold_affine._layers import fold_outputs_matrix

    block = m
    if isinstance(producer, HeadOutput):
        block = torch.block_diag(*[m] * ((producer.stop - producer.start) // producer.head_dim))
    fold_outputs_matrix(gm, producer.layer, block, pass_name, start=producer.start)


# ------------------------------------------------------------------------------------ data
def record_inputs(gm: fx.GraphModule, nodes: Sequence[fx.Node], calls: Sequence[tuple[tuple, dict]],
                  max_tokens: int = 16384) -> dict[fx.Node, torch.Tensor]:
    """Every node's values over the calls as ``(tokens, channels)`` float32 (at most ``max_tokens`` rows)."""
    runs = record_values(gm, list(nodes), calls)
    out = {}
    for node in dict.fromkeys(nodes):
        rows = torch.cat([r[node].detach().float().reshape(-1, r[node].shape[-1]) for r in runs])
        out[node] = rows[:: max(1, rows.shape[0] // max_tokens)][:max_tokens]
    return out


def calls_of(ctx) -> list[tuple[tuple, dict]]:
    """The calibration calls, or the example call when there is no calibration data."""
    return ctx.calls() or [(tuple(ctx.example_inputs), dict(ctx.example_kwargs))]


def module_filter(patterns: Sequence[str]) -> Callable[[Layer], bool]:
    """Select Linears whose module path contains one of ``patterns`` (all if empty)."""
    if not patterns:
        return lambda layer: True
    return lambda layer: any(p in module_path(layer.node) for p in patterns)


def exclude_pattern(node: fx.Node, patterns: tuple[str, ...]) -> str | None:
    """The first ``fnmatch`` pattern matching ``node``'s module path or node name (``exclude=`` options)."""
    import fnmatch

    path = module_path(node)
    return next((p for p in patterns if fnmatch.fnmatch(path, p) or fnmatch.fnmatch(node.name, p)), None)
