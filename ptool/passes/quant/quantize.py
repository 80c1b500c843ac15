"""``quantize``: int8 (dynamic or static activations) and int4 weight-only layers that lower to integer kernels.

Every ``Linear`` (``aten.linear``; GPT-2's ``addmm`` Conv1D) with a stored weight becomes one of
the quantized ops of :mod:`ptool.ops.quant`, and, with ``embeddings=true``, every
embedding table becomes an int8/int4 gather. Modes:

- ``int8-dynamic`` (default): weights int8, one scale per output channel (``per-channel``) or per
  tensor; each activation quantized to uint8 over its own range when it is computed
  (``activations=per-tensor``; ONNX: ``DynamicQuantizeLinear`` + ``MatMulInteger``), or each
  row (token) to int8 over its own ``max|x|`` (``activations=per-token``, finer: one outlier
  token no longer coarsens every other token's grid; ONNX: ``ReduceMax`` + ``MatMulInteger``
  s8 x s8). No calibration needed. On the CPU, torch runs both on ``torch._int_mm``.
- ``int8-static``: the activation scale and zero point are calibrated (``observer`` =
  ``minmax``, ``percentile`` or ``mse``) on the calibration data. ONNX: QDQ around ``MatMul``.
- ``int4-weight``: weight-only; 4-bit levels with one scale and zero point per ``group_size``
  inputs; activations stay float. ONNX: ``com.microsoft.MatMulNBits``. How the levels are chosen
  (``method``):

  - ``rtn`` (default): round to nearest, each group's range clipped where that lowers its
    rounding error. No data.
  - ``gptq``: GPTQ (:mod:`.gptq`): columns rounded one at a time, each one's error fed back into
    the columns not yet rounded through the inverse Hessian ``(2 X^T X / n)^-1`` of the layer's
    calibration inputs (damped by ``damp`` times its mean diagonal; ``act_order`` sweeps the most
    active inputs first). Layers are done in dependency order, each on inputs recorded with the
    layers before it already quantized.
  - ``awq``: AWQ (:mod:`.awq`): per-input-channel scales ``s = mean|x|^alpha`` (or AutoAWQ's
    ``mean|x|^alpha / mean|w|^(1 - alpha)``; form and ``alpha`` searched on ``awq_grid`` points in
    [0, 1) for the least layer-output error) folded exactly as ``W diag(s)`` into the Linears and
    ``1/s`` into the norm or Linear before them (else a stored ``mul``), then round to nearest
    with the clipping chosen on the layer's output error.

  Both calibrated methods store exactly the levels / scales / zero points ``rtn`` stores, so every
  backend runs them unchanged; ``notes["gptq"]`` / ``notes["awq"]`` hold the relative output
  error of each layer (site) on the calibration data next to round-to-nearest's, and for AWQ the
  chosen scale and where ``1/s`` went.

- ``auto``: per layer float, int8 (as ``int8-dynamic``) or int4 (as ``int4-weight``), chosen from
  each layer's measured effect on the model's outputs to fit a weight-byte ``budget`` (or reach a
  ``max_error``) with the least predicted error (:mod:`.mixed`). Needs calibration data.

Layers stay float when their module path or node name matches an ``exclude`` pattern
(``fnmatch``), or when ``keep_float=N`` and they are among the N layers whose own output suffers
most from quantization, measured on the calibration data (relative output MSE of the layer
alone). The report lists them with the reason. In the int8 modes a convolution whose kernel equals
its stride (a vision transformer's patch embedding) is quantized as the Linear over patches it is
(:mod:`.patch_conv`); other convolutions are not quantized. Attention's
activation-by-activation products are with ``attention=int8`` (:mod:`.int8_attention`), or run in
bf16 with ``attention=bf16`` (:mod:`.bf16_attention`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.fx as fx

from ptool.ir.graph import add_tensor, eliminate_dead_code, mark, remove_unused_attributes
from ptool.ir.record import record_values
from ptool.ops.quant import pack_nibbles  # also registers torch.ops.ptool_quant.*
from ptool.passes.base import Family, Pass, PassContext, PassResult
from ptool.passes.quant import quantizers as qz
from ptool.passes.quant._quant_sites import (
    BIAS,
    LayerSite,
    Stored,
    X,
    bias_tensor,
    find_sites,
    input_of,
    merged_site,
    replace_group,
)
from ptool.passes.quant._sites import exclude_pattern
from ptool.passes.quant.bf16_attention import bf16_attention
from ptool.passes.quant.gptq import Levels
from ptool.passes.quant.int8_attention import quantize_attention
from ptool.passes.quant.mixed import run_auto
from ptool.passes.quant.patch_conv import linearize_patch_convolutions
from ptool.progress import steps as progress
from ptool.verify import Lossy, Numerics

Mode = Literal["int8-dynamic", "int8-static", "int4-weight", "auto"]
Choice = Literal["float", "int8", "int4"]
Method = Literal["rtn", "gptq", "awq"]


@dataclass(frozen=True, kw_only=True)
class Quantize(Pass):
    """Quantize Linear layers (and embeddings) to int8 (dynamic/static) or int4 weight-only kernels, or a mix (auto).

    Args:
        mode: ``int8-dynamic``, ``int8-static`` (needs calibration) or ``int4-weight``.
        granularity: weight scales ``per-channel`` (one per output channel) or ``per-tensor``
            (int8 only; int4 always uses groups).
        group_size: inputs per int4 scale (a multiple of 2 dividing the layer width).
        observer: static activation ranges: ``minmax``, ``percentile`` or ``mse``.
        percentile: the ``percentile`` observer's clipping point (in %).
        embeddings: quantize embedding tables too (int8 per row; int4 per group).
        exclude: ``fnmatch`` patterns on module path or node name of layers kept in float.
        keep_float: keep the N most quantization-sensitive linears in float (needs calibration).
        activations: ``int8-dynamic`` activation scales: ``per-tensor`` (uint8, one range for
            the whole activation, as ONNX Runtime's ``quantize_dynamic``) or ``per-token`` (int8,
            one symmetric scale per row).
        fuse_shared_inputs: linears reading the same input (q/k/v, gate/up) become one wider
            integer matmul and a split: fewer kernel calls, the same numbers (per-channel
            scales, and the shared input is quantized once either way).
        method: how weight-only levels are chosen: ``rtn`` (round to nearest), ``gptq`` or
            ``awq`` (both need calibration data; ``int4-weight`` only).
        damp: ``gptq``: Hessian damping, as a fraction of its mean diagonal (in (0, 1]).
        act_order: ``gptq``: quantize the columns in decreasing order of input activity.
        awq_grid: ``awq``: how many ``alpha`` values in [0, 1) the scale search tries (per scale form).
        budget: ``auto``: the fraction (in (0, 1]) of the model's weight bytes the result may store.
        max_error: ``auto``: the smallest model whose predicted output error (relative MSE) is at
            most this, within ``budget``.
        choices: ``auto``: what each layer may become: ``float``, ``int8``, ``int4``.
        attention: ``int8`` also runs softmax attention's two activation products (``q k^T`` and
            the probabilities times ``v``) on int8 kernels (:mod:`.int8_attention`); ``bf16`` on
            bf16 operands, the softmax in float32 (:mod:`.bf16_attention`; faster on short
            sequences, int8 on long ones); ``float`` (default) leaves attention as it is.
    """

    name: ClassVar[str] = "quantize"
    family: ClassVar[Family] = Family.QUANTIZATION
    numerics: ClassVar[Numerics] = Lossy("cosine", 0.97)
    tuning_candidates: ClassVar[tuple[str, ...]] = ("quantize", "quantize:activations=per-token",
                                                    "quantize:activations=per-token,attention=bf16",
                                                    "quantize:mode=int4-weight", "quantize:mode=auto,budget=0.25",
                                                    "quantize:mode=auto,budget=0.5")

    mode: Mode = "int8-dynamic"
    granularity: Literal["per-channel", "per-tensor"] = "per-channel"
    group_size: int = 32
    observer: qz.ObserverKind = "minmax"
    percentile: float = 99.99
    embeddings: bool = True
    exclude: tuple[str, ...] = ()
    keep_float: int = 0
    activations: Literal["per-tensor", "per-token"] = "per-tensor"
    fuse_shared_inputs: bool = True
    method: Method = "rtn"
    damp: float = 0.01
    act_order: bool = False
    awq_grid: int = 20
    budget: float | None = None
    max_error: float | None = None
    choices: tuple[Choice, ...] = ("float", "int8", "int4")
    attention: Literal["float", "int8", "bf16"] = "float"

    def __post_init__(self) -> None:
        if self.group_size < 2 or self.group_size % 2:
            raise ValueError(f"group_size must be an even number >= 2, got {self.group_size}")
        if not 50 < self.percentile <= 100:
            raise ValueError(f"percentile must be in (50, 100], got {self.percentile}")
        if self.keep_float < 0:
            raise ValueError(f"keep_float must be >= 0, got {self.keep_float}")
        if self.activations == "per-token" and self.mode not in ("int8-dynamic", "auto"):
            raise ValueError("activations=per-token applies to mode=int8-dynamic (and auto's int8 choice) only")
        if self.mode == "int4-weight" and self.granularity == "per-tensor":
            raise ValueError("int4-weight uses per-group scales; granularity=per-tensor applies to int8 modes only")
        if self.method != "rtn" and self.mode != "int4-weight":
            raise ValueError(f"method={self.method} applies to the weight-only mode (mode=int4-weight) only")
        if not 0 < self.damp <= 1:
            raise ValueError(f"damp must be in (0, 1] (a fraction of the Hessian's mean diagonal), got {self.damp}")
        if self.awq_grid < 1:
            raise ValueError(f"awq_grid must be >= 1, got {self.awq_grid}")
        auto_only = [k for k, v in (("budget", self.budget), ("max_error", self.max_error)) if v is not None]
        if set(self.choices) != {"float", "int8", "int4"} or len(self.choices) != 3:
            auto_only.append("choices")
        if auto_only and self.mode != "auto":
            raise ValueError(f"{', '.join(auto_only)} appl{'ies' if len(auto_only) == 1 else 'y'} to mode=auto only")
        if self.mode == "auto":
            if self.budget is not None and not 0 < self.budget <= 1:
                raise ValueError(f"budget must be in (0, 1] (a fraction of the model's float32 weight bytes), "
                                 f"got {self.budget}")
            if self.max_error is not None and not self.max_error >= 0:
                raise ValueError(f"max_error must be >= 0 (relative output MSE), got {self.max_error}")
            if not self.choices or len(set(self.choices)) != len(self.choices) or \
                    not set(self.choices) <= {"float", "int8", "int4"}:
                raise ValueError(f"choices must name float, int8, int4 at most once each, got {'+'.join(self.choices)}")
            if self.budget is None and self.max_error is None:
                raise ValueError("mode=auto needs budget= (a fraction of the float32 weight bytes, e.g. 0.25) "
                                 "or max_error= (relative output MSE)")
            if self.method != "rtn" or self.keep_float or self.granularity != "per-channel":
                raise ValueError("mode=auto chooses per layer itself: method, keep_float and granularity=per-tensor "
                                 "do not apply to it")

    @property
    def uses_calibration(self) -> bool:
        return self.mode in ("int8-static", "auto") or self.keep_float > 0 or self.method != "rtn"

    # -----------------------------------------------------------------------------------------

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = self._quantize_layers(gm, ctx)
        if self.attention == "int8":
            quantize_attention(gm, result, self.name)
        elif self.attention == "bf16":
            bf16_attention(gm, result, self.name)
        return result

    def _quantize_layers(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        if self.mode == "auto":
            return run_auto(self, gm, ctx)
        if self.method != "rtn":
            ctx.require_calibration(f"{self.name}:method={self.method}")
        result = PassResult()
        if self.mode != "int4-weight":  # int8: a patch embedding's conv is a Linear over patches
            convs = linearize_patch_convolutions(gm, self.name, lambda n: exclude_pattern(n, self.exclude) is not None)
            if convs:
                result.notes["patch_convolutions"] = convs
        sites = [s for s in find_sites(gm) if s.kind == "linear" or self.embeddings]
        if not sites:
            return result
        floats = self._excluded(sites, result)
        linears = [s for s in sites if s.kind == "linear" and s.node not in floats]
        linears = [s for s in linears if self._unsupported(s) is None]  # measured only where it can run
        needs_data = self.mode == "int8-static" or self.keep_float > 0
        stats = self._calibrate(gm, ctx, linears) if needs_data and linears else {}
        if self.keep_float:
            worst = sorted(linears, key=lambda s: stats[s.node].error, reverse=True)[: self.keep_float]
            for s in worst:
                floats.add(s.node)
                result.skip(s.label, f"kept float: among the {self.keep_float} most sensitive layers "
                                     f"(relative output error {stats[s.node].error:.2e} when quantized)")
        todo = []
        for site in sites:
            if site.node in floats:
                continue
            reason = self._unsupported(site)
            if reason:
                result.skip(site.label, reason)
                continue
            todo.append(site)
        levels: dict[fx.Node, Levels] = {}
        if self.method != "rtn":
            todo, levels = self._calibrated_levels(gm, ctx, todo, result)
        before = after = 0
        for group in self._groups(gm, todo):
            site = group[0] if len(group) == 1 else merged_site(gm, group)
            before += sum(s.weight.numel() * s.weight.element_size() for s in group)
            stored_levels = _concat([levels[s.node] for s in group]) if all(s.node in levels for s in group) else None
            new, stored = self._rewrite(gm, site, stats.get(group[0].node), stored_levels)
            after += stored
            replace_group(gm, group, new)
            result.hit(len(group))
            if len(group) > 1:
                result.notes.setdefault("fused", []).append(" + ".join(s.node.name for s in group))
        if result.changed:  # a pass that rewrote nothing leaves the graph alone (even its dead code)
            eliminate_dead_code(gm)
            remove_unused_attributes(gm)
        result.notes.update({"mode": self.mode, "weight_bytes_before": before, "weight_bytes_after": after})
        if stats:
            result.notes["layer_error"] = {s.label: stats[s.node].error for s in linears}
        return result

    def _groups(self, gm: fx.GraphModule, sites: list[LayerSite]) -> list[list[LayerSite]]:
        """Sites in rewrite units: linears reading one input fused (``fuse_shared_inputs``), else one each."""
        groups: dict[object, list[LayerSite]] = {}
        for site in sites:
            fusable = self.fuse_shared_inputs and site.kind == "linear" and bias_tensor(gm, site) is not False
            # keyed by kind: an embedding's own node may be the input a linear after it reads
            groups.setdefault(("input", site.x) if fusable else ("layer", site.node), []).append(site)
        return list(groups.values())

    def _calibrated_levels(self, gm: fx.GraphModule, ctx: PassContext, todo: list[LayerSite], result: PassResult
                           ) -> tuple[list[LayerSite], dict[fx.Node, Levels]]:
        """GPTQ levels, or AWQ's scales folded (which edits weights and inputs: the sites are found
        again) and its clipped levels, for the linears in ``todo``; the notes say per layer what was done."""
        from ptool.passes.quant import awq, gptq

        calls = ctx.require_calibration_calls(f"{self.name}:method={self.method}")
        linears = [s for s in todo if s.kind == "linear"]
        if self.method == "gptq":
            layers = [gptq.Layer(s.node, s.x, s.weight.float()) for s in linears]
            levels = gptq.gptq_layers(gm, layers, calls, group_size=self.group_size, damp=self.damp,
                                      act_order=self.act_order, desc=f"{self.name}: gptq")
            result.notes["gptq"] = {s.label: {"error": levels[s.node].error, "rtn_error": levels[s.node].rtn_error}
                                    for s in linears}
            return todo, levels
        levels, notes = awq.apply_awq(gm, calls, {s.node for s in linears}, bits=4, group_size=self.group_size,
                                      grid=self.awq_grid, pass_name=self.name)
        result.notes["awq"] = notes
        fresh = {s.node: s for s in find_sites(gm)}  # the folds replaced weights and may have added a mul
        return [fresh.get(s.node, s) for s in todo], levels

    def _excluded(self, sites: list[LayerSite], result: PassResult) -> set[fx.Node]:
        out = set()
        for s in sites:
            pattern = exclude_pattern(s.node, self.exclude)
            if pattern is not None:
                out.add(s.node)
                result.skip(s.label, f"kept float: matches exclude pattern '{pattern}'")
        return out

    def _unsupported(self, site: LayerSite) -> str | None:
        width = site.weight.shape[1]
        if self.mode == "int4-weight" and width % self.group_size:
            return f"kept float: width {width} is not a multiple of group_size {self.group_size}"
        return None

    # -----------------------------------------------------------------------------------------
    # calibration: activation ranges (static) and per-layer sensitivity (keep_float)

    def _calibrate(self, gm: fx.GraphModule, ctx: PassContext, linears: list[LayerSite]) -> dict[fx.Node, _LayerStats]:
        calls = ctx.require_calibration_calls(f"{self.name}:mode={self.mode}" if self.mode == "int8-static" else
                                              f"{self.name}:keep_float={self.keep_float}")
        stats = {s.node: _LayerStats(qz.Observer(self.observer, self.percentile)) for s in linears}
        inputs = list(dict.fromkeys(s.x for s in linears))
        probes = calls[:4] if self.keep_float else []
        with progress(len(calls) + len(probes), f"{self.name}: calibrating") as bar:
            for call in calls:
                values = record_values(gm, inputs, [call])[0]
                for s in linears:
                    stats[s.node].observer.update(values[s.x])
                if bar is not None:
                    bar.update(1)
            for call in probes:  # after the ranges are known: static probes use them
                values = record_values(gm, inputs, [call])[0]
                for s in linears:
                    stats[s.node].add_error(values[s.x], s.weight, self._simulate(s, stats[s.node]))
                if bar is not None:
                    bar.update(1)
        return stats

    def _simulate(self, site: LayerSite, stats: _LayerStats):
        """``x -> quantized layer(x)`` without bias, in float: the sensitivity probe."""
        w_hat = self._fake_weight(site.weight)
        if self.mode == "int8-dynamic" and self.activations == "per-token":
            from ptool.ops.quant import token_quantize_int8

            return lambda x: _token_fake(token_quantize_int8, x) @ w_hat.T
        if self.mode == "int8-dynamic":
            grid = qz.IntRange(8, signed=False)
            return lambda x: qz.fake_quantize_dynamic(x, grid) @ w_hat.T
        if self.mode == "int8-static":
            grid = qz.IntRange(8, signed=False)
            scale, zero = stats.observer.qparams(grid)
            return lambda x: qz.fake_quantize(x, scale, zero, grid) @ w_hat.T
        return lambda x: x @ w_hat.T

    def _fake_weight(self, w: torch.Tensor) -> torch.Tensor:
        """The weight as the stored levels and scales give it back (what the kernels multiply by)."""
        if self.mode == "int4-weight":
            levels, scales, zeros = qz.quantize_weight_asymmetric(w, 4, self.group_size)
            groups = (levels.float() - zeros.float().repeat_interleave(self.group_size, 1))
            return groups * scales.repeat_interleave(self.group_size, 1)
        levels, scales = self._int8_weight(w.float())
        return levels.float() * scales[:, None]

    # -----------------------------------------------------------------------------------------
    # rewriting

    def _rewrite(self, gm: fx.GraphModule, site: LayerSite, stats: _LayerStats | None,
                 levels: Levels | None = None, op: tuple | None = None) -> tuple[fx.Node, int]:
        """Insert the quantized op computing ``site`` (before it); return it and the bytes it stores.
        ``levels``: int4 levels chosen beforehand (``method=gptq|awq``), else round to nearest;
        ``op``: the whole ``(target, args)`` of :meth:`_quantized`, computed beforehand."""
        site.x = input_of(site.node)  # an earlier rewrite may have replaced the node it reads (Linear -> Linear)
        target, args = op or self._quantized(site, stats, levels)
        stored = 0

        def resolve(a):
            nonlocal stored
            if a is X:
                return site.x
            if a is BIAS:
                return site.bias
            if isinstance(a, Stored):
                stored += a.value.numel() * a.value.element_size()
                return add_tensor(gm, site.owner, a.name, a.value, parameter=False, before=site.node)
            return a

        resolved = tuple(resolve(a) for a in args)
        with gm.graph.inserting_before(site.node):
            new = mark(gm.graph.call_function(target, resolved), self.name)
        new.meta = {**site.node.meta, "ptool.from_pass": self.name}
        return new, stored

    def _quantized(self, site: LayerSite, stats: _LayerStats | None = None, levels: Levels | None = None
                   ) -> tuple[object, tuple]:
        """``(op, args)`` of the quantized layer computing ``site``: ``args`` hold :data:`X` (the
        activation or indices), :data:`BIAS` (the site's bias) and :class:`Stored` tensors."""
        ops = torch.ops.ptool_quant
        w = site.weight.float()
        if site.kind == "embedding":
            if self.mode == "int4-weight":
                return ops.embedding_int4.default, (X, *self._int4_stored(w), w.shape[1])
            q, scales = qz.quantize_weight(w, 8)
            return ops.embedding_int8.default, (X, Stored("qweight", q), Stored("qscale", scales.squeeze(-1)))
        if self.mode == "int4-weight":
            return ops.linear_int4.default, (X, *self._int4_stored(w, levels), BIAS, w.shape[1])
        q, scales = self._int8_weight(w)
        weight_t, weight_scale = Stored("qweight_t", q.T.contiguous()), Stored("qscale", scales)
        if self.mode == "int8-dynamic":
            target = ops.linear_token_int8 if self.activations == "per-token" else ops.linear_dynamic_int8
            return target.default, (X, weight_t, weight_scale, BIAS)
        x_scale, x_zero = stats.observer.qparams(qz.IntRange(8, signed=False))
        return ops.linear_static_int8.default, (X, Stored("x_scale", x_scale.reshape(())),
                                                Stored("x_zero", x_zero.reshape(())), weight_t, weight_scale, BIAS)

    def _int4_stored(self, w: torch.Tensor, chosen: Levels | None = None) -> tuple[Stored, Stored, Stored]:
        if chosen is not None:
            levels, scales, zeros = chosen.levels, chosen.scales, chosen.zeros
        else:
            levels, scales, zeros = qz.quantize_weight_asymmetric(w, 4, self.group_size)
        return Stored("qweight", pack_nibbles(levels)), Stored("qscale", scales), Stored("qzero", pack_nibbles(zeros))

    def _int8_weight(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.granularity == "per-tensor":
            scale = (w.abs().max() / 127).clamp_min(torch.finfo(torch.float32).tiny)
            levels = qz.quantize(w, scale, 0, qz.IntRange(8)).to(torch.int8)
            return levels, scale.expand(w.shape[0]).contiguous()
        levels, scales = qz.quantize_weight(w, 8)
        return levels, scales.squeeze(-1)


def _token_fake(quantize, x: torch.Tensor) -> torch.Tensor:
    levels, scale = quantize(x)
    return levels * scale


def _concat(parts: list[Levels]) -> Levels:
    """The levels of linears fused side by side (output rows concatenated)."""
    if len(parts) == 1:
        return parts[0]
    return Levels(*(torch.cat([getattr(p, k) for p in parts]) for k in ("levels", "scales", "zeros")))


@dataclass
class _LayerStats:
    observer: qz.Observer
    err: float = 0.0
    power: float = 0.0

    def add_error(self, x: torch.Tensor, w: torch.Tensor, simulate) -> None:
        x = x.detach().float()
        reference = x @ w.float().T
        self.err += float((simulate(x) - reference).pow(2).sum())
        self.power += float(reference.pow(2).sum())

    @property
    def error(self) -> float:
        return self.err / self.power if self.power else 0.0

