"""``fold-bn`` at ONNX level: fold inference-mode BatchNormalization into Conv / ConvTranspose / Gemm.

With ``s = scale / sqrt(var + epsilon)`` and ``t = B - s * mean`` per channel (BatchNormalization
computes ``y = s * x + t`` along axis 1):

- **BN after a layer** (:class:`FoldBatchNormIntoPreviousRule`), ``BN(L(x))``:
  Conv ``W' = s (.) W`` along output channels (axis 0 of ``(O, I/g, *k)``); ConvTranspose along
  its output channels (axis 1 of ``(I, O/g, *k)``, per group); Gemm along ``N`` (axis 1 of ``B``,
  axis 0 if ``transB``). Bias ``b' = s * b + t`` — for Gemm ``C' = s * (beta * C) + t`` and the
  ``beta`` attribute is dropped (``alpha`` scales ``A @ B`` only, so it commutes with ``s``). Exact.
- **BN before layers** (:class:`FoldBatchNormIntoNextRule`, option ``fold_into_next``), when every
  reader of the BN output is a Conv reading it as ``X`` or a Gemm reading it as ``A`` (``transA=0``):
  ``W' = W (.) s`` along input channels and ``b' = b + sum(W * t)`` over input channels and taps
  (Gemm: ``C' = beta * C + alpha * t @ B``). Exact only without padding: padded zeros enter *after*
  the BN, and the folded conv would see them as ``t`` — such sites are skipped with that reason.
  A following ConvTranspose is never folded (its border outputs see fewer taps).

New weights are computed in float64 from the stored tensors and cast once to the layer's weight
dtype, so a float16 layer with float32 BN statistics stays a valid float16 layer.

Why not onnxscript's ``fuse_batchnorm_into_{conv,conv_transpose,gemm}`` rules: they fold a
``training_mode=1`` BatchNormalization (which normalizes with *batch* statistics — wrong results),
they emit float32 weights into a float16 Conv when the BN statistics are float32 (an invalid model),
compute in the tensors' own precision, name a missing bias ``<weight>_bias`` without checking that
the name is free, and leave the BN's initializers behind. The rules here keep their shape (check →
reason or match; rewrite) and fix those points.

Limits: the BN must be in inference mode with constant statistics, with only its first output
used; the layer's weight and bias must be constants (initializers or ``Constant`` nodes) that are
not graph inputs; for BN-after-layer the layer's output must feed only the BN. A weight shared with
another node is not changed: the layer gets its own folded copy (the report's params column shows
the growth).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from ptool.passes.base import Pass, PassContext, PassResult
from ptool.passes.onnx._edit import (
    Rewriter,
    constant,
    float_attr,
    int_attr,
    is_op,
    optional_input,
)


@dataclass
class _BatchNorm:
    """An inference-mode BatchNormalization as ``y = scale * x + shift`` (float64, per channel)."""

    node: ir.Node
    x: ir.Value
    out: ir.Value
    scale: np.ndarray
    shift: np.ndarray


def _as_batch_norm(node: ir.Node) -> _BatchNorm | str:
    """Normalize a BatchNormalization node, or say why it cannot be folded."""
    if int_attr(node, "training_mode", 0) == 1 or int_attr(node, "is_test", 1) == 0:
        return "BatchNormalization runs in training mode (batch statistics); export the model in eval mode"
    if int_attr(node, "spatial", 1) == 0:
        return "BatchNormalization has spatial=0 (per-element statistics), which is not folded"
    if any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
        return "BatchNormalization's running or saved statistics outputs are used"
    params = []
    for index, what in enumerate(("scale", "bias", "mean", "var"), start=1):
        array = constant(optional_input(node, index), f"BatchNormalization {what}")
        if isinstance(array, str):
            return array
        params.append(array.astype(np.float64))
    gamma, beta, mean, var = params
    if any(p.ndim != 1 or p.shape != gamma.shape for p in params):
        return f"BatchNormalization parameters are not 1-D vectors of one length ({[p.shape for p in params]})"
    scale = gamma / np.sqrt(var + float_attr(node, "epsilon", 1e-5))
    return _BatchNorm(node, node.inputs[0], node.outputs[0], scale, beta - scale * mean)


@dataclass
class _Layer:
    """A Conv / ConvTranspose / Gemm with constant weight (and bias, if any)."""

    node: ir.Node
    weight: np.ndarray
    bias: np.ndarray | None

    @property
    def op(self) -> str:
        return self.node.op_type

    @property
    def groups(self) -> int:
        return int_attr(self.node, "group", 1)

    @property
    def trans_b(self) -> bool:
        return bool(int_attr(self.node, "transB", 0))

    def out_channels(self) -> int:
        if self.op == "Conv":
            return self.weight.shape[0]
        if self.op == "ConvTranspose":
            return self.weight.shape[1] * self.groups
        return self.weight.shape[0] if self.trans_b else self.weight.shape[1]

    def in_channels(self) -> int:
        if self.op == "Conv":
            return self.weight.shape[1] * self.groups
        if self.op == "ConvTranspose":
            return self.weight.shape[0]
        return self.weight.shape[1] if self.trans_b else self.weight.shape[0]


def _as_layer(node: ir.Node) -> _Layer | str:
    """Normalize a Conv / ConvTranspose / Gemm node with constant weights, or say why not."""
    label = f"{node.op_type} '{node.name}'"
    weight = constant(optional_input(node, 1), f"{label} weight")
    if isinstance(weight, str):
        return weight
    if (node.op_type == "Gemm" and weight.ndim != 2) or (node.op_type != "Gemm" and weight.ndim < 3):
        return f"{label} has a weight of unexpected rank {weight.ndim}"
    if weight.dtype.kind != "f":
        return f"{label} has a {weight.dtype} weight, not floating point"
    bias_value = optional_input(node, 2)
    bias = None
    if bias_value is not None:
        bias = constant(bias_value, f"{label} bias")
        if isinstance(bias, str):
            return bias
    layer = _Layer(node, weight, bias)
    if node.op_type == "ConvTranspose" and weight.shape[0] % layer.groups:
        return f"{label} has {weight.shape[0]} input channels, not divisible by group={layer.groups}"
    return layer


@dataclass
class _PreviousMatch:
    bn: _BatchNorm
    layer: _Layer


class FoldBatchNormIntoPreviousRule:
    """``BN(Conv|ConvTranspose|Gemm(x))`` -> the layer with scaled weights and shifted bias."""

    root_op: ClassVar[str] = "BatchNormalization"

    def check(self, bn: _BatchNorm) -> _PreviousMatch | str:
        producer = bn.x.producer()
        if producer is None:
            return "its input is a graph input"
        if not is_op(producer, "Conv", "ConvTranspose", "Gemm"):
            return f"its input comes from {producer.op_type} '{producer.name}', not a Conv/ConvTranspose/Gemm"
        out = producer.outputs[0]
        if bn.x is not out or out.is_graph_output() or len(out.uses()) != 1:
            return f"{producer.op_type} '{producer.name}' output is also used elsewhere"
        layer = _as_layer(producer)
        if isinstance(layer, str):
            return layer
        if layer.out_channels() != bn.scale.shape[0]:
            return f"{producer.op_type} '{producer.name}' has {layer.out_channels()} output channels, BN has {bn.scale.shape[0]}"
        return _PreviousMatch(bn, layer)

    def rewrite(self, match: _PreviousMatch, rw: Rewriter) -> None:
        bn, layer = match.bn, match.layer
        s, w = bn.scale, layer.weight.astype(np.float64)
        if layer.op == "Conv":
            new_w = w * s.reshape(-1, *[1] * (w.ndim - 1))
        elif layer.op == "ConvTranspose":  # (I, O/g, *k): output channel o = group * O/g + j
            g = layer.groups
            grouped = w.reshape(g, w.shape[0] // g, w.shape[1], *w.shape[2:])
            new_w = (grouped * s.reshape(g, 1, -1, *[1] * (w.ndim - 2))).reshape(w.shape)
        else:
            new_w = w * (s[:, None] if layer.trans_b else s[None, :])
        bias = np.zeros_like(s) if layer.bias is None else layer.bias.astype(np.float64)
        if layer.op == "Gemm":
            bias = bias * float_attr(layer.node, "beta", 1.0)
            layer.node.attributes.pop("beta", None)
        new_b = s * bias + bn.shift
        self._apply(layer, rw, new_w, new_b)
        out = layer.node.outputs[0]
        was_output = bn.out.is_graph_output()
        params = list(bn.node.inputs[1:])
        ir.convenience.replace_all_uses_with(bn.out, out, replace_graph_outputs=True)
        bn.node.graph.remove(bn.node, safe=True)
        if was_output:  # keep the graph's output name and declared type
            out.name, out.type, out.shape = bn.out.name, bn.out.type or out.type, bn.out.shape or out.shape
        rw.drop_if_dead(params)

    @staticmethod
    def _apply(layer: _Layer, rw: Rewriter, new_w: np.ndarray, new_b: np.ndarray) -> None:
        dtype = layer.weight.dtype
        node = layer.node
        weight_name = node.inputs[1].name or "weight"
        bias = optional_input(node, 2)
        bias_name = bias.name if bias is not None and bias.name else weight_name + "_bias"
        old_w = rw.set_input(node, 1, rw.initializer(weight_name, new_w.astype(dtype)))
        old_b = rw.set_input(node, 2, rw.initializer(bias_name, new_b.astype(dtype)))
        rw.mark(node)
        rw.drop_if_dead([old_w, old_b])


@dataclass
class _NextMatch:
    bn: _BatchNorm
    layers: list[_Layer]


def _zero_padding(node: ir.Node) -> bool:
    auto_pad = node.attributes.get("auto_pad")
    if auto_pad is not None and not auto_pad.is_ref() and auto_pad.as_string() not in ("NOTSET", "VALID"):
        return False
    pads = node.attributes.get("pads")
    return pads is None or (not pads.is_ref() and all(p == 0 for p in pads.as_ints()))


class FoldBatchNormIntoNextRule:
    """``Conv|Gemm(BN(x))`` for every reader of the BN -> the layers with folded input scaling."""

    root_op: ClassVar[str] = "BatchNormalization"

    def check(self, bn: _BatchNorm) -> _NextMatch | str:
        if bn.out.is_graph_output():
            return "its output is a graph output"
        uses = list(bn.out.uses())
        if not uses:
            return "its output is unused"
        layers = []
        for user, index in uses:
            label = f"{user.op_type} '{user.name}'"
            if not is_op(user, "Conv", "Gemm"):
                if is_op(user, "ConvTranspose"):
                    return (
                        f"it feeds {label}: folding into a following ConvTranspose is not exact "
                        "(border outputs see fewer taps)"
                    )
                return f"its output feeds {label}, not a Conv/Gemm"
            if index != 0 or sum(1 for v in user.inputs if v is bn.out) != 1:
                return f"its output is not only the data input of {label}"
            if user.op_type == "Gemm" and int_attr(user, "transA", 0):
                return f"{label} transposes its input (transA=1)"
            if user.op_type == "Conv" and not _zero_padding(user):
                return f"{label} zero-pads its input: padded zeros would become beta - s*mean after folding (not exact)"
            layer = _as_layer(user)
            if isinstance(layer, str):
                return layer
            if layer.in_channels() != bn.scale.shape[0]:
                return f"{label} has {layer.in_channels()} input channels, BN has {bn.scale.shape[0]}"
            layers.append(layer)
        return _NextMatch(bn, layers)

    def rewrite(self, match: _NextMatch, rw: Rewriter) -> None:
        bn = match.bn
        s, t = bn.scale, bn.shift
        for layer in match.layers:
            w = layer.weight.astype(np.float64)
            if layer.op == "Conv":  # (O, I/g, *k): output o reads input channels of its group
                out_ch, g = w.shape[0], layer.groups
                extra = [1] * (w.ndim - 2)
                s_o = np.repeat(s.reshape(g, -1), out_ch // g, axis=0).reshape(out_ch, -1, *extra)
                t_o = np.repeat(t.reshape(g, -1), out_ch // g, axis=0).reshape(out_ch, -1, *extra)
                new_w = w * s_o
                delta = (w * t_o).reshape(out_ch, -1).sum(axis=1)
                bias = np.zeros(out_ch) if layer.bias is None else layer.bias.astype(np.float64)
                new_b = bias + delta
            else:  # Gemm: alpha * (A s + t) B_eff + beta C
                b_eff = w.T if layer.trans_b else w
                new_w = w * (s[None, :] if layer.trans_b else s[:, None])
                bias = 0.0 if layer.bias is None else layer.bias.astype(np.float64) * float_attr(layer.node, "beta", 1.0)
                new_b = np.asarray(bias + float_attr(layer.node, "alpha", 1.0) * (t @ b_eff))
                layer.node.attributes.pop("beta", None)
            FoldBatchNormIntoPreviousRule._apply(layer, rw, new_w, new_b)
            layer.node.replace_input_with(0, bn.x)
        params = list(bn.node.inputs[1:])
        bn.node.graph.remove(bn.node, safe=True)
        rw.drop_if_dead(params)


def fold_batch_norms(pass_: Pass, model: ir.Model, ctx: PassContext) -> PassResult:
    """``fold-bn`` on ONNX: fold every foldable BatchNormalization; report the others and why.

    Args:
        pass_: the :class:`ptool.passes.fold_bn.FoldBatchNorm` configuration (``fold_into_next``).
        model: the ONNX IR model (mutated).
        ctx: unused.
    """
    result = PassResult()
    rw = Rewriter(model, pass_.name)
    previous, following = FoldBatchNormIntoPreviousRule(), FoldBatchNormIntoNextRule()
    fold_into_next = bool(getattr(pass_, "fold_into_next", True))
    hits = {"into_previous": 0, "into_next": 0}
    for node in list(model.graph.all_nodes()):
        if node.graph is None or not is_op(node, previous.root_op):
            continue
        site = f"{node.name or '?'} (BatchNormalization)"
        bn = _as_batch_norm(node)
        if isinstance(bn, str):
            result.skip(site, bn)
            continue
        match = previous.check(bn)
        if not isinstance(match, str):
            previous.rewrite(match, rw)
            hits["into_previous"] += 1
            result.hit()
            continue
        why_next = following.check(bn) if fold_into_next else "fold_into_next=false"
        if isinstance(why_next, str):
            result.skip(site, f"not after a foldable layer ({match}); not before one ({why_next})")
            continue
        following.rewrite(why_next, rw)
        hits["into_next"] += 1
        result.hit()
    result.notes = {k: v for k, v in hits.items() if v}
    return result
