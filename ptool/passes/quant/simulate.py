"""Simulated weight/activation quantization of every Linear in a graph (for evaluating transforms).

:func:`simulate_quantization` returns a copy of a graph in which every ``aten.linear`` /
``addmm`` with a stored weight computes ``Q_a(x) Q_w(W)^T + b``:

- ``Q_w``: per-output-channel (or per-group) symmetric ``weight_bits`` fake quantization
  (:func:`~ptool.passes.quant.quantizers.fake_quantize_weight`), applied once to the stored weight;
- ``Q_a``: dynamic symmetric ``act_bits`` fake quantization of the Linear's input, one scale per
  token (:func:`fake_quantize_activation`, a node inserted before the Linear).

Because it only looks at Linears, the same simulation applies to a graph before and after
``smooth-quant`` / ``rotate``: online transforms run in float before the quantizer, as a kernel
that fuses "transform, then quantize" would. Biases, embeddings, norms, attention and the online
transforms stay in float. It is an accuracy simulation, not a deployable model.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.fx as fx

from ptool.ir.graph import attr_tensor, mark, module_path, replace_tensor
from ptool.passes.fold_affine._layers import as_layer
from ptool.passes.quant.quantizers import IntRange, fake_quantize_dynamic, fake_quantize_weight

__all__ = ["fake_quantize_activation", "simulate_quantization"]

_TAG = "simulate-quantization"


def fake_quantize_activation(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-token dynamic symmetric ``bits``-bit fake quantization (one scale per row of the last dim)."""
    return fake_quantize_dynamic(x, IntRange(bits), per_token=True)


def simulate_quantization(gm: fx.GraphModule, *, weight_bits: int | None = 4, act_bits: int | None = 8,
                          group_size: int | None = None, exclude: Sequence[str] = ()) -> fx.GraphModule:
    """A copy of ``gm`` whose Linears see fake-quantized weights and inputs.

    Args:
        weight_bits: weight bits (None: float weights).
        act_bits: activation bits (None: float activations).
        group_size: weight scales per group of this many input channels (None: per channel).
        exclude: module-path substrings of Linears to leave in float (e.g. ``("lm_head",)``).

    Returns:
        The simulated copy (``gm`` is unchanged).
    """
    sim = copy.deepcopy(gm)
    for node in list(sim.graph.nodes):
        layer = as_layer(node)
        if layer is None or layer.kind not in ("linear", "addmm") or any(p in module_path(node) for p in exclude):
            continue
        w = attr_tensor(sim, layer.weight)
        if w is None:
            continue
        if weight_bits is not None:
            w_out_in = w.detach().t() if layer.kind == "addmm" else w.detach()
            wq = fake_quantize_weight(w_out_in.float(), weight_bits, group_size).to(w.dtype)
            replace_tensor(sim, layer.weight, wq.t().contiguous() if layer.kind == "addmm" else wq,
                           user=node, name="weight")
        if act_bits is not None:
            with sim.graph.inserting_before(node):
                q = mark(sim.graph.call_function(fake_quantize_activation, (layer.x, act_bits)), _TAG)
            node.replace_input_with(layer.x, q)
    sim.graph.lint()
    sim.recompile()
    return sim
