"""Before/after distribution diagnostics of the Linear inputs a quantization transform rewrites.

Values are recorded at each site's first Linear input (the other readers of a site see the same
value) on the calibration calls, before the pass edits anything and again after it. The notes
hold, per site, how it was transformed and :func:`~ptool.passes.quant.diagnostics.activation_stats`
before and after, plus the mean of each statistic over the sites.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ptool.passes.quant._sites import Site, record_inputs
from ptool.passes.quant.diagnostics import activation_stats


@dataclass
class SiteReport:
    """Input values per site's first Linear (``values``) and how each site was transformed (``how``)."""

    values: dict[fx.Node, torch.Tensor]
    stats: dict[str, dict[str, float]] = field(default_factory=dict)
    how: dict[str, str] = field(default_factory=dict)

    @classmethod
    def before(cls, gm: fx.GraphModule, sites: Sequence[Site], calls: Sequence[tuple[tuple, dict]]) -> SiteReport:
        values = record_inputs(gm, [s.layers[0].x for s in sites], calls)
        by_layer = {s.layers[0].node: values[s.layers[0].x] for s in sites}
        return cls(by_layer, {s.label: activation_stats(by_layer[s.layers[0].node]) for s in sites})

    def after(self, gm: fx.GraphModule, sites: Sequence[Site], calls: Sequence[tuple[tuple, dict]]) -> dict:
        """The notes: ``{"sites": {label: {how, before, after}}, "mean": {before, after}}``."""
        values = record_inputs(gm, [s.layers[0].x for s in sites], calls)
        per_site, before, after = {}, [], []
        for s in sites:
            b, a = self.stats[s.label], activation_stats(values[s.layers[0].x])
            per_site[s.label] = {"how": self.how.get(s.label, ""), "before": b, "after": a}
            before.append(b)
            after.append(a)
        return {"sites": per_site, "mean": {"before": _mean(before), "after": _mean(after)}}


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]} if rows else {}
