"""Which FX nodes are pure functions of their inputs (safe to share, fold or delete)."""

from __future__ import annotations

import operator

import torch
import torch.fx

_PURE_PYTHON = {operator.getitem}


def is_pure(node: torch.fx.Node) -> bool:
    """True for call_function nodes with no side effects and deterministic results.

    ATen ops qualify when their schema mutates nothing and they are not seeded-random
    (``nondeterministic_seeded``); of plain Python callables only ``operator.getitem``.
    """
    if node.op != "call_function":
        return False
    target = node.target
    if target in _PURE_PYTHON:
        return True
    if isinstance(target, torch._ops.OpOverload):
        schema = target._schema
        if schema.is_mutable or any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments):
            return False
        if torch.Tag.nondeterministic_seeded in target.tags or torch.Tag.nondeterministic_bitwise in target.tags:
            return False
        return not node.is_impure()
    return False
