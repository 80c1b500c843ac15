"""Record intermediate values of a graph while it runs its own calls (calibration, causality checks)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.fx as fx


def record_values(gm: fx.GraphModule, nodes: Sequence[fx.Node], calls: Sequence[tuple[tuple, dict]]) -> list[dict]:
    """Run ``gm`` on every ``(args, kwargs)`` call (no grad); one ``{node: value}`` dict per call.

    One side-effect node is inserted after each node of interest for the duration of the calls,
    so the GraphModule keeps its own calling convention (pytree inputs, keyword arguments); the
    graph is restored afterwards, even on error.
    """
    current: dict = {}

    def recorder_for(node: fx.Node):
        def ptool_record(value):
            current[node] = value.detach() if isinstance(value, torch.Tensor) else value
            return value

        return ptool_record

    inserted = []
    out = []
    try:
        for node in dict.fromkeys(nodes):
            with gm.graph.inserting_after(node):
                inserted.append(gm.graph.call_function(recorder_for(node), (node,)))
        gm.recompile()
        with torch.no_grad():
            for args, kwargs in calls:
                current = {}
                gm(*args, **kwargs)
                out.append(current)
    finally:
        for rec in inserted:
            gm.graph.erase_node(rec)
        gm.recompile()
    return out
