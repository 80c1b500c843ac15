"""smooth-quant: migrate activation outliers into the weights with per-channel scales (SmoothQuant).

For a group of Linears reading one input ``x`` (q/k/v, gate/up, fc1, o_proj, down/fc2):

    y = x W^T = (x diag(1/s)) (W diag(s))^T,   s_j = max|x_j|^alpha / max_i |W_ij|^(1 - alpha)

(Xiao et al., 2023), with ``max|x_j|`` measured on the calibration data and ``max|W_ij|`` over all
the group's weights. Exact in real arithmetic; the folds are computed in float64 and cast once.
``W diag(s)`` is folded into every reader; ``1/s`` goes where it costs nothing when possible
(see :mod:`._sites`):

- a norm's affine / per-channel multiplier (pre-LN ViT, GPT-2 ``ln_1``/``ln_2``, Llama RMSNorm
  ``gamma``): ``gamma' = gamma / s``, ``beta' = beta / s``;
- a preceding Linear's output rows, including the value projection through attention
  (v -> o_proj; the scale is then shared by all heads, ``s`` reduced to one ``head_dim`` vector
  by taking the per-head maxima, so grouped-query heads stay consistent) and SwiGLU's up_proj
  (``silu(gate) * (up / s)``);
- otherwise, with ``online=True``, a ``mul`` by the stored vector ``1/s`` before the Linears
  (BERT's post-LN outputs, which are also the residual stream; GELU -> fc2); with
  ``online=False`` such sites are skipped with the reason.

The pass reports, per site, :func:`~ptool.passes.quant.quantizers.outlier_stats` and QSUR of the
Linear inputs before and after (``notes["sites"]``) and their means (``notes["mean"]``).

Limits: linears (``aten.linear``, GPT-2 ``addmm``) with stored, untied weights; tied heads (GPT-2
lm_head) are skipped. Scales are clamped to [1e-5, 1e5]; a channel never active in calibration
keeps ``s = 1``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx

from ptool.ir.graph import attr_tensor
from ptool.passes.base import Family, Pass, PassContext, PassResult
from ptool.passes.fold_affine._layers import fold_inputs
from ptool.passes.quant import _sites
from ptool.passes.quant._report import SiteReport
from ptool.verify import Close, Numerics

__all__ = ["SmoothQuant", "smoothing_scales"]

aten = torch.ops.aten
_S_RANGE = (1e-5, 1e5)


def smoothing_scales(act_max: torch.Tensor, weight_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s = act_max^alpha / weight_max^(1-alpha)`` per channel (float64); 1 where either max is 0."""
    act_max, weight_max = act_max.double(), weight_max.double()
    s = act_max.pow(alpha) / weight_max.pow(1 - alpha)
    ok = (act_max > 0) & (weight_max > 0) & torch.isfinite(s)
    return torch.where(ok, s, torch.ones_like(s)).clamp(*_S_RANGE)


def _weight_max(gm: fx.GraphModule, site: _sites.Site) -> torch.Tensor:
    """max |W_ij| over every reader's output rows, per input channel j."""
    maxima = []
    for layer in site.layers:
        w = attr_tensor(gm, layer.weight).detach().double()
        maxima.append((w.t() if layer.kind == "addmm" else w).abs().amax(0))
    return torch.stack(maxima).amax(0)


@dataclass(frozen=True, kw_only=True)
class SmoothQuant(Pass):
    """Per-channel smoothing scales folded into norms/linears (SmoothQuant; exact in float).

    Args:
        alpha: migration strength in [0, 1]: 0 leaves the activations alone, 1 moves all of
            their range into the weights.
        online: where no norm/linear can absorb ``1/s``, insert a ``mul`` by a stored vector
            (else skip the site with the reason).
        layers: module-path substrings selecting the Linears to smooth (empty: all).
    """

    name: ClassVar[str] = "smooth-quant"
    family: ClassVar[Family] = Family.QUANTIZATION
    numerics: ClassVar[Numerics] = Close(atol=0.0, rtol=1e-5)
    needs_calibration: ClassVar[bool] = True
    alpha: float = 0.5
    online: bool = True
    layers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1] (the migration strength), got {self.alpha}")

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        calls = ctx.require_calibration_calls(self.name)
        result = PassResult()
        sites, left_out = _sites.find_sites(gm, _sites.module_filter(self.layers))
        for label, reason in left_out:
            result.skip(label, reason)
        todo = []
        for site in sites:
            if site.done_by(self.name):
                result.skip(site.label, "already smoothed by an earlier smooth-quant run")
            elif site.producer is None and not self.online:
                result.skip(site.label, f"not foldable: {site.why_online} (online=true inserts a mul by 1/s)")
            else:
                todo.append(site)
        if not todo:
            return result
        report = SiteReport.before(gm, todo, calls)
        counts: dict[str, int] = {}
        for site in todo:
            how = self._smooth(gm, site, report.values[site.layers[0].node])
            counts[how] = counts.get(how, 0) + 1
            report.how[site.label] = how
            site.mark_done(self.name)
            result.hit()
        gm.recompile()
        result.notes.update(counts)
        result.notes.update(report.after(gm, todo, calls))
        return result

    def _smooth(self, gm: fx.GraphModule, site: _sites.Site, x: torch.Tensor) -> str:
        """Smooth one site; return how ``1/s`` was absorbed."""
        act_max, w_max = x.double().abs().amax(0), _weight_max(gm, site)
        producer = site.producer
        if isinstance(producer, _sites.HeadOutput):  # one scale vector shared by all heads
            dh = producer.head_dim
            act_max, w_max = act_max.view(-1, dh).amax(0), w_max.view(-1, dh).amax(0)
        s = smoothing_scales(act_max, w_max, self.alpha)
        if isinstance(producer, _sites.HeadOutput):
            s = s.repeat(site.width(gm) // producer.head_dim)
        for layer in site.layers:
            fold_inputs(gm, layer, s, None, self.name)
        if producer is None:
            dtype = attr_tensor(gm, site.layers[0].weight).dtype
            _sites.insert_online(gm, site, aten.mul.Tensor, (1.0 / s).to(dtype), "smooth_inverse_scale", self.name)
            return "online"
        _sites.scale_producer(gm, producer, 1.0 / s, self.name)
        return {_sites.NormScale: "into-norm", _sites.LinearOutput: "into-linear", _sites.HeadOutput: "into-value",
                _sites.ProductOutput: "into-product"}[type(producer)]
