"""Uniform quantizers and observers: the arithmetic every quantization pass shares.

Conventions (ONNX's, so lowering is a copy):

- ``q = clamp(round(x / scale) + zero_point, qmin, qmax)``, ``x_hat = (q - zero_point) * scale``;
  rounding is half-to-even, as ``torch.round`` and ONNX ``QuantizeLinear`` do.
- Weights: symmetric (zero point 0), signed, one scale per output channel (``axis=0`` of a
  ``(out, in)`` weight), or per group of ``group_size`` consecutive input channels (int4
  weight-only). The signed range is made symmetric (``[-127, 127]`` at 8 bits) so ``-w``
  quantizes to ``-q``.
- Activations: one scale per tensor, asymmetric ``uint8`` by default (``[0, 255]`` with a zero
  point) or symmetric ``int8``; or dynamic: the range of each tensor (or each token) measured
  when it is computed.

Observers watch calibration activations and turn them into ``(scale, zero_point)``: ``minmax``
(the whole range), ``percentile`` (clip the tails at a percentile of ``|x|``, for outliers) and
``mse`` (the clipping range that minimizes the quantization MSE on what was seen).

Also here: :func:`sqnr` and :func:`outlier_stats`, the fidelity and distribution diagnostics the
quantization passes report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

ObserverKind = Literal["minmax", "percentile", "mse"]


@dataclass(frozen=True)
class IntRange:
    """The integer grid of a ``bits``-bit (un)signed type, symmetric if ``narrow`` (signed only)."""

    bits: int
    signed: bool = True
    narrow: bool = True

    @property
    def qmin(self) -> int:
        if not self.signed:
            return 0
        return -(2 ** (self.bits - 1)) + (1 if self.narrow else 0)

    @property
    def qmax(self) -> int:
        return 2 ** self.bits - 1 if not self.signed else 2 ** (self.bits - 1) - 1


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | int, grid: IntRange) -> torch.Tensor:
    """Integer levels of ``x`` (as the float dtype of ``x``; cast to store them)."""
    return torch.clamp(torch.round(x / scale) + zero_point, grid.qmin, grid.qmax)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | int = 0) -> torch.Tensor:
    return (q - zero_point) * scale


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | int, grid: IntRange) -> torch.Tensor:
    """``dequantize(quantize(x))``: what the integer kernel computes, in float."""
    return dequantize(quantize(x, scale, zero_point, grid), scale, zero_point)


# ---------------------------------------------------------------------------------------------
# weights


def weight_scales(w: torch.Tensor, bits: int = 8, group_size: int | None = None) -> torch.Tensor:
    """Symmetric scales of a ``(out, in)`` weight: shape ``(out, 1)``, or ``(out, in/group, 1)`` per group."""
    grid = IntRange(bits)
    w = _grouped(w, group_size)
    amax = w.abs().amax(dim=-1, keepdim=True)
    return (amax / grid.qmax).clamp_min(torch.finfo(torch.float32).tiny)


def _grouped(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    if group_size is None:
        return w
    out, inp = w.shape
    if inp % group_size:
        raise ValueError(f"input width {inp} is not a multiple of group_size {group_size}")
    return w.reshape(out, inp // group_size, group_size)


def quantize_weight(w: torch.Tensor, bits: int = 8, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(levels as int8, scales)`` of a ``(out, in)`` weight; levels keep the weight's shape."""
    scale = weight_scales(w, bits, group_size)
    q = quantize(_grouped(w, group_size), scale, 0, IntRange(bits))
    return q.reshape(w.shape).to(torch.int8), scale


def fake_quantize_weight(w: torch.Tensor, bits: int = 8, group_size: int | None = None) -> torch.Tensor:
    """The weight as the integer kernel sees it (per-channel or per-group symmetric)."""
    scale = weight_scales(w, bits, group_size)
    return fake_quantize(_grouped(w, group_size), scale, 0, IntRange(bits)).reshape(w.shape)


