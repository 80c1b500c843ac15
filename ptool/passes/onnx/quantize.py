"""``quantize`` at ONNX level: MatMul / Gemm with constant weights and Gather on constant tables, to
the integer forms ONNX Runtime runs as integer kernels — the same forms ``ptool.export_onnx`` writes
for a quantized torch model (``ptool/ops/quant.py``), so both routes run the same kernels.

=====================  ==============================================================================
site                   rewrite
=====================  ==============================================================================
``MatMul(x, W)``       ``int8-dynamic``, per-tensor activations: ``DynamicQuantizeLinear(x)`` ->
``Gemm(x, W, C)``      ``MatMulInteger`` (u8 x s8, symmetric int8 weights per output channel or per
                       tensor) -> ``Cast`` -> ``Mul(x_scale * w_scale)`` (ORT fuses the chain into
                       ``DynamicQuantizeMatMul``); per-token: ``ReduceMax|x|`` row scales -> int8 ->
                       ``MatMulInteger`` (s8 x s8) -> rescale by row and by channel.
                       ``int4-weight``: ``com.microsoft.MatMulNBits`` (4-bit asymmetric groups).
                       A Gemm's ``C`` (times ``beta``) is added after; ``alpha`` scales the weights.
``Gather(table, ids)`` ``embeddings=true``: int8 rows with one scale per row, gathered and rescaled:
                       ``Cast(Gather(levels, ids)) * Gather(scales, ids)`` (int8 in ``int4-weight``
                       mode too: ONNX Runtime has no 4-bit Gather).
=====================  ==============================================================================

The weights are quantized by the same functions as on torch graphs (``ptool/passes/quant/
quantizers.py``), so a layer gets the same levels either way. A site is skipped, with the reason,
when its weight is not a constant 2-D float32 tensor, a Gemm transposes its input, an ``exclude``
pattern matches the node name, or (int4) the width is not a multiple of ``group_size``; every Conv is
left float (dynamic int8 ``ConvInteger`` runs 5x slower than float Conv in ONNX Runtime). Only the
main graph is rewritten (sites inside If / Loop bodies are left float). ``int8-static`` writes
calibrated QDQ around Conv, MatMul and Gemm (``ptool/passes/onnx/quantize_static.py``).
``keep_float`` needs the per-layer errors ptool measures on torch graphs, and ``method=gptq|awq`` the
layer inputs it records there: on ONNX they raise a :class:`~ptool.errors.PassError` saying to give the
torch model.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import torch

from ptool.ops.quant import pack_nibbles
from ptool.passes.base import Pass, PassContext, PassResult
from ptool.passes.onnx._edit import NodeBuilder, Rewriter, accepted_site, constant, float_attr, int_attr, is_op
from ptool.passes.onnx._int8 import int8_weight
from ptool.passes.quant import quantizers as qz

_MICROSOFT = "com.microsoft"
#: Measured here (AMD EPYC, 2 threads): a 64->64 3x3 Conv on 80x80 took 13.4 ms as DynamicQuantizeLinear
#: + ConvInteger and 2.6 ms in float32, so dynamic int8 would make a CNN slower, not faster.
_CONV_REASON = ("kept float: ONNX Runtime's dynamic int8 Conv (ConvInteger) ran 5x slower than its float32 Conv "
                "here; mode=int8-static (calibrated QDQ) quantizes Conv")


def quantize_refusal(pass_: Pass) -> str | None:
    """Why this configuration of ``quantize`` cannot run on an ONNX model (None: it can)."""
    if pass_.mode == "auto":
        return ("quantize:mode=auto measures each layer's effect on the outputs on torch graphs; give ptool the torch "
                "model, or pick the modes with exclude= on this ONNX model")
    if pass_.keep_float:
        return ("quantize:keep_float needs per-layer errors ptool measures on torch graphs; give ptool the torch "
                "model, or name the layers to keep with exclude= on this ONNX model")
    if pass_.method != "rtn":
        return (f"quantize:method={pass_.method} needs the layer inputs ptool records on torch graphs; give ptool the "
                "torch model, or use method=rtn on this ONNX model")
    if pass_.attention != "float":
        return (f"quantize:attention={pass_.attention} rewrites scaled_dot_product_attention in torch graphs; give "
                "ptool the torch model, or leave attention out on this ONNX model")
    if pass_.mode == "int4-weight" and (pass_.group_size < 16 or pass_.group_size & (pass_.group_size - 1)):
        return (f"quantize:mode=int4-weight on ONNX lowers to MatMulNBits, whose group_size must be a power of 2 "
                f">= 16, got {pass_.group_size}")
    return None


def quantize_onnx(pass_: Pass, model: ir.Model, ctx: PassContext) -> PassResult:
    """``quantize`` on an ONNX model (see the module docstring); :func:`quantize_refusal` is checked
    before any pass runs."""
    result = PassResult()
    if pass_.mode == "int8-static":
        from ptool.passes.onnx.quantize_static import quantize_static_onnx

        quantize_static_onnx(pass_, model, ctx, result)
        result.notes["mode"] = pass_.mode
        return result
    rw = Rewriter(model, pass_.name)
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 18))
    before = after = 0
    for node in list(model.graph):
        if is_op(node, "Conv", "ConvTranspose"):
            result.skip(f"{node.name or '?'} ({node.op_type})", _CONV_REASON)
            continue
        kind = "linear" if is_op(node, "MatMul", "Gemm") else "embedding" if is_op(node, "Gather") else None
        if kind is None or (kind == "embedding" and not pass_.embeddings):
            continue
        site = accepted_site(node, _linear_site(node, pass_) if kind == "linear" else _embedding_site(node, pass_),
                             pass_.exclude, result)
        if site is None:
            continue
        weight_value, weight = site
        build = NodeBuilder(rw, node)
        out = _quantized_linear(build, node, weight, pass_, opset) if kind == "linear" else \
            _quantized_embedding(build, node.inputs[1], weight)
        build.insert_before()
        rw.take_over(node.outputs[0], out)
        inputs = list(node.inputs)
        node.graph.remove(node, safe=True)  # detaches its inputs, so the float weight is dead now
        before += weight.nbytes
        after += sum(v.const_value.nbytes for n in build.nodes for v in n.inputs
                     if v is not None and v.is_initializer() and v.const_value is not None)
        rw.drop_if_dead([weight_value, *(inputs[2:] if kind == "linear" else [])])
        result.hit()
    if result.changed and pass_.mode == "int4-weight":
        model.opset_imports.setdefault(_MICROSOFT, 1)
    result.notes.update({"mode": pass_.mode, "weight_bytes_before": before, "weight_bytes_after": after})
    return result


def _linear_site(node: ir.Node, pass_: Pass) -> tuple[ir.Value, np.ndarray] | str:
    """``(weight value, weight as (in, out) float32)`` of a MatMul / Gemm, or why it is skipped."""
    if len(node.inputs) < 2:
        return ""
    value = node.inputs[1]
    weight = constant(value, "its weight")
    if isinstance(weight, str):
        return "" if "computed at run time" in weight or "graph input" in weight else weight
    if weight.ndim != 2 or weight.dtype != np.float32:
        return f"kept float: its weight is {weight.dtype} of rank {weight.ndim}, not a 2-D float32 matrix"
    if node.op_type == "Gemm":
        if int_attr(node, "transA", 0):
            return "kept float: the Gemm transposes its input (transA=1)"
        weight = (weight.T if int_attr(node, "transB", 0) else weight) * np.float32(float_attr(node, "alpha", 1.0))
    if pass_.mode == "int4-weight" and weight.shape[0] % pass_.group_size:
        return f"kept float: width {weight.shape[0]} is not a multiple of group_size {pass_.group_size}"
    return value, np.ascontiguousarray(weight, dtype=np.float32)


def _embedding_site(node: ir.Node, pass_: Pass) -> tuple[ir.Value, np.ndarray] | str:
    if int_attr(node, "axis", 0) != 0 or len(node.inputs) < 2:
        return ""
    table = constant(node.inputs[0], "its table")
    if isinstance(table, str) or table.ndim != 2 or table.dtype != np.float32:
        return ""  # a Gather of shapes or indices, not an embedding table
    return node.inputs[0], table


def _reduce_max_last(b: NodeBuilder, x: ir.Value, opset: int) -> ir.Value:
    """``ReduceMax(x)`` over the last axis, kept: ``axes`` is an input from opset 18, an attribute before."""
    if opset >= 18:
        return b.one("ReduceMax", [x, b.const("last_axis", np.array([-1], np.int64))], keepdims=1)
    return b.one("ReduceMax", [x], axes=[-1], keepdims=1)


def _quantized_linear(b: NodeBuilder, node: ir.Node, weight: np.ndarray, pass_: Pass, opset: int) -> ir.Value:
    x = node.inputs[0]
    k, n = weight.shape
    if pass_.mode == "int4-weight":
        levels, scales, zeros = qz.quantize_weight_asymmetric(torch.from_numpy(weight.T.copy()), 4, pass_.group_size)
        groups = k // pass_.group_size
        blob = pack_nibbles(levels).numpy().reshape(n, groups, pass_.group_size // 2)
        y = b.one("MatMulNBits", [x, b.const("q4_weight", blob), b.const("q4_scale", scales.numpy().reshape(-1)),
                                  b.const("q4_zero", pack_nibbles(zeros).numpy().reshape(-1))],
                  domain=_MICROSOFT, K=k, N=n, bits=4, block_size=pass_.group_size)
    else:
        levels, scales = int8_weight(weight, 1, pass_.granularity == "per-channel")
        w_levels, w_scale = b.const("q8_weight", levels), b.const("q8_scale", scales)
        if pass_.activations == "per-token":
            peak = _reduce_max_last(b, b.one("Abs", [x]), opset)
            tiny = b.const("tiny", np.array(np.finfo(np.float32).tiny, np.float32))
            x_scale = b.one("Div", [b.one("Max", [peak, tiny]), b.const("q8_max", np.array(127.0, np.float32))])
            bound = [b.const("q8_low", np.array(-127.0, np.float32)), b.const("q8_high", np.array(127.0, np.float32))]
            x_levels = b.one("Cast", [b.one("Clip", [b.one("Round", [b.one("Div", [x, x_scale])]), *bound])],
                             to=ir.DataType.INT8)
            zero = b.const("zero_i8", np.array(0, np.int8))
            acc = b.one("MatMulInteger", [x_levels, w_levels, zero, zero])
            y = b.one("Mul", [b.one("Mul", [b.one("Cast", [acc], to=ir.DataType.FLOAT), x_scale]), w_scale])
        else:
            x_levels, x_scale, x_zero = b.op("DynamicQuantizeLinear", [x], outputs=3)
            acc = b.one("MatMulInteger", [x_levels, w_levels, x_zero, b.const("zero_i8", np.array(0, np.int8))])
            y = b.one("Mul", [b.one("Cast", [acc], to=ir.DataType.FLOAT), b.one("Mul", [x_scale, w_scale])])
    if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
        c = node.inputs[2]
        beta = float_attr(node, "beta", 1.0)
        y = b.one("Add", [y, c if beta == 1.0 else b.one("Mul", [c, b.const("beta", np.array(beta, np.float32))])])
    return y


def _quantized_embedding(b: NodeBuilder, ids: ir.Value, table: np.ndarray) -> ir.Value:
    """int8 rows, one scale per row, gathered and rescaled (in every mode: ORT has no 4-bit Gather)."""
    levels, scales = qz.quantize_weight(torch.from_numpy(table.copy()), 8)
    rows = b.one("Cast", [b.one("Gather", [b.const("q8_table", levels.numpy()), ids])], to=ir.DataType.FLOAT)
    row_scale = b.one("Gather", [b.const("q8_row_scale", scales.reshape(-1).numpy()), ids])
    return b.one("Mul", [rows, b.one("Unsqueeze", [row_scale, b.const("last_axis", np.array([-1], np.int64))])])
