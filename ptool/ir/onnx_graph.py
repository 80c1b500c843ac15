"""Counting an ONNX model the way the report counts a torch graph (``ptool.ir.graph``).

Nodes are all nodes in the graph and its subgraphs except ``Constant`` (data, like a torch
``get_attr``); parameters are the elements of floating-point initializers and ``Constant`` tensors.
"""

from __future__ import annotations

import onnx_ir as ir


def _is_constant(node: ir.Node) -> bool:
    return node.op_type == "Constant" and node.domain in ("", "ai.onnx")


def node_count(model: ir.Model) -> int:
    """Nodes in the graph and its subgraphs, ``Constant`` nodes excluded."""
    return sum(1 for node in model.graph.all_nodes() if not _is_constant(node))


def parameter_count(model: ir.Model) -> int:
    """Elements of floating-point weights: initializers and ``Constant`` tensors."""
    total = 0
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is not None and tensor.dtype.is_floating_point():
            total += tensor.size
    for node in model.graph.all_nodes():
        if _is_constant(node):
            attr = node.attributes.get("value")
            if attr is not None and attr.type == ir.AttributeType.TENSOR and attr.value.dtype.is_floating_point():
                total += attr.value.size
    return total
