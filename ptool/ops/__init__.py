"""ptool's own graph ops, and the explicit tables of how each backend lowers them.

Passes put these ops into a torch graph (``torch.ops.ptool_quant.*`` by ``quantize``,
``torch.ops.ptool_shift.*`` by the shift-add passes); each op module defines the op's torch
implementation and its lowerings:

===============================  =====================  ==========================================
op module                        ONNX export            TVM
===============================  =====================  ==========================================
:mod:`ptool.ops.quant`           integer ONNX kernels   float decomposition (:func:`tvm_decompositions`)
:mod:`ptool.ops.shift`           float ONNX ops         TIR kernels (``ptool.backends.tvm_kernels``)
:mod:`ptool.ops.binary`          float ONNX ops         TIR kernels (``ptool.backends.tvm_kernels``)
===============================  =====================  ==========================================

The backends read these tables (:func:`onnx_translations`, :func:`tvm_decompositions`) instead of
looking for whichever op modules happen to be imported. Importing an op module registers its ops
with torch; this package imports them only when a table is asked for, so ``import ptool`` stays
light. :mod:`ptool.ops.shift_arith` is the integer arithmetic the shift ops and their TIR kernels
share.
"""

from __future__ import annotations

import importlib
from types import ModuleType

#: The op modules, in the order their tables are merged.
OP_MODULES = ("ptool.ops.quant", "ptool.ops.shift", "ptool.ops.binary")

#: Op modules whose ops TVM runs as their float decomposition (no integer kernels in TVM here).
TVM_DECOMPOSED = ("ptool.ops.quant",)

#: The ``torch.ops`` namespace that TVM lowers onto ptool's TIR kernels.
TVM_KERNEL_NAMESPACE = "ptool_shift"


def _modules(names: tuple[str, ...]) -> list[ModuleType]:
    return [importlib.import_module(name) for name in names]


def onnx_translations() -> dict:
    """Every ptool op -> its ``torch.onnx`` translation function (for the ``custom_translation_table``)."""
    table: dict = {}
    for module in _modules(OP_MODULES):
        table.update(module.onnx_translations())
    return table


def tvm_decompositions() -> dict:
    """ptool ops TVM runs in float aten ops -> their decomposition (for ``run_decompositions``)."""
    table: dict = {}
    for module in _modules(TVM_DECOMPOSED):
        table.update(module.decompositions())
    return table


def is_ptool_op(target: object, namespace: str | None = None) -> bool:
    """Whether an FX node target is one of ptool's ops (optionally: of one ``torch.ops`` namespace)."""
    ns = getattr(target, "namespace", None)
    return ns in ("ptool_quant", "ptool_shift") and (namespace is None or ns == namespace)
