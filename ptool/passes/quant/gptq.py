"""GPTQ (Frantar et al., 2022): int4 weight levels chosen against the layer's calibration inputs.

For a Linear ``y = x W^T`` with calibration inputs ``X`` (``n x in``), the quantized ``W_hat``
minimizes the output error ``||X (W_hat - W)^T||^2 = sum_rows e H e^T / 2`` with
``H = 2 X^T X / n`` (the ``(in, in)`` Hessian of the squared error, shared by every output row).
Columns are quantized one at a time (round-to-nearest on the group's grid), and each column's
error ``e_j = (w_j - q_j) / [H^-1]_jj`` is spread over the columns not yet quantized,
``w_k -= e_j [H^-1]_jk`` (the optimal brain surgeon update). Written with the upper Cholesky
factor ``U`` of ``H^-1`` (``H^-1 = U^T U``), the updates of the columns after ``j`` are row ``j`` of
``U``; applying them lazily, ``block`` columns at a time with one matrix product for the rest,
is the same arithmetic (the "lazy batch" form of the paper). ``H`` is damped by ``damp`` times its
mean diagonal before the Cholesky; input channels never active on the calibration data have a
zero row and column in ``H`` and get a 1 on the diagonal (their weights are quantized, no error
is fed to them or from them).

The grid is the one ``linear_int4`` stores: asymmetric 4-bit levels, one scale and zero point per
``group_size`` consecutive inputs of each output row, so every backend runs the result unchanged.
A group's grid is set when the sweep reaches its first column, from the weights as the updates
left them (with the same clip search as round-to-nearest). With ``act_order`` the columns are
swept in decreasing ``diag(H)`` order (the most active inputs first, while most columns are left
to absorb their error); the groups then stay the stored ones (consecutive original columns),
so their grids are set before the sweep from the original weights ("static groups").

:func:`gptq_layers` runs the layers of a graph in dependency order ("waves"): a wave's inputs are
recorded with every earlier wave already quantized (substituted while the calibration calls run,
:func:`~ptool.ir.record.visit_values`), so each layer corrects for the error of the layers before
it, as the reference implementation's sequential mode does. The cost is one run over the
calibration calls per wave (four per decoder layer), each keeping only the ``(in, in)`` sums of
that wave's inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx

from ptool.passes.quant import _hessian
from ptool.passes.quant import quantizers as qz
from ptool.progress import steps as progress

#: Columns per lazy OBS batch (the paper's 128), rounded to whole groups.
BLOCK = 128


@dataclass
class Levels:
    """A weight as ``linear_int4`` stores it: ``levels`` (``(out, in)`` uint8), ``scales`` and
    ``zeros`` (``(out, in/group)``, float32 / uint8); ``error`` and ``rtn_error``: the relative
    layer-output error ``tr(dW H dW^T) / tr(W H W^T)`` on the calibration inputs of these levels
    and of round-to-nearest."""

    levels: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    error: float = float("nan")
    rtn_error: float = float("nan")

    def dequantized(self) -> torch.Tensor:
        return qz.dequantize_groups(self.levels, self.scales, self.zeros)


def output_error(w: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr(dW H dW^T) / tr(W H W^T)``: the layer's relative squared output error on the inputs of ``H``."""
    h = hessian.double()
    dw = (w_hat.double() - w.double())
    ref = float(((w.double() @ h) * w.double()).sum())
    return float(((dw @ h) * dw).sum()) / ref if ref > 0 else 0.0


