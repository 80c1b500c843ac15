"""``repquant``: turn per-channel post-norm quantization into per-tensor, exactly (RepQuant / RepQ-ViT).

LayerNorm and RMSNorm outputs have a few channels with much wider ranges than the rest, so they
want one ``(s_c, z_c)`` per channel; integer kernels want one ``(s, z)`` per tensor. When every
consumer of the norm is a Linear, the per-channel grid can be moved into the norm's affine and
the Linears' weights. With the per-channel parameters calibrated on the norm output ``y``
(unsigned ``bits``-bit, asymmetric):

    s~ = mean(s),  z~ = round(mean(z)),  r = s / s~,  b = s~ (z~ - z)   [= (-z s) / r - (-z~ s~)]
    LayerNorm:  gamma' = gamma / r,  beta' = beta / r - b          so  y' = y / r - b
    RMSNorm:    gamma' = gamma / r,  then a new  + beta',  beta' = -b   (it has no beta)
    consumers:  W' = W diag(r),  b_lin' = b_lin + W' b              so  W' y' + b_lin' = W y + b_lin

The float model is unchanged (up to rounding; ``Close``). So is the *quantized* one:
``y'/s~ + z~ = y/s_c + z_c`` with ``z_c - z~`` an integer, so rounding and clamping give the same
integers on both grids, and ``diag(r) (s~ (q - z~)) + diag(r) b = s_c (q - z_c)``: per-tensor
fake quantization of ``y'`` followed by the new Linear equals per-channel fake quantization of
``y`` followed by the old one, in exact arithmetic (tests check 1e-10 in float64). Linears
without a bias (Llama's) get one.

The pass re-parameterizes and records the per-tensor parameters, for a quantizer to use:
``node.meta["ptool.repquant"]`` on the node whose output is to be quantized per tensor (the
``aten.layer_norm``; for an RMSNorm the new ``add`` of beta') holds a :class:`Reparam` (the
per-channel and per-tensor parameters, ``r`` and ``b``); the notes list ``(s~, z~)`` per site.
It inserts no quantizer itself, so it keeps the float model's outputs.

Calibration: the per-channel range is the min-max of the norm output over the calibration
data (``observer=minmax``), or clipped at a percentile on each side separately
(``observer=percentile``; RepQuant's dual clipping, here not learned).

Limits: ``aten.layer_norm`` / ``aten.rms_norm`` over the last axis only, and the decomposed
RMSNorm of Hugging Face Llama-style models (``x * rsqrt(mean(x^2) + eps)``, a cast, then a
per-channel ``weight * .`` as fold-affine parses it; when fold-affine has already folded that
weight away, a ``gamma'`` multiply is put back). Every consumer must be a ``linear`` / ``addmm``
(GPT-2 ``Conv1D``) reading the norm output as its input, through views and token picks that keep
the channel axis. Post-LN models (BERT) are skipped: their LayerNorm output is also the residual
stream. Tied consumer weights (GPT-2's ``lm_head``, a Llama with ``tie_word_embeddings``) are
skipped rather than untied. An RMSNorm site costs one extra elementwise ``add`` per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.fx as fx

from ptool.errors import PassError, first_line
from ptool.ir.analysis import is_assert
from ptool.ir.graph import add_tensor, attr_tensor, is_op, mark, module_path, owner_of, replace_tensor
from ptool.ir.record import record_values
from ptool.passes.base import Family, Pass, PassContext, PassResult
from ptool.passes.fold_affine._layers import Layer, fold_inputs, through_identity
from ptool.passes.fold_affine.constants import Affine, as_affine
from ptool.passes.quant._consumers import linear_consumers
from ptool.passes.quant.quantizers import IntRange, range_qparams
from ptool.verify import Close, Numerics

aten = torch.ops.aten

MAX_ROWS = 65536  # calibration rows kept per site for percentile clipping
_OBSERVERS = ("minmax", "percentile")


@dataclass(frozen=True)
class Reparam:
    """Per-channel ``(scale, zero_point)`` and the per-tensor pair that replaces them (float64).

    ``ratio`` (r) and ``shift`` (b) are the norm/Linear rewrite: ``y' = y / r - b``.
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
    """A norm whose output only Linears read.

    ``node`` is the norm output the Linears read: the ``aten.layer_norm`` / ``aten.rms_norm``, or
    a decomposed RMSNorm's weight multiply (its normalized value if it has none). ``gamma`` is an
    RMSNorm's stored weight (None if it has none: the rewrite creates it).
    """

    node: fx.Node
    layers: list[Layer]
    label: str
    rms: bool = False
    gamma: fx.Node | None = None


