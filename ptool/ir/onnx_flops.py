"""A FLOPs estimate for an ONNX model, from ONNX shape inference on the example input shapes.

The same convention as :mod:`ptool.ir.flops` (matmul-class ops only, one multiply-add = 2 FLOPs):

=================  =====================================================
op                 FLOPs
=================  =====================================================
MatMul             2 * numel(out) * K (K: the last dim of the first input)
Gemm               2 * M * N * K
Conv               2 * numel(out) * C_in/group * prod(kernel)
ConvTranspose      2 * numel(in) * C_out/group * prod(kernel)
MatMulInteger,     as MatMul / Conv (integer multiply-adds)
ConvInteger
=================  =====================================================

The graph inputs are pinned to the example's shapes first, so symbolic dims resolve; nodes of every
subgraph (If / Loop bodies) count once, as if their branch ran once. A node whose shapes inference
cannot find is counted in ``unknown`` rather than guessed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

from ptool.ir.flops import FlopsEstimate

__all__ = ["estimate_onnx_flops", "onnx_graphs", "with_input_shapes"]

_MATMUL = {"MatMul", "MatMulInteger"}
_CONV = {"Conv", "ConvInteger"}


def onnx_graphs(graph: Any) -> Iterator[Any]:
    """``graph`` (a ``GraphProto``) and every subgraph (If / Loop / Scan bodies) inside it."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from onnx_graphs(attr.g)
            for sub in attr.graphs:
                yield from onnx_graphs(sub)


def with_input_shapes(proto: Any, shapes: Mapping[str, tuple[int, ...]]) -> Any:
    """A copy of ``proto`` with its runtime inputs' dims set to ``shapes``, shapes inferred."""
    import onnx

    model = onnx.ModelProto()
    model.CopyFrom(proto)
    for vi in model.graph.input:
        shape = shapes.get(vi.name)
        if shape is None or not vi.type.HasField("tensor_type"):
            continue
        dims = vi.type.tensor_type.shape.dim
        del dims[:]
        for size in shape:
            dims.add().dim_value = int(size)
    return onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)


def _known_shapes(model: Any) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    for graph in onnx_graphs(model.graph):
        for t in graph.initializer:
            out[t.name] = tuple(t.dims)
        for vi in (*graph.input, *graph.value_info, *graph.output):
            if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
                continue
            dims = vi.type.tensor_type.shape.dim
            if all(d.HasField("dim_value") for d in dims):
                out[vi.name] = tuple(d.dim_value for d in dims)
        for node in graph.node:
            if node.op_type == "Constant":
                for attr in node.attribute:
                    if attr.name == "value" and attr.HasField("t"):
                        out[node.output[0]] = tuple(attr.t.dims)
    return out


def _attr(node: Any, name: str, default: int) -> int:
    for a in node.attribute:
        if a.name == name:
            return a.i
    return default


def _node_flops(node: Any, shapes: Mapping[str, tuple[int, ...]]) -> int | None:
    """FLOPs of one matmul-class node, None when a shape it needs is unknown."""
    def shape(i: int) -> tuple[int, ...] | None:
        return shapes.get(node.input[i]) if len(node.input) > i and node.input[i] else None

    out = shapes.get(node.output[0]) if node.output else None
    if node.op_type in _MATMUL:
        a = shape(0)
        return None if a is None or out is None or not a else 2 * math.prod(out) * a[-1]
    if node.op_type == "Gemm":
        a, b = shape(0), shape(1)
        if a is None or b is None or len(a) != 2 or len(b) != 2:
            return None
        m, k = (a[1], a[0]) if _attr(node, "transA", 0) else a
        n = b[0] if _attr(node, "transB", 0) else b[1]
        return 2 * m * n * k
    if node.op_type in _CONV:
        w = shape(1)
        return None if w is None or out is None else 2 * math.prod(out) * math.prod(w[1:])
    if node.op_type == "ConvTranspose":
        x, w = shape(0), shape(1)
        if x is None or w is None:
            return None
        return 2 * math.prod(x) * (w[1]) * math.prod(w[2:])
    return 0


def estimate_onnx_flops(proto: Any, shapes: Mapping[str, tuple[int, ...]]) -> FlopsEstimate:
    """Matmul-class FLOPs of one call of ``proto`` on inputs of these shapes (by input name)."""
    try:
        model = with_input_shapes(proto, shapes)
    except Exception:  # inference refused the model (e.g. over 2 GiB): every product is unknown
        model = proto
    known = _known_shapes(model)
    estimate = FlopsEstimate()
    for graph in onnx_graphs(model.graph):
        for node in graph.node:
            flops = _node_flops(node, known)
            if flops is None:
                estimate.unknown += 1
            elif flops:
                estimate.total += flops
                estimate.by_op[node.op_type] += flops
    return estimate