def quantize_weight_asymmetric(w: torch.Tensor, bits: int, group_size: int, clip_search: bool = True,
                               hessian: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-group asymmetric levels of a ``(out, in)`` weight: ``(levels, scales, zero_points)``.

    Levels and zero points are unsigned (``[0, 2^bits - 1]``, uint8), shapes ``(out, in)`` and
    ``(out, in/group)``; scales ``(out, in/group)``. With ``clip_search`` each group's range is
    shrunk by the factor in ``1, 0.98, ..., 0.62`` that minimizes its squared rounding error
    (the same search as GPTQ/AWQ-style clipping, without data), or, given the layer's input
    ``hessian`` ``H = X^T X`` (``(in, in)``), the error of the group's share of the layer output,
    ``e H_gg e^T`` (AWQ's data-aware clipping: ``H_gg`` is the group's diagonal block).
    """
    grid = IntRange(bits, signed=False)
    x = _grouped(w.float(), group_size)
    blocks = None
    if hessian is not None:
        groups = x.shape[1]
        h = hessian.float().reshape(groups, group_size, groups, group_size)
        blocks = torch.stack([h[k, :, k, :] for k in range(groups)])  # (groups, g, g)
    scale, zero = asymmetric_qparams(x, grid, clip_search, blocks)
    q = quantize(x, scale, zero, grid)
    return q.reshape(w.shape).to(torch.uint8), scale.squeeze(-1), zero.squeeze(-1).to(torch.uint8)


#: Elements the clip search handles at once (its temporaries then fit in the CPU's cache).
_SEARCH_ELEMENTS = 1 << 18


def asymmetric_qparams(x: torch.Tensor, grid: IntRange, clip_search: bool = True,
                       hessian_blocks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero_point)`` of each row of ``x`` (``(..., n)``, one grid per last-axis row; shapes
    ``(..., 1)``) over its range, shrunk by the clip factor that minimizes the row's squared error
    (weighted by ``hessian_blocks`` ``(groups, n, n)`` for ``x`` of shape ``(out, groups, n)``, see
    :func:`quantize_weight_asymmetric`)."""
    rows = max(1, _SEARCH_ELEMENTS // max(1, x[0].numel())) if x.dim() > 1 else x.shape[0] + 1
    if clip_search and x.shape[0] > rows:  # blocks of rows that stay in cache: 2-11x less CPU on a vocab-sized head
        parts = [asymmetric_qparams(block, grid, True, hessian_blocks) for block in x.split(rows)]
        return torch.cat([s for s, _ in parts]), torch.cat([z for _, z in parts])
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    best = None
    for factor in ([1.0 - 0.02 * k for k in range(20)] if clip_search else [1.0]):
        scale, zero = range_qparams(lo * factor, hi * factor, grid)
        if not clip_search:
            return scale, zero
        e = dequantize(quantize(x, scale, zero, grid), scale, zero) - x
        if hessian_blocks is None:
            err = e.pow(2).sum(-1, keepdim=True)
        else:
            err = torch.einsum("rgi,gij,rgj->rg", e, hessian_blocks, e).unsqueeze(-1)
        if best is None:
            best = [scale, zero, err]
            continue
        better = err < best[2]
        best = [torch.where(better, scale, best[0]), torch.where(better, zero, best[1]), torch.minimum(err, best[2])]
    return best[0], best[1]


def dequantize_groups(levels: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """The ``(out, in)`` weight that per-group ``levels`` (``(out, in)``), ``scales`` and ``zeros``
    (``(out, groups)``) stand for: ``(levels - zero) * scale``, group by group."""
    out, width = levels.shape
    groups = scales.shape[-1]
    shaped = levels.float().reshape(out, groups, width // groups)
    return ((shaped - zeros.float()[..., None]) * scales.float()[..., None]).reshape(out, width)


# ---------------------------------------------------------------------------------------------
# activations


def range_qparams(lo: torch.Tensor | float, hi: torch.Tensor | float, grid: IntRange) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero_point)`` covering ``[lo, hi]`` (which is widened to include 0, as ONNX requires).

    Symmetric (zero point 0) on a signed grid; asymmetric with an integer zero point on an
    unsigned one.
    """
    lo = torch.as_tensor(lo, dtype=torch.float32).clamp(max=0)
    hi = torch.as_tensor(hi, dtype=torch.float32).clamp(min=0)
    tiny = torch.finfo(torch.float32).tiny
    if grid.signed:
        scale = (torch.maximum(-lo, hi) / grid.qmax).clamp_min(tiny)
        return scale, torch.zeros_like(scale)
    scale = ((hi - lo) / (grid.qmax - grid.qmin)).clamp_min(tiny)
    zero_point = torch.clamp(torch.round(grid.qmin - lo / scale), grid.qmin, grid.qmax)
    return scale, zero_point


def fake_quantize_dynamic(x: torch.Tensor, grid: IntRange, per_token: bool = False) -> torch.Tensor:
    """Quantize with the range of ``x`` itself (of each token's last axis if ``per_token``)."""
    if per_token:
        lo, hi = x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True)
    else:
        lo, hi = x.min(), x.max()
    scale, zero_point = range_qparams(lo, hi, grid)
    return fake_quantize(x, scale, zero_point, grid)


@dataclass
class Observer:
    """Collects what a calibration run shows an activation and proposes ``(scale, zero_point)``.

    ``minmax`` keeps the running range; ``percentile`` and ``mse`` keep a subsample of values
    (at most ``max_samples``, spread over the batches) to place the clipping range.
    """

    kind: ObserverKind = "minmax"
    percentile: float = 99.99
    max_samples: int = 1 << 18
    lo: float = math.inf
    hi: float = -math.inf
    samples: list[torch.Tensor] = field(default_factory=list)

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        self.lo = min(self.lo, float(x.min()))
        self.hi = max(self.hi, float(x.max()))
        if self.kind != "minmax":
            flat = x.flatten()
            step = max(1, flat.numel() * 8 // self.max_samples)
            self.samples.append(flat[::step].clone())

    def qparams(self, grid: IntRange) -> tuple[torch.Tensor, torch.Tensor]:
        if self.lo > self.hi:
            raise ValueError("observer saw no data")
        if self.kind == "minmax":
            return range_qparams(self.lo, self.hi, grid)
        values = torch.cat(self.samples)
        if values.numel() > self.max_samples:
            values = values[torch.randperm(values.numel(), generator=torch.Generator().manual_seed(0))[: self.max_samples]]
        if self.kind == "percentile":
            q = self.percentile / 100
            return range_qparams(torch.quantile(values, 1 - q), torch.quantile(values, q), grid)
        return _mse_qparams(values, self.lo, self.hi, grid)


def _mse_qparams(values: torch.Tensor, lo: float, hi: float, grid: IntRange) -> tuple[torch.Tensor, torch.Tensor]:
    """Shrink the min-max range by factors in (0, 1] and keep the one with the least quantization MSE."""
    best, best_err = None, math.inf
    for factor in torch.linspace(1.0, 0.3, 36).tolist():
        scale, zero_point = range_qparams(lo * factor, hi * factor, grid)
        err = float((fake_quantize(values, scale, zero_point, grid) - values).pow(2).mean())
        if err < best_err:
            best, best_err = (scale, zero_point), err
    return best


# ---------------------------------------------------------------------------------------------
# diagnostics


def sqnr(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (higher is better; +6 dB per bit for uniform data)."""
    noise = (reference.double() - approx.double()).pow(2).mean()
    signal = reference.double().pow(2).mean()
    return float(10 * torch.log10(signal / noise.clamp_min(1e-300)))


def outlier_stats(x: torch.Tensor) -> dict[str, float]:
    """How hard ``x`` (tokens x channels) is to quantize per tensor.

    ``max_over_rms``: the largest |value| over the RMS (a per-tensor grid spends its range on the
    max); ``kurtosis``: of all values (3 for a Gaussian, large with outliers);
    ``channel_max_ratio``: the largest channel's max |x| over the median channel's.
    """
    x = x.detach().double().reshape(-1, x.shape[-1])
    flat = x.flatten()
    centred = flat - flat.mean()
    var = centred.pow(2).mean().clamp_min(1e-300)
    channel_max = x.abs().amax(0)
    return {
        "max_over_rms": float(flat.abs().max() / flat.pow(2).mean().sqrt().clamp_min(1e-300)),
        "kurtosis": float(centred.pow(4).mean() / var.pow(2)),
        "channel_max_ratio": float(channel_max.max() / channel_max.median().clamp_min(1e-300)),
    }
