"""``repquant``: turn per-channel post-LayerNorm quantization into per-tensor, exactly (RepQuant / RepQ-ViT).

LayerNorm outputs have a few channels with much wider ranges than the rest, so they want one
``(s_c, z_c)`` per channel; integer kernels want one ``(s, z)`` per tensor. When every consumer
of the LayerNorm is a Linear, the per-channel grid can be moved into the LayerNorm's affine and
the Linears' weights. With the per-channel parameters calibrated on the LayerNorm output ``y``
(unsigned ``bits``-bit, asymmetric):

    s~ = mean(s),  z~ = round(mean(z)),  r = s / s~,  b = s~ (z~ - z)   [= (-z s) / r - (-z~ s~)]
    LayerNorm:  gamma' = gamma / r,  beta' = beta / r - b          so  y' = y / r - b
    consumers:  W' = W diag(r),  b_lin' = b_lin + W' b              so  W' y' + b_lin' = W y + b_lin

The float model is unchanged (up to rounding; ``Close``). So is the *quantized* one:
``y'/s~ + z~ = y/s_c + z_c`` with ``z_c - z~`` an integer, so rounding and clamping give the same
integers on both grids, and ``diag(r) (s~ (q - z~)) + diag(r) b = s_c (q - z_c)``: per-tensor
fake quantization of ``y'`` followed by the new Linear equals per-channel fake quantization of
``y`` followed by the old one, in exact arithmetic (tests check 1e-10 in float64).

The pass re-parameterizes and records the per-tensor parameters, for a quantizer to use:
``node.meta["ptool.repquant"]`` on each rewritten LayerNorm holds a :class:`Reparam` (the
per-channel and per-tensor parameters, ``r`` and ``b``); the notes list ``(s~, z~)`` per site.
It inserts no quantizer itself, so it keeps the float model's outputs.

Calibration: the per-channel range is the min-max of the LayerNorm output over the calibration
data (``observer=minmax``), or clipped at a percentile on each side separately
(``observer=percentile``; RepQuant's dual clipping, here not learned).

Limits: ``aten.layer_norm`` over the last axis only, whose every consumer is a ``linear`` /
``addmm`` (GPT-2 ``Conv1D``) reading it as its input, through views and token picks that keep
the channel axis. Post-LN models (BERT) are skipped: their LayerNorm output is also the residual
stream. RMSNorm (Llama) is skipped: it has no beta to carry the zero-point shift ``b``. Tied
consumer weights (GPT-2's ``lm_head``) are skipped rather than untied.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.fx as fx

from ptool.errors import PassError, first_line
from ptool.ir.graph import add_tensor, attr_tensor, is_op, mark, module_path, replace_tensor
from ptool.ir.record import record_values
from ptool.passes.base import Family, Pass, PassContext, PassResult
from ptool.passes.fold_affine._layers import Layer, fold_inputs
from ptool.passes.quant._consumers import linear_consumers
from ptool.passes.quant.quantizers import IntRange, range_qparams
from ptool.verify import Close, Numerics

aten = torch.ops.aten

MAX_ROWS = 65536  # calibration rows kept per site for percentile clipping
_OBSERVERS = ("minmax", "percentile")


@dataclass(frozen=True)
class Reparam:
    """Per-channel ``(scale, zero_point)`` and the per-tensor pair that replaces them (float64).

    ``ratio`` (r) and ``shift`` (b) are the LayerNorm/Linear rewrite: ``y' = y / r - b``.
    """

    scale: torch.Tensor
    zero_point: torch.Tensor
    tensor_scale: float
    tensor_zero_point: float
    ratio: torch.Tensor
    shift: torch.Tensor
    bits: int

    @property
    def grid(self) -> IntRange:
        return IntRange(self.bits, signed=False)


def reparameterize(scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> Reparam:
    """``s~ = mean(s)``, ``z~ = round(mean(z))``, ``r = s / s~``, ``b = s~ (z~ - z)`` (float64)."""
    s, z = scale.double(), zero_point.double()
    s_t = s.mean()
    z_t = torch.round(z.mean())
    return Reparam(s, z, float(s_t), float(z_t), s / s_t, s_t * (z_t - z), bits)


def per_channel_qparams(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel unsigned ``(scale, zero_point)`` covering ``[lo_c, hi_c]``; scales floored at 1e-6 x max."""
    scale, zp = range_qparams(lo.float(), hi.float(), IntRange(bits, signed=False))
    scale = scale.double()
    return scale.clamp_min(float(scale.max()) * 1e-6), zp.double()


# ---------------------------------------------------------------------------------------------
# sites


@dataclass
class _Site:
    node: fx.Node  # the aten.layer_norm
    layers: list[Layer]
    label: str


def _is_rms_norm(node: fx.Node) -> bool:
    """``aten.rms_norm``, or the ``rsqrt(mean(x^2) + eps)`` of a decomposed RMSNorm."""
    if is_op(node, aten.rms_norm):
        return True
    if not is_op(node, aten.rsqrt) or not is_op(node.args[0], aten.add):
        return False
    return any(is_op(a, aten.mean) and is_op(a.args[0], aten.pow) for a in node.args[0].args)


