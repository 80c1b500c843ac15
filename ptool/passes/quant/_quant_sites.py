"""The layers ``quantize`` rewrites (linears and embedding tables) and the graph edits every mode shares.

A :class:`LayerSite` is one such layer; :func:`find_sites` lists them. A quantized op is described
as ``(target, args)`` whose ``args`` hold :data:`X` (the site's activation or indices), :data:`BIAS`
(its bias) and :class:`Stored` tensors (buffers the op stores), resolved when the op is inserted.
Linears reading one input are fused into one wider site by :func:`merged_site` and split back by
:func:`replace_group`. Both the fixed modes (:mod:`.quantize`) and ``mode=auto`` (:mod:`.mixed`)
use these, so they live below both.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.fx as fx

from ptool.ir.graph import add_tensor, attr_tensor, is_op, module_path, owner_of

aten = torch.ops.aten

#: Placeholders in a quantized op's arguments: the site's activation (or indices) and its bias.
X, BIAS = object(), object()


@dataclass(frozen=True)
class Stored:
    """A tensor the quantized op stores (a buffer named ``name`` on the site's module)."""

    name: str
    value: torch.Tensor


@dataclass
class LayerSite:
    """One layer to quantize: a linear (weight normalized to ``(out, in)``) or an embedding table."""

    node: fx.Node
    kind: Literal["linear", "embedding"]
    x: fx.Node  # the activation (linear) or the indices (embedding)
    weight_node: fx.Node
    weight: torch.Tensor  # (out, in) for linears, (vocab, dim) for embeddings
    bias: fx.Node | None = None
    owner: str = ""  # module path the quantized tensors are stored on

    def __post_init__(self) -> None:
        self.owner = self.owner or owner_of(self.weight_node.target)

    @property
    def label(self) -> str:
        return f"{self.node.name} ({module_path(self.node)})"


def find_sites(gm: fx.GraphModule) -> list[LayerSite]:
    """Linears with a stored 2-D weight (``linear``, ``addmm`` with alpha = beta = 1) and embedding tables."""
    sites = []
    for node in gm.graph.nodes:
        if is_op(node, aten.linear):
            w = attr_tensor(gm, node.args[1])
            bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            if w is not None and w.dim() == 2 and w.is_floating_point():
                sites.append(LayerSite(node, "linear", node.args[0], node.args[1], w.detach(), bias))
        elif is_op(node, aten.addmm) and len(node.args) == 3 and not node.kwargs:
            w = attr_tensor(gm, node.args[2])
            if w is not None and w.dim() == 2 and w.is_floating_point():
                sites.append(LayerSite(node, "linear", node.args[1], node.args[2], w.detach().T, node.args[0]))
        elif is_op(node, aten.embedding):
            w = attr_tensor(gm, node.args[0])
            if w is not None and w.dim() == 2 and w.is_floating_point():
                sites.append(LayerSite(node, "embedding", node.args[1], node.args[0], w.detach()))
    return sites


def input_of(node: fx.Node) -> fx.Node:
    """The activation (linear, addmm) or indices (embedding) ``node`` reads now."""
    return node.args[1] if is_op(node, aten.addmm, aten.embedding) else node.args[0]


def bias_tensor(gm: fx.GraphModule, site: LayerSite) -> torch.Tensor | None | bool:
    """The stored bias of a linear site, None without one, False if it is computed (not fusable)."""
    if site.bias is None:
        return None
    value = attr_tensor(gm, site.bias)
    return False if value is None else value.detach()


def merged_site(gm: fx.GraphModule, group: list[LayerSite]) -> LayerSite:
    """One linear site computing the group's outputs side by side (weights and biases concatenated)."""
    weight = torch.cat([s.weight for s in group])
    biases = [bias_tensor(gm, s) for s in group]
    owners = [s.owner.split(".") for s in group]
    common = []
    for parts in zip(*owners):
        if len(set(parts)) > 1:
            break
        common.append(parts[0])
    first = min(group, key=lambda s: list(gm.graph.nodes).index(s.node))
    bias = None
    if any(b is not None for b in biases):
        value = torch.cat([b if b is not None else weight.new_zeros(s.weight.shape[0]) for b, s in zip(biases, group)])
        bias = add_tensor(gm, ".".join(common), "fused_bias", value, parameter=False, before=first.node)
    return LayerSite(first.node, "linear", first.x, first.weight_node, weight, bias, owner=".".join(common))


def replace_group(gm: fx.GraphModule, group: list[LayerSite], new: fx.Node) -> None:
    """Point the group's users at ``new`` (split back into each site's columns if fused); drop the old nodes."""
    if len(group) == 1:
        outputs = [new]
    else:
        sizes = [s.weight.shape[0] for s in group]
        with gm.graph.inserting_after(new):
            split = gm.graph.call_function(aten.split_with_sizes.default, (new, sizes, -1))
        outputs = []
        previous = split
        for i in range(len(group)):
            with gm.graph.inserting_after(previous):
                previous = gm.graph.call_function(operator.getitem, (split, i))
            outputs.append(previous)
    for site, out in zip(group, outputs):
        site.node.replace_all_uses_with(out)
        gm.graph.erase_node(site.node)
