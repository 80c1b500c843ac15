"""``quantize:mode=int8-static`` at ONNX level: calibrated QDQ around Conv, MatMul and Gemm.

Each site gets ``QuantizeLinear -> DequantizeLinear`` on its input and its output (uint8,
asymmetric, ranges from the calibration batches through ``observer``), a ``DequantizeLinear`` of
int8 weights (symmetric, per output channel; per tensor with ``granularity=per-tensor`` or in a model
below opset 13, whose DequantizeLinear has no ``axis``), and for Conv an int32 bias at scale
``x_scale * w_scale``. That is the QDQ form ONNX Runtime's graph optimizer turns into its integer
kernels (``QLinearConv``, ``QLinearMatMul``), the same form ``onnxruntime.quantization.
quantize_static`` writes; a site whose output feeds another site shares that Q/DQ pair.

Calibration: ONNX Runtime runs the model (graph optimizations off) with every site's input and
output exposed as graph outputs, on each calibration batch; the observer turns the values into
``(scale, zero_point)``.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import torch

from ptool.passes.base import Pass, PassContext, PassResult
from ptool.passes.onnx._edit import NodeBuilder, Rewriter, accepted_site, constant, int_attr, is_op
from ptool.passes.onnx._int8 import int8_weight
from ptool.passes.quant import quantizers as qz

_U8 = qz.IntRange(8, signed=False)


def _site(node: ir.Node) -> tuple[np.ndarray, int] | str:
    """``(float32 weight, its output-channel axis)`` of a Conv / MatMul / Gemm, or why not a site."""
    if len(node.inputs) < 2:
        return ""
    weight = constant(node.inputs[1], "its weight")
    if isinstance(weight, str):
        return "" if "computed at run time" in weight or "graph input" in weight else weight
    if weight.dtype != np.float32:
        return f"kept float: its weight is {weight.dtype}, not float32"
    if node.op_type == "Conv":
        return weight, 0
    if weight.ndim != 2:
        return f"kept float: its weight has rank {weight.ndim}, not a 2-D matrix"
    if node.op_type == "Gemm":
        if int_attr(node, "transA", 0):
            return "kept float: the Gemm transposes its input (transA=1)"
        return weight, 0 if int_attr(node, "transB", 0) else 1
    return weight, 1


def _observe(model: ir.Model, values: list[ir.Value], calls: list[dict], pass_: Pass) -> dict[str, qz.Observer]:
    """An observer per value name, fed every calibration batch (ORT, graph optimizations off)."""
    import onnx

    from ptool.ir.onnx_module import ort_session

    proto = ir.to_proto(model)
    known = {o.name for o in proto.graph.output}
    for v in values:
        if v.name not in known:
            proto.graph.output.append(onnx.helper.make_tensor_value_info(v.name, onnx.TensorProto.FLOAT, None))
    names = [o.name for o in proto.graph.output]
    session = ort_session(proto, optimize=False)
    observers = {v.name: qz.Observer(pass_.observer, pass_.percentile) for v in values}
    for feeds in calls:
        for name, out in zip(names, session.run(None, feeds)):
            if name in observers:
                observers[name].update(torch.from_numpy(np.asarray(out, np.float32)))
    return observers


def quantize_static_onnx(pass_: Pass, model: ir.Model, ctx: PassContext, result: PassResult) -> None:
    """Rewrite the sites of ``model`` (main graph) to calibrated QDQ; record hits and skips in ``result``."""
    from ptool.ir.onnx_module import feeds_from_call, input_specs

    sites = []
    for node in list(model.graph):
        if not is_op(node, "Conv", "MatMul", "Gemm"):
            continue
        site = accepted_site(node, _site(node), pass_.exclude, result)
        if site is not None:
            sites.append((node, *site))
    if not sites:
        return
    specs = input_specs(model)
    calls = [feeds_from_call(specs, a, k) for a, k in ctx.require_calibration_calls(f"{pass_.name}:mode=int8-static")]
    watched = list({v.name: v for n, _, _ in sites for v in (n.inputs[0], n.outputs[0])}.values())
    observers = _observe(model, watched, calls, pass_)
    rw = Rewriter(model, pass_.name)
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 13))
    per_channel = pass_.granularity == "per-channel" and opset >= 13
    if pass_.granularity == "per-channel" and not per_channel:
        result.notes["weights"] = f"per-tensor: DequantizeLinear has no per-channel axis before opset 13 (model: {opset})"
    made: set[str] = set()  # the DequantizeLinear outputs this pass made: a site reading one reuses it
    for node, weight, axis in sites:
        before, after = NodeBuilder(rw, node), NodeBuilder(rw, node)
        x = node.inputs[0]
        x_scale = _qdq(before, x, observers[x.name]) if x.name not in made else \
            x.producer().inputs[1].const_value.numpy()
        w_levels, w_scale = int8_weight(weight, axis, per_channel)
        per_axis = {"axis": axis} if per_channel else {}
        w_dq = before.one("DequantizeLinear", [before.const("w_q8", w_levels), before.const("w_scale", w_scale),
                                               before.const("w_zero", np.zeros(w_scale.shape, np.int8))], **per_axis)
        old = [node.inputs[1]]
        node.replace_input_with(1, w_dq)
        if node.op_type == "Conv" and len(node.inputs) > 2 and node.inputs[2] is not None:
            bias = constant(node.inputs[2], "its bias")
            if not isinstance(bias, str):  # int32 at x_scale * w_scale: what QLinearConv adds
                b_scale = (float(x_scale) * w_scale).astype(np.float32)
                b_levels = np.round(bias / np.where(b_scale > 0, b_scale, 1)).astype(np.int32)
                b_dq = before.one("DequantizeLinear", [before.const("b_q32", b_levels), before.const("b_scale", b_scale),
                                                       before.const("b_zero", np.zeros(b_scale.shape, np.int32))],
                                  **({"axis": 0} if per_channel else {}))
                old.append(node.inputs[2])
                node.replace_input_with(2, b_dq)
        before.insert_before()
        if x.name not in made:  # this site alone reads the new pair
            x_dq = before.nodes[1].outputs[0]
            x_dq.type, x_dq.shape = x.type, x.shape
            node.replace_input_with(0, x_dq)
            made.add(x_dq.name)
        y = node.outputs[0]
        _qdq(after, y, observers[y.name])
        after.insert_after()
        q, dq = after.nodes[0], after.nodes[1].outputs[0]
        rw.take_over(y, dq)  # every reader of y (and a graph output of its name) moves to the DQ output ...
        q.replace_input_with(0, y)  # ... except the QuantizeLinear that reads y itself
        made.add(dq.name)
        rw.drop_if_dead(old)
        result.hit()


def _qdq(build: NodeBuilder, value: ir.Value, observer: qz.Observer) -> np.ndarray:
    """Append ``QuantizeLinear -> DequantizeLinear`` of ``value`` (uint8, the observer's range) to
    ``build`` as its first two nodes; returns the scale."""
    scale, zero = observer.qparams(_U8)
    s = build.const(f"{value.name}_scale", np.asarray(float(scale), np.float32).reshape(()))
    z = build.const(f"{value.name}_zero", np.asarray(int(zero), np.uint8).reshape(()))
    build.one("DequantizeLinear", [build.one("QuantizeLinear", [value, s, z]), s, z])
    return s.const_value.numpy()