def _is_rms_norm(node: fx.Node) -> bool:
    """``aten.rms_norm``, or the ``rsqrt(mean(x^2) + eps)`` of a decomposed RMSNorm."""
    if is_op(node, aten.rms_norm):
        return True
    if not is_op(node, aten.rsqrt) or not is_op(node.args[0], aten.add):
        return False
    return any(is_op(a, aten.mean) and is_op(a.args[0], aten.pow) for a in node.args[0].args)


def _rms_output(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, fx.Node | None] | str:
    """An RMSNorm's output and stored weight (None if it has none), or why it cannot be rewritten.

    ``aten.rms_norm`` carries its weight. A decomposed one (``node`` is its rsqrt) computes
    ``x * rsqrt``, maybe casts it back to the model's dtype (Hugging Face normalizes in float32),
    and ends in ``weight * .``: a per-channel constant multiply as fold-affine parses it
    (:func:`~ptool.passes.fold_affine.constants.as_affine`). Found walking forward from the rsqrt,
    so through the cast, where fold-affine's backward check stops. Once fold-affine has folded
    the weight away, the normalized value is the output.
    """
    if is_op(node, aten.rms_norm):
        if len(node.args[1]) != 1:
            return f"normalizes over {len(node.args[1])} axes; a Linear reads one"
        weight = node.args[2] if len(node.args) > 2 else None
        if weight is not None and attr_tensor(gm, weight) is None:
            return "the RMSNorm weight is computed, not a stored weight"
        return node, weight
    readers = _readers(node)
    if len(readers) != 1 or not is_op(readers[0], aten.mul):
        return f"the rsqrt is read by {', '.join(u.name for u in readers)}, not by one x * rsqrt"
    out = readers[0]
    while len(_readers(out)) == 1 and _passes_on(_readers(out)[0], out):
        out = _readers(out)[0]
    if len(_readers(out)) == 1:
        (user,) = _readers(out)
        aff = as_affine(gm, user)
        if isinstance(aff, Affine) and aff.x is out and aff.t is None and aff.a.dim() == 1 and aff.axis == "last":
            (weight,) = [a for a in user.args if a is not out]
            return user, weight
    return out, None


def _passes_on(node: fx.Node, x: fx.Node) -> bool:
    """``node`` returns ``x`` unchanged, or cast to another float dtype."""
    if through_identity(node) is x:
        return True
    val = node.meta.get("val")
    return (is_op(node, aten.to, aten._to_copy) and node.args[0] is x and isinstance(val, torch.Tensor)
            and val.is_floating_point())


def _readers(node: fx.Node) -> list[fx.Node]:
    """``node``'s users but torch.export's shape/dtype checks (the rewrite keeps both)."""
    return [u for u in node.users if not is_assert(u)]


def _sites(gm: fx.GraphModule, result: PassResult) -> list[_Site]:
    sites = []
    for node in gm.graph.nodes:
        rms = _is_rms_norm(node)
        if not rms and not is_op(node, aten.layer_norm):
            continue
        label = f"{node.name} ({module_path(node)})"
        out, gamma = node, None
        if rms:
            found = _rms_output(gm, node)
            if isinstance(found, str):
                result.skip(label, f"RMSNorm: {found}")
                continue
            out, gamma = found
        elif len(node.args[1]) != 1:
            result.skip(label, f"normalizes over {len(node.args[1])} axes; a Linear reads one")
            continue
        if "ptool.repquant" in out.meta or any("ptool.repquant" in u.meta for u in out.users):
            result.skip(label, "already re-parameterized")
            continue
        layers = linear_consumers(gm, out)
        if isinstance(layers, str):
            result.skip(label, layers)
            continue
        sites.append(_Site(out, layers, label, rms, gamma))
    return sites


