"""``shift-linear``: Linear (and 1x1 conv) weights as signed powers of two, so each product is a bit shift.

Each weight row ``w[n, :]`` becomes a per-channel float scale times small integers (the codes of
:mod:`ptool.ops.shift_arith`):

    w[n, k] ~= alpha[n] * W_int[n, k],   W_int = sum_t sign_t * 2**exp_t,  sign in {-1,0,1}, exp in [0, MAX_EXP]

and the layer becomes ``torch.ops.ptool_shift.shift_linear`` (:mod:`.ops`): the input quantized per
row to int8, an integer accumulation of shifted inputs, one float rescale. Modes:

- ``shift`` (default, ShiftAddViT / deepshift): one term, ``|W_int|`` in {0, 1, 2, ..., 64}: relative
  to the row's top level the weight is ``+-2**p`` with ``p`` in ``[-MAX_EXP, 0]``, or zero where
  ``|w|`` is nearer 0 than the smallest level.
- ``shift2``: two terms (``exp2 < exp1``), ``|W_int|`` up to 96: every sum or difference of two
  powers of two, e.g. 3, 6, 7, 12, 14, ...: finer levels, twice the shifts.
- ``ternary`` (TBT, METHODS 4.7): ``sign`` in {-1, 0, 1}, ``exp = 0``; zero where
  ``|w| < (2/3) mean|w_row|`` (TBT's threshold: ``alpha_0 = (4/3) mean|w_row|``, round(w / alpha_0)).
- ``binary`` (TBT): ``sign(w)`` (never 0), ``exp = 0``.

Scale choice. Each code is the level nearest to ``w / alpha`` (linear distance, the least-squares
choice). ``shift``/``shift2``: ``alpha`` is searched per row over 16 candidates spanning one octave
below ``max|w_row| / top level`` (power-of-two levels repeat every octave, so that covers every
placement), keeping the one with the smallest row MSE; then, all modes, ``alpha`` is refit by least
squares for the chosen codes (``<w, q> / <q, q>``: never worse; for ``binary`` it is TBT's
``mean|w|``, for ``ternary`` the mean ``|w|`` over the kept entries instead of TBT's 4/3 mean).
Measured (relative weight MSE, ``shift``): Gaussian 256x256 0.0378 with ``alpha = max|w| / 64`` alone,
0.0338 searched; MiniLM intermediate.dense 0.0380 -> 0.0345, output.dense 0.0364 -> 0.0348. The
least-squares refit lowers ternary's error against TBT's own scale slightly (MiniLM 0.207 -> 0.200).

Sites: every ``aten.linear`` / ``addmm`` (GPT-2 Conv1D) with a stored float32 2-D weight and every
``conv2d`` whose kernel is 1x1 with stride 1, no padding, one group (a linear over channels;
run between two permutes). ``sites=mlp`` keeps only the feed-forward Linears: pairs where the output
of one reaches the input of another through pointwise ops only, one of them non-linear (GELU, SiLU,
ReLU, tanh, ... or a product of two computed values as in SwiGLU): BERT/ViT intermediate/output.dense,
Llama gate/up/down, GPT-2 c_fc/c_proj, any plain MLP. Layers matching an ``exclude`` pattern
(``fnmatch`` on module path or node name) and the ``keep_float`` most sensitive ones (largest relative
output error of the layer alone, on the calibration data or else the example inputs) stay float.

Limits: approximate by construction; the activation is quantized to int8 per row (per token), so
inputs with outlier channels lose resolution exactly as in int8 dynamic quantization.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
import torch.fx as fx

from ptool.errors import PassError, did_you_mean
from ptool.ir.graph import (
    add_tensor,
    attr_tensor,
    eliminate_dead_code,
    is_op,
    mark,
    module_path,
    owner_of,
    remove_unused_attributes,
)
from ptool.ir.noise import node_args
from ptool.ir.record import record_values
from ptool.ops import shift as shift_ops  # registers torch.ops.ptool_shift.*
from ptool.ops.shift_arith import MAX_EXP
from ptool.passes.base import Family, Pass, PassContext, PassResult
from ptool.passes.fold_affine._layers import through_last_dim
from ptool.passes.quant._sites import calls_of, exclude_pattern, users
from ptool.passes.quant.quantize import find_sites as find_linear_sites
from ptool.verify import Lossy, Numerics

aten = torch.ops.aten

Mode = Literal["shift", "shift2", "ternary", "binary"]
Sites = Literal["all", "mlp"]
_MODES = ("shift", "shift2", "ternary", "binary")
_SITES = ("all", "mlp")
_ALPHA_CANDIDATES = 16


# ------------------------------------------------------------------------------------ weight codes
@dataclass(frozen=True)
class ShiftCodes:
    """A weight ``(N, K)`` as ``alpha[n] * sum_t sign[t] * 2**exp[t]``: ``sign``/``exp`` int8 ``(T, N, K)``."""

    sign: torch.Tensor
    exp: torch.Tensor
    alpha: torch.Tensor

    def weight(self) -> torch.Tensor:
        """The float32 weight the codes stand for."""
        return shift_ops.dequantized_weight(self.sign, self.exp, self.alpha)


@functools.cache
def level_table(mode: Mode) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every value ``mode`` can code, ascending, and its ``(sign, exp)`` codes ``(L, T)`` int8."""
    rows: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    if mode == "ternary":
        rows = {v: ((v,), (0,)) for v in (-1, 0, 1)}
    elif mode == "binary":
        rows = {v: ((v,), (0,)) for v in (-1, 1)}
    else:
        two = mode == "shift2"
        rows[0] = ((0, 0), (0, 0)) if two else ((0,), (0,))
        for e1 in range(MAX_EXP + 1):
            for s1 in (-1, 1):
                rows.setdefault(s1 << e1, ((s1, 0), (e1, 0)) if two else ((s1,), (e1,)))
                for e2 in range(e1) if two else ():
                    for s2 in (-1, 1):
                        rows.setdefault(s1 * (1 << e1) + s2 * (1 << e2), ((s1, s2), (e1, e2)))
    values = sorted(rows)
    signs = torch.tensor([rows[v][0] for v in values], dtype=torch.int8)
    exps = torch.tensor([rows[v][1] for v in values], dtype=torch.int8)
    return torch.tensor(values, dtype=torch.float32), signs, exps


