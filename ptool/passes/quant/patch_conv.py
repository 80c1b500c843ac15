"""Non-overlapping convolutions as Linears over patches, so ``quantize`` runs them on the int8 matmul.

A ``conv2d`` whose kernel equals its stride (no padding, dilation 1, one group) reads every input
pixel once: it is a Linear applied to each ``C x k x k`` patch. A vision transformer's patch
embedding is one (ViT-B/16: 3 x 16 x 16 -> 768 on 196 patches, 116 M multiply-adds); ``quantize``
matches Linears only, so it ran in float32 beside an int8 encoder. Rewritten, exactly::

    patches = x.reshape(B, C, H/k, k, W/k, k).permute(0, 2, 4, 1, 3, 5).reshape(B, H/k * W/k, C k k)
    y       = linear(patches, W.reshape(O, C k k), b)                      # (B, patches, O)
    out     = y.view(B, H/k, W/k, O).permute(0, 3, 1, 2)                    # the conv's (B, O, H/k, W/k)

The new Linear keeps the convolution's module path, so ``exclude=`` patterns and the report name it
as before. Convolutions with another geometry, a computed weight or shapes not known as integers
stay as they are.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx as fx

from ptool.ir.graph import add_tensor, attr_tensor, is_op, mark, module_path, owner_of, refresh_meta
from ptool.ir.noise import named_args

aten = torch.ops.aten


def _patch_geometry(gm: fx.GraphModule, named: dict) -> tuple[torch.Tensor, int, tuple[int, ...]] | None:
    """``(weight, k, input shape)`` of a kernel == stride conv2d (arguments ``named``) this rewrite
    takes, else None."""
    weight = attr_tensor(gm, named["weight"])
    val = named["input"].meta.get("val") if isinstance(named["input"], fx.Node) else None
    if weight is None or weight.dim() != 4 or not isinstance(val, torch.Tensor) or val.dim() != 4:
        return None
    shape = tuple(val.shape)
    k = weight.shape[-1]
    square = weight.shape[-2] == k and list(named["stride"]) in ([k, k], [k])
    plain = all(p == 0 for p in named["padding"]) and all(d == 1 for d in named["dilation"]) and named["groups"] == 1
    if not (square and plain and all(isinstance(s, int) for s in shape)) or shape[2] % k or shape[3] % k:
        return None
    return weight, k, shape


def linearize_patch_convolutions(gm: fx.GraphModule, pass_name: str,
                                 keep: Callable[[fx.Node], bool] = lambda node: False) -> list[str]:
    """Rewrite every non-overlapping ``conv2d`` of ``gm`` (module docstring) that ``keep`` does not
    hold back into patchify -> ``linear`` -> unpatchify; the module paths rewritten, in graph order."""
    done = []
    for node in list(gm.graph.nodes):
        if not is_op(node, aten.conv2d) or keep(node):
            continue
        named = named_args(node)
        geometry = _patch_geometry(gm, named)
        if geometry is None:
            continue
        weight, k, (batch, channels, height, width) = geometry
        rows, cols, out = height // k, width // k, weight.shape[0]
        flat = add_tensor(gm, owner_of(named["weight"].target), "patch_weight",
                          weight.detach().reshape(out, channels * k * k), parameter=False, before=node)
        added: list[fx.Node] = []

        def call(op, *args):
            added.append(gm.graph.call_function(op, args))
            return added[-1]

        with gm.graph.inserting_before(node):
            grid = call(aten.reshape.default, named["input"], [batch, channels, rows, k, cols, k])
            patches = call(aten.reshape.default, call(aten.permute.default, grid, [0, 2, 4, 1, 3, 5]),
                           [batch, rows * cols, channels * k * k])
            linear = call(aten.linear.default, patches, flat, named["bias"])
            call(aten.permute.default, call(aten.view.default, linear, [batch, rows, cols, out]), [0, 3, 1, 2])
        for new in added:
            new.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
            mark(new, pass_name)
        node.replace_all_uses_with(added[-1])
        gm.graph.erase_node(node)
        done.append(module_path(linear))
    if done:
        gm.recompile()
        refresh_meta(gm)
    return done
