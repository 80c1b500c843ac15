"""Cleanup passes at ONNX level: ``dce``, ``cse``, ``constant-fold`` on an ``onnx_ir.Model``.

The equivalence claims are those of ``ptool/passes/cleanup.py``:

- ``dce`` (onnx_ir ``RemoveUnusedNodesPass``): a node none of whose outputs is read by another node
  or is a graph output cannot change any output; unused initializers and unused optional outputs
  go too. Bit-exact. Sites = non-``Constant`` nodes removed (dead constants are data, reported in
  ``notes`` like the initializers).
- ``cse`` (onnx_ir ``CommonSubexpressionEliminationPass``): two deterministic nodes with the same op,
  attributes and input *values* compute the same outputs; keeping one is bit-exact. Sites = nodes
  merged away (small duplicated ``Constant`` nodes included). Random ops and nodes with subgraphs
  are never merged; only the main graph is scanned.
- ``constant-fold`` (onnxscript ``FoldConstantsPass``): a node whose inputs are all constants is
  evaluated once at transform time (ONNX reference evaluator) and replaced by an initializer; the
  folder also applies its exact simplifications (``Identity``/``Dropout`` removal, ``Shape`` of a
  static shape, ...). Declared ``Close`` because the reference evaluator's float rounding may differ
  from ONNX Runtime's kernels. Sites = nodes replaced. ``max_growth_bytes`` bounds what the whole
  pass adds to the weights (each fold's result size minus the bytes of constant inputs it frees,
  summed): a fold past it is refused and reported as a skipped site. Constants made dead by folding are removed.

Limits: functions and subgraphs are handled as far as the underlying onnx_ir / onnxscript passes
handle them (dce: yes; cse: main graph only; constant-fold: yes, with ``Constant`` nodes in
functions).
"""

from __future__ import annotations

import logging
import sys
from collections import Counter
from typing import Any

import onnx_ir as ir
from onnx_ir.passes.common import CommonSubexpressionEliminationPass, RemoveUnusedNodesPass
from onnxscript.optimizer._constant_folding import FoldConstantsPass

from ptool.errors import first_line
from ptool.passes.base import Pass, PassContext, PassResult


def _is_constant(node: ir.Node) -> bool:
    return node.op_type == "Constant" and node.domain in ("", "ai.onnx")


def _nodes(model: ir.Model) -> list[ir.Node]:
    nodes = list(model.graph.all_nodes())
    for function in model.functions.values():
        nodes.extend(function)
    return nodes


def _removed(before: list[ir.Node], model: ir.Model) -> list[ir.Node]:
    alive = {id(n) for n in _nodes(model)}
    return [n for n in before if id(n) not in alive]


def eliminate_dead_nodes(pass_: Pass, model: ir.Model, ctx: PassContext) -> PassResult:
    """``dce`` on ONNX: remove nodes (and initializers) whose values nobody reads."""
    result = PassResult()
    before, initializers_before = _nodes(model), len(model.graph.initializers)
    modified = RemoveUnusedNodesPass()(model).modified
    removed = _removed(before, model)
    compute = [n for n in removed if not _is_constant(n)]
    result.hit(len(compute))
    result.changed |= bool(modified)
    result.notes = {
        "removed_ops": dict(Counter(n.op_type for n in compute)),
        "constants_removed": len(removed) - len(compute),
        "initializers_removed": initializers_before - len(model.graph.initializers),
    }
    return result


def eliminate_common_subexpressions(pass_: Pass, model: ir.Model, ctx: PassContext) -> PassResult:
    """``cse`` on ONNX: keep one of each set of identical deterministic nodes."""
    result = PassResult()
    before = _nodes(model)
    modified = CommonSubexpressionEliminationPass()(model).modified
    merged = _removed(before, model)
    result.hit(len(merged))
    result.changed |= bool(modified)
    result.notes = {"merged_ops": dict(Counter(n.op_type for n in merged))}
    return result


class _BoundedFolder(FoldConstantsPass):
    """onnxscript's constant folder, with ptool's growth budget in bytes and a per-op fold count."""

    def __init__(self, *, max_growth_bytes: int, result: PassResult) -> None:
        # The size limits are replaced by the byte budget checked in _prepare_folded_tensor.
        super().__init__(shape_inference=False, input_size_limit=sys.maxsize, output_size_limit=sys.maxsize)
        self.max_growth_bytes = max_growth_bytes
        self.grown = 0  # net weight bytes the folds so far added (a budget for the whole pass)
        self.result = result
        self.folded: Counter[str] = Counter()

    def _prepare_folded_tensor(self, node: ir.Node, output_name: str, output_array: Any) -> ir.Tensor | None:
        tensor = super()._prepare_folded_tensor(node, output_name, output_array)
        if tensor is None:
            return None
        # Constant inputs read only by this node disappear with it.
        freed = sum(
            v.const_value.nbytes
            for v in node.inputs
            if v is not None and v.const_value is not None and len(v.uses()) == 1
            and not v.is_graph_input() and not v.is_graph_output()
        )
        growth = tensor.nbytes - freed
        if self.grown + growth > self.max_growth_bytes:
            self.result.skip(
                f"{node.name or '?'} ({node.op_type})",
                f"folding would add {growth} weight bytes to the {self.grown} already added "
                f"(max_growth_bytes={self.max_growth_bytes} for the whole pass)",
            )
            return None
        self.grown += growth
        return tensor

    def process_node(self, node: ir.Node, is_function: bool) -> Any:
        try:
            return super().process_node(node, is_function)
        except RuntimeError as e:  # one of onnxscript's partial evaluators failed: leave the node as it is
            cause = e.__cause__ or e
            self.result.skip(f"{node.name or '?'} ({node.op_type})",
                             f"onnxscript's folder failed on it ({type(cause).__name__}: {first_line(cause)})")
            return None

    def replace_node(self, node: ir.Node, replacement: Any, root: Any) -> None:
        super().replace_node(node, replacement, root)
        self.folded[node.op_type] += 1


def fold_constants(pass_: Pass, model: ir.Model, ctx: PassContext) -> PassResult:
    """``constant-fold`` on ONNX: precompute nodes whose inputs are all constants."""
    result = PassResult()
    folder = _BoundedFolder(max_growth_bytes=int(getattr(pass_, "max_growth_bytes", 0)), result=result)
    chatter = logging.getLogger("onnxscript.optimizer")  # "Skipping constant folding for op ..." per node
    level = chatter.level
    chatter.setLevel(logging.ERROR)
    try:
        modified = folder(model).modified
    finally:
        chatter.setLevel(level)
    result.hit(sum(folder.folded.values()))
    if modified:
        result.changed = True
        RemoveUnusedNodesPass()(model)  # the constants the folded nodes read are dead now
    result.notes = {"folded_ops": dict(folder.folded)}
    return result
