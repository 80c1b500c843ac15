"""``log-quant``: fake-quantize post-softmax and post-GELU activations on a logarithmic grid (AdaLog).

Post-softmax and post-GELU values are heavy-tailed: most attention weights are tiny and a few are
near 1. A uniform grid spends its levels on the range; a log grid spends them on ratios:

    i = clamp(round(-log2(x / s) / step), 0, 2^bits - 1),   x_hat = s * 2^(-i * step)

and values past the last level (``round(...) > 2^bits - 1``, and ``x <= 0``) become 0. ``step``
is log2 of the base: 1 (log2), 1/2 (log sqrt2), or AdaLog's ``q / 37`` with the integer ``q``
searched in ``[10, 10 + eq_n]`` (``base=adaptive``). ``base=uniform`` puts a per-tensor
asymmetric uniform quantizer of the same width on the same tensors, for comparison.

Sites (matched on the ATen graph):

- **softmax**: the attention-weights operand of ``matmul``/``bmm`` whose producer is a softmax
  over the last axis, through casts, copies, eval-mode dropout and views. Hugging Face's ``sdpa``
  graphs have no explicit softmax: capture with ``attn_implementation="eager"``.
- **gelu**: an ``aten.gelu`` whose every user is a Linear (``linear``/``addmm``, through
  views that keep the channel axis) reading it as its input. The log grid needs ``x >= 0``, so
  the quantizer sees ``gelu(x) + shift`` (``shift = 0.16997 >= -min GELU``), and every consumer
  absorbs the shift exactly: ``W (g + shift) + b' = W g + b``  with  ``b' = b - shift * W 1``.

Calibration (a simplified FPCS): record each site's operand ``x`` and the right-hand side ``R``
of its layer (``V`` for softmax, ``W^T`` of the consumers for GELU) on the calibration calls,
then choose ``(q, s)`` minimizing the relative MSE of the *layer output*
``|(Q(x) - x) R|^2 / |x R|^2``: a coarse grid over ``q`` x scale offsets, then 3 rounds in which
the best 16 candidates are refined by a line search over the scale (``search_steps`` points,
half the width each round). ``s = max(x) * 2^-u``; ``u`` is the searched offset.

Limits: approximate by construction (the pass manager records the model-level fidelity against
the ``Lossy`` bound). Sites are calibrated on the float model, all at once (not sequentially on
the partly quantized one). The inserted quantizer dequantizes exactly (``2^(-i step)``); a
hardware kernel with AdaLog's shift + look-up table rounds the LUT too: ``lut_max_error`` in the
notes is that gap (0 for log2). Only the activations are quantized, not weights or ``V``.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.fx as fx
from torch import nn

from ptool.errors import PassError, first_line
from ptool.ir.graph import attr_tensor, is_op, mark, module_path
from ptool.ir.noise import NOISE_OPS, is_noise
from ptool.ir.record import record_values
from ptool.passes.base import Family, Pass, PassContext, PassResult
from ptool.passes.fold_affine._layers import Layer, fold_inputs
from ptool.passes.quant._consumers import linear_consumers
from ptool.passes.quant.quantizers import IntRange, Observer, fake_quantize, range_qparams, sqnr
from ptool.verify import Lossy, Numerics

aten = torch.ops.aten

R = 37  # AdaLog's fixed denominator: base = 2^(q / R)
Q_MIN = 10  # AdaLog searches q in [Q_MIN, Q_MIN + eq_n]
GELU_SHIFT = 0.16997  # >= -min_x GELU(x) = 0.169971...: makes the quantizer's input non-negative
TOP_K = 16  # FPCS: candidates kept between refinement rounds
ROUNDS = 3  # FPCS: refinement rounds (the line-search width halves each round)
MAX_ROWS = 16384  # calibration rows (tokens, or attention rows) per site used by the search
CHUNK_ELEMENTS = 1 << 22  # candidates are evaluated in batches of about this many elements

_SOFTMAX = (aten.softmax, aten._softmax)
_MATMUL = (aten.matmul, aten.bmm)
_BASES = ("log2", "sqrt2", "adaptive", "uniform")
_TARGETS = ("softmax", "gelu", "both")


# ---------------------------------------------------------------------------------------------
# arithmetic


def log_quantize(x: torch.Tensor, scale: torch.Tensor | float, step: torch.Tensor | float,
                 bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(levels, keep)``: levels in ``[0, 2^bits - 1]`` (float), ``keep`` False where ``x`` maps to 0."""
    ratio = torch.clamp(x / scale, min=torch.finfo(x.dtype).tiny, max=1.0)
    level = torch.round(-torch.log2(ratio) / step)
    keep = (level <= 2 ** bits - 1) & (x > 0)
    return torch.clamp(level, 0, 2 ** bits - 1), keep


