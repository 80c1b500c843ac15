"""Passes: one module per family; the registry lists them all (``ptool.list_passes()``).

Pass classes are reachable here by attribute (``ptool.passes.FoldBatchNorm``), imported on first
use so that ``import ptool`` stays cheap.
"""

from __future__ import annotations

_EXPORTS = {
    "Pass": "ptool.passes.base",
    "PassContext": "ptool.passes.base",
    "PassResult": "ptool.passes.base",
    "Family": "ptool.passes.base",
    "DeadCodeElimination": "ptool.passes.cleanup",
    "CommonSubexpressionElimination": "ptool.passes.cleanup",
    "ConstantFold": "ptool.passes.cleanup",
    "FoldBatchNorm": "ptool.passes.fold_bn",
    "FoldAffine": "ptool.passes.fold_affine",
    "MergeBranches": "ptool.passes.merge_branches",
    "RepBatchNorm": "ptool.passes.repbn",
    "LinearAttention": "ptool.passes.attention.passes",
    "SparseAttention": "ptool.passes.attention.passes",
    "SigmoidAttention": "ptool.passes.attention.passes",
    "SoftplusAttention": "ptool.passes.attention.passes",
    "parse_pass": "ptool.passes.registry",
    "list_passes": "ptool.passes.registry",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ptool.passes' has no attribute '{name}'")
