"""Record intermediate values of a graph while it runs its own calls (calibration, causality checks).

:func:`recording` temporarily inserts one side-effect node after each node of interest, so the
GraphModule keeps its own calling convention (pytree inputs, keyword arguments) and the values
are captured exactly as the graph computes them. The graph is restored on exit, even on error.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.fx as fx


@contextlib.contextmanager
def recording(gm: fx.GraphModule, nodes: Iterable[fx.Node], *, detach: bool = True) -> Iterator[list[dict]]:
    """Within the block, each call of ``gm`` appends ``{node: value}`` for ``nodes`` to the yielded list."""
    runs: list[dict] = []
    wanted = list(dict.fromkeys(nodes))
    inserted = []

    def recorder_for(node: fx.Node):
        def ptool_record(value):
            if not runs or node in runs[-1]:
                runs.append({})
            runs[-1][node] = value.detach() if detach and isinstance(value, torch.Tensor) else value
            return value

        return ptool_record

    try:
        for node in wanted:
            with gm.graph.inserting_after(node):
                inserted.append(gm.graph.call_function(recorder_for(node), (node,)))
        gm.recompile()
        yield runs
    finally:
        for rec in inserted:
            gm.graph.erase_node(rec)
        gm.recompile()


def record_values(gm: fx.GraphModule, nodes: Sequence[fx.Node], calls: Sequence[tuple[tuple, dict]]) -> list[dict]:
    """Run ``gm`` on every ``(args, kwargs)`` call (no grad); one ``{node: value}`` dict per call."""
    out = []
    with recording(gm, nodes) as runs, torch.no_grad():
        for args, kwargs in calls:
            runs.clear()
            runs.append({})
            gm(*args, **kwargs)
            out.append(runs[-1])
    return out