def _nearest(v: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Index of the table value nearest to each entry of ``v`` (ties to the smaller magnitude side)."""
    mids = (values[1:] + values[:-1]) / 2
    return torch.searchsorted(mids, v.contiguous())


def encode_weight(w: torch.Tensor, mode: Mode) -> ShiftCodes:
    """Codes and per-row scales for a float weight ``(N, K)`` (module docstring: the scale choice)."""
    w = w.detach().to(torch.float32)
    values, signs, exps = level_table(mode)
    tiny = torch.finfo(torch.float32).tiny
    if mode == "binary":
        q_idx = (w >= 0).to(torch.int64)  # index 0 = -1, 1 = +1: sign(0) counts as +1
    elif mode == "ternary":
        alpha0 = (w.abs().mean(1, keepdim=True) * 4 / 3).clamp_min(tiny)
        q_idx = torch.round(torch.clamp(w / alpha0, -1, 1)).to(torch.int64) + 1
    else:
        top = float(values[-1])
        amax = w.abs().amax(1, keepdim=True).clamp_min(tiny)
        best_err = torch.full((w.shape[0], 1), float("inf"))
        q_idx = torch.zeros_like(w, dtype=torch.int64)
        for c in torch.logspace(0, -1, _ALPHA_CANDIDATES + 1, base=2)[:-1].tolist():
            alpha = amax / top * c
            idx = _nearest(w / alpha, values)
            err = (w - values[idx] * alpha).pow(2).sum(1, keepdim=True)
            better = err < best_err
            q_idx = torch.where(better, idx, q_idx)
            best_err = torch.where(better, err, best_err)
    q = values[q_idx]
    norm = q.pow(2).sum(1)
    alpha = torch.where(norm > 0, (w * q).sum(1) / norm.clamp_min(tiny), torch.zeros(()))
    return ShiftCodes(signs[q_idx].permute(2, 0, 1).contiguous(), exps[q_idx].permute(2, 0, 1).contiguous(),
                      alpha.to(torch.float32).contiguous())


# ------------------------------------------------------------------------------------ sites
@dataclass
class _Site:
    """One layer to rewrite: ``weight`` normalized to ``(out, in)``; ``conv``: a 1x1 conv over channels."""

    node: fx.Node
    x: fx.Node
    weight_node: fx.Node
    weight: torch.Tensor
    bias: fx.Node | None
    conv: bool = False
    owner: str = field(default="")

    def __post_init__(self) -> None:
        self.owner = self.owner or owner_of(self.weight_node.target)

    @property
    def label(self) -> str:
        return f"{self.node.name} ({module_path(self.node)})"

    def rows(self) -> int:
        """Input rows of the example call (tokens; pixels for a conv); 0 if the shape is unknown."""
        val = self.x.meta.get("val")
        if not isinstance(val, torch.Tensor):
            return 0
        return val.numel() // (val.shape[1] if self.conv else val.shape[-1])


def _conv_site(gm: fx.GraphModule, node: fx.Node) -> _Site | str | None:
    """``node`` as a 1x1 conv site, the reason a stored 1x1 conv2d cannot be one, or None (other nodes)."""
    if not is_op(node, aten.conv2d, aten.convolution):
        return None
    values, index = node_args(node)
    w = attr_tensor(gm, values[index["weight"]])
    if w is None or w.dim() != 4 or tuple(w.shape[2:]) != (1, 1):
        return None  # a computed weight or a k x k kernel: not a linear over channels
    if "transposed" in index and values[index["transposed"]]:
        return "a transposed 1x1 conv (only plain convs are a linear over channels)"
    stride, padding, groups = values[index["stride"]], values[index["padding"]], values[index["groups"]]
    pads = padding if isinstance(padding, (list, tuple)) else [padding]
    if any(int(st) != 1 for st in stride) or any(p != 0 for p in pads):
        return f"1x1 conv with stride {list(stride)} / padding {padding} (only stride 1, no padding)"
    if groups != 1:
        return f"1x1 conv with {groups} groups (only groups=1 is a linear over channels)"
    bias = values[index["bias"]]
    return _Site(node, node.args[0], values[index["weight"]], w.detach()[:, :, 0, 0],
                 bias if isinstance(bias, fx.Node) else None, conv=True)


_ACTIVATIONS = frozenset({
    "gelu", "relu", "relu6", "silu", "sigmoid", "tanh", "erf", "exp", "pow", "mish", "elu", "leaky_relu",
    "softplus", "hardtanh", "hardswish", "hardsigmoid",
})
_AFFINE = frozenset({"add", "sub", "div", "neg", "clamp", "mul"})


def _packet(node: fx.Node) -> str:
    packet = getattr(node.target, "overloadpacket", None) if node.op == "call_function" else None
    return getattr(packet, "__name__", "")


def _from_layer(node: object, layers: set[fx.Node]) -> bool:
    """True if ``node`` is a layer's output seen through one-input activations and views."""
    while isinstance(node, fx.Node) and node not in layers:
        if _packet(node) in _ACTIVATIONS or through_last_dim(node) is not None:
            node = node.args[0]
        else:
            return False
    return isinstance(node, fx.Node)


def mlp_layers(sites: list[_Site], max_nodes: int = 64) -> set[fx.Node]:
    """Nodes of the feed-forward Linears: pairs whose link is pointwise ops only, one of them non-linear.

    Non-linear: an activation (GELU, its tanh form, SiLU, ReLU, ...) or the product of two layer
    outputs (SwiGLU's ``silu(gate) * up``). Products with anything else (an RMSNorm's ``x * rsqrt``)
    and adds (residuals) are passed through as linear, so an attention projection followed by a norm
    never pairs with the next block's projections.
    """
    linears = {s.node for s in sites if not s.conv}
    readers_of: dict[fx.Node, list[fx.Node]] = {}
    for s in sites:
        if not s.conv:
            readers_of.setdefault(s.x, []).append(s.node)
    found: set[fx.Node] = set()
    for start in linears:
        todo, seen, readers = [(start, False)], {start}, []
        while todo and len(seen) < max_nodes:
            node, crossed = todo.pop()
            readers += [r for r in readers_of.get(node, ()) if crossed]
            for u in users(node):
                name = _packet(u)
                if u in seen or not (name in _ACTIVATIONS or name in _AFFINE or through_last_dim(u) is not None):
                    continue
                factors = [a for a in u.args if isinstance(a, fx.Node)]
                gate = name == "mul" and len(factors) == 2 and all(_from_layer(a, linears) for a in factors)
                seen.add(u)
                todo.append((u, crossed or name in _ACTIVATIONS or gate))
        if readers:
            found.add(start)
            found.update(readers)
    return found


# ------------------------------------------------------------------------------------ the pass
@dataclass(frozen=True, kw_only=True)
class ShiftLinear(Pass):
    """Re-parameterize Linear / 1x1-conv weights as signed powers of two (or ternary / binary) x a per-channel scale.

    Args:
        mode: ``shift`` (one power of two per weight, default), ``shift2`` (sum of two),
            ``ternary`` or ``binary`` (TBT).
        sites: ``all`` Linears and 1x1 convs, or ``mlp`` (the feed-forward Linears only).
        exclude: ``fnmatch`` patterns on module path or node name of layers kept in float.
        keep_float: keep the N layers with the largest relative output error in float.
    """

    name: ClassVar[str] = "shift-linear"
    family: ClassVar[Family] = Family.SHIFT_ADD
    # Every layer adds its own int8 activation rounding and ~3.5% weight MSE; measured (default mode):
    # 0.945 on a random MobileNetV2 with all its pointwise convs rewritten, 0.952 on MiniLM's MLPs.
    numerics: ClassVar[Numerics] = Lossy("cosine", 0.9)
    tuning_candidates: ClassVar[tuple[str, ...]] = ("shift-linear:mode=shift2,sites=mlp",)

    mode: Mode = "shift"
    sites: Sites = "all"
    exclude: tuple[str, ...] = ()
    keep_float: int = 0

    def __post_init__(self) -> None:
        for option, value, allowed in (("mode", self.mode, _MODES), ("sites", self.sites, _SITES)):
            if value not in allowed:
                raise PassError(f"pass 'shift-linear': {option}='{value}' is not one of "
                                f"{', '.join(allowed)}{did_you_mean(str(value), allowed)}")
        if self.keep_float < 0:
            raise PassError(f"pass 'shift-linear': keep_float must be >= 0, got {self.keep_float}")

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult()
        sites = self._find(gm, result)
        if self.sites == "mlp":
            keep = mlp_layers(sites)
            for s in sites:
                if s.node not in keep:
                    result.skip(s.label, "not a feed-forward (MLP) layer (sites=mlp)")
            sites = [s for s in sites if s.node in keep]
        sites = [s for s in sites if not self._excluded(s, result)]
        codes = {s.node: encode_weight(s.weight, self.mode) for s in sites}
        if self.keep_float and sites:
            errors = _output_errors(gm, sites, codes, calls_of(ctx))
            result.notes["layer_error"] = {s.label: errors[s.node] for s in sites}
            worst = sorted(sites, key=lambda s: errors[s.node], reverse=True)[: self.keep_float]
            for s in worst:
                result.skip(s.label, f"kept float: among the {self.keep_float} most sensitive layers "
                                     f"(relative output error {errors[s.node]:.2e})")
            sites = [s for s in sites if s not in worst]
        notes = {"mode": self.mode, "layers": [], "weight_error": {}, "macs_replaced": 0, "multiplies_added": 0,
                 "weight_bytes_before": 0, "weight_bytes_after": 0, "weight_bytes_int8": 0}
        for s in sites:
            c = codes[s.node]
            _rewrite(gm, s, c, self.name)
            result.hit()
            w = s.weight.float()
            rows, (n, k) = s.rows(), w.shape
            notes["layers"].append(s.label)
            notes["weight_error"][s.label] = float((c.weight() - w).pow(2).sum() / w.pow(2).sum().clamp_min(1e-30))
            notes["macs_replaced"] += rows * n * k
            notes["multiplies_added"] += rows * (k + 2 * n)  # x / sx per input, acc * sx * alpha per output
            notes["weight_bytes_before"] += w.numel() * s.weight.element_size()
            notes["weight_bytes_after"] += sum(t.numel() * t.element_size() for t in (c.sign, c.exp, c.alpha))
            notes["weight_bytes_int8"] += n * k + c.alpha.numel() * c.alpha.element_size()
        notes["multiplications_removed"] = notes["macs_replaced"] - notes["multiplies_added"]
        if result.changed:
            eliminate_dead_code(gm)
            remove_unused_attributes(gm)
        result.notes.update(notes)
        return result

    def _find(self, gm: fx.GraphModule, result: PassResult) -> list[_Site]:
        sites = []
        linears = {s.node: s for s in find_linear_sites(gm) if s.kind == "linear"}
        for node in gm.graph.nodes:
            if node in linears:
                q = linears[node]
                site = _Site(node, q.x, q.weight_node, q.weight, q.bias)
            else:
                site = _conv_site(gm, node)
                if site is None:
                    continue
                if isinstance(site, str):
                    result.skip(f"{node.name} ({module_path(node)})", site)
                    continue
            why = _why_not(gm, site)
            if why:
                result.skip(site.label, why)
            else:
                sites.append(site)
        return sites

    def _excluded(self, site: _Site, result: PassResult) -> bool:
        pattern = exclude_pattern(site.node, self.exclude)
        if pattern is not None:
            result.skip(site.label, f"kept float: matches exclude pattern '{pattern}'")
        return pattern is not None


def _why_not(gm: fx.GraphModule, site: _Site) -> str | None:
    """Why the op cannot take the site (it computes in float32), or None."""
    if site.weight.dtype != torch.float32:
        return f"weight is {site.weight.dtype}, the shift kernels take float32 layers"
    val = site.x.meta.get("val")
    if isinstance(val, torch.Tensor) and val.dtype != torch.float32:
        return f"input is {val.dtype}, the shift kernels take float32 inputs"
    if site.bias is not None:
        b = attr_tensor(gm, site.bias)
        if b is not None and b.dtype != torch.float32:
            return f"bias is {b.dtype}, the shift kernels take float32"
    return None


def _rewrite(gm: fx.GraphModule, site: _Site, codes: ShiftCodes, pass_name: str) -> fx.Node:
    """Replace ``site.node`` by ``shift_linear`` on stored codes (between permutes for a 1x1 conv)."""
    graph = gm.graph

    def buffer(name: str, value: torch.Tensor) -> fx.Node:
        return add_tensor(gm, site.owner, name, value, parameter=False, before=site.node)

    args = (buffer("shift_sign", codes.sign), buffer("shift_exp", codes.exp), buffer("shift_alpha", codes.alpha),
            site.bias)
    with graph.inserting_before(site.node):
        x = site.x
        if site.conv:
            x = mark(graph.call_function(aten.permute.default, (x, [0, 2, 3, 1])), pass_name)
        new = mark(graph.call_function(torch.ops.ptool_shift.shift_linear.default, (x, *args)), pass_name)
        out = new
        if site.conv:
            out = mark(graph.call_function(aten.permute.default, (new, [0, 3, 1, 2])), pass_name)
    new.meta.update({k: v for k, v in site.node.meta.items() if k in ("nn_module_stack", "stack_trace")})
    site.node.replace_all_uses_with(out)
    graph.erase_node(site.node)
    return new


def _output_errors(gm: fx.GraphModule, sites: list[_Site], codes: dict[fx.Node, ShiftCodes],
                   calls: list[tuple[tuple, dict]]) -> dict[fx.Node, float]:
    """Relative output MSE of each layer alone (no bias) when its weight and input go through the shift op."""
    err = {s.node: 0.0 for s in sites}
    power = {s.node: 0.0 for s in sites}
    for values in record_values(gm, list(dict.fromkeys(s.x for s in sites)), calls[:4]):
        for s in sites:
            x = values[s.x].detach().float()
            x = x.movedim(1, -1) if s.conv else x
            c = codes[s.node]
            want = x @ s.weight.float().T
            got = shift_ops._shift_linear(x, c.sign, c.exp, c.alpha, None)
            err[s.node] += float((got - want).pow(2).sum())
            power[s.node] += float(want.pow(2).sum())
    return {n: err[n] / power[n] if power[n] else 0.0 for n in err}
