"""AWQ (Lin et al., 2023): per-input-channel scales that protect the weights of the salient inputs.

For the Linears reading one input ``x`` (a site of :mod:`._sites`: q/k/v, gate/up, o_proj,
down_proj, ...), ``y = x W^T = (x diag(1/s)) (W diag(s))^T`` exactly; quantizing ``W diag(s)``
instead of ``W`` scales up the columns of the inputs with a large ``mean|x_j|``, so their
relative rounding error shrinks (the grid of each group is set by its largest weights, which a
moderate ``s`` leaves in place). The scale is searched, not learned, over the two published forms

    s(alpha) = mean|x|^alpha                        (AWQ)
    s(alpha) = mean|x|^alpha / mean|w^|^(1 - alpha)  (AutoAWQ's "duo" scaling; w^ = |W| over its group's max)

each normalized by ``sqrt(max s * min s)``, ``alpha in {0, 1/grid, ..., (grid-1)/grid}``, keeping
the one whose quantized layers, ``(x / s) Q(W diag(s))^T``, are closest to the float outputs on
the calibration inputs, summed over the site's Linears. ``Q`` is the quantizer applied in the end
(round to nearest with the data-aware clipping below), so the search scores exactly what is
stored. The error is computed from the input's second moments, ``tr(dW H dW^T)`` with
``H = X^T X`` (:mod:`._hessian`), which equals the squared output error over all calibration
tokens without keeping them. ``alpha = 0`` of the first form is no scaling, so a site is never
scaled to a larger error than it has unscaled. Per-head sites (v -> o_proj) use one ``head_dim``
vector for every head (the mean over heads), so the fold into the value projection stays exact
with grouped-query heads.

Where ``1/s`` goes (all exact in real arithmetic, folded in float64 and cast once):

- ``into-norm``: a LayerNorm/RMSNorm affine (gamma, beta) or a stored ``gamma * x`` feeding only
  the site;
- ``into-linear`` / ``into-value`` / ``into-product``: the output rows of a preceding Linear
  (through views; the value projection through attention; SwiGLU's up_proj);
- ``online``: otherwise (a post-LN output that is also the residual stream, GELU -> fc2, an
  input), a ``mul`` by the stored vector ``1/s`` before the Linears.

Every searched layer is quantized by round-to-nearest with AWQ's data-aware clipping: each
group's clip factor minimizes its share of the output error, ``e H_gg e^T``, in the scaled
coordinates (``H' = diag(1/s) H diag(1/s)``), instead of the weight error RTN uses.

Limits: the error is layer-wise (the paper measures a whole block's output, e.g. attention for
q/k/v); sites whose Linears are not all quantized (``exclude``, ``keep_float``), and Linears
with a tied or computed weight, are not scaled (the notes say why).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx

from ptool.ir.graph import attr_tensor
from ptool.passes.fold_affine._layers import fold_inputs
from ptool.passes.quant import _hessian, _sites
from ptool.passes.quant import quantizers as qz
from ptool.passes.quant.gptq import Levels

aten = torch.ops.aten

_HOW = {_sites.NormScale: "into-norm", _sites.LinearOutput: "into-linear", _sites.HeadOutput: "into-value",
        _sites.ProductOutput: "into-product"}


@dataclass
class Search:
    """The chosen scale of one site: ``s`` (float64, per input channel), its ``form`` (``"x"`` or
    ``"x/w"``) and ``alpha``, and the relative output error (``tr(dW H dW^T) / tr(W H W^T)`` over
    the site's Linears) with it and with plain round-to-nearest (no scale, data-free clipping:
    ``method=rtn``)."""

    s: torch.Tensor
    form: str
    alpha: float
    error: float
    rtn_error: float


def search_scale(weights: Sequence[torch.Tensor], hessian: torch.Tensor, mean_abs: torch.Tensor, *, bits: int,
                 group_size: int, grid: int, head_dim: int | None = None) -> Search:
    """The grid search of the module docstring for Linears ``weights`` (each ``(out, in)``) reading
    one input with Hessian ``hessian`` and channel means ``mean_abs``."""
    w = torch.cat([x.detach().float() for x in weights])
    h = hessian.float()
    reference = float(((w @ h) * w).sum()) or 1.0

    def error_of(w_hat: torch.Tensor) -> float:
        dw = w_hat - w
        return float(((dw @ h) * dw).sum()) / reference

    act = mean_abs.double()
    groups = w.abs().reshape(w.shape[0], -1, group_size)
    w_mean = (groups / groups.amax(-1, keepdim=True).clamp_min(1e-30)).reshape(w.shape).mean(0).double()
    if head_dim is not None:  # one vector for every head
        act, w_mean = act.view(-1, head_dim).mean(0), w_mean.view(-1, head_dim).mean(0)
    best: Search | None = None
    for form in ("x", "x/w"):
        for k in range(grid):
            alpha = k / grid
            s = act.pow(alpha) if form == "x" else act.pow(alpha) / (w_mean.pow(1 - alpha) + 1e-4)
            s = s.clamp_min(1e-4)
            s = s / (s.max() * s.min()).sqrt()
            if head_dim is not None:
                s = s.repeat(w.shape[1] // head_dim)
            sf = s.float()
            levels = qz.quantize_weight_asymmetric(w * sf, bits, group_size, hessian=hessian / torch.outer(s, s))
            error = error_of(qz.dequantize_groups(*levels) / sf)
            if best is None or error < best.error:
                best = Search(s, form, alpha, error, float("nan"))
    best.rtn_error = error_of(qz.dequantize_groups(*qz.quantize_weight_asymmetric(w, bits, group_size)))
    return best


def weight_of(gm: fx.GraphModule, layer) -> torch.Tensor:
    """A site layer's stored weight as ``(out, in)``."""
    w = attr_tensor(gm, layer.weight).detach()
    return w.T if layer.kind == "addmm" else w


