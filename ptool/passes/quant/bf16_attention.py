"""``quantize:attention=bf16``: softmax attention's two activation products on bf16 operands.

Every supported ``scaled_dot_product_attention`` node is written out as its math form with the two
products in bf16 and the softmax's exponentials and sums in float32, normalised after the second
product (as flash attention does)::

    s = float32(bf16(q * scale) @ bf16(k)^T) (+ mask as float32: 0, or -inf where it hides a key)
    e = exp(s - max(s))
    out = float32(bf16(e) @ bf16(v)) / sum(e)          (in q's dtype)

The products run on the CPU's bf16 units (AVX-512-BF16, AMX) through oneDNN, accumulating in
float32; the scaled queries, the keys, the values and the exponentials are rounded to bf16 once
each (relative 2^-9).
Scaling the queries (197 x 64 a head on ViT-B/16) instead of the scores (197 x 197), and dividing
the output (197 x 64) instead of the probabilities, took ViT-B/16's attention from 0.82 to 0.68 ms
a layer, compiled. Why not SDPA itself in bf16: on short sequences its fused CPU kernel ran no
faster in bf16 than in float32 (ViT-B/16's 197 tokens: 1.19 vs 1.15 ms a layer). On long ones
``attention=int8`` is faster still (BERT-base seq 512: 4.4 ms a layer int8, 7.0 bf16, 6.6 float32
SDPA).

Approximate; independent of how the Linears are quantized. Sites left alone, with the reason in
the report: those :mod:`.int8_attention` leaves (dropout, grouped-query heads, operands that are not
4-D) and causal attention given as ``is_causal`` (an explicit mask is taken).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ptool.ir.graph import module_path
from ptool.passes.base import PassResult
from ptool.passes.quant.int8_attention import MaskTerms, attention_sites

aten = torch.ops.aten


def _value(node: object) -> torch.Tensor | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


def _written_out(graph: fx.Graph, named: dict, scale: float, mask_term: MaskTerms) -> list[fx.Node]:
    """The math form of one SDPA call (module docstring), inserted at the graph's insertion point:
    the nodes it added, the output last (not the shared mask term, :class:`.int8_attention.MaskTerms`)."""
    added: list[fx.Node] = []

    def call(op, *args):
        added.append(graph.call_function(op, args))
        return added[-1]

    q, k, v, mask = named["query"], named["key"], named["value"], named.get("attn_mask")
    out_dtype = _value(q).dtype
    q16 = call(aten.to.dtype, call(aten.mul.Tensor, q, scale), torch.bfloat16)
    k16, v16 = (call(aten.to.dtype, x, torch.bfloat16) for x in (k, v))
    scores = call(aten.to.dtype, call(aten.matmul.default, q16, call(aten.transpose.int, k16, -2, -1)), torch.float32)
    if mask is not None:
        scores = call(aten.add.Tensor, scores, mask_term(mask))
    exps = call(aten.exp.default, call(aten.sub.Tensor, scores, call(aten.amax.default, scores, [-1], True)))
    unnormalised = call(aten.to.dtype, call(aten.matmul.default, call(aten.to.dtype, exps, torch.bfloat16), v16),
                        torch.float32)
    out = call(aten.div.Tensor, unnormalised, call(aten.sum.dim_IntList, exps, [-1], True))
    call(aten.to.dtype, out, out_dtype)
    return added


def _causal(named: dict) -> str | None:
    if named.get("is_causal", False):
        return "kept float: causal attention given as is_causal (attention=bf16 takes an explicit mask)"
    return None


def bf16_attention(gm: fx.GraphModule, result: PassResult, pass_name: str) -> None:
    """Write every supported SDPA node of ``gm`` out with bf16 products (counted in ``result``)."""
    mask_term = MaskTerms(gm.graph, pass_name)
    for node, named, scale in attention_sites(gm, result, refuse=_causal):
        with gm.graph.inserting_before(node):
            added = _written_out(gm.graph, named, scale, mask_term)
        for n in added:
            n.meta.update({"nn_module_stack": node.meta.get("nn_module_stack", {}), "ptool.from_pass": pass_name})
        new = added[-1]
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        result.hit(1)
        result.notes.setdefault("bf16_attention", []).append(module_path(new))
