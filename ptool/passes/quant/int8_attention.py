"""``quantize:attention=int8``: softmax attention's two activation products on int8 kernels.

Every ``scaled_dot_product_attention`` node becomes :func:`ptool.ops.quant.attention_int8`:
queries and keys quantized per row (token) to int8 over their own ``max|x|``, values per channel,
the scores ``q k^T`` an int8 x int8 -> int32 product, and the probabilities an int8 product with
``v`` as well: softmax's numerator ``exp(s - max s)`` lies in (0, 1] with the row's largest weight
exactly 1, so it is stored as ``round(127 exp(s - max s))`` and the row sum of those levels divides
the result (no second pass for the normalisation, no range to calibrate). Long sequences gain the
most: at 512 tokens the two products are a quarter of BERT-base's arithmetic, and in float32 they
ran at float speed while every Linear ran at int8 speed.

Approximate (like every quantization), independent of how the Linears are quantized. Sites left
alone, with the reason in the report: attention with dropout, grouped-query attention (key/value
heads differ from the query's), operands that are not 4-D ``(batch, heads, tokens, dim)``.
Written-out attention (``matmul -> softmax -> matmul``) is not matched.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
import torch.fx as fx

from ptool.ir.graph import is_op, module_path
from ptool.passes.base import PassResult

aten = torch.ops.aten

_POSITIONAL = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")


def attention_arguments(node: fx.Node) -> dict:
    """SDPA's arguments by name, positional or keyword."""
    named = dict(zip(_POSITIONAL, node.args))
    named.update(node.kwargs)
    return named


def _shape(node: object) -> tuple[int, ...] | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def unsupported_attention(named: dict) -> str | None:
    if named.get("dropout_p", 0.0):
        return "kept float: attention with dropout"
    shapes = [_shape(named[k]) for k in ("query", "key", "value")]
    if any(s is None or len(s) != 4 for s in shapes):
        return "kept float: q/k/v are not 4-D (batch, heads, tokens, dim) with known shapes"
    q, k, v = shapes
    if named.get("enable_gqa", False) or not q[1] == k[1] == v[1]:
        return "kept float: grouped-query attention (key/value heads differ from the query's)"
    mask = named.get("attn_mask")
    if isinstance(mask, fx.Node) and not isinstance(mask.meta.get("val"), torch.Tensor):
        return "kept float: the mask's dtype is unknown (boolean and additive masks are applied differently)"
    return None


def attention_sites(gm: fx.GraphModule, result: PassResult,
                    refuse: Callable[[dict], str | None] = lambda named: None) -> Iterator[tuple[fx.Node, dict, float]]:
    """The SDPA nodes of ``gm`` an attention rewrite takes, with their arguments by name and their
    scale; the others (those :func:`unsupported_attention` or ``refuse`` names a reason for) are
    reported skipped in ``result``."""
    for node in list(gm.graph.nodes):
        if not is_op(node, aten.scaled_dot_product_attention):
            continue
        named = attention_arguments(node)
        reason = unsupported_attention(named) or refuse(named)
        if reason:
            result.skip(f"attention ({module_path(node)})", reason)
            continue
        scale = named.get("scale")
        yield node, named, float(1 / math.sqrt(_shape(named["query"])[-1]) if scale is None else scale)


def additive_mask(graph: fx.Graph, mask: fx.Node, biases: dict[fx.Node, fx.Node]) -> fx.Node:
    """``mask`` as one float32 term added to the scores (``-inf`` where a boolean mask hides a key),
    made once, right after the mask, for every attention reading it (``biases`` keeps them): an
    encoder's layers share one padding mask, and Inductor would otherwise fuse the mask's gathers and
    logic into every layer's softmax (BERT-base seq 128, bf16 attention: 0.20 ms a layer instead of
    0.08)."""
    if mask not in biases:
        with graph.inserting_after(mask):
            as_float = graph.call_function(aten.to.dtype, (mask, torch.float32))
        biases[mask] = as_float
        if mask.meta["val"].dtype == torch.bool:
            # log(1) = 0 and log(0) = -inf exactly; a log is also what makes Inductor store the
            # term once instead of recomputing it in each reader (it does so for "heavy" ops)
            with graph.inserting_after(as_float):
                biases[mask] = graph.call_function(aten.log.default, (as_float,))
    return biases[mask]


def quantize_attention(gm: fx.GraphModule, result: PassResult, pass_name: str) -> None:
    """Replace every supported SDPA node of ``gm`` by the int8 attention op (counted in ``result``)."""
    biases: dict[fx.Node, fx.Node] = {}
    for node, named, scale in attention_sites(gm, result):
        mask = named.get("attn_mask")
        if isinstance(mask, fx.Node):
            mask = additive_mask(gm.graph, mask, biases)
        args = (named["query"], named["key"], named["value"], mask, scale, bool(named.get("is_causal", False)))
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(torch.ops.ptool_quant.attention_int8.default, args)
        new.meta = {**node.meta, "ptool.from_pass": pass_name}
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        result.hit(1)
        result.notes.setdefault("int8_attention", []).append(module_path(new))
    for bias in biases.values():
        bias.meta["ptool.from_pass"] = pass_name
