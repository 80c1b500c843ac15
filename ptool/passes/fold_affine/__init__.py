"""fold-affine: fold per-channel affine maps and the attention scale into neighbouring Linear/Conv weights.

Three exact folds (all new weights computed in float64 and cast back once):

1. **Norm affine into the next layers.** ``LN(x) = n(x) * gamma + beta`` feeding only Linears
   (pre-LN blocks: ViT ``layernorm_before`` -> q/k/v, GPT-2 ``ln_1`` -> ``c_attn`` (an addmm with
   an (in, out) weight), Llama RMSNorm ``weight * x`` -> q/k/v and gate/up):
   ``W' = W diag(gamma)``, ``b' = b + W beta``; the norm loses its affine. Refused when anything
   but a Linear reads the norm output, e.g. BERT's post-LN where it is also the residual stream.
2. **Constants next to a layer.** ``layer(x) * c``, ``layer(x) + c`` (``c`` a scalar or a
   per-output-channel stored constant): ``W' = diag(c) W``, ``b' = c b`` / ``b' = b + c``; and
   ``layer(x * c)``, ``layer(x + c)`` (per input channel) like the norm fold. The layer's output
   (resp. the scaled value) must have no other use. A shift into a zero-padding conv is refused.
3. **Attention scale into the query projection.** ``softmax(q k^T * s + mask)``:
   ``W_q' = s W_q``, ``b_q' = s b_q`` and the multiply goes; SDPA's ``scale=s`` (default
   ``1/sqrt(head_dim)``) becomes ``scale=1``. Also through RoPE and GPT-2's fused qkv split (only
   the query columns are scaled) - see :mod:`.attention` for the conditions checked.

Limits: layers are ``aten.linear``, ``aten.addmm`` (beta = alpha = 1) and non-transposed convs
with stored weights; a tied weight (e.g. GPT-2's ``lm_head`` = ``wte``) is left alone unless
``untie_weights`` (folding would duplicate it). ``mm``/``matmul`` with a stored weight and
transposed convs are not folded into. The rules run to a fixed point, so a second run changes
nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx

from ptool.ir.graph import eliminate_dead_code, is_op
from ptool.passes.base import Family, Pass, PassContext, PassResult
from ptool.passes.fold_affine import attention as _attn
from ptool.passes.fold_affine import constants as _const
from ptool.passes.fold_affine._layers import Layer, as_layer, through_identity
from ptool.verify import Close, Numerics

__all__ = ["FoldAffine"]

aten = torch.ops.aten


@dataclass(frozen=True, kw_only=True)
class FoldAffine(Pass):
    """Fold norm affines, constant scales/shifts and the attention scale into Linear/Conv weights (exact).

    Args:
        norms: fold LayerNorm/RMSNorm affines into the Linears that read them.
        constants: fold multiplications/additions by constants into the adjacent Linear/Conv.
        attention_scale: fold the attention scale into the query projection.
        untie_weights: allow folding into a weight shared with another op (it is then duplicated).
    """

    name: ClassVar[str] = "fold-affine"
    family: ClassVar[Family] = Family.REPARAM
    numerics: ClassVar[Numerics] = Close(atol=0.0, rtol=1e-5)
    norms: bool = True
    constants: bool = True
    attention_scale: bool = True
    untie_weights: bool = False

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult()
        counts = {"norm-affine": 0, "constant-into-producer": 0, "constant-into-consumers": 0, "attention-scale": 0}
        # Rounds until nothing folds: a fold can uncover another (in layer(x * a + b) the add folds
        # first, then the mul reads into the layer). It ends: every fold removes a site, none adds one.
        while True:
            skipped: list[tuple[str, str]] = []
            if not self._round(gm, counts, skipped):
                break
        for site, reason in skipped:  # the last round's: every site still left and why
            result.skip(site, reason)
        result.hit(sum(counts.values()))
        result.notes.update({k: v for k, v in counts.items() if v})
        if result.changed:
            eliminate_dead_code(gm)
        return result

    def _round(self, gm: fx.GraphModule, counts: dict[str, int], skipped: list[tuple[str, str]]) -> bool:
        changed = False
        for node in list(gm.graph.nodes):
            if node.graph is not gm.graph or node.op != "call_function":
                continue  # erased by an earlier fold in this round
            if self.attention_scale and is_op(node, aten.scaled_dot_product_attention, *_attn.SOFTMAX):
                changed |= self._fold_attention(gm, node, counts, skipped)
            elif (self.norms or self.constants) and not is_op(node, *_attn.SOFTMAX):
                changed |= self._fold_affine(gm, node, counts, skipped)
        return changed

    def _fold_attention(self, gm: fx.GraphModule, node: fx.Node, counts: dict, skipped: list) -> bool:
        site = _attn.sdpa_site(node) if is_op(node, aten.scaled_dot_product_attention) else _attn.eager_site(node)
        if site is None:
            return False
        if isinstance(site, str):
            skipped.append((_site(node), f"attention scale: {site}"))
            return False
        projection = _attn.query_projection(gm, site, untie=self.untie_weights)
        if isinstance(projection, str):
            skipped.append((_site(node), f"attention scale {site.scale:.6g}: {projection}"))
            return False
        _attn.fold(gm, site, projection, self.name)
        counts["attention-scale"] += 1
        return True

    def _fold_affine(self, gm: fx.GraphModule, node: fx.Node, counts: dict, skipped: list) -> bool:
        aff = _const.as_affine(gm, node)
        if aff is None:
            return False
        # a decomposed RMSNorm (Llama) ends in `weight * x`: a constant multiply, but a norm affine
        is_norm = is_op(node, aten.layer_norm, aten.rms_norm) or (not isinstance(aff, str) and _after_rms(aff))
        if not (self.norms if is_norm else self.constants):
            return False
        if isinstance(aff, str):
            if is_norm or _next_to_layer(node):
                skipped.append((_site(node), aff))
            return False
        if is_norm and aff.x is not None:
            aff.what = "RMSNorm weight"
        key = "norm-affine" if is_norm else None
        into_producer = _const.into_producer(gm, aff, untie=self.untie_weights)
        if isinstance(into_producer, Layer):
            _const.fold(gm, aff, into_producer, self.name)
            counts[key or "constant-into-producer"] += 1
            return True
        into_consumers = _const.into_consumers(gm, aff, untie=self.untie_weights)
        if isinstance(into_consumers, list):
            _const.fold(gm, aff, into_consumers, self.name)
            counts[key or "constant-into-consumers"] += 1
            return True
        reasons = [r for r in (into_producer, into_consumers) if isinstance(r, str)]
        if reasons:
            prefix = f"{aff.what}: " if is_norm else f"{aff.what} not folded: "
            skipped.append((_site(node), prefix + "; ".join(reasons)))
        return False


def _after_rms(aff: _const.Affine) -> bool:
    """True for the ``weight * x * rsqrt(mean(x^2) + eps)`` ending of a decomposed RMSNorm."""
    x = aff.x
    while x is not None and through_identity(x) is not None:
        x = through_identity(x)
    return (aff.t is None and aff.a is not None and aff.a.dim() == 1 and is_op(x, aten.mul)
            and any(is_op(a, aten.rsqrt) for a in x.args))


def _next_to_layer(node: fx.Node) -> bool:
    return any(as_layer(n) is not None for n in (*node.all_input_nodes, *node.users))


def _site(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    path = (list(stack.values())[-1][0] or "<root>") if stack else "?"
    return f"{node.name} ({path})"
