"""ONNX-level implementations of ptool passes.

An ONNX model given to ptool stays ONNX (``ptool/pipeline/onnx_ir.py``): the passes that make
sense at ONNX level run on an ``onnx_ir.Model``. Each one is a plain function
``(pass_, model, ctx) -> PassResult`` that mutates ``model`` in place and is configured by the same
pass object (dataclass) as its torch-graph twin, so ``"fold-bn:fold_into_next=false"`` means the same
thing for both.

:data:`ONNX_IMPLEMENTATIONS` is the one explicit table, keyed by pass class. A pass without an entry
works on torch graphs only; :func:`onnx_implementation` raises a :class:`~ptool.errors.PassError`
for it that says to give ptool the torch model or an ExportedProgram instead. A pass whose ONNX form
covers only some of its options says which in :data:`ONNX_REFUSALS`, checked before anything runs.

Importing this package imports torch, onnx_ir and onnxscript; only the ONNX pipeline does that.
"""

from __future__ import annotations

from collections.abc import Callable

import onnx_ir as ir

from ptool.errors import PassError
from ptool.passes.base import Pass, PassContext, PassResult
from ptool.passes.cleanup import CommonSubexpressionElimination, ConstantFold, DeadCodeElimination
from ptool.passes.fold_bn import FoldBatchNorm
from ptool.passes.onnx.cleanup import eliminate_common_subexpressions, eliminate_dead_nodes, fold_constants
from ptool.passes.onnx.fold_bn import fold_batch_norms
from ptool.passes.onnx.precision import precision_onnx, precision_refusal
from ptool.passes.onnx.quantize import quantize_onnx, quantize_refusal
from ptool.passes.precision import Precision
from ptool.passes.quant.quantize import Quantize

OnnxImplementation = Callable[[Pass, ir.Model, PassContext], PassResult]

#: Pass class -> its ONNX-level implementation. Exact class match: a subclass may change ``run``.
ONNX_IMPLEMENTATIONS: dict[type[Pass], OnnxImplementation] = {
    DeadCodeElimination: eliminate_dead_nodes,
    CommonSubexpressionElimination: eliminate_common_subexpressions,
    ConstantFold: fold_constants,
    FoldBatchNorm: fold_batch_norms,
    Quantize: quantize_onnx,
    Precision: precision_onnx,
}


#: Pass class -> why a configuration of it cannot run at ONNX level (None: it can), for the passes
#: whose ONNX implementation covers only some of their options.
ONNX_REFUSALS: dict[type[Pass], Callable[[Pass], str | None]] = {
    Quantize: quantize_refusal,
    Precision: precision_refusal,
}


def onnx_implementation(pass_: Pass) -> OnnxImplementation:
    """The ONNX implementation of ``pass_`` as configured.

    Raises:
        PassError: the pass works on torch graphs only, or not with these options.
    """
    impl = ONNX_IMPLEMENTATIONS.get(type(pass_))
    if impl is None:
        available = ", ".join(sorted(cls.name for cls in ONNX_IMPLEMENTATIONS))
        raise PassError(
            f"pass '{pass_.spec()}' works on torch graphs only and cannot run on an ONNX model; give ptool the "
            f"torch model (nn.Module) or an ExportedProgram (.pt2) instead (passes available for ONNX: {available})"
        )
    refusal = ONNX_REFUSALS.get(type(pass_), lambda p: None)(pass_)
    if refusal is not None:
        raise PassError(refusal)
    return impl


__all__ = ["ONNX_IMPLEMENTATIONS", "ONNX_REFUSALS", "OnnxImplementation", "onnx_implementation"]
