"""The Linears that read an activation as their input: where a per-channel rewrite can be absorbed.

Shared by ``log-quant`` (a GELU's consumers absorb its shift) and ``repquant`` (a LayerNorm's or
RMSNorm's consumers absorb the per-channel grid).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ptool.ir.analysis import is_assert
from ptool.ir.graph import attr_users, is_op, op_name
from ptool.passes.fold_affine._layers import Layer, as_layer, through_last_dim, why_not_editable

aten = torch.ops.aten


def linear_consumers(gm: fx.GraphModule, node: fx.Node) -> list[Layer] | str:
    """Every ``linear``/``addmm`` reading ``node`` as its input, or why one user is not such a Linear.

    Views, reshapes, token picks and eval-mode copies that keep the channel (last) axis are looked
    through. The consumers' weights must be stored, float and read by no other node (tied
    weights are not untied).
    """
    layers: list[Layer] = []

    def visit(value: fx.Node) -> str | None:
        for user in value.users:
            if is_assert(user):  # torch.export's shape/dtype check: holds after a per-channel rewrite
                continue
            layer = as_layer(user)
            if layer is not None and layer.x is value and layer.channels_last:
                why = why_not_editable(gm, layer, untie=True) or _tied(gm, layer)
                if why:
                    return why
                layers.append(layer)
            elif through_last_dim(user) is value:
                why = visit(user)
                if why:
                    return why
            else:
                residual = " (post-LN: the output is also the residual stream)" if is_op(user, aten.add) else ""
                return f"output feeds {user.name} ({op_name(user)}), not a Linear{residual}"
        return None

    why = visit(node)
    return why if why else (layers or "no Linear consumer")


def _tied(gm: fx.GraphModule, layer: Layer) -> str | None:
    for param in filter(None, (layer.weight, layer.bias)):
        others = [u.name for u in attr_users(gm, param.target) if u is not layer.node]
        if others:
            return f"{layer.node.name}'s {param.target} is tied (also read by {', '.join(others)})"
    return None