def log_dequantize(levels: torch.Tensor, keep: torch.Tensor, scale: torch.Tensor | float,
                   step: torch.Tensor | float) -> torch.Tensor:
    """``s * 2^(-i * step)`` where kept, else 0."""
    value = scale * torch.pow(2.0, -levels * step)
    return torch.where(keep, value, torch.zeros_like(value))


def log_fake_quantize(x: torch.Tensor, scale: torch.Tensor | float, step: torch.Tensor | float,
                      bits: int) -> torch.Tensor:
    """``log_dequantize(log_quantize(x))``: what a log-domain kernel sees, in float."""
    levels, keep = log_quantize(x, scale, step, bits)
    return log_dequantize(levels, keep, scale, step)


def lut_max_error(q: float, bits: int) -> float:
    """Largest gap, relative to the scale, between AdaLog's hardware dequant and the exact one.

    Hardware: ``2^-floor(i q / R) * LUT[(i q) mod R]`` with the LUT entries rounded to multiples of
    ``1 / (2^(bits+1) - 2)``; exact: ``2^(-i q / R)``; over every level ``i``. 0 for log2 (q = R).
    """
    denom = 2 ** (bits + 1) - 2
    worst = 0.0
    for i in range(2 ** bits):
        frac = math.fmod(i * q, R)
        hw = 2.0 ** -math.floor(i * q / R) * round(2.0 ** (-frac / R) * denom) / denom
        worst = max(worst, abs(hw - 2.0 ** (-i * q / R)))
    return worst


