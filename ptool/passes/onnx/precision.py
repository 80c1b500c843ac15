"""``precision`` at ONNX level: MatMul, Gemm, Conv and ConvTranspose in fp16, everything else float32.

Each site whose inputs are float32 becomes ``Cast(x, fp16) -> op(x16, W16, b16) -> Cast(y, float32)``:
its constant weights and bias are *stored* in fp16 (half the bytes), a run-time input is cast once
per value (sites reading the same activation share the Cast), and the output is cast back, so
softmax, normalizations, reductions, residual additions and the graph's outputs stay float32.
This is narrower than the torch pass, whose element-wise ops follow their inputs into the reduced
dtype: at ONNX level ptool has no per-op value types to follow after its own edits, so it keeps the
islands the other way round (fp16 islands in a float32 graph) and needs no op table beyond the sites.

``dtype=bf16`` is refused: ONNX Runtime's CPU provider, which runs and verifies the model, has no
bfloat16 MatMul, Gemm or Conv kernel. ``keep_float`` needs the per-layer errors ptool measures on
torch graphs and is refused too; ``exclude=`` patterns on node names keep sites float32. Only the main
graph is rewritten (sites inside If / Loop bodies stay float32). Activations are not clipped to fp16's
range (+-65504) before the Cast: inputs of matmuls and convolutions that large are not seen in practice,
while the attention masks that hold float32's minimum feed an ``Add``, which stays float32.

Equivalence: approximate, the torch pass's bound (output cosine >= 0.999 vs float32).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ptool.passes.base import Pass, PassContext, PassResult
from ptool.passes.onnx._edit import NodeBuilder, Rewriter, accepted_site, is_op

#: The ops that run in fp16 (their float inputs cast, their constant inputs stored in fp16).
SITES = ("MatMul", "Gemm", "Conv", "ConvTranspose")

_FP16_MAX = float(np.finfo(np.float16).max)


def precision_refusal(pass_: Pass) -> str | None:
    """Why this configuration of ``precision`` cannot run on an ONNX model (None: it can)."""
    if pass_.dtype != "fp16":
        return (f"precision:dtype={pass_.dtype} cannot run on an ONNX model here: ONNX Runtime's CPU provider has no "
                "bfloat16 MatMul/Gemm/Conv kernels; use precision:dtype=fp16, or give ptool the torch model (bf16 "
                "runs there)")
    if pass_.keep_float:
        return ("precision:keep_float needs per-layer errors ptool measures on torch graphs; give ptool the torch "
                "model, or name the layers to keep with exclude= on this ONNX model")
    return None


def precision_onnx(pass_: Pass, model: ir.Model, ctx: PassContext) -> PassResult:
    """``precision`` on an ONNX model (see the module docstring); :func:`precision_refusal` is
    checked before any pass runs."""
    result = PassResult()
    rw = Rewriter(model, pass_.name)
    cast_of: dict[ir.Value, ir.Value] = {}  # a float32 activation -> its fp16 Cast, shared by the sites reading it
    before = after = 0
    for node in list(model.graph):
        if not is_op(node, *SITES):
            continue
        inputs = accepted_site(node, _float32_inputs(node), pass_.exclude, result)
        if inputs is None:
            continue
        build = NodeBuilder(rw, node)
        half = []
        for index, value in enumerate(inputs):
            if value is None:
                half.append(None)
            elif value.const_value is not None and not value.is_graph_input():
                weight = value.const_value.numpy()
                before += weight.nbytes
                stored = np.clip(weight, -_FP16_MAX, _FP16_MAX).astype(np.float16)
                after += stored.nbytes
                half.append(rw.initializer(value.name or f"{build.base}_in{index}", stored, suffix="_fp16"))
            else:
                if value not in cast_of:
                    cast_of[value] = build.one("Cast", [value], to=ir.DataType.FLOAT16)
                half.append(cast_of[value])
        low = build.one(node.op_type, half, **{name: attr for name, attr in node.attributes.items()})
        out = build.one("Cast", [low], to=ir.DataType.FLOAT)
        build.insert_before()
        rw.take_over(node.outputs[0], out)
        low.type = ir.TensorType(ir.DataType.FLOAT16)
        node.graph.remove(node, safe=True)
        rw.drop_if_dead(inputs)
        result.hit()
    result.notes.update(dtype=pass_.dtype, weight_bytes_before=before, weight_bytes_after=after)
    return result


def _float32_inputs(node: ir.Node) -> list[ir.Value | None] | str:
    """The site's inputs when every one is float32 (or absent), else why it stays float32 (an empty
    reason for an integer site: not one for this pass, nothing said)."""
    for value in node.inputs:
        if value is None:
            continue
        dtype = value.const_value.dtype if value.const_value is not None else getattr(value.type, "dtype", None)
        if dtype is None:
            return f"the type of input '{value.name}' is unknown"
        if dtype != ir.DataType.FLOAT:
            return "" if not dtype.is_floating_point() else f"input '{value.name}' is {dtype.name}, not float32"
    return list(node.inputs)
