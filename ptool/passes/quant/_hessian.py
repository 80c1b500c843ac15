"""Second moments of Linear inputs on calibration data: GPTQ's Hessian ``2 X^T X / n``, AWQ's ``mean|x|``.

Streamed call by call (:func:`~ptool.ir.record.visit_values`): only the running sums are kept,
``(in, in)`` float64 per recorded input, never the activations themselves. Inputs are recorded in
chunks of at most :data:`MAX_BYTES` of sums, one run over the calibration calls per chunk.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ptool.ir.record import Substitutions, visit_values

MAX_BYTES = 1 << 30


@dataclass
class InputStats:
    """Running sums over the tokens (rows of the last axis) one Linear input took."""

    width: int
    xtx: torch.Tensor = field(init=False)
    abs_sum: torch.Tensor = field(init=False)
    tokens: int = 0

    def __post_init__(self) -> None:
        self.xtx = torch.zeros(self.width, self.width, dtype=torch.float64)
        self.abs_sum = torch.zeros(self.width, dtype=torch.float64)

    def add(self, x: torch.Tensor) -> None:
        rows = x.detach().reshape(-1, self.width).float()
        self.xtx += (rows.T @ rows).double()  # float32 products per call, float64 across calls
        self.abs_sum += rows.abs().sum(0).double()
        self.tokens += rows.shape[0]

    @property
    def hessian(self) -> torch.Tensor:
        """``H = 2 X^T X / n`` (float64): the layer-wise squared output error is ``e H e^T / 2``."""
        return 2 * self.xtx / max(self.tokens, 1)

    @property
    def mean_abs(self) -> torch.Tensor:
        """``mean|x_j|`` per input channel (float64)."""
        return self.abs_sum / max(self.tokens, 1)


def collect(gm: fx.GraphModule, nodes: Sequence[fx.Node], calls: Sequence[tuple[tuple, dict]],
            replace: Substitutions | None = None) -> dict[fx.Node, InputStats]:
    """:class:`InputStats` of every node's value (last axis: channels) over the calls."""
    stats: dict[fx.Node, InputStats] = {}
    chunk: list[fx.Node] = []
    budget = 0

    def flush() -> None:
        def visit(values: dict) -> None:
            for node in chunk:
                value = values[node]
                stats.setdefault(node, InputStats(value.shape[-1])).add(value)

        if chunk:
            visit_values(gm, chunk, calls, visit, replace)
            chunk.clear()

    for node in dict.fromkeys(nodes):
        width = _width(node)
        if chunk and budget + 8 * width * width > MAX_BYTES:
            flush()
            budget = 0
        chunk.append(node)
        budget += 8 * width * width
    flush()
    return stats


def _width(node: fx.Node) -> int:
    val = node.meta.get("val")
    return int(val.shape[-1]) if isinstance(val, torch.Tensor) and val.dim() else 1