class LogQuantizer(nn.Module):
    """Fake quantizer on a log grid: ``scale * 2^(-i * step)``, ``i`` in ``[0, 2^bits - 1]``, else 0.

    Uses only ONNX-exportable ops (div, clamp, log2, round, pow, where); ``scale`` and ``step``
    are buffers, ``bits`` a constant of the graph.
    """

    def __init__(self, scale: float, step: float, bits: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.bits = bits
        self.register_buffer("scale", torch.tensor(scale, dtype=dtype))
        self.register_buffer("step", torch.tensor(step, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return log_fake_quantize(x, self.scale, self.step, self.bits)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, base=2^{float(self.step):.4g}, scale={float(self.scale):.4g}"


class UniformQuantizer(nn.Module):
    """Per-tensor asymmetric uniform fake quantizer (``quantizers.fake_quantize``) on ``[0, 2^bits - 1]``."""

    def __init__(self, scale: float, zero_point: float, bits: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.grid = IntRange(bits, signed=False)
        self.register_buffer("scale", torch.tensor(scale, dtype=dtype))
        self.register_buffer("zero_point", torch.tensor(zero_point, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quantize(x, self.scale, self.zero_point, self.grid)

    def extra_repr(self) -> str:
        return f"bits={self.grid.bits}, scale={float(self.scale):.4g}, zero_point={int(self.zero_point)}"


# ---------------------------------------------------------------------------------------------
# calibration: the layer-output objective and the search


class Objective:
    """Relative MSE of a layer's output when its operand ``x`` is fake-quantized.

    ``pairs`` are ``(x, R)`` per calibration batch: the layer output is ``(x - offset) @ R``, where
    ``offset`` is a constant the next layer absorbs (the GELU shift), so figures are of the real
    activation and output. Batches of the same shape are concatenated, so a candidate costs a
    few large ops rather than many small ones.
    """

    def __init__(self, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], offset: float = 0.0) -> None:
        self.offset = offset
        groups: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for x, r in pairs:  # a batched R (softmax: V per matrix) is concatenated, a shared one (W^T) kept
            key = (tuple(x.shape[1:]), tuple(r.shape[1:]) if r.dim() > 2 else id(r))
            groups.setdefault(key, []).append((x, r))
        self.pairs = [(torch.cat([x for x, _ in g]), torch.cat([r for _, r in g]) if g[0][1].dim() > 2 else g[0][1])
                      for g in groups.values()]
        self.energy = sum(float(((x - offset) @ r).pow(2).sum()) for x, r in self.pairs) or 1.0
        self.lo = min(float(x.min()) for x, _ in self.pairs)
        self.hi = max(float(x.max()) for x, _ in self.pairs)

    def losses(self, fq: Callable[..., torch.Tensor], *params: torch.Tensor) -> list[float]:
        """The loss of ``len(params[0])`` candidates: ``fq(x, *p)`` with each ``p`` broadcast over ``x``."""
        k = params[0].numel()
        total = torch.zeros(k, dtype=torch.float64)
        for x, r in self.pairs:
            chunk = max(1, CHUNK_ELEMENTS // max(x.numel(), (x @ r).numel()))
            for i in range(0, k, chunk):
                ps = [p[i:i + chunk].to(x.dtype).view(-1, *[1] * x.dim()) for p in params]
                err = fq(x.unsqueeze(0), *ps) - x
                total[i:i + chunk] += (err @ r).pow(2).flatten(1).sum(1).double()
        return (total / self.energy).tolist()

    def report(self, fq: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float]:
        """SQNR of the operand and of the layer output, and the output cosine, over all pairs."""
        c = self.offset
        xs = torch.cat([x.flatten() for x, _ in self.pairs]).double() - c
        qs = torch.cat([fq(x).flatten() for x, _ in self.pairs]).double() - c
        ys = torch.cat([((x.double() - c) @ r.double()).flatten() for x, r in self.pairs])
        yq = torch.cat([((fq(x).double() - c) @ r.double()).flatten() for x, r in self.pairs])
        cos = float(torch.nn.functional.cosine_similarity(ys, yq, dim=0))
        return {"sqnr_db": round(sqnr(xs, qs), 2), "output_sqnr_db": round(sqnr(ys, yq), 2),
                "output_cosine": round(cos, 6)}


@dataclass(frozen=True)
class Choice:
    """A calibrated quantizer: log (``step`` = log2 of the base, ``q`` for AdaLog) or uniform."""

    bits: int
    scale: float
    step: float | None = None  # None: uniform
    q: float | None = None
    zero_point: float = 0.0
    loss: float = math.nan

    @property
    def is_log(self) -> bool:
        return self.step is not None

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_log:
            return log_fake_quantize(x, self.scale, self.step, self.bits)
        scale = torch.tensor(self.scale, dtype=x.dtype)
        return fake_quantize(x, scale, self.zero_point, IntRange(self.bits, signed=False))

    def module(self, dtype: torch.dtype) -> nn.Module:
        if self.is_log:
            return LogQuantizer(self.scale, self.step, self.bits, dtype)
        return UniformQuantizer(self.scale, self.zero_point, self.bits, dtype)

    def describe(self) -> str:
        if not self.is_log:
            return "uniform"
        return "log2" if self.step == 1 else "sqrt2" if self.step == 0.5 else f"2^({self.q:g}/{R})"


Candidate = tuple[float, float]  # (discrete key, continuous parameter): (q, scale offset) or (0, clip factor)


def _fpcs(losses: Callable[[list[Candidate]], list[float]], coarse: Sequence[Candidate],
          width: Callable[[float], float], search_steps: int,
          clamp: tuple[float, float] = (-math.inf, math.inf)) -> tuple[Candidate, float]:
    """Coarse grid over ``(key, t)``, then ``ROUNDS`` line searches of ``t`` around the best ``TOP_K``."""
    scored = dict(zip(coarse, losses(list(coarse))))
    shrink = 1.0
    for _ in range(ROUNDS):
        new: dict[Candidate, None] = {}
        for key, t in sorted(scored, key=scored.get)[:TOP_K]:
            d = width(key) * shrink
            for t2 in torch.linspace(t - d, t + d, search_steps, dtype=torch.float64).tolist():
                c = (key, round(min(max(t2, clamp[0]), clamp[1]), 12))
                if c not in scored:
                    new[c] = None
        if new:
            scored.update(zip(new, losses(list(new))))
        shrink /= 2
    best = min(scored, key=scored.get)
    return best, scored[best]


def search_log(objective: Objective, bits: int, qs: Sequence[float], search_steps: int) -> Choice:
    """The log quantizer (``q`` among ``qs``, base ``2^(q/R)``; scale) minimizing ``objective``."""
    hi = objective.hi if objective.hi > 0 else 1.0

    def losses(cands: list[Candidate]) -> list[float]:
        c = torch.tensor(cands, dtype=torch.float64)
        return objective.losses(lambda x, s, st: log_fake_quantize(x, s, st, bits), hi * 2.0 ** -c[:, 1], c[:, 0] / R)

    coarse = [(q, q / R * k / 4) for q in qs for k in range(4)]
    (q, u), best = _fpcs(losses, coarse, lambda q: q / R / 4, search_steps)
    return Choice(bits, hi * 2.0 ** -u, step=q / R, q=q, loss=best)


def search_uniform(objective: Objective, bits: int, search_steps: int) -> Choice:
    """The per-tensor uniform quantizer (min-max range shrunk by a searched factor) minimizing ``objective``."""
    observer = Observer("minmax")
    for x, _ in objective.pairs:
        observer.update(x)
    grid = IntRange(bits, signed=False)

    def qparams(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return range_qparams(observer.lo * f, observer.hi * f, grid)

    def losses(cands: list[Candidate]) -> list[float]:
        scale, zp = qparams(torch.tensor([f for _, f in cands], dtype=torch.float32))
        return objective.losses(lambda x, s, z: fake_quantize(x, s, z, grid), scale, zp)

    coarse = [(0.0, f) for f in torch.linspace(1.0, 0.1, 10).tolist()]
    (_, f), best = _fpcs(losses, coarse, lambda _: 0.05, search_steps, clamp=(0.01, 1.0))
    scale, zp = qparams(torch.tensor(f))
    return Choice(bits, float(scale), zero_point=float(zp), loss=best)


# ---------------------------------------------------------------------------------------------
# sites


class SiteKind(str, enum.Enum):
    SOFTMAX = "softmax"
    GELU = "gelu"


@dataclass
class _Site:
    """One activation to quantize: ``x`` (recorded) and the layer(s) whose output judges it."""

    kind: SiteKind
    x: fx.Node  # softmax: the matmul's weights operand; gelu: the gelu node
    label: str
    matmul: fx.Node | None = None  # softmax
    layers: list[Layer] = field(default_factory=list)  # gelu: the consumers
    readers: list[fx.Node] = field(default_factory=list)  # gelu: direct users rewired to the quantizer


def _quantizer_node(gm: fx.GraphModule, node: object) -> bool:
    return (isinstance(node, fx.Node) and node.op == "call_module"
            and isinstance(gm.get_submodule(node.target), (LogQuantizer, UniformQuantizer)))


def _softmax_source(node: fx.Node) -> fx.Node | None:
    """The softmax (over the last axis) ``node`` is, through casts, copies, eval dropout and views."""
    while isinstance(node, fx.Node) and is_noise(node, NOISE_OPS):
        node = node.args[0]
    if not is_op(node, *_SOFTMAX):
        return None
    val = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
    dim = node.args[1]
    return node if val is not None and dim % val.dim() == val.dim() - 1 else None


def _softmax_sites(gm: fx.GraphModule, result: PassResult) -> list[_Site]:
    sites = []
    for mm in [n for n in gm.graph.nodes if is_op(n, *_MATMUL)]:
        a = mm.args[0]
        if _quantizer_node(gm, a):
            src = _softmax_source(a.args[0])
            if src is not None:
                result.skip(f"{src.name} ({module_path(src)})", "already quantized")
            continue
        src = _softmax_source(a)
        if src is not None:
            sites.append(_Site(SiteKind.SOFTMAX, a, f"{src.name} ({module_path(src)})", matmul=mm))
    return sites


def _gelu_sites(gm: fx.GraphModule, result: PassResult) -> list[_Site]:
    sites = []
    for node in [n for n in gm.graph.nodes if is_op(n, aten.gelu)]:
        label = f"{node.name} ({module_path(node)})"
        if any(u.meta.get("ptool.from_pass") == LogQuant.name or _quantizer_node(gm, u) for u in node.users):
            result.skip(label, "already quantized")
            continue
        found = linear_consumers(gm, node)
        if isinstance(found, str):
            result.skip(label, found)
            continue
        sites.append(_Site(SiteKind.GELU, node, label, layers=found, readers=list(node.users)))
    return sites


def _rhs(gm: fx.GraphModule, site: _Site) -> torch.Tensor:
    """GELU: the consumers' weights as one ``(in, out_total)`` matrix."""
    mats = []
    for layer in site.layers:
        w = attr_tensor(gm, layer.weight).detach().float()
        mats.append(w if layer.kind == "addmm" else w.t())
    return torch.cat(mats, dim=1)


def _pairs(gm: fx.GraphModule, site: _Site, runs: list[dict], shift: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per calibration call, ``(x, R)`` in float32, at most ``MAX_ROWS`` rows per site overall."""
    per_call = max(1, MAX_ROWS // max(1, len(runs)))
    rhs = _rhs(gm, site) if site.kind is SiteKind.GELU else None
    pairs = []
    for run in runs:
        if site.kind is SiteKind.SOFTMAX:
            a, v = run[site.x].float(), run[site.matmul.args[1]].float()
            lead = torch.broadcast_shapes(a.shape[:-2], v.shape[:-2])
            a = a.expand(*lead, *a.shape[-2:]).reshape(-1, *a.shape[-2:])
            v = v.expand(*lead, *v.shape[-2:]).reshape(-1, *v.shape[-2:])
            keep = _spread(a.shape[0], max(1, per_call // a.shape[-2]))
            pairs.append((a[keep], v[keep]))
        else:
            g = run[site.x].float().reshape(-1, site.x.meta["val"].shape[-1]) + shift
            pairs.append((g[_spread(g.shape[0], per_call)], rhs))
    return pairs


def _spread(n: int, k: int) -> torch.Tensor:
    """``min(n, k)`` evenly spaced indices of ``range(n)``."""
    return torch.linspace(0, n - 1, min(n, k)).round().long()


def _find_sites(gm: fx.GraphModule, kinds: frozenset[SiteKind], result: PassResult) -> list[_Site]:
    return (_softmax_sites(gm, result) if SiteKind.SOFTMAX in kinds else []) + \
        (_gelu_sites(gm, result) if SiteKind.GELU in kinds else [])


def _record(gm: fx.GraphModule, sites: list[_Site], calls: Sequence[tuple[tuple, dict]]) -> list[dict]:
    nodes = [s.x for s in sites] + [s.matmul.args[1] for s in sites if s.matmul is not None]
    try:
        return record_values(gm, nodes, calls)
    except Exception as e:
        raise PassError(f"pass '{LogQuant.name}': the graph cannot run the calibration data ({first_line(e)}); "
                        "calibration inputs must fit the captured shapes") from e


def site_objectives(gm: fx.GraphModule, calls: Sequence[tuple[tuple, dict]],
                    targets: Iterable[SiteKind] = tuple(SiteKind), gelu_shift: float = 0.0) -> dict[str, Objective]:
    """Every site's layer-output objective on ``calls`` (``(args, kwargs)`` pairs), by site label.

    The graph is not changed. Labels are the ones ``log-quant`` reports, so a quantizer the pass
    inserted can be judged on other data (``objective.report(module)``); ``gelu_shift`` must be
    the one the pass used (0 for ``base=uniform``).
    """
    sites = _find_sites(gm, frozenset(targets), PassResult())
    runs = _record(gm, sites, calls) if sites else []
    shifts = {s.label: gelu_shift if s.kind is SiteKind.GELU else 0.0 for s in sites}
    return {s.label: Objective(_pairs(gm, s, runs, shifts[s.label]), offset=shifts[s.label]) for s in sites}


# ---------------------------------------------------------------------------------------------
# the pass


@dataclass(frozen=True, kw_only=True)
class LogQuant(Pass):
    """Fake-quantize post-softmax and post-GELU activations on a calibrated log grid (AdaLog).

    Args:
        bits: width of the quantized activations (2..8).
        base: ``adaptive`` (AdaLog: base 2^(q/37), q searched in [10, 10 + eq_n]), ``log2``,
            ``sqrt2``, or ``uniform`` (per-tensor asymmetric uniform at the same width, a baseline).
        targets: ``softmax`` (attention weights feeding the value matmul), ``gelu`` (GELU outputs
            feeding Linears) or ``both``.
        search_steps: points per line search of the scale (the FPCS refinement), >= 2.
        eq_n: the adaptive search's q range is [10, 10 + eq_n].
        gelu_shift: added before a log quantizer of a GELU output (absorbed into the next bias).
    """

    name: ClassVar[str] = "log-quant"
    family: ClassVar[Family] = Family.QUANTIZATION
    # Cosine of the outputs vs the pass's input at the defaults (4 bits, adaptive), measured:
    # 0.992 on the random-weight zoo ViT (eager; its near-uniform attention is the hard case),
    # 0.9998-0.99999 on the zoo GPT-2/Llama/BERT (eager), and on the trained digits ViT 0.998
    # (softmax sites) and 0.9996 (GELU sites) - tools/eval_logquant.py. At 3 bits the digits
    # ViT's softmax sites still give 0.993; 2 bits may fall below the bound.
    numerics: ClassVar[Numerics] = Lossy("cosine", 0.95)
    needs_calibration: ClassVar[bool] = True

    bits: int = 4
    base: Literal["log2", "sqrt2", "adaptive", "uniform"] = "adaptive"
    targets: Literal["softmax", "gelu", "both"] = "both"
    search_steps: int = 6
    eq_n: int = 128
    gelu_shift: float = GELU_SHIFT

    def __post_init__(self) -> None:
        if self.base not in _BASES:
            raise ValueError(f"base must be one of {', '.join(_BASES)}; got {self.base!r}")
        if self.targets not in _TARGETS:
            raise ValueError(f"targets must be one of {', '.join(_TARGETS)}; got {self.targets!r}")
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be an integer in 2..8; got {self.bits!r}")
        if self.search_steps < 2:
            raise ValueError(f"search_steps must be >= 2; got {self.search_steps}")
        if not 0 <= self.eq_n <= 1000:
            raise ValueError(f"eq_n must be in 0..1000; got {self.eq_n}")
        if not self.gelu_shift >= 0:
            raise ValueError(f"gelu_shift must be >= 0; got {self.gelu_shift}")

    # -- option parsing (once) ------------------------------------------------------------------

    def _kinds(self) -> frozenset[SiteKind]:
        return frozenset(SiteKind) if self.targets == "both" else frozenset({SiteKind(self.targets)})

    def _qs(self) -> tuple[float, ...] | None:
        """The candidate q values (base 2^(q/R)); None for the uniform baseline."""
        return {"log2": (float(R),), "sqrt2": (R / 2,), "uniform": None,
                "adaptive": tuple(float(q) for q in range(Q_MIN, Q_MIN + self.eq_n + 1))}[self.base]

    # -- run ------------------------------------------------------------------------------------

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        calls = ctx.require_calibration_calls(self.name)
        kinds, qs = self._kinds(), self._qs()
        result = PassResult()
        sites = _find_sites(gm, kinds, result)
        if not sites:
            return result
        runs = _record(gm, sites, calls)
        notes: dict[str, Any] = {}
        for i, site in enumerate(sites):
            shift = self.gelu_shift if site.kind is SiteKind.GELU and qs is not None else 0.0
            objective = Objective(_pairs(gm, site, runs, shift), offset=shift)
            uniform = search_uniform(objective, self.bits, self.search_steps)
            choice = uniform if qs is None else search_log(objective, self.bits, qs, self.search_steps)
            name = self._insert(gm, site, choice, shift, i)
            notes[site.label] = self._note(site, choice, uniform, objective, name, shift)
            result.hit()
        result.notes["sites"] = notes
        return result

    def _insert(self, gm: fx.GraphModule, site: _Site, choice: Choice, shift: float, index: int) -> str:
        name = f"ptool_logquant_{index}"
        while hasattr(gm, name):
            name += "_"
        dtype = site.x.meta["val"].dtype
        gm.add_submodule(name, choice.module(dtype))
        graph = gm.graph
        meta = {k: v for k, v in site.x.meta.items() if k in ("nn_module_stack", "stack_trace")}
        if site.kind is SiteKind.SOFTMAX:
            with graph.inserting_before(site.matmul):
                q = graph.call_module(name, (site.x,))
            site.matmul.update_arg(0, q)
            new = [q]
        else:
            src = site.x
            with graph.inserting_after(site.x):
                if shift:
                    src = graph.call_function(aten.add.Tensor, (site.x, shift))
            with graph.inserting_after(src):
                q = graph.call_module(name, (src,))
            for reader in site.readers:
                reader.replace_input_with(site.x, q)
            if shift:  # W (g + shift) + b' = W g + b  with  b' = b - shift * W 1
                for layer in site.layers:
                    n_in = attr_tensor(gm, layer.weight).shape[0 if layer.kind == "addmm" else 1]
                    fold_inputs(gm, layer, torch.ones(n_in, dtype=torch.float64),
                                torch.full((n_in,), -shift, dtype=torch.float64), self.name)
            new = [src, q] if shift else [q]
        for n in new:
            mark(n, self.name)
            n.meta.update(meta)
        return name

    def _note(self, site: _Site, choice: Choice, uniform: Choice, objective: Objective, module: str,
              shift: float) -> dict[str, Any]:
        note: dict[str, Any] = {"kind": site.kind.value, "module": module, "quantizer": choice.describe(),
                                "scale": choice.scale, **objective.report(choice.fake_quantize)}
        if choice.is_log:
            note.update({"q": choice.q, "base": 2.0 ** choice.step,
                         "lut_max_error": lut_max_error(choice.q, self.bits)})
            note.update({f"uniform_{k}": v for k, v in objective.report(uniform.fake_quantize).items()})
        else:
            note["zero_point"] = choice.zero_point
        if shift:
            note["shift"] = shift
        return note
