"""ptool's default CPU schedules for TVM 0.27 Relax: fast without tuning.

TVM from PyPI has no BLAS/DNNL offload, and its default pipeline lowers every PrimFunc as the
naive loop nest legalization wrote (one thread, scalar code); ``tvm.s_tir.dlight``'s CPU rules
only cover GEMV and row reductions. These rules, in dlight's style (one ``ScheduleRule`` per op
kind, applied by :func:`schedule_pass` to every PrimFunc not yet scheduled), cover the rest:

- :class:`MatmulRule`: dense / matmul / batched matmul / conv2d, i.e. any function whose one
  reduction block is ``C[...] += A[...] * B[...]``: a register tile (4 rows x 4 AVX-512 vectors)
  accumulated in a local buffer, the reduction loop inside the tile, the fused epilogue (bias,
  GELU, tanh, residual add) inlined into the tile's write-back, the outer tiles parallel.
- :class:`ElementwiseRule`: functions of spatial blocks only (GELU, transposes, masks):
  compute-inlined into one loop nest, outer loops parallel, innermost vectorized.
- dlight's ``Reduction`` rule (softmax, layer norm) and :class:`GemvRule` (dlight's GEMV analysis
  with a schedule of ptool's) run after these.

Two Relax passes before legalization complete the picture: :func:`fast_math_pass` (vectorizable
exp/erf/tanh, so softmax and GELU stop calling libm per lane) and :func:`reshape_after_add_pass`
(the residual add joins the matmul's epilogue).

Measured (``tools/bench_tvm.py``, batch 1, seq 128, 2 cores, one TVM thread per core, medians of
20 interleaved calls): all-MiniLM-L6-v2 19.7 ms vs torch eager 29.3 ms (0.67x; TVM's default
pipeline 2123 ms, 72x); BERT-base 136 ms vs 232 ms (0.59x; default pipeline 28.2 s, 121x). A
128x384 @ 384x1536 matmul runs at ~190 GFLOP/s on the two cores (oneDNN through torch: ~150); the
matmul kernels take ~80% of the time.
"""

from __future__ import annotations

from typing import Any

import tvm
from tvm import ir, relax, s_tir, tirx, topi
from tvm.relax import expr_functor
from tvm.relax.transform.fast_math import FastMathCodeGenerator
from tvm.s_tir import dlight
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import try_inline
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule

VECTOR_BITS = 512
"""AVX-512; LLVM narrows the vectors itself on hosts without it."""

_MIN_PARALLEL_TASKS = 4
"""k blocking parallelizes over column panels only: not worth it with fewer panels than this."""


def _extent(sch: Any, loop: Any) -> int | None:
    ext = sch.get(loop).extent
    return int(ext) if isinstance(ext, tirx.IntImm) else None


def _largest_divisor(n: int, candidates: tuple[int, ...]) -> int:
    """The first of ``candidates`` (in order) dividing ``n``; 1 if none does."""
    return next((c for c in candidates if n % c == 0), 1)


def _matmul_block(sch: Any, infos: list[Any]) -> Any | None:
    """The one reduction block if it is ``C[...] = C[...] + A[...] * B[...]`` (possibly cast)."""
    reductions = [b for b in infos if not b.is_injective()]
    if len(reductions) != 1 or not all(k in "SR" for k in reductions[0].dom_kind()):
        return None
    info = reductions[0]
    block = sch.get(info.block_rv)
    body = block.body
    if not isinstance(body, tirx.BufferStore) or not isinstance(body.value, tirx.Add):
        return None
    lhs, rhs = body.value.a, body.value.b
    if isinstance(lhs, tirx.Mul):
        lhs, rhs = rhs, lhs
    if not (isinstance(lhs, ir.TensorLoad) and lhs.source.same_as(body.buffer) and isinstance(rhs, tirx.Mul)):
        return None
    kinds = info.dom_kind()
    if kinds.count("S") < 2 or "R" not in kinds or kinds.index("R") < kinds.count("S"):
        return None  # spatial loops first, then reductions: the layout legalization writes
    return info