def _sites(gm: fx.GraphModule, result: PassResult) -> list[_Site]:
    sites = []
    for node in gm.graph.nodes:
        label = f"{node.name} ({module_path(node)})"
        if _is_rms_norm(node):
            result.skip(label, "RMSNorm, not LayerNorm: no beta to carry the zero-point shift")
            continue
        if not is_op(node, aten.layer_norm):
            continue
        if "ptool.repquant" in node.meta:
            result.skip(label, "already re-parameterized")
            continue
        if len(node.args[1]) != 1:
            result.skip(label, f"normalizes over {len(node.args[1])} axes; a Linear reads one")
            continue
        found = linear_consumers(gm, node)
        if isinstance(found, str):
            result.skip(label, found)
            continue
        sites.append(_Site(node, found, label))
    return sites


# ---------------------------------------------------------------------------------------------
# the rewrite


def _affine(gm: fx.GraphModule, ln: fx.Node, index: int, width: int, fill: float) -> torch.Tensor:
    """The LayerNorm's gamma (index 2) or beta (3) as float64, created (ones/zeros) if absent."""
    args = list(ln.args) + [None] * (4 - len(ln.args))
    if args[index] is None:
        dtype = ln.meta["val"].dtype
        node = add_tensor(gm, "", f"{ln.name}_{'weight' if index == 2 else 'bias'}",
                          torch.full((width,), fill, dtype=dtype), parameter=True, before=ln)
        args[index] = node
        ln.args = tuple(args)
    return attr_tensor(gm, ln.args[index]).detach().double()


def _rewrite(gm: fx.GraphModule, site: _Site, rep: Reparam, pass_name: str) -> None:
    ln, width = site.node, rep.ratio.numel()
    gamma, beta = _affine(gm, ln, 2, width, 1.0), _affine(gm, ln, 3, width, 0.0)
    dtype = attr_tensor(gm, ln.args[2]).dtype
    replace_tensor(gm, ln.args[2], (gamma / rep.ratio).to(dtype), user=ln, name="weight")
    replace_tensor(gm, ln.args[3], (beta / rep.ratio - rep.shift).to(dtype), user=ln, name="bias")
    for layer in site.layers:  # layer(y) = layer'(y'):  W' = W diag(r),  b' = b + W diag(r) b
        fold_inputs(gm, layer, rep.ratio, rep.ratio * rep.shift, pass_name)
    ln.meta["ptool.repquant"] = rep
    mark(ln, pass_name)


# ---------------------------------------------------------------------------------------------
# the pass


@dataclass(frozen=True, kw_only=True)
class RepQuant(Pass):
    """Re-parameterize per-channel post-LayerNorm quantization into per-tensor (RepQuant), exactly.

    Args:
        bits: width of the (unsigned, asymmetric) activation grid the parameters are for (2..16).
        observer: ``minmax`` (each channel's range) or ``percentile`` (each side clipped at
            ``percentile``, separately: dual clipping).
        percentile: for ``observer=percentile``, in (50, 100].
    """

    name: ClassVar[str] = "repquant"
    family: ClassVar[Family] = Family.QUANTIZATION
    numerics: ClassVar[Numerics] = Close(rtol=1e-5)  # the float model is unchanged (see module doc)
    needs_calibration: ClassVar[bool] = True

    bits: int = 8
    observer: Literal["minmax", "percentile"] = "minmax"
    percentile: float = 99.99

    def __post_init__(self) -> None:
        if self.observer not in _OBSERVERS:
            raise ValueError(f"observer must be one of {', '.join(_OBSERVERS)}; got {self.observer!r}")
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 16:
            raise ValueError(f"bits must be an integer in 2..16; got {self.bits!r}")
        if not 50 < self.percentile <= 100:
            raise ValueError(f"percentile must be in (50, 100]; got {self.percentile}")

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        ctx.require_calibration(self.name)
        calls = list(ctx.calibration_calls) if ctx.calibration_calls else [(tuple(a), {}) for a in ctx.calibration]
        result = PassResult()
        sites = _sites(gm, result)
        if not sites:
            return result
        try:
            runs = record_values(gm, [s.node for s in sites], calls)
        except Exception as e:
            raise PassError(f"pass '{self.name}': the graph cannot run the calibration data ({first_line(e)}); "
                            "calibration inputs must fit the captured shapes") from e
        notes: dict[str, Any] = {}
        for site in sites:
            rows = torch.cat([run[site.node].detach().double().reshape(-1, run[site.node].shape[-1]) for run in runs])
            lo, hi = self._range(rows)
            rep = reparameterize(*per_channel_qparams(lo, hi, self.bits), self.bits)
            _rewrite(gm, site, rep, self.name)
            notes[site.label] = {"scale": rep.tensor_scale, "zero_point": rep.tensor_zero_point,
                                 "consumers": [layer.node.name for layer in site.layers],
                                 "ratio_min": float(rep.ratio.min()), "ratio_max": float(rep.ratio.max())}
            result.hit()
        result.notes["sites"] = notes
        return result

    def _range(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel ``(lo, hi)`` of ``rows`` (tokens x channels)."""
        if self.observer == "minmax":
            return rows.amin(0), rows.amax(0)
        if rows.shape[0] > MAX_ROWS:
            rows = rows[torch.linspace(0, rows.shape[0] - 1, MAX_ROWS).round().long()]
        q = self.percentile / 100
        return torch.quantile(rows, 1 - q, dim=0), torch.quantile(rows, q, dim=0)