def apply_awq(gm: fx.GraphModule, calls: Sequence[tuple[tuple, dict]], eligible: set[fx.Node], *, bits: int,
              group_size: int, grid: int, pass_name: str) -> tuple[dict[fx.Node, Levels], dict[str, dict]]:
    """Search and fold the scales of every site whose Linears are all in ``eligible``, then quantize
    their (scaled) weights with the data-aware clipping.

    Returns the levels of each searched Linear and the notes: per site ``{"form", "alpha",
    "how", "error", "rtn_error"}`` (``error``: the relative output error of the levels returned, summed
    over the site's Linears), or ``{"how": "not scaled: <why>"}``.
    """
    sites, left_out = _sites.find_sites(gm, lambda layer: layer.node in eligible)
    notes: dict[str, dict] = {label: {"how": f"not scaled: {why}"} for label, why in left_out}
    todo = []
    for site in sites:
        widths = {weight_of(gm, layer).shape[1] for layer in site.layers}
        if len(widths) != 1 or next(iter(widths)) % group_size:
            notes[site.label] = {"how": f"not scaled: width not a multiple of group_size {group_size}"}
        else:
            todo.append(site)
    stats = _hessian.collect(gm, [site.layers[0].x for site in todo], calls)
    hessians: dict[fx.Node, torch.Tensor] = {}
    done = []
    for site in todo:
        st = stats[site.layers[0].x]
        producer = site.producer
        head_dim = producer.head_dim if isinstance(producer, _sites.HeadOutput) else None
        found = search_scale([weight_of(gm, layer) for layer in site.layers], st.hessian, st.mean_abs, bits=bits,
                             group_size=group_size, grid=grid, head_dim=head_dim)
        how = "kept (no scale is best)"
        if found.form != "x" or found.alpha > 0:
            how = _fold(gm, site, found.s, pass_name)
        hessians[site.layers[0].node] = st.hessian / torch.outer(found.s, found.s)  # the input is x / s now
        notes[site.label] = {"form": found.form, "alpha": found.alpha, "how": how, "error": found.error,
                             "rtn_error": found.rtn_error}
        done.append(site)
    # after every fold: a later site may have scaled this one's output rows (per-row grids scale along)
    levels: dict[fx.Node, Levels] = {}
    for site in done:
        h = hessians[site.layers[0].node]
        err = ref = 0.0
        for layer in site.layers:
            w = weight_of(gm, layer).float()
            q = Levels(*qz.quantize_weight_asymmetric(w, bits, group_size, hessian=h))
            dw = q.dequantized().double() - w.double()
            err += float(((dw @ h) * dw).sum())
            ref += float(((w.double() @ h) * w.double()).sum())
            levels[layer.node] = q
        notes[site.label]["error"] = err / ref if ref > 0 else 0.0
    return levels, notes


def _fold(gm: fx.GraphModule, site: _sites.Site, s: torch.Tensor, pass_name: str) -> str:
    """``W diag(s)`` into the site's Linears, ``1/s`` into its producer or a stored mul; how it went."""
    for layer in site.layers:
        fold_inputs(gm, layer, s, None, pass_name)
    producer = site.producer
    if producer is None:
        dtype = attr_tensor(gm, site.layers[0].weight).dtype
        _sites.insert_online(gm, site, aten.mul.Tensor, (1.0 / s).to(dtype), "awq_inverse_scale", pass_name)
        return f"online ({site.why_online})"
    _sites.scale_producer(gm, producer, 1.0 / s, pass_name)
    return _HOW[type(producer)]