def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, *, bits: int = 4, group_size: int, damp: float = 0.01,
                  act_order: bool = False) -> Levels:
    """GPTQ levels of one ``(out, in)`` weight given its inputs' Hessian (``(in, in)``, see the module docstring).

    Raises:
        ValueError: ``in`` is not a multiple of ``group_size``.
    """
    grid = qz.IntRange(bits, signed=False)
    rows, cols = w.shape
    if cols % group_size:
        raise ValueError(f"input width {cols} is not a multiple of group_size {group_size}")
    groups = cols // group_size
    w = w.detach().float().clone()
    h = hessian.detach().double().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    scales = torch.empty(rows, groups)
    zeros = torch.empty(rows, groups)
    if act_order:  # static groups: every grid from the original weights, before the permuted sweep
        s, z = qz.asymmetric_qparams(w.reshape(rows, groups, group_size), grid)
        scales, zeros = s.squeeze(-1), z.squeeze(-1)
        perm = torch.argsort(h.diagonal(), descending=True, stable=True)
        w, h = w[:, perm], h[perm][:, perm]
    else:
        perm = torch.arange(cols)
    u = _inverse_cholesky(h, damp).float()
    levels = torch.empty(rows, cols)
    block = max(1, BLOCK // group_size) * group_size
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.empty_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            group = int(perm[col]) // group_size
            if not act_order and col % group_size == 0:  # this group's grid, from the updated weights
                s, z = qz.asymmetric_qparams(w1[:, i:i + group_size], grid)
                scales[:, group], zeros[:, group] = s.squeeze(-1), z.squeeze(-1)
            s, z = scales[:, group], zeros[:, group]
            q = qz.quantize(w1[:, i], s, z, grid)
            levels[:, col] = q
            e = (w1[:, i] - qz.dequantize(q, s, z)) / u1[i, i]
            w1[:, i:] -= e[:, None] * u1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    if act_order:
        levels = levels[:, torch.argsort(perm)]
    return Levels(levels.to(torch.uint8), scales, zeros.to(torch.uint8))


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) I)^-1``; the damping grows tenfold (up to
    4 times) while the damped ``H`` is not positive definite."""
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    mean = float(h.diagonal().mean())
    for attempt in range(5):
        factor, info = torch.linalg.cholesky_ex(h + damp * 10 ** attempt * mean * eye)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(factor)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper
    raise ValueError(f"the damped Hessian is not positive definite even at damp={damp * 1e4:g}")


# ------------------------------------------------------------------------------------ graphs
@dataclass
class Layer:
    """One Linear to quantize: its node, its input node and its weight as ``(out, in)``."""

    node: fx.Node
    x: fx.Node
    weight: torch.Tensor


def waves(gm: fx.GraphModule, layers: Sequence[Layer]) -> list[list[Layer]]:
    """The layers in dependency order: wave ``k`` holds those whose input depends on ``k`` layers of
    the list at most (q/k/v; o_proj; gate/up; down_proj; ... for a decoder block)."""
    by_node = {layer.node: layer for layer in layers}
    level: dict[fx.Node, int] = {}
    out: dict[int, list[Layer]] = {}
    for node in gm.graph.nodes:
        depth = max((level[a] for a in node.all_input_nodes if a in level), default=0)
        if node in by_node:
            out.setdefault(depth, []).append(by_node[node])
            depth += 1
        level[node] = depth
    return [out[k] for k in sorted(out)]


def gptq_layers(gm: fx.GraphModule, layers: Sequence[Layer], calls: Sequence[tuple[tuple, dict]], *,
                bits: int = 4, group_size: int, damp: float, act_order: bool, desc: str = "gptq"
                ) -> dict[fx.Node, Levels]:
    """GPTQ every layer, wave by wave, each on inputs recorded with the earlier waves quantized."""
    done: dict = {}
    out: dict[fx.Node, Levels] = {}
    ordered = waves(gm, layers)
    with progress(len(ordered), desc) as bar:
        for wave in ordered:
            stats = _hessian.collect(gm, [layer.x for layer in wave], calls, replace=done)
            for layer in wave:
                h = stats[layer.x].hessian
                result = gptq_quantize(layer.weight, h, bits=bits, group_size=group_size, damp=damp,
                                       act_order=act_order)
                w_hat = result.dequantized()
                result.error = output_error(layer.weight, w_hat, h)
                rtn = qz.quantize_weight_asymmetric(layer.weight, bits, group_size)
                result.rtn_error = output_error(layer.weight, qz.dequantize_groups(*rtn), h)
                out[layer.node] = result
                done[layer.node] = (_corrected((w_hat - layer.weight.float()).T.contiguous()), (layer.node, layer.x))
            if bar is not None:
                bar.update(1)
    return out


def _corrected(dw_t: torch.Tensor):
    """``y -> y + x dW^T``: the quantized layer's output from the float one (``dw_t``: ``(in, out)``)."""

    def ptool_quantized_output(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return y + (x.float() @ dw_t).to(y.dtype)

    return ptool_quantized_output
