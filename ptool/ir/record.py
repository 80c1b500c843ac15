"""Record intermediate values of a graph while it runs its own calls (calibration, causality checks)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.fx as fx

#: ``node -> (fn, args)``: while the calls run, ``node``'s users read ``fn(*args)`` instead of it
#: (``args`` may name ``node`` itself, and other graph nodes).
Substitutions = Mapping[fx.Node, tuple[Callable, tuple]]


def visit_values(gm: fx.GraphModule, nodes: Sequence[fx.Node], calls: Sequence[tuple[tuple, dict]],
                 visit: Callable[[dict], None], replace: Substitutions | None = None) -> None:
    """Run ``gm`` on every ``(args, kwargs)`` call (no grad) and hand ``visit`` one ``{node: value}``
    dict per call, as soon as that call is done (nothing is kept between calls).

    One side-effect node is inserted after each node of interest for the duration of the calls,
    so the GraphModule keeps its own calling convention (pytree inputs, keyword arguments); the
    graph is restored afterwards, even on error. With ``replace``, each substituted node's users
    (recorders included) read ``fn(*args)`` in its place: what a later layer sees once an earlier
    one is changed (sequential calibration), without editing the model.
    """
    current: dict = {}

    def recorder_for(node: fx.Node):
        def ptool_record(value):
            current[node] = value.detach() if isinstance(value, torch.Tensor) else value
            return value

        return ptool_record

    inserted: list[fx.Node] = []
    rewired: list[tuple[fx.Node, fx.Node, fx.Node]] = []
    try:
        seen: dict[fx.Node, fx.Node] = {}
        for node, (fn, args) in (replace or {}).items():
            with gm.graph.inserting_after(node):
                new = gm.graph.call_function(fn, tuple(args))
            inserted.append(new)
            seen[node] = new
        for node, new in seen.items():
            for user in list(node.users):
                if user is not new:
                    user.replace_input_with(node, new)
                    rewired.append((user, node, new))
        for node in dict.fromkeys(nodes):
            source = seen.get(node, node)
            with gm.graph.inserting_after(source):
                inserted.append(gm.graph.call_function(recorder_for(node), (source,)))
        gm.recompile()
        with torch.no_grad():
            for args, kwargs in calls:
                current = {}
                gm(*args, **kwargs)
                visit(current)
    finally:
        for user, node, new in reversed(rewired):
            user.replace_input_with(new, node)
        for node in reversed(inserted):
            gm.graph.erase_node(node)
        gm.recompile()


def record_values(gm: fx.GraphModule, nodes: Sequence[fx.Node], calls: Sequence[tuple[tuple, dict]]) -> list[dict]:
    """Run ``gm`` on every ``(args, kwargs)`` call (no grad); one ``{node: value}`` dict per call
    (:func:`visit_values`, keeping every call's values)."""
    out: list[dict] = []
    visit_values(gm, nodes, calls, out.append)
    return out