# ---------------------------------------------------------------------------------------------
# the rewrite


def _affine(gm: fx.GraphModule, ln: fx.Node, index: int, width: int, fill: float) -> torch.Tensor:
    """A norm's gamma (index 2) or LayerNorm's beta (3) as float64, created (ones/zeros) if absent."""
    args = list(ln.args) + [None] * (index + 1 - len(ln.args))
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
    _fold_consumers(gm, site, rep, pass_name)
    ln.meta["ptool.repquant"] = rep
    mark(ln, pass_name)


def _rewrite_rms(gm: fx.GraphModule, site: _Site, rep: Reparam, pass_name: str) -> None:
    """``gamma' = gamma / r`` in the RMSNorm, then a new ``+ beta'`` (``beta' = -b``) after it."""
    out, width, owner = site.node, rep.ratio.numel(), _owner(gm, site)
    if is_op(out, aten.rms_norm):  # gamma is its weight argument (ones if it has none)
        gamma = _affine(gm, out, 2, width, 1.0)
        dtype = attr_tensor(gm, out.args[2]).dtype
        replace_tensor(gm, out.args[2], (gamma / rep.ratio).to(dtype), user=out, name="weight")
        mark(out, pass_name)
    elif site.gamma is not None:  # the decomposed RMSNorm's `weight * x`
        stored = attr_tensor(gm, site.gamma)
        gamma = stored.detach().double().reshape(-1)
        replace_tensor(gm, site.gamma, (gamma / rep.ratio).reshape(stored.shape).to(stored.dtype), user=out,
                       name="weight")
        mark(out, pass_name)
    else:  # its weight was folded away (fold-affine): put one back, to carry 1 / r
        out = _append(gm, out, aten.mul.Tensor, 1 / rep.ratio, owner, "weight", pass_name)
    shifted = _append(gm, out, aten.add.Tensor, -rep.shift, owner, "bias", pass_name)
    _fold_consumers(gm, site, rep, pass_name)
    shifted.meta["ptool.repquant"] = rep


def _owner(gm: fx.GraphModule, site: _Site) -> str:
    """The module to hold the new parameters: the norm's, if the graph module still has it; else the root."""
    if site.gamma is not None:
        return owner_of(site.gamma.target)
    path = module_path(site.node)
    try:
        gm.get_submodule(path)
    except AttributeError:
        return ""
    return path


def _append(gm: fx.GraphModule, x: fx.Node, op: Any, value: torch.Tensor, owner: str, name: str,
            pass_name: str) -> fx.Node:
    """Insert ``op(x, value)`` (``value`` a stored per-channel parameter) after ``x``, for all its readers."""
    stored = add_tensor(gm, owner, name, value.to(x.meta["val"].dtype), parameter=True, before=x.next)
    with gm.graph.inserting_after(stored):
        node = gm.graph.call_function(op, (x, stored))
    x.replace_all_uses_with(node, delete_user_cb=lambda user: user is not node)
    node.meta.update({k: v for k, v in x.meta.items() if k in ("val", "nn_module_stack", "stack_trace")})
    mark(stored, pass_name)
    return mark(node, pass_name)


def _fold_consumers(gm: fx.GraphModule, site: _Site, rep: Reparam, pass_name: str) -> None:
    for layer in site.layers:  # layer(y) = layer'(y'):  W' = W diag(r),  b' = b + W diag(r) b
        fold_inputs(gm, layer, rep.ratio, rep.ratio * rep.shift, pass_name)


# ---------------------------------------------------------------------------------------------
# the pass


@dataclass(frozen=True, kw_only=True)
class RepQuant(Pass):
    """Re-parameterize per-channel post-LayerNorm/RMSNorm quantization into per-tensor (RepQuant), exactly.

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
        calls = ctx.require_calibration_calls(self.name)
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
            (_rewrite_rms if site.rms else _rewrite)(gm, site, rep, self.name)
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
