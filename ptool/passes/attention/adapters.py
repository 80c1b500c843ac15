"""LoRA adapters on the projections around replaced attention sites (LoLCATs' stage 2).

LoLCATs fine-tunes a linearized model with low-rank adapters on the q/k/v/o projections rather
than every weight: ``W' = W + B A`` with ``A`` ``(r, in)`` random and ``B`` ``(out, r)`` zero, so
the model is unchanged until training moves ``B``; only ``r (in + out)`` numbers per projection
train, which keeps a small calibration set from dragging the rest of the model along.

Here an adapter is a ``call_module`` inserted between a projection's weight (a ``get_attr``) and
the ``aten.linear`` that uses it, so the graph computes ``linear(x, W + B A, b)``. After training,
:func:`merge_adapters` folds ``B A`` into ``W`` and removes the modules: the converted graph has
no extra op and no extra parameter.

Projections are found structurally from a site's nodes: walking from ``q``/``k``/``v`` up through
shape-only ops (view, reshape, transpose, permute, contiguous, clone, expand, unsqueeze) to an
``aten.linear`` whose weight is a ``get_attr`` (its input projection), and from the replaced
site's output down through such ops to the ``aten.linear`` that consumes it (its output
projection). A projection that does not have this shape (fused qkv behind a ``split``, a weight
computed in the graph) is not adapted, and :func:`attach_adapters` says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

aten = torch.ops.aten

_SHAPE_OPS = frozenset({
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int,
    aten.permute.default, aten.contiguous.default, aten.clone.default, aten.expand.default,
    aten.unsqueeze.default, aten.squeeze.dim, aten.alias.default,
})


class LowRankAdapter(nn.Module):
    """``W -> W + up @ down`` for one ``(out, in)`` weight; ``up`` starts at 0 (identity at init).

    Args:
        out_features, in_features: the weight's shape.
        rank: ``r``.
        seed: seeds ``down`` (``N(0, 1/in)``, LoRA's Kaiming-like start).
    """

    def __init__(self, out_features: int, in_features: int, rank: int, seed: int = 0) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"adapter rank must be >= 1, got {rank}")
        gen = torch.Generator().manual_seed(seed)
        self.down = nn.Parameter(torch.randn(rank, in_features, generator=gen) / math.sqrt(in_features))
        self.up = nn.Parameter(torch.zeros(out_features, rank))

    def delta(self) -> torch.Tensor:
        """``up @ down`` ``(out, in)``."""
        return self.up @ self.down

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta().to(weight.dtype)


@dataclass
class Attached:
    """One inserted adapter: its submodule name, the weight's ``get_attr`` node, the adapter node."""

    name: str
    weight: fx.Node
    node: fx.Node


def _is_linear_weight(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target is aten.linear.default and len(node.args) >= 2
            and isinstance(node.args[1], fx.Node) and node.args[1].op == "get_attr")


def input_projection(node: fx.Node) -> fx.Node | None:
    """The ``aten.linear`` that produces ``node`` through shape-only ops, or None."""
    while node.op == "call_function" and node.target in _SHAPE_OPS:
        node = node.args[0]
        if not isinstance(node, fx.Node):
            return None
    return node if _is_linear_weight(node) else None


def output_projection(node: fx.Node) -> fx.Node | None:
    """The ``aten.linear`` consuming ``node`` (as its input) through single-user shape-only ops, or None."""
    while True:
        users = list(node.users)
        if len(users) != 1:
            return None
        user = users[0]
        if _is_linear_weight(user) and user.args[0] is node:
            return user
        if not (user.op == "call_function" and user.target in _SHAPE_OPS and user.args[0] is node):
            return None
        node = user


def attach_adapters(gm: fx.GraphModule, linears: list[fx.Node], rank: int, seed: int = 0) -> list[Attached]:
    """Insert a :class:`LowRankAdapter` on the weight of each ``aten.linear`` node in ``linears``
    (each once); ``gm`` is recompiled. The model's outputs are unchanged until training."""
    attached = []
    for i, linear in enumerate(dict.fromkeys(linears)):
        weight = linear.args[1]
        out_features, in_features = gm.get_parameter(weight.target).shape
        name = f"ptool_lora_{i}"
        while hasattr(gm, name):
            name += "_"
        gm.add_submodule(name, LowRankAdapter(out_features, in_features, rank, seed=seed + i))
        with gm.graph.inserting_after(weight):
            node = gm.graph.call_module(name, (weight,))
        linear.replace_input_with(weight, node)  # this linear only; other users keep W
        attached.append(Attached(name, weight, node))
    gm.recompile()
    return attached


def merge_adapters(gm: fx.GraphModule, attached: list[Attached]) -> None:
    """Fold each adapter into its weight (``W += up @ down``) and remove it from the graph."""
    for a in attached:
        adapter = gm.get_submodule(a.name)
        weight = gm.get_parameter(a.weight.target)
        with torch.no_grad():
            weight.add_(adapter.delta().to(weight.dtype))
        a.node.replace_all_uses_with(a.weight)
        gm.graph.erase_node(a.node)
        gm.delete_submodule(a.name)
    gm.recompile()
