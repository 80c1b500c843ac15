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
from ptool.ir.noise import named_args
from ptool.passes.base import PassResult

aten = torch.ops.aten


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
        named = named_args(node)
        reason = unsupported_attention(named) or refuse(named)
        if reason:
            result.skip(f"attention ({module_path(node)})", reason)
            continue
        scale = named.get("scale")
        yield node, named, float(1 / math.sqrt(_shape(named["query"])[-1]) if scale is None else scale)


class MaskTerms:
    """Each attention mask of a graph as one float32 term added to the scores (``-inf`` where a
    boolean mask hides a key), made once, right after the mask, for every attention reading it: an
    encoder's layers share one padding mask, and Inductor would otherwise fuse the mask's gathers and
    logic into every layer's softmax (BERT-base seq 128, bf16 attention: 0.20 ms a layer instead of
    0.08). A boolean mask's term is ``log(float(mask))``: 0 and -inf exactly, and a log is what makes
    Inductor store the term once instead of recomputing it in each reader (it does so for "heavy" ops)."""

    def __init__(self, graph: fx.Graph, pass_name: str) -> None:
        self.graph, self.pass_name = graph, pass_name
        self._terms: dict[fx.Node, fx.Node] = {}

    def __call__(self, mask: fx.Node) -> fx.Node:
        if mask not in self._terms:
            with self.graph.inserting_after(mask):
                term = self.graph.call_function(aten.to.dtype, (mask, torch.float32))
            if mask.meta["val"].dtype == torch.bool:
                with self.graph.inserting_after(term):
                    term = self.graph.call_function(aten.log.default, (term,))
            term.meta["ptool.from_pass"] = self.pass_name
            self._terms[mask] = term
        return self._terms[mask]


def quantize_attention(gm: fx.GraphModule, result: PassResult, pass_name: str) -> None:
    """Replace every supported SDPA node of ``gm`` by the int8 attention op (counted in ``result``)."""
    mask_term = MaskTerms(gm.graph, pass_name)
    for node, named, scale in attention_sites(gm, result):
        mask = named.get("attn_mask")
        if isinstance(mask, fx.Node):
            mask = mask_term(mask)
        args = (named["query"], named["key"], named["value"], mask, scale, bool(named.get("is_causal", False)))
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(torch.ops.ptool_quant.attention_int8.default, args)
        new.meta = {**node.meta, "ptool.from_pass": pass_name}
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        result.hit(1)
        result.notes.setdefault("int8_attention", []).append(module_path(new))
