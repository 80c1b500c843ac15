"""Graph helpers every pass needs: metadata, tensors behind ``get_attr``, edits, counts.

ptool's IR is the unlifted ``torch.fx.GraphModule`` that ``torch.export`` produces (see
``ptool/frontends/torch_export.py``): ATen ``call_function`` nodes, parameters and buffers as
``get_attr`` nodes, ``node.meta["val"]`` a FakeTensor on every value. Invariants every pass keeps:

1. ``graph.lint()`` passes and the module is recompiled (the pass manager does both).
2. Every value node has ``meta["val"]`` (the manager refreshes it with :func:`refresh_meta`).
3. Parameters stay ``nn.Parameter`` (the module stays trainable); folded constants that came
   from parameters are parameters again.
4. New nodes carry provenance in ``meta["ptool.from_pass"]`` (set with :func:`mark`).
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable

import torch
import torch.fx
from torch import nn

COMPUTE_OPS = frozenset({"call_function", "call_method", "call_module"})


def op_name(node: torch.fx.Node) -> str:
    """A short, stable name for a node's operation: ``aten.conv2d``, ``getitem``, ``call_module:fc``."""
    if node.op == "call_function":
        target = node.target
        if isinstance(target, torch._ops.OpOverload):
            return f"{target.namespace}.{target._schema.name.split('::')[-1]}"
        if isinstance(target, torch._ops.OpOverloadPacket):
            return f"{target._qualified_op_name.replace('::', '.')}"
        return getattr(target, "__name__", str(target))
    if node.op == "call_module":
        return f"call_module:{node.target}"
    if node.op == "call_method":
        return f"method.{node.target}"
    return node.op


def is_op(node: object, *targets: object) -> bool:
    """True if ``node`` is a ``call_function`` node whose target is one of ``targets``.

    Targets may be OpOverloads (``aten.conv2d.default``) or packets (``aten.conv2d``).
    """
    if not isinstance(node, torch.fx.Node) or node.op != "call_function":
        return False
    t = node.target
    packet = getattr(t, "overloadpacket", None)
    return any(t is x or packet is x for x in targets)


def compute_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """Nodes that do work (not placeholders, outputs, attributes or the export guard)."""
    return [n for n in gm.graph.nodes if n.op in COMPUTE_OPS and n.target != "_guards_fn"]


def node_count(gm: torch.fx.GraphModule) -> int:
    """Number of compute nodes: the 'nodes before/after' figure of the report."""
    return len(compute_nodes(gm))


def op_histogram(gm: torch.fx.GraphModule) -> Counter:
    """How many compute nodes of each op the graph has."""
    return Counter(op_name(n) for n in compute_nodes(gm))


def get_tensor(gm: nn.Module, qualname: str) -> torch.Tensor:
    """The parameter, buffer or constant tensor at dotted path ``qualname``."""
    owner, _, attr = qualname.rpartition(".")
    module = gm.get_submodule(owner) if owner else gm
    return getattr(module, attr)


def attr_tensor(gm: nn.Module, node: object) -> torch.Tensor | None:
    """The tensor behind a ``get_attr`` node, or None if ``node`` is not one."""
    if isinstance(node, torch.fx.Node) and node.op == "get_attr":
        value = get_tensor(gm, node.target)
        return value if isinstance(value, torch.Tensor) else None
    return None


def rounded_storage(tensor: torch.Tensor | None) -> str | None:
    """Why an exact pass must not fold into ``tensor`` (None if it may): a bf16 / fp16 weight would
    round the folded value, so the fold would no longer be exact."""
    if tensor is not None and tensor.dtype in (torch.bfloat16, torch.float16):
        return (f"weight stored in {str(tensor.dtype).removeprefix('torch.')}: folding into it would round it "
                "(run precision after the exact passes)")
    return None


def is_parameter(gm: nn.Module, node: torch.fx.Node) -> bool:
    return node.op == "get_attr" and isinstance(get_tensor(gm, node.target), nn.Parameter)


def attr_users(gm: torch.fx.GraphModule, qualname: str) -> list[torch.fx.Node]:
    """Every user of every ``get_attr`` node reading ``qualname`` (tied weights show up here)."""
    return [u for n in gm.graph.nodes if n.op == "get_attr" and n.target == qualname for u in n.users]


def _unique_attr(gm: nn.Module, owner: nn.Module, base: str) -> str:
    base = base.replace(".", "_")
    if not hasattr(owner, base) or (getattr(owner, base) is None and base in owner._parameters):
        return base
    for i in itertools.count(1):
        if not hasattr(owner, f"{base}_{i}"):
            return f"{base}_{i}"
    raise AssertionError("unreachable")


def add_tensor(
    gm: torch.fx.GraphModule,
    owner_path: str,
    name: str,
    value: torch.Tensor,
    *,
    parameter: bool,
    before: torch.fx.Node,
) -> torch.fx.Node:
    """Register ``value`` on submodule ``owner_path`` under a fresh name and return a get_attr node.

    Args:
        owner_path: dotted path of the submodule to hang it on ('' for the root).
        name: preferred attribute name (made unique).
        parameter: register an ``nn.Parameter`` (trainable) rather than a buffer.
        before: the new get_attr node is inserted before this node.
    """
    owner = gm.get_submodule(owner_path) if owner_path else gm
    attr = _unique_attr(gm, owner, name)
    value = value.detach()
    if parameter:
        owner.register_parameter(attr, nn.Parameter(value, requires_grad=value.is_floating_point()))
    else:
        owner.register_buffer(attr, value)
    qualname = f"{owner_path}.{attr}" if owner_path else attr
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(qualname)
    node.meta["val"] = value
    return node


