"""Small ``onnx_ir`` graph edits the ONNX passes share: op tests, attributes, constants, new
initializers with fresh names, removal of constants nothing reads any more."""

from __future__ import annotations

import fnmatch
from typing import Any

import numpy as np
import onnx_ir as ir

ONNX_DOMAINS = ("", "ai.onnx")
PROVENANCE_KEY = "ptool.from_pass"


def is_op(node: ir.Node | None, *op_types: str) -> bool:
    return node is not None and node.domain in ONNX_DOMAINS and node.op_type in op_types


def int_attr(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return default if attr is None or attr.is_ref() else attr.as_int()


def float_attr(node: ir.Node, name: str, default: float) -> float:
    attr = node.attributes.get(name)
    return default if attr is None or attr.is_ref() else attr.as_float()


def constant(value: ir.Value | None, what: str) -> np.ndarray | str:
    """The value's constant tensor as numpy, or why it is not a usable constant."""
    if value is None:
        return f"{what} is missing"
    if value.is_graph_input():
        return f"{what} '{value.name}' is a graph input (it can be overridden at run time)"
    tensor = ir.convenience.get_const_tensor(value)
    if tensor is None:
        return f"{what} '{value.name}' is computed at run time, not a constant"
    return tensor.numpy()


def optional_input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if len(node.inputs) > index else None


class Rewriter:
    """Graph edits shared by the rules: fresh initializer names and removal of dead constants."""

    def __init__(self, model: ir.Model, pass_name: str) -> None:
        self.model = model
        self.pass_name = pass_name
        self._taken: set[str] = set(model.graph.initializers)
        for node in model.graph.all_nodes():
            self._taken.update(v.name for v in (*node.inputs, *node.outputs) if v is not None and v.name)
        self._taken.update(v.name for v in model.graph.inputs if v.name)

    def initializer(self, base: str, array: np.ndarray, suffix: str = "_folded") -> ir.Value:
        """A new initializer holding ``array``, named ``<base><suffix>`` (numbered when taken)."""
        name, n = f"{base}{suffix}", 1
        while name in self._taken:
            n += 1
            name = f"{base}{suffix}{n}"
        self._taken.add(name)
        tensor = ir.tensor(np.require(array, requirements="C"), name=name)  # a scalar stays rank 0
        value = ir.Value(name=name, type=ir.TensorType(tensor.dtype), shape=ir.Shape(array.shape), const_value=tensor)
        self.model.graph.register_initializer(value)
        return value

    def node_name(self, base: str) -> str:
        """``base``, numbered if a node of the model already has that name (ORT wants them unique)."""
        if not hasattr(self, "_node_names"):
            self._node_names = {n.name for n in self.model.graph.all_nodes() if n.name}
        name, n = base, 1
        while name in self._node_names:
            n += 1
            name = f"{base}_{n}"
        self._node_names.add(name)
        return name

    def take_over(self, old: ir.Value, new: ir.Value) -> None:
        """``new`` (the same values) replaces ``old`` for every reader; a graph output keeps its name."""
        new.type, new.shape = old.type, old.shape
        if old.is_graph_output():
            name, old.name = old.name, f"{old.name}/{self.pass_name}_replaced"
            new.name = name
        ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)

    def set_input(self, node: ir.Node, index: int, value: ir.Value) -> ir.Value | None:
        """Point ``node``'s input ``index`` at ``value``; return what it read before."""
        if len(node.inputs) <= index:
            node.resize_inputs(index + 1)
        old = node.inputs[index]
        node.replace_input_with(index, value)
        return old

    def drop_if_dead(self, values: list[ir.Value | None]) -> None:
        """Remove initializers and Constant nodes that nothing reads any more."""
        for value in values:
            if value is None or value.uses() or value.is_graph_output() or value.is_graph_input():
                continue
            producer = value.producer()
            if value.is_initializer() and value.graph is not None:
                value.graph.initializers.pop(value.name, None)
            elif is_op(producer, "Constant") and producer.graph is not None:
                producer.graph.remove(producer, safe=True)

    def mark(self, node: ir.Node) -> None:
        node.metadata_props[PROVENANCE_KEY] = self.pass_name


def accepted_site(node: ir.Node, found: Any, exclude: tuple[str, ...], result: Any) -> Any:
    """``found`` (a site's data) unless it is a reason string or an ``exclude`` pattern matches the
    node name; the reason goes to ``result.skip`` (an empty reason: not a site, nothing said)."""
    label = f"{node.name or '?'} ({node.op_type})"
    if isinstance(found, str):
        if found:
            result.skip(label, found)
        return None
    pattern = next((p for p in exclude if fnmatch.fnmatchcase(node.name or "", p)), None)
    if pattern is not None:
        result.skip(label, f"kept float: matches exclude pattern '{pattern}'")
        return None
    return found


class NodeBuilder:
    """New nodes for one site, named after it and marked with the pass that made them; inserted
    together before or after the site."""

    def __init__(self, rw: Rewriter, site: ir.Node) -> None:
        self.rw, self.site, self.nodes = rw, site, []
        self.base = (site.name or site.op_type).replace("/", "_").strip("_") or "q"

    def op(self, op_type: str, inputs: list, *, outputs: int = 1, domain: str = "", **attributes) -> list[ir.Value]:
        node = ir.node(op_type, inputs, attributes=attributes, domain=domain, num_outputs=outputs,
                       name=self.rw.node_name(f"{self.site.name or self.base}/{self.rw.pass_name}/{op_type}"))
        node.metadata_props[PROVENANCE_KEY] = self.rw.pass_name
        self.nodes.append(node)
        return list(node.outputs)

    def one(self, op_type: str, inputs: list, **kw) -> ir.Value:
        return self.op(op_type, inputs, **kw)[0]

    def const(self, name: str, array: np.ndarray) -> ir.Value:
        return self.rw.initializer(f"{self.base}_{name}", np.asarray(array), suffix="")

    def insert_before(self) -> None:
        self.site.graph.insert_before(self.site, self.nodes)

    def insert_after(self) -> None:
        self.site.graph.insert_after(self.site, self.nodes)
