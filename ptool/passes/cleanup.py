"""Cleanup passes: dead-code elimination, common-subexpression elimination, constant folding.

Equivalence claims:
- ``dce``: removing a pure node whose value nobody reads cannot change any output (bit-exact).
- ``cse``: two pure nodes with the same op and the same inputs compute the same value; keeping
  one is bit-exact.
- ``constant-fold``: a pure node whose inputs are all weights/constants computes the same tensor
  at transform time as at run time (bit-exact on the same device; declared ``Close`` because a
  backend may later reorder float math around the folded value). An attention mask that folds to
  "hide nothing" (all ``True``, or all zeros when additive) is dropped from its
  ``scaled_dot_product_attention``: the softmax is the same without it, and the kernel no longer
  reads and applies it (Hugging Face's ViT passes such a mask to every layer; written-out bf16
  attention ran 0.25 ms a layer faster without it).

Limits: only ``call_function`` nodes are touched; seeded-random and mutating ops are never shared
or folded; folding is refused when it would grow the model (a large ``expand`` of a small
constant, or a transpose of a weight that is also used untransposed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.fx

from ptool.ir.graph import (
    add_tensor,
    eliminate_dead_code,
    erase_if_unused,
    is_op,
    is_parameter,
    mark,
    module_path,
    op_name,
    owner_of,
)
from ptool.ir.noise import node_args
from ptool.ir.purity import is_pure
from ptool.passes.base import Family, Pass, PassContext, PassResult
from ptool.verify import Close, Exact, Numerics


@dataclass(frozen=True, kw_only=True)
class DeadCodeElimination(Pass):
    """Remove nodes whose results are never used (pure ops only)."""

    name: ClassVar[str] = "dce"
    family: ClassVar[Family] = Family.CLEANUP
    numerics: ClassVar[Numerics] = Exact()

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult()
        result.hit(eliminate_dead_code(gm))
        # get_attr nodes nobody reads are dead too (not counted as compute sites)
        result.changed |= erase_if_unused(gm, [n for n in gm.graph.nodes if n.op == "get_attr"]) > 0
        return result


def _key(value: Any) -> Any:
    """A hashable, structural key for node arguments (lists become tuples, nodes stay nodes)."""
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_key(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((k, _key(v)) for k, v in value.items())))
    if isinstance(value, torch.fx.Node):
        return ("node", value)
    if isinstance(value, float):
        return ("float", value.hex())  # -0.0 vs 0.0 and nan spellings stay distinct
    if isinstance(value, (torch.dtype, torch.device, torch.memory_format, torch.layout)):
        return (type(value).__name__, str(value))
    return (type(value).__name__, value)


@dataclass(frozen=True, kw_only=True)
class CommonSubexpressionElimination(Pass):
    """Share pure nodes that compute the same op on the same inputs."""

    name: ClassVar[str] = "cse"
    family: ClassVar[Family] = Family.CLEANUP
    numerics: ClassVar[Numerics] = Exact()

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult()
        seen: dict[Any, torch.fx.Node] = {}
        attrs: dict[str, torch.fx.Node] = {}
        for node in list(gm.graph.nodes):
            if node.op == "get_attr":  # several reads of one weight: keep the first
                first = attrs.setdefault(node.target, node)
                if first is not node:
                    node.replace_all_uses_with(first)
                    gm.graph.erase_node(node)
                    result.changed = True
                continue
            if not is_pure(node):
                continue
            key = (node.target, _key(node.args), _key(node.kwargs))
            try:
                existing = seen.setdefault(key, node)
            except TypeError:  # an argument we cannot hash: leave the node alone
                continue
            if existing is not node:
                node.replace_all_uses_with(existing)
                gm.graph.erase_node(node)
                result.hit()
        return result


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


@dataclass(frozen=True, kw_only=True)
class ConstantFold(Pass):
    """Precompute pure nodes whose inputs are all weights or constants.

    Args:
        max_growth_bytes: the most weight bytes the whole pass may add to the model (each fold's
            result minus the constants it frees, summed; default 1 MiB: small masks and index
            tensors fold, a large ``expand`` does not). A fold past it is skipped, with the reason.
    """

    name: ClassVar[str] = "constant-fold"
    family: ClassVar[Family] = Family.CLEANUP
    numerics: ClassVar[Numerics] = Close(atol=0.0, rtol=1e-6)
    max_growth_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        if self.max_growth_bytes < 0:
            raise ValueError(f"max_growth_bytes must be >= 0 (0: only folds that add no bytes), "
                             f"got {self.max_growth_bytes}")

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult()
        values: dict[torch.fx.Node, Any] = {}
        from_param: dict[torch.fx.Node, bool] = {}
        for node in gm.graph.nodes:
            if node.op == "get_attr":
                values[node] = _get(gm, node.target)
                from_param[node] = is_parameter(gm, node)
                continue
            inputs = node.all_input_nodes
            if not is_pure(node) or not all(i in values for i in inputs):
                continue
            if any(isinstance(v, torch.Tensor) and v.is_meta for v in (values[i] for i in inputs)):
                continue
            try:
                args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: values[n])
                with torch.no_grad():
                    values[node] = node.target(*args, **kwargs)
            except Exception:  # not evaluable at transform time (e.g. needs a symbolic size)
                continue
            from_param[node] = any(from_param[i] for i in inputs)

        for node in list(gm.graph.nodes):
            if _drop_noop_mask(node, values):
                result.hit()
                result.notes.setdefault("dropped_noop_masks", []).append(module_path(node))

        # fold the frontier: constant nodes read by at least one non-constant node
        grown = 0
        for node in list(values):
            if node.op == "get_attr" or not isinstance(values[node], torch.Tensor):
                continue
            if all(u in values for u in node.users):
                continue
            growth = _nbytes(values[node]) - sum(_nbytes(values[a]) for a in _freed_attrs(node, values))
            if grown + growth > self.max_growth_bytes:
                result.skip(f"{node.name} ({op_name(node)})",
                            f"folding would add {growth} weight bytes to the {grown} already added "
                            f"(max_growth_bytes={self.max_growth_bytes} for the whole pass)")
                continue
            grown += growth
            owner = _common_owner(node, values)
            new = add_tensor(gm, owner, f"folded_{node.name}", values[node].contiguous(), parameter=from_param[node], before=node)
            mark(new, self.name)
            node.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)
            result.hit()
        if result.changed:
            eliminate_dead_code(gm)
        return result


def _drop_noop_mask(node: torch.fx.Node, values: dict) -> bool:
    """Drop the ``attn_mask`` of an SDPA node when its constant value hides no key (all ``True``
    when boolean, all zeros when additive); whether it did."""
    if not is_op(node, torch.ops.aten.scaled_dot_product_attention):
        return False
    args, index = node_args(node)
    value = values.get(args[index["attn_mask"]])
    if not isinstance(value, torch.Tensor) or value.is_meta:
        return False
    if not (bool(value.all()) if value.dtype == torch.bool else bool((value == 0).all())):
        return False
    if index["attn_mask"] < len(node.args):
        node.update_arg(index["attn_mask"], None)
    else:
        node.update_kwarg("attn_mask", None)
    return True


def _get(gm: torch.nn.Module, qualname: str) -> Any:
    owner, _, attr = qualname.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, attr)


def _const_ancestors(node: torch.fx.Node, values: dict) -> set[torch.fx.Node]:
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        for i in n.all_input_nodes:
            if i in values and i not in seen:
                seen.add(i)
                stack.append(i)
    return seen


def _freed_attrs(node: torch.fx.Node, values: dict) -> list[torch.fx.Node]:
    """get_attr nodes that become unused once ``node`` is folded (all their users fold away)."""
    ancestors = _const_ancestors(node, values)
    closure = ancestors | {node}
    return [a for a in ancestors if a.op == "get_attr" and all(u in closure for u in a.users)]


def _common_owner(node: torch.fx.Node, values: dict) -> str:
    """Hang the folded tensor on the module that owned its inputs (keeps state_dict readable)."""
    owners = {owner_of(a.target) for a in _const_ancestors(node, values) if a.op == "get_attr"}
    return owners.pop() if len(owners) == 1 else ""