def replace_tensor(gm: torch.fx.GraphModule, node: torch.fx.Node, value: torch.Tensor, *, user: torch.fx.Node, name: str) -> torch.fx.Node:
    """Give ``user`` a new tensor in place of the get_attr ``node`` it reads.

    Overwrites the attribute in place when ``user`` is its only reader; otherwise (tied weights)
    registers a fresh attribute so other readers keep the old value. Returns the node to use.
    """
    qualname = node.target
    owner_path, _, attr = qualname.rpartition(".")
    old = get_tensor(gm, qualname)
    parameter = isinstance(old, nn.Parameter)
    if attr_users(gm, qualname) == [user]:
        owner = gm.get_submodule(owner_path) if owner_path else gm
        new = nn.Parameter(value.detach(), requires_grad=old.requires_grad) if parameter else value.detach()
        setattr(owner, attr, new)
        node.meta["val"] = value
        return node
    new_node = add_tensor(gm, owner_path, f"{attr}_ptool", value, parameter=parameter, before=user)
    user.replace_input_with(node, new_node)
    return new_node


def owner_of(qualname: str) -> str:
    """Dotted path of the module that owns attribute ``qualname``."""
    return qualname.rpartition(".")[0]


def mark(node: torch.fx.Node, pass_name: str) -> torch.fx.Node:
    """Record which pass created or rewrote ``node`` (provenance)."""
    node.meta["ptool.from_pass"] = pass_name
    return node


def erase_if_unused(gm: torch.fx.GraphModule, nodes: Iterable[torch.fx.Node]) -> int:
    """Erase the given nodes (in reverse order) when nothing uses them. Returns how many went."""
    erased = 0
    for node in reversed(list(nodes)):
        if node.graph is gm.graph and not node.users and node.op not in ("placeholder", "output"):
            gm.graph.erase_node(node)
            erased += 1
    return erased


def remove_unused_attributes(gm: torch.fx.GraphModule) -> int:
    """Drop parameters and buffers that no get_attr node reads any more; return bytes freed.

    Keeps the module small after folds (a folded BatchNorm leaves four tensors behind). Tensors of
    submodules the graph calls (``call_module``, e.g. attention kernels) are in use.
    """
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    called = tuple(n.target + "." for n in gm.graph.nodes if n.op == "call_module")
    freed = 0
    for name, tensor in list(itertools.chain(gm.named_parameters(remove_duplicate=False), gm.named_buffers(remove_duplicate=False))):
        if name in used or name.startswith(called):
            continue
        owner_path, _, attr = name.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        if attr in owner._parameters:
            del owner._parameters[attr]
        elif attr in owner._buffers:
            del owner._buffers[attr]
        else:
            continue
        freed += tensor.numel() * tensor.element_size()
    return freed


def parameter_count(module: nn.Module) -> int:
    """Number of parameter and buffer elements that hold weights (tied tensors counted once)."""
    seen, total = set(), 0
    for t in itertools.chain(module.parameters(), module.buffers()):
        if id(t) not in seen and t.is_floating_point():
            seen.add(id(t))
            total += t.numel()
    return total


def refresh_meta(gm: torch.fx.GraphModule) -> None:
    """Recompute ``meta["val"]`` (FakeTensors) for every node after a rewrite.

    Uses the placeholders' own FakeTensors from export (with their symbolic shapes), so dynamic
    dimensions stay symbolic.
    """
    from torch._guards import detect_fake_mode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    vals = [n.meta.get("val") for n in placeholders]
    if any(v is None for v in vals):
        return  # graphs from the fallback tracer carry no fake inputs; nothing to refresh from
    mode = detect_fake_mode(vals)
    if mode is None:
        from torch._subclasses.fake_tensor import FakeTensorMode

        mode = FakeTensorMode(allow_non_fake_inputs=True)
        vals = [mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for v in vals]
    prev = mode.allow_non_fake_inputs
    mode.allow_non_fake_inputs = True
    try:
        with mode:
            FakeTensorProp(gm, mode=mode).propagate_dont_convert_inputs(*vals)
    finally:
        mode.allow_non_fake_inputs = prev


def is_export_guard(node: torch.fx.Node) -> bool:
    """The ``_guards_fn`` call torch.export inserts to check input shapes (kept: it gives clear errors)."""
    return node.op == "call_module" and node.target == "_guards_fn"


def eliminate_dead_code(gm: torch.fx.GraphModule) -> int:
    """Remove unused pure nodes (keeping placeholders, the output and the export guard).

    Returns:
        The number of compute nodes removed.
    """
    before = node_count(gm)
    gm.graph.eliminate_dead_code(is_impure_node=lambda n: is_export_guard(n) or n.is_impure())
    return before - node_count(gm)


def module_path(node: torch.fx.Node) -> str:
    """Dotted path of the module a node came from (for report sites), '<root>' or '?'."""
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        return path or "<root>"
    return "?"


def no_padding(padding: object) -> bool:
    """True if a conv's ``padding`` argument pads nothing (0, all zeros, or ``"valid"``)."""
    if isinstance(padding, str):
        return padding == "valid"
    if isinstance(padding, (list, tuple)):
        return all(p == 0 for p in padding)
    return padding in (0, None)