class MatmulRule(CPUScheduleRule):
    """Register-tiled, vectorized, parallel schedule for matmul-like reductions.

    The output's innermost axis is split into ``cols`` = 4 AVX-512 vectors (64 fp32), the one
    before it into ``rows`` = 4 rows (the last tile predicated when 4 does not divide the rows);
    the accumulator tile (rows x cols) lives in a local buffer, and the reduction loop runs inside
    the tile, so every weight vector loaded feeds
    ``rows`` FMAs and every input scalar ``cols / 16`` FMAs. A single reduction axis longer than
    ``k_block`` is blocked outside the row tiles, so a ``k_block x cols`` slice of the weights stays
    in L1 while all row tiles use it. The loops outside the tile are fused and run in parallel.
    The epilogue after the reduction (bias, activation, residual) is inlined into the write-back.

    Measured (2 cores, interleaved, medians): 128x1536 @ 1536x384 + bias 82 ms -> 1.7 ms (default
    lowering -> this rule, ~90 GFLOP/s); 128x3072 @ 3072x768: 29.5 ms without k blocking, 10.7 ms
    with 256-deep blocks (a 64 KiB slice of B), 7.0 ms with 128-deep ones (32 KiB: Zen 4's L1).
    """

    def __init__(self, rows: int = 4, vectors: int = 4, k_block: int = 128) -> None:
        self.rows = rows
        self.vectors = vectors
        self.k_block = k_block

    def apply(self, func: Any, target: Any, _tunable: bool) -> Any:
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None:
            return None
        main = _matmul_block(sch, infos)
        if main is None:
            return None
        if not _inline_around(sch, infos, main):
            return None
        lanes = VECTOR_BITS // 32
        loops = sch.get_loops(main.block_rv)
        n_spatial = main.dom_kind().count("S")
        spatial, reduce = loops[:n_spatial], loops[n_spatial:]
        row_ext, col_ext = _extent(sch, spatial[-2]), _extent(sch, spatial[-1])
        if row_ext is None or col_ext is None:
            return None
        widths = tuple(lanes * v for v in range(self.vectors, 0, -1)) + (8, 4, 2)
        cols = _largest_divisor(col_ext, tuple(c for c in widths if c <= col_ext))
        if cols < 4 and col_ext <= lanes * self.vectors:
            cols = col_ext  # a narrow output (e.g. 10 classes): one short vector
        rows = _largest_divisor(row_ext, tuple(range(min(self.rows, row_ext), 1, -1)))
        if rows < self.rows <= row_ext // 2:
            # no full-height divisor (ViT's 197 tokens is prime): full tiles plus a predicated last
            # one beat 1-row tiles, where each weight vector feeds a single FMA (197x384 @ 384x1536:
            # 2.30 -> 1.11 ms on 2 cores)
            rows = self.rows
        io, ii = sch.split(spatial[-2], factors=[None, rows])
        jo, ji = sch.split(spatial[-1], factors=[None, cols])
        k_ext = _extent(sch, reduce[0]) if len(reduce) == 1 else None
        kc = _largest_divisor(k_ext, (self.k_block, self.k_block // 2)) if k_ext and self.k_block else 1
        panels = col_ext // cols
        for loop in spatial[:-2]:
            panels *= _extent(sch, loop) or 1
        if kc > 1 and k_ext > kc and panels >= _MIN_PARALLEL_TASKS:
            # k blocks outside the row tiles: a (kc x cols) slice of B stays in L1 while every row
            # tile of the panel uses it; the accumulators of the whole panel live in a local buffer
            ko, ki = sch.split(reduce[0], factors=[None, kc])
            sch.reorder(*spatial[:-2], jo, ko, io, ki, ii, ji)
            outer = sch.fuse(*spatial[:-2], jo)
            first_reduce = ko
        else:
            sch.reorder(*spatial[:-2], jo, io, *reduce, ii, ji)
            outer = sch.fuse(*spatial[:-2], jo, io)
            first_reduce = reduce[0]
        local = sch.cache_write(main.block_rv, 0, "local")
        sch.reverse_compute_at(local, outer, preserve_unit_loops=True)
        _inline_epilogue(sch, local)
        sch.parallel(outer)
        sch.unroll(ii)
        if cols > 1:
            sch.vectorize(ji)  # before decompose_reduction: the update must still be a reduction block
        init = sch.decompose_reduction(main.block_rv, first_reduce)
        if cols > 1:
            for block in (init, local):
                sch.vectorize(sch.get_loops(block)[-1])
        return sch


def _inline_around(sch: Any, infos: list[Any], main: Any) -> bool:
    """Inline the spatial blocks before the reduction into it (pads, casts); False if one stays."""
    for info in infos:
        if info is main:
            break
        try:
            sch.compute_inline(info.block_rv)
        except Exception:  # a producer that cannot inline (e.g. read twice): leave the function
            return False
    return True


def _inline_epilogue(sch: Any, writeback: Any) -> None:
    """Inline every block after the write-back into it, in order (bias, activation, residual)."""
    while True:
        consumers = sch.get_consumers(writeback)
        if len(consumers) != 1:
            return
        try:
            sch.reverse_compute_inline(consumers[0])
        except Exception:  # e.g. a broadcasting consumer: compute it per tile instead
            return


class ElementwiseRule(CPUScheduleRule):
    """Parallel, vectorized loops for functions made only of spatial blocks.

    Producers are inlined into their consumers (one pass over memory instead of one per op);
    each remaining block runs its outer loops fused in parallel and its innermost loop in
    AVX-512 vectors. GELU, masks and the head transposes of attention are such functions.
    """

    def apply(self, func: Any, target: Any, _tunable: bool) -> Any:
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if not infos or not all(info.is_injective() for info in infos):
            return None
        remaining = try_inline(sch, infos[:-1]) + [infos[-1]]
        lanes = VECTOR_BITS // 32
        for info in remaining:
            _parallel_vectorize(sch, sch.get_loops(info.block_rv), lanes)
        return sch


def _parallel_vectorize(sch: Any, loops: list[Any], lanes: int) -> None:
    """Fuse the outer loops and run them in parallel; vectorize the innermost by ``lanes``."""
    if not loops:
        return
    inner = loops[-1]
    inner_ext = _extent(sch, inner)
    if len(loops) == 1:
        if inner_ext is not None and inner_ext >= 2 * lanes and inner_ext % lanes == 0:
            outer, inner = sch.split(inner, factors=[None, lanes])
            sch.parallel(outer)
            sch.vectorize(inner)
        return
    outer = sch.fuse(*loops[:-1])
    sch.parallel(outer)
    if inner_ext is None or inner_ext < 4:
        return
    if inner_ext > lanes and inner_ext % lanes == 0:
        _, inner = sch.split(inner, factors=[None, lanes])
    if inner_ext <= lanes or inner_ext % lanes == 0:
        sch.vectorize(inner)


class GemvRule(dlight.cpu.GEMV):
    """dlight's CPU GEMV analysis, with a schedule LLVM can compile at any size.

    dlight's own schedule vectorizes 128 output rows at once (a 128-lane gather, its 64-step
    reduction unrolled inside) and leaves a batch axis serial: on a batched row dot product such
    as InLine's ``q . mean(k)`` over (12, N, 64), the build of InLine's kernel was still in LLVM's
    code generation after 5 minutes at N = 128 and 15 at N = 1024 (2.5 s at 1024 without that
    kernel's schedule). Here the batch and the row tiles are fused into one parallel loop and one
    AVX-512 vector of rows is computed at a time.
    """

    def sch_inner_reduction(self, sch: Any, target: Any, block: Any, vector_input_buffers: Any,
                            epilogue_info: Any) -> Any:
        batch, s, r, c = sch.get_loops(block)
        lanes = VECTOR_BITS // 32
        rows = _extent(sch, s)
        if rows is not None and rows < lanes:
            sch.parallel(sch.fuse(batch, s) if _extent(sch, batch) != 1 else s)
            return sch
        s_outer, s_inner = sch.split(s, factors=[None, lanes])
        sch.parallel(sch.fuse(batch, s_outer))
        sch.vectorize(s_inner)
        return sch


def default_rules() -> list[Any]:
    """ptool's rules first, then dlight's CPU reduction rule (softmax, norms) and GEMV."""
    return [MatmulRule(), ElementwiseRule(), dlight.cpu.Reduction(), GemvRule()]


def schedule_pass(target: Any, rules: list[Any] | None = None) -> Any:
    """A module pass scheduling every unscheduled PrimFunc with the first rule that takes it.

    Unlike dlight's ``ApplyDefaultSchedule``, a rule that raises on one function (dlight's GEMV
    analysis does on some fused BERT kernels) only leaves that function to the default lowering.
    """
    rules = default_rules() if rules is None else rules

    @tvm.transform.module_pass(opt_level=0, name="ptool.CPUSchedules")
    def _pass(mod: Any, _ctx: Any) -> Any:
        updates = {}
        for gv, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc) or _is_scheduled(func):
                continue
            scheduled = first_schedule(func, target, rules)
            if scheduled is not None:
                updates[gv] = scheduled.mod["main"].with_attr("tirx.is_scheduled", True)
        if not updates:
            return mod
        mod = mod.clone()  # the caller's module stays as it was
        for gv, func in updates.items():
            mod[gv] = func
        return mod

    return _pass


def _is_scheduled(func: Any) -> bool:
    return bool(func.attrs is not None and func.attrs.get("tirx.is_scheduled", False))


def first_schedule(func: Any, target: Any, rules: list[Any]) -> Any:
    """The schedule of the first of ``rules`` that takes ``func`` (None if none does): ptool's
    default for one kernel, also the baseline MetaSchedule's candidates are measured against."""
    for rule in rules:
        sch = _try_rule(rule, func, target)  # a rule that raises on a function does not apply to it
        if sch is not None:
            return sch[0] if isinstance(sch, list) else sch
    return None


def relax_function_pass(name: str, mutator_class: Any, finish: Any = None) -> Any:
    """A module pass running ``mutator_class(mod)`` (a Relax ``PyExprMutator``) over every Relax
    function, then ``finish(mod)`` if given."""

    @tvm.transform.module_pass(opt_level=0, name=name)
    def _pass(mod: Any, _ctx: Any) -> Any:
        mutator = mutator_class(mod)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                mutator.builder_.update_func(gv, mutator.visit_expr(func))
        out = mutator.builder_.get()
        return finish(out) if finish is not None else out

    return _pass


def fast_math_pass() -> Any:
    """exp, erf, tanh, softmax and GELU through TVM's polynomial approximations (``topi.fast_*``).

    LLVM scalarizes ``exp``/``erf`` of a vector into one libm call per lane, which made softmax
    and GELU 4-5x slower than torch even when vectorized; the polynomials vectorize. Relax's own
    ``FastMathTransform`` misses ``nn.gelu``, hence this subclass. Runs before legalization.
    """
    def gelu(x: Any) -> Any:
        erf = topi.fast_erf(topi.multiply(x, tvm.tirx.const(0.5**0.5, x.dtype)))
        half = tvm.tirx.const(0.5, x.dtype)
        return topi.multiply(x, topi.add(half, topi.multiply(erf, half)))

    @expr_functor.mutator
    class _FastMath(FastMathCodeGenerator._cls):
        def visit_call_(self, call: Any) -> Any:
            if isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.nn.gelu":
                return self.builder_.call_te(gelu, self.visit_expr(call.args[0]))
            return super().visit_call_(call)

    return relax_function_pass("ptool.FastMath", _FastMath)


def rule_assignments(mod: Any, target: Any, rules: list[Any] | None = None) -> dict[str, str | None]:
    """Which rule would schedule each PrimFunc of a legalized module (None: none applies).

    For inspection and tests; :func:`schedule_pass` makes the same choices.
    """
    rules = default_rules() if rules is None else rules
    chosen: dict[str, str | None] = {}
    with target:
        for gv, func in mod.functions_items():
            if isinstance(func, tirx.PrimFunc) and not _is_scheduled(func):
                rule = next((r for r in rules if _try_rule(r, func, target) is not None), None)
                chosen[gv.name_hint] = type(rule).__name__ if rule is not None else None
    return chosen


def _try_rule(rule: Any, func: Any, target: Any) -> Any:
    try:
        return rule.apply(func, target, False)
    except Exception:  # counts as "does not apply", as in schedule_pass
        return None


def reshape_after_add_pass() -> Any:
    """``add(reshape(x), y)`` -> ``reshape(add(x, reshape(y)))`` when both sides have one shape.

    A linear layer reaches Relax as a 2-D matmul + bias whose output is reshaped back to
    (batch, seq, hidden) before the residual add; FuseOps stops a matmul's group at a reshape, so
    the residual add became a kernel of its own (one more pass over the activations per layer).
    Moving the reshape after the add lets the add join the matmul's epilogue; the reshapes left
    are free views. Exact (same additions, same order). Runs before legalization.
    """
    add_op, reshape_op = tvm.ir.Op.get("relax.add"), tvm.ir.Op.get("relax.reshape")

    def static_shape(expr: Any) -> tuple[int, ...] | None:
        shape = getattr(_type_of(expr), "shape", None)
        values = getattr(shape, "values", None)
        if values is None or not all(isinstance(v, tvm.tirx.IntImm) for v in values):
            return None
        return tuple(int(v) for v in values)

    @expr_functor.mutator
    class _Mover(relax.PyExprMutator):
        def visit_call_(self, call: Any) -> Any:
            call = super().visit_call_(call)
            if not (isinstance(call, relax.Call) and call.op.same_as(add_op)):
                return call
            for reshaped, other in ((call.args[0], call.args[1]), (call.args[1], call.args[0])):
                bound = self.lookup_binding(reshaped) if isinstance(reshaped, relax.Var) else None
                if not (isinstance(bound, relax.Call) and bound.op.same_as(reshape_op)):
                    continue
                source = bound.args[0]
                out_shape, src_shape = static_shape(reshaped), static_shape(source)
                if out_shape is None or src_shape is None or static_shape(other) != out_shape:
                    continue
                flat_other = self.builder_.emit(relax.op.reshape(other, src_shape))
                pair = (source, flat_other) if reshaped is call.args[0] else (flat_other, source)
                summed = self.builder_.emit(relax.op.add(*pair))
                return relax.op.reshape(summed, out_shape)
            return call

    return relax_function_pass("ptool.ReshapeAfterAdd", _Mover, finish=relax.transform.DeadCodeElimination())


def _type_of(expr: Any) -> Any:
    """A Relax expression's type (``.ty`` in TVM 0.27, ``.struct_info`` before)."""
    ty = getattr(expr, "ty", None)
    return ty if ty is not None else expr.struct_info
